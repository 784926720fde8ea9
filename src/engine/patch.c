#include "patch.h"

#include "gemm.h"
#include "pool.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- names, grids, cells ------------------------------------------------- */

static const char *const component_names[PATCH_COMPONENT_COUNT] = {
    [PATCH_RESID_PRE] = "resid_pre",         [PATCH_RESID_MID] = "resid_mid",
    [PATCH_ATTN_OUT] = "attn_out",           [PATCH_MLP_OUT] = "mlp_out",
    [PATCH_Z] = "z",                         [PATCH_Z_ALL_POS] = "z_all_pos",
    [PATCH_Q_ALL_POS] = "q_all_pos",         [PATCH_K_ALL_POS] = "k_all_pos",
    [PATCH_V_ALL_POS] = "v_all_pos",         [PATCH_PATTERN_ALL_POS] = "pattern_all_pos",
};
static const char *const metric_names[PATCH_METRIC_COUNT] = {
    [PATCH_LOGIT_DIFF] = "logit_diff", [PATCH_PROB] = "prob", [PATCH_LOGPROB] = "logprob", [PATCH_KL] = "kl"};

const char *patch_component_name(patch_component c) { return component_names[c]; }
const char *patch_metric_name(patch_metric m) { return metric_names[m]; }

ps_status patch_metric_parse(const char *s, patch_metric *m)
{
    for (int i = 0; i < PATCH_METRIC_COUNT; i++)
        if (!strcmp(s, metric_names[i])) {
            *m = (patch_metric)i;
            return PS_OK;
        }
    return err_set(PS_ERR_INVALID, "unknown metric '%s' (logit_diff, prob, logprob or kl)", s);
}

static bool is_all_pos(patch_component c) { return c >= PATCH_Z_ALL_POS; }

ps_status patch_components_parse(const char *list, bool on[PATCH_COMPONENT_COUNT])
{
    memset(on, 0, PATCH_COMPONENT_COUNT * sizeof *on);
    size_t n_on = 0;
    const char *p = list;
    while (*p) {
        size_t len = strcspn(p, ",");
        char name[64];
        if (len == 0 || len >= sizeof name)
            return err_set(PS_ERR_INVALID, "bad component list '%s'", list);
        memcpy(name, p, len);
        name[len] = '\0';
        bool found = false;
        if (!strcmp(name, "block_every")) {
            on[PATCH_RESID_PRE] = on[PATCH_ATTN_OUT] = on[PATCH_MLP_OUT] = found = true;
        } else if (!strcmp(name, "head_all_pos_every")) {
            for (int c = PATCH_Z_ALL_POS; c <= PATCH_PATTERN_ALL_POS; c++)
                on[c] = true;
            found = true;
        } else {
            for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
                if (!strcmp(name, component_names[c]))
                    on[c] = found = true;
        }
        if (!found)
            return err_set(PS_ERR_INVALID,
                           "unknown component '%s' (resid_pre, resid_mid, attn_out, mlp_out, z, z_all_pos, "
                           "q_all_pos, k_all_pos, v_all_pos, pattern_all_pos, block_every, head_all_pos_every)",
                           name);
        p += len;
        if (*p == ',')
            p++;
    }
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        n_on += on[c];
    if (n_on == 0)
        return err_set(PS_ERR_INVALID, "empty component list");
    return PS_OK;
}

size_t patch_grid_shape(patch_component c, const model_config *cfg, size_t T, size_t shape[3],
                        const char *dim_names[3])
{
    const char *dn[3] = {"layer", "position", "head"};
    shape[0] = cfg->n_layer;
    size_t nd;
    if (c == PATCH_Z) {
        shape[1] = T, shape[2] = cfg->n_head, nd = 3;
    } else if (is_all_pos(c)) {
        shape[1] = cfg->n_head, dn[1] = "head", nd = 2;
    } else {
        shape[1] = T, nd = 2;
    }
    if (dim_names)
        for (size_t i = 0; i < 3; i++)
            dim_names[i] = i < nd ? dn[i] : NULL;
    return nd;
}

ps_status patch_grid_cells(patch_component c, const model_config *cfg, uint32_t pair, size_t T,
                           patch_cell **cells, size_t *n)
{
    size_t shape[3];
    size_t nd = patch_grid_shape(c, cfg, T, shape, NULL);
    size_t total = shape[0] * shape[1] * (nd == 3 ? shape[2] : 1);
    patch_cell *out = malloc(total * sizeof *out);
    if (!out)
        return err_set(PS_ERR_NOMEM, "cannot allocate %zu patching cells", total);
    size_t k = 0;
    for (size_t l = 0; l < shape[0]; l++)
        for (size_t i = 0; i < shape[1]; i++)
            for (size_t j = 0; j < (nd == 3 ? shape[2] : 1); j++) {
                patch_cell *cell = &out[k++];
                *cell = (patch_cell){.pair = pair, .component = (uint16_t)c, .layer = (uint16_t)l};
                if (c == PATCH_Z)
                    cell->position = (uint16_t)i, cell->head = (uint16_t)j;
                else if (is_all_pos(c))
                    cell->head = (uint16_t)i;
                else
                    cell->position = (uint16_t)i;
            }
    *cells = out;
    *n = total;
    return PS_OK;
}

/* ---- metrics ------------------------------------------------------------- */


/* The metric of one logits row; lse = logsumexp(logits), or NAN to have it
 * computed here when the metric needs it (logit_diff never does). */
