/*
 * blas: which OpenBLAS kernels ("core") this process runs, a self-check of
 * them, and how many BLAS threads it uses.
 *
 * Why: Debian's OpenBLAS is built with DYNAMIC_ARCH: at load time it reads
 * cpuid, looks the family/model up in its tables and picks a kernel set.  A
 * CPU newer than the library (0.3.21 on a Xeon of family 6 model 207) is not
 * in the tables and gets the generic Prescott (SSE3) kernels: sgemm 3.8x
 * slower than the SkylakeX kernels the CPU can run.  OpenBLAS reads
 * $OPENBLAS_CORETYPE only while the library loads, so choosing another core
 * means running the program again with the variable set (the CLI re-executes
 * itself, src/main.c).
 *
 * The decision is a pure function (blas_decide) of what the CPU and the OS
 * support, the core OpenBLAS runs, the user's environment and options and a
 * marker variable that the re-execution carries:
 *
 *   PATCHSWEEP_BLAS_SELECTED = "STAGE:FROM:TO"
 *     auto:FROM:TO      patchsweep replaced OpenBLAS's generic FROM by TO
 *                       (OPENBLAS_CORETYPE=TO)
 *     option:FROM:TO    --blas-core TO (OPENBLAS_CORETYPE=TO); FROM ran before
 *     fallback:FROM:TO  TO failed the self-check; back to FROM
 *                       (OPENBLAS_CORETYPE=FROM)
 *
 * The marker counts only when OPENBLAS_CORETYPE still holds the core it
 * names; otherwise OPENBLAS_CORETYPE is the user's and is kept.  A process
 * started with a valid marker never re-executes again, except once from
 * "auto" to "fallback": there is no loop.
 *
 * Nothing here prints or exits; the CLI does (src/main.c).
 */
#ifndef PS_BLAS_H
#define PS_BLAS_H

#include <cblas.h>
#include <stdbool.h>
#include <stddef.h>

#include "err.h"

#define BLAS_ENV_CORETYPE "OPENBLAS_CORETYPE"
#define BLAS_ENV_MARKER "PATCHSWEEP_BLAS_SELECTED"
#define BLAS_CORE_MAX 32 /* bytes of a core name with its NUL */

/* What the CPU can execute (cpuid) and whether the OS saves the registers
 * (XCR0, read with xgetbv): an instruction set the OS does not enable faults. */
typedef struct {
    char vendor[13];        /* "GenuineIntel", "AuthenticAMD"; "" when not x86 */
    unsigned family, model; /* display family and model, e.g. 6 and 207 */
    bool avx, fma, avx2;
    bool avx512f, avx512cd, avx512bw, avx512dq, avx512vl;
    bool amx_tile;          /* reported only: OpenBLAS's sgemm does not use AMX */
    bool os_avx;            /* XCR0 bits 1-2: SSE and YMM state */
    bool os_avx512;         /* XCR0 bits 5-7 as well: opmask and ZMM state */
} blas_cpu;

/* This machine's CPU; all false (vendor "") on anything but x86. */
void blas_cpu_detect(blas_cpu *c);

/* "GenuineIntel family 6 model 106: avx avx2 fma avx512 (OS saves ymm zmm)". */
void blas_cpu_describe(const blas_cpu *c, char *buf, size_t n);

/* Instruction-set level of an OpenBLAS x86 core by name (case-insensitive). */
typedef enum {
    BLAS_LEVEL_UNKNOWN = -1, /* not an x86 core name patchsweep knows: never replaced */
    BLAS_LEVEL_GENERIC,      /* SSE only: Prescott, Core2, Nehalem, Barcelona, ... */
    BLAS_LEVEL_AVX,          /* Sandybridge, Bulldozer, ... */
    BLAS_LEVEL_AVX2,         /* Haswell, Zen */
    BLAS_LEVEL_AVX512,       /* SkylakeX, Cooperlake, SapphireRapids */
} blas_level;

blas_level blas_core_level(const char *core);

/* The core patchsweep selects for this CPU and OS: "SkylakeX" (AVX-512 F,
 * CD, BW, DQ and VL, the Skylake-SP set those kernels use, with ZMM state
 * enabled), else "Haswell" (AVX2 + FMA, YMM state), else "Sandybridge"
 * (AVX), else NULL. */
const char *blas_cpu_best_core(const blas_cpu *c);

typedef enum {
    BLAS_SOURCE_OPENBLAS,   /* OpenBLAS's own choice */
    BLAS_SOURCE_ENV,        /* the user's OPENBLAS_CORETYPE */
    BLAS_SOURCE_OPTION,     /* --blas-core NAME */
    BLAS_SOURCE_AUTOSELECT, /* patchsweep's, over OpenBLAS's generic fallback */
    BLAS_SOURCE_FALLBACK,   /* patchsweep's choice failed the self-check: OpenBLAS's again */
} blas_source;

/* "openblas", "OPENBLAS_CORETYPE", "--blas-core", "autoselect", "fallback" */
const char *blas_source_name(blas_source s);

typedef enum { BLAS_CHECK_NOT_RUN, BLAS_CHECK_PASSED, BLAS_CHECK_FAILED } blas_check;

/* "not run", "passed", "failed" */
const char *blas_check_name(blas_check c);

