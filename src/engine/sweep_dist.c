/*
 * sweep_dist: one chunk of a sweep on every rank, by cell or by prompt
 * (sweep.h describes both), and the scheduler that deals cells or prompts to
 * ranks by their expected cost.
 */
#include "sweep_internal.h"

#include <stdlib.h>
#include <string.h>

#include "atp.h"
#include "atp_verify.h"
#include "fault.h"

/* The test build's fault site of every rank's share of a chunk (fault.h). */
static bool eval_fault(void) { return fault_point("chunk_eval"); }

/* ---- the scheduler ---------------------------------------------------------- */

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

/* Longest first; equal costs in cell order, so every rank sorts alike. */
static int cmp_cost(const void *a, const void *b)
{
    const sweep_cost *x = a, *y = b;
    if (x->cost != y->cost)
        return x->cost > y->cost ? -1 : 1;
    return (x->index > y->index) - (x->index < y->index);
}

ps_status sweep_deal(sweep_cost *items, size_t n, size_t ranks, uint32_t *owner)
{
    size_t *load = calloc(ranks, sizeof *load);
    if (!load)
        return err_set(PS_ERR_NOMEM, "out of memory");
    qsort(items, n, sizeof *items, cmp_cost);
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
    sweep_cost *items = malloc((n ? n : 1) * sizeof *items);
    if (!items)
        return err_set(PS_ERR_NOMEM, "out of memory");
    /* +1: a skipped cell still costs a little (its plan and its slot) */
    for (size_t i = 0; i < n; i++)
        items[i] = (sweep_cost){patch_cell_cost(m, pairs, &cells[i], dir) + 1, i};
    ps_status st = sweep_deal(items, n, ranks, owner);
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
        n += sweep_prompt_cells(j->components, cfg, pairs[p].T);
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

/* Pair p's values in the chunk's layout (sweep_prompt_values): metric 0's
 * [clean_0, corrupted_0], the clean run's SWEEP_TOP_K top ids, cells_0...,
 * then per other metric k [clean_k, corrupted_k, cells_k...], from its
 * cells' values as patch_eval returns them (cell-major: cell i's metric k
 * at cell_values[i * M + k]); with atp+exact or atp+verify (second not
 * NULL, one metric) the second grid's second[0 .. n_cells) last: the
 * estimate, or the verified cells (sweep_internal.h). */
static void prompt_record(const job *j, const model_config *cfg, const patch_pair *p, size_t n_cells,
                          const double *cell_values, const double *second, double *out)
{
    if (second)
        memcpy(out + SWEEP_TOP_K + 2 + n_cells, second, n_cells * sizeof *second);
    const size_t M = sweep_metric_count(j);
    for (size_t k = 0, w = 0; k < M; k++) {
        const patch_metric met = j->metrics.n ? j->metrics.m[k] : j->metric;
        out[w++] = p->clean_metric[met];
        out[w++] = p->corrupted_metric[met];
        if (k == 0) {
            sweep_top_ids(p, cfg->vocab_size, out + w);
            w += SWEEP_TOP_K;
        }
        for (size_t i = 0; i < n_cells; i++)
            out[w++] = cell_values[i * M + k];
    }
}

/* Evaluate one chunk's cells on every rank; on rank 0, values[i * M + k]
 * for every cell of the chunk (cells in pair, component, grid order) and
 * metric k (M = sweep_metric_count). */
static ps_status run_chunk(const job *j, const model *m, comm *c, const patch_pair *pairs, size_t n_pairs,
                           size_t fast_rows, double **values_out, size_t *n_cells_out)
{
    const size_t ranks = comm_size(c), me = comm_rank(c), M = sweep_metric_count(j);
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
        counts[owner[i]] += M * sizeof(double);
        if (owner[i] == me)
            cells[n_mine++] = cells[i];
    }
    mine = malloc((n_mine ? n_mine * M : 1) * sizeof *mine);
    if (!mine) {
        st = err_set(PS_ERR_NOMEM, "out of memory");
        goto out;
    }
    patch_opts po = {.metric = j->metric, .direction = j->direction, .engine = j->engine, .max_rows = fast_rows,
                     .metrics = j->metrics};
    st = eval_fault() ? err_set(PS_ERR_IO, "injected fault at chunk_eval")
                      : patch_eval(m, pairs, n_pairs, cells, n_mine, &po, mine);
    if ((st = comm_agree(c, st)))
        goto out;
    if (me == 0) {
        gathered = malloc((n ? n * M : 1) * sizeof *gathered);
        values = malloc((n ? n * M : 1) * sizeof *values);
        if (!gathered || !values)
            st = err_set(PS_ERR_NOMEM, "out of memory");
    }
    if ((st = comm_agree(c, st)) || (st = comm_gatherv(c, mine, n_mine * M * sizeof *mine, gathered, counts)))
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
            memcpy(values + i * M, gathered + base[owner[i]] + M * next[owner[i]]++, M * sizeof *values);
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
    return sweep_prompt_cells(j->components, cfg, v->h.T) * (v->h.T - first + 1) + 1;
}

