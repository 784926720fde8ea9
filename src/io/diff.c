/* diff: two results files compared variable by variable (diff.h). */
#include "diff.h"

#include <jansson.h>
#include <math.h>
#include <netcdf.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "plot.h"
#include "prov.h"
#include "schema.h"

/* ---- same grids? ------------------------------------------------------------ */

/* Length of dimension `name`, 0 when the file has none. */
static size_t dim_or_0(const ncin_file *f, const char *name)
{
    size_t n = 0;
    if (ncin_dim_len(f, name, &n) != PS_OK) {
        err_clear();
        return 0;
    }
    return n;
}

/* config.json fields that fix the shape of the grids and the model's
 * meaning (GPT-2's names and Hugging Face's). */
static const char *const config_keys[] = {"model_type",       "n_layer",          "num_hidden_layers", "n_head",
                                          "num_attention_heads", "num_key_value_heads", "n_embd", "hidden_size",
                                          "n_inner",          "intermediate_size", "vocab_size"};

static ps_status same_config(const ncin_file *fa, const ncin_file *fb)
{
    char *ta = NULL, *tb = NULL;
    ps_status st = ncin_get_text_att(fa, NULL, SCHEMA_ATT_MODEL_CONFIG, &ta);
    if (st == PS_OK)
        st = ncin_get_text_att(fb, NULL, SCHEMA_ATT_MODEL_CONFIG, &tb);
    json_t *ja = ta ? json_loads(ta, 0, NULL) : NULL, *jb = tb ? json_loads(tb, 0, NULL) : NULL;
    for (size_t k = 0; st == PS_OK && ja && jb && k < sizeof config_keys / sizeof *config_keys; k++) {
        json_t *a = json_object_get(ja, config_keys[k]), *b = json_object_get(jb, config_keys[k]);
        if (!a && !b)
            continue;
        if (!a || !b || !json_equal(a, b)) {
            char *sa = a ? json_dumps(a, JSON_ENCODE_ANY) : NULL, *sb = b ? json_dumps(b, JSON_ENCODE_ANY) : NULL;
            st = err_set(PS_ERR_INVALID, "%s and %s have different grids: model_config %s is %s vs %s", fa->path,
                         fb->path, config_keys[k], sa ? sa : "absent", sb ? sb : "absent");
            free(sa), free(sb);
        }
    }
    json_decref(ja), json_decref(jb);
    free(ta), free(tb);
    return st;
}

/* A compared variable: float or double, first dimension prompt. */
static bool compared(const ncin_var *v)
{
    return (v->type == NC_FLOAT || v->type == NC_DOUBLE) && v->ndim >= 1 && v->ndim <= 4 &&
           !strcmp(v->dim_names[0], SCHEMA_DIM_PROMPT);
}

/* The compared variables of f, in file order (names malloc'd: ncin_names_free). */
static ps_status compared_vars(const ncin_file *f, char ***out, size_t *n_out)
{
    char **names;
    size_t n;
    ps_status st = ncin_var_names(f, &names, &n);
    if (st)
        return st;
    size_t w = 0;
    for (size_t i = 0; i < n; i++) {
        ncin_var v;
        if (ncin_inq_var(f, names[i], &v) == PS_OK && compared(&v))
            names[w++] = names[i];
        else
            free(names[i]);
    }
    *out = names;
    *n_out = w;
    return PS_OK;
}

static ps_status same_var_dims(const ncin_file *fa, const ncin_file *fb, const ncin_var *a, const ncin_var *b)
{
    bool same = a->ndim == b->ndim;
    for (size_t k = 1; same && k < a->ndim; k++)
        same = !strcmp(a->dim_names[k], b->dim_names[k]) &&
               (a->shape[k] == b->shape[k] || !strcmp(a->dim_names[k], SCHEMA_DIM_POSITION));
    if (same)
        return PS_OK;
    char da[512], db[512];
    ncin_describe(a, da, sizeof da);
    ncin_describe(b, db, sizeof db);
    /* with their lengths */
    for (size_t k = 0; k < a->ndim; k++)
        snprintf(da + strlen(da), sizeof da - strlen(da), "%s%zu", k ? "x" : " ", a->shape[k]);
    for (size_t k = 0; k < b->ndim; k++)
        snprintf(db + strlen(db), sizeof db - strlen(db), "%s%zu", k ? "x" : " ", b->shape[k]);
    return err_set(PS_ERR_INVALID, "%s and %s have different grids: %s vs %s", fa->path, fb->path, da, db);
}