/* Everything the start-up decision depends on. */
typedef struct {
    blas_cpu cpu;
    const char *core;         /* openblas_get_corename() of this process */
    bool dynamic_arch;        /* the library reads OPENBLAS_CORETYPE (DYNAMIC_ARCH build) */
    const char *env_coretype; /* $OPENBLAS_CORETYPE; NULL when unset or empty */
    const char *env_marker;   /* $PATCHSWEEP_BLAS_SELECTED; NULL when unset */
    const char *opt_core;     /* --blas-core NAME; NULL when not given */
    bool no_autoselect;       /* --no-blas-autoselect */
    blas_check check;         /* the self-check of this process's core, once run */
    char check_detail[160];   /* its failure, for the warning */
} blas_situation;

typedef enum {
    BLAS_KEEP,      /* run with the loaded core */
    BLAS_SELFCHECK, /* run the self-check, set situation.check, decide again */
    BLAS_REEXEC,    /* set OPENBLAS_CORETYPE = core and the marker, re-execute */
    BLAS_REFUSE,    /* --blas-core names a core this OpenBLAS does not run: usage error */
} blas_action;

typedef struct {
    blas_action action;
    blas_source source;                  /* where the core came from (KEEP) */
    char core[BLAS_CORE_MAX];            /* REEXEC: OPENBLAS_CORETYPE to set */
    char marker[3 * BLAS_CORE_MAX + 16]; /* REEXEC: PATCHSWEEP_BLAS_SELECTED to set */
    char openblas_choice[BLAS_CORE_MAX]; /* the core OpenBLAS picked by itself in the first
                                            process of this run; "" when the user's
                                            OPENBLAS_CORETYPE hid it */
    char rejected[BLAS_CORE_MAX];        /* FALLBACK: the core that failed the self-check */
    bool reexecuted;                     /* this process is a re-execution (valid marker) */
    char message[400];                   /* one line for stderr (warning or refusal), or "" */
} blas_decision;

/* The decision (see the table in src/blas.c).  Pure: no I/O, no getenv. */
void blas_decide(const blas_situation *s, blas_decision *d);

/* The kernels the self-check runs: cblas_sgemm / cblas_sgemv, or stand-ins
 * (unit tests).  Signatures as OpenBLAS's cblas.h. */
typedef void (*blas_sgemm_fn)(const enum CBLAS_ORDER, const enum CBLAS_TRANSPOSE, const enum CBLAS_TRANSPOSE,
                              const blasint, const blasint, const blasint, const float, const float *, const blasint,
                              const float *, const blasint, const float, float *, const blasint);
typedef void (*blas_sgemv_fn)(const enum CBLAS_ORDER, const enum CBLAS_TRANSPOSE, const blasint, const blasint,
                              const float, const float *, const blasint, const float *, const blasint, const float,
                              float *, const blasint);
typedef struct {
    blas_sgemm_fn sgemm;
    blas_sgemv_fn sgemv;
} blas_kernels;

/* Compare the calls patchsweep makes (sgemm NN with beta 0 and 1 and a
 * leading dimension wider than the matrix, sgemm NT, sgemv; small, odd and
 * multi-block shapes) against a plain C double-precision reference.  Every
 * element must satisfy |c - ref| <= 2 k eps_f32 sum_l |a_il b_lj| (+ |beta c|),
 * the worst case of float rounding in any summation order; a wrong kernel
 * misses it by orders of magnitude.  *worst = max |c - ref| / bound (<= 1
 * passes).  k = NULL: OpenBLAS's cblas.  PS_ERR_INTERNAL names the failing
 * call; PS_ERR_NOMEM. */
ps_status blas_selfcheck(const blas_kernels *k, double *worst);

/* Inputs of the BLAS thread count of one process (one MPI rank). */
typedef struct {
    size_t requested;                /* --threads or the job's threads; 0 = none */
    const char *env_threads;         /* $OPENBLAS_NUM_THREADS, else $OMP_NUM_THREADS */
    const char *slurm_cpus_per_task; /* $SLURM_CPUS_PER_TASK */
    size_t affinity_cpus;            /* CPUs this process may run on (0: unknown) */
    size_t local_ranks;              /* ranks of the job on this node (0 or 1: alone) */
} blas_threads_in;

/* requested, else the user's OPENBLAS_NUM_THREADS/OMP_NUM_THREADS, else
 * SLURM_CPUS_PER_TASK (at most the affinity CPUs), else the affinity CPUs
 * shared among the node's ranks (at least 1).  The default never exceeds
 * the CPUs the rank may run on: OpenBLAS's threads inherit its affinity
 * mask, so more would only time-share cores.  *why names the rule taken. */
size_t blas_threads_choose(const blas_threads_in *in, const char **why);

/* CPUs in this process's affinity mask (sched_getaffinity), else the
 * online CPUs, else 1. */
size_t blas_affinity_cpus(void);

/* What this process runs, for reports and provenance. */
typedef struct {
    char version[32];        /* "0.3.21" */
    const char *threading;   /* "pthreads", "OpenMP" or "sequential" */
    char core[BLAS_CORE_MAX];
    char openblas_choice[BLAS_CORE_MAX]; /* as blas_decision's */
    char rejected[BLAS_CORE_MAX];
    blas_source source;
    blas_check check;
    double check_worst;      /* the self-check's worst error / bound */
    bool reexecuted;
    size_t threads;
    const char *threads_why;
    blas_cpu cpu;
} blas_report;

/* Fill version, threading and core from the loaded OpenBLAS (the rest is
 * the caller's). */
void blas_report_library(blas_report *r);

/* One line: "OpenBLAS 0.3.21 (pthreads), core SkylakeX (OpenBLAS's choice;
 * self-check passed), 2 threads" ("threads" also for 1: logs are grepped). */
void blas_describe(const blas_report *r, char *buf, size_t n);

#endif
