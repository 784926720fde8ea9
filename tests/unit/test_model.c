/*
 * Unit tests: config.json parsing and model_load on small GPT-2 checkpoints
 * written by the test itself (HF layout) into a mkdtemp directory, with one
 * deliberate defect per error test.  Every error test checks the status and
 * that the message names the file and the problem.
 *
 * Weight values are k/64 with |k| <= 48, exact in F32, F16, BF16 and F64, so
 * converted weights are compared with ==.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <ftw.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"
#include "model.h"
#include "safetensors.h"
#include "sha256.h"

#define TEST_TMPDIR_NAME "ps_test_model"
#include "test_tmpdir.h"

/* ---- a small GPT-2 checkpoint writer ------------------------------------ */

/* k/64 with k in [-48, 48], from a hash of the tensor's name without prefix. */
static float weight_value(const char *base, size_t i)
{
    uint32_t h = 2166136261u;
    for (const char *p = base; *p; p++)
        h = (h ^ (uint8_t)*p) * 16777619u;
    uint32_t k = (h + (uint32_t)i * 2654435761u) % 97;
    return (float)((int)k - 48) / 64.0f;
}

typedef struct {
    size_t n_layer, n_head, d, vocab, n_pos;
    size_t n_inner;           /* 0: "n_inner": null in config.json */
    st_dtype dtype;
    bool prefix;              /* names start with "transformer." */
    bool untied;              /* write lm_head.weight */
    bool mask_buffers;        /* write h.N.attn.bias and h.N.attn.masked_bias */
    const char *skip;         /* leave out this tensor (name without prefix) */
    const char *reshape;      /* write this tensor with its first dimension + 1 */
    const char *extra;        /* add a tensor with exactly this name, F32 [1] */
    const char *twice;        /* write this tensor both with and without the prefix */
    const char *poison;       /* element 1 of this tensor becomes poison_value */
    float poison_value;
    const char *odd;          /* this tensor gets dtype odd_dtype */
    st_dtype odd_dtype;
    size_t misalign;          /* extra header bytes: data starts at 8 + 8k + misalign */
    const char *config;       /* config.json text (NULL: generated from the sizes) */
} gen;

static gen tiny(void)
{
    return (gen){.n_layer = 2, .n_head = 2, .d = 8, .vocab = 11, .n_pos = 6, .dtype = ST_F32};
}

typedef struct {
    char name[128];
    char base[128];
    st_dtype dtype;
    size_t ndim, shape[4], n;
    bool mask, masked_bias;
} spec;

static size_t add_spec(spec *v, size_t k, const gen *g, const char *base, bool prefixed, size_t ndim,
                       size_t d0, size_t d1)
{
    spec *s = &v[k];
    memset(s, 0, sizeof *s);
    snprintf(s->base, sizeof s->base, "%s", base);
    bool lm = strcmp(base, "lm_head.weight") == 0;
    snprintf(s->name, sizeof s->name, "%s%s", prefixed && !lm ? "transformer." : "", base);
    s->dtype = (g->odd && strcmp(base, g->odd) == 0) ? g->odd_dtype : g->dtype;
    s->ndim = ndim;
    s->shape[0] = d0;
    s->shape[1] = d1;
    if (g->reshape && strcmp(base, g->reshape) == 0)
        s->shape[0]++;
    s->n = 1;
    for (size_t i = 0; i < ndim; i++)
        s->n *= s->shape[i];
    return k + 1;
}

static size_t add_weight(spec *v, size_t k, const gen *g, const char *base, size_t ndim, size_t d0, size_t d1)
{
    if (g->skip && strcmp(base, g->skip) == 0)
        return k;
    k = add_spec(v, k, g, base, g->prefix, ndim, d0, d1);
    if (g->twice && strcmp(base, g->twice) == 0)
        k = add_spec(v, k, g, base, !g->prefix, ndim, d0, d1);
    return k;
}

/* Exact float -> half for the values the tests use (normal, zero, inf, nan). */
static uint16_t f16_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    if (isnan(f))
        return sign | 0x7e00;
    if (isinf(f))
        return sign | 0x7c00;
    if (f == 0)
        return sign;
    if (fabsf(f) < ldexpf(1.0f, -14)) {
        /* half subnormal: |f| = mant * 2^-24 with mant < 1024 */
        float mant = fabsf(f) * 16777216.0f;
        assert_true(mant == floorf(mant));
        return (uint16_t)(sign | (uint16_t)mant);
    }
    int e = (int)((u >> 23) & 0xff) - 127 + 15;
    assert_true(e > 0 && e < 31 && (u & 0x1fff) == 0);
    return (uint16_t)(sign | (uint16_t)(e << 10) | ((u >> 13) & 0x3ff));
}

static void encode(uint8_t *dst, st_dtype t, float f)
{
    switch (t) {
    case ST_F32: memcpy(dst, &f, 4); break;
    case ST_F64: { double x = f; memcpy(dst, &x, 8); break; }
    case ST_F16: { uint16_t h = f16_bits(f); memcpy(dst, &h, 2); break; }
    case ST_BF16: { uint32_t u; memcpy(&u, &f, 4); uint16_t h = (uint16_t)(u >> 16); memcpy(dst, &h, 2); break; }
    default: memset(dst, 0, st_dtype_size(t)); break;
    }
}

static char *gen_config(const gen *g)
{
    char inner[32];
    if (g->n_inner)
        snprintf(inner, sizeof inner, "%zu", g->n_inner);
    else
        snprintf(inner, sizeof inner, "null");
    char *s = NULL;
    int n = asprintf(&s,
                     "{\n  \"activation_function\": \"gelu_new\",\n  \"architectures\": [\"GPT2LMHeadModel\"],\n"
                     "  \"bos_token_id\": 50256,\n  \"eos_token_id\": 50256,\n  \"layer_norm_epsilon\": 1e-05,\n"
                     "  \"model_type\": \"gpt2\",\n  \"n_ctx\": %zu,\n  \"n_embd\": %zu,\n  \"n_head\": %zu,\n"
                     "  \"n_inner\": %s,\n  \"n_layer\": %zu,\n  \"n_positions\": %zu,\n"
                     "  \"task_specific_params\": {\"text-generation\": {\"do_sample\": true, \"max_length\": 50}},\n"
                     "  \"vocab_size\": %zu\n}\n",
                     g->n_pos, g->d, g->n_head, inner, g->n_layer, g->n_pos, g->vocab);
    assert_true(n > 0);
    return s;
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(text, f);
    assert_int_equal(fclose(f), 0);
}

/* Writes tmpdir/<name>/{config.json, model.safetensors}; returns the dir
 * (static storage, valid until the next call). */