/* An attribution method's estimates of every cell of pairs [0, n) into vals,
 * in chunk_cells' order (pair, component, grid): one atp_eval_opts per
 * pair, which depends on that pair alone, so any rank count gives the same
 * bits. */
static ps_status eval_atp(const job *j, const model *m, const patch_pair *pairs, size_t n, double *vals)
{
    const atp_opts ao = {patch_method_qk_fix(j->method), j->graddrop};
    ps_status st = PS_OK;
    for (size_t k = 0, w = 0; k < n && st == PS_OK; k++) {
        double *grid[PATCH_COMPONENT_COUNT] = {0};
        for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
            if (j->components[c]) {
                grid[c] = vals + w;
                w += sweep_grid_size((patch_component)c, &m->cfg, pairs[k].T);
            }
        st = atp_eval_opts(m, &pairs[k], j->components, j->metric, j->direction, &ao, grid);
    }
    return st;
}

/* atp+verify: from the estimates of pairs [0, n) (est, eval_atp's layout),
 * the exact values of each grid's top j->verify_top_k cells into out (same
 * layout, NaN at the others): one atp_verify_pair per pair, which depends on
 * that pair alone, so any rank count gives the same bits. */
static ps_status eval_verify(const job *j, const model *m, const patch_pair *pairs, size_t n, size_t fast_rows,
                             double *est, double *out)
{
    const patch_opts po = {.metric = j->metric, .direction = j->direction, .engine = j->engine,
                           .max_rows = fast_rows};
    ps_status st = PS_OK;
    for (size_t k = 0, w = 0; k < n && st == PS_OK; k++) {
        double *eg[PATCH_COMPONENT_COUNT] = {0}, *og[PATCH_COMPONENT_COUNT] = {0};
        for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
            if (j->components[c]) {
                eg[c] = est + w, og[c] = out + w;
                w += sweep_grid_size((patch_component)c, &m->cfg, pairs[k].T);
            }
        st = atp_verify_pair(m, &pairs[k], j->components, &po, j->verify_top_k, eg, og);
    }
    return st;
}

/* Evaluate one chunk by prompt on every rank.  On rank 0, *out holds per
 * prompt, in chunk order, [clean metric, corrupted metric, values...]. */
