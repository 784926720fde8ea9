/*
 * Unit tests for blas.c: core levels, the best core of a CPU (every branch,
 * including AVX-512 without OS support and Knights-Landing-like AVX-512F
 * alone), every branch of the start-up decision, a simulation of whole
 * re-execution chains over all combinations of inputs (they end, without
 * loops, with the core the rules promise), the self-check against correct,
 * subtly perturbed and wrong kernels, the thread-count rules, and cpuid
 * against /proc/cpuinfo.
 */
#include <float.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <cmocka.h>

#include "blas.h"

/* ---- CPUs ------------------------------------------------------------------ */

static blas_cpu cpu_sse(void) { return (blas_cpu){.vendor = "GenuineIntel", .family = 6, .model = 207}; }

static blas_cpu cpu_avx(void)
{
    blas_cpu c = cpu_sse();
    c.avx = c.os_avx = true;
    return c;
}

static blas_cpu cpu_avx2(void)
{
    blas_cpu c = cpu_avx();
    c.avx2 = c.fma = true;
    return c;
}

static blas_cpu cpu_avx512(void)
{
    blas_cpu c = cpu_avx2();
    c.avx512f = c.avx512cd = c.avx512bw = c.avx512dq = c.avx512vl = true;
    c.os_avx512 = c.amx_tile = true;
    return c;
}

static void test_core_levels(void **state)
{
    (void)state;
    assert_int_equal(blas_core_level("Prescott"), BLAS_LEVEL_GENERIC);
    assert_int_equal(blas_core_level("prescott"), BLAS_LEVEL_GENERIC);
    assert_int_equal(blas_core_level("Nehalem"), BLAS_LEVEL_GENERIC);
    assert_int_equal(blas_core_level("Barcelona"), BLAS_LEVEL_GENERIC);
    assert_int_equal(blas_core_level("Sandybridge"), BLAS_LEVEL_AVX);
    assert_int_equal(blas_core_level("HASWELL"), BLAS_LEVEL_AVX2);
    assert_int_equal(blas_core_level("Zen"), BLAS_LEVEL_AVX2);
    assert_int_equal(blas_core_level("SkylakeX"), BLAS_LEVEL_AVX512);
    assert_int_equal(blas_core_level("Cooperlake"), BLAS_LEVEL_AVX512);
    assert_int_equal(blas_core_level("Unknown"), BLAS_LEVEL_UNKNOWN);
    assert_int_equal(blas_core_level("ARMV8"), BLAS_LEVEL_UNKNOWN);
    assert_int_equal(blas_core_level(""), BLAS_LEVEL_UNKNOWN);
    assert_int_equal(blas_core_level(NULL), BLAS_LEVEL_UNKNOWN);
}

static void test_best_core(void **state)
{
    (void)state;
    blas_cpu c = cpu_sse();
    assert_null(blas_cpu_best_core(&c));
    c = cpu_avx();
    assert_string_equal(blas_cpu_best_core(&c), "Sandybridge");
    c.os_avx = false; /* the OS does not save YMM: no AVX kernels at all */
    assert_null(blas_cpu_best_core(&c));
    c = cpu_avx2();
    assert_string_equal(blas_cpu_best_core(&c), "Haswell");
    c.fma = false; /* Haswell's kernels are FMA kernels */
    assert_string_equal(blas_cpu_best_core(&c), "Sandybridge");
    c = cpu_avx512();
    assert_string_equal(blas_cpu_best_core(&c), "SkylakeX");
    c.os_avx512 = false; /* ZMM state not enabled by the OS */
    assert_string_equal(blas_cpu_best_core(&c), "Haswell");
    c = cpu_avx512();
    c.avx512vl = c.avx512bw = c.avx512dq = false; /* Knights Landing: F and CD only */
    assert_string_equal(blas_cpu_best_core(&c), "Haswell");
    c = cpu_avx512();
    c.os_avx = c.os_avx512 = false;
    assert_null(blas_cpu_best_core(&c));
}

/* ---- the decision ---------------------------------------------------------- */

static blas_situation situation(blas_cpu cpu, const char *core)
{
    return (blas_situation){.cpu = cpu, .core = core, .dynamic_arch = true};
}

