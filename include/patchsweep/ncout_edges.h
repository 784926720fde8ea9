/*
 * ncout_edges: the edge attribution patching scores of one prompt pair in
 * a results file (`patch --method atp --edges -o OUT.nc`), beside the
 * pair's variables of ncout.h (tokens, clean_metric, ...).
 *
 * Schema (contract; names in schema.h):
 *   dimensions  upstream (n_up), downstream (n_down)
 *   upstream(upstream)                      string  hook_embed, blocks.L.attn.hook_result[h=i], blocks.L.hook_mlp_out
 *   downstream(downstream)                  string  blocks.L.hook_q_input[h=i], blocks.L.hook_k_input[h=g],
 *                                                   blocks.L.hook_v_input[h=g], blocks.L.hook_mlp_in, logits
 *   edge_atp(upstream, downstream)          float   raw score, _FillValue (NaN in xarray) where no edge
 *   edge_atp_normalized(upstream, downstream) float score / (clean - corrupted metric)
 *   upstream_atp(upstream), downstream_atp(downstream)  double  node AtP (atp_edges.h)
 * Opens in xarray as ds.edge_atp.sel(upstream="hook_embed", downstream="logits").
 */
#ifndef PS_NCOUT_EDGES_H
#define PS_NCOUT_EDGES_H

#include <stddef.h>

#include "err.h"
#include "ncout.h"

/* Define and write the variables above into an open file (NetCDF-4: after
 * the file's other variables are written).  score, normalized [n_up,
 * n_down] with NaN where there is no edge (written as the fill value). */
ps_status ncout_edges_put(ncout_file *f, size_t n_up, size_t n_down, char *const *up, char *const *down,
                          const double *score, const double *normalized, const double *up_atp,
                          const double *down_atp);

#endif
