#include "ncout.h"
#include "fault.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netcdf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fsutil.h"
#include "gemm.h"
#include "gemm_bf16.h"
#include "prov.h"
#include "schema.h"
#include "sha256.h"
#include "strutil.h"

/* A nc_close failed: HDF5 keeps the file in its tables and closes it again
 * at exit, where 1.10.8 crashes after a failed write (ncout_exit_unsafe). */
static bool close_failed;

bool ncout_exit_unsafe(void) { return close_failed; }

ps_status ncout_check(int nc_status, const char *path, const char *what)
{
    if (nc_status == NC_NOERR)
        return PS_OK;
    /* NetCDF says "HDF error" (or "Permission denied" from nc_create) for a
     * full disk: the system's reason, still in errno, is the one to show. */
    int e = errno;
    if (e == ENOSPC || e == EDQUOT || e == EIO || e == EFBIG || e == EROFS)
        return err_set(PS_ERR_IO, "%s: %s: %s (%s)", path, what, strerror(e), nc_strerror(nc_status));
    return err_set(PS_ERR_IO, "%s: %s: %s", path, what, nc_strerror(nc_status));
}

ps_status ncout_check_writable(const char *path)
{
    ps_status st = fs_check_output(path);
    if (st)
        return st;
    char *dir = fs_dirname(path);
    if (!dir)
        return err_set(PS_ERR_NOMEM, "%s: out of memory", path);
    if (access(dir, F_OK) != 0)
        st = err_set(PS_ERR_IO, "%s: output directory '%s' does not exist", path, dir);
    else if (access(dir, W_OK) != 0)
        st = err_set(PS_ERR_IO, "%s: output directory '%s' is not writable", path, dir);
    free(dir);
    return st;
}

ps_status ncout_create(ncout_file *f, const char *path)
{
    memset(f, 0, sizeof *f);
    f->ncid = -1;
    /* Say what is wrong with the directory before NetCDF's generic message. */
    ps_status st = ncout_check_writable(path);
    if (st)
        return st;
    f->path = strdup(path);
    size_t n = strlen(path);
    f->tmp_path = malloc(n + sizeof ".partial");
    if (!f->path || !f->tmp_path) {
        ncout_abort(f);
        return err_set(PS_ERR_NOMEM, "%s: out of memory", path);
    }
    memcpy(f->tmp_path, path, n);
    memcpy(f->tmp_path + n, ".partial", sizeof ".partial");
    /* A .partial left by a writer that was killed is garbage; unlinking it
     * (rather than clobbering it in place) gives the new file its own inode,
     * so an HDF5 lock still held by a dying process cannot refuse us. */
    unlink(f->tmp_path);
    int ncid;
    int rc = nc_create(f->tmp_path, NC_NETCDF4 | NC_CLOBBER, &ncid);
    if (rc != NC_NOERR) {
        st = ncout_check(rc, f->tmp_path, "cannot create");
        ncout_abort(f);
        return st;
    }
    f->ncid = ncid;
    return PS_OK;
}

/* fsync a file (or directory) by name: what is renamed into place must be
 * on disk first, or a crash could leave the final name on an empty file. */
