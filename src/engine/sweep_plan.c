/*
 * sweep_plan: which prompts a sweep runs (the dataset, max_prompts, the
 * slice), their tokens, and what an earlier run's journal says is done.
 */
#include "sweep_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clock.h"
#include "fault.h"
#include "fsutil.h"
#include "ncin.h"
#include "ncout.h"
#include "schema.h"
#include "sha256.h"

size_t sweep_grid_size(patch_component c, const model_config *cfg, size_t T)
{
    return patch_grid_size(c, cfg, T);
}

size_t sweep_prompt_cells(const bool *on, const model_config *cfg, size_t T)
{
    size_t n = 0;
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        if (on[c])
            n += sweep_grid_size((patch_component)c, cfg, T);
    return n;
}

size_t sweep_metric_count(const job *j) { return j->metrics.n ? j->metrics.n : 1; }

bool sweep_method_both(const job *j) { return patch_method_runs_exact(j->method) && patch_method_estimates(j->method); }

bool sweep_has_second_grid(const job *j) { return sweep_method_both(j) || patch_method_verifies(j->method); }

size_t sweep_prompt_values(const job *j, const model_config *cfg, size_t T)
{
    const size_t nv = sweep_prompt_cells(j->components, cfg, T);
    /* atp+exact: the estimate's cells after the exact ones; atp+verify: the verified after the estimate's */
    return SWEEP_TOP_K + sweep_metric_count(j) * (2 + nv) +
           (sweep_has_second_grid(j) ? nv : 0);
}

void sweep_plan_free(sweep_plan *p)
{
    for (size_t k = 0; k < p->n_invalid; k++)
        free(p->invalid[k]);
    free(p->invalid);
    free(p->invalid_at);
    free(p->at);
    free(p->state);
    free(p->role_pos);
    dataset_roles_free(&p->roles);
    results_roles_templates_free(&p->templates);
    dataset_reader_close(&p->rd);
    memset(p, 0, sizeof *p);
}

/* An invalid pair: plan index i, why (err_msg()). */
static ps_status plan_invalid(sweep_plan *p, size_t i, ps_status why)
{
    size_t k = p->n_invalid;
    size_t *at = realloc(p->invalid_at, (k + 1) * sizeof *at);
    if (at)
        p->invalid_at = at;
    char **msg = realloc(p->invalid, (k + 1) * sizeof *msg);
    if (msg)
        p->invalid = msg;
    if (!at || !msg || !(msg[k] = strdup(err_msg())))
        return err_set(PS_ERR_NOMEM, "out of memory");
    at[k] = i;
    if (p->n_invalid++ == 0)
        p->invalid_status = why;
    return PS_OK;
}

/* The first error of the roles (collecting names, then placing them),
 * kept until the whole file is read: a file that does not read is refused
 * for that first, as when the dataset was read whole. */
typedef struct {
    ps_status collect, resolve;
    char *collect_msg, *resolve_msg;
} plan_roles_err;

static void roles_err_keep(ps_status st, ps_status *keep, char **msg)
{
    if (*keep)
        return;
    *keep = st;
    *msg = strdup(err_msg());
}

/* The role positions' rows [0, rows) widened from stride old_n to
 * p->roles.n (one new role, p->roles.names[old_n]): the prompts before
 * the record that named it do not name it (-1), END aside, which is their
 * last token (-1 for an invalid pair).  cap_rows rows are allocated. */
static ps_status plan_roles_widen(sweep_plan *p, size_t rows, size_t cap_rows, size_t old_n)
{
    const size_t R = p->roles.n;
    int32_t *q = realloc(p->role_pos, (cap_rows ? cap_rows : 1) * R * sizeof *q);
    if (!q)
        return err_set(PS_ERR_NOMEM, "out of memory");
    p->role_pos = q;
    for (size_t i = rows; i-- > 0;) {
        memmove(q + i * R, q + i * old_n, old_n * sizeof *q);
        for (size_t k = old_n; k < R; k++)
            q[i * R + k] = !strcmp(p->roles.names[k], DATASET_ROLE_END) && p->at[i].n_tokens
                               ? (int32_t)p->at[i].n_tokens - 1
                               : -1;
    }
    return PS_OK;
}

