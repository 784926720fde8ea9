#include "results_agg.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dataset.h"
#include "model.h"
#include "schema.h"

void agg_note(const agg_select *a, const char *fmt, ...)
{
    if (!a->note)
        return;
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0)
        s = NULL;
    va_end(ap);
    if (s)
        a->note(a->note_user, s);
    free(s);
}

/* ---- allocations of one run, freed together ------------------------------ */

void *agg_keep(agg_pool *pl, void *ptr)
{
    if (!ptr) {
        err_set(PS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    if (pl->n == pl->cap) {
        size_t cap = pl->cap ? 2 * pl->cap : 64;
        void **items = realloc(pl->items, cap * sizeof *items);
        if (!items) {
            free(ptr);
            err_set(PS_ERR_NOMEM, "out of memory");
            return NULL;
        }
        pl->items = items;
        pl->cap = cap;
    }
    pl->items[pl->n++] = ptr;
    return ptr;
}

void *agg_calloc(agg_pool *pl, size_t n, size_t size)
{
    if (size && n > SIZE_MAX / size) {
        err_set(PS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    return agg_keep(pl, calloc(n ? n : 1, size ? size : 1));
}

char *agg_printf(agg_pool *pl, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0)
        s = NULL;
    va_end(ap);
    return agg_keep(pl, s);
}

void agg_pool_free(agg_pool *pl)
{
    for (size_t i = 0; i < pl->n; i++)
        free(pl->items[i]);
    free(pl->items);
    pl->items = NULL;
    pl->n = pl->cap = 0;
}

/* Prompt indices as ranges, "0-3, 7, 9-12"; at most max_chars (then
 * "..."), 0 for no limit. */
char *agg_format_ranges(agg_pool *pl, const size_t *idx, size_t n, size_t max_chars)
{
    size_t cap = 32 * n + 16;
    char *s = agg_calloc(pl, cap, 1);
    if (!s)
        return NULL;
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        size_t j = i;
        while (j + 1 < n && idx[j + 1] == idx[j] + 1)
            j++;
        size_t before = k;
        if (j == i)
            k += (size_t)snprintf(s + k, cap - k, "%s%zu", i ? ", " : "", idx[i]);
        else
            k += (size_t)snprintf(s + k, cap - k, "%s%zu-%zu", i ? ", " : "", idx[i], idx[j]);
        if (max_chars && k > max_chars) {
            snprintf(s + before, cap - before, "%s...", before ? ", " : "");
            break;
        }
        i = j + 1;
    }
    return s;
}

/* ---- dimensions ------------------------------------------------------------ */

/* Length of dimension `name`, refused over `cap`: lengths come from the
 * file's header, not from data it holds (a classic file of 600 bytes can
 * claim 2^31 prompts), and plot allocates per prompt, layer, position and
 * head.  The caps are what a sweep can write: a dataset's records, a
 * model's layers (+1: a lens file's embedding row), positions and heads. */
ps_status agg_dim_len(const ncin_file *f, const char *name, size_t *len)
{
    static const struct {
        const char *name;
        size_t cap;
    } caps[] = {{SCHEMA_DIM_PROMPT, DATASET_MAX_ITEMS},
                {SCHEMA_DIM_LAYER, MODEL_MAX_N_LAYER + 1},
                {SCHEMA_DIM_POSITION, MODEL_MAX_N_POSITIONS},
                {SCHEMA_DIM_HEAD, MODEL_MAX_N_HEAD}};
    ps_status st = ncin_dim_len(f, name, len);
    for (size_t i = 0; st == PS_OK && i < sizeof caps / sizeof caps[0]; i++)
        if (!strcmp(name, caps[i].name) && *len > caps[i].cap)
            st = err_set(PS_ERR_NOMEM, "%s: dimension '%s' of length %zu is over the limit of %zu", f->path, name,
                         *len, caps[i].cap);
    return st;
}

/* ---- per-prompt variables ---------------------------------------------------- */

/* A (prompt) variable as doubles, or NULL (and PS_OK) when absent. */
ps_status agg_read_prompt_doubles(const ncin_file *f, agg_pool *pl, const char *name, size_t n_prompt, double **out)
{
    *out = NULL;
    if (!ncin_has_var(f, name))
        return PS_OK;
    ncin_var v;
    static const char *const dims[] = {SCHEMA_DIM_PROMPT};
    ps_status st;
    if ((st = ncin_inq_var(f, name, &v)) || (st = ncin_expect_dims(f, &v, dims, 1)))
        return st;
    double *d = agg_calloc(pl, n_prompt, sizeof *d);
    if (!d)
        return PS_ERR_NOMEM;
    if ((st = ncin_read_double(f, &v, 0, n_prompt, d)))
        return st;
    *out = d;
    return PS_OK;
}

ps_status agg_read_prompt_strings(const ncin_file *f, agg_pool *pl, const char *name, size_t n_prompt, char ***out)
{
    *out = NULL;
    if (!ncin_has_var(f, name))
        return PS_OK;
    ncin_var v;
    static const char *const dims[] = {SCHEMA_DIM_PROMPT};
    ps_status st;
    if ((st = ncin_inq_var(f, name, &v)) || (st = ncin_expect_dims(f, &v, dims, 1)))
        return st;
    char **s = agg_calloc(pl, n_prompt, sizeof *s);
    if (!s)
        return PS_ERR_NOMEM;
    if ((st = ncin_read_strings(f, &v, 0, n_prompt, s)))
        return st;
    for (size_t i = 0; i < n_prompt; i++)
        if (!agg_keep(pl, s[i])) {
            for (size_t j = i + 1; j < n_prompt; j++)
                free(s[j]);
            return PS_ERR_NOMEM;
        }
    *out = s;
    return PS_OK;
}

/* Which prompts a plot uses: --prompt N, or the done ones (all when the
 * file has no `done`).  `done` holds 1 once a prompt is completely written;
 * a sweep marks invalid pairs `skipped` (reason in skip_reason) and leaves
 * their values as _FillValue. */
ps_status agg_select_prompts(const ncin_file *f, agg_pool *pl, const agg_select *a, size_t n_prompt, bool all_default,
                                size_t **idx, size_t *n)
{
    double *done, *skipped;
    ps_status st;
    if ((st = agg_read_prompt_doubles(f, pl, SCHEMA_VAR_DONE, n_prompt, &done)) ||
        (st = agg_read_prompt_doubles(f, pl, SCHEMA_VAR_SKIPPED, n_prompt, &skipped)))
        return st;
    size_t *out = agg_calloc(pl, n_prompt, sizeof *out);
    if (!out)
        return PS_ERR_NOMEM;
    *idx = out;
    *n = 0;
    if (a->has_prompt || (!a->mean && !all_default)) {
        size_t p = a->has_prompt ? a->prompt : 0;
        if (p >= n_prompt)
            return err_set(PS_ERR_RANGE, "%s: prompt %zu out of range (the file has %zu prompt%s)", f->path, p,
                           n_prompt, n_prompt == 1 ? "" : "s");
        if (skipped && skipped[p] == 1.0) {
            char **reason;
            if ((st = agg_read_prompt_strings(f, pl, SCHEMA_VAR_SKIP_REASON, n_prompt, &reason)))
                return st;
            return err_set(PS_ERR_INVALID, "%s: prompt %zu was skipped (%s)", f->path, p,
                           reason && reason[p][0] ? reason[p] : "no reason recorded");
        }
        if (done && done[p] != 1.0)
            return err_set(PS_ERR_INVALID, "%s: prompt %zu is not done (its results are not written yet)", f->path, p);
        if (!a->has_prompt && n_prompt > 1)
            agg_note(a, "prompt 0 of %zu (use --prompt N or --mean)", n_prompt);
        out[(*n)++] = p;
        return PS_OK;
    }
    size_t n_skipped = 0, n_pending = 0;
    for (size_t i = 0; i < n_prompt; i++) {
        if (skipped && skipped[i] == 1.0)
            n_skipped++;
        else if (done && done[i] != 1.0)
            n_pending++;
        else
            out[(*n)++] = i;
    }
    if (n_skipped)
        agg_note(a, "leaving out %zu prompt%s skipped by the sweep", n_skipped, n_skipped == 1 ? "" : "s");
    if (n_pending)
        agg_note(a, "leaving out %zu prompt%s not done", n_pending, n_pending == 1 ? "" : "s");
    if (*n == 0)
        return err_set(PS_ERR_INVALID, "%s: no prompt is done (nothing to plot)", f->path);
    return PS_OK;
}

ps_status agg_group_prompts(const ncin_file *f, agg_pool *pl, const agg_select *a, const size_t *sel, size_t n_sel,
                               const double *length, size_t n_pos, bool position_wise, agg_group **groups,
                               size_t *n_groups)
{
    *n_groups = 0;
    agg_group *g = agg_calloc(pl, n_sel, sizeof *g);
    if (!g)
        return PS_ERR_NOMEM;
    *groups = g;
    size_t *lens = agg_calloc(pl, n_sel, sizeof *lens);
    if (!lens)
        return PS_ERR_NOMEM;
    for (size_t i = 0; i < n_sel; i++) {
        if (!length) {
            lens[i] = 0;
            continue;
        }
        double L = length[sel[i]];
        if (isnan(L))
            return err_set(PS_ERR_FORMAT, "%s: prompt %zu has no length (_FillValue)", f->path, sel[i]);
        if (!(L >= 1 && L <= (double)n_pos && L == floor(L)))
            return err_set(PS_ERR_FORMAT, "%s: prompt %zu has length %g, outside 1..%zu (the position dimension)",
                           f->path, sel[i], L, n_pos);
        lens[i] = (size_t)L;
    }
    if (!length && (position_wise || a->by_length || a->has_length))
        return err_set(PS_ERR_FORMAT, "%s: no 'length' variable (needed for %s)", f->path,
                       position_wise ? "position components" : "--by-length / --length");
    /* the distinct lengths, ascending */
    size_t *distinct = agg_calloc(pl, n_sel, sizeof *distinct), nd = 0;
    if (!distinct)
        return PS_ERR_NOMEM;
    for (size_t i = 0; i < n_sel; i++) {
        if (a->has_length && lens[i] != a->length)
            continue;
        size_t k = 0;
        while (k < nd && distinct[k] < lens[i])
            k++;
        if (k < nd && distinct[k] == lens[i])
            continue;
        memmove(distinct + k + 1, distinct + k, (nd - k) * sizeof *distinct);
        distinct[k] = lens[i];
        nd++;
    }
    if (nd == 0)
        return err_set(PS_ERR_INVALID, "%s: no done prompt has length %zu", f->path, a->length);
    bool split = a->by_length || a->has_length;
    if (position_wise && nd > 1 && !split) {
        char msg[512];
        size_t k = 0;
        /* the first few lengths with their prompt counts; the message stays one line */
        for (size_t d = 0; d < nd && d < 8 && k < sizeof msg; d++) {
            size_t count = 0;
            for (size_t i = 0; i < n_sel; i++)
                count += lens[i] == distinct[d];
            k += (size_t)snprintf(msg + k, sizeof msg - k, "%s%zu tokens: %zu", d ? ", " : "", distinct[d], count);
        }
        if (nd > 8 && k < sizeof msg)
            snprintf(msg + k, sizeof msg - k, ", ...");
        return err_set(PS_ERR_INVALID,
                       "%s: --mean over prompts of different lengths (%s): a position-wise mean needs one length; "
                       "add --by-length (one panel per length) or --length N",
                       f->path, msg);
    }
    size_t n_out = split ? nd : 1;
    for (size_t d = 0; d < n_out; d++) {
        g[d].idx = agg_calloc(pl, n_sel, sizeof *g[d].idx);
        if (!g[d].idx)
            return PS_ERR_NOMEM;
        g[d].length = split || nd == 1 ? distinct[d] : 0;
        for (size_t i = 0; i < n_sel; i++)
            if (!split || lens[i] == distinct[d])
                g[d].idx[g[d].n++] = sel[i];
    }
    *n_groups = n_out;
    return PS_OK;
}

ps_status agg_accum_init(agg_pool *pl, agg_accum *acc, size_t n)
{
    acc->sum = agg_calloc(pl, n, sizeof *acc->sum);
    acc->count = agg_calloc(pl, n, sizeof *acc->count);
    acc->lo = agg_calloc(pl, n, sizeof *acc->lo);
    acc->hi = agg_calloc(pl, n, sizeof *acc->hi);
    return acc->sum && acc->count && acc->lo && acc->hi ? PS_OK : PS_ERR_NOMEM;
}

void agg_accum_add(agg_accum *acc, size_t i, float v)
{
    if (isnan(v))
        return;
    if (acc->count[i] == 0 || v < acc->lo[i])
        acc->lo[i] = v;
    if (acc->count[i] == 0 || v > acc->hi[i])
        acc->hi[i] = v;
    acc->sum[i] += v;
    acc->count[i]++;
}

/* Tick labels of the positions [0, T) from the group's token strings: the
 * first prompt's tokens, with "*" after a token that differs in another
 * prompt of the group. */