static const char *gen_model(const char *name, const gen *g)
{
    static char dir[PATH_MAX + 64];
    char path[PATH_MAX + 128];
    snprintf(dir, sizeof dir, "%s/%s", tmpdir, name);
    assert_int_equal(mkdir(dir, 0755), 0);

    snprintf(path, sizeof path, "%s/config.json", dir);
    if (g->config) {
        write_text(path, g->config);
    } else {
        char *cfg = gen_config(g);
        write_text(path, cfg);
        free(cfg);
    }

    size_t d = g->d, m = g->n_inner ? g->n_inner : 4 * d;
    size_t cap = 8 + 16 * g->n_layer;
    spec *v = calloc(cap, sizeof *v);
    assert_non_null(v);
    size_t k = 0;
    k = add_weight(v, k, g, "wte.weight", 2, g->vocab, d);
    k = add_weight(v, k, g, "wpe.weight", 2, g->n_pos, d);
    char b[96];
    for (size_t l = 0; l < g->n_layer; l++) {
#define W(suffix, nd, a, c) (snprintf(b, sizeof b, "h.%zu." suffix, l), k = add_weight(v, k, g, b, nd, a, c))
        W("ln_1.weight", 1, d, 0);
        W("ln_1.bias", 1, d, 0);
        if (g->mask_buffers) {
            snprintf(b, sizeof b, "h.%zu.attn.bias", l);
            k = add_spec(v, k, g, b, g->prefix, 4, 1, 1);
            v[k - 1].shape[2] = v[k - 1].shape[3] = g->n_pos;
            v[k - 1].n = g->n_pos * g->n_pos;
            v[k - 1].mask = true;
            snprintf(b, sizeof b, "h.%zu.attn.masked_bias", l);
            k = add_spec(v, k, g, b, g->prefix, 0, 0, 0);
            v[k - 1].masked_bias = true;
        }
        W("attn.c_attn.weight", 2, d, 3 * d);
        W("attn.c_attn.bias", 1, 3 * d, 0);
        W("attn.c_proj.weight", 2, d, d);
        W("attn.c_proj.bias", 1, d, 0);
        W("ln_2.weight", 1, d, 0);
        W("ln_2.bias", 1, d, 0);
        W("mlp.c_fc.weight", 2, d, m);
        W("mlp.c_fc.bias", 1, m, 0);
        W("mlp.c_proj.weight", 2, m, d);
        W("mlp.c_proj.bias", 1, d, 0);
#undef W
    }
    k = add_weight(v, k, g, "ln_f.weight", 1, d, 0);
    k = add_weight(v, k, g, "ln_f.bias", 1, d, 0);
    if (g->untied)
        k = add_weight(v, k, g, "lm_head.weight", 2, g->vocab, d);
    if (g->extra) {
        k = add_spec(v, k, g, "", false, 1, 1, 0);
        snprintf(v[k - 1].name, sizeof v[k - 1].name, "%s", g->extra);
        v[k - 1].dtype = ST_F32;
    }
    assert_true(k <= cap);

    /* Header in HF's form: __metadata__ first, compact JSON, space padding. */
    json_t *root = json_object();
    json_object_set_new(root, "__metadata__", json_pack("{s:s}", "format", "pt"));
    size_t off = 0;
    for (size_t i = 0; i < k; i++) {
        json_t *shape = json_array();
        for (size_t j = 0; j < v[i].ndim; j++)
            json_array_append_new(shape, json_integer((json_int_t)v[i].shape[j]));
        size_t nb = v[i].n * st_dtype_size(v[i].dtype);
        json_t *e = json_pack("{s:s, s:o, s:[I, I]}", "dtype", st_dtype_name(v[i].dtype), "shape", shape,
                              "data_offsets", (json_int_t)off, (json_int_t)(off + nb));
        assert_non_null(e);
        json_object_set_new(root, v[i].name, e);
        off += nb;
    }
    char *hdr = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    size_t hl = strlen(hdr), n_hdr = (hl + 7) / 8 * 8 + g->misalign;

    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    uint8_t len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (uint8_t)((uint64_t)n_hdr >> (8 * i));
    fwrite(len8, 1, 8, f);
    fwrite(hdr, 1, hl, f);
    for (size_t i = hl; i < n_hdr; i++)
        fputc(' ', f);
    free(hdr);
    for (size_t i = 0; i < k; i++) {
        size_t es = st_dtype_size(v[i].dtype);
        uint8_t *buf = malloc(v[i].n * es + 1);
        assert_non_null(buf);
        for (size_t j = 0; j < v[i].n; j++) {
            float x;
            if (v[i].mask)
                x = (j % g->n_pos) <= (j / g->n_pos) ? 1.0f : 0.0f; /* tril */
            else if (v[i].masked_bias)
                x = -1e4f;
            else
                x = weight_value(v[i].base, j);
            if (g->poison && strcmp(v[i].base, g->poison) == 0 && j == 1)
                x = g->poison_value;
            encode(buf + j * es, v[i].dtype, x);
        }
        assert_int_equal(fwrite(buf, es, v[i].n, f), v[i].n);
        free(buf);
    }
    assert_int_equal(fclose(f), 0);
    free(v);
    return dir;
}

static size_t expected_params(const gen *g)
{
    size_t d = g->d, m = g->n_inner ? g->n_inner : 4 * d;
    size_t per_layer = 2 * d + d * 3 * d + 3 * d + d * d + d + 2 * d + d * m + m + m * d + d;
    return g->vocab * d + g->n_pos * d + g->n_layer * per_layer + 2 * d + (g->untied ? g->vocab * d : 0);
}

/* Parameters of the blocks' weight matrices (packed in 2 bytes, not
 * converted, for F16/BF16). */
static size_t matrix_params(const gen *g)
{
    size_t d = g->d, m = g->n_inner ? g->n_inner : 4 * d;
    return g->n_layer * (d * 3 * d + d * d + d * m + m * d);
}

/* The embedding and an untied unembedding: kept in 2 bytes too (packed). */
static size_t embed_params(const gen *g) { return g->vocab * g->d * (g->untied ? 2 : 1); }

static bool in_map(const model *m, const float *p)
{
    const uint8_t *a = m->shards[0].map, *x = (const uint8_t *)p;
    return x >= a && x < a + m->shards[0].map_size;
}

static bool in_arena(const model *m, const float *p)
{
    return m->arena && p >= m->arena && p < m->arena + m->arena_floats;
}

static void check_values(const char *base, const float *w, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (w[i] != weight_value(base, i))
            fail_msg("%s[%zu] = %g, want %g", base, i, (double)w[i], (double)weight_value(base, i));
}

/* A packed matrix (gemm.h layout) element by element against the writer's
 * values of HF tensor `base` ([k, n] with row stride ld, from column c0):
 * the 2-byte form of an F16/BF16 checkpoint, whose float pointer is NULL. */
static void check_packed(const char *base, const gemm_weight *w, size_t ld, size_t c0)
{
    assert_true(w->dtype != GEMM_F32 && w->data16 != NULL);
    for (size_t kk = 0; kk < w->k; kk++)
        for (size_t c = 0; c < w->n; c++) {
            const float got = gemm_widen(w->dtype, w->data16[(c / GEMM_NR) * w->k * GEMM_NR + kk * GEMM_NR + c % GEMM_NR]);
            if (got != weight_value(base, kk * ld + c0 + c))
                fail_msg("%s[%zu, %zu] packed = %g, want %g", base, kk, c0 + c, (double)got,
                         (double)weight_value(base, kk * ld + c0 + c));
        }
}

/* An embedding ([V, d], HF tensor `base`) row by row through the model's
 * accessors (unembed: model_unembed_row, else model_embed_row), whatever
 * its storage: floats, or (2-byte checkpoints) packed [d, V] panels whose
 * float pointer is NULL. */
