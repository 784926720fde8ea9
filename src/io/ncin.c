#include "ncin.h"

#include <math.h>
#include <netcdf.h>
#include <netcdf_mem.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fsutil.h"
#include "sha256.h"
#include "strutil.h"

/* Attribute texts beyond this are refused rather than allocated
 * (model_config, the largest we write, is a few KiB). */
#define NCIN_MAX_ATT_BYTES ((size_t)16 << 20)

static ps_status nc_fail(int rc, const ncin_file *f, const char *what)
{
    return err_set(rc > 0 ? PS_ERR_IO : PS_ERR_FORMAT, "%s: %s: %s", f->path, what, nc_strerror(rc));
}

/* Finish an open: nc_open's (or nc_open_mem's) status `rc` -> *f or the
 * message.  f->path is set. */
static ps_status open_done(ncin_file *f, int rc, int ncid)
{
    const char *path = f->path;
    if (rc == NC_NOERR) {
        f->ncid = ncid;
        return PS_OK;
    }
    ps_status st;
    if (rc > 0) /* a system errno: missing, unreadable, a directory */
        st = err_set(PS_ERR_IO, "%s: cannot open: %s", path, nc_strerror(rc));
    else if (rc == NC_ENOTNC)
        st = err_set(PS_ERR_FORMAT, "%s: not a NetCDF file", path);
    else
        st = err_set(PS_ERR_FORMAT, "%s: cannot read as NetCDF: %s", path, nc_strerror(rc));
    free(f->path);
    f->path = NULL;
    return st;
}

ps_status ncin_verify(const char *path)
{
    char side[4200];
    snprintf(side, sizeof side, "%s.sha256", path);
    if (access(side, F_OK) != 0)
        return PS_OK;
    char *text = NULL, have[65];
    size_t len = 0;
    ps_status st = fs_read_file(side, 4096, &text, &len);
    if (st)
        return st;
    bool hex = len >= 64;
    for (size_t i = 0; hex && i < 64; i++)
        hex = strchr("0123456789abcdef", text[i]) != NULL && text[i];
    if (!hex) {
        free(text);
        return err_set(PS_ERR_FORMAT, "%s: not a sha256 line (as `sha256sum` writes it)", side);
    }
    if ((st = sha256_file_hex(path, have))) {
        free(text);
        return st;
    }
    bool same = memcmp(text, have, 64) == 0;
    free(text);
    if (same)
        return PS_OK;
    struct stat sb;
    long long size = stat(path, &sb) == 0 ? (long long)sb.st_size : -1;
    return err_set(PS_ERR_FORMAT,
                   "%s: damaged: its sha256 is not the one recorded in %s when it was written (changed or truncated "
                   "since; %lld bytes now): not read; recompute it (or restore it from a copy)", path, side, size);
}

ps_status ncin_open(ncin_file *f, const char *path)
{
    f->ncid = -1;
    f->path = NULL;
    struct stat sb;
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode))
        return err_set(PS_ERR_IO, "%s: is a directory, not a NetCDF file", path);
    ps_status st = ncin_verify(path);
    if (st)
        return st;
    f->path = strdup(path);
    if (!f->path)
        return err_set(PS_ERR_NOMEM, "%s: out of memory", path);
    int ncid = -1, rc = nc_open(path, NC_NOWRITE, &ncid);
    return open_done(f, rc, ncid);
}

ps_status ncin_open_mem(ncin_file *f, const char *name, const void *buf, size_t size)
{
    f->ncid = -1;
    f->path = strdup(name);
    if (!f->path)
        return err_set(PS_ERR_NOMEM, "%s: out of memory", name);
    /* NetCDF takes a non-const pointer but opens NC_NOWRITE images read-only
     * (HDF5's file-image driver copies nothing back). */
    int ncid = -1, rc = nc_open_mem(name, NC_NOWRITE, size, (void *)buf, &ncid);
    return open_done(f, rc, ncid);
}

void ncin_close(ncin_file *f)
{
    if (f->ncid >= 0)
        nc_close(f->ncid);
    f->ncid = -1;
    free(f->path);
    f->path = NULL;
}

ps_status ncin_dim_len(const ncin_file *f, const char *name, size_t *len)
{
    int dimid, rc = nc_inq_dimid(f->ncid, name, &dimid);
    if (rc == NC_EBADDIM)
        return err_set(PS_ERR_FORMAT, "%s: no dimension '%s'", f->path, name);
    if (rc != NC_NOERR)
        return nc_fail(rc, f, name);
    if ((rc = nc_inq_dimlen(f->ncid, dimid, len)) != NC_NOERR)
        return nc_fail(rc, f, name);
    return PS_OK;
}

