/*
 * bench: measured speed of the patching engines beside the machine's sgemm
 * peak, side by side in one process (the machines are noisy: compare within
 * one run, report medians and ratios).
 */
#ifndef PS_BENCH_H
#define PS_BENCH_H

#include <stddef.h>

#include "err.h"
#include "model.h"
#include "patch.h"

/* The median of v[0..n) (sorts v); NaN for n = 0. */
double bench_median(double *v, size_t n);

/* Median GFLOP/s of `reps` sgemm calls [m x k] @ [k x n] (GPT-2-shaped),
 * after one warm-up call, with OpenBLAS's threads as many as the pool's. */
double bench_sgemm_gflops(size_t m, size_t k, size_t n, size_t reps);

/* FLOPs the fast engine needs for one cell: the matmuls and attention of
 * the rows and blocks it recomputes plus the metric; 0 for a skipped cell.
 * (A naive cell costs bench_forward_flops.) */
double bench_cell_flops(const model *m, const patch_pair *pairs, const patch_cell *cell, const patch_opts *o);

/* FLOPs of one full forward of T tokens with logits of the last row. */
double bench_forward_flops(const model_config *c, size_t T);

#endif
