#include "merge.h"

#include <math.h>
#include <netcdf.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "dataset.h"
#include "fsutil.h"
#include "ncin.h"
#include "ncout.h"
#include "prov.h"
#include "results_roles.h"
#include "schema.h"

/* The results schema has at most 4 dimensions per variable (prompt, layer,
 * position, head); a little room for files of later versions. */
#define VAR_DIMS_MAX 8
#define FILE_DIMS_MAX 16
/* Bytes of one block of prompts copied at a time (per variable). */
#define BLOCK_BYTES ((size_t)16 << 20)
/* One prompt's row of one variable, beyond which a file is refused. */
#define MAX_ROW_BYTES ((size_t)1 << 30)

typedef struct {
    char name[NC_MAX_NAME + 1];
    size_t len;
} dim_info;

typedef struct {
    const char *path;
    ncin_file in;                /* the reader: attributes, flags */
    int ncid;                    /* in.ncid, for the raw copies; -1 when closed */
    int ndims;
    dim_info dims[FILE_DIMS_MAX]; /* by dimension id */
    int prompt_dim, position_dim; /* dimension ids; position_dim -1 when absent */
    int src_position_dim;         /* pattern_dest_src's, as long as position; -1 when absent */
    size_t n;                    /* prompts */
    size_t first;                /* prompt_index of its first prompt */
    size_t k, n_slices;          /* slice k of n_slices */
    size_t done, skipped;
} part;

/* Per-run provenance that merge writes anew and keeps as parts_NAME. */
static const char *const run_atts[] = {SCHEMA_ATT_PATCHSWEEP_VERSION, SCHEMA_ATT_COMMAND_LINE, SCHEMA_ATT_CREATED};
/* Describe the part alone; the merged file has its own. */
static const char *const dropped_atts[] = {SCHEMA_ATT_SLICE, SCHEMA_ATT_COMPLETE, SCHEMA_ATT_PROMPTS_DONE};

static bool in_list(const char *name, const char *const *list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(name, list[i]))
            return true;
    return false;
}

static ps_status read_fail(int rc, const char *path, const char *what)
{
    return err_set(PS_ERR_FORMAT, "%s: %s: %s", path, what, nc_strerror(rc));
}

static bool mul_ok(size_t a, size_t b, size_t *out)
{
    if (b && a > SIZE_MAX / b)
        return false;
    *out = a * b;
    return true;
}

/* A global text attribute (ncin_get_text_att), malloc'd; *value = NULL when
 * absent. */
static ps_status get_text_att(const part *p, const char *name, char **value)
{
    return ncin_get_text_att(&p->in, NULL, name, value);
}

static ps_status require_text_att(const part *p, const char *name, char **value)
{
    ps_status st = get_text_att(p, name, value);
    if (st == PS_OK && !*value)
        st = err_set(PS_ERR_FORMAT, "%s: no global attribute '%s': not a patchsweep results file", p->path, name);
    return st;
}