static ps_status sync_path(const char *path, bool dir)
{
    int fd = open(path, (dir ? O_DIRECTORY : 0) | O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return err_set(PS_ERR_IO, "%s: cannot open to sync: %s", path, strerror(errno));
    int rc = fsync(fd), e = errno;
    close(fd);
    /* some file systems cannot sync a directory (EINVAL): nothing to wait for */
    if (rc != 0 && !(dir && (e == EINVAL || e == EROFS)))
        return err_set(PS_ERR_IO, "%s: fsync failed: %s", path, strerror(e));
    return PS_OK;
}

/* PATH.sha256: the sha256 of the whole file written (ncin_verify checks
 * it before a reader opens the file), by way of PATH.sha256.tmp. */
static ps_status write_sidecar(const ncout_file *f, char side[4200])
{
    char hex[65], tmp[4300];
    ps_status st = sha256_file_hex(f->tmp_path, hex);
    if (st)
        return st;
    snprintf(side, 4200, "%s.sha256", f->path);
    snprintf(tmp, sizeof tmp, "%s.tmp", side);
    const char *base = strrchr(f->path, '/') ? strrchr(f->path, '/') + 1 : f->path;
    FILE *out = fopen(tmp, "w");
    if (!out)
        return err_set(PS_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
    bool ok = fprintf(out, "%s  %s\n", hex, base) > 0 && fflush(out) == 0;
    int e = errno;
    if (fclose(out) != 0 && ok) {
        ok = false;
        e = errno;
    }
    if (!ok)
        st = err_set(PS_ERR_IO, "%s: cannot write: %s", tmp, strerror(e));
    else if ((st = sync_path(tmp, false)) == PS_OK && rename(tmp, side) != 0)
        st = err_set(PS_ERR_IO, "%s: cannot rename to %s: %s", tmp, side, strerror(errno));
    if (st)
        unlink(tmp);
    return st;
}

ps_status ncout_commit(ncout_file *f)
{
    ps_status st = PS_OK;
    char side[4200] = "";
    if (f->ncid >= 0) {
        st = ncout_check(nc_close(f->ncid), f->tmp_path, "cannot close");
        close_failed = close_failed || st != PS_OK;
        f->ncid = -1;
    }
    if (st == PS_OK)
        st = sync_path(f->tmp_path, false);
    if (st == PS_OK)
        st = write_sidecar(f, side);
    if (st == PS_OK && rename(f->tmp_path, f->path) != 0) {
        st = err_set(PS_ERR_IO, "%s: cannot rename from %s: %s", f->path, f->tmp_path, strerror(errno));
        unlink(side);
    }
    if (st == PS_OK) {
        /* the renames durable: best effort, the file is complete either way */
        char *dir = fs_dirname(f->path);
        if (dir)
            sync_path(dir, true);
        free(dir);
    }
    if (st != PS_OK)
        unlink(f->tmp_path);
    free(f->path);
    free(f->tmp_path);
    f->path = f->tmp_path = NULL;
    return st;
}

void ncout_abort(ncout_file *f)
{
    if (f->ncid >= 0 && nc_close(f->ncid) != NC_NOERR)
        close_failed = true;
    f->ncid = -1;
    if (f->tmp_path)
        unlink(f->tmp_path);
    free(f->path);
    free(f->tmp_path);
    f->path = f->tmp_path = NULL;
}

ps_status ncout_put_attr(ncout_file *f, const char *name, const char *value)
{
    return ncout_check(nc_put_att_text(f->ncid, NC_GLOBAL, name, strlen(value), value), f->tmp_path, name);
}

ps_status ncout_put_flag(ncout_file *f, const char *name, bool value)
{
    const int v = value;
    return ncout_check(nc_put_att_int(f->ncid, NC_GLOBAL, name, NC_INT, 1, &v), f->tmp_path, name);
}

ps_status ncout_add_coordinate(int ncid, const char *path, const char *name)
{
    /* the global attribute `coordinates`, a space-separated list (CF's
     * variable attribute, which xarray also reads on the file): each name
     * once, in the order added */
    size_t len = 0;
    char *list = NULL;
    if (nc_inq_attlen(ncid, NC_GLOBAL, SCHEMA_ATT_COORDINATES, &len) == NC_NOERR) {
        if (!(list = malloc(len + strlen(name) + 2)))
            return err_set(PS_ERR_NOMEM, "%s: out of memory", path);
        ps_status st = ncout_check(nc_get_att_text(ncid, NC_GLOBAL, SCHEMA_ATT_COORDINATES, list), path,
                                   SCHEMA_ATT_COORDINATES);
        if (st) {
            free(list);
            return st;
        }
        list[len] = '\0';
        const size_t n = strlen(name);
        for (const char *p = list; (p = strstr(p, name)); p += n)
            if ((p == list || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\0')) {
                free(list);
                return PS_OK;
            }
        list[len++] = ' ';
    } else if (!(list = malloc(strlen(name) + 1))) {
        return err_set(PS_ERR_NOMEM, "%s: out of memory", path);
    }
    memcpy(list + len, name, strlen(name) + 1);
    ps_status st = ncout_check(nc_put_att_text(ncid, NC_GLOBAL, SCHEMA_ATT_COORDINATES, strlen(list), list), path,
                               SCHEMA_ATT_COORDINATES);
    free(list);
    return st;
}

ps_status ncout_def_flag_var(int ncid, const char *path, int var, const char *meanings)
{
    static const signed char values[2] = {0, 1};
    ps_status st = ncout_check(nc_put_att_schar(ncid, var, SCHEMA_ATT_FLAG_VALUES, NC_BYTE, 2, values), path,
                               SCHEMA_ATT_FLAG_VALUES);
    if (st == PS_OK)
        st = ncout_check(nc_put_att_text(ncid, var, SCHEMA_ATT_FLAG_MEANINGS, strlen(meanings), meanings), path,
                         SCHEMA_ATT_FLAG_MEANINGS);
    return st;
}

ps_status ncout_def_id_var(int ncid, const char *path, int var)
{
    /* -1 = no token, kept in the integers: no _FillValue (xarray would make
     * the ids floats to mask it); CF readers treat values < valid_min as
     * missing (netCDF4-python masks them) */
    const int zero = 0;
    return ncout_check(nc_put_att_int(ncid, var, SCHEMA_ATT_VALID_MIN, NC_INT, 1, &zero), path, SCHEMA_ATT_VALID_MIN);
}

/* The kernels and threads the numbers were computed with (written once the
 * CLI has recorded them: every command that writes a file has). */
static ps_status put_blas_provenance(ncout_file *f)
{
    if (!prov_blas()[0])
        return PS_OK;
    char threads[32];
    snprintf(threads, sizeof threads, "%zu", prov_blas_threads());
    ps_status st;
    if ((st = ncout_put_attr(f, SCHEMA_ATT_BLAS, prov_blas())) || (st = ncout_put_attr(f, SCHEMA_ATT_BLAS_CORE, prov_blas_core())) ||
        (st = ncout_put_attr(f, SCHEMA_ATT_BLAS_THREADS, threads)) ||
        (st = ncout_put_attr(f, SCHEMA_ATT_GEMM_KERNEL, gemm_isa_name(gemm_isa_get()))))
        return st;
    return PS_OK;
}

ps_status ncout_put_provenance(ncout_file *f, model *m)
{
    ps_status st;
    if (!m->sha256[0] && (st = model_hash(m)) != PS_OK)
        return st;
    char created[32];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(created, sizeof created, "%Y-%m-%dT%H:%M:%SZ", &tm);
    char *abs_dir = realpath(m->dir, NULL);
    const int version = SCHEMA_VERSION;
    if ((st = ncout_put_attr(f, SCHEMA_ATT_CONVENTIONS, SCHEMA_CONVENTIONS)) ||
        (st = ncout_check(nc_put_att_int(f->ncid, NC_GLOBAL, SCHEMA_ATT_SCHEMA, NC_INT, 1, &version), f->tmp_path,
                          SCHEMA_ATT_SCHEMA)) ||
        (st = ncout_put_attr(f, SCHEMA_ATT_PATCHSWEEP_VERSION, prov_version())) ||
        (st = ncout_put_attr(f, SCHEMA_ATT_COMMAND_LINE, prov_command_line())) ||
        (st = ncout_put_attr(f, SCHEMA_ATT_CREATED, created)) ||
        (st = ncout_put_attr(f, SCHEMA_ATT_MODEL_PATH, abs_dir ? abs_dir : m->dir)) ||
        (st = ncout_put_attr(f, SCHEMA_ATT_MODEL_SHA256, m->sha256)) ||
        (st = ncout_put_attr(f, SCHEMA_ATT_MODEL_CONFIG, m->config_json)) ||
        (st = ncout_put_attr(f, SCHEMA_ATT_MODEL_DTYPE, m->weights_dtype)) ||
        (st = ncout_put_attr(f, SCHEMA_ATT_COMPUTE, model_compute_name(m->compute))) ||
        (m->compute == MODEL_COMPUTE_BF16 &&
         (st = ncout_put_attr(f, SCHEMA_ATT_COMPUTE_KERNEL, gemm_bf16_isa_name(gemm_bf16_isa_get())))) ||
        (m->n_shards > 1 && m->shard_sha256 && (st = ncout_put_attr(f, SCHEMA_ATT_MODEL_SHARD_SHA256, m->shard_sha256))) ||
        (st = put_blas_provenance(f))) {
        free(abs_dir);
        return st;
    }
    free(abs_dir);
    return PS_OK;
}

/* Dimension ids by name, created on first use. */
static ps_status dim_id(ncout_file *f, const char *name, size_t len, int *id)
{
    if (nc_inq_dimid(f->ncid, name, id) == NC_NOERR)
        return PS_OK;
    return ncout_check(nc_def_dim(f->ncid, name, len, id), f->tmp_path, name);
}

ps_status ncout_write_cache(ncout_file *f, model *m, const tokenizer *tok, const forward_cache *c,
                            const hook_set *hooks, bool bos)
{
    ps_status st;
    const size_t T = c->T, n_hooks = hook_count(m->cfg.n_layer);
    if ((st = ncout_put_provenance(f, m)) != PS_OK)
        return st;
    if ((st = ncout_put_flag(f, SCHEMA_ATT_PREPEND_BOS, bos)) != PS_OK)
        return st;
    int pos_dim, tok_var, str_var;
    if ((st = dim_id(f, SCHEMA_DIM_POSITION, T, &pos_dim)) != PS_OK)
        return st;
    /* token ids and strings label the positions (coordinates in xarray) */
    if ((st = ncout_check(nc_def_var(f->ncid, SCHEMA_VAR_TOKEN_ID, NC_INT, 1, &pos_dim, &tok_var), f->tmp_path, SCHEMA_VAR_TOKEN_ID)) ||
        (st = ncout_check(nc_def_var(f->ncid, SCHEMA_VAR_TOKEN, NC_STRING, 1, &pos_dim, &str_var), f->tmp_path, SCHEMA_VAR_TOKEN)) ||
        (st = ncout_add_coordinate(f->ncid, f->tmp_path, SCHEMA_VAR_TOKEN_ID)) ||
        (st = ncout_add_coordinate(f->ncid, f->tmp_path, SCHEMA_VAR_TOKEN)))
        return st;
    int *var_ids = malloc(n_hooks * sizeof *var_ids);
    if (!var_ids)
        return err_set(PS_ERR_NOMEM, "%s: out of memory", f->path);
    for (size_t i = 0; i < n_hooks; i++) {
        hook_point hp = hook_at(i, m->cfg.n_layer);
        var_ids[i] = -1;
        if (!hook_set_has(hooks, hp) || (hp.kind == HOOK_LOGITS && c->logits_mode != FORWARD_LOGITS_ALL))
            continue;
        size_t shape[HOOK_MAX_DIMS];
        const char *dn[HOOK_MAX_DIMS];
        size_t nd = hook_shape(hp.kind, &m->cfg, T, shape, dn);
        int dims[HOOK_MAX_DIMS];
        for (size_t k = 0; k < nd; k++)
            if ((st = dim_id(f, dn[k], shape[k], &dims[k])) != PS_OK)
                goto out;
        char name[HOOK_MAX_NAME];
        hook_name(hp, name);
        if ((st = ncout_check(nc_def_var(f->ncid, name, NC_FLOAT, (int)nd, dims, &var_ids[i]), f->tmp_path, name)))
            goto out;
    }
    if ((st = ncout_check(nc_enddef(f->ncid), f->tmp_path, "end of definitions")))
        goto out;
    if ((st = ncout_check(nc_put_var_int(f->ncid, tok_var, c->tokens), f->tmp_path, SCHEMA_VAR_TOKEN_ID)))
        goto out;
    for (size_t t = 0; t < T; t++) {
        char *s = tokenizer_token_display(tok, c->tokens[t], "");
        if (!s) {
            st = err_set(PS_ERR_NOMEM, "%s: out of memory", f->path);
            goto out;
        }
        size_t start = t, count = 1;
        const char *sp = s;
        st = ncout_check(nc_put_vara_string(f->ncid, str_var, &start, &count, &sp), f->tmp_path, SCHEMA_VAR_TOKEN);
        free(s);
        if (st)
            goto out;
    }
    for (size_t i = 0; i < n_hooks; i++) {
        if (var_ids[i] < 0)
            continue;
        hook_point hp = hook_at(i, m->cfg.n_layer);
        char name[HOOK_MAX_NAME];
        hook_name(hp, name);
        if ((st = ncout_check(nc_put_var_float(f->ncid, var_ids[i], forward_cache_hook(c, hp)), f->tmp_path, name)))
            goto out;
    }
out:
    free(var_ids);
    return st;
}

/* ---- patching results ---------------------------------------------------- */

/* Target bytes of one HDF5 chunk of a per-prompt variable (def_var). */
#define NCOUT_CHUNK_BYTES ((size_t)4 * 1024)

static ps_status def_var(ncout_results *r, const char *name, nc_type type, int nd, const int *dims, int *id,
                         const char *long_name)
{
    ncout_file *f = r->f;
    ps_status st = ncout_check(nc_def_var(f->ncid, name, type, nd, dims, id), f->tmp_path, name);
    if (st == PS_OK && long_name)
        st = ncout_check(nc_put_att_text(f->ncid, *id, SCHEMA_ATT_LONG_NAME, strlen(long_name), long_name), f->tmp_path,
                         name);
    /* Strings have no _FillValue attribute (netCDF's default fill is ""
     * anyway, and xarray cannot write a string _FillValue back: schema 2);
     * the writers write every string cell (the staging window holds ""
     * where nothing else was put): HDF5 (as netCDF-C 4.9 uses it) fails to
     * read a variable-length string that was never written. */
    /* HDF5 chunks of whole prompts, about NCOUT_CHUNK_BYTES each: a chunk
     * per prompt (8 bytes for a scalar) cost HDF5 a B-tree entry and a
     * write for every value; whole chunks are written from netCDF's chunk
     * cache instead, and a reader of one prompt reads one chunk. */
    if (st == PS_OK && nd > 0 && dims[0] == 0 && type != NC_STRING) {
        size_t chunk[PATCH_GRID_MAX_DIMS + 1] = {1, 1, 1, 1, 1}, row = 1, elem = 0;
        for (int i = 1; i < nd; i++) {
            nc_inq_dimlen(f->ncid, dims[i], &chunk[i]);
            row *= chunk[i] ? chunk[i] : 1;
        }
        nc_inq_type(f->ncid, type, NULL, &elem);
        row *= elem ? elem : 1;
        chunk[0] = row >= NCOUT_CHUNK_BYTES ? 1 : NCOUT_CHUNK_BYTES / row;
        st = ncout_check(nc_def_var_chunking(f->ncid, *id, NC_CHUNKED, chunk), f->tmp_path, name);
    }
    return st;
}

static ps_status stage_init(ncout_results *r);
static void *cell(ncout_results *r, int var, size_t slot);
static void stage_grid(const ncout_results *r, patch_component c, size_t T, float *raw, float *norm,
                       double clean_metric, double corrupted_metric, const double *values);
static ncout_staged *staged(ncout_results *r, int var);
static void stage_clear(ncout_results *r, size_t from, size_t to);

ps_status ncout_results_define(ncout_results *r, ncout_file *f, model *m, size_t max_T,
                               const bool on[PATCH_COMPONENT_COUNT], patch_metric metric,
                               patch_direction direction, patch_engine engine)
{
    const patch_metric_list one = {.n = 1, .m = {metric}};
    return ncout_results_define_named(r, f, m, max_T, on, &one, direction, engine, "");
}

ps_status ncout_results_define_metrics(ncout_results *r, ncout_file *f, model *m, size_t max_T,
                                       const bool on[PATCH_COMPONENT_COUNT], const patch_metric_list *metrics,
                                       patch_direction direction, patch_engine engine)
{
    return ncout_results_define_named(r, f, m, max_T, on, metrics, direction, engine, "");
}

/* A variable of metric `metric_name`: the variable attribute metric. */
static ps_status put_var_metric(ncout_results *r, int var, const char *metric_name)
{
    return ncout_check(nc_put_att_text(r->f->ncid, var, SCHEMA_ATT_METRIC, strlen(metric_name), metric_name),
                       r->f->tmp_path, SCHEMA_ATT_METRIC);
}

/* Dimensions of component c's grid variables: prompt, then its grid's. */
static size_t grid_dims(const model_config *cfg, patch_component c, size_t max_T, const int ids[6],
                        int dims[PATCH_GRID_MAX_DIMS + 1])
{
    /* ids: prompt, layer, position, head, kv_head, src_position */
    size_t shape[PATCH_GRID_MAX_DIMS];
    const char *dn[PATCH_GRID_MAX_DIMS];
    size_t nd = patch_grid_shape(c, cfg, max_T, shape, dn);
    dims[0] = ids[0];
    for (size_t k = 0; k < nd; k++)
        dims[k + 1] = !strcmp(dn[k], SCHEMA_DIM_LAYER)          ? ids[1]
                      : !strcmp(dn[k], SCHEMA_DIM_POSITION)     ? ids[2]
                      : !strcmp(dn[k], SCHEMA_DIM_KV_HEAD)      ? ids[4]
                      : !strcmp(dn[k], SCHEMA_DIM_SRC_POSITION) ? ids[5]
                                                                : ids[3];
    return nd;
}

/* The variables of metric k >= 1 (schema.h): clean_M, corrupted_M, and
 * C_M, C_M_normalized per selected component. */
static ps_status define_metric(ncout_results *r, const model_config *cfg, size_t k, const int ids[6])
{
    const patch_metric met = r->metrics.m[k];
    const char *mn = patch_metric_name(met);
    char name[96], lname[192];
    ps_status st;
    const double fill_d = SCHEMA_FILL_METRIC;
    snprintf(name, sizeof name, SCHEMA_CLEAN_PREFIX "%s", mn);
    snprintf(lname, sizeof lname, "%s of the clean run", mn);
    if ((st = def_var(r, name, NC_DOUBLE, 1, &ids[0], &r->v_m_clean[k], lname)) ||
        (st = ncout_check(nc_def_var_fill(r->f->ncid, r->v_m_clean[k], 0, &fill_d), r->f->tmp_path, name)) ||
        (st = put_var_metric(r, r->v_m_clean[k], mn)))
        return st;
    snprintf(name, sizeof name, SCHEMA_CORRUPTED_PREFIX "%s", mn);
    snprintf(lname, sizeof lname, "%s of the corrupted run", mn);
    if ((st = def_var(r, name, NC_DOUBLE, 1, &ids[0], &r->v_m_corrupted[k], lname)) ||
        (st = ncout_check(nc_def_var_fill(r->f->ncid, r->v_m_corrupted[k], 0, &fill_d), r->f->tmp_path, name)) ||
        (st = put_var_metric(r, r->v_m_corrupted[k], mn)))
        return st;
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        r->var_m_raw[k][c] = r->var_m_norm[k][c] = -1;
        if (!r->on[c])
            continue;
        int dims[PATCH_GRID_MAX_DIMS + 1];
        const size_t nd = grid_dims(cfg, (patch_component)c, r->max_T, ids, dims);
        const char *cn = patch_component_name((patch_component)c);
        const float fill = SCHEMA_FILL_GRID;
        for (int norm = 0; norm < 2; norm++) {
            int *var = norm ? &r->var_m_norm[k][c] : &r->var_m_raw[k][c];
            snprintf(name, sizeof name, "%s" SCHEMA_METRIC_SEP "%s%s", cn, mn, norm ? SCHEMA_NORMALIZED_SUFFIX : "");
            snprintf(lname, sizeof lname, "%s%s after patching %s", norm ? "normalized " : "", mn, cn);
            if ((st = def_var(r, name, NC_FLOAT, (int)nd + 1, dims, var, lname)) ||
                (st = ncout_check(nc_def_var_fill(r->f->ncid, *var, 0, &fill), r->f->tmp_path, name)) ||
                (st = put_var_metric(r, *var, mn)))
                return st;
        }
    }
    return PS_OK;
}

ps_status ncout_results_define_named(ncout_results *r, ncout_file *f, model *m, size_t max_T,
                                     const bool on[PATCH_COMPONENT_COUNT], const patch_metric_list *metrics,
                                     patch_direction direction, patch_engine engine, const char *suffix)
{
    memset(r, 0, sizeof *r);
    if (metrics->n < 1 || metrics->n > PATCH_METRIC_COUNT)
        return err_set(PS_ERR_INVALID, "%s: %zu metrics (1 to %d)", f->path, metrics->n, PATCH_METRIC_COUNT);
    const patch_metric metric = metrics->m[0];
    r->metrics = *metrics;
    r->f = f;
    r->n_layer = m->cfg.n_layer;
    r->n_head = m->cfg.n_head;
    r->n_kv_head = model_kv_heads(&m->cfg);
    r->max_T = max_T;
    r->metric = metric;
    memcpy(r->on, on, sizeof r->on);
    ps_status st;
    if ((st = ncout_put_provenance(f, m)) || (st = ncout_put_attr(f, SCHEMA_ATT_METRIC, patch_metric_name(metric))) ||
        (st = ncout_put_attr(f, SCHEMA_ATT_DIRECTION, direction == PATCH_DENOISE ? SCHEMA_DIRECTION_DENOISE : SCHEMA_DIRECTION_NOISE)) ||
        (st = ncout_put_attr(f, SCHEMA_ATT_ENGINE, engine == PATCH_ENGINE_FAST ? SCHEMA_ENGINE_FAST : SCHEMA_ENGINE_NAIVE)) ||
        (st = ncout_put_attr(f, SCHEMA_ATT_NORMALIZED, SCHEMA_NORMALIZED_FORMULA)))
        return st;
    if (metrics->n > 1) { /* one-metric files stay as they were */
        char list[PATCH_METRIC_COUNT * 16] = "";
        for (size_t k = 0; k < metrics->n; k++)
            snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", k ? "," : "",
                     patch_metric_name(metrics->m[k]));
        if ((st = ncout_put_attr(f, SCHEMA_ATT_METRICS, list)))
            return st;
    }
    int d_prompt, d_layer, d_pos, d_head;
    /* Dimension ids are 0..3 in this order (def_var relies on prompt = 0). */
    if ((st = ncout_check(nc_def_dim(f->ncid, SCHEMA_DIM_PROMPT, NC_UNLIMITED, &d_prompt), f->tmp_path, SCHEMA_DIM_PROMPT)) ||
        (st = dim_id(f, SCHEMA_DIM_LAYER, r->n_layer, &d_layer)) || (st = dim_id(f, SCHEMA_DIM_POSITION, max_T, &d_pos)) ||
        (st = dim_id(f, SCHEMA_DIM_HEAD, r->n_head, &d_head)))
        return st;
    /* grouped-query attention: k_all_pos / v_all_pos per key/value head */
    int d_kv_head = -1, v_kv_head = -1;
    bool kv = false;
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        kv = kv || (on[c] && patch_component_kv_heads((patch_component)c, &m->cfg));
    if (kv && ((st = dim_id(f, SCHEMA_DIM_KV_HEAD, r->n_kv_head, &d_kv_head)) ||
               (st = def_var(r, SCHEMA_VAR_KV_HEAD, NC_INT, 1, &d_kv_head, &v_kv_head, NULL))))
        return st;
    /* pattern_dest_src: the source (key) position, as long as position */
    int d_src_pos = -1, v_src_pos = -1;
    if (on[PATCH_PATTERN_DEST_SRC] &&
        ((st = dim_id(f, SCHEMA_DIM_SRC_POSITION, max_T, &d_src_pos)) ||
         (st = def_var(r, SCHEMA_VAR_SRC_POSITION, NC_INT, 1, &d_src_pos, &v_src_pos, NULL))))
        return st;
    int v_layer, v_pos, v_head, v_layer_label;
    if ((st = def_var(r, SCHEMA_VAR_LAYER, NC_INT, 1, &d_layer, &v_layer, SCHEMA_LAYER_LONG_NAME)) ||
        (st = def_var(r, SCHEMA_VAR_LAYER_LABEL, NC_STRING, 1, &d_layer, &v_layer_label,
                      "the block, as lens files label their layers")) ||
        (st = def_var(r, SCHEMA_VAR_POSITION, NC_INT, 1, &d_pos, &v_pos, NULL)) ||
        (st = def_var(r, SCHEMA_VAR_HEAD, NC_INT, 1, &d_head, &v_head, NULL)))
        return st;
    const int pp[2] = {d_prompt, d_pos};
    /* schema 2: the prompt coordinate holds each prompt's dataset index
     * (schema 1's prompt_index); ids keep -1 for none without a _FillValue
     * (integers in xarray, ncout_def_id_var); length has _FillValue -1 (a
     * stopped sweep's mean length is right in xarray); done and skipped
     * are 0/1 with flag_values / flag_meanings. */
    if ((st = def_var(r, SCHEMA_VAR_PROMPT, NC_INT, 1, &d_prompt, &r->v_prompt_index,
                      "0-based index of the prompt pair in the dataset")) ||
        (st = def_var(r, SCHEMA_VAR_CLEAN_METRIC, NC_DOUBLE, 1, &d_prompt, &r->v_clean_metric, "metric of the clean run")) ||
        (st = def_var(r, SCHEMA_VAR_CORRUPTED_METRIC, NC_DOUBLE, 1, &d_prompt, &r->v_corrupted_metric,
                      "metric of the corrupted run")) ||
        (st = def_var(r, SCHEMA_VAR_LENGTH, NC_INT, 1, &d_prompt, &r->v_length, "tokens in the prompt")) ||
        (st = def_var(r, SCHEMA_VAR_ANSWER_ID, NC_INT, 1, &d_prompt, &r->v_answer_id, "token id of the answer (-1: none)")) ||
        (st = def_var(r, SCHEMA_VAR_WRONG_ID, NC_INT, 1, &d_prompt, &r->v_wrong_id, "token id of the wrong answer (-1: none)")) ||
        (st = def_var(r, SCHEMA_VAR_ANSWER, NC_STRING, 1, &d_prompt, &r->v_answer, NULL)) ||
        (st = def_var(r, SCHEMA_VAR_WRONG, NC_STRING, 1, &d_prompt, &r->v_wrong, NULL)) ||
        (st = def_var(r, SCHEMA_VAR_DONE, NC_BYTE, 1, &d_prompt, &r->v_done, "1 when every value of the prompt is written")) ||
        (st = def_var(r, SCHEMA_VAR_SKIPPED, NC_BYTE, 1, &d_prompt, &r->v_skipped, "1 when the prompt pair was invalid and skipped")) ||
        (st = def_var(r, SCHEMA_VAR_SKIP_REASON, NC_STRING, 1, &d_prompt, &r->v_skip_reason, NULL)) ||
        (st = def_var(r, SCHEMA_VAR_CLEAN_TOKEN_ID, NC_INT, 2, pp, &r->v_clean_tok_id, "token ids of the clean prompt (-1: none)")) ||
        (st = def_var(r, SCHEMA_VAR_CORRUPTED_TOKEN_ID, NC_INT, 2, pp, &r->v_corrupted_tok_id,
                      "token ids of the corrupted prompt (-1: none)")) ||
        (st = def_var(r, SCHEMA_VAR_CLEAN_TOKEN, NC_STRING, 2, pp, &r->v_clean_tok, NULL)) ||
        (st = def_var(r, SCHEMA_VAR_CORRUPTED_TOKEN, NC_STRING, 2, pp, &r->v_corrupted_tok, NULL)))
        return st;
    const int ids[] = {r->v_answer_id, r->v_wrong_id, r->v_clean_tok_id, r->v_corrupted_tok_id};
    for (size_t i = 0; i < sizeof ids / sizeof *ids && st == PS_OK; i++)
        st = ncout_def_id_var(f->ncid, f->tmp_path, ids[i]);
    const int fill_int = SCHEMA_FILL_INT;
    /* the token ids and strings label positions, layer_label the layers:
     * coordinates in xarray */
    static const char *const coords[] = {SCHEMA_VAR_LAYER_LABEL, SCHEMA_VAR_CLEAN_TOKEN_ID, SCHEMA_VAR_CLEAN_TOKEN,
                                         SCHEMA_VAR_CORRUPTED_TOKEN_ID, SCHEMA_VAR_CORRUPTED_TOKEN};
    for (size_t i = 0; i < sizeof coords / sizeof *coords && st == PS_OK; i++)
        st = ncout_add_coordinate(f->ncid, f->tmp_path, coords[i]);
    if (st || (st = ncout_check(nc_def_var_fill(f->ncid, r->v_length, 0, &fill_int), f->tmp_path, SCHEMA_VAR_LENGTH)) ||
        (st = ncout_def_flag_var(f->ncid, f->tmp_path, r->v_done, SCHEMA_DONE_MEANINGS)) ||
        (st = ncout_def_flag_var(f->ncid, f->tmp_path, r->v_skipped, SCHEMA_SKIPPED_MEANINGS)))
        return st;
    /* The metrics a prompt not done (or skipped) lacks: their _FillValue as
     * an attribute, so that readers (xarray) see NaN there, not 9.97e36 in
     * a mean over prompts. */
    const double fill_d = SCHEMA_FILL_METRIC;
    if ((st = ncout_check(nc_def_var_fill(f->ncid, r->v_clean_metric, 0, &fill_d), f->tmp_path, "fill")) ||
        (st = ncout_check(nc_def_var_fill(f->ncid, r->v_corrupted_metric, 0, &fill_d), f->tmp_path, "fill")))
        return st;
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        r->var_raw[c] = r->var_norm[c] = -1;
        if (!on[c])
            continue;
        size_t shape[PATCH_GRID_MAX_DIMS];
        const char *dn[PATCH_GRID_MAX_DIMS];
        size_t nd = patch_grid_shape((patch_component)c, &m->cfg, max_T, shape, dn);
        int dims[PATCH_GRID_MAX_DIMS + 1] = {d_prompt};
        for (size_t k = 0; k < nd; k++)
            dims[k + 1] = !strcmp(dn[k], SCHEMA_DIM_LAYER)      ? d_layer
                          : !strcmp(dn[k], SCHEMA_DIM_POSITION) ? d_pos
                          : !strcmp(dn[k], SCHEMA_DIM_KV_HEAD)  ? d_kv_head
                          : !strcmp(dn[k], SCHEMA_DIM_SRC_POSITION) ? d_src_pos
                                                                : d_head;
        char raw[64], name[80], lname[160];
        const char *cn = raw;
        snprintf(raw, sizeof raw, "%s%s", patch_component_name((patch_component)c), suffix);
        snprintf(lname, sizeof lname, "%s%s after patching %s", *suffix ? "estimated " : "",
                 patch_metric_name(metric), patch_component_name((patch_component)c));
        if ((st = def_var(r, cn, NC_FLOAT, (int)nd + 1, dims, &r->var_raw[c], lname)))
            return st;
        snprintf(name, sizeof name, "%s" SCHEMA_NORMALIZED_SUFFIX, cn);
        snprintf(lname, sizeof lname, "normalized %s%s after patching %s", *suffix ? "estimated " : "",
                 patch_metric_name(metric), patch_component_name((patch_component)c));
        if ((st = def_var(r, name, NC_FLOAT, (int)nd + 1, dims, &r->var_norm[c], lname)))
            return st;
        float fill = SCHEMA_FILL_GRID;
        if ((st = ncout_check(nc_def_var_fill(f->ncid, r->var_raw[c], 0, &fill), f->tmp_path, cn)) ||
            (st = ncout_check(nc_def_var_fill(f->ncid, r->var_norm[c], 0, &fill), f->tmp_path, name)))
            return st;
    }
    const int dim_ids[6] = {d_prompt, d_layer, d_pos, d_head, d_kv_head, d_src_pos};
    for (size_t k = 1; k < metrics->n; k++)
        if ((st = define_metric(r, &m->cfg, k, dim_ids)))
            return st;
    if ((st = ncout_check(nc_enddef(f->ncid), f->tmp_path, "end of definitions")))
        return st;
    /* Coordinate values 0..n-1. */
    size_t nmax = max_T > r->n_layer ? max_T : r->n_layer;
    nmax = nmax > r->n_head ? nmax : r->n_head;
    int *idx = malloc(nmax * sizeof *idx);
    if (!idx)
        return err_set(PS_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < nmax; i++)
        idx[i] = (int)i;
    /* each coordinate variable spans its whole dimension: idx[0..len) */
    st = ncout_check(nc_put_var_int(f->ncid, v_layer, idx), f->tmp_path, SCHEMA_VAR_LAYER);
    if (!st)
        st = ncout_check(nc_put_var_int(f->ncid, v_pos, idx), f->tmp_path, SCHEMA_VAR_POSITION);
    if (!st)
        st = ncout_check(nc_put_var_int(f->ncid, v_head, idx), f->tmp_path, SCHEMA_VAR_HEAD);
    if (!st && v_kv_head >= 0)
        st = ncout_check(nc_put_var_int(f->ncid, v_kv_head, idx), f->tmp_path, SCHEMA_VAR_KV_HEAD);
    if (!st && v_src_pos >= 0)
        st = ncout_check(nc_put_var_int(f->ncid, v_src_pos, idx), f->tmp_path, SCHEMA_VAR_SRC_POSITION);
    free(idx);
    for (size_t l = 0; l < r->n_layer && st == PS_OK; l++) {
        char label[32];
        const char *lp = label;
        const size_t one = 1;
        snprintf(label, sizeof label, "%zu", l);
        st = ncout_check(nc_put_vara_string(f->ncid, v_layer_label, &l, &one, &lp), f->tmp_path, SCHEMA_VAR_LAYER_LABEL);
    }
    return st ? st : stage_init(r);
}

