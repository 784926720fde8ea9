/* Unit tests: the patching results writer's staging window (ncout.c:
 * prompts staged in windows of up to 1,024 and written with one call per
 * variable and run of prompts at the flush), written to a small file and
 * read back through ncin; and the schema's slice parser and resume check. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <netcdf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ncin.h"
#include "ncout.h"
#include "schema.h"

#define TEST_TMPDIR_NAME "ps_test_ncout"
#include "test_tmpdir.h"

#define N_LAYER 2
#define N_HEAD 2
#define MAX_T 3

/* A model with a config and no weights: what ncout_results_define reads
 * (dimensions, provenance; the hash preset so nothing is hashed). */
static void fake_model(model *m)
{
    memset(m, 0, sizeof *m);
    m->cfg.n_layer = N_LAYER;
    m->cfg.n_head = N_HEAD;
    m->dir = tmpdir;
    m->config_json = "{}";
    strcpy(m->weights_dtype, "F32");
    strcpy(m->sha256, "00");
}

/* Prompt p's values: resid_pre(layer, position) = 100 p + 10 l + t,
 * z_all_pos(layer, head) = -(100 p + 10 l + h). */
static void put_prompt(ncout_results *r, size_t p, size_t T)
{
    double resid[N_LAYER * MAX_T], z[N_LAYER * N_HEAD];
    for (size_t l = 0; l < N_LAYER; l++) {
        for (size_t t = 0; t < T; t++)
            resid[l * T + t] = 100.0 * (double)p + 10.0 * (double)l + (double)t;
        for (size_t h = 0; h < N_HEAD; h++)
            z[l * N_HEAD + h] = -(100.0 * (double)p + 10.0 * (double)l + (double)h);
    }
    int32_t clean[MAX_T] = {1, 2, 3}, corrupted[MAX_T] = {4, 5, 6};
    ncout_prompt pr = {.T = T, .answer_id = 7, .wrong_id = 8, .clean_metric = 2.0 + (double)p,
                       .corrupted_metric = 1.0, .clean_tokens = clean, .corrupted_tokens = corrupted,
                       .answer = " Mary", .wrong = " John"};
    double *values[PATCH_COMPONENT_COUNT] = {0};
    values[PATCH_RESID_PRE] = resid;
    values[PATCH_Z_ALL_POS] = z;
    assert_int_equal(ncout_results_put(r, p, &pr, NULL, values), PS_OK);
}

static double read1(const ncin_file *f, const char *name, size_t p)
{
    ncin_var v;
    double d = 0;
    assert_int_equal(ncin_inq_var(f, name, &v), PS_OK);
    ps_status st = ncin_read_double(f, &v, p, 1, &d);
    if (st)
        fail_msg("%s", err_msg());
    return d;
}

static char *read_string(const ncin_file *f, const char *name, size_t p)
{
    ncin_var v;
    char *s = NULL;
    assert_int_equal(ncin_inq_var(f, name, &v), PS_OK);
    assert_int_equal(v.ndim, 1);
    assert_int_equal(ncin_read_strings(f, &v, p, 1, &s), PS_OK);
    return s;
}

/* Prompts out of order, within and beyond one window (the window is at most
 * 1,024 prompts: 0 and 1500 cannot share one), pending and skipped prompts
 * and prompts never put: every value lands where it belongs, and what was
 * not written reads as the fill value. */
