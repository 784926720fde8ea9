#include "forward.h"

#include "gemm.h"
#include "ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- kernels ------------------------------------------------------------ */

double forward_logsumexp(const float *x, size_t n)
{
    float mx = -INFINITY;
    for (size_t i = 0; i < n; i++)
        mx = fmaxf(mx, x[i]);
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += exp((double)x[i] - mx);
    return mx + log(s);
}

/* ---- cache -------------------------------------------------------------- */

ps_status forward_cache_init(forward_cache *c, const model_config *cfg, size_t capacity,
                             forward_logits logits_mode)
{
    memset(c, 0, sizeof *c);
    if (capacity == 0 || capacity > cfg->n_positions)
        return err_set(PS_ERR_RANGE, "a run of %zu tokens does not fit the model's %zu positions",
                       capacity, cfg->n_positions);
    const size_t T = capacity, d = cfg->n_embd, m = cfg->n_inner, H = cfg->n_head;
    const size_t V = cfg->vocab_size, L = cfg->n_layer, qd = model_q_dim(cfg), kvd = model_kv_dim(cfg);
    const bool gpt2 = cfg->family == MODEL_FAMILY_GPT2, rotary = cfg->pos == MODEL_POS_ROTARY;
    const bool gated = cfg->act == MODEL_ACT_SILU_GATED;
    /* Per block: 6 [T,d] arrays (resid_pre, ln1, attn_out, resid_mid, ln2,
     * mlp_out) + resid_post = 7, q and z [T,qd], k and v [T,kvd], two [T,m],
     * one [H,T,T]; the other families' norm, rotary and gate hooks. */
    size_t per_layer = 7 * T * d + 2 * T * qd + 2 * T * kvd + 2 * T * m + H * T * T;
    if (!gpt2)
        per_layer += 2 * T + 2 * T * d + (rotary ? T * (qd + kvd) : 0) + (gated ? T * m : 0);
    size_t logits_rows = logits_mode == FORWARD_LOGITS_ALL ? T : logits_mode == FORWARD_LOGITS_LAST ? 1 : 0;
    size_t total = 4 * T * d + L * per_layer + logits_rows * V;
    c->arena = calloc(total, sizeof *c->arena);
    c->layers = calloc(L, sizeof *c->layers);
    c->tokens = calloc(T, sizeof *c->tokens);
    if (!c->arena || !c->layers || !c->tokens) {
        forward_cache_free(c);
        return err_set(PS_ERR_NOMEM, "cannot allocate activations for %zu tokens (%zu MB)", T,
                       total * sizeof(float) >> 20);
    }
    c->cfg = *cfg;
    c->capacity = T;
    c->logits_mode = logits_mode;
    c->arena_floats = total;
    float *p = c->arena;
#define TAKE(n) (p += (n), p - (n))
    /* What the patching engines read comes first (the "core", see
     * core_floats); ln1, ln2 and the MLP hidden layer, which
     * they recompute when needed, and the logits come after it, so a sweep
     * broadcasts one contiguous prefix. */
    c->embed = TAKE(T * d);
    c->pos_embed = TAKE(T * d);
    for (size_t l = 0; l < L; l++) {
        forward_layer *ly = &c->layers[l];
        ly->resid_pre = TAKE(T * d);
        ly->q = TAKE(T * qd);
        ly->k = TAKE(T * kvd);
        ly->v = TAKE(T * kvd);
        if (rotary)
            ly->rot_k = TAKE(T * kvd); /* the fast engine's key prefix */
        ly->pattern = TAKE(H * T * T);
        ly->z = TAKE(T * qd);
        ly->attn_out = TAKE(T * d);
        ly->resid_mid = TAKE(T * d);
        ly->mlp_out = TAKE(T * d);
        ly->resid_post = TAKE(T * d);
    }
    c->ln_final = TAKE(T * d);
    c->core_floats = (size_t)(p - c->arena);
    if (c->core_floats != forward_core_floats(cfg, T)) {
        forward_cache_free(c);
        return err_set(PS_ERR_INVALID, "forward_cache_init: the core's layout disagrees with forward_core_floats");
    }
    for (size_t l = 0; l < L; l++) {
        forward_layer *ly = &c->layers[l];
        ly->ln1 = TAKE(T * d);
        ly->ln2 = TAKE(T * d);
        ly->mlp_pre = TAKE(T * m);
        ly->mlp_post = TAKE(T * m);
        if (gpt2)
            continue;
        ly->ln1_scale = TAKE(T);
        ly->ln2_scale = TAKE(T);
        ly->ln1_norm = TAKE(T * d);
        ly->ln2_norm = TAKE(T * d);
        if (rotary)
            ly->rot_q = TAKE(T * qd);
        if (gated)
            ly->mlp_pre_linear = TAKE(T * m);
    }
    c->ln_final_norm = TAKE(T * d);
    c->logits = logits_rows ? TAKE(logits_rows * V) : NULL;
#undef TAKE
    return PS_OK;
}

