#include "backward.h"

#include "gemm.h"
#include "ops.h"
#include "ops_backward.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* dx += the gradient of a family's normalizing step (LayerNorm or RMSNorm). */
static void norm_backward(const model_config *cfg, float *dx, const float *dnorm, const float *x, size_t rows)
{
    if (cfg->norm == MODEL_NORM_RMSNORM)
        ops_rmsnorm_backward(dx, dnorm, x, rows, cfg->n_embd, cfg->ln_eps);
    else
        ops_layernorm_backward(dx, dnorm, x, rows, cfg->n_embd, cfg->ln_eps);
}

/* The last row's logits and their gradient: dlogits [V] for every metric but
 * logit_diff, whose gradient at ln_final is W_U[answer] - W_U[wrong]. */
static ps_status head_backward(const model *m, const forward_cache *c, forward_cache *g, patch_metric metric,
                               int32_t answer, int32_t wrong, const float *clean_logprobs)
{
    const model_config *cfg = &m->cfg;
    const size_t T = c->T, d = cfg->n_embd, V = cfg->vocab_size;
    float *dfin = g->ln_final + (T - 1) * d; /* gradient of the last row of ln_final */
    float *dlog_hook = g->logits ? g->logits + (g->logits_mode == FORWARD_LOGITS_ALL ? (T - 1) * V : 0) : NULL;
    if (metric == PATCH_LOGIT_DIFF) {
        /* a 2-byte unembedding's rows are widened (model_unembed_row) */
        float *rows = m->unembed ? NULL : malloc(2 * d * sizeof *rows);
        if (!m->unembed && !rows)
            return err_set(PS_ERR_NOMEM, "backward_run: out of memory");
        const float *ua = model_unembed_row(m, (size_t)answer, rows),
                    *uw = model_unembed_row(m, (size_t)wrong, rows ? rows + d : NULL);
        for (size_t i = 0; i < d; i++)
            dfin[i] = ua[i] - uw[i];
        free(rows);
        if (dlog_hook) {
            dlog_hook[answer] += 1.0f;
            dlog_hook[wrong] -= 1.0f;
        }
        return PS_OK;
    }
    if (metric == PATCH_KL && !clean_logprobs)
        return err_set(PS_ERR_INVALID, "backward_run: the kl metric needs the clean run's log-probabilities");
    float *buf = malloc((2 * V + d) * sizeof *buf); /* logits, dl, a widened row */
    double *acc = calloc(d, sizeof *acc);
    if (!buf || !acc) {
        free(buf), free(acc);
        return err_set(PS_ERR_NOMEM, "backward_run: out of memory for %zu logits", V);
    }
    float *logits = buf, *dl = buf + V;
    if (c->logits)
        memcpy(logits, c->logits + (c->logits_mode == FORWARD_LOGITS_ALL ? (T - 1) * V : 0), V * sizeof *logits);
    else
        model_unembed(m, logits, c->ln_final + (T - 1) * d, 1);
    const double lse = forward_logsumexp(logits, V);
    const double pa = exp((double)logits[answer] - lse);
    for (size_t v = 0; v < V; v++) {
        const double p = exp((double)logits[v] - lse), hit = v == (size_t)answer ? 1.0 : 0.0;
        double r = 0.0;
        switch (metric) {
        case PATCH_PROB: r = pa * (hit - p); break;
        case PATCH_LOGPROB: r = hit - p; break;
        case PATCH_KL: r = p - exp((double)clean_logprobs[v]); break;
        default: break;
        }
        dl[v] = (float)r;
    }
    for (size_t v = 0; v < V; v++) {
        const float *u = model_unembed_row(m, v, buf + 2 * V);
        for (size_t i = 0; i < d; i++)
            acc[i] += (double)dl[v] * u[i];
    }
    for (size_t i = 0; i < d; i++)
        dfin[i] = (float)acc[i];
    if (dlog_hook)
        memcpy(dlog_hook, dl, V * sizeof *dl);
    free(buf), free(acc);
    return PS_OK;
}

/* Block l in reverse: reads gl->resid_post, writes every gradient of the
 * block; scratch [T, d]. */
