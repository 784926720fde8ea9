/*
 * atp_verify: the top cells of an attribution-patching estimate patched
 * exactly (atp_verify.h).
 */
#include "atp_verify.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "rankstat.h"

static int by_size(const void *a, const void *b)
{
    const size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return (x > y) - (x < y);
}

ps_status atp_verify_select(const double *est, size_t n, double base, size_t k, size_t *idx, size_t *n_out)
{
    k = k < n ? k : n;
    size_t *order = malloc((n ? n : 1) * sizeof *order);
    if (!order)
        return err_set(PS_ERR_NOMEM, "out of memory");
    ps_status st = rankstat_order_by_effect(est, n, base, order);
    if (st == PS_OK) {
        memcpy(idx, order, k * sizeof *idx);
        qsort(idx, k, sizeof *idx, by_size);
        *n_out = k;
    }
    free(order);
    return st;
}

ps_status atp_verify_pair(const model *m, const patch_pair *p, const bool on[PATCH_COMPONENT_COUNT],
                          const patch_opts *opts, size_t k, double *const est[PATCH_COMPONENT_COUNT],
                          double *const out[PATCH_COMPONENT_COUNT])
{
    if (opts->metrics.n > 1)
        return err_set(PS_ERR_INVALID, "atp+verify takes one metric (%zu given)", opts->metrics.n);
    const double base = opts->direction == PATCH_DENOISE ? p->corrupted_metric[opts->metric]
                                                         : p->clean_metric[opts->metric];
    /* the selected cells of every grid, one list; where each value goes */
    size_t n_sel = 0, cap = 0;
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        if (on[c])
            cap += k < patch_grid_size((patch_component)c, &m->cfg, p->T) ? k
                                                                            : patch_grid_size((patch_component)c,
                                                                                              &m->cfg, p->T);
    patch_cell *sel = malloc((cap ? cap : 1) * sizeof *sel);
    double **dst = malloc((cap ? cap : 1) * sizeof *dst), *vals = malloc((cap ? cap : 1) * sizeof *vals);
    size_t *idx = NULL;
    ps_status st = !sel || !dst || !vals ? err_set(PS_ERR_NOMEM, "out of memory") : PS_OK;
    for (int c = 0; c < PATCH_COMPONENT_COUNT && st == PS_OK; c++) {
        if (!on[c])
            continue;
        patch_cell *cells;
        size_t n;
        if ((st = patch_grid_cells((patch_component)c, &m->cfg, 0, p->T, &cells, &n)))
            break;
        for (size_t i = 0; i < n; i++)
            out[c][i] = NAN;
        size_t *ix = realloc(idx, (n ? n : 1) * sizeof *ix);
        if (!ix) {
            free(cells);
            st = err_set(PS_ERR_NOMEM, "out of memory");
            break;
        }
        idx = ix;
        size_t ns = 0;
        if ((st = atp_verify_select(est[c], n, base, k, idx, &ns))) {
            free(cells);
            break;
        }
        for (size_t i = 0; i < ns; i++) {
            sel[n_sel] = cells[idx[i]];
            dst[n_sel++] = &out[c][idx[i]];
        }
        free(cells);
    }
    patch_opts one = *opts;
    one.metrics.n = 0; /* the one metric */
    if (st == PS_OK && (st = patch_eval(m, p, 1, sel, n_sel, &one, vals)) == PS_OK)
        for (size_t i = 0; i < n_sel; i++)
            *dst[i] = vals[i];
    free(sel), free(dst), free(vals), free(idx);
    return st;
}
