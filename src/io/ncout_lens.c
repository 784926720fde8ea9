#include "ncout_lens.h"

#include <netcdf.h>
#include <stdlib.h>
#include <string.h>

#include "strutil.h"
#include "schema.h"

static ps_status put_att(ncout_file *f, const char *name, const char *value)
{
    return ncout_check(nc_put_att_text(f->ncid, NC_GLOBAL, name, strlen(value), value), f->tmp_path, name);
}

/* A variable with a long_name; numeric per-prompt variables are chunked one
 * prompt per chunk (dims[0] is prompt) so appending a prompt touches only
 * its own chunks. */
static ps_status def_var(ncout_file *f, const char *name, nc_type type, int nd, const int *dims, bool per_prompt,
                         const char *long_name, int *id)
{
    ps_status st = ncout_check(nc_def_var(f->ncid, name, type, nd, dims, id), f->tmp_path, name);
    if (st == PS_OK)
        st = ncout_check(nc_put_att_text(f->ncid, *id, SCHEMA_ATT_LONG_NAME, strlen(long_name), long_name), f->tmp_path,
                         name);
    if (st == PS_OK && per_prompt && type != NC_STRING) {
        size_t chunk[3] = {1, 1, 1};
        for (int i = 1; i < nd; i++)
            if ((st = ncout_check(nc_inq_dimlen(f->ncid, dims[i], &chunk[i]), f->tmp_path, name)))
                return st;
        st = ncout_check(nc_def_var_chunking(f->ncid, *id, NC_CHUNKED, chunk), f->tmp_path, name);
    }
    return st;
}

