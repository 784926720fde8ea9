#include "backward.h"

#include "gemm.h"
#include "ops.h"
#include "ops_backward.h"
#include "pool.h"

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

/* The activations of block l the pass reads outside a cache's core
 * (forward_cache_trim drops them), rebuilt for rows [row0, T) by the
 * forward's own kernels on the same rows, hence with the forward's bits:
 * ln2 = norm(mlp input) [T, d], mlp_pre (the gate's pre-activation when
 * gated) and mlp_lin [T, m], rot_q [T, H*dh].  Pointers into a complete
 * cache are used as they are. */
typedef struct {
    float *ln2, *mlp_pre, *mlp_lin, *rot_q;
} rebuilt;

static void block_rebuild(const model *mdl, const forward_cache *c, size_t l, size_t row0, rebuilt *rb,
                          const float **mlp_pre, const float **mlp_lin, const float **rot_q)
{
    const model_config *cfg = &mdl->cfg;
    const model_block *b = &mdl->blocks[l];
    const forward_layer *ly = &c->layers[l];
    if (!c->trimmed) {
        *mlp_pre = ly->mlp_pre, *mlp_lin = ly->mlp_pre_linear, *rot_q = ly->rot_q;
        return;
    }
    const size_t T = c->T, d = cfg->n_embd, m = cfg->n_inner, n = T - row0, o = row0 * d, om = row0 * m;
    const size_t oq = row0 * model_q_dim(cfg);
    const bool gpt2 = cfg->family == MODEL_FAMILY_GPT2;
    const float *mlp_in = !gpt2 && cfg->parallel_residual ? ly->resid_pre : ly->resid_mid;
    if (gpt2) {
        ops_layernorm(rb->ln2 + o, mlp_in + o, b->ln_2_w, b->ln_2_b, n, d, cfg->ln_eps);
    } else {
        if (cfg->norm == MODEL_NORM_RMSNORM)
            ops_rmsnorm_normalize(rb->ln2 + o, NULL, mlp_in + o, n, d, cfg->ln_eps);
        else
            ops_layernorm_normalize(rb->ln2 + o, NULL, mlp_in + o, n, d, cfg->ln_eps);
        ops_norm_affine(rb->ln2 + o, rb->ln2 + o, b->ln_2_w, b->ln_2_b, n, d);
    }
    if (cfg->act == MODEL_ACT_SILU_GATED) {
        ops_mlp_gate(rb->mlp_pre + om, rb->ln2 + o, n, b);
        ops_mlp_fc(rb->mlp_lin + om, rb->ln2 + o, n, b, GEMM_PLAIN);
    } else {
        ops_mlp_fc(rb->mlp_pre + om, rb->ln2 + o, n, b, GEMM_PLAIN);
    }
    if (cfg->pos == MODEL_POS_ROTARY)
        ops_rotary(rb->rot_q + oq, ly->q + oq, n, row0, cfg->n_head, cfg->d_head, cfg->rotary_dim, mdl->rope_cos,
                   mdl->rope_sin);
    *mlp_pre = rb->mlp_pre, *mlp_lin = rb->mlp_lin, *rot_q = rb->rot_q;
}

/* Block l in reverse for rows [row0, T): reads gl->resid_post, writes every
 * gradient of the block on those rows; scratch [T, d]. */
