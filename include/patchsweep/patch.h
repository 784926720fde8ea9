/*
 * patch: activation patching with two engines that must agree; the terms
 * (base, source, cell, components, metrics) are patchspec.h's.
 *
 * Engines:
 *   naive  one full forward of the base prompt per cell with a hook that
 *          overwrites the activation: exactly the worksheet's loop; the reference.
 *   fast   computes only what a patch can change.  A patch at block L and
 *          first changed row p leaves blocks < L and rows < p untouched
 *          (causal attention), so the cell is a *suffix job*: rows [p, T) of
 *          the residual stream from block L (or L+1 after a partial block L),
 *          reading the base run's cached keys/values for rows < p.  Jobs of
 *          many cells and prompts are stacked so every linear layer is one
 *          large sgemm; at the last block only each job's last row gets a
 *          query, attention and MLP; logit_diff needs only
 *          ln_f(x_last) . (W_U[answer] - W_U[wrong]), no vocabulary matmul.
 *          A cell whose patched value equals the base value bit for bit costs
 *          nothing: its value is the base metric.
 */
#ifndef PS_PATCH_H
#define PS_PATCH_H

#include <stdbool.h>
#include <stddef.h>

#include "err.h"
#include "model.h"
#include "patchspec.h"

typedef struct {
    patch_metric metric;
    patch_direction direction;
    patch_engine engine;
    size_t max_rows;    /* fast engine: rows stacked per sgemm group (0: default) */
    /* Several metrics of the same patched forward (metrics.n > 0; `metric`
     * is then ignored): every requested metric from each cell's one set of
     * final logits, no extra forward.  metrics.n == 0: the one `metric`. */
    patch_metric_list metrics;
} patch_opts;

/* The metrics opts asks for: 1 (`metric`) or opts->metrics.n, into ms. */
size_t patch_opts_metrics(const patch_opts *opts, patch_metric ms[PATCH_METRIC_COUNT]);

/* values[i * M + k] = the patched metric k of cells[i] (raw, not
 * normalized), M = patch_opts_metrics (M = 1: values[i]). */
ps_status patch_eval(const model *m, const patch_pair *pairs, size_t n_pairs, const patch_cell *cells,
                     size_t n_cells, const patch_opts *opts, double *values);

/* What the fast engine recomputes for a cell: nothing (skipped: its patch
 * changes nothing the metric sees), or rows [row0, T) of blocks >= block0
 * after rebuilding the changed rows [row0, row_end) of the patched block. */
typedef struct {
    bool skipped;
    size_t block0, row0, row_end;
} patch_plan;

patch_plan patch_cell_plan(const model *m, const patch_pair *pairs, const patch_cell *cell, patch_direction dir);

/* Cost model of a fast cell in row-blocks: (n_layer - L) * (T - p), 0 for a
 * skipped cell; used to balance shards and to count useful FLOPs. */
size_t patch_cell_cost(const model *m, const patch_pair *pairs, const patch_cell *cell, patch_direction dir);

#endif
