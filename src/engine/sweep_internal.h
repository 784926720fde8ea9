/*
 * What the sweep's files share (sweep.h explains the sweep):
 *   sweep.c         sweep_run, the steps in order
 *   sweep_plan.c    the dataset plan: which prompts, their tokens, what the
 *                   journal says is done; the next chunk's prompts
 *   sweep_dist.c    one chunk on every rank: the two distributions (by cell,
 *                   by prompt) over comm and the scheduler that deals work
 *   sweep_memory.c  the working-memory budget and every rank's memory figures
 *   sweep_write.c   the NetCDF file from the journal, with the summary
 * The journal's record format is the journal's (journal.h, journal_prompt).
 */
#ifndef PS_SWEEP_INTERNAL_H
#define PS_SWEEP_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ablate.h"
#include "comm.h"
#include "dataset.h"
#include "fsutil.h"
#include "journal.h"
#include "job.h"
#include "model.h"
#include "patch.h"
#include "results_roles.h"
#include "schema.h"
#include "sweep.h"
#include "tokenizer.h"

/* ---- sweep_plan.c ---------------------------------------------------------- */

/* Cells of one component's grid for a prompt of T tokens. */
size_t sweep_grid_size(patch_component c, const model_config *cfg, size_t T);

/* Cells of one prompt over the selected components (on[PATCH_COMPONENT_COUNT]). */
size_t sweep_prompt_cells(const bool *on, const model_config *cfg, size_t T);

/* Values of one prompt in a chunk's results and in its journal record:
 * metric 0's [clean_0, corrupted_0], the clean run's SWEEP_TOP_K top ids,
 * metric 0's cells in component and grid order, then for each other metric
 * k of the job (j->metrics, one when n is 0) [clean_k, corrupted_k, cells
 * of metric k]; the journal's head takes metric 0's clean and corrupted,
 * its values the rest (with one metric exactly the one-metric layout). */
size_t sweep_metric_count(const job *j);
size_t sweep_prompt_values(const job *j, const model_config *cfg, size_t T);
/* Method atp+exact or atp*+exact (one metric): after the exact cells, the
 * record holds the estimate's cells, in the same order (sweep_dist.c);
 * atp+verify, atp*+verify (patch_method_verifies): after the estimate's
 * cells, the verified ones (exact at each grid's top verify_top_k, NaN
 * elsewhere). */
bool sweep_method_both(const job *j);

/* Whether a prompt's record holds a second grid after the first:
 * atp+exact's estimate or atp+verify's verified cells (above). */
bool sweep_has_second_grid(const job *j);

/* Where one prompt pair is in the dataset file: the plan's per-prompt index
 * (16 bytes a pair), from which a chunk's records are read again. */
typedef struct {
    uint64_t offset;   /* its line's byte offset */
    uint32_t line;     /* 1-based line (the file is at most 256 MiB) */
    uint32_t n_tokens; /* 0: an invalid pair */
} sweep_prompt_at;

/* What rank 0 knows about the dataset: an index, not the records.  The
 * records are read (and tokenized) again chunk by chunk from the file, so
 * memory grows by the index alone with the dataset's size. */
typedef struct {
    dataset_reader rd;        /* open on the dataset */
    size_t first;             /* dataset index of the plan's prompt 0 (slices) */
    size_t n;                 /* prompts used (max_prompts and the slice applied) */
    sweep_prompt_at *at;      /* [n] */
    size_t n_invalid;
    size_t *invalid_at;       /* [n_invalid]: plan index of each invalid pair, in order */
    char **invalid;           /* [n_invalid]: why */
    ps_status invalid_status; /* of the first invalid item */
    unsigned char *state;     /* [n]: SWEEP_STATE_KIND and the guard bits below */
    size_t max_T;
    dataset_roles roles;      /* of the whole dataset (names only) */
    dataset_meta meta;        /* its metadata fields (names; the values are read again) */
    results_roles_templates templates; /* its template values (distinct) */
    int32_t *role_pos;        /* [n * roles.n]: token position of each role, -1 absent */
} sweep_plan;

/* The state byte of a prompt: what the journal says of it (0 to do,
 * JOURNAL_PROMPT_DONE, JOURNAL_PROMPT_SKIPPED) in the low bits, and the
 * guards found when the plan tokenized it. */
#define SWEEP_STATE_KIND 0x0fu
#define SWEEP_STATE_IDENTICAL 0x10u /* clean and corrupted are the same tokens */
#define SWEEP_STATE_UNSPACED 0x20u  /* the answer has no leading space after an unspaced prompt */

