/* The fast patching engine (patch.h): suffix jobs stacked into large
 * products; also the plans and costs that describe its work per cell. */
#include "patch_internal.h"

#include "ops.h"
#include "pool.h"

#include <stdlib.h>
#include <string.h>

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
    patch_slice s = patch_cell_slice(cell, cfg, T);
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
    const forward_cache *base = patch_base_of(p, dir), *src = patch_source_of(p, dir);
    const size_t L = cell->layer, T = p->T;
    size_t row0 = first_changed_row(cell, &m->cfg, patch_component_array(base, comp, L),
                                    patch_component_array(src, comp, L), T);
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
    /* The rows of block L whose output changes: every row from row0 for
     * resid_pre, the *_all_pos components and a key or value row (every
     * query row >= its position reads it); the one row for the others (z, a
     * query row, a pattern row or one entry of it). */
    job->row_end =
        (job->entry == E_PRE || patch_component_all_pos(comp) || comp == PATCH_K || comp == PATCH_V) ? T : row0 + 1;
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

/* Stacked working rows of a group of jobs.  Row strides: x, a d; q, qr, z
 * H*dh; k, kr, v H_kv*dh; every array has room for rows of w = max(d, H*dh)
 * floats, so that any of them can hold [rows, d] scratch too. */
typedef struct {
    size_t rows;
    float *x, *a, *q, *k, *v, *z; /* [rows, w] each */
    float *qr, *kr;                /* rotary: q and k rotated at their positions ([rows, w]) */
    float *h, *g;                  /* [rows, m]: the MLP's hidden layer, the gate (gated MLPs) */
    float *scratch;                /* [threads, n_positions]: attention rows per thread */
    float *rq;                     /* [d_head]: one rotated query row of the entry attention */
    float *col;                    /* [n_positions, d_head]: a patched key or value column (k, v) */
    size_t threads;
} fast_buffers;

static size_t row_width(const model_config *cfg)
{
    const size_t d = cfg->n_embd, qd = model_q_dim(cfg);
    return d > qd ? d : qd;
}

static ps_status buffers_init(fast_buffers *b, const model_config *cfg, size_t rows)
{
    const size_t w = row_width(cfg), m = cfg->n_inner, nt = pool_threads();
    const bool rotary = cfg->pos == MODEL_POS_ROTARY, gated = cfg->act == MODEL_ACT_SILU_GATED;
    const size_t n_w = 6 + (rotary ? 2 : 0), n_m = 1 + (gated ? 1 : 0);
    float *all = malloc((n_w * rows * w + n_m * rows * m + nt * cfg->n_positions + cfg->d_head +
                         cfg->n_positions * cfg->d_head) *
                            sizeof(float) +
                        sizeof(float));
    if (!all)
        return err_set(PS_ERR_NOMEM, "cannot allocate the fast engine's buffers for %zu rows", rows);
    b->rows = rows;
    b->threads = nt;
    float *p = all;
    b->x = p, p += rows * w;
    b->a = p, p += rows * w;
    b->q = p, p += rows * w;
    b->k = p, p += rows * w;
    b->v = p, p += rows * w;
    b->z = p, p += rows * w;
    b->qr = b->kr = NULL;
    if (rotary) {
        b->qr = p, p += rows * w;
        b->kr = p, p += rows * w;
    }
    b->h = p, p += rows * m;
    b->g = NULL;
    if (gated)
        b->g = p, p += rows * m;
    b->scratch = p, p += nt * cfg->n_positions;
    b->rq = p, p += cfg->d_head;
    b->col = p;
    return PS_OK;
}

static void buffers_free(fast_buffers *b) { free(b->x); }

/* The queries and keys the attention reads: q, k as computed, or rotated at
 * their absolute positions (rotary families; a row's rotation depends on its
 * position alone, so the base run's rotated keys serve as the prefix). */
static const float *attn_q(const fast_buffers *b, const model_config *cfg)
{
    return cfg->pos == MODEL_POS_ROTARY ? b->qr : b->q;
}
static const float *attn_k(const fast_buffers *b, const model_config *cfg)
{
    return cfg->pos == MODEL_POS_ROTARY ? b->kr : b->k;
}
static const float *prefix_k(const forward_layer *bl, const model_config *cfg)
{
    return cfg->pos == MODEL_POS_ROTARY ? bl->rot_k : bl->k;
}

