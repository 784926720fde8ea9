/*
 * atp: attribution patching (Nanda 2023; Syed et al. 2023): every cell of
 * every grid of patchspec.h estimated from one forward and one backward pass
 * of the base run.  The effect of writing the source's activation a_src over
 * the base's a_base at a cell is linearized:
 *     metric(patched) ~ metric(base) + sum_cell (a_src - a_base) . dM/da
 * with dM/da the gradient of the metric on the base run (backward.h):
 * denoising runs the corrupted prompt with the clean activation (gradient on
 * the corrupted run), noising the mirror image.  Values are in the exact
 * engines' units (the estimated patched metric, raw; patch_normalize gives
 * the normalized grid) and shapes (patch_grid_shape order).
 *
 * Known failure modes (Kramar et al. 2024): saturated attention (a query or
 * key change moves a softmax far from where its gradient is taken: the QK
 * fix of AtP*), cancelling paths, and kl with noising, whose gradient at the
 * clean run is 0 (KL's minimum): every estimate is then the base metric.
 */
#ifndef PS_ATP_H
#define PS_ATP_H

#include <stdbool.h>
#include <stddef.h>

#include "err.h"
#include "model.h"
#include "patchspec.h"

/* values[c] (patch_grid_shape's number of cells) for every c with on[c]:
 * the AtP estimate of the patched metric.  Costs one forward of the base
 * prompt (the pair's caches are trimmed) and one backward pass. */
ps_status atp_eval(const model *m, const patch_pair *pair, const bool on[PATCH_COMPONENT_COUNT], patch_metric metric,
                   patch_direction direction, double *const values[PATCH_COMPONENT_COUNT]);

/* AtP* (Kramar et al. 2024), each part on request:
 *   qk_fix    q_all_pos, k_all_pos, q and k cells: the attention pattern
 *             of the heads the cell feeds recomputed exactly with the
 *             source's queries (keys) at the cell's positions (q at
 *             position t: row t; k at position t: the rows >= t), the
 *             linearization taken after the softmax,
 *             sum (pattern' - pattern) . dM/dpattern; every other cell as AtP.
 *             Costs up to T^2 dh per head and cell, no extra pass.  Method atp*.
 *   graddrop  GradDrop: L more backward passes, pass l with no gradient
 *             through block l; a cell's effect is then
 *             sign(effect) * 1/(L-1) sum_l |effect_l| (the paper's
 *             magnitude, which it ranks by; the sign of the estimate without
 *             GradDrop keeps the grid's orientation).  Every grid changes;
 *             needs L >= 2.
 * atp_eval is atp_eval_opts with neither. */
typedef struct {
    bool qk_fix;
    bool graddrop;
} atp_opts;

ps_status atp_eval_opts(const model *m, const patch_pair *pair, const bool on[PATCH_COMPONENT_COUNT],
                        patch_metric metric, patch_direction direction, const atp_opts *opts,
                        double *const values[PATCH_COMPONENT_COUNT]);

/* Estimate against exact values of one grid of n cells (base: the base
 * run's metric; effects are value - base): Spearman's rank correlation of
 * the two (average ranks for ties; NaN when either is constant), and the
 * cells among the exact top k by |effect| that are not in the estimate's top
 * k (false negatives): missed[0 .. *n_missed) (flat cell indices, by
 * decreasing exact |effect|), k clamped to n. */
typedef struct {
    double rank_correlation;
    double max_abs_error;
    size_t k, n_missed;
    size_t missed[16];
} atp_stats;

#define ATP_TOP_K 10

ps_status atp_compare(const double *exact, const double *estimate, size_t n, double base, size_t k, atp_stats *out);

#endif
