#include "sweep.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bench.h"
#include "dataset.h"
#include "journal.h"
#include "ncout.h"
#include "ncout_lens.h"
#include "schema.h"
#include "sha256.h"

/* ---- journal records ------------------------------------------------------
 * One record per prompt:
 *   u64 prompt | i32 kind (1 done, 2 skipped) | i32 T | i32 answer | i32 wrong
 *   | f64 clean_metric | f64 corrupted_metric
 *   | done:    i32 clean[T] | i32 corrupted[T] | f64 values of each selected
 *              component, in component order, grid order (patch_grid_shape)
 *   | skipped: the reason, UTF-8, to the end of the record */

enum { REC_DONE = 1, REC_SKIPPED = 2 };

typedef struct {
    uint64_t prompt;
    int32_t kind, T, answer, wrong;
    double clean_metric, corrupted_metric;
} rec_head;

static size_t grid_size(patch_component c, const model_config *cfg, size_t T)
{
    size_t shape[3];
    size_t nd = patch_grid_shape(c, cfg, T, shape, NULL);
    return shape[0] * shape[1] * (nd == 3 ? shape[2] : 1);
}

/* Cells of one prompt over the selected components. */
static size_t prompt_cells(const bool *on, const model_config *cfg, size_t T)
{
    size_t n = 0;
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        if (on[c])
            n += grid_size((patch_component)c, cfg, T);
    return n;
}

/* ---- what rank 0 knows about the dataset --------------------------------- */

typedef struct {
    dataset d;
    size_t first;             /* dataset index of the plan's prompt 0 (slices) */
    size_t n;                 /* prompts used (max_prompts and the slice applied) */
    dataset_tokens *tk;       /* [n]; n_tokens == 0 for an invalid item */
    char **invalid;           /* [n]: reason, or NULL when valid */
    unsigned char *state;     /* [n]: 0 to do, REC_DONE, REC_SKIPPED (from the journal) */
    size_t max_T;
} plan;

static void plan_free(plan *p)
{
    for (size_t i = 0; i < p->n; i++) {
        if (p->tk)
            dataset_tokens_free(&p->tk[i]);
        if (p->invalid)
            free(p->invalid[i]);
    }
    free(p->tk);
    free(p->invalid);
    free(p->state);
    dataset_free(&p->d);
    memset(p, 0, sizeof *p);
}

/* Read and validate the dataset; invalid pairs stop the job unless skip_invalid. */
static ps_status plan_load(plan *p, const job *j, const model *m, const tokenizer *tok, size_t slice,
                           size_t n_slices)
{
    memset(p, 0, sizeof *p);
    ps_status st = dataset_read_jsonl(&p->d, j->dataset);
    if (st)
        return st;
    size_t total = j->max_prompts && j->max_prompts < p->d.n ? j->max_prompts : p->d.n;
    if (total == 0)
        return err_set(PS_ERR_INVALID, "%s: the dataset has no prompt pairs", j->dataset);
    p->n = total;
    if (n_slices) {
        /* slice k of n: prompts [floor((k-1) total / n), floor(k total / n)) */
        if (n_slices > total)
            return err_set(PS_ERR_INVALID, "%s: %zu slices of %zu prompt pairs would leave slices empty", j->dataset,
                           n_slices, total);
        p->first = (slice - 1) * total / n_slices;
        p->n = slice * total / n_slices - p->first;
    }
    p->tk = calloc(p->n, sizeof *p->tk);
    p->invalid = calloc(p->n, sizeof *p->invalid);
    p->state = calloc(p->n, 1);
    if (!p->tk || !p->invalid || !p->state)
        return err_set(PS_ERR_NOMEM, "out of memory");
    size_t n_bad = 0, first_bad = 0;
    char lines[256] = "";
    for (size_t i = 0; i < p->n; i++) {
        if (dataset_tokenize(&p->d, p->first + i, tok, j->bos, m->cfg.n_positions, &p->tk[i]) != PS_OK) {
            p->invalid[i] = strdup(err_msg());
            if (!p->invalid[i])
                return err_set(PS_ERR_NOMEM, "out of memory");
            if (n_bad++ == 0)
                first_bad = i;
            size_t k = strlen(lines);
            if (k < sizeof lines - 24)
                snprintf(lines + k, sizeof lines - k, "%s%zu", k ? ", " : "", p->d.items[p->first + i].line);
            else if (lines[k - 1] != '.')
                snprintf(lines + k, sizeof lines - k, ", ...");
            continue;
        }
        if (p->tk[i].n_tokens > p->max_T)
            p->max_T = p->tk[i].n_tokens;
    }
    if (n_bad && !j->skip_invalid)
        return err_set(PS_ERR_INVALID, "%zu invalid prompt pair%s (line%s %s; skip_invalid = true skips them): %s", n_bad,
                       n_bad > 1 ? "s" : "", n_bad > 1 ? "s" : "", lines, p->invalid[first_bad]);
    if (p->max_T == 0)
        return err_set(PS_ERR_INVALID, "%s: no valid prompt pair", j->dataset);
    return PS_OK;
}

/* ---- the NetCDF file from the journal ------------------------------------ */

typedef struct {
    const plan *p;
    const job *j;
    const model_config *cfg;
    const tokenizer *tok;
    ncout_results *r;
    sweep_result *res;
    size_t *counts[PATCH_COMPONENT_COUNT]; /* summary contributions per cell */
    bool mark_state;                        /* first pass: fill plan.state */
    unsigned char *state;
} finalize_ctx;

static ps_status parse_record(const void *payload, size_t n, rec_head *h, const unsigned char **rest, size_t *rest_n)
{
    if (n < sizeof *h)
        return err_set(PS_ERR_FORMAT, "journal record too short (%zu bytes)", n);
    memcpy(h, payload, sizeof *h);
    *rest = (const unsigned char *)payload + sizeof *h;
    *rest_n = n - sizeof *h;
    return PS_OK;
}