static void test_openblas_generic_is_replaced(void **state)
{
    (void)state;
    blas_situation s = situation(cpu_avx512(), "Prescott");
    blas_decision d;
    blas_decide(&s, &d);
    assert_int_equal(d.action, BLAS_REEXEC);
    assert_string_equal(d.core, "SkylakeX");
    assert_string_equal(d.marker, "auto:Prescott:SkylakeX");
    assert_string_equal(d.message, "");
    assert_false(d.reexecuted);
    s = situation(cpu_avx2(), "Nehalem");
    blas_decide(&s, &d);
    assert_int_equal(d.action, BLAS_REEXEC);
    assert_string_equal(d.core, "Haswell");
    assert_string_equal(d.marker, "auto:Nehalem:Haswell");
    s = situation(cpu_avx(), "Prescott");
    blas_decide(&s, &d);
    assert_int_equal(d.action, BLAS_REEXEC);
    assert_string_equal(d.core, "Sandybridge");
}

/* SELFCHECK first, then KEEP with the given source once the check ran. */
static void expect_check_then_keep(blas_situation s, blas_source source, const char *openblas_choice)
{
    blas_decision d;
    blas_decide(&s, &d);
    assert_int_equal(d.action, BLAS_SELFCHECK);
    s.check = BLAS_CHECK_PASSED;
    blas_decide(&s, &d);
    assert_int_equal(d.action, BLAS_KEEP);
    assert_int_equal(d.source, source);
    assert_string_equal(d.openblas_choice, openblas_choice);
}

static void test_openblas_choice_is_kept(void **state)
{
    (void)state;
    /* OpenBLAS already runs the best kernels */
    expect_check_then_keep(situation(cpu_avx512(), "SkylakeX"), BLAS_SOURCE_OPENBLAS, "SkylakeX");
    /* a non-generic choice is never second-guessed, even below the CPU's best */
    expect_check_then_keep(situation(cpu_avx512(), "Zen"), BLAS_SOURCE_OPENBLAS, "Zen");
    expect_check_then_keep(situation(cpu_avx512(), "Sandybridge"), BLAS_SOURCE_OPENBLAS, "Sandybridge");
    /* generic, and the CPU (or its OS) has nothing better */
    expect_check_then_keep(situation(cpu_sse(), "Prescott"), BLAS_SOURCE_OPENBLAS, "Prescott");
    blas_cpu no_os = cpu_avx2();
    no_os.os_avx = false;
    expect_check_then_keep(situation(no_os, "Nehalem"), BLAS_SOURCE_OPENBLAS, "Nehalem");
    /* a core name patchsweep does not know (another architecture, "Unknown") */
    expect_check_then_keep(situation(cpu_avx512(), "Unknown"), BLAS_SOURCE_OPENBLAS, "Unknown");
    expect_check_then_keep(situation(cpu_avx512(), "ARMV8"), BLAS_SOURCE_OPENBLAS, "ARMV8");
    /* autoselection off */
    blas_situation s = situation(cpu_avx512(), "Prescott");
    s.no_autoselect = true;
    expect_check_then_keep(s, BLAS_SOURCE_OPENBLAS, "Prescott");
    /* a library built for one core ignores OPENBLAS_CORETYPE: no re-execution */
    s = situation(cpu_avx512(), "Prescott");
    s.dynamic_arch = false;
    expect_check_then_keep(s, BLAS_SOURCE_OPENBLAS, "Prescott");
}

static void test_openblas_choice_failing_check_warns(void **state)
{
    (void)state;
    blas_situation s = situation(cpu_avx512(), "SkylakeX");
    s.check = BLAS_CHECK_FAILED;
    snprintf(s.check_detail, sizeof s.check_detail, "sgemm NN 37x29x67: element [0, 0] is 5");
    blas_decision d;
    blas_decide(&s, &d);
    assert_int_equal(d.action, BLAS_KEEP);
    assert_int_equal(d.source, BLAS_SOURCE_OPENBLAS);
    assert_non_null(strstr(d.message, "SkylakeX kernels (openblas) failed the BLAS self-check (sgemm NN 37x29x67"));
}

