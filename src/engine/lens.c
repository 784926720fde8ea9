#include "lens.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gemm.h"
#include "ops.h"

size_t lens_n_rows(const model_config *cfg)
{
    return cfg->n_layer + 1;
}

hook_point lens_row_hook(size_t row)
{
    if (row == 0)
        return (hook_point){HOOK_RESID_PRE, 0};
    return (hook_point){HOOK_RESID_POST, row - 1};
}

void lens_row_label(size_t row, char buf[LENS_MAX_LABEL])
{
    if (row == 0)
        snprintf(buf, LENS_MAX_LABEL, "embed");
    else
        snprintf(buf, LENS_MAX_LABEL, "%zu", row - 1);
}

static ps_status check_position(const forward_cache *c, size_t position)
{
    if (position >= c->T)
        return err_set(PS_ERR_RANGE, "position %zu is out of range: the prompt has %zu tokens (positions 0..%zu)",
                       position, c->T, c->T - 1);
    return PS_OK;
}

ps_status lens_gather_rows(const forward_cache *c, size_t position, float *rows)
{
    ps_status st = check_position(c, position);
    if (st)
        return st;
    const size_t d = c->cfg.n_embd, n = lens_n_rows(&c->cfg);
    for (size_t r = 0; r < n; r++)
        memcpy(rows + r * d, forward_cache_hook(c, lens_row_hook(r)) + position * d, d * sizeof *rows);
    return PS_OK;
}

void lens_decode(const model *m, const float *rows, size_t n, float *normed, float *logits)
{
    const size_t d = m->cfg.n_embd;
    if (n == 0)
        return;
    if (m->cfg.norm == MODEL_NORM_RMSNORM) { /* the forward pass's head: x / scale, then the weight */
        ops_rmsnorm_normalize(normed, NULL, rows, n, d, m->cfg.ln_eps);
        ops_norm_affine(normed, normed, m->ln_f_w, NULL, n, d);
    } else {
        ops_layernorm(normed, rows, m->ln_f_w, m->ln_f_b, n, d, m->cfg.ln_eps);
    }
    /* logits[n, V] = normed[n, d] @ unembed[V, d]^T, as the forward pass's head (model_unembed) */
    model_unembed(m, logits, normed, n);
}

void lens_answer_stats(const float *logits, size_t V, double lse, int32_t answer, lens_answer *out)
{
    const float la = logits[answer];
    size_t greater = 0;
    for (size_t i = 0; i < V; i++)
        greater += logits[i] > la;
    out->logit = la;
    out->logprob = (double)la - lse;
    out->prob = exp(out->logprob);
    out->rank = greater;
    out->reciprocal_rank = 1.0 / ((double)greater + 1.0);
}

/* Token a ranks below token b: a smaller logit, or an equal one and a larger id. */
static bool ranks_below(const float *l, int32_t a, int32_t b)
{
    return l[a] < l[b] || (l[a] == l[b] && a > b);
}

/* Restore the heap property below index i of a min-heap of n entries whose
 * root is the entry that ranks lowest. */
static void sift_down(const float *l, int32_t *h, size_t n, size_t i)
{
    for (;;) {
        size_t lo = i, a = 2 * i + 1, b = a + 1;
        if (a < n && ranks_below(l, h[a], h[lo]))
            lo = a;
        if (b < n && ranks_below(l, h[b], h[lo]))
            lo = b;
        if (lo == i)
            return;
        int32_t t = h[i];
        h[i] = h[lo];
        h[lo] = t;
        i = lo;
    }
}

void lens_top_k(const float *logits, size_t V, size_t k, int32_t *ids)
{
    if (k == 0)
        return;
    /* The first k tokens form the heap; each later token that outranks the
     * lowest kept one replaces it. */
    for (size_t i = 0; i < k; i++)
        ids[i] = (int32_t)i;
    for (size_t i = k / 2; i-- > 0;)
        sift_down(logits, ids, k, i);
    for (size_t v = k; v < V; v++) {
        if (ranks_below(logits, ids[0], (int32_t)v)) {
            ids[0] = (int32_t)v;
            sift_down(logits, ids, k, 0);
        }
    }
    /* Heap sort in place: moving the lowest-ranked root to the end each time
     * leaves the best token first. */
    for (size_t end = k; end-- > 1;) {
        int32_t t = ids[0];
        ids[0] = ids[end];
        ids[end] = t;
        sift_down(logits, ids, end, 0);
    }
}

