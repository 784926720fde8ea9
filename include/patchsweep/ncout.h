/*
 * ncout: NetCDF-4 output files.
 *
 * Every file is written as PATH.partial and renamed to PATH only when it is
 * complete and closed, so a file under its final name is never a partial
 * result (sweeps, which append chunk by chunk, use their own `done` marks on
 * top of this; see sweep.h).  Before the rename the file is fsync'ed and
 * its sha256 (of the whole file) written to PATH.sha256 in `sha256sum -c`
 * format, which every reader checks first (ncin_verify): a file damaged or
 * truncated later is refused, never read as data.
 *
 * The file format (names, types, fill values) is schema.h's contract.
 *
 * Provenance (global attributes of every file): patchsweep_schema (NC_INT,
 * SCHEMA_VERSION), patchsweep_version,
 * command_line, created (UTC ISO 8601), model_path, model_sha256,
 * model_config (config.json text), model_dtype, Conventions; and once the
 * CLI has recorded its BLAS set-up (prov_set_blas): blas (one line: OpenBLAS
 * version, core and why, self-check, threads), blas_core, blas_threads.
 */
#ifndef PS_NCOUT_H
#define PS_NCOUT_H

#include <stdbool.h>
#include <stddef.h>

#include "err.h"
#include "forward.h"
#include "hooks.h"
#include "model.h"
#include "patchspec.h"
#include "tokenizer.h"

typedef struct {
    int ncid;
    char *path;       /* final name, owned */
    char *tmp_path;   /* PATH.partial, owned */
} ncout_file;

/* Create PATH.partial (NetCDF-4, clobbering an old .partial). Fails early
 * with a message naming the path when the directory is missing or not
 * writable. */
ps_status ncout_create(ncout_file *f, const char *path);

/* Whether a file could be created at PATH: the directory exists and is
 * writable (checked before hours of work, not after). */
ps_status ncout_check_writable(const char *path);

/* Close, fsync, record PATH.sha256, and atomically rename to the final name. */
ps_status ncout_commit(ncout_file *f);

/* Close and delete the .partial file (after an error). */
void ncout_abort(ncout_file *f);

/* True once a file's close failed (a full disk, an I/O error): HDF5 1.10.8
 * then keeps the file in its tables and crashes (SIGSEGV in H5F__close_cb)
 * when it closes them at exit, so the program must end with _exit after
 * flushing its own output (main.c does). */
bool ncout_exit_unsafe(void);

/* Write the provenance attributes (hashes the model if not done yet). */
ps_status ncout_put_provenance(ncout_file *f, model *m);

/* NetCDF status -> err_set with the file name and what was being done. */
ps_status ncout_check(int nc_status, const char *path, const char *what);

/* TransformerLens' run_with_cache as a file: one variable per selected hook,
 * named by its hook name, with hook_shape()'s dims, plus token_id(position)
 * and token(position) (display strings, invalid UTF-8 shown as U+FFFD). */
ps_status ncout_write_cache(ncout_file *f, model *m, const tokenizer *tok, const forward_cache *c,
                            const hook_set *hooks, bool bos);

/* Patching results (the whole contract, names, types and fill values:
 * schema.h): dimensions prompt
 * (unlimited), layer, position, head; per selected component C the raw
 * patched metric C(prompt, layer, position) / C(prompt, layer, position,
 * head) / C(prompt, layer, head) and C_normalized likewise; per prompt
 * clean_metric, corrupted_metric, length, answer_id, wrong_id, answer, wrong,
 * the coordinate prompt (the pair's 0-based index in the whole dataset: files of a
 * sliced sweep hold a contiguous part of it), done (1 when every value of
 * the prompt is written), skipped (1 when the
 * pair was invalid and skipped, reason in skip_reason); per prompt and
 * position clean_token_id, corrupted_token_id, clean_token, corrupted_token.
 * Positions past a prompt's length, and every value of a prompt not done,
 * hold the fill value: _FillValue for the grids, metrics and length (NaN
 * once read by xarray), "" for strings, -1 for the ids (no _FillValue:
 * integers in xarray).  Global attributes: provenance
 * plus metric, direction, engine. */
/* One per-prompt variable in the staging window (ncout.c). */
typedef struct {
    int var;
    int type;              /* nc_type */
    size_t nd, shape[PATCH_GRID_MAX_DIMS]; /* per-prompt shape */
    size_t row, esize;     /* elements per prompt, bytes per element */
    unsigned char fill[8]; /* the variable's fill value (numbers) */
    void *buf;             /* [cap][row] elements; strings: char *, "" or owned */
} ncout_staged;

/* Extra variables per selected component (ncout_results_define_extra). */
#define NCOUT_EXTRA_MAX 6
#define NCOUT_STAGED_MAX \
    (16 + PATCH_METRIC_COUNT * (2 + 2 * PATCH_COMPONENT_COUNT) + NCOUT_EXTRA_MAX * PATCH_COMPONENT_COUNT)