/* Open a part and read its dimensions, slice, flags and prompt indices. */
static ps_status part_open(part *p, const char *path)
{
    memset(p, 0, sizeof *p);
    p->path = path;
    p->ncid = -1;
    p->prompt_dim = p->position_dim = p->src_position_dim = -1;
    ps_status st = ncin_open(&p->in, path);
    if (st) {
        /* ncin's message without its "PATH: " */
        char why[512];
        const char *m = err_msg();
        size_t n = strlen(path);
        snprintf(why, sizeof why, "%s", !strncmp(m, path, n) && !strncmp(m + n, ": ", 2) ? m + n + 2 : m);
        return err_set(st, "%s: not a readable NetCDF file: %s", path, why);
    }
    p->ncid = p->in.ncid;
    int ndims, unlimited, rc;
    if ((rc = nc_inq(p->ncid, &ndims, NULL, NULL, &unlimited)) != NC_NOERR)
        return read_fail(rc, path, "cannot read its structure");
    if (ndims > FILE_DIMS_MAX)
        return err_set(PS_ERR_FORMAT, "%s: %d dimensions, more than a results file has", path, ndims);
    int ids[FILE_DIMS_MAX];
    if ((rc = nc_inq_dimids(p->ncid, &ndims, ids, 0)) != NC_NOERR)
        return read_fail(rc, path, "dimensions");
    for (int i = 0; i < ndims; i++)
        if (ids[i] != i)
            return err_set(PS_ERR_FORMAT, "%s: dimension ids are not 0..%d: not a patchsweep results file", path,
                           ndims - 1);
    p->ndims = ndims;
    for (int i = 0; i < ndims; i++) {
        if ((rc = nc_inq_dim(p->ncid, i, p->dims[i].name, &p->dims[i].len)) != NC_NOERR)
            return read_fail(rc, path, "dimensions");
        if (!strcmp(p->dims[i].name, SCHEMA_DIM_PROMPT))
            p->prompt_dim = i;
        else if (!strcmp(p->dims[i].name, SCHEMA_DIM_POSITION))
            p->position_dim = i;
        else if (!strcmp(p->dims[i].name, SCHEMA_DIM_SRC_POSITION))
            p->src_position_dim = i;
    }
    if (p->prompt_dim < 0 || p->prompt_dim != unlimited)
        return err_set(PS_ERR_FORMAT, "%s: no unlimited dimension 'prompt': not a patchsweep results file", path);
    p->n = p->dims[p->prompt_dim].len;
    if (p->n == 0)
        return err_set(PS_ERR_INVALID, "%s: holds no prompts", path);
    /* The length comes from the file's header, not from data it holds: a
     * few bytes can claim billions of prompts, for which the arrays below
     * would be allocated.  No sweep writes more than a dataset holds. */
    if (p->n > DATASET_MAX_ITEMS)
        return err_set(PS_ERR_NOMEM, "%s: %zu prompts, over the limit of %zu (the records of a dataset)", path, p->n,
                       DATASET_MAX_ITEMS);

    char *slice = NULL;
    bool complete = false, present = false;
    /* complete: 1 (schema 2) or "true" (schema 1) */
    st = schema_read_flag(&p->in, SCHEMA_ATT_COMPLETE, &complete, &present);
    if (st == PS_OK && !present)
        st = err_set(PS_ERR_FORMAT, "%s: no global attribute '%s': not a patchsweep results file", path,
                     SCHEMA_ATT_COMPLETE);
    else if (st == PS_OK && !complete)
        st = err_set(PS_ERR_INVALID, "%s: not complete (complete = 0): rerun its sweep command to finish it before merging",
                     path);
    if (st == PS_OK)
        st = require_text_att(p, SCHEMA_ATT_SLICE, &slice);
    if (st == PS_OK && !strcmp(slice, SCHEMA_SLICE_ALL))
        st = err_set(PS_ERR_INVALID, "%s: slice = \"all\": already the whole dataset, not a part of it", path);
    else if (st == PS_OK && !schema_parse_slice(slice, SIZE_MAX, &p->k, &p->n_slices))
        st = err_set(PS_ERR_FORMAT, "%s: slice = \"%s\" is not K/N", path, slice);
    free(slice);
    if (st)
        return st;

    /* the dataset indices (the prompt coordinate, schema 1's prompt_index):
     * consecutive, so that the part is one interval */
    const char *index_var = schema_prompt_index_var(&p->in);
    const char *const flag_names[] = {index_var ? index_var : SCHEMA_VAR_PROMPT, SCHEMA_VAR_DONE, SCHEMA_VAR_SKIPPED};
    static const char *const per_prompt[] = {SCHEMA_DIM_PROMPT};
    ncin_var flag_vars[3];
    for (size_t i = 0; i < 3; i++)
        if (!ncin_has_var(&p->in, flag_names[i]))
            return err_set(PS_ERR_FORMAT,
                           "%s: no prompt (or prompt_index), done or skipped variable: not a patchsweep results file", path);
    for (size_t i = 0; i < 3 && st == PS_OK; i++)
        if ((st = ncin_inq_var(&p->in, flag_names[i], &flag_vars[i])) == PS_OK)
            st = ncin_expect_dims(&p->in, &flag_vars[i], per_prompt, 1);
    if (st)
        return st;
    size_t bytes;
    if (!mul_ok(p->n, 3 * sizeof(double), &bytes))
        return err_set(PS_ERR_NOMEM, "%s: %zu prompts: too many", path, p->n);
    /* read as doubles (exact for every int32 index); a fill value is NaN */
    double *index = malloc(p->n * sizeof *index), *done = malloc(p->n * sizeof *done),
           *skipped = malloc(p->n * sizeof *skipped);
    if (!index || !done || !skipped)
        st = err_set(PS_ERR_NOMEM, "%s: out of memory for %zu prompts", path, p->n);
    if (st == PS_OK)
        st = ncin_read_double(&p->in, &flag_vars[0], 0, p->n, index);
    if (st == PS_OK)
        st = ncin_read_double(&p->in, &flag_vars[1], 0, p->n, done);
    if (st == PS_OK)
        st = ncin_read_double(&p->in, &flag_vars[2], 0, p->n, skipped);
    for (size_t i = 0; st == PS_OK && i < p->n; i++) {
        if (!(index[i] >= 0) || index[i] != floor(index[i]) || index[i] >= 0x1p53 ||
            (i > 0 && index[i] != index[0] + (double)i))
            st = err_set(PS_ERR_FORMAT, "%s: prompt %zu has prompt_index %.0f: the indices are not consecutive", path,
                         i, index[i]);
        else if (done[i] != 1 && skipped[i] != 1)
            st = err_set(PS_ERR_INVALID, "%s: prompt_index %.0f is neither done nor skipped: the part is not complete",
                         path, index[i]);
        else {
            p->done += done[i] == 1;
            p->skipped += done[i] != 1;
        }
    }
    if (st == PS_OK)
        p->first = (size_t)index[0];
    free(index);
    free(done);
    free(skipped);
    return st;
}