ps_status lens_view_init(lens_view *v, const model_config *cfg, size_t n_rows, size_t k)
{
    memset(v, 0, sizeof *v);
    if (k == 0 || k > cfg->vocab_size)
        return err_set(PS_ERR_RANGE, "top-k %zu is outside 1..%zu (the vocabulary)", k, cfg->vocab_size);
    v->n_rows = n_rows;
    v->k = k;
    v->V = cfg->vocab_size;
    v->d = cfg->n_embd;
    v->answer = LENS_NO_TOKEN;
    v->rows = malloc(n_rows * v->d * sizeof *v->rows);
    v->normed = malloc(n_rows * v->d * sizeof *v->normed);
    v->logits = malloc(n_rows * v->V * sizeof *v->logits);
    v->lse = malloc(n_rows * sizeof *v->lse);
    v->top_id = malloc(n_rows * k * sizeof *v->top_id);
    v->top_prob = malloc(n_rows * k * sizeof *v->top_prob);
    v->ans = calloc(n_rows, sizeof *v->ans);
    if (!v->rows || !v->normed || !v->logits || !v->lse || !v->top_id || !v->top_prob || !v->ans) {
        size_t mb = n_rows * v->V * sizeof(float) >> 20;
        lens_view_free(v);
        return err_set(PS_ERR_NOMEM, "cannot allocate the logits of %zu decoded rows (%zu MB)", n_rows, mb);
    }
    return PS_OK;
}

void lens_view_free(lens_view *v)
{
    free(v->rows);
    free(v->normed);
    free(v->logits);
    free(v->lse);
    free(v->top_id);
    free(v->top_prob);
    free(v->ans);
    memset(v, 0, sizeof *v);
}

ps_status lens_view_decode(lens_view *v, const model *m, int32_t answer)
{
    if (m->cfg.n_embd != v->d || m->cfg.vocab_size != v->V)
        return err_set(PS_ERR_INVALID, "lens view of d %zu, vocabulary %zu used with a model of d %zu, vocabulary %zu",
                       v->d, v->V, m->cfg.n_embd, m->cfg.vocab_size);
    if (answer != LENS_NO_TOKEN && (answer < 0 || (size_t)answer >= v->V))
        return err_set(PS_ERR_RANGE, "answer token id %d is outside the vocabulary (%zu)", answer, v->V);
    v->answer = answer;
    lens_decode(m, v->rows, v->n_rows, v->normed, v->logits);
    for (size_t r = 0; r < v->n_rows; r++) {
        const float *l = v->logits + r * v->V;
        v->lse[r] = forward_logsumexp(l, v->V);
        lens_top_k(l, v->V, v->k, v->top_id + r * v->k);
        for (size_t j = 0; j < v->k; j++)
            v->top_prob[r * v->k + j] = exp((double)l[v->top_id[r * v->k + j]] - v->lse[r]);
        if (answer != LENS_NO_TOKEN)
            lens_answer_stats(l, v->V, v->lse[r], answer, &v->ans[r]);
    }
    return PS_OK;
}

ps_status lens_run(lens_view *v, const model *m, const forward_cache *c, size_t position, int32_t answer)
{
    if (v->n_rows != lens_n_rows(&m->cfg))
        return err_set(PS_ERR_INVALID, "lens view of %zu rows for a model of %zu layers (needs %zu)", v->n_rows,
                       m->cfg.n_layer, lens_n_rows(&m->cfg));
    ps_status st = lens_gather_rows(c, position, v->rows);
    return st ? st : lens_view_decode(v, m, answer);
}

static const char *const component_names[LENS_COMPONENT_COUNT] = {"attn_out", "mlp_out"};

const char *lens_component_name(lens_component comp)
{
    return comp < LENS_COMPONENT_COUNT ? component_names[comp] : "?";
}

ps_status lens_component_parse(const char *s, lens_component *comp)
{
    for (int i = 0; i < LENS_COMPONENT_COUNT; i++)
        if (!strcmp(s, component_names[i])) {
            *comp = (lens_component)i;
            return PS_OK;
        }
    return err_set(PS_ERR_INVALID, "unknown component '%s' (attn_out or mlp_out)", s);
}

hook_point lens_component_hook(lens_component comp, size_t layer)
{
    return (hook_point){comp == LENS_ATTN_OUT ? HOOK_ATTN_OUT : HOOK_MLP_OUT, layer};
}

static ps_status check_layer(const model_config *cfg, size_t layer)
{
    if (layer >= cfg->n_layer)
        return err_set(PS_ERR_RANGE, "layer %zu is out of range: the model has %zu blocks (layers 0..%zu)", layer,
                       cfg->n_layer, cfg->n_layer - 1);
    return PS_OK;
}

ps_status lens_decompose(lens_view *v, const model *m, const forward_cache *c, size_t layer, lens_component comp,
                         size_t position, int32_t answer)
{
    ps_status st;
    if (v->n_rows != 2)
        return err_set(PS_ERR_INVALID, "a decomposition decodes 2 rows, not %zu", v->n_rows);
    if ((st = check_layer(&m->cfg, layer)) || (st = check_position(c, position)))
        return st;
    if (comp >= LENS_COMPONENT_COUNT)
        return err_set(PS_ERR_INVALID, "unknown component %d", (int)comp);
    const size_t d = m->cfg.n_embd;
    const float *post = c->layers[layer].resid_post + position * d;
    const float *update = forward_cache_hook(c, lens_component_hook(comp, layer)) + position * d;
    /* row 0 = resid_post[L][p], row 1 = resid_post[L][p] - update[L][p] */
    memcpy(v->rows, post, d * sizeof *v->rows);
    for (size_t i = 0; i < d; i++)
        v->rows[d + i] = post[i] - update[i];
    return lens_view_decode(v, m, answer);
}

