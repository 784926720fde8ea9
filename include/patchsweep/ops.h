/*
 * ops: the operations of a GPT-2 block, one function each (llm.c style),
 * shared by the forward pass (forward.c) and both patching engines, so that
 * the arithmetic of a row exists in exactly one place.
 *
 * Shapes use d = n_embd, m = n_inner, H = n_head, dh = d_head = d / H; a
 * [rows, d] array has row r at r * d.  q, k, v and z rows are [H, dh]
 * (head h at h * dh within a row), the layout of hooks.h.
 *
 * Bits: every function computes a row (a row and head for attention) in a
 * fixed order that does not depend on the other rows of the call, the row
 * blocking or the thread count, so the forward pass and the suffix jobs of
 * the fast engine give the same bits for the same inputs.
 */
#ifndef PS_OPS_H
#define PS_OPS_H

#include <stddef.h>

#include "gemm.h"
#include "model.h"

/* The statistics of one LayerNorm row x [d], in double and index order:
 * mean = sum(x) / d, var = sum((x - mean)^2) / d (biased); shared by
 * ops_layernorm, ops_layernorm_normalize and the backward pass so that all
 * three see the same bits. */
void ops_layernorm_stats(const float *x, size_t d, double *mean, double *var);

/* LayerNorm of rows, x and out [rows, d], w and b [d]:
 *   out[r, :] = (x[r, :] - mean_r) / sqrt(var_r + eps) * w + b
 * mean_r and the biased variance var_r = mean((x[r, :] - mean_r)^2) summed
 * in double, in index order; out may not alias x. */
void ops_layernorm(float *out, const float *x, const float *w, const float *b, size_t rows, size_t d,
                   float eps);

/* ops_layernorm with the rows split among the pool's threads (pool.h);
 * the same bits as ops_layernorm for any thread count. */
void ops_layernorm_threaded(float *out, const float *x, const float *w, const float *b, size_t rows,
                            size_t d, float eps);

/* out[i] = a[i] + b[i], i < n (the residual adds); out may be a or b.
 * Split among the pool's threads (element-wise: the same bits). */
void ops_add(float *out, const float *a, const float *b, size_t n);

/* out[i] = (a[i] + b[i]) + c[i], in that order (the parallel residual:
 * (mlp_out + attn_out) + resid_pre); out may be any input; threaded as ops_add. */
void ops_add3(float *out, const float *a, const float *b, const float *c, size_t n);

/* The QKV projection of rows, x [rows, d]:
 *   q = x Wq + bq [rows, H*dh], k = x Wk + bk, v = x Wv + bv [rows, H_kv*dh]
 * (GPT-2: the column blocks of c_attn; biases NULL when the model has none);
 * a NULL output is not computed. */
void ops_qkv(float *q, float *k, float *v, const float *x, size_t rows, const model_block *b);

/* The attention output projection: out[rows, d] = z[rows, d] W_O + b_O. */
void ops_attn_proj(float *out, const float *z, size_t rows, const model_block *b);

/* Each head's share of the attention output apart (TransformerLens'
 * hook_result, no bias): for every head h < H,
 *   out[h][rows, d] = z[rows, h*dh .. h*dh+dh) @ W_O[h*dh .. h*dh+dh, :]
 * so that sum_h out[h] + b_O = ops_attn_proj's out.  out [H, rows, d], z
 * [rows, H*dh]; wbuf [H*dh, d] scratch (W_O unpacked, gemm_unpack).
 * Threaded over heads. */
void ops_attn_result(float *out, const float *z, size_t rows, const model_block *b, size_t H, size_t dh,
                     float *wbuf);

/* The MLP's input layer: h[rows, m] = x[rows, d] W_fc + b_fc, with
 * gelu_new applied in the product (GEMM_GELU) or not (GEMM_PLAIN, then
 * ops_gelu gives the same bits, see gemm.h). */