/* Same identity, dimensions and variables as the reference part. */
static ps_status part_check_against(const part *p, const part *ref)
{
    ps_status st = PS_OK;
    for (size_t i = 0; i < SCHEMA_N_IDENTITY_ATTS && st == PS_OK; i++) {
        char *a = NULL, *b = NULL;
        if ((st = require_text_att(ref, schema_identity_atts[i], &a)) == PS_OK &&
            (st = require_text_att(p, schema_identity_atts[i], &b)) == PS_OK && strcmp(a, b))
            st = err_set(PS_ERR_INVALID, "%s: %s \"%s\" differs from %s's \"%s\": parts of different runs", p->path,
                         schema_identity_atts[i], b, ref->path, a);
        free(a);
        free(b);
    }
    if (st)
        return st;
    if (p->ndims != ref->ndims)
        return err_set(PS_ERR_INVALID, "%s has %d dimensions, %s %d: parts of different runs", p->path, p->ndims,
                       ref->path, ref->ndims);
    for (int i = 0; i < p->ndims; i++) {
        if (strcmp(p->dims[i].name, ref->dims[i].name))
            return err_set(PS_ERR_INVALID, "%s: dimension %d is '%s', in %s '%s': parts of different runs", p->path, i,
                           p->dims[i].name, ref->path, ref->dims[i].name);
        if (i != p->prompt_dim && i != p->position_dim && i != p->src_position_dim && p->dims[i].len != ref->dims[i].len)
            return err_set(PS_ERR_INVALID, "%s: dimension %s has length %zu, in %s %zu: parts of different models",
                           p->path, p->dims[i].name, p->dims[i].len, ref->path, ref->dims[i].len);
    }
    int nv, nv_ref, rc;
    if ((rc = nc_inq_nvars(p->ncid, &nv)) != NC_NOERR)
        return read_fail(rc, p->path, "variables");
    if ((rc = nc_inq_nvars(ref->ncid, &nv_ref)) != NC_NOERR)
        return read_fail(rc, ref->path, "variables");
    for (int v = 0; v < nv_ref; v++) {
        char name[NC_MAX_NAME + 1];
        nc_type t_ref, t;
        int nd_ref, nd, d_ref[NC_MAX_VAR_DIMS], d[NC_MAX_VAR_DIMS], id;
        if ((rc = nc_inq_var(ref->ncid, v, name, &t_ref, &nd_ref, d_ref, NULL)) != NC_NOERR)
            return read_fail(rc, ref->path, "variables");
        if (nc_inq_varid(p->ncid, name, &id) != NC_NOERR)
            return err_set(PS_ERR_INVALID, "%s: no variable '%s' (%s has it): parts of different runs", p->path, name,
                           ref->path);
        if ((rc = nc_inq_var(p->ncid, id, NULL, &t, &nd, d, NULL)) != NC_NOERR)
            return read_fail(rc, p->path, name);
        bool same = t == t_ref && nd == nd_ref;
        for (int k = 0; same && k < nd; k++)
            same = !strcmp(p->dims[d[k]].name, ref->dims[d_ref[k]].name);
        if (!same)
            return err_set(PS_ERR_INVALID, "%s: variable '%s' has another type or other dimensions than in %s",
                           p->path, name, ref->path);
    }
    if (nv != nv_ref)
        return err_set(PS_ERR_INVALID, "%s has %d variables, %s %d: parts of different runs", p->path, nv, ref->path,
                       nv_ref);
    return PS_OK;
}

static int by_first(const void *a, const void *b)
{
    const part *x = *(const part *const *)a, *y = *(const part *const *)b;
    return (x->first > y->first) - (x->first < y->first);
}

/* The parts, sorted by their first prompt, tile 0..total-1 and are the
 * slices 1..N of one N, each holding exactly its slice's prompts. */