size_t lens_attribution_count(size_t n_layer)
{
    return 3 + 2 * n_layer;
}

void lens_attribution_label(size_t part, size_t n_layer, char buf[LENS_MAX_LABEL])
{
    if (part == 0)
        snprintf(buf, LENS_MAX_LABEL, "embed");
    else if (part == 1)
        snprintf(buf, LENS_MAX_LABEL, "pos_embed");
    else if (part < 2 + 2 * n_layer)
        snprintf(buf, LENS_MAX_LABEL, "%zu_%s", (part - 2) / 2, (part - 2) % 2 ? "mlp_out" : "attn_out");
    else
        snprintf(buf, LENS_MAX_LABEL, "ln_final.b");
}

/* (x - mean(x)) . g in double; x . g without centring (RMSNorm). */
static double centred_dot(const float *x, const double *g, size_t d, bool centre)
{
    double mean = 0.0;
    for (size_t i = 0; i < d && centre; i++)
        mean += x[i];
    mean /= (double)d;
    double s = 0.0;
    for (size_t i = 0; i < d; i++)
        s += ((double)x[i] - mean) * g[i];
    return s;
}

ps_status lens_attribute(lens_attribution *a, const model *m, const forward_cache *c, size_t position,
                         int32_t answer, int32_t wrong)
{
    memset(a, 0, sizeof *a);
    const model_config *cfg = &m->cfg;
    const size_t d = cfg->n_embd, L = cfg->n_layer, V = cfg->vocab_size;
    ps_status st = check_position(c, position);
    if (st)
        return st;
    if (answer < 0 || (size_t)answer >= V)
        return err_set(PS_ERR_RANGE, "answer token id %d is outside the vocabulary (%zu)", answer, V);
    if (wrong != LENS_NO_TOKEN && (wrong < 0 || (size_t)wrong >= V))
        return err_set(PS_ERR_RANGE, "wrong token id %d is outside the vocabulary (%zu)", wrong, V);
    a->n_parts = lens_attribution_count(L);
    a->value = calloc(a->n_parts, sizeof *a->value);
    double *u = malloc(2 * d * sizeof *u);
    float *rows = malloc(2 * d * sizeof *rows); /* a 2-byte unembedding's two rows, widened */
    if (!a->value || !u || !rows) {
        free(u);
        free(rows);
        lens_attribution_free(a);
        return err_set(PS_ERR_NOMEM, "cannot allocate the attribution of %zu parts", lens_attribution_count(L));
    }
    double *g = u + d;
    /* u = W_U[answer] - W_U[wrong]; g = ln_f.w * u, the direction each
     * centred, scaled component is read along. */
    const float *ua = model_unembed_row(m, (size_t)answer, rows);
    const float *uw = wrong != LENS_NO_TOKEN ? model_unembed_row(m, (size_t)wrong, rows + d) : NULL;
    for (size_t i = 0; i < d; i++) {
        u[i] = (double)ua[i] - (uw ? (double)uw[i] : 0.0);
        g[i] = (double)m->ln_f_w[i] * u[i];
    }
    free(rows);
    /* scale of the full final residual r [d]: sqrt(var(r) + eps), biased
     * variance (LayerNorm), or sqrt(mean(r^2) + eps) (RMSNorm: no centring,
     * TransformerLens' apply_ln_to_stack with the cached ln_final scale) */
    const bool centre = cfg->norm == MODEL_NORM_LAYERNORM;
    const float *r = c->layers[L - 1].resid_post + position * d;
    double mean = 0.0, var = 0.0;
    for (size_t i = 0; i < d && centre; i++)
        mean += r[i];
    mean /= (double)d;
    for (size_t i = 0; i < d; i++)
        var += ((double)r[i] - mean) * ((double)r[i] - mean);
    var /= (double)d;
    a->scale = sqrt(var + (double)cfg->ln_eps);
    const size_t o = position * d;
    a->value[0] = centred_dot(c->embed + o, g, d, centre) / a->scale;
    /* learned positions only; zero with rotary (pos_embed stays zero) */
    a->value[1] = centred_dot(c->pos_embed + o, g, d, centre) / a->scale;
    for (size_t l = 0; l < L; l++) {
        a->value[2 + 2 * l] = centred_dot(c->layers[l].attn_out + o, g, d, centre) / a->scale;
        a->value[3 + 2 * l] = centred_dot(c->layers[l].mlp_out + o, g, d, centre) / a->scale;
    }
    double bias = 0.0, total = 0.0;
    for (size_t i = 0; i < d; i++) {
        bias += m->ln_f_b ? (double)m->ln_f_b[i] * u[i] : 0.0; /* RMSNorm: no bias, 0 */
        total += (double)c->ln_final[o + i] * u[i];
    }
    a->value[a->n_parts - 1] = bias;
    a->total = total;
    a->sum = 0.0;
    for (size_t i = 0; i < a->n_parts; i++)
        a->sum += a->value[i];
    free(u);
    return PS_OK;
}

void lens_attribution_free(lens_attribution *a)
{
    free(a->value);
    memset(a, 0, sizeof *a);
}
