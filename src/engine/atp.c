#include "atp.h"

#include "backward.h"
#include "forward.h"
#include "ops.h"
#include "patch_internal.h"
#include "rankstat.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* sum over the cell's slice of (src - base) * grad, in double */
static double cell_estimate(const float *src, const float *base, const float *grad, patch_slice s)
{
    double acc = 0.0;
    for (size_t i = 0; i < s.count; i++) {
        const size_t o = s.first + i * s.stride;
        for (size_t e = 0; e < s.len; e++)
            acc += ((double)src[o + e] - base[o + e]) * grad[o + e];
    }
    return acc;
}

/* Cells of a component's grid for T tokens. */
static size_t grid_cells(patch_component c, const model_config *cfg, size_t T)
{
    size_t shape[PATCH_GRID_MAX_DIMS], n = 1;
    const size_t nd = patch_grid_shape(c, cfg, T, shape, NULL);
    for (size_t k = 0; k < nd; k++)
        n *= shape[k];
    return n;
}

/* Query rows [row0, T) of layer l's queries or keys as the scores read them
 * (rotated for rotary models): keys are in a cache's core (rot_k), queries
 * are rotated here into buf [T, H*dh] by the forward's kernel (same bits). */
static const float *scores_q(const model *m, const forward_cache *c, size_t l, size_t row0, float *buf)
{
    const model_config *cfg = &m->cfg;
    if (cfg->pos != MODEL_POS_ROTARY)
        return c->layers[l].q;
    const size_t oq = row0 * model_q_dim(cfg);
    ops_rotary(buf + oq, c->layers[l].q + oq, c->T - row0, row0, cfg->n_head, cfg->d_head, cfg->rotary_dim,
               m->rope_cos, m->rope_sin);
    return buf;
}

static const float *scores_k(const model *m, const forward_cache *c, size_t l)
{
    return m->cfg.pos == MODEL_POS_ROTARY ? c->layers[l].rot_k : c->layers[l].k;
}

/* AtP*'s QK fix for one all-position cell (Kramar et al. 2024, sec.
 * 3.1.1): the pattern of every head the cell feeds recomputed exactly
 * (ops_attention_softmax_row, the forward's kernel) with the patched factor,
 * q (query cell: head h) or k (key cell: key/value head h, i.e. query heads
 * h*G .. h*G+G-1 with G = H / H_kv), the other factor the base's; the
 * linearization taken after the softmax, with the gradient dM/dpattern of
 * the base run:
 *   effect = sum_heads sum_{i >= row0} sum_{j <= i} (p'[i, j] - p[i, j]) dM/dp[i, j]
 * q_* [T, H*dh] and k_* [T, H_kv*dh] as the scores read them; prow [T]. */
static double qk_fix_effect(const model_config *cfg, bool key, size_t h, size_t T, size_t row0, const float *q_src,
                            const float *k_src, const float *q_base, const float *k_base, const float *pattern,
                            const float *dpattern, size_t l, float *prow)
{
    const size_t H = cfg->n_head, Hkv = model_kv_heads(cfg), G = H / Hkv, dh = cfg->d_head;
    const size_t qd = model_q_dim(cfg), kvd = model_kv_dim(cfg);
    const float scale = model_attn_scale(cfg, l);
    const size_t h0 = key ? h * G : h, h1 = key ? h * G + G : h + 1;
    const float *q = key ? q_base : q_src, *k = key ? k_src : k_base;
    double acc = 0.0;
    for (size_t hh = h0; hh < h1; hh++) {
        const float *kg = k + (hh / G) * dh;
        for (size_t i = row0; i < T; i++) {
            ops_attention_softmax_row(prow, q + i * qd + hh * dh, kg, kg, 0, i, T, kvd, dh, scale);
            const float *p = pattern + (hh * T + i) * T, *dp = dpattern + (hh * T + i) * T;
            for (size_t j = 0; j <= i; j++)
                acc += ((double)prow[j] - p[j]) * dp[j];
        }
    }
    return acc;
}