static bool extra_is_grid(ncout_extra_kind k) { return k == NCOUT_EXTRA_GRID || k == NCOUT_EXTRA_GRID_NORMALIZED; }

static nc_type extra_type(ncout_extra_kind k)
{
    return extra_is_grid(k) ? NC_FLOAT : k == NCOUT_EXTRA_INT ? NC_INT : NC_DOUBLE;
}

ps_status ncout_results_define_extra(ncout_results *r, const ncout_extra *ex, size_t n)
{
    ncout_file *f = r->f;
    if (r->n_extra + n > NCOUT_EXTRA_MAX)
        return err_set(PS_ERR_INTERNAL, "%s: more than %d extra variables", f->path, NCOUT_EXTRA_MAX);
    /* dims as define_named made them; kv_head and src_position may be absent */
    static const char *const dn[6] = {SCHEMA_DIM_PROMPT, SCHEMA_DIM_LAYER,   SCHEMA_DIM_POSITION,
                                      SCHEMA_DIM_HEAD,   SCHEMA_DIM_KV_HEAD, SCHEMA_DIM_SRC_POSITION};
    int ids[6];
    for (int k = 0; k < 6; k++)
        if (nc_inq_dimid(f->ncid, dn[k], &ids[k]) != NC_NOERR)
            ids[k] = -1;
    model_config cfg = {.n_layer = r->n_layer, .n_head = r->n_head, .n_kv_head = r->n_kv_head};
    ps_status st = PS_OK;
    for (size_t i = 0; i < n && st == PS_OK; i++) {
        const size_t e = r->n_extra++;
        r->extra_kind[e] = ex[i].kind;
        for (int c = 0; c < PATCH_COMPONENT_COUNT && st == PS_OK; c++) {
            r->var_extra[e][c] = -1;
            if (!r->on[c])
                continue;
            const char *cn = patch_component_name((patch_component)c);
            char name[96], lname[256];
            snprintf(name, sizeof name, "%s%s", cn, ex[i].suffix);
            snprintf(lname, sizeof lname, "%s, %s", ex[i].long_name, cn);
            int dims[PATCH_GRID_MAX_DIMS + 1] = {ids[0]}, *var = &r->var_extra[e][c];
            const size_t nd = extra_is_grid(ex[i].kind) ? grid_dims(&cfg, (patch_component)c, r->max_T, ids, dims) : 0;
            const nc_type t = extra_type(ex[i].kind);
            const float fill_f = SCHEMA_FILL_GRID;
            const double fill_d = SCHEMA_FILL_METRIC;
            const int fill_i = SCHEMA_FILL_INT;
            const void *fill = t == NC_FLOAT ? (const void *)&fill_f : t == NC_INT ? (const void *)&fill_i
                                                                                   : (const void *)&fill_d;
            if ((st = def_var(r, name, t, (int)nd + 1, dims, var, lname)) ||
                (st = ncout_check(nc_def_var_fill(f->ncid, *var, 0, fill), f->tmp_path, name)) ||
                (st = put_var_metric(r, *var, patch_metric_name(r->metric))))
                break;
            if (ex[i].comment)
                st = ncout_check(nc_put_att_text(f->ncid, *var, "comment", strlen(ex[i].comment), ex[i].comment),
                                 f->tmp_path, name);
        }
    }
    if (st)
        return st;
    /* the window again, with the new variables (nothing is staged yet) */
    ncout_results_free(r);
    return stage_init(r);
}