static ps_status check_tiling(part **sorted, size_t n_parts, size_t *total)
{
    const size_t n_slices = sorted[0]->n_slices;
    for (size_t i = 1; i < n_parts; i++)
        if (sorted[i]->n_slices != n_slices)
            return err_set(PS_ERR_INVALID, "%s is slice %zu/%zu but %s is slice %zu/%zu: parts of different splits",
                           sorted[i]->path, sorted[i]->k, sorted[i]->n_slices, sorted[0]->path, sorted[0]->k,
                           n_slices);
    if (sorted[0]->first > 0)
        return err_set(PS_ERR_INVALID, "gap: prompt_index 0..%zu is in no part (the first part given, %s, starts at %zu)",
                       sorted[0]->first - 1, sorted[0]->path, sorted[0]->first);
    size_t next = 0;
    for (size_t i = 0; i < n_parts; i++) {
        const part *p = sorted[i];
        if (p->first < next)
            return err_set(PS_ERR_INVALID, "overlap: %s and %s both hold prompt_index %zu..%zu", sorted[i - 1]->path,
                           p->path, p->first, (next < p->first + p->n ? next : p->first + p->n) - 1);
        if (p->first > next)
            return err_set(PS_ERR_INVALID, "gap: prompt_index %zu..%zu is in no part (between %s and %s)", next,
                           p->first - 1, sorted[i - 1]->path, p->path);
        next = p->first + p->n;
    }
    /* Every index is held once; a missing last part shows in the slices. */
    bool *seen = calloc(n_slices + 1, sizeof *seen);
    if (!seen)
        return err_set(PS_ERR_NOMEM, "out of memory");
    ps_status st = PS_OK;
    for (size_t i = 0; i < n_parts && st == PS_OK; i++) {
        if (seen[sorted[i]->k])
            st = err_set(PS_ERR_INVALID, "%s: slice %zu/%zu given twice", sorted[i]->path, sorted[i]->k, n_slices);
        seen[sorted[i]->k] = true;
    }
    for (size_t k = 1; k <= n_slices && st == PS_OK; k++)
        if (!seen[k])
            st = err_set(PS_ERR_INVALID, "gap: slice %zu/%zu is missing (the %zu parts given end at prompt_index %zu)",
                         k, n_slices, n_parts, next - 1);
    free(seen);
    if (st)
        return st;
    /* the sweep's split (sweep.c, plan_load): slice k of n holds
     * [(k-1) T / n, k T / n), in the same size_t arithmetic */
    for (size_t i = 0; i < n_parts; i++) {
        const part *p = sorted[i];
        size_t lo = (p->k - 1) * next / n_slices, hi = p->k * next / n_slices;
        if (p->first != lo || p->first + p->n != hi)
            return err_set(PS_ERR_INVALID,
                           "%s: slice %zu/%zu of %zu prompts is prompt_index %zu..%zu, but the file holds %zu..%zu",
                           p->path, p->k, n_slices, next, lo, hi - 1, p->first, p->first + p->n - 1);
    }
    *total = next;
    return PS_OK;
}

/* ---- global attributes ----------------------------------------------------- */

static bool att_equal(const part *a, const part *b, const char *name)
{
    nc_type ta, tb;
    size_t la, lb;
    if (nc_inq_att(a->ncid, NC_GLOBAL, name, &ta, &la) != NC_NOERR ||
        nc_inq_att(b->ncid, NC_GLOBAL, name, &tb, &lb) != NC_NOERR || ta != tb || la != lb)
        return false;
    if (la == 0)
        return true;
    if (ta == NC_STRING) {
        char **sa = calloc(la, sizeof *sa), **sb = calloc(lb, sizeof *sb);
        bool eq = sa && sb && nc_get_att_string(a->ncid, NC_GLOBAL, name, sa) == NC_NOERR &&
                  nc_get_att_string(b->ncid, NC_GLOBAL, name, sb) == NC_NOERR;
        for (size_t i = 0; eq && i < la; i++)
            eq = !strcmp(sa[i] ? sa[i] : "", sb[i] ? sb[i] : "");
        if (sa)
            nc_free_string(la, sa);
        if (sb)
            nc_free_string(lb, sb);
        free(sa);
        free(sb);
        return eq;
    }
    size_t size;
    if (nc_inq_type(a->ncid, ta, NULL, &size) != NC_NOERR || ta > NC_STRING)
        return false;
    unsigned char *va = malloc(la * size), *vb = malloc(lb * size);
    bool eq = va && vb && nc_get_att(a->ncid, NC_GLOBAL, name, va) == NC_NOERR &&
              nc_get_att(b->ncid, NC_GLOBAL, name, vb) == NC_NOERR && !memcmp(va, vb, la * size);
    free(va);
    free(vb);
    return eq;
}

/* parts_NAME: every part's text value of NAME ("" where absent), one per line. */
static ps_status put_joined(ncout_file *f, part **sorted, size_t n_parts, const char *name)
{
    char out_name[NC_MAX_NAME + 1];
    if ((size_t)snprintf(out_name, sizeof out_name, SCHEMA_ATT_PARTS_PREFIX "%s", name) >= sizeof out_name)
        return err_set(PS_ERR_FORMAT, "%s: global attribute '%s' differs between the parts and its name is too long "
                       "to keep as parts_%s", sorted[0]->path, name, name);
    char *joined = NULL;
    size_t len = 0;
    ps_status st = PS_OK;
    for (size_t i = 0; i < n_parts && st == PS_OK; i++) {
        char *v = NULL;
        if ((st = get_text_att(sorted[i], name, &v)))
            break;
        size_t n = v ? strlen(v) : 0;
        char *grown = realloc(joined, len + n + 2);
        if (!grown) {
            free(v);
            st = err_set(PS_ERR_NOMEM, "out of memory");
            break;
        }
        joined = grown;
        if (i > 0)
            joined[len++] = '\n';
        memcpy(joined + len, v ? v : "", n);
        len += n;
        joined[len] = '\0';
        free(v);
    }
    if (st == PS_OK)
        st = ncout_put_attr(f, out_name, joined ? joined : "");
    free(joined);
    return st;
}