static void check_embedding(const model *mo, const char *base, bool unembed)
{
    const size_t d = mo->cfg.n_embd, V = mo->cfg.vocab_size;
    float *buf = malloc(d * sizeof *buf);
    assert_non_null(buf);
    for (size_t v = 0; v < V; v++) {
        const float *row = unembed ? model_unembed_row(mo, v, buf) : model_embed_row(mo, v, buf);
        for (size_t i = 0; i < d; i++)
            if (row[i] != weight_value(base, v * d + i))
                fail_msg("%s[%zu, %zu] = %g, want %g", base, v, i, (double)row[i], (double)weight_value(base, v * d + i));
    }
    free(buf);
}

/* Every pointer of the model against the writer's values. */
static void check_model(const model *mo, const gen *g)
{
    size_t d = g->d, m = g->n_inner ? g->n_inner : 4 * d;
    assert_int_equal(mo->cfg.n_layer, g->n_layer);
    assert_int_equal(mo->cfg.n_head, g->n_head);
    assert_int_equal(mo->cfg.n_embd, d);
    assert_int_equal(mo->cfg.n_inner, m);
    assert_int_equal(mo->cfg.d_head, d / g->n_head);
    assert_int_equal(mo->cfg.vocab_size, g->vocab);
    assert_int_equal(mo->cfg.n_positions, g->n_pos);
    if (mo->wte)
        check_values("wte.weight", mo->wte, g->vocab * d);
    else
        assert_true(mo->wte_p.dtype != GEMM_F32 && mo->wte_p.k == d && mo->wte_p.n == g->vocab);
    check_embedding(mo, "wte.weight", false);
    check_values("wpe.weight", mo->wpe, g->n_pos * d);
    check_values("ln_f.weight", mo->ln_f_w, d);
    check_values("ln_f.bias", mo->ln_f_b, d);
    assert_int_equal(mo->tied, !g->untied);
    if (g->untied) {
        assert_true(mo->unembed != mo->wte || !mo->wte);
        if (mo->unembed)
            check_values("lm_head.weight", mo->unembed, g->vocab * d);
        else
            assert_true(mo->unembed_p.data16 && mo->unembed_p.data16 != mo->wte_p.data16);
        check_embedding(mo, "lm_head.weight", true);
    } else {
        assert_ptr_equal(mo->unembed, mo->wte);
        assert_ptr_equal(mo->unembed_p.data16, mo->wte_p.data16);
        check_embedding(mo, "wte.weight", true);
    }
    char b[96];
    for (size_t l = 0; l < g->n_layer; l++) {
        const model_block *k = &mo->blocks[l];
#define C(suffix, p, n) (snprintf(b, sizeof b, "h.%zu." suffix, l), check_values(b, k->p, n))
        /* matrices of a 2-byte checkpoint: only packed, in 2 bytes */
#define P(suffix, p, packed, ld, c0) (snprintf(b, sizeof b, "h.%zu." suffix, l), k->p ? (void)0 : check_packed(b, &k->packed, ld, c0))
        C("ln_1.weight", ln_1_w, d);
        C("ln_1.bias", ln_1_b, d);
        if (k->attn_w)
            C("attn.c_attn.weight", attn_w, d * 3 * d);
        P("attn.c_attn.weight", attn_w, q_w, 3 * d, 0);
        P("attn.c_attn.weight", attn_w, k_w, 3 * d, d);
        P("attn.c_attn.weight", attn_w, v_w, 3 * d, 2 * d);
        C("attn.c_attn.bias", attn_b, 3 * d);
        if (k->attn_proj_w)
            C("attn.c_proj.weight", attn_proj_w, d * d);
        P("attn.c_proj.weight", attn_proj_w, attn_proj_p, d, 0);
        C("attn.c_proj.bias", attn_proj_b, d);
        C("ln_2.weight", ln_2_w, d);
        C("ln_2.bias", ln_2_b, d);
        if (k->fc_w)
            C("mlp.c_fc.weight", fc_w, d * m);
        P("mlp.c_fc.weight", fc_w, fc_p, m, 0);
        C("mlp.c_fc.bias", fc_b, m);
        if (k->mlp_proj_w)
            C("mlp.c_proj.weight", mlp_proj_w, m * d);
        P("mlp.c_proj.weight", mlp_proj_w, mlp_proj_p, d, 0);
        C("mlp.c_proj.bias", mlp_proj_b, d);
#undef C
#undef P
    }
    assert_int_equal(mo->n_params, expected_params(g));
}

/* all_pointers(mo, i) for i < N_ALL_POINTERS: NULL for an absent tensor
 * and for a matrix of a 2-byte checkpoint (packed only). */
#define N_ALL_POINTERS(mo) (5 + 12 * (mo)->cfg.n_layer)
static const float *all_pointers(const model *mo, size_t i)
{
    /* i-th weight pointer of the model, in a fixed order (NULL past the end). */
    size_t n_global = 5;
    if (i < n_global) {
        const float *gp[] = {mo->wte, mo->wpe, mo->ln_f_w, mo->ln_f_b, mo->unembed};
        return gp[i];
    }
    i -= n_global;
    if (i >= 12 * mo->cfg.n_layer)
        return NULL;
    const model_block *k = &mo->blocks[i / 12];
    const float *bp[] = {k->ln_1_w, k->ln_1_b, k->attn_w, k->attn_b, k->attn_proj_w, k->attn_proj_b,
                         k->ln_2_w, k->ln_2_b, k->fc_w, k->fc_b, k->mlp_proj_w, k->mlp_proj_b};
    return bp[i % 12];
}

/* ---- config.json ------------------------------------------------------------ */

static const char *hf_gpt2_config =
    "{\n  \"activation_function\": \"gelu_new\",\n  \"architectures\": [\"GPT2LMHeadModel\"],\n"
    "  \"attn_pdrop\": 0.1,\n  \"bos_token_id\": 50256,\n  \"embd_pdrop\": 0.1,\n"
    "  \"eos_token_id\": 50256,\n  \"initializer_range\": 0.02,\n  \"layer_norm_epsilon\": 1e-05,\n"
    "  \"model_type\": \"gpt2\",\n  \"n_ctx\": 1024,\n  \"n_embd\": 768,\n  \"n_head\": 12,\n"
    "  \"n_inner\": null,\n  \"n_layer\": 12,\n  \"n_positions\": 1024,\n"
    "  \"resid_pdrop\": 0.1,\n  \"summary_activation\": null,\n  \"summary_type\": \"cls_index\",\n"
    "  \"task_specific_params\": {\"text-generation\": {\"do_sample\": true, \"max_length\": 50}},\n"
    "  \"vocab_size\": 50257\n}\n";

static ps_status parse(model_config *c, const char *text)
{
    return model_config_parse(c, "m/config.json", text, strlen(text));
}

static void test_config_hf_gpt2(void **state)
{
    (void)state;
    model_config c;
    assert_int_equal(parse(&c, hf_gpt2_config), PS_OK);
    assert_int_equal(c.n_layer, 12);
    assert_int_equal(c.n_head, 12);
    assert_int_equal(c.n_embd, 768);
    assert_int_equal(c.n_positions, 1024);
    assert_int_equal(c.vocab_size, 50257);
    assert_int_equal(c.n_inner, 3072);
    assert_int_equal(c.d_head, 64);
    assert_true(c.ln_eps == 1e-5f);
}