static ps_status run_chunk_prompts(const job *j, const model *m, comm *c, const unsigned char *buf, size_t bytes,
                                   size_t n_pairs, size_t fast_rows, ablate_sources *ab, double **out,
                                   size_t *n_cells_out)
{
    const size_t ranks = comm_size(c), me = comm_rank(c);
    tok_view *v = calloc(n_pairs ? n_pairs : 1, sizeof *v);
    sweep_cost *items = malloc((n_pairs ? n_pairs : 1) * sizeof *items);
    uint32_t *owner = malloc((n_pairs ? n_pairs : 1) * sizeof *owner);
    size_t *counts = calloc(ranks, sizeof *counts), *base = calloc(ranks, sizeof *base);
    patch_pair *pairs = calloc(n_pairs ? n_pairs : 1, sizeof *pairs);
    patch_cell *cells = NULL;
    double *vals = NULL, *second = NULL, *mine = NULL, *gathered = NULL;
    size_t n_mine = 0, n_cells = 0, n_total = 0, n_chunk_cells = 0;
    /* the second grid: atp+exact: exact vals, estimates second; atp+verify: estimates vals, verified second */
    const bool both = sweep_method_both(j), verify = patch_method_verifies(j->method), two = sweep_has_second_grid(j);
    const size_t M = sweep_metric_count(j);
    ps_status st = PS_OK;
    if (!v || !items || !owner || !counts || !base || !pairs) {
        st = err_set(PS_ERR_NOMEM, "out of memory");
        goto agree;
    }
    if ((st = tok_unpack(buf, bytes, n_pairs, v)))
        goto agree;
    for (size_t k = 0; k < n_pairs; k++)
        items[k] = (sweep_cost){prompt_cost(j, &m->cfg, &v[k]), k};
    if ((st = sweep_deal(items, n_pairs, ranks, owner)))
        goto agree;
    for (size_t k = 0; k < n_pairs; k++) {
        const size_t nv = sweep_prompt_values(j, &m->cfg, v[k].h.T);
        counts[owner[k]] += nv * sizeof(double);
        n_total += nv;
        n_chunk_cells += sweep_prompt_cells(j->components, &m->cfg, v[k].h.T);
    }
    /* this rank's prompts, in chunk order */
    for (size_t k = 0; k < n_pairs && st == PS_OK; k++)
        if (owner[k] == me) {
            st = patch_pair_init(&pairs[n_mine], m, v[k].clean, v[k].corrupted, v[k].h.T, v[k].h.answer,
                                 v[k].h.wrong);
            n_mine += st == PS_OK;
            if (st == PS_OK)
                st = ablate_sources_attach(ab, &pairs[n_mine - 1], k);
        }
    if (st || (st = chunk_cells(j, &m->cfg, pairs, n_mine, &cells, &n_cells)))
        goto agree;
    vals = malloc((n_cells ? n_cells * M : 1) * sizeof *vals);
    mine = malloc((counts[me] ? counts[me] : 1));
    if (two)
        second = malloc((n_cells ? n_cells : 1) * sizeof *second);
    if (!vals || !mine || (two && !second)) {
        st = err_set(PS_ERR_NOMEM, "out of memory");
        goto agree;
    }
    patch_opts po = {.metric = j->metric, .direction = j->direction, .engine = j->engine, .max_rows = fast_rows,
                     .metrics = j->metrics};
    if (eval_fault())
        st = err_set(PS_ERR_IO, "injected fault at chunk_eval");
    if (st == PS_OK)
        st = both                                  ? eval_atp(j, m, pairs, n_mine, second)
             : patch_method_estimates(j->method) ? eval_atp(j, m, pairs, n_mine, vals)
                                                 : PS_OK;
    if (st || (patch_method_runs_exact(j->method) && (st = patch_eval(m, pairs, n_mine, cells, n_cells, &po, vals))) ||
        (verify && (st = eval_verify(j, m, pairs, n_mine, fast_rows, vals, second))))
        goto agree;
    for (size_t i = 0, w = 0, r = 0; i < n_mine; i++) {
        const size_t nv = sweep_prompt_cells(j->components, &m->cfg, pairs[i].T);
        prompt_record(j, &m->cfg, &pairs[i], nv, vals + r * M, two ? second + r : NULL, mine + w);
        w += sweep_prompt_values(j, &m->cfg, pairs[i].T), r += nv;
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
            const size_t nv = sweep_prompt_values(j, &m->cfg, v[k].h.T);
            memcpy(ordered + w, gathered + base[owner[k]], nv * sizeof *ordered);
            base[owner[k]] += nv;
            w += nv;
        }
        *out = ordered;
    }
    *n_cells_out = n_chunk_cells;
