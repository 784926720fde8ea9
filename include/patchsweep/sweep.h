/*
 * sweep: activation patching over a dataset on every rank of a comm
 * (MPI or serial), gathered into one NetCDF results file; resumable.
 *
 * Collective: every rank calls sweep_run with its own loaded model; the
 * dataset, the tokenizer, the journal and the output are rank 0's alone.
 *
 *   rank 0: read + tokenize + validate the whole dataset up front (equal
 *           token lengths, single-token answers, length <= n_positions);
 *           open the journal (results of earlier runs of the same job)
 *   per chunk of prompts not done yet, one of two distributions ([run]
 *   distribute; auto picks "prompts" when the chunk has more pairs than a rank's
 *   working memory holds (sweep_work.chunk), or >= 4 per rank):
 *   prompts (the default at scale):
 *     rank 0: broadcasts the chunk's token ids (a few hundred bytes a prompt)
 *     all:    prompts are dealt to ranks by expected cost (cells x rows from
 *             the first differing token, longest first to the least loaded
 *             rank); each rank runs the clean and corrupted forwards of its
 *             own prompts and evaluates all their cells
 *     rank 0: gathers [clean metric, corrupted metric, values] per prompt
 *             (and metric, as many times as the job has metrics)
 *   cells (few prompts per rank):
 *     rank 0: runs the clean and corrupted forwards, packs the caches' core
 *             (patch_pair_pack) and broadcasts it pair by pair after the
 *             chunk header (a rank holds one packed pair at a time)
 *     all:    the chunk's cells (prompt x component x layer x position/head)
 *             are dealt to ranks by their cost (the same deterministic plan
 *             on every rank); each rank evaluates its cells
 *     rank 0: gathers the values
 *   then rank 0 appends one journal record per prompt, fdatasyncs, reports
 *   progress.
 *   all:    every rank's memory figures to rank 0 (memory_per_rank, in the
 *           file's provenance)
 *   rank 0: builds the NetCDF file from the journal (.partial + rename);
 *           when every prompt is done the journal is deleted.
 *
 * Memory: the model's weights are one copy per node (see model_alloc); each
 * rank's working memory (the caches of the prompts it holds, the fast
 * engine's rows) is planned from one budget, sweep_work.
 *
 * Values do not depend on the number of ranks or the distribution: a cell's
 * value is computed the same way whatever else shares its matrix products
 * (gemm.h; tested bit for bit).
 *
 * The job's optional [lens] section: once the patching results are complete,
 * rank 0 also writes the logit-lens file of the same prompts (each clean
 * prompt decoded at its last token; ncout_lens_write_dataset).  Sliced runs
 * leave it to `patchsweep lens --dataset` (one lens file per job).
 *
 * Stopping: when *stop becomes non-zero (a signal handler sets it), the
 * current chunk is finished and journaled, the file is written with the
 * prompts done so far (global attribute complete = "false"), and
 * sweep_result.interrupted is set.  Killed outright (SIGKILL), a sweep loses
 * at most the chunk in flight: the journal's torn tail is cut off on resume.
 */
#ifndef PS_SWEEP_H
#define PS_SWEEP_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>

#include "comm.h"
#include "err.h"
#include "job.h"
#include "memstat.h"
#include "model.h"
#include "ncout.h"
#include "patch.h"
#include "tokenizer.h"

typedef struct {
    size_t prompts_total;   /* in the dataset (after max_prompts) */
    size_t prompts_done;    /* done or skipped, earlier runs included */
    size_t cells_total;     /* cells of the prompts this run computes */
    size_t cells_done;
    size_t chunk, n_chunks; /* chunks of this run, 1-based after the first */
    double seconds;         /* since this run's first chunk started */
} sweep_progress;

typedef struct {
    const char *output;          /* NULL: the job's [run] output */
    bool overwrite;              /* discard earlier results of this output */
    bool resume_from_damage;     /* a journal damaged in the middle: recompute from the damaged record on
                                    (else refused, journal.h) */
    size_t slice, n_slices;      /* run slice `slice` (1-based) of n_slices equal contiguous
                                    parts of the dataset (array jobs); 0/0: all of it */
    volatile sig_atomic_t *stop; /* may be NULL */
    size_t ranks_for_provenance; /* recorded in the file */
    void (*progress)(void *user, const sweep_progress *p); /* rank 0, after each chunk */
    void *progress_user;
} sweep_opts;

/* Per component, the mean normalized value over the prompts done, per
 * (layer, role) when the dataset names roles (sweep_result.role_names), else
 * (layer, position counted from the end), or (layer, head): for a summary. */
typedef struct {
    size_t rows, cols;       /* layer x (roles | positions from the end | heads) */
    double *mean;            /* [rows * cols], NaN where no prompt contributes */
    bool by_head;
    bool by_role;            /* columns are sweep_result.role_names */
} sweep_summary;

/* A rank's working memory (sweep.c explains the budget): the chunk's caches
 * and the fast engine's stacked rows. */