static void test_config_optional_fields(void **state)
{
    (void)state;
    model_config c;
    /* Defaults: n_inner 4d, eps 1e-5, gelu_new; n_ctx stands in for n_positions. */
    assert_int_equal(parse(&c, "{\"n_layer\":1,\"n_head\":2,\"n_embd\":4,\"n_ctx\":7,\"vocab_size\":9}"), PS_OK);
    assert_int_equal(c.n_positions, 7);
    assert_int_equal(c.n_inner, 16);
    assert_true(c.ln_eps == 1e-5f);
    /* n_positions wins over n_ctx; explicit n_inner and eps. */
    assert_int_equal(parse(&c, "{\"n_layer\":1,\"n_head\":2,\"n_embd\":4,\"n_positions\":5,\"n_ctx\":7,"
                               "\"vocab_size\":9,\"n_inner\":10,\"layer_norm_epsilon\":0.001,"
                               "\"activation_function\":\"gelu_pytorch_tanh\"}"),
                     PS_OK);
    assert_int_equal(c.n_positions, 5);
    assert_int_equal(c.n_inner, 10);
    assert_true(c.ln_eps == 0.001f);
    /* An integer epsilon is still a number. */
    assert_int_equal(parse(&c, "{\"n_layer\":1,\"n_head\":1,\"n_embd\":1,\"n_positions\":1,"
                               "\"vocab_size\":1,\"layer_norm_epsilon\":1}"),
                     PS_OK);
    assert_true(c.ln_eps == 1.0f);
}

static void test_config_missing_field(void **state)
{
    (void)state;
    static const char *fields[] = {"n_layer", "n_head", "n_embd", "vocab_size"};
    for (size_t i = 0; i < 4; i++) {
        json_error_t je;
        json_t *j = json_loads(hf_gpt2_config, 0, &je);
        assert_non_null(j);
        json_object_del(j, fields[i]);
        char *text = json_dumps(j, 0);
        json_decref(j);
        model_config c;
        char want[64];
        snprintf(want, sizeof want, "m/config.json: missing field '%s'", fields[i]);
        ASSERT_ERROR(parse(&c, text), PS_ERR_FORMAT, want);
        free(text);
    }
    model_config c;
    ASSERT_ERROR(parse(&c, "{\"n_layer\":1,\"n_head\":2,\"n_embd\":4,\"vocab_size\":9}"), PS_ERR_FORMAT,
                 "m/config.json: missing field 'n_positions'");
    ASSERT_ERROR(parse(&c, "{\"n_layer\":null,\"n_head\":2,\"n_embd\":4,\"n_ctx\":3,\"vocab_size\":9}"),
                 PS_ERR_FORMAT, "m/config.json: missing field 'n_layer'");
}

static void test_config_bad_activation(void **state)
{
    (void)state;
    model_config c;
    ASSERT_ERROR(parse(&c, "{\"n_layer\":1,\"n_head\":2,\"n_embd\":4,\"n_ctx\":3,\"vocab_size\":9,"
                           "\"activation_function\":\"relu\"}"),
                 PS_ERR_INVALID, "m/config.json", "activation_function 'relu' is not supported");
    ASSERT_ERROR(parse(&c, "{\"n_layer\":1,\"n_head\":2,\"n_embd\":4,\"n_ctx\":3,\"vocab_size\":9,"
                           "\"activation_function\":\"gelu\"}"),
                 PS_ERR_INVALID, "m/config.json", "activation_function 'gelu' is not supported");
    ASSERT_ERROR(parse(&c, "{\"n_layer\":1,\"n_head\":2,\"n_embd\":4,\"n_ctx\":3,\"vocab_size\":9,"
                           "\"activation_function\":1}"),
                 PS_ERR_FORMAT, "m/config.json", "'activation_function' is an integer");
}

static void test_config_not_divisible(void **state)
{
    (void)state;
    model_config c;
    ASSERT_ERROR(parse(&c, "{\"n_layer\":1,\"n_head\":3,\"n_embd\":10,\"n_ctx\":3,\"vocab_size\":9}"),
                 PS_ERR_INVALID, "m/config.json: n_embd 10 is not divisible by n_head 3");
}

static void test_config_zero_and_negative(void **state)
{
    (void)state;
    model_config c;
    ASSERT_ERROR(parse(&c, "{\"n_layer\":1,\"n_head\":0,\"n_embd\":4,\"n_ctx\":3,\"vocab_size\":9}"),
                 PS_ERR_INVALID, "m/config.json: field 'n_head' is 0, must be positive");
    ASSERT_ERROR(parse(&c, "{\"n_layer\":-2,\"n_head\":1,\"n_embd\":4,\"n_ctx\":3,\"vocab_size\":9}"),
                 PS_ERR_INVALID, "m/config.json: field 'n_layer' is -2, must be positive");
    ASSERT_ERROR(parse(&c, "{\"n_layer\":1,\"n_head\":1,\"n_embd\":4,\"n_ctx\":0,\"vocab_size\":9}"),
                 PS_ERR_INVALID, "m/config.json: field 'n_ctx' is 0");
    ASSERT_ERROR(parse(&c, "{\"n_layer\":1,\"n_head\":1,\"n_embd\":4,\"n_ctx\":3,\"vocab_size\":9,"
                           "\"n_inner\":0}"),
                 PS_ERR_INVALID, "m/config.json: field 'n_inner' is 0");
}

static void test_config_over_caps(void **state)
{
    (void)state;
    model_config c;
    ASSERT_ERROR(parse(&c, "{\"n_layer\":1,\"n_head\":1,\"n_embd\":1048576,\"n_ctx\":3,\"vocab_size\":9}"),
                 PS_ERR_NOMEM, "m/config.json: field 'n_embd' is 1048576, over the limit of 65536");
    ASSERT_ERROR(parse(&c, "{\"n_layer\":1,\"n_head\":1,\"n_embd\":4,\"n_ctx\":3,"
                           "\"vocab_size\":9223372036854775807}"),
                 PS_ERR_NOMEM, "m/config.json: field 'vocab_size'", "over the limit");
    ASSERT_ERROR(parse(&c, "{\"n_layer\":100000,\"n_head\":1,\"n_embd\":4,\"n_ctx\":3,\"vocab_size\":9}"),
                 PS_ERR_NOMEM, "m/config.json: field 'n_layer'", "over the limit");
    ASSERT_ERROR(parse(&c, "{\"n_layer\":1,\"n_head\":1,\"n_embd\":4,\"n_positions\":4194304,\"vocab_size\":9}"),
                 PS_ERR_NOMEM, "m/config.json: field 'n_positions'", "over the limit");
}

static void test_config_wrong_types(void **state)
{
    (void)state;
    model_config c;
    ASSERT_ERROR(parse(&c, "{\"n_layer\":\"12\",\"n_head\":1,\"n_embd\":4,\"n_ctx\":3,\"vocab_size\":9}"),
                 PS_ERR_FORMAT, "m/config.json: field 'n_layer' is a string, expected a positive integer");
    ASSERT_ERROR(parse(&c, "{\"n_layer\":12.0,\"n_head\":1,\"n_embd\":4,\"n_ctx\":3,\"vocab_size\":9}"),
                 PS_ERR_FORMAT, "m/config.json: field 'n_layer' is a real number");
    ASSERT_ERROR(parse(&c, "{\"n_layer\":1,\"n_head\":1,\"n_embd\":4,\"n_ctx\":3,\"vocab_size\":9,"
                           "\"layer_norm_epsilon\":\"1e-5\"}"),
                 PS_ERR_FORMAT, "m/config.json: field 'layer_norm_epsilon' is a string");
    ASSERT_ERROR(parse(&c, "{\"n_layer\":1,\"n_head\":1,\"n_embd\":4,\"n_ctx\":3,\"vocab_size\":9,"
                           "\"layer_norm_epsilon\":0.0}"),
                 PS_ERR_INVALID, "m/config.json: layer_norm_epsilon 0 is not in (0, 1]");
    ASSERT_ERROR(parse(&c, "{\"n_layer\":1,\"n_head\":1,\"n_embd\":4,\"n_ctx\":3,\"vocab_size\":9,"
                           "\"layer_norm_epsilon\":1e-60}"),
                 PS_ERR_INVALID, "m/config.json: layer_norm_epsilon");
    ASSERT_ERROR(parse(&c, "{\"n_layer\":1,\"n_head\":1,\"n_embd\":4,\"n_ctx\":3,\"vocab_size\":9,"
                           "\"n_inner\":\"big\"}"),
                 PS_ERR_FORMAT, "m/config.json: field 'n_inner' is a string");
}