static double metric_with_lse(const float *logits, size_t V, int32_t answer, int32_t wrong,
                              const float *clean_logprobs, patch_metric metric, double lse)
{
    if (metric != PATCH_LOGIT_DIFF && isnan(lse))
        lse = forward_logsumexp(logits, V);
    switch (metric) {
    case PATCH_LOGIT_DIFF:
        return (double)logits[answer] - (double)logits[wrong];
    case PATCH_PROB:
        return exp((double)logits[answer] - lse);
    case PATCH_LOGPROB:
        return (double)logits[answer] - lse;
    case PATCH_KL: {
        /* KL(clean || patched) = sum_i p_c(i) (log p_c(i) - log p(i)) */
        double kl = 0.0;
        for (size_t i = 0; i < V; i++) {
            double lc = clean_logprobs[i];
            kl += exp(lc) * (lc - ((double)logits[i] - lse));
        }
        return kl;
    }
    case PATCH_METRIC_COUNT:
        break;
    }
    return NAN;
}

static double metric_from_logits(const float *logits, size_t V, int32_t answer, int32_t wrong,
                                 const float *clean_logprobs, patch_metric metric)
{
    return metric_with_lse(logits, V, answer, wrong, clean_logprobs, metric, NAN);
}

double patch_normalize(const patch_pair *p, patch_metric metric, double patched)
{
    double c = p->clean_metric[metric], r = p->corrupted_metric[metric];
    if (c == r)
        return NAN;
    return (patched - r) / (c - r);
}

ps_status patch_pair_init(patch_pair *p, const model *m, const int32_t *clean, const int32_t *corrupted,
                          size_t T, int32_t answer, int32_t wrong)
{
    memset(p, 0, sizeof *p);
    const size_t V = m->cfg.vocab_size;
    if (answer < 0 || (size_t)answer >= V || wrong < 0 || (size_t)wrong >= V)
        return err_set(PS_ERR_RANGE, "answer id %d or wrong id %d is outside the vocabulary (%zu)", answer, wrong, V);
    ps_status st;
    if ((st = forward_cache_init(&p->clean, &m->cfg, T, FORWARD_LOGITS_LAST)) ||
        (st = forward_cache_init(&p->corrupted, &m->cfg, T, FORWARD_LOGITS_LAST)) ||
        (st = forward_run(m, &p->clean, clean, T, NULL)) ||
        (st = forward_run(m, &p->corrupted, corrupted, T, NULL))) {
        patch_pair_free(p);
        return st;
    }
    p->clean_logprobs = malloc(V * sizeof *p->clean_logprobs);
    if (!p->clean_logprobs) {
        patch_pair_free(p);
        return err_set(PS_ERR_NOMEM, "out of memory");
    }
    /* one logsumexp per run serves every metric */
    const double lse_clean = forward_logsumexp(p->clean.logits, V), lse_corrupted = forward_logsumexp(p->corrupted.logits, V);
    for (size_t i = 0; i < V; i++)
        p->clean_logprobs[i] = (float)((double)p->clean.logits[i] - lse_clean);
    p->T = T;
    p->answer = answer;
    p->wrong = wrong;
    for (int k = 0; k < PATCH_METRIC_COUNT; k++) {
        p->clean_metric[k] = metric_with_lse(p->clean.logits, V, answer, wrong, p->clean_logprobs, k, lse_clean);
        p->corrupted_metric[k] =
            metric_with_lse(p->corrupted.logits, V, answer, wrong, p->clean_logprobs, k, lse_corrupted);
    }
    /* The engines read the caches' core alone: return the rest (LayerNorm
     * outputs, the MLP hidden layer: about half of a cache) now. */
    forward_cache_trim(&p->clean);
    forward_cache_trim(&p->corrupted);
    return PS_OK;
}

void patch_pair_free(patch_pair *p)
{
    forward_cache_free(&p->clean);
    forward_cache_free(&p->corrupted);
    free(p->clean_logprobs);
    memset(p, 0, sizeof *p);
}

/* Image layout: u64 T | i32 answer, wrong | f64 clean_metric[M], corrupted_metric[M]
 * | i32 clean tokens[T], corrupted tokens[T] | f32 clean_logprobs[V]
 * | f32 clean core[C] | f32 corrupted core[C], C = core floats of a T-token cache. */
static size_t core_floats_for(const model_config *cfg, size_t T)
{
    const size_t d = cfg->n_embd;
    return 3 * T * d + cfg->n_layer * (9 * T * d + cfg->n_head * T * T);
}

size_t patch_pair_packed_bytes(const model_config *cfg, size_t T)
{
    return sizeof(uint64_t) + 2 * sizeof(int32_t) + 2 * PATCH_METRIC_COUNT * sizeof(double) +
           2 * T * sizeof(int32_t) + cfg->vocab_size * sizeof(float) + 2 * core_floats_for(cfg, T) * sizeof(float);
}

#define PUT(ptr, n)                   \
    do {                              \
        memcpy(w, (ptr), (n));        \
        w += (n);                     \
    } while (0)
#define GET(ptr, n)                   \
    do {                              \
        memcpy((ptr), r, (n));        \
        r += (n);                     \
    } while (0)

