#include "blas.h"

#include <ctype.h>
#include <float.h>
#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define BLAS_X86 1
#endif

/* ---- CPU ------------------------------------------------------------------- */

#ifdef BLAS_X86
/* XCR0: which register state the OS saves on context switch.  Encoded as
 * bytes because xgetbv needs -mxsave otherwise. */
static uint64_t read_xcr0(void)
{
    uint32_t lo, hi;
    __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

void blas_cpu_detect(blas_cpu *c)
{
    memset(c, 0, sizeof *c);
#ifdef BLAS_X86
    unsigned a, b, cx, d;
    unsigned max = __get_cpuid_max(0, NULL);
    if (max == 0)
        return;
    __cpuid(0, a, b, cx, d);
    memcpy(c->vendor, &b, 4);
    memcpy(c->vendor + 4, &d, 4);
    memcpy(c->vendor + 8, &cx, 4);
    c->vendor[12] = '\0';
    __cpuid(1, a, b, cx, d);
    unsigned family = (a >> 8) & 0xf, model = (a >> 4) & 0xf;
    if (family == 0xf)
        family += (a >> 20) & 0xff;
    if (family == 0x6 || family >= 0xf)
        model |= ((a >> 16) & 0xf) << 4;
    c->family = family;
    c->model = model;
    c->fma = (cx >> 12) & 1;
    c->avx = (cx >> 28) & 1;
    bool osxsave = (cx >> 27) & 1;
    if (max >= 7) {
        __cpuid_count(7, 0, a, b, cx, d);
        c->avx2 = (b >> 5) & 1;
        c->avx512f = (b >> 16) & 1;
        c->avx512dq = (b >> 17) & 1;
        c->avx512cd = (b >> 28) & 1;
        c->avx512bw = (b >> 30) & 1;
        c->avx512vl = (b >> 31) & 1;
        c->amx_tile = (d >> 24) & 1;
    }
    if (osxsave) {
        uint64_t xcr0 = read_xcr0();
        c->os_avx = (xcr0 & 0x6) == 0x6;
        c->os_avx512 = c->os_avx && (xcr0 & 0xe0) == 0xe0;
    }
#endif
}

static bool has_avx512_skx(const blas_cpu *c)
{
    return c->avx512f && c->avx512cd && c->avx512bw && c->avx512dq && c->avx512vl;
}

void blas_cpu_describe(const blas_cpu *c, char *buf, size_t n)
{
    if (!c->vendor[0]) {
        snprintf(buf, n, "not x86");
        return;
    }
    char f[64] = "";
    const char *const names[] = {"avx", "avx2", "fma", has_avx512_skx(c) ? "avx512" : "avx512f", "amx"};
    const bool on[] = {c->avx, c->avx2, c->fma, c->avx512f, c->amx_tile};
    for (size_t i = 0; i < sizeof on / sizeof on[0]; i++)
        if (on[i])
            snprintf(f + strlen(f), sizeof f - strlen(f), "%s%s", f[0] ? " " : "", names[i]);
    snprintf(buf, n, "%s family %u model %u: %s (OS saves %s)", c->vendor, c->family, c->model,
             f[0] ? f : "no avx", c->os_avx512 ? "ymm zmm" : c->os_avx ? "ymm" : "no ymm/zmm");
}

/* ---- cores ----------------------------------------------------------------- */

static const struct {
    const char *name;
    blas_level level;
} core_levels[] = {
    {"Katmai", BLAS_LEVEL_GENERIC},      {"Coppermine", BLAS_LEVEL_GENERIC},   {"Northwood", BLAS_LEVEL_GENERIC},
    {"Prescott", BLAS_LEVEL_GENERIC},    {"Banias", BLAS_LEVEL_GENERIC},       {"Atom", BLAS_LEVEL_GENERIC},
    {"Core2", BLAS_LEVEL_GENERIC},       {"Penryn", BLAS_LEVEL_GENERIC},       {"Dunnington", BLAS_LEVEL_GENERIC},
    {"Nehalem", BLAS_LEVEL_GENERIC},     {"Athlon", BLAS_LEVEL_GENERIC},       {"Opteron", BLAS_LEVEL_GENERIC},
    {"Opteron_SSE3", BLAS_LEVEL_GENERIC}, {"Barcelona", BLAS_LEVEL_GENERIC},   {"Nano", BLAS_LEVEL_GENERIC},
    {"Bobcat", BLAS_LEVEL_GENERIC},      {"Sandybridge", BLAS_LEVEL_AVX},      {"Bulldozer", BLAS_LEVEL_AVX},
    {"Piledriver", BLAS_LEVEL_AVX},      {"Steamroller", BLAS_LEVEL_AVX},      {"Excavator", BLAS_LEVEL_AVX},
    {"Haswell", BLAS_LEVEL_AVX2},        {"Zen", BLAS_LEVEL_AVX2},             {"SkylakeX", BLAS_LEVEL_AVX512},
    {"Cooperlake", BLAS_LEVEL_AVX512},   {"SapphireRapids", BLAS_LEVEL_AVX512},
};

blas_level blas_core_level(const char *core)
{
    for (size_t i = 0; core && i < sizeof core_levels / sizeof core_levels[0]; i++)
        if (!strcasecmp(core, core_levels[i].name))
            return core_levels[i].level;
    return BLAS_LEVEL_UNKNOWN;
}

const char *blas_cpu_best_core(const blas_cpu *c)
{
    if (!c->os_avx || !c->avx)
        return NULL;
    if (c->avx2 && c->fma && has_avx512_skx(c) && c->os_avx512)
        return "SkylakeX";
    if (c->avx2 && c->fma)
        return "Haswell";
    return "Sandybridge";
}

const char *blas_source_name(blas_source s)
{
    switch (s) {
    case BLAS_SOURCE_OPENBLAS: return "openblas";
    case BLAS_SOURCE_ENV: return BLAS_ENV_CORETYPE;
    case BLAS_SOURCE_OPTION: return "--blas-core";
    case BLAS_SOURCE_AUTOSELECT: return "autoselect";
    case BLAS_SOURCE_FALLBACK: return "fallback";
    }
    return "?";
}

const char *blas_check_name(blas_check c)
{
    return c == BLAS_CHECK_PASSED ? "passed" : c == BLAS_CHECK_FAILED ? "failed" : "not run";
}

/* ---- the decision ---------------------------------------------------------- */

typedef enum { STAGE_AUTO, STAGE_OPTION, STAGE_FALLBACK } stage;
static const char *const stage_names[] = {"auto", "option", "fallback"};

typedef struct {
    stage st;
    char from[BLAS_CORE_MAX], to[BLAS_CORE_MAX];
} marker;

static bool core_name_ok(const char *s, size_t n)
{
    if (n == 0 || n >= BLAS_CORE_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && s[i] != '_')
            return false;
    return true;
}

/* "STAGE:FROM:TO" */
static bool parse_marker(const char *s, marker *m)
{
    if (!s)
        return false;
    const char *c1 = strchr(s, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
    if (!c2 || strchr(c2 + 1, ':'))
        return false;
    size_t ns = (size_t)(c1 - s), nf = (size_t)(c2 - c1 - 1), nt = strlen(c2 + 1);
    bool found = false;
    for (int i = 0; i < 3 && !found; i++)
        if (strlen(stage_names[i]) == ns && !strncmp(s, stage_names[i], ns)) {
            m->st = (stage)i;
            found = true;
        }
    if (!found || !core_name_ok(c1 + 1, nf) || !core_name_ok(c2 + 1, nt))
        return false;
    memcpy(m->from, c1 + 1, nf);
    m->from[nf] = '\0';
    memcpy(m->to, c2 + 1, nt + 1);
    return true;
}

static bool same(const char *a, const char *b) { return a && b && !strcasecmp(a, b); }

/* A marker speaks for OPENBLAS_CORETYPE only while the variable holds the
 * core it set; --blas-core's, only while the option names that core. */
static bool marker_valid(const marker *m, const blas_situation *s)
{
    switch (m->st) {
    case STAGE_AUTO: return same(s->env_coretype, m->to);
    case STAGE_OPTION: return same(s->env_coretype, m->to) && same(s->opt_core, m->to);
    case STAGE_FALLBACK: return same(s->env_coretype, m->from);
    }
    return false;
}

static void copy_core(char *dst, const char *src) { snprintf(dst, BLAS_CORE_MAX, "%s", src ? src : ""); }

static void reexec(blas_decision *d, stage st, const char *from, const char *to, const char *core_to_set)
{
    d->action = BLAS_REEXEC;
    copy_core(d->core, core_to_set);
    snprintf(d->marker, sizeof d->marker, "%s:%s:%s", stage_names[st], from, to);
}

/* The decision table (s->check starts NOT_RUN; SELFCHECK asks the caller to
 * run the check and call again):
 *
 *   --blas-core X:  OpenBLAS runs X: self-check, keep (a failure only warns:
 *                   the user's choice wins);  we already re-executed for X
 *                   (valid "option" marker) and it still does not: refuse
 *                   (it has no such core);  not DYNAMIC_ARCH: refuse;
 *                   else re-execute with X.
 *   valid "auto" marker:   self-check; passed: keep (autoselect); failed:
 *                   re-execute with OpenBLAS's own FROM ("fallback", warns).
 *   valid "fallback" marker: self-check (warns only), keep (fallback).
 *   the user's OPENBLAS_CORETYPE: self-check (warns only), keep.
 *   otherwise (OpenBLAS's own choice): when autoselection is on, the library
 *                   is DYNAMIC_ARCH, OpenBLAS's core is generic (SSE level)
 *                   and the CPU and OS support a better one: re-execute with
 *                   it ("auto"); else self-check (warns only), keep.
 */
void blas_decide(const blas_situation *s, blas_decision *d)
{
    memset(d, 0, sizeof *d);
    const char *core = s->core ? s->core : "Unknown";
    marker m;
    const bool mv = parse_marker(s->env_marker, &m) && marker_valid(&m, s);
    d->reexecuted = mv;
    if (mv)
        copy_core(d->openblas_choice, m.from);
    else if (!s->env_coretype)
        copy_core(d->openblas_choice, core);
    const bool need_check = s->check == BLAS_CHECK_NOT_RUN;
    const bool failed = s->check == BLAS_CHECK_FAILED;
    d->action = need_check ? BLAS_SELFCHECK : BLAS_KEEP;

    if (s->opt_core) {
        d->source = BLAS_SOURCE_OPTION;
        if (same(core, s->opt_core)) {
            if (failed)
                snprintf(d->message, sizeof d->message,
                         "warning: OpenBLAS's %s kernels (--blas-core) failed the BLAS self-check (%s): they may "
                         "crash or compute wrong numbers here; kept because --blas-core asks for them",
                         core, s->check_detail);
        } else if (mv && m.st == STAGE_OPTION) {
            d->action = BLAS_REFUSE;
            snprintf(d->message, sizeof d->message,
                     "--blas-core %s: OpenBLAS runs its %s kernels even with " BLAS_ENV_CORETYPE
                     "=%s: it has no core of that name",
                     s->opt_core, core, s->opt_core);
        } else if (!s->dynamic_arch) {
            d->action = BLAS_REFUSE;
            snprintf(d->message, sizeof d->message,
                     "--blas-core %s: this OpenBLAS is built for its %s kernels alone (no DYNAMIC_ARCH)",
                     s->opt_core, core);
        } else {
            reexec(d, STAGE_OPTION, core, s->opt_core, s->opt_core);
        }
        return;
    }
    if (mv && m.st == STAGE_AUTO) {
        d->source = BLAS_SOURCE_AUTOSELECT;
        if (!same(core, m.to)) {
            /* the library ignored the variable: nothing was switched */
            d->action = BLAS_KEEP;
            d->source = BLAS_SOURCE_OPENBLAS;
            snprintf(d->message, sizeof d->message,
                     "warning: OpenBLAS runs its %s kernels although patchsweep set " BLAS_ENV_CORETYPE "=%s",
                     core, m.to);
        } else if (failed) {
            reexec(d, STAGE_FALLBACK, m.from, m.to, m.from);
            snprintf(d->message, sizeof d->message,
                     "warning: OpenBLAS's %s kernels failed the BLAS self-check (%s): falling back to its generic %s "
                     "kernels (slower, correct)",
                     m.to, s->check_detail, m.from);
        }
        return;
    }
    if (mv && m.st == STAGE_FALLBACK) {
        d->source = BLAS_SOURCE_FALLBACK;
        copy_core(d->rejected, m.to);
    } else if (s->env_coretype) {
        d->source = BLAS_SOURCE_ENV;
        if (!same(core, s->env_coretype))
            snprintf(d->message, sizeof d->message,
                     "warning: " BLAS_ENV_CORETYPE "=%s, but OpenBLAS runs its %s kernels (%s)", s->env_coretype, core,
                     s->dynamic_arch ? "it has no core of that name" : "it is built for them alone");
    } else {
        d->source = BLAS_SOURCE_OPENBLAS;
        const char *best = blas_cpu_best_core(&s->cpu);
        if (!s->no_autoselect && s->dynamic_arch && best && blas_core_level(core) == BLAS_LEVEL_GENERIC &&
            blas_core_level(best) > BLAS_LEVEL_GENERIC) {
            reexec(d, STAGE_AUTO, core, best, best);
            return;
        }
    }
    if (failed && !d->message[0])
        snprintf(d->message, sizeof d->message,
                 "warning: OpenBLAS's %s kernels (%s) failed the BLAS self-check (%s): they may crash or compute wrong numbers here", core,
                 blas_source_name(d->source), s->check_detail);
}

/* ---- self-check ------------------------------------------------------------ */

/* Deterministic values in [-1, 1) (an LCG: no libc rand state touched). */
static void fill(float *x, size_t n, uint32_t seed)
{
    uint32_t s = seed * 2654435761u + 1u;
    for (size_t i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        x[i] = (float)((double)(s >> 8) / (double)(1u << 24) * 2.0 - 1.0);
    }
}

typedef struct {
    const char *what;
    bool trans_b; /* sgemm NT (B stored [n, k]) */
    bool gemv;    /* y[m] = A[m, k] x[k] */
    size_t m, n, k, ldb_pad;
    float beta;
} check_case;

/* The shapes patchsweep's calls take: forward.c's linear layers (NN, beta 0
 * or 1, W with a leading dimension wider than its columns), the unembedding
 * (NT) and the logit rows (gemv); small, odd and several-block sizes
 * (kernels have separate edge and small-matrix paths). */
static const check_case cases[] = {
    {"sgemm NN 37x29x67", false, false, 37, 29, 67, 0, 0.0f},
    {"sgemm NN 5x48x16 beta=1 ldb=53", false, false, 5, 48, 16, 5, 1.0f},
    {"sgemm NN 64x80x128", false, false, 64, 80, 128, 0, 0.0f},
    {"sgemm NT 19x131x72", true, false, 19, 131, 72, 0, 0.0f},
    {"sgemm NT 1x7x3", true, false, 1, 7, 3, 0, 0.0f},
    {"sgemv 301x64", false, true, 301, 1, 64, 0, 0.0f},
};

static ps_status run_case(const blas_kernels *kr, const check_case *cc, double *worst)
{
    const size_t m = cc->m, n = cc->n, k = cc->k, ldb = cc->trans_b ? k : n + cc->ldb_pad;
    const size_t b_elems = cc->trans_b ? n * k : k * ldb;
    float *a = malloc(m * k * sizeof *a), *b = malloc(b_elems * sizeof *b), *c = malloc(m * n * sizeof *c),
          *c0 = malloc(m * n * sizeof *c0);
    if (!a || !b || !c || !c0) {
        free(a), free(b), free(c), free(c0);
        return err_set(PS_ERR_NOMEM, "out of memory");
    }
    fill(a, m * k, (uint32_t)(m * 31 + k));
    fill(b, b_elems, (uint32_t)(n * 17 + k));
    fill(c0, m * n, (uint32_t)(m + n));
    memcpy(c, c0, m * n * sizeof *c);
    if (cc->gemv)
        kr->sgemv(CblasRowMajor, CblasNoTrans, (blasint)m, (blasint)k, 1.0f, a, (blasint)k, b, 1, cc->beta, c, 1);
    else
        kr->sgemm(CblasRowMajor, CblasNoTrans, cc->trans_b ? CblasTrans : CblasNoTrans, (blasint)m, (blasint)n,
                  (blasint)k, 1.0f, a, (blasint)k, b, (blasint)ldb, cc->beta, c, (blasint)n);
    ps_status st = PS_OK;
    double w = 0.0;
    for (size_t i = 0; i < m && st == PS_OK; i++)
        for (size_t j = 0; j < n; j++) {
            double ref = (double)cc->beta * c0[i * n + j], mag = fabs(ref);
            for (size_t l = 0; l < k; l++) {
                double bv = cc->gemv ? b[l] : cc->trans_b ? b[j * k + l] : b[l * ldb + j];
                ref += (double)a[i * k + l] * bv;
                mag += fabs((double)a[i * k + l] * bv);
            }
            /* rounding of a float sum of k + 1 terms, any order: <= (k + 1) u mag, u = eps / 2;
             * twice that, and one float ulp of the magnitude for the beta term */
            double bound = 2.0 * (double)(k + 1) * FLT_EPSILON * mag + FLT_MIN;
            double e = fabs((double)c[i * n + j] - ref) / bound;
            if (!(e <= 1.0)) { /* also NaN */
                st = err_set(PS_ERR_INTERNAL, "%s: element [%zu, %zu] is %g, reference %g (error %.3g x the bound)",
                             cc->what, i, j, (double)c[i * n + j], ref, e);
                w = isnan(e) ? INFINITY : e;
                break;
            }
            if (e > w)
                w = e;
        }
    if (w > *worst)
        *worst = w;
    free(a), free(b), free(c), free(c0);
    return st;
}

ps_status blas_selfcheck(const blas_kernels *k, double *worst)
{
    const blas_kernels openblas = {cblas_sgemm, cblas_sgemv};
    if (!k)
        k = &openblas;
    *worst = 0.0;
    ps_status st = PS_OK;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0] && st == PS_OK; i++)
        st = run_case(k, &cases[i], worst);
    return st;
}