static void test_config_not_json(void **state)
{
    (void)state;
    model_config c;
    ASSERT_ERROR(parse(&c, "{\"n_layer\": 1,"), PS_ERR_FORMAT, "m/config.json: not valid JSON");
    ASSERT_ERROR(parse(&c, "[1, 2]"), PS_ERR_FORMAT, "m/config.json: top level is an array");
    ASSERT_ERROR(parse(&c, "{\"n_layer\":1,\"n_layer\":2}"), PS_ERR_FORMAT, "m/config.json",
                 "duplicate object key");
    /* Deep nesting: jansson's own depth limit gives a clean error. */
    size_t n = 200000;
    char *deep = malloc(2 * n + 1);
    assert_non_null(deep);
    memset(deep, '[', n);
    memset(deep + n, ']', n);
    deep[2 * n] = '\0';
    ASSERT_ERROR(parse(&c, deep), PS_ERR_FORMAT, "m/config.json: not valid JSON", "depth");
    free(deep);
}

/* ---- model_load ------------------------------------------------------------ */

static void test_load_f32_in_place(void **state)
{
    (void)state;
    gen g = tiny();
    const char *dir = gen_model("f32", &g);
    model m;
    assert_int_equal(model_load(&m, dir), PS_OK);
    check_model(&m, &g);
    assert_string_equal(m.weights_dtype, "F32");
    assert_string_equal(m.dir, dir);
    assert_non_null(strstr(m.config_json, "\"n_embd\": 8"));
    /* Every F32 tensor is 4-byte aligned here, so all of them live in the
     * mmap; the arena holds only the packed matrices. */
    assert_int_equal(m.arena_floats, 0);
    assert_true(m.packed == (void *)m.arena && m.packed_bytes > 0 && !m.packed_owned);
    for (size_t i = 0; i < N_ALL_POINTERS(&m); i++)
        if (all_pointers(&m, i))
            assert_true(in_map(&m, all_pointers(&m, i)));
    model_free(&m);
    model_free(&m); /* twice is safe */
}

static void test_load_untied(void **state)
{
    (void)state;
    gen g = tiny();
    g.untied = true;
    model m;
    assert_int_equal(model_load(&m, gen_model("untied", &g)), PS_OK);
    check_model(&m, &g);
    assert_false(m.tied);
    assert_int_equal(m.n_params, expected_params(&g));
    model_free(&m);

    g.untied = false;
    assert_int_equal(model_load(&m, gen_model("tied", &g)), PS_OK);
    assert_true(m.tied);
    assert_ptr_equal(m.unembed, m.wte);
    /* Tied: the embedding is counted once. */
    assert_int_equal(m.n_params, expected_params(&g));
    model_free(&m);
}

static void test_load_prefix_and_buffers(void **state)
{
    (void)state;
    gen g = tiny();
    g.prefix = true;
    g.untied = true;
    g.mask_buffers = true;
    g.n_inner = 12;
    model m;
    assert_int_equal(model_load(&m, gen_model("prefix", &g)), PS_OK);
    assert_non_null(st_find(&m.shards[0], "transformer.h.1.attn.bias"));
    assert_non_null(st_find(&m.shards[0], "lm_head.weight"));
    check_model(&m, &g);
    model_free(&m);

    g.prefix = false;
    assert_int_equal(model_load(&m, gen_model("buffers", &g)), PS_OK);
    assert_non_null(st_find(&m.shards[0], "h.0.attn.masked_bias"));
    check_model(&m, &g);
    model_free(&m);
}

static void check_converted(st_dtype t, const char *name, const char *dtype_name)
{
    gen g = tiny();
    g.dtype = t;
    g.untied = true;
    model m;
    assert_int_equal(model_load(&m, gen_model(name, &g)), PS_OK);
    check_model(&m, &g);
    assert_string_equal(m.weights_dtype, dtype_name);
    /* Everything converted into the one arena, nothing left unused; F16
     * and BF16 matrices and embeddings stay 2 bytes, packed. */
    assert_int_equal(m.arena_floats, m.n_params - (t == ST_F64 ? 0 : matrix_params(&g) + embed_params(&g)));
    assert_true(m.blocks[0].fc_p.dtype == (t == ST_F16 ? GEMM_F16 : t == ST_BF16 ? GEMM_BF16 : GEMM_F32));
    if (t != ST_F64) {
        /* the logits from the 2-byte unembedding (model_unembed) equal
         * gemm_run on the F32 panels of the widened lm_head, bit for bit */
        const size_t d = g.d, V = g.vocab, R = 3;
        float *lm = malloc(V * d * 4), *p32 = malloc(gemm_packed_floats(d, V) * 4), *x = malloc(R * d * 4),
              *o16 = malloc(R * V * 4), *o32 = malloc(R * V * 4);
        assert_true(lm && p32 && x && o16 && o32);
        for (size_t i = 0; i < V * d; i++)
            lm[i] = weight_value("lm_head.weight", i);
        for (size_t i = 0; i < R * d; i++)
            x[i] = (float)((double)((i * 2654435761u) % 1000) / 500.0 - 1.0);
        gemm_pack_rows(p32, lm, d, NULL, d, V);
        const gemm_weight w32 = {d, V, p32, GEMM_F32, NULL};
        model_unembed(&m, o16, x, R);
        gemm_run(o32, x, R, &w32, NULL, GEMM_PLAIN);
        assert_memory_equal(o16, o32, R * V * sizeof(float));
        free(lm), free(p32), free(x), free(o16), free(o32);
    }
    for (size_t i = 0; i < N_ALL_POINTERS(&m); i++)
        if (all_pointers(&m, i))
            assert_true(in_arena(&m, all_pointers(&m, i)));
    model_free(&m);
}

static void test_load_f16(void **state)
{
    (void)state;
    check_converted(ST_F16, "f16", "F16");
}

static void test_load_bf16(void **state)
{
    (void)state;
    check_converted(ST_BF16, "bf16", "BF16");
}

static void test_load_f64(void **state)
{
    (void)state;
    check_converted(ST_F64, "f64", "F64");
}