/* Tokenize record i of the plan (it) for its length, its guards and its
 * role positions (row i of p->role_pos, stride p->roles.n: the roles known
 * so far), or note it invalid. */
static ps_status plan_check(sweep_plan *p, const job *j, const model *m, const tokenizer *tok, size_t i,
                            const dataset_item *it, plan_roles_err *re)
{
    dataset_tokens tk;
    char where[1200];
    snprintf(where, sizeof where, "%s:%zu", j->dataset, it->line);
    size_t cl = strlen(it->clean);
    bool prompt_spaced = cl && (it->clean[cl - 1] == ' ' || it->clean[cl - 1] == '\n');
    if (!prompt_spaced && it->answer[0] && it->answer[0] != ' ' && it->answer[0] != '\n')
        p->state[i] |= SWEEP_STATE_UNSPACED;
    int32_t *pos = p->role_pos ? p->role_pos + i * p->roles.n : NULL;
    for (size_t k = 0; pos && k < p->roles.n; k++)
        pos[k] = -1;
    ps_status st = dataset_item_tokenize(it, where, tok, j->bos, m->cfg.n_positions, &tk);
    if (st)
        return plan_invalid(p, i, st);
    p->at[i].n_tokens = (uint32_t)tk.n_tokens;
    if (tk.n_tokens > p->max_T)
        p->max_T = tk.n_tokens;
    if (!memcmp(tk.clean_ids, tk.corrupted_ids, tk.n_tokens * sizeof *tk.clean_ids))
        p->state[i] |= SWEEP_STATE_IDENTICAL;
    if (pos && !re->collect && !re->resolve &&
        (st = dataset_roles_resolve_item(it, where, &p->roles, tok, tk.clean_ids, tk.n_tokens,
                                         j->bos && tokenizer_add_bos(tok), pos)))
        roles_err_keep(st, &re->resolve, &re->resolve_msg);
    dataset_tokens_free(&tk);
    return PS_OK;
}

/* Pass 1: every record of the file read and checked (JSON, the four
 * fields), its place kept in p->at[0..*n_all), its role names, metadata
 * fields and template collected, the first `tokenize` of them tokenized
 * too (plan_check); no record is held. */