/* Attention of the active jobs: job j's query rows [qa_j, T_j) for every
 * head (ops_attention: keys/values of rows < row0 from the base run's cache,
 * the rest from the job's stacked rows), jobs split among the threads by cost.
 * Rotary families: each thread first rotates its jobs' key rows [row0, T)
 * and query rows (with last_row_only the one query row per job, at T - 1);
 * a job's attention reads only its own rows, so this needs no barrier. */
typedef struct {
    const fast_job *jobs;
    size_t n_jobs;
    fast_buffers *b;
    const model *m;
    size_t layer;
    bool last_row_only; /* last block: one query row per job, stacked at j*qd */
} attn_task;

static void rotate_job(const model *m, const fast_job *jb, size_t j, fast_buffers *b, bool last_row_only)
{
    const model_config *cfg = &m->cfg;
    const size_t H = cfg->n_head, Hkv = model_kv_heads(cfg), dh = cfg->d_head, rot = cfg->rotary_dim;
    const size_t qd = model_q_dim(cfg), kvd = model_kv_dim(cfg), n = jb->T - jb->row0;
    ops_rotary(b->kr + jb->off * kvd, b->k + jb->off * kvd, n, jb->row0, Hkv, dh, rot, m->rope_cos, m->rope_sin);
    if (last_row_only)
        ops_rotary(b->qr + j * qd, b->q + j * qd, 1, jb->T - 1, H, dh, rot, m->rope_cos, m->rope_sin);
    else
        ops_rotary(b->qr + jb->off * qd, b->q + jb->off * qd, n, jb->row0, H, dh, rot, m->rope_cos, m->rope_sin);
}

/* A job's attention cost in key rows read: query rows [qa, T) read i + 1
 * keys each, sum = (T (T + 1) - qa (qa + 1)) / 2 (at least 1). */
static size_t attn_cost(const fast_job *jb, bool last_row_only)
{
    const size_t qa = last_row_only ? jb->T - 1 : jb->row0;
    return (jb->T * (jb->T + 1) - qa * (qa + 1)) / 2 + 1;
}

static void attn_worker(void *arg, size_t tid, size_t nt)
{
    const attn_task *t = arg;
    const model_config *cfg = &t->m->cfg;
    const size_t qd = model_q_dim(cfg), kvd = model_kv_dim(cfg);
    float *scratch = t->b->scratch + tid * cfg->n_positions;
    const float *q = attn_q(t->b, cfg), *k = attn_k(t->b, cfg);
    /* Contiguous runs of jobs of about equal cost per thread (a job goes to
     * the thread whose share holds its cost's midpoint); job sizes differ
     * by up to T times, so dealing them round-robin left one thread waiting. */
    size_t total = 0;
    for (size_t j = 0; j < t->n_jobs; j++)
        total += attn_cost(&t->jobs[j], t->last_row_only);
    const size_t lo = 2 * total * tid / nt, hi = 2 * total * (tid + 1) / nt;
    size_t before = 0;
    for (size_t j = 0; j < t->n_jobs; j++) {
        const fast_job *jb = &t->jobs[j];
        const size_t c = attn_cost(jb, t->last_row_only), mid = 2 * before + c;
        before += c;
        if (mid < lo || mid >= hi)
            continue;
        if (cfg->pos == MODEL_POS_ROTARY)
            rotate_job(t->m, jb, j, t->b, t->last_row_only);
        const forward_layer *bl = &jb->base->layers[t->layer];
        const size_t oq = t->last_row_only ? j * qd : jb->off * qd, okv = jb->off * kvd;
        ops_attention(t->b->z + oq, q + oq, t->last_row_only ? jb->T - 1 : jb->row0, jb->T, prefix_k(bl, cfg), bl->v,
                      k + okv, t->b->v + okv, jb->row0, cfg->n_head, model_kv_heads(cfg), cfg->d_head,
                      model_attn_scale(cfg, t->layer), scratch);
    }
}

static void attention_jobs(const fast_job *jobs, size_t n_jobs, fast_buffers *b, const model *m, size_t layer,
                           bool last_row_only)
{
    attn_task t = {jobs, n_jobs, b, m, layer, last_row_only};
    pool_run(n_jobs < b->threads ? n_jobs : b->threads, attn_worker, &t);
}

/* x[rows] += MLP(ln_2(x[rows])) of block l (sequential residual); a, h (and
 * the gate g) are scratch, out receives mlp_out. */
static void mlp_rows(const model *m, size_t l, float *x, float *a, float *h, float *g, float *out, size_t rows)
{
    const model_block *b = &m->blocks[l];
    const size_t d = m->cfg.n_embd;
    ops_norm_threaded(a, x, b->ln_2_w, b->ln_2_b, rows, d, m->cfg.ln_eps, m->cfg.norm);
    ops_mlp_act(out, h, g, a, rows, b, m->cfg.act);
    ops_add(x, x, out, rows * d);
}