void patch_pair_pack(const patch_pair *p, void *buf)
{
    const model_config *cfg = &p->clean.cfg;
    const size_t core = core_floats_for(cfg, p->T);
    unsigned char *w = buf;
    uint64_t T = p->T;
    PUT(&T, sizeof T);
    PUT(&p->answer, sizeof p->answer);
    PUT(&p->wrong, sizeof p->wrong);
    PUT(p->clean_metric, sizeof p->clean_metric);
    PUT(p->corrupted_metric, sizeof p->corrupted_metric);
    PUT(p->clean.tokens, p->T * sizeof(int32_t));
    PUT(p->corrupted.tokens, p->T * sizeof(int32_t));
    PUT(p->clean_logprobs, cfg->vocab_size * sizeof(float));
    PUT(p->clean.arena, core * sizeof(float));
    PUT(p->corrupted.arena, core * sizeof(float));
}

size_t patch_pair_packed_T(const void *buf)
{
    uint64_t T;
    memcpy(&T, buf, sizeof T);
    return (size_t)T;
}

ps_status patch_pair_unpack(patch_pair *p, const model_config *cfg, const void *buf)
{
    memset(p, 0, sizeof *p);
    const unsigned char *r = buf;
    uint64_t T;
    GET(&T, sizeof T);
    ps_status st;
    if ((st = forward_cache_init(&p->clean, cfg, (size_t)T, FORWARD_LOGITS_LAST)) ||
        (st = forward_cache_init(&p->corrupted, cfg, (size_t)T, FORWARD_LOGITS_LAST))) {
        patch_pair_free(p);
        return st;
    }
    p->clean_logprobs = malloc(cfg->vocab_size * sizeof *p->clean_logprobs);
    if (!p->clean_logprobs) {
        patch_pair_free(p);
        return err_set(PS_ERR_NOMEM, "out of memory");
    }
    const size_t core = core_floats_for(cfg, (size_t)T);
    p->T = p->clean.T = p->corrupted.T = (size_t)T;
    GET(&p->answer, sizeof p->answer);
    GET(&p->wrong, sizeof p->wrong);
    GET(p->clean_metric, sizeof p->clean_metric);
    GET(p->corrupted_metric, sizeof p->corrupted_metric);
    GET(p->clean.tokens, p->T * sizeof(int32_t));
    GET(p->corrupted.tokens, p->T * sizeof(int32_t));
    GET(p->clean_logprobs, cfg->vocab_size * sizeof(float));
    GET(p->clean.arena, core * sizeof(float));
    GET(p->corrupted.arena, core * sizeof(float));
    return PS_OK;
}
#undef PUT
#undef GET

static const forward_cache *base_of(const patch_pair *p, patch_direction dir)
{
    return dir == PATCH_DENOISE ? &p->corrupted : &p->clean;
}
static const forward_cache *source_of(const patch_pair *p, patch_direction dir)
{
    return dir == PATCH_DENOISE ? &p->clean : &p->corrupted;
}

/* The cached array a component patches, at block `layer`. */
static const float *component_array(const forward_cache *c, patch_component comp, size_t layer)
{
    const forward_layer *ly = &c->layers[layer];
    switch (comp) {
    case PATCH_RESID_PRE: return ly->resid_pre;
    case PATCH_RESID_MID: return ly->resid_mid;
    case PATCH_ATTN_OUT: return ly->attn_out;
    case PATCH_MLP_OUT: return ly->mlp_out;
    case PATCH_Z:
    case PATCH_Z_ALL_POS: return ly->z;
    case PATCH_Q_ALL_POS: return ly->q;
    case PATCH_K_ALL_POS: return ly->k;
    case PATCH_V_ALL_POS: return ly->v;
    case PATCH_PATTERN_ALL_POS: return ly->pattern;
    case PATCH_COMPONENT_COUNT: break;
    }
    return NULL;
}

static hook_kind component_hook(patch_component comp)
{
    static const hook_kind k[PATCH_COMPONENT_COUNT] = {
        [PATCH_RESID_PRE] = HOOK_RESID_PRE, [PATCH_RESID_MID] = HOOK_RESID_MID, [PATCH_ATTN_OUT] = HOOK_ATTN_OUT,
        [PATCH_MLP_OUT] = HOOK_MLP_OUT,     [PATCH_Z] = HOOK_Z,                 [PATCH_Z_ALL_POS] = HOOK_Z,
        [PATCH_Q_ALL_POS] = HOOK_Q,         [PATCH_K_ALL_POS] = HOOK_K,         [PATCH_V_ALL_POS] = HOOK_V,
        [PATCH_PATTERN_ALL_POS] = HOOK_PATTERN,
    };
    return k[comp];
}

/* The slice a cell overwrites, as (offset, length) runs over the component's
 * array: one run for position components, one per row for per-head ones. */
typedef struct {
    size_t first, count, stride, len; /* runs at first + i*stride, i < count, each len floats */
} cell_slice;

static cell_slice slice_of(const patch_cell *cell, const model_config *cfg, size_t T)
{
    const size_t d = cfg->n_embd, dh = cfg->d_head, h = cell->head, p = cell->position;
    switch ((patch_component)cell->component) {
    case PATCH_Z: return (cell_slice){p * d + h * dh, 1, 0, dh};
    case PATCH_Z_ALL_POS:
    case PATCH_Q_ALL_POS:
    case PATCH_K_ALL_POS:
    case PATCH_V_ALL_POS: return (cell_slice){h * dh, T, d, dh};
    case PATCH_PATTERN_ALL_POS: return (cell_slice){h * T * T, T, T, T};
    default: return (cell_slice){p * d, 1, 0, d};
    }
}

