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
#include <stdint.h>

#include "err.h"

typedef struct comm comm;

/* Initialise (MPI_Init_thread with MPI_THREAD_FUNNELED: only the main
 * thread calls MPI; OpenBLAS threads never do).  Under Open MPI with every
 * rank on one node and no pml chosen, it first sets OMPI_MCA_pml=ob1 in
 * the environment (comm_mpi.c: MPI_Init 0.23 -> 0.02 s). */
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

/* Element-wise sum of n int64 values over every rank, in place on every
 * rank (MPI_Allreduce, MPI_SUM, in pieces).  Integer addition: the result
 * does not depend on the number of ranks or the order (ablate.h's exact
 * sums); overflow is the caller's to rule out. */
ps_status comm_allreduce_sum_i64(comm *c, int64_t *buf, size_t n);

/* Agree on a status: returns the status of the lowest rank whose `st` is not
 * PS_OK (PS_OK if none), and on every rank err_msg() becomes that rank's
 * message, so root can print the one line. */
ps_status comm_agree(comm *c, ps_status st);

/* Agree on a status as comm_agree, among the ranks of this node only. */
ps_status comm_node_agree(comm *c, ps_status st);

/* Memory shared by the ranks of one node (one copy per node, e.g. the
 * model's converted weights): MPI_Win_allocate_shared over the node's ranks
 * with all `bytes` on node rank 0 and none on the others, which map node
 * rank 0's segment (MPI_Win_shared_query).  Collective over the node's
 * ranks, each passing the same `bytes` (checked: a rank whose bytes differ
 * from node rank 0's fails, and with it every rank of the node).  *ptr: the
 * memory, the same on every rank of the node (NULL when bytes is 0); *shm:
 * the handle for comm_shared_publish and comm_shared_free.  Open MPI backs
 * it with a file in /dev/shm (osc_sm_backing_directory), which needs room
 * for it: node rank 0 checks that first (PS_ERR_NOMEM on every rank).
 * Every failure is returned on every rank of the node, except
 * PS_ERR_INTERNAL: MPI_Win_allocate_shared itself failed on this rank and
 * the node's other ranks may be waiting inside it; only comm_abort ends
 * that.  Serial build: malloc. */
typedef struct comm_shared comm_shared;
ps_status comm_shared_alloc(comm *c, size_t bytes, comm_shared **shm, void **ptr);

/* Collective over the node's ranks: the stores any of them made to the
 * shared memory before the call are visible to all of them after it
 * (MPI_Win_sync, barrier, MPI_Win_sync); returns comm_node_agree(st).
 * NULL shm (no memory was allocated): comm_node_agree(st) alone. */
ps_status comm_shared_publish(comm *c, comm_shared *shm, ps_status st);

/* Collective over the node's ranks: free the memory (NULL: nothing). */
void comm_shared_free(comm *c, comm_shared *shm);

#endif