/* Subnormal halves and bfloat16s survive loading exactly. */
static void test_load_subnormals(void **state)
{
    (void)state;
    gen g = tiny();
    g.dtype = ST_F16;
    g.poison = "wpe.weight";
    g.poison_value = ldexpf(3.0f, -24); /* f16 0x0003 */
    model m;
    assert_int_equal(model_load(&m, gen_model("sub16", &g)), PS_OK);
    assert_true(m.wpe[1] == ldexpf(3.0f, -24));
    assert_true(m.wpe[0] == weight_value("wpe.weight", 0));
    model_free(&m);

    g.dtype = ST_BF16;
    g.poison_value = ldexpf(5.0f, -133); /* bf16 0x0005 */
    assert_int_equal(model_load(&m, gen_model("sub_bf16", &g)), PS_OK);
    assert_true(m.wpe[1] == ldexpf(5.0f, -133));
    assert_true(m.wpe[2] == weight_value("wpe.weight", 2));
    model_free(&m);
}

static void test_load_misaligned_f32(void **state)
{
    (void)state;
    gen g = tiny();
    g.misalign = 2; /* data starts at 2 mod 4: no F32 tensor is aligned */
    model m;
    assert_int_equal(model_load(&m, gen_model("misaligned", &g)), PS_OK);
    assert_int_equal((8 + m.shards[0].header_bytes) % 4, 2);
    check_model(&m, &g);
    assert_int_equal(m.arena_floats, m.n_params);
    for (size_t i = 0; i < N_ALL_POINTERS(&m); i++)
        if (all_pointers(&m, i))
            assert_true(in_arena(&m, all_pointers(&m, i)));
    model_free(&m);
}

static void test_load_mixed_dtypes(void **state)
{
    (void)state;
    /* wte in F16 stays 2 bytes, packed; the F32 tensors after it stay
     * aligned (its byte size V*d*2 is a multiple of 4) and in place. */
    gen g = tiny();
    g.odd = "wte.weight";
    g.odd_dtype = ST_F16;
    model m;
    assert_int_equal(model_load(&m, gen_model("mixed", &g)), PS_OK);
    check_model(&m, &g);
    assert_string_equal(m.weights_dtype, "mixed");
    assert_int_equal(m.arena_floats, 0);
    assert_null(m.wte);
    assert_int_equal(m.wte_p.dtype, GEMM_F16);
    assert_true((const unsigned char *)m.wte_p.data16 >= (const unsigned char *)m.packed &&
                (const unsigned char *)m.wte_p.data16 < (const unsigned char *)m.packed + m.packed_bytes);
    assert_true(in_map(&m, m.wpe));
    model_free(&m);
}

static void test_load_missing_tensor(void **state)
{
    (void)state;
    gen g = tiny();
    g.skip = "h.1.mlp.c_proj.bias";
    model m;
    ASSERT_ERROR(model_load(&m, gen_model("missing", &g)), PS_ERR_INVALID,
                 "missing/model.safetensors: missing tensor 'h.1.mlp.c_proj.bias'");
    assert_null(m.blocks);
    assert_null(m.shards);
    model_free(&m);
    g.skip = "wte.weight";
    g.prefix = true;
    ASSERT_ERROR(model_load(&m, gen_model("missing2", &g)), PS_ERR_INVALID,
                 "missing2/model.safetensors: missing tensor 'wte.weight'");
}

static void test_load_wrong_shape(void **state)
{
    (void)state;
    gen g = tiny();
    g.reshape = "h.0.attn.c_attn.weight";
    model m;
    ASSERT_ERROR(model_load(&m, gen_model("shape", &g)), PS_ERR_INVALID,
                 "shape/model.safetensors: tensor 'h.0.attn.c_attn.weight' has shape [9, 24], "
                 "expected [8, 24]");
    g.reshape = "wpe.weight";
    g.prefix = true;
    ASSERT_ERROR(model_load(&m, gen_model("shape2", &g)), PS_ERR_INVALID,
                 "shape2/model.safetensors: tensor 'transformer.wpe.weight' has shape [7, 8], "
                 "expected [6, 8]");
}

static void test_load_unknown_tensor(void **state)
{
    (void)state;
    static const char *names[] = {"score.weight", "h.0.attn.rotary.weight", "transformer.lm_head.weight",
                                  "h.01.ln_1.weight", "h.x.ln_1.weight", "transformer.transformer.wte.weight"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        gen g = tiny();
        g.extra = names[i];
        char dname[32], want[160];
        snprintf(dname, sizeof dname, "unknown%zu", i);
        snprintf(want, sizeof want, "%s/model.safetensors: unknown tensor '%s'", dname, names[i]);
        model m;
        ASSERT_ERROR(model_load(&m, gen_model(dname, &g)), PS_ERR_INVALID, want);
    }
}

static void test_load_layer_out_of_range(void **state)
{
    (void)state;
    gen g = tiny();
    g.extra = "h.2.ln_1.weight";
    model m;
    ASSERT_ERROR(model_load(&m, gen_model("layer", &g)), PS_ERR_INVALID,
                 "layer/model.safetensors: tensor 'h.2.ln_1.weight' is for a layer past the last one "
                 "(config.json has n_layer 2)");
    g.extra = "h.99999999999999999999999.ln_1.weight";
    ASSERT_ERROR(model_load(&m, gen_model("layer2", &g)), PS_ERR_INVALID,
                 "layer2/model.safetensors: tensor 'h.99999999999999999999999.ln_1.weight' is for a layer "
                 "past the last one");
}

static void test_load_both_prefixes(void **state)
{
    (void)state;
    gen g = tiny();
    g.twice = "h.1.ln_2.weight";
    model m;
    ASSERT_ERROR(model_load(&m, gen_model("twice", &g)), PS_ERR_INVALID,
                 "twice/model.safetensors: tensor 'h.1.ln_2.weight' is present both as "
                 "'h.1.ln_2.weight' and as 'transformer.h.1.ln_2.weight'");
}

static void test_load_nan_weight(void **state)
{
    (void)state;
    gen g = tiny();
    g.poison = "h.1.ln_2.bias";
    g.poison_value = NAN;
    model m;
    ASSERT_ERROR(model_load(&m, gen_model("nan", &g)), PS_ERR_INVALID,
                 "nan/model.safetensors: tensor 'h.1.ln_2.bias' element 1 is NaN");
    assert_null(m.arena);
    /* Converted tensors are checked too. */
    g.dtype = ST_F16;
    g.poison = "wpe.weight";
    g.poison_value = -INFINITY;
    ASSERT_ERROR(model_load(&m, gen_model("inf16", &g)), PS_ERR_INVALID,
                 "inf16/model.safetensors: tensor 'wpe.weight' element 1 is -inf");
    g.dtype = ST_BF16;
    g.poison = "lm_head.weight";
    g.untied = true;
    g.poison_value = INFINITY;
    ASSERT_ERROR(model_load(&m, gen_model("infbf16", &g)), PS_ERR_INVALID,
                 "infbf16/model.safetensors: tensor 'lm_head.weight' element 1 is +inf");
    /* and the matrices kept in 2 bytes (checked in their 2-byte form) */
    g.poison = "h.1.mlp.c_fc.weight";
    g.poison_value = NAN;
    ASSERT_ERROR(model_load(&m, gen_model("nanbf16", &g)), PS_ERR_INVALID,
                 "nanbf16/model.safetensors: tensor 'h.1.mlp.c_fc.weight' element 1 is NaN");
    g.dtype = ST_F16;
    g.poison = "h.0.attn.c_attn.weight";
    g.poison_value = -INFINITY;
    ASSERT_ERROR(model_load(&m, gen_model("inf16m", &g)), PS_ERR_INVALID,
                 "inf16m/model.safetensors: tensor 'h.0.attn.c_attn.weight' element 1 is -inf");
    /* Ignored buffers are not checked: a NaN there is harmless. */
    g = tiny();
    g.mask_buffers = true;
    g.poison = "h.0.attn.masked_bias";
    g.poison_value = NAN;
    assert_int_equal(model_load(&m, gen_model("nanbuf", &g)), PS_OK);
    model_free(&m);
}