/* ---- naive engine -------------------------------------------------------- */

typedef struct {
    const patch_cell *cell;
    const float *src;      /* the source's array for the cell's hook */
    cell_slice slice;
} naive_ctx;

static ps_status naive_hook(void *user, hook_point hp, float *act, const size_t *shape, size_t ndim)
{
    (void)shape, (void)ndim;
    naive_ctx *nc = user;
    if (hp.kind != component_hook((patch_component)nc->cell->component) || hp.layer != nc->cell->layer)
        return PS_OK;
    const cell_slice *s = &nc->slice;
    for (size_t i = 0; i < s->count; i++) {
        size_t o = s->first + i * s->stride;
        memcpy(act + o, nc->src + o, s->len * sizeof *act);
    }
    return PS_OK;
}

static ps_status eval_naive(const model *m, const patch_pair *pairs, const patch_cell *cells, size_t n_cells,
                            const patch_opts *opts, double *values)
{
    forward_cache run = {0};
    size_t cap = 0;
    ps_status st = PS_OK;
    for (size_t i = 0; i < n_cells && st == PS_OK; i++) {
        const patch_pair *p = &pairs[cells[i].pair];
        if (p->T > cap) {
            forward_cache_free(&run);
            if ((st = forward_cache_init(&run, &m->cfg, p->T, FORWARD_LOGITS_LAST)) != PS_OK)
                break;
            cap = p->T;
        }
        const forward_cache *base = base_of(p, opts->direction), *src = source_of(p, opts->direction);
        naive_ctx nc = {&cells[i], component_array(src, (patch_component)cells[i].component, cells[i].layer),
                        slice_of(&cells[i], &m->cfg, p->T)};
        forward_hooks hooks = {naive_hook, &nc, NULL};
        if ((st = forward_run(m, &run, base->tokens, p->T, &hooks)) != PS_OK)
            break;
        values[i] = metric_from_logits(run.logits, m->cfg.vocab_size, p->answer, p->wrong, p->clean_logprobs,
                                       opts->metric);
    }
    forward_cache_free(&run);
    return st;
}

/* ---- fast engine --------------------------------------------------------- */

/* How a job enters: at the start of block L with row0 replaced (E_PRE), or
 * after a partial block L over its changed rows [row0, row_end). */
typedef enum { E_PRE, E_Z, E_RESID_MID, E_MLP_OUT } entry_kind;

typedef struct {
    size_t cell;             /* index into cells/values */
    const patch_pair *pair;
    const forward_cache *base, *src;
    entry_kind entry;
    size_t layer;            /* the patched block L */
    size_t block0;           /* first block run over the stacked rows (L or L+1) */
    size_t row0, row_end;    /* changed rows of the entry (row_end = T for E_PRE) */
    size_t T;
    size_t off;              /* first row of this job in the stacked buffers */
} fast_job;

/* First row t in [0, T) at which the slice differs bit for bit, T if none. */
static size_t first_changed_row(const patch_cell *cell, const model_config *cfg, const float *a, const float *b,
                                size_t T)
{
    cell_slice s = slice_of(cell, cfg, T);
    for (size_t i = 0; i < s.count; i++) {
        size_t o = s.first + i * s.stride;
        if (memcmp(a + o, b + o, s.len * sizeof *a) != 0)
            return s.count == 1 ? cell->position : i;
    }
    return T;
}

/* Plan a cell: false if it is skipped (its patch changes nothing the metric
 * can see); otherwise fill the job. */
static bool plan_job(const model *m, const patch_pair *p, const patch_cell *cell, patch_direction dir, fast_job *job)
{
    const patch_component comp = (patch_component)cell->component;
    const forward_cache *base = base_of(p, dir), *src = source_of(p, dir);
    const size_t L = cell->layer, T = p->T;
    size_t row0 = first_changed_row(cell, &m->cfg, component_array(base, comp, L), component_array(src, comp, L), T);
    if (row0 >= T)
        return false;
    *job = (fast_job){.pair = p, .base = base, .src = src, .layer = L, .row0 = row0, .T = T};
    switch (comp) {
    case PATCH_RESID_PRE: job->entry = E_PRE; break;
    case PATCH_RESID_MID:
    case PATCH_ATTN_OUT: job->entry = E_RESID_MID; break;
    case PATCH_MLP_OUT: job->entry = E_MLP_OUT; break;
    default: job->entry = E_Z; break;
    }
    job->row_end = (job->entry == E_PRE || is_all_pos(comp)) ? T : row0 + 1;
    job->block0 = job->entry == E_PRE ? L : L + 1;
    /* After the last block only the last row reaches the metric. */
    if (job->block0 == m->cfg.n_layer && job->row_end < T)
        return false;
    return true;
}

patch_plan patch_cell_plan(const model *m, const patch_pair *pairs, const patch_cell *cell, patch_direction dir)
{
    fast_job job;
    if (!plan_job(m, &pairs[cell->pair], cell, dir, &job))
        return (patch_plan){.skipped = true};
    return (patch_plan){.block0 = job.block0, .row0 = job.row0, .row_end = job.row_end};
}