static void test_staging_window(void **state)
{
    (void)state;
    char path[4200];
    snprintf(path, sizeof path, "%s/results.nc", tmpdir);
    model m;
    fake_model(&m);
    ncout_file f;
    ncout_results r;
    bool on[PATCH_COMPONENT_COUNT] = {0};
    on[PATCH_RESID_PRE] = on[PATCH_Z_ALL_POS] = true;
    assert_int_equal(ncout_create(&f, path), PS_OK);
    assert_int_equal(ncout_results_define(&r, &f, &m, MAX_T, on, PATCH_LOGIT_DIFF, PATCH_DENOISE, PATCH_ENGINE_FAST),
                     PS_OK);
    assert_true(r.stage.cap >= 1 && r.stage.cap <= 1024);
    r.prompt_offset = 10; /* a sliced sweep's part: the prompt coordinate = 10 + prompt */
    put_prompt(&r, 2, 3);
    put_prompt(&r, 0, 2);                                    /* before the window: flushes */
    assert_int_equal(ncout_results_put_pending(&r, 1), PS_OK);
    assert_int_equal(ncout_results_put_skipped(&r, 3, "answer is not one token"), PS_OK);
    put_prompt(&r, 1500, 1);                                 /* another window */
    put_prompt(&r, 4, 3);                                    /* back: flushes 1500 */
    /* more tokens than the file has positions: refused, naming the file */
    int32_t ids[MAX_T + 1] = {0};
    double *none[PATCH_COMPONENT_COUNT] = {0};
    ncout_prompt longer = {.T = MAX_T + 1, .clean_tokens = ids, .corrupted_tokens = ids, .answer = "", .wrong = ""};
    ASSERT_ERROR(ncout_results_put(&r, 6, &longer, NULL, none), PS_ERR_RANGE, path, "more than the file's 3 positions");
    /* a prompt put twice: the second put wins */
    put_prompt(&r, 5, 1);
    put_prompt(&r, 5, 2);
    assert_int_equal(ncout_results_flush(&r), PS_OK);
    ncout_results_free(&r);
    assert_int_equal(ncout_commit(&f), PS_OK);

    ncin_file in;
    assert_int_equal(ncin_open(&in, path), PS_OK);
    size_t n;
    assert_int_equal(ncin_dim_len(&in, SCHEMA_DIM_PROMPT, &n), PS_OK);
    assert_int_equal(n, 1501);
    /* flags and indices */
    const size_t done_prompts[] = {0, 2, 4, 5, 1500};
    for (size_t i = 0; i < sizeof done_prompts / sizeof *done_prompts; i++) {
        size_t p = done_prompts[i];
        assert_true(read1(&in, SCHEMA_VAR_DONE, p) == 1.0);
        assert_true(read1(&in, SCHEMA_VAR_SKIPPED, p) == 0.0);
        assert_true(read1(&in, SCHEMA_VAR_PROMPT, p) == (double)(10 + p));
        assert_true(read1(&in, SCHEMA_VAR_CLEAN_METRIC, p) == 2.0 + (double)p);
        assert_true(read1(&in, SCHEMA_VAR_ANSWER_ID, p) == 7.0);
    }
    assert_true(read1(&in, SCHEMA_VAR_LENGTH, 5) == 2.0);
    assert_true(read1(&in, SCHEMA_VAR_DONE, 1) == 0.0 && read1(&in, SCHEMA_VAR_SKIPPED, 1) == 0.0);
    assert_true(read1(&in, SCHEMA_VAR_PROMPT, 1) == 11.0);
    assert_true(isnan(read1(&in, SCHEMA_VAR_CLEAN_METRIC, 1)));
    assert_true(isnan(read1(&in, SCHEMA_VAR_LENGTH, 1)));
    /* schema 2: the version, the prompt coordinate (no prompt_index), ids
     * -1 where there is none (no _FillValue: read as -1, not NaN) */
    assert_int_equal(schema_version(&in), SCHEMA_VERSION);
    assert_string_equal(schema_prompt_index_var(&in), SCHEMA_VAR_PROMPT);
    assert_false(ncin_has_var(&in, SCHEMA_VAR_PROMPT_INDEX));
    assert_true(read1(&in, SCHEMA_VAR_ANSWER_ID, 1) == -1.0);
    char *fill_att = NULL;
    assert_int_equal(ncin_get_text_att(&in, SCHEMA_VAR_DONE, SCHEMA_ATT_FLAG_MEANINGS, &fill_att), PS_OK);
    assert_string_equal(fill_att, SCHEMA_DONE_MEANINGS);
    free(fill_att);
    assert_true(read1(&in, SCHEMA_VAR_SKIPPED, 3) == 1.0 && read1(&in, SCHEMA_VAR_DONE, 3) == 0.0);
    char *s = read_string(&in, SCHEMA_VAR_SKIP_REASON, 3);
    assert_string_equal(s, "answer is not one token");
    free(s);
    s = read_string(&in, SCHEMA_VAR_SKIP_REASON, 2);
    assert_string_equal(s, "");
    free(s);
    s = read_string(&in, SCHEMA_VAR_ANSWER, 1500);
    assert_string_equal(s, " Mary");
    free(s);
    /* never put: fill values (done's default fill reads as NaN).  Its
     * strings are not read: HDF5 cannot read a string cell never written,
     * which is why sweeps put every prompt, pending ones too. */
    assert_true(isnan(read1(&in, SCHEMA_VAR_DONE, 700)));
    assert_true(isnan(read1(&in, SCHEMA_VAR_CLEAN_METRIC, 700)));
    /* the grids: positions past the length are fill */
    ncin_var v, vn, vz;
    float g[N_LAYER * MAX_T], gn[N_LAYER * MAX_T], gz[N_LAYER * N_HEAD];
    assert_int_equal(ncin_inq_var(&in, "resid_pre", &v), PS_OK);
    assert_int_equal(ncin_inq_var(&in, "resid_pre" SCHEMA_NORMALIZED_SUFFIX, &vn), PS_OK);
    assert_int_equal(ncin_inq_var(&in, "z_all_pos", &vz), PS_OK);
    const size_t lens[] = {2, 0, 3, 0, 3, 2};
    for (size_t p = 0; p < 6; p++) {
        assert_int_equal(ncin_read_float(&in, &v, p, 1, g), PS_OK);
        assert_int_equal(ncin_read_float(&in, &vn, p, 1, gn), PS_OK);
        assert_int_equal(ncin_read_float(&in, &vz, p, 1, gz), PS_OK);
        for (size_t l = 0; l < N_LAYER; l++) {
            for (size_t t = 0; t < MAX_T; t++) {
                float x = g[l * MAX_T + t], xn = gn[l * MAX_T + t];
                if (t < lens[p]) {
                    double want = 100.0 * (double)p + 10.0 * (double)l + (double)t;
                    assert_true(x == (float)want);
                    /* (patched - corrupted) / (clean - corrupted) */
                    assert_true(xn == (float)((want - 1.0) / (2.0 + (double)p - 1.0)));
                } else {
                    assert_true(isnan(x) && isnan(xn));
                }
            }
            for (size_t h = 0; h < N_HEAD; h++) {
                float x = gz[l * N_HEAD + h];
                if (lens[p])
                    assert_true(x == (float)-(100.0 * (double)p + 10.0 * (double)l + (double)h));
                else
                    assert_true(isnan(x));
            }
        }
    }
    /* the contract's names and attributes */
    char *att = NULL;
    assert_int_equal(ncin_get_text_att(&in, NULL, SCHEMA_ATT_DIRECTION, &att), PS_OK);
    assert_string_equal(att, SCHEMA_DIRECTION_DENOISE);
    free(att);
    assert_int_equal(ncin_get_text_att(&in, NULL, SCHEMA_ATT_CONVENTIONS, &att), PS_OK);
    assert_string_equal(att, SCHEMA_CONVENTIONS);
    free(att);
    ncin_close(&in);
}