ps_status ncout_results_put_extra(ncout_results *r, size_t prompt, size_t i, double *const values[PATCH_COMPONENT_COUNT])
{
    if (i >= r->n_extra)
        return err_set(PS_ERR_INTERNAL, "%s: extra variable %zu of %zu", r->f->path, i, r->n_extra);
    if (prompt < r->stage.base || prompt >= r->stage.base + r->stage.cap || !r->stage.staged[prompt - r->stage.base])
        return err_set(PS_ERR_INTERNAL, "%s: extra variable of prompt %zu before the prompt", r->f->path, prompt);
    const size_t slot = prompt - r->stage.base;
    const size_t T = (size_t)*(int *)cell(r, r->v_length, slot);
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        if (!r->on[c] || !values[c])
            continue;
        void *dst = cell(r, r->var_extra[i][c], slot);
        if (r->extra_kind[i] == NCOUT_EXTRA_GRID)
            stage_grid(r, (patch_component)c, T, dst, NULL, 0.0, 0.0, values[c]);
        else if (r->extra_kind[i] == NCOUT_EXTRA_GRID_NORMALIZED)
            stage_grid(r, (patch_component)c, T, NULL, dst, *(double *)cell(r, r->v_clean_metric, slot),
                       *(double *)cell(r, r->v_corrupted_metric, slot), values[c]);
        else if (r->extra_kind[i] == NCOUT_EXTRA_INT)
            *(int *)dst = (int)values[c][0];
        else
            *(double *)dst = values[c][0];
    }
    return PS_OK;
}