/* ---- shared prompts ---------------------------------------------------------- */

typedef struct {
    double index;
    size_t row;
} keyed_row;

static int by_index(const void *x, const void *y)
{
    const keyed_row *a = x, *b = y;
    return a->index < b->index ? -1 : a->index > b->index ? 1 : (a->row > b->row) - (a->row < b->row);
}

/* Per prompt row: its dataset index (schema_prompt_index_var: prompt in
 * schema 2, prompt_index in schema 1; the row itself without either)
 * and whether it is done (every row without done). */
static ps_status prompt_rows(const ncin_file *f, size_t n, double **index, unsigned char **done)
{
    *index = malloc((n ? n : 1) * sizeof **index);
    *done = malloc(n ? n : 1);
    double *tmp = malloc((n ? n : 1) * sizeof *tmp);
    ps_status st = *index && *done && tmp ? PS_OK : err_set(PS_ERR_NOMEM, "out of memory");
    for (size_t i = 0; st == PS_OK && i < n; i++)
        (*index)[i] = (double)i, (*done)[i] = 1;
    ncin_var v;
    const char *index_var = schema_prompt_index_var(f);
    if (st == PS_OK && n && index_var && (st = ncin_inq_var(f, index_var, &v)) == PS_OK && v.ndim == 1)
        st = ncin_read_double(f, &v, 0, n, *index);
    if (st == PS_OK && n && ncin_has_var(f, SCHEMA_VAR_DONE) && (st = ncin_inq_var(f, SCHEMA_VAR_DONE, &v)) == PS_OK &&
        v.ndim == 1 && (st = ncin_read_double(f, &v, 0, n, tmp)) == PS_OK)
        for (size_t i = 0; i < n; i++)
            (*done)[i] = tmp[i] == 1.0;
    free(tmp);
    return st;
}