/* First pass on open: which prompts are done already. */
static ps_status mark_record(void *user, const void *payload, size_t n)
{
    finalize_ctx *fx = user;
    rec_head h;
    const unsigned char *rest = NULL;
    size_t rn = 0;
    ps_status st = parse_record(payload, n, &h, &rest, &rn);
    if (st)
        return st;
    if (h.prompt >= fx->p->n || (h.kind != REC_DONE && h.kind != REC_SKIPPED))
        return err_set(PS_ERR_FORMAT, "journal record for prompt %llu is not of this dataset",
                       (unsigned long long)h.prompt);
    fx->state[h.prompt] = (unsigned char)h.kind;
    return PS_OK;
}

static ps_status write_record(void *user, const void *payload, size_t n)
{
    finalize_ctx *fx = user;
    rec_head h;
    const unsigned char *rest = NULL;
    size_t rn = 0;
    ps_status st = parse_record(payload, n, &h, &rest, &rn);
    if (st)
        return st;
    const dataset_item *it = &fx->p->d.items[fx->p->first + h.prompt];
    if (h.kind == REC_SKIPPED) {
        char *reason = strndup((const char *)rest, rn);
        if (!reason)
            return err_set(PS_ERR_NOMEM, "out of memory");
        st = ncout_results_put_skipped(fx->r, h.prompt, reason);
        free(reason);
        fx->res->prompts_skipped++;
        return st;
    }
    const size_t T = (size_t)h.T;
    const size_t need = 2 * T * sizeof(int32_t) + prompt_cells(fx->j->components, fx->cfg, T) * sizeof(double);
    if (rn != need)
        return err_set(PS_ERR_FORMAT, "journal record for prompt %llu has %zu bytes, expected %zu",
                       (unsigned long long)h.prompt, rn, need);
    int32_t *tokens = malloc(2 * T * sizeof *tokens);
    double *vals = malloc(need - 2 * T * sizeof(int32_t));
    if (!tokens || !vals) {
        free(tokens), free(vals);
        return err_set(PS_ERR_NOMEM, "out of memory");
    }
    memcpy(tokens, rest, 2 * T * sizeof *tokens);
    memcpy(vals, rest + 2 * T * sizeof *tokens, need - 2 * T * sizeof *tokens);
    double *values[PATCH_COMPONENT_COUNT] = {0};
    size_t off = 0;
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        if (fx->j->components[c]) {
            values[c] = vals + off;
            off += grid_size((patch_component)c, fx->cfg, T);
        }
    ncout_prompt np = {.T = T, .answer_id = h.answer, .wrong_id = h.wrong, .clean_metric = h.clean_metric,
                       .corrupted_metric = h.corrupted_metric, .clean_tokens = tokens, .corrupted_tokens = tokens + T,
                       .answer = it->answer, .wrong = it->wrong};
    st = ncout_results_put(fx->r, h.prompt, &np, fx->tok, values);
    /* summary: mean normalized value per (layer, position from the end | head) */
    sweep_result *res = fx->res;
    double denom = h.clean_metric - h.corrupted_metric;
    res->prompts_done++;
    res->mean_clean_metric += h.clean_metric;
    res->mean_corrupted_metric += h.corrupted_metric;
    res->accuracy += h.clean_metric > 0.0;
    for (int c = 0; c < PATCH_COMPONENT_COUNT && st == PS_OK && denom != 0.0; c++) {
        if (!values[c] || c == PATCH_Z)
            continue;
        sweep_summary *sm = &res->summary[c];
        size_t shape[3];
        patch_grid_shape((patch_component)c, fx->cfg, T, shape, NULL);
        for (size_t l = 0; l < shape[0]; l++)
            for (size_t k = 0; k < shape[1]; k++) {
                /* position grids: column = position counted from the end */
                size_t col = sm->by_head ? k : T - 1 - k;
                if (col >= sm->cols)
                    continue;
                sm->mean[l * sm->cols + col] += (values[c][l * shape[1] + k] - h.corrupted_metric) / denom;
                fx->counts[c][l * sm->cols + col]++;
            }
    }
    free(tokens);
    free(vals);
    return st;
}

static ps_status summary_init(sweep_result *res, const job *j, const model_config *cfg, size_t max_T,
                              size_t *counts[PATCH_COMPONENT_COUNT])
{
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        counts[c] = NULL;
        if (!j->components[c] || c == PATCH_Z)
            continue;
        sweep_summary *sm = &res->summary[c];
        sm->by_head = c >= PATCH_Z_ALL_POS;
        sm->rows = cfg->n_layer;
        sm->cols = sm->by_head ? cfg->n_head : max_T;
        sm->mean = calloc(sm->rows * sm->cols, sizeof *sm->mean);
        counts[c] = calloc(sm->rows * sm->cols, sizeof *counts[c]);
        if (!sm->mean || !counts[c])
            return err_set(PS_ERR_NOMEM, "out of memory");
    }
    return PS_OK;
}

