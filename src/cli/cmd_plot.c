#include "cmd_plot.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "dataset.h"
#include "model.h"
#include "ncin.h"
#include "plot.h"
#include "prov.h"

static const char *plot_help =
    "usage: patchsweep plot IN.nc -o OUT.svg [--var NAME[,NAME...]|all]\n"
    "                       [--prompt N | --mean [--by-length | --length N]]\n"
    "                       [--tokens clean|corrupted] [--title T] [--zmax Z]\n"
    "  A self-contained SVG 1.1 figure of a result file; open it in a browser.\n"
    "\n"
    "  Patching results (patch, sweep): one heatmap per variable, on the worksheet's\n"
    "  diverging RdBu scale centred at 0 (red < 0 < blue, symmetric range [-Z, Z], one\n"
    "  range for the whole figure), a colour bar per panel; hover a cell for its exact\n"
    "  value; hatched grey cells have no value (NaN or _FillValue).\n"
    "    C(prompt, layer, position)        layer x position; x labels token_i (the seed's)\n"
    "    C(prompt, layer, head)            layer x head\n"
    "    C(prompt, layer, position, head)  one layer x position panel per head\n"
    "  Lens files (global attribute analysis = \"lens\"): probability and reciprocal rank\n"
    "  of the answer per layer, one line per prompt.\n"
    "\n"
    "  --var LIST     variables to plot, comma-separated, or 'all' (every *_normalized\n"
    "                 variable; lens: every (prompt, layer) variable).  Default:\n"
    "                 resid_pre_normalized, else the first *_normalized variable;\n"
    "                 lens: prob and reciprocal_rank\n"
    "  --prompt N     only prompt N (0-based).  Default: prompt 0 (results), every\n"
    "                 prompt (lens)\n"
    "  --mean         average over the prompts whose `done` is 1 (NaN cells skipped;\n"
    "                 hover shows how many values went in, their min and max).\n"
    "                 Position-wise means need prompts of one length and are refused\n"
    "                 otherwise; head components and lens curves average every prompt;\n"
    "                 lens means are drawn with a min-max band\n"
    "  --by-length    with --mean: one mean (panel) per prompt length\n"
    "  --length N     with --mean: only the prompts of N tokens\n"
    "  --tokens WHICH x labels from clean_token (default, as the seed) or corrupted_token\n"
    "  --title T      figure title\n"
    "  --zmax Z       colour range [-Z, Z] (default: the largest |value| shown)\n"
    "  The file records patchsweep's version, this command line, the source file and\n"
    "  its model_sha256 in <metadata>.\n";

#define CMD "plot"

enum { OPT_VAR = CLI_OPT_FIRST_FREE, OPT_PROMPT, OPT_MEAN, OPT_BY_LENGTH, OPT_LENGTH, OPT_TOKENS, OPT_TITLE, OPT_ZMAX };

typedef struct {
    const char *input, *output, *vars, *title, *tokens;
    bool has_prompt, mean, by_length, has_length, has_zmax;
    size_t prompt, length;
    double zmax;
} plot_args;

/* ---- allocations of one run, freed together ------------------------------ */

typedef struct {
    void **items;
    size_t n, cap;
} pool;

static void *pool_keep(pool *pl, void *ptr)
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