static void test_user_env_is_kept(void **state)
{
    (void)state;
    /* the user's variable wins over autoselection, whatever it names */
    blas_situation s = situation(cpu_avx512(), "Prescott");
    s.env_coretype = "Prescott";
    expect_check_then_keep(s, BLAS_SOURCE_ENV, "");
    blas_decision d;
    s.check = BLAS_CHECK_PASSED;
    blas_decide(&s, &d);
    assert_false(d.reexecuted);
    assert_string_equal(d.message, "");
    /* case differs: still the same core */
    s.env_coretype = "prescott";
    blas_decide(&s, &d);
    assert_string_equal(d.message, "");
    /* a name OpenBLAS does not know: kept, with a warning naming what runs */
    s = situation(cpu_avx512(), "SkylakeX");
    s.env_coretype = "Bogus";
    s.check = BLAS_CHECK_PASSED;
    blas_decide(&s, &d);
    assert_int_equal(d.action, BLAS_KEEP);
    assert_int_equal(d.source, BLAS_SOURCE_ENV);
    assert_non_null(strstr(d.message, "OPENBLAS_CORETYPE=Bogus, but OpenBLAS runs its SkylakeX kernels (it has no core"));
    s.dynamic_arch = false;
    blas_decide(&s, &d);
    assert_non_null(strstr(d.message, "built for them alone"));
    /* failing kernels the user asked for: kept, with a warning */
    s = situation(cpu_avx2(), "SkylakeX");
    s.env_coretype = "SkylakeX";
    s.check = BLAS_CHECK_FAILED;
    snprintf(s.check_detail, sizeof s.check_detail, "killed by signal 4, Illegal instruction");
    blas_decide(&s, &d);
    assert_int_equal(d.action, BLAS_KEEP);
    assert_int_equal(d.source, BLAS_SOURCE_ENV);
    assert_non_null(strstr(d.message, "killed by signal 4"));
    /* a marker that does not name the variable's core is someone else's: the variable is the user's */
    s = situation(cpu_avx512(), "Haswell");
    s.env_coretype = "Haswell";
    s.env_marker = "auto:Prescott:SkylakeX";
    expect_check_then_keep(s, BLAS_SOURCE_ENV, "");
    s.env_marker = "fallback:Prescott:SkylakeX";
    expect_check_then_keep(s, BLAS_SOURCE_ENV, "");
    s.env_marker = "option:Prescott:Haswell"; /* no --blas-core this time */
    expect_check_then_keep(s, BLAS_SOURCE_ENV, "");
}

static void test_after_autoselect(void **state)
{
    (void)state;
    blas_situation s = situation(cpu_avx512(), "SkylakeX");
    s.env_coretype = "SkylakeX";
    s.env_marker = "auto:Prescott:SkylakeX";
    expect_check_then_keep(s, BLAS_SOURCE_AUTOSELECT, "Prescott");
    blas_decision d;
    s.check = BLAS_CHECK_PASSED;
    blas_decide(&s, &d);
    assert_true(d.reexecuted);
    assert_string_equal(d.message, "");
    /* the check failed: back to OpenBLAS's own choice, once */
    s.check = BLAS_CHECK_FAILED;
    snprintf(s.check_detail, sizeof s.check_detail, "sgemv 301x64: element [3, 0] is nan");
    blas_decide(&s, &d);
    assert_int_equal(d.action, BLAS_REEXEC);
    assert_string_equal(d.core, "Prescott");
    assert_string_equal(d.marker, "fallback:Prescott:SkylakeX");
    assert_non_null(strstr(d.message, "SkylakeX kernels failed the BLAS self-check (sgemv 301x64"));
    assert_non_null(strstr(d.message, "falling back to its generic Prescott"));
    /* OpenBLAS ignored the variable: nothing to check, OpenBLAS's core it is */
    s = situation(cpu_avx512(), "Prescott");
    s.env_coretype = "SkylakeX";
    s.env_marker = "auto:Prescott:SkylakeX";
    blas_decide(&s, &d);
    assert_int_equal(d.action, BLAS_KEEP);
    assert_int_equal(d.source, BLAS_SOURCE_OPENBLAS);
    assert_non_null(strstr(d.message, "although patchsweep set OPENBLAS_CORETYPE=SkylakeX"));
}