static void block_backward(const model *mdl, const forward_cache *c, forward_cache *g, size_t l, float *scratch)
{
    const model_config *cfg = &mdl->cfg;
    const model_block *b = &mdl->blocks[l];
    const forward_layer *ly = &c->layers[l];
    forward_layer *gl = &g->layers[l];
    const size_t T = c->T, d = cfg->n_embd, m = cfg->n_inner, H = cfg->n_head, Hkv = model_kv_heads(cfg);
    const size_t dh = cfg->d_head;
    const bool gpt2 = cfg->family == MODEL_FAMILY_GPT2, rotary = cfg->pos == MODEL_POS_ROTARY;
    const bool parallel = !gpt2 && cfg->parallel_residual;

    /* resid_post = mlp_in + mlp_out (sequential) or resid_pre + attn_out + mlp_out */
    memcpy(gl->mlp_out, gl->resid_post, T * d * sizeof(float));
    ops_mlp_proj_backward(gl->mlp_post, gl->mlp_out, T, b);
    if (cfg->act == MODEL_ACT_SILU_GATED) {
        ops_silu_mul_backward(gl->mlp_pre, gl->mlp_pre_linear, ly->mlp_pre, ly->mlp_pre_linear, gl->mlp_post, T * m);
        ops_mlp_fc_backward(gl->ln2, gl->mlp_pre_linear, T, b, false);
        ops_mlp_gate_backward(gl->ln2, gl->mlp_pre, T, b);
    } else {
        if (cfg->act == MODEL_ACT_GELU_ERF)
            ops_gelu_erf_backward(gl->mlp_pre, ly->mlp_pre, gl->mlp_post, T * m);
        else
            ops_gelu_backward(gl->mlp_pre, ly->mlp_pre, gl->mlp_post, T * m);
        ops_mlp_fc_backward(gl->ln2, gl->mlp_pre, T, b, false);
    }
    float *dn2 = gpt2 ? scratch : gl->ln2_norm;
    ops_norm_affine_backward(dn2, gl->ln2, b->ln_2_w, T, d);
    if (parallel) {
        memcpy(gl->attn_out, gl->resid_post, T * d * sizeof(float));
        memcpy(gl->resid_pre, gl->resid_post, T * d * sizeof(float));
        norm_backward(cfg, gl->resid_pre, dn2, ly->resid_pre, T);
    } else {
        memcpy(gl->resid_mid, gl->resid_post, T * d * sizeof(float));
        norm_backward(cfg, gl->resid_mid, dn2, ly->resid_mid, T);
        memcpy(gl->attn_out, gl->resid_mid, T * d * sizeof(float));
        memcpy(gl->resid_pre, gl->resid_mid, T * d * sizeof(float));
    }

    /* attention */
    ops_attn_proj_backward(gl->z, gl->attn_out, T, b);
    const float *q = rotary ? ly->rot_q : ly->q, *k = rotary ? ly->rot_k : ly->k;
    float *dq = rotary ? gl->rot_q : gl->q, *dk = rotary ? gl->rot_k : gl->k;
    ops_attention_backward(dq, dk, gl->v, gl->pattern, gl->z, q, k, ly->v, ly->pattern, T, H, Hkv, dh,
                           model_attn_scale(cfg, l));
    if (rotary) {
        ops_rotary_backward(gl->q, gl->rot_q, T, 0, H, dh, cfg->rotary_dim, mdl->rope_cos, mdl->rope_sin);
        ops_rotary_backward(gl->k, gl->rot_k, T, 0, Hkv, dh, cfg->rotary_dim, mdl->rope_cos, mdl->rope_sin);
    }
    ops_qkv_backward(gl->ln1, gl->q, gl->k, gl->v, T, b);
    float *dn1 = gpt2 ? scratch : gl->ln1_norm;
    ops_norm_affine_backward(dn1, gl->ln1, b->ln_1_w, T, d);
    norm_backward(cfg, gl->resid_pre, dn1, ly->resid_pre, T);
}

ps_status backward_run(const model *m, const forward_cache *c, forward_cache *g, patch_metric metric,
                       int32_t answer, int32_t wrong, const float *clean_logprobs)
{
    const model_config *cfg = &m->cfg;
    const size_t T = c->T, d = cfg->n_embd, L = cfg->n_layer, V = cfg->vocab_size;
    if (c->trimmed || g->trimmed || T == 0)
        return err_set(PS_ERR_INVALID, "backward_run: needs a complete run and an untrimmed gradient cache");
    if (g->capacity < T || g->cfg.n_layer != L || g->cfg.n_embd != d)
        return err_set(PS_ERR_INVALID, "backward_run: the gradient cache does not fit the run");
    if (answer < 0 || wrong < 0 || (size_t)answer >= V || (size_t)wrong >= V)
        return err_set(PS_ERR_RANGE, "backward_run: answer %d or wrong %d outside the vocabulary (%zu)", answer,
                       wrong, V);
    memset(g->arena, 0, g->arena_floats * sizeof *g->arena);
    g->T = T;
    memcpy(g->tokens, c->tokens, T * sizeof *c->tokens);
    float *scratch = malloc(T * d * sizeof *scratch);
    if (!scratch)
        return err_set(PS_ERR_NOMEM, "backward_run: out of memory");
    ps_status st = head_backward(m, c, g, metric, answer, wrong, clean_logprobs);
    if (st) {
        free(scratch);
        return st;
    }
    /* ln_final = normalized * w + b, normalized = norm(resid_post of the last block) */
    const size_t last = (T - 1) * d;
    ops_norm_affine_backward(g->ln_final_norm + last, g->ln_final + last, m->ln_f_w, 1, d);
    norm_backward(cfg, g->layers[L - 1].resid_post + last, g->ln_final_norm + last, c->layers[L - 1].resid_post + last,
                  1);
    for (size_t l = L; l-- > 0;) {
        block_backward(m, c, g, l, scratch);
        if (l > 0)
            memcpy(g->layers[l - 1].resid_post, g->layers[l].resid_pre, T * d * sizeof(float));
    }
    memcpy(g->embed, g->layers[0].resid_pre, T * d * sizeof(float));
    if (cfg->pos == MODEL_POS_LEARNED)
        memcpy(g->pos_embed, g->layers[0].resid_pre, T * d * sizeof(float));
    free(scratch);
    return PS_OK;
}