static ps_status put_global_atts(ncout_file *f, part **sorted, size_t n_parts, size_t done)
{
    const size_t n_run = sizeof run_atts / sizeof run_atts[0], n_dropped = sizeof dropped_atts / sizeof dropped_atts[0];
    ps_status st = PS_OK;
    /* the parts' attributes in the first part's order, then those only
     * other parts have */
    for (size_t src = 0; src < n_parts && st == PS_OK; src++) {
        int natts, rc;
        if ((rc = nc_inq_natts(sorted[src]->ncid, &natts)) != NC_NOERR)
            return read_fail(rc, sorted[src]->path, "global attributes");
        for (int a = 0; a < natts && st == PS_OK; a++) {
            char name[NC_MAX_NAME + 1];
            if ((rc = nc_inq_attname(sorted[src]->ncid, NC_GLOBAL, a, name)) != NC_NOERR)
                return read_fail(rc, sorted[src]->path, "global attributes");
            bool seen_before = false;
            for (size_t j = 0; j < src && !seen_before; j++)
                seen_before = nc_inq_attid(sorted[j]->ncid, NC_GLOBAL, name, &(int){0}) == NC_NOERR;
            if (seen_before || in_list(name, dropped_atts, n_dropped))
                continue;
            if (!strcmp(name, SCHEMA_ATT_COORDINATES)) {
                /* the union of the parts' lists (a part written back by
                 * xarray lists them per variable, not globally) */
                for (size_t j = 0; j < n_parts && st == PS_OK; j++) {
                    char *list = NULL;
                    if ((st = get_text_att(sorted[j], name, &list)) == PS_OK && list)
                        for (char *save = NULL, *w = strtok_r(list, " ", &save); w && st == PS_OK;
                             w = strtok_r(NULL, " ", &save))
                            st = ncout_add_coordinate(f->ncid, f->tmp_path, w);
                    free(list);
                }
                continue;
            }
            bool equal = !in_list(name, run_atts, n_run);
            for (size_t j = 0; j < n_parts && equal; j++)
                equal = j == src || att_equal(sorted[src], sorted[j], name);
            if (equal)
                st = ncout_check(nc_copy_att(sorted[src]->ncid, NC_GLOBAL, name, f->ncid, NC_GLOBAL), f->tmp_path,
                                 name);
            else
                st = put_joined(f, sorted, n_parts, name);
        }
    }
    if (st)
        return st;
    char *from = NULL;
    size_t len = 0;
    for (size_t i = 0; i < n_parts; i++) {
        size_t n = strlen(sorted[i]->path);
        char *grown = realloc(from, len + n + 2);
        if (!grown) {
            free(from);
            return err_set(PS_ERR_NOMEM, "out of memory");
        }
        from = grown;
        if (i > 0)
            from[len++] = '\n';
        memcpy(from + len, sorted[i]->path, n + 1);
        len += n;
    }
    char created[32], num[32];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(created, sizeof created, "%Y-%m-%dT%H:%M:%SZ", &tm);
    snprintf(num, sizeof num, "%zu", done);
    /* complete as the parts' schema writes it: 1, or "true" (schema 1) */
    st = ncout_put_attr(f, SCHEMA_ATT_SLICE, SCHEMA_SLICE_ALL);
    if (st == PS_OK && schema_version(&sorted[0]->in) >= 2)
        st = ncout_put_flag(f, SCHEMA_ATT_COMPLETE, true);
    else if (st == PS_OK)
        st = ncout_put_attr(f, SCHEMA_ATT_COMPLETE, SCHEMA_TRUE);
    const char *const mine[][2] = {{SCHEMA_ATT_PROMPTS_DONE, num},
                                   {SCHEMA_ATT_MERGED_FROM, from},
                                   {SCHEMA_ATT_PATCHSWEEP_VERSION, prov_version()},
                                   {SCHEMA_ATT_COMMAND_LINE, prov_command_line()},
                                   {SCHEMA_ATT_CREATED, created}};
    for (size_t i = 0; i < sizeof mine / sizeof mine[0] && st == PS_OK; i++)
        st = ncout_put_attr(f, mine[i][0], mine[i][1]);
    free(from);
    return st;
}

/* ---- variables ------------------------------------------------------------- */

typedef struct {
    char name[NC_MAX_NAME + 1];
    nc_type type;
    size_t elem;                 /* bytes per value (a char * for strings) */
    int nd;
    int dims[VAR_DIMS_MAX];      /* dimension ids (equal in every part and the output) */
    bool per_prompt;             /* dims[0] is prompt */
    int out_id;
    unsigned char fill[8];       /* the output's fill value (numeric types) */
} var_plan;