typedef struct {
    size_t budget_bytes;     /* per rank: [run] work_mib, else max(24 MiB, F32 weights / 16) */
    size_t pair_bytes;       /* caches of the longest pair on a rank that receives them */
    size_t chunk;            /* prompt pairs per chunk: [run] chunk_prompts, else budget / 2 / pair_bytes, 1..64 */
    size_t fast_rows;        /* the fast engine's max_rows: the rest of the budget, 256..2048 */
} sweep_work;

/* Where rank 0's time in sweep_run went (sweep_result.phase_seconds,
 * clock_now differences; `patchsweep sweep --timings` prints them): the
 * set-up in order, then the chunk loop's parts summed over its chunks. */
typedef enum {
    SWEEP_PHASE_DATASET,       /* the output's lock, the dataset read, tokenized and validated (the plan) */
    SWEEP_PHASE_HASH,          /* sha256 of the dataset file and of the model's shards (hash cache) */
    SWEEP_PHASE_JOURNAL_OPEN,  /* the journal opened, replayed, the invalid pairs journaled */
    SWEEP_PHASE_SOURCES,       /* an ablation's sources (mean: a pass over the dataset) */
    SWEEP_PHASE_WRITER_START,  /* the writer thread started (it creates the file beside the chunks) */
    SWEEP_PHASE_TOKENS,        /* each chunk's records read and tokenized again */
    SWEEP_PHASE_COMPUTE,       /* each chunk on every rank: broadcast, forwards, cells, gather */
    SWEEP_PHASE_JOURNAL,       /* each chunk's records appended and fdatasync'd */
    SWEEP_PHASE_PUSH,          /* each chunk handed to the writer (waits while its queue is full) */
    SWEEP_PHASE_MEMORY,        /* every rank's memory figures gathered for the provenance */
    SWEEP_PHASE_FINISH,        /* waiting for the writer to finish and commit the file */
    SWEEP_PHASE_LENS,          /* the job's [lens] file */
    SWEEP_PHASE_COUNT
} sweep_phase;

/* "dataset", "hash", ... (the names --timings prints). */
const char *sweep_phase_name(sweep_phase ph);

typedef struct {
    size_t prompts_total, prompts_done, prompts_skipped, prompts_resumed;
    size_t journal_dropped_at;     /* resume_from_damage: the damaged record (1-based) cut off, 0 none */
    size_t journal_dropped_intact; /* ...and the intact records after it, recomputed */
    size_t cells_computed;
    bool complete;           /* every prompt done or skipped: the file is final */
    bool interrupted;        /* stopped by *stop before the end */
    bool was_complete;       /* the output was already complete: nothing run */
    bool lens_written;       /* the job's [lens] file was written */
    bool lens_skipped_slice; /* [lens] not run: a sliced run */
    double seconds;          /* the chunks: forwards, cells, gathers, journal */
    double write_seconds;    /* rank 0's writer thread busy with the NetCDF file (beside the chunks) */
    double write_wait_seconds; /* after the last chunk, waiting for the writer to finish the file */
    size_t write_bytes;      /* size of that file */
    double phase_seconds[SWEEP_PHASE_COUNT]; /* rank 0: where sweep_run's time went */
    double mean_clean_metric, mean_corrupted_metric, accuracy; /* over prompts done (accuracy: clean metric > corrupted) */
    sweep_summary summary[PATCH_COMPONENT_COUNT];
    char *guards;            /* owned: one line per guard that fired (schema.h SCHEMA_GUARD_*), "" or NULL none */
    char **role_names;       /* [n_roles], owned: the dataset's roles when it names any */
    size_t n_roles;
    sweep_work work;         /* rank 0 (fast_rows on every rank) */
    size_t mean_prompts;     /* [patch] source = mean: the prompts averaged (ablate.h) */
    const size_t *resample_from; /* source = resample, rank 0: [n_resample_from] each dataset index's
                                    donor (SIZE_MAX none); valid during sweep_run */
    size_t n_resample_from;
    /* method = atp+exact, atp*+exact: per component the estimate-vs-exact
     * summary of the file (ncout_atp_summary; present false otherwise) */
    ncout_atp_stats atp[PATCH_COMPONENT_COUNT];
    char output[4096];
} sweep_result;

ps_status sweep_run(const job *j, model *m, const tokenizer *tok, comm *c, const sweep_opts *o, sweep_result *res);

/* One rank's memory (memstat.h), with where it ran. */
typedef struct {
    size_t rank, node_rank;  /* comm_rank, comm_local_rank */
    long pid;                /* getpid, to find the process in top or /proc */
    char host[64];           /* gethostname, truncated */
    memstat mem;             /* zeros when the rank could not read its figures */
} sweep_rank_memory;

/* Collective: every rank's figures now, on rank 0 into all[comm_size(c)]
 * (`all` is not used on the other ranks and may be NULL there). */
ps_status sweep_memory_gather(comm *c, sweep_rank_memory *all);

/* One line (no newline) per rank: "rank=R pid=P host=H node_rank=L " + memstat_format. */
void sweep_memory_format(const sweep_rank_memory *r, char *buf, size_t cap);

void sweep_result_free(sweep_result *res);

#endif