/* The QK fix for one by-position cell, the same linearization after the
 * softmax with one row (query cell) or one column (key cell) patched:
 *   q at (position t, head h): row t of head h alone changes, recomputed
 *     with the source's query t against the base's keys;
 *   k at (position t, key/value head h): column t of every row i >= t of
 *     the query heads h*G .. h*G+G-1 changes (every entry of those rows
 *     through the normalizer): rows recomputed with the base's keys but row
 *     t of head h, the source's.
 *   effect = sum over the changed rows of sum_{j <= i} (p'[i, j] - p[i, j]) dM/dp[i, j]
 * A cell before row0 changes nothing (the runs agree there): 0.
 * q_src [T, H*dh] as the scores read it; k_base [T, H_kv*dh] the base's keys
 * as the scores read them, k_src the source's; kbuf [T, H_kv*dh] scratch;
 * prow [T]. */
static double qk_fix_pos_effect(const model_config *cfg, bool key, size_t t, size_t h, size_t T, size_t row0,
                                const float *q_src, const float *k_src, const float *q_base, const float *k_base,
                                const float *pattern, const float *dpattern, size_t l, float *kbuf, float *prow)
{
    if (t < row0)
        return 0.0;
    const size_t H = cfg->n_head, Hkv = model_kv_heads(cfg), G = H / Hkv, dh = cfg->d_head;
    const size_t qd = model_q_dim(cfg), kvd = model_kv_dim(cfg);
    const float scale = model_attn_scale(cfg, l);
    double acc = 0.0;
    if (!key) {
        const float *kg = k_base + (h / G) * dh;
        ops_attention_softmax_row(prow, q_src + t * qd + h * dh, kg, kg, 0, t, T, kvd, dh, scale);
        const float *p = pattern + (h * T + t) * T, *dp = dpattern + (h * T + t) * T;
        for (size_t j = 0; j <= t; j++)
            acc += ((double)prow[j] - p[j]) * dp[j];
        return acc;
    }
    /* kbuf holds the base's keys; row t of head h swapped in, restored after */
    memcpy(kbuf + t * kvd + h * dh, k_src + t * kvd + h * dh, dh * sizeof *kbuf);
    const float *kg = kbuf + h * dh;
    for (size_t hh = h * G; hh < h * G + G; hh++)
        for (size_t i = t; i < T; i++) {
            ops_attention_softmax_row(prow, q_base + i * qd + hh * dh, kg, kg, 0, i, T, kvd, dh, scale);
            const float *p = pattern + (hh * T + i) * T, *dp = dpattern + (hh * T + i) * T;
            for (size_t j = 0; j <= i; j++)
                acc += ((double)prow[j] - p[j]) * dp[j];
        }
    memcpy(kbuf + t * kvd + h * dh, k_base + t * kvd + h * dh, dh * sizeof *kbuf);
    return acc;
}

/* estimate_grids' scratch: the source's and the base's rotated queries
 * 2 [T, H*dh], the patched keys [T, H_kv*dh], a pattern row [T]. */
static size_t atp_scratch_floats(const model_config *cfg, size_t T)
{
    return 2 * T * model_q_dim(cfg) + T * model_kv_dim(cfg) + T;
}

/* effects[c][cell] (estimate - base) of every grid that is on, from one
 * gradient; q/k cells (by position and all positions) through the QK fix
 * when asked.  scratch: atp_scratch_floats(cfg, T) floats. */