static ps_status define_vars(ncout_file *f, const part *ref, const size_t *out_len, var_plan **plans, int *n_plans)
{
    int nv, rc;
    if ((rc = nc_inq_nvars(ref->ncid, &nv)) != NC_NOERR)
        return read_fail(rc, ref->path, "variables");
    var_plan *vp = calloc(nv > 0 ? (size_t)nv : 1, sizeof *vp);
    if (!vp)
        return err_set(PS_ERR_NOMEM, "out of memory");
    *plans = vp;
    *n_plans = nv;
    ps_status st = PS_OK;
    for (int v = 0; v < nv && st == PS_OK; v++) {
        var_plan *p = &vp[v];
        int natts;
        if ((rc = nc_inq_varndims(ref->ncid, v, &p->nd)) != NC_NOERR)
            return read_fail(rc, ref->path, "variables");
        if (p->nd > VAR_DIMS_MAX)
            return err_set(PS_ERR_FORMAT, "%s: a variable has %d dimensions, more than a results file has", ref->path,
                           p->nd);
        if ((rc = nc_inq_var(ref->ncid, v, p->name, &p->type, &p->nd, p->dims, &natts)) != NC_NOERR)
            return read_fail(rc, ref->path, "variables");
        if (p->type == NC_STRING)
            p->elem = sizeof(char *);
        else if (p->type < NC_BYTE || p->type > NC_UINT64 || p->type == NC_CHAR ||
                 nc_inq_type(ref->ncid, p->type, NULL, &p->elem) != NC_NOERR || p->elem > sizeof p->fill)
            return err_set(PS_ERR_FORMAT, "%s: variable '%s' has a type merge does not copy (not a number or string)",
                           ref->path, p->name);
        for (int k = 0; k < p->nd; k++)
            if (p->dims[k] == ref->prompt_dim && k > 0)
                return err_set(PS_ERR_FORMAT, "%s: variable '%s' has 'prompt' as a dimension other than its first",
                               ref->path, p->name);
        p->per_prompt = p->nd > 0 && p->dims[0] == ref->prompt_dim;
        if ((st = ncout_check(nc_def_var(f->ncid, p->name, p->type, p->nd, p->dims, &p->out_id), f->tmp_path,
                              p->name)))
            return st;
        /* the attributes, _FillValue included (which sets the fill value) */
        for (int a = 0; a < natts && st == PS_OK; a++) {
            char an[NC_MAX_NAME + 1];
            if ((rc = nc_inq_attname(ref->ncid, v, a, an)) != NC_NOERR)
                return read_fail(rc, ref->path, p->name);
            st = ncout_check(nc_copy_att(ref->ncid, v, an, f->ncid, p->out_id), f->tmp_path, an);
        }
        /* one prompt per chunk, as the sweep writes them */
        if (st == PS_OK && p->per_prompt && p->type != NC_STRING) {
            size_t chunk[VAR_DIMS_MAX];
            chunk[0] = 1;
            for (int k = 1; k < p->nd; k++)
                chunk[k] = out_len[p->dims[k]] ? out_len[p->dims[k]] : 1;
            st = ncout_check(nc_def_var_chunking(f->ncid, p->out_id, NC_CHUNKED, chunk), f->tmp_path, p->name);
        }
        int shuffle, deflate, level;
        if (st == PS_OK && nc_inq_var_deflate(ref->ncid, v, &shuffle, &deflate, &level) == NC_NOERR && deflate)
            st = ncout_check(nc_def_var_deflate(f->ncid, p->out_id, shuffle, deflate, level), f->tmp_path, p->name);
        if (st == PS_OK && p->type != NC_STRING) {
            int no_fill, valid_min;
            st = ncout_check(nc_inq_var_fill(f->ncid, p->out_id, &no_fill, p->fill), f->tmp_path, p->name);
            /* ids (schema 2: valid_min 0, no _FillValue) pad with -1 */
            if (st == PS_OK && p->type == NC_INT &&
                nc_inq_attid(ref->ncid, v, SCHEMA_ATT_FILL_VALUE, &(int){0}) != NC_NOERR &&
                nc_get_att_int(ref->ncid, v, SCHEMA_ATT_VALID_MIN, &valid_min) == NC_NOERR && valid_min == 0) {
                const int none = SCHEMA_FILL_TOKEN_ID;
                memcpy(p->fill, &none, sizeof none);
            }
        }
    }
    return st;
}

/* Elements of one prompt's row (dims after prompt) in a file whose
 * dimension lengths are len[]; the whole variable when not per prompt. */
static ps_status row_shape(const var_plan *p, const size_t *len, size_t *shape, size_t *elems, const char *path)
{
    size_t n = 1;
    int from = p->per_prompt ? 1 : 0;
    for (int k = from; k < p->nd; k++) {
        shape[k - from] = len[p->dims[k]];
        if (!mul_ok(n, shape[k - from], &n))
            return err_set(PS_ERR_NOMEM, "%s: variable '%s' is too large", path, p->name);
    }
    size_t bytes;
    if (!mul_ok(n, p->elem, &bytes) || bytes > MAX_ROW_BYTES)
        return err_set(PS_ERR_NOMEM, "%s: variable '%s' has %zu values per prompt: too many", path, p->name, n);
    *elems = n;
    return PS_OK;
}

/* Copy src (row-major, shape ss[0..nd)) into the leading corner of dst
 * (shape ds[0..nd), ds >= ss elementwise); the rest of dst is untouched. */
