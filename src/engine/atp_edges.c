#include "atp_edges.h"

#include "backward.h"
#include "forward.h"
#include "gemm.h"
#include "ops.h"
#include "pool.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

size_t atp_edges_upstream_count(const model_config *cfg) { return 1 + cfg->n_layer * (cfg->n_head + 1); }

/* downstream nodes of one block: q inputs, k inputs, v inputs, the MLP's input */
static size_t block_readers(const model_config *cfg) { return cfg->n_head + 2 * model_kv_heads(cfg) + 1; }

size_t atp_edges_downstream_count(const model_config *cfg) { return cfg->n_layer * block_readers(cfg) + 1; }

/* The order of writes and reads along the residual stream: hook_embed
 * writes at 0, block l's heads at 2l+1 and its MLP at 2l+2; block l's
 * q/k/v inputs read at 2l+1, its MLP input at 2l+2 (parallel residual:
 * 2l+1, with the heads' inputs), the logits at 2L+1.  u -> v exists when
 * u writes before v reads. */
static size_t write_step(const model_config *cfg, size_t u)
{
    if (u == 0)
        return 0;
    const size_t l = (u - 1) / (cfg->n_head + 1), i = (u - 1) % (cfg->n_head + 1);
    return 2 * l + (i < cfg->n_head ? 1 : 2);
}

static size_t read_step(const model_config *cfg, size_t v)
{
    const size_t R = block_readers(cfg), l = v / R, j = v % R;
    if (l >= cfg->n_layer)
        return 2 * cfg->n_layer + 1;
    return 2 * l + (j + 1 == R && !cfg->parallel_residual ? 2 : 1);
}

bool atp_edges_valid(const model_config *cfg, size_t u, size_t v)
{
    return write_step(cfg, u) < read_step(cfg, v);
}

void atp_edges_free(atp_edges *e)
{
    for (size_t i = 0; e->up_labels && i < e->n_up; i++)
        free(e->up_labels[i]);
    for (size_t i = 0; e->down_labels && i < e->n_down; i++)
        free(e->down_labels[i]);
    free(e->up_labels), free(e->down_labels), free(e->score), free(e->up_atp), free(e->down_atp);
    memset(e, 0, sizeof *e);
}

/* "blocks.L.NAME" or, for h != NO_HEAD, "blocks.L.NAME[h=H]" (malloc'd) */
#define NO_HEAD ((size_t)-1)
static char *node_label(size_t l, const char *name, size_t h)
{
    char buf[96];
    if (h == NO_HEAD)
        snprintf(buf, sizeof buf, "blocks.%zu.%s", l, name);
    else
        snprintf(buf, sizeof buf, "blocks.%zu.%s[h=%zu]", l, name, h);
    return strdup(buf);
}

/* The label lists (TransformerLens hook names, head index in brackets). */
static ps_status edges_labels(const model_config *cfg, atp_edges *e)
{
    const size_t L = cfg->n_layer, H = cfg->n_head, Hkv = model_kv_heads(cfg), R = block_readers(cfg);
    e->up_labels = calloc(e->n_up, sizeof *e->up_labels);
    e->down_labels = calloc(e->n_down, sizeof *e->down_labels);
    if (!e->up_labels || !e->down_labels)
        return err_set(PS_ERR_NOMEM, "atp_edges: out of memory");
    e->up_labels[0] = strdup("hook_embed");
    for (size_t l = 0; l < L; l++) {
        char **up = e->up_labels + 1 + l * (H + 1), **down = e->down_labels + l * R;
        for (size_t h = 0; h < H; h++)
            up[h] = node_label(l, "attn.hook_result", h);
        up[H] = node_label(l, "hook_mlp_out", NO_HEAD);
        for (size_t h = 0; h < H; h++)
            down[h] = node_label(l, "hook_q_input", h);
        for (size_t g = 0; g < Hkv; g++) {
            down[H + g] = node_label(l, "hook_k_input", g);
            down[H + Hkv + g] = node_label(l, "hook_v_input", g);
        }
        down[R - 1] = node_label(l, "hook_mlp_in", NO_HEAD);
    }
    e->down_labels[L * R] = strdup("logits");
    for (size_t i = 0; i < e->n_up; i++)
        if (!e->up_labels[i])
            return err_set(PS_ERR_NOMEM, "atp_edges: out of memory");
    for (size_t i = 0; i < e->n_down; i++)
        if (!e->down_labels[i])
            return err_set(PS_ERR_NOMEM, "atp_edges: out of memory");
    return PS_OK;
}