size_t patch_cell_cost(const model *m, const patch_pair *pairs, const patch_cell *cell, patch_direction dir)
{
    patch_plan pl = patch_cell_plan(m, pairs, cell, dir);
    if (pl.skipped)
        return 0;
    return (m->cfg.n_layer - cell->layer) * (pairs[cell->pair].T - pl.row0);
}

/* Causal attention of query rows [qa, qb) of one job, all heads:
 *   z[i, h, :] = sum_{j<=i} softmax_j(q[i,h,:] . k[j,h,:] / sqrt(dh)) v[j,h,:]
 * Rows j < row0 of k/v come from the base run's cache (pk, pv, row j at j*d),
 * rows j >= row0 from the job's own stacked rows (sk, sv, row j at (j-row0)*d).
 * q and z point at query row qa (stride d).  scratch: [T] floats. */
static void attention_job(float *z, const float *q, size_t qa, size_t qb, size_t row0, const float *pk,
                          const float *pv, const float *sk, const float *sv, size_t H, size_t dh, float *scratch)
{
    const size_t d = H * dh;
    const float scale = 1.0f / sqrtf((float)dh);
    for (size_t i = qa; i < qb; i++) {
        const float *qi = q + (i - qa) * d;
        float *zi = z + (i - qa) * d;
        for (size_t h = 0; h < H; h++) {
            const float *qh = qi + h * dh;
            float mx = -INFINITY;
            for (size_t j = 0; j <= i; j++) {
                const float *kj = (j < row0 ? pk + j * d : sk + (j - row0) * d) + h * dh;
                float s = 0.0f;
                for (size_t e = 0; e < dh; e++)
                    s += qh[e] * kj[e];
                s *= scale;
                scratch[j] = s;
                mx = fmaxf(mx, s);
            }
            double sum = 0.0;
            for (size_t j = 0; j <= i; j++) {
                scratch[j] = expf(scratch[j] - mx);
                sum += scratch[j];
            }
            float inv = (float)(1.0 / sum);
            float *zh = zi + h * dh;
            memset(zh, 0, dh * sizeof *zh);
            for (size_t j = 0; j <= i; j++) {
                const float pj = scratch[j] * inv;
                const float *vj = (j < row0 ? pv + j * d : sv + (j - row0) * d) + h * dh;
                for (size_t e = 0; e < dh; e++)
                    zh[e] += pj * vj[e];
            }
        }
    }
}

/* Stacked working rows of a group of jobs. */
typedef struct {
    size_t rows;
    float *x, *a, *q, *k, *v, *z, *h; /* [rows, d] each, h [rows, m] */
    float *scratch;                   /* [threads, n_positions]: attention rows per thread */
    size_t threads;
} fast_buffers;

static ps_status buffers_init(fast_buffers *b, const model_config *cfg, size_t rows)
{
    const size_t d = cfg->n_embd, m = cfg->n_inner, nt = pool_threads();
    float *all = malloc((6 * rows * d + rows * m + nt * cfg->n_positions) * sizeof(float) + sizeof(float));
    if (!all)
        return err_set(PS_ERR_NOMEM, "cannot allocate the fast engine's buffers for %zu rows", rows);
    b->rows = rows;
    b->threads = nt;
    b->x = all;
    b->a = b->x + rows * d;
    b->q = b->a + rows * d;
    b->k = b->q + rows * d;
    b->v = b->k + rows * d;
    b->z = b->v + rows * d;
    b->h = b->z + rows * d;
    b->scratch = b->h + rows * m;
    return PS_OK;
}

static void buffers_free(fast_buffers *b) { free(b->x); }

static void add_into(float *x, const float *y, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] += y[i];
}

/* The row-wise steps between the matrix products run on the pool's threads
 * too: with one thread they would be the serial fraction that caps the
 * engine's speed-up (Amdahl).  Rows are independent, so any split gives
 * the same bits. */
typedef struct {
    float *out;
    const float *x, *w, *bias;
    size_t rows, d;
    float eps;
} ln_task;

static void ln_worker(void *arg, size_t tid, size_t nt)
{
    const ln_task *t = arg;
    const size_t r0 = t->rows * tid / nt, r1 = t->rows * (tid + 1) / nt;
    forward_layernorm(t->out + r0 * t->d, t->x + r0 * t->d, t->w, t->bias, r1 - r0, t->d, t->eps);
}

/* Rows per thread below which a row-wise step stays on one thread. */
#define PAR_MIN_ROWS 8

static void layernorm_rows(float *out, const float *x, const float *w, const float *bias, size_t rows,
                           const model_config *cfg)
{
    ln_task t = {out, x, w, bias, rows, cfg->n_embd, cfg->ln_eps};
    pool_run(rows / PAR_MIN_ROWS + 1, ln_worker, &t);
}

/* Attention of the active jobs: job j's query rows [qa_j, T_j) for every
 * head (attention_job), jobs dealt round-robin to the threads. */
typedef struct {
    const fast_job *jobs;
    size_t n_jobs;
    fast_buffers *b;
    const model_config *cfg;
    size_t layer;
    bool last_row_only; /* last block: one query row per job, stacked at j*d */
} attn_task;

