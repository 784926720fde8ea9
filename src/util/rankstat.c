/*
 * rankstat: ranks, Spearman's correlation and top-k misses (rankstat.h).
 */
#include "rankstat.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

typedef struct {
    double v;
    size_t i;
} rankstat_keyed;

/* increasing value, then index */
static int by_value(const void *a, const void *b)
{
    const rankstat_keyed *x = a, *y = b;
    return x->v < y->v ? -1 : x->v > y->v ? 1 : (x->i > y->i) - (x->i < y->i);
}

/* decreasing key, then index (keys are >= 0, -1 for NaN: last) */
static int by_key_desc(const void *a, const void *b)
{
    const rankstat_keyed *x = a, *y = b;
    return x->v > y->v ? -1 : x->v < y->v ? 1 : (x->i > y->i) - (x->i < y->i);
}

static void effect_order(const double *v, size_t n, double base, rankstat_keyed *tmp)
{
    for (size_t i = 0; i < n; i++) {
        const double e = fabs(v[i] - base);
        tmp[i] = (rankstat_keyed){e == e ? e : -1.0, i};
    }
    qsort(tmp, n, sizeof *tmp, by_key_desc);
}

ps_status rankstat_order_by_effect(const double *v, size_t n, double base, size_t *order)
{
    rankstat_keyed *tmp = malloc((n ? n : 1) * sizeof *tmp);
    if (!tmp)
        return err_set(PS_ERR_NOMEM, "rankstat: out of memory");
    effect_order(v, n, base, tmp);
    for (size_t i = 0; i < n; i++)
        order[i] = tmp[i].i;
    free(tmp);
    return PS_OK;
}

/* average ranks (1-based) of v[n] into r[n]; tmp[n] scratch: tied values
 * at sorted places i..j (0-based) all get (i + j) / 2 + 1 */
static void ranks(const double *v, size_t n, rankstat_keyed *tmp, double *r)
{
    for (size_t i = 0; i < n; i++)
        tmp[i] = (rankstat_keyed){v[i], i};
    qsort(tmp, n, sizeof *tmp, by_value);
    for (size_t i = 0; i < n;) {
        size_t j = i;
        while (j + 1 < n && tmp[j + 1].v == tmp[i].v)
            j++;
        for (size_t t = i; t <= j; t++)
            r[tmp[t].i] = 0.5 * (double)(i + j) + 1.0;
        i = j + 1;
    }
}

ps_status rankstat_spearman(const double *a, const double *b, size_t n, double *rho)
{
    *rho = NAN;
    if (n == 0)
        return PS_OK;
    rankstat_keyed *tmp = malloc(n * sizeof *tmp);
    double *ra = malloc(2 * n * sizeof *ra);
    if (!tmp || !ra) {
        free(tmp), free(ra);
        return err_set(PS_ERR_NOMEM, "rankstat: out of memory");
    }
    double *rb = ra + n;
    ranks(a, n, tmp, ra);
    ranks(b, n, tmp, rb);
    double ma = 0, mb = 0, sab = 0, saa = 0, sbb = 0;
    for (size_t i = 0; i < n; i++)
        ma += ra[i], mb += rb[i];
    ma /= (double)n, mb /= (double)n;
    for (size_t i = 0; i < n; i++) {
        sab += (ra[i] - ma) * (rb[i] - mb);
        saa += (ra[i] - ma) * (ra[i] - ma);
        sbb += (rb[i] - mb) * (rb[i] - mb);
    }
    if (saa > 0 && sbb > 0)
        *rho = sab / sqrt(saa * sbb);
    free(tmp), free(ra);
    return PS_OK;
}

ps_status rankstat_missed_top_k(const double *exact, const double *estimate, size_t n, double base, size_t k,
                                size_t *missed, size_t *n_missed)
{
    *n_missed = 0;
    k = k < n ? k : n;
    if (k == 0)
        return PS_OK;
    rankstat_keyed *te = malloc(n * sizeof *te), *ts = malloc(n * sizeof *ts);
    if (!te || !ts) {
        free(te), free(ts);
        return err_set(PS_ERR_NOMEM, "rankstat: out of memory");
    }
    effect_order(exact, n, base, te);
    effect_order(estimate, n, base, ts);
    for (size_t a = 0; a < k; a++) {
        bool found = false;
        for (size_t b = 0; b < k && !found; b++)
            found = ts[b].i == te[a].i;
        if (!found)
            missed[(*n_missed)++] = te[a].i;
    }
    free(te), free(ts);
    return PS_OK;
}