static ps_status plan_index(sweep_plan *p, const job *j, const model *m, const tokenizer *tok, size_t tokenize,
                            size_t *n_all, plan_roles_err *re)
{
    size_t cap = 0;
    *n_all = 0;
    dataset_meta_builder mb;
    dataset_meta_begin(&mb);
    for (;;) {
        dataset_item it;
        uint64_t offset;
        char where[1200];
        ps_status st = dataset_reader_next(&p->rd, &it, &offset);
        if (st)
            return st;
        if (!it.obj)
            break;
        if (*n_all == cap) {
            size_t ncap = cap ? 2 * cap : 1024;
            sweep_prompt_at *q = realloc(p->at, ncap * sizeof *q);
            if (q)
                p->at = q;
            unsigned char *sq = q ? realloc(p->state, ncap) : NULL;
            if (sq)
                p->state = sq;
            int32_t *rq = sq && p->roles.n && *n_all < tokenize
                              ? realloc(p->role_pos, ncap * p->roles.n * sizeof *rq) : NULL;
            if (rq)
                p->role_pos = rq;
            if (!q || !sq || (p->roles.n && *n_all < tokenize && !rq)) {
                json_decref(it.obj);
                return err_set(PS_ERR_NOMEM, "%s: cannot allocate the index of %zu records", j->dataset, ncap);
            }
            cap = ncap;
        }
        const size_t i = (*n_all)++;
        p->at[i] = (sweep_prompt_at){.offset = offset, .line = (uint32_t)it.line};
        p->state[i] = 0;
        snprintf(where, sizeof where, "%s:%zu", j->dataset, it.line);
        const size_t old_n = p->roles.n;
        if (!re->collect && (st = dataset_roles_add_item(&p->roles, &it, where)) && st != PS_ERR_NOMEM) {
            roles_err_keep(st, &re->collect, &re->collect_msg);
            st = PS_OK;
        }
        if (st == PS_OK && p->roles.n > old_n)
            st = plan_roles_widen(p, i < tokenize ? i : tokenize, i < tokenize ? cap : tokenize, old_n);
        dataset_meta_add_item(&mb, &it);
        if (st == PS_OK)
            st = results_roles_templates_add(&p->templates, &it);
        if (st == PS_OK && i < tokenize)
            st = plan_check(p, j, m, tok, i, &it, re);
        json_decref(it.obj);
        if (st)
            return st;
    }
    if (*n_all == 0)
        return err_set(PS_ERR_INVALID, "%s: no records (the file is empty or blank)", j->dataset);
    dataset_meta_end(&mb, &p->meta);
    /* END last unless a record named it */
    const size_t old_n = p->roles.n;
    ps_status st = re->collect ? PS_OK : dataset_roles_finish(&p->roles, j->dataset);
    const size_t rows = *n_all < tokenize ? *n_all : tokenize;
    if (st == PS_OK && p->roles.n > old_n)
        st = plan_roles_widen(p, rows, rows, old_n);
    return st;
}

/* Read and validate the dataset; invalid pairs stop the job unless
 * skip_invalid.  Streamed: only the index is kept (with the role positions
 * and a state byte a prompt); a slice, whose bounds need the count of
 * records, reads its own records a second time. */
static ps_status plan_load(sweep_plan *p, const job *j, const model *m, const tokenizer *tok, size_t slice,
                           size_t n_slices)
{
    memset(p, 0, sizeof *p);
    size_t n_all = 0;
    const size_t tokenize = n_slices ? 0 : j->max_prompts ? j->max_prompts : SIZE_MAX;
    plan_roles_err re = {0};
    ps_status st = dataset_reader_open(&p->rd, j->dataset);
    if (st == PS_OK)
        st = plan_index(p, j, m, tok, tokenize, &n_all, &re);
    size_t total = j->max_prompts && j->max_prompts < n_all ? j->max_prompts : n_all;
    if (st == PS_OK) {
        p->n = total;
        if (n_slices) {
            /* slice k of n: prompts [floor((k-1) total / n), floor(k total / n)) */
            if (n_slices > total)
                st = err_set(PS_ERR_INVALID, "%s: %zu slices of %zu prompt pairs would leave slices empty",
                             j->dataset, n_slices, total);
            else {
                p->first = (slice - 1) * total / n_slices;
                p->n = slice * total / n_slices - p->first;
            }
        }
    }
    /* roles of the whole dataset, so that slices agree: their first error */
    if (st == PS_OK && re.collect)
        st = err_set(re.collect, "%s", re.collect_msg ? re.collect_msg : "invalid roles");
    free(re.collect_msg);
    if (st) {
        free(re.resolve_msg);
        return st;
    }
    /* the plan's part of the index alone */
    memmove(p->at, p->at + p->first, p->n * sizeof *p->at);
    memmove(p->state, p->state + p->first, p->n);
    sweep_prompt_at *shrunk = realloc(p->at, p->n * sizeof *p->at);
    if (shrunk)
        p->at = shrunk;
    unsigned char *sshrunk = realloc(p->state, p->n);
    if (sshrunk)
        p->state = sshrunk;
    if (n_slices) {
        free(p->role_pos);
        p->role_pos = malloc((p->n ? p->n : 1) * p->roles.n * sizeof *p->role_pos);
        if (!p->role_pos) {
            free(re.resolve_msg);
            return err_set(PS_ERR_NOMEM, "out of memory");
        }
        memset(p->state, 0, p->n);
    } else {
        int32_t *rshrunk = realloc(p->role_pos, (p->n ? p->n : 1) * p->roles.n * sizeof *p->role_pos);
        if (rshrunk)
            p->role_pos = rshrunk;
    }
    for (size_t i = 0; n_slices && i < p->n && st == PS_OK; i++) {
        dataset_item it;
        if ((st = dataset_reader_read_at(&p->rd, p->at[i].offset, p->at[i].line, &it)))
            break;
        st = plan_check(p, j, m, tok, i, &it, &re);
        json_decref(it.obj);
    }
    if (st == PS_OK && re.resolve)
        st = err_set(re.resolve, "%s", re.resolve_msg ? re.resolve_msg : "roles cannot be placed");
    free(re.resolve_msg);
    if (st)
        return st;
    const size_t n_bad = p->n_invalid;
    if (n_bad && !j->skip_invalid) {
        char lines[256] = "";
        for (size_t k = 0; k < n_bad; k++) {
            size_t len = strlen(lines);
            if (len < sizeof lines - 24) {
                snprintf(lines + len, sizeof lines - len, "%s%u", len ? ", " : "",
                         (unsigned)p->at[p->invalid_at[k]].line);
            } else {
                snprintf(lines + len, sizeof lines - len, ", ...");
                break;
            }
        }
        return err_set(PS_ERR_INVALID, "%zu invalid prompt pair%s (line%s %s; skip_invalid = true skips them): %s", n_bad,
                       n_bad > 1 ? "s" : "", n_bad > 1 ? "s" : "", lines, p->invalid[0]);
    }
    if (p->max_T == 0)
        return err_set(PS_ERR_INVALID, "%s: no valid prompt pair", j->dataset);
    return PS_OK;
}

