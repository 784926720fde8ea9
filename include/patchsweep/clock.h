/*
 * clock: wall time for measuring durations (benchmarks, a sweep's progress
 * and write time, its phase timings).
 */
#ifndef PS_CLOCK_H
#define PS_CLOCK_H

/* Seconds since an arbitrary point, monotonic (CLOCK_MONOTONIC: not moved by
 * changes of the system time, so differences are durations). */
double clock_now(void);

/* Seconds this process has existed when called: from its start as the
 * kernel records it (/proc/self/stat starttime, in clock ticks of 10 ms
 * on Linux, against CLOCK_BOOTTIME), so that the time before main (exec,
 * the dynamic linker, the libraries' constructors) is counted; -1 where
 * that cannot be read. */
double clock_process_age(void);

#endif