/* Prompt i's journal state: 0, JOURNAL_PROMPT_DONE or JOURNAL_PROMPT_SKIPPED. */
static inline unsigned sweep_plan_kind(const sweep_plan *p, size_t i) { return p->state[i] & SWEEP_STATE_KIND; }

/* Set prompt i's journal state, keeping its guard bits. */
static inline void sweep_plan_set_kind(sweep_plan *p, size_t i, unsigned kind)
{
    p->state[i] = (unsigned char)((p->state[i] & ~SWEEP_STATE_KIND) | kind);
}

/* Rank 0's set-up: lock the output (OUTPUT.lock, fsutil.h: a second sweep
 * on it is refused at once, naming the owner), read, tokenize and validate the dataset (invalid pairs
 * stop the job unless skip_invalid); then either find `output` already the
 * complete result of this job (res->was_complete) or open its journal into
 * *jr, mark what it holds as done and journal the invalid pairs as skipped.
 * dataset_sha gets the dataset file's sha256. */
ps_status sweep_plan_open(sweep_plan *p, journal *jr, fs_lock *lock, const job *j, model *m, const tokenizer *tok,
                          const sweep_opts *o, const char *output, char dataset_sha[65], sweep_result *res);
void sweep_plan_free(sweep_plan *p);

/* The next prompts not done yet, from *next on: index[0..return) (at most max). */
size_t sweep_plan_next(const sweep_plan *p, size_t *next, size_t max, size_t *index);

/* The tokens of prompts index[0..n) into tk[0..n) (read again from the
 * dataset file; dataset_tokens_free each). */
ps_status sweep_plan_tokens(sweep_plan *p, const job *j, const model *m, const tokenizer *tok, const size_t *index,
                            size_t n, dataset_tokens *tk);

/* Prompt i's record into *it (json_decref it->obj). */
ps_status sweep_plan_item(sweep_plan *p, size_t i, dataset_item *it);

/* ---- sweep_dist.c ---------------------------------------------------------- */

/* An item to deal (a cell or a prompt) and its expected cost. */
typedef struct {
    size_t cost, index;
} sweep_cost;

/* Deal items[0..n) to ranks, longest first to the least loaded (lowest rank
 * on ties; equal costs in index order): owner[items[i].index] = rank.  The
 * same plan on every rank from the same costs.  Sorts items. */
ps_status sweep_deal(sweep_cost *items, size_t n, size_t ranks, uint32_t *owner);

/* Distribution by prompt for a chunk of n_pairs prompts: the job's distribute,
 * auto choosing it when by cell each rank would hold more pairs than its
 * working memory allows (work_chunk) or when there are 4 or more a rank. */
bool sweep_dist_by_prompt(const job *j, size_t n_pairs, size_t work_chunk, size_t ranks);

/* What a prompt's values carry before its cells (in a chunk's values and,
 * after the two metrics, in its journal record's values): the clean run's
 * SWEEP_TOP_K most likely next tokens as doubles, most likely first (ties:
 * the lower id first; -1 pads a vocabulary under SWEEP_TOP_K), so that the
 * results file can flag an answer the model does not predict (schema.h
 * SCHEMA_GUARD_NOT_TOP_K) without keeping the logits. */
#define SWEEP_TOP_K ((size_t)SCHEMA_GUARD_TOP_K)
/* The top ids of p's clean run from its next-token log-probabilities. */
void sweep_top_ids(const patch_pair *p, size_t V, double out[SWEEP_TOP_K]);

/* One chunk's results. */
typedef struct {
    size_t n_pairs;  /* prompts of the chunk, every rank; 0: no more chunks */
    bool by_prompt;  /* the distribution used */
    double *values;  /* rank 0: per prompt in chunk order, metric 0's [clean,
                        corrupted], SWEEP_TOP_K clean top ids, its cells in
                        component and grid order, then per other metric
                        [clean, corrupted, cells] (sweep_prompt_values each) */
    size_t n_cells;  /* cells computed */
} sweep_chunk;

/* Collective: run one chunk on every rank.  Rank 0 passes the chunk's
 * prompts' tokens, tk[0..n_pairs) (n_pairs 0 ends the loop on every rank);
 * the other ranks' tk and n_pairs are not used. */
ps_status sweep_dist_chunk(const job *j, const model *m, comm *c, const dataset_tokens *tk, size_t n_pairs,
                           size_t work_chunk, size_t fast_rows, sweep_chunk *out);