size_t forward_core_floats(const model_config *cfg, size_t T)
{
    const size_t d = cfg->n_embd, qd = model_q_dim(cfg), kvd = model_kv_dim(cfg);
    const size_t rot_k = cfg->pos == MODEL_POS_ROTARY ? T * kvd : 0;
    return 3 * T * d + cfg->n_layer * (5 * T * d + 2 * T * qd + 2 * T * kvd + rot_k + cfg->n_head * T * T);
}

void forward_cache_free(forward_cache *c)
{
    free(c->arena);
    free(c->layers);
    free(c->tokens);
    memset(c, 0, sizeof *c);
}

void forward_cache_trim(forward_cache *c)
{
    if (!c->arena || c->trimmed)
        return;
    const size_t L = c->cfg.n_layer, n = 3 + 11 * L;
    /* The core's pointers as offsets, so that they survive a moving realloc. */
    float ***field = malloc(n * sizeof *field);
    size_t *off = malloc(n * sizeof *off);
    if (!field || !off) {
        free(field), free(off);
        return; /* keep everything: trimming is an economy, not a need */
    }
    size_t k = 0;
    field[k++] = &c->embed, field[k++] = &c->pos_embed, field[k++] = &c->ln_final;
    for (size_t l = 0; l < L; l++) {
        forward_layer *ly = &c->layers[l];
        float **p[] = {&ly->resid_pre, &ly->q, &ly->k, &ly->v, &ly->pattern, &ly->z, &ly->attn_out,
                       &ly->resid_mid, &ly->mlp_out, &ly->resid_post};
        for (size_t i = 0; i < 10; i++)
            field[k++] = p[i];
        if (ly->rot_k)
            field[k++] = &ly->rot_k;
    }
    const size_t nf = k;
    for (size_t i = 0; i < nf; i++)
        off[i] = (size_t)(*field[i] - c->arena);
    float *a = realloc(c->arena, c->core_floats * sizeof *a);
    if (a) {
        c->arena = a;
        c->arena_floats = c->core_floats;
        for (size_t i = 0; i < nf; i++)
            *field[i] = a + off[i];
        for (size_t l = 0; l < L; l++) {
            forward_layer *ly = &c->layers[l];
            ly->ln1 = ly->ln2 = ly->mlp_pre = ly->mlp_post = NULL;
            ly->ln1_scale = ly->ln2_scale = ly->ln1_norm = ly->ln2_norm = NULL;
            ly->rot_q = ly->mlp_pre_linear = NULL;
        }
        c->ln_final_norm = NULL;
        c->logits = NULL;
        c->trimmed = true;
    }
    free(field);
    free(off);
}

void forward_cache_copy(forward_cache *dst, const forward_cache *src)
{
    memcpy(dst->arena, src->arena, src->arena_floats * sizeof *src->arena);
    memcpy(dst->tokens, src->tokens, src->capacity * sizeof *src->tokens);
    dst->T = src->T;
}

