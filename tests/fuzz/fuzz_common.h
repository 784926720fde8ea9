/*
 * What every fuzz target checks besides "no crash, no leak, no hang": a
 * failing call leaves one non-empty line of valid UTF-8 naming the input
 * (err.h's contract), and its status is one of ps_status's codes.  A violation
 * aborts, so libFuzzer reports it as a crash with the input that caused it.
 *
 * Targets are plain libFuzzer entry points (LLVMFuzzerTestOneInput), built
 * with clang -fsanitize=fuzzer,address,undefined against the library built
 * by clang (make fuzz); they never start MPI, so LeakSanitizer stays on.
 */
#ifndef PS_FUZZ_COMMON_H
#define PS_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "strutil.h"

/* AddressSanitizer's defaults for every run of a target, also when a
 * reproducer is replayed by hand (ASAN_OPTIONS overrides them): leaks are
 * checked, and an allocation over 2 GiB returns NULL, as on a machine
 * without the memory, in patchsweep and in the libraries alike; the code
 * under test must handle it.  Without this, libFuzzer stops at the first
 * such allocation as out-of-memory, even one netCDF makes from a length in
 * a file's header.  (More than 2 GiB of memory in use still fails the run:
 * libFuzzer's -rss_limit_mb, 2048 by default.) */
const char *__asan_default_options(void);
const char *__asan_default_options(void)
{
    return "detect_leaks=1:allocator_may_return_null=1:max_allocation_size_mb=2048";
}

/* Abort with a message (libFuzzer saves the input as a crash). */
#define FUZZ_REQUIRE(cond, ...)                                                   \
    do {                                                                          \
        if (!(cond)) {                                                            \
            fprintf(stderr, "fuzz: %s:%d: requirement failed: %s: ", __FILE__,    \
                    __LINE__, #cond);                                             \
            fprintf(stderr, __VA_ARGS__);                                         \
            fputc('\n', stderr);                                                  \
            abort();                                                              \
        }                                                                         \
    } while (0)

/* After a call returned st: an error is one line that names `name` (NULL:
 * any non-empty line). */
/* FUZZ_VERBOSE=1 in the environment prints every error message: what a
 * reproducer or a seed runs into (build/fuzz/fuzz_TARGET FILE). */
static inline void fuzz_check_status(ps_status st, const char *name)
{
    static int verbose = -1;
    if (verbose < 0)
        verbose = getenv("FUZZ_VERBOSE") && *getenv("FUZZ_VERBOSE") == '1';
    FUZZ_REQUIRE(st >= PS_OK && st <= PS_ERR_INTERRUPTED, "status %d", (int)st);
    if (st == PS_OK)
        return;
    const char *m = err_msg();
    if (verbose)
        fprintf(stderr, "fuzz: %s: %s\n", err_name(st), m);
    FUZZ_REQUIRE(m[0] != '\0', "empty message for status %s", err_name(st));
    FUZZ_REQUIRE(!strchr(m, '\n') && !strchr(m, '\r'), "message of more than one line: %s", m);
    FUZZ_REQUIRE(str_utf8_valid(m, strlen(m)), "message is not valid UTF-8: %s", m);
    FUZZ_REQUIRE(!name || strstr(m, name), "message does not name %s: %s", name, m);
}

#endif