bool ncin_has_var(const ncin_file *f, const char *name)
{
    int varid;
    return nc_inq_varid(f->ncid, name, &varid) == NC_NOERR;
}

void ncin_names_free(char **names, size_t n)
{
    if (!names)
        return;
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
}

ps_status ncin_var_names(const ncin_file *f, char ***names, size_t *n)
{
    *names = NULL;
    *n = 0;
    int nvars, rc = nc_inq_varids(f->ncid, &nvars, NULL);
    if (rc != NC_NOERR)
        return nc_fail(rc, f, "list of variables");
    if (nvars <= 0)
        return PS_OK;
    int *ids = malloc((size_t)nvars * sizeof *ids);
    char **out = calloc((size_t)nvars, sizeof *out);
    if (!ids || !out) {
        free(ids);
        free(out);
        return err_set(PS_ERR_NOMEM, "%s: out of memory", f->path);
    }
    int again;
    rc = nc_inq_varids(f->ncid, &again, ids);
    if (rc != NC_NOERR || again != nvars) {
        free(ids);
        free(out);
        return rc != NC_NOERR ? nc_fail(rc, f, "list of variables")
                              : err_set(PS_ERR_FORMAT, "%s: the number of variables changed", f->path);
    }
    for (int i = 0; i < nvars; i++) {
        char name[NC_MAX_NAME + 1];
        if ((rc = nc_inq_varname(f->ncid, ids[i], name)) != NC_NOERR || !(out[i] = strdup(name))) {
            ncin_names_free(out, (size_t)nvars);
            free(ids);
            return rc != NC_NOERR ? nc_fail(rc, f, "variable name")
                                  : err_set(PS_ERR_NOMEM, "%s: out of memory", f->path);
        }
    }
    free(ids);
    *names = out;
    *n = (size_t)nvars;
    return PS_OK;
}

ps_status ncin_inq_var(const ncin_file *f, const char *name, ncin_var *v)
{
    memset(v, 0, sizeof *v);
    int rc = nc_inq_varid(f->ncid, name, &v->varid);
    if (rc == NC_ENOTVAR)
        return err_set(PS_ERR_INVALID, "%s: no variable '%s'", f->path, name);
    if (rc != NC_NOERR)
        return nc_fail(rc, f, name);
    if (strlen(name) > NCIN_MAX_NAME)
        return err_set(PS_ERR_FORMAT, "%s: variable name too long", f->path);
    strcpy(v->name, name);
    nc_type type;
    int ndims;
    if ((rc = nc_inq_vartype(f->ncid, v->varid, &type)) != NC_NOERR ||
        (rc = nc_inq_varndims(f->ncid, v->varid, &ndims)) != NC_NOERR)
        return nc_fail(rc, f, name);
    if (ndims < 0 || ndims > NCIN_MAX_DIMS)
        return err_set(PS_ERR_FORMAT, "%s: variable '%s' has %d dimensions (at most %d are read)", f->path, name,
                       ndims, NCIN_MAX_DIMS);
    int dimids[NCIN_MAX_DIMS];
    if ((rc = nc_inq_vardimid(f->ncid, v->varid, dimids)) != NC_NOERR)
        return nc_fail(rc, f, name);
    v->type = type;
    v->ndim = (size_t)ndims;
    for (size_t i = 0; i < v->ndim; i++)
        if ((rc = nc_inq_dim(f->ncid, dimids[i], v->dim_names[i], &v->shape[i])) != NC_NOERR)
            return nc_fail(rc, f, name);
    return PS_OK;
}

bool ncin_dims_are(const ncin_var *v, const char *const *dims, size_t n)
{
    if (v->ndim != n)
        return false;
    for (size_t i = 0; i < n; i++)
        if (strcmp(v->dim_names[i], dims[i]))
            return false;
    return true;
}

void ncin_describe(const ncin_var *v, char *buf, size_t size)
{
    if (size == 0)
        return;
    size_t k = (size_t)snprintf(buf, size, "%s(", v->name);
    for (size_t i = 0; i < v->ndim && k < size; i++)
        k += (size_t)snprintf(buf + k, size - k, "%s%s", i ? ", " : "", v->dim_names[i]);
    if (k < size)
        snprintf(buf + k, size - k, ")");
}

