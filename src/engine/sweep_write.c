/*
 * sweep_write: rank 0 builds the NetCDF results file from the journal
 * (ncout.h; .partial + rename) and the summary of sweep_result from the same
 * records.
 */
#include "sweep_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ncout.h"
#include "schema.h"

typedef struct {
    sweep_plan *p;
    const job *j;
    const model_config *cfg;
    const tokenizer *tok;
    ncout_results *r;
    sweep_result *res;
    size_t *counts[PATCH_COMPONENT_COUNT]; /* summary contributions per cell */
} finalize_ctx;

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
    res->prompts_done++;
    res->mean_clean_metric += h->clean_metric;
    res->mean_corrupted_metric += h->corrupted_metric;
    res->accuracy += h->clean_metric > 0.0;
    for (int c = 0; c < PATCH_COMPONENT_COUNT && st == PS_OK && denom != 0.0; c++) {
        if (!values[c] || c == PATCH_Z)
            continue;
        sweep_summary *sm = &res->summary[c];
        size_t shape[3];
        patch_grid_shape((patch_component)c, fx->cfg, T, shape, NULL);
        for (size_t l = 0; l < shape[0]; l++)
            for (size_t k = 0; k < shape[1]; k++) {
                /* position grids: column = position counted from the end */
                size_t col = sm->by_head ? k : T - 1 - k;
                if (col >= sm->cols)
                    continue;
                sm->mean[l * sm->cols + col] += (values[c][l * shape[1] + k] - h->corrupted_metric) / denom;
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

static ps_status summary_init(sweep_result *res, const job *j, const model_config *cfg, size_t max_T,
                              size_t *counts[PATCH_COMPONENT_COUNT])
{
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        counts[c] = NULL;
        if (!j->components[c] || c == PATCH_Z)
            continue;
        sweep_summary *sm = &res->summary[c];
        sm->by_head = c >= PATCH_Z_ALL_POS;
        sm->rows = cfg->n_layer;
        sm->cols = sm->by_head ? cfg->n_head : max_T;
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
        (st = summary_init(res, j, &m->cfg, p->max_T, fx.counts)))
        goto out;
    res->prompts_done = res->prompts_skipped = 0;
    res->mean_clean_metric = res->mean_corrupted_metric = res->accuracy = 0.0;
    if ((st = journal_each(jr, write_record, &fx)))
        goto out;
    /* Prompts not done yet: explicit done = 0, so the prompt dimension
     * always has every prompt of the dataset. */
    for (size_t i = 0; i < p->n && st == PS_OK; i++)
        if (!p->state[i]) {
            st = ncout_results_put_pending(&r, i);
        }
    if (st)
        goto out;
    res->complete = res->prompts_done + res->prompts_skipped == p->n;
    char num[32];
    snprintf(num, sizeof num, "%zu", res->prompts_done);
    if ((st = ncout_results_flush(&r)) ||
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
    ncout_results_free(&r);
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        free(fx.counts[c]);
    if (st)
        ncout_abort(&f);
    return st;
}