static void *pool_calloc(pool *pl, size_t n, size_t size)
{
    if (size && n > SIZE_MAX / size) {
        err_set(PS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    return pool_keep(pl, calloc(n ? n : 1, size ? size : 1));
}

static char *pool_printf(pool *pl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static char *pool_printf(pool *pl, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0)
        s = NULL;
    va_end(ap);
    return pool_keep(pl, s);
}

static void pool_free(pool *pl)
{
    for (size_t i = 0; i < pl->n; i++)
        free(pl->items[i]);
    free(pl->items);
    pl->items = NULL;
    pl->n = pl->cap = 0;
}

/* Prompt indices as ranges, "0-3, 7, 9-12"; at most max_chars (then
 * "..."), 0 for no limit. */
static char *format_ranges(pool *pl, const size_t *idx, size_t n, size_t max_chars)
{
    size_t cap = 32 * n + 16;
    char *s = pool_calloc(pl, cap, 1);
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
static ps_status dim_len_capped(const ncin_file *f, const char *name, size_t *len)
{
    static const struct {
        const char *name;
        size_t cap;
    } caps[] = {{"prompt", DATASET_MAX_ITEMS},
                {"layer", MODEL_MAX_N_LAYER + 1},
                {"position", MODEL_MAX_N_POSITIONS},
                {"head", MODEL_MAX_N_HEAD}};
    ps_status st = ncin_dim_len(f, name, len);
    for (size_t i = 0; st == PS_OK && i < sizeof caps / sizeof caps[0]; i++)
        if (!strcmp(name, caps[i].name) && *len > caps[i].cap)
            st = err_set(PS_ERR_NOMEM, "%s: dimension '%s' of length %zu is over the limit of %zu", f->path, name,
                         *len, caps[i].cap);
    return st;
}

/* ---- provenance ------------------------------------------------------------ */

typedef struct {
    const char *pairs[8][2];
    size_t n;
} provenance;

static ps_status read_provenance(const ncin_file *f, pool *pl, const char *input, provenance *p)
{
    p->n = 0;
    p->pairs[p->n][0] = "patchsweep_version";
    p->pairs[p->n++][1] = prov_version();
    p->pairs[p->n][0] = "command_line";
    p->pairs[p->n++][1] = prov_command_line();
    p->pairs[p->n][0] = "source_file";
    p->pairs[p->n++][1] = input;
    static const char *const from_source[][2] = {{"model_sha256", "model_sha256"},
                                                {"patchsweep_version", "source_patchsweep_version"},
                                                {"command_line", "source_command_line"},
                                                {"created", "source_created"}};
    for (size_t i = 0; i < sizeof from_source / sizeof from_source[0]; i++) {
        char *v;
        ps_status st = ncin_get_text_att(f, NULL, from_source[i][0], &v);
        if (st)
            return st;
        if (v && !pool_keep(pl, v))
            return PS_ERR_NOMEM;
        p->pairs[p->n][0] = from_source[i][1];
        /* an absent attribute is recorded as empty rather than dropped, so
         * the entry says the source had none */
        p->pairs[p->n++][1] = v ? v : "";
    }
    return PS_OK;
}

/* ---- per-prompt variables ---------------------------------------------------- */

/* A (prompt) variable as doubles, or NULL (and PS_OK) when absent. */
static ps_status read_prompt_doubles(const ncin_file *f, pool *pl, const char *name, size_t n_prompt, double **out)
{
    *out = NULL;
    if (!ncin_has_var(f, name))
        return PS_OK;
    ncin_var v;
    static const char *const dims[] = {"prompt"};
    ps_status st;
    if ((st = ncin_inq_var(f, name, &v)) || (st = ncin_expect_dims(f, &v, dims, 1)))
        return st;
    double *d = pool_calloc(pl, n_prompt, sizeof *d);
    if (!d)
        return PS_ERR_NOMEM;
    if ((st = ncin_read_double(f, &v, 0, n_prompt, d)))
        return st;
    *out = d;
    return PS_OK;
}

static ps_status read_prompt_strings(const ncin_file *f, pool *pl, const char *name, size_t n_prompt, char ***out)
{
    *out = NULL;
    if (!ncin_has_var(f, name))
        return PS_OK;
    ncin_var v;
    static const char *const dims[] = {"prompt"};
    ps_status st;
    if ((st = ncin_inq_var(f, name, &v)) || (st = ncin_expect_dims(f, &v, dims, 1)))
        return st;
    char **s = pool_calloc(pl, n_prompt, sizeof *s);
    if (!s)
        return PS_ERR_NOMEM;
    if ((st = ncin_read_strings(f, &v, 0, n_prompt, s)))
        return st;
    for (size_t i = 0; i < n_prompt; i++)
        if (!pool_keep(pl, s[i])) {
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
static ps_status select_prompts(const ncin_file *f, pool *pl, const plot_args *a, size_t n_prompt, bool all_default,
                                size_t **idx, size_t *n)
{
    double *done, *skipped;
    ps_status st;
    if ((st = read_prompt_doubles(f, pl, "done", n_prompt, &done)) ||
        (st = read_prompt_doubles(f, pl, "skipped", n_prompt, &skipped)))
        return st;
    size_t *out = pool_calloc(pl, n_prompt, sizeof *out);
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
            if ((st = read_prompt_strings(f, pl, "skip_reason", n_prompt, &reason)))
                return st;
            return err_set(PS_ERR_INVALID, "%s: prompt %zu was skipped (%s)", f->path, p,
                           reason && reason[p][0] ? reason[p] : "no reason recorded");
        }
        if (done && done[p] != 1.0)
            return err_set(PS_ERR_INVALID, "%s: prompt %zu is not done (its results are not written yet)", f->path, p);
        if (!a->has_prompt && n_prompt > 1)
            fprintf(stderr, "plot: prompt 0 of %zu (use --prompt N or --mean)\n", n_prompt);
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
        fprintf(stderr, "plot: leaving out %zu prompt%s skipped by the sweep\n", n_skipped, n_skipped == 1 ? "" : "s");
    if (n_pending)
        fprintf(stderr, "plot: leaving out %zu prompt%s not done\n", n_pending, n_pending == 1 ? "" : "s");
    if (*n == 0)
        return err_set(PS_ERR_INVALID, "%s: no prompt is done (nothing to plot)", f->path);
    return PS_OK;
}

/* ---- patching results ----------------------------------------------------------- */

typedef enum { GRID_POS, GRID_HEAD, GRID_POS_HEAD } grid_kind;

typedef struct {
    ncin_var v;
    grid_kind kind;
    const char *long_name;
} grid_var;

typedef struct {
    size_t *idx;
    size_t n;
    size_t length; /* 0: mixed lengths (head components only) */
} prompt_group;

typedef struct {
    plot_heatmap *items;
    size_t n, cap;
} panel_list;

static plot_heatmap *panel_add(pool *pl, panel_list *ps)
{
    if (ps->n == ps->cap) {
        size_t cap = ps->cap ? 2 * ps->cap : 8;
        plot_heatmap *items = pool_calloc(pl, cap, sizeof *items);
        if (!items)
            return NULL;
        if (ps->n)
            memcpy(items, ps->items, ps->n * sizeof *items);
        ps->items = items;
        ps->cap = cap;
    }
    plot_heatmap *p = &ps->items[ps->n++];
    memset(p, 0, sizeof *p);
    return p;
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !strcmp(s + n - k, suffix);
}

/* v's grid kind from its dimensions; false when it is not a grid. */
static bool grid_kind_of(const ncin_var *v, grid_kind *kind)
{
    static const char *const pos[] = {"prompt", "layer", "position"};
    static const char *const head[] = {"prompt", "layer", "head"};
    static const char *const pos_head[] = {"prompt", "layer", "position", "head"};
    if (ncin_dims_are(v, pos, 3))
        *kind = GRID_POS;
    else if (ncin_dims_are(v, head, 3))
        *kind = GRID_HEAD;
    else if (ncin_dims_are(v, pos_head, 4))
        *kind = GRID_POS_HEAD;
    else
        return false;
    return true;
}

static ps_status describe_grid(const ncin_file *f, pool *pl, const char *name, grid_var *g)
{
    ps_status st = ncin_inq_var(f, name, &g->v);
    if (st)
        return st;
    if (!grid_kind_of(&g->v, &g->kind)) {
        char have[512];
        ncin_describe(&g->v, have, sizeof have);
        return err_set(PS_ERR_FORMAT,
                       "%s: wrong dimensions: %s is not a (prompt, layer, position), (prompt, layer, head) or "
                       "(prompt, layer, position, head) grid",
                       f->path, have);
    }
    char *ln;
    if ((st = ncin_get_text_att(f, name, "long_name", &ln)))
        return st;
    g->long_name = ln ? pool_keep(pl, ln) : g->v.name;
    return g->long_name ? PS_OK : PS_ERR_NOMEM;
}

/* The variables --var names (see the help text). */
static ps_status resolve_grid_vars(const ncin_file *f, pool *pl, const char *spec, grid_var **out, size_t *n_out)
{
    char **names;
    size_t n_names;
    ps_status st = ncin_var_names(f, &names, &n_names);
    if (st)
        return st;
    grid_var *gv = NULL;
    size_t n = 0;
    /* The grid variables of the file, listed when --var names another. */
    size_t cap = n_names + 1;
    char *avail = pool_calloc(pl, 64 * cap + 1, 1);
    gv = pool_calloc(pl, cap, sizeof *gv);
    if (!avail || !gv) {
        ncin_names_free(names, n_names);
        return PS_ERR_NOMEM;
    }
    size_t alen = 0;
    for (size_t i = 0; i < n_names; i++) {
        ncin_var v;
        grid_kind k;
        if (ncin_inq_var(f, names[i], &v) == PS_OK && grid_kind_of(&v, &k) && alen + strlen(names[i]) + 3 < 64 * cap)
            alen += (size_t)sprintf(avail + alen, "%s%s", alen ? ", " : "", names[i]);
    }
    err_clear();
    if (!spec || !strcmp(spec, "all")) {
        /* chosen by name; describe_grid then refuses wrong dimensions */
        const char *first = NULL;
        for (size_t i = 0; i < n_names && st == PS_OK; i++) {
            if (!ends_with(names[i], "_normalized"))
                continue;
            if (spec)
                st = describe_grid(f, pl, names[i], &gv[n++]);
            else if (!first)
                first = names[i];
        }
        if (!spec && st == PS_OK && first)
            st = describe_grid(f, pl, ncin_has_var(f, "resid_pre_normalized") ? "resid_pre_normalized" : first,
                               &gv[n++]);
        if (st == PS_OK && n == 0)
            st = err_set(PS_ERR_FORMAT, "%s: no *_normalized variable: not a patching result file", f->path);
    } else {
        char *list = pool_printf(pl, "%s", spec);
        if (!list) {
            ncin_names_free(names, n_names);
            return PS_ERR_NOMEM;
        }
        char *save = NULL;
        for (char *tok = strtok_r(list, ",", &save); tok && st == PS_OK; tok = strtok_r(NULL, ",", &save)) {
            if (n == cap) {
                st = err_set(PS_ERR_INVALID, "%s: too many --var names", f->path);
                break;
            }
            if (!ncin_has_var(f, tok))
                st = err_set(PS_ERR_INVALID, "%s: unknown variable '%s' (plottable: %s)", f->path, tok,
                             alen ? avail : "none");
            else
                st = describe_grid(f, pl, tok, &gv[n++]);
        }
        if (st == PS_OK && n == 0)
            st = err_set(PS_ERR_INVALID, "%s: --var names no variable", f->path);
    }
    ncin_names_free(names, n_names);
    *out = gv;
    *n_out = n;
    return st;
}

/* Groups of prompts for the means (see the help of --mean). */
static ps_status group_prompts(const ncin_file *f, pool *pl, const plot_args *a, const size_t *sel, size_t n_sel,
                               const double *length, size_t n_pos, bool position_wise, prompt_group **groups,
                               size_t *n_groups)
{
    *n_groups = 0;
    prompt_group *g = pool_calloc(pl, n_sel, sizeof *g);
    if (!g)
        return PS_ERR_NOMEM;
    *groups = g;
    size_t *lens = pool_calloc(pl, n_sel, sizeof *lens);
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
    size_t *distinct = pool_calloc(pl, n_sel, sizeof *distinct), nd = 0;
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
        g[d].idx = pool_calloc(pl, n_sel, sizeof *g[d].idx);
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

/* Accumulators of one panel over the prompts of a group. */
typedef struct {
    double *sum;
    size_t *count;
    float *lo, *hi;
} accum;

static ps_status accum_init(pool *pl, accum *acc, size_t n)
{
    acc->sum = pool_calloc(pl, n, sizeof *acc->sum);
    acc->count = pool_calloc(pl, n, sizeof *acc->count);
    acc->lo = pool_calloc(pl, n, sizeof *acc->lo);
    acc->hi = pool_calloc(pl, n, sizeof *acc->hi);
    return acc->sum && acc->count && acc->lo && acc->hi ? PS_OK : PS_ERR_NOMEM;
}

static void accum_add(accum *acc, size_t i, float v)
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
static ps_status token_labels(const ncin_file *f, pool *pl, const ncin_var *tok_var, const prompt_group *g, size_t T,
                              const char ***labels, bool *differs_any)
{
    const char **lab = pool_calloc(pl, T, sizeof *lab);
    char **first = pool_calloc(pl, tok_var->shape[1], sizeof *first);
    char **other = pool_calloc(pl, tok_var->shape[1], sizeof *other);
    bool *differs = pool_calloc(pl, T, sizeof *differs);
    if (!lab || !first || !other || !differs)
        return PS_ERR_NOMEM;
    ps_status st = ncin_read_strings(f, tok_var, g->idx[0], 1, first);
    if (st)
        return st;
    for (size_t k = 1; k < g->n && st == PS_OK; k++) {
        if ((st = ncin_read_strings(f, tok_var, g->idx[k], 1, other)))
            break;
        for (size_t t = 0; t < T; t++)
            differs[t] = differs[t] || strcmp(first[t], other[t]);
        for (size_t t = 0; t < tok_var->shape[1]; t++)
            free(other[t]);
    }
    *differs_any = false;
    for (size_t t = 0; t < T && st == PS_OK; t++) {
        char *marked = differs[t] ? pool_printf(pl, "%s*", first[t]) : first[t];
        if (!marked || !(lab[t] = pool_keep(pl, plot_token_label(marked, t))))
            st = PS_ERR_NOMEM;
        *differs_any = *differs_any || differs[t];
    }
    for (size_t t = 0; t < tok_var->shape[1]; t++)
        free(first[t]);
    *labels = lab;
    return st;
}

static const char **index_labels(pool *pl, size_t n)
{
    const char **lab = pool_calloc(pl, n, sizeof *lab);
    for (size_t i = 0; lab && i < n; i++)
        if (!(lab[i] = pool_printf(pl, "%zu", i)))
            return NULL;
    return lab;
}

typedef struct {
    const ncin_file *f;
    pool *pl;
    const plot_args *a;
    size_t n_prompt, n_layer, n_pos, n_head;
    const ncin_var *tok_var;     /* clean_token or corrupted_token; NULL when no position variable */
    const char **layer_labels;
    const char **head_labels;
} results_ctx;

/* The panels of one variable over one group of prompts (one prompt, or a mean). */
static ps_status grid_panels(const results_ctx *c, const grid_var *g, const prompt_group *grp, bool mean,
                             panel_list *panels)
{
    pool *pl = c->pl;
    const size_t L = c->n_layer, H = c->n_head, P = c->n_pos;
    const size_t T = g->kind == GRID_HEAD ? H : grp->length;
    const size_t n_panels = g->kind == GRID_POS_HEAD ? H : 1;
    const size_t cells = L * T;
    size_t stride = 0;
    ps_status st = ncin_stride(c->f, &g->v, &stride);
    if (st)
        return st;
    /* the indexing below assumes the variable's shape is the file's dimensions */
    size_t want = g->kind == GRID_POS ? L * P : g->kind == GRID_HEAD ? L * H : L * P * H;
    if (stride != want)
        return err_set(PS_ERR_FORMAT, "%s: variable '%s' does not have the file's layer/position/head sizes",
                       c->f->path, g->v.name);
    float *slab = pool_calloc(pl, stride, sizeof *slab);
    accum *acc = pool_calloc(pl, n_panels, sizeof *acc);
    if (!slab || !acc)
        return PS_ERR_NOMEM;
    for (size_t h = 0; h < n_panels; h++)
        if ((st = accum_init(pl, &acc[h], cells)))
            return st;
    for (size_t k = 0; k < grp->n; k++) {
        if ((st = ncin_read_float(c->f, &g->v, grp->idx[k], 1, slab)))
            return st;
        for (size_t h = 0; h < n_panels; h++)
            for (size_t l = 0; l < L; l++)
                for (size_t t = 0; t < T; t++) {
                    float v = g->kind == GRID_POS_HEAD ? slab[(l * P + t) * H + h]
                              : g->kind == GRID_POS    ? slab[l * P + t]
                                                       : slab[l * H + t];
                    accum_add(&acc[h], l * T + t, v);
                }
    }
    const char **col_labels = c->head_labels;
    bool differs = false;
    if (g->kind != GRID_HEAD && (st = token_labels(c->f, pl, c->tok_var, grp, T, &col_labels, &differs)))
        return st;
    char *who = format_ranges(pl, grp->idx, grp->n, 80);
    if (!who)
        return PS_ERR_NOMEM;
    for (size_t h = 0; h < n_panels; h++) {
        float *values = pool_calloc(pl, cells, sizeof *values);
        plot_heatmap *p = panel_add(pl, panels);
        if (!values || !p)
            return PS_ERR_NOMEM;
        for (size_t i = 0; i < cells; i++)
            values[i] = acc[h].count[i] ? (float)(acc[h].sum[i] / (double)acc[h].count[i]) : NAN;
        p->values = values;
        p->n_rows = L;
        p->n_cols = T;
        p->row_labels = c->layer_labels;
        p->col_labels = col_labels;
        p->y_name = "Layer";
        p->x_name = g->kind == GRID_HEAD ? "Head" : "Position";
        if (g->kind == GRID_POS_HEAD) {
            p->title = pool_printf(pl, "%s, head %zu", g->long_name, h);
            p->hover_name = pool_printf(pl, "%s head %zu", g->v.name, h);
        } else {
            p->title = g->long_name;
            p->hover_name = g->v.name;
        }
        if (mean) {
            p->n_used = acc[h].count;
            p->lo = acc[h].lo;
            p->hi = acc[h].hi;
            char len_note[48] = "";
            if (grp->length && g->kind != GRID_HEAD)
                snprintf(len_note, sizeof len_note, ", length %zu", grp->length);
            p->subtitle = pool_printf(pl, "mean of %zu prompt%s (%s)%s%s", grp->n, grp->n == 1 ? "" : "s", who,
                                      len_note,
                                      differs ? "; labels: first prompt's tokens, * = differs across prompts" : "");
            if (!p->subtitle)
                return PS_ERR_NOMEM;
        }
        if (!p->title || !p->hover_name)
            return PS_ERR_NOMEM;
    }
    return PS_OK;
}

typedef struct {
    const char *path;
    const plot_figure *fig;
    const plot_heatmap *panels;
    const plot_lines *lines;
    size_t n;
    double zmax;
} write_job;

static ps_status write_heatmaps(FILE *out, void *user)
{
    const write_job *j = user;
    return plot_write_heatmaps(out, j->path, j->fig, j->panels, j->n, j->zmax);
}

static ps_status write_lines(FILE *out, void *user)
{
    const write_job *j = user;
    return plot_write_lines(out, j->path, j->fig, j->lines, j->n);
}

static const char *base_name(const char *path)
{
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

static ps_status plot_results(const ncin_file *f, pool *pl, const plot_args *a, const provenance *prov,
                              size_t *n_panels_out)
{
    results_ctx c = {.f = f, .pl = pl, .a = a};
    ps_status st;
    grid_var *gv;
    size_t n_vars;
    if ((st = resolve_grid_vars(f, pl, a->vars, &gv, &n_vars)) || (st = dim_len_capped(f, "prompt", &c.n_prompt)) ||
        (st = dim_len_capped(f, "layer", &c.n_layer)))
        return st;
    bool position_wise = false, any_head = false;
    for (size_t i = 0; i < n_vars; i++) {
        position_wise = position_wise || gv[i].kind != GRID_HEAD;
        any_head = any_head || gv[i].kind != GRID_POS;
    }
    if (c.n_prompt == 0)
        return err_set(PS_ERR_FORMAT, "%s: the file has no prompts", f->path);
    if (c.n_layer == 0)
        return err_set(PS_ERR_FORMAT, "%s: the layer dimension is empty", f->path);
    /* prompt lengths are checked against the position dimension even when
     * only head components are plotted */
    if ((position_wise || ncin_has_var(f, "length")) && (st = dim_len_capped(f, "position", &c.n_pos)))
        return st;
    if (any_head && (st = dim_len_capped(f, "head", &c.n_head)))
        return st;
    if ((position_wise && c.n_pos == 0) || (any_head && c.n_head == 0))
        return err_set(PS_ERR_FORMAT, "%s: the %s dimension is empty", f->path, c.n_pos == 0 ? "position" : "head");
    ncin_var tok_var;
    if (position_wise) {
        const char *tname = a->tokens && !strcmp(a->tokens, "corrupted") ? "corrupted_token" : "clean_token";
        static const char *const dims[] = {"prompt", "position"};
        if ((st = ncin_inq_var(f, tname, &tok_var)))
            return err_set(PS_ERR_FORMAT, "%s: no '%s' variable for the position labels", f->path, tname);
        if ((st = ncin_expect_dims(f, &tok_var, dims, 2)))
            return st;
        c.tok_var = &tok_var;
    }
    if (!(c.layer_labels = index_labels(pl, c.n_layer)) || (any_head && !(c.head_labels = index_labels(pl, c.n_head))))
        return PS_ERR_NOMEM;

    size_t *sel, n_sel;
    if ((st = select_prompts(f, pl, a, c.n_prompt, false, &sel, &n_sel)))
        return st;
    double *length, *clean_m, *corrupted_m;
    char **answer, **wrong;
    if ((st = read_prompt_doubles(f, pl, "length", c.n_prompt, &length)) ||
        (st = read_prompt_doubles(f, pl, "clean_metric", c.n_prompt, &clean_m)) ||
        (st = read_prompt_doubles(f, pl, "corrupted_metric", c.n_prompt, &corrupted_m)) ||
        (st = read_prompt_strings(f, pl, "answer", c.n_prompt, &answer)) ||
        (st = read_prompt_strings(f, pl, "wrong", c.n_prompt, &wrong)))
        return st;
    char *metric, *direction;
    if ((st = ncin_get_text_att(f, NULL, "metric", &metric)) || (metric && !pool_keep(pl, metric)) ||
        (st = ncin_get_text_att(f, NULL, "direction", &direction)) || (direction && !pool_keep(pl, direction)))
        return st ? st : PS_ERR_NOMEM;

    /* Groups: position components by length; head components, which have
     * no position axis, over every selected prompt unless split. */
    prompt_group *pos_groups = NULL, *head_groups = NULL;
    size_t n_pos_groups = 0, n_head_groups = 0;
    if (position_wise &&
        (st = group_prompts(f, pl, a, sel, n_sel, length, c.n_pos, true, &pos_groups, &n_pos_groups)))
        return st;
    if (any_head &&
        (st = group_prompts(f, pl, a, sel, n_sel, length, c.n_pos, false, &head_groups, &n_head_groups)))
        return st;
    const bool mean = a->mean;
    const prompt_group *report = position_wise ? pos_groups : head_groups;
    size_t n_report = position_wise ? n_pos_groups : n_head_groups;
    if (mean)
        for (size_t k = 0; k < n_report; k++) {
            const char *all = format_ranges(pl, report[k].idx, report[k].n, 0);
            if (!all)
                return PS_ERR_NOMEM;
            if (report[k].length)
                fprintf(stderr, "plot: mean of %zu prompt%s of length %zu: %s\n", report[k].n,
                        report[k].n == 1 ? "" : "s", report[k].length, all);
            else
                fprintf(stderr, "plot: mean of %zu prompt%s: %s\n", report[k].n, report[k].n == 1 ? "" : "s", all);
        }

    panel_list panels = {0};
    for (size_t i = 0; i < n_vars; i++) {
        const prompt_group *gs = gv[i].kind == GRID_HEAD ? head_groups : pos_groups;
        size_t ng = gv[i].kind == GRID_HEAD ? n_head_groups : n_pos_groups;
        for (size_t k = 0; k < ng; k++)
            if ((st = grid_panels(&c, &gv[i], &gs[k], mean, &panels)))
                return st;
    }

    plot_figure fig = {.meta = prov->pairs, .n_meta = prov->n};
    const char *m = metric ? metric : "metric";
    fig.title = a->title ? a->title
                         : pool_printf(pl, "Activation patching (%s%s%s): %s", m, direction ? ", " : "",
                                       direction ? direction : "", base_name(a->input));
    if (mean) {
        fig.subtitle = pool_printf(pl, "means over done prompts (%zu of %zu); each panel names its prompts", n_sel,
                                   c.n_prompt);
    } else {
        size_t p = sel[0];
        char metrics[160] = "";
        if (clean_m && corrupted_m)
            snprintf(metrics, sizeof metrics, "; clean %s %.4g, corrupted %.4g", m, clean_m[p], corrupted_m[p]);
        char *ans = answer && wrong ? pool_printf(pl, ": answer '%s', wrong '%s'", answer[p], wrong[p])
                                    : pool_printf(pl, "%s", "");
        fig.subtitle = ans ? pool_printf(pl, "prompt %zu of %zu%s%s", p, c.n_prompt, ans, metrics) : NULL;
    }
    if (!fig.title || !fig.subtitle)
        return PS_ERR_NOMEM;
    double zmax = a->has_zmax ? a->zmax : plot_heatmap_zmax(panels.items, panels.n);
    write_job job = {.path = a->output, .fig = &fig, .panels = panels.items, .n = panels.n, .zmax = zmax};
    if ((st = cli_write_atomic(a->output, write_heatmaps, &job)))
        return st;
    *n_panels_out = panels.n;
    return PS_OK;
}

/* ---- lens files ---------------------------------------------------------------------- */

static ps_status plot_lens(const ncin_file *f, pool *pl, const plot_args *a, const provenance *prov,
                           size_t *n_panels_out)
{
    if (a->by_length || a->has_length)
        return err_set(PS_ERR_INVALID, "%s: a lens file has no positions to group: --by-length and --length "
                                       "apply to patching results",
                       f->path);
    size_t n_prompt, n_layer;
    ps_status st;
    if ((st = dim_len_capped(f, "prompt", &n_prompt)) || (st = dim_len_capped(f, "layer", &n_layer)))
        return st;
    if (n_prompt == 0 || n_layer == 0)
        return err_set(PS_ERR_FORMAT, "%s: the %s dimension is empty", f->path, n_prompt ? "layer" : "prompt");
    static const char *const dims[] = {"prompt", "layer"};
    /* the variables: --var, or prob and reciprocal_rank */
    char **names;
    size_t n_names;
    if ((st = ncin_var_names(f, &names, &n_names)))
        return st;
    const char **vars = pool_calloc(pl, n_names + 1, sizeof *vars);
    size_t n_vars = 0;
    if (!vars) {
        ncin_names_free(names, n_names);
        return PS_ERR_NOMEM;
    }
    for (size_t i = 0; i < n_names && st == PS_OK; i++) {
        ncin_var v;
        bool wanted = a->vars && !strcmp(a->vars, "all")
                          ? ncin_inq_var(f, names[i], &v) == PS_OK && ncin_dims_are(&v, dims, 2) && ncin_is_numeric(&v)
                          : !a->vars && (!strcmp(names[i], "prob") || !strcmp(names[i], "reciprocal_rank"));
        if (wanted && !(vars[n_vars++] = pool_printf(pl, "%s", names[i])))
            st = PS_ERR_NOMEM;
    }
    ncin_names_free(names, n_names);
    if (st)
        return st;
    err_clear();
    if (a->vars && strcmp(a->vars, "all")) {
        char *list = pool_printf(pl, "%s", a->vars);
        if (!list)
            return PS_ERR_NOMEM;
        for (char *save = NULL, *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            if (!ncin_has_var(f, tok))
                return err_set(PS_ERR_INVALID, "%s: unknown variable '%s' (a lens file: prob, reciprocal_rank)",
                               f->path, tok);
            if (n_vars == n_names)
                return err_set(PS_ERR_INVALID, "%s: too many --var names", f->path);
            vars[n_vars++] = tok;
        }
    }
    if (n_vars == 0)
        return err_set(PS_ERR_FORMAT, "%s: a lens file without prob or reciprocal_rank variables", f->path);

    size_t *sel, n_sel;
    if ((st = select_prompts(f, pl, a, n_prompt, true, &sel, &n_sel)))
        return st;
    char **answer;
    if ((st = read_prompt_strings(f, pl, "answer", n_prompt, &answer)))
        return st;
    /* x labels: layer_label(layer) ("embed", "0", ...) or the indices */
    const char **x_labels = NULL;
    if (ncin_has_var(f, "layer_label")) {
        ncin_var lv;
        static const char *const ldims[] = {"layer"};
        char **s = pool_calloc(pl, n_layer, sizeof *s);
        if (!s)
            return PS_ERR_NOMEM;
        if ((st = ncin_inq_var(f, "layer_label", &lv)) || (st = ncin_expect_dims(f, &lv, ldims, 1)) ||
            (st = ncin_read_strings(f, &lv, 0, n_layer, s)))
            return st;
        for (size_t i = 0; i < n_layer; i++)
            if (!pool_keep(pl, s[i])) {
                for (size_t j = i + 1; j < n_layer; j++)
                    free(s[j]);
                return PS_ERR_NOMEM;
            }
        x_labels = (const char **)s;
    } else if (!(x_labels = index_labels(pl, n_layer))) {
        return PS_ERR_NOMEM;
    }
    const char *who = format_ranges(pl, sel, n_sel, 80);
    if (!who)
        return PS_ERR_NOMEM;
    if (a->mean)
        fprintf(stderr, "plot: mean of %zu prompt%s: %s\n", n_sel, n_sel == 1 ? "" : "s",
                format_ranges(pl, sel, n_sel, 0));

    plot_lines *panels = pool_calloc(pl, n_vars, sizeof *panels);
    if (!panels)
        return PS_ERR_NOMEM;
    for (size_t i = 0; i < n_vars; i++) {
        ncin_var v;
        size_t stride = 0;
        if ((st = ncin_inq_var(f, vars[i], &v)) || (st = ncin_expect_dims(f, &v, dims, 2)) ||
            (st = ncin_stride(f, &v, &stride)))
            return st;
        double *all = pool_calloc(pl, n_prompt, stride * sizeof *all);
        if (!all)
            return PS_ERR_NOMEM;
        if ((st = ncin_read_double(f, &v, 0, n_prompt, all)))
            return st;
        plot_lines *p = &panels[i];
        bool is_prob = !strcmp(vars[i], "prob"), is_rr = !strcmp(vars[i], "reciprocal_rank");
        char *ln = NULL;
        if ((st = ncin_get_text_att(f, vars[i], "long_name", &ln)) || (ln && !pool_keep(pl, ln)))
            return st ? st : PS_ERR_NOMEM;
        p->title = is_prob ? "Probability of the answer by layer (logit lens)"
                   : is_rr ? "Reciprocal rank of the answer by layer (logit lens)"
                   : ln    ? ln
                           : vars[i];
        p->x_name = "Layer";
        p->y_name = is_prob ? "p(answer)" : is_rr ? "1 / rank of answer" : vars[i];
        p->n_x = n_layer;
        p->x_labels = x_labels;
        p->y_cap = is_prob || is_rr ? 1.0 : 0.0;
        plot_series *series = pool_calloc(pl, a->mean ? 1 : n_sel, sizeof *series);
        if (!series)
            return PS_ERR_NOMEM;
        p->series = series;
        if (a->mean) {
            double *y = pool_calloc(pl, n_layer, sizeof *y), *lo = pool_calloc(pl, n_layer, sizeof *lo),
                   *hi = pool_calloc(pl, n_layer, sizeof *hi);
            if (!y || !lo || !hi)
                return PS_ERR_NOMEM;
            for (size_t l = 0; l < n_layer; l++) {
                double sum = 0;
                size_t cnt = 0;
                lo[l] = INFINITY;
                hi[l] = -INFINITY;
                for (size_t k = 0; k < n_sel; k++) {
                    double val = all[sel[k] * n_layer + l];
                    if (isnan(val))
                        continue;
                    sum += val;
                    cnt++;
                    lo[l] = val < lo[l] ? val : lo[l];
                    hi[l] = val > hi[l] ? val : hi[l];
                }
                y[l] = cnt ? sum / (double)cnt : NAN;
                if (!cnt)
                    lo[l] = hi[l] = NAN;
            }
            series[0] = (plot_series){.y = y, .band_lo = lo, .band_hi = hi};
            series[0].label = pool_printf(pl, "mean of %zu prompt%s (band: min-max)", n_sel, n_sel == 1 ? "" : "s");
            if (!series[0].label)
                return PS_ERR_NOMEM;
            p->n_series = 1;
            p->subtitle = pool_printf(pl, "prompts %s", who);
        } else {
            for (size_t k = 0; k < n_sel; k++) {
                series[k].y = all + sel[k] * n_layer;
                series[k].label = answer ? pool_printf(pl, "prompt %zu: '%s'", sel[k], answer[sel[k]])
                                         : pool_printf(pl, "prompt %zu", sel[k]);
                if (!series[k].label)
                    return PS_ERR_NOMEM;
            }
            p->n_series = n_sel;
        }
    }
    plot_figure fig = {.meta = prov->pairs, .n_meta = prov->n};
    fig.title = a->title ? a->title : pool_printf(pl, "Logit lens: %s", base_name(a->input));
    fig.subtitle = a->mean ? pool_printf(pl, "mean over %zu of %zu prompts", n_sel, n_prompt)
                           : pool_printf(pl, "%zu of %zu prompt%s", n_sel, n_prompt, n_prompt == 1 ? "" : "s");
    if (!fig.title || !fig.subtitle)
        return PS_ERR_NOMEM;
    write_job job = {.path = a->output, .fig = &fig, .lines = panels, .n = n_vars};
    if ((st = cli_write_atomic(a->output, write_lines, &job)))
        return st;
    *n_panels_out = n_vars;
    return PS_OK;
}

/* ---- the command ------------------------------------------------------------------------ */

static int parse_args(int argc, char **argv, plot_args *a)
{
    static const struct option opts[] = {{"output", required_argument, 0, 'o'},
                                         {"var", required_argument, 0, OPT_VAR},
                                         {"prompt", required_argument, 0, OPT_PROMPT},
                                         {"mean", no_argument, 0, OPT_MEAN},
                                         {"by-length", no_argument, 0, OPT_BY_LENGTH},
                                         {"length", required_argument, 0, OPT_LENGTH},
                                         {"tokens", required_argument, 0, OPT_TOKENS},
                                         {"title", required_argument, 0, OPT_TITLE},
                                         {"zmax", required_argument, 0, OPT_ZMAX},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    memset(a, 0, sizeof *a);
    int ch;
    while ((ch = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
        switch (ch) {
        case 'o': a->output = optarg; break;
        case OPT_VAR:
            if (!*optarg)
                return cli_usage(CMD, "--var needs a variable name");
            a->vars = optarg;
            break;
        case OPT_PROMPT:
            if (!cli_parse_size(optarg, 0, SIZE_MAX, &a->prompt))
                return cli_usage(CMD, "--prompt takes a prompt index (0, 1, ...), not '%s'", optarg);
            a->has_prompt = true;
            break;
        case OPT_MEAN: a->mean = true; break;
        case OPT_BY_LENGTH: a->by_length = true; break;
        case OPT_LENGTH:
            if (!cli_parse_size(optarg, 1, SIZE_MAX, &a->length))
                return cli_usage(CMD, "--length takes a number of tokens >= 1, not '%s'", optarg);
            a->has_length = true;
            break;
        case OPT_TOKENS:
            if (strcmp(optarg, "clean") && strcmp(optarg, "corrupted"))
                return cli_usage(CMD, "--tokens takes clean or corrupted, not '%s'", optarg);
            a->tokens = optarg;
            break;
        case OPT_TITLE: a->title = optarg; break;
        case OPT_ZMAX: {
            char *end;
            a->zmax = strtod(optarg, &end);
            if (end == optarg || *end || !(a->zmax > 0) || !isfinite(a->zmax))
                return cli_usage(CMD, "--zmax takes a positive number, not '%s'", optarg);
            a->has_zmax = true;
            break;
        }
        case 'h': fputs(plot_help, stdout); return 0;
        default: return cli_usage(CMD, "unknown option or missing value: '%s'", argv[optind - 1]);
        }
    }
    if (optind == argc)
        return cli_usage(CMD, "an input file IN.nc is required");
    if (optind != argc - 1)
        return cli_usage(CMD, "exactly one input file, not also '%s'", argv[optind + 1]);
    a->input = argv[optind];
    if (!a->output)
        return cli_usage(CMD, "-o OUT.svg is required");
    if (a->has_prompt && a->mean)
        return cli_usage(CMD, "--prompt and --mean exclude each other");
    if ((a->by_length || a->has_length) && !a->mean)
        return cli_usage(CMD, "--by-length and --length go with --mean");
    if (a->by_length && a->has_length)
        return cli_usage(CMD, "--by-length and --length exclude each other");
    return CLI_CONTINUE;
}

int cmd_plot(int argc, char **argv)
{
    plot_args a;
    int rc = parse_args(argc, argv, &a);
    if (rc != CLI_CONTINUE)
        return rc;
    ncin_file f;
    if (ncin_open(&f, a.input) != PS_OK)
        return cli_fail();
    pool pl = {0};
    provenance prov;
    char *analysis = NULL;
    size_t n_panels = 0;
    ps_status st = read_provenance(&f, &pl, a.input, &prov);
    if (st == PS_OK)
        st = ncin_get_text_att(&f, NULL, "analysis", &analysis);
    if (st == PS_OK && analysis && !pool_keep(&pl, analysis))
        st = PS_ERR_NOMEM;
    bool lens = analysis && !strcmp(analysis, "lens");
    if (st == PS_OK && lens && a.tokens)
        st = err_set(PS_ERR_INVALID, "%s: a lens file has no token labels: --tokens applies to patching results",
                     a.input);
    if (st == PS_OK)
        st = lens ? plot_lens(&f, &pl, &a, &prov, &n_panels) : plot_results(&f, &pl, &a, &prov, &n_panels);
    if (st == PS_ERR_NOMEM && !strstr(err_msg(), a.input))
        err_wrap(st, "%s", a.input);
    ncin_close(&f);
    pool_free(&pl);
    if (st != PS_OK)
        return cli_fail();
    fprintf(stderr, "wrote %s: %zu panel%s\n", a.output, n_panels, n_panels == 1 ? "" : "s");
    return 0;
}