ps_status ncout_lens_define(ncout_lens *w, ncout_file *f, model *m, size_t n_rows, const char *const *layer_label,
                            const char *const *hook, size_t max_T, size_t k, bool bos, const char *dataset_path)
{
    memset(w, 0, sizeof *w);
    w->f = f;
    w->n_rows = n_rows;
    w->k = k;
    w->max_T = max_T;
    ps_status st;
    if ((st = ncout_put_provenance(f, m)) || (st = put_att(f, SCHEMA_ATT_ANALYSIS, SCHEMA_ANALYSIS_LENS)) ||
        (st = ncout_put_flag(f, SCHEMA_ATT_PREPEND_BOS, bos)) ||
        (st = put_att(f, SCHEMA_ATT_DATASET, dataset_path ? dataset_path : "")) ||
        (st = put_att(f, SCHEMA_ATT_DECODED_POSITION, "last")))
        return st;
    int d_prompt, d_layer, d_topk, d_pos;
    if ((st = ncout_check(nc_def_dim(f->ncid, SCHEMA_DIM_PROMPT, NC_UNLIMITED, &d_prompt), f->tmp_path, SCHEMA_DIM_PROMPT)) ||
        (st = ncout_check(nc_def_dim(f->ncid, SCHEMA_DIM_LAYER, w->n_rows, &d_layer), f->tmp_path, SCHEMA_DIM_LAYER)) ||
        (st = ncout_check(nc_def_dim(f->ncid, SCHEMA_DIM_TOPK, k, &d_topk), f->tmp_path, SCHEMA_DIM_TOPK)) ||
        (st = ncout_check(nc_def_dim(f->ncid, SCHEMA_DIM_POSITION, max_T, &d_pos), f->tmp_path, SCHEMA_DIM_POSITION)))
        return st;
    const int pl[2] = {d_prompt, d_layer}, plk[3] = {d_prompt, d_layer, d_topk}, pp[2] = {d_prompt, d_pos};
    int v_layer, v_label, v_hook;
    /* schema 2: the layer coordinate numbers blocks as patching results do,
     * the embedding row -1 (SCHEMA_LAYER_EMBED); layer_label says it */
    if ((st = def_var(f, SCHEMA_VAR_LAYER, NC_INT, 1, &d_layer, false, SCHEMA_LAYER_LONG_NAME, &v_layer)) ||
        (st = def_var(f, SCHEMA_VAR_LAYER_LABEL, NC_STRING, 1, &d_layer, false,
                      "embed = the embedding output, l = the output of block l", &v_label)) ||
        (st = def_var(f, SCHEMA_VAR_HOOK, NC_STRING, 1, &d_layer, false, "hook point each layer decodes", &v_hook)) ||
        (st = def_var(f, SCHEMA_VAR_PROB, NC_DOUBLE, 2, pl, true, "probability of the answer after ln_f and unembedding",
                      &w->v_prob)) ||
        (st = def_var(f, SCHEMA_VAR_LOGPROB, NC_DOUBLE, 2, pl, true, "log probability of the answer", &w->v_logprob)) ||
        (st = def_var(f, SCHEMA_VAR_RANK, NC_INT, 2, pl, true, "tokens with a logit strictly greater than the answer's",
                      &w->v_rank)) ||
        (st = def_var(f, SCHEMA_VAR_RECIPROCAL_RANK, NC_DOUBLE, 2, pl, true, "1 / (rank + 1)", &w->v_rr)) ||
        (st = def_var(f, SCHEMA_VAR_TOPK_ID, NC_INT, 3, plk, true, "most likely tokens, best first", &w->v_topk_id)) ||
        (st = def_var(f, SCHEMA_VAR_TOPK_PROB, NC_DOUBLE, 3, plk, true, "probabilities of the most likely tokens",
                      &w->v_topk_prob)) ||
        (st = def_var(f, SCHEMA_VAR_TOPK_TOKEN, NC_STRING, 3, plk, true, "text of the most likely tokens", &w->v_topk_token)) ||
        (st = def_var(f, SCHEMA_VAR_ANSWER_ID, NC_INT, 1, &d_prompt, true, "token id of the answer", &w->v_answer_id)) ||
        (st = def_var(f, SCHEMA_VAR_ANSWER, NC_STRING, 1, &d_prompt, true, "the answer", &w->v_answer)) ||
        (st = def_var(f, SCHEMA_VAR_LENGTH, NC_INT, 1, &d_prompt, true, "tokens in the prompt", &w->v_length)) ||
        (st = def_var(f, SCHEMA_VAR_TOKEN_ID, NC_INT, 2, pp, true, "token ids of the prompt", &w->v_token_id)) ||
        (st = def_var(f, SCHEMA_VAR_TOKEN, NC_STRING, 2, pp, true, "tokens of the prompt", &w->v_token)) ||
        (st = def_var(f, SCHEMA_VAR_DONE, NC_BYTE, 1, &d_prompt, true, "1 when every value of the prompt is written",
                      &w->v_done)))
        return st;
    /* token ids: -1 past a prompt's length, no _FillValue (integers in
     * xarray); length and rank: _FillValue -1 (masked); done 0/1 flags;
     * token ids and strings label positions, layer_label and hook layers */
    const int fill_int = SCHEMA_FILL_INT;
    static const char *const coords[] = {SCHEMA_VAR_LAYER_LABEL, SCHEMA_VAR_HOOK, SCHEMA_VAR_TOKEN_ID,
                                         SCHEMA_VAR_TOKEN};
    for (size_t i = 0; i < sizeof coords / sizeof *coords && st == PS_OK; i++)
        st = ncout_add_coordinate(f->ncid, f->tmp_path, coords[i]);
    const int ids[] = {w->v_token_id, w->v_answer_id, w->v_topk_id};
    for (size_t i = 0; i < sizeof ids / sizeof *ids && st == PS_OK; i++)
        st = ncout_def_id_var(f->ncid, f->tmp_path, ids[i]);
    if (st || (st = ncout_check(nc_def_var_fill(f->ncid, w->v_length, 0, &fill_int), f->tmp_path, SCHEMA_VAR_LENGTH)) ||
        (st = ncout_check(nc_def_var_fill(f->ncid, w->v_rank, 0, &fill_int), f->tmp_path, SCHEMA_VAR_RANK)) ||
        (st = ncout_def_flag_var(f->ncid, f->tmp_path, w->v_done, SCHEMA_DONE_MEANINGS)) ||
        (st = ncout_check(nc_enddef(f->ncid), f->tmp_path, "end of definitions")))
        return st;
    for (size_t r = 0; r < w->n_rows && st == PS_OK; r++) {
        const char *lp = layer_label[r], *hp = hook[r];
        size_t one = 1;
        /* "embed" -> -1, "l" -> l (lens_row_label) */
        int layer = !strcmp(lp, "embed") ? SCHEMA_LAYER_EMBED : atoi(lp);
        st = ncout_check(nc_put_var1_int(f->ncid, v_layer, &r, &layer), f->tmp_path, SCHEMA_VAR_LAYER);
        if (st == PS_OK)
            st = ncout_check(nc_put_vara_string(f->ncid, v_label, &r, &one, &lp), f->tmp_path, SCHEMA_VAR_LAYER_LABEL);
        if (st == PS_OK)
            st = ncout_check(nc_put_vara_string(f->ncid, v_hook, &r, &one, &hp), f->tmp_path, SCHEMA_VAR_HOOK);
    }
    return st;
}

/* Display strings of n token ids (invalid UTF-8 shown as U+FFFD), malloc'd
 * one by one into out[n]; on failure everything is freed. */
static ps_status token_strings(const tokenizer *tok, const int32_t *ids, size_t n, char **out, const char *path)
{
    for (size_t i = 0; i < n; i++) {
        out[i] = tokenizer_token_display(tok, ids[i], "");
        if (!out[i]) {
            for (size_t j = 0; j < i; j++)
                free(out[j]);
            return err_set(PS_ERR_NOMEM, "%s: out of memory", path);
        }
    }
    return PS_OK;
}

static void free_strings(char **s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(s[i]);
}