/* ---- threads --------------------------------------------------------------- */

static bool parse_count(const char *s, size_t *out)
{
    if (!s || !*s)
        return false;
    size_t v = 0;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9' || v > 100000)
            return false;
        v = v * 10 + (size_t)(*p - '0');
    }
    if (v == 0)
        return false;
    *out = v;
    return true;
}

size_t blas_threads_choose(const blas_threads_in *in, const char **why)
{
    const char *w;
    size_t n;
    const size_t cpus = in->affinity_cpus ? in->affinity_cpus : 1;
    if (in->requested) {
        n = in->requested;
        w = "requested";
    } else if (parse_count(in->env_threads, &n)) {
        w = "OPENBLAS_NUM_THREADS/OMP_NUM_THREADS";
    } else if (parse_count(in->slurm_cpus_per_task, &n)) {
        if (n > cpus)
            n = cpus;
        w = "SLURM_CPUS_PER_TASK";
    } else {
        const size_t ranks = in->local_ranks > 1 ? in->local_ranks : 1;
        n = cpus / ranks;
        if (n == 0)
            n = 1;
        w = ranks > 1 ? "CPUs / ranks on the node" : "CPUs";
    }
    if (why)
        *why = w;
    return n;
}

size_t blas_affinity_cpus(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
        return (size_t)CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (size_t)n : 1;
}

