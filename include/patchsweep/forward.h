/*
 * forward: the GPT-2 forward pass over one token sequence, with
 * TransformerLens hook points that can observe (cache) or overwrite (patch)
 * every activation (the eval-callback pattern of ggml / llama.cpp).
 *
 * All activations of a run live in one forward_cache (one arena), laid out as
 * the hook shapes of hooks.h, so a finished cache *is* TransformerLens'
 * run_with_cache result and a hook sees exactly the array the rest of the
 * pass will read.
 *
 * Suffix runs (what the patching engine needs): forward_run_from(..., layer0,
 * row0) recomputes only blocks >= layer0 and rows >= row0 of an existing
 * cache.  Causal attention means rows < row0 are unchanged by anything done
 * at rows >= row0, so their keys and values are read from the cache as the
 * prefix (a KV cache).  forward_run() is forward_run_from(.., 0, 0) after the
 * embedding.
 *
 * Families (model.h): each is a sequence of ops.h's kernels, walked from the
 * model's descriptor: LayerNorm or RMSNorm, learned or rotary positions,
 * grouped-query attention, gelu_new / exact GELU / SiLU-gated MLP,
 * sequential or parallel residual (x + attn(ln1(x)) + mlp(ln2(x))).
 *
 * Numerics: float32 storage; norm statistics in double; biased variance
 * with eps from config; attention scale model_attn_scale (1/sqrt(dh)).
 */
#ifndef PS_FORWARD_H
#define PS_FORWARD_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "hooks.h"
#include "model.h"

/* Activations of one block for T tokens (pointers into the cache arena). */
typedef struct {
    float *resid_pre;   /* [T, d] */
    float *ln1;         /* [T, d] ln_1(resid_pre) after its weight and bias (not a hook point) */
    float *q;           /* [T, H, dh] (before the rotary embedding) */
    float *k, *v;       /* [T, H_kv, dh] each (k before the rotary embedding) */
    float *pattern;     /* [H, T, T], zero above the diagonal */
    float *z;           /* [T, H, dh] */
    /* Families other than GPT-2 only (NULL for GPT-2): */
    float *ln1_scale, *ln2_scale;   /* [T] */
    float *ln1_norm, *ln2_norm;     /* [T, d] x / scale, before weight and bias (hook_normalized) */
    float *rot_q;                   /* [T, H, dh] q after the rotary embedding (rotary only) */
    float *rot_k;                   /* [T, H_kv, dh] (rotary only; in the core: the fast
                                     * engine's key prefix) */
    float *mlp_pre_linear;          /* [T, m] up(x) (gated MLPs only) */
    float *attn_out;    /* [T, d] */
    float *resid_mid;   /* [T, d] */
    float *ln2;         /* [T, d] */
    float *mlp_pre;     /* [T, m] */
    float *mlp_post;    /* [T, m] */
    float *mlp_out;     /* [T, d] */
    float *resid_post;  /* [T, d] */
} forward_layer;

typedef enum {
    FORWARD_LOGITS_NONE,  /* stop after ln_final */
    FORWARD_LOGITS_LAST,  /* logits of the last row only (next-token prediction) */
    FORWARD_LOGITS_ALL    /* logits of every row, as TransformerLens returns */
} forward_logits;

typedef struct {
    model_config cfg;
    size_t T;               /* tokens in this run */
    size_t capacity;        /* tokens the arena was sized for */
    forward_logits logits_mode;
    int32_t *tokens;        /* [capacity] */
    float *embed;           /* [T, d] wte[tokens] */
    float *pos_embed;       /* [T, d] wpe[0..T) */
    forward_layer *layers;  /* [n_layer], owned */
    float *ln_final;        /* [T, d] after ln_f's weight and bias (what the unembedding reads) */
    float *ln_final_norm;   /* [T, d] x / scale before them: ln_final.hook_normalized */
    float *logits;          /* [T, V] for ALL, [1, V] (last row) for LAST, NULL for NONE */
    float *arena;           /* owned: every array above */
    size_t arena_floats;
    bool trimmed;           /* forward_cache_trim: the core alone */
    size_t core_floats;     /* arena prefix the patching engines read: embeddings,
                               per block resid_pre, q, k, v, rot_k (rotary only),
                               pattern, z, attn_out, resid_mid, mlp_out, resid_post;
                               ln_final.  Sized for `capacity` tokens. */
} forward_cache;

/* Hook callback: called after each selected activation is computed and before
 * anything reads it.  `act` has the hook's shape (hooks.h) for the cache's T;
 * the callback may read it or overwrite it in place.  Return PS_OK to go on;
 * any other status aborts the pass with that status. */
typedef ps_status (*forward_hook_fn)(void *user, hook_point hp, float *act,
                                     const size_t *shape, size_t ndim);

typedef struct {
    forward_hook_fn fn;
    void *user;
    const hook_set *only;   /* NULL: call fn at every hook point */
} forward_hooks;

/* Allocate a cache for up to `capacity` tokens (<= n_positions). */
ps_status forward_cache_init(forward_cache *c, const model_config *cfg, size_t capacity,
                             forward_logits logits_mode);
void forward_cache_free(forward_cache *c);

/* Floats of the core of a T-token cache (forward_cache.core_floats). */
size_t forward_core_floats(const model_config *cfg, size_t T);

/* Keep only the core (core_floats): ln1, ln2, mlp_pre, mlp_post and the
 * logits become NULL and their memory is returned.  What a patch_pair keeps
 * once its metrics are known (the engines read the core alone); a trimmed
 * cache can be read and freed, not run again (forward_run refuses it). */
void forward_cache_trim(forward_cache *c);

/* Copy every activation of src's T rows into dst (same config/capacity). */
void forward_cache_copy(forward_cache *dst, const forward_cache *src);

/* The array of one hook point inside the cache. */
float *forward_cache_hook(const forward_cache *c, hook_point hp);

/* Full forward of tokens[0..T). Token ids >= vocab_size are an error. */
ps_status forward_run(const model *m, forward_cache *c, const int32_t *tokens, size_t T,
                      const forward_hooks *hooks);

/* Recompute blocks >= layer0 and rows >= row0 of a cache that holds a
 * complete run, starting from the cache's blocks[layer0].resid_pre (which the
 * caller may have modified at rows >= row0), then ln_final and logits.
 * Hooks fire for the recomputed blocks only. */
ps_status forward_run_from(const model *m, forward_cache *c, size_t layer0, size_t row0,
                           const forward_hooks *hooks);

/* The block's kernels are ops.h's (shared with the patching engines). */

/* log(sum_i exp(x_i)) over n values, in double after subtracting the max
 * (the normalizer of a logits row: log p_i = x_i - logsumexp). */
double forward_logsumexp(const float *x, size_t n);

#endif
