/*
 * memstat: this process's memory as Linux counts it, for sizing jobs and for
 * checking that ranks on a node share one copy of the weights.
 *
 * What the kernel counts (proc(5)):
 *   VmHWM     peak resident set size (the figure Slurm's --mem and
 *             getrusage's ru_maxrss see);
 *   VmRSS   = RssAnon + RssFile + RssShmem, now:
 *     RssAnon   private memory: heap, stacks, malloc'd caches and buffers;
 *     RssFile   mapped file pages: the mmap'd F32 checkpoint, libraries;
 *     RssShmem  shared memory: MPI's shared window of converted weights
 *               (a /dev/shm file), MPI's own segments.
 *   Pss       (/proc/self/smaps_rollup) the resident set with every page
 *             divided by the number of processes mapping it: summed over
 *             the processes of a node it is the memory they use together,
 *             counting a shared page once.
 * A page that N ranks map counts in full in each rank's VmRSS and VmHWM, so
 * the sum of RSS over ranks overstates a node's use; Pss does not.
 */
#ifndef PS_MEMSTAT_H
#define PS_MEMSTAT_H

#include <stddef.h>

#include "err.h"

typedef struct {
    size_t hwm_kib;    /* VmHWM */
    size_t rss_kib;    /* VmRSS */
    size_t anon_kib;   /* RssAnon */
    size_t file_kib;   /* RssFile */
    size_t shmem_kib;  /* RssShmem */
    size_t pss_kib;    /* Pss; 0 when smaps_rollup is missing (Linux < 4.14) */
} memstat;

/* Read the calling process's figures now (VmHWM: its peak so far).
 * PS_ERR_IO when /proc/self/status cannot be read (not Linux). */
ps_status memstat_read(memstat *m);

/* "hwm_kib=N rss_kib=N anon_kib=N file_kib=N shmem_kib=N pss_kib=N" into
 * buf (for logs that scripts parse). */
void memstat_format(const memstat *m, char *buf, size_t cap);

#endif