static void scatter(unsigned char *dst, const unsigned char *src, const size_t *ss, const size_t *ds, size_t nd,
                    size_t elem)
{
    if (nd == 0) {
        memcpy(dst, src, elem);
        return;
    }
    size_t outer = 1;
    for (size_t k = 0; k + 1 < nd; k++)
        outer *= ss[k];
    const size_t inner = ss[nd - 1] * elem;
    size_t idx[VAR_DIMS_MAX] = {0};
    for (size_t o = 0; o < outer; o++) {
        size_t off = 0;
        for (size_t k = 0; k + 1 < nd; k++)
            off = off * ds[k] + idx[k];
        memcpy(dst + off * ds[nd - 1] * elem, src + o * inner, inner);
        for (size_t k = nd - 1; k-- > 0;) {
            if (++idx[k] < ss[k])
                break;
            idx[k] = 0;
        }
    }
}

static char empty_string[] = "";

static void fill_values(unsigned char *buf, size_t n, const var_plan *p)
{
    for (size_t i = 0; i < n; i++) {
        if (p->type == NC_STRING) {
            char *s = empty_string;
            memcpy(buf + i * p->elem, &s, sizeof s);
        } else {
            memcpy(buf + i * p->elem, p->fill, p->elem);
        }
    }
}

/* Prompts [0, src->n) of one per-prompt variable of one part to rows
 * [src->first, ...) of the output, padded, in blocks of prompts. */
static ps_status copy_part_var(ncout_file *f, const part *src, const var_plan *p, const size_t *out_len)
{
    size_t ss[VAR_DIMS_MAX], ds[VAR_DIMS_MAX], n_src, n_dst;
    size_t src_len[FILE_DIMS_MAX];
    for (int i = 0; i < src->ndims; i++)
        src_len[i] = src->dims[i].len;
    ps_status st;
    if ((st = row_shape(p, src_len, ss, &n_src, src->path)) || (st = row_shape(p, out_len, ds, &n_dst, f->path)))
        return st;
    int id, rc;
    if ((rc = nc_inq_varid(src->ncid, p->name, &id)) != NC_NOERR)
        return read_fail(rc, src->path, p->name);
    const size_t row_bytes = n_dst * p->elem;
    size_t block = BLOCK_BYTES / (row_bytes ? row_bytes : 1);
    block = block < 1 ? 1 : block > src->n ? src->n : block;
    unsigned char *in = malloc(block * n_src * p->elem), *out = malloc(block * row_bytes);
    if (!in || !out) {
        free(in);
        free(out);
        return err_set(PS_ERR_NOMEM, "out of memory for a block of '%s'", p->name);
    }
    const size_t nd = (size_t)p->nd - 1;
    for (size_t r0 = 0; r0 < src->n && st == PS_OK; r0 += block) {
        const size_t rows = src->n - r0 < block ? src->n - r0 : block;
        size_t start[VAR_DIMS_MAX] = {r0}, count[VAR_DIMS_MAX] = {rows};
        for (size_t k = 0; k < nd; k++)
            count[k + 1] = ss[k];
        if ((rc = nc_get_vara(src->ncid, id, start, count, in)) != NC_NOERR) {
            st = read_fail(rc, src->path, p->name);
            break;
        }
        fill_values(out, rows * n_dst, p);
        for (size_t r = 0; r < rows; r++)
            scatter(out + r * row_bytes, in + r * n_src * p->elem, ss, ds, nd, p->elem);
        start[0] = src->first + r0;
        for (size_t k = 0; k < nd; k++)
            count[k + 1] = ds[k];
        st = ncout_check(nc_put_vara(f->ncid, p->out_id, start, count, out), f->tmp_path, p->name);
        if (p->type == NC_STRING)
            nc_free_string(rows * n_src, (char **)in);
    }
    free(in);
    free(out);
    return st;
}

/* A variable without the prompt dimension (the coordinates layer, position,
 * head), from the part with the most positions, whose shape is the output's. */
static ps_status copy_fixed_var(ncout_file *f, const part *src, const var_plan *p, const size_t *out_len)
{
    size_t shape[VAR_DIMS_MAX], n;
    ps_status st = row_shape(p, out_len, shape, &n, f->path);
    if (st)
        return st;
    int id, rc;
    if ((rc = nc_inq_varid(src->ncid, p->name, &id)) != NC_NOERR)
        return read_fail(rc, src->path, p->name);
    unsigned char *buf = malloc(n ? n * p->elem : 1);
    if (!buf)
        return err_set(PS_ERR_NOMEM, "out of memory for '%s'", p->name);
    size_t start[VAR_DIMS_MAX] = {0};
    if ((rc = nc_get_vara(src->ncid, id, start, shape, buf)) != NC_NOERR)
        st = read_fail(rc, src->path, p->name);
    else {
        st = ncout_check(nc_put_vara(f->ncid, p->out_id, start, shape, buf), f->tmp_path, p->name);
        if (p->type == NC_STRING)
            nc_free_string(n, (char **)buf);
    }
    free(buf);
    return st;
}

/* ---- the merge -------------------------------------------------------------- */

/* Before any work: the output may be new or a regular file (fs_check_output,
 * as every writer), and must not be one of the parts it replaces. */