static ps_status finalize(const job *j, model *m, const tokenizer *tok, const plan *p, journal *jr,
                          const char *output, const sweep_opts *o, const char *dataset_sha, const char *memory,
                          sweep_result *res)
{
    ncout_file f;
    ncout_results r;
    ps_status st = ncout_create(&f, output);
    if (st)
        return st;
    finalize_ctx fx = {.p = p, .j = j, .cfg = &m->cfg, .tok = tok, .r = &r, .res = res};
    char ranks[32];
    snprintf(ranks, sizeof ranks, "%zu", o->ranks_for_provenance);
    char slice[64] = SCHEMA_SLICE_ALL;
    if (o->n_slices)
        snprintf(slice, sizeof slice, "%zu/%zu", o->slice, o->n_slices);
    st = ncout_results_define(&r, &f, m, p->max_T, j->components, j->metric, j->direction, j->engine);
    r.prompt_offset = p->first;
    if (st || (st = ncout_put_attr(&f, SCHEMA_ATT_SLICE, slice)) ||
        (st = ncout_put_attr(&f, SCHEMA_ATT_JOB_PATH, j->path)) || (st = ncout_put_attr(&f, SCHEMA_ATT_JOB_TEXT, j->text)) ||
        (st = ncout_put_attr(&f, SCHEMA_ATT_JOB_SHA256, j->sha256)) || (st = ncout_put_attr(&f, SCHEMA_ATT_DATASET_PATH, j->dataset)) ||
        (st = ncout_put_attr(&f, SCHEMA_ATT_DATASET_SHA256, dataset_sha)) || (st = ncout_put_attr(&f, SCHEMA_ATT_MPI_RANKS, ranks)) ||
        (st = ncout_put_attr(&f, SCHEMA_ATT_MEMORY_PER_RANK, memory)) ||
        (st = summary_init(res, j, &m->cfg, p->max_T, fx.counts)))
        goto out;
    res->prompts_done = res->prompts_skipped = 0;
    res->mean_clean_metric = res->mean_corrupted_metric = res->accuracy = 0.0;
    if ((st = journal_each(jr, write_record, &fx)))
        goto out;
    /* Prompts not done yet: explicit done = 0, so the prompt dimension
     * always has every prompt of the dataset. */
    for (size_t i = 0; i < p->n && st == PS_OK; i++)
        if (!p->state[i]) {
            st = ncout_results_put_pending(&r, i);
        }
    if (st)
        goto out;
    res->complete = res->prompts_done + res->prompts_skipped == p->n;
    char num[32];
    snprintf(num, sizeof num, "%zu", res->prompts_done);
    if ((st = ncout_results_flush(&r)) || (st = ncout_put_attr(&f, SCHEMA_ATT_COMPLETE, res->complete ? SCHEMA_TRUE : SCHEMA_FALSE)) ||
        (st = ncout_put_attr(&f, SCHEMA_ATT_PROMPTS_DONE, num)))
        goto out;
    st = ncout_commit(&f);
    if (st == PS_OK) {
        double n = (double)res->prompts_done;
        if (n > 0) {
            res->mean_clean_metric /= n;
            res->mean_corrupted_metric /= n;
            res->accuracy = j->metric == PATCH_LOGIT_DIFF ? res->accuracy / n : NAN;
        }
        for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
            sweep_summary *sm = &res->summary[c];
            for (size_t k = 0; sm->mean && k < sm->rows * sm->cols; k++)
                sm->mean[k] = fx.counts[c][k] ? sm->mean[k] / (double)fx.counts[c][k] : NAN;
        }
    }
out:
    ncout_results_free(&r);
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        free(fx.counts[c]);
    if (st)
        ncout_abort(&f);
    return st;
}

/* ---- the distributed loop ------------------------------------------------ */

/* What rank 0 broadcasts before each chunk.  By prompt, the token lists
 * follow (`bytes`); by cell, the packed size of each pair (uint64_t[n_pairs])
 * and the pairs one by one, so that a rank holds one packed pair at a time
 * besides the unpacked ones. */
typedef struct {
    uint64_t n_pairs;   /* 0: no more chunks */
    uint64_t by_prompt; /* 1: each rank runs whole prompts; 0: rank 0's caches, cells dealt out */
    uint64_t bytes;     /* by prompt: of the token lists */
    uint64_t max_bytes; /* by cell: the largest packed pair */
} chunk_header;

typedef struct {
    size_t cost, index;
} cell_cost;

/* Longest first; equal costs in cell order, so every rank sorts alike. */
static int cmp_cell_cost(const void *a, const void *b)
{
    const cell_cost *x = a, *y = b;
    if (x->cost != y->cost)
        return x->cost > y->cost ? -1 : 1;
    return (x->index > y->index) - (x->index < y->index);
}

/* Deal items to ranks, longest first to the least loaded (lowest rank on
 * ties): the same plan on every rank from the same costs. owner[index] = rank. */
static ps_status deal_longest_first(cell_cost *items, size_t n, size_t ranks, uint32_t *owner)
{
    size_t *load = calloc(ranks, sizeof *load);
    if (!load)
        return err_set(PS_ERR_NOMEM, "out of memory");
    qsort(items, n, sizeof *items, cmp_cell_cost);
    for (size_t i = 0; i < n; i++) {
        size_t best = 0;
        for (size_t r = 1; r < ranks; r++)
            if (load[r] < load[best])
                best = r;
        load[best] += items[i].cost;
        owner[items[i].index] = (uint32_t)best;
    }
    free(load);
    return PS_OK;
}

/* Cells to ranks by the fast engine's cost model. */
static ps_status assign_cells(const model *m, const patch_pair *pairs, const patch_cell *cells, size_t n,
                              patch_direction dir, size_t ranks, uint32_t *owner)
{
    cell_cost *items = malloc((n ? n : 1) * sizeof *items);
    if (!items)
        return err_set(PS_ERR_NOMEM, "out of memory");
    /* +1: a skipped cell still costs a little (its plan and its slot) */
    for (size_t i = 0; i < n; i++)
        items[i] = (cell_cost){patch_cell_cost(m, pairs, &cells[i], dir) + 1, i};
    ps_status st = deal_longest_first(items, n, ranks, owner);
    free(items);
    return st;
}

/* Every cell of the selected components of pairs [0, n_pairs), in pair,
 * component and grid order; *n_out cells, malloc'd. */
static ps_status chunk_cells(const job *j, const model_config *cfg, const patch_pair *pairs, size_t n_pairs,
                             patch_cell **out, size_t *n_out)
{
    size_t n = 0;
    for (size_t p = 0; p < n_pairs; p++)
        n += prompt_cells(j->components, cfg, pairs[p].T);
    patch_cell *cells = malloc((n ? n : 1) * sizeof *cells);
    if (!cells)
        return err_set(PS_ERR_NOMEM, "out of memory");
    ps_status st = PS_OK;
    size_t k = 0;
    for (size_t p = 0; p < n_pairs && st == PS_OK; p++)
        for (int comp = 0; comp < PATCH_COMPONENT_COUNT && st == PS_OK; comp++) {
            if (!j->components[comp])
                continue;
            patch_cell *g;
            size_t ng;
            if ((st = patch_grid_cells((patch_component)comp, cfg, (uint32_t)p, pairs[p].T, &g, &ng)))
                break;
            memcpy(cells + k, g, ng * sizeof *g);
            k += ng;
            free(g);
        }
    if (st) {
        free(cells);
        return st;
    }
    *out = cells;
    *n_out = n;
    return PS_OK;
}