/* A window of exactly 1,024 prompts written in order, then the next one:
 * every prompt done once. */
static void test_full_window(void **state)
{
    (void)state;
    char path[4200];
    snprintf(path, sizeof path, "%s/full.nc", tmpdir);
    model m;
    fake_model(&m);
    ncout_file f;
    ncout_results r;
    bool on[PATCH_COMPONENT_COUNT] = {0};
    on[PATCH_RESID_PRE] = true;
    assert_int_equal(ncout_create(&f, path), PS_OK);
    assert_int_equal(ncout_results_define(&r, &f, &m, MAX_T, on, PATCH_PROB, PATCH_NOISE, PATCH_ENGINE_NAIVE), PS_OK);
    const size_t total = r.stage.cap + 1;
    for (size_t p = 0; p < total; p++)
        put_prompt(&r, p, 1 + p % MAX_T);
    assert_int_equal(ncout_results_flush(&r), PS_OK);
    ncout_results_free(&r);
    assert_int_equal(ncout_commit(&f), PS_OK);
    ncin_file in;
    assert_int_equal(ncin_open(&in, path), PS_OK);
    ncin_var v;
    assert_int_equal(ncin_inq_var(&in, SCHEMA_VAR_DONE, &v), PS_OK);
    assert_int_equal(v.shape[0], total);
    double *done = calloc(total, sizeof *done), *len = calloc(total, sizeof *len);
    assert_non_null(done);
    assert_non_null(len);
    assert_int_equal(ncin_read_double(&in, &v, 0, total, done), PS_OK);
    assert_int_equal(ncin_inq_var(&in, SCHEMA_VAR_LENGTH, &v), PS_OK);
    assert_int_equal(ncin_read_double(&in, &v, 0, total, len), PS_OK);
    for (size_t p = 0; p < total; p++) {
        assert_true(done[p] == 1.0);
        assert_true(len[p] == (double)(1 + p % MAX_T));
    }
    free(done);
    free(len);
    ncin_close(&in);
}