/* Prompts with a value of a per-prompt variable (not the fill, not NaN):
 * their values into v[0..*n) (v: [dim length]). */
static ps_status read_prompt_values(int ncid, const char *path, int var, const char *name, size_t len, double *v,
                                    size_t *n)
{
    ps_status st = ncout_check(nc_get_var_double(ncid, var, v), path, name);
    int no_fill = 0;
    double fill = SCHEMA_FILL_METRIC;
    nc_type t;
    nc_inq_vartype(ncid, var, &t);
    if (t == NC_INT) {
        int fi = SCHEMA_FILL_INT;
        nc_inq_var_fill(ncid, var, &no_fill, &fi);
        fill = fi;
    } else {
        nc_inq_var_fill(ncid, var, &no_fill, &fill);
    }
    *n = 0;
    for (size_t k = 0; k < len && st == PS_OK; k++)
        if (v[k] == v[k] && v[k] != fill)
            v[(*n)++] = v[k];
    return st;
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

ps_status ncout_atp_summary(int ncid, const char *path, ncout_atp_stats out[PATCH_COMPONENT_COUNT])
{
    int dim;
    size_t len = 0;
    if (out)
        memset(out, 0, PATCH_COMPONENT_COUNT * sizeof *out);
    if (nc_inq_dimid(ncid, SCHEMA_DIM_PROMPT, &dim) != NC_NOERR || nc_inq_dimlen(ncid, dim, &len) != NC_NOERR)
        return PS_OK;
    double *v = malloc((len ? len : 1) * sizeof *v);
    if (!v)
        return err_set(PS_ERR_NOMEM, "out of memory");
    ps_status st = PS_OK;
    for (int c = 0; c < PATCH_COMPONENT_COUNT && st == PS_OK; c++)
        for (int rho = 1; rho >= 0 && st == PS_OK; rho--) {
            char name[NC_MAX_NAME + 1];
            snprintf(name, sizeof name, "%s%s", patch_component_name((patch_component)c),
                     rho ? SCHEMA_ATP_RANK_CORRELATION_SUFFIX : SCHEMA_ATP_MISSED_SUFFIX);
            int var, nd, d0;
            if (nc_inq_varid(ncid, name, &var) != NC_NOERR || nc_inq_varndims(ncid, var, &nd) != NC_NOERR ||
                nd != 1 || nc_inq_vardimid(ncid, var, &d0) != NC_NOERR || d0 != dim)
                continue;
            size_t n;
            if ((st = read_prompt_values(ncid, path, var, name, len, v, &n)))
                break;
            const int np = (int)n;
            st = ncout_check(nc_put_att_int(ncid, var, SCHEMA_ATT_SUMMARY_PROMPTS, NC_INT, 1, &np), path, name);
            if (st == PS_OK && rho) {
                /* mean in prompt order, then the median of the sorted values */
                double sum = 0.0;
                for (size_t k = 0; k < n; k++)
                    sum += v[k];
                qsort(v, n, sizeof *v, cmp_double);
                const double mean = n ? sum / (double)n : NAN;
                const double median = !n ? NAN : n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
                if ((st = ncout_check(nc_put_att_double(ncid, var, SCHEMA_ATT_SUMMARY_MEAN, NC_DOUBLE, 1, &mean),
                                      path, name)) == PS_OK)
                    st = ncout_check(nc_put_att_double(ncid, var, SCHEMA_ATT_SUMMARY_MEDIAN, NC_DOUBLE, 1, &median),
                                     path, name);
                if (out)
                    out[c].present = true, out[c].rank_prompts = n, out[c].mean = mean, out[c].median = median;
            } else if (st == PS_OK) {
                long long total = 0;
                for (size_t k = 0; k < n; k++)
                    total += (long long)v[k];
                st = ncout_check(nc_put_att_longlong(ncid, var, SCHEMA_ATT_SUMMARY_TOTAL, NC_INT64, 1, &total), path,
                                 name);
                if (out)
                    out[c].missed_prompts = n, out[c].missed_total = (size_t)total;
            }
        }
    free(v);
    return st;
}

/* ---- the staging window ------------------------------------------------------
 * Each netCDF call costs some 30 us of HDF5 bookkeeping whatever its size, and
 * a prompt has ~25 variables: written prompt by prompt the file took 0.9 ms
 * per prompt, the first bottleneck of a large sweep.  Values are staged for a
 * window of consecutive prompts instead, each variable's buffer pre-filled
 * with its fill value (so that writing a whole row stores what an unwritten
 * cell reads as), and written with one call per variable and run of staged
 * prompts when a prompt outside the window arrives or at the flush. */

static char empty_string[] = "";

/* Staging memory per file, and the window's bounds in prompts. */
#define STAGE_BYTES ((size_t)4 << 20)
#define STAGE_MAX_PROMPTS ((size_t)1024)

static void stage_add(ncout_results *r, int var, nc_type type, size_t nd, const size_t *shape)
{
    ncout_stage *g = &r->stage;
    ncout_staged *v = &g->vars[g->n_vars++];
    v->var = var;
    v->type = type;
    v->nd = nd;
    v->row = 1;
    for (size_t i = 0; i < nd; i++) {
        v->shape[i] = shape[i];
        v->row *= shape[i];
    }
    v->esize = type == NC_STRING ? sizeof(char *) : type == NC_DOUBLE ? 8 : type == NC_BYTE ? 1 : 4;
    if (type != NC_STRING) {
        int no_fill = 0;
        if (nc_inq_var_fill(r->f->ncid, var, &no_fill, v->fill) != NC_NOERR)
            memset(v->fill, 0, sizeof v->fill);
    }
}

static ncout_staged *staged(ncout_results *r, int var)
{
    for (size_t i = 0; i < r->stage.n_vars; i++)
        if (r->stage.vars[i].var == var)
            return &r->stage.vars[i];
    return NULL;
}

/* Slots [from, to) back to the fill values (owned strings freed). */
static void stage_clear(ncout_results *r, size_t from, size_t to)
{
    ncout_stage *g = &r->stage;
    for (size_t i = 0; i < g->n_vars; i++) {
        ncout_staged *v = &g->vars[i];
        if (v->type == NC_STRING) {
            char **sp = v->buf;
            for (size_t k = from * v->row; k < to * v->row; k++) {
                if (sp[k] != empty_string)
                    free(sp[k]);
                sp[k] = empty_string;
            }
        } else {
            for (size_t k = from * v->row; k < to * v->row; k++)
                memcpy((char *)v->buf + k * v->esize, v->fill, v->esize);
        }
    }
    memset(g->staged + from, 0, to - from);
}

static ps_status stage_init(ncout_results *r)
{
    ncout_stage *g = &r->stage;
    const size_t one = 1, T[1] = {r->max_T};
    ps_status st = PS_OK;
    const int scalars[] = {r->v_clean_metric, r->v_corrupted_metric, r->v_length,  r->v_answer_id,
                           r->v_wrong_id,     r->v_answer,           r->v_wrong,   r->v_done,
                           r->v_skipped,      r->v_prompt_index,     r->v_skip_reason};
    for (size_t i = 0; i < sizeof scalars / sizeof *scalars; i++) {
        nc_type t;
        nc_inq_vartype(r->f->ncid, scalars[i], &t);
        stage_add(r, scalars[i], t, 1, &one);
    }
    stage_add(r, r->v_clean_tok_id, NC_INT, 1, T);
    stage_add(r, r->v_corrupted_tok_id, NC_INT, 1, T);
    stage_add(r, r->v_clean_tok, NC_STRING, 1, T);
    stage_add(r, r->v_corrupted_tok, NC_STRING, 1, T);
    model_config cfg = {.n_layer = r->n_layer, .n_head = r->n_head, .n_kv_head = r->n_kv_head};
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        if (!r->on[c])
            continue;
        size_t shape[PATCH_GRID_MAX_DIMS];
        size_t nd = patch_grid_shape((patch_component)c, &cfg, r->max_T, shape, NULL);
        stage_add(r, r->var_raw[c], NC_FLOAT, nd, shape);
        stage_add(r, r->var_norm[c], NC_FLOAT, nd, shape);
    }
    for (size_t k = 1; k < r->metrics.n; k++) {
        stage_add(r, r->v_m_clean[k], NC_DOUBLE, 1, &one);
        stage_add(r, r->v_m_corrupted[k], NC_DOUBLE, 1, &one);
        for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
            if (!r->on[c])
                continue;
            size_t shape[PATCH_GRID_MAX_DIMS];
            size_t nd = patch_grid_shape((patch_component)c, &cfg, r->max_T, shape, NULL);
            stage_add(r, r->var_m_raw[k][c], NC_FLOAT, nd, shape);
            stage_add(r, r->var_m_norm[k][c], NC_FLOAT, nd, shape);
        }
    }
    for (size_t e = 0; e < r->n_extra; e++)
        for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
            if (!r->on[c])
                continue;
            size_t shape[PATCH_GRID_MAX_DIMS] = {1};
            const bool grid = extra_is_grid(r->extra_kind[e]);
            const size_t nd = grid ? patch_grid_shape((patch_component)c, &cfg, r->max_T, shape, NULL) : 1;
            stage_add(r, r->var_extra[e][c], extra_type(r->extra_kind[e]), nd, shape);
        }
    size_t per_prompt = 0;
    for (size_t i = 0; i < g->n_vars; i++)
        per_prompt += g->vars[i].row * g->vars[i].esize;
    g->cap = STAGE_BYTES / per_prompt;
    g->cap = g->cap < 1 ? 1 : g->cap > STAGE_MAX_PROMPTS ? STAGE_MAX_PROMPTS : g->cap;
    g->staged = calloc(g->cap, 1);
    for (size_t i = 0; i < g->n_vars && g->staged; i++) {
        ncout_staged *v = &g->vars[i];
        if (!(v->buf = calloc(g->cap * v->row, v->esize)))
            st = err_set(PS_ERR_NOMEM, "out of memory");
    }
    if (!g->staged)
        st = err_set(PS_ERR_NOMEM, "out of memory");
    /* ids: -1 where there is none (their staged cells start as that) */
    const int none = SCHEMA_FILL_TOKEN_ID;
    const int ids[] = {r->v_answer_id, r->v_wrong_id, r->v_clean_tok_id, r->v_corrupted_tok_id};
    for (size_t i = 0; i < sizeof ids / sizeof *ids && st == PS_OK; i++)
        memcpy(staged(r, ids[i])->fill, &none, sizeof none);
    if (st == PS_OK)
        stage_clear(r, 0, g->cap);
    return st;
}