/* ---- report ---------------------------------------------------------------- */

void blas_report_library(blas_report *r)
{
    /* "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH ...": the second word */
    const char *cfg = openblas_get_config();
    const char *v = cfg ? strchr(cfg, ' ') : NULL;
    snprintf(r->version, sizeof r->version, "%.*s", v ? (int)strcspn(v + 1, " ") : 1, v ? v + 1 : "?");
    int par = openblas_get_parallel();
    r->threading = par == 1 ? "pthreads" : par == 2 ? "OpenMP" : "sequential";
    copy_core(r->core, openblas_get_corename());
}

void blas_describe(const blas_report *r, char *buf, size_t n)
{
    char why[160];
    switch (r->source) {
    case BLAS_SOURCE_AUTOSELECT:
        snprintf(why, sizeof why, "selected by patchsweep over OpenBLAS's generic %s", r->openblas_choice);
        break;
    case BLAS_SOURCE_FALLBACK:
        snprintf(why, sizeof why, "OpenBLAS's choice, after %s failed the self-check", r->rejected);
        break;
    case BLAS_SOURCE_ENV: snprintf(why, sizeof why, "set by " BLAS_ENV_CORETYPE); break;
    case BLAS_SOURCE_OPTION: snprintf(why, sizeof why, "set by --blas-core"); break;
    default: snprintf(why, sizeof why, "OpenBLAS's choice"); break;
    }
    snprintf(buf, n, "OpenBLAS %s (%s), core %s (%s; self-check %s), %zu threads", r->version, r->threading, r->core,
             why, blas_check_name(r->check), r->threads);
}