static void test_load_bad_dtype(void **state)
{
    (void)state;
    gen g = tiny();
    g.odd = "wpe.weight";
    g.odd_dtype = ST_I32;
    model m;
    ASSERT_ERROR(model_load(&m, gen_model("i32", &g)), PS_ERR_INVALID,
                 "i32/model.safetensors: tensor 'wpe.weight' has dtype I32");
}

static void test_load_missing_files(void **state)
{
    (void)state;
    char dir[PATH_MAX + 32], path[PATH_MAX + 64];
    snprintf(dir, sizeof dir, "%s/nofiles", tmpdir);
    assert_int_equal(mkdir(dir, 0755), 0);
    model m;
    ASSERT_ERROR(model_load(&m, dir), PS_ERR_IO, "nofiles/config.json", "cannot open");
    snprintf(path, sizeof path, "%s/config.json", dir);
    write_text(path, hf_gpt2_config);
    ASSERT_ERROR(model_load(&m, dir), PS_ERR_IO, "nofiles/model.safetensors", "cannot open");
    assert_null(m.config_json);
    assert_null(m.dir);
    write_text(path, "{\"n_layer\":1}");
    ASSERT_ERROR(model_load(&m, dir), PS_ERR_FORMAT, "nofiles/config.json: missing field 'n_head'");
    model_free(&m);
}

static void test_load_config_mismatch(void **state)
{
    (void)state;
    /* A checkpoint with 2 layers read with a config that says 3. */
    gen g = tiny();
    g.config = "{\"n_layer\":3,\"n_head\":2,\"n_embd\":8,\"n_positions\":6,\"vocab_size\":11}";
    model m;
    ASSERT_ERROR(model_load(&m, gen_model("mismatch", &g)), PS_ERR_INVALID,
                 "mismatch/model.safetensors: missing tensor 'h.2.ln_1.weight'");
}

static void test_model_hash(void **state)
{
    (void)state;
    gen g = tiny();
    const char *dir = gen_model("hash", &g);
    char path[PATH_MAX + 64], want[65];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    assert_int_equal(sha256_file_hex(path, want), PS_OK);
    model m;
    assert_int_equal(model_load(&m, dir), PS_OK);
    assert_int_equal(model_hash(&m), PS_OK);
    assert_string_equal(m.sha256, want);
    model_free(&m);
    ASSERT_ERROR(model_hash(&m), PS_ERR_INVALID, "no model loaded");
}

/* ---- model_load_shared ------------------------------------------------------- */

/* The processes of a node sharing one arena, played in one process: the
 * first load writes (is_writer), later ones read the same pages; publish
 * hands the writer's status to the readers, as comm_shared_publish does. */
typedef struct {
    void *mem;
    size_t bytes, map_bytes;
    bool next_writer;
    ps_status other_failed;   /* alloc reports another process's failure */
    ps_status writer_status;
    char writer_msg[512];
    int n_alloc, n_publish, n_release;
    ps_status alloc_saw;      /* the st that model_load_shared passed to alloc */
} fake_node;

