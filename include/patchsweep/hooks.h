/*
 * hooks: TransformerLens hook-point names <-> (kind, layer), their shapes, and
 * selections of hook points by glob.
 *
 * Names (contract, TransformerLens' own so results and habits carry over):
 *   hook_embed, hook_pos_embed (learned positions),
 *   blocks.{L}.hook_resid_pre, blocks.{L}.ln1.hook_scale|hook_normalized,
 *   blocks.{L}.attn.hook_q|hook_k|hook_v, attn.hook_rot_q|hook_rot_k (rotary),
 *   blocks.{L}.attn.hook_pattern|hook_z, blocks.{L}.hook_attn_out,
 *   blocks.{L}.hook_resid_mid (sequential residual),
 *   blocks.{L}.ln2.hook_scale|hook_normalized,
 *   blocks.{L}.mlp.hook_pre|hook_pre_linear (gated)|hook_post,
 *   blocks.{L}.hook_mlp_out, blocks.{L}.hook_resid_post,
 *   ln_final.hook_normalized, logits
 * A model has the hooks of its family (hook_present): GPT-2 has no ln1/ln2
 * hooks, rotary models no hook_pos_embed, parallel-residual models no
 * hook_resid_mid.  hook_normalized is x / scale, before the norm's weight
 * and bias (TransformerLens' LayerNormPre / RMSNormPre).
 * Shapes are TransformerLens' with the batch axis dropped (T tokens):
 *   [T, d] residual-sized, [T, H, dh] for q/z/rot_q, [T, H_kv, dh] for
 *   k/v/rot_k, [H, T, T] for the pattern (query, key), [T] for a norm's
 *   scale, [T, m] for the MLP hidden layer, [T, V] for logits.
 */
#ifndef PS_HOOKS_H
#define PS_HOOKS_H

#include <stdbool.h>
#include <stddef.h>

#include "err.h"
#include "model.h"

typedef enum {
    HOOK_EMBED,
    HOOK_POS_EMBED,
    /* per block, in the order the forward pass reaches them */
    HOOK_RESID_PRE,
    HOOK_LN1_SCALE,       /* not GPT-2 (see hook_present) */
    HOOK_LN1_NORMALIZED,  /* not GPT-2 */
    HOOK_Q,
    HOOK_K,
    HOOK_V,
    HOOK_ROT_Q,           /* rotary families */
    HOOK_ROT_K,           /* rotary families */
    HOOK_PATTERN,
    HOOK_Z,
    HOOK_ATTN_OUT,
    HOOK_RESID_MID,       /* sequential residual only */
    HOOK_LN2_SCALE,       /* not GPT-2 */
    HOOK_LN2_NORMALIZED,  /* not GPT-2 */
    HOOK_MLP_PRE,
    HOOK_MLP_PRE_LINEAR,  /* gated MLPs */
    HOOK_MLP_POST,
    HOOK_MLP_OUT,
    HOOK_RESID_POST,
    /* after the blocks */
    HOOK_LN_FINAL,
    HOOK_LOGITS,
    HOOK_KIND_COUNT
} hook_kind;

#define HOOK_MAX_NAME 64
#define HOOK_MAX_DIMS 3

typedef struct {
    hook_kind kind;
    size_t layer;   /* block index; 0 for the non-block hooks */
} hook_point;

bool hook_kind_in_block(hook_kind k);

/* Whether a model of config c has hook points of kind k. */
bool hook_present(hook_kind k, const model_config *c);

/* Writes the TransformerLens name ("blocks.3.attn.hook_z") into buf. */
void hook_name(hook_point hp, char buf[HOOK_MAX_NAME]);

/* Parses a full name; unknown names and layers >= n_layer are errors. */
ps_status hook_parse(const char *name, size_t n_layer, hook_point *hp);

/* Shape of the activation for T tokens; returns ndim.  dim_names gets the
 * NetCDF dimension names (position, head, d_head, d_model, d_mlp, vocab,
 * query_position, key_position). */
size_t hook_shape(hook_kind k, const model_config *c, size_t T,
                  size_t shape[HOOK_MAX_DIMS], const char *dim_names[HOOK_MAX_DIMS]);

/* Number of hook points of a model and a dense index for each:
 * the non-block hooks plus n_layer x the block hooks. */
size_t hook_count(size_t n_layer);
size_t hook_index(hook_point hp, size_t n_layer);
hook_point hook_at(size_t index, size_t n_layer);

/* A selection of hook points (dense bitmap over hook_index). */
typedef struct {
    bool *on;       /* owned, [hook_count(n_layer)] */
    size_t n_layer;
    size_t n_on;
} hook_set;

/* Select every hook of the model (hook_present) whose name matches one of
 * the comma-separated shell globs in `patterns` (fnmatch; "*" selects all).
 * A pattern that matches no hook is an error (a typo must not silently
 * select nothing). */
ps_status hook_set_parse(hook_set *s, const char *patterns, const model_config *c);
ps_status hook_set_all(hook_set *s, const model_config *c);
bool hook_set_has(const hook_set *s, hook_point hp);
void hook_set_free(hook_set *s);

#endif