ps_status ncout_results_flush(ncout_results *r)
{
    ncout_stage *g = &r->stage;
    ps_status st = PS_OK;
    for (size_t a = 0; a < g->cap && st == PS_OK;) {
        if (!g->staged[a]) {
            a++;
            continue;
        }
        size_t b = a;
        while (b < g->cap && g->staged[b])
            b++;
        /* prompts base+a .. base+b-1, one call per variable */
        for (size_t i = 0; i < g->n_vars && st == PS_OK; i++) {
            const ncout_staged *v = &g->vars[i];
            size_t start[PATCH_GRID_MAX_DIMS + 1] = {g->base + a, 0, 0, 0, 0},
                   count[PATCH_GRID_MAX_DIMS + 1] = {b - a, 1, 1, 1, 1};
            for (size_t k = 0; k < v->nd; k++)
                count[k + 1] = v->shape[k];
            char what[NC_MAX_NAME + 1] = "?";
            nc_inq_varname(r->f->ncid, v->var, what);
            st = ncout_check(nc_put_vara(r->f->ncid, v->var, start, count, (char *)v->buf + a * v->row * v->esize),
                             r->f->tmp_path, what);
        }
        a = b;
        fault_point("results_window");
    }
    stage_clear(r, 0, g->cap);
    return st;
}