float *forward_cache_hook(const forward_cache *c, hook_point hp)
{
    const forward_layer *ly = hook_kind_in_block(hp.kind) ? &c->layers[hp.layer] : NULL;
    switch (hp.kind) {
    case HOOK_EMBED: return c->embed;
    case HOOK_POS_EMBED: return c->pos_embed;
    case HOOK_RESID_PRE: return ly->resid_pre;
    case HOOK_LN1_SCALE: return ly->ln1_scale;
    case HOOK_LN1_NORMALIZED: return ly->ln1_norm;
    case HOOK_Q: return ly->q;
    case HOOK_K: return ly->k;
    case HOOK_V: return ly->v;
    case HOOK_ROT_Q: return ly->rot_q;
    case HOOK_ROT_K: return ly->rot_k;
    case HOOK_PATTERN: return ly->pattern;
    case HOOK_Z: return ly->z;
    case HOOK_ATTN_OUT: return ly->attn_out;
    case HOOK_RESID_MID: return ly->resid_mid;
    case HOOK_LN2_SCALE: return ly->ln2_scale;
    case HOOK_LN2_NORMALIZED: return ly->ln2_norm;
    case HOOK_MLP_PRE: return ly->mlp_pre;
    case HOOK_MLP_PRE_LINEAR: return ly->mlp_pre_linear;
    case HOOK_MLP_POST: return ly->mlp_post;
    case HOOK_MLP_OUT: return ly->mlp_out;
    case HOOK_RESID_POST: return ly->resid_post;
    case HOOK_LN_FINAL: return c->ln_final_norm;
    case HOOK_LOGITS: return c->logits;
    case HOOK_KIND_COUNT: break;
    }
    return NULL;
}

/* ---- forward ------------------------------------------------------------ */

static ps_status fire(const forward_hooks *hooks, const forward_cache *c, hook_kind kind, size_t layer)
{
    if (!hooks || !hooks->fn)
        return PS_OK;
    hook_point hp = {kind, layer};
    if (hooks->only && !hook_set_has(hooks->only, hp))
        return PS_OK;
    size_t shape[HOOK_MAX_DIMS];
    size_t nd = hook_shape(kind, &c->cfg, c->T, shape, NULL);
    if (kind == HOOK_LOGITS && c->logits_mode == FORWARD_LOGITS_LAST)
        shape[0] = 1;
    return hooks->fn(hooks->user, hp, forward_cache_hook(c, hp), shape, nd);
}

#define FIRE(kind, layer)                                   \
    do {                                                    \
        ps_status st_ = fire(hooks, c, (kind), (layer));    \
        if (st_ != PS_OK)                                   \
            return st_;                                     \
    } while (0)

/* Block l for rows [row0, T): reads ly->resid_pre, writes everything else.
 * Every array is [T, ...] so row r of a [T, w] array starts at r * w.  The
 * MLP runs unfused (c_fc, then gelu_new on a copy) because mlp_pre and
 * mlp_post are both hook points. */
