/*
 * sweep_plan: which prompts a sweep runs (the dataset, max_prompts, the
 * slice), their tokens, and what an earlier run's journal says is done.
 */
#include "sweep_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fault.h"
#include "fsutil.h"
#include "ncin.h"
#include "ncout.h"
#include "schema.h"
#include "sha256.h"

size_t sweep_grid_size(patch_component c, const model_config *cfg, size_t T)
{
    size_t shape[3];
    size_t nd = patch_grid_shape(c, cfg, T, shape, NULL);
    return shape[0] * shape[1] * (nd == 3 ? shape[2] : 1);
}

size_t sweep_prompt_cells(const bool *on, const model_config *cfg, size_t T)
{
    size_t n = 0;
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        if (on[c])
            n += sweep_grid_size((patch_component)c, cfg, T);
    return n;
}

void sweep_plan_free(sweep_plan *p)
{
    for (size_t k = 0; k < p->n_invalid; k++)
        free(p->invalid[k]);
    free(p->invalid);
    free(p->invalid_at);
    free(p->at);
    free(p->state);
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

/* Tokenize record i of the plan (it) for its length, or note it invalid. */
static ps_status plan_check(sweep_plan *p, const job *j, const model *m, const tokenizer *tok, size_t i,
                            const dataset_item *it)
{
    dataset_tokens tk;
    char where[1200];
    snprintf(where, sizeof where, "%s:%zu", j->dataset, it->line);
    ps_status st = dataset_item_tokenize(it, where, tok, j->bos, m->cfg.n_positions, &tk);
    if (st)
        return plan_invalid(p, i, st);
    p->at[i].n_tokens = (uint32_t)tk.n_tokens;
    if (tk.n_tokens > p->max_T)
        p->max_T = tk.n_tokens;
    dataset_tokens_free(&tk);
    return PS_OK;
}

/* Pass 1: every record of the file read and checked (JSON, the four
 * fields), its place kept in p->at[0..*n_all), the first `tokenize` of
 * them tokenized too (plan_check); no record is held. */
static ps_status plan_index(sweep_plan *p, const job *j, const model *m, const tokenizer *tok, size_t tokenize,
                            size_t *n_all)
{
    size_t cap = 0;
    *n_all = 0;
    for (;;) {
        dataset_item it;
        uint64_t offset;
        ps_status st = dataset_reader_next(&p->rd, &it, &offset);
        if (st || !it.obj)
            return st ? st
                   : *n_all ? PS_OK
                            : err_set(PS_ERR_INVALID, "%s: no records (the file is empty or blank)", j->dataset);
        if (*n_all == cap) {
            size_t ncap = cap ? 2 * cap : 1024;
            sweep_prompt_at *q = realloc(p->at, ncap * sizeof *q);
            if (!q) {
                json_decref(it.obj);
                return err_set(PS_ERR_NOMEM, "%s: cannot allocate the index of %zu records", j->dataset, ncap);
            }
            p->at = q;
            cap = ncap;
        }
        const size_t i = (*n_all)++;
        p->at[i] = (sweep_prompt_at){.offset = offset, .line = (uint32_t)it.line};
        st = i < tokenize ? plan_check(p, j, m, tok, i, &it) : PS_OK;
        json_decref(it.obj);
        if (st)
            return st;
    }
}

/* Read and validate the dataset; invalid pairs stop the job unless
 * skip_invalid.  Streamed: only the index is kept; a slice, whose bounds
 * need the count of records, reads its own records a second time. */
static ps_status plan_load(sweep_plan *p, const job *j, const model *m, const tokenizer *tok, size_t slice,
                           size_t n_slices)
{
    memset(p, 0, sizeof *p);
    size_t n_all = 0;
    const size_t tokenize = n_slices ? 0 : j->max_prompts ? j->max_prompts : SIZE_MAX;
    ps_status st = dataset_reader_open(&p->rd, j->dataset);
    if (st || (st = plan_index(p, j, m, tok, tokenize, &n_all)))
        return st;
    size_t total = j->max_prompts && j->max_prompts < n_all ? j->max_prompts : n_all;
    p->n = total;
    if (n_slices) {
        /* slice k of n: prompts [floor((k-1) total / n), floor(k total / n)) */
        if (n_slices > total)
            return err_set(PS_ERR_INVALID, "%s: %zu slices of %zu prompt pairs would leave slices empty", j->dataset,
                           n_slices, total);
        p->first = (slice - 1) * total / n_slices;
        p->n = slice * total / n_slices - p->first;
    }
    /* the plan's part of the index alone */
    memmove(p->at, p->at + p->first, p->n * sizeof *p->at);
    sweep_prompt_at *shrunk = realloc(p->at, p->n * sizeof *p->at);
    if (shrunk)
        p->at = shrunk;
    if (!(p->state = calloc(p->n, 1)))
        return err_set(PS_ERR_NOMEM, "out of memory");
    for (size_t i = 0; n_slices && i < p->n; i++) {
        dataset_item it;
        if ((st = dataset_reader_read_at(&p->rd, p->at[i].offset, p->at[i].line, &it)))
            return st;
        st = plan_check(p, j, m, tok, i, &it);
        json_decref(it.obj);
        if (st)
            return st;
    }
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
        p->state[r.prompt] = (unsigned char)r.kind;
    journal_prompt_free(&r);
    return st;
}

ps_status sweep_plan_open(sweep_plan *p, journal *jr, fs_lock *lock, const job *j, model *m, const tokenizer *tok,
                          const sweep_opts *o, const char *output, char dataset_sha[65], sweep_result *res)
{
    ps_status st;
    char lpath[4200];
    snprintf(lpath, sizeof lpath, "%s.lock", output);
    /* One sweep per output: the lock before anything of the output is read
     * or changed (the journal's truncation by --overwrite included), held
     * until the file is renamed into place. */
    if ((st = ncout_check_writable(output)) || (st = fs_lock_take(lock, lpath, output)))
        return st;
    if (fault_point("sweep_lock"))
        return err_set(PS_ERR_IO, "injected fault at sweep_lock");
    if ((st = plan_load(p, j, m, tok, o->slice, o->n_slices)) ||
        (st = sha256_file_hex(j->dataset, dataset_sha)) || (st = model_hash(m)))
        return st;
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
        res->prompts_resumed += p->state[i] != 0;
    /* invalid pairs (skip_invalid): journaled once as skipped */
    for (size_t k = 0; k < p->n_invalid && st == PS_OK; k++) {
        const size_t i = p->invalid_at[k];
        if (!p->state[i]) {
            journal_prompt r = {.prompt = i, .kind = JOURNAL_PROMPT_SKIPPED, .reason = p->invalid[k]};
            st = journal_append_prompt(jr, &r);
            p->state[i] = JOURNAL_PROMPT_SKIPPED;
        }
    }
    return st ? st : journal_sync(jr);
}

size_t sweep_plan_next(const sweep_plan *p, size_t *next, size_t max, size_t *index)
{
    size_t n = 0;
    while (n < max && *next < p->n) {
        size_t i = (*next)++;
        if (!p->state[i])
            index[n++] = i;
    }
    return n;
}