static ps_status check_output(const char *output, const part *parts, size_t n_parts)
{
    struct stat so, sp;
    ps_status st = fs_check_output(output);
    if (st || stat(output, &so) != 0)
        return st;
    for (size_t i = 0; i < n_parts; i++)
        if (stat(parts[i].path, &sp) == 0 && sp.st_dev == so.st_dev && sp.st_ino == so.st_ino)
            return err_set(PS_ERR_INVALID, "%s: the output is one of the parts (%s)", output, parts[i].path);
    return PS_OK;
}

ps_status merge_files(const char *const *paths, size_t n_parts, const char *output, merge_result *res)
{
    memset(res, 0, sizeof *res);
    if (n_parts == 0)
        return err_set(PS_ERR_INVALID, "no parts to merge");
    if (n_parts > MERGE_MAX_PARTS)
        return err_set(PS_ERR_INVALID, "%zu parts: at most %zu can be merged", n_parts, MERGE_MAX_PARTS);
    part *parts = calloc(n_parts, sizeof *parts);
    part **sorted = calloc(n_parts, sizeof *sorted);
    if (!parts || !sorted) {
        free(parts);
        free(sorted);
        return err_set(PS_ERR_NOMEM, "out of memory");
    }
    for (size_t i = 0; i < n_parts; i++)
        parts[i].ncid = -1;
    ps_status st = PS_OK;
    for (size_t i = 0; i < n_parts && st == PS_OK; i++) {
        st = part_open(&parts[i], paths[i]);
        if (st == PS_OK && i > 0)
            st = part_check_against(&parts[i], &parts[0]);
        sorted[i] = &parts[i];
    }
    size_t total = 0;
    if (st == PS_OK) {
        qsort(sorted, n_parts, sizeof *sorted, by_first);
        st = check_tiling(sorted, n_parts, &total);
    }
    if (st == PS_OK)
        st = check_output(output, parts, n_parts);
    if (st)
        goto out;

    /* output dimensions: the parts', with position the largest part's */
    const part *ref = &parts[0], *widest = sorted[0];
    size_t out_len[FILE_DIMS_MAX];
    for (int i = 0; i < ref->ndims; i++)
        out_len[i] = ref->dims[i].len;
    out_len[ref->prompt_dim] = total;
    if (ref->position_dim >= 0)
        for (size_t i = 0; i < n_parts; i++)
            if (sorted[i]->dims[ref->position_dim].len > widest->dims[ref->position_dim].len)
                widest = sorted[i];
    if (ref->position_dim >= 0)
        out_len[ref->position_dim] = widest->dims[ref->position_dim].len;
    if (ref->src_position_dim >= 0)
        out_len[ref->src_position_dim] = widest->dims[ref->src_position_dim].len;

    ncout_file f;
    if ((st = ncout_create(&f, output)))
        goto out;
    var_plan *plans = NULL;
    int n_plans = 0;
    for (int i = 0; i < ref->ndims && st == PS_OK; i++) {
        int id;
        st = ncout_check(nc_def_dim(f.ncid, ref->dims[i].name, i == ref->prompt_dim ? NC_UNLIMITED : out_len[i], &id),
                         f.tmp_path, ref->dims[i].name);
        if (st == PS_OK && id != i)
            st = err_set(PS_ERR_INTERNAL, "%s: dimension %s got id %d, not %d", f.tmp_path, ref->dims[i].name, id, i);
    }
    size_t done = 0, skipped = 0;
    for (size_t i = 0; i < n_parts; i++) {
        done += parts[i].done;
        skipped += parts[i].skipped;
    }
    if (st == PS_OK)
        st = put_global_atts(&f, sorted, n_parts, done);
    if (st == PS_OK)
        st = define_vars(&f, ref, out_len, &plans, &n_plans);
    if (st == PS_OK)
        st = ncout_check(nc_enddef(f.ncid), f.tmp_path, "end of definitions");
    for (int v = 0; v < n_plans && st == PS_OK; v++) {
        if (!plans[v].per_prompt)
            st = copy_fixed_var(&f, widest, &plans[v], out_len);
        for (size_t i = 0; plans[v].per_prompt && i < n_parts && st == PS_OK; i++)
            st = copy_part_var(&f, sorted[i], &plans[v], out_len);
    }
    free(plans);
    /* the role-aligned means of the whole dataset, not of the widest part */
    if (st == PS_OK)
        st = results_roles_aggregate(f.ncid, f.tmp_path);
    /* atp+exact's summary over every part's prompts */
    if (st == PS_OK)
        st = ncout_atp_summary(f.ncid, f.tmp_path, NULL);
    if (st == PS_OK)
        st = results_roles_regap(f.ncid, f.tmp_path);
    if (st == PS_OK)
        st = ncout_commit(&f);
    else
        ncout_abort(&f);
    if (st == PS_OK) {
        res->parts = n_parts;
        res->prompts = total;
        res->done = done;
        res->skipped = skipped;
        res->positions = ref->position_dim >= 0 ? out_len[ref->position_dim] : 0;
        res->variables = (size_t)n_plans;
    }
out:
    for (size_t i = 0; i < n_parts; i++)
        if (parts[i].ncid >= 0)
            ncin_close(&parts[i].in);
    free(parts);
    free(sorted);
    return st;
}