static void attn_worker(void *arg, size_t tid, size_t nt)
{
    const attn_task *t = arg;
    const size_t d = t->cfg->n_embd;
    float *scratch = t->b->scratch + tid * t->cfg->n_positions;
    for (size_t j = tid; j < t->n_jobs; j += nt) {
        const fast_job *jb = &t->jobs[j];
        const forward_layer *bl = &jb->base->layers[t->layer];
        const size_t o = jb->off * d, q = t->last_row_only ? j * d : o;
        attention_job(t->b->z + q, t->b->q + q, t->last_row_only ? jb->T - 1 : jb->row0, jb->T, jb->row0, bl->k,
                      bl->v, t->b->k + o, t->b->v + o, t->cfg->n_head, t->cfg->d_head, scratch);
    }
}

static void attention_jobs(const fast_job *jobs, size_t n_jobs, fast_buffers *b, const model_config *cfg,
                           size_t layer, bool last_row_only)
{
    attn_task t = {jobs, n_jobs, b, cfg, layer, last_row_only};
    pool_run(n_jobs < b->threads ? n_jobs : b->threads, attn_worker, &t);
}

/* x[rows] += MLP(ln_2(x[rows])) of block l; a, h are scratch. */
static void mlp_rows(const model *m, size_t l, float *x, float *a, float *h, float *out, size_t rows)
{
    const model_block *b = &m->blocks[l];
    const size_t d = m->cfg.n_embd;
    layernorm_rows(a, x, b->ln_2_w, b->ln_2_b, rows, &m->cfg);
    gemm_run(h, a, rows, &b->fc_p, b->fc_b, GEMM_GELU);
    gemm_run(out, h, rows, &b->mlp_proj_p, b->mlp_proj_b, GEMM_PLAIN);
    add_into(x, out, rows * d);
}

/* The patched per-head attention of an E_Z job at its block L, for rows
 * [row0, T): writes z rows (all heads) into z (stride d, row row0 first). */
static void entry_attention(const model *m, const patch_cell *cell, const fast_job *job, float *z, float *scratch)
{
    const model_config *cfg = &m->cfg;
    const size_t d = cfg->n_embd, dh = cfg->d_head, T = job->T, h = cell->head, r0 = job->row0;
    const forward_layer *bl = &job->base->layers[job->layer], *sl = &job->src->layers[job->layer];
    const patch_component comp = (patch_component)cell->component;
    /* Start from the base z rows; only head h changes. */
    memcpy(z, bl->z + r0 * d, (job->row_end - r0) * d * sizeof *z);
    if (comp == PATCH_Z || comp == PATCH_Z_ALL_POS) {
        for (size_t i = r0; i < job->row_end; i++)
            memcpy(z + (i - r0) * d + h * dh, sl->z + i * d + h * dh, dh * sizeof *z);
        return;
    }
    const float scale = 1.0f / sqrtf((float)dh);
    const float *q = comp == PATCH_Q_ALL_POS ? sl->q : bl->q;
    const float *k = comp == PATCH_K_ALL_POS ? sl->k : bl->k;
    const float *v = comp == PATCH_V_ALL_POS ? sl->v : bl->v;
    for (size_t i = r0; i < T; i++) {
        const float *p;
        if (comp == PATCH_PATTERN_ALL_POS) {
            p = sl->pattern + (h * T + i) * T;
        } else {
            /* pattern[h, i, :] from the (patched) q and k of head h */
            float mx = -INFINITY;
            for (size_t j = 0; j <= i; j++) {
                float s = 0.0f;
                for (size_t e = 0; e < dh; e++)
                    s += q[i * d + h * dh + e] * k[j * d + h * dh + e];
                scratch[j] = s * scale;
                mx = fmaxf(mx, scratch[j]);
            }
            double sum = 0.0;
            for (size_t j = 0; j <= i; j++) {
                scratch[j] = expf(scratch[j] - mx);
                sum += scratch[j];
            }
            float inv = (float)(1.0 / sum);
            for (size_t j = 0; j <= i; j++)
                scratch[j] *= inv;
            for (size_t j = i + 1; j < T; j++)
                scratch[j] = 0.0f;
            p = scratch;
        }
        float *zh = z + (i - r0) * d + h * dh;
        memset(zh, 0, dh * sizeof *zh);
        for (size_t j = 0; j < T; j++) {
            if (p[j] == 0.0f)
                continue;
            for (size_t e = 0; e < dh; e++)
                zh[e] += p[j] * v[j * d + h * dh + e];
        }
    }
}

static int cmp_job_block(const void *a, const void *b)
{
    const fast_job *x = a, *y = b;
    if (x->block0 != y->block0)
        return x->block0 < y->block0 ? -1 : 1;
    return x->cell < y->cell ? -1 : x->cell > y->cell;
}