ps_status sweep_plan_item(sweep_plan *p, size_t i, dataset_item *it)
{
    return dataset_reader_read_at(&p->rd, p->at[i].offset, p->at[i].line, it);
}

ps_status sweep_plan_tokens(sweep_plan *p, const job *j, const model *m, const tokenizer *tok, const size_t *index,
                            size_t n, dataset_tokens *tk)
{
    ps_status st = PS_OK;
    size_t k = 0; /* tk[0..k) are held */
    for (; k < n; k++) {
        const sweep_prompt_at *at = &p->at[index[k]];
        dataset_item it;
        char where[1200];
        if ((st = sweep_plan_item(p, index[k], &it)))
            break;
        snprintf(where, sizeof where, "%s:%u", j->dataset, (unsigned)at->line);
        st = dataset_item_tokenize(&it, where, tok, j->bos, m->cfg.n_positions, &tk[k]);
        json_decref(it.obj);
        if (st)
            break;
        if (tk[k].n_tokens != at->n_tokens) {
            dataset_tokens_free(&tk[k]);
            st = err_set(PS_ERR_IO, "%s: the record is not what it was (the file changed while in use)", where);
            break;
        }
    }
    if (st)
        for (size_t q = 0; q < k; q++)
            dataset_tokens_free(&tk[q]);
    return st;
}

/* journal_each on open: which prompts are done already. */
static ps_status mark_record(void *user, const void *payload, size_t n)
{
    sweep_plan *p = user;
    journal_prompt r;
    ps_status st = journal_prompt_decode(&r, payload, n);
    if (st)
        return st;
    if (r.prompt >= p->n || (r.kind != JOURNAL_PROMPT_DONE && r.kind != JOURNAL_PROMPT_SKIPPED))
        st = err_set(PS_ERR_FORMAT, "journal record for prompt %llu is not of this dataset",
                     (unsigned long long)r.prompt);
    else
        sweep_plan_set_kind(p, r.prompt, (unsigned)r.kind);
    journal_prompt_free(&r);
    return st;
}