void ops_mlp_fc(float *h, const float *x, size_t rows, const model_block *b, gemm_epilogue ep);

/* gelu_new in place over n floats (gemm_gelu). */
void ops_gelu(float *x, size_t n);

/* Exact GELU in place over n floats: x = 0.5 x (1 + erf(x / sqrt 2))
 * (HF's "gelu", GPT-NeoX). */
void ops_gelu_erf(float *x, size_t n);

/* The gate of a gated MLP: g[rows, m] = x[rows, d] W_gate + b_gate. */
void ops_mlp_gate(float *g, const float *x, size_t rows, const model_block *b);

/* SiLU-gated product over n floats: out = silu(gate) * lin,
 * silu(g) = g / (1 + exp(-g)); out may alias gate or lin. */
void ops_silu_mul(float *out, const float *gate, const float *lin, size_t n);

/* The normalizing step of a LayerNorm, rows of x [rows, d]:
 *   normalized[r, :] = (x[r, :] - mean_r) / scale_r,  scale_r = sqrt(var_r + eps)
 * with ops_layernorm's statistics and arithmetic (so ops_norm_affine after
 * it gives ops_layernorm's bits); scale [rows] may be NULL. */
void ops_layernorm_normalize(float *normalized, float *scale, const float *x, size_t rows, size_t d, float eps);

/* The normalizing step of an RMSNorm (HF LlamaRMSNorm, float32 math):
 *   normalized[r, :] = x[r, :] / scale_r,  scale_r = sqrt(mean(x[r, :]^2) + eps)
 * the mean of squares summed in double; scale [rows] may be NULL. */
void ops_rmsnorm_normalize(float *normalized, float *scale, const float *x, size_t rows, size_t d, float eps);

/* The affine step of a norm: out[r, :] = normalized[r, :] * w + b (b NULL:
 * no bias, RMSNorm); out may alias normalized. */
void ops_norm_affine(float *out, const float *normalized, const float *w, const float *b, size_t rows, size_t d);

/* Rotary position embedding (rotate-half, GPT-NeoX / Llama), rows of x
 * [rows, n_heads, dh] at absolute positions pos0 + r, on the first `rot`
 * dims of each head, half = rot / 2, c/s = cos_tab/sin_tab [pos, half]:
 *   out[i]        = x[i] c[i] - x[i + half] s[i]        i < half
 *   out[i + half] = x[i + half] c[i] + x[i] s[i]
 *   out[i]        = x[i]                                 rot <= i < dh
 * out may not alias x. */
void ops_rotary(float *out, const float *x, size_t rows, size_t pos0, size_t n_heads, size_t dh, size_t rot,
                const float *cos_tab, const float *sin_tab);

/* The norm of a family's rows (model_norm), x and out [rows, d], w [d], b
 * [d] or NULL, split among the pool's threads: LayerNorm as
 * ops_layernorm_threaded, RMSNorm as ops_rmsnorm_normalize then
 * ops_norm_affine per row (the forward pass's bits for any thread count). */
void ops_norm_threaded(float *out, const float *x, const float *w, const float *b, size_t rows, size_t d, float eps,
                       model_norm norm);

/* The MLP of rows for any activation (model_act), x [rows, d] (the ln_2
 * output), out [rows, d]:
 *   gelu_new   out = gelu_new(x W_fc + b_fc) W_proj + b_proj     (ops_mlp)
 *   gelu_erf   out = gelu_erf(x W_fc + b_fc) W_proj + b_proj
 *   silu_gated out = (silu(x W_gate + b_gate) * (x W_up + b_up)) W_down + b_down
 * h [rows, m] is scratch (the hidden layer), g [rows, m] too (gated only;
 * NULL otherwise).  The kernels and bits of forward.c's block. */
void ops_mlp_act(float *out, float *h, float *g, const float *x, size_t rows, const model_block *b, model_act act);

