#include "plotfig.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ncin.h"
#include "patchspec.h"
#include "prov.h"
#include "rankstat.h"
#include "schema.h"

/* ---- provenance ------------------------------------------------------------ */

static ps_status read_provenance(const ncin_file *f, agg_pool *pl, const char *input, plotfig_provenance *p)
{
    p->n = 0;
    p->pairs[p->n][0] = SCHEMA_ATT_PATCHSWEEP_VERSION;
    p->pairs[p->n++][1] = prov_version();
    p->pairs[p->n][0] = SCHEMA_ATT_COMMAND_LINE;
    p->pairs[p->n++][1] = prov_command_line();
    p->pairs[p->n][0] = "source_file";
    p->pairs[p->n++][1] = input;
    static const char *const from_source[][2] = {{SCHEMA_ATT_MODEL_SHA256, SCHEMA_ATT_MODEL_SHA256},
                                                {SCHEMA_ATT_PATCHSWEEP_VERSION, "source_patchsweep_version"},
                                                {SCHEMA_ATT_COMMAND_LINE, "source_command_line"},
                                                {SCHEMA_ATT_CREATED, "source_created"}};
    for (size_t i = 0; i < sizeof from_source / sizeof from_source[0]; i++) {
        char *v;
        ps_status st = ncin_get_text_att(f, NULL, from_source[i][0], &v);
        if (st)
            return st;
        if (v && !agg_keep(pl, v))
            return PS_ERR_NOMEM;
        p->pairs[p->n][0] = from_source[i][1];
        /* an absent attribute is recorded as empty rather than dropped, so
         * the entry says the source had none */
        p->pairs[p->n++][1] = v ? v : "";
    }
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
    plot_heatmap *items;
    size_t n, cap;
} panel_list;

static plot_heatmap *panel_add(agg_pool *pl, panel_list *ps)
{
    if (ps->n == ps->cap) {
        size_t cap = ps->cap ? 2 * ps->cap : 8;
        plot_heatmap *items = agg_calloc(pl, cap, sizeof *items);
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
    static const char *const pos[] = {SCHEMA_DIM_PROMPT, SCHEMA_DIM_LAYER, SCHEMA_DIM_POSITION};
    static const char *const head[] = {SCHEMA_DIM_PROMPT, SCHEMA_DIM_LAYER, SCHEMA_DIM_HEAD};
    static const char *const pos_head[] = {SCHEMA_DIM_PROMPT, SCHEMA_DIM_LAYER, SCHEMA_DIM_POSITION, SCHEMA_DIM_HEAD};
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

static ps_status describe_grid(const ncin_file *f, agg_pool *pl, const char *name, grid_var *g)
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
    if ((st = ncin_get_text_att(f, name, SCHEMA_ATT_LONG_NAME, &ln)))
        return st;
    g->long_name = ln ? agg_keep(pl, ln) : g->v.name;
    return g->long_name ? PS_OK : PS_ERR_NOMEM;
}

/* The variables --var names (see the help text). */
static ps_status resolve_grid_vars(const ncin_file *f, agg_pool *pl, const agg_select *sel, const char *spec,
                                   grid_var **out, size_t *n_out)
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
    char *avail = agg_calloc(pl, 64 * cap + 1, 1);
    gv = agg_calloc(pl, cap, sizeof *gv);
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
            if (!ends_with(names[i], SCHEMA_NORMALIZED_SUFFIX))
                continue;
            /* --var all: grids of other shapes (pattern_dest_src's dest x src,
             * a kv_head axis) are left out with a note, not refused */
            ncin_var v;
            grid_kind k;
            if (spec && ncin_inq_var(f, names[i], &v) == PS_OK && !grid_kind_of(&v, &k)) {
                char have[512];
                ncin_describe(&v, have, sizeof have);
                agg_note(sel, "%s: not drawn (only (layer, position), (layer, head) and (layer, position, head) "
                              "grids are)", have);
                continue;
            }
            if (spec)
                st = describe_grid(f, pl, names[i], &gv[n++]);
            else if (!first)
                first = names[i];
        }
        if (!spec && st == PS_OK && first)
            st = describe_grid(f, pl, ncin_has_var(f, SCHEMA_VAR_RESID_PRE_NORMALIZED) ? SCHEMA_VAR_RESID_PRE_NORMALIZED : first,
                               &gv[n++]);
        if (st == PS_OK && n == 0)
            st = err_set(PS_ERR_FORMAT, "%s: no *_normalized variable: not a patching result file", f->path);
    } else {
        char *list = agg_printf(pl, "%s", spec);
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

/* ---- captions ---------------------------------------------------------------------- */

/* What a reader should look for in a component's grid, per kind of
 * component (patchspec.h's names), phrased for any task: the figure is of
 * whatever distinguishes the clean prompt from the corrupted one. */
static const char *look_for(const char *component)
{
    static const char *const what[PATCH_COMPONENT_COUNT] = {
        [PATCH_RESID_PRE] = "resid_pre (the residual stream entering each block): where the information that decides "
                            "the answer sits at each layer; it starts at the earlier positions where the prompts "
                            "differ and, across the layers, moves to the last position, and the layers where it "
                            "moves are where attention carries it",
        [PATCH_RESID_MID] = "resid_mid (the residual stream between attention and MLP): as resid_pre, after each "
                            "block's attention; a cell lit here but not in resid_pre of the same block was written "
                            "by that block's attention",
        [PATCH_ATTN_OUT] = "attn_out (each block's attention output): which layers and positions write the deciding "
                           "information; cells at the last position mark the layers whose heads move it there",
        [PATCH_MLP_OUT] = "mlp_out (each block's MLP output): which layers and positions the MLPs write it at; "
                          "often little, or the token where the prompts differ",
        [PATCH_Z] = "z (each head's output, per position): which heads carry the information, and at which "
                    "position; a head lit at the last position moves it there",
        [PATCH_Z_ALL_POS] = "z_all_pos (each head's output at every position at once): which heads carry the "
                            "information (a few strong cells are the circuit's heads)",
        [PATCH_Q_ALL_POS] = "q_all_pos (each head's queries): heads whose effect comes from where they look from",
        [PATCH_K_ALL_POS] = "k_all_pos (each head's keys): heads whose effect comes from what they attend to",
        [PATCH_V_ALL_POS] = "v_all_pos (each head's values): heads whose effect comes from what they move",
        [PATCH_PATTERN_ALL_POS] = "pattern_all_pos (each head's attention pattern): heads whose effect comes from "
                                  "where they attend",
    };
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        if (!strcmp(component, patch_component_name((patch_component)c)))
            return what[c];
    return NULL;
}

static const char *metric_meaning(const char *metric)
{
    return !metric                           ? "the file's metric"
           : !strcmp(metric, "logit_diff") ? "logit_diff, the answer's logit minus the wrong token's at the last "
                                               "position"
           : !strcmp(metric, "prob")       ? "prob, the probability of the answer"
           : !strcmp(metric, "logprob")    ? "logprob, the log-probability of the answer"
           : !strcmp(metric, "kl")         ? "kl, the KL divergence of the next-token distribution from the clean "
                                               "run's"
                                           : metric;
}

/* The figure's caption, from the file's attributes and the selection:
 * what was patched, with which metric and in which direction, over which
 * prompts, how to read the values, and what to look for per component
 * kind.  `prompts` says which prompts the figure shows. */
/* The file's global attribute method (schema.h: exact when absent). */
static const char *file_method(const ncin_file *f, agg_pool *pl)
{
    char *m = NULL;
    if (ncin_get_text_att(f, NULL, SCHEMA_ATT_METHOD, &m) != PS_OK) {
        err_clear();
        return NULL;
    }
    return m ? agg_keep(pl, m) : NULL;
}

/* "AtP" or "AtP*" (with " + GradDrop") for a method attribute. */
static const char *atp_method_label(const char *method)
{
    if (!method || strncmp(method, "atp", 3))
        return "AtP";
    bool star = method[3] == '*', gd = strstr(method, "graddrop") != NULL;
    return star ? (gd ? "AtP* + GradDrop" : "AtP*") : (gd ? "AtP + GradDrop" : "AtP");
}

/* Whether grid variable `name` is an attribution-patching estimate
 * (C_atp or C_atp_normalized); *base_len: the length of C. */
static bool is_estimate(const char *name, size_t *base_len)
{
    size_t n = strlen(name);
    if (ends_with(name, SCHEMA_NORMALIZED_SUFFIX))
        n -= strlen(SCHEMA_NORMALIZED_SUFFIX);
    size_t k = strlen(SCHEMA_ATP_SUFFIX);
    bool est = n >= k && !strncmp(name + n - k, SCHEMA_ATP_SUFFIX, k);
    *base_len = est ? n - k : n;
    return est;
}

static ps_status results_caption(agg_pool *pl, const grid_var *gv, size_t n_vars, const char *metric,
                                 const char *direction, const char *method, const char *prompts, const char **out)
{
    bool noise = direction && !strcmp(direction, "noise"), normalized = false, raw = false;
    size_t n_est = 0;
    char *comps = agg_printf(pl, "%s", ""), *looks = agg_printf(pl, "%s", "");
    for (size_t i = 0; i < n_vars && comps && looks; i++) {
        const char *name = gv[i].v.name;
        bool is_norm = ends_with(name, SCHEMA_NORMALIZED_SUFFIX);
        normalized = normalized || is_norm;
        raw = raw || !is_norm;
        char *base = agg_printf(pl, "%.*s", (int)(strlen(name) - (is_norm ? strlen(SCHEMA_NORMALIZED_SUFFIX) : 0)), name);
        if (!base)
            return PS_ERR_NOMEM;
        /* each kind once, even when C and C_normalized are both shown */
        bool seen = false;
        for (size_t k = 0; k < i && !seen; k++)
            seen = !strncmp(gv[k].v.name, base, strlen(base)) &&
                   (gv[k].v.name[strlen(base)] == '\0' || !strcmp(gv[k].v.name + strlen(base), SCHEMA_NORMALIZED_SUFFIX));
        if (seen)
            continue;
        size_t comp_len;
        bool est = is_estimate(base, &comp_len);
        n_est += est;
        const char *comp = agg_printf(pl, "%.*s", (int)comp_len, base);
        if (!comp)
            return PS_ERR_NOMEM;
        const char *lf = look_for(comp);
        comps = est ? agg_printf(pl, "%s%s%s (%s, an attribution patching estimate)", comps, *comps ? ", " : "", base,
                                 atp_method_label(method))
                    : agg_printf(pl, "%s%s%s", comps, *comps ? ", " : "", base);
        looks = agg_printf(pl, "%s%s%s", looks, *looks ? "; " : "",
                           lf ? lf : agg_printf(pl, "%s: which cells move the metric", base));
    }
    if (!comps || !looks)
        return PS_ERR_NOMEM;
    const char *how = noise ? "the clean prompt run with one activation (a cell) replaced by its value from the "
                              "corrupted run (noising)"
                            : "the corrupted prompt run with one activation (a cell) restored to its value from the "
                              "clean run (denoising)";
    const char *values =
        normalized ? (noise ? "Normalized values are (patched - corrupted) / (clean - corrupted): 1 = no effect, 0 = "
                              "the clean behaviour destroyed; look for the cells far below 1"
                            : "Normalized values are (patched - corrupted) / (clean - corrupted): 0 = no effect, 1 = "
                              "the clean behaviour fully restored; look for the cells near 1")
                   : "Values are the patched metric itself";
    /* estimates say so first: a linearized estimate is not a patched value */
    const char *est_note =
        n_est == 0 ? ""
                   : agg_printf(pl, "%s are estimates by attribution patching (%s, method %s): each cell's effect "
                                    "linearized from one forward and one backward pass, not patched; the estimate "
                                    "is poor where attention saturates or paths cancel. ",
                                n_est == 1 ? "The *_atp grid" : "The *_atp grids", atp_method_label(method),
                                method ? method : "not recorded");
    if (!est_note)
        return PS_ERR_NOMEM;
    *out = agg_printf(pl,
                      "%s of %s. %sMetric: %s. Direction: %s: %s. Prompts: %s. %s%s (blue > 0 > red "
                      "on one symmetric scale; hatched grey: no value). What to look for: %s.",
                      n_est == n_vars ? "Attribution patching estimates (not exact patching)" : "Activation patching",
                      comps, est_note, metric_meaning(metric), direction ? direction : "not recorded", how, prompts,
                      values, normalized && raw ? "; raw panels show the patched metric" : "", looks);
    return *out ? PS_OK : PS_ERR_NOMEM;
}

/* Groups of prompts for the means (see the help of --mean). */
static ps_status token_labels(const ncin_file *f, agg_pool *pl, const ncin_var *tok_var, const agg_group *g, size_t T,
                              const char ***labels, bool *differs_any)
{
    const char **lab = agg_calloc(pl, T, sizeof *lab);
    char **first = agg_calloc(pl, tok_var->shape[1], sizeof *first);
    char **other = agg_calloc(pl, tok_var->shape[1], sizeof *other);
    bool *differs = agg_calloc(pl, T, sizeof *differs);
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
        char *marked = differs[t] ? agg_printf(pl, "%s*", first[t]) : first[t];
        if (!marked || !(lab[t] = agg_keep(pl, plot_token_label(marked, t))))
            st = PS_ERR_NOMEM;
        *differs_any = *differs_any || differs[t];
    }
    for (size_t t = 0; t < tok_var->shape[1]; t++)
        free(first[t]);
    *labels = lab;
    return st;
}

