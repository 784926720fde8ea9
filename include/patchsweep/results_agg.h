/*
 * results_agg: the aggregator of result files for figures (plot): a
 * patching results or lens file read through ncin, its dimensions capped,
 * the prompts selected (--prompt N, or the done ones), grouped by length and
 * averaged cell by cell.  Library code: it never prints; what the CLI tells
 * the user along the way ("leaving out 3 prompts not done") goes to the
 * caller's note callback.
 *
 * Everything allocated lives in an agg_pool, freed at once.
 */
#ifndef PS_RESULTS_AGG_H
#define PS_RESULTS_AGG_H

#include <stdbool.h>
#include <stddef.h>

#include "err.h"
#include "ncin.h"

/* ---- allocations of one run, freed together ---- */
typedef struct {
    void **items;
    size_t n, cap;
} agg_pool;

/* Keep ptr (NULL: PS_ERR_NOMEM set, NULL returned; on failure ptr is freed). */
void *agg_keep(agg_pool *pl, void *ptr);
void *agg_calloc(agg_pool *pl, size_t n, size_t size);
char *agg_printf(agg_pool *pl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void agg_pool_free(agg_pool *pl);

/* Which prompts, and how they are grouped (plot's --prompt, --mean,
 * --by-length, --length); note(note_user, msg), when set, receives the
 * remarks the CLI prints. */
typedef struct {
    bool has_prompt, mean, by_length, has_length;
    bool by_role;        /* --by-role: the file's role-aligned means (V_by_role) */
    size_t prompt, length;
    void (*note)(void *user, const char *msg);
    void *note_user;
} agg_select;

/* The note callback with a formatted message (nothing when unset). */
void agg_note(const agg_select *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prompt indices as ranges, "0-3, 7, 9-12"; at most max_chars (then
 * "..."), 0 for no limit. */
char *agg_format_ranges(agg_pool *pl, const size_t *idx, size_t n, size_t max_chars);

/* Length of dimension `name`, refused over what a sweep can write (a
 * dataset's records, a model's layers + 1, positions, heads): lengths come
 * from the file's header, and plot allocates per prompt, layer, position
 * and head. */
ps_status agg_dim_len(const ncin_file *f, const char *name, size_t *len);

/* A (prompt) variable as doubles / strings, or NULL (and PS_OK) when absent. */
ps_status agg_read_prompt_doubles(const ncin_file *f, agg_pool *pl, const char *name, size_t n_prompt, double **out);
ps_status agg_read_prompt_strings(const ncin_file *f, agg_pool *pl, const char *name, size_t n_prompt, char ***out);

/* The prompts a figure uses: a->prompt (default 0 unless all_default), or
 * the done ones (all when the file has no `done`), skipped ones left out. */
ps_status agg_select_prompts(const ncin_file *f, agg_pool *pl, const agg_select *a, size_t n_prompt, bool all_default,
                             size_t **idx, size_t *n);

/* A group of prompts averaged together. */
typedef struct {
    size_t *idx;
    size_t n;
    size_t length; /* 0: mixed lengths (head components only) */
} agg_group;

/* Groups of the selected prompts for the means: position-wise means need
 * one length (refused otherwise unless split by --by-length / --length);
 * length[] is the file's length variable (NULL when absent), n_pos the
 * position dimension. */
ps_status agg_group_prompts(const ncin_file *f, agg_pool *pl, const agg_select *a, const size_t *sel, size_t n_sel,
                            const double *length, size_t n_pos, bool position_wise, agg_group **groups,
                            size_t *n_groups);

/* Accumulators of one panel over the prompts of a group: per cell the sum,
 * count, min and max of the non-NaN values. */
typedef struct {
    double *sum;
    size_t *count;
    float *lo, *hi;
} agg_accum;

ps_status agg_accum_init(agg_pool *pl, agg_accum *acc, size_t n);
void agg_accum_add(agg_accum *acc, size_t i, float v);

#endif