static ps_status block_forward(const model *mdl, forward_cache *c, size_t l, size_t row0,
                               const forward_hooks *hooks)
{
    const model_config *cfg = &mdl->cfg;
    const model_block *b = &mdl->blocks[l];
    forward_layer *ly = &c->layers[l];
    const size_t T = c->T, d = cfg->n_embd, m = cfg->n_inner, n = T - row0;
    const size_t o = row0 * d, om = row0 * m;

    FIRE(HOOK_RESID_PRE, l);
    ops_layernorm(ly->ln1 + o, ly->resid_pre + o, b->ln_1_w, b->ln_1_b, n, d, cfg->ln_eps);
    ops_qkv(ly->q + o, ly->k + o, ly->v + o, ly->ln1 + o, n, b);
    FIRE(HOOK_Q, l);
    FIRE(HOOK_K, l);
    FIRE(HOOK_V, l);
    ops_attention_pattern(ly->pattern, ly->q, ly->k, T, row0, cfg->n_head, cfg->n_head, cfg->d_head,
                          model_attn_scale(cfg, l));
    FIRE(HOOK_PATTERN, l);
    ops_attention_z(ly->z, ly->pattern, ly->v, T, row0, cfg->n_head, cfg->n_head, cfg->d_head);
    FIRE(HOOK_Z, l);
    ops_attn_proj(ly->attn_out + o, ly->z + o, n, b);
    FIRE(HOOK_ATTN_OUT, l);
    ops_add(ly->resid_mid + o, ly->resid_pre + o, ly->attn_out + o, n * d);
    FIRE(HOOK_RESID_MID, l);
    ops_layernorm(ly->ln2 + o, ly->resid_mid + o, b->ln_2_w, b->ln_2_b, n, d, cfg->ln_eps);
    ops_mlp_fc(ly->mlp_pre + om, ly->ln2 + o, n, b, GEMM_PLAIN);
    FIRE(HOOK_MLP_PRE, l);
    memcpy(ly->mlp_post + om, ly->mlp_pre + om, n * m * sizeof(float));
    ops_gelu(ly->mlp_post + om, n * m);
    FIRE(HOOK_MLP_POST, l);
    ops_mlp_proj(ly->mlp_out + o, ly->mlp_post + om, n, b);
    FIRE(HOOK_MLP_OUT, l);
    ops_add(ly->resid_post + o, ly->resid_mid + o, ly->mlp_out + o, n * d);
    FIRE(HOOK_RESID_POST, l);
    return PS_OK;
}

/* ln(x) of rows with its hook points: normalized and scale, then the
 * affine step (hooks may overwrite the normalized rows in between). */
#define NORM_HOOKED(out_, norm_, scale_, x_, w_, bias_, kind_scale_, kind_norm_, layer_)             \
    do {                                                                                      \
        if (cfg->norm == MODEL_NORM_RMSNORM)                                                  \
            ops_rmsnorm_normalize((norm_) + o, (scale_) + row0, (x_) + o, n, d, cfg->ln_eps); \
        else                                                                                  \
            ops_layernorm_normalize((norm_) + o, (scale_) + row0, (x_) + o, n, d, cfg->ln_eps); \
        FIRE(kind_scale_, layer_);                                                            \
        FIRE(kind_norm_, layer_);                                                             \
        ops_norm_affine((out_) + o, (norm_) + o, w_, bias_, n, d);                            \
    } while (0)

/* Block l of a GPT-NeoX / Llama / Qwen2 model for rows [row0, T): the same
 * kernels as block_forward in the family's order.  q/k/v are [T, H*dh] /
 * [T, H_kv*dh]; with rotary positions the attention reads rot_q / rot_k
 * (rows rotated at their absolute positions).  Parallel residual:
 * resid_post = resid_pre + attn_out + mlp_out with ln2 read from resid_pre. */