/* The columns whose labels are shown first when labels must be thinned
 * (plot.h col_keep): the role positions of the group's first prompt (its
 * tokens are the labels), from role_position(prompt, role); NULL when the
 * file has none. */
static ps_status role_columns(const ncin_file *f, agg_pool *pl, const agg_group *g, size_t T, const bool **keep)
{
    *keep = NULL;
    if (!ncin_has_var(f, SCHEMA_VAR_ROLE_POSITION))
        return PS_OK;
    static const char *const dims[] = {SCHEMA_DIM_PROMPT, SCHEMA_DIM_ROLE};
    ncin_var v;
    size_t n_role = 0;
    ps_status st;
    if ((st = ncin_inq_var(f, SCHEMA_VAR_ROLE_POSITION, &v)) || (st = ncin_expect_dims(f, &v, dims, 2)) ||
        (st = agg_dim_len(f, SCHEMA_DIM_ROLE, &n_role)))
        return st;
    double *pos = agg_calloc(pl, n_role ? n_role : 1, sizeof *pos);
    bool *k = agg_calloc(pl, T, sizeof *k);
    if (!pos || !k)
        return PS_ERR_NOMEM;
    if (n_role && (st = ncin_read_double(f, &v, g->idx[0], 1, pos)))
        return st;
    for (size_t r = 0; r < n_role; r++)
        if (pos[r] >= 0 && pos[r] < (double)T)
            k[(size_t)pos[r]] = true;
    *keep = k;
    return PS_OK;
}

static const char **index_labels(agg_pool *pl, size_t n)
{
    const char **lab = agg_calloc(pl, n, sizeof *lab);
    for (size_t i = 0; lab && i < n; i++)
        if (!(lab[i] = agg_printf(pl, "%zu", i)))
            return NULL;
    return lab;
}

typedef struct {
    const ncin_file *f;
    agg_pool *pl;
    const plotfig_opts *a;
    size_t n_prompt, n_layer, n_pos, n_head;
    const ncin_var *tok_var;     /* clean_token or corrupted_token; NULL when no position variable */
    const char **layer_labels;
    const char **head_labels;
} results_ctx;

