#include "ncout.h"

#include <errno.h>
#include <math.h>
#include <netcdf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fsutil.h"
#include "gemm.h"
#include "prov.h"
#include "strutil.h"

ps_status ncout_check(int nc_status, const char *path, const char *what)
{
    if (nc_status == NC_NOERR)
        return PS_OK;
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

ps_status ncout_read_attr(const char *path, const char *name, char **value)
{
    *value = NULL;
    int ncid;
    int rc = nc_open(path, NC_NOWRITE, &ncid);
    if (rc != NC_NOERR)
        return err_set(PS_ERR_FORMAT, "%s: not a readable NetCDF file: %s", path, nc_strerror(rc));
    size_t len;
    nc_type type;
    if (nc_inq_att(ncid, NC_GLOBAL, name, &type, &len) != NC_NOERR || type != NC_CHAR) {
        nc_close(ncid);
        return err_set(PS_ERR_INVALID, "%s: no text attribute '%s'", path, name);
    }
    char *v = malloc(len + 1);
    if (!v) {
        nc_close(ncid);
        return err_set(PS_ERR_NOMEM, "out of memory");
    }
    rc = nc_get_att_text(ncid, NC_GLOBAL, name, v);
    nc_close(ncid);
    if (rc != NC_NOERR) {
        free(v);
        return err_set(PS_ERR_FORMAT, "%s: attribute '%s': %s", path, name, nc_strerror(rc));
    }
    v[len] = '\0';
    *value = v;
    return PS_OK;
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

ps_status ncout_commit(ncout_file *f)
{
    ps_status st = PS_OK;
    if (f->ncid >= 0) {
        st = ncout_check(nc_close(f->ncid), f->tmp_path, "cannot close");
        f->ncid = -1;
    }
    if (st == PS_OK && rename(f->tmp_path, f->path) != 0)
        st = err_set(PS_ERR_IO, "%s: cannot rename from %s: %s", f->path, f->tmp_path, strerror(errno));
    if (st != PS_OK)
        unlink(f->tmp_path);
    free(f->path);
    free(f->tmp_path);
    f->path = f->tmp_path = NULL;
    return st;
}

void ncout_abort(ncout_file *f)
{
    if (f->ncid >= 0)
        nc_close(f->ncid);
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

/* The kernels and threads the numbers were computed with (written once the
 * CLI has recorded them: every command that writes a file has). */
static ps_status put_blas_provenance(ncout_file *f)
{
    if (!prov_blas()[0])
        return PS_OK;
    char threads[32];
    snprintf(threads, sizeof threads, "%zu", prov_blas_threads());
    ps_status st;
    if ((st = ncout_put_attr(f, "blas", prov_blas())) || (st = ncout_put_attr(f, "blas_core", prov_blas_core())) ||
        (st = ncout_put_attr(f, "blas_threads", threads)) ||
        (st = ncout_put_attr(f, "gemm_kernel", gemm_isa_name(gemm_isa_get()))))
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
    if ((st = ncout_put_attr(f, "Conventions", "patchsweep-1.0")) ||
        (st = ncout_put_attr(f, "patchsweep_version", prov_version())) ||
        (st = ncout_put_attr(f, "command_line", prov_command_line())) ||
        (st = ncout_put_attr(f, "created", created)) ||
        (st = ncout_put_attr(f, "model_path", abs_dir ? abs_dir : m->dir)) ||
        (st = ncout_put_attr(f, "model_sha256", m->sha256)) ||
        (st = ncout_put_attr(f, "model_config", m->config_json)) ||
        (st = ncout_put_attr(f, "model_dtype", m->weights_dtype)) || (st = put_blas_provenance(f))) {
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
    if ((st = ncout_put_attr(f, "prepend_bos", bos ? "true" : "false")) != PS_OK)
        return st;
    int pos_dim, tok_var, str_var;
    if ((st = dim_id(f, "position", T, &pos_dim)) != PS_OK)
        return st;
    if ((st = ncout_check(nc_def_var(f->ncid, "token_id", NC_INT, 1, &pos_dim, &tok_var), f->tmp_path, "token_id")) ||
        (st = ncout_check(nc_def_var(f->ncid, "token", NC_STRING, 1, &pos_dim, &str_var), f->tmp_path, "token")))
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
    if ((st = ncout_check(nc_put_var_int(f->ncid, tok_var, c->tokens), f->tmp_path, "token_id")))
        goto out;
    for (size_t t = 0; t < T; t++) {
        size_t len;
        const char *bytes = tokenizer_token_bytes(tok, c->tokens[t], &len);
        char *s = bytes ? str_utf8_sanitize(bytes, len) : strdup("");
        if (!s) {
            st = err_set(PS_ERR_NOMEM, "%s: out of memory", f->path);
            goto out;
        }
        size_t start = t, count = 1;
        const char *sp = s;
        st = ncout_check(nc_put_vara_string(f->ncid, str_var, &start, &count, &sp), f->tmp_path, "token");
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

static ps_status def_var(ncout_results *r, const char *name, nc_type type, int nd, const int *dims, int *id,
                         const char *long_name)
{
    ncout_file *f = r->f;
    ps_status st = ncout_check(nc_def_var(f->ncid, name, type, nd, dims, id), f->tmp_path, name);
    if (st == PS_OK && long_name)
        st = ncout_check(nc_put_att_text(f->ncid, *id, "long_name", strlen(long_name), long_name), f->tmp_path,
                         name);
    /* "" as the declared fill of strings; the writers still write every
     * string cell (put_empty_strings), which HDF5 needs to read them back. */
    if (st == PS_OK && type == NC_STRING) {
        const char *empty = "";
        st = ncout_check(nc_def_var_fill(f->ncid, *id, 0, &empty), f->tmp_path, name);
    }
    /* One prompt per chunk: appends touch only their own chunks. */
    if (st == PS_OK && nd > 0 && dims[0] == 0 && type != NC_STRING) {
        size_t chunk[4] = {1, 1, 1, 1};
        for (int i = 1; i < nd; i++)
            nc_inq_dimlen(f->ncid, dims[i], &chunk[i]);
        st = ncout_check(nc_def_var_chunking(f->ncid, *id, NC_CHUNKED, chunk), f->tmp_path, name);
    }
    return st;
}

ps_status ncout_results_define(ncout_results *r, ncout_file *f, model *m, size_t max_T,
                               const bool on[PATCH_COMPONENT_COUNT], patch_metric metric,
                               patch_direction direction, patch_engine engine)
{
    memset(r, 0, sizeof *r);
    r->f = f;
    r->n_layer = m->cfg.n_layer;
    r->n_head = m->cfg.n_head;
    r->max_T = max_T;
    r->metric = metric;
    memcpy(r->on, on, sizeof r->on);
    ps_status st;
    if ((st = ncout_put_provenance(f, m)) || (st = ncout_put_attr(f, "metric", patch_metric_name(metric))) ||
        (st = ncout_put_attr(f, "direction", direction == PATCH_DENOISE ? "denoise" : "noise")) ||
        (st = ncout_put_attr(f, "engine", engine == PATCH_ENGINE_FAST ? "fast" : "naive")) ||
        (st = ncout_put_attr(f, "normalized", "(patched - corrupted_metric) / (clean_metric - corrupted_metric)")))
        return st;
    int d_prompt, d_layer, d_pos, d_head;
    /* Dimension ids are 0..3 in this order (def_var relies on prompt = 0). */
    if ((st = ncout_check(nc_def_dim(f->ncid, "prompt", NC_UNLIMITED, &d_prompt), f->tmp_path, "prompt")) ||
        (st = dim_id(f, "layer", r->n_layer, &d_layer)) || (st = dim_id(f, "position", max_T, &d_pos)) ||
        (st = dim_id(f, "head", r->n_head, &d_head)))
        return st;
    int v_layer, v_pos, v_head;
    if ((st = def_var(r, "layer", NC_INT, 1, &d_layer, &v_layer, NULL)) ||
        (st = def_var(r, "position", NC_INT, 1, &d_pos, &v_pos, NULL)) ||
        (st = def_var(r, "head", NC_INT, 1, &d_head, &v_head, NULL)))
        return st;
    const int pp[2] = {d_prompt, d_pos};
    if ((st = def_var(r, "clean_metric", NC_DOUBLE, 1, &d_prompt, &r->v_clean_metric, "metric of the clean run")) ||
        (st = def_var(r, "corrupted_metric", NC_DOUBLE, 1, &d_prompt, &r->v_corrupted_metric,
                      "metric of the corrupted run")) ||
        (st = def_var(r, "length", NC_INT, 1, &d_prompt, &r->v_length, "tokens in the prompt")) ||
        (st = def_var(r, "answer_id", NC_INT, 1, &d_prompt, &r->v_answer_id, NULL)) ||
        (st = def_var(r, "wrong_id", NC_INT, 1, &d_prompt, &r->v_wrong_id, NULL)) ||
        (st = def_var(r, "answer", NC_STRING, 1, &d_prompt, &r->v_answer, NULL)) ||
        (st = def_var(r, "wrong", NC_STRING, 1, &d_prompt, &r->v_wrong, NULL)) ||
        (st = def_var(r, "done", NC_BYTE, 1, &d_prompt, &r->v_done, "1 when every value of the prompt is written")) ||
        (st = def_var(r, "skipped", NC_BYTE, 1, &d_prompt, &r->v_skipped, "1 when the prompt pair was invalid and skipped")) ||
        (st = def_var(r, "prompt_index", NC_INT, 1, &d_prompt, &r->v_prompt_index,
                      "0-based index of the prompt pair in the dataset")) ||
        (st = def_var(r, "skip_reason", NC_STRING, 1, &d_prompt, &r->v_skip_reason, NULL)) ||
        (st = def_var(r, "clean_token_id", NC_INT, 2, pp, &r->v_clean_tok_id, NULL)) ||
        (st = def_var(r, "corrupted_token_id", NC_INT, 2, pp, &r->v_corrupted_tok_id, NULL)) ||
        (st = def_var(r, "clean_token", NC_STRING, 2, pp, &r->v_clean_tok, NULL)) ||
        (st = def_var(r, "corrupted_token", NC_STRING, 2, pp, &r->v_corrupted_tok, NULL)))
        return st;
    int fill_int = -1;
    if ((st = ncout_check(nc_def_var_fill(f->ncid, r->v_clean_tok_id, 0, &fill_int), f->tmp_path, "fill")) ||
        (st = ncout_check(nc_def_var_fill(f->ncid, r->v_corrupted_tok_id, 0, &fill_int), f->tmp_path, "fill")))
        return st;
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        r->var_raw[c] = r->var_norm[c] = -1;
        if (!on[c])
            continue;
        size_t shape[3];
        const char *dn[3];
        size_t nd = patch_grid_shape((patch_component)c, &m->cfg, max_T, shape, dn);
        int dims[4] = {d_prompt};
        for (size_t k = 0; k < nd; k++)
            dims[k + 1] = !strcmp(dn[k], "layer") ? d_layer : !strcmp(dn[k], "position") ? d_pos : d_head;
        char name[64], lname[160];
        const char *cn = patch_component_name((patch_component)c);
        snprintf(lname, sizeof lname, "%s after patching %s", patch_metric_name(metric), cn);
        if ((st = def_var(r, cn, NC_FLOAT, (int)nd + 1, dims, &r->var_raw[c], lname)))
            return st;
        snprintf(name, sizeof name, "%s_normalized", cn);
        snprintf(lname, sizeof lname, "normalized %s after patching %s", patch_metric_name(metric), cn);
        if ((st = def_var(r, name, NC_FLOAT, (int)nd + 1, dims, &r->var_norm[c], lname)))
            return st;
        float fill = NC_FILL_FLOAT;
        if ((st = ncout_check(nc_def_var_fill(f->ncid, r->var_raw[c], 0, &fill), f->tmp_path, cn)) ||
            (st = ncout_check(nc_def_var_fill(f->ncid, r->var_norm[c], 0, &fill), f->tmp_path, name)))
            return st;
    }
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
    st = ncout_check(nc_put_var_int(f->ncid, v_layer, idx), f->tmp_path, "layer");
    if (!st)
        st = ncout_check(nc_put_var_int(f->ncid, v_pos, idx), f->tmp_path, "position");
    if (!st)
        st = ncout_check(nc_put_var_int(f->ncid, v_head, idx), f->tmp_path, "head");
    free(idx);
    return st;
}

static ps_status put_string(ncout_results *r, int var, const size_t *start, const size_t *count, const char *bytes,
                            size_t len, const char *what)
{
    char *s = str_utf8_sanitize(bytes, len);
    if (!s)
        return err_set(PS_ERR_NOMEM, "out of memory");
    const char *sp = s;
    ps_status st = ncout_check(nc_put_vara_string(r->f->ncid, var, start, count, &sp), r->f->tmp_path, what);
    free(s);
    return st;
}

/* A prompt's row of token strings, [prompt, 0..max_T), in one call (one
 * call per string costs HDF5 a dataset access each, and was most of the
 * write time): the first T from the tokenizer, sanitized to UTF-8, the
 * rest "".  Every string cell gets written: HDF5 (as netCDF-C 4.9 uses it)
 * fails to read a variable-length string that was never written, fill
 * value or not. */
static ps_status put_token_strings(ncout_results *r, int var, size_t prompt, const int32_t *ids, size_t T,
                                   const tokenizer *tok, const char *what)
{
    char **row = calloc(r->max_T, sizeof *row);
    if (!row)
        return err_set(PS_ERR_NOMEM, "out of memory");
    ps_status st = PS_OK;
    for (size_t t = 0; t < r->max_T && st == PS_OK; t++) {
        size_t blen = 0;
        const char *b = t < T ? tokenizer_token_bytes(tok, ids[t], &blen) : NULL;
        if (!(row[t] = str_utf8_sanitize(b ? b : "", b ? blen : 0)))
            st = err_set(PS_ERR_NOMEM, "out of memory");
    }
    size_t start[2] = {prompt, 0}, count[2] = {1, r->max_T};
    if (st == PS_OK)
        st = ncout_check(nc_put_vara_string(r->f->ncid, var, start, count, (const char **)row), r->f->tmp_path,
                         what);
    for (size_t t = 0; t < r->max_T; t++)
        free(row[t]);
    free(row);
    return st;
}

/* A prompt without results: every string "" (see put_token_strings). */
static ps_status put_empty_strings(ncout_results *r, size_t prompt)
{
    size_t one = 1;
    ps_status st;
    if ((st = put_string(r, r->v_answer, &prompt, &one, "", 0, "answer")) ||
        (st = put_string(r, r->v_wrong, &prompt, &one, "", 0, "wrong")) ||
        (st = put_string(r, r->v_skip_reason, &prompt, &one, "", 0, "skip_reason")) ||
        (st = put_token_strings(r, r->v_clean_tok, prompt, NULL, 0, NULL, "clean_token")))
        return st;
    return put_token_strings(r, r->v_corrupted_tok, prompt, NULL, 0, NULL, "corrupted_token");
}

static ps_status put_flags(ncout_results *r, size_t prompt, signed char done, signed char skipped)
{
    int index = (int)(r->prompt_offset + prompt);
    ps_status st = ncout_check(nc_put_var1_int(r->f->ncid, r->v_prompt_index, &prompt, &index), r->f->tmp_path,
                               "prompt_index");
    if (st == PS_OK)
        st = ncout_check(nc_put_var1_schar(r->f->ncid, r->v_skipped, &prompt, &skipped), r->f->tmp_path, "skipped");
    if (st == PS_OK)
        st = ncout_check(nc_put_var1_schar(r->f->ncid, r->v_done, &prompt, &done), r->f->tmp_path, "done");
    return st;
}

ps_status ncout_results_put_pending(ncout_results *r, size_t prompt)
{
    ps_status st = put_empty_strings(r, prompt);
    return st ? st : put_flags(r, prompt, 0, 0);
}

ps_status ncout_results_put_skipped(ncout_results *r, size_t prompt, const char *reason)
{
    size_t one = 1;
    ps_status st = put_empty_strings(r, prompt);
    if (st == PS_OK)
        st = put_string(r, r->v_skip_reason, &prompt, &one, reason, strlen(reason), "skip_reason");
    return st ? st : put_flags(r, prompt, 0, 1);
}

ps_status ncout_results_put(ncout_results *r, size_t prompt, const ncout_prompt *p, const tokenizer *tok,
                            double *const values[PATCH_COMPONENT_COUNT])
{
    ncout_file *f = r->f;
    const int ncid = f->ncid;
    const size_t T = p->T;
    if (T > r->max_T)
        return err_set(PS_ERR_RANGE, "%s: prompt %zu has %zu tokens, more than the file's %zu positions", f->path,
                       prompt, T, r->max_T);
    ps_status st;
    size_t one = 1;
    int len = (int)T;
    if ((st = ncout_check(nc_put_var1_double(ncid, r->v_clean_metric, &prompt, &p->clean_metric), f->tmp_path,
                          "clean_metric")) ||
        (st = ncout_check(nc_put_var1_double(ncid, r->v_corrupted_metric, &prompt, &p->corrupted_metric),
                          f->tmp_path, "corrupted_metric")) ||
        (st = ncout_check(nc_put_var1_int(ncid, r->v_length, &prompt, &len), f->tmp_path, "length")) ||
        (st = ncout_check(nc_put_var1_int(ncid, r->v_answer_id, &prompt, &p->answer_id), f->tmp_path, "answer_id")) ||
        (st = ncout_check(nc_put_var1_int(ncid, r->v_wrong_id, &prompt, &p->wrong_id), f->tmp_path, "wrong_id")) ||
        (st = put_string(r, r->v_answer, &prompt, &one, p->answer, strlen(p->answer), "answer")) ||
        (st = put_string(r, r->v_wrong, &prompt, &one, p->wrong, strlen(p->wrong), "wrong")) ||
        (st = put_string(r, r->v_skip_reason, &prompt, &one, "", 0, "skip_reason")) ||
        (st = put_token_strings(r, r->v_clean_tok, prompt, p->clean_tokens, T, tok, "clean_token")) ||
        (st = put_token_strings(r, r->v_corrupted_tok, prompt, p->corrupted_tokens, T, tok, "corrupted_token")))
        return st;
    size_t start2[2] = {prompt, 0}, count2[2] = {1, T};
    if ((st = ncout_check(nc_put_vara_int(ncid, r->v_clean_tok_id, start2, count2, p->clean_tokens), f->tmp_path,
                          "clean_token_id")) ||
        (st = ncout_check(nc_put_vara_int(ncid, r->v_corrupted_tok_id, start2, count2, p->corrupted_tokens),
                          f->tmp_path, "corrupted_token_id")))
        return st;
    model_config cfg = {.n_layer = r->n_layer, .n_head = r->n_head};
    const double denom = p->clean_metric - p->corrupted_metric;
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        if (!r->on[c])
            continue;
        size_t shape[3];
        size_t nd = patch_grid_shape((patch_component)c, &cfg, T, shape, NULL);
        size_t n = shape[0] * shape[1] * (nd == 3 ? shape[2] : 1);
        float *raw = malloc(2 * n * sizeof *raw);
        if (!raw)
            return err_set(PS_ERR_NOMEM, "out of memory");
        float *norm = raw + n;
        /* normalized = (patched - corrupted) / (clean - corrupted), NaN when
         * the clean and corrupted runs agree (as patch_normalize) */
        for (size_t i = 0; i < n; i++) {
            raw[i] = (float)values[c][i];
            norm[i] = denom == 0.0 ? NAN : (float)((values[c][i] - p->corrupted_metric) / denom);
        }
        size_t start[4] = {prompt, 0, 0, 0}, count[4] = {1, shape[0], shape[1], nd == 3 ? shape[2] : 1};
        const char *cn = patch_component_name((patch_component)c);
        st = ncout_check(nc_put_vara_float(ncid, r->var_raw[c], start, count, raw), f->tmp_path, cn);
        if (!st)
            st = ncout_check(nc_put_vara_float(ncid, r->var_norm[c], start, count, norm), f->tmp_path, cn);
        free(raw);
        if (st)
            return st;
    }
    return put_flags(r, prompt, 1, 0);
}