static ps_status estimate_grids(const model *m, const patch_pair *pair, const bool on[PATCH_COMPONENT_COUNT],
                                const forward_cache *src, const forward_cache *base, const forward_cache *grad,
                                size_t row0, bool qk_fix, float *scratch, double *const eff[PATCH_COMPONENT_COUNT])
{
    const model_config *cfg = &m->cfg;
    const size_t T = pair->T, qd = model_q_dim(cfg), kvd = model_kv_dim(cfg);
    float *q_src_buf = scratch, *q_base_buf = scratch + T * qd, *kbuf = scratch + 2 * T * qd,
          *prow = kbuf + T * kvd;
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        if (!on[c])
            continue;
        patch_cell *cells;
        size_t n;
        ps_status st = patch_grid_cells((patch_component)c, cfg, 0, T, &cells, &n);
        if (st)
            return st;
        const bool all_pos = c == PATCH_Q_ALL_POS || c == PATCH_K_ALL_POS, by_pos = c == PATCH_Q || c == PATCH_K;
        const bool fix = qk_fix && (all_pos || by_pos), key = c == PATCH_K_ALL_POS || c == PATCH_K;
        size_t rotated = (size_t)-1; /* the layer whose queries (and keys) scratch holds */
        const float *qs = NULL, *qb = NULL;
        for (size_t i = 0; i < n; i++) {
            const patch_cell *cell = &cells[i];
            const size_t l = cell->layer;
            if (!fix) {
                eff[c][i] = cell_estimate(patch_component_array(src, (patch_component)c, l),
                                          patch_component_array(base, (patch_component)c, l),
                                          patch_component_array(grad, (patch_component)c, l),
                                          patch_cell_slice(cell, cfg, T));
                continue;
            }
            if (rotated != l) {
                qs = scores_q(m, src, l, row0, q_src_buf);
                qb = scores_q(m, base, l, row0, q_base_buf);
                if (by_pos && key)
                    memcpy(kbuf, scores_k(m, base, l), T * kvd * sizeof *kbuf);
                rotated = l;
            }
            const float *pat = base->layers[l].pattern, *dpat = grad->layers[l].pattern;
            eff[c][i] = all_pos ? qk_fix_effect(cfg, key, cell->head, T, row0, qs, scores_k(m, src, l), qb,
                                                scores_k(m, base, l), pat, dpat, l, prow)
                                : qk_fix_pos_effect(cfg, key, cell->position, cell->head, T, row0, qs,
                                                    scores_k(m, src, l), qb, scores_k(m, base, l), pat, dpat, l,
                                                    kbuf, prow);
        }
        free(cells);
    }
    return PS_OK;
}

ps_status atp_eval(const model *m, const patch_pair *pair, const bool on[PATCH_COMPONENT_COUNT], patch_metric metric,
                   patch_direction direction, double *const values[PATCH_COMPONENT_COUNT])
{
    const atp_opts o = {0};
    return atp_eval_opts(m, pair, on, metric, direction, &o, values);
}