void ncout_results_free(ncout_results *r)
{
    ncout_stage *g = &r->stage;
    if (g->staged)
        stage_clear(r, 0, g->cap);
    for (size_t i = 0; i < g->n_vars; i++)
        free(g->vars[i].buf);
    free(g->staged);
    memset(g, 0, sizeof *g);
}

/* The window slot of `prompt`, flushing the window first when the prompt is
 * outside it. */
static ps_status stage_slot(ncout_results *r, size_t prompt, size_t *slot)
{
    ncout_stage *g = &r->stage;
    if (prompt < g->base || prompt >= g->base + g->cap) {
        ps_status st = ncout_results_flush(r);
        if (st)
            return st;
        g->base = prompt;
    }
    *slot = prompt - g->base;
    g->staged[*slot] = 1;
    return PS_OK;
}

static void *cell(ncout_results *r, int var, size_t slot)
{
    ncout_staged *v = staged(r, var);
    return (char *)v->buf + slot * v->row * v->esize;
}

/* Stage a copy of bytes[0..len), sanitized to UTF-8, at element k of the slot. */
static ps_status stage_string(ncout_results *r, int var, size_t slot, size_t k, const char *bytes, size_t len)
{
    char **sp = (char **)cell(r, var, slot) + k;
    if (len == 0)
        return PS_OK; /* "" is the fill */
    char *s = str_utf8_sanitize(bytes, len);
    if (!s)
        return err_set(PS_ERR_NOMEM, "out of memory");
    if (*sp != empty_string)
        free(*sp);
    *sp = s;
    return PS_OK;
}

static void stage_flags(ncout_results *r, size_t prompt, size_t slot, signed char done, signed char skipped)
{
    *(int *)cell(r, r->v_prompt_index, slot) = (int)(r->prompt_offset + prompt);
    *(signed char *)cell(r, r->v_skipped, slot) = skipped;
    *(signed char *)cell(r, r->v_done, slot) = done;
}

ps_status ncout_results_put_pending(ncout_results *r, size_t prompt)
{
    size_t slot;
    ps_status st = stage_slot(r, prompt, &slot);
    if (st == PS_OK)
        stage_flags(r, prompt, slot, 0, 0);
    return st;
}

ps_status ncout_results_put_skipped(ncout_results *r, size_t prompt, const char *reason)
{
    size_t slot;
    ps_status st = stage_slot(r, prompt, &slot);
    if (st == PS_OK)
        st = stage_string(r, r->v_skip_reason, slot, 0, reason, strlen(reason));
    if (st == PS_OK)
        stage_flags(r, prompt, slot, 0, 1);
    return st;
}

/* Component c's grid of a T-token prompt (values, patch_grid_shape order)
 * into a slot's row of max_T positions: raw when raw is not NULL,
 * normalized when norm is not NULL.  The position axis (if any) is the second, and
 * pattern_dest_src's src_position the third. */
static void stage_grid(const ncout_results *r, patch_component c, size_t T, float *raw, float *norm,
                       double clean_metric, double corrupted_metric, const double *values)
{
    model_config cfg = {.n_layer = r->n_layer, .n_head = r->n_head, .n_kv_head = r->n_kv_head};
    const double denom = clean_metric - corrupted_metric;
    size_t shape[PATCH_GRID_MAX_DIMS], full[PATCH_GRID_MAX_DIMS];
    const size_t nd = patch_grid_shape(c, &cfg, T, shape, NULL);
    patch_grid_shape(c, &cfg, r->max_T, full, NULL);
    for (size_t k = nd; k < PATCH_GRID_MAX_DIMS; k++)
        shape[k] = full[k] = 1;
    for (size_t l = 0; l < shape[0]; l++)
        for (size_t k = 0; k < shape[1]; k++)
            for (size_t s2 = 0; s2 < shape[2]; s2++)
                for (size_t h = 0; h < shape[3]; h++) {
                    const double v = values[((l * shape[1] + k) * shape[2] + s2) * shape[3] + h];
                    const size_t o = ((l * full[1] + k) * full[2] + s2) * full[3] + h;
                    if (raw)
                        raw[o] = (float)v;
                    /* normalized = (patched - corrupted) / (clean - corrupted),
                     * NaN when the clean and corrupted runs agree (as patch_normalize) */
                    if (norm)
                        norm[o] = denom == 0.0 ? NAN : (float)((v - corrupted_metric) / denom);
                }
}

