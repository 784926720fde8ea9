/*
 * clock: wall time for measuring durations (benchmarks, a sweep's progress
 * and write time).
 */
#ifndef PS_CLOCK_H
#define PS_CLOCK_H

/* Seconds since an arbitrary point, monotonic (CLOCK_MONOTONIC: not moved by
 * changes of the system time, so differences are durations). */
double clock_now(void);

#endif
