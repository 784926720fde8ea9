/*
 * patch_internal: what the files of the patching engines share (patch.c:
 * dispatch and these helpers; patch_naive.c; patch_fast.c: the fast engine,
 * its plans and costs).  Private to src/engine.
 */
#ifndef PS_PATCH_INTERNAL_H
#define PS_PATCH_INTERNAL_H

#include "patch.h"

/* The run a cell patches (base) and the run its value comes from (source). */
const forward_cache *patch_base_of(const patch_pair *p, patch_direction dir);
const forward_cache *patch_source_of(const patch_pair *p, patch_direction dir);

/* The cached array a component patches, at block `layer`. */
const float *patch_component_array(const forward_cache *c, patch_component comp, size_t layer);

/* The slice a cell overwrites, as (offset, length) runs over the component's
 * array: one run for position components, one per row for per-head ones. */
typedef struct {
    size_t first, count, stride, len; /* runs at first + i*stride, i < count, each len floats */
} patch_slice;

patch_slice patch_cell_slice(const patch_cell *cell, const model_config *cfg, size_t T);

/* The engines behind patch_eval (cells already checked against their grids). */
ps_status patch_eval_naive(const model *m, const patch_pair *pairs, const patch_cell *cells, size_t n_cells,
                           const patch_opts *opts, double *values);
ps_status patch_eval_fast(const model *m, const patch_pair *pairs, const patch_cell *cells, size_t n_cells,
                          const patch_opts *opts, double *values);

#endif