/* sum_i (a[i] - b[i]) * g[i] and sum_i a[i] * g[i], in double */
static double dot_delta(const float *a, const float *b, const float *g, size_t n)
{
    double acc = 0.0;
    for (size_t i = 0; i < n; i++)
        acc += ((double)a[i] - b[i]) * g[i];
    return acc;
}

static double dot(const float *a, const float *g, size_t n)
{
    double acc = 0.0;
    for (size_t i = 0; i < n; i++)
        acc += (double)a[i] * g[i];
    return acc;
}

/* sum_i a[i] * g[i] over n = rows * d floats, the score's dot product (the
 * edges' inner loop): 8 float lanes within a row (vectorized; each lane
 * sums d / 8 products), the lanes and rows in double. */
#define EDGE_LANES 8
static double dot_rows(const float *a, const float *g, size_t rows, size_t d)
{
    double acc = 0.0;
    const size_t d8 = d / EDGE_LANES * EDGE_LANES;
    for (size_t r = 0; r < rows; r++, a += d, g += d) {
        float p[EDGE_LANES] = {0};
        for (size_t i = 0; i < d8; i += EDGE_LANES)
            for (size_t j = 0; j < EDGE_LANES; j++)
                p[j] += a[i + j] * g[i + j];
        for (size_t j = 0; j < EDGE_LANES; j++)
            acc += p[j];
        for (size_t i = d8; i < d; i++)
            acc += (double)a[i] * g[i];
    }
    return acc;
}

/* The scores of block l's readers (or the logits): node j of the block is
 * downstream index v0 + j, its gradient G[j] [n, d]. */
typedef struct {
    const model_config *cfg;
    atp_edges *e;
    const float *D, *G;           /* upstream deltas [n_up, n, d], node gradients [nodes, n, d] */
    const float *xs1, *xb1, *xs2, *xb2; /* the readers' inputs, source and base, rows [row0, T): norm 1 / norm 2 */
    size_t v0, nodes, nd, d;
} score_task;

static void score_worker(void *arg, size_t tid, size_t nt)
{
    const score_task *t = arg;
    for (size_t j = tid; j < t->nodes; j += nt) {
        const size_t v = t->v0 + j;
        const float *g = t->G + j * t->nd;
        const bool second = j + 1 == t->nodes; /* the MLP's input (or, alone, the logits) */
        t->e->down_atp[v] = dot_delta(second ? t->xs2 : t->xs1, second ? t->xb2 : t->xb1, g, t->nd);
        for (size_t u = 0; u < t->e->n_up; u++)
            if (atp_edges_valid(t->cfg, u, v))
                t->e->score[u * t->e->n_down + v] = dot_rows(t->D + u * t->nd, g, t->nd / t->d, t->d);
    }
}