static void test_after_fallback(void **state)
{
    (void)state;
    /* generic kernels on an AVX-512 CPU, but this is the fallback: no loop */
    blas_situation s = situation(cpu_avx512(), "Prescott");
    s.env_coretype = "Prescott";
    s.env_marker = "fallback:Prescott:SkylakeX";
    expect_check_then_keep(s, BLAS_SOURCE_FALLBACK, "Prescott");
    blas_decision d;
    s.check = BLAS_CHECK_FAILED; /* even if OpenBLAS's own fails: warn, keep */
    blas_decide(&s, &d);
    assert_int_equal(d.action, BLAS_KEEP);
    assert_int_equal(d.source, BLAS_SOURCE_FALLBACK);
    assert_string_equal(d.rejected, "SkylakeX");
    assert_true(d.reexecuted);
    assert_non_null(strstr(d.message, "failed the BLAS self-check"));
}

static void test_option(void **state)
{
    (void)state;
    blas_decision d;
    /* already running it: no re-execution */
    blas_situation s = situation(cpu_avx512(), "SkylakeX");
    s.opt_core = "skylakex";
    expect_check_then_keep(s, BLAS_SOURCE_OPTION, "SkylakeX");
    /* switch: re-execute, whatever the user's variable says (the option wins) */
    s = situation(cpu_avx512(), "SkylakeX");
    s.opt_core = "Prescott";
    s.env_coretype = "Haswell";
    blas_decide(&s, &d);
    assert_int_equal(d.action, BLAS_REEXEC);
    assert_string_equal(d.core, "Prescott");
    assert_string_equal(d.marker, "option:SkylakeX:Prescott");
    /* ...also over a marker of another stage */
    s.env_coretype = "SkylakeX";
    s.env_marker = "auto:Prescott:SkylakeX";
    blas_decide(&s, &d);
    assert_int_equal(d.action, BLAS_REEXEC);
    assert_string_equal(d.core, "Prescott");
    /* after the re-execution */
    s = situation(cpu_avx512(), "Prescott");
    s.opt_core = "Prescott";
    s.env_coretype = "Prescott";
    s.env_marker = "option:SkylakeX:Prescott";
    expect_check_then_keep(s, BLAS_SOURCE_OPTION, "SkylakeX");
    s.check = BLAS_CHECK_PASSED;
    blas_decide(&s, &d);
    assert_true(d.reexecuted);
    /* a failing check of what the user asked for only warns */
    s.check = BLAS_CHECK_FAILED;
    snprintf(s.check_detail, sizeof s.check_detail, "killed by signal 4, Illegal instruction");
    blas_decide(&s, &d);
    assert_int_equal(d.action, BLAS_KEEP);
    assert_non_null(strstr(d.message, "kept because --blas-core asks for them"));
    /* OpenBLAS did not switch after the re-execution: no such core, refuse */
    s = situation(cpu_avx512(), "SkylakeX");
    s.opt_core = "Bogus";
    s.env_coretype = "Bogus";
    s.env_marker = "option:SkylakeX:Bogus";
    blas_decide(&s, &d);
    assert_int_equal(d.action, BLAS_REFUSE);
    assert_non_null(strstr(d.message, "--blas-core Bogus: OpenBLAS runs its SkylakeX kernels even with"));
    /* a single-core build cannot switch at all */
    s = situation(cpu_avx512(), "Haswell");
    s.opt_core = "Prescott";
    s.dynamic_arch = false;
    blas_decide(&s, &d);
    assert_int_equal(d.action, BLAS_REFUSE);
    assert_non_null(strstr(d.message, "no DYNAMIC_ARCH"));
}

