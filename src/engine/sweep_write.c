/*
 * sweep_write: rank 0 builds the NetCDF results file from the journal
 * (ncout.h; .partial + rename) and the summary of sweep_result from the same
 * records.
 */
#include "sweep_internal.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ncout.h"
#include "results_roles.h"
#include "schema.h"

typedef struct {
    sweep_plan *p;
    const job *j;
    const model_config *cfg;
    const tokenizer *tok;
    ncout_results *r;
    sweep_result *res;
    size_t *counts[PATCH_COMPONENT_COUNT]; /* summary contributions per cell */
    double *clean, *corrupted;             /* [p->n]: the metrics of done prompts, NaN otherwise */
} finalize_ctx;

/* Append one formatted line to *text (malloc'd). */
static ps_status text_add(char **text, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static ps_status text_add(char **text, const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    size_t old = *text ? strlen(*text) : 0;
    char *p = realloc(*text, old + strlen(line) + 2);
    if (!p)
        return err_set(PS_ERR_NOMEM, "out of memory");
    memcpy(p + old, line, strlen(line));
    p[old + strlen(line)] = '\n';
    p[old + strlen(line) + 1] = '\0';
    *text = p;
    return PS_OK;
}

/* The guards (schema.h SCHEMA_GUARD_*): flags per prompt, a line per
 * guard that fired into res->guards, both into the file. */
static ps_status write_guards(finalize_ctx *fx, ncout_file *f)
{
    sweep_plan *p = fx->p;
    int *flags = calloc(p->n ? p->n : 1, sizeof *flags);
    if (!flags)
        return err_set(PS_ERR_NOMEM, "out of memory");
    size_t n_flag[3] = {0}, first[3][4];
    /* found when the plan tokenized the prompts (sweep_plan.c) */
    for (size_t i = 0; i < p->n; i++) {
        if (p->state[i] & SWEEP_STATE_IDENTICAL)
            flags[i] |= SCHEMA_GUARD_IDENTICAL;
        if (p->state[i] & SWEEP_STATE_UNSPACED)
            flags[i] |= SCHEMA_GUARD_UNSPACED_ANSWER;
    }
    /* the small gap against the spread pooled over done prompts (as merge
     * recomputes it over the whole dataset) */
    results_roles_gap_flags(fx->clean, fx->corrupted, p->n, flags);
    for (size_t i = 0; i < p->n; i++) {
        for (int b = 0; b < 3; b++)
            if (flags[i] & (1 << b)) {
                if (n_flag[b] < 4)
                    first[b][n_flag[b]] = p->first + i;
                n_flag[b]++;
            }
    }
    static const char *const what[3] = {
        "clean and corrupted are the same tokens: nothing to patch, the normalized grids are NaN",
        "|clean - corrupted| is under 0.1 x the metric's spread: the normalized values are noise",
        "the answer has no leading space after a prompt that ends without one: the model predicts the spaced token"};
    char *text = NULL;
    ps_status st = PS_OK;
    for (int b = 0; b < 3 && st == PS_OK; b++) {
        if (!n_flag[b])
            continue;
        char ids[96] = "";
        for (size_t q = 0; q < n_flag[b] && q < 4; q++)
            snprintf(ids + strlen(ids), sizeof ids - strlen(ids), "%s%zu", q ? ", " : "", first[b][q]);
        char hint[200] = "";
        if (b == 2) {
            dataset_item it; /* the first one's answer, from the file */
            if ((st = sweep_plan_item(fx->p, first[b][0] - p->first, &it)))
                break;
            const char *a = it.answer;
            char spaced[160];
            int32_t id;
            snprintf(spaced, sizeof spaced, " %s", a);
            if (tokenizer_single_token(fx->tok, spaced, &id) == PS_OK)
                snprintf(hint, sizeof hint, " (did you mean \"%.60s\", token %d, instead of \"%.60s\"?)", spaced, (int)id,
                         a);
            err_clear();
            json_decref(it.obj);
        }
        st = text_add(&text, "guard: %zu of %zu prompts (dataset index %s%s): %s%s", n_flag[b], p->n, ids,
                      n_flag[b] > 4 ? ", ..." : "", what[b], hint);
    }
    if (st == PS_OK)
        st = results_roles_put_guards(f->ncid, f->tmp_path, flags, p->n, text ? text : "");
    free(flags);
    if (st == PS_OK) {
        free(fx->res->guards);
        fx->res->guards = text;
    } else {
        free(text);
    }
    return st;
}

/* results_roles_in.item: prompt i's record, read again from the file. */
static ps_status plan_item_obj(void *user, size_t i, json_t **obj)
{
    dataset_item it;
    ps_status st = sweep_plan_item(user, i, &it);
    *obj = st ? NULL : it.obj;
    return st;
}

/* One record into the file and the summary. */
static ps_status write_prompt(finalize_ctx *fx, const journal_prompt *h)
{
    ps_status st;
    if (h->prompt >= fx->p->n)
        return err_set(PS_ERR_FORMAT, "journal record for prompt %llu is not of this dataset",
                       (unsigned long long)h->prompt);
    if (h->kind == JOURNAL_PROMPT_SKIPPED) {
        st = ncout_results_put_skipped(fx->r, h->prompt, h->reason);
        fx->res->prompts_skipped++;
        return st;
    }
    const size_t T = h->T, nv = sweep_prompt_cells(fx->j->components, fx->cfg, T);
    if (h->n_values != nv)
        return err_set(PS_ERR_FORMAT, "journal record for prompt %llu has %zu bytes, expected %zu",
                       (unsigned long long)h->prompt, 2 * T * sizeof(int32_t) + h->n_values * sizeof(double),
                       2 * T * sizeof(int32_t) + nv * sizeof(double));
    double *values[PATCH_COMPONENT_COUNT] = {0}; /* ncout reads them only */
    size_t off = 0;
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        if (fx->j->components[c]) {
            values[c] = (double *)h->values + off;
            off += sweep_grid_size((patch_component)c, fx->cfg, T);
        }
    dataset_item it; /* answer and wrong as text, from the file */
    if ((st = sweep_plan_item(fx->p, h->prompt, &it)))
        return st;
    ncout_prompt np = {.T = T, .answer_id = h->answer_id, .wrong_id = h->wrong_id, .clean_metric = h->clean_metric,
                       .corrupted_metric = h->corrupted_metric, .clean_tokens = h->clean_ids,
                       .corrupted_tokens = h->corrupted_ids, .answer = it.answer, .wrong = it.wrong};
    st = ncout_results_put(fx->r, h->prompt, &np, fx->tok, values);
    json_decref(it.obj);
    /* summary: mean normalized value per (layer, position from the end | head) */
    sweep_result *res = fx->res;
    double denom = h->clean_metric - h->corrupted_metric;
    fx->clean[h->prompt] = h->clean_metric;
    fx->corrupted[h->prompt] = h->corrupted_metric;
    res->prompts_done++;
    res->mean_clean_metric += h->clean_metric;
    res->mean_corrupted_metric += h->corrupted_metric;
    res->accuracy += h->clean_metric > 0.0;
    for (int c = 0; c < PATCH_COMPONENT_COUNT && st == PS_OK && denom != 0.0; c++) {
        if (!values[c] || patch_grid_shape((patch_component)c, fx->cfg, T, (size_t[PATCH_GRID_MAX_DIMS]){0}, NULL) != 2)
            continue; /* the summary ranks the 2-D grids */
        sweep_summary *sm = &res->summary[c];
        size_t shape[PATCH_GRID_MAX_DIMS];
        patch_grid_shape((patch_component)c, fx->cfg, T, shape, NULL);
        for (size_t l = 0; l < shape[0]; l++)
            for (size_t k = 0; k < shape[1]; k++) {
                double v = (values[c][l * shape[1] + k] - h->corrupted_metric) / denom;
                if (sm->by_role) {
                    /* position grids of a dataset with roles: every role at k */
                    const int32_t *rp = fx->p->role_pos + h->prompt * fx->p->roles.n;
                    for (size_t r = 0; r < sm->cols; r++)
                        if (rp[r] == (int32_t)k) {
                            sm->mean[l * sm->cols + r] += v;
                            fx->counts[c][l * sm->cols + r]++;
                        }
                    continue;
                }
                /* position grids: column = position counted from the end */
                size_t col = sm->by_head ? k : T - 1 - k;
                if (col >= sm->cols)
                    continue;
                sm->mean[l * sm->cols + col] += v;
                fx->counts[c][l * sm->cols + col]++;
            }
    }
    return st;
}

static ps_status write_record(void *user, const void *payload, size_t n)
{
    journal_prompt h;
    ps_status st = journal_prompt_decode(&h, payload, n);
    if (st == PS_OK)
        st = write_prompt(user, &h);
    journal_prompt_free(&h);
    return st;
}

static ps_status summary_init(sweep_result *res, const job *j, const model_config *cfg, const sweep_plan *p,
                              size_t *counts[PATCH_COMPONENT_COUNT])
{
    const size_t max_T = p->max_T;
    /* aligned by role when the dataset names any besides END */
    const bool by_role = p->roles.n > 1;
    if (by_role && !res->role_names) {
        if (!(res->role_names = calloc(p->roles.n, sizeof *res->role_names)))
            return err_set(PS_ERR_NOMEM, "out of memory");
        for (size_t k = 0; k < p->roles.n; k++)
            if (!(res->role_names[res->n_roles++] = strdup(p->roles.names[k])))
                return err_set(PS_ERR_NOMEM, "out of memory");
    }
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        counts[c] = NULL;
        if (!j->components[c] || patch_grid_shape((patch_component)c, cfg, max_T, (size_t[PATCH_GRID_MAX_DIMS]){0}, NULL) != 2)
            continue;
        sweep_summary *sm = &res->summary[c];
        sm->by_head = patch_component_all_pos((patch_component)c);
        sm->rows = cfg->n_layer;
        sm->by_role = !sm->by_head && by_role;
        sm->cols = sm->by_head ? cfg->n_head : sm->by_role ? p->roles.n : max_T;
        sm->mean = calloc(sm->rows * sm->cols, sizeof *sm->mean);
        counts[c] = calloc(sm->rows * sm->cols, sizeof *counts[c]);
        if (!sm->mean || !counts[c])
            return err_set(PS_ERR_NOMEM, "out of memory");
    }
    return PS_OK;
}