/* Evaluate one chunk's cells on every rank; on rank 0, values[i] for every
 * cell of the chunk (cells in pair, component, grid order). */
static ps_status run_chunk(const job *j, const model *m, comm *c, const patch_pair *pairs, size_t n_pairs,
                           size_t fast_rows, double **values_out, size_t *n_cells_out)
{
    const size_t ranks = comm_size(c), me = comm_rank(c);
    size_t n = 0;
    patch_cell *cells = NULL;
    ps_status st = chunk_cells(j, &m->cfg, pairs, n_pairs, &cells, &n);
    uint32_t *owner = malloc((n ? n : 1) * sizeof *owner);
    size_t *counts = calloc(ranks, sizeof *counts);
    double *mine = NULL, *gathered = NULL, *values = NULL;
    if (st == PS_OK && (!owner || !counts))
        st = err_set(PS_ERR_NOMEM, "out of memory");
    if (st || (st = assign_cells(m, pairs, cells, n, j->direction, ranks, owner)))
        goto out;
    /* this rank's cells, in cell order */
    size_t n_mine = 0;
    for (size_t i = 0; i < n; i++) {
        counts[owner[i]] += sizeof(double);
        if (owner[i] == me)
            cells[n_mine++] = cells[i];
    }
    mine = malloc((n_mine ? n_mine : 1) * sizeof *mine);
    if (!mine) {
        st = err_set(PS_ERR_NOMEM, "out of memory");
        goto out;
    }
    patch_opts po = {.metric = j->metric, .direction = j->direction, .engine = j->engine, .max_rows = fast_rows};
    st = patch_eval(m, pairs, n_pairs, cells, n_mine, &po, mine);
    if ((st = comm_agree(c, st)))
        goto out;
    if (me == 0) {
        gathered = malloc((n ? n : 1) * sizeof *gathered);
        values = malloc((n ? n : 1) * sizeof *values);
        if (!gathered || !values)
            st = err_set(PS_ERR_NOMEM, "out of memory");
    }
    if ((st = comm_agree(c, st)) || (st = comm_gatherv(c, mine, n_mine * sizeof *mine, gathered, counts)))
        goto out;
    if (me == 0) {
        /* rank r's values arrive in its cell order: walk the owners again */
        size_t *next = calloc(ranks, sizeof *next), *base = calloc(ranks, sizeof *base);
        if (!next || !base) {
            free(next), free(base);
            st = err_set(PS_ERR_NOMEM, "out of memory");
            goto out;
        }
        for (size_t r = 1; r < ranks; r++)
            base[r] = base[r - 1] + counts[r - 1] / sizeof(double);
        for (size_t i = 0; i < n; i++)
            values[i] = gathered[base[owner[i]] + next[owner[i]]++];
        free(next), free(base);
        *values_out = values;
        values = NULL;
    }
    *n_cells_out = n;
out:
    free(cells), free(owner), free(counts), free(mine), free(gathered), free(values);
    return st;
}

/* ---- distribution by prompt ------------------------------------------------
 * Rank 0 broadcasts only the chunk's token ids; each rank runs the clean and
 * corrupted forwards of the prompts dealt to it and every cell of them, and
 * sends back per prompt [clean metric, corrupted metric, cell values...].
 * Nothing of size O(layers x T x d) crosses the network, and rank 0 does not
 * run every prompt's forwards while the others wait (the cells mode's serial
 * part); the price is balance by whole prompts, hence >= 4 per rank (auto).
 * Every value is computed by the same code on the same inputs as in the
 * cells mode, so both modes give the same bits. */

/* One prompt pair in the token broadcast: a head, then clean[T], corrupted[T]. */
typedef struct {
    uint32_t T;
    int32_t answer, wrong;
} tok_head;

typedef struct {
    tok_head h;
    const int32_t *clean, *corrupted;
} tok_view;

static size_t tok_bytes(size_t T) { return sizeof(tok_head) + 2 * T * sizeof(int32_t); }

static void tok_pack(const dataset_tokens *tk, unsigned char *w)
{
    tok_head h = {(uint32_t)tk->n_tokens, tk->answer_id, tk->wrong_id};
    memcpy(w, &h, sizeof h);
    memcpy(w + sizeof h, tk->clean_ids, tk->n_tokens * sizeof(int32_t));
    memcpy(w + sizeof h + tk->n_tokens * sizeof(int32_t), tk->corrupted_ids, tk->n_tokens * sizeof(int32_t));
}

/* Views into a received token list (the buffer outlives them). The ids are
 * read through memcpy'd heads; the arrays are int32-aligned as packed. */
static ps_status tok_unpack(const unsigned char *buf, size_t bytes, size_t n_pairs, tok_view *v)
{
    size_t off = 0;
    for (size_t k = 0; k < n_pairs; k++) {
        if (bytes - off < sizeof(tok_head))
            return err_set(PS_ERR_INVALID, "chunk token list truncated");
        memcpy(&v[k].h, buf + off, sizeof v[k].h);
        if (bytes - off < tok_bytes(v[k].h.T))
            return err_set(PS_ERR_INVALID, "chunk token list truncated");
        v[k].clean = (const int32_t *)(const void *)(buf + off + sizeof(tok_head));
        v[k].corrupted = v[k].clean + v[k].h.T;
        off += tok_bytes(v[k].h.T);
    }
    return PS_OK;
}

/* A prompt's expected cost before its forwards exist: its cells times the
 * rows from the first differing token (the fast engine recomputes rows from
 * there; positions before it are free). */