/* Parallel residual (GPT-NeoX): x[rows] = (MLP(ln_2(x)) + attn_out) + x, the
 * order of forward.c's sum; a, h, g scratch, out receives mlp_out. */
static void parallel_rows(const model *m, size_t l, float *x, const float *attn_out, float *a, float *h, float *g,
                          float *out, size_t rows)
{
    const model_block *b = &m->blocks[l];
    const size_t d = m->cfg.n_embd;
    ops_norm_threaded(a, x, b->ln_2_w, b->ln_2_b, rows, d, m->cfg.ln_eps, m->cfg.norm);
    ops_mlp_act(out, h, g, a, rows, b, m->cfg.act);
    ops_add3(x, out, attn_out, x, rows * d);
}

/* The patched per-head attention of an E_Z job at its block L, for rows
 * [row0, row_end): writes z rows (all heads) into z (stride H*dh, row row0
 * first).  The query heads that change: head h (z, q, pattern), or every
 * query head reading key/value head h (k, v with grouped-query attention).
 * col [n_positions * d_head] holds the patched key or value column of a
 * by-position k / v patch: the base head's rows with row `position` from the
 * source (rotary: the rotated keys; a row's rotation depends on its position
 * alone, so the source's rotated row is the patched row rotated). */
static void entry_attention(const model *m, const patch_cell *cell, const fast_job *job, float *z, float *scratch,
                            float *rq, float *col)
{
    const model_config *cfg = &m->cfg;
    const size_t dh = cfg->d_head, T = job->T, r0 = job->row0, qd = model_q_dim(cfg), kvd = model_kv_dim(cfg);
    const size_t group = cfg->n_head / model_kv_heads(cfg);
    const bool rotary = cfg->pos == MODEL_POS_ROTARY;
    const forward_layer *bl = &job->base->layers[job->layer], *sl = &job->src->layers[job->layer];
    const patch_component comp = (patch_component)cell->component;
    /* Start from the base z rows; only the changed heads are recomputed. */
    memcpy(z, bl->z + r0 * qd, (job->row_end - r0) * qd * sizeof *z);
    if (comp == PATCH_Z || comp == PATCH_Z_ALL_POS) {
        const size_t h = cell->head;
        for (size_t i = r0; i < job->row_end; i++)
            memcpy(z + (i - r0) * qd + h * dh, sl->z + i * qd + h * dh, dh * sizeof *z);
        return;
    }
    const bool kv = comp == PATCH_K_ALL_POS || comp == PATCH_V_ALL_POS || comp == PATCH_K || comp == PATCH_V;
    const bool pattern = comp == PATCH_PATTERN_ALL_POS || comp == PATCH_PATTERN || comp == PATCH_PATTERN_DEST_SRC;
    const size_t h0 = kv ? cell->head * group : cell->head, h1 = kv ? h0 + group : h0 + 1;
    /* q by position changes row `position` alone, which is then the only row */
    const float *q = comp == PATCH_Q_ALL_POS || comp == PATCH_Q ? sl->q : bl->q;
    const forward_layer *kl = comp == PATCH_K_ALL_POS ? sl : bl;
    const float *k = rotary ? kl->rot_k : kl->k;
    const float *v = comp == PATCH_V_ALL_POS ? sl->v : bl->v;
    /* k, v: [T, H_kv*dh] read at head g's columns, or col: [T, dh] */
    size_t kstride = kvd, vstride = kvd;
    bool k_col = false, v_col = false;
    if (comp == PATCH_K || comp == PATCH_V) {
        /* col[j] = the base head's row j, row `position` from the source */
        const float *b = comp == PATCH_K ? k : v, *s = comp == PATCH_K ? (rotary ? sl->rot_k : sl->k) : sl->v;
        for (size_t j = 0; j < T; j++)
            memcpy(col + j * dh, (j == cell->position ? s : b) + j * kvd + cell->head * dh, dh * sizeof *col);
        if (comp == PATCH_K)
            k = col, kstride = dh, k_col = true;
        else
            v = col, vstride = dh, v_col = true;
    }
    for (size_t h = h0; h < h1; h++) {
        const size_t g = h / group;
        const float *kh = k_col ? k : k + g * dh, *vh = v_col ? v : v + g * dh;
        for (size_t i = r0; i < job->row_end; i++) {
            const float *p = scratch;
            if (comp == PATCH_PATTERN_DEST_SRC) {
                /* the base row with the one entry overwritten, not renormalised */
                memcpy(scratch, bl->pattern + (h * T + i) * T, T * sizeof *scratch);
                scratch[cell->src_position] = sl->pattern[(h * T + i) * T + cell->src_position];
            } else if (pattern) {
                p = sl->pattern + (h * T + i) * T;
            } else { /* pattern[h, i, :] from the (patched) q and k of head h */
                const float *qi = q + i * qd + h * dh;
                if (rotary) {
                    ops_rotary(rq, qi, 1, i, 1, dh, cfg->rotary_dim, m->rope_cos, m->rope_sin);
                    qi = rq;
                }
                ops_attention_softmax_row(scratch, qi, kh, kh, 0, i, T, kstride, dh, model_attn_scale(cfg, job->layer));
            }
            /* over all j < T, as the forward pass does with a hooked pattern */
            ops_attention_mix_row(z + (i - r0) * qd + h * dh, p, vh, vh, 0, T, vstride, dh);
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
    const size_t d = cfg->n_embd, L = cfg->n_layer, V = cfg->vocab_size, qd = model_q_dim(cfg);
    const bool par = cfg->parallel_residual;
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
     * then resid_post = resid_mid + MLP(resid_mid) for the changed rows.
     * Parallel residual: the MLP reads resid_pre, which no entry changes, so
     * resid_post = (mlp_out + attn_out) + resid_pre with the base mlp_out
     * (E_Z, attn_out) or the base attn_out (E_MLP_OUT), no MLP. */
    for (size_t l = 0; l < L; l++) {
        size_t r = 0;
        for (size_t j = 0; j < nj; j++) {
            const fast_job *jb = &jobs[j];
            if (jb->entry == E_PRE || jb->layer != l)
                continue;
            const patch_cell *cell = &cells[jb->cell];
            const forward_layer *bl = &jb->base->layers[l], *sl = &jb->src->layers[l];
            const size_t n = jb->row_end - jb->row0, r0 = jb->row0;
            float *x = b->x + jb->off * d;
            if (jb->entry == E_MLP_OUT) {
                if (par)
                    for (size_t e = 0; e < d; e++)
                        x[e] = (sl->mlp_out[r0 * d + e] + bl->attn_out[r0 * d + e]) + bl->resid_pre[r0 * d + e];
                else
                    for (size_t e = 0; e < d; e++)
                        x[e] = bl->resid_mid[r0 * d + e] + sl->mlp_out[r0 * d + e];
                continue;
            }
            if (par && jb->entry == E_RESID_MID) { /* attn_out (no resid_mid with a parallel residual) */
                for (size_t e = 0; e < d; e++)
                    x[e] = (bl->mlp_out[r0 * d + e] + sl->attn_out[r0 * d + e]) + bl->resid_pre[r0 * d + e];
                continue;
            }
            float *a = b->a + r * d; /* resid_mid rows of this layer's batch */
            if (jb->entry == E_Z) {
                entry_attention(m, cell, jb, b->z + r * qd, b->scratch, b->rq, b->col);
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
        ops_attn_proj(b->q, b->z, r, blk);
        r = 0;
        for (size_t j = 0; j < nj; j++) {
            const fast_job *jb = &jobs[j];
            if (jb->entry == E_PRE || jb->entry == E_MLP_OUT || jb->layer != l || (par && jb->entry != E_Z))
                continue;
            const size_t n = jb->row_end - jb->row0, r0 = jb->row0;
            const forward_layer *bl = &jb->base->layers[l];
            if (par) /* resid_post = (base mlp_out + attn_out) + base resid_pre */
                for (size_t e = 0; e < n * d; e++)
                    b->x[jb->off * d + e] = (bl->mlp_out[r0 * d + e] + b->q[r * d + e]) + bl->resid_pre[r0 * d + e];
            else if (jb->entry == E_Z)
                for (size_t e = 0; e < n * d; e++)
                    b->a[r * d + e] = bl->resid_pre[r0 * d + e] + b->q[r * d + e];
            r += n;
        }
        if (par)
            continue;
        /* resid_post = resid_mid + MLP(ln_2(resid_mid)) over all r rows */
        memcpy(b->v, b->a, r * d * sizeof(float));
        mlp_rows(m, l, b->v, b->k, b->h, b->g, b->q, r);
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
        ops_norm_threaded(b->a, b->x, blk->ln_1_w, blk->ln_1_b, arows, d, cfg->ln_eps, cfg->norm);
        ops_qkv(NULL, b->k, b->v, b->a, arows, blk);
        if (!last) {
            ops_qkv(b->q, NULL, NULL, b->a, arows, blk);
            attention_jobs(jobs, active, b, m, l, false);
            ops_attn_proj(b->q, b->z, arows, blk);
            if (par) {
                parallel_rows(m, l, b->x, b->q, b->a, b->h, b->g, b->k, arows);
            } else {
                ops_add(b->x, b->x, b->q, arows * d);
                mlp_rows(m, l, b->x, b->a, b->h, b->g, b->q, arows);
            }
        } else {
            /* Last block: only each job's last row feeds the metric, but its
             * attention reads every row's key and value (computed above).
             * Gather the last rows' ln_1 output and residual. */
            for (size_t j = 0; j < active; j++) {
                const size_t lr = jobs[j].off + jobs[j].T - 1 - jobs[j].row0;
                memcpy(b->z + j * d, b->a + lr * d, d * sizeof(float));
            }
            ops_qkv(b->q, NULL, NULL, b->z, active, blk);
            attention_jobs(jobs, active, b, m, l, true);
            /* k now holds attn_out of the last rows, a their residual */
            ops_attn_proj(b->k, b->z, active, blk);
            for (size_t j = 0; j < active; j++) {
                const size_t lr = jobs[j].off + jobs[j].T - 1 - jobs[j].row0;
                if (par)
                    memcpy(b->a + j * d, b->x + lr * d, d * sizeof(float));
                else
                    for (size_t e = 0; e < d; e++)
                        b->a[j * d + e] = b->x[lr * d + e] + b->k[j * d + e];
            }
            if (par)
                parallel_rows(m, l, b->a, b->k, b->v, b->h, b->g, b->q, active);
            else
                mlp_rows(m, l, b->a, b->v, b->h, b->g, b->q, active);
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
    if (cfg->norm == MODEL_NORM_LAYERNORM)
        ops_layernorm(b->a, b->z, m->ln_f_w, m->ln_f_b, nj, d, cfg->ln_eps);
    else
        ops_norm_threaded(b->a, b->z, m->ln_f_w, m->ln_f_b, nj, d, cfg->ln_eps, cfg->norm);
    patch_metric ms[PATCH_METRIC_COUNT];
    const size_t M = patch_opts_metrics(opts, ms);
    bool full = false; /* some metric needs the whole vocabulary row */
    for (size_t k = 0; k < M; k++)
        full = full || ms[k] != PATCH_LOGIT_DIFF;
    float *logits = full ? malloc(V * sizeof *logits) : NULL;
    /* a 2-byte unembedding's rows are widened (model_unembed_row) */
    float *urows = m->unembed ? NULL : malloc(2 * d * sizeof *urows);
    if ((full && !logits) || (!m->unembed && !urows)) {
        free(logits);
        free(urows);
        return err_set(PS_ERR_NOMEM, "out of memory");
    }
    for (size_t j = 0; j < nj; j++) {
        const patch_pair *p = jobs[j].pair;
        const float *xa = b->a + j * d;
        double *out = values + jobs[j].cell * M;
        if (full) {
            model_unembed(m, logits, xa, 1);
            patch_metrics_of_logits(logits, V, p->answer, p->wrong, p->clean_logprobs, ms, M, out);
        }
        /* logit_diff from the two unembedding rows whatever else is asked:
         * the same bits as a run of logit_diff alone */
        for (size_t k = 0; k < M; k++) {
            if (ms[k] != PATCH_LOGIT_DIFF)
                continue;
            const float *ua = model_unembed_row(m, (size_t)p->answer, urows),
                        *uw = model_unembed_row(m, (size_t)p->wrong, urows ? urows + d : NULL);
            /* Same float products as the vocabulary matmul, summed in double. */
            double la = 0.0, lw = 0.0;
            for (size_t e = 0; e < d; e++) {
                la += (double)(xa[e] * ua[e]);
                lw += (double)(xa[e] * uw[e]);
            }
            out[k] = la - lw;
        }
    }
    free(urows);
    free(logits);
    return PS_OK;
}

ps_status patch_eval_fast(const model *m, const patch_pair *pairs, const patch_cell *cells, size_t n_cells,
                           const patch_opts *opts, double *values)
{
    patch_metric ms[PATCH_METRIC_COUNT];
    const size_t M = patch_opts_metrics(opts, ms);
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
            /* nothing the metric sees changes: the base run's metrics */
            for (size_t k = 0; k < M; k++)
                values[i * M + k] = opts->direction == PATCH_DENOISE ? p->corrupted_metric[ms[k]]
                                                                     : p->clean_metric[ms[k]];
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