ps_status sweep_write(const job *j, model *m, const tokenizer *tok, sweep_plan *p, journal *jr,
                      const char *output, const sweep_opts *o, const char *dataset_sha, const char *memory,
                      sweep_result *res)
{
    ncout_file f;
    ncout_results r;
    ps_status st = ncout_create(&f, output);
    if (st)
        return st;
    finalize_ctx fx = {.p = p, .j = j, .cfg = &m->cfg, .tok = tok, .r = &r, .res = res};
    fx.clean = malloc((p->n ? p->n : 1) * sizeof *fx.clean);
    fx.corrupted = malloc((p->n ? p->n : 1) * sizeof *fx.corrupted);
    if (!fx.clean || !fx.corrupted) {
        free(fx.clean);
        free(fx.corrupted);
        ncout_abort(&f);
        return err_set(PS_ERR_NOMEM, "out of memory");
    }
    for (size_t i = 0; i < p->n; i++)
        fx.clean[i] = fx.corrupted[i] = NAN;
    char ranks[32];
    snprintf(ranks, sizeof ranks, "%zu", o->ranks_for_provenance);
    char slice[64] = SCHEMA_SLICE_ALL;
    if (o->n_slices)
        snprintf(slice, sizeof slice, "%zu/%zu", o->slice, o->n_slices);
    st = ncout_results_define(&r, &f, m, p->max_T, j->components, j->metric, j->direction, j->engine);
    r.prompt_offset = p->first;
    if (st || (st = ncout_put_attr(&f, SCHEMA_ATT_SLICE, slice)) ||
        (st = ncout_put_attr(&f, SCHEMA_ATT_JOB_PATH, j->path)) ||
        (st = ncout_put_attr(&f, SCHEMA_ATT_JOB_TEXT, j->text)) ||
        (st = ncout_put_attr(&f, SCHEMA_ATT_JOB_SHA256, j->sha256)) ||
        (st = ncout_put_attr(&f, SCHEMA_ATT_DATASET_PATH, j->dataset)) ||
        (st = ncout_put_attr(&f, SCHEMA_ATT_DATASET_SHA256, dataset_sha)) ||
        (st = ncout_put_attr(&f, SCHEMA_ATT_MPI_RANKS, ranks)) ||
        (st = ncout_put_attr(&f, SCHEMA_ATT_MEMORY_PER_RANK, memory)) ||
        (st = summary_init(res, j, &m->cfg, p, fx.counts)))
        goto out;
    res->prompts_done = res->prompts_skipped = 0;
    res->mean_clean_metric = res->mean_corrupted_metric = res->accuracy = 0.0;
    if ((st = journal_each(jr, write_record, &fx)))
        goto out;
    /* Prompts not done yet: explicit done = 0, so the prompt dimension
     * always has every prompt of the dataset. */
    for (size_t i = 0; i < p->n && st == PS_OK; i++)
        if (!sweep_plan_kind(p, i)) {
            st = ncout_results_put_pending(&r, i);
        }
    if (st)
        goto out;
    res->complete = res->prompts_done + res->prompts_skipped == p->n;
    char num[32];
    snprintf(num, sizeof num, "%zu", res->prompts_done);
    results_roles_in rin = {.first = p->first, .n = p->n, .roles = &p->roles, .role_pos = p->role_pos,
                            .meta = &p->meta, .templates = &p->templates, .item = plan_item_obj, .user = p};
    if ((st = ncout_results_flush(&r)) || (st = results_roles_put(f.ncid, f.tmp_path, &rin)) ||
        (st = results_roles_aggregate(f.ncid, f.tmp_path)) || (st = write_guards(&fx, &f)) ||
        (st = ncout_put_attr(&f, SCHEMA_ATT_COMPLETE, res->complete ? SCHEMA_TRUE : SCHEMA_FALSE)) ||
        (st = ncout_put_attr(&f, SCHEMA_ATT_PROMPTS_DONE, num)))
        goto out;
    st = ncout_commit(&f);
    if (st == PS_OK) {
        double n = (double)res->prompts_done;
        if (n > 0) {
            res->mean_clean_metric /= n;
            res->mean_corrupted_metric /= n;
            res->accuracy = j->metric == PATCH_LOGIT_DIFF ? res->accuracy / n : NAN;
        }
        for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
            sweep_summary *sm = &res->summary[c];
            for (size_t k = 0; sm->mean && k < sm->rows * sm->cols; k++)
                sm->mean[k] = fx.counts[c][k] ? sm->mean[k] / (double)fx.counts[c][k] : NAN;
        }
    }
out:
    free(fx.clean);
    free(fx.corrupted);
    ncout_results_free(&r);
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        free(fx.counts[c]);
    if (st)
        ncout_abort(&f);
    return st;
}
