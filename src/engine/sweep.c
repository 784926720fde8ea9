/*
 * sweep: sweep_run, the steps of a sweep (sweep.h); the parts are in
 * sweep_plan.c, sweep_dist.c, sweep_memory.c and sweep_write.c
 * (sweep_internal.h).
 */
#include "sweep.h"
#include "sweep_internal.h"

#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "clock.h"
#include "lens_dataset.h"

/* Rank 0: the chunk's records (one per prompt, journal.h), durable. */
static ps_status journal_chunk(journal *jr, const job *j, const model_config *cfg, sweep_plan *p,
                               const size_t *index, const dataset_tokens *tks, const sweep_chunk *ch)
{
    ps_status st = PS_OK;
    for (size_t k = 0, off = 0; k < ch->n_pairs && st == PS_OK; k++) {
        journal_prompt r;
        off += sweep_chunk_record(j, cfg, index[k], &tks[k], ch->values + off, &r);
        st = journal_append_prompt(jr, &r);
        sweep_plan_set_kind(p, index[k], JOURNAL_PROMPT_DONE);
    }
    return st ? st : journal_sync(jr);
}

/* Rank 0: prompts per chunk, and this run's totals for progress. */
static size_t chunk_plan(const job *j, const model *m, comm *c, const sweep_plan *p, const sweep_work *w,
                         sweep_progress *pr)
{
    /* By prompt, the budget's pairs per rank: each holds only its own
     * caches.  (By cell every rank holds the whole chunk's.) */
    size_t chunk = w->chunk, todo = 0;
    if (!j->chunk_prompts && j->distribute != JOB_DISTRIBUTE_CELLS)
        chunk *= comm_size(c);
    pr->prompts_total = p->n;
    for (size_t i = 0; i < p->n; i++) {
        if (sweep_plan_kind(p, i)) {
            pr->prompts_done++;
            continue;
        }
        todo++;
        pr->cells_total += sweep_prompt_cells(j->components, &m->cfg, p->at[i].n_tokens);
    }
    pr->n_chunks = (todo + chunk - 1) / chunk;
    return chunk;
}

/* Collective: every chunk not done yet, until the end or *stop. */
static ps_status run_chunks(const job *j, model *m, const tokenizer *tok, comm *c, const sweep_opts *o,
                            sweep_plan *p, journal *jr, ablate_sources *ab, sweep_writer *w, sweep_result *res,
                            sweep_progress *pr)
{
    const bool root = comm_rank(c) == 0;
    size_t chunk = root ? chunk_plan(j, m, c, p, &res->work, pr) : 1;
    res->prompts_total = pr->prompts_total;
    size_t *index = root ? malloc(chunk * sizeof *index) : NULL;
    dataset_tokens *tk = root ? calloc(chunk, sizeof *tk) : NULL; /* the chunk's, read again from the file */
    ps_status st = root && (!index || !tk) ? err_set(PS_ERR_NOMEM, "out of memory") : PS_OK;
    if ((st = comm_agree(c, st))) {
        free(index);
        free(tk);
        return st;
    }
    const double t0 = clock_now();
    double *ph = res->phase_seconds, t = t0, t1;
    size_t next = 0; /* rank 0: next prompt index to consider */
    for (;;) {
        size_t n = 0;
        if (root && !(o->stop && *o->stop))
            n = sweep_plan_next(p, &next, chunk, index);
        if (root && (st = sweep_plan_tokens(p, j, m, tok, index, n, tk)))
            n = 0;
        t1 = clock_now();
        ph[SWEEP_PHASE_TOKENS] += t1 - t;
        if ((st = comm_agree(c, st)))
            break;
        sweep_chunk ch;
        /* resample: the chunk's donors to every rank (by dataset index) */
        for (size_t k = 0; root && k < n; k++)
            index[k] += p->first;
        st = ablate_sources_chunk(ab, c, index, n);
        for (size_t k = 0; root && k < n; k++)
            index[k] -= p->first;
        if ((st = comm_agree(c, st)))
            break;
        st = sweep_dist_chunk_ablate(j, m, c, tk, n, res->work.chunk, res->work.fast_rows, ab, &ch);
        t = clock_now();
        ph[SWEEP_PHASE_COMPUTE] += t - t1;
        if (st || ch.n_pairs == 0) {
            for (size_t k = 0; k < n; k++)
                dataset_tokens_free(&tk[k]);
            break;
        }
        if (root) {
            st = journal_chunk(jr, j, &m->cfg, p, index, tk, &ch);
            t1 = clock_now();
            ph[SWEEP_PHASE_JOURNAL] += t1 - t;
            /* durable: now to the writer thread (which takes the tokens
             * and values) */
            if (st == PS_OK) {
                st = sweep_writer_push(w, index, tk, ch.n_pairs, ch.values);
                ch.values = NULL;
            }
            t = clock_now();
            ph[SWEEP_PHASE_PUSH] += t - t1;
            for (size_t k = 0; k < n; k++)
                dataset_tokens_free(&tk[k]);
            pr->prompts_done += ch.n_pairs;
            pr->cells_done += ch.n_cells;
            pr->chunk++;
            pr->seconds = clock_now() - t0;
            res->cells_computed += ch.n_cells;
            if (o->progress)
                o->progress(o->progress_user, pr);
        }
        sweep_chunk_free(&ch);
        if ((st = comm_agree(c, st)))
            break;
    }
    res->seconds = clock_now() - t0;
    free(index);
    free(tk);
    return st;
}