/* Extra variables per component (ncout_results_define_extra: a sweep's
 * C_atp, C_atp_normalized, C_atp_rank_correlation, C_atp_missed), staged
 * with the prompt's grids, and the dataset summary (ncout_atp_summary) over
 * the prompts that have a value. */
static void test_extras_and_summary(void **state)
{
    (void)state;
    char path[4200];
    snprintf(path, sizeof path, "%s/extras.nc", tmpdir);
    model m;
    fake_model(&m);
    ncout_file f;
    ncout_results r;
    bool on[PATCH_COMPONENT_COUNT] = {0};
    on[PATCH_RESID_PRE] = on[PATCH_Z_ALL_POS] = true;
    assert_int_equal(ncout_create(&f, path), PS_OK);
    assert_int_equal(ncout_results_define(&r, &f, &m, MAX_T, on, PATCH_LOGIT_DIFF, PATCH_DENOISE, PATCH_ENGINE_FAST),
                     PS_OK);
    const ncout_extra ex[] = {{SCHEMA_ATP_SUFFIX, NCOUT_EXTRA_GRID, "estimate", NULL},
                              {SCHEMA_ATP_NORMALIZED_SUFFIX, NCOUT_EXTRA_GRID_NORMALIZED, "normalized", "a note"},
                              {SCHEMA_ATP_RANK_CORRELATION_SUFFIX, NCOUT_EXTRA_DOUBLE, "rho", NULL},
                              {SCHEMA_ATP_MISSED_SUFFIX, NCOUT_EXTRA_INT, "missed", NULL}};
    assert_int_equal(ncout_results_define_extra(&r, ex, 4), PS_OK);
    /* prompts 0, 2, 3 done (3 without a rank correlation: NaN), 1 pending */
    const double rho[4] = {0.5, 0, 0.9, NAN}, missed[4] = {1, 0, 3, 2};
    for (size_t p = 0; p < 4; p++) {
        if (p == 1) {
            assert_int_equal(ncout_results_put_pending(&r, p), PS_OK);
            continue;
        }
        put_prompt(&r, p, 2);
        double est[N_LAYER * MAX_T], ez[N_LAYER * N_HEAD], rr = rho[p], mm = missed[p];
        for (size_t i = 0; i < N_LAYER * 2; i++)
            est[i] = 1.0 + (double)(p + i);
        for (size_t i = 0; i < N_LAYER * N_HEAD; i++)
            ez[i] = -1.0 - (double)i;
        double *g[PATCH_COMPONENT_COUNT] = {0}, *rv[PATCH_COMPONENT_COUNT] = {0}, *mv[PATCH_COMPONENT_COUNT] = {0};
        g[PATCH_RESID_PRE] = est, g[PATCH_Z_ALL_POS] = ez;
        rv[PATCH_RESID_PRE] = rv[PATCH_Z_ALL_POS] = &rr;
        mv[PATCH_RESID_PRE] = mv[PATCH_Z_ALL_POS] = &mm;
        assert_int_equal(ncout_results_put_extra(&r, p, 0, g), PS_OK);
        assert_int_equal(ncout_results_put_extra(&r, p, 1, g), PS_OK);
        assert_int_equal(ncout_results_put_extra(&r, p, 2, rv), PS_OK);
        assert_int_equal(ncout_results_put_extra(&r, p, 3, mv), PS_OK);
    }
    double *g[PATCH_COMPONENT_COUNT] = {0};
    ASSERT_ERROR(ncout_results_put_extra(&r, 0, 4, g), PS_ERR_INTERNAL, path, "extra variable 4 of 4");
    assert_int_equal(ncout_results_flush(&r), PS_OK);
    ncout_atp_stats st[PATCH_COMPONENT_COUNT];
    assert_int_equal(ncout_atp_summary(f.ncid, f.tmp_path, st), PS_OK);
    ncout_results_free(&r);
    assert_int_equal(ncout_commit(&f), PS_OK);
    /* the summary: rho over prompts 0 and 2, missed over 0, 2, 3 */
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        assert_int_equal(st[c].present, on[c]);
    assert_int_equal(st[PATCH_Z_ALL_POS].rank_prompts, 2);
    assert_true(st[PATCH_Z_ALL_POS].mean == 0.7 && st[PATCH_Z_ALL_POS].median == 0.7);
    assert_int_equal(st[PATCH_RESID_PRE].missed_prompts, 3);
    assert_int_equal(st[PATCH_RESID_PRE].missed_total, 6);

    ncin_file in;
    assert_int_equal(ncin_open(&in, path), PS_OK);
    assert_true(read1(&in, "z_all_pos" SCHEMA_ATP_RANK_CORRELATION_SUFFIX, 2) == 0.9);
    assert_true(isnan(read1(&in, "z_all_pos" SCHEMA_ATP_RANK_CORRELATION_SUFFIX, 1)));
    assert_true(read1(&in, "resid_pre" SCHEMA_ATP_MISSED_SUFFIX, 3) == 2.0);
    assert_true(isnan(read1(&in, "resid_pre" SCHEMA_ATP_MISSED_SUFFIX, 1))); /* _FillValue -1 */
    ncin_var v, vn;
    float e[N_LAYER * MAX_T], en[N_LAYER * MAX_T];
    assert_int_equal(ncin_inq_var(&in, "resid_pre" SCHEMA_ATP_SUFFIX, &v), PS_OK);
    assert_int_equal(ncin_inq_var(&in, "resid_pre" SCHEMA_ATP_NORMALIZED_SUFFIX, &vn), PS_OK);
    assert_int_equal(ncin_read_float(&in, &v, 2, 1, e), PS_OK);
    assert_int_equal(ncin_read_float(&in, &vn, 2, 1, en), PS_OK);
    for (size_t l = 0; l < N_LAYER; l++)
        for (size_t t = 0; t < MAX_T; t++) {
            const double want = 1.0 + (double)(2 + l * 2 + t);
            if (t < 2)
                assert_true(e[l * MAX_T + t] == (float)want && en[l * MAX_T + t] == (float)((want - 1.0) / 3.0));
            else
                assert_true(isnan(e[l * MAX_T + t]) && isnan(en[l * MAX_T + t]));
        }
    char *att = NULL;
    assert_int_equal(ncin_get_text_att(&in, "resid_pre" SCHEMA_ATP_NORMALIZED_SUFFIX, "comment", &att), PS_OK);
    assert_string_equal(att, "a note");
    free(att);
    int ncid, var;
    double mean, median;
    long long total;
    assert_int_equal(nc_open(path, NC_NOWRITE, &ncid), NC_NOERR);
    assert_int_equal(nc_inq_varid(ncid, "resid_pre" SCHEMA_ATP_RANK_CORRELATION_SUFFIX, &var), NC_NOERR);
    assert_int_equal(nc_get_att_double(ncid, var, SCHEMA_ATT_SUMMARY_MEAN, &mean), NC_NOERR);
    assert_int_equal(nc_get_att_double(ncid, var, SCHEMA_ATT_SUMMARY_MEDIAN, &median), NC_NOERR);
    assert_true(mean == 0.7 && median == 0.7);
    assert_int_equal(nc_inq_varid(ncid, "z_all_pos" SCHEMA_ATP_MISSED_SUFFIX, &var), NC_NOERR);
    assert_int_equal(nc_get_att_longlong(ncid, var, SCHEMA_ATT_SUMMARY_TOTAL, &total), NC_NOERR);
    assert_true(total == 6);
    nc_close(ncid);
    ncin_close(&in);
}

