/*
 * Unit tests for job.c: a full job, the defaults of a minimal one, relative
 * paths, what the INI syntax accepts (as Debian's inih reads it), every
 * error with its "PATH:LINE" prefix, and random mutations of a valid file
 * (job_parse is the fuzzing entry point; this runs under ASan/UBSan too).
 */
#include <ftw.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "job.h"
#include "sha256.h"

static char tmpdir[] = "/tmp/test_job_XXXXXX";

static int group_setup(void **state)
{
    (void)state;
    if (!mkdtemp(tmpdir)) {
        perror("test_job: mkdtemp");
        return -1;
    }
    return 0;
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

static int group_teardown(void **state)
{
    (void)state;
    return nftw(tmpdir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* Write len bytes of text to tmpdir/name (name may hold one subdirectory);
 * returns the malloc'd path. */
static char *write_job(const char *name, const char *text, size_t len)
{
    char path[512];
    const char *slash = strchr(name, '/');
    if (slash) {
        snprintf(path, sizeof path, "%s/%.*s", tmpdir, (int)(slash - name), name);
        mkdir(path, 0700);
    }
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(text, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
    return strdup(path);
}

static char *path_in(const char *name)
{
    char buf[512];
    snprintf(buf, sizeof buf, "%s/%s", tmpdir, name);
    return strdup(buf);
}

static void assert_zeroed(const job *j)
{
    static const job zero;
    assert_memory_equal(j, &zero, sizeof zero);
}

/* Load `text` from a file and expect status `want` with the message
 * "PATH:LINE: fragment..." (line 0: "PATH: fragment..."). */
static void expect_error_bytes(const char *text, size_t len, ps_status want, size_t line, const char *fragment)
{
    char *path = write_job("error.ini", text, len);
    job j;
    ps_status st = job_load(&j, path);
    char expected[1024];
    if (line)
        snprintf(expected, sizeof expected, "%s:%zu: %s", path, line, fragment);
    else
        snprintf(expected, sizeof expected, "%s: %s", path, fragment);
    if (st != want || strncmp(err_msg(), expected, strlen(expected)) != 0)
        fail_msg("status %d (want %d)\n  message:  %s\n  expected: %s...", (int)st, (int)want, err_msg(), expected);
    assert_null(strchr(err_msg(), '\n'));
    assert_zeroed(&j);
    free(path);
}

static void expect_error(const char *text, ps_status want, size_t line, const char *fragment)
{
    expect_error_bytes(text, strlen(text), want, line, fragment);
}

#define MINIMAL "[model]\ndir = m\n[data]\ndataset = d.jsonl\n[run]\noutput = o.nc\n"

/* ---- valid files ------------------------------------------------------------ */

static void test_full_job(void **state)
{
    (void)state;
    const char *text =
        "; every key, with comments of both kinds\n"
        "# and blank lines\n"
        "\n"
        "[model]\n"
        "dir = model\n"
        "tokenizer = /opt/gpt2-tokenizer\n"
        "[data]\n"
        "dataset = data/ioi.jsonl ; the IOI set\n"
        "bos = false\n"
        "skip_invalid = yes\n"
        "max_prompts = 500\n"
        "[patch]\n"
        "components = block_every , z\n"
        "metric = kl\n"
        "direction = noise\n"
        "engine = naive\n"
        "[run]\n"
        "output = results/ioi.nc\n"
        "chunk_prompts = 64\n"
        "threads = 4\n"
        "work_mib = 96\n"
        "progress_seconds = 2.5\n"
        "[lens]\n"
        "enabled = true\n"
        "top_k = 5\n"
        "output = results/lens.nc\n";
    char *path = write_job("full.ini", text, strlen(text));
    job j;
    assert_int_equal(job_load(&j, path), PS_OK);

    assert_string_equal(j.path, path);
    assert_string_equal(j.text, text);
    char hex[65];
    sha256_hex(text, strlen(text), hex);
    assert_string_equal(j.sha256, hex);

    char *want = path_in("model");
    assert_string_equal(j.model_dir, want);
    free(want);
    assert_string_equal(j.tokenizer_dir, "/opt/gpt2-tokenizer");
    want = path_in("data/ioi.jsonl");
    assert_string_equal(j.dataset, want);
    free(want);
    assert_false(j.bos);
    assert_true(j.skip_invalid);
    assert_int_equal(j.max_prompts, 500);

    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        bool on = c == PATCH_RESID_PRE || c == PATCH_ATTN_OUT || c == PATCH_MLP_OUT || c == PATCH_Z;
        assert_int_equal(j.components[c], on);
    }
    assert_int_equal(j.metric, PATCH_KL);
    assert_int_equal(j.direction, PATCH_NOISE);
    assert_int_equal(j.engine, PATCH_ENGINE_NAIVE);

    want = path_in("results/ioi.nc");
    assert_string_equal(j.output, want);
    free(want);
    assert_int_equal(j.chunk_prompts, 64);
    assert_int_equal(j.threads, 4);
    assert_int_equal(j.work_mib, 96);
    assert_true(j.progress_seconds == 2.5);

    assert_true(j.lens);
    assert_int_equal(j.lens_top_k, 5);
    want = path_in("results/lens.nc");
    assert_string_equal(j.lens_output, want);
    free(want);

    job_free(&j);
    assert_zeroed(&j);
    job_free(&j);
    free(path);
}

static void test_minimal_defaults(void **state)
{
    (void)state;
    char *path = write_job("minimal.ini", MINIMAL, strlen(MINIMAL));
    job j;
    assert_int_equal(job_load(&j, path), PS_OK);
    assert_null(j.tokenizer_dir);
    assert_true(j.bos);
    assert_false(j.skip_invalid);
    assert_int_equal(j.max_prompts, 0);
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        assert_int_equal(j.components[c], c == PATCH_RESID_PRE);
    assert_int_equal(j.metric, PATCH_LOGIT_DIFF);
    assert_int_equal(j.metrics.n, 1);
    assert_int_equal(j.metrics.m[0], PATCH_LOGIT_DIFF);
    assert_int_equal(j.direction, PATCH_DENOISE);
    assert_int_equal(j.engine, PATCH_ENGINE_FAST);
    assert_int_equal(j.chunk_prompts, 0);
    assert_int_equal(j.threads, 0);
    assert_int_equal(j.work_mib, 0);
    assert_true(j.progress_seconds == 10.0);
    assert_false(j.lens);
    assert_int_equal(j.lens_top_k, 10);
    assert_null(j.lens_output);
    job_free(&j);
    free(path);
}

static void test_relative_paths(void **state)
{
    (void)state;
    const char *text = "[model]\ndir = model\ntokenizer = ../tok\n[data]\ndataset = ../data/x.jsonl\n"
                       "[run]\noutput = /abs/out.nc\n[lens]\noutput = lens/l.nc\n";
    char *path = write_job("sub/job.ini", text, strlen(text));
    job j;
    assert_int_equal(job_load(&j, path), PS_OK);
    char *want = path_in("sub/model");
    assert_string_equal(j.model_dir, want);
    free(want);
    want = path_in("sub/../tok");
    assert_string_equal(j.tokenizer_dir, want);
    free(want);
    want = path_in("sub/../data/x.jsonl");
    assert_string_equal(j.dataset, want);
    free(want);
    assert_string_equal(j.output, "/abs/out.nc");
    want = path_in("sub/lens/l.nc");
    assert_string_equal(j.lens_output, want);
    free(want);
    assert_false(j.lens); /* an output alone does not enable the lens */
    job_free(&j);
    free(path);

    /* A job path without a directory: relative to the current directory. */
    assert_int_equal(job_parse(&j, "job.ini", MINIMAL), PS_OK);
    assert_string_equal(j.model_dir, "./m");
    assert_string_equal(j.output, "./o.nc");
    job_free(&j);
    assert_int_equal(job_parse(&j, "/job.ini", MINIMAL), PS_OK);
    assert_string_equal(j.dataset, "/d.jsonl");
    job_free(&j);
}

/* What Debian's inih accepts, as documented in job.h. */
static void test_syntax_accepted(void **state)
{
    (void)state;
    const char *text = "\xEF\xBB\xBF; byte order mark first\r\n"
                       "[model] ; a comment after a header\r\n"
                       "  dir: model dir\r\n"
                       "   \r\n"
                       "[data]\n"
                       "dataset = a;b.jsonl\n"
                       "bos = TRUE\n"
                       "skip_invalid = No\n"
                       "[run]\n"
                       "output=o;x.nc\t;\tnot part of the value\n"
                       "[data]\n"
                       "max_prompts = 007\n";
    job j;
    assert_int_equal(job_parse(&j, "t/job.ini", text), PS_OK);
    assert_string_equal(j.model_dir, "t/model dir");
    assert_string_equal(j.dataset, "t/a;b.jsonl");
    assert_true(j.bos);
    assert_false(j.skip_invalid);
    assert_string_equal(j.output, "t/o;x.nc");
    assert_int_equal(j.max_prompts, 7);
    assert_string_equal(j.text, text);
    job_free(&j);

    assert_int_equal(job_parse(&j, "t/job.ini", MINIMAL "[lens]\nenabled = 1\noutput = l.nc\ntop_k = 1000\n"), PS_OK);
    assert_true(j.lens);
    assert_int_equal(j.lens_top_k, 1000);
    job_free(&j);

    assert_int_equal(job_parse(&j, "j", MINIMAL "chunk_prompts = 100000\nthreads = 1024\nwork_mib = 1048576\nprogress_seconds = .5e1\n"
                                        "[data]\nmax_prompts = 18446744073709551615\n"),
                     PS_OK);
    assert_int_equal(j.chunk_prompts, 100000);
    assert_int_equal(j.threads, 1024);
    assert_int_equal(j.work_mib, 1048576);
    assert_true(j.progress_seconds == 5.0);
    assert_true(j.max_prompts == SIZE_MAX);
    job_free(&j);
}

/* ---- errors, each with its line --------------------------------------------- */

static void test_unknown_section(void **state)
{
    (void)state;
    expect_error(MINIMAL "[lense]\nenabled = true\n", PS_ERR_INVALID, 7, "unknown section [lense]");
    /* reported even when the section has no keys */
    expect_error("[model]\ndir = m\n[extra]\n", PS_ERR_INVALID, 3, "unknown section [extra]");
    expect_error("[Model]\ndir = m\n", PS_ERR_INVALID, 1, "unknown section [Model]");
    expect_error("[ model ]\ndir = m\n", PS_ERR_INVALID, 1, "unknown section [ model ]");
}

/* attribution patching estimates a clean/corrupted swap of one metric */
static void test_method_limits(void **state)
{
    (void)state;
    expect_error(MINIMAL "[patch]\nmethod = atp\nsource = zero\n", PS_ERR_INVALID, 8,
                 "[patch] method = atp takes source = clean or corrupted, not zero");
    expect_error(MINIMAL "[patch]\nmetric = logit_diff, kl\nmethod = atp*\n", PS_ERR_INVALID, 9,
                 "[patch] method = atp* takes one metric (metric lists 2)");
}

/* [patch] method = atp+exact | atp+verify, graddrop, verify_top_k, verify_threshold (issue 20) */
static void test_atp_keys(void **state)
{
    (void)state;
    job j;
    assert_int_equal(job_parse(&j, "j", MINIMAL), PS_OK);
    assert_true(j.method == PATCH_METHOD_EXACT && !j.graddrop && j.verify_top_k == PATCH_VERIFY_TOP_K);
    job_free(&j);
    assert_int_equal(job_parse(&j, "j", MINIMAL "[patch]\nmethod = atp*+exact\ngraddrop = yes\n"), PS_OK);
    assert_true(j.method == PATCH_METHOD_ATP_STAR_EXACT && j.graddrop);
    job_free(&j);
    assert_int_equal(job_parse(&j, "j", MINIMAL "[patch]\nmethod = atp+exact\n"), PS_OK);
    assert_true(j.method == PATCH_METHOD_ATP_EXACT && !j.graddrop);
    job_free(&j);
    assert_int_equal(job_parse(&j, "j", MINIMAL "[patch]\nmethod = atp+verify\nverify_top_k = 3\n"), PS_OK);
    assert_true(j.method == PATCH_METHOD_ATP_VERIFY && j.verify_top_k == 3);
    job_free(&j);
    assert_int_equal(job_parse(&j, "j", MINIMAL "[patch]\nmethod = atp*+verify\n"), PS_OK);
    assert_true(j.method == PATCH_METHOD_ATP_STAR_VERIFY && j.verify_top_k == 10);
    job_free(&j);
    expect_error(MINIMAL "[patch]\nmethod = atp+exakt\n", PS_ERR_INVALID, 8,
                 "[patch] method: unknown method 'atp+exakt' (exact, atp, atp*, atp+exact, atp*+exact, atp+verify or "
                 "atp*+verify)");
    expect_error(MINIMAL "[patch]\ngraddrop = true\n", PS_ERR_INVALID, 8,
                 "[patch] graddrop = true needs an attribution method");
    expect_error(MINIMAL "[patch]\ngraddrop = maybe\n", PS_ERR_INVALID, 8, "[patch] graddrop:");
    expect_error(MINIMAL "[patch]\nmethod = atp+exact\nverify_top_k = 5\n", PS_ERR_INVALID, 9,
                 "[patch] verify_top_k applies to method = atp+verify or atp*+verify only");
    expect_error(MINIMAL "[patch]\nmethod = atp+verify\nverify_top_k = 0\n", PS_ERR_INVALID, 9,
                 "[patch] verify_top_k:");
    expect_error(MINIMAL "[patch]\nmethod = atp+verify\nverify_threshold = 0.1\n", PS_ERR_INVALID, 9,
                 "[patch] verify_threshold: verify_threshold is not implemented (use verify_top_k");
    expect_error(MINIMAL "[patch]\nmethod = atp+exact\nsource = zero\n", PS_ERR_INVALID, 8,
                 "[patch] method = atp+exact takes source = clean or corrupted, not zero");
    expect_error(MINIMAL "[patch]\nmetric = logit_diff, prob\nmethod = atp+verify\n", PS_ERR_INVALID, 9,
                 "[patch] method = atp+verify takes one metric (metric lists 2)");
    expect_error(MINIMAL "[patch]\nmethod = atp*+exact\n[run]\ndistribute = cells\n", PS_ERR_INVALID, 10,
                 "[run] distribute = cells needs [patch] method = exact");
}

static void test_unknown_key(void **state)
{
    (void)state;
    expect_error(MINIMAL "[patch]\nmetrics = kl\n", PS_ERR_INVALID, 8,
                 "unknown key 'metrics' in [patch] (components, metric, direction, engine, method, source, "
                 "mean_over, resample_seed, graddrop, verify_top_k, verify_threshold)");
    expect_error("[model]\nDir = m\n", PS_ERR_INVALID, 2, "unknown key 'Dir' in [model] (dir, tokenizer, compute)");
    expect_error("dir = m\n[model]\n", PS_ERR_FORMAT, 1, "key 'dir' before any [section]");
}

/* [model] compute: f32 by default, bf16 parsed, another value refused
 * naming the key */
static void test_compute_key(void **state)
{
    (void)state;
    job j;
    assert_int_equal(job_parse(&j, "j", MINIMAL), PS_OK);
    assert_int_equal(j.compute, MODEL_COMPUTE_F32);
    job_free(&j);
    assert_int_equal(job_parse(&j, "j", "[model]\ncompute = bf16\ndir = m\n[data]\ndataset = d.jsonl\n[run]\noutput = o.nc\n"),
                     PS_OK);
    assert_int_equal(j.compute, MODEL_COMPUTE_BF16);
    job_free(&j);
    expect_error("[model]\ncompute = fp16\n", PS_ERR_INVALID, 2, "[model] compute: unknown compute 'fp16' (f32 or bf16)");
}

/* [patch] source, mean_over, resample_seed (patchspec.h's sources) */
static void test_ablation_keys(void **state)
{
    (void)state;
    job j;
    assert_int_equal(job_parse(&j, "j", MINIMAL), PS_OK);
    assert_true(j.source == PATCH_SOURCE_CLEAN && j.direction == PATCH_DENOISE && !j.mean_over);
    job_free(&j);
    assert_int_equal(job_parse(&j, "j", MINIMAL "[patch]\ndirection = noise\n"), PS_OK);
    assert_true(j.source == PATCH_SOURCE_CORRUPTED && j.direction == PATCH_NOISE);
    job_free(&j);
    /* an ablation ablates the clean run (noise) unless direction = denoise */
    assert_int_equal(job_parse(&j, "j", MINIMAL "[patch]\nsource = mean\nmean_over = template=3\n"), PS_OK);
    assert_true(j.source == PATCH_SOURCE_MEAN && j.direction == PATCH_NOISE && !strcmp(j.mean_over, "template=3"));
    job_free(&j);
    assert_int_equal(job_parse(&j, "j", MINIMAL "[patch]\nsource = zero\ndirection = denoise\n"), PS_OK);
    assert_true(j.source == PATCH_SOURCE_ZERO && j.direction == PATCH_DENOISE);
    job_free(&j);
    assert_int_equal(job_parse(&j, "j", MINIMAL "[patch]\nsource = resample\nresample_seed = 12\n"), PS_OK);
    assert_true(j.source == PATCH_SOURCE_RESAMPLE && j.resample_seed == 12);
    job_free(&j);
    expect_error(MINIMAL "[patch]\nsource = shuffle\n", PS_ERR_INVALID, 8,
                 "[patch] source: unknown source 'shuffle' (clean, corrupted, zero, mean or resample)");
    expect_error(MINIMAL "[patch]\nsource = corrupted\ndirection = denoise\n", PS_ERR_INVALID, 8,
                 "[patch] source corrupted with direction denoise would patch a run with its own values");
    expect_error(MINIMAL "[patch]\nsource = zero\nmean_over = 1:2\n", PS_ERR_INVALID, 9,
                 "[patch] mean_over applies to source = mean only");
    expect_error(MINIMAL "[patch]\nsource = mean\nresample_seed = 1\n", PS_ERR_INVALID, 9,
                 "[patch] resample_seed applies to source = resample only");
    expect_error(MINIMAL "[patch]\nsource = mean\nmean_over = 2:1\n", PS_ERR_INVALID, 9,
                 "[patch] mean_over: mean_over '2:1' is neither all");
}

static void test_duplicated_key(void **state)
{
    (void)state;
    expect_error(MINIMAL "[model]\ndir = other\n", PS_ERR_INVALID, 8, "duplicated key [model] dir (first set on line 2)");
    expect_error("[data]\nbos = true\nbos = true\n", PS_ERR_INVALID, 3, "duplicated key [data] bos (first set on line 2)");
}

static void test_empty_value(void **state)
{
    (void)state;
    expect_error("[model]\ndir =\n", PS_ERR_INVALID, 2, "[model] dir: empty value");
    expect_error(MINIMAL "[run]\nthreads = ; later\n", PS_ERR_INVALID, 8, "[run] threads: empty value");
}

static void test_bad_boolean(void **state)
{
    (void)state;
    expect_error(MINIMAL "[data]\nbos = maybe\n", PS_ERR_INVALID, 8,
                 "[data] bos: bad boolean 'maybe' (true, false, yes, no, 1 or 0)");
    expect_error(MINIMAL "[lens]\nenabled = on\n", PS_ERR_INVALID, 8, "[lens] enabled: bad boolean 'on'");
}

static void test_bad_integer(void **state)
{
    (void)state;
    expect_error(MINIMAL "[data]\nmax_prompts = 12abc\n", PS_ERR_INVALID, 8,
                 "[data] max_prompts: '12abc' is not a non-negative decimal integer");
    expect_error(MINIMAL "chunk_prompts = 0x10\n", PS_ERR_INVALID, 7,
                 "[run] chunk_prompts: '0x10' is not a non-negative decimal integer");
    expect_error(MINIMAL "threads = +4\n", PS_ERR_INVALID, 7, "[run] threads: '+4' is not a non-negative decimal integer");
    expect_error(MINIMAL "threads = 1 000\n", PS_ERR_INVALID, 7, "[run] threads: '1 000' is not");
    expect_error(MINIMAL "chunk_prompts = -5\n", PS_ERR_INVALID, 7, "[run] chunk_prompts: '-5' is negative");
    expect_error(MINIMAL "[data]\nmax_prompts = 18446744073709551616\n", PS_ERR_INVALID, 8,
                 "[data] max_prompts: '18446744073709551616' is too large");
    expect_error(MINIMAL "chunk_prompts = 100001\n", PS_ERR_INVALID, 7,
                 "[run] chunk_prompts: 100001 is out of range (0 for automatic, or 1..100000)");
    expect_error(MINIMAL "threads = 1025\n", PS_ERR_INVALID, 7, "[run] threads: 1025 is out of range");
    expect_error(MINIMAL "work_mib = 1048577\n", PS_ERR_INVALID, 7,
                 "[run] work_mib: 1048577 is out of range (0 for automatic, or 1..1048576)");
    expect_error(MINIMAL "[lens]\ntop_k = 0\n", PS_ERR_INVALID, 8, "[lens] top_k: 0 is out of range (1..1000)");
}

static void test_bad_seconds(void **state)
{
    (void)state;
    expect_error(MINIMAL "progress_seconds = 0\n", PS_ERR_INVALID, 7, "[run] progress_seconds: '0' is not greater than 0");
    expect_error(MINIMAL "progress_seconds = -1.5\n", PS_ERR_INVALID, 7, "[run] progress_seconds: '-1.5' is not greater");
    expect_error(MINIMAL "progress_seconds = nan\n", PS_ERR_INVALID, 7, "[run] progress_seconds: 'nan' is not a decimal");
    expect_error(MINIMAL "progress_seconds = 0x1p3\n", PS_ERR_INVALID, 7, "[run] progress_seconds: '0x1p3' is not");
    expect_error(MINIMAL "progress_seconds = 1e999\n", PS_ERR_INVALID, 7, "[run] progress_seconds: '1e999' is too large");
    expect_error(MINIMAL "progress_seconds = 10s\n", PS_ERR_INVALID, 7, "[run] progress_seconds: '10s' is not");
}

static void test_unknown_names(void **state)
{
    (void)state;
    expect_error(MINIMAL "[patch]\ncomponents = resid_pre, attn\n", PS_ERR_INVALID, 8,
                 "[patch] components: unknown component 'attn' (resid_pre, resid_mid,");
    expect_error(MINIMAL "[patch]\ncomponents = resid_pre,,mlp_out\n", PS_ERR_INVALID, 8,
                 "[patch] components: bad component list");
    expect_error(MINIMAL "[patch]\nmetric = logit-diff\n", PS_ERR_INVALID, 8,
                 "[patch] metric: unknown metric 'logit-diff' (logit_diff, prob, logprob or kl)");
    expect_error(MINIMAL "[patch]\nmetric = prob, logit-diff\n", PS_ERR_INVALID, 8,
                 "[patch] metric: unknown metric 'logit-diff' (logit_diff, prob, logprob or kl)");
    expect_error(MINIMAL "[patch]\nmetric = prob, kl,prob\n", PS_ERR_INVALID, 8,
                 "[patch] metric: metric 'prob' is listed twice in 'prob, kl,prob'");
    expect_error(MINIMAL "[patch]\nmetric = prob,,kl\n", PS_ERR_INVALID, 8, "[patch] metric: bad metric list");
    expect_error(MINIMAL "[patch]\ndirection = Denoise\n", PS_ERR_INVALID, 8,
                 "[patch] direction: unknown direction 'Denoise' (denoise or noise)");
    expect_error(MINIMAL "[patch]\nengine = slow\n", PS_ERR_INVALID, 8,
                 "[patch] engine: unknown engine 'slow' (fast or naive)");
}

/* [patch] metric = a, b, c: several metrics, in order, the first as metric */
static void test_several_metrics(void **state)
{
    (void)state;
    const char *text = MINIMAL "[patch]\nmetric = kl , logit_diff,prob ; three\n";
    char *path = write_job("metrics.ini", text, strlen(text));
    job j;
    assert_int_equal(job_load(&j, path), PS_OK);
    assert_int_equal(j.metrics.n, 3);
    assert_int_equal(j.metrics.m[0], PATCH_KL);
    assert_int_equal(j.metrics.m[1], PATCH_LOGIT_DIFF);
    assert_int_equal(j.metrics.m[2], PATCH_PROB);
    assert_int_equal(j.metric, PATCH_KL);
    job_free(&j);
    free(path);
}

static void test_missing_required(void **state)
{
    (void)state;
    expect_error("[data]\ndataset = d.jsonl\n[run]\noutput = o.nc\n", PS_ERR_INVALID, 0, "[model] dir is required");
    expect_error("[model]\ndir = m\n[run]\noutput = o.nc\n", PS_ERR_INVALID, 0, "[data] dataset is required");
    expect_error("[model]\ndir = m\n[data]\ndataset = d.jsonl\n", PS_ERR_INVALID, 0, "[run] output is required");
    expect_error("", PS_ERR_INVALID, 0, "[model] dir is required");
}

static void test_lens_checks(void **state)
{
    (void)state;
    expect_error(MINIMAL "[lens]\ntop_k = 3\nenabled = yes\n", PS_ERR_INVALID, 9,
                 "[lens] enabled = true but [lens] output is missing");
    expect_error(MINIMAL "[lens]\nenabled = yes\noutput = o.nc\n", PS_ERR_INVALID, 9,
                 "[lens] output is the same file as [run] output (line 6)");
}

static void test_output_suffix(void **state)
{
    (void)state;
    expect_error("[run]\noutput = results/ioi.txt\n", PS_ERR_INVALID, 2, "[run] output: 'results/ioi.txt' does not end in .nc");
    expect_error(MINIMAL "[lens]\noutput = .nc\n", PS_ERR_INVALID, 8, "[lens] output: '.nc' does not end in .nc");
}

static void test_unparseable_line(void **state)
{
    (void)state;
    expect_error("[model]\ndir = m\njust some words\n", PS_ERR_FORMAT, 3, "cannot parse this line");
    expect_error("[model\ndir = m\n", PS_ERR_FORMAT, 1, "cannot parse this line");
    /* inih goes on after its error; its earlier line wins over our later one */
    expect_error("[model]\ndir = m\n???\n[data]\nsize = 1\n", PS_ERR_FORMAT, 3, "cannot parse this line");
}

static void test_multiline_value(void **state)
{
    (void)state;
    expect_error("[model]\ndir = m\n  tokenizer = t\n", PS_ERR_FORMAT, 3,
                 "indented line would continue the value of [model] dir (multi-line values are not allowed");
    expect_error(MINIMAL "\n\tmore\n", PS_ERR_FORMAT, 8, "indented line would continue the value of [run] output");
}

static void test_text_after_header(void **state)
{
    (void)state;
    expect_error("[model] dir = m\n", PS_ERR_FORMAT, 1, "text after the section header [model]");
}

static void test_hash_after_value(void **state)
{
    (void)state;
    expect_error(MINIMAL "[data]\nbos = true # always\n", PS_ERR_INVALID, 8,
                 "[data] bos: '#' after a value is not a comment");
}

static void test_long_line(void **state)
{
    (void)state;
    char text[512];
    int n = snprintf(text, sizeof text, "[model]\ndir = ");
    memset(text + n, 'a', 198 - 6);
    strcpy(text + n + 198 - 6, "\n[data]\ndataset = d.jsonl\n[run]\noutput = o.nc\n");
    job j;
    assert_int_equal(job_parse(&j, "j", text), PS_OK); /* 198 bytes: the longest line */
    assert_int_equal(strlen(j.model_dir), 2 + 198 - 6);
    job_free(&j);
    text[n] = 'b';
    memmove(text + n + 1, text + n, strlen(text + n) + 1);
    expect_error(text, PS_ERR_FORMAT, 2, "line of 199 bytes, over the INI parser's limit of 198 bytes");
}

static void test_bad_bytes(void **state)
{
    (void)state;
    expect_error("[model]\ndir = a\x01" "b\n", PS_ERR_FORMAT, 2, "control character 0x01 in column 8");
    expect_error("[model]\ndir = a\rb\n", PS_ERR_FORMAT, 2, "control character 0x0d");
    expect_error("[model]\ndir = \xC3(\n", PS_ERR_FORMAT, 2, "invalid UTF-8");
    static const char with_nul[] = "[model]\ndir = m\n[da\0ta]\n";
    expect_error_bytes(with_nul, sizeof with_nul - 1, PS_ERR_FORMAT, 3, "NUL byte");
}

static void test_file_errors(void **state)
{
    (void)state;
    job j;
    char *missing = path_in("no-such-job.ini");
    assert_int_equal(job_load(&j, missing), PS_ERR_IO);
    assert_non_null(strstr(err_msg(), missing));
    assert_zeroed(&j);
    free(missing);

    size_t big = JOB_MAX_BYTES + 1;
    char *text = malloc(big);
    assert_non_null(text);
    memset(text, '\n', big);
    char *path = write_job("big.ini", text, big);
    assert_int_equal(job_load(&j, path), PS_ERR_NOMEM);
    assert_zeroed(&j);
    free(path);
    free(text);
}

/* job_parse_mem: what job_load does with the bytes it read. */
static void test_parse_mem(void **state)
{
    (void)state;
    static const char text[] = "[model]\ndir = m\n[data]\ndataset = d.jsonl\n[run]\noutput = o.nc\n";
    job j;
    /* not NUL-terminated: only len bytes count */
    char buf[sizeof text + 8];
    memcpy(buf, text, sizeof text - 1);
    memset(buf + sizeof text - 1, 'x', 8);
    assert_int_equal(job_parse_mem(&j, "jobs/a/job.ini", buf, sizeof text - 1), PS_OK);
    assert_string_equal(j.text, text);
    assert_string_equal(j.output, "jobs/a/o.nc");
    job_free(&j);

    static const char with_nul[] = "[model]\ndir = m\n\0\n";
    assert_int_equal(job_parse_mem(&j, "n.ini", with_nul, sizeof with_nul - 1), PS_ERR_FORMAT);
    assert_string_equal(err_msg(), "n.ini:3: NUL byte");
    assert_zeroed(&j);

    char *big = malloc(JOB_MAX_BYTES + 1);
    assert_non_null(big);
    memset(big, '\n', JOB_MAX_BYTES + 1);
    assert_int_equal(job_parse_mem(&j, "big.ini", big, JOB_MAX_BYTES + 1), PS_ERR_NOMEM);
    assert_non_null(strstr(err_msg(), "big.ini: file is 1048577 bytes, over the limit of 1048576 bytes"));
    assert_zeroed(&j);
    free(big);

    assert_int_equal(job_parse_mem(&j, "empty.ini", "", 0), PS_ERR_INVALID);
    assert_string_equal(err_msg(), "empty.ini: [model] dir is required");
}

/* Random edits of a valid job: every outcome is either a job or one error
 * line naming the file; ASan/UBSan watch the rest. */
static void test_mutations(void **state)
{
    (void)state;
    static const char base[] = "[model]\ndir = model\ntokenizer = tok\n[data]\ndataset = d.jsonl\nbos = no\n"
                               "max_prompts = 12\n[patch]\ncomponents = block_every,z\nmetric = prob\n"
                               "[run]\noutput = o.nc\nchunk_prompts = 8\nprogress_seconds = 1.5\n"
                               "[lens]\nenabled = true\noutput = l.nc\n";
    static const char alphabet[] = "[]=:;# \t\r\n\\x0-9ae.,\x01\xC3\xA9\xFF";
    uint64_t rng = 0x9E3779B97F4A7C15u;
    char buf[sizeof base + 64];
    size_t ok = 0;
    for (int iter = 0; iter < 20000; iter++) {
        memcpy(buf, base, sizeof base);
        size_t len = sizeof base - 1;
        int edits = 1 + (int)(iter % 4);
        for (int e = 0; e < edits; e++) {
            rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
            size_t pos = (size_t)(rng >> 8) % (len + 1);
            char c = alphabet[(rng >> 40) % (sizeof alphabet - 1)];
            switch (rng % 3) {
            case 0:
                if (pos < len)
                    buf[pos] = c;
                break;
            case 1:
                if (len + 1 < sizeof buf) {
                    memmove(buf + pos + 1, buf + pos, len - pos + 1);
                    buf[pos] = c;
                    len++;
                }
                break;
            default:
                if (pos < len) {
                    memmove(buf + pos, buf + pos + 1, len - pos);
                    len--;
                }
            }
        }
        job j;
        if (job_parse(&j, "fuzz/job.ini", buf) == PS_OK) {
            assert_non_null(j.model_dir);
            assert_non_null(j.dataset);
            assert_non_null(j.output);
            assert_string_equal(j.text, buf);
            ok++;
            job_free(&j);
        } else {
            assert_int_equal(strncmp(err_msg(), "fuzz/job.ini:", 13), 0);
            assert_null(strchr(err_msg(), '\n'));
            assert_zeroed(&j);
        }
    }
    /* Some edits land in comments or values and leave a valid job. */
    assert_true(ok > 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full_job),
        cmocka_unit_test(test_minimal_defaults),
        cmocka_unit_test(test_relative_paths),
        cmocka_unit_test(test_syntax_accepted),
        cmocka_unit_test(test_unknown_section),
        cmocka_unit_test(test_unknown_key),
        cmocka_unit_test(test_compute_key),
        cmocka_unit_test(test_method_limits),
        cmocka_unit_test(test_atp_keys),
        cmocka_unit_test(test_ablation_keys),
        cmocka_unit_test(test_duplicated_key),
        cmocka_unit_test(test_empty_value),
        cmocka_unit_test(test_bad_boolean),
        cmocka_unit_test(test_bad_integer),
        cmocka_unit_test(test_bad_seconds),
        cmocka_unit_test(test_unknown_names),
        cmocka_unit_test(test_several_metrics),
        cmocka_unit_test(test_missing_required),
        cmocka_unit_test(test_lens_checks),
        cmocka_unit_test(test_output_suffix),
        cmocka_unit_test(test_unparseable_line),
        cmocka_unit_test(test_multiline_value),
        cmocka_unit_test(test_text_after_header),
        cmocka_unit_test(test_hash_after_value),
        cmocka_unit_test(test_long_line),
        cmocka_unit_test(test_bad_bytes),
        cmocka_unit_test(test_file_errors),
        cmocka_unit_test(test_parse_mem),
        cmocka_unit_test(test_mutations),
    };
    return cmocka_run_group_tests_name("job", tests, group_setup, group_teardown);
}