static ps_status block_forward_family(const model *mdl, forward_cache *c, size_t l, size_t row0,
                                      const forward_hooks *hooks)
{
    const model_config *cfg = &mdl->cfg;
    const model_block *b = &mdl->blocks[l];
    forward_layer *ly = &c->layers[l];
    const size_t T = c->T, d = cfg->n_embd, m = cfg->n_inner, n = T - row0, H = cfg->n_head;
    const size_t Hkv = model_kv_heads(cfg), dh = cfg->d_head, qd = model_q_dim(cfg), kvd = model_kv_dim(cfg);
    const size_t o = row0 * d, om = row0 * m, oq = row0 * qd, okv = row0 * kvd;
    const bool rotary = cfg->pos == MODEL_POS_ROTARY;

    FIRE(HOOK_RESID_PRE, l);
    NORM_HOOKED(ly->ln1, ly->ln1_norm, ly->ln1_scale, ly->resid_pre, b->ln_1_w, b->ln_1_b, HOOK_LN1_SCALE,
                HOOK_LN1_NORMALIZED, l);
    ops_qkv(ly->q + oq, ly->k + okv, ly->v + okv, ly->ln1 + o, n, b);
    FIRE(HOOK_Q, l);
    FIRE(HOOK_K, l);
    FIRE(HOOK_V, l);
    const float *q = ly->q, *k = ly->k;
    if (rotary) {
        ops_rotary(ly->rot_q + oq, ly->q + oq, n, row0, H, dh, cfg->rotary_dim, mdl->rope_cos, mdl->rope_sin);
        ops_rotary(ly->rot_k + okv, ly->k + okv, n, row0, Hkv, dh, cfg->rotary_dim, mdl->rope_cos, mdl->rope_sin);
        FIRE(HOOK_ROT_Q, l);
        FIRE(HOOK_ROT_K, l);
        q = ly->rot_q, k = ly->rot_k;
    }
    ops_attention_pattern(ly->pattern, q, k, T, row0, H, Hkv, dh, model_attn_scale(cfg, l));
    FIRE(HOOK_PATTERN, l);
    ops_attention_z(ly->z, ly->pattern, ly->v, T, row0, H, Hkv, dh);
    FIRE(HOOK_Z, l);
    ops_attn_proj(ly->attn_out + o, ly->z + oq, n, b);
    FIRE(HOOK_ATTN_OUT, l);
    const float *mlp_in = ly->resid_pre;
    if (!cfg->parallel_residual) {
        ops_add(ly->resid_mid + o, ly->resid_pre + o, ly->attn_out + o, n * d);
        FIRE(HOOK_RESID_MID, l);
        mlp_in = ly->resid_mid;
    }
    NORM_HOOKED(ly->ln2, ly->ln2_norm, ly->ln2_scale, mlp_in, b->ln_2_w, b->ln_2_b, HOOK_LN2_SCALE,
                HOOK_LN2_NORMALIZED, l);
    if (cfg->act == MODEL_ACT_SILU_GATED) {
        ops_mlp_gate(ly->mlp_pre + om, ly->ln2 + o, n, b);
        FIRE(HOOK_MLP_PRE, l);
        ops_mlp_fc(ly->mlp_pre_linear + om, ly->ln2 + o, n, b, GEMM_PLAIN);
        FIRE(HOOK_MLP_PRE_LINEAR, l);
        ops_silu_mul(ly->mlp_post + om, ly->mlp_pre + om, ly->mlp_pre_linear + om, n * m);
    } else {
        ops_mlp_fc(ly->mlp_pre + om, ly->ln2 + o, n, b, GEMM_PLAIN);
        FIRE(HOOK_MLP_PRE, l);
        memcpy(ly->mlp_post + om, ly->mlp_pre + om, n * m * sizeof(float));
        if (cfg->act == MODEL_ACT_GELU_ERF)
            ops_gelu_erf(ly->mlp_post + om, n * m);
        else
            ops_gelu(ly->mlp_post + om, n * m);
    }
    FIRE(HOOK_MLP_POST, l);
    ops_mlp_proj(ly->mlp_out + o, ly->mlp_post + om, n, b);
    FIRE(HOOK_MLP_OUT, l);
    if (cfg->parallel_residual) {
        /* HF GPTNeoXLayer: mlp_output + attn_output + hidden_states */
        ops_add(ly->resid_post + o, ly->mlp_out + o, ly->attn_out + o, n * d);
        ops_add(ly->resid_post + o, ly->resid_post + o, ly->resid_pre + o, n * d);
    } else {
        ops_add(ly->resid_post + o, ly->resid_mid + o, ly->mlp_out + o, n * d);
    }
    FIRE(HOOK_RESID_POST, l);
    return PS_OK;
}

