/*
 * results_roles: role positions, dataset metadata and role-aligned
 * aggregates of a results file (results_roles.h; names in schema.h).
 */
#include "results_roles.h"

#include <math.h>
#include <netcdf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ncout.h"
#include "schema.h"

#define RR_MAX_DIMS 4

static ps_status rr_check(int rc, const char *path, const char *what)
{
    return ncout_check(rc, path, what);
}

/* Enter define mode (NetCDF-4: already there is fine). */
static ps_status rr_redef(int ncid, const char *path)
{
    int rc = nc_redef(ncid);
    return rc == NC_EINDEFINE ? PS_OK : rr_check(rc, path, "define mode");
}

static ps_status rr_enddef(int ncid, const char *path)
{
    int rc = nc_enddef(ncid);
    return rc == NC_ENOTINDEFINE ? PS_OK : rr_check(rc, path, "end of definitions");
}

static ps_status put_long_name(int ncid, int var, const char *path, const char *text)
{
    return rr_check(nc_put_att_text(ncid, var, SCHEMA_ATT_LONG_NAME, strlen(text), text), path, text);
}

/* ---- templates of the dataset -------------------------------------------- */

static int cmp_ll(const void *a, const void *b)
{
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

/* Sort and drop repeats: ints[0..*n) and strs[0..*ns). */
static void templates_dedup(results_roles_templates *t)
{
    size_t w = 0;
    /* qsort's array may not be NULL, even for no elements (C17 7.22.5) */
    if (t->n_ints > 1)
        qsort(t->ints, t->n_ints, sizeof *t->ints, cmp_ll);
    for (size_t i = 0; i < t->n_ints; i++)
        if (i == 0 || t->ints[i] != t->ints[w - 1])
            t->ints[w++] = t->ints[i];
    t->n_ints = w;
    w = 0;
    if (t->n_strs > 1)
        qsort(t->strs, t->n_strs, sizeof *t->strs, cmp_str);
    for (size_t i = 0; i < t->n_strs; i++) {
        if (i == 0 || strcmp(t->strs[i], t->strs[w - 1]))
            t->strs[w++] = t->strs[i];
        else
            free(t->strs[i]);
    }
    t->n_strs = w;
    t->n_distinct = t->n_ints + t->n_strs;
}

ps_status results_roles_templates_add(results_roles_templates *t, const dataset_item *it)
{
    json_t *v = json_object_get(it->obj, SCHEMA_META_TEMPLATE);
    if (!json_is_integer(v) && !json_is_string(v))
        return PS_OK;
    /* a repeat of the last value is the common case (items grouped by template) */
    if (json_is_integer(v) && t->n_ints && t->ints[t->n_ints - 1] == (long long)json_integer_value(v))
        return PS_OK;
    if (json_is_string(v) && t->n_strs && !strcmp(t->strs[t->n_strs - 1], json_string_value(v)))
        return PS_OK;
    /* the values held stay under twice the distinct ones: sorted and
     * deduplicated when they reach it */
    if (t->n_ints + t->n_strs >= 2 * t->n_distinct + 64)
        templates_dedup(t);
    if (json_is_integer(v)) {
        if (t->n_ints == t->cap_ints) {
            size_t ncap = t->cap_ints ? 2 * t->cap_ints : 16;
            long long *q = realloc(t->ints, ncap * sizeof *q);
            if (!q)
                return err_set(PS_ERR_NOMEM, "out of memory");
            t->ints = q;
            t->cap_ints = ncap;
        }
        t->ints[t->n_ints++] = (long long)json_integer_value(v);
        return PS_OK;
    }
    if (t->n_strs == t->cap_strs) {
        size_t ncap = t->cap_strs ? 2 * t->cap_strs : 16;
        char **q = realloc(t->strs, ncap * sizeof *q);
        if (!q)
            return err_set(PS_ERR_NOMEM, "out of memory");
        t->strs = q;
        t->cap_strs = ncap;
    }
    if (!(t->strs[t->n_strs] = strdup(json_string_value(v))))
        return err_set(PS_ERR_NOMEM, "out of memory");
    t->n_strs++;
    return PS_OK;
}

void results_roles_templates_free(results_roles_templates *t)
{
    for (size_t i = 0; i < t->n_strs; i++)
        free(t->strs[i]);
    free(t->strs);
    free(t->ints);
    memset(t, 0, sizeof *t);
}

typedef struct {
    bool present, is_int;
    size_t n;
    const long long *ints; /* [n] sorted */
    const char **strs;     /* [n] sorted */
} rr_templates;

/* The template coordinate: the values of the kind the metadata field has. */
static void templates_collect(const results_roles_in *in, rr_templates *t)
{
    memset(t, 0, sizeof *t);
    for (size_t k = 0; k < in->meta->n; k++)
        if (!strcmp(in->meta->f[k].name, SCHEMA_META_TEMPLATE)) {
            t->present = true;
            t->is_int = in->meta->f[k].kind == DATASET_META_INT;
        }
    if (!t->present || !in->templates)
        return;
    results_roles_templates *tt = in->templates;
    templates_dedup(tt);
    t->n = t->is_int ? tt->n_ints : tt->n_strs;
    t->ints = tt->ints;
    t->strs = (const char **)tt->strs;
}

/* ---- results_roles_put ------------------------------------------------------ */

ps_status results_roles_put(int ncid, const char *path, const results_roles_in *in)
{
    ps_status st;
    int rc, prompt_dim, role_dim, tmpl_dim = -1, v_role, v_pos, v_tmpl = -1;
    int v_item[DATASET_MAX_META];
    const size_t R = in->roles->n, P = in->n;
    rr_templates tp;
    templates_collect(in, &tp);
    if ((st = rr_redef(ncid, path)))
        goto out;
    if ((rc = nc_inq_dimid(ncid, SCHEMA_DIM_PROMPT, &prompt_dim)) != NC_NOERR) {
        st = rr_check(rc, path, "dimension prompt");
        goto out;
    }
    int dims2[2] = {prompt_dim, 0};
    if ((st = rr_check(nc_def_dim(ncid, SCHEMA_DIM_ROLE, R, &role_dim), path, SCHEMA_DIM_ROLE)) ||
        (st = rr_check(nc_def_var(ncid, SCHEMA_VAR_ROLE, NC_STRING, 1, &role_dim, &v_role), path, SCHEMA_VAR_ROLE)) ||
        (st = put_long_name(ncid, v_role, path, "role: a named span of the clean prompt")))
        goto out;
    dims2[1] = role_dim;
    const int fill_pos = SCHEMA_FILL_ROLE_POSITION;
    if ((st = rr_check(nc_def_var(ncid, SCHEMA_VAR_ROLE_POSITION, NC_INT, 2, dims2, &v_pos), path,
                       SCHEMA_VAR_ROLE_POSITION)) ||
        (st = rr_check(nc_def_var_fill(ncid, v_pos, 0, &fill_pos), path, SCHEMA_VAR_ROLE_POSITION)) ||
        (st = put_long_name(ncid, v_pos, path, "token position of the role in the prompt (-1: absent)")))
        goto out;
    if (tp.present && tp.n > 0) {
        if ((st = rr_check(nc_def_dim(ncid, SCHEMA_DIM_TEMPLATE, tp.n, &tmpl_dim), path, SCHEMA_DIM_TEMPLATE)) ||
            (st = rr_check(nc_def_var(ncid, SCHEMA_VAR_TEMPLATE, tp.is_int ? NC_INT64 : NC_STRING, 1, &tmpl_dim,
                                      &v_tmpl),
                           path, SCHEMA_VAR_TEMPLATE)) ||
            (st = put_long_name(ncid, v_tmpl, path, "the dataset's template ids")))
            goto out;
    }
    for (size_t k = 0; k < in->meta->n; k++) {
        char name[NC_MAX_NAME + 1], ln[160];
        snprintf(name, sizeof name, SCHEMA_ITEM_PREFIX "%s", in->meta->f[k].name);
        bool is_int = in->meta->f[k].kind == DATASET_META_INT;
        const long long fill_i = SCHEMA_FILL_ITEM_INT;
        snprintf(ln, sizeof ln, "the dataset field '%s' of the prompt", in->meta->f[k].name);
        if ((st = rr_check(nc_def_var(ncid, name, is_int ? NC_INT64 : NC_STRING, 1, &prompt_dim, &v_item[k]), path,
                           name)) ||
            (is_int && (st = rr_check(nc_def_var_fill(ncid, v_item[k], 0, &fill_i), path, name))) ||
            (st = put_long_name(ncid, v_item[k], path, ln)) ||
            /* the prompts' labels: coordinates in xarray (groupby("item_template")) */
            (st = ncout_add_coordinate(ncid, path, name)))
            goto out;
    }
    if ((st = rr_enddef(ncid, path)))
        goto out;
    /* values */
    size_t start[2] = {0, 0}, count[2] = {R, 0};
    if ((st = rr_check(nc_put_vara_string(ncid, v_role, start, count, (const char **)in->roles->names), path,
                       SCHEMA_VAR_ROLE)))
        goto out;
    if (v_tmpl >= 0) {
        count[0] = tp.n;
        st = tp.is_int ? rr_check(nc_put_vara_longlong(ncid, v_tmpl, start, count, tp.ints), path, SCHEMA_VAR_TEMPLATE)
                       : rr_check(nc_put_vara_string(ncid, v_tmpl, start, count, tp.strs), path, SCHEMA_VAR_TEMPLATE);
        if (st)
            goto out;
    }
    if (P == 0)
        goto out;
    count[0] = P;
    count[1] = R;
    if ((st = rr_check(nc_put_vara_int(ncid, v_pos, start, count, in->role_pos), path, SCHEMA_VAR_ROLE_POSITION)))
        goto out;
    /* the metadata values, RR_META_BLOCK prompts at a time, each record
     * read once (in->item) */
    if (in->meta->n == 0)
        goto out;
    enum { RR_META_BLOCK = 4096 };
    const size_t B = P < RR_META_BLOCK ? P : RR_META_BLOCK, M = in->meta->n;
    json_t **objs = calloc(B, sizeof *objs);
    long long *iv = malloc(B * sizeof *iv);
    const char **sv = malloc(B * sizeof *sv);
    if (!objs || !iv || !sv)
        st = err_set(PS_ERR_NOMEM, "out of memory");
    for (size_t p0 = 0; p0 < P && st == PS_OK; p0 += B) {
        const size_t nb = P - p0 < B ? P - p0 : B;
        for (size_t q = 0; q < nb && st == PS_OK; q++)
            st = in->item(in->user, p0 + q, &objs[q]);
        for (size_t k = 0; k < M && st == PS_OK; k++) {
            bool is_int = in->meta->f[k].kind == DATASET_META_INT;
            for (size_t q = 0; q < nb; q++) {
                json_t *v = json_object_get(objs[q], in->meta->f[k].name);
                if (is_int)
                    iv[q] = json_is_integer(v) ? (long long)json_integer_value(v) : SCHEMA_FILL_ITEM_INT;
                else
                    sv[q] = json_is_string(v) ? json_string_value(v) : "";
            }
            start[0] = p0;
            count[0] = nb;
            st = is_int ? rr_check(nc_put_vara_longlong(ncid, v_item[k], start, count, iv), path, in->meta->f[k].name)
                        : rr_check(nc_put_vara_string(ncid, v_item[k], start, count, sv), path, in->meta->f[k].name);
        }
        for (size_t q = 0; q < nb; q++) {
            json_decref(objs[q]);
            objs[q] = NULL;
        }
    }
    free(objs);
    free(iv);
    free(sv);
out:
    return st;
}

/* ---- results_roles_aggregate ----------------------------------------------- */

/* The block of prompts' grid rows read at once (aggregate_var). */
#define RR_READ_BYTES ((size_t)8 << 20)

/* Running mean and M2 (Welford) per output cell. */
typedef struct {
    double *mean, *m2;
    int *count;
} rr_acc;

static ps_status acc_alloc(rr_acc *a, size_t n)
{
    a->mean = calloc(n ? n : 1, sizeof *a->mean);
    a->m2 = calloc(n ? n : 1, sizeof *a->m2);
    a->count = calloc(n ? n : 1, sizeof *a->count);
    return a->mean && a->m2 && a->count ? PS_OK : err_set(PS_ERR_NOMEM, "out of memory");
}

static void acc_free(rr_acc *a)
{
    free(a->mean);
    free(a->m2);
    free(a->count);
}

static void acc_add(rr_acc *a, size_t k, double x)
{
    int n = ++a->count[k];
    double d = x - a->mean[k];
    a->mean[k] += d / n;
    a->m2[k] += d * (x - a->mean[k]);
}

/* mean -> NaN where empty; m2 -> std (ddof 0) */
static void acc_finish(rr_acc *a, size_t n)
{
    for (size_t k = 0; k < n; k++) {
        if (a->count[k] == 0) {
            a->mean[k] = NAN;
            a->m2[k] = NAN;
        } else {
            a->m2[k] = sqrt(a->m2[k] / a->count[k]);
        }
    }
}

/* Define (if absent) NAME with dims and type; *id. */
static ps_status def_or_find(int ncid, const char *path, const char *name, nc_type type, int nd, const int *dims,
                             const char *long_name, int *id)
{
    if (nc_inq_varid(ncid, name, id) == NC_NOERR)
        return PS_OK;
    ps_status st = rr_redef(ncid, path);
    if (st == PS_OK)
        st = rr_check(nc_def_var(ncid, name, type, nd, dims, id), path, name);
    if (st == PS_OK)
        st = put_long_name(ncid, *id, path, long_name);
    return st;
}

/* The aggregates of one grid variable. */
static ps_status aggregate_var(int ncid, const char *path, int var, const char *name, size_t P, size_t R,
                               const int *role_pos, const signed char *done, const int *tmpl_of, size_t n_tmpl,
                               int tmpl_dim, int role_dim)
{
    int dims[RR_MAX_DIMS], nd;
    if (nc_inq_var(ncid, var, NULL, NULL, &nd, dims, NULL) != NC_NOERR)
        return PS_OK;
    size_t L, Tn, H = 1;
    nc_inq_dimlen(ncid, dims[1], &L);
    nc_inq_dimlen(ncid, dims[2], &Tn);
    if (nd == 4)
        nc_inq_dimlen(ncid, dims[3], &H);
    float fill = SCHEMA_FILL_GRID;
    int no_fill = 0;
    nc_inq_var_fill(ncid, var, &no_fill, &fill);
    const size_t cell = L * R * H, row = L * Tn * H;
    /* Prompts read RR_READ_BYTES at a time (at least one): one HDF5 read
     * per block instead of per prompt, whose fixed cost (a hyperslab, a
     * chunk lookup) made this the longest step after a sweep's last chunk
     * (41-61 ms of the demo's 128 prompts, 4 grids); the values are
     * accumulated in the same order, so the results are the same bits. */
    const size_t block = row && RR_READ_BYTES / (row * sizeof(float)) > 1 ? RR_READ_BYTES / (row * sizeof(float)) : 1;
    rr_acc all = {0}, per = {0};
    float *blk = malloc((row ? row : 1) * (P < block ? (P ? P : 1) : block) * sizeof *blk);
    ps_status st = blk ? PS_OK : err_set(PS_ERR_NOMEM, "out of memory");
    if (st == PS_OK)
        st = acc_alloc(&all, cell);
    if (st == PS_OK && n_tmpl)
        st = acc_alloc(&per, n_tmpl * cell);
    for (size_t p = 0, p0 = 0, pn = 0; p < P && st == PS_OK; p++) {
        if (done[p] != 1)
            continue;
        if (p >= p0 + pn) {
            /* the next block from this done prompt on */
            p0 = p;
            pn = P - p < block ? P - p : block;
            size_t start[RR_MAX_DIMS] = {p0, 0, 0, 0}, count[RR_MAX_DIMS] = {pn, L, Tn, H};
            if ((st = rr_check(nc_get_vara_float(ncid, var, start, count, blk), path, name)))
                break;
        }
        const float *buf = blk + (p - p0) * row;
        for (size_t r = 0; r < R; r++) {
            int pos = role_pos[p * R + r];
            if (pos < 0 || (size_t)pos >= Tn)
                continue;
            for (size_t l = 0; l < L; l++)
                for (size_t h = 0; h < H; h++) {
                    float x = buf[(l * Tn + (size_t)pos) * H + h];
                    if (x == fill || isnan(x))
                        continue;
                    size_t k = (l * R + r) * H + h;
                    acc_add(&all, k, x);
                    if (n_tmpl && tmpl_of[p] >= 0)
                        acc_add(&per, (size_t)tmpl_of[p] * cell + k, x);
                }
        }
    }
    free(blk);
    if (st == PS_OK) {
        acc_finish(&all, cell);
        if (n_tmpl)
            acc_finish(&per, n_tmpl * cell);
    }
    static const char *const sfx[2][3] = {
        {SCHEMA_BY_ROLE_SUFFIX, SCHEMA_BY_ROLE_STD_SUFFIX, SCHEMA_BY_ROLE_COUNT_SUFFIX},
        {SCHEMA_BY_ROLE_TEMPLATE_SUFFIX, SCHEMA_BY_ROLE_TEMPLATE_STD_SUFFIX, SCHEMA_BY_ROLE_TEMPLATE_COUNT_SUFFIX}};
    static const char *const what[3] = {"mean over done prompts of %s at each role",
                                        "standard deviation (ddof 0) over done prompts of %s at each role",
                                        "done prompts with a value of %s at each role"};
    for (int g = 0; g < (n_tmpl ? 2 : 1) && st == PS_OK; g++) {
        rr_acc *a = g ? &per : &all;
        int od[RR_MAX_DIMS], ond = 0;
        if (g)
            od[ond++] = tmpl_dim;
        od[ond++] = dims[1];
        od[ond++] = role_dim;
        if (nd == 4)
            od[ond++] = dims[3];
        for (int s = 0; s < 3 && st == PS_OK; s++) {
            char oname[NC_MAX_NAME + 1], ln[300];
            if ((size_t)snprintf(oname, sizeof oname, "%s%s", name, sfx[g][s]) >= sizeof oname)
                return err_set(PS_ERR_INVALID, "%s: variable name %s%s is too long", path, name, sfx[g][s]);
            snprintf(ln, sizeof ln, what[s], name);
            if (g)
                strncat(ln, ", per template", sizeof ln - strlen(ln) - 1);
            int id;
            st = def_or_find(ncid, path, oname, s == 2 ? NC_INT : NC_DOUBLE, ond, od, ln, &id);
            if (st == PS_OK)
                st = rr_enddef(ncid, path);
            if (st == PS_OK)
                st = s == 2 ? rr_check(nc_put_var_int(ncid, id, a->count), path, oname)
                            : rr_check(nc_put_var_double(ncid, id, s ? a->m2 : a->mean), path, oname);
        }
    }
    acc_free(&all);
    if (n_tmpl)
        acc_free(&per);
    return st;
}

ps_status results_roles_aggregate(int ncid, const char *path)
{
    int role_dim, prompt_dim, layer_dim, pos_dim, v_pos, v_done, rc;
    if (nc_inq_dimid(ncid, SCHEMA_DIM_ROLE, &role_dim) != NC_NOERR)
        return PS_OK;
    if ((rc = nc_inq_dimid(ncid, SCHEMA_DIM_PROMPT, &prompt_dim)) != NC_NOERR ||
        (rc = nc_inq_dimid(ncid, SCHEMA_DIM_LAYER, &layer_dim)) != NC_NOERR ||
        (rc = nc_inq_dimid(ncid, SCHEMA_DIM_POSITION, &pos_dim)) != NC_NOERR ||
        (rc = nc_inq_varid(ncid, SCHEMA_VAR_ROLE_POSITION, &v_pos)) != NC_NOERR ||
        (rc = nc_inq_varid(ncid, SCHEMA_VAR_DONE, &v_done)) != NC_NOERR)
        return rr_check(rc, path, "role-aligned means: the file lacks prompt, layer, position, role_position or done");
    size_t P, R;
    nc_inq_dimlen(ncid, prompt_dim, &P);
    nc_inq_dimlen(ncid, role_dim, &R);
    int *role_pos = malloc((P * R > 0 ? P * R : 1) * sizeof *role_pos);
    signed char *done = malloc(P ? P : 1);
    int *tmpl_of = malloc((P ? P : 1) * sizeof *tmpl_of);
    ps_status st = role_pos && done && tmpl_of ? PS_OK : err_set(PS_ERR_NOMEM, "out of memory");
    if (st == PS_OK && P > 0) {
        size_t start[2] = {0, 0}, count[2] = {P, R};
        if ((st = rr_check(nc_get_vara_int(ncid, v_pos, start, count, role_pos), path, SCHEMA_VAR_ROLE_POSITION)) ==
            PS_OK)
            st = rr_check(nc_get_vara_schar(ncid, v_done, start, count, done), path, SCHEMA_VAR_DONE);
    }
    /* templates: the coordinate and item_template, same type */
    int tmpl_dim = -1, v_tc, v_ti;
    size_t n_tmpl = 0;
    nc_type tt;
    if (st == PS_OK && nc_inq_dimid(ncid, SCHEMA_DIM_TEMPLATE, &tmpl_dim) == NC_NOERR &&
        nc_inq_varid(ncid, SCHEMA_VAR_TEMPLATE, &v_tc) == NC_NOERR &&
        nc_inq_varid(ncid, SCHEMA_ITEM_PREFIX SCHEMA_META_TEMPLATE, &v_ti) == NC_NOERR &&
        nc_inq_vartype(ncid, v_tc, &tt) == NC_NOERR && (tt == NC_INT64 || tt == NC_STRING)) {
        nc_inq_dimlen(ncid, tmpl_dim, &n_tmpl);
        for (size_t p = 0; p < P; p++)
            tmpl_of[p] = -1;
        if (n_tmpl && P) {
            size_t s0 = 0;
            if (tt == NC_INT64) {
                long long *c = malloc(n_tmpl * sizeof *c), *v = malloc(P * sizeof *v);
                if (c && v && nc_get_vara_longlong(ncid, v_tc, &s0, &n_tmpl, c) == NC_NOERR &&
                    nc_get_vara_longlong(ncid, v_ti, &s0, &P, v) == NC_NOERR)
                    for (size_t p = 0; p < P; p++)
                        for (size_t k = 0; k < n_tmpl; k++)
                            if (v[p] == c[k])
                                tmpl_of[p] = (int)k;
                free(c);
                free(v);
            } else {
                char **c = calloc(n_tmpl, sizeof *c), **v = calloc(P, sizeof *v);
                if (c && v && nc_get_vara_string(ncid, v_tc, &s0, &n_tmpl, c) == NC_NOERR) {
                    if (nc_get_vara_string(ncid, v_ti, &s0, &P, v) == NC_NOERR) {
                        for (size_t p = 0; p < P; p++)
                            for (size_t k = 0; k < n_tmpl; k++)
                                if (v[p] && c[k] && !strcmp(v[p], c[k]))
                                    tmpl_of[p] = (int)k;
                        nc_free_string(P, v);
                    }
                    nc_free_string(n_tmpl, c);
                }
                free(c);
                free(v);
            }
        }
    }
    /* every float grid of (prompt, layer, position[, head]) */
    int nv = 0;
    if (st == PS_OK)
        st = rr_check(nc_inq_nvars(ncid, &nv), path, "variables");
    for (int v = 0; v < nv && st == PS_OK; v++) {
        char name[NC_MAX_NAME + 1];
        nc_type type;
        int nd, dims[NC_MAX_VAR_DIMS];
        if (nc_inq_var(ncid, v, name, &type, &nd, NULL, NULL) != NC_NOERR || nd < 3 || nd > RR_MAX_DIMS ||
            type != NC_FLOAT)
            continue;
        nc_inq_vardimid(ncid, v, dims);
        if (dims[0] != prompt_dim || dims[1] != layer_dim || dims[2] != pos_dim)
            continue;
        st = aggregate_var(ncid, path, v, name, P, R, role_pos, done, tmpl_of, n_tmpl, tmpl_dim, role_dim);
    }
    free(role_pos);
    free(done);
    free(tmpl_of);
    return st;
}

/* ---- guards ------------------------------------------------------------------ */

ps_status results_roles_put_guards(int ncid, const char *path, const int *flags, size_t n, const char *text)
{
    int prompt_dim, v;
    ps_status st = rr_redef(ncid, path);
    if (st)
        return st;
    const int masks[4] = {SCHEMA_GUARD_IDENTICAL, SCHEMA_GUARD_SMALL_GAP, SCHEMA_GUARD_UNSPACED_ANSWER,
                          SCHEMA_GUARD_NOT_TOP_K};
    if ((st = rr_check(nc_inq_dimid(ncid, SCHEMA_DIM_PROMPT, &prompt_dim), path, SCHEMA_DIM_PROMPT)) ||
        (st = rr_check(nc_def_var(ncid, SCHEMA_VAR_GUARD, NC_INT, 1, &prompt_dim, &v), path, SCHEMA_VAR_GUARD)) ||
        (st = put_long_name(ncid, v, path, "guards against wrong conclusions that fired for the prompt (bit flags)")) ||
        (st = rr_check(nc_put_att_int(ncid, v, SCHEMA_ATT_FLAG_MASKS, NC_INT, 4, masks), path, SCHEMA_VAR_GUARD)) ||
        (st = rr_check(nc_put_att_text(ncid, v, SCHEMA_ATT_FLAG_MEANINGS, strlen(SCHEMA_GUARD_MEANINGS),
                                       SCHEMA_GUARD_MEANINGS),
                       path, SCHEMA_VAR_GUARD)) ||
        (st = rr_check(nc_put_att_text(ncid, NC_GLOBAL, SCHEMA_ATT_GUARDS, strlen(text), text), path,
                       SCHEMA_ATT_GUARDS)) ||
        (st = rr_enddef(ncid, path)))
        return st;
    size_t start = 0, count = n;
    return n ? rr_check(nc_put_vara_int(ncid, v, &start, &count, flags), path, SCHEMA_VAR_GUARD) : PS_OK;
}

void results_roles_gap_flags(const double *clean, const double *corrupted, size_t n, int *flags)
{
    double s1 = 0, s2 = 0;
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (!isnan(clean[i]) && !isnan(corrupted[i])) {
            s1 += clean[i] + corrupted[i];
            s2 += clean[i] * clean[i] + corrupted[i] * corrupted[i];
            k += 2;
        }
    double spread = k ? sqrt(fmax(0.0, s2 / (double)k - (s1 / (double)k) * (s1 / (double)k))) : 0.0;
    for (size_t i = 0; i < n; i++) {
        flags[i] &= ~SCHEMA_GUARD_SMALL_GAP;
        if (!(flags[i] & SCHEMA_GUARD_IDENTICAL) && !isnan(clean[i]) && !isnan(corrupted[i]) &&
            fabs(clean[i] - corrupted[i]) < SCHEMA_GUARD_GAP_FRACTION * spread)
            flags[i] |= SCHEMA_GUARD_SMALL_GAP;
    }
}

ps_status results_roles_regap(int ncid, const char *path)
{
    int v_g, v_c, v_k, v_d, prompt_dim;
    if (nc_inq_varid(ncid, SCHEMA_VAR_GUARD, &v_g) != NC_NOERR)
        return PS_OK;
    size_t P;
    int rc;
    if ((rc = nc_inq_dimid(ncid, SCHEMA_DIM_PROMPT, &prompt_dim)) != NC_NOERR ||
        (rc = nc_inq_dimlen(ncid, prompt_dim, &P)) != NC_NOERR ||
        (rc = nc_inq_varid(ncid, SCHEMA_VAR_CLEAN_METRIC, &v_c)) != NC_NOERR ||
        (rc = nc_inq_varid(ncid, SCHEMA_VAR_CORRUPTED_METRIC, &v_k)) != NC_NOERR ||
        (rc = nc_inq_varid(ncid, SCHEMA_VAR_DONE, &v_d)) != NC_NOERR)
        return rr_check(rc, path, "guards: the metrics");
    if (P == 0)
        return PS_OK;
    double *c = malloc(P * sizeof *c), *k = malloc(P * sizeof *k);
    int *g = malloc(P * sizeof *g);
    signed char *d = malloc(P);
    ps_status st = c && k && g && d ? PS_OK : err_set(PS_ERR_NOMEM, "out of memory");
    size_t s0 = 0;
    if (st == PS_OK && ((st = rr_check(nc_get_vara_double(ncid, v_c, &s0, &P, c), path, SCHEMA_VAR_CLEAN_METRIC)) ||
                        (st = rr_check(nc_get_vara_double(ncid, v_k, &s0, &P, k), path, SCHEMA_VAR_CORRUPTED_METRIC)) ||
                        (st = rr_check(nc_get_vara_schar(ncid, v_d, &s0, &P, d), path, SCHEMA_VAR_DONE)) ||
                        (st = rr_check(nc_get_vara_int(ncid, v_g, &s0, &P, g), path, SCHEMA_VAR_GUARD)))) {
    }
    if (st == PS_OK) {
        for (size_t i = 0; i < P; i++)
            if (d[i] != 1)
                c[i] = k[i] = NAN;
        results_roles_gap_flags(c, k, P, g);
        st = rr_check(nc_put_vara_int(ncid, v_g, &s0, &P, g), path, SCHEMA_VAR_GUARD);
    }
    free(c);
    free(k);
    free(g);
    free(d);
    return st;
}