/* Run one group of jobs (sorted by block0) whose rows fit the buffers. */
static ps_status run_group(const model *m, const patch_cell *cells, fast_job *jobs, size_t nj,
                           const patch_opts *opts, fast_buffers *b, double *values)
{
    const model_config *cfg = &m->cfg;
    const size_t d = cfg->n_embd, L = cfg->n_layer, V = cfg->vocab_size;
    size_t rows = 0;
    for (size_t j = 0; j < nj; j++) {
        jobs[j].off = rows;
        rows += jobs[j].T - jobs[j].row0;
    }

    /* 1. Entry: each job's residual rows [row0, T) at the start of block0. */
    for (size_t j = 0; j < nj; j++) {
        const fast_job *jb = &jobs[j];
        const forward_layer *bl = &jb->base->layers[jb->layer], *sl = &jb->src->layers[jb->layer];
        float *x = b->x + jb->off * d;
        const size_t n = jb->T - jb->row0, r0 = jb->row0;
        if (jb->entry == E_PRE) {
            memcpy(x, bl->resid_pre + r0 * d, n * d * sizeof *x);
            memcpy(x, sl->resid_pre + r0 * d, d * sizeof *x);
        } else {
            /* Unchanged rows keep the base block output; changed rows are
             * rebuilt below, partial block L batched per layer. */
            memcpy(x, bl->resid_post + r0 * d, n * d * sizeof *x);
        }
    }
    /* Partial block L, batched over the jobs entering at each layer:
     * E_Z: z rows -> attn_out = z W_O + b_O; resid_mid = resid_pre + attn_out
     * E_RESID_MID: resid_mid = base resid_pre + source attn_out, or the
     *              source resid_mid itself;
     * E_MLP_OUT: resid_post = base resid_mid + source mlp_out (no MLP)
     * then resid_post = resid_mid + MLP(resid_mid) for the changed rows. */
    for (size_t l = 0; l < L; l++) {
        size_t r = 0;
        for (size_t j = 0; j < nj; j++) {
            const fast_job *jb = &jobs[j];
            if (jb->entry == E_PRE || jb->layer != l)
                continue;
            const patch_cell *cell = &cells[jb->cell];
            const forward_layer *bl = &jb->base->layers[l], *sl = &jb->src->layers[l];
            const size_t n = jb->row_end - jb->row0, r0 = jb->row0;
            if (jb->entry == E_MLP_OUT) {
                float *x = b->x + jb->off * d;
                for (size_t e = 0; e < d; e++)
                    x[e] = bl->resid_mid[r0 * d + e] + sl->mlp_out[r0 * d + e];
                continue;
            }
            float *a = b->a + r * d; /* resid_mid rows of this layer's batch */
            if (jb->entry == E_Z) {
                entry_attention(m, cell, jb, b->z + r * d, b->scratch);
            } else if (cell->component == PATCH_ATTN_OUT) {
                for (size_t e = 0; e < d; e++)
                    a[e] = bl->resid_pre[r0 * d + e] + sl->attn_out[r0 * d + e];
            } else {
                memcpy(a, sl->resid_mid + r0 * d, d * sizeof *a);
            }
            r += n;
        }
        if (r == 0)
            continue;
        /* attn_out of the E_Z rows (q holds it), one sgemm for the layer */
        const model_block *blk = &m->blocks[l];
        gemm_run(b->q, b->z, r, &blk->attn_proj_p, blk->attn_proj_b, GEMM_PLAIN);
        r = 0;
        for (size_t j = 0; j < nj; j++) {
            const fast_job *jb = &jobs[j];
            if (jb->entry == E_PRE || jb->entry == E_MLP_OUT || jb->layer != l)
                continue;
            const size_t n = jb->row_end - jb->row0, r0 = jb->row0;
            if (jb->entry == E_Z)
                for (size_t e = 0; e < n * d; e++)
                    b->a[r * d + e] = jb->base->layers[l].resid_pre[r0 * d + e] + b->q[r * d + e];
            r += n;
        }
        /* resid_post = resid_mid + MLP(ln_2(resid_mid)) over all r rows */
        memcpy(b->v, b->a, r * d * sizeof(float));
        mlp_rows(m, l, b->v, b->k, b->h, b->q, r);
        r = 0;
        for (size_t j = 0; j < nj; j++) {
            const fast_job *jb = &jobs[j];
            if (jb->entry == E_PRE || jb->entry == E_MLP_OUT || jb->layer != l)
                continue;
            const size_t n = jb->row_end - jb->row0;
            memcpy(b->x + jb->off * d, b->v + r * d, n * d * sizeof(float));
            r += n;
        }
    }

    /* 2. Blocks: at block l the active jobs are the prefix with block0 <= l. */
    size_t active = 0, arows = 0;
    for (size_t l = 0; l < L; l++) {
        while (active < nj && jobs[active].block0 <= l) {
            arows += jobs[active].T - jobs[active].row0;
            active++;
        }
        if (active == 0)
            continue;
        const model_block *blk = &m->blocks[l];
        const bool last = l + 1 == L;
        layernorm_rows(b->a, b->x, blk->ln_1_w, blk->ln_1_b, arows, cfg);
        gemm_run(b->k, b->a, arows, &blk->k_w, blk->attn_b + d, GEMM_PLAIN);
        gemm_run(b->v, b->a, arows, &blk->v_w, blk->attn_b + 2 * d, GEMM_PLAIN);
        if (!last) {
            gemm_run(b->q, b->a, arows, &blk->q_w, blk->attn_b, GEMM_PLAIN);
            attention_jobs(jobs, active, b, cfg, l, false);
            gemm_run(b->q, b->z, arows, &blk->attn_proj_p, blk->attn_proj_b, GEMM_PLAIN);
            add_into(b->x, b->q, arows * d);
            mlp_rows(m, l, b->x, b->a, b->h, b->q, arows);
        } else {
            /* Last block: only each job's last row feeds the metric, but its
             * attention reads every row's key and value (computed above).
             * Gather the last rows' ln_1 output and residual. */
            for (size_t j = 0; j < active; j++) {
                const size_t lr = jobs[j].off + jobs[j].T - 1 - jobs[j].row0;
                memcpy(b->z + j * d, b->a + lr * d, d * sizeof(float));
            }
            gemm_run(b->q, b->z, active, &blk->q_w, blk->attn_b, GEMM_PLAIN);
            attention_jobs(jobs, active, b, cfg, l, true);
            /* k now holds attn_out of the last rows, a their residual */
            gemm_run(b->k, b->z, active, &blk->attn_proj_p, blk->attn_proj_b, GEMM_PLAIN);
            for (size_t j = 0; j < active; j++) {
                const size_t lr = jobs[j].off + jobs[j].T - 1 - jobs[j].row0;
                for (size_t e = 0; e < d; e++)
                    b->a[j * d + e] = b->x[lr * d + e] + b->k[j * d + e];
            }
            mlp_rows(m, l, b->a, b->v, b->h, b->q, active);
            for (size_t j = 0; j < active; j++) {
                const size_t lr = jobs[j].off + jobs[j].T - 1 - jobs[j].row0;
                memcpy(b->x + lr * d, b->a + j * d, d * sizeof(float));
            }
        }
    }

    /* 3. Metric from each job's last row: ln_f, then either the two unembedding
     *    rows (logit_diff) or the full vocabulary (the others). */
    for (size_t j = 0; j < nj; j++) {
        const size_t lr = jobs[j].off + jobs[j].T - 1 - jobs[j].row0;
        memcpy(b->z + j * d, b->x + lr * d, d * sizeof(float));
    }
    forward_layernorm(b->a, b->z, m->ln_f_w, m->ln_f_b, nj, d, cfg->ln_eps);
    if (opts->metric == PATCH_LOGIT_DIFF) {
        for (size_t j = 0; j < nj; j++) {
            const patch_pair *p = jobs[j].pair;
            const float *ua = m->unembed + (size_t)p->answer * d, *uw = m->unembed + (size_t)p->wrong * d;
            const float *xa = b->a + j * d;
            /* Same float products as the vocabulary matmul, summed in double. */
            double la = 0.0, lw = 0.0;
            for (size_t e = 0; e < d; e++) {
                la += (double)(xa[e] * ua[e]);
                lw += (double)(xa[e] * uw[e]);
            }
            values[jobs[j].cell] = la - lw;
        }
        return PS_OK;
    }
    float *logits = malloc(V * sizeof *logits);
    if (!logits)
        return err_set(PS_ERR_NOMEM, "out of memory");
    for (size_t j = 0; j < nj; j++) {
        const patch_pair *p = jobs[j].pair;
        gemm_unembed(logits, b->a + j * d, 1, m->unembed, V, d);
        values[jobs[j].cell] =
            metric_from_logits(logits, V, p->answer, p->wrong, p->clean_logprobs, opts->metric);
    }
    free(logits);
    return PS_OK;
}