ps_status sweep_plan_open(sweep_plan *p, journal *jr, fs_lock *lock, const job *j, model *m, const tokenizer *tok,
                          const sweep_opts *o, const char *output, char dataset_sha[65], sweep_result *res)
{
    ps_status st;
    double t = clock_now(), t1; /* res->phase_seconds */
    char lpath[4200];
    snprintf(lpath, sizeof lpath, "%s.lock", output);
    /* One sweep per output: the lock before anything of the output is read
     * or changed (the journal's truncation by --overwrite included), held
     * until the file is renamed into place. */
    if ((st = ncout_check_writable(output)) || (st = fs_lock_take(lock, lpath, output)))
        return st;
    if (fault_point("sweep_lock"))
        return err_set(PS_ERR_IO, "injected fault at sweep_lock");
    if ((st = plan_load(p, j, m, tok, o->slice, o->n_slices)))
        return st;
    t1 = clock_now();
    res->phase_seconds[SWEEP_PHASE_DATASET] += t1 - t;
    if ((st = sha256_file_hex(j->dataset, dataset_sha)) || (st = model_hash(m)))
        return st;
    t = clock_now();
    res->phase_seconds[SWEEP_PHASE_HASH] += t - t1;
    /* the slice is part of the identity: first and count */
    journal_identity id = {.n_prompts = ((uint64_t)p->first << 32) | p->n};
    memcpy(id.job_sha256, j->sha256, 65);
    memcpy(id.model_sha256, m->sha256, 65);
    memcpy(id.dataset_sha256, dataset_sha, 65);
    char jpath[4200];
    snprintf(jpath, sizeof jpath, "%s.journal", output);
    /* A complete result file of this very job and no journal: nothing to do. */
    if (!o->overwrite && access(jpath, F_OK) != 0 && access(output, F_OK) == 0) {
        char want_slice[64] = SCHEMA_SLICE_ALL;
        if (o->n_slices)
            snprintf(want_slice, sizeof want_slice, "%zu/%zu", o->slice, o->n_slices);
        if ((st = ncin_verify(output)))
            return err_wrap(st, "cannot resume");
        if (!schema_is_complete_run(output, j->sha256, m->sha256, dataset_sha, want_slice))
            return err_set(PS_ERR_INVALID,
                           "%s exists and is not the complete result of this job, model, dataset and slice "
                           "(use --overwrite to replace it)", output);
        res->was_complete = res->complete = true;
        return PS_OK;
    }
    if ((st = journal_open(jr, jpath, &id, o->overwrite, o->resume_from_damage)))
        return st;
    res->journal_dropped_at = jr->dropped_at;
    res->journal_dropped_intact = jr->dropped_intact;
    if ((st = journal_each(jr, mark_record, p)))
        return err_wrap(st, "%s", jpath);
    for (size_t i = 0; i < p->n; i++)
        res->prompts_resumed += sweep_plan_kind(p, i) != 0;
    /* invalid pairs (skip_invalid): journaled once as skipped */
    for (size_t k = 0; k < p->n_invalid && st == PS_OK; k++) {
        const size_t i = p->invalid_at[k];
        if (!sweep_plan_kind(p, i)) {
            journal_prompt r = {.prompt = i, .kind = JOURNAL_PROMPT_SKIPPED, .reason = p->invalid[k]};
            st = journal_append_prompt(jr, &r);
            sweep_plan_set_kind(p, i, JOURNAL_PROMPT_SKIPPED);
        }
    }
    if (st == PS_OK)
        st = journal_sync(jr);
    res->phase_seconds[SWEEP_PHASE_JOURNAL_OPEN] += clock_now() - t;
    return st;
}

size_t sweep_plan_next(const sweep_plan *p, size_t *next, size_t max, size_t *index)
{
    size_t n = 0;
    while (n < max && *next < p->n) {
        size_t i = (*next)++;
        if (!sweep_plan_kind(p, i))
            index[n++] = i;
    }
    return n;
}