out:
    for (size_t i = 0; pairs && i < n_mine; i++)
        patch_pair_free(&pairs[i]);
    free(v), free(items), free(owner), free(counts), free(base), free(pairs), free(cells), free(vals), free(second),
        free(mine), free(gathered);
    return st;
}

/* ---- the chunk protocol ------------------------------------------------------ */

void sweep_top_ids(const patch_pair *p, size_t V, double out[SWEEP_TOP_K])
{
    /* one pass keeping the K largest in order: K x V comparisons at worst,
     * ~0.5 M for GPT-2's vocabulary, once per prompt */
    int64_t id[SWEEP_TOP_K];
    float lp[SWEEP_TOP_K];
    size_t n = 0;
    for (size_t i = 0; i < V; i++) {
        float x = p->clean_logprobs[i];
        if (x != x || (n == SWEEP_TOP_K && !(x > lp[n - 1])))
            continue; /* NaN, or not above the K-th */
        size_t k = n < SWEEP_TOP_K ? n++ : SWEEP_TOP_K - 1;
        for (; k > 0 && x > lp[k - 1]; k--) {
            lp[k] = lp[k - 1];
            id[k] = id[k - 1];
        }
        lp[k] = x;
        id[k] = (int64_t)i;
    }
    for (size_t k = 0; k < SWEEP_TOP_K; k++)
        out[k] = k < n ? (double)id[k] : -1.0;
}

bool sweep_dist_by_prompt(const job *j, size_t n_pairs, size_t work_chunk, size_t ranks)
{
    /* attribution methods: by prompt always (job.c refuses distribute = cells with them) */
    return j->distribute == JOB_DISTRIBUTE_PROMPTS || patch_method_estimates(j->method) ||
           (j->distribute == JOB_DISTRIBUTE_AUTO && (n_pairs > work_chunk || n_pairs >= 4 * ranks));
}

void sweep_chunk_free(sweep_chunk *ch)
{
    free(ch->values);
    memset(ch, 0, sizeof *ch);
}

/* Rank 0, by cell: per prompt its values (sweep_prompt_values) from the
 * pairs' metrics and the cells' values (in pair order, M per cell). */
static ps_status interleave_metrics(const job *j, const model_config *cfg, const patch_pair *pairs, size_t n_pairs,
                                    const double *values, double **out)
{
    size_t n = 0;
    const size_t M = sweep_metric_count(j);
    for (size_t k = 0; k < n_pairs; k++)
        n += sweep_prompt_values(j, cfg, pairs[k].T);
    double *v = malloc((n ? n : 1) * sizeof *v);
    if (!v)
        return err_set(PS_ERR_NOMEM, "out of memory");
    for (size_t k = 0, w = 0, r = 0; k < n_pairs; k++) {
        const size_t nv = sweep_prompt_cells(j->components, cfg, pairs[k].T);
        prompt_record(j, cfg, &pairs[k], nv, values + r * M, NULL, v + w);
        w += sweep_prompt_values(j, cfg, pairs[k].T), r += nv;
    }
    *out = v;
    return PS_OK;
}

ps_status sweep_dist_chunk(const job *j, const model *m, comm *c, const dataset_tokens *tk, size_t n_pairs,
                           size_t work_chunk, size_t fast_rows, sweep_chunk *out)
{
    return sweep_dist_chunk_ablate(j, m, c, tk, n_pairs, work_chunk, fast_rows, NULL, out);
}