/* pairs[k] = (row in A, row in B) of the k-th shared prompt, in A's order. */
static ps_status shared_prompts(const ncin_file *fa, const ncin_file *fb, size_t na, size_t nb, size_t **pairs,
                                size_t *n_pairs)
{
    double *ia = NULL, *ib = NULL;
    unsigned char *da = NULL, *db = NULL;
    keyed_row *kb = NULL;
    ps_status st = prompt_rows(fa, na, &ia, &da);
    if (st == PS_OK)
        st = prompt_rows(fb, nb, &ib, &db);
    size_t nk = 0, np = 0;
    if (st == PS_OK && (!(kb = malloc((nb ? nb : 1) * sizeof *kb)) || !(*pairs = malloc((na ? 2 * na : 1) * sizeof **pairs))))
        st = err_set(PS_ERR_NOMEM, "out of memory");
    if (st == PS_OK) {
        for (size_t j = 0; j < nb; j++)
            if (db[j] && !isnan(ib[j]))
                kb[nk++] = (keyed_row){ib[j], j};
        qsort(kb, nk, sizeof *kb, by_index);
        for (size_t i = 0; i < na; i++) {
            if (!da[i] || isnan(ia[i]))
                continue;
            keyed_row key = {ia[i], 0};
            size_t lo = 0, hi = nk; /* first with index >= ia[i] */
            while (lo < hi) {
                size_t mid = (lo + hi) / 2;
                if (kb[mid].index < key.index)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            if (lo < nk && kb[lo].index == key.index) {
                (*pairs)[2 * np] = i;
                (*pairs)[2 * np + 1] = kb[lo].row;
                np++;
            }
        }
        *n_pairs = np;
    }
    free(ia), free(ib), free(da), free(db), free(kb);
    return st;
}

/* ---- one variable -------------------------------------------------------------- */

static ps_status read_all(const ncin_file *f, const ncin_var *v, size_t rows, size_t *stride, double **out)
{
    ps_status st = ncin_stride(f, v, stride);
    if (st)
        return st;
    if (rows && *stride > NCIN_MAX_ELEMENTS / rows)
        return err_set(PS_ERR_RANGE, "%s: %s has more than %zu values", f->path, v->name, (size_t)NCIN_MAX_ELEMENTS);
    const size_t n = rows * *stride;
    *out = malloc((n ? n : 1) * sizeof **out);
    if (!*out)
        return err_set(PS_ERR_NOMEM, "%s: out of memory for %s", f->path, v->name);
    return rows ? ncin_read_double(f, v, 0, rows, *out) : PS_OK;
}

#define DIFF_GRID_DIMS 4

static ps_status compare_var(const ncin_file *fa, const ncin_file *fb, const ncin_var *a, const ncin_var *b,
                             const size_t *pairs, size_t n_pairs, diff_var *out)
{
    double *va = NULL, *vb = NULL, *sum = NULL;
    size_t *cnt = NULL, sa, sb;
    ps_status st = read_all(fa, a, a->shape[0], &sa, &va);
    if (st == PS_OK)
        st = read_all(fb, b, b->shape[0], &sb, &vb);
    /* the shared extent of the per-prompt grid (at most DIFF_GRID_DIMS axes
     * after the prompt: pattern_dest_src's layer, position, src_position,
     * head), and its strides in each file */
    size_t common[DIFF_GRID_DIMS] = {1, 1, 1, 1}, stra[DIFF_GRID_DIMS] = {0}, strb[DIFF_GRID_DIMS] = {0};
    size_t nd = a->ndim - 1, cells = 1;
    if (st == PS_OK && nd > DIFF_GRID_DIMS)
        st = err_set(PS_ERR_FORMAT, "%s: %s has %zu dimensions after prompt (at most %d)", fa->path, a->name, nd,
                     DIFF_GRID_DIMS);
    if (st)
        nd = 0;
    for (size_t k = 0; k < nd; k++) {
        common[k] = a->shape[k + 1] < b->shape[k + 1] ? a->shape[k + 1] : b->shape[k + 1];
        cells *= common[k];
    }
    for (size_t k = nd, ma = 1, mb = 1; k-- > 0;) {
        stra[k] = ma, strb[k] = mb;
        ma *= a->shape[k + 1], mb *= b->shape[k + 1];
    }
    snprintf(out->name, sizeof out->name, "%s", a->name);
    out->col_inner = 1; /* the axes after the second: position.head, position.src_position.head */
    for (size_t k = 2; k < nd; k++)
        out->col_inner *= common[k];
    if (nd == 0) { /* a per-prompt scalar: one column per shared prompt */
        out->rows = 1, out->cols = n_pairs;
        snprintf(out->row_dim, sizeof out->row_dim, "%s", a->name);
        snprintf(out->col_dims, sizeof out->col_dims, "shared prompt");
    } else {
        out->rows = common[0], out->cols = cells / (common[0] ? common[0] : 1);
        snprintf(out->row_dim, sizeof out->row_dim, "%s", a->dim_names[1]);
        for (size_t k = 1; k < nd; k++)
            snprintf(out->col_dims + strlen(out->col_dims), sizeof out->col_dims - strlen(out->col_dims), "%s%s",
                     k > 1 ? "." : "", a->dim_names[k + 1]);
    }
    const size_t grid = out->rows * out->cols;
    if (st == PS_OK && (!(sum = calloc(grid ? grid : 1, sizeof *sum)) || !(cnt = calloc(grid ? grid : 1, sizeof *cnt)) ||
                        !(out->mean_diff = malloc((grid ? grid : 1) * sizeof *out->mean_diff))))
        st = err_set(PS_ERR_NOMEM, "out of memory");
    double max_abs = 0.0, sum_abs = 0.0;
    for (size_t p = 0; st == PS_OK && p < n_pairs; p++) {
        const double *ra = va + pairs[2 * p] * sa, *rb = vb + pairs[2 * p + 1] * sb;
        for (size_t c = 0; c < cells; c++) {
            /* c -> multi-index over common -> offsets */
            size_t rem = c, oa = 0, ob = 0;
            for (size_t k = nd; k-- > 0;) {
                const size_t ik = rem % common[k];
                rem /= common[k];
                oa += ik * stra[k], ob += ik * strb[k];
            }
            const double x = ra[oa], y = rb[ob];
            const bool fx = !isnan(x), fy = !isnan(y);
            if (fx && fy) {
                const double d = y - x;
                out->n_cells++;
                sum_abs += fabs(d);
                max_abs = fabs(d) > max_abs ? fabs(d) : max_abs;
                const size_t g = nd == 0 ? p : c;
                sum[g] += d;
                cnt[g]++;
            } else {
                out->only_a += fx;
                out->only_b += fy;
            }
        }
    }
    if (st == PS_OK) {
        out->max_abs = out->n_cells ? max_abs : NAN;
        out->mean_abs = out->n_cells ? sum_abs / (double)out->n_cells : NAN;
        for (size_t g = 0; g < grid; g++)
            out->mean_diff[g] = cnt[g] ? (float)(sum[g] / (double)cnt[g]) : NAN;
        if (grid == 0) { /* no shared prompt (per-prompt values) or an empty axis: one cell, no value */
            out->rows = out->cols = 1;
            out->mean_diff[0] = NAN;
        }
    }
    free(va), free(vb), free(sum), free(cnt);
    return st;
}

/* ---- the files ------------------------------------------------------------------ */

ps_status diff_files(const char *a, const char *b, diff_result *out)
{
    memset(out, 0, sizeof *out);
    ncin_file fa = {.ncid = -1}, fb = {.ncid = -1};
    char **na = NULL, **nb = NULL;
    size_t n_na = 0, n_nb = 0, *pairs = NULL, n_pairs = 0;
    ps_status st = ncin_open(&fa, a);
    if (st == PS_OK)
        st = ncin_open(&fb, b);
    if (st)
        goto out;
    static const char *const dims[] = {SCHEMA_DIM_LAYER, SCHEMA_DIM_HEAD, SCHEMA_DIM_KV_HEAD};
    for (size_t k = 0; k < sizeof dims / sizeof *dims && st == PS_OK; k++) {
        const size_t la = dim_or_0(&fa, dims[k]), lb = dim_or_0(&fb, dims[k]);
        if (la != lb)
            st = err_set(PS_ERR_INVALID, "%s and %s have different grids: %s %zu vs %zu", a, b, dims[k], la, lb);
    }
    if (st || (st = same_config(&fa, &fb)) || (st = compared_vars(&fa, &na, &n_na)) ||
        (st = compared_vars(&fb, &nb, &n_nb)))
        goto out;
    if (n_na == 0) {
        st = err_set(PS_ERR_FORMAT, "%s: no variable with a prompt dimension: not a patching results file", a);
        goto out;
    }
    for (size_t j = 0; j < n_nb && st == PS_OK; j++)
        if (!ncin_has_var(&fa, nb[j]))
            st = err_set(PS_ERR_INVALID, "%s and %s have different grids: %s only in %s", a, b, nb[j], b);
    for (size_t i = 0; i < n_na && st == PS_OK; i++) {
        ncin_var vb;
        if (!ncin_has_var(&fb, na[i]) || ncin_inq_var(&fb, na[i], &vb) != PS_OK || !compared(&vb)) {
            err_clear();
            st = err_set(PS_ERR_INVALID, "%s and %s have different grids: %s only in %s", a, b, na[i], a);
        }
    }
    if (st || (st = ncin_dim_len(&fa, SCHEMA_DIM_PROMPT, &out->prompts_a)) ||
        (st = ncin_dim_len(&fb, SCHEMA_DIM_PROMPT, &out->prompts_b)) ||
        (st = shared_prompts(&fa, &fb, out->prompts_a, out->prompts_b, &pairs, &n_pairs)))
        goto out;
    out->prompts_shared = n_pairs;
    if (!(out->vars = calloc(n_na, sizeof *out->vars))) {
        st = err_set(PS_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n_na && st == PS_OK; i++) {
        ncin_var va, vb;
        if ((st = ncin_inq_var(&fa, na[i], &va)) || (st = ncin_inq_var(&fb, na[i], &vb)) ||
            (st = same_var_dims(&fa, &fb, &va, &vb)))
            break;
        out->n_vars++;
        st = compare_var(&fa, &fb, &va, &vb, pairs, n_pairs, &out->vars[i]);
    }
out:
    if (na)
        ncin_names_free(na, n_na);
    if (nb)
        ncin_names_free(nb, n_nb);
    free(pairs);
    ncin_close(&fa);
    ncin_close(&fb);
    return st;
}

void diff_result_free(diff_result *r)
{
    for (size_t i = 0; i < r->n_vars; i++)
        free(r->vars[i].mean_diff);
    free(r->vars);
    memset(r, 0, sizeof *r);
}

/* ---- the heatmap ------------------------------------------------------------------ */

ps_status diff_write_svg(FILE *out, const char *out_name, const diff_result *r, size_t i, const char *a,
                         const char *b)
{
    const diff_var *v = &r->vars[i];
    const size_t nr = v->rows, nc = v->cols;
    char **rl = calloc(nr ? nr : 1, sizeof *rl), **cl = calloc(nc ? nc : 1, sizeof *cl);
    char title[NCIN_MAX_NAME + 64], sub[256], ftitle[64], fsub[2048];
    ps_status st = rl && cl ? PS_OK : err_set(PS_ERR_NOMEM, "out of memory");
    for (size_t k = 0; st == PS_OK && k < nr; k++) {
        char buf[32];
        snprintf(buf, sizeof buf, "%s%zu", !strcmp(v->row_dim, SCHEMA_DIM_LAYER) ? "L" : "", k);
        if (!(rl[k] = strdup(buf)))
            st = err_set(PS_ERR_NOMEM, "out of memory");
    }
    for (size_t k = 0; st == PS_OK && k < nc; k++) {
        char buf[48];
        if (v->col_inner > 1) /* position.head */
            snprintf(buf, sizeof buf, "%zu.%zu", k / v->col_inner, k % v->col_inner);
        else
            snprintf(buf, sizeof buf, "%zu", k);
        if (!(cl[k] = strdup(buf)))
            st = err_set(PS_ERR_NOMEM, "out of memory");
    }
    if (st == PS_OK) {
        snprintf(title, sizeof title, "%s: mean of B - A", v->name);
        snprintf(sub, sizeof sub, "%zu shared cells; max |B - A| %.3g, mean |B - A| %.3g; valid in A only %zu, B only %zu",
                 v->n_cells, v->max_abs, v->mean_abs, v->only_a, v->only_b);
        snprintf(ftitle, sizeof ftitle, "patchsweep diff");
        snprintf(fsub, sizeof fsub, "A: %s; B: %s; %zu shared prompts", a, b, r->prompts_shared);
        const char *const meta[][2] = {{"patchsweep_version", prov_version()},
                                       {"command_line", prov_command_line()},
                                       {"file_a", a},
                                       {"file_b", b}};
        plot_figure fig = {.title = ftitle, .subtitle = fsub, .meta = meta, .n_meta = 4};
        plot_heatmap h = {.title = title, .subtitle = sub, .x_name = v->col_dims, .y_name = v->row_dim, .n_rows = nr,
                          .n_cols = nc, .row_labels = (const char *const *)rl, .col_labels = (const char *const *)cl,
                          .values = v->mean_diff, .hover_name = "mean of B - A"};
        st = plot_write_heatmaps(out, out_name, &fig, &h, 1, plot_heatmap_zmax(&h, 1));
    }
    for (size_t k = 0; rl && k < nr; k++)
        free(rl[k]);
    for (size_t k = 0; cl && k < nc; k++)
        free(cl[k]);
    free(rl), free(cl);
    return st;
}