static ps_status fake_alloc(void *user, ps_status st, size_t bytes, void **ptr, bool *is_writer)
{
    fake_node *f = user;
    f->n_alloc++;
    f->alloc_saw = st;
    if (st)
        return st;
    if (f->other_failed)
        return err_set(f->other_failed, "rank 1: another process failed");
    if (!f->mem) {
        f->bytes = bytes;
        f->map_bytes = bytes ? bytes : 1;
        f->mem = mmap(NULL, f->map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        assert_true(f->mem != MAP_FAILED);
    }
    assert_int_equal(bytes, f->bytes);
    *ptr = bytes ? f->mem : NULL;
    *is_writer = f->next_writer;
    return PS_OK;
}

static ps_status fake_publish(void *user, ps_status st)
{
    fake_node *f = user;
    f->n_publish++;
    if (f->next_writer) {
        f->writer_status = st;
        snprintf(f->writer_msg, sizeof f->writer_msg, "%s", st ? err_msg() : "");
        return st;
    }
    if (st == PS_OK && f->writer_status)
        return err_set(f->writer_status, "rank 0: %s", f->writer_msg);
    return st;
}

static void fake_release(void *user, void *ptr)
{
    fake_node *f = user;
    assert_true(ptr == (f->bytes ? f->mem : NULL));
    f->n_release++;
}

static model_alloc fake_alloc_of(fake_node *f)
{
    return (model_alloc){.alloc = fake_alloc, .publish = fake_publish, .release = fake_release, .user = f};
}

static void fake_node_free(fake_node *f)
{
    if (f->mem)
        munmap(f->mem, f->map_bytes);
}

/* A writer converts into the shared arena; a reader, with the pages made
 * read-only (it must not write them), gets the same pointers and values. */
static void test_load_shared_bf16(void **state)
{
    (void)state;
    gen g = tiny();
    g.dtype = ST_BF16;
    g.untied = true;
    const char *dir = gen_model("shared_bf16", &g);
    fake_node f = {.next_writer = true};
    model_alloc a = fake_alloc_of(&f);
    model w, r;
    assert_int_equal(model_load_shared(&w, dir, &a), PS_OK);
    assert_int_equal(f.n_alloc, 1);
    assert_int_equal(f.n_publish, 1);
    /* the converted tensors, then (64-byte aligned) the packed matrices */
    assert_int_equal(w.arena_floats, expected_params(&g) - matrix_params(&g) - embed_params(&g));
    const unsigned char *pk = w.packed, *ar = (const unsigned char *)w.arena;
    assert_true(pk >= ar + w.arena_floats * 4 && pk - ar < (ptrdiff_t)(w.arena_floats + 16) * 4);
    assert_int_equal(f.bytes, (size_t)(pk - ar) + w.packed_bytes);
    /* the 2-byte matrices: 2 bytes per packed element, each from a 64-byte boundary */
    {
        const size_t d = g.d, mm = 4 * g.d, kn[6][2] = {{d, d}, {d, d}, {d, d}, {d, d}, {d, mm}, {mm, d}};
        size_t want = 0;
        for (size_t i = 0; i < 6; i++)
            want += (gemm_packed_bytes(kn[i][0], kn[i][1], GEMM_BF16) + 63) / 64 * 64;
        /* then the embedding and the unembedding as [d, V] panels */
        const size_t emb = (gemm_packed_bytes(d, g.vocab, GEMM_BF16) + 63) / 64 * 64;
        assert_int_equal(w.packed_bytes, g.n_layer * want + 2 * emb);
        assert_int_equal(gemm_packed_bytes(d, mm, GEMM_BF16) * 2, gemm_packed_bytes(d, mm, GEMM_F32));
    }
    assert_ptr_equal(w.arena, f.mem);
    assert_true(w.arena_shared);
    check_model(&w, &g);
    for (size_t i = 0; i < N_ALL_POINTERS(&w); i++)
        if (all_pointers(&w, i))
            assert_true(in_arena(&w, all_pointers(&w, i)));

    assert_int_equal(mprotect(f.mem, f.map_bytes, PROT_READ), 0);
    f.next_writer = false;
    assert_int_equal(model_load_shared(&r, dir, &a), PS_OK);
    assert_int_equal(f.n_alloc, 2);
    assert_int_equal(f.n_publish, 2);
    check_model(&r, &g);
    for (size_t i = 0; i < N_ALL_POINTERS(&w); i++)
        if (all_pointers(&w, i))
            assert_ptr_equal(all_pointers(&r, i), all_pointers(&w, i));
    /* the reader's 2-byte embeddings point into the writer's arena */
    assert_ptr_equal(r.wte_p.data16, w.wte_p.data16);
    assert_ptr_equal(r.unembed_p.data16, w.unembed_p.data16);
    assert_string_equal(r.weights_dtype, "BF16");
    assert_int_equal(r.n_params, w.n_params);
    model_free(&r);
    assert_int_equal(f.n_release, 1);
    model_free(&w);
    assert_int_equal(f.n_release, 2);
    model_free(&w); /* twice is safe: released once */
    assert_int_equal(f.n_release, 2);
    fake_node_free(&f);
}

/* F32 in place: only the packed matrices are shared (the calls happen,
 * they may be collective), and the weights themselves stay in the mmap. */
static void test_load_shared_f32(void **state)
{
    (void)state;
    gen g = tiny();
    const char *dir = gen_model("shared_f32", &g);
    fake_node f = {.next_writer = false};
    model_alloc a = fake_alloc_of(&f);
    model m;
    assert_int_equal(model_load_shared(&m, dir, &a), PS_OK);
    assert_int_equal(f.n_alloc, 1);
    assert_int_equal(f.n_publish, 1);
    assert_int_equal(f.bytes, m.packed_bytes);
    assert_int_equal(m.arena_floats, 0);
    assert_true(m.packed == (void *)m.arena && m.packed_bytes > 0);
    check_model(&m, &g);
    for (size_t i = 0; i < N_ALL_POINTERS(&m); i++)
        if (all_pointers(&m, i))
            assert_true(in_map(&m, all_pointers(&m, i)));
    model_free(&m);
    assert_int_equal(f.n_release, 1);
    fake_node_free(&f);
}

/* The writer's NaN fails the writer and, through publish, every reader;
 * a reader makes no pass over the weights of its own. */
static void test_load_shared_nan(void **state)
{
    (void)state;
    gen g = tiny();
    g.dtype = ST_F16;
    g.poison = "h.1.mlp.c_fc.bias";
    g.poison_value = NAN;
    const char *dir = gen_model("shared_nan", &g);
    fake_node f = {.next_writer = true};
    model_alloc a = fake_alloc_of(&f);
    model m;
    ASSERT_ERROR(model_load_shared(&m, dir, &a), PS_ERR_INVALID,
                 "shared_nan/model.safetensors: tensor 'h.1.mlp.c_fc.bias' element 1 is NaN");
    assert_int_equal(f.n_publish, 1);
    assert_int_equal(f.n_release, 1); /* freed on the way out */
    assert_null(m.arena);
    f.next_writer = false;
    ASSERT_ERROR(model_load_shared(&m, dir, &a), PS_ERR_INVALID, "rank 0: /", "shared_nan/model.safetensors",
                 "element 1 is NaN");
    assert_int_equal(f.n_publish, 2);
    assert_int_equal(f.n_release, 2);
    /* A reader trusts the writer's check: told that the writer passed, it
     * takes the arena as it is (here with the writer's converted NaN). */
    f.writer_status = PS_OK;
    assert_int_equal(model_load_shared(&m, dir, &a), PS_OK);
    assert_true(isnan(m.blocks[1].fc_b[1]));
    model_free(&m);
    fake_node_free(&f);
}

/* A failure before the allocation still makes both calls, with the status,
 * so that the other processes are not left waiting; nothing to release. */
static void test_load_shared_early_failure(void **state)
{
    (void)state;
    gen g = tiny();
    g.reshape = "wpe.weight";
    const char *dir = gen_model("shared_shape", &g);
    fake_node f = {.next_writer = true};
    model_alloc a = fake_alloc_of(&f);
    model m;
    ASSERT_ERROR(model_load_shared(&m, dir, &a), PS_ERR_INVALID, "shared_shape/model.safetensors: tensor 'wpe.weight'");
    assert_int_equal(f.alloc_saw, PS_ERR_INVALID);
    assert_int_equal(f.n_alloc, 1);
    assert_int_equal(f.n_publish, 1);
    assert_int_equal(f.n_release, 0);

    char missing[PATH_MAX + 32];
    snprintf(missing, sizeof missing, "%s/no_such_model", tmpdir);
    ASSERT_ERROR(model_load_shared(&m, missing, &a), PS_ERR_IO, "no_such_model/config.json");
    assert_int_equal(f.n_alloc, 2);
    assert_int_equal(f.n_publish, 2);
    assert_int_equal(f.n_release, 0);

    /* Another process failed: its error, on a good checkpoint. */
    g = tiny();
    g.dtype = ST_BF16;
    f.other_failed = PS_ERR_NOMEM;
    ASSERT_ERROR(model_load_shared(&m, gen_model("shared_other", &g), &a), PS_ERR_NOMEM,
                 "rank 1: another process failed");
    assert_int_equal(f.alloc_saw, PS_OK);
    assert_int_equal(f.n_alloc, 3);
    assert_int_equal(f.n_publish, 3);
    assert_int_equal(f.n_release, 0);
    assert_null(m.arena);
    fake_node_free(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_hf_gpt2),
        cmocka_unit_test(test_config_optional_fields),
        cmocka_unit_test(test_config_missing_field),
        cmocka_unit_test(test_config_bad_activation),
        cmocka_unit_test(test_config_not_divisible),
        cmocka_unit_test(test_config_zero_and_negative),
        cmocka_unit_test(test_config_over_caps),
        cmocka_unit_test(test_config_wrong_types),
        cmocka_unit_test(test_config_not_json),
        cmocka_unit_test(test_load_f32_in_place),
        cmocka_unit_test(test_load_untied),
        cmocka_unit_test(test_load_prefix_and_buffers),
        cmocka_unit_test(test_load_f16),
        cmocka_unit_test(test_load_bf16),
        cmocka_unit_test(test_load_f64),
        cmocka_unit_test(test_load_subnormals),
        cmocka_unit_test(test_load_misaligned_f32),
        cmocka_unit_test(test_load_mixed_dtypes),
        cmocka_unit_test(test_load_missing_tensor),
        cmocka_unit_test(test_load_wrong_shape),
        cmocka_unit_test(test_load_unknown_tensor),
        cmocka_unit_test(test_load_layer_out_of_range),
        cmocka_unit_test(test_load_both_prefixes),
        cmocka_unit_test(test_load_nan_weight),
        cmocka_unit_test(test_load_bad_dtype),
        cmocka_unit_test(test_load_missing_files),
        cmocka_unit_test(test_load_config_mismatch),
        cmocka_unit_test(test_model_hash),
        cmocka_unit_test(test_load_shared_bf16),
        cmocka_unit_test(test_load_shared_f32),
        cmocka_unit_test(test_load_shared_nan),
        cmocka_unit_test(test_load_shared_early_failure),
    };
    return cmocka_run_group_tests_name("model", tests, setup_dir, teardown_dir);
}