/* The MLP's output layer: out[rows, d] = h[rows, m] W_proj + b_proj. */
void ops_mlp_proj(float *out, const float *h, size_t rows, const model_block *b);

/* The MLP of rows: out[rows, d] = gelu_new(x W_fc + b_fc) W_proj + b_proj,
 * x [rows, d] (the ln_2 output); h [rows, m] is scratch (the hidden layer). */
void ops_mlp(float *out, float *h, const float *x, size_t rows, const model_block *b);

/* ---- causal softmax attention ----------------------------------------------
 *
 * Keys and values of one sequence may be stored in two pieces: rows j < split
 * at prefix + j*d (a cached run, the KV prefix) and rows j >= split at
 * rows + (j - split)*d (the rows being computed); d is the key/value row
 * width H_kv * dh.  Grouped-query attention: query head h reads key/value
 * head h / (H / H_kv).  A contiguous [T, d] array
 * is prefix = rows = the array with split = 0.  Pointers passed to the row
 * functions are already offset to head h (+ h*dh).
 *
 * The two row functions below are the one implementation of attention; the
 * three block forms only loop over rows and heads. */

/* One pattern row, query row i of head h, keys j <= i:
 *   p[j] = exp(s_j - max s) / sum_{j'<=i} exp(s_j' - max s),
 *   s_j = (sum_e q[e] k_j[e]) * scale                   for j <= i
 * (scale = model_attn_scale: 1/sqrt(dh) but for GPT-2's options)
 *   p[j] = 0                                              for i < j < n
 * s_j summed in float in e order; the normalizer summed in double in j
 * order, applied as one float multiply by (float)(1 / sum).  p [n], n > i. */
void ops_attention_softmax_row(float *p, const float *q, const float *k_prefix, const float *k_rows,
                               size_t split, size_t i, size_t n, size_t d, size_t dh, float scale);

/* The weighted sum of one query row and head: z[e] = sum_{j<n} p[j] v_j[e],
 * e < dh, in j order, terms with p[j] == 0 skipped (so a pattern written
 * above the diagonal by a hook is honoured, TransformerLens' semantics). */
void ops_attention_mix_row(float *z, const float *p, const float *v_prefix, const float *v_rows,
                           size_t split, size_t n, size_t d, size_t dh);

/* The pattern of query rows [row0, T) of one contiguous sequence, all heads:
 * pattern [H, T, T], row (h, i) = ops_attention_softmax_row over q [T, H*dh]
 * and k [T, H_kv*dh] (rows < row0 of k are read as they are: the prefix).
 * Rows < row0 of the pattern are not written. */
void ops_attention_pattern(float *pattern, const float *q, const float *k, size_t T, size_t row0, size_t H,
                           size_t H_kv, size_t dh, float scale);

/* z rows [row0, T) [T, H*dh] from a pattern [H, T, T] and v [T, H_kv*dh]:
 * z[i, h, :] = ops_attention_mix_row over all j < T. */
void ops_attention_z(float *z, const float *pattern, const float *v, size_t T, size_t row0, size_t H, size_t H_kv,
                     size_t dh);

/* Both steps fused, for query rows [row0, row_end) of a sequence whose
 * keys/values rows < split come from (k_prefix, v_prefix) and rows >= split
 * from (k_rows, v_rows) (see above; row_end - 1 is the last key read):
 *   z[i, h, :] = sum_{j<=i} softmax_j(q[i, h, :] . k[j, g, :] * scale) v[j, g, :],  g = h / (H / H_kv)
 * q and z point at query row row0 (row i at (i - row0) * d); the pattern
 * rows go through scratch [row_end] and are not kept. */
void ops_attention(float *z, const float *q, size_t row0, size_t row_end, const float *k_prefix,
                   const float *v_prefix, const float *k_rows, const float *v_rows, size_t split, size_t H,
                   size_t H_kv, size_t dh, float scale, float *scratch);

#endif