/* What an extra variable holds per prompt: a grid like C's (float, fill
 * SCHEMA_FILL_GRID) as given or normalized as C_normalized is, with the
 * prompt's clean and corrupted metrics ((v - corrupted) / (clean -
 * corrupted), NaN when they agree), or one number (double, fill
 * SCHEMA_FILL_METRIC; int, fill SCHEMA_FILL_INT). */
typedef enum {
    NCOUT_EXTRA_GRID,
    NCOUT_EXTRA_GRID_NORMALIZED,
    NCOUT_EXTRA_DOUBLE,
    NCOUT_EXTRA_INT,
} ncout_extra_kind;

/* One extra variable per selected component C: C + suffix.  long_name is
 * "<long_name>, C"; comment (optional) becomes the attribute comment. */
typedef struct {
    const char *suffix;
    ncout_extra_kind kind;
    const char *long_name;
    const char *comment;
} ncout_extra;

typedef struct {
    size_t base, cap;         /* window of prompts [base, base + cap) */
    unsigned char *staged;    /* [cap]: prompt staged */
    ncout_staged vars[NCOUT_STAGED_MAX];
    size_t n_vars;
} ncout_stage;

typedef struct {
    ncout_file *f;
    size_t n_layer, n_head, max_T;
    size_t n_kv_head;   /* key/value heads (grouped-query attention: the kv_head axis) */
    bool on[PATCH_COMPONENT_COUNT];
    patch_metric metric;
    patch_metric_list metrics; /* every metric of the file; m[0] == metric */
    int var_raw[PATCH_COMPONENT_COUNT], var_norm[PATCH_COMPONENT_COUNT];
    /* metrics k >= 1: C_M, C_M_normalized, clean_M, corrupted_M (schema.h) */
    int var_m_raw[PATCH_METRIC_COUNT][PATCH_COMPONENT_COUNT], var_m_norm[PATCH_METRIC_COUNT][PATCH_COMPONENT_COUNT];
    int v_m_clean[PATCH_METRIC_COUNT], v_m_corrupted[PATCH_METRIC_COUNT];
    int v_clean_metric, v_corrupted_metric, v_length, v_answer_id, v_wrong_id, v_answer, v_wrong, v_done;
    int v_skipped, v_skip_reason, v_prompt_index;
    size_t prompt_offset;   /* prompt_index = prompt_offset + prompt (0 unless sliced) */
    int v_clean_tok_id, v_corrupted_tok_id, v_clean_tok, v_corrupted_tok;
    size_t n_extra; /* ncout_results_define_extra's variables */
    ncout_extra_kind extra_kind[NCOUT_EXTRA_MAX];
    int var_extra[NCOUT_EXTRA_MAX][PATCH_COMPONENT_COUNT];
    ncout_stage stage; /* values not yet written (ncout_results_flush) */
} ncout_results;

/* What the file records of one prompt besides its grids. */
typedef struct {
    size_t T;
    int32_t answer_id, wrong_id;
    double clean_metric, corrupted_metric;
    const int32_t *clean_tokens, *corrupted_tokens; /* [T] */
    const char *answer, *wrong;                     /* the answer texts */
} ncout_prompt;

ps_status ncout_results_define(ncout_results *r, ncout_file *f, model *m, size_t max_T,
                               const bool on[PATCH_COMPONENT_COUNT], patch_metric metric,
                               patch_direction direction, patch_engine engine);

/* The same with several metrics (metrics->m[0] is `metric` above; the
 * others get their own variables, schema.h). */
ps_status ncout_results_define_metrics(ncout_results *r, ncout_file *f, model *m, size_t max_T,
                                       const bool on[PATCH_COMPONENT_COUNT], const patch_metric_list *metrics,
                                       patch_direction direction, patch_engine engine);
/* ncout_results_define_metrics with the grids named C + suffix and C +
 * suffix + "_normalized" (SCHEMA_ATP_SUFFIX: a sweep's attribution-patching
 * estimates, C_atp and C_atp_normalized); "" is ncout_results_define_metrics. */
ps_status ncout_results_define_named(ncout_results *r, ncout_file *f, model *m, size_t max_T,
                                     const bool on[PATCH_COMPONENT_COUNT], const patch_metric_list *metrics,
                                     patch_direction direction, patch_engine engine, const char *suffix);

/* After a define (nothing put yet): n more variables per selected
 * component, staged with the grids (a sweep's attribution patching beside
 * its exact grids: C_atp, C_atp_error, ... schema.h).  Extra i is put by
 * ncout_results_put_extra(.., i, ..). */
ps_status ncout_results_define_extra(ncout_results *r, const ncout_extra *ex, size_t n);

/* Extra variable i of prompt `prompt`, after ncout_results_put of that
 * prompt: values[c] is component c's grid for this prompt
 * (patch_grid_shape order; NaN stays NaN) or, for a per-prompt number,
 * values[c][0]; components whose values[c] is NULL are left as they are. */