/* One metric's grids of a T-token prompt into the slot: raw into var_raw[c],
 * normalized into var_norm[c]. */
static void stage_grids(ncout_results *r, size_t slot, size_t T, const int *var_raw, const int *var_norm,
                        double clean_metric, double corrupted_metric, double *const values[PATCH_COMPONENT_COUNT])
{
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        if (r->on[c])
            stage_grid(r, (patch_component)c, T, cell(r, var_raw[c], slot), cell(r, var_norm[c], slot), clean_metric,
                       corrupted_metric, values[c]);
}

ps_status ncout_results_put_metric(ncout_results *r, size_t prompt, size_t k, double clean_metric,
                                   double corrupted_metric, double *const values[PATCH_COMPONENT_COUNT])
{
    if (k < 1 || k >= r->metrics.n)
        return err_set(PS_ERR_INTERNAL, "%s: metric %zu of %zu", r->f->path, k, r->metrics.n);
    if (prompt < r->stage.base || prompt >= r->stage.base + r->stage.cap || !r->stage.staged[prompt - r->stage.base])
        return err_set(PS_ERR_INTERNAL, "%s: metric %zu of prompt %zu before the prompt", r->f->path, k, prompt);
    const size_t slot = prompt - r->stage.base;
    const size_t T = (size_t)*(int *)cell(r, r->v_length, slot);
    *(double *)cell(r, r->v_m_clean[k], slot) = clean_metric;
    *(double *)cell(r, r->v_m_corrupted[k], slot) = corrupted_metric;
    stage_grids(r, slot, T, r->var_m_raw[k], r->var_m_norm[k], clean_metric, corrupted_metric, values);
    return PS_OK;
}

ps_status ncout_results_put(ncout_results *r, size_t prompt, const ncout_prompt *p, const tokenizer *tok,
                            double *const values[PATCH_COMPONENT_COUNT])
{
    const size_t T = p->T;
    if (T > r->max_T)
        return err_set(PS_ERR_RANGE, "%s: prompt %zu has %zu tokens, more than the file's %zu positions", r->f->path,
                       prompt, T, r->max_T);
    size_t slot;
    ps_status st = stage_slot(r, prompt, &slot);
    if (st)
        return st;
    *(double *)cell(r, r->v_clean_metric, slot) = p->clean_metric;
    *(double *)cell(r, r->v_corrupted_metric, slot) = p->corrupted_metric;
    *(int *)cell(r, r->v_length, slot) = (int)T;
    *(int *)cell(r, r->v_answer_id, slot) = p->answer_id;
    *(int *)cell(r, r->v_wrong_id, slot) = p->wrong_id;
    memcpy(cell(r, r->v_clean_tok_id, slot), p->clean_tokens, T * sizeof(int32_t));
    memcpy(cell(r, r->v_corrupted_tok_id, slot), p->corrupted_tokens, T * sizeof(int32_t));
    if ((st = stage_string(r, r->v_answer, slot, 0, p->answer, strlen(p->answer))) ||
        (st = stage_string(r, r->v_wrong, slot, 0, p->wrong, strlen(p->wrong))))
        return st;
    for (size_t t = 0; t < T && st == PS_OK; t++) {
        size_t blen = 0;
        const char *b = tokenizer_token_bytes(tok, p->clean_tokens[t], &blen);
        st = stage_string(r, r->v_clean_tok, slot, t, b ? b : "", b ? blen : 0);
        b = tokenizer_token_bytes(tok, p->corrupted_tokens[t], &blen);
        if (st == PS_OK)
            st = stage_string(r, r->v_corrupted_tok, slot, t, b ? b : "", b ? blen : 0);
    }
    if (st)
        return st;
    stage_grids(r, slot, T, r->var_raw, r->var_norm, p->clean_metric, p->corrupted_metric, values);
    stage_flags(r, prompt, slot, 1, 0);
    return PS_OK;
}

ps_status ncout_results_put_grid(ncout_results *r, model *m, patch_component c, const char *suffix, size_t prompt,
                                 const double *values, const char *long_name, int *var_out)
{
    ncout_file *f = r->f;
    size_t shape[PATCH_GRID_MAX_DIMS];
    const char *dn[PATCH_GRID_MAX_DIMS];
    const size_t nd = patch_grid_shape(c, &m->cfg, r->max_T, shape, dn);
    char name[96];
    snprintf(name, sizeof name, "%s%s", patch_component_name(c), suffix);
    int var, dims[PATCH_GRID_MAX_DIMS + 1];
    ps_status st = PS_OK;
    if (nc_inq_varid(f->ncid, name, &var) != NC_NOERR) {
        if ((st = ncout_check(nc_inq_dimid(f->ncid, SCHEMA_DIM_PROMPT, &dims[0]), f->tmp_path, name)))
            return st;
        for (size_t k = 0; k < nd; k++)
            if ((st = dim_id(f, dn[k], shape[k], &dims[k + 1])))
                return st;
        const float fill = SCHEMA_FILL_GRID;
        if ((st = def_var(r, name, NC_FLOAT, (int)nd + 1, dims, &var, long_name)) ||
            (st = ncout_check(nc_def_var_fill(f->ncid, var, 0, &fill), f->tmp_path, name)))
            return st;
    }
    /* this prompt's T may be below max_T: its positions past T stay fill */
    size_t gs[PATCH_GRID_MAX_DIMS];
    patch_grid_shape(c, &m->cfg, r->max_T, gs, NULL);
    size_t n = 1;
    for (size_t k = 0; k < nd; k++)
        n *= gs[k];
    for (size_t k = nd; k < PATCH_GRID_MAX_DIMS; k++)
        gs[k] = 1;
    float *buf = malloc(n * sizeof *buf);
    if (!buf)
        return err_set(PS_ERR_NOMEM, "%s: out of memory", f->path);
    for (size_t i = 0; i < n; i++)
        buf[i] = (float)values[i];
    size_t start[PATCH_GRID_MAX_DIMS + 1] = {prompt, 0, 0, 0, 0},
           count[PATCH_GRID_MAX_DIMS + 1] = {1, gs[0], gs[1], gs[2], gs[3]};
    st = ncout_check(nc_put_vara_float(f->ncid, var, start, count, buf), f->tmp_path, name);
    free(buf);
    if (var_out)
        *var_out = var;
    return st;
}

ps_status ncout_results_put_prompt_id(ncout_results *r, const char *name, const char *long_name, size_t first,
                                      size_t n, const int *values)
{
    ncout_file *f = r->f;
    int var, dim;
    ps_status st = PS_OK;
    if (nc_inq_varid(f->ncid, name, &var) != NC_NOERR &&
        ((st = ncout_check(nc_inq_dimid(f->ncid, SCHEMA_DIM_PROMPT, &dim), f->tmp_path, name)) ||
         (st = def_var(r, name, NC_INT, 1, &dim, &var, long_name)) || (st = ncout_def_id_var(f->ncid, f->tmp_path, var))))
        return st;
    if (n == 0)
        return PS_OK;
    size_t start[1] = {first}, count[1] = {n};
    return ncout_check(nc_put_vara_int(f->ncid, var, start, count, values), f->tmp_path, name);
}

ps_status ncout_results_put_stats(ncout_results *r, int var, double rank_correlation, size_t k, const size_t *missed,
                                  size_t n_missed)
{
    ncout_file *f = r->f;
    int kk = (int)k, idx[64];
    n_missed = n_missed < 64 ? n_missed : 64;
    for (size_t i = 0; i < n_missed; i++)
        idx[i] = (int)missed[i];
    ps_status st =
        ncout_check(nc_put_att_double(f->ncid, var, SCHEMA_ATT_ATP_RANK_CORRELATION, NC_DOUBLE, 1, &rank_correlation),
                    f->tmp_path, SCHEMA_ATT_ATP_RANK_CORRELATION);
    if (st == PS_OK)
        st = ncout_check(nc_put_att_int(f->ncid, var, SCHEMA_ATT_ATP_TOP_K, NC_INT, 1, &kk), f->tmp_path,
                         SCHEMA_ATT_ATP_TOP_K);
    if (st == PS_OK)
        st = ncout_check(nc_put_att_int(f->ncid, var, SCHEMA_ATT_ATP_MISSED_TOP_K, NC_INT, n_missed, idx), f->tmp_path,
                         SCHEMA_ATT_ATP_MISSED_TOP_K);
    return st;
}
