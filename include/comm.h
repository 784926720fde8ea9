/*
 * comm: the few collective operations a sweep needs, with two
 * implementations of one API (as CoMD's parallel.c): src/comm_mpi.c, the
 * only file of the project that calls MPI, and src/comm_serial.c, a
 * single-rank fallback that the library, the unit tests and builds without
 * MPI use.  Root is always rank 0.  All calls are collective unless noted.
 */
#ifndef PS_COMM_H
#define PS_COMM_H

#include <stddef.h>

#include "err.h"

typedef struct comm comm;

/* Initialise (MPI_Init_thread with MPI_THREAD_FUNNELED: only the main
 * thread calls MPI; OpenBLAS threads never do). */
ps_status comm_init(comm **c, int *argc, char ***argv);
void comm_finalize(comm *c);

/* End every rank now with `code` (after an error on one rank that the
 * others cannot learn of collectively). Not collective. */
void comm_abort(comm *c, int code);

size_t comm_rank(const comm *c);
size_t comm_size(const comm *c);
/* Ranks on this node and this rank's index among them (for BLAS threads). */
size_t comm_local_size(const comm *c);
size_t comm_local_rank(const comm *c);

/* "Open MPI v4.1.4" or "serial (no MPI)"; not collective. */
const char *comm_library(void);

/* Root's `bytes` bytes of buf to every rank (any size: sent in pieces). */
ps_status comm_bcast(comm *c, void *buf, size_t bytes);

/* Every rank sends `send_bytes`; root receives rank r's bytes at
 * recv + sum(counts[0..r)) (counts[r] bytes; counts and recv used on root only). */
ps_status comm_gatherv(comm *c, const void *send, size_t send_bytes, void *recv, const size_t *counts);

/* Agree on a status: returns the status of the lowest rank whose `st` is not
 * PS_OK (PS_OK if none), and on every rank err_msg() becomes that rank's
 * message, so root can print the one line. */
ps_status comm_agree(comm *c, ps_status st);

#endif