static void test_parse_slice(void **state)
{
    (void)state;
    /* schema.h spells netCDF's fill values out */
    assert_true(SCHEMA_FILL_GRID == NC_FILL_FLOAT && SCHEMA_FILL_METRIC == NC_FILL_DOUBLE);
    size_t k = 0, n = 0;
    assert_true(schema_parse_slice("1/1", SCHEMA_SLICE_MAX, &k, &n) && k == 1 && n == 1);
    assert_true(schema_parse_slice("3/8", SCHEMA_SLICE_MAX, &k, &n) && k == 3 && n == 8);
    assert_true(schema_parse_slice("02/4", SCHEMA_SLICE_MAX, &k, &n) && k == 2 && n == 4);
    assert_true(schema_parse_slice("1000000/1000000", SCHEMA_SLICE_MAX, &k, &n) && n == 1000000);
    assert_false(schema_parse_slice("1/1000001", SCHEMA_SLICE_MAX, &k, &n));
    assert_true(schema_parse_slice("1/1000001", SIZE_MAX, &k, &n) && n == 1000001);
    static const char *const bad[] = {"",    "all", "0/1",  "2/1", "1/0",   "1/",  "/1",   "1",
                                      "1/2x", "x1/2", " 1/2", "+1/2", "-1/2", "1//2", "1/2/3",
                                      "99999999999999999999/1", "1/99999999999999999999999"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        assert_false(schema_parse_slice(bad[i], SIZE_MAX, &k, &n));
    assert_false(schema_parse_slice(NULL, SIZE_MAX, &k, &n));
}

/* The resume check against a file with the five attributes. */
static void test_is_complete_run(void **state)
{
    (void)state;
    char path[4200];
    snprintf(path, sizeof path, "%s/run.nc", tmpdir);
    assert_false(schema_is_complete_run(path, "j", "m", "d", SCHEMA_SLICE_ALL)); /* no file */
    ncout_file f;
    assert_int_equal(ncout_create(&f, path), PS_OK);
    assert_int_equal(ncout_put_attr(&f, SCHEMA_ATT_JOB_SHA256, "j"), PS_OK);
    assert_int_equal(ncout_put_attr(&f, SCHEMA_ATT_MODEL_SHA256, "m"), PS_OK);
    assert_int_equal(ncout_put_attr(&f, SCHEMA_ATT_DATASET_SHA256, "d"), PS_OK);
    assert_int_equal(ncout_put_attr(&f, SCHEMA_ATT_SLICE, "2/3"), PS_OK);
    assert_int_equal(ncout_put_attr(&f, SCHEMA_ATT_COMPLETE, SCHEMA_TRUE), PS_OK);
    assert_int_equal(ncout_commit(&f), PS_OK);
    assert_true(schema_is_complete_run(path, "j", "m", "d", "2/3"));
    assert_false(schema_is_complete_run(path, "j", "m", "d", SCHEMA_SLICE_ALL));
    assert_false(schema_is_complete_run(path, "J", "m", "d", "2/3"));
    assert_false(schema_is_complete_run(path, "j", "M", "d", "2/3"));
    assert_false(schema_is_complete_run(path, "j", "m", "D", "2/3"));
    /* incomplete */
    assert_int_equal(ncout_create(&f, path), PS_OK);
    assert_int_equal(ncout_put_attr(&f, SCHEMA_ATT_JOB_SHA256, "j"), PS_OK);
    assert_int_equal(ncout_put_attr(&f, SCHEMA_ATT_MODEL_SHA256, "m"), PS_OK);
    assert_int_equal(ncout_put_attr(&f, SCHEMA_ATT_DATASET_SHA256, "d"), PS_OK);
    assert_int_equal(ncout_put_attr(&f, SCHEMA_ATT_SLICE, "2/3"), PS_OK);
    assert_int_equal(ncout_put_attr(&f, SCHEMA_ATT_COMPLETE, SCHEMA_FALSE), PS_OK);
    assert_int_equal(ncout_commit(&f), PS_OK);
    assert_false(schema_is_complete_run(path, "j", "m", "d", "2/3"));
    /* schema 2: complete is the integer 0 or 1; anything else is refused */
    for (int c = 0; c < 3; c++) {
        assert_int_equal(ncout_create(&f, path), PS_OK);
        assert_int_equal(ncout_put_attr(&f, SCHEMA_ATT_JOB_SHA256, "j"), PS_OK);
        assert_int_equal(ncout_put_attr(&f, SCHEMA_ATT_MODEL_SHA256, "m"), PS_OK);
        assert_int_equal(ncout_put_attr(&f, SCHEMA_ATT_DATASET_SHA256, "d"), PS_OK);
        assert_int_equal(ncout_put_attr(&f, SCHEMA_ATT_SLICE, "2/3"), PS_OK);
        if (c < 2)
            assert_int_equal(ncout_put_flag(&f, SCHEMA_ATT_COMPLETE, c == 1), PS_OK);
        else
            assert_int_equal(ncout_put_attr(&f, SCHEMA_ATT_COMPLETE, "yes"), PS_OK);
        assert_int_equal(ncout_commit(&f), PS_OK);
        assert_true(schema_is_complete_run(path, "j", "m", "d", "2/3") == (c == 1));
        ncin_file in;
        bool value = false, present = false;
        assert_int_equal(ncin_open(&in, path), PS_OK);
        assert_int_equal(schema_version(&in), 1); /* no patchsweep_schema: written without provenance */
        if (c < 2) {
            assert_int_equal(schema_read_flag(&in, SCHEMA_ATT_COMPLETE, &value, &present), PS_OK);
            assert_true(present && value == (c == 1));
        } else {
            ASSERT_ERROR(schema_read_flag(&in, SCHEMA_ATT_COMPLETE, &value, &present), PS_ERR_FORMAT, path,
                         "'complete' is \"yes\", not 0 or 1");
        }
        assert_int_equal(schema_read_flag(&in, SCHEMA_ATT_PREPEND_BOS, &value, &present), PS_OK);
        assert_false(present);
        ncin_close(&in);
    }
    /* not NetCDF */
    FILE *out = fopen(path, "w");
    assert_non_null(out);
    fputs("not netcdf", out);
    fclose(out);
    assert_false(schema_is_complete_run(path, "j", "m", "d", "2/3"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_staging_window),
        cmocka_unit_test(test_full_window),
        cmocka_unit_test(test_extras_and_summary),
        cmocka_unit_test(test_parse_slice),
        cmocka_unit_test(test_is_complete_run),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