ps_status atp_eval_opts(const model *m, const patch_pair *pair, const bool on[PATCH_COMPONENT_COUNT],
                        patch_metric metric, patch_direction direction, const atp_opts *opts,
                        double *const values[PATCH_COMPONENT_COUNT])
{
    const model_config *cfg = &m->cfg;
    ps_status st = patch_components_check(on, cfg);
    if (st)
        return st;
    const size_t T = pair->T, L = cfg->n_layer;
    if (opts->graddrop && L < 2)
        return err_set(PS_ERR_INVALID, "GradDrop needs at least 2 layers (it averages over L - 1), the model has %zu",
                       L);
    const forward_cache *src = direction == PATCH_DENOISE ? &pair->clean : &pair->corrupted;
    const forward_cache *base = direction == PATCH_DENOISE ? &pair->corrupted : &pair->clean;
    const double base_metric =
        direction == PATCH_DENOISE ? pair->corrupted_metric[metric] : pair->clean_metric[metric];
    /* Rows before the first token where the prompts differ are the same
     * in both runs (bit for bit: causal attention, row-independent
     * kernels), so every cell's a_src - a_base is 0 there (and so is its
     * pattern change): only the gradients of rows >= row0 are needed
     * (backward.h), and the base run is the pair's own (trimmed) cache. */
    size_t row0 = 0;
    while (row0 < T && src->tokens[row0] == base->tokens[row0])
        row0++;
    if (row0 == T) { /* the same prompt twice: no cell changes anything */
        for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
            for (size_t i = 0, n = on[c] ? grid_cells((patch_component)c, cfg, T) : 0; i < n; i++)
                values[c][i] = base_metric;
        return PS_OK;
    }
    forward_cache grad = {0};
    double *drop[PATCH_COMPONENT_COUNT] = {0}; /* GradDrop: one layer's effects */
    float *scratch = malloc(atp_scratch_floats(cfg, T) * sizeof *scratch);
    if (!scratch)
        return err_set(PS_ERR_NOMEM, "atp: out of memory");
    backward_opts bo = {row0, BACKWARD_NO_DROP};
    if ((st = forward_cache_init(&grad, cfg, T, FORWARD_LOGITS_NONE)) ||
        (st = backward_run_opts(m, base, &grad, &bo, metric, pair->answer, pair->wrong, pair->clean_logprobs)) ||
        (st = estimate_grids(m, pair, on, src, base, &grad, row0, opts->qk_fix, scratch, values)))
        goto out;
    if (opts->graddrop) {
        /* GradDrop (Kramar et al. 2024, sec. 3.1.2): for every layer l, the
         * estimate with no gradient through block l (backward.h:
         * drop_layer), then GD(n) = 1 / (L - 1) sum_l |effect_l(n)|, which
         * is |effect(n)| when no path through a single block cancels
         * another (the term of n's own block is 0).  The value keeps the
         * grid's units: base + sign(effect(n)) GD(n). */
        for (int c = 0; c < PATCH_COMPONENT_COUNT && st == PS_OK; c++)
            if (on[c] && !(drop[c] = calloc(2 * grid_cells((patch_component)c, cfg, T), sizeof *drop[c])))
                st = err_set(PS_ERR_NOMEM, "atp: out of memory");
        for (size_t l = 0; l < L && st == PS_OK; l++) {
            double *one[PATCH_COMPONENT_COUNT] = {0};
            for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
                one[c] = drop[c];
            bo.drop_layer = l;
            if ((st = backward_run_opts(m, base, &grad, &bo, metric, pair->answer, pair->wrong,
                                        pair->clean_logprobs)) ||
                (st = estimate_grids(m, pair, on, src, base, &grad, row0, opts->qk_fix, scratch, one)))
                break;
            for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
                for (size_t i = 0, n = on[c] ? grid_cells((patch_component)c, cfg, T) : 0; i < n; i++)
                    drop[c][n + i] += fabs(drop[c][i]);
        }
        for (int c = 0; c < PATCH_COMPONENT_COUNT && st == PS_OK; c++)
            for (size_t i = 0, n = on[c] ? grid_cells((patch_component)c, cfg, T) : 0; i < n; i++)
                values[c][i] = (values[c][i] < 0 ? -1.0 : 1.0) * drop[c][n + i] / (double)(L - 1);
    }
    for (int c = 0; c < PATCH_COMPONENT_COUNT && st == PS_OK; c++)
        for (size_t i = 0, n = on[c] ? grid_cells((patch_component)c, cfg, T) : 0; i < n; i++)
            values[c][i] += base_metric;
out:
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        free(drop[c]);
    free(scratch);
    forward_cache_free(&grad);
    return st;
}

/* ---- estimate vs truth ---------------------------------------------------- */

ps_status atp_compare(const double *exact, const double *estimate, size_t n, double base, size_t k, atp_stats *out)
{
    memset(out, 0, sizeof *out);
    out->rank_correlation = NAN;
    if (n == 0)
        return PS_OK;
    k = k < n ? k : n;
    k = k < sizeof out->missed / sizeof *out->missed ? k : sizeof out->missed / sizeof *out->missed;
    out->k = k;
    for (size_t i = 0; i < n; i++) {
        const double e = fabs(estimate[i] - exact[i]);
        out->max_abs_error = e > out->max_abs_error ? e : out->max_abs_error;
    }
    ps_status st = rankstat_spearman(exact, estimate, n, &out->rank_correlation);
    return st ? st : rankstat_missed_top_k(exact, estimate, n, base, k, out->missed, &out->n_missed);
}