static void test_malformed_markers(void **state)
{
    (void)state;
    static const char *const bad[] = {"", "auto", "auto:Prescott", "auto:Prescott:", "auto::SkylakeX",
                                      "auto:Pres cott:SkylakeX", "auto:Prescott:SkylakeX:x", "bogus:Prescott:SkylakeX",
                                      "AUTO:Prescott:SkylakeX", "auto:Prescott:SkylakeXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        blas_situation s = situation(cpu_avx512(), "SkylakeX");
        s.env_coretype = "SkylakeX";
        s.env_marker = bad[i];
        blas_decision d;
        s.check = BLAS_CHECK_PASSED;
        blas_decide(&s, &d);
        assert_int_equal(d.source, BLAS_SOURCE_ENV);
        assert_false(d.reexecuted);
    }
    /* a stale marker without the variable: as if absent (autoselect may run) */
    blas_situation s = situation(cpu_avx512(), "Prescott");
    s.env_marker = "auto:Prescott:SkylakeX";
    blas_decision d;
    blas_decide(&s, &d);
    assert_int_equal(d.action, BLAS_REEXEC);
    assert_string_equal(d.marker, "auto:Prescott:SkylakeX");
}

/* ---- whole runs, simulated --------------------------------------------------
 * A model of OpenBLAS 0.3.21: OPENBLAS_CORETYPE naming a core it has selects
 * it, anything else leaves its own detection; the self-check fails for the
 * cores in `bad`.  Each step is one process; REEXEC starts the next with the
 * variables set.  Over every combination of inputs: at most two
 * re-executions, never a loop, and the core that runs is the one the rules
 * promise. */

static const char *const lib_cores[] = {"Prescott", "Nehalem", "Sandybridge", "Haswell", "SkylakeX", "Zen"};

static const char *lib_core(const char *env, const char *detected, bool dynamic)
{
    for (size_t i = 0; env && dynamic && i < sizeof lib_cores / sizeof lib_cores[0]; i++)
        if (!strcasecmp(env, lib_cores[i]))
            return lib_cores[i];
    return detected;
}

typedef struct {
    blas_action last;
    char core[BLAS_CORE_MAX];
    blas_source source;
    int reexecs;
} run_result;

static run_result simulate(blas_cpu cpu, const char *detected, bool dynamic, const char *env, const char *opt,
                           bool no_auto, const char *bad)
{
    char env_buf[BLAS_CORE_MAX] = "", marker_buf[128] = "";
    const char *env_now = env, *marker_now = NULL;
    run_result r = {0};
    for (int step = 0; step < 6; step++) {
        blas_situation s = {.cpu = cpu, .dynamic_arch = dynamic, .env_coretype = env_now, .env_marker = marker_now,
                            .opt_core = opt, .no_autoselect = no_auto};
        s.core = lib_core(env_now, detected, dynamic);
        blas_decision d;
        for (blas_decide(&s, &d); d.action == BLAS_SELFCHECK; blas_decide(&s, &d))
            s.check = bad && !strcmp(s.core, bad) ? BLAS_CHECK_FAILED : BLAS_CHECK_PASSED;
        r.last = d.action;
        if (d.action != BLAS_REEXEC) {
            snprintf(r.core, sizeof r.core, "%s", s.core);
            r.source = d.source;
            return r;
        }
        r.reexecs++;
        snprintf(env_buf, sizeof env_buf, "%s", d.core);
        snprintf(marker_buf, sizeof marker_buf, "%s", d.marker);
        env_now = env_buf;
        marker_now = marker_buf;
    }
    fail_msg("no end after 6 processes (detected %s, env %s, opt %s)", detected, env ? env : "-", opt ? opt : "-");
    return r;
}

