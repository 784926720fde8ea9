/*
 * backward: the gradient of a patching metric (patchspec.h: logit_diff,
 * prob, logprob, kl) of the next-token prediction at the last position with
 * respect to every hook activation of one run (hooks.h), for every family.
 *
 * The gradients live in a second forward_cache of the run's config and
 * capacity, laid out exactly as the activations: the gradient of hook hp is
 * forward_cache_hook(grads, hp), of the hook's shape.  Each is the total
 * derivative through everything the rest of the pass computes from that
 * hook (TransformerLens' hooks are identities, so e.g. resid_post of block l
 * and resid_pre of block l+1 have the same gradient; the pattern's gradient
 * is given above the diagonal too, dz . v, where a hook could write).  The
 * norms' hook_scale activations are not read by the rest of the pass (it
 * reads hook_normalized): their gradient is 0.  Metric derivatives at the
 * last row's logits (p = softmax, c = the clean run's probabilities):
 *   logit_diff  e_answer - e_wrong (no vocabulary work: W_U[answer] - W_U[wrong])
 *   prob        p_a (e_a - p)        logprob  e_a - p        kl  p - c
 *
 * The pass (backward.c) is the forward pass's list of ops calls in reverse,
 * each replaced by its ops_backward.h kernel; matrix products and attention
 * run on the pool's threads.
 */
#ifndef PS_BACKWARD_H
#define PS_BACKWARD_H

#include <stdint.h>

#include "err.h"
#include "forward.h"
#include "model.h"
#include "patchspec.h"

/* Gradients of `metric` for the run in c: a complete cache, or one trimmed
 * to its core (see backward_run_opts) (forward_run; logits LAST or ALL, or NONE, then the last row's logits are
 * recomputed when the metric needs them).  grads: forward_cache_init'd with
 * c's config and a capacity >= c->T (its logits mode decides whether the
 * logits' gradient is stored); every array of it is overwritten, its T and
 * tokens set to c's.  clean_logprobs [V]: the clean run's log-softmax (kl
 * only; NULL otherwise). */
ps_status backward_run(const model *m, const forward_cache *c, forward_cache *grads, patch_metric metric,
                       int32_t answer, int32_t wrong, const float *clean_logprobs);

/* What attribution patching needs of a backward pass (atp.h):
 *   row0        the gradients of rows [row0, T) alone; every other row's is
 *               0.  Exact on those rows (a row's gradient gathers from the
 *               same and later rows only: causal attention), and all that
 *               AtP reads when the two prompts agree before row0.  Costs
 *               (T - row0) / T of the products.
 *   drop_layer  GradDrop (Kramar et al. 2024): block drop_layer passes no
 *               gradient (its activations' gradients are 0, and
 *               d resid_pre = d resid_post, the skip connection alone);
 *               BACKWARD_NO_DROP: none.
 * The run c may be trimmed to its core (forward_cache_trim, as a patch_pair
 * holds it): the activations read outside the core (the MLP's
 * pre-activations, rotary queries) are then rebuilt block by block from the
 * core by the forward's kernels, with the forward's bits, for rows >= row0
 * (about a third of a forward pass for GPT-2's MLP). */
#define BACKWARD_NO_DROP ((size_t)-1)
typedef struct {
    size_t row0;
    size_t drop_layer;
} backward_opts;

ps_status backward_run_opts(const model *m, const forward_cache *c, forward_cache *grads, const backward_opts *opts,
                            patch_metric metric, int32_t answer, int32_t wrong, const float *clean_logprobs);

/* Per-node input gradients, for edge attribution patching (atp_edges.h).
 * A node v that reads the residual stream gets its own copy x_v [T, d] of
 * what it reads; g_v = dM/dx_v is the gradient through v's norm and v's
 * weights alone (not the other heads', not the skip connection), on the
 * base run c with its gradients `grads` (backward_run_opts, same row0):
 * rows [row0, T) of each node (earlier rows are 0 there anyway).
 * The nodes of block l < n_layer (backward_node_count: H + 2 H_kv + 1),
 * in this order (TransformerLens' use_split_qkv_input hooks):
 *   hook_q_input, head h < H:       g = N1(resid_pre, w1 * (dq[:, h] W_Q[h]^T))
 *   hook_k_input, kv head g < H_kv: g = N1(resid_pre, w1 * (dk[:, g] W_K[g]^T))
 *   hook_v_input, kv head g < H_kv: g = N1(resid_pre, w1 * (dv[:, g] W_V[g]^T))
 *   hook_mlp_in:                    g = N2(mlp_in, w2 * dln2)
 * with dq, dk, dv = dM/d hook_q, hook_k, hook_v (before the rotary
 * embedding; W_Q[h] [d, dh] head h's columns), dln2 = dM/d(ln2 output),
 * w1, w2 the norms' weights, N(x, dn) the normalizing step's backward at x
 * (ops_layernorm_backward / ops_rmsnorm_backward), mlp_in = resid_mid, or
 * resid_pre with a parallel residual.  Block l = n_layer is the logits:
 * one node, g = dM/d(blocks.L-1.hook_resid_post) (ln_final and the
 * unembedding: the only reader).  Since the residual stream is a sum, the
 * gradient of any resid hook is the sum of the g_v of the nodes that read
 * it later.  out [backward_node_count(l), T - row0, d].  Threaded over
 * heads and nodes. */
size_t backward_node_count(const model_config *cfg, size_t l);
ps_status backward_node_input_grads(const model *m, const forward_cache *c, const forward_cache *grads, size_t l,
                                    size_t row0, float *out);

#endif