static void block_backward(const model *mdl, const forward_cache *c, forward_cache *g, size_t l, size_t row0,
                           float *scratch, rebuilt *rb)
{
    const model_config *cfg = &mdl->cfg;
    const model_block *b = &mdl->blocks[l];
    const forward_layer *ly = &c->layers[l];
    forward_layer *gl = &g->layers[l];
    const size_t T = c->T, d = cfg->n_embd, m = cfg->n_inner, H = cfg->n_head, Hkv = model_kv_heads(cfg);
    const size_t dh = cfg->d_head, n = T - row0, o = row0 * d, om = row0 * m, oq = row0 * model_q_dim(cfg);
    const size_t okv = row0 * model_kv_dim(cfg), rows_bytes = n * d * sizeof(float);
    const bool gpt2 = cfg->family == MODEL_FAMILY_GPT2, rotary = cfg->pos == MODEL_POS_ROTARY;
    const bool parallel = !gpt2 && cfg->parallel_residual;
    const float *mlp_pre, *mlp_lin, *rot_q;
    block_rebuild(mdl, c, l, row0, rb, &mlp_pre, &mlp_lin, &rot_q);

    /* resid_post = mlp_in + mlp_out (sequential) or resid_pre + attn_out + mlp_out */
    memcpy(gl->mlp_out + o, gl->resid_post + o, rows_bytes);
    ops_mlp_proj_backward(gl->mlp_post + om, gl->mlp_out + o, n, b);
    if (cfg->act == MODEL_ACT_SILU_GATED) {
        ops_silu_mul_backward(gl->mlp_pre + om, gl->mlp_pre_linear + om, mlp_pre + om, mlp_lin + om,
                              gl->mlp_post + om, n * m);
        ops_mlp_fc_backward(gl->ln2 + o, gl->mlp_pre_linear + om, n, b, false);
        ops_mlp_gate_backward(gl->ln2 + o, gl->mlp_pre + om, n, b);
    } else {
        if (cfg->act == MODEL_ACT_GELU_ERF)
            ops_gelu_erf_backward(gl->mlp_pre + om, mlp_pre + om, gl->mlp_post + om, n * m);
        else
            ops_gelu_backward(gl->mlp_pre + om, mlp_pre + om, gl->mlp_post + om, n * m);
        ops_mlp_fc_backward(gl->ln2 + o, gl->mlp_pre + om, n, b, false);
    }
    float *dn2 = (gpt2 ? scratch : gl->ln2_norm) + o;
    ops_norm_affine_backward(dn2, gl->ln2 + o, b->ln_2_w, n, d);
    if (parallel) {
        memcpy(gl->attn_out + o, gl->resid_post + o, rows_bytes);
        memcpy(gl->resid_pre + o, gl->resid_post + o, rows_bytes);
        norm_backward(cfg, gl->resid_pre + o, dn2, ly->resid_pre + o, n);
    } else {
        memcpy(gl->resid_mid + o, gl->resid_post + o, rows_bytes);
        norm_backward(cfg, gl->resid_mid + o, dn2, ly->resid_mid + o, n);
        memcpy(gl->attn_out + o, gl->resid_mid + o, rows_bytes);
        memcpy(gl->resid_pre + o, gl->resid_mid + o, rows_bytes);
    }

    /* attention */
    ops_attn_proj_backward(gl->z + oq, gl->attn_out + o, n, b);
    const float *q = rotary ? rot_q : ly->q, *k = rotary ? ly->rot_k : ly->k;
    float *dq = rotary ? gl->rot_q : gl->q, *dk = rotary ? gl->rot_k : gl->k;
    ops_attention_backward(dq, dk, gl->v, gl->pattern, gl->z, q, k, ly->v, ly->pattern, T, row0, H, Hkv, dh,
                           model_attn_scale(cfg, l));
    if (rotary) {
        ops_rotary_backward(gl->q + oq, gl->rot_q + oq, n, row0, H, dh, cfg->rotary_dim, mdl->rope_cos,
                            mdl->rope_sin);
        ops_rotary_backward(gl->k + okv, gl->rot_k + okv, n, row0, Hkv, dh, cfg->rotary_dim, mdl->rope_cos,
                            mdl->rope_sin);
    }
    ops_qkv_backward(gl->ln1 + o, gl->q + oq, gl->k + okv, gl->v + okv, n, b);
    float *dn1 = (gpt2 ? scratch : gl->ln1_norm) + o;
    ops_norm_affine_backward(dn1, gl->ln1 + o, b->ln_1_w, n, d);
    norm_backward(cfg, gl->resid_pre + o, dn1, ly->resid_pre + o, n);
}