/* The same with an ablation's sources (zero, mean) attached to every pair
 * on every rank (NULL: none). */
ps_status sweep_dist_chunk_ablate(const job *j, const model *m, comm *c, const dataset_tokens *tk, size_t n_pairs,
                                  size_t work_chunk, size_t fast_rows, ablate_sources *ab, sweep_chunk *out);
void sweep_chunk_free(sweep_chunk *ch);

/* ---- sweep_memory.c -------------------------------------------------------- */

/* The working-memory budget of a rank (sweep_memory.c explains it). */
void sweep_work_plan(const job *j, const model *m, size_t max_T, sweep_work *w);

/* Collective: on rank 0, *text = one sweep_memory_format line per rank
 * (malloc'd); NULL elsewhere. */
ps_status sweep_memory_text(comm *c, char **text);

/* ---- sweep_write.c --------------------------------------------------------- */

/* The results file being built (sweep_write.c): the NetCDF file, its staged
 * window and the summary's sums.  Used by one thread only. */
typedef struct sweep_out sweep_out;

/* Rank 0: create `output`.partial with the provenance and the job's
 * attributes, open a dataset reader of its own (the plan's is the compute
 * thread's) and reset res's counts and summary. */
ps_status sweep_write_begin(sweep_out **out, const job *j, model *m, const tokenizer *tok, const sweep_plan *p,
                            const char *output, const sweep_opts *o, const char *dataset_sha, sweep_result *res);

/* One record (done or skipped) into the file and the summary; records
 * arrive in journal order. */
ps_status sweep_write_prompt(sweep_out *out, const journal_prompt *h);

/* Write the staged prompts now (ncout_results_flush: one call per variable
 * for each run of consecutive prompts), instead of when the window fills. */
ps_status sweep_write_flush(sweep_out *out);

/* Every record of jr (journal_each: pread from jr->fd up to jr->end). */
ps_status sweep_write_journal(sweep_out *out, journal *jr);

/* Prompts not done written as pending, the roles, guards and the closing
 * attributes, then the commit (fsync, sha256, rename); fills res's means
 * and summary. */
ps_status sweep_write_end(sweep_out *out, const char *memory, double compute_seconds, double write_seconds);

/* Free (deleting the .partial file unless sweep_write_end committed it). */
void sweep_write_free(sweep_out *out);

/* Prompt k of a chunk as its journal record: index, tokens and its values
 * [clean, corrupted, cells...] at `values`; returns 2 + its cells. */
size_t sweep_chunk_record(const job *j, const model_config *cfg, size_t index, const dataset_tokens *tk,
                          const double *values, journal_prompt *r);

/* ---- sweep_writer.c -------------------------------------------------------- */

/* The writer thread of rank 0 (sweep_writer.c explains it): it builds the
 * results file while the chunks compute. */
typedef struct sweep_writer sweep_writer;

/* The queue's bound: chunks waiting for the writer hold at most this many
 * bytes of values and token ids (one chunk is always let in). */
#define SWEEP_WRITER_QUEUE_BYTES ((size_t)64 << 20)

/* Start the thread: it creates the file (sweep_write_begin), writes the
 * records journaled before this run (jr as it is now), then each chunk
 * pushed.  A failure to start is returned; a failure in the thread later
 * comes back from the next push or the finish. */
ps_status sweep_writer_start(sweep_writer **w, const job *j, model *m, const tokenizer *tok, const sweep_plan *p,
                             const journal *jr, const char *output, const sweep_opts *o, const char *dataset_sha,
                             sweep_result *res);

/* A journaled chunk of n prompts to write: takes index[0..n) (copied), the
 * tokens tk[0..n) (moved: tk[k] zeroed) and values (moved: the chunk's,
 * sweep_chunk.values).  Blocks while the queue is full; returns the
 * writer's error once it has failed (the chunk is then freed). */
ps_status sweep_writer_push(sweep_writer *w, const size_t *index, dataset_tokens *tk, size_t n, double *values);

/* Finish the file (sweep_write_end) in the thread, wait for it and free w.
 * compute_seconds goes into the file; the writer's busy time and the time
 * waited here into res. */
ps_status sweep_writer_finish(sweep_writer *w, const char *memory, double compute_seconds);

/* Stop the thread after an error elsewhere: the .partial file is deleted;
 * frees w (NULL: nothing). */
void sweep_writer_cancel(sweep_writer *w);

#endif