ps_status ncout_results_put_extra(ncout_results *r, size_t prompt, size_t i, double *const values[PATCH_COMPONENT_COUNT]);

/* The dataset-level summary of a sweep's estimate-vs-exact statistics
 * (schema.h SCHEMA_ATP_RANK_CORRELATION_SUFFIX, SCHEMA_ATP_MISSED_SUFFIX),
 * from the values in the file: on every C_atp_rank_correlation(prompt) (C a
 * component of patchspec.h) the
 * attributes prompts, mean and median over the prompts that have one; on
 * every C_atp_missed(prompt) prompts and total.  Files without them are
 * left alone.  Called by the sweep's writer and by merge (so that a merged
 * file's summary is the whole run's).  out (NULL: not wanted) gets the same
 * numbers per component. */
typedef struct {
    bool present;              /* the file has C_atp_rank_correlation */
    size_t rank_prompts;       /* prompts with a rank correlation */
    double mean, median;       /* of their rank correlations (NaN: none) */
    size_t missed_prompts;     /* prompts with C_atp_missed */
    size_t missed_total;       /* their sum */
} ncout_atp_stats;
ps_status ncout_atp_summary(int ncid, const char *path, ncout_atp_stats out[PATCH_COMPONENT_COUNT]);

/* The puts below stage their values for a window of consecutive prompts
 * and write a window with one call per variable (ncout_results_flush, also
 * called when a prompt outside the window arrives): call
 * ncout_results_flush before ncout_commit, and ncout_results_free (owner:
 * the caller of ncout_results_define) in any case. */

/* Everything of one prompt at index `prompt`: values[c] is the component's
 * grid for this prompt (patch_grid_shape order) for every selected c. */
ps_status ncout_results_put(ncout_results *r, size_t prompt, const ncout_prompt *p, const tokenizer *tok,
                            double *const values[PATCH_COMPONENT_COUNT]);

/* Metric k >= 1 of the file's metrics for prompt `prompt`, after
 * ncout_results_put of that prompt: its unpatched metrics and grids
 * (values[c] as in ncout_results_put). */
ps_status ncout_results_put_metric(ncout_results *r, size_t prompt, size_t k, double clean_metric,
                                   double corrupted_metric, double *const values[PATCH_COMPONENT_COUNT]);

/* Record prompt `prompt` as not computed yet (done = 0, skipped = 0). */
ps_status ncout_results_put_pending(ncout_results *r, size_t prompt);

/* Mark prompt `prompt` skipped, with the reason (its other values stay fill). */
ps_status ncout_results_put_skipped(ncout_results *r, size_t prompt, const char *reason);

/* Write what is staged. */
ps_status ncout_results_flush(ncout_results *r);

/* Free the staging buffers (after define, flush or an error). */
void ncout_results_free(ncout_results *r);

/* One more grid of component c for prompt `prompt`: the variable c's name
 * + suffix (schema.h's SCHEMA_ATP_*: attribution patching), defined on
 * first use with c's dims and fill, values in patch_grid_shape order
 * (written at once, not staged).  Call after ncout_results_flush. */
ps_status ncout_results_put_grid(ncout_results *r, model *m, patch_component c, const char *suffix, size_t prompt,
                                 const double *values, const char *long_name, int *var_out);

/* The estimate-vs-exact attributes of a C_atp_error variable (schema.h). */
ps_status ncout_results_put_stats(ncout_results *r, int var, double rank_correlation, size_t k, const size_t *missed,
                                  size_t n_missed);

/* A per-prompt index variable `name` (prompt), NC_INT with schema 2's id
 * convention (-1 none, valid_min 0, no _FillValue), defined on first use:
 * values[0..n) at prompts [first, first + n) (ablations' resample_from). */
ps_status ncout_results_put_prompt_id(ncout_results *r, const char *name, const char *long_name, size_t first,
                                      size_t n, const int *values);

/* A text attribute on the file (NetCDF-4 allows adding them at any time). */
ps_status ncout_put_attr(ncout_file *f, const char *name, const char *value);

/* A boolean global attribute (complete, prepend_bos): NC_INT 0 or 1. */
ps_status ncout_put_flag(ncout_file *f, const char *name, bool value);

/* Add `name` to the global attribute coordinates (the variables that label
 * others: xarray makes them coordinates); a name already there is kept once.
 * `path` names the file in messages. */
ps_status ncout_add_coordinate(int ncid, const char *path, const char *name);

/* A 0/1 variable's flag_values (0b, 1b) and flag_meanings ("no yes"). */
ps_status ncout_def_flag_var(int ncid, const char *path, int var, const char *meanings);

/* A token id variable: -1 written where there is none, valid_min 0, no
 * _FillValue (so that xarray keeps the ids integers). */
ps_status ncout_def_id_var(int ncid, const char *path, int var);

#endif
