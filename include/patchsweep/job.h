/*
 * job: the job file of a dataset sweep (jobs/NAME/job.ini), parsed with inih.
 *
 * A job file names everything a sweep needs so that the file alone, with its
 * sha256, identifies the run (it is stored in every output for provenance and
 * compared on resume).  Example:
 *
 *   ; IOI on the embedded model
 *   [model]
 *   dir = model
 *   [data]
 *   dataset = ioi.jsonl
 *   [patch]
 *   components = block_every, z_all_pos
 *   [run]
 *   output = results/ioi.nc
 *
 * Keys (every key at most once; defaults apply when a key is absent):
 *
 * | section   | key              | default     | meaning |
 * |-----------|------------------|-------------|---------|
 * | `[model]` | `dir`            | required    | model directory (HF layout: config.json, model.safetensors, tokenizer files) |
 * | `[model]` | `compute`        | `f32`       | the blocks' matrix products: f32, or bf16 (BF16 with F32 accumulation on AMX-BF16 / AVX512_BF16, as `--compute bf16`; refused on other CPUs).  Part of the job's text, so a resume or merge never mixes the two |
 * | `[model]` | `tokenizer`      | none        | directory of the GPT-2 BPE files to use (as `--tokenizer DIR`); absent: the model directory's, else `$PATCHSWEEP_TOKENIZER`, else `make tokenizer`'s |
 * | `[data]`  | `dataset`        | required    | JSONL prompt pairs (`clean`, `corrupted`, `answer`, `wrong`) |
 * | `[data]`  | `bos`            | `true`      | prepend `<\|endoftext\|>` (id 50256) to every prompt, as TransformerLens does |
 * | `[data]`  | `skip_invalid`   | `false`     | `false`: an invalid prompt pair (lengths differ, multi-token answer) stops the job; `true`: it is recorded as skipped and the sweep goes on |
 * | `[data]`  | `max_prompts`    | `0`         | use only the first N prompt pairs; 0 = all |
 * | `[patch]` | `components`     | `resid_pre` | comma-separated components and groups, as `patch --components` (resid_pre, resid_mid, attn_out, mlp_out, z, q, k, v, pattern, pattern_dest_src, z_all_pos, q_all_pos, k_all_pos, v_all_pos, pattern_all_pos, block_every, head_all_pos_every, head_by_pos_every); blanks around commas are ignored |
 * | `[patch]` | `metric`         | `logit_diff`| logit_diff, prob, logprob or kl, or several of them comma-separated (`logit_diff, prob, kl`): all from each patched forward, the first under the one-metric names (schema.h) |
 * | `[patch]` | `direction`      | `denoise`   | denoise (run corrupted, patch in clean) or noise (run clean, patch in corrupted) |
 * | `[patch]` | `engine`         | `fast`      | fast (recompute only what a patch changes) or naive (one full forward per cell, the reference) |
 * | `[patch]` | `method`         | `exact`     | exact (every cell patched), atp or atp* (attribution patching, atp.h: every cell estimated, stored as C_atp and C_atp_normalized; by prompt only), atp+exact or atp*+exact (both: the exact C and C_normalized, the estimate C_atp, C_atp_normalized, C_atp_error, and per prompt C_atp_rank_correlation and C_atp_missed, schema.h), atp+verify or atp*+verify (the estimate and C_verified, C_verified_normalized: exact at each grid's top verify_top_k cells); attribution methods: one metric, source clean or corrupted, by prompt |
 * | `[patch]` | `graddrop`       | `false`     | GradDrop in the estimate (atp.h: L more backward passes), as `patch --graddrop`; attribution methods only |
 * | `[patch]` | `verify_top_k`   | `10`        | atp+verify, atp*+verify: cells of each prompt's grid (per component) patched exactly, the top K by the estimate's absolute effect, 1..1000000; stored as C_verified (NaN at the others; atp_verify.h) |
 * | `[patch]` | `verify_threshold` | none      | refused: not implemented (verify_top_k selects the cells) |
 * | `[patch]` | `source`         | the direction's | clean (denoise) or corrupted (noise); or an ablation of the clean run (of the corrupted run with direction = denoise): zero, mean (the mean by position over the dataset's prompts of that kind) or resample (another pair's of the same length; patchspec.h, ablate.h) |
 * | `[patch]` | `resample_seed`  | `0`         | the seed of the resample donors, 0..2^53; source = resample only |
 * | `[patch]` | `mean_over`      | `all`       | the mean's subset: all, A:B (dataset indices [A, B)) or FIELD=VALUE (patch_subset_parse); source = mean only |
 * | `[run]`   | `output`         | required    | the results file; must end in `.nc` (written as `NAME.partial`, renamed when complete) |
 * | `[run]`   | `chunk_prompts`  | `0`         | prompt pairs per work chunk, 1..100000; 0 = chosen automatically |
 * | `[run]`   | `threads`        | `0`         | BLAS threads per MPI rank, 1..1024; 0 = automatic |
 * | `[run]`   | `work_mib`       | `0`         | working memory per rank in MiB (the chunk's activation caches and the fast engine's stacked rows), 1..1048576; 0 = automatic: 1/16 of the model's F32 weights, at least 32 MiB (sweep.h) |
 * | `[run]`   | `progress_seconds` | `10`      | seconds between progress lines when stderr is not a terminal; a decimal number > 0 |
 * | `[run]`   | `distribute`     | `auto`      | how a chunk is shared among ranks: `prompts` (each rank runs the clean/corrupted forwards of its own prompts and all their cells: no cache broadcast), `cells` (rank 0 runs every prompt and broadcasts the caches; cells dealt to all ranks), `auto` (prompts when the chunk has more pairs than a rank's working memory holds, or at least 4 per rank) |
 * | `[lens]`  | `enabled`        | `false`     | also write the logit lens of every prompt (the section is optional) |
 * | `[lens]`  | `top_k`          | `10`        | tokens kept per layer and position, 1..1000 |
 * | `[lens]`  | `output`         | none        | the lens file, must end in `.nc`; required when `enabled = true`; must differ from `[run] output` |
 *
 * Syntax (inih as built by Debian 12, libinih 55; checked by the unit tests):
 *   - `[section]` headers and `key = value` lines (`key: value` is accepted
 *     too, as inih does).  Section names and keys are case-sensitive and
 *     lowercase; boolean values are case-insensitive (true/false/yes/no/1/0);
 *     other values are case-sensitive.  Blanks around keys and values are
 *     dropped; values are taken literally otherwise (no quotes, no escapes,
 *     no `~` or `$VAR` expansion).
 *   - Comments: a line whose first non-blank character is `;` or `#`.  After
 *     a value (and after a `[section]` header), `;` preceded by a blank starts
 *     a comment: Debian builds inih with inline comments on and `;` as their
 *     only prefix, so `dataset = a.jsonl ; the IOI set` gives `a.jsonl`, while
 *     `a;b.jsonl` keeps its `;`.  `#` after a value is not a comment; a value
 *     containing a blank followed by `#` is refused rather than silently kept.
 *   - Multi-line values are not allowed: inih would take an indented line
 *     after a key as the continuation of that key's value, so such a line is
 *     an error.  Indentation is fine elsewhere (e.g. right after a header).
 *   - A line may hold at most 198 bytes (inih's fixed line buffer of 200
 *     bytes; longer lines would be split silently, so they are refused).
 *   - The text must be UTF-8 without control characters other than tab (and
 *     CR before a line feed); a UTF-8 byte order mark at the start is allowed.
 *   - A section may appear more than once; a key may not.
 *   - Relative paths are resolved against the directory of the job file
 *     ("jobs/ioi/job.ini" with `dir = model` gives "jobs/ioi/model"); absolute
 *     paths are kept.  Files are not opened here: their loaders check them.
 *
 * Errors are one line naming the file and line: "jobs/ioi/job.ini:7: [run]
 * chunk_prompts: 0x10 is not a non-negative decimal integer"; a missing
 * required key has no line: "jobs/ioi/job.ini: [model] dir is required".
 * Statuses: PS_ERR_FORMAT for text that is not a well-formed job file
 * (unparseable line, key before any section, multi-line value, over-long
 * line, control character, invalid UTF-8, NUL byte); PS_ERR_INVALID for
 * well-formed text with an unusable content (unknown section or key,
 * duplicated key, empty or bad value, missing required key); PS_ERR_NOMEM on
 * allocation failure or a job file over JOB_MAX_BYTES; PS_ERR_IO when
 * job_load cannot read the file.
 */