/* The panels of one variable over one group of prompts (one prompt, or a mean). */
static ps_status grid_panels(const results_ctx *c, const grid_var *g, const agg_group *grp, bool mean,
                             panel_list *panels)
{
    agg_pool *pl = c->pl;
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
    float *slab = agg_calloc(pl, stride, sizeof *slab);
    agg_accum *acc = agg_calloc(pl, n_panels, sizeof *acc);
    if (!slab || !acc)
        return PS_ERR_NOMEM;
    for (size_t h = 0; h < n_panels; h++)
        if ((st = agg_accum_init(pl, &acc[h], cells)))
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
                    agg_accum_add(&acc[h], l * T + t, v);
                }
    }
    const char **col_labels = c->head_labels;
    const bool *col_keep = NULL;
    bool differs = false;
    if (g->kind != GRID_HEAD && ((st = token_labels(c->f, pl, c->tok_var, grp, T, &col_labels, &differs)) ||
                                 (st = role_columns(c->f, pl, grp, T, &col_keep))))
        return st;
    char *who = agg_format_ranges(pl, grp->idx, grp->n, 80);
    if (!who)
        return PS_ERR_NOMEM;
    for (size_t h = 0; h < n_panels; h++) {
        float *values = agg_calloc(pl, cells, sizeof *values);
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
        p->col_keep = col_keep;
        p->y_name = "Layer";
        p->x_name = g->kind == GRID_HEAD ? "Head" : "Position";
        if (g->kind == GRID_POS_HEAD) {
            p->title = agg_printf(pl, "%s, head %zu", g->long_name, h);
            p->hover_name = agg_printf(pl, "%s head %zu", g->v.name, h);
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
            p->subtitle = agg_printf(pl, "mean of %zu prompt%s (%s)%s%s", grp->n, grp->n == 1 ? "" : "s", who,
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

static const char *base_name(const char *path)
{
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

/* Several-metric files (schema.h): grids of another metric than the file's
 * first carry the attribute metric.  When every drawn grid is of one such
 * metric M, the title names M and the unpatched values are clean_M and
 * corrupted_M; grids of several metrics name them all, without values. */
static ps_status grids_metric(const ncin_file *f, agg_pool *pl, const grid_var *gv, size_t n_vars, size_t n_prompt,
                              char **metric, double **clean_m, double **corrupted_m)
{
    char *first = NULL;
    bool mixed = false;
    for (size_t i = 0; i < n_vars && !mixed; i++) {
        char *vm = NULL;
        ps_status st = ncin_get_text_att(f, gv[i].v.name, SCHEMA_ATT_METRIC, &vm);
        if (st)
            return st;
        const char *name = vm ? vm : *metric ? *metric : "";
        if (i == 0)
            first = agg_printf(pl, "%s", name);
        else
            mixed = !first || strcmp(first, name) != 0;
        free(vm);
    }
    if (mixed) {
        char *all = NULL;
        ps_status st = ncin_get_text_att(f, NULL, SCHEMA_ATT_METRICS, &all);
        if (st)
            return st;
        *metric = agg_printf(pl, "%s", all ? all : "metrics");
        free(all);
        *clean_m = *corrupted_m = NULL;
        return *metric ? PS_OK : PS_ERR_NOMEM;
    }
    if (!first || !*metric || !strcmp(first, *metric))
        return PS_OK;
    char *cn = agg_printf(pl, SCHEMA_CLEAN_PREFIX "%s", first), *rn = agg_printf(pl, SCHEMA_CORRUPTED_PREFIX "%s", first);
    if (!cn || !rn)
        return PS_ERR_NOMEM;
    *metric = first;
    *clean_m = *corrupted_m = NULL;
    if (!ncin_has_var(f, cn) || !ncin_has_var(f, rn))
        return PS_OK;
    ps_status st = agg_read_prompt_doubles(f, pl, cn, n_prompt, clean_m);
    return st ? st : agg_read_prompt_doubles(f, pl, rn, n_prompt, corrupted_m);
}

/* " of DATASET" (the sweep's dataset_path, base name) or "". */
static const char *dataset_note(const ncin_file *f, agg_pool *pl)
{
    char *d = NULL;
    if (ncin_get_text_att(f, NULL, SCHEMA_ATT_DATASET_PATH, &d) != PS_OK || !d) {
        err_clear();
        return "";
    }
    if (!agg_keep(pl, d))
        return NULL;
    const char *b = strrchr(d, '/');
    return agg_printf(pl, " of %s", b ? b + 1 : d);
}

static ps_status plot_results(const ncin_file *f, agg_pool *pl, const plotfig_opts *a, const plotfig_provenance *prov,
                              plotfig *out)
{
    results_ctx c = {.f = f, .pl = pl, .a = a};
    ps_status st;
    grid_var *gv;
    size_t n_vars;
    if ((st = resolve_grid_vars(f, pl, &a->sel, a->vars, &gv, &n_vars)) || (st = agg_dim_len(f, SCHEMA_DIM_PROMPT, &c.n_prompt)) ||
        (st = agg_dim_len(f, SCHEMA_DIM_LAYER, &c.n_layer)))
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
    if ((position_wise || ncin_has_var(f, SCHEMA_VAR_LENGTH)) && (st = agg_dim_len(f, SCHEMA_DIM_POSITION, &c.n_pos)))
        return st;
    if (any_head && (st = agg_dim_len(f, SCHEMA_DIM_HEAD, &c.n_head)))
        return st;
    if ((position_wise && c.n_pos == 0) || (any_head && c.n_head == 0))
        return err_set(PS_ERR_FORMAT, "%s: the %s dimension is empty", f->path, c.n_pos == 0 ? SCHEMA_DIM_POSITION : SCHEMA_DIM_HEAD);
    ncin_var tok_var;
    if (position_wise) {
        const char *tname = a->tokens && !strcmp(a->tokens, "corrupted") ? SCHEMA_VAR_CORRUPTED_TOKEN : SCHEMA_VAR_CLEAN_TOKEN;
        static const char *const dims[] = {SCHEMA_DIM_PROMPT, SCHEMA_DIM_POSITION};
        if ((st = ncin_inq_var(f, tname, &tok_var)))
            return err_set(PS_ERR_FORMAT, "%s: no '%s' variable for the position labels", f->path, tname);
        if ((st = ncin_expect_dims(f, &tok_var, dims, 2)))
            return st;
        c.tok_var = &tok_var;
    }
    if (!(c.layer_labels = index_labels(pl, c.n_layer)) || (any_head && !(c.head_labels = index_labels(pl, c.n_head))))
        return PS_ERR_NOMEM;

    size_t *sel, n_sel;
    if ((st = agg_select_prompts(f, pl, &a->sel, c.n_prompt, false, &sel, &n_sel)))
        return st;
    double *length, *clean_m, *corrupted_m;
    char **answer, **wrong;
    if ((st = agg_read_prompt_doubles(f, pl, SCHEMA_VAR_LENGTH, c.n_prompt, &length)) ||
        (st = agg_read_prompt_doubles(f, pl, SCHEMA_VAR_CLEAN_METRIC, c.n_prompt, &clean_m)) ||
        (st = agg_read_prompt_doubles(f, pl, SCHEMA_VAR_CORRUPTED_METRIC, c.n_prompt, &corrupted_m)) ||
        (st = agg_read_prompt_strings(f, pl, SCHEMA_VAR_ANSWER, c.n_prompt, &answer)) ||
        (st = agg_read_prompt_strings(f, pl, SCHEMA_VAR_WRONG, c.n_prompt, &wrong)))
        return st;
    char *metric, *direction;
    if ((st = ncin_get_text_att(f, NULL, SCHEMA_ATT_METRIC, &metric)) || (metric && !agg_keep(pl, metric)) ||
        (st = ncin_get_text_att(f, NULL, SCHEMA_ATT_DIRECTION, &direction)) || (direction && !agg_keep(pl, direction)))
        return st ? st : PS_ERR_NOMEM;
    if ((st = grids_metric(f, pl, gv, n_vars, c.n_prompt, &metric, &clean_m, &corrupted_m)))
        return st;

    /* Groups: position components by length; head components, which have
     * no position axis, over every selected prompt unless split. */
    agg_group *pos_groups = NULL, *head_groups = NULL;
    size_t n_pos_groups = 0, n_head_groups = 0;
    if (position_wise &&
        (st = agg_group_prompts(f, pl, &a->sel, sel, n_sel, length, c.n_pos, true, &pos_groups, &n_pos_groups)))
        return st;
    if (any_head &&
        (st = agg_group_prompts(f, pl, &a->sel, sel, n_sel, length, c.n_pos, false, &head_groups, &n_head_groups)))
        return st;
    const bool mean = a->sel.mean;
    const agg_group *report = position_wise ? pos_groups : head_groups;
    size_t n_report = position_wise ? n_pos_groups : n_head_groups;
    if (mean)
        for (size_t k = 0; k < n_report; k++) {
            const char *all = agg_format_ranges(pl, report[k].idx, report[k].n, 0);
            if (!all)
                return PS_ERR_NOMEM;
            if (report[k].length)
                agg_note(&a->sel, "mean of %zu prompt%s of length %zu: %s", report[k].n,
                        report[k].n == 1 ? "" : "s", report[k].length, all);
            else
                agg_note(&a->sel, "mean of %zu prompt%s: %s", report[k].n, report[k].n == 1 ? "" : "s", all);
        }

    panel_list panels = {0};
    for (size_t i = 0; i < n_vars; i++) {
        const agg_group *gs = gv[i].kind == GRID_HEAD ? head_groups : pos_groups;
        size_t ng = gv[i].kind == GRID_HEAD ? n_head_groups : n_pos_groups;
        for (size_t k = 0; k < ng; k++)
            if ((st = grid_panels(&c, &gv[i], &gs[k], mean, &panels)))
                return st;
    }

    plot_figure fig = {.meta = prov->pairs, .n_meta = prov->n};
    const char *m = metric ? metric : "metric";
    size_t n_est = 0, base_len;
    for (size_t i = 0; i < n_vars; i++)
        n_est += is_estimate(gv[i].v.name, &base_len);
    /* an estimate is never titled as activation patching */
    fig.title = a->title         ? a->title
                : n_est == n_vars ? agg_printf(pl, "Attribution patching estimate (%s, %s%s%s): %s",
                                               atp_method_label(file_method(f, pl)), m, direction ? ", " : "",
                                               direction ? direction : "", base_name(a->input))
                                  : agg_printf(pl, "Activation patching (%s%s%s): %s", m, direction ? ", " : "",
                                               direction ? direction : "", base_name(a->input));
    if (mean) {
        fig.subtitle = agg_printf(pl, "means over done prompts (%zu of %zu); each panel names its prompts", n_sel,
                                   c.n_prompt);
    } else {
        size_t p = sel[0];
        char metrics[160] = "";
        if (clean_m && corrupted_m)
            snprintf(metrics, sizeof metrics, "; clean %s %.4g, corrupted %.4g", m, clean_m[p], corrupted_m[p]);
        char *ans = answer && wrong ? agg_printf(pl, ": answer '%s', wrong '%s'", answer[p], wrong[p])
                                    : agg_printf(pl, "%s", "");
        fig.subtitle = ans ? agg_printf(pl, "prompt %zu of %zu%s%s", p, c.n_prompt, ans, metrics) : NULL;
    }
    if (!fig.title || !fig.subtitle)
        return PS_ERR_NOMEM;
    const char *ds = dataset_note(f, pl);
    const char *prompts =
        !ds    ? NULL
        : mean ? agg_printf(pl, "the mean over %zu done prompts%s (%zu in the file)%s", n_sel, ds, c.n_prompt,
                            a->sel.by_length ? ", one panel per prompt length" : "")
               : agg_printf(pl, "one prompt%s, %s", ds, fig.subtitle);
    if (!prompts || (st = results_caption(pl, gv, n_vars, metric, direction, file_method(f, pl), prompts, &fig.caption)))
        return st ? st : PS_ERR_NOMEM;
    double zmax = a->has_zmax ? a->zmax : plot_heatmap_zmax(panels.items, panels.n);
    out->fig = fig;
    out->panels = panels.items;
    out->n_panels = panels.n;
    out->zmax = zmax;
    return PS_OK;
}

/* ---- role-aligned means ---------------------------------------------------------------- */

/* --by-role: per position grid V, the heatmap of V_by_role (layer x role;
 * the hover gives the count) and beside it the spread V_by_role_std on the
 * same scale (results_roles.h). */
static ps_status plot_by_role(const ncin_file *f, agg_pool *pl, const plotfig_opts *a, const plotfig_provenance *prov,
                              plotfig *out)
{
    ps_status st;
    grid_var *gv;
    size_t n_vars, n_layer, n_role;
    if (!ncin_has_var(f, SCHEMA_VAR_ROLE))
        return err_set(PS_ERR_INVALID,
                       "%s: no roles in this file (--by-role needs a sweep of a dataset whose items name roles)",
                       f->path);
    if ((st = resolve_grid_vars(f, pl, &a->sel, a->vars, &gv, &n_vars)) || (st = agg_dim_len(f, SCHEMA_DIM_LAYER, &n_layer)) ||
        (st = agg_dim_len(f, SCHEMA_DIM_ROLE, &n_role)))
        return st;
    ncin_var rv;
    char **roles = agg_calloc(pl, n_role + 1, sizeof *roles);
    if (!roles)
        return PS_ERR_NOMEM;
    if ((st = ncin_inq_var(f, SCHEMA_VAR_ROLE, &rv)) || (st = ncin_read_strings(f, &rv, 0, n_role, roles)))
        return st;
    for (size_t k = 0; k < n_role; k++)
        if (!agg_keep(pl, roles[k]))
            return PS_ERR_NOMEM;
    const char **layer_labels = index_labels(pl, n_layer);
    if (!layer_labels)
        return PS_ERR_NOMEM;
    char *metric, *direction;
    if ((st = ncin_get_text_att(f, NULL, SCHEMA_ATT_METRIC, &metric)) || (metric && !agg_keep(pl, metric)) ||
        (st = ncin_get_text_att(f, NULL, SCHEMA_ATT_DIRECTION, &direction)) || (direction && !agg_keep(pl, direction)))
        return st ? st : PS_ERR_NOMEM;
    panel_list panels = {0};
    size_t max_count = 0;
    for (size_t i = 0; i < n_vars; i++) {
        if (gv[i].kind != GRID_POS) {
            agg_note(&a->sel, "%s: not a (layer, position) grid, no role-aligned panel", gv[i].v.name);
            continue;
        }
        const char *mname = agg_printf(pl, "%s" SCHEMA_BY_ROLE_SUFFIX, gv[i].v.name);
        const char *sname = agg_printf(pl, "%s" SCHEMA_BY_ROLE_STD_SUFFIX, gv[i].v.name);
        const char *cname = agg_printf(pl, "%s" SCHEMA_BY_ROLE_COUNT_SUFFIX, gv[i].v.name);
        if (!mname || !sname || !cname)
            return PS_ERR_NOMEM;
        static const char *const dims[] = {SCHEMA_DIM_LAYER, SCHEMA_DIM_ROLE};
        ncin_var mv, sv, cv;
        float *mean = agg_calloc(pl, n_layer * n_role, sizeof *mean);
        float *sd = agg_calloc(pl, n_layer * n_role, sizeof *sd);
        double *cnt = agg_calloc(pl, n_layer * n_role, sizeof *cnt);
        size_t *used = agg_calloc(pl, n_layer * n_role, sizeof *used);
        if (!mean || !sd || !cnt || !used)
            return PS_ERR_NOMEM;
        if ((st = ncin_inq_var(f, mname, &mv)) || (st = ncin_expect_dims(f, &mv, dims, 2)) ||
            (st = ncin_inq_var(f, sname, &sv)) || (st = ncin_expect_dims(f, &sv, dims, 2)) ||
            (st = ncin_inq_var(f, cname, &cv)) || (st = ncin_expect_dims(f, &cv, dims, 2)) ||
            (st = ncin_read_float(f, &mv, 0, n_layer, mean)) || (st = ncin_read_float(f, &sv, 0, n_layer, sd)) ||
            (st = ncin_read_double(f, &cv, 0, n_layer, cnt)))
            return st;
        for (size_t k = 0; k < n_layer * n_role; k++) {
            used[k] = isnan(cnt[k]) || cnt[k] < 0 ? 0 : (size_t)cnt[k];
            if (used[k] > max_count)
                max_count = used[k];
        }
        for (int s = 0; s < 2; s++) {
            plot_heatmap *h = panel_add(pl, &panels);
            if (!h)
                return PS_ERR_NOMEM;
            h->title = s ? agg_printf(pl, "%s: spread (standard deviation over prompts)", gv[i].v.name)
                         : agg_printf(pl, "%s: mean over prompts at each role", gv[i].v.name);
            h->subtitle = gv[i].long_name;
            h->x_name = "Role";
            h->y_name = "Layer";
            h->n_rows = n_layer;
            h->n_cols = n_role;
            h->row_labels = layer_labels;
            h->col_labels = (const char *const *)roles;
            h->values = s ? sd : mean;
            h->hover_name = s ? sname : mname;
            h->n_used = s ? NULL : used;
            if (!h->title)
                return PS_ERR_NOMEM;
        }
    }
    if (panels.n == 0)
        return err_set(PS_ERR_INVALID, "%s: none of the variables is a (layer, position) grid with role-aligned means",
                       f->path);
    agg_note(&a->sel, "role-aligned means of up to %zu done prompts per cell", max_count);
    plot_figure fig = {.meta = prov->pairs, .n_meta = prov->n};
    const char *m = metric ? metric : "metric";
    size_t n_est = 0, base_len;
    for (size_t i = 0; i < n_vars; i++)
        n_est += is_estimate(gv[i].v.name, &base_len);
    fig.title = a->title ? a->title
                         : agg_printf(pl, "%s by role (%s%s%s): %s",
                                      n_est == n_vars ? "Attribution patching estimate" : "Activation patching", m,
                                      direction ? ", " : "", direction ? direction : "", base_name(a->input));
    fig.subtitle = agg_printf(pl, "each prompt's grid read at its roles' token positions, then averaged over done "
                                  "prompts (up to %zu a cell)",
                              max_count);
    if (!fig.title || !fig.subtitle)
        return PS_ERR_NOMEM;
    char *role_list = agg_printf(pl, "%s", "");
    for (size_t k = 0; k < n_role && role_list; k++)
        role_list = agg_printf(pl, "%s%s%s", role_list, k ? ", " : "", roles[k]);
    const char *ds = dataset_note(f, pl);
    const char *prompts = role_list && ds ? agg_printf(pl,
                                                       "role-aligned means over the done prompts%s: each prompt's "
                                                       "grid read at the token of each role (%s), then averaged (up "
                                                       "to %zu prompts a cell; the spread panels give their standard "
                                                       "deviation)",
                                                       ds, role_list, max_count)
                                          : NULL;
    if (!prompts || (st = results_caption(pl, gv, n_vars, metric, direction, file_method(f, pl), prompts, &fig.caption)))
        return st ? st : PS_ERR_NOMEM;
    out->fig = fig;
    out->panels = panels.items;
    out->n_panels = panels.n;
    out->zmax = a->has_zmax ? a->zmax : plot_heatmap_zmax(panels.items, panels.n);
    return PS_OK;
}

/* ---- lens files ---------------------------------------------------------------------- */

static ps_status plot_lens(const ncin_file *f, agg_pool *pl, const plotfig_opts *a, const plotfig_provenance *prov,
                           plotfig *out)
{
    if (a->sel.by_length || a->sel.has_length)
        return err_set(PS_ERR_INVALID, "%s: a lens file has no positions to group: --by-length and --length "
                                       "apply to patching results",
                       f->path);
    size_t n_prompt, n_layer;
    ps_status st;
    if ((st = agg_dim_len(f, SCHEMA_DIM_PROMPT, &n_prompt)) || (st = agg_dim_len(f, SCHEMA_DIM_LAYER, &n_layer)))
        return st;
    if (n_prompt == 0 || n_layer == 0)
        return err_set(PS_ERR_FORMAT, "%s: the %s dimension is empty", f->path, n_prompt ? SCHEMA_DIM_LAYER : SCHEMA_DIM_PROMPT);
    static const char *const dims[] = {SCHEMA_DIM_PROMPT, SCHEMA_DIM_LAYER};
    /* the variables: --var, or prob and reciprocal_rank */
    char **names;
    size_t n_names;
    if ((st = ncin_var_names(f, &names, &n_names)))
        return st;
    const char **vars = agg_calloc(pl, n_names + 1, sizeof *vars);
    size_t n_vars = 0;
    if (!vars) {
        ncin_names_free(names, n_names);
        return PS_ERR_NOMEM;
    }
    for (size_t i = 0; i < n_names && st == PS_OK; i++) {
        ncin_var v;
        bool wanted = a->vars && !strcmp(a->vars, "all")
                          ? ncin_inq_var(f, names[i], &v) == PS_OK && ncin_dims_are(&v, dims, 2) && ncin_is_numeric(&v)
                          : !a->vars && (!strcmp(names[i], SCHEMA_VAR_PROB) || !strcmp(names[i], SCHEMA_VAR_RECIPROCAL_RANK));
        if (wanted && !(vars[n_vars++] = agg_printf(pl, "%s", names[i])))
            st = PS_ERR_NOMEM;
    }
    ncin_names_free(names, n_names);
    if (st)
        return st;
    err_clear();
    if (a->vars && strcmp(a->vars, "all")) {
        char *list = agg_printf(pl, "%s", a->vars);
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
    if ((st = agg_select_prompts(f, pl, &a->sel, n_prompt, true, &sel, &n_sel)))
        return st;
    char **answer;
    if ((st = agg_read_prompt_strings(f, pl, SCHEMA_VAR_ANSWER, n_prompt, &answer)))
        return st;
    /* x labels: layer_label(layer) ("embed", "0", ...) or the indices */
    const char **x_labels = NULL;
    if (ncin_has_var(f, SCHEMA_VAR_LAYER_LABEL)) {
        ncin_var lv;
        static const char *const ldims[] = {SCHEMA_DIM_LAYER};
        char **s = agg_calloc(pl, n_layer, sizeof *s);
        if (!s)
            return PS_ERR_NOMEM;
        if ((st = ncin_inq_var(f, SCHEMA_VAR_LAYER_LABEL, &lv)) || (st = ncin_expect_dims(f, &lv, ldims, 1)) ||
            (st = ncin_read_strings(f, &lv, 0, n_layer, s)))
            return st;
        for (size_t i = 0; i < n_layer; i++)
            if (!agg_keep(pl, s[i])) {
                for (size_t j = i + 1; j < n_layer; j++)
                    free(s[j]);
                return PS_ERR_NOMEM;
            }
        x_labels = (const char **)s;
    } else if (!(x_labels = index_labels(pl, n_layer))) {
        return PS_ERR_NOMEM;
    }
    const char *who = agg_format_ranges(pl, sel, n_sel, 80);
    if (!who)
        return PS_ERR_NOMEM;
    if (a->sel.mean)
        agg_note(&a->sel, "mean of %zu prompt%s: %s", n_sel, n_sel == 1 ? "" : "s",
                agg_format_ranges(pl, sel, n_sel, 0));

    plot_lines *panels = agg_calloc(pl, n_vars, sizeof *panels);
    if (!panels)
        return PS_ERR_NOMEM;
    for (size_t i = 0; i < n_vars; i++) {
        ncin_var v;
        size_t stride = 0;
        if ((st = ncin_inq_var(f, vars[i], &v)) || (st = ncin_expect_dims(f, &v, dims, 2)) ||
            (st = ncin_stride(f, &v, &stride)))
            return st;
        double *all = agg_calloc(pl, n_prompt, stride * sizeof *all);
        if (!all)
            return PS_ERR_NOMEM;
        if ((st = ncin_read_double(f, &v, 0, n_prompt, all)))
            return st;
        plot_lines *p = &panels[i];
        bool is_prob = !strcmp(vars[i], SCHEMA_VAR_PROB), is_rr = !strcmp(vars[i], SCHEMA_VAR_RECIPROCAL_RANK);
        char *ln = NULL;
        if ((st = ncin_get_text_att(f, vars[i], SCHEMA_ATT_LONG_NAME, &ln)) || (ln && !agg_keep(pl, ln)))
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
        plot_series *series = agg_calloc(pl, a->sel.mean ? 1 : n_sel, sizeof *series);
        if (!series)
            return PS_ERR_NOMEM;
        p->series = series;
        if (a->sel.mean) {
            double *y = agg_calloc(pl, n_layer, sizeof *y), *lo = agg_calloc(pl, n_layer, sizeof *lo),
                   *hi = agg_calloc(pl, n_layer, sizeof *hi);
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
            series[0].label = agg_printf(pl, "mean of %zu prompt%s (band: min-max)", n_sel, n_sel == 1 ? "" : "s");
            if (!series[0].label)
                return PS_ERR_NOMEM;
            p->n_series = 1;
            p->subtitle = agg_printf(pl, "prompts %s", who);
        } else {
            for (size_t k = 0; k < n_sel; k++) {
                series[k].y = all + sel[k] * n_layer;
                series[k].label = answer ? agg_printf(pl, "prompt %zu: '%s'", sel[k], answer[sel[k]])
                                         : agg_printf(pl, "prompt %zu", sel[k]);
                if (!series[k].label)
                    return PS_ERR_NOMEM;
            }
            p->n_series = n_sel;
        }
    }
    plot_figure fig = {.meta = prov->pairs, .n_meta = prov->n};
    fig.title = a->title ? a->title : agg_printf(pl, "Logit lens: %s", base_name(a->input));
    fig.subtitle = a->sel.mean ? agg_printf(pl, "mean over %zu of %zu prompts", n_sel, n_prompt)
                           : agg_printf(pl, "%zu of %zu prompt%s", n_sel, n_prompt, n_prompt == 1 ? "" : "s");
    if (!fig.title || !fig.subtitle)
        return PS_ERR_NOMEM;
    fig.caption = agg_printf(pl,
                             "Logit lens: the residual stream after each layer decoded with the final LayerNorm and "
                             "the unembedding, and the answer's probability and reciprocal rank (1 = the top token) "
                             "in that early decoding. Prompts: %s (%s). What to look for: the first layer at which "
                             "the answer becomes the top token (reciprocal rank 1), and whether its probability "
                             "rises steadily or jumps at one layer (that layer writes it).",
                             a->sel.mean ? agg_printf(pl, "the mean over %zu of %zu prompts, with the min-max band",
                                                      n_sel, n_prompt)
                                         : agg_printf(pl, "%zu of %zu, one line each", n_sel, n_prompt),
                             who);
    if (!fig.caption)
        return PS_ERR_NOMEM;
    out->fig = fig;
    out->lines = panels;
    out->n_panels = n_vars;
    return PS_OK;
}


/* ---- attribution patching: exact | estimate | error, and the scatter -------------------- */

/* The component C of --var (C, C_normalized, C_atp, C_atp_normalized or
 * C_atp_error), or by default resid_pre, else the first with an estimate. */
static ps_status atp_component(const ncin_file *f, agg_pool *pl, const char *spec, const char **out)
{
    *out = NULL;
    if (spec) {
        if (strchr(spec, ',') || !strcmp(spec, "all"))
            return err_set(PS_ERR_INVALID, "%s: --atp and --scatter draw one component: --var C (e.g. resid_pre), "
                                           "not '%s'",
                           f->path, spec);
        static const char *const suffixes[] = {SCHEMA_ATP_NORMALIZED_SUFFIX, SCHEMA_ATP_ERROR_SUFFIX,
                                               SCHEMA_ATP_SUFFIX, SCHEMA_NORMALIZED_SUFFIX};
        size_t n = strlen(spec);
        for (size_t i = 0; i < sizeof suffixes / sizeof *suffixes; i++)
            if (ends_with(spec, suffixes[i])) {
                n -= strlen(suffixes[i]);
                break;
            }
        const char *c = agg_printf(pl, "%.*s", (int)n, spec);
        const char *est = c ? agg_printf(pl, "%s" SCHEMA_ATP_NORMALIZED_SUFFIX, c) : NULL;
        if (!est)
            return PS_ERR_NOMEM;
        if (!ncin_has_var(f, est))
            return err_set(PS_ERR_INVALID, "%s: no attribution patching estimate of '%s' (no variable %s; write one "
                                           "with patch --method atp+exact -o, or a sweep with method = atp)",
                           f->path, c, est);
        *out = c;
        return PS_OK;
    }
    if (ncin_has_var(f, "resid_pre" SCHEMA_ATP_NORMALIZED_SUFFIX)) {
        *out = "resid_pre";
        return PS_OK;
    }
    char **names;
    size_t n_names;
    ps_status st = ncin_var_names(f, &names, &n_names);
    if (st)
        return st;
    for (size_t i = 0; i < n_names && !*out; i++)
        if (ends_with(names[i], SCHEMA_ATP_NORMALIZED_SUFFIX))
            *out = agg_printf(pl, "%.*s", (int)(strlen(names[i]) - strlen(SCHEMA_ATP_NORMALIZED_SUFFIX)), names[i]);
    ncin_names_free(names, n_names);
    if (!*out)
        return err_set(PS_ERR_INVALID, "%s: no attribution patching estimate (no *%s variable; write one with patch "
                                       "--method atp+exact -o, or a sweep with method = atp)",
                       f->path, SCHEMA_ATP_NORMALIZED_SUFFIX);
    return PS_OK;
}

/* The estimate against the exact values over n cells (rankstat.h, as engine/atp.c's
 * atp_compare, here on the normalized values shown): Spearman's rank
 * correlation (Pearson of the ranks, ties at their mean rank; NaN when one
 * side is constant) and the cells of the exact top k by |exact - base| that
 * are not in the estimate's top k by |estimate - base| (ties by index);
 * base = the normalized value of no effect (0 denoising, 1 noising).  The
 * cells must be finite.  missed[] has room for k. */
static ps_status atp_stats_of(const double *exact, const double *est, size_t n, double base, size_t k, double *rho,
                              size_t *missed, size_t *n_missed)
{
    ps_status st = rankstat_spearman(exact, est, n, rho);
    return st ? st : rankstat_missed_top_k(exact, est, n, base, k, missed, n_missed);
}

#define PLOTFIG_ATP_TOP_K 10
#define PLOTFIG_SCATTER_LABELS 5

/* A cell's name: "L1: Mary_4" (layer x position; the token label keeps its
 * leading space), "L1.H3" (layer x head), "L1.H3: Mary_4" (one head's layer
 * x position panel). */
static const char *atp_cell_label(agg_pool *pl, const plot_heatmap *p, grid_kind kind, size_t head, size_t cell)
{
    size_t l = cell / p->n_cols, t = cell % p->n_cols;
    return kind == GRID_HEAD       ? agg_printf(pl, "L%s.H%s", p->row_labels[l], p->col_labels[t])
           : kind == GRID_POS_HEAD ? agg_printf(pl, "L%s.H%zu:%s", p->row_labels[l], head, p->col_labels[t])
                                   : agg_printf(pl, "L%s:%s", p->row_labels[l], p->col_labels[t]);
}

/* What the scatter figure shows (atp_scatter_figure). */
typedef struct {
    const char *comp, *exact_n, *est_n, *method, *metric, *direction, *prompts;
    const double *x, *y;       /* [n] exact, estimate (normalized) */
    const char **labels;       /* [n] */
    size_t n;
    const char *rho_text, *stats_from, *missed_names;
    size_t top_k, n_missed;
} atp_scatter_in;

/* The scatter of the estimate against the exact values, with its caption. */
static ps_status atp_scatter_figure(agg_pool *pl, const plotfig_opts *a, const plotfig_provenance *prov,
                                    const atp_scatter_in *in, plotfig *out)
{
    const char *mlabel = atp_method_label(in->method), *m = in->metric ? in->metric : "metric";
    const char *dir_part = in->direction ? agg_printf(pl, ", %s", in->direction) : "";
    plot_scatter *sc = agg_calloc(pl, 1, sizeof *sc);
    if (!sc || !dir_part)
        return PS_ERR_NOMEM;
    plot_figure fig = {.meta = prov->pairs, .n_meta = prov->n};
    sc->title = agg_printf(pl, "%s: %s estimate against exact patching, rank correlation %s", in->comp, mlabel,
                           in->rho_text);
    sc->subtitle = agg_printf(pl, "one point per cell (%zu); dashed: y = x; labelled: the %d largest |estimate - "
                                  "exact|",
                              in->n, PLOTFIG_SCATTER_LABELS);
    sc->x_name = agg_printf(pl, "exact (%s)", in->exact_n);
    sc->y_name = agg_printf(pl, "estimate (%s)", in->est_n);
    sc->n = in->n;
    sc->x = in->x;
    sc->y = in->y;
    sc->labels = in->labels;
    sc->n_labelled = PLOTFIG_SCATTER_LABELS;
    fig.title = a->title ? a->title
                         : agg_printf(pl, "%s vs exact patching (%s%s): %s, %s", mlabel, m, dir_part, in->comp,
                                      base_name(a->input));
    fig.subtitle = in->prompts;
    fig.caption = agg_printf(
        pl,
        "Attribution patching (%s, method %s) of %s against exact activation patching. Metric: %s. "
        "Direction: %s. Prompts: %s. Each point is one cell of the %s grid: x its exact normalized "
        "effect (%s), y the estimate (%s, each cell's effect linearized from one forward and one backward "
        "pass). On the dashed line y = x the estimate is exact. Rank correlation (Spearman, %s): %s. Of the "
        "exact top %zu cells by |effect|, %zu %s missed by the estimate's top %zu%s%s. The %d points farthest "
        "from the line are labelled (L = layer, H = head, then the position's token label%s). What to look for: "
        "whether the points follow the line (a good screen) and which cells fall far from it: AtP is "
        "least reliable where attention saturates (query and key cells, which AtP*'s QK fix recomputes) and "
        "where paths cancel.",
        mlabel, in->method ? in->method : "not recorded", in->comp, metric_meaning(in->metric),
        in->direction ? in->direction : "not recorded", in->prompts, in->comp, in->exact_n, in->est_n,
        in->stats_from, in->rho_text, in->top_k, in->n_missed, in->n_missed == 1 ? "is" : "are", in->top_k,
        in->n_missed ? ": " : "", in->missed_names, PLOTFIG_SCATTER_LABELS,
        strstr(in->comp, "dest_src") ? "s, destination -> source" : "");
    if (!sc->title || !sc->subtitle || !sc->x_name || !sc->y_name || !fig.title || !fig.caption)
        return PS_ERR_NOMEM;
    out->fig = fig;
    out->scatter = sc;
    out->n_panels = 1;
    return PS_OK;
}

/* The estimate against exact of one prompt's (layer, position,
 * src_position, head) grid (pattern_dest_src), a point per cell of the
 * prompt's length: a grid the heatmaps do not draw. */
static ps_status atp_scatter_dest_src(const ncin_file *f, agg_pool *pl, const plotfig_opts *a,
                                      const plotfig_provenance *prov, const char *comp, const char *exact_n,
                                      const char *est_n, plotfig *out)
{
    if (a->sel.mean)
        return err_set(PS_ERR_INVALID, "%s: %s is a (layer, position, src_position, head) grid: its scatter is of "
                                       "one prompt (--prompt N), not a mean",
                       f->path, comp);
    static const char *const dims[] = {SCHEMA_DIM_PROMPT, SCHEMA_DIM_LAYER, SCHEMA_DIM_POSITION,
                                       SCHEMA_DIM_SRC_POSITION, SCHEMA_DIM_HEAD};
    ncin_var ve, va, tv;
    size_t n_prompt, L, P, S, H, stride;
    ps_status st;
    if ((st = ncin_inq_var(f, exact_n, &ve)) || (st = ncin_expect_dims(f, &ve, dims, 5)) ||
        (st = ncin_inq_var(f, est_n, &va)) || (st = ncin_expect_dims(f, &va, dims, 5)) ||
        (st = agg_dim_len(f, SCHEMA_DIM_PROMPT, &n_prompt)) || (st = agg_dim_len(f, SCHEMA_DIM_LAYER, &L)) ||
        (st = agg_dim_len(f, SCHEMA_DIM_POSITION, &P)) || (st = agg_dim_len(f, SCHEMA_DIM_SRC_POSITION, &S)) ||
        (st = agg_dim_len(f, SCHEMA_DIM_HEAD, &H)) || (st = ncin_stride(f, &ve, &stride)))
        return st;
    if (stride != L * P * S * H)
        return err_set(PS_ERR_FORMAT, "%s: variable '%s' does not have the file's dimension sizes", f->path, exact_n);
    size_t *sel, n_sel;
    double *length;
    if ((st = agg_select_prompts(f, pl, &a->sel, n_prompt, false, &sel, &n_sel)) ||
        (st = agg_read_prompt_doubles(f, pl, SCHEMA_VAR_LENGTH, n_prompt, &length)))
        return st;
    if (n_sel == 0)
        return err_set(PS_ERR_INVALID, "%s: no prompt to plot", f->path);
    const size_t pr = sel[0];
    size_t T = length && length[pr] >= 1 && length[pr] <= (double)P ? (size_t)length[pr] : P;
    T = T < S ? T : S;
    float *fe = agg_calloc(pl, stride, sizeof *fe), *fa = agg_calloc(pl, stride, sizeof *fa);
    char **tok = agg_calloc(pl, P, sizeof *tok);
    if (!fe || !fa || !tok)
        return PS_ERR_NOMEM;
    const char *tname = a->tokens && !strcmp(a->tokens, "corrupted") ? SCHEMA_VAR_CORRUPTED_TOKEN : SCHEMA_VAR_CLEAN_TOKEN;
    static const char *const tdims[] = {SCHEMA_DIM_PROMPT, SCHEMA_DIM_POSITION};
    if ((st = ncin_read_float(f, &ve, pr, 1, fe)) || (st = ncin_read_float(f, &va, pr, 1, fa)) ||
        (st = ncin_inq_var(f, tname, &tv)) || (st = ncin_expect_dims(f, &tv, tdims, 2)) ||
        (st = ncin_read_strings(f, &tv, pr, 1, tok)))
        return st;
    const char **tl = agg_calloc(pl, P, sizeof *tl);
    for (size_t t = 0; tl && t < P; t++) {
        tl[t] = agg_keep(pl, plot_token_label(tok[t], t));
        free(tok[t]);
        if (!tl[t])
            tl = NULL;
    }
    const size_t cells = L * T * T * H;
    double *xs = agg_calloc(pl, cells ? cells : 1, sizeof *xs), *ys = agg_calloc(pl, cells ? cells : 1, sizeof *ys);
    const char **labels = agg_calloc(pl, cells ? cells : 1, sizeof *labels);
    if (!tl || !xs || !ys || !labels)
        return PS_ERR_NOMEM;
    size_t n = 0;
    for (size_t l = 0; l < L; l++)
        for (size_t d = 0; d < T; d++)
            for (size_t sp = 0; sp < T; sp++)
                for (size_t h = 0; h < H; h++) {
                    size_t i = ((l * P + d) * S + sp) * H + h;
                    if (!isfinite(fe[i]) || !isfinite(fa[i]))
                        continue; /* a source after the destination: no cell */
                    xs[n] = fe[i];
                    ys[n] = fa[i];
                    if (!(labels[n++] = agg_printf(pl, "L%zu.H%zu:%s ->%s", l, h, tl[d], tl[sp])))
                        return PS_ERR_NOMEM;
                }
    char *direction = NULL, *metric = NULL;
    if ((st = ncin_get_text_att(f, NULL, SCHEMA_ATT_METRIC, &metric)) || (metric && !agg_keep(pl, metric)) ||
        (st = ncin_get_text_att(f, NULL, SCHEMA_ATT_DIRECTION, &direction)) || (direction && !agg_keep(pl, direction)))
        return st ? st : PS_ERR_NOMEM;
    double rho;
    size_t idx[PLOTFIG_ATP_TOP_K], n_missed;
    if ((st = atp_stats_of(xs, ys, n, direction && !strcmp(direction, "noise") ? 1.0 : 0.0, PLOTFIG_ATP_TOP_K, &rho,
                           idx, &n_missed)))
        return st;
    const char *missed_names = agg_printf(pl, "%s", "");
    for (size_t k = 0; k < n_missed && missed_names; k++)
        missed_names = agg_printf(pl, "%s%s%s", missed_names, k ? ", " : "", labels[idx[k]]);
    const atp_scatter_in in = {
        .comp = comp, .exact_n = exact_n, .est_n = est_n, .method = file_method(f, pl), .metric = metric,
        .direction = direction, .prompts = agg_printf(pl, "prompt %zu of %zu (%zu tokens)", pr, n_prompt, T),
        .x = xs, .y = ys, .labels = labels, .n = n,
        .rho_text = isnan(rho) ? "undefined (one side is constant)" : agg_printf(pl, "%.3f", rho),
        .stats_from = "of the cells shown", .top_k = PLOTFIG_ATP_TOP_K < n ? PLOTFIG_ATP_TOP_K : n,
        .n_missed = n_missed, .missed_names = missed_names};
    if (!in.prompts || !in.rho_text || !missed_names)
        return PS_ERR_NOMEM;
    return atp_scatter_figure(pl, a, prov, &in, out);
}

static ps_status plot_atp(const ncin_file *f, agg_pool *pl, const plotfig_opts *a, const plotfig_provenance *prov,
                          plotfig *out)
{
    const bool scatter = a->kind == PLOTFIG_SCATTER, by_role = a->sel.by_role;
    const char *comp;
    ps_status st = atp_component(f, pl, a->vars, &comp);
    if (st)
        return st;
    const char *exact_n = agg_printf(pl, "%s" SCHEMA_NORMALIZED_SUFFIX, comp);
    const char *est_n = agg_printf(pl, "%s" SCHEMA_ATP_NORMALIZED_SUFFIX, comp);
    const char *err_v = agg_printf(pl, "%s" SCHEMA_ATP_ERROR_SUFFIX, comp);
    if (!exact_n || !est_n || !err_v)
        return PS_ERR_NOMEM;
    const bool has_exact = ncin_has_var(f, exact_n);
    /* the error panel: the file's C_atp_error (raw metric units), or with
     * --by-role or a file without it, the difference of the normalized
     * grids shown, computed here */
    const bool has_err = has_exact, file_err = has_exact && !by_role && ncin_has_var(f, err_v);
    if (scatter && !has_exact)
        return err_set(PS_ERR_INVALID, "%s: no exact values of %s (no %s): the scatter of estimate against exact "
                                       "needs a file with both (patch --method atp+exact)",
                       f->path, comp, exact_n);
    grid_var g;
    ncin_var ev;
    static const char *const dest_src[] = {SCHEMA_DIM_PROMPT, SCHEMA_DIM_LAYER, SCHEMA_DIM_POSITION,
                                           SCHEMA_DIM_SRC_POSITION, SCHEMA_DIM_HEAD};
    if (scatter && !by_role && ncin_inq_var(f, est_n, &ev) == PS_OK && ncin_dims_are(&ev, dest_src, 5))
        return atp_scatter_dest_src(f, pl, a, prov, comp, exact_n, est_n, out);
    err_clear();
    if ((st = describe_grid(f, pl, est_n, &g)))
        return st;
    const char *method = file_method(f, pl), *mlabel = atp_method_label(method);
    char *metric = NULL, *direction = NULL;
    if ((st = ncin_get_text_att(f, NULL, SCHEMA_ATT_METRIC, &metric)) || (metric && !agg_keep(pl, metric)) ||
        (st = ncin_get_text_att(f, NULL, SCHEMA_ATT_DIRECTION, &direction)) || (direction && !agg_keep(pl, direction)))
        return st ? st : PS_ERR_NOMEM;
    const bool noise = direction && !strcmp(direction, "noise");
    size_t n_prompt;
    if ((st = agg_dim_len(f, SCHEMA_DIM_PROMPT, &n_prompt)))
        return st;

    /* the grids through the heatmap figure's reading (one prompt or means,
     * by length): panels [variable][group][head] */
    const size_t n_vars = has_err ? 3 : has_exact ? 2 : 1;
    plotfig_opts b = *a;
    b.kind = PLOTFIG_GRIDS;
    b.title = NULL;
    b.has_zmax = false;
    b.vars = file_err    ? agg_printf(pl, "%s,%s,%s", exact_n, est_n, err_v)
             : has_exact          ? agg_printf(pl, "%s,%s", exact_n, est_n)
                                  : est_n;
    if (!b.vars)
        return PS_ERR_NOMEM;
    plotfig grids = {0}; /* its strings and arrays live in pl */
    if ((st = by_role ? plot_by_role(f, pl, &b, prov, &grids) : plot_results(f, pl, &b, prov, &grids)))
        return st;
    /* plot_by_role: per variable its mean and spread panels; the means are drawn */
    const size_t n_read = file_err ? 3 : has_exact ? 2 : 1; /* variables read */
    const size_t n_rows = by_role ? 1 : grids.n_panels / n_read, n_all = n_rows * n_vars;
    plot_heatmap *panels = agg_calloc(pl, n_all, sizeof *panels);
    double *zmax = agg_calloc(pl, n_all, sizeof *zmax);
    if (!panels || !zmax)
        return PS_ERR_NOMEM;
    if (by_role) {
        if (grids.n_panels != 2 * (has_exact ? 2 : 1))
            return err_set(PS_ERR_INVALID, "%s: %s is not a (layer, position) grid: no role-aligned means", f->path,
                           comp);
        panels[0] = grids.panels[0];
        if (has_exact)
            panels[1] = grids.panels[2];
    } else {
        for (size_t r = 0; r < n_rows; r++)
            for (size_t v = 0; v < n_read; v++)
                panels[r * n_vars + v] = grids.panels[v * n_rows + r];
    }
    for (size_t r = 0; has_exact && !file_err && r < n_rows; r++) {
        plot_heatmap *e = &panels[r * n_vars], *d = e + 2;
        *d = e[1];
        const size_t n = e->n_rows * e->n_cols;
        float *diff = agg_calloc(pl, n ? n : 1, sizeof *diff);
        if (!diff)
            return PS_ERR_NOMEM;
        for (size_t i = 0; i < n; i++)
            diff[i] = e[1].values[i] - e[0].values[i];
        d->values = diff;
        d->n_used = NULL;
        d->lo = d->hi = NULL;
        if (!(d->hover_name = agg_printf(pl, "%s - %s", est_n, exact_n)))
            return PS_ERR_NOMEM;
    }
    size_t n_head = 0;
    if (g.kind == GRID_POS_HEAD && (st = agg_dim_len(f, SCHEMA_DIM_HEAD, &n_head)))
        return st;

    /* the cells shown, exact and estimate side by side, rows concatenated */
    size_t total = 0;
    for (size_t r = 0; r < n_rows; r++)
        total += panels[r * n_vars].n_rows * panels[r * n_vars].n_cols;
    double rho = NAN;
    size_t missed[PLOTFIG_ATP_TOP_K], n_missed = 0, top_k = PLOTFIG_ATP_TOP_K, n_pairs = 0;
    const char *stats_from = NULL;
    bool *marked = NULL;
    double *xs = NULL, *ys = NULL;
    size_t *where = NULL; /* [n_pairs]: the concatenated cell of pair i */
    if (has_exact) {
        xs = agg_calloc(pl, total ? total : 1, sizeof *xs);
        ys = agg_calloc(pl, total ? total : 1, sizeof *ys);
        where = agg_calloc(pl, total ? total : 1, sizeof *where);
        marked = agg_calloc(pl, total ? total : 1, sizeof *marked);
        if (!xs || !ys || !where || !marked)
            return PS_ERR_NOMEM;
        for (size_t r = 0, off = 0; r < n_rows; r++) {
            const plot_heatmap *pe = &panels[r * n_vars], *pa = &panels[r * n_vars + 1];
            for (size_t i = 0; i < pe->n_rows * pe->n_cols; i++)
                if (isfinite(pe->values[i]) && isfinite(pa->values[i])) {
                    xs[n_pairs] = pe->values[i];
                    ys[n_pairs] = pa->values[i];
                    where[n_pairs++] = off + i;
                }
            off += pe->n_rows * pe->n_cols;
        }
        size_t idx[PLOTFIG_ATP_TOP_K];
        if ((st = atp_stats_of(xs, ys, n_pairs, noise ? 1.0 : 0.0, top_k, &rho, idx, &n_missed)))
            return st;
        for (size_t k = 0; k < n_missed; k++)
            missed[k] = where[idx[k]];
        top_k = top_k < n_pairs ? top_k : n_pairs;
        stats_from = by_role ? "of the role means shown" : a->sel.mean ? "of the mean cells shown" : "of the cells shown";
        /* one prompt of a one-prompt file (patch -o): the file's own statistics,
         * computed by the engine in double precision (schema.h) */
        double att[64], rc_att, k_att;
        size_t n_att, n1;
        bool has_rc = false, has_k = false, has_m = false;
        if (file_err && !a->sel.mean && n_prompt == 1 &&
            (st = ncin_get_num_att(f, err_v, SCHEMA_ATT_ATP_RANK_CORRELATION, &rc_att, 1, &n1, &has_rc)) == PS_OK &&
            (st = ncin_get_num_att(f, err_v, SCHEMA_ATT_ATP_TOP_K, &k_att, 1, &n1, &has_k)) == PS_OK &&
            (st = ncin_get_num_att(f, err_v, SCHEMA_ATT_ATP_MISSED_TOP_K, att, 64, &n_att, &has_m)) == PS_OK &&
            has_rc && has_k && has_m && n_att <= PLOTFIG_ATP_TOP_K) {
            /* the engine's flat index in patch_grid_shape order (patchspec.h):
             * (layer, position) or (layer, head) is the panel's own cell;
             * (layer, position, head) is head h's panel, cell (layer, position) */
            bool ok = true;
            for (size_t k = 0; k < n_att && ok; k++) {
                ok = att[k] >= 0 && att[k] < (double)total && att[k] == floor(att[k]);
                if (!ok)
                    break;
                size_t flat = (size_t)att[k];
                if (g.kind == GRID_POS_HEAD) {
                    size_t h = flat % n_head, cell = flat / n_head;
                    size_t per = panels[0].n_rows * panels[0].n_cols;
                    missed[k] = h * per + cell;
                } else {
                    missed[k] = flat;
                }
            }
            if (!ok)
                return err_set(PS_ERR_FORMAT, "%s: %s's attribute %s names a cell outside the grid", f->path, err_v,
                               SCHEMA_ATT_ATP_MISSED_TOP_K);
            rho = rc_att;
            n_missed = n_att;
            top_k = k_att >= 0 && k_att <= 1e6 ? (size_t)k_att : top_k;
            stats_from = "recorded in the file by the engine";
        }
        if (st)
            return st;
        for (size_t k = 0; k < n_missed; k++)
            marked[missed[k]] = true;
    }
    /* the missed cells' names, for the caption */
    const char *missed_names = agg_printf(pl, "%s", "");
    for (size_t k = 0, off; k < n_missed && missed_names; k++) {
        size_t r = 0;
        for (off = 0; r < n_rows; r++) {
            size_t c = panels[r * n_vars].n_rows * panels[r * n_vars].n_cols;
            if (missed[k] < off + c)
                break;
            off += c;
        }
        const char *lab = atp_cell_label(pl, &panels[r * n_vars], g.kind, n_head ? r % n_head : 0, missed[k] - off);
        missed_names = lab ? agg_printf(pl, "%s%s%s", missed_names, k ? ", " : "", lab) : NULL;
    }
    if (!missed_names)
        return PS_ERR_NOMEM;

    const char *m = metric ? metric : "metric";
    const char *dir_part = direction ? agg_printf(pl, ", %s", direction) : "";
    const char *rho_text = isnan(rho) ? agg_printf(pl, "%s", "undefined (one side is constant)")
                                      : agg_printf(pl, "%.3f", rho);
    if (!dir_part || !rho_text)
        return PS_ERR_NOMEM;
    const char *prompts = grids.fig.subtitle;
    plot_figure fig = {.meta = prov->pairs, .n_meta = prov->n};

    if (scatter) {
        const char **labels = agg_calloc(pl, n_pairs ? n_pairs : 1, sizeof *labels);
        if (!labels)
            return PS_ERR_NOMEM;
        for (size_t i = 0; i < n_pairs; i++) {
            size_t r = 0, off = 0;
            for (; r < n_rows; r++) {
                size_t c = panels[r * n_vars].n_rows * panels[r * n_vars].n_cols;
                if (where[i] < off + c)
                    break;
                off += c;
            }
            if (!(labels[i] = atp_cell_label(pl, &panels[r * n_vars], g.kind, n_head ? r % n_head : 0, where[i] - off)))
                return PS_ERR_NOMEM;
        }
        const atp_scatter_in in = {.comp = comp, .exact_n = exact_n, .est_n = est_n, .method = method,
                                   .metric = metric, .direction = direction, .prompts = prompts, .x = xs, .y = ys,
                                   .labels = labels, .n = n_pairs, .rho_text = rho_text, .stats_from = stats_from,
                                   .top_k = top_k, .n_missed = n_missed, .missed_names = missed_names};
        return atp_scatter_figure(pl, a, prov, &in, out);
    }

    /* heatmaps: exact | estimate on one scale, the error on its own */
    double z_shared = 0, z_err = 0;
    for (size_t r = 0; r < n_rows; r++) {
        double z = plot_heatmap_zmax(&panels[r * n_vars], n_vars >= 2 ? 2 : 1);
        z_shared = z > z_shared ? z : z_shared;
        if (has_err) {
            double e = plot_heatmap_zmax(&panels[r * n_vars + 2], 1);
            z_err = e > z_err ? e : z_err;
        }
    }
    if (a->has_zmax)
        z_shared = a->zmax;
    for (size_t r = 0, off = 0; r < n_rows; r++) {
        const char *head = g.kind == GRID_POS_HEAD ? agg_printf(pl, ", head %zu", r % n_head) : "";
        if (!head)
            return PS_ERR_NOMEM;
        for (size_t v = 0; v < n_vars; v++) {
            plot_heatmap *p = &panels[r * n_vars + v];
            const char *sub = p->subtitle;
            p->plot_w = 360;
            p->plot_h = 240;
            zmax[r * n_vars + v] = v == 2 ? z_err : z_shared;
            if (!has_exact) {
                p->title = agg_printf(pl, "ESTIMATE (%s): %s%s", mlabel, est_n, head);
                p->subtitle = agg_printf(pl, "attribution patching estimate, not exact patching%s%s", sub ? "; " : "",
                                         sub ? sub : "");
            } else if (v == 0) {
                p->title = agg_printf(pl, "exact: %s%s", exact_n, head);
                p->no_colorbar = true;
                p->marked = marked + off;
                p->marked_name = agg_printf(pl, "missed: in the exact top %zu, not in the estimate's top %zu", top_k,
                                            top_k);
                p->subtitle = agg_printf(pl, "outlined: exact top-%zu cells the estimate misses%s%s", top_k,
                                         sub ? "; " : "", sub ? sub : "");
                if (!p->marked_name)
                    return PS_ERR_NOMEM;
            } else if (v == 1) {
                p->title = agg_printf(pl, "estimate (%s): %s%s", mlabel, est_n, head);
                p->subtitle = agg_printf(pl, "linearized, not patched; the exact panel's colour scale%s%s",
                                         sub ? "; " : "", sub ? sub : "");
                p->scale_name = "normalized (both panels)";
            } else if (!file_err) {
                p->title = agg_printf(pl, "error: %s - %s%s", est_n, exact_n, head);
                p->subtitle = agg_printf(pl, "estimate - exact of the %s shown, normalized (its own scale)",
                                         by_role ? "role means" : "values");
                p->scale_name = "estimate - exact (normalized)";
            } else {
                p->title = agg_printf(pl, "error: %s%s", err_v, head);
                p->subtitle = agg_printf(pl, "estimate - exact, raw %s (its own scale)%s%s", m, sub ? "; " : "",
                                         sub ? sub : "");
                p->scale_name = agg_printf(pl, "estimate - exact (%s)", m);
                if (!p->scale_name)
                    return PS_ERR_NOMEM;
            }
            if (!p->title || !p->subtitle)
                return PS_ERR_NOMEM;
        }
        off += panels[r * n_vars].n_rows * panels[r * n_vars].n_cols;
    }
    if (!has_exact) {
        fig.title = a->title ? a->title
                             : agg_printf(pl, "Attribution patching ESTIMATE (%s, %s%s): %s, %s", mlabel, m, dir_part,
                                          comp, base_name(a->input));
        fig.subtitle = prompts;
        fig.caption = agg_printf(
            pl,
            "Attribution patching estimate (%s, method %s) of %s: not exact activation patching. Each cell's "
            "effect is linearized from one forward and one backward pass (%s, normalized as exact patching "
            "would be); the file holds no exact values to compare it with (patch --method atp+exact, or a "
            "sweep with method = atp+exact, adds them). Metric: %s. Direction: %s. Prompts: %s. What to look "
            "for: the cells the estimate ranks highest are candidates for exact patching; the estimate is "
            "least reliable where attention saturates (query and key cells) and where paths cancel.",
            mlabel, method ? method : "not recorded", comp, est_n, metric_meaning(metric),
            direction ? direction : "not recorded", prompts);
    } else {
        fig.title = a->title ? a->title
                             : agg_printf(pl, "%s vs exact patching (%s%s): %s, %s", mlabel, m, dir_part, comp,
                                          base_name(a->input));
        fig.subtitle = agg_printf(pl, "%s; rank correlation %s; %zu of the exact top %zu missed", prompts, rho_text,
                                  n_missed, top_k);
        fig.caption = agg_printf(
            pl,
            "Attribution patching (%s, method %s) of %s beside exact activation patching. Metric: %s. "
            "Direction: %s. Prompts: %s. Left: the exact normalized effect of patching each cell (%s); "
            "middle: the estimate (%s, each cell's effect linearized from one forward and one backward pass), "
            "on the same colour scale; %s. Rank correlation (Spearman, estimate vs exact, %s): %s. Of the exact "
            "top %zu cells by |effect|, %zu %s missed by the estimate's top %zu%s%s%s. What to look for: cells "
            "lit in one panel and not the other, and the dark cells of the error panel; AtP is least reliable "
            "where attention saturates (query and key cells, which AtP*'s QK fix recomputes) and where paths "
            "cancel.",
            mlabel, method ? method : "not recorded", comp, metric_meaning(metric),
            direction ? direction : "not recorded", prompts, exact_n, est_n,
            file_err ? agg_printf(pl, "right: the error, estimate - exact (%s, raw %s), on its own scale", err_v, m)
                     : agg_printf(pl, "right: the difference of the %s shown, estimate - exact (normalized; the "
                                      "file has no %s), on its own scale",
                                  by_role ? "role means" : "values", by_role ? "role means of the error" : err_v),
            stats_from, rho_text, top_k, n_missed, n_missed == 1 ? "is" : "are", top_k,
            n_missed ? " (outlined on the exact panel): " : "", missed_names, n_missed ? "" : "");
    }
    if (!fig.title || !fig.subtitle || !fig.caption)
        return PS_ERR_NOMEM;
    out->fig = fig;
    out->panels = panels;
    out->n_panels = n_all;
    out->panel_cols = n_vars;
    out->panel_zmax = zmax;
    out->zmax = z_shared;
    return PS_OK;
}


/* ---- the figure ------------------------------------------------------------------------ */

ps_status plotfig_build(const plotfig_opts *o, plotfig *pf)
{
    memset(pf, 0, sizeof *pf);
    ncin_file f;
    ps_status st = ncin_open(&f, o->input);
    if (st)
        return st;
    agg_pool *pl = &pf->pool;
    char *analysis = NULL;
    st = read_provenance(&f, pl, o->input, &pf->prov);
    if (st == PS_OK)
        st = ncin_get_text_att(&f, NULL, SCHEMA_ATT_ANALYSIS, &analysis);
    if (st == PS_OK && analysis && !agg_keep(pl, analysis))
        st = PS_ERR_NOMEM;
    bool lens = analysis && !strcmp(analysis, SCHEMA_ANALYSIS_LENS);
    if (st == PS_OK && lens && o->kind != PLOTFIG_GRIDS)
        st = err_set(PS_ERR_INVALID, "%s: a lens file has no attribution patching estimates: --atp and --scatter "
                                     "apply to patching results",
                     o->input);
    if (st == PS_OK && lens && o->tokens)
        st = err_set(PS_ERR_INVALID, "%s: a lens file has no token labels: --tokens applies to patching results",
                     o->input);
    if (st == PS_OK)
        st = lens ? plot_lens(&f, pl, o, &pf->prov, pf)
             : o->kind != PLOTFIG_GRIDS ? plot_atp(&f, pl, o, &pf->prov, pf)
             : o->sel.by_role ? plot_by_role(&f, pl, o, &pf->prov, pf)
                              : plot_results(&f, pl, o, &pf->prov, pf);
    if (st == PS_ERR_NOMEM && !strstr(err_msg(), o->input))
        err_wrap(st, "%s", o->input);
    ncin_close(&f);
    return st;
}

ps_status plotfig_write(FILE *out, const char *path, const plotfig *pf)
{
    if (pf->lines)
        return plot_write_lines(out, path, &pf->fig, pf->lines, pf->n_panels);
    if (pf->scatter)
        return plot_write_scatter(out, path, &pf->fig, pf->scatter);
    if (pf->panel_zmax)
        return plot_write_heatmap_grid(out, path, &pf->fig, pf->panels, pf->n_panels, pf->panel_cols, pf->panel_zmax);
    return plot_write_heatmaps(out, path, &pf->fig, pf->panels, pf->n_panels, pf->zmax);
}

void plotfig_free(plotfig *pf)
{
    agg_pool_free(&pf->pool);
    memset(pf, 0, sizeof *pf);
}