ps_status backward_run(const model *m, const forward_cache *c, forward_cache *g, patch_metric metric,
                       int32_t answer, int32_t wrong, const float *clean_logprobs)
{
    const backward_opts o = {0, BACKWARD_NO_DROP};
    return backward_run_opts(m, c, g, &o, metric, answer, wrong, clean_logprobs);
}

ps_status backward_run_opts(const model *m, const forward_cache *c, forward_cache *g, const backward_opts *opts,
                            patch_metric metric, int32_t answer, int32_t wrong, const float *clean_logprobs)
{
    const model_config *cfg = &m->cfg;
    const size_t T = c->T, d = cfg->n_embd, L = cfg->n_layer, V = cfg->vocab_size, row0 = opts->row0;
    if (g->trimmed || T == 0)
        return err_set(PS_ERR_INVALID, "backward_run: needs a run and an untrimmed gradient cache");
    if (g->capacity < T || g->cfg.n_layer != L || g->cfg.n_embd != d)
        return err_set(PS_ERR_INVALID, "backward_run: the gradient cache does not fit the run");
    if (row0 >= T)
        return err_set(PS_ERR_RANGE, "backward_run: first row %zu outside the run's %zu rows", row0, T);
    if (answer < 0 || wrong < 0 || (size_t)answer >= V || (size_t)wrong >= V)
        return err_set(PS_ERR_RANGE, "backward_run: answer %d or wrong %d outside the vocabulary (%zu)", answer,
                       wrong, V);
    memset(g->arena, 0, g->arena_floats * sizeof *g->arena);
    g->T = T;
    memcpy(g->tokens, c->tokens, T * sizeof *c->tokens);
    const size_t m_ = cfg->n_inner, qd = model_q_dim(cfg);
    const bool rebuild = c->trimmed, gated = cfg->act == MODEL_ACT_SILU_GATED, rotary = cfg->pos == MODEL_POS_ROTARY;
    const size_t scratch_floats = T * d + (rebuild ? T * d + T * m_ + (gated ? T * m_ : 0) + (rotary ? T * qd : 0) : 0);
    float *scratch = malloc(scratch_floats * sizeof *scratch);
    if (!scratch)
        return err_set(PS_ERR_NOMEM, "backward_run: out of memory");
    rebuilt rb = {0};
    if (rebuild) {
        float *p = scratch + T * d;
        rb.ln2 = p, p += T * d;
        rb.mlp_pre = p, p += T * m_;
        if (gated)
            rb.mlp_lin = p, p += T * m_;
        if (rotary)
            rb.rot_q = p;
    }
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
        if (l == opts->drop_layer) /* GradDrop: only the skip connection carries the gradient past block l */
            memcpy(g->layers[l].resid_pre + row0 * d, g->layers[l].resid_post + row0 * d,
                   (T - row0) * d * sizeof(float));
        else
            block_backward(m, c, g, l, row0, scratch, &rb);
        if (l > 0)
            memcpy(g->layers[l - 1].resid_post, g->layers[l].resid_pre, T * d * sizeof(float));
    }
    memcpy(g->embed, g->layers[0].resid_pre, T * d * sizeof(float));
    if (cfg->pos == MODEL_POS_LEARNED)
        memcpy(g->pos_embed, g->layers[0].resid_pre, T * d * sizeof(float));
    free(scratch);
    return PS_OK;
}

/* ---- per-node input gradients (edge attribution patching) ---------------- */

size_t backward_node_count(const model_config *cfg, size_t l)
{
    return l < cfg->n_layer ? cfg->n_head + 2 * model_kv_heads(cfg) + 1 : 1;
}

