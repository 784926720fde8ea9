/*
 * sweep_write: rank 0 builds the NetCDF results file (ncout.h; .partial +
 * rename) from the journal's records and the summary of sweep_result from
 * the same records.  Called by the writer thread alone (sweep_writer.c):
 * sweep_write_begin, then every record in journal order, then
 * sweep_write_end; NetCDF is not thread-safe, so nothing else touches the
 * file in between.  The dataset records it needs (answer texts, roles,
 * metadata) are read through a reader of its own, never the plan's, which
 * the compute thread uses meanwhile.
 */
#include "sweep_internal.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "atp.h"
#include "ncout.h"
#include "results_roles.h"
#include "schema.h"

struct sweep_out {
    sweep_plan view;  /* the plan's fields, with rd a dataset reader of our own */
    sweep_plan *p;    /* = &view */
    const job *j;
    const model_config *cfg;
    const tokenizer *tok;
    ncout_file f;
    ncout_results r;
    bool f_open, r_defined;
    sweep_result *res;
    size_t *counts[PATCH_COMPONENT_COUNT]; /* summary contributions per cell */
    double *clean, *corrupted;             /* [p->n]: the metrics of done prompts, NaN otherwise */
    /* [p->n]: 0 the answer is among the clean run's top SWEEP_TOP_K (or not
     * done), -1 it is not, k > 0 it is not but " " + answer is one token,
     * ranked k in the clean run */
    int8_t *not_top;
};
typedef sweep_out finalize_ctx;

