/*
 * pool: the worker threads of the matrix kernels (gemm.h).
 *
 * Why our own threads and not OpenBLAS's: the patching engine multiplies
 * a few dozen to a few hundred rows by each weight matrix, thousands of
 * times per prompt.  At that size a BLAS call's thread wake-up and join
 * cost as much as the arithmetic, so the workers here spin for a short
 * while (POOL_SPIN_NS) after each task before they sleep on a condition
 * variable: back-to-back calls find them awake, an idle program does not
 * keep a core busy.
 *
 * One pool per process, used from one thread at a time (the thread that
 * calls the library; MPI's FUNNELED level).  Workers are started on first
 * use and live until pool_shutdown() or exit.
 */
#ifndef PS_POOL_H
#define PS_POOL_H

#include <stddef.h>

#include "err.h"

/* How long an idle worker polls for the next task before sleeping. */
#define POOL_SPIN_NS 1000000L

/* Hard cap on the threads of one process (a rank rarely has more cores). */
#define POOL_MAX_THREADS 256

/* Threads used by pool_run: the CLI sets it from the cores of the rank
 * (and runs OpenBLAS itself on one thread, see gemm.h); 0 (the default,
 * for programs that never set it) follows OpenBLAS's thread count.  At
 * least 1, at most POOL_MAX_THREADS. */
void pool_set_threads(size_t n);
size_t pool_threads(void);

/* Run fn(arg, tid, nt) for tid in [0, nt) with nt = min(n, pool_threads()),
 * tid 0 on the calling thread, and return when all are done.  If the
 * workers cannot be started, everything runs on the caller (nt = 1): the
 * results do not depend on nt, only the time does. */
void pool_run(size_t n, void (*fn)(void *arg, size_t tid, size_t nt), void *arg);

/* Stop and join the workers (tests, leak checkers); pool_run restarts them. */
void pool_shutdown(void);

#endif