static ps_status head_forward(const model *mdl, forward_cache *c, size_t row0, const forward_hooks *hooks)
{
    const model_config *cfg = &mdl->cfg;
    const size_t T = c->T, d = cfg->n_embd, V = cfg->vocab_size;
    const float *last = c->layers[cfg->n_layer - 1].resid_post;
    /* x / scale (the hook), then the weight and bias: ops_layernorm's bits */
    if (cfg->norm == MODEL_NORM_RMSNORM)
        ops_rmsnorm_normalize(c->ln_final_norm + row0 * d, NULL, last + row0 * d, T - row0, d, cfg->ln_eps);
    else
        ops_layernorm_normalize(c->ln_final_norm + row0 * d, NULL, last + row0 * d, T - row0, d, cfg->ln_eps);
    FIRE(HOOK_LN_FINAL, 0);
    ops_norm_affine(c->ln_final + row0 * d, c->ln_final_norm + row0 * d, mdl->ln_f_w, mdl->ln_f_b, T - row0, d);
    if (c->logits_mode == FORWARD_LOGITS_NONE)
        return PS_OK;
    /* logits[r, :] = ln_final[r, :] @ unembed^T, unembed [V, d] */
    size_t r0 = c->logits_mode == FORWARD_LOGITS_ALL ? row0 : T - 1;
    float *out = c->logits_mode == FORWARD_LOGITS_ALL ? c->logits + r0 * V : c->logits;
    model_unembed(mdl, out, c->ln_final + r0 * d, T - r0);
    FIRE(HOOK_LOGITS, 0);
    return PS_OK;
}

ps_status forward_run_from(const model *m, forward_cache *c, size_t layer0, size_t row0,
                           const forward_hooks *hooks)
{
    const size_t L = m->cfg.n_layer, d = m->cfg.n_embd, T = c->T;
    if (c->trimmed)
        return err_set(PS_ERR_INVALID, "forward_run_from: the cache was trimmed to its core");
    if (layer0 > L || row0 >= T)
        return err_set(PS_ERR_RANGE, "suffix run from block %zu row %zu outside %zu blocks x %zu rows",
                       layer0, row0, L, T);
    for (size_t l = layer0; l < L; l++) {
        ps_status st = m->cfg.family == MODEL_FAMILY_GPT2 ? block_forward(m, c, l, row0, hooks)
                                                         : block_forward_family(m, c, l, row0, hooks);
        if (st)
            return st;
        if (l + 1 < L)
            memcpy(c->layers[l + 1].resid_pre + row0 * d, c->layers[l].resid_post + row0 * d,
                   (T - row0) * d * sizeof(float));
    }
    return head_forward(m, c, row0, hooks);
}

ps_status forward_run(const model *m, forward_cache *c, const int32_t *tokens, size_t T,
                      const forward_hooks *hooks)
{
    const size_t d = m->cfg.n_embd;
    if (c->trimmed)
        return err_set(PS_ERR_INVALID, "forward_run: the cache was trimmed to its core");
    if (T == 0 || T > c->capacity)
        return err_set(PS_ERR_RANGE, "a run of %zu tokens does not fit (1..%zu)", T, c->capacity);
    for (size_t t = 0; t < T; t++)
        if (tokens[t] < 0 || (size_t)tokens[t] >= m->cfg.vocab_size)
            return err_set(PS_ERR_RANGE, "token id %d at position %zu is outside the vocabulary (%zu)",
                           tokens[t], t, m->cfg.vocab_size);
    c->T = T;
    memcpy(c->tokens, tokens, T * sizeof *tokens);
    for (size_t t = 0; t < T; t++) {
        /* a 2-byte embedding widens its row into place; F32 is copied */
        float *dst = c->embed + t * d;
        const float *row = model_embed_row(m, (size_t)tokens[t], dst);
        if (row != dst)
            memcpy(dst, row, d * sizeof(float));
    }
    FIRE(HOOK_EMBED, 0);
    if (m->cfg.pos == MODEL_POS_LEARNED) {
        for (size_t t = 0; t < T; t++)
            memcpy(c->pos_embed + t * d, m->wpe + t * d, d * sizeof(float));
        FIRE(HOOK_POS_EMBED, 0);
        ops_add(c->layers[0].resid_pre, c->embed, c->pos_embed, T * d);
    } else {
        /* rotary: positions enter in the attention; pos_embed stays zero */
        memcpy(c->layers[0].resid_pre, c->embed, T * d * sizeof(float));
    }
    return forward_run_from(m, c, 0, 0, hooks);
}
