/*
 * hooks: TransformerLens hook-point names <-> (kind, layer), their shapes, and
 * selections of hook points by glob.
 *
 * Names (contract, TransformerLens' own so results and habits carry over):
 *   hook_embed, hook_pos_embed,
 *   blocks.{L}.hook_resid_pre, blocks.{L}.attn.hook_q|hook_k|hook_v|hook_z
 *   blocks.{L}.attn.hook_pattern, blocks.{L}.hook_attn_out,
 *   blocks.{L}.hook_resid_mid, blocks.{L}.mlp.hook_pre|hook_post,
 *   blocks.{L}.hook_mlp_out, blocks.{L}.hook_resid_post,
 *   ln_final.hook_normalized, logits
 * Shapes are TransformerLens' with the batch axis dropped (T tokens):
 *   [T, d] residual-sized, [T, H, dh] for q/k/v/z, [H, T, T] for the pattern
 *   (query, key), [T, m] for the MLP hidden layer, [T, V] for logits.
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
    HOOK_Q,
    HOOK_K,
    HOOK_V,
    HOOK_PATTERN,
    HOOK_Z,
    HOOK_ATTN_OUT,
    HOOK_RESID_MID,
    HOOK_MLP_PRE,
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

/* Select every hook whose name matches one of the comma-separated shell
 * globs in `patterns` (fnmatch; "*" selects all).  A pattern that matches no
 * hook is an error (a typo must not silently select nothing). */
ps_status hook_set_parse(hook_set *s, const char *patterns, size_t n_layer);
ps_status hook_set_all(hook_set *s, size_t n_layer);
bool hook_set_has(const hook_set *s, hook_point hp);
void hook_set_free(hook_set *s);

#endif
