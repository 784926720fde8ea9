/*
 * atp_verify: attribution patching checked where it matters (method
 * atp+verify, atp*+verify; issue 20): the estimate of every cell (atp.h),
 * then the exact patched metric (patch.h's engine, a cell list) of only the
 * top k cells of each grid by |estimate - base metric|.  A dataset-scale run
 * then costs one forward and backward per prompt plus k exact cells per
 * grid, instead of every cell, and the cells a reader looks at (the
 * strongest) carry their true values.
 *
 * Selection is per grid (per component), not over all grids: grids differ in
 * size and scale (resid_pre's positions against z_all_pos's heads), and a
 * top k over all of them would verify only the largest-effect kind.
 */
#ifndef PS_ATP_VERIFY_H
#define PS_ATP_VERIFY_H

#include <stdbool.h>
#include <stddef.h>

#include "err.h"
#include "model.h"
#include "patch.h"
#include "patchspec.h"

/* The *n_out = min(k, n) cells of est[0..n) with the largest
 * |est[i] - base| (ties: the lower index; NaN estimates last), into idx
 * (room for min(k, n)) in increasing index order. */
ps_status atp_verify_select(const double *est, size_t n, double base, size_t k, size_t *idx, size_t *n_out);

/* For pair p (patch_pair_init'ed; p->T tokens) and every c with on[c]:
 * est[c] is its estimate grid (patch_grid_shape order, as atp_eval fills
 * it); out[c] gets the exact patched metric (opts->metric, one metric) at
 * the top k cells of est[c] (atp_verify_select with the direction's base
 * metric) and NaN at every other cell.  One patch_eval over the selected
 * cells of all grids. */
ps_status atp_verify_pair(const model *m, const patch_pair *p, const bool on[PATCH_COMPONENT_COUNT],
                          const patch_opts *opts, size_t k, double *const est[PATCH_COMPONENT_COUNT],
                          double *const out[PATCH_COMPONENT_COUNT]);

#endif