ps_status ncin_expect_dims(const ncin_file *f, const ncin_var *v, const char *const *dims, size_t n)
{
    if (ncin_dims_are(v, dims, n))
        return PS_OK;
    char have[512], want[512];
    ncin_describe(v, have, sizeof have);
    ncin_var e = {.ndim = n};
    strcpy(e.name, v->name);
    for (size_t i = 0; i < n && i < NCIN_MAX_DIMS; i++)
        snprintf(e.dim_names[i], sizeof e.dim_names[i], "%s", dims[i]);
    ncin_describe(&e, want, sizeof want);
    return err_set(PS_ERR_FORMAT, "%s: wrong dimensions: %s, expected %s", f->path, have, want);
}

ps_status ncin_stride(const ncin_file *f, const ncin_var *v, size_t *stride)
{
    size_t s = 1;
    for (size_t i = 1; i < v->ndim; i++) {
        if (v->shape[i] != 0 && s > NCIN_MAX_ELEMENTS / v->shape[i])
            return err_set(PS_ERR_NOMEM, "%s: variable '%s' is too large (more than %zu values per index)", f->path,
                           v->name, NCIN_MAX_ELEMENTS);
        s *= v->shape[i];
    }
    *stride = s;
    return PS_OK;
}

static bool is_numeric(int type)
{
    switch (type) {
    case NC_BYTE: case NC_UBYTE: case NC_SHORT: case NC_USHORT: case NC_INT: case NC_UINT:
    case NC_INT64: case NC_UINT64: case NC_FLOAT: case NC_DOUBLE:
        return true;
    default:
        return false;
    }
}

/* Check the slab [first, first + count) of the first dimension and return
 * start/count arrays and the element total. */
static ps_status slab(const ncin_file *f, const ncin_var *v, size_t first, size_t count, size_t start[NCIN_MAX_DIMS],
                      size_t cnt[NCIN_MAX_DIMS], size_t *total)
{
    if (v->ndim == 0)
        return err_set(PS_ERR_FORMAT, "%s: variable '%s' is a scalar, expected an array", f->path, v->name);
    if (first > v->shape[0] || count > v->shape[0] - first)
        return err_set(PS_ERR_RANGE, "%s: %s %zu..%zu of variable '%s' out of range (length %zu)", f->path,
                       v->dim_names[0], first, first + count, v->name, v->shape[0]);
    size_t stride = 0;
    ps_status st = ncin_stride(f, v, &stride);
    if (st)
        return st;
    if (stride != 0 && count > NCIN_MAX_ELEMENTS / stride)
        return err_set(PS_ERR_NOMEM, "%s: reading %zu x %zu values of '%s' exceeds the limit of %zu", f->path, count,
                       stride, v->name, NCIN_MAX_ELEMENTS);
    start[0] = first;
    cnt[0] = count;
    for (size_t i = 1; i < v->ndim; i++) {
        start[i] = 0;
        cnt[i] = v->shape[i];
    }
    *total = count * stride;
    return PS_OK;
}

/* The value that marks "no value" in v, if any. */
static ps_status fill_value(const ncin_file *f, const ncin_var *v, bool *has, double *fill)
{
    *has = false;
    nc_type att_type;
    size_t att_len;
    int rc = nc_inq_att(f->ncid, v->varid, "_FillValue", &att_type, &att_len);
    if (rc == NC_NOERR) {
        if (!is_numeric(att_type) || att_len != 1)
            return err_set(PS_ERR_FORMAT, "%s: variable '%s' has a malformed _FillValue", f->path, v->name);
        if ((rc = nc_get_att_double(f->ncid, v->varid, "_FillValue", fill)) != NC_NOERR && rc != NC_ERANGE)
            return nc_fail(rc, f, "_FillValue");
        *has = true;
        return PS_OK;
    }
    if (rc != NC_ENOTATT)
        return nc_fail(rc, f, "_FillValue");
    /* No attribute: unwritten values hold the type's default fill, unless
     * the variable was defined in no-fill mode. */
    int no_fill;
    union {
        signed char b; unsigned char ub; short s; unsigned short us; int i; unsigned int ui;
        long long ll; unsigned long long ull; float fl; double d;
    } u;
    if ((rc = nc_inq_var_fill(f->ncid, v->varid, &no_fill, &u)) != NC_NOERR)
        return nc_fail(rc, f, "fill mode");
    if (no_fill)
        return PS_OK;
    switch (v->type) {
    case NC_BYTE: *fill = u.b; break;
    case NC_UBYTE: *fill = u.ub; break;
    case NC_SHORT: *fill = u.s; break;
    case NC_USHORT: *fill = u.us; break;
    case NC_INT: *fill = u.i; break;
    case NC_UINT: *fill = u.ui; break;
    case NC_INT64: *fill = (double)u.ll; break;
    case NC_UINT64: *fill = (double)u.ull; break;
    case NC_FLOAT: *fill = u.fl; break;
    default: *fill = u.d; break;
    }
    *has = true;
    return PS_OK;
}