static void test_simulated_runs(void **state)
{
    (void)state;
    const blas_cpu cpus[] = {cpu_sse(), cpu_avx(), cpu_avx2(), cpu_avx512()};
    const char *const detected[] = {"Prescott", "Nehalem", "Haswell", "SkylakeX", "Unknown"};
    const char *const names[] = {NULL, "Prescott", "Haswell", "SkylakeX", "Bogus"};
    const char *const bads[] = {NULL, "SkylakeX", "Haswell", "Prescott"};
    size_t runs = 0;
    for (size_t c = 0; c < 4; c++)
        for (size_t de = 0; de < 5; de++)
            for (int dyn = 0; dyn < 2; dyn++)
                for (size_t e = 0; e < 5; e++)
                    for (size_t o = 0; o < 5; o++)
                        for (int na = 0; na < 2; na++)
                            for (size_t b = 0; b < 4; b++, runs++) {
                                const char *env = names[e], *opt = names[o], *bad = bads[b];
                                run_result r = simulate(cpus[c], detected[de], dyn, env, opt, na, bad);
                                assert_true(r.reexecs <= 2);
                                const char *own = lib_core(env, detected[de], dyn);
                                if (opt) {
                                    /* the option wins, or is refused when OpenBLAS cannot run it */
                                    if (r.last == BLAS_KEEP)
                                        assert_true(!strcasecmp(r.core, opt));
                                    else
                                        assert_int_equal(r.last, BLAS_REFUSE);
                                    assert_true(r.reexecs <= 1);
                                    if (dyn && strcmp(opt, "Bogus"))
                                        assert_int_equal(r.last, BLAS_KEEP);
                                    continue;
                                }
                                assert_int_equal(r.last, BLAS_KEEP);
                                if (env) {
                                    /* the user's variable: never re-executed, whatever runs */
                                    assert_int_equal(r.reexecs, 0);
                                    assert_string_equal(r.core, own);
                                    continue;
                                }
                                const char *best = blas_cpu_best_core(&cpus[c]);
                                bool upgrade = !na && dyn && best && blas_core_level(own) == BLAS_LEVEL_GENERIC;
                                if (!upgrade) {
                                    assert_int_equal(r.reexecs, 0);
                                    assert_string_equal(r.core, own);
                                } else if (bad && !strcmp(bad, best)) {
                                    /* selected, failed, back to OpenBLAS's own */
                                    assert_int_equal(r.reexecs, 2);
                                    assert_string_equal(r.core, own);
                                    assert_int_equal(r.source, BLAS_SOURCE_FALLBACK);
                                } else {
                                    assert_int_equal(r.reexecs, 1);
                                    assert_string_equal(r.core, best);
                                    assert_int_equal(r.source, BLAS_SOURCE_AUTOSELECT);
                                }
                            }
    assert_int_equal(runs, 4 * 5 * 2 * 5 * 5 * 2 * 4);
}

/* ---- self-check ------------------------------------------------------------ */