static size_t prompt_cost(const job *j, const model_config *cfg, const tok_view *v)
{
    size_t first = 0;
    while (first < v->h.T && v->clean[first] == v->corrupted[first])
        first++;
    return prompt_cells(j->components, cfg, v->h.T) * (v->h.T - first + 1) + 1;
}

/* Evaluate one chunk by prompt on every rank.  On rank 0, *out holds per
 * prompt, in chunk order, [clean metric, corrupted metric, values...]. */
static ps_status run_chunk_prompts(const job *j, const model *m, comm *c, const unsigned char *buf, size_t bytes,
                                   size_t n_pairs, size_t fast_rows, double **out, size_t *n_cells_out)
{
    const size_t ranks = comm_size(c), me = comm_rank(c);
    tok_view *v = calloc(n_pairs ? n_pairs : 1, sizeof *v);
    cell_cost *items = malloc((n_pairs ? n_pairs : 1) * sizeof *items);
    uint32_t *owner = malloc((n_pairs ? n_pairs : 1) * sizeof *owner);
    size_t *counts = calloc(ranks, sizeof *counts), *base = calloc(ranks, sizeof *base);
    patch_pair *pairs = calloc(n_pairs ? n_pairs : 1, sizeof *pairs);
    patch_cell *cells = NULL;
    double *vals = NULL, *mine = NULL, *gathered = NULL;
    size_t n_mine = 0, n_cells = 0, n_total = 0;
    ps_status st = PS_OK;
    if (!v || !items || !owner || !counts || !base || !pairs) {
        st = err_set(PS_ERR_NOMEM, "out of memory");
        goto agree;
    }
    if ((st = tok_unpack(buf, bytes, n_pairs, v)))
        goto agree;
    for (size_t k = 0; k < n_pairs; k++)
        items[k] = (cell_cost){prompt_cost(j, &m->cfg, &v[k]), k};
    if ((st = deal_longest_first(items, n_pairs, ranks, owner)))
        goto agree;
    for (size_t k = 0; k < n_pairs; k++) {
        const size_t nv = 2 + prompt_cells(j->components, &m->cfg, v[k].h.T);
        counts[owner[k]] += nv * sizeof(double);
        n_total += nv;
    }
    /* this rank's prompts, in chunk order */
    for (size_t k = 0; k < n_pairs && st == PS_OK; k++)
        if (owner[k] == me) {
            st = patch_pair_init(&pairs[n_mine], m, v[k].clean, v[k].corrupted, v[k].h.T, v[k].h.answer,
                                 v[k].h.wrong);
            n_mine += st == PS_OK;
        }
    if (st || (st = chunk_cells(j, &m->cfg, pairs, n_mine, &cells, &n_cells)))
        goto agree;
    vals = malloc((n_cells ? n_cells : 1) * sizeof *vals);
    mine = malloc((counts[me] ? counts[me] : 1));
    if (!vals || !mine) {
        st = err_set(PS_ERR_NOMEM, "out of memory");
        goto agree;
    }
    patch_opts po = {.metric = j->metric, .direction = j->direction, .engine = j->engine, .max_rows = fast_rows};
    if ((st = patch_eval(m, pairs, n_mine, cells, n_cells, &po, vals)))
        goto agree;
    for (size_t i = 0, w = 0, r = 0; i < n_mine; i++) {
        const size_t nv = prompt_cells(j->components, &m->cfg, pairs[i].T);
        mine[w++] = pairs[i].clean_metric[j->metric];
        mine[w++] = pairs[i].corrupted_metric[j->metric];
        memcpy(mine + w, vals + r, nv * sizeof *mine);
        w += nv, r += nv;
    }
    if (me == 0 && !(gathered = malloc((n_total ? n_total : 1) * sizeof *gathered)))
        st = err_set(PS_ERR_NOMEM, "out of memory");
agree:
    if ((st = comm_agree(c, st)) || (st = comm_gatherv(c, mine, counts ? counts[me] : 0, gathered, counts)))
        goto out;
    if (me == 0) {
        /* rank r's prompts arrive in chunk order: walk the owners again */
        double *ordered = malloc((n_total ? n_total : 1) * sizeof *ordered);
        if (!ordered) {
            st = err_set(PS_ERR_NOMEM, "out of memory");
            goto out;
        }
        for (size_t r = 1; r < ranks; r++)
            base[r] = base[r - 1] + counts[r - 1] / sizeof(double);
        for (size_t k = 0, w = 0; k < n_pairs; k++) {
            const size_t nv = 2 + prompt_cells(j->components, &m->cfg, v[k].h.T);
            memcpy(ordered + w, gathered + base[owner[k]], nv * sizeof *ordered);
            base[owner[k]] += nv;
            w += nv;
        }
        *out = ordered;
    }
    *n_cells_out = n_total - 2 * n_pairs;
out:
    for (size_t i = 0; pairs && i < n_mine; i++)
        patch_pair_free(&pairs[i]);
    free(v), free(items), free(owner), free(counts), free(base), free(pairs), free(cells), free(vals), free(mine),
        free(gathered);
    return st;
}

/* One journal record of a finished prompt: its tokens, the unpatched
 * metrics and the values of its cells. */
static ps_status journal_prompt(journal *jr, const job *j, const model_config *cfg, size_t prompt,
                                const dataset_tokens *tk, double clean_metric, double corrupted_metric,
                                const double *values)
{
    const size_t T = tk->n_tokens, nv = prompt_cells(j->components, cfg, T);
    const size_t bytes = sizeof(rec_head) + 2 * T * sizeof(int32_t) + nv * sizeof(double);
    unsigned char *buf = malloc(bytes);
    if (!buf)
        return err_set(PS_ERR_NOMEM, "out of memory");
    rec_head h = {.prompt = prompt, .kind = REC_DONE, .T = (int32_t)T, .answer = tk->answer_id,
                  .wrong = tk->wrong_id, .clean_metric = clean_metric, .corrupted_metric = corrupted_metric};
    unsigned char *w = buf;
    memcpy(w, &h, sizeof h), w += sizeof h;
    memcpy(w, tk->clean_ids, T * sizeof(int32_t)), w += T * sizeof(int32_t);
    memcpy(w, tk->corrupted_ids, T * sizeof(int32_t)), w += T * sizeof(int32_t);
    memcpy(w, values, nv * sizeof(double));
    ps_status st = journal_append(jr, buf, bytes);
    free(buf);
    return st;
}

