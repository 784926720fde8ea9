/*
 * atp_edges: edge attribution patching (EAP, Syed et al. 2023): the AtP
 * estimate of every edge of the node graph of one prompt pair, from one
 * forward and one backward pass of the base run.
 *
 * Nodes (TransformerLens names; L blocks, H heads, H_kv key/value heads):
 *   upstream u, what writes into the residual stream, a_u [T, d]:
 *     hook_embed                       the token embedding (with GPT-2's
 *                                      positional embedding, equal in both
 *                                      runs of a pair: no effect)
 *     blocks.l.attn.hook_result[h=i]   head i's output z_i @ W_O[i] (no bias)
 *     blocks.l.hook_mlp_out            the MLP's output
 *   downstream v, what reads it, through its own copy x_v [T, d]:
 *     blocks.l.hook_q_input[h=i]       head i's query input (i < H)
 *     blocks.l.hook_k_input[h=g]       key/value head g's key input (g < H_kv)
 *     blocks.l.hook_v_input[h=g]       its value input
 *     blocks.l.hook_mlp_in             the MLP's input
 *     logits                           ln_final's input (the last block's
 *                                      hook_resid_post)
 * An edge u -> v exists when u is written before v reads: u's block < v's
 * block (hook_embed: before every block; logits: after every block), and
 * within one block each head -> the MLP's input with a sequential residual
 * (a parallel residual's MLP reads resid_pre: no such edge).
 *
 * Score (raw: an estimated change of the metric, in its units):
 *     score(u -> v) = sum_t (a_u^src[t] - a_u^base[t]) . g_v[t]
 * with g_v = dM/dx_v the per-node input gradient on the base run
 * (backward.h: backward_node_input_grads).  Denoising: base = corrupted,
 * source = clean; noising the mirror image (patchspec.h).  Normalized:
 * score / (clean - corrupted metric), in both directions.
 *
 * Node attributions kept beside the edges, each computed on its own:
 *   down_atp[v] = sum_t (x_v^src - x_v^base) . g_v   (v's input-node AtP)
 *   up_atp[u]   = sum_t (a_u^src - a_u^base) . dM/da_u   (u's node AtP, with
 *                 the full gradient of backward_run)
 * The residual stream is a sum, so sum_u score(u -> v) = down_atp[v]
 * (biases are equal in both runs) and sum_v score(u -> v) = up_atp[u]
 * (dM/da_u is the sum of the g_v of its readers): the tests check both.
 *
 * Cost: one backward pass, then per block the node gradients (H + 2 H_kv
 * per-head products of [T, dh] x [dh, d] and the norms) and n_up x n_down
 * / 2 dot products of (T - row0) * d, row0 the first position where the
 * prompts differ; memory (n_up + H + 2 H_kv + 1) * (T - row0) * d floats.
 */
#ifndef PS_ATP_EDGES_H
#define PS_ATP_EDGES_H

#include <stdbool.h>
#include <stddef.h>

#include "err.h"
#include "model.h"
#include "patchspec.h"

typedef struct {
    size_t n_up, n_down;
    char **up_labels, **down_labels; /* [n_up], [n_down]: owned strings */
    double *score;                   /* [n_up, n_down] row-major; NaN where no edge */
    double *up_atp, *down_atp;       /* [n_up], [n_down] */
} atp_edges;

/* Nodes of a model: upstream 1 + L (H + 1) in the order hook_embed, then
 * per block its heads and its MLP; downstream L (H + 2 H_kv + 1) + 1, per
 * block its q inputs, k inputs, v inputs and MLP input, then logits. */
size_t atp_edges_upstream_count(const model_config *cfg);
size_t atp_edges_downstream_count(const model_config *cfg);
/* Whether the edge u -> v exists (indices as above). */
bool atp_edges_valid(const model_config *cfg, size_t u, size_t v);

/* The edge scores of one pair (its caches may be trimmed; an ablation
 * source is refused: the graph's deltas are the two runs').  *out is
 * filled (atp_edges_free it, also after an error). */
ps_status atp_edges_eval(const model *m, const patch_pair *pair, patch_metric metric, patch_direction direction,
                         atp_edges *out);
void atp_edges_free(atp_edges *e);

#endif
