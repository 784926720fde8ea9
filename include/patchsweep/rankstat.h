/*
 * rankstat: how well one list of values ranks like another, the statistics
 * of an estimate against the truth (attribution patching against exact
 * patching: engine/atp.c's atp_compare, atp_verify's choice of cells, and
 * the figures of io/plotfig.c, which all must agree to the bit).
 *
 * "Effect" of a value v is |v - base| (base: the metric with no effect).
 * Orders are total: equal keys in index order, NaN after every number, so
 * every rank and every run makes the same choice.
 */
#ifndef PS_RANKSTAT_H
#define PS_RANKSTAT_H

#include <stddef.h>

#include "err.h"

/* order[0 .. n): the indices of v by decreasing |v[i] - base| (NaN last,
 * ties by index). */
ps_status rankstat_order_by_effect(const double *v, size_t n, double base, size_t *order);

/* Spearman's rank correlation of a[n] and b[n]: Pearson's correlation of
 * their ranks 1..n, tied values at their mean rank.  *rho = NaN when n = 0
 * or either side is constant.  The values should be numbers (a NaN ranks
 * as the sort puts it). */
ps_status rankstat_spearman(const double *a, const double *b, size_t n, double *rho);

/* The false negatives of the estimate's top k: the cells of the exact top
 * k by effect that are not among the estimate's top k by effect, into
 * missed[0 .. *n_missed) by decreasing exact effect (missed has room for
 * k; k is clamped to n). */
ps_status rankstat_missed_top_k(const double *exact, const double *estimate, size_t n, double base, size_t k,
                                size_t *missed, size_t *n_missed);

#endif
