/*
 * fault: named points where the tests inject faults deterministically
 * (instead of killing a run after a guessed sleep).
 *
 * The library calls fault_point("SITE") at each point, e.g. after the
 * journal's Nth record is written.  In the library and in the patchsweep
 * binary this does nothing.  The test build of the binary
 * (build/.../tests/patchsweep-faults, `make` target fault-bin) links
 * tests/fault/fault_inject.c instead, which reads
 *
 *     PS_FAULT=SITE:N:ACTION     ACTION = kill (SIGKILL itself), term
 *                                (SIGTERM itself: a clean stop) or exit
 *                                (_exit(70) without cleaning up)
 *
 * and acts at the Nth call of SITE in the process (1-based).  Sites:
 *   journal_sync     a sweep's journal was synced after a chunk's records
 *                    (rank 0; the Nth chunk is on disk)
 *   results_window   a run of staged prompts of the results file was
 *                    written (inside the NetCDF write, before it is closed)
 */
#ifndef PS_FAULT_H
#define PS_FAULT_H

void fault_point(const char *site);

#endif