ps_status atp_edges_eval(const model *m, const patch_pair *pair, patch_metric metric, patch_direction direction,
                         atp_edges *e)
{
    const model_config *cfg = &m->cfg;
    const size_t T = pair->T, d = cfg->n_embd, L = cfg->n_layer, H = cfg->n_head, dh = cfg->d_head;
    const size_t qd = model_q_dim(cfg);
    memset(e, 0, sizeof *e);
    if (pair->source)
        return err_set(PS_ERR_INVALID, "edge attribution patching takes the pair's own runs as the source (clean "
                       "or corrupted), not an ablation");
    for (size_t l = 0; l < L; l++)
        if (!gemm_is_panels(&m->blocks[l].attn_proj_p))
            return err_set(PS_ERR_INVALID, "edge attribution patching reads each head's slice of W_O, which block "
                           "%zu holds packed in another layout than gemm_pack's panels (e.g. for BF16 arithmetic)", l);
    e->n_up = atp_edges_upstream_count(cfg), e->n_down = atp_edges_downstream_count(cfg);
    ps_status st = edges_labels(cfg, e);
    if (st)
        return st;
    e->score = malloc(e->n_up * e->n_down * sizeof *e->score);
    e->up_atp = calloc(e->n_up, sizeof *e->up_atp);
    e->down_atp = calloc(e->n_down, sizeof *e->down_atp);
    if (!e->score || !e->up_atp || !e->down_atp)
        return err_set(PS_ERR_NOMEM, "atp_edges: out of memory for %zu x %zu edges", e->n_up, e->n_down);
    for (size_t u = 0; u < e->n_up; u++)
        for (size_t v = 0; v < e->n_down; v++)
            e->score[u * e->n_down + v] = atp_edges_valid(cfg, u, v) ? 0.0 : NAN;
    const forward_cache *src = direction == PATCH_DENOISE ? &pair->clean : &pair->corrupted;
    const forward_cache *base = direction == PATCH_DENOISE ? &pair->corrupted : &pair->clean;
    /* rows before the first differing token are equal in both runs (atp.c): every delta is 0 there */
    size_t row0 = 0;
    while (row0 < T && src->tokens[row0] == base->tokens[row0])
        row0++;
    if (row0 == T)
        return PS_OK; /* the same prompt twice: every score is 0 */
    const size_t n = T - row0, nd = n * d, o = row0 * d, R = block_readers(cfg);
    forward_cache grad = {0};
    float *D = malloc(e->n_up * nd * sizeof *D), *G = malloc(R * nd * sizeof *G);
    float *dz = malloc(n * qd * sizeof *dz), *wbuf = malloc(qd * d * sizeof *wbuf);
    if (!D || !G || !dz || !wbuf) {
        st = err_set(PS_ERR_NOMEM, "atp_edges: out of memory for %zu nodes of %zu x %zu", e->n_up + R, n, d);
        goto out;
    }
    const backward_opts bo = {row0, BACKWARD_NO_DROP};
    if ((st = forward_cache_init(&grad, cfg, T, FORWARD_LOGITS_NONE)) ||
        (st = backward_run_opts(m, base, &grad, &bo, metric, pair->answer, pair->wrong, pair->clean_logprobs)))
        goto out;

    /* upstream deltas a_u^src - a_u^base [n, d] and their node AtP */
    for (size_t i = 0; i < nd; i++)
        D[i] = src->embed[o + i] - base->embed[o + i] +
               (src->pos_embed ? src->pos_embed[o + i] - base->pos_embed[o + i] : 0.0f);
    e->up_atp[0] = dot(D, grad.embed + o, nd);
    for (size_t l = 0; l < L; l++) {
        const forward_layer *ls = &src->layers[l], *lb = &base->layers[l], *gl = &grad.layers[l];
        float *Dl = D + (1 + l * (H + 1)) * nd;
        for (size_t i = 0; i < n * qd; i++)
            dz[i] = ls->z[row0 * qd + i] - lb->z[row0 * qd + i];
        ops_attn_result(Dl, dz, n, &m->blocks[l], H, dh, wbuf); /* (z_src - z_base)_h W_O[h] = result delta */
        for (size_t h = 0; h < H; h++)
            e->up_atp[1 + l * (H + 1) + h] = dot(Dl + h * nd, gl->attn_out + o, nd);
        float *Dm = Dl + H * nd;
        for (size_t i = 0; i < nd; i++)
            Dm[i] = ls->mlp_out[o + i] - lb->mlp_out[o + i];
        e->up_atp[1 + l * (H + 1) + H] = dot(Dm, gl->mlp_out + o, nd);
    }

    /* each block's readers, then the logits */
    for (size_t l = 0; l <= L && st == PS_OK; l++) {
        if ((st = backward_node_input_grads(m, base, &grad, l, row0, G)))
            break;
        score_task t = {cfg, e, D, G, NULL, NULL, NULL, NULL, l * R, backward_node_count(cfg, l), nd, d};
        if (l < L) {
            const forward_layer *ls = &src->layers[l], *lb = &base->layers[l];
            const bool par = cfg->parallel_residual;
            t.xs1 = ls->resid_pre + o, t.xb1 = lb->resid_pre + o;
            t.xs2 = (par ? ls->resid_pre : ls->resid_mid) + o, t.xb2 = (par ? lb->resid_pre : lb->resid_mid) + o;
        } else {
            t.xs2 = src->layers[L - 1].resid_post + o, t.xb2 = base->layers[L - 1].resid_post + o;
        }
        pool_run(t.nodes, score_worker, &t);
    }
out:
    free(D), free(G), free(dz), free(wbuf);
    forward_cache_free(&grad);
    return st;
}