/* Packed values (scale_factor / add_offset) would plot as raw integers. */
static ps_status refuse_packed(const ncin_file *f, const ncin_var *v)
{
    static const char *const packing[] = {"scale_factor", "add_offset"};
    for (size_t i = 0; i < 2; i++) {
        int rc = nc_inq_att(f->ncid, v->varid, packing[i], NULL, NULL);
        if (rc == NC_NOERR)
            return err_set(PS_ERR_FORMAT, "%s: variable '%s' is packed (%s), which is not supported", f->path,
                           v->name, packing[i]);
        if (rc != NC_ENOTATT)
            return nc_fail(rc, f, packing[i]);
    }
    return PS_OK;
}

bool ncin_is_numeric(const ncin_var *v)
{
    return is_numeric(v->type);
}

static ps_status read_prepare(const ncin_file *f, const ncin_var *v, size_t first, size_t count,
                              size_t start[NCIN_MAX_DIMS], size_t cnt[NCIN_MAX_DIMS], size_t *total, bool *has_fill,
                              double *fill)
{
    if (!is_numeric(v->type))
        return err_set(PS_ERR_FORMAT, "%s: variable '%s' is not numeric", f->path, v->name);
    ps_status st;
    if ((st = slab(f, v, first, count, start, cnt, total)) || (st = refuse_packed(f, v)))
        return st;
    return fill_value(f, v, has_fill, fill);
}

ps_status ncin_read_float(const ncin_file *f, const ncin_var *v, size_t first, size_t count, float *out)
{
    size_t start[NCIN_MAX_DIMS], cnt[NCIN_MAX_DIMS], total;
    bool has_fill;
    double fill = 0;
    ps_status st = read_prepare(f, v, first, count, start, cnt, &total, &has_fill, &fill);
    if (st || total == 0)
        return st;
    int rc = nc_get_vara_float(f->ncid, v->varid, start, cnt, out);
    if (rc == NC_ERANGE)
        return err_set(PS_ERR_FORMAT, "%s: variable '%s' holds values outside the float range", f->path, v->name);
    if (rc != NC_NOERR)
        return nc_fail(rc, f, v->name);
    if (has_fill) {
        const float ff = (float)fill;
        for (size_t i = 0; i < total; i++)
            if (out[i] == ff)
                out[i] = NAN;
    }
    return PS_OK;
}

ps_status ncin_read_double(const ncin_file *f, const ncin_var *v, size_t first, size_t count, double *out)
{
    size_t start[NCIN_MAX_DIMS], cnt[NCIN_MAX_DIMS], total;
    bool has_fill;
    double fill = 0;
    ps_status st = read_prepare(f, v, first, count, start, cnt, &total, &has_fill, &fill);
    if (st || total == 0)
        return st;
    int rc = nc_get_vara_double(f->ncid, v->varid, start, cnt, out);
    if (rc != NC_NOERR)
        return nc_fail(rc, f, v->name);
    if (has_fill) {
        /* Compare in the variable's own precision: a float variable's fill
         * read as double is (double)(float)fill. */
        const double ff = v->type == NC_FLOAT ? (double)(float)fill : fill;
        for (size_t i = 0; i < total; i++)
            if (out[i] == ff)
                out[i] = NAN;
    }
    return PS_OK;
}