static ps_status journal_skipped(journal *jr, size_t prompt, const char *reason)
{
    size_t len = strlen(reason), bytes = sizeof(rec_head) + len;
    unsigned char *buf = malloc(bytes);
    if (!buf)
        return err_set(PS_ERR_NOMEM, "out of memory");
    rec_head h = {.prompt = prompt, .kind = REC_SKIPPED};
    memcpy(buf, &h, sizeof h);
    memcpy(buf + sizeof h, reason, len);
    ps_status st = journal_append(jr, buf, bytes);
    free(buf);
    return st;
}

/* ---- working memory --------------------------------------------------------
 * Beside the weights (one copy per node, see model_alloc), a rank's memory is
 * mostly its working memory: the chunk's caches (on the ranks that receive
 * them, each pair's core as broadcast, patch_pair_packed_bytes; rank 0 holds
 * the full caches, about twice that) and the fast engine's stacked rows
 * (x, a, q, k, v, z [d] and h [m] floats per row: patch.c's fast_buffers).
 * Both come out of one budget per rank, the job's work_mib or else 1/16 of
 * the model's F32 weights (at least 24 MiB), so that an extra rank costs a
 * node about a tenth of the model's F32 size (README: resource sizing).  The
 * caches get at most half of it, but always one pair; the rows get the rest,
 * within [256, 2048] rows (2048 is the engine's default: fewer rows mean
 * smaller sgemm calls, which run slower). */
#define WORK_FRACTION 16
#define WORK_MIN_BYTES ((size_t)24 << 20)
#define WORK_CHUNK_MAX 64
#define FAST_ROWS_MIN 256
#define FAST_ROWS_MAX 2048

static size_t clamp_size(size_t x, size_t lo, size_t hi) { return x < lo ? lo : x > hi ? hi : x; }

static void plan_work(const job *j, const model *m, size_t max_T, sweep_work *w)
{
    const model_config *cfg = &m->cfg;
    size_t share = m->n_params / WORK_FRACTION * sizeof(float);
    w->budget_bytes = j->work_mib ? j->work_mib << 20 : share > WORK_MIN_BYTES ? share : WORK_MIN_BYTES;
    w->pair_bytes = patch_pair_packed_bytes(cfg, max_T);
    w->chunk = j->chunk_prompts ? j->chunk_prompts : clamp_size(w->budget_bytes / 2 / w->pair_bytes, 1, WORK_CHUNK_MAX);
    size_t caches = w->chunk > SIZE_MAX / w->pair_bytes ? SIZE_MAX : w->chunk * w->pair_bytes;
    size_t row = (6 * cfg->n_embd + cfg->n_inner) * sizeof(float);
    w->fast_rows = clamp_size(caches < w->budget_bytes ? (w->budget_bytes - caches) / row : 0, FAST_ROWS_MIN,
                              FAST_ROWS_MAX);
}

/* Rank 0's side of the set-up: plan, identity, journal; what is done. */
static ps_status root_setup(const job *j, model *m, const tokenizer *tok, const sweep_opts *o, const char *output,
                            plan *p, journal *jr, char dataset_sha[65], sweep_result *res)
{
    ps_status st;
    if ((st = ncout_check_writable(output)) || (st = plan_load(p, j, m, tok, o->slice, o->n_slices)) ||
        (st = sha256_file_hex(j->dataset, dataset_sha)) || (st = model_hash(m)))
        return st;
    /* the slice is part of the identity: first and count */
    journal_identity id = {.n_prompts = ((uint64_t)p->first << 32) | p->n};
    memcpy(id.job_sha256, j->sha256, 65);
    memcpy(id.model_sha256, m->sha256, 65);
    memcpy(id.dataset_sha256, dataset_sha, 65);
    char jpath[4200];
    snprintf(jpath, sizeof jpath, "%s.journal", output);
    /* A complete result file of this very job and no journal: nothing to do. */
    if (!o->overwrite && access(jpath, F_OK) != 0 && access(output, F_OK) == 0) {
        char want_slice[64] = SCHEMA_SLICE_ALL;
        if (o->n_slices)
            snprintf(want_slice, sizeof want_slice, "%zu/%zu", o->slice, o->n_slices);
        bool same = schema_is_complete_run(output, j->sha256, m->sha256, dataset_sha, want_slice);
        if (!same)
            return err_set(PS_ERR_INVALID,
                           "%s exists and is not the complete result of this job, model, dataset and slice "
                           "(use --overwrite to replace it)", output);
        res->was_complete = res->complete = true;
        return PS_OK;
    }
    if ((st = journal_open(jr, jpath, &id, o->overwrite)))
        return st;
    finalize_ctx fx = {.p = p, .state = p->state};
    if ((st = journal_each(jr, mark_record, &fx)))
        return err_wrap(st, "%s", jpath);
    for (size_t i = 0; i < p->n; i++)
        res->prompts_resumed += p->state[i] != 0;
    /* invalid pairs (skip_invalid): journaled once as skipped */
    for (size_t i = 0; i < p->n && st == PS_OK; i++)
        if (p->invalid[i] && !p->state[i]) {
            st = journal_skipped(jr, i, p->invalid[i]);
            p->state[i] = REC_SKIPPED;
        }
    return st ? st : journal_sync(jr);
}

/* ---- memory per rank ------------------------------------------------------- */

