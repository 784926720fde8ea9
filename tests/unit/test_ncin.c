/* Unit tests: ncin, the reader of result files (fill values, strings,
 * attributes, dimension checks, refusals), on files written here with the
 * NetCDF-C API. */
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
#include <unistd.h>

#include "ncin.h"

static char dir[] = "/tmp/ps-ncin-XXXXXX";
static char path[256];

#define NC(call) assert_int_equal((call), NC_NOERR)

/* prompt = 2, layer = 2, position = 3:
 *   v(prompt, layer, position) float, _FillValue 9.96921e36, prompt 1 unwritten
 *   d(prompt, layer, position) float, no attribute (default fill), one NaN
 *   nf(prompt) double in no-fill mode
 *   tok(prompt, position) string, one invalid UTF-8, one never written
 *   packed(prompt) short with scale_factor
 *   attributes: title (char, with a trailing NUL), s (string), n (int) */
static void write_fixture(void)
{
    int ncid, dp, dl, dpos, v, d, nf, tok, packed;
    NC(nc_create(path, NC_NETCDF4 | NC_CLOBBER, &ncid));
    NC(nc_def_dim(ncid, "prompt", NC_UNLIMITED, &dp));
    NC(nc_def_dim(ncid, "layer", 2, &dl));
    NC(nc_def_dim(ncid, "position", 3, &dpos));
    int d3[3] = {dp, dl, dpos}, d2[2] = {dp, dpos};
    NC(nc_def_var(ncid, "v", NC_FLOAT, 3, d3, &v));
    float fill = NC_FILL_FLOAT;
    NC(nc_def_var_fill(ncid, v, 0, &fill));
    NC(nc_def_var(ncid, "d", NC_FLOAT, 3, d3, &d));
    NC(nc_def_var(ncid, "nf", NC_DOUBLE, 1, &dp, &nf));
    NC(nc_def_var_fill(ncid, nf, 1, NULL));
    NC(nc_def_var(ncid, "tok", NC_STRING, 2, d2, &tok));
    NC(nc_def_var(ncid, "packed", NC_SHORT, 1, &dp, &packed));
    float scale = 0.5f;
    NC(nc_put_att_float(ncid, packed, "scale_factor", NC_FLOAT, 1, &scale));
    NC(nc_put_att_text(ncid, NC_GLOBAL, "title", 6, "hello\0"));
    const char *sv = "as string";
    NC(nc_put_att_string(ncid, NC_GLOBAL, "s", 1, &sv));
    int iv = 3;
    NC(nc_put_att_int(ncid, NC_GLOBAL, "n", NC_INT, 1, &iv));
    NC(nc_enddef(ncid));
    size_t start[3] = {0, 0, 0}, count[3] = {1, 2, 3};
    const float row[6] = {1, 2, 3, 4, 5, NC_FILL_FLOAT};
    NC(nc_put_vara_float(ncid, v, start, count, row));
    const float row_d[6] = {0.5f, NAN, -1, 0, 0, 0};
    count[0] = 2;
    float both[12];
    memcpy(both, row_d, sizeof row_d);
    memcpy(both + 6, row_d, sizeof row_d);
    NC(nc_put_vara_float(ncid, d, start, count, both));
    size_t s2[2] = {0, 0}, c2[2] = {1, 2};
    const char *toks[2] = {" John", "bad\xff"};
    NC(nc_put_vara_string(ncid, tok, s2, c2, toks));
    size_t one = 0;
    double x = 7.25;
    NC(nc_put_var1_double(ncid, nf, &one, &x));
    NC(nc_close(ncid));
}

static int setup(void **state)
{
    (void)state;
    if (!mkdtemp(dir))
        return -1;
    snprintf(path, sizeof path, "%s/r.nc", dir);
    write_fixture();
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char other[300];
    snprintf(other, sizeof other, "%s/text.nc", dir);
    unlink(other);
    unlink(path);
    rmdir(dir);
    return 0;
}