ps_status ncin_read_strings(const ncin_file *f, const ncin_var *v, size_t first, size_t count, char **out)
{
    if (v->type != NC_STRING)
        return err_set(PS_ERR_FORMAT, "%s: variable '%s' is not a string variable", f->path, v->name);
    size_t start[NCIN_MAX_DIMS], cnt[NCIN_MAX_DIMS], total;
    ps_status st = slab(f, v, first, count, start, cnt, &total);
    if (st || total == 0)
        return st;
    char **raw = calloc(total, sizeof *raw);
    if (!raw)
        return err_set(PS_ERR_NOMEM, "%s: out of memory", f->path);
    int rc = nc_get_vara_string(f->ncid, v->varid, start, cnt, raw);
    if (rc != NC_NOERR) {
        free(raw);
        return nc_fail(rc, f, v->name);
    }
    size_t done = 0;
    for (; done < total; done++) {
        const char *s = raw[done] ? raw[done] : "";
        if (!(out[done] = str_utf8_sanitize(s, strlen(s))))
            break;
    }
    nc_free_string(total, raw);
    free(raw);
    if (done < total) {
        for (size_t i = 0; i < done; i++)
            free(out[i]);
        return err_set(PS_ERR_NOMEM, "%s: out of memory", f->path);
    }
    return PS_OK;
}

/* Attribute `name` of variable `var` (NULL: global): its variable id, type
 * and length; *found false (and PS_OK) when the variable has no such
 * attribute. */
static ps_status att_find(const ncin_file *f, const char *var, const char *name, int *varid, nc_type *type,
                          size_t *len, bool *found)
{
    int rc;
    *found = false;
    *varid = NC_GLOBAL;
    if (var && (rc = nc_inq_varid(f->ncid, var, varid)) != NC_NOERR)
        return nc_fail(rc, f, var);
    rc = nc_inq_att(f->ncid, *varid, name, type, len);
    if (rc == NC_ENOTATT)
        return PS_OK;
    if (rc != NC_NOERR)
        return nc_fail(rc, f, name);
    *found = true;
    return PS_OK;
}

ps_status ncin_get_text_att(const ncin_file *f, const char *var, const char *name, char **value)
{
    *value = NULL;
    int varid, rc;
    nc_type type;
    size_t len;
    bool found;
    ps_status st = att_find(f, var, name, &varid, &type, &len, &found);
    if (st || !found)
        return st;
    if (type == NC_CHAR) {
        if (len > NCIN_MAX_ATT_BYTES)
            return err_set(PS_ERR_FORMAT, "%s: attribute '%s' is too long (%zu bytes)", f->path, name, len);
        char *raw = malloc(len + 1);
        if (!raw)
            return err_set(PS_ERR_NOMEM, "%s: out of memory", f->path);
        if (len && (rc = nc_get_att_text(f->ncid, varid, name, raw)) != NC_NOERR) {
            free(raw);
            return nc_fail(rc, f, name);
        }
        /* C writers often count the terminating NUL. */
        while (len && raw[len - 1] == '\0')
            len--;
        *value = str_utf8_sanitize(raw, len);
        free(raw);
    } else if (type == NC_STRING && len == 1) {
        char *s = NULL;
        if ((rc = nc_get_att_string(f->ncid, varid, name, &s)) != NC_NOERR)
            return nc_fail(rc, f, name);
        const char *t = s ? s : "";
        size_t n = strlen(t);
        *value = n > NCIN_MAX_ATT_BYTES ? NULL : str_utf8_sanitize(t, n);
        nc_free_string(1, &s);
        if (n > NCIN_MAX_ATT_BYTES)
            return err_set(PS_ERR_FORMAT, "%s: attribute '%s' is too long (%zu bytes)", f->path, name, n);
    } else {
        return err_set(PS_ERR_FORMAT, "%s: attribute '%s' is not text", f->path, name);
    }
    return *value ? PS_OK : err_set(PS_ERR_NOMEM, "%s: out of memory", f->path);
}

ps_status ncin_get_num_att(const ncin_file *f, const char *var, const char *name, double *vals, size_t cap,
                           size_t *n, bool *present)
{
    *n = 0;
    *present = false;
    int varid, rc;
    nc_type type;
    size_t len;
    bool found;
    ps_status st = att_find(f, var, name, &varid, &type, &len, &found);
    if (st || !found)
        return st;
    if (type == NC_CHAR || type == NC_STRING)
        return err_set(PS_ERR_FORMAT, "%s: attribute '%s' is text, not a number", f->path, name);
    if (len > cap)
        return err_set(PS_ERR_FORMAT, "%s: attribute '%s' has %zu values (at most %zu expected)", f->path, name, len,
                       cap);
    /* nc_get_att_double converts every numeric type */
    if (len && (rc = nc_get_att_double(f->ncid, varid, name, vals)) != NC_NOERR)
        return nc_fail(rc, f, name);
    *n = len;
    *present = true;
    return PS_OK;
}
