#include "bench.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "pool.h"

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double bench_median(double *v, size_t n)
{
    if (n == 0)
        return NAN;
    qsort(v, n, sizeof *v, cmp_double);
    return v[n / 2];
}

double bench_sgemm_gflops(size_t m, size_t k, size_t n, size_t reps)
{
    float *a = malloc(m * k * sizeof *a), *b = malloc(k * n * sizeof *b), *c = malloc(m * n * sizeof *c);
    double *rate = malloc(reps * sizeof *rate);
    if (!a || !b || !c || !rate) {
        free(a), free(b), free(c), free(rate);
        return 0.0;
    }
    /* OpenBLAS's own threads, as many as the pool has: the peak is what
     * the library reaches on a large product with all of the rank's cores. */
    const int before = openblas_get_num_threads();
    openblas_set_num_threads((int)pool_threads());
    for (size_t i = 0; i < m * k; i++)
        a[i] = (float)(i % 7) * 0.01f;
    for (size_t i = 0; i < k * n; i++)
        b[i] = (float)(i % 5) * 0.01f;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)n, (int)k, 1.0f, a, (int)k, b, (int)n, 0.0f,
                c, (int)n); /* warm-up: thread start, page faults */
    for (size_t r = 0; r < reps; r++) {
        double t0 = clock_now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)n, (int)k, 1.0f, a, (int)k, b, (int)n,
                    0.0f, c, (int)n);
        rate[r] = 2.0 * (double)m * (double)n * (double)k / (clock_now() - t0) / 1e9;
    }
    double med = bench_median(rate, reps);
    free(a), free(b), free(c), free(rate);
    openblas_set_num_threads(before);
    /* OpenBLAS's idle workers poll (sched_yield) for about 2^28 cycles
     * before they sleep; let them, so they do not slow what is timed next. */
    if (pool_threads() > 1)
        nanosleep(&(struct timespec){.tv_nsec = 300000000L}, NULL);
    return med;
}

/* The matrix products of a row: QKV 2d(qd + 2 kvd), output projection
 * 2 qd d, MLP 4dm (6dm gated); GPT-2: 6d^2, 2d^2, 4dm. */
static double row_flops(const model_config *c)
{
    const double d = (double)c->n_embd, m = (double)c->n_inner, qd = (double)model_q_dim(c);
    const double kvd = (double)model_kv_dim(c);
    return 2.0 * d * (qd + 2.0 * kvd) + 2.0 * qd * d + (c->act == MODEL_ACT_SILU_GATED ? 6.0 : 4.0) * d * m;
}

/* One block over `rows` rows whose queries attend to keys [0, i] for row i:
 * row_flops per row, attention 4 qd (i+1) per row. */
static double block_flops(const model_config *c, size_t row0, size_t T)
{
    const double qd = (double)model_q_dim(c), rows = (double)(T - row0);
    double attn = 0;
    for (size_t i = row0; i < T; i++)
        attn += 4.0 * qd * (double)(i + 1);
    return rows * row_flops(c) + attn;
}

double bench_forward_flops(const model_config *c, size_t T)
{
    return (double)c->n_layer * block_flops(c, 0, T) + 2.0 * (double)c->n_embd * (double)c->vocab_size;
}

double bench_cell_flops(const model *m, const patch_pair *pairs, const patch_cell *cell, const patch_opts *o)
{
    const model_config *c = &m->cfg;
    const patch_plan pl = patch_cell_plan(m, pairs, cell, o->direction);
    if (pl.skipped)
        return 0.0;
    const size_t T = pairs[cell->pair].T, L = c->n_layer;
    const double d = (double)c->n_embd, qd = (double)model_q_dim(c), kvd = (double)model_kv_dim(c);
    const double mlp = (c->act == MODEL_ACT_SILU_GATED ? 6.0 : 4.0) * d * (double)c->n_inner;
    double f = 0.0;
    if (cell->component != PATCH_RESID_PRE && cell->component != PATCH_MLP_OUT) {
        /* the partial block: attention output (z components) and MLP of the
         * changed rows (none with a parallel residual: its MLP reads resid_pre) */
        double changed = (double)(pl.row_end - pl.row0);
        f += changed * ((cell->component >= PATCH_Z ? 2.0 * qd * d : 0.0) + (c->parallel_residual ? 0.0 : mlp));
    }
    for (size_t l = pl.block0; l < L; l++) {
        if (l + 1 < L)
            f += block_flops(c, pl.row0, T);
        else /* last block: K, V of every recomputed row, the rest for the last row only */
            f += (double)(T - pl.row0) * 4.0 * d * kvd + 2.0 * d * qd + 2.0 * qd * d + mlp + 4.0 * qd * (double)T;
    }
    f += o->metric == PATCH_LOGIT_DIFF ? 4.0 * d : 2.0 * d * (double)c->vocab_size;
    return f;
}