static void test_open_refusals(void **state)
{
    (void)state;
    ncin_file f;
    char other[300];
    snprintf(other, sizeof other, "%s/text.nc", dir);
    FILE *t = fopen(other, "w");
    assert_non_null(t);
    fputs("this is not a NetCDF file\n", t);
    fclose(t);
    assert_int_equal(ncin_open(&f, other), PS_ERR_FORMAT);
    assert_non_null(strstr(err_msg(), "text.nc: not a NetCDF file"));
    snprintf(other, sizeof other, "%s/missing.nc", dir);
    assert_int_equal(ncin_open(&f, other), PS_ERR_IO);
    assert_non_null(strstr(err_msg(), "missing.nc: cannot open"));
}

/* ncin_open_mem reads the same file from memory (the fuzz target's entry
 * point) and refuses what ncin_open refuses, naming the given name. */
static void test_open_mem(void **state)
{
    (void)state;
    FILE *in = fopen(path, "rb");
    assert_non_null(in);
    char *buf = malloc(1 << 20);
    assert_non_null(buf);
    size_t n = fread(buf, 1, 1 << 20, in);
    fclose(in);
    assert_true(n > 0 && n < (1 << 20));
    ncin_file f;
    assert_int_equal(ncin_open_mem(&f, "mem.nc", buf, n), PS_OK);
    size_t len = 0;
    assert_int_equal(ncin_dim_len(&f, "position", &len), PS_OK);
    assert_int_equal(len, 3);
    char *title = NULL;
    assert_int_equal(ncin_get_text_att(&f, NULL, "title", &title), PS_OK);
    assert_string_equal(title, "hello");
    free(title);
    assert_int_equal(ncin_dim_len(&f, "head", &len), PS_ERR_FORMAT);
    assert_string_equal(err_msg(), "mem.nc: no dimension 'head'");
    ncin_close(&f);

    static const char junk[] = "this is not a NetCDF file\n";
    assert_int_equal(ncin_open_mem(&f, "junk.nc", junk, sizeof junk - 1), PS_ERR_FORMAT);
    assert_non_null(strstr(err_msg(), "junk.nc: not a NetCDF file"));
    assert_int_equal(f.ncid, -1);
    assert_null(f.path);
    free(buf);
}

static void test_fill_values_become_nan(void **state)
{
    (void)state;
    ncin_file f;
    assert_int_equal(ncin_open(&f, path), PS_OK);
    ncin_var v;
    assert_int_equal(ncin_inq_var(&f, "v", &v), PS_OK);
    assert_int_equal(v.ndim, 3);
    assert_int_equal(v.shape[0], 2);
    assert_string_equal(v.dim_names[2], "position");
    size_t stride;
    assert_int_equal(ncin_stride(&f, &v, &stride), PS_OK);
    assert_int_equal(stride, 6);
    float out[12];
    assert_int_equal(ncin_read_float(&f, &v, 0, 2, out), PS_OK);
    assert_true(out[0] == 1.0f && out[4] == 5.0f);
    assert_true(isnan(out[5]));                /* written as the fill value */
    for (size_t i = 6; i < 12; i++)
        assert_true(isnan(out[i]));            /* prompt 1 never written */
    double dd[6];
    assert_int_equal(ncin_read_double(&f, &v, 1, 1, dd), PS_OK);
    assert_true(isnan(dd[0]));
    /* no _FillValue attribute: the default fill still means "no value" */
    assert_int_equal(ncin_inq_var(&f, "d", &v), PS_OK);
    assert_int_equal(ncin_read_float(&f, &v, 1, 1, out), PS_OK);
    assert_true(out[0] == 0.5f && isnan(out[1]) && out[2] == -1.0f);
    /* no-fill mode: values as stored */
    assert_int_equal(ncin_inq_var(&f, "nf", &v), PS_OK);
    assert_int_equal(ncin_read_double(&f, &v, 0, 1, dd), PS_OK);
    assert_true(dd[0] == 7.25);
    ncin_close(&f);
}

