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
    for (size_t i = 0; i < p->n; i++) {
        if (p->tk)
            dataset_tokens_free(&p->tk[i]);
        if (p->invalid)
            free(p->invalid[i]);
    }
    free(p->tk);
    free(p->invalid);
    free(p->state);
    free(p->role_pos);
    dataset_roles_free(&p->roles);
    dataset_free(&p->d);
    memset(p, 0, sizeof *p);
}

/* Read and validate the dataset; invalid pairs stop the job unless skip_invalid. */
static ps_status plan_load(sweep_plan *p, const job *j, const model *m, const tokenizer *tok, size_t slice,
                           size_t n_slices)
{
    memset(p, 0, sizeof *p);
    ps_status st = dataset_read_jsonl(&p->d, j->dataset);
    if (st)
        return st;
    size_t total = j->max_prompts && j->max_prompts < p->d.n ? j->max_prompts : p->d.n;
    if (total == 0)
        return err_set(PS_ERR_INVALID, "%s: the dataset has no prompt pairs", j->dataset);
    p->n = total;
    if (n_slices) {
        /* slice k of n: prompts [floor((k-1) total / n), floor(k total / n)) */
        if (n_slices > total)
            return err_set(PS_ERR_INVALID, "%s: %zu slices of %zu prompt pairs would leave slices empty", j->dataset,
                           n_slices, total);
        p->first = (slice - 1) * total / n_slices;
        p->n = slice * total / n_slices - p->first;
    }
    /* roles and metadata of the whole dataset, so that slices agree */
    if ((st = dataset_roles_collect(&p->d, &p->roles)))
        return st;
    dataset_meta_collect(&p->d, &p->meta);
    p->role_pos = malloc(p->n * p->roles.n * sizeof *p->role_pos);
    if (!p->role_pos)
        return err_set(PS_ERR_NOMEM, "out of memory");
    for (size_t k = 0; k < p->n * p->roles.n; k++)
        p->role_pos[k] = -1;
    p->tk = calloc(p->n, sizeof *p->tk);
    p->invalid = calloc(p->n, sizeof *p->invalid);
    p->state = calloc(p->n, 1);
    if (!p->tk || !p->invalid || !p->state)
        return err_set(PS_ERR_NOMEM, "out of memory");
    size_t first_bad = 0;
    char lines[256] = "";
    for (size_t i = 0; i < p->n; i++) {
        if ((st = dataset_tokenize(&p->d, p->first + i, tok, j->bos, m->cfg.n_positions, &p->tk[i])) != PS_OK) {
            p->invalid[i] = strdup(err_msg());
            if (!p->invalid[i])
                return err_set(PS_ERR_NOMEM, "out of memory");
            if (p->n_invalid++ == 0) {
                first_bad = i;
                p->invalid_status = st;
            }
            size_t k = strlen(lines);
            if (k < sizeof lines - 24)
                snprintf(lines + k, sizeof lines - k, "%s%zu", k ? ", " : "", p->d.items[p->first + i].line);
            else if (lines[k - 1] != '.')
                snprintf(lines + k, sizeof lines - k, ", ...");
            continue;
        }
        if ((st = dataset_roles_resolve(&p->d, p->first + i, &p->roles, tok, p->tk[i].clean_ids, p->tk[i].n_tokens,
                                        j->bos && tokenizer_add_bos(tok), p->role_pos + i * p->roles.n)))
            return st;
        if (p->tk[i].n_tokens > p->max_T)
            p->max_T = p->tk[i].n_tokens;
    }
    const size_t n_bad = p->n_invalid;
    if (n_bad && !j->skip_invalid)
        return err_set(PS_ERR_INVALID, "%zu invalid prompt pair%s (line%s %s; skip_invalid = true skips them): %s", n_bad,
                       n_bad > 1 ? "s" : "", n_bad > 1 ? "s" : "", lines, p->invalid[first_bad]);
    if (p->max_T == 0)
        return err_set(PS_ERR_INVALID, "%s: no valid prompt pair", j->dataset);
    return PS_OK;
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
    for (size_t i = 0; i < p->n && st == PS_OK; i++)
        if (p->invalid[i] && !p->state[i]) {
            journal_prompt r = {.prompt = i, .kind = JOURNAL_PROMPT_SKIPPED, .reason = p->invalid[i]};
            st = journal_append_prompt(jr, &r);
            p->state[i] = JOURNAL_PROMPT_SKIPPED;
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