ps_status sweep_memory_gather(comm *c, sweep_rank_memory *all)
{
    sweep_rank_memory mine = {.rank = comm_rank(c), .node_rank = comm_local_rank(c), .pid = (long)getpid()};
    if (gethostname(mine.host, sizeof mine.host) != 0)
        snprintf(mine.host, sizeof mine.host, "?");
    mine.host[sizeof mine.host - 1] = '\0';
    if (memstat_read(&mine.mem) != PS_OK)
        memset(&mine.mem, 0, sizeof mine.mem);
    const size_t n = comm_size(c);
    size_t *counts = comm_rank(c) == 0 ? malloc(n * sizeof *counts) : NULL;
    ps_status st = comm_rank(c) == 0 && !counts ? err_set(PS_ERR_NOMEM, "out of memory") : PS_OK;
    for (size_t r = 0; counts && r < n; r++)
        counts[r] = sizeof mine;
    if ((st = comm_agree(c, st)) == PS_OK)
        st = comm_gatherv(c, &mine, sizeof mine, all, counts);
    free(counts);
    return st;
}

void sweep_memory_format(const sweep_rank_memory *r, char *buf, size_t cap)
{
    char mem[256];
    memstat_format(&r->mem, mem, sizeof mem);
    snprintf(buf, cap, "rank=%zu pid=%ld host=%s node_rank=%zu %s", r->rank, r->pid, r->host, r->node_rank, mem);
}

/* Collective: on rank 0, *text = one sweep_memory_format line per rank
 * (malloc'd); NULL elsewhere. */
static ps_status memory_text(comm *c, char **text)
{
    *text = NULL;
    const size_t n = comm_size(c);
    const bool root = comm_rank(c) == 0;
    sweep_rank_memory *all = root ? calloc(n, sizeof *all) : NULL;
    ps_status st = root && !all ? err_set(PS_ERR_NOMEM, "out of memory") : PS_OK;
    if ((st = comm_agree(c, st)) || (st = sweep_memory_gather(c, all)) || !root) {
        free(all);
        return st;
    }
    const size_t line = 400;
    char *t = malloc(n * line + 1);
    if (!t) {
        free(all);
        return err_set(PS_ERR_NOMEM, "out of memory");
    }
    size_t k = 0;
    t[0] = '\0';
    for (size_t r = 0; r < n; r++) {
        sweep_memory_format(&all[r], t + k, line);
        k += strlen(t + k);
        if (r + 1 < n)
            t[k++] = '\n', t[k] = '\0';
    }
    free(all);
    *text = t;
    return PS_OK;
}