static void test_ranges_types_and_dims(void **state)
{
    (void)state;
    ncin_file f;
    assert_int_equal(ncin_open(&f, path), PS_OK);
    ncin_var v;
    float out[24];
    assert_int_equal(ncin_inq_var(&f, "v", &v), PS_OK);
    assert_int_equal(ncin_read_float(&f, &v, 1, 2, out), PS_ERR_RANGE);
    assert_non_null(strstr(err_msg(), "r.nc: prompt 1..3 of variable 'v' out of range (length 2)"));
    assert_int_equal(ncin_read_float(&f, &v, 3, 0, out), PS_ERR_RANGE);
    static const char *const want[] = {"prompt", "layer", "head"};
    assert_false(ncin_dims_are(&v, want, 3));
    assert_int_equal(ncin_expect_dims(&f, &v, want, 3), PS_ERR_FORMAT);
    assert_non_null(strstr(err_msg(), "wrong dimensions: v(prompt, layer, position), expected v(prompt, layer, head)"));
    static const char *const have[] = {"prompt", "layer", "position"};
    assert_int_equal(ncin_expect_dims(&f, &v, have, 3), PS_OK);
    assert_int_equal(ncin_inq_var(&f, "nothing", &v), PS_ERR_INVALID);
    assert_non_null(strstr(err_msg(), "no variable 'nothing'"));
    assert_false(ncin_has_var(&f, "nothing"));
    assert_int_equal(ncin_inq_var(&f, "tok", &v), PS_OK);
    assert_false(ncin_is_numeric(&v));
    assert_int_equal(ncin_read_float(&f, &v, 0, 1, out), PS_ERR_FORMAT);
    assert_non_null(strstr(err_msg(), "'tok' is not numeric"));
    assert_int_equal(ncin_inq_var(&f, "packed", &v), PS_OK);
    assert_int_equal(ncin_read_float(&f, &v, 0, 1, out), PS_ERR_FORMAT);
    assert_non_null(strstr(err_msg(), "packed (scale_factor)"));
    assert_int_equal(ncin_inq_var(&f, "v", &v), PS_OK);
    char *s[3];
    assert_int_equal(ncin_read_strings(&f, &v, 0, 1, s), PS_ERR_FORMAT);
    assert_non_null(strstr(err_msg(), "'v' is not a string variable"));
    char **names;
    size_t n;
    assert_int_equal(ncin_var_names(&f, &names, &n), PS_OK);
    assert_int_equal(n, 5);
    assert_string_equal(names[0], "v");
    assert_string_equal(names[4], "packed");
    ncin_names_free(names, n);
    size_t len;
    assert_int_equal(ncin_dim_len(&f, "layer", &len), PS_OK);
    assert_int_equal(len, 2);
    assert_int_equal(ncin_dim_len(&f, "head", &len), PS_ERR_FORMAT);
    assert_non_null(strstr(err_msg(), "no dimension 'head'"));
    ncin_close(&f);
}

static void test_strings_and_attributes(void **state)
{
    (void)state;
    ncin_file f;
    assert_int_equal(ncin_open(&f, path), PS_OK);
    ncin_var v;
    assert_int_equal(ncin_inq_var(&f, "tok", &v), PS_OK);
    char *s[6];
    assert_int_equal(ncin_read_strings(&f, &v, 0, 2, s), PS_OK);
    assert_string_equal(s[0], " John");
    assert_string_equal(s[1], "bad\xef\xbf\xbd"); /* invalid UTF-8 shown as U+FFFD */
    assert_string_equal(s[2], "");                /* never written */
    assert_string_equal(s[5], "");
    for (size_t i = 0; i < 6; i++)
        free(s[i]);
    char *a;
    assert_int_equal(ncin_get_text_att(&f, NULL, "title", &a), PS_OK);
    assert_string_equal(a, "hello"); /* the counted NUL is dropped */
    free(a);
    assert_int_equal(ncin_get_text_att(&f, NULL, "s", &a), PS_OK);
    assert_string_equal(a, "as string");
    free(a);
    assert_int_equal(ncin_get_text_att(&f, NULL, "absent", &a), PS_OK);
    assert_null(a);
    assert_int_equal(ncin_get_text_att(&f, NULL, "n", &a), PS_ERR_FORMAT);
    assert_non_null(strstr(err_msg(), "attribute 'n' is not text"));
    ncin_close(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_open_refusals),
        cmocka_unit_test(test_open_mem),
        cmocka_unit_test(test_fill_values_become_nan),
        cmocka_unit_test(test_ranges_types_and_dims),
        cmocka_unit_test(test_strings_and_attributes),
    };
    return cmocka_run_group_tests_name("ncin", tests, setup, teardown);
}
