/*
 * ops_backward: the backward kernel of each forward kernel of ops.h (llm.c
 * style: layernorm_backward, matmul_backward, attention_backward,
 * gelu_backward), used by backward.c.  Only gradients with respect to
 * activations are computed, never with respect to weights.
 *
 * Conventions: a gradient array is named d<x> for activation x and has x's
 * shape (ops.h, hooks.h: d = n_embd, m = n_inner, H / H_kv query and
 * key/value heads, dh = d_head).  "dx +=" kernels accumulate into their
 * output (a residual stream's gradient gathers several paths); the others
 * overwrite it.  Arithmetic is float32 with the norms' statistics in double,
 * as in the forward kernels.
 */
#ifndef PS_OPS_BACKWARD_H
#define PS_OPS_BACKWARD_H

#include <stdbool.h>
#include <stddef.h>

#include "model.h"

/* LayerNorm's normalizing step, rows of x [rows, d]; dnorm [rows, d] is the
 * gradient of normalized = (x - mean) / sqrt(var + eps) (the statistics are
 * recomputed from x as ops_layernorm_normalize does):
 *   dx += rstd * (dnorm - mean(dnorm) - normalized * mean(dnorm * normalized)) */
void ops_layernorm_backward(float *dx, const float *dnorm, const float *x, size_t rows, size_t d, float eps);

/* RMSNorm's normalizing step, normalized = x * rstd, rstd = 1/sqrt(mean(x^2) + eps):
 *   dx += rstd * (dnorm - normalized * mean(dnorm * normalized)) */
void ops_rmsnorm_backward(float *dx, const float *dnorm, const float *x, size_t rows, size_t d, float eps);

/* The affine step out = normalized * w + b: dnorm[rows, d] = dout * w. */
void ops_norm_affine_backward(float *dnorm, const float *dout, const float *w, size_t rows, size_t d);

/* ops_qkv: dx[rows, d] = dq Wq^T + dk Wk^T + dv Wv^T, dq [rows, H*dh], dk and
 * dv [rows, H_kv*dh]. */
void ops_qkv_backward(float *dx, const float *dq, const float *dk, const float *dv, size_t rows, const model_block *b);

/* A projection whose output columns are heads, W [k, n_heads*dh] (packed:
 * q_w, k_w, v_w), backward for each head's slice apart (ops_qkv_backward
 * sums them): for every head h < n_heads,
 *   dx[h][rows, k] = dy[rows, h*dh .. h*dh+dh) @ W[:, h*dh .. h*dh+dh)^T
 * dx [n_heads, rows, k], dy [rows, n_heads*dh]; wbuf [k, n_heads*dh]
 * scratch (W unpacked, gemm_unpack).  Threaded over heads.  The input
 * gradient of one head's q, k or v alone (edge attribution patching). */
void ops_heads_backward(float *dx, const float *dy, size_t rows, const gemm_weight *w, size_t n_heads, size_t dh,
                        float *wbuf);

/* ops_attn_proj: dz[rows, H*dh] = dout[rows, d] W_O^T. */
void ops_attn_proj_backward(float *dz, const float *dout, size_t rows, const model_block *b);

/* ops_mlp_fc (up): dx[rows, d] (+)= dh[rows, m] W_fc^T (accumulate: added). */
void ops_mlp_fc_backward(float *dx, const float *dh, size_t rows, const model_block *b, bool accumulate);

/* ops_mlp_gate: dx[rows, d] += dg[rows, m] W_gate^T. */
void ops_mlp_gate_backward(float *dx, const float *dg, size_t rows, const model_block *b);

/* ops_mlp_proj: dh[rows, m] = dout[rows, d] W_proj^T. */
void ops_mlp_proj_backward(float *dh, const float *dout, size_t rows, const model_block *b);

/* gelu_new over n floats: dx[i] = dout[i] * gelu_new'(x[i]),
 * gelu_new'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2). */
void ops_gelu_backward(float *dx, const float *x, const float *dout, size_t n);

/* exact GELU: dx[i] = dout[i] * (Phi(x) + x phi(x)). */
void ops_gelu_erf_backward(float *dx, const float *x, const float *dout, size_t n);

/* out = silu(gate) * lin: dgate = dout * lin * s (1 + gate (1 - s)), s = sigmoid(gate);
 * dlin = dout * silu(gate); n floats each. */
void ops_silu_mul_backward(float *dgate, float *dlin, const float *gate, const float *lin, const float *dout,
                           size_t n);

/* ops_rotary (a rotation per pair of dims): dx = R^T dout, rows of
 * [rows, n_heads, dh] at positions pos0 + r:
 *   dx[i]        = dout[i] c[i] + dout[i + half] s[i]      i < half
 *   dx[i + half] = dout[i + half] c[i] - dout[i] s[i]
 *   dx[i]        = dout[i]                                rot <= i < dh */
void ops_rotary_backward(float *dx, const float *dout, size_t rows, size_t pos0, size_t n_heads, size_t dh,
                         size_t rot, const float *cos_tab, const float *sin_tab);

/* Causal attention of one contiguous sequence (ops_attention_pattern then
 * ops_attention_z), q [T, H*dh], k and v [T, H_kv*dh] (the ones the scores
 * read: rotated for rotary models), pattern [H, T, T], dz [T, H*dh]:
 *   dpattern[h, i, j] = dz[i, h] . v[j, g]                   every j (the
 *                        pattern above the diagonal is read too, as a hook
 *                        would see it), g = h / (H / H_kv)
 *   dv[j, g]  = sum_{h in g} sum_i pattern[h, i, j] dz[i, h]
 *   ds[h, i, j] = pattern[h, i, j] (dpattern[h, i, j] - sum_{j'<=i} pattern dpattern)   j <= i
 *   dq[i, h]  = scale sum_{j<=i} ds[h, i, j] k[j, g]
 *   dk[j, g]  = scale sum_{h in g} sum_{i>=j} ds[h, i, j] q[i, h]
 * Rows [row0, T) alone (row0 = 0: all): query rows i >= row0 (their dq and
 * dpattern; the others' are not written) and key rows j >= row0 (the
 * others' dk, dv are 0).  These are exact, because the gradient at row j
 * collects from query rows i >= j alone (causal attention).
 * dq, dk, dv and dpattern are overwritten; threaded over key/value heads. */
void ops_attention_backward(float *dq, float *dk, float *dv, float *dpattern, const float *dz, const float *q,
                            const float *k, const float *v, const float *pattern, size_t T, size_t row0, size_t H,
                            size_t H_kv, size_t dh, float scale);

#endif
