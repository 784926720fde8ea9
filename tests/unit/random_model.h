/* A random GPT-2 built in memory (no files) for unit tests of the forward
 * pass and the patching engines.  Header-only: each test program includes it
 * once. */
#ifndef PS_TEST_RANDOM_MODEL_H
#define PS_TEST_RANDOM_MODEL_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

typedef struct {
    model m;
    float *store;
} random_model;

static uint64_t random_model_state = 42;

/* Uniform in [-1, 1) from splitmix64 (deterministic across platforms). */
static float random_model_uniform(void)
{
    uint64_t z = (random_model_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)((double)(z >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static float *random_model_fill(float **p, size_t n, float scale, float offset)
{
    float *a = *p;
    for (size_t i = 0; i < n; i++)
        a[i] = offset + scale * random_model_uniform();
    *p += n;
    return a;
}

/* L blocks, H heads, width d, vocabulary V, npos positions; LayerNorm
 * weights around 1, everything else small, so no activation saturates. */
static void random_model_init(random_model *tm, size_t L, size_t H, size_t d, size_t V, size_t npos)
{
    memset(tm, 0, sizeof *tm);
    model_config *c = &tm->m.cfg;
    *c = (model_config){.n_layer = L, .n_head = H, .n_embd = d, .n_positions = npos, .vocab_size = V,
                        .n_inner = 4 * d, .d_head = d / H, .ln_eps = 1e-5f};
    size_t m = 4 * d;
    size_t per = 4 * d + 3 * d * d + 3 * d + d * d + d + d * m + m + m * d + d;
    size_t total = V * d + npos * d + L * per + 2 * d;
    tm->store = malloc(total * sizeof(float));
    float *p = tm->store;
    tm->m.wte = random_model_fill(&p, V * d, 0.5f, 0);
    tm->m.wpe = random_model_fill(&p, npos * d, 0.2f, 0);
    tm->m.blocks = calloc(L, sizeof *tm->m.blocks);
    const float ws = 1.0f / sqrtf((float)d);
    for (size_t l = 0; l < L; l++) {
        model_block *b = &tm->m.blocks[l];
        b->ln_1_w = random_model_fill(&p, d, 0.1f, 1);
        b->ln_1_b = random_model_fill(&p, d, 0.1f, 0);
        b->attn_w = random_model_fill(&p, 3 * d * d, 2 * ws, 0);
        b->attn_b = random_model_fill(&p, 3 * d, 0.1f, 0);
        b->attn_proj_w = random_model_fill(&p, d * d, ws, 0);
        b->attn_proj_b = random_model_fill(&p, d, 0.1f, 0);
        b->ln_2_w = random_model_fill(&p, d, 0.1f, 1);
        b->ln_2_b = random_model_fill(&p, d, 0.1f, 0);
        b->fc_w = random_model_fill(&p, d * m, ws, 0);
        b->fc_b = random_model_fill(&p, m, 0.1f, 0);
        b->mlp_proj_w = random_model_fill(&p, m * d, ws / 2, 0);
        b->mlp_proj_b = random_model_fill(&p, d, 0.1f, 0);
    }
    tm->m.ln_f_w = random_model_fill(&p, d, 0.1f, 1);
    tm->m.ln_f_b = random_model_fill(&p, d, 0.1f, 0);
    tm->m.unembed = tm->m.wte;
    if (model_pack_weights(&tm->m) != PS_OK)
        abort();
}

static void random_model_free(random_model *tm)
{
    free(tm->store);
    if (tm->m.packed_owned)
        free(tm->m.packed);
    free(tm->m.blocks);
}

#endif
