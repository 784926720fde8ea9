/*
 * bench_tool: what the C benchmark tools share (bench_atp, bench_edges,
 * bench_gemm_bf16): the median of repeated timings, and the IOI-shaped
 * prompt pair with the threads set as the CLI sets them.
 */
#ifndef PS_BENCH_TOOL_H
#define PS_BENCH_TOOL_H

#include <cblas.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "pool.h"

/* The shape of the worksheet's IOI pair: 17 GPT-2 token ids ("<|endoftext|>After
 * John and Mary went to the store, Mary gave a bottle of milk to"), the
 * corrupted prompt differing at position 10 (" Mary" -> " John"). */
enum { BENCH_PAIR_T = 17, BENCH_PAIR_DIFF = 10 };

static inline void bench_pair_ids(int32_t clean[BENCH_PAIR_T], int32_t corrupted[BENCH_PAIR_T])
{
    static const int32_t ids[BENCH_PAIR_T] = {50256, 3260, 1757, 290,  5335, 1816, 284,  262, 3650,
                                              11,    5335, 2921, 257, 9294, 286,  7545, 284};
    memcpy(clean, ids, sizeof ids);
    memcpy(corrupted, ids, sizeof ids);
    corrupted[BENCH_PAIR_DIFF] = 1757;
}

/* The pool's threads, each calling OpenBLAS single-threaded, as the CLI
 * runs them (gemm.h). */
static inline void bench_set_threads(size_t threads)
{
    pool_set_threads(threads);
    openblas_set_num_threads(1);
}

static int bench_cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The median of t[0 .. n) (sorted in place; n >= 1). */
static inline double bench_median(double *t, size_t n)
{
    qsort(t, n, sizeof *t, bench_cmp_double);
    return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

#endif