ps_status sweep_run(const job *j, model *m, const tokenizer *tok, comm *c, const sweep_opts *o, sweep_result *res)
{
    memset(res, 0, sizeof *res);
    const bool root = comm_rank(c) == 0;
    const char *output = o->output ? o->output : j->output;
    snprintf(res->output, sizeof res->output, "%s", output);
    plan p = {0};
    journal jr = {.fd = -1};
    char dataset_sha[65] = "";
    ps_status st = PS_OK;
    if (root)
        st = root_setup(j, m, tok, o, output, &p, &jr, dataset_sha, res);
    if ((st = comm_agree(c, st)))
        goto out;
    /* rank 0 knows the longest prompt, so it plans the working memory */
    if (root && !res->was_complete)
        plan_work(j, m, p.max_T, &res->work);
    uint64_t start[2] = {res->was_complete, res->work.fast_rows};
    if ((st = comm_bcast(c, start, sizeof start)) || start[0])
        goto out;
    res->work.fast_rows = start[1];

    size_t chunk = 1, n_chunks = 0, todo = 0;
    sweep_progress pr = {0};
    if (root) {
        res->prompts_total = pr.prompts_total = p.n;
        /* By prompt, the budget's pairs per rank: each holds only its own
         * caches.  (By cell every rank holds the whole chunk's.) */
        chunk = res->work.chunk;
        if (!j->chunk_prompts && j->distribute != JOB_DISTRIBUTE_CELLS)
            chunk *= comm_size(c);
        for (size_t i = 0; i < p.n; i++) {
            if (p.state[i]) {
                pr.prompts_done++;
                continue;
            }
            todo++;
            pr.cells_total += prompt_cells(j->components, &m->cfg, p.tk[i].n_tokens);
        }
        n_chunks = (todo + chunk - 1) / chunk;
        pr.n_chunks = n_chunks;
    }
    const double t0 = bench_now();
    size_t next = 0; /* rank 0: next prompt index to consider */
    for (;;) {
        chunk_header hdr = {0};
        unsigned char *buf = NULL;
        uint64_t *sizes = NULL;   /* by cell: packed size of each pair */
        patch_pair *pairs = NULL; /* by cell: [n_alloc], zeroed until run */
        size_t *index = NULL, n_pairs = 0, n_alloc = 0;
        if (root && !(o->stop && *o->stop)) {
            /* the next prompts not done yet */
            index = malloc(chunk * sizeof *index);
            if (!index)
                st = err_set(PS_ERR_NOMEM, "out of memory");
            while (st == PS_OK && n_pairs < chunk && next < p.n) {
                size_t i = next++;
                if (!p.state[i])
                    index[n_pairs++] = i;
            }
            /* auto: by prompt when by cell every rank would hold more pairs
             * than its budget allows, or when there are 4 or more a rank */
            hdr.by_prompt = j->distribute == JOB_DISTRIBUTE_PROMPTS ||
                            (j->distribute == JOB_DISTRIBUTE_AUTO &&
                             (n_pairs > res->work.chunk || n_pairs >= 4 * comm_size(c)));
            if (hdr.by_prompt) {
                /* their token ids */
                for (size_t k = 0; k < n_pairs; k++)
                    hdr.bytes += tok_bytes(p.tk[index[k]].n_tokens);
                if (st == PS_OK && n_pairs && !(buf = malloc(hdr.bytes)))
                    st = err_set(PS_ERR_NOMEM, "cannot allocate %zu bytes for the chunk's tokens",
                                 (size_t)hdr.bytes);
                for (size_t k = 0, off = 0; st == PS_OK && k < n_pairs; k++) {
                    tok_pack(&p.tk[index[k]], buf + off);
                    off += tok_bytes(p.tk[index[k]].n_tokens);
                }
            } else {
                /* run them here */
                pairs = calloc(chunk, sizeof *pairs);
                sizes = malloc(chunk * sizeof *sizes);
                if (st == PS_OK && (!pairs || !sizes))
                    st = err_set(PS_ERR_NOMEM, "out of memory");
                n_alloc = pairs ? chunk : 0;
                for (size_t k = 0; st == PS_OK && k < n_pairs; k++) {
                    const dataset_tokens *tk = &p.tk[index[k]];
                    st = patch_pair_init(&pairs[k], m, tk->clean_ids, tk->corrupted_ids, tk->n_tokens, tk->answer_id,
                                         tk->wrong_id);
                    sizes[k] = patch_pair_packed_bytes(&m->cfg, tk->n_tokens);
                    if (sizes[k] > hdr.max_bytes)
                        hdr.max_bytes = sizes[k];
                }
            }
            hdr.n_pairs = st == PS_OK ? n_pairs : 0;
        }
        if ((st = comm_agree(c, st)) || (st = comm_bcast(c, &hdr, sizeof hdr)) || hdr.n_pairs == 0)
            goto chunk_out;
        double *values = NULL; /* root: per prompt [clean, corrupted, cells...] or per cell */
        size_t n_cells = 0;
        if (hdr.by_prompt) {
            if (!root && !(buf = malloc(hdr.bytes)))
                st = err_set(PS_ERR_NOMEM, "cannot allocate %llu bytes for the chunk's tokens",
                             (unsigned long long)hdr.bytes);
            if ((st = comm_agree(c, st)) || (st = comm_bcast(c, buf, hdr.bytes)))
                goto chunk_out;
            st = run_chunk_prompts(j, m, c, buf, hdr.bytes, hdr.n_pairs, res->work.fast_rows, &values, &n_cells);
        } else {
            if (!root) {
                n_pairs = hdr.n_pairs;
                if ((pairs = calloc(n_pairs, sizeof *pairs)))
                    n_alloc = n_pairs;
                sizes = malloc(n_pairs * sizeof *sizes);
            }
            buf = malloc(hdr.max_bytes);
            if (!buf || !pairs || !sizes)
                st = err_set(PS_ERR_NOMEM, "cannot allocate %llu bytes for a pair's caches",
                             (unsigned long long)hdr.max_bytes);
            if ((st = comm_agree(c, st)) || (st = comm_bcast(c, sizes, n_pairs * sizeof *sizes)))
                goto chunk_out;
            /* A rank whose unpacking failed still takes part in every bcast. */
            for (size_t k = 0; k < n_pairs; k++) {
                if (root)
                    patch_pair_pack(&pairs[k], buf);
                ps_status bst = comm_bcast(c, buf, sizes[k]);
                if (bst) {
                    st = bst;
                    goto chunk_out;
                }
                if (!root && st == PS_OK)
                    st = patch_pair_unpack(&pairs[k], &m->cfg, buf);
            }
            if ((st = comm_agree(c, st)) == PS_OK)
                st = run_chunk(j, m, c, pairs, n_pairs, res->work.fast_rows, &values, &n_cells);
        }
        free(buf);
        buf = NULL;
        if (st)
            goto chunk_out;
        if (root) {
            for (size_t k = 0, off = 0; k < hdr.n_pairs && st == PS_OK; k++) {
                const dataset_tokens *tk = &p.tk[index[k]];
                const size_t nv = prompt_cells(j->components, &m->cfg, tk->n_tokens);
                if (hdr.by_prompt) {
                    st = journal_prompt(&jr, j, &m->cfg, index[k], tk, values[off], values[off + 1],
                                        values + off + 2);
                    off += 2 + nv;
                } else {
                    st = journal_prompt(&jr, j, &m->cfg, index[k], tk, pairs[k].clean_metric[j->metric],
                                        pairs[k].corrupted_metric[j->metric], values + off);
                    off += nv;
                }
                p.state[index[k]] = REC_DONE;
            }
            if (st == PS_OK)
                st = journal_sync(&jr);
            pr.prompts_done += hdr.n_pairs;
            pr.cells_done += n_cells;
            pr.chunk++;
            pr.seconds = bench_now() - t0;
            res->cells_computed += n_cells;
            if (o->progress)
                o->progress(o->progress_user, &pr);
        }
        free(values);
        st = comm_agree(c, st);
    chunk_out:
        free(buf);
        free(sizes);
        for (size_t k = 0; k < n_alloc; k++)
            patch_pair_free(&pairs[k]);
        free(pairs);
        free(index);
        if (st)
            goto out;
        if (hdr.n_pairs == 0)
            break;
    }
    res->seconds = bench_now() - t0;
    /* Provenance: what each rank needed for the patching (before rank 0
     * builds the file). */
    char *memory = NULL;
    if ((st = memory_text(c, &memory)))
        goto out;
    if (root) {
        res->interrupted = o->stop && *o->stop && pr.prompts_done < p.n;
        const double tw = bench_now();
        st = finalize(j, m, tok, &p, &jr, output, o, dataset_sha, memory, res);
        free(memory);
        res->write_seconds = bench_now() - tw;
        struct stat sb;
        res->write_bytes = st == PS_OK && stat(output, &sb) == 0 ? (size_t)sb.st_size : 0;
        res->prompts_total = p.n;
        if (st == PS_OK && res->complete)
            journal_close(&jr, true);
        if (st == PS_OK && res->complete && j->lens) {
            size_t n;
            if (o->n_slices)
                res->lens_skipped_slice = true;
            else if ((st = ncout_lens_write_dataset(j->lens_output, m, tok, j->dataset, p.first, p.n, j->bos,
                                                    j->lens_top_k, &n)) == PS_OK)
                res->lens_written = true;
        }
    }
    st = comm_agree(c, st);
out:
    if (jr.fd >= 0)
        journal_close(&jr, false);
    plan_free(&p);
    return st;
}

void sweep_result_free(sweep_result *res)
{
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        free(res->summary[c].mean);
    memset(res->summary, 0, sizeof res->summary);
}