ps_status ncout_lens_put(ncout_lens *w, size_t prompt, const ncout_lens_view *v, const tokenizer *tok,
                         const int32_t *tokens, size_t T, const char *answer)
{
    ncout_file *f = w->f;
    const int ncid = f->ncid;
    const size_t R = w->n_rows, k = w->k;
    if (v->n_rows != R || v->k != k)
        return err_set(PS_ERR_INVALID, "%s: a lens of %zu layers x top %zu written to a file of %zu x %zu", f->path,
                       v->n_rows, v->k, R, k);
    if (v->answer < 0)
        return err_set(PS_ERR_INVALID, "%s: prompt %zu was decoded without an answer", f->path, prompt);
    if (T > w->max_T)
        return err_set(PS_ERR_RANGE, "%s: prompt %zu has %zu tokens, more than the file's %zu positions", f->path,
                       prompt, T, w->max_T);
    ps_status st = PS_OK;
    double *prob = malloc(3 * R * sizeof *prob);
    int *rank = malloc(R * sizeof *rank);
    char **strs = malloc((R * k > T ? R * k : T) * sizeof *strs);
    if (!prob || !rank || !strs) {
        st = err_set(PS_ERR_NOMEM, "%s: out of memory", f->path);
        goto out;
    }
    double *logprob = prob + R, *rr = prob + 2 * R;
    for (size_t r = 0; r < R; r++) {
        prob[r] = v->ans[r].prob;
        logprob[r] = v->ans[r].logprob;
        rr[r] = v->ans[r].reciprocal_rank;
        rank[r] = (int)v->ans[r].rank;
    }
    size_t s2[2] = {prompt, 0}, c2[2] = {1, R}, s3[3] = {prompt, 0, 0}, c3[3] = {1, R, k}, one = 1;
    int len = (int)T;
    if ((st = ncout_check(nc_put_vara_double(ncid, w->v_prob, s2, c2, prob), f->tmp_path, SCHEMA_VAR_PROB)) ||
        (st = ncout_check(nc_put_vara_double(ncid, w->v_logprob, s2, c2, logprob), f->tmp_path, SCHEMA_VAR_LOGPROB)) ||
        (st = ncout_check(nc_put_vara_double(ncid, w->v_rr, s2, c2, rr), f->tmp_path, SCHEMA_VAR_RECIPROCAL_RANK)) ||
        (st = ncout_check(nc_put_vara_int(ncid, w->v_rank, s2, c2, rank), f->tmp_path, SCHEMA_VAR_RANK)) ||
        (st = ncout_check(nc_put_vara_int(ncid, w->v_topk_id, s3, c3, v->top_id), f->tmp_path, SCHEMA_VAR_TOPK_ID)) ||
        (st = ncout_check(nc_put_vara_double(ncid, w->v_topk_prob, s3, c3, v->top_prob), f->tmp_path,
                          SCHEMA_VAR_TOPK_PROB)) ||
        (st = ncout_check(nc_put_var1_int(ncid, w->v_answer_id, &prompt, &v->answer), f->tmp_path, SCHEMA_VAR_ANSWER_ID)) ||
        (st = ncout_check(nc_put_var1_int(ncid, w->v_length, &prompt, &len), f->tmp_path, SCHEMA_VAR_LENGTH)))
        goto out;
    char *ans = str_utf8_sanitize(answer, strlen(answer));
    if (!ans) {
        st = err_set(PS_ERR_NOMEM, "%s: out of memory", f->path);
        goto out;
    }
    const char *ap = ans;
    st = ncout_check(nc_put_vara_string(ncid, w->v_answer, &prompt, &one, &ap), f->tmp_path, SCHEMA_VAR_ANSWER);
    free(ans);
    if (st || (st = token_strings(tok, v->top_id, R * k, strs, f->path)))
        goto out;
    st = ncout_check(nc_put_vara_string(ncid, w->v_topk_token, s3, c3, (const char **)strs), f->tmp_path,
                     SCHEMA_VAR_TOPK_TOKEN);
    free_strings(strs, R * k);
    if (st)
        goto out;
    /* the whole row: -1 past the prompt's length (no _FillValue) */
    int *row = malloc((w->max_T ? w->max_T : 1) * sizeof *row);
    if (!row) {
        st = err_set(PS_ERR_NOMEM, "%s: out of memory", f->path);
        goto out;
    }
    for (size_t t = 0; t < w->max_T; t++)
        row[t] = t < T ? tokens[t] : SCHEMA_FILL_TOKEN_ID;
    c2[1] = w->max_T;
    st = ncout_check(nc_put_vara_int(ncid, w->v_token_id, s2, c2, row), f->tmp_path, SCHEMA_VAR_TOKEN_ID);
    free(row);
    c2[1] = T;
    if (st || (st = token_strings(tok, tokens, T, strs, f->path)))
        goto out;
    st = ncout_check(nc_put_vara_string(ncid, w->v_token, s2, c2, (const char **)strs), f->tmp_path, SCHEMA_VAR_TOKEN);
    free_strings(strs, T);
    if (st == PS_OK) {
        signed char done = 1;
        st = ncout_check(nc_put_var1_schar(ncid, w->v_done, &prompt, &done), f->tmp_path, SCHEMA_VAR_DONE);
    }
out:
    free(prob);
    free(rank);
    free(strs);
    return st;
}