#ifndef PS_JOB_H
#define PS_JOB_H

#include <stdbool.h>
#include <stddef.h>

#include "err.h"
#include "model.h"
#include "patchspec.h"

#define JOB_MAX_BYTES ((size_t)1 << 20)        /* job_load refuses larger files */
#define JOB_CHUNK_PROMPTS_MAX ((size_t)100000)
#define JOB_THREADS_MAX ((size_t)1024)
#define JOB_WORK_MIB_MAX ((size_t)1 << 20)
#define JOB_LENS_TOP_K_MAX ((size_t)1000)
#define JOB_VERIFY_TOP_K_MAX ((size_t)1000000)

/* How a sweep shares a chunk among ranks (sweep.h). */
typedef enum { JOB_DISTRIBUTE_AUTO, JOB_DISTRIBUTE_PROMPTS, JOB_DISTRIBUTE_CELLS } job_distribute;

typedef struct {
    char *path;            /* the job file as given */
    char *text;            /* its exact bytes (NUL-terminated), for provenance and resume checks */
    char sha256[65];       /* of text (sha256_hex), lowercase hex */
    /* [model] */
    char *model_dir;       /* dir: resolved path */
    char *tokenizer_dir;   /* tokenizer: resolved path, NULL when absent */
    model_compute compute; /* compute (f32): the blocks' matrix products (model.h) */
    /* [data] */
    char *dataset;         /* dataset: resolved path of the JSONL file */
    bool bos;              /* bos (true): prepend <|endoftext|> */
    bool skip_invalid;     /* skip_invalid (false): true records invalid pairs as skipped */
    size_t max_prompts;    /* max_prompts (0 = all) */
    /* [patch] */
    bool components[PATCH_COMPONENT_COUNT]; /* components (resid_pre) */
    patch_metric metric;   /* metric (logit_diff): the first of metrics */
    patch_metric_list metrics; /* metric = a,b,...: every metric, in order (issue 19) */
    patch_direction direction; /* direction (denoise) */
    patch_engine engine;   /* engine (fast) */
    patch_method method;   /* method (exact): exact, atp, atp*, atp+exact, atp*+exact, atp+verify, atp*+verify */
    bool graddrop;         /* graddrop (false): GradDrop in the estimate (atp_opts) */
    size_t verify_top_k;   /* verify_top_k (PATCH_VERIFY_TOP_K): cells patched exactly per grid, +verify methods */
    patch_source source;   /* source (clean with denoise, corrupted with noise; direction follows it) */
    char *mean_over;       /* mean_over (NULL = all) */
    size_t resample_seed;  /* resample_seed (0), 0..2^53 */
    /* [run] */
    char *output;          /* output: resolved path, ends in .nc */
    size_t chunk_prompts;  /* chunk_prompts (0 = auto), else 1..JOB_CHUNK_PROMPTS_MAX */
    size_t threads;        /* threads (0 = auto), else 1..JOB_THREADS_MAX */
    size_t work_mib;       /* work_mib (0 = auto), else 1..JOB_WORK_MIB_MAX */
    double progress_seconds; /* progress_seconds (10), finite and > 0 */
    job_distribute distribute; /* distribute (auto) */
    /* [lens] */
    bool lens;             /* enabled (false) */
    size_t lens_top_k;     /* top_k (10), 1..JOB_LENS_TOP_K_MAX */
    char *lens_output;     /* output: resolved path, ends in .nc; NULL when absent */
    /* lines of the job file that set [model] dir and [lens] output (0: absent), for job_check_paths */
    size_t model_dir_line, lens_output_line;
} job;