/* Collective: the job's ablation sources (zero, mean over its dataset);
 * nothing for clean / corrupted.  A mean that does not cover the longest
 * prompt (mean_over a shorter subset) stops the job before any patching. */
static ps_status ablation_sources(const job *j, const model *m, const tokenizer *tok, comm *c, const sweep_plan *p,
                                  ablate_sources *ab, sweep_result *res)
{
    const ablate_set set = {.path = j->dataset, .mean_over = j->mean_over, .max_prompts = j->max_prompts,
                            .bos = j->bos, .skip_invalid = j->skip_invalid, .direction = j->direction};
    ps_status st = ablate_sources_init(ab, m, tok, c, j->source, &set, j->resample_seed);
    if (st)
        return st;
    res->resample_from = ab->donor;
    res->n_resample_from = ab->n_set;
    if (j->source == PATCH_SOURCE_RESAMPLE && comm_rank(c) == 0)
        for (size_t i = 0; i < p->n && st == PS_OK; i++) {
            const size_t k = p->first + i;
            if (p->at[i].n_tokens && (k >= ab->n_set || ab->donor[k] == SIZE_MAX))
                st = err_set(PS_ERR_INVALID, "%s:%u: no other pair of %u tokens to resample from", j->dataset,
                             (unsigned)p->at[i].line, (unsigned)p->at[i].n_tokens);
        }
    if (j->source != PATCH_SOURCE_MEAN)
        return comm_agree(c, st);
    res->mean_prompts = ablate_mean_count(&ab->mean);
    if (comm_rank(c) == 0 && p->max_T && !ablate_mean_covers(&ab->mean, p->max_T))
        st = err_set(PS_ERR_INVALID,
                     "%s: the mean (mean_over %s, %zu prompts) has no prompt of %zu tokens, the longest of the job",
                     j->dataset, j->mean_over ? j->mean_over : "all", res->mean_prompts, p->max_T);
    return comm_agree(c, st);
}

/* Rank 0: the job's [lens] file of the same prompts, from their tokens. */
static ps_status write_lens(const job *j, model *m, const tokenizer *tok, const sweep_plan *p, const sweep_opts *o,
                            sweep_result *res)
{
    if (o->n_slices) {
        res->lens_skipped_slice = true;
        return PS_OK;
    }
    /* the lens needs every prompt: the first invalid one fails it */
    if (p->n_invalid)
        return err_set(p->invalid_status, "%s", p->invalid[0]);
    /* from the file: the plan holds no records (lens_dataset reads them) */
    size_t n_written = 0;
    ps_status st = lens_dataset_write(j->lens_output, m, tok, j->dataset, p->first, p->n, j->bos, j->lens_top_k,
                                      &n_written);
    res->lens_written = st == PS_OK;
    return st;
}

/* Rank 0 after the chunks: the writer thread finishes the file, then the
 * lens. */
static ps_status finish(const job *j, model *m, const tokenizer *tok, const sweep_opts *o, const char *output,
                        sweep_plan *p, journal *jr, sweep_writer *w, const char *memory,
                        const sweep_progress *pr, sweep_result *res)
{
    res->interrupted = o->stop && *o->stop && pr->prompts_done < p->n;
    double t = clock_now();
    ps_status st = sweep_writer_finish(w, memory, res->seconds);
    res->phase_seconds[SWEEP_PHASE_FINISH] += clock_now() - t;
    struct stat sb;
    res->write_bytes = st == PS_OK && stat(output, &sb) == 0 ? (size_t)sb.st_size : 0;
    res->prompts_total = p->n;
    if (st == PS_OK && res->complete)
        journal_close(jr, true);
    t = clock_now();
    if (st == PS_OK && res->complete && j->lens)
        st = write_lens(j, m, tok, p, o, res);
    res->phase_seconds[SWEEP_PHASE_LENS] += clock_now() - t;
    return st;
}