typedef struct {
    const model_config *cfg;
    float *out;
    float *dnorm;          /* [nodes, n, d]: dM/d(norm output) of each node, turned in place into dM/d(normalized) */
    const float *x1, *x2;  /* [n, d]: the inputs of norm 1 (attention) and norm 2 (MLP) */
    const float *w1, *w2;
    size_t nodes, n;
} node_norm_task;

/* out[v] = N(x, w * dnorm[v]) for each node v (the last one through norm 2) */
static void node_norm_worker(void *arg, size_t tid, size_t nt)
{
    node_norm_task *t = arg;
    const size_t d = t->cfg->n_embd, nd = t->n * d;
    for (size_t v = tid; v < t->nodes; v += nt) {
        const bool mlp = v + 1 == t->nodes;
        float *dn = t->dnorm + v * nd, *o = t->out + v * nd;
        ops_norm_affine_backward(dn, dn, mlp ? t->w2 : t->w1, t->n, d);
        memset(o, 0, nd * sizeof *o);
        norm_backward(t->cfg, o, dn, mlp ? t->x2 : t->x1, t->n);
    }
}

ps_status backward_node_input_grads(const model *m, const forward_cache *c, const forward_cache *g, size_t l,
                                    size_t row0, float *out)
{
    const model_config *cfg = &m->cfg;
    const size_t T = c->T, d = cfg->n_embd, L = cfg->n_layer, H = cfg->n_head, Hkv = model_kv_heads(cfg);
    const size_t dh = cfg->d_head, qd = model_q_dim(cfg), kvd = model_kv_dim(cfg);
    if (l > L || row0 >= T || g->T != T || g->trimmed)
        return err_set(PS_ERR_INVALID, "backward_node_input_grads: block %zu or row %zu outside the run, or no "
                       "gradients of it", l, row0);
    const size_t n = T - row0, o = row0 * d;
    if (l == L) { /* the logits: ln_final is the only reader of the last resid_post */
        memcpy(out, g->layers[L - 1].resid_post + o, n * d * sizeof *out);
        return PS_OK;
    }
    const model_block *b = &m->blocks[l];
    if (!gemm_is_panels(&b->q_w) || !gemm_is_panels(&b->k_w) || !gemm_is_panels(&b->v_w))
        return err_set(PS_ERR_INVALID, "per-node gradients read each head's slice of W_Q, W_K, W_V, which block %zu "
                       "holds packed in another layout than gemm_pack's panels (e.g. for BF16 arithmetic)", l);
    const size_t nodes = backward_node_count(cfg, l);
    float *wbuf = malloc(d * qd * sizeof *wbuf), *buf = malloc(nodes * n * d * sizeof *buf);
    if (!wbuf || !buf) {
        free(wbuf), free(buf);
        return err_set(PS_ERR_NOMEM, "backward_node_input_grads: out of memory for %zu nodes of %zu rows", nodes, n);
    }
    const forward_layer *ly = &c->layers[l], *gl = &g->layers[l];
    /* dM/d(ln1 output) of each head's q, k, v alone, then of the MLP */
    ops_heads_backward(buf, gl->q + row0 * qd, n, &b->q_w, H, dh, wbuf);
    ops_heads_backward(buf + H * n * d, gl->k + row0 * kvd, n, &b->k_w, Hkv, dh, wbuf);
    ops_heads_backward(buf + (H + Hkv) * n * d, gl->v + row0 * kvd, n, &b->v_w, Hkv, dh, wbuf);
    memcpy(buf + (nodes - 1) * n * d, gl->ln2 + o, n * d * sizeof *buf);
    const bool parallel = cfg->family != MODEL_FAMILY_GPT2 && cfg->parallel_residual;
    node_norm_task t = {cfg, out, buf, ly->resid_pre + o, (parallel ? ly->resid_pre : ly->resid_mid) + o,
                        b->ln_1_w, b->ln_2_w, nodes, n};
    pool_run(nodes, node_norm_worker, &t);
    free(wbuf), free(buf);
    return PS_OK;
}