static void ok_sgemm(const enum CBLAS_ORDER o, const enum CBLAS_TRANSPOSE ta, const enum CBLAS_TRANSPOSE tb,
                     const blasint m, const blasint n, const blasint k, const float alpha, const float *a,
                     const blasint lda, const float *b, const blasint ldb, const float beta, float *c, const blasint ldc)
{
    cblas_sgemm(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

/* What a kernel with one wrong lane does: one element off. */
static float perturb_by;
static bool perturb_relative;
static void perturbed_sgemm(const enum CBLAS_ORDER o, const enum CBLAS_TRANSPOSE ta, const enum CBLAS_TRANSPOSE tb,
                            const blasint m, const blasint n, const blasint k, const float alpha, const float *a,
                            const blasint lda, const float *b, const blasint ldb, const float beta, float *c,
                            const blasint ldc)
{
    cblas_sgemm(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    float *x = &c[(m / 2) * ldc + n / 2];
    *x = perturb_relative ? *x * (1.0f + perturb_by) : *x + perturb_by;
}

static void nan_sgemv(const enum CBLAS_ORDER o, const enum CBLAS_TRANSPOSE t, const blasint m, const blasint n,
                      const float alpha, const float *a, const blasint lda, const float *x, const blasint incx,
                      const float beta, float *y, const blasint incy)
{
    cblas_sgemv(o, t, m, n, alpha, a, lda, x, incx, beta, y, incy);
    y[3] = NAN;
}

/* Ignores beta: C = A B instead of A B + beta C. */
static void no_beta_sgemm(const enum CBLAS_ORDER o, const enum CBLAS_TRANSPOSE ta, const enum CBLAS_TRANSPOSE tb,
                          const blasint m, const blasint n, const blasint k, const float alpha, const float *a,
                          const blasint lda, const float *b, const blasint ldb, const float beta, float *c,
                          const blasint ldc)
{
    (void)beta;
    cblas_sgemm(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, 0.0f, c, ldc);
}

static void test_selfcheck(void **state)
{
    (void)state;
    double worst = -1.0;
    assert_int_equal(blas_selfcheck(NULL, &worst), PS_OK);
    assert_true(worst >= 0.0 && worst <= 1.0);
    blas_kernels k = {ok_sgemm, cblas_sgemv};
    assert_int_equal(blas_selfcheck(&k, &worst), PS_OK);
    /* one float ulp off: rounding, within tolerance */
    k.sgemm = perturbed_sgemm;
    perturb_relative = true;
    perturb_by = FLT_EPSILON;
    assert_int_equal(blas_selfcheck(&k, &worst), PS_OK);
    /* 1e-3 relative on one element: a wrong kernel */
    perturb_by = 1e-3f;
    assert_int_equal(blas_selfcheck(&k, &worst), PS_ERR_INTERNAL);
    assert_true(worst > 1.0);
    assert_non_null(strstr(err_msg(), "sgemm NN 37x29x67: element [18, 14]"));
    perturb_relative = false;
    perturb_by = 0.5f;
    assert_int_equal(blas_selfcheck(&k, &worst), PS_ERR_INTERNAL);
    k.sgemm = no_beta_sgemm;
    assert_int_equal(blas_selfcheck(&k, &worst), PS_ERR_INTERNAL);
    assert_non_null(strstr(err_msg(), "sgemm NN 5x48x16 beta=1"));
    k = (blas_kernels){ok_sgemm, nan_sgemv};
    assert_int_equal(blas_selfcheck(&k, &worst), PS_ERR_INTERNAL);
    assert_non_null(strstr(err_msg(), "sgemv 301x64: element [3, 0] is nan"));
}

/* ---- threads --------------------------------------------------------------- */

static void test_threads(void **state)
{
    (void)state;
    const char *why;
    blas_threads_in in = {.affinity_cpus = 8, .local_ranks = 1};
    assert_int_equal(blas_threads_choose(&in, &why), 8);
    assert_string_equal(why, "CPUs");
    in.local_ranks = 3; /* ranks sharing the CPUs: never more threads than CPUs in all */
    assert_int_equal(blas_threads_choose(&in, &why), 2);
    assert_string_equal(why, "CPUs / ranks on the node");
    in.local_ranks = 16; /* more ranks than CPUs (or each bound to one): one thread */
    assert_int_equal(blas_threads_choose(&in, NULL), 1);
    in.local_ranks = 0;
    assert_int_equal(blas_threads_choose(&in, NULL), 8);
    in.affinity_cpus = 0; /* unknown */
    assert_int_equal(blas_threads_choose(&in, NULL), 1);
    in = (blas_threads_in){.affinity_cpus = 8, .local_ranks = 2, .slurm_cpus_per_task = "4"};
    assert_int_equal(blas_threads_choose(&in, &why), 4);
    assert_string_equal(why, "SLURM_CPUS_PER_TASK");
    in.slurm_cpus_per_task = "32"; /* more than the rank may run on */
    assert_int_equal(blas_threads_choose(&in, NULL), 8);
    in.slurm_cpus_per_task = "four";
    assert_int_equal(blas_threads_choose(&in, NULL), 4);
    in.env_threads = "3";
    assert_int_equal(blas_threads_choose(&in, &why), 3);
    assert_string_equal(why, "OPENBLAS_NUM_THREADS/OMP_NUM_THREADS");
    static const char *const not_counts[] = {"", "0", "4,2", "-1", "1.5", " 2", "99999999999999999999"};
    for (size_t i = 0; i < sizeof not_counts / sizeof not_counts[0]; i++) {
        in.env_threads = not_counts[i];
        assert_int_equal(blas_threads_choose(&in, NULL), 4);
    }
    in.requested = 6; /* --threads / the job: wins */
    in.env_threads = "3";
    assert_int_equal(blas_threads_choose(&in, &why), 6);
    assert_string_equal(why, "requested");
    assert_true(blas_affinity_cpus() >= 1);
}

/* ---- reports --------------------------------------------------------------- */

static void test_describe(void **state)
{
    (void)state;
    blas_report r = {.version = "0.3.21", .threading = "pthreads", .core = "SkylakeX", .openblas_choice = "Prescott",
                     .source = BLAS_SOURCE_AUTOSELECT, .check = BLAS_CHECK_PASSED, .threads = 1};
    char line[512];
    blas_describe(&r, line, sizeof line);
    assert_string_equal(line, "OpenBLAS 0.3.21 (pthreads), core SkylakeX (selected by patchsweep over OpenBLAS's "
                              "generic Prescott; self-check passed), 1 threads");
    r.source = BLAS_SOURCE_FALLBACK;
    snprintf(r.core, sizeof r.core, "Prescott");
    snprintf(r.rejected, sizeof r.rejected, "SkylakeX");
    blas_describe(&r, line, sizeof line);
    assert_non_null(strstr(line, "core Prescott (OpenBLAS's choice, after SkylakeX failed the self-check"));
    r.source = BLAS_SOURCE_ENV;
    blas_describe(&r, line, sizeof line);
    assert_non_null(strstr(line, "(set by OPENBLAS_CORETYPE; self-check passed)"));
    assert_string_equal(blas_source_name(BLAS_SOURCE_OPTION), "--blas-core");
    assert_string_equal(blas_check_name(BLAS_CHECK_NOT_RUN), "not run");
    blas_report lib = {0};
    blas_report_library(&lib);
    assert_true(lib.version[0] >= '0' && lib.version[0] <= '9');
    assert_true(lib.core[0] != '\0');
    assert_non_null(lib.threading);
}

/* cpuid against the kernel's reading of it. */
static void test_cpu_detect(void **state)
{
    (void)state;
    blas_cpu c;
    blas_cpu_detect(&c);
    FILE *f = fopen("/proc/cpuinfo", "r");
    assert_non_null(f);
    char line[8192], flags[8192] = "", vendor[64] = "";
    unsigned model = 0, family = 0;
    while (fgets(line, sizeof line, f)) {
        if (!flags[0] && !strncmp(line, "flags", 5))
            snprintf(flags, sizeof flags, " %s ", strchr(line, ':') + 1);
        if (!vendor[0] && !strncmp(line, "vendor_id", 9))
            sscanf(strchr(line, ':') + 1, "%63s", vendor);
        if (!model && !strncmp(line, "model\t", 6))
            sscanf(strchr(line, ':') + 1, "%u", &model);
        if (!family && !strncmp(line, "cpu family", 10))
            sscanf(strchr(line, ':') + 1, "%u", &family);
    }
    fclose(f);
    char *nl = strchr(flags, '\n');
    if (nl)
        *nl = ' ';
#define HAS(name) (strstr(flags, " " name " ") != NULL)
    assert_string_equal(c.vendor, vendor);
    assert_int_equal(c.family, family);
    assert_int_equal(c.model, model);
    /* Linux lists a flag only when the CPU has it and the kernel enables it */
    assert_int_equal(c.avx && c.os_avx, HAS("avx"));
    assert_int_equal(c.avx2 && c.os_avx, HAS("avx2"));
    assert_int_equal(c.fma, HAS("fma"));
    assert_int_equal(c.avx512f && c.os_avx512, HAS("avx512f"));
    assert_int_equal(c.avx512vl && c.os_avx512, HAS("avx512vl"));
#undef HAS
    char d[256];
    blas_cpu_describe(&c, d, sizeof d);
    assert_non_null(strstr(d, vendor));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_core_levels),
        cmocka_unit_test(test_best_core),
        cmocka_unit_test(test_openblas_generic_is_replaced),
        cmocka_unit_test(test_openblas_choice_is_kept),
        cmocka_unit_test(test_openblas_choice_failing_check_warns),
        cmocka_unit_test(test_user_env_is_kept),
        cmocka_unit_test(test_after_autoselect),
        cmocka_unit_test(test_after_fallback),
        cmocka_unit_test(test_option),
        cmocka_unit_test(test_malformed_markers),
        cmocka_unit_test(test_simulated_runs),
        cmocka_unit_test(test_selfcheck),
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_describe),
        cmocka_unit_test(test_cpu_detect),
    };
    return cmocka_run_group_tests_name("blas", tests, NULL, NULL);
}