ps_status sweep_run(const job *j, model *m, const tokenizer *tok, comm *c, const sweep_opts *o, sweep_result *res)
{
    memset(res, 0, sizeof *res);
    const bool root = comm_rank(c) == 0;
    const char *output = o->output ? o->output : j->output;
    snprintf(res->output, sizeof res->output, "%s", output);
    sweep_plan p = {0};
    journal jr = {.fd = -1};
    fs_lock lock = {.fd = -1};
    char dataset_sha[65] = "";
    char *memory = NULL;
    sweep_progress pr = {0};
    ablate_sources ab = {0};
    sweep_writer *w = NULL;
    ps_status st = PS_OK;
    double t; /* res->phase_seconds */
    /* 1. rank 0: the dataset, the journal, what is done already */
    if (root)
        st = sweep_plan_open(&p, &jr, &lock, j, m, tok, o, output, dataset_sha, res);
    if ((st = comm_agree(c, st)))
        goto out;
    /* 2. rank 0 knows the longest prompt, so it plans the working memory */
    if (root && !res->was_complete)
        sweep_work_plan(j, m, p.max_T, &res->work);
    uint64_t start[2] = {res->was_complete, res->work.fast_rows};
    if ((st = comm_bcast(c, start, sizeof start)))
        goto out;
    if (start[0]) {
        /* complete already; its [lens] file too, unless writing it failed
         * (a full disk) after the results were in place */
        if (root && j->lens && !o->n_slices && access(j->lens_output, F_OK) != 0)
            st = write_lens(j, m, tok, &p, o, res);
        st = comm_agree(c, st);
        goto out;
    }
    res->work.fast_rows = start[1];
    /* 3. an ablation's sources: the mean is a first pass over the dataset on
     *    every rank (ablate.h), the same bits for any number of ranks */
    t = clock_now();
    if ((st = ablation_sources(j, m, tok, c, &p, &ab, res)))
        goto out;
    res->phase_seconds[SWEEP_PHASE_SOURCES] += clock_now() - t;
    t = clock_now();
    /* 4. rank 0: the writer thread starts the file (and writes what the
     *    journal has already); every chunk not done yet, journaled and
     *    written beside the next one's computation */
    if (root)
        st = sweep_writer_start(&w, j, m, tok, &p, &jr, output, o, dataset_sha, res);
    res->phase_seconds[SWEEP_PHASE_WRITER_START] += clock_now() - t;
    if ((st = comm_agree(c, st)) || (st = run_chunks(j, m, tok, c, o, &p, &jr, &ab, w, res, &pr)))
        goto out;
    t = clock_now();
    /* 5. provenance: what each rank needed for the patching (before rank 0
     *    builds the file) */
    if ((st = sweep_memory_text(c, &memory)))
        goto out;
    res->phase_seconds[SWEEP_PHASE_MEMORY] += clock_now() - t;
    /* 6. rank 0: the NetCDF file finished, the [lens] file */
    if (root) {
        st = finish(j, m, tok, o, output, &p, &jr, w, memory, &pr, res);
        w = NULL; /* freed by the finish */
    }
    st = comm_agree(c, st);
out:
    sweep_writer_cancel(w); /* after an error: deletes the .partial file */
    ablate_sources_free(&ab); /* after the writer, which reads its donors */
    free(memory);
    if (jr.fd >= 0)
        journal_close(&jr, false);
    fs_lock_release(&lock);
    sweep_plan_free(&p);
    return st;
}

const char *sweep_phase_name(sweep_phase ph)
{
    static const char *const names[SWEEP_PHASE_COUNT] = {
        [SWEEP_PHASE_DATASET] = "dataset",   [SWEEP_PHASE_HASH] = "hash",
        [SWEEP_PHASE_JOURNAL_OPEN] = "journal_open", [SWEEP_PHASE_SOURCES] = "sources",
        [SWEEP_PHASE_WRITER_START] = "writer_start", [SWEEP_PHASE_TOKENS] = "tokens",
        [SWEEP_PHASE_COMPUTE] = "compute",   [SWEEP_PHASE_JOURNAL] = "journal",
        [SWEEP_PHASE_PUSH] = "push",         [SWEEP_PHASE_MEMORY] = "memory",
        [SWEEP_PHASE_FINISH] = "finish",     [SWEEP_PHASE_LENS] = "lens"};
    return (unsigned)ph < SWEEP_PHASE_COUNT ? names[ph] : "?";
}

void sweep_result_free(sweep_result *res)
{
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        free(res->summary[c].mean);
    memset(res->summary, 0, sizeof res->summary);
    for (size_t k = 0; k < res->n_roles; k++)
        free(res->role_names[k]);
    free(res->role_names);
    res->role_names = NULL;
    free(res->guards);
    res->guards = NULL;
    res->n_roles = 0;
}