/* The job's paths checked on the file system before any work, with the
 * job file's line as the parser's errors have it: [model] dir must be a
 * directory ("jobs/x/job.ini:3: [model] dir: 'jobs/x/model' does not
 * exist"), and when `lens` (the run will write the [lens] file) the
 * directory of [lens] output must exist and be writable.  PS_ERR_IO. */
ps_status job_check_paths(const job *j, bool lens);

/* Read the job file at `path` (at most JOB_MAX_BYTES, no NUL bytes) and parse
 * it with job_parse.  On failure *j is zeroed. */
ps_status job_load(job *j, const char *path);

/* The bytes buf[0..len) of a job file (need not be NUL-terminated): refused
 * over JOB_MAX_BYTES or holding a NUL byte, else parsed with job_parse.
 * What job_load does once it has read the file; the fuzz target's entry
 * point.  On failure *j is zeroed. */
ps_status job_parse_mem(job *j, const char *path, const char *buf, size_t len);

/* Parse `text` as a job file.  `path` names the file in error messages and
 * is the base of relative paths (its directory; "." when it has none).  Pure:
 * touches no file.  On success *j owns copies of everything; on failure *j
 * is zeroed and err_msg() holds the one error line. */
ps_status job_parse(job *j, const char *path, const char *text);

/* Free what *j owns and zero it (safe on a zeroed job, and twice). */
void job_free(job *j);

#endif