#define SW_STR_(x) #x
#define SW_STR(x) SW_STR_(x) /* SCHEMA_GUARD_TOP_K as text */

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
    enum { N_GUARDS = 4 };
    size_t n_flag[N_GUARDS] = {0}, first[N_GUARDS][4];
    /* found when the plan tokenized the prompts (sweep_plan.c) */
    for (size_t i = 0; i < p->n; i++) {
        if (p->state[i] & SWEEP_STATE_IDENTICAL)
            flags[i] |= SCHEMA_GUARD_IDENTICAL;
        if (p->state[i] & SWEEP_STATE_UNSPACED)
            flags[i] |= SCHEMA_GUARD_UNSPACED_ANSWER;
        if (fx->not_top[i])
            flags[i] |= SCHEMA_GUARD_NOT_TOP_K;
    }
    /* the small gap against the spread pooled over done prompts (as merge
     * recomputes it over the whole dataset) */
    results_roles_gap_flags(fx->clean, fx->corrupted, p->n, flags);
    for (size_t i = 0; i < p->n; i++) {
        for (int b = 0; b < N_GUARDS; b++)
            if (flags[i] & (1 << b)) {
                if (n_flag[b] < 4)
                    first[b][n_flag[b]] = p->first + i;
                n_flag[b]++;
            }
    }
    static const char *const what[N_GUARDS] = {
        "clean and corrupted are the same tokens: nothing to patch, the normalized grids are NaN",
        "|clean - corrupted| is under 0.1 x the metric's spread: the normalized values are noise",
        "the answer has no leading space after a prompt that ends without one: the model predicts the spaced token",
        "the answer is not among the clean run's " SW_STR(SCHEMA_GUARD_TOP_K) " most likely next tokens: the metric "
        "follows a token the model does not predict"};
    char *text = NULL;
    ps_status st = PS_OK;
    for (int b = 0; b < N_GUARDS && st == PS_OK; b++) {
        if (!n_flag[b])
            continue;
        char ids[96] = "";
        for (size_t q = 0; q < n_flag[b] && q < 4; q++)
            snprintf(ids + strlen(ids), sizeof ids - strlen(ids), "%s%zu", q ? ", " : "", first[b][q]);
        char hint[320] = "";
        /* the first such prompt's spaced answer, when the clean run ranks it
         * in its top k (found by write_prompt) */
        int8_t rank = b == 3 ? fx->not_top[first[b][0] - p->first] : 0;
        if (b == 2 || rank > 0) {
            dataset_item it; /* the first one's answer, from the file */
            if ((st = sweep_plan_item(fx->p, first[b][0] - p->first, &it)))
                break;
            const char *a = it.answer;
            char spaced[160];
            int32_t id;
            snprintf(spaced, sizeof spaced, " %s", a);
            if (fx->tok && tokenizer_single_token(fx->tok, spaced, &id) == PS_OK) {
                if (b == 2)
                    snprintf(hint, sizeof hint, " (did you mean \"%.60s\", token %d, instead of \"%.60s\"?)", spaced,
                             (int)id, a);
                else
                    snprintf(hint, sizeof hint,
                             " (dataset index %zu: did you mean \"%.60s\", token %d, ranked %d in the clean run, "
                             "instead of \"%.60s\"?)",
                             first[b][0], spaced, (int)id, (int)rank, a);
            }
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

/* fx->not_top of a prompt from its clean run's top ids (see finalize_ctx). */
static int8_t top_guard(const finalize_ctx *fx, const double *top, int32_t answer, const char *answer_text)
{
    for (size_t k = 0; k < SWEEP_TOP_K; k++)
        if (top[k] == (double)answer)
            return 0;
    char spaced[1024];
    int32_t id;
    if (!fx->tok || answer_text[0] == ' ' || (size_t)snprintf(spaced, sizeof spaced, " %s", answer_text) >= sizeof spaced)
        return -1;
    ps_status st = tokenizer_single_token(fx->tok, spaced, &id);
    err_clear();
    for (size_t k = 0; st == PS_OK && k < SWEEP_TOP_K; k++)
        if (top[k] == (double)id)
            return (int8_t)(k + 1);
    return -1;
}

/* atp+exact's extra variables per component (schema.h), in write_atp's order. */
enum { SW_ATP_EST, SW_ATP_NORM, SW_ATP_ERR, SW_ATP_RHO, SW_ATP_MISSED, SW_ATP_EXTRAS };
static const ncout_extra atp_extras[SW_ATP_EXTRAS] = {
    [SW_ATP_EST] = {SCHEMA_ATP_SUFFIX, NCOUT_EXTRA_GRID, "attribution patching estimate of the patched metric", NULL},
    [SW_ATP_NORM] = {SCHEMA_ATP_NORMALIZED_SUFFIX, NCOUT_EXTRA_GRID_NORMALIZED,
                     "normalized attribution patching estimate", NULL},
    [SW_ATP_ERR] = {SCHEMA_ATP_ERROR_SUFFIX, NCOUT_EXTRA_GRID, "attribution patching estimate - exact value", NULL},
    [SW_ATP_RHO] = {SCHEMA_ATP_RANK_CORRELATION_SUFFIX, NCOUT_EXTRA_DOUBLE,
                    "Spearman rank correlation of the estimate and the exact grid",
                    "per prompt over the grid's cells (average ranks for ties; NaN when either grid is constant); "
                    "attributes prompts, mean, median: over the prompts done"},
    [SW_ATP_MISSED] = {SCHEMA_ATP_MISSED_SUFFIX, NCOUT_EXTRA_INT,
                       "exact top-10 cells missed by the estimate's top 10",
                       "cells among the exact top 10 by |value - base metric| that are not among the estimate's "
                       "top 10 (false negatives; all cells when the grid has fewer than 10); attributes prompts, "
                       "total: over the prompts done"},
};

/* atp+verify's extra variables per component (schema.h). */
enum { SW_VERIFIED, SW_VERIFIED_NORM, SW_VERIFY_EXTRAS };
static const ncout_extra verify_extras[SW_VERIFY_EXTRAS] = {
    [SW_VERIFIED] = {SCHEMA_VERIFIED_SUFFIX, NCOUT_EXTRA_GRID, "exact patched metric at the verified cells",
                     "exact value (fast engine) at the cells of each grid with the top verify_top_k |C_atp - base "
                     "metric| (global attribute verify_top_k); NaN at the cells not verified; fill: prompt not done"},
    [SW_VERIFIED_NORM] = {SCHEMA_VERIFIED_NORMALIZED_SUFFIX, NCOUT_EXTRA_GRID_NORMALIZED,
                          "normalized exact patched metric at the verified cells",
                          "as C_verified, normalized: (value - corrupted) / (clean - corrupted); NaN where not "
                          "verified"},
};

/* atp+exact's extras of one prompt: exact[c] and est[c] are its grids. */
static ps_status write_atp(finalize_ctx *fx, const journal_prompt *h, double *const exact[PATCH_COMPONENT_COUNT],
                           double *const est[PATCH_COMPONENT_COUNT])
{
    const job *j = fx->j;
    const double base = j->direction == PATCH_DENOISE ? h->corrupted_metric : h->clean_metric;
    double rho[PATCH_COMPONENT_COUNT], missed[PATCH_COMPONENT_COUNT];
    double *rv[PATCH_COMPONENT_COUNT] = {0}, *mv[PATCH_COMPONENT_COUNT] = {0}, *ev[PATCH_COMPONENT_COUNT] = {0};
    /* the error grids, est - exact, one after another */
    double *err = malloc((sweep_prompt_cells(j->components, fx->cfg, h->T) + 1) * sizeof *err);
    if (!err)
        return err_set(PS_ERR_NOMEM, "out of memory");
    ps_status st = PS_OK;
    size_t o = 0;
    for (int c = 0; c < PATCH_COMPONENT_COUNT && st == PS_OK; c++) {
        if (!j->components[c])
            continue;
        const size_t n = sweep_grid_size((patch_component)c, fx->cfg, h->T);
        atp_stats s;
        if ((st = atp_compare(exact[c], est[c], n, base, ATP_TOP_K, &s)))
            break;
        rho[c] = s.rank_correlation, rv[c] = &rho[c];
        missed[c] = (double)s.n_missed, mv[c] = &missed[c];
        ev[c] = err + o;
        for (size_t i = 0; i < n; i++)
            ev[c][i] = est[c][i] - exact[c][i];
        o += n;
    }
    if (st == PS_OK && (st = ncout_results_put_extra(&fx->r, h->prompt, SW_ATP_EST, est)) == PS_OK &&
        (st = ncout_results_put_extra(&fx->r, h->prompt, SW_ATP_NORM, est)) == PS_OK &&
        (st = ncout_results_put_extra(&fx->r, h->prompt, SW_ATP_ERR, ev)) == PS_OK &&
        (st = ncout_results_put_extra(&fx->r, h->prompt, SW_ATP_RHO, rv)) == PS_OK)
        st = ncout_results_put_extra(&fx->r, h->prompt, SW_ATP_MISSED, mv);
    free(err);
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
        st = ncout_results_put_skipped(&fx->r, h->prompt, h->reason);
        fx->res->prompts_skipped++;
        return st;
    }
    const size_t T = h->T, nv = sweep_prompt_cells(fx->j->components, fx->cfg, T);
    /* metric 0's cells after the clean run's top ids, then [clean,
     * corrupted, cells] per other metric (sweep_internal.h) */
    const size_t n_rec = sweep_prompt_values(fx->j, fx->cfg, T) - 2;
    if (h->n_values != n_rec)
        return err_set(PS_ERR_FORMAT, "journal record for prompt %llu has %zu bytes, expected %zu",
                       (unsigned long long)h->prompt, 2 * T * sizeof(int32_t) + h->n_values * sizeof(double),
                       2 * T * sizeof(int32_t) + n_rec * sizeof(double));
    double *values[PATCH_COMPONENT_COUNT] = {0}; /* ncout reads them only */
    const double *top = h->values;
    size_t off = SWEEP_TOP_K;
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        if (fx->j->components[c]) {
            values[c] = (double *)h->values + off;
            off += sweep_grid_size((patch_component)c, fx->cfg, T);
        }
    dataset_item it; /* answer and wrong as text, from the file */
    if ((st = sweep_plan_item(fx->p, h->prompt, &it)))
        return st;
    fx->not_top[h->prompt] = top_guard(fx, top, h->answer_id, it.answer);
    ncout_prompt np = {.T = T, .answer_id = h->answer_id, .wrong_id = h->wrong_id, .clean_metric = h->clean_metric,
                       .corrupted_metric = h->corrupted_metric, .clean_tokens = h->clean_ids,
                       .corrupted_tokens = h->corrupted_ids, .answer = it.answer, .wrong = it.wrong};
    st = ncout_results_put(&fx->r, h->prompt, &np, fx->tok, values);
    json_decref(it.obj);
    /* the other metrics: [clean, corrupted, cells] each, after metric 0's cells */
    for (size_t k = 1; k < sweep_metric_count(fx->j) && st == PS_OK; k++) {
        const double *blk = h->values + SWEEP_TOP_K + nv + (k - 1) * (2 + nv);
        double *vk[PATCH_COMPONENT_COUNT] = {0};
        size_t o = 2;
        for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
            if (fx->j->components[c]) {
                vk[c] = (double *)blk + o;
                o += sweep_grid_size((patch_component)c, fx->cfg, T);
            }
        st = ncout_results_put_metric(&fx->r, h->prompt, k, blk[0], blk[1], vk);
    }
    const bool verify = patch_method_verifies(fx->j->method);
    if (st == PS_OK && sweep_has_second_grid(fx->j)) {
        /* the second grid's cells after the first's (sweep_internal.h): the
         * estimate after the exact values, or the verified after the estimate */
        double *second[PATCH_COMPONENT_COUNT] = {0};
        size_t o = SWEEP_TOP_K + nv;
        for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
            if (fx->j->components[c]) {
                second[c] = (double *)h->values + o;
                o += sweep_grid_size((patch_component)c, fx->cfg, T);
            }
        if (verify && (st = ncout_results_put_extra(&fx->r, h->prompt, SW_VERIFIED, second)) == PS_OK)
            st = ncout_results_put_extra(&fx->r, h->prompt, SW_VERIFIED_NORM, second);
        else if (!verify)
            st = write_atp(fx, h, values, second);
    }
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

/* An ablation's attributes (schema.h): source, and for a mean mean_over and mean_prompts. */
static ps_status ablation_atts(ncout_file *f, ncout_results *r, const job *j, const sweep_plan *p,
                               const sweep_result *res)
{
    if (!patch_source_ablation(j->source))
        return PS_OK;
    ps_status st = ncout_put_attr(f, SCHEMA_ATT_SOURCE, patch_source_name(j->source));
    char num[32];
    if (st == PS_OK && j->source == PATCH_SOURCE_RESAMPLE) {
        /* every prompt's donor (a pure function of the seed and the dataset) */
        int *from = malloc((p->n ? p->n : 1) * sizeof *from);
        if (!from)
            return err_set(PS_ERR_NOMEM, "out of memory");
        for (size_t i = 0; i < p->n; i++) {
            const size_t k = p->first + i;
            from[i] = res->resample_from && k < res->n_resample_from && res->resample_from[k] != SIZE_MAX
                          ? (int)res->resample_from[k] : -1;
        }
        snprintf(num, sizeof num, "%zu", j->resample_seed);
        if ((st = ncout_put_attr(f, SCHEMA_ATT_ABLATION_SEED, num)) == PS_OK)
            st = ncout_results_put_prompt_id(r, SCHEMA_VAR_RESAMPLE_FROM,
                                             "dataset index of the prompt whose activations were patched in", 0,
                                             p->n, from);
        free(from);
    }
    if (st || j->source != PATCH_SOURCE_MEAN)
        return st;
    snprintf(num, sizeof num, "%zu", res->mean_prompts);
    if ((st = ncout_put_attr(f, SCHEMA_ATT_MEAN_OVER, j->mean_over ? j->mean_over : "all")))
        return st;
    return ncout_put_attr(f, SCHEMA_ATT_MEAN_PROMPTS, num);
}

void sweep_write_free(sweep_out *fx)
{
    if (!fx)
        return;
    if (fx->r_defined)
        ncout_results_free(&fx->r);
    if (fx->f_open)
        ncout_abort(&fx->f);
    if (fx->view.rd.f)
        dataset_reader_close(&fx->view.rd);
    free(fx->clean);
    free(fx->corrupted);
    free(fx->not_top);
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        free(fx->counts[c]);
    free(fx);
}

ps_status sweep_write_begin(sweep_out **out, const job *j, model *m, const tokenizer *tok, const sweep_plan *p,
                            const char *output, const sweep_opts *o, const char *dataset_sha, sweep_result *res)
{
    *out = NULL;
    sweep_out *fx = calloc(1, sizeof *fx);
    if (!fx)
        return err_set(PS_ERR_NOMEM, "out of memory");
    fx->view = *p; /* its reader is replaced by ours below; p's is not read */
    memset(&fx->view.rd, 0, sizeof fx->view.rd);
    fx->p = &fx->view;
    fx->j = j;
    fx->cfg = &m->cfg;
    fx->tok = tok;
    fx->res = res;
    fx->clean = malloc((p->n ? p->n : 1) * sizeof *fx->clean);
    fx->corrupted = malloc((p->n ? p->n : 1) * sizeof *fx->corrupted);
    fx->not_top = calloc(p->n ? p->n : 1, sizeof *fx->not_top);
    ps_status st = !fx->clean || !fx->corrupted || !fx->not_top ? err_set(PS_ERR_NOMEM, "out of memory") : PS_OK;
    if (st || (st = dataset_reader_open(&fx->view.rd, j->dataset))) {
        sweep_write_free(fx);
        return st;
    }
    for (size_t i = 0; i < p->n; i++)
        fx->clean[i] = fx->corrupted[i] = NAN;
    if ((st = ncout_create(&fx->f, output))) {
        sweep_write_free(fx);
        return st;
    }
    fx->f_open = true;
    char ranks[32];
    snprintf(ranks, sizeof ranks, "%zu", o->ranks_for_provenance);
    char slice[64] = SCHEMA_SLICE_ALL;
    if (o->n_slices)
        snprintf(slice, sizeof slice, "%zu/%zu", o->slice, o->n_slices);
    const patch_metric_list one = {.n = 1, .m = {j->metric}};
    /* an attribution method's estimates are C_atp, C_atp_normalized, as patch -o names them; with
     * atp+exact the exact grids keep their names and the estimate and its statistics are extras */
    const bool exact = patch_method_runs_exact(j->method);
    st = ncout_results_define_named(&fx->r, &fx->f, m, p->max_T, j->components, j->metrics.n ? &j->metrics : &one,
                                    j->direction, j->engine, exact ? "" : SCHEMA_ATP_SUFFIX);
    fx->r_defined = true; /* ncout_results_free is safe after a failed define */
    fx->r.prompt_offset = p->first;
    if (st == PS_OK && sweep_method_both(j))
        st = ncout_results_define_extra(&fx->r, atp_extras, SW_ATP_EXTRAS);
    if (st == PS_OK && patch_method_verifies(j->method)) {
        char k[32];
        snprintf(k, sizeof k, "%zu", j->verify_top_k);
        if ((st = ncout_results_define_extra(&fx->r, verify_extras, SW_VERIFY_EXTRAS)) == PS_OK)
            st = ncout_put_attr(&fx->f, SCHEMA_ATT_VERIFY_TOP_K, k);
    }
    if (st == PS_OK && patch_method_estimates(j->method)) {
        /* "+graddrop" when GradDrop was on, as patch -o: "atp*+graddrop", "atp+exact+graddrop" */
        char mname[48];
        snprintf(mname, sizeof mname, "%s%s", patch_method_name(j->method), j->graddrop ? "+graddrop" : "");
        st = ncout_put_attr(&fx->f, SCHEMA_ATT_METHOD, mname);
    }
    /* memory_per_rank and the timings are known at the end only
     * (sweep_write_end) */
    if (st || (st = ncout_put_attr(&fx->f, SCHEMA_ATT_SLICE, slice)) ||
        (st = ncout_put_attr(&fx->f, SCHEMA_ATT_JOB_PATH, j->path)) ||
        (st = ncout_put_attr(&fx->f, SCHEMA_ATT_JOB_TEXT, j->text)) ||
        (st = ncout_put_attr(&fx->f, SCHEMA_ATT_JOB_SHA256, j->sha256)) ||
        (st = ncout_put_attr(&fx->f, SCHEMA_ATT_DATASET_PATH, j->dataset)) ||
        (st = ncout_put_attr(&fx->f, SCHEMA_ATT_DATASET_SHA256, dataset_sha)) ||
        (st = ncout_put_attr(&fx->f, SCHEMA_ATT_MPI_RANKS, ranks)) ||
        (st = ablation_atts(&fx->f, &fx->r, j, p, res)) ||
        (st = summary_init(res, j, &m->cfg, p, fx->counts))) {
        sweep_write_free(fx);
        return st;
    }
    res->prompts_done = res->prompts_skipped = 0;
    res->mean_clean_metric = res->mean_corrupted_metric = res->accuracy = 0.0;
    *out = fx;
    return PS_OK;
}

ps_status sweep_write_prompt(sweep_out *fx, const journal_prompt *h) { return write_prompt(fx, h); }

ps_status sweep_write_journal(sweep_out *fx, journal *jr) { return journal_each(jr, write_record, fx); }

ps_status sweep_write_flush(sweep_out *fx) { return ncout_results_flush(&fx->r); }

ps_status sweep_write_end(sweep_out *fx, const char *memory, double compute_seconds, double write_seconds)
{
    sweep_plan *p = fx->p;
    sweep_result *res = fx->res;
    const job *j = fx->j;
    ps_status st = PS_OK;
    /* Prompts not done yet: explicit done = 0, so the prompt dimension
     * always has every prompt of the dataset. */
    for (size_t i = 0; i < p->n && st == PS_OK; i++)
        if (!sweep_plan_kind(p, i)) {
            st = ncout_results_put_pending(&fx->r, i);
        }
    if (st)
        return st;
    res->complete = res->prompts_done + res->prompts_skipped == p->n;
    char num[32], secs[2][32];
    snprintf(num, sizeof num, "%zu", res->prompts_done);
    snprintf(secs[0], sizeof secs[0], "%.3f", compute_seconds);
    snprintf(secs[1], sizeof secs[1], "%.3f", write_seconds);
    results_roles_in rin = {.first = p->first, .n = p->n, .roles = &p->roles, .role_pos = p->role_pos,
                            .meta = &p->meta, .templates = &p->templates, .item = plan_item_obj, .user = p};
    if ((st = ncout_results_flush(&fx->r)) || (st = results_roles_put(fx->f.ncid, fx->f.tmp_path, &rin)) ||
        (st = results_roles_aggregate(fx->f.ncid, fx->f.tmp_path)) || (st = ncout_atp_summary(fx->f.ncid, fx->f.tmp_path, res->atp)) ||
        (st = write_guards(fx, &fx->f)) ||
        (st = ncout_put_attr(&fx->f, SCHEMA_ATT_MEMORY_PER_RANK, memory)) ||
        (st = ncout_put_attr(&fx->f, SCHEMA_ATT_COMPUTE_SECONDS, secs[0])) ||
        (st = ncout_put_attr(&fx->f, SCHEMA_ATT_WRITE_SECONDS, secs[1])) ||
        (st = ncout_put_flag(&fx->f, SCHEMA_ATT_COMPLETE, res->complete)) ||
        (st = ncout_put_attr(&fx->f, SCHEMA_ATT_PROMPTS_DONE, num)))
        return st;
    fx->f_open = false; /* ncout_commit closes or aborts it */
    if ((st = ncout_commit(&fx->f)))
        return st;
    double n = (double)res->prompts_done;
    if (n > 0) {
        res->mean_clean_metric /= n;
        res->mean_corrupted_metric /= n;
        res->accuracy = j->metric == PATCH_LOGIT_DIFF ? res->accuracy / n : NAN;
    }
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        sweep_summary *sm = &res->summary[c];
        for (size_t k = 0; sm->mean && k < sm->rows * sm->cols; k++)
            sm->mean[k] = fx->counts[c][k] ? sm->mean[k] / (double)fx->counts[c][k] : NAN;
    }
    return PS_OK;
}

size_t sweep_chunk_record(const job *j, const model_config *cfg, size_t index, const dataset_tokens *tk,
                          const double *values, journal_prompt *r)
{
    /* metric 0's pair in the head; the top ids, its cells and the other
     * metrics' blocks in the values (sweep_internal.h) */
    const size_t nv = sweep_prompt_values(j, cfg, tk->n_tokens) - 2;
    *r = (journal_prompt){.prompt = index, .kind = JOURNAL_PROMPT_DONE, .T = tk->n_tokens,
                          .answer_id = tk->answer_id, .wrong_id = tk->wrong_id,
                          .clean_metric = values[0], .corrupted_metric = values[1],
                          .clean_ids = tk->clean_ids, .corrupted_ids = tk->corrupted_ids,
                          .values = values + 2, .n_values = nv};
    return 2 + nv;
}