ps_status sweep_dist_chunk_ablate(const job *j, const model *m, comm *c, const dataset_tokens *tk, size_t n_pairs,
                                  size_t work_chunk, size_t fast_rows, ablate_sources *ab, sweep_chunk *out)
{
    memset(out, 0, sizeof *out);
    const bool root = comm_rank(c) == 0;
    chunk_header hdr = {0};
    unsigned char *buf = NULL;
    uint64_t *sizes = NULL;   /* by cell: packed size of each pair */
    patch_pair *pairs = NULL; /* by cell: [n_alloc], zeroed until run */
    size_t n_alloc = 0;
    double *values = NULL;    /* root: per prompt (by prompt) or per cell (by cell) */
    size_t n_cells = 0;
    ps_status st = PS_OK;
    if (root) {
        hdr.by_prompt = sweep_dist_by_prompt(j, n_pairs, work_chunk, comm_size(c));
        if (hdr.by_prompt) {
            /* their token ids */
            for (size_t k = 0; k < n_pairs; k++)
                hdr.bytes += tok_bytes(tk[k].n_tokens);
            if (n_pairs && !(buf = malloc(hdr.bytes)))
                st = err_set(PS_ERR_NOMEM, "cannot allocate %zu bytes for the chunk's tokens", (size_t)hdr.bytes);
            for (size_t k = 0, off = 0; st == PS_OK && k < n_pairs; k++) {
                tok_pack(&tk[k], buf + off);
                off += tok_bytes(tk[k].n_tokens);
            }
        } else {
            /* run them here */
            pairs = calloc(n_pairs ? n_pairs : 1, sizeof *pairs);
            sizes = malloc((n_pairs ? n_pairs : 1) * sizeof *sizes);
            if (!pairs || !sizes)
                st = err_set(PS_ERR_NOMEM, "out of memory");
            n_alloc = pairs ? n_pairs : 0;
            for (size_t k = 0; st == PS_OK && k < n_pairs; k++) {
                const dataset_tokens *t = &tk[k];
                st = patch_pair_init(&pairs[k], m, t->clean_ids, t->corrupted_ids, t->n_tokens, t->answer_id,
                                     t->wrong_id);
                sizes[k] = patch_pair_packed_bytes(&m->cfg, t->n_tokens);
                if (sizes[k] > hdr.max_bytes)
                    hdr.max_bytes = sizes[k];
            }
        }
        hdr.n_pairs = st == PS_OK ? n_pairs : 0;
    }
    if ((st = comm_agree(c, st)) || (st = comm_bcast(c, &hdr, sizeof hdr)) || hdr.n_pairs == 0)
        goto out;
    if (hdr.by_prompt) {
        if (!root && !(buf = malloc(hdr.bytes)))
            st = err_set(PS_ERR_NOMEM, "cannot allocate %llu bytes for the chunk's tokens",
                         (unsigned long long)hdr.bytes);
        if ((st = comm_agree(c, st)) || (st = comm_bcast(c, buf, hdr.bytes)))
            goto out;
        st = run_chunk_prompts(j, m, c, buf, hdr.bytes, hdr.n_pairs, fast_rows, ab, &values, &n_cells);
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
            goto out;
        /* A rank whose unpacking failed still takes part in every bcast. */
        for (size_t k = 0; k < n_pairs; k++) {
            if (root)
                patch_pair_pack(&pairs[k], buf);
            ps_status bst = comm_bcast(c, buf, sizes[k]);
            if (bst) {
                st = bst;
                goto out;
            }
            if (!root && st == PS_OK)
                st = patch_pair_unpack(&pairs[k], &m->cfg, buf);
        }
        /* the ablation's replacement values are each rank's own (never packed) */
        for (size_t k = 0; k < n_pairs && st == PS_OK; k++)
            st = ablate_sources_attach(ab, &pairs[k], k);
        if ((st = comm_agree(c, st)) == PS_OK)
            st = run_chunk(j, m, c, pairs, n_pairs, fast_rows, &values, &n_cells);
        if (st == PS_OK && root) {
            double *per_prompt = NULL;
            st = interleave_metrics(j, &m->cfg, pairs, n_pairs, values, &per_prompt);
            free(values);
            values = per_prompt;
        }
    }
    if (st == PS_OK) {
        out->n_pairs = hdr.n_pairs;
        out->by_prompt = hdr.by_prompt;
        out->n_cells = n_cells;
        out->values = values;
        values = NULL;
    }
out:
    free(values);
    free(buf);
    free(sizes);
    for (size_t k = 0; k < n_alloc; k++)
        patch_pair_free(&pairs[k]);
    free(pairs);
    return st;
}