static ps_status eval_fast(const model *m, const patch_pair *pairs, const patch_cell *cells, size_t n_cells,
                           const patch_opts *opts, double *values)
{
    fast_job *jobs = malloc((n_cells ? n_cells : 1) * sizeof *jobs);
    if (!jobs)
        return err_set(PS_ERR_NOMEM, "cannot allocate %zu patching jobs", n_cells);
    size_t nj = 0;
    for (size_t i = 0; i < n_cells; i++) {
        const patch_pair *p = &pairs[cells[i].pair];
        if (plan_job(m, p, &cells[i], opts->direction, &jobs[nj])) {
            jobs[nj].cell = i;
            nj++;
        } else {
            values[i] = opts->direction == PATCH_DENOISE ? p->corrupted_metric[opts->metric]
                                                         : p->clean_metric[opts->metric];
        }
    }
    qsort(jobs, nj, sizeof *jobs, cmp_job_block);
    /* Groups of consecutive jobs whose rows fit max_rows (a single job larger
     * than that gets a group of its own). Sorted by block0, so in each group
     * the jobs active at a block are a prefix. */
    const size_t max_rows = opts->max_rows ? opts->max_rows : 2048;
    size_t need = 0;
    for (size_t j = 0; j < nj; j++)
        need = need > jobs[j].T ? need : jobs[j].T;
    fast_buffers b = {0};
    ps_status st = PS_OK;
    if (nj > 0)
        st = buffers_init(&b, &m->cfg, max_rows > need ? max_rows : need);
    for (size_t g = 0; g < nj && st == PS_OK;) {
        size_t rows = 0, e = g;
        while (e < nj && (e == g || rows + (jobs[e].T - jobs[e].row0) <= b.rows)) {
            rows += jobs[e].T - jobs[e].row0;
            e++;
        }
        st = run_group(m, cells, jobs + g, e - g, opts, &b, values);
        g = e;
    }
    buffers_free(&b);
    free(jobs);
    return st;
}

ps_status patch_eval(const model *m, const patch_pair *pairs, size_t n_pairs, const patch_cell *cells,
                     size_t n_cells, const patch_opts *opts, double *values)
{
    for (size_t i = 0; i < n_cells; i++) {
        const patch_cell *c = &cells[i];
        if (c->pair >= n_pairs || c->component >= PATCH_COMPONENT_COUNT || c->layer >= m->cfg.n_layer ||
            c->head >= m->cfg.n_head || c->position >= pairs[c->pair].T)
            return err_set(PS_ERR_RANGE, "patching cell %zu is outside its grid", i);
    }
    if (opts->engine == PATCH_ENGINE_NAIVE)
        return eval_naive(m, pairs, cells, n_cells, opts, values);
    return eval_fast(m, pairs, cells, n_cells, opts, values);
}
