/*
 * fault: named points where the tests inject faults deterministically
 * (instead of killing a run after a guessed sleep, or filling a disk).
 *
 * The library calls fault_point("SITE") at each point, e.g. after the
 * journal's Nth record is written.  In the library and in the patchsweep
 * binary this does nothing and returns false.  The test build of the binary
 * (build/.../tests/patchsweep-faults, `make` target fault-bin) links
 * tests/fault/fault_inject.c instead, which reads
 *
 *     PS_FAULT=SPEC[,SPEC...]    SPEC = SITE:N:ACTION[@RANK]
 *
 * and acts at the Nth call of SITE in the process (1-based), in every
 * process, or with @RANK only in the MPI rank RANK (from the launcher's
 * environment: OMPI_COMM_WORLD_RANK, PMIX_RANK, PMI_RANK, SLURM_PROCID).
 * Actions at a fault_point site:
 *   kill   SIGKILL itself                 term   SIGTERM itself (a clean stop)
 *   exit   _exit(70) without cleaning up  stop   SIGSTOP itself (the test
 *                                                holds the process there)
 *   error  fault_point returns true: the caller fails as if its operation
 *          had (PS_ERR_IO "injected fault at SITE")
 *   parent-term, parent-int, parent-usr1   that signal to the parent process
 *          (mpirun, for a rank it started): a user's kill or Ctrl-C of mpirun
 *          at a known point.  parent-term and parent-int then SIGSTOP
 *          themselves: mpirun answers those two by ending the ranks
 *          (SIGCONT, SIGTERM, then SIGKILL), and a stopped rank cannot
 *          finish the job before that, however long mpirun takes (the
 *          forwarded SIGUSR1 needs a running rank)
 * Sites:
 *   journal_sync     a sweep's journal was synced after a chunk's records
 *                    (rank 0; the Nth chunk is on disk; the first sync is
 *                    the journal's open)
 *   results_window   a run of staged prompts of the results file was
 *                    written (inside the NetCDF write, before it is closed)
 *   sweep_lock       rank 0 holds the output's lock (sweep), before any work
 *   chunk_eval       every rank, before it evaluates its share of a chunk
 *                    (Nth chunk), in both distributions
 *   sweep_writer     rank 0's results writer thread, before it writes the
 *                    Nth chunk taken from its queue (sweep_writer.c)
 *
 * I/O errors come from the test build's own write(), pwrite(), fsync() and
 * fdatasync(), which stand in for libc's (the library's writes and HDF5's
 * alike; the release binary has no such wrappers and pays nothing):
 *   write.journal, fsync.journal   calls on a file whose name ends .journal
 *   write.nc, fsync.nc             calls on a NetCDF file being written
 *                                  (NAME.partial: results, lens, merge, cache)
 * with the actions enospc, edquot and eio: from the Nth call on, every call
 * of that site fails with that errno (a disk stays full once it is).
 */
#ifndef PS_FAULT_H
#define PS_FAULT_H

#include <stdbool.h>

/* True when the test build asks this call to fail (action `error`). */
bool fault_point(const char *site);

#endif
