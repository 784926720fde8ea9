#include "ops_backward.h"
#include "ops.h"

#include "gemm.h"
#include "pool.h"

#include <math.h>
#include <string.h>

/* ---- norms ------------------------------------------------------------------ */

void ops_layernorm_backward(float *dx, const float *dnorm, const float *x, size_t rows, size_t d, float eps)
{
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * d, *dn = dnorm + r * d;
        float *o = dx + r * d;
        double mean, var;
        ops_layernorm_stats(xr, d, &mean, &var);
        const double rstd = 1.0 / sqrt(var + (double)eps);
        double mdn = 0.0, mdnn = 0.0;
        for (size_t i = 0; i < d; i++) {
            mdn += dn[i];
            mdnn += dn[i] * (xr[i] - mean) * rstd;
        }
        mdn /= (double)d, mdnn /= (double)d;
        for (size_t i = 0; i < d; i++)
            o[i] += (float)(rstd * (dn[i] - mdn - (xr[i] - mean) * rstd * mdnn));
    }
}

void ops_rmsnorm_backward(float *dx, const float *dnorm, const float *x, size_t rows, size_t d, float eps)
{
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * d, *dn = dnorm + r * d;
        float *o = dx + r * d;
        double ms = 0.0;
        for (size_t i = 0; i < d; i++)
            ms += (double)xr[i] * xr[i];
        ms /= (double)d;
        const double rstd = 1.0 / sqrt(ms + (double)eps);
        double mdnn = 0.0;
        for (size_t i = 0; i < d; i++)
            mdnn += dn[i] * xr[i] * rstd;
        mdnn /= (double)d;
        for (size_t i = 0; i < d; i++)
            o[i] += (float)(rstd * (dn[i] - xr[i] * rstd * mdnn));
    }
}

void ops_norm_affine_backward(float *dnorm, const float *dout, const float *w, size_t rows, size_t d)
{
    for (size_t r = 0; r < rows; r++)
        for (size_t i = 0; i < d; i++)
            dnorm[r * d + i] = dout[r * d + i] * w[i];
}

/* ---- projections ------------------------------------------------------------ */

void ops_qkv_backward(float *dx, const float *dq, const float *dk, const float *dv, size_t rows, const model_block *b)
{
    const float *dy[3] = {dq, dk, dv};
    const gemm_weight *w[3] = {&b->q_w, &b->k_w, &b->v_w};
    gemm_run_t_sum(dx, dy, w, 3, rows, false);
}

typedef struct {
    float *dx;
    const float *dy, *w;
    size_t rows, n_heads, dh, k;
} heads_task;

static void heads_bwd_worker(void *arg, size_t tid, size_t nt)
{
    const heads_task *t = arg;
    const size_t n = t->n_heads * t->dh, dh = t->dh;
    for (size_t h = tid; h < t->n_heads; h += nt)
        for (size_t r = 0; r < t->rows; r++) {
            const float *y = t->dy + r * n + h * dh;
            float *o = t->dx + (h * t->rows + r) * t->k;
            for (size_t kk = 0; kk < t->k; kk++) {
                const float *wr = t->w + kk * n + h * dh;
                float acc = 0.0f;
                for (size_t j = 0; j < dh; j++)
                    acc += y[j] * wr[j];
                o[kk] = acc;
            }
        }
}

void ops_heads_backward(float *dx, const float *dy, size_t rows, const gemm_weight *w, size_t n_heads, size_t dh,
                        float *wbuf)
{
    gemm_unpack(wbuf, w);
    heads_task t = {dx, dy, wbuf, rows, n_heads, dh, w->k};
    pool_run(n_heads, heads_bwd_worker, &t);
}

void ops_attn_proj_backward(float *dz, const float *dout, size_t rows, const model_block *b)
{
    gemm_run_t(dz, dout, rows, &b->attn_proj_p, false);
}

void ops_mlp_fc_backward(float *dx, const float *dh, size_t rows, const model_block *b, bool accumulate)
{
    gemm_run_t(dx, dh, rows, &b->fc_p, accumulate);
}

void ops_mlp_gate_backward(float *dx, const float *dg, size_t rows, const model_block *b)
{
    gemm_run_t(dx, dg, rows, &b->gate_p, true);
}

void ops_mlp_proj_backward(float *dh, const float *dout, size_t rows, const model_block *b)
{
    gemm_run_t(dh, dout, rows, &b->mlp_proj_p, false);
}

/* ---- activations (element-wise, on the pool's threads) ---------------------- */

typedef struct {
    float *d0, *d1;
    const float *x, *y, *dout;
    size_t n;
} act_task;

#define OPS_BWD_PAR_MIN_ELEMS 16384

static void gelu_bwd_worker(void *arg, size_t tid, size_t nt)
{
    const act_task *t = arg;
    const float k0 = 0.7978845608028654f, k1 = 0.044715f;
    for (size_t i = t->n * tid / nt, e = t->n * (tid + 1) / nt; i < e; i++) {
        const float x = t->x[i], u = k0 * (x + k1 * x * x * x), th = tanhf(u);
        const float g = 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * k0 * (1.0f + 3.0f * k1 * x * x);
        t->d0[i] = t->dout[i] * g;
    }
}

void ops_gelu_backward(float *dx, const float *x, const float *dout, size_t n)
{
    act_task t = {dx, NULL, x, NULL, dout, n};
    pool_run(n / OPS_BWD_PAR_MIN_ELEMS + 1, gelu_bwd_worker, &t);
}

static void gelu_erf_bwd_worker(void *arg, size_t tid, size_t nt)
{
    const act_task *t = arg;
    for (size_t i = t->n * tid / nt, e = t->n * (tid + 1) / nt; i < e; i++) {
        const float x = t->x[i];
        const float g = 0.5f * (1.0f + erff(x * (float)M_SQRT1_2)) + x * expf(-0.5f * x * x) * 0.3989422804014327f;
        t->d0[i] = t->dout[i] * g;
    }
}

void ops_gelu_erf_backward(float *dx, const float *x, const float *dout, size_t n)
{
    act_task t = {dx, NULL, x, NULL, dout, n};
    pool_run(n / OPS_BWD_PAR_MIN_ELEMS + 1, gelu_erf_bwd_worker, &t);
}

static void silu_mul_bwd_worker(void *arg, size_t tid, size_t nt)
{
    const act_task *t = arg;
    for (size_t i = t->n * tid / nt, e = t->n * (tid + 1) / nt; i < e; i++) {
        const float g = t->x[i], s = 1.0f / (1.0f + expf(-g));
        t->d0[i] = t->dout[i] * t->y[i] * s * (1.0f + g * (1.0f - s));
        t->d1[i] = t->dout[i] * g * s;
    }
}

void ops_silu_mul_backward(float *dgate, float *dlin, const float *gate, const float *lin, const float *dout, size_t n)
{
    act_task t = {dgate, dlin, gate, lin, dout, n};
    pool_run(n / OPS_BWD_PAR_MIN_ELEMS + 1, silu_mul_bwd_worker, &t);
}

/* ---- rotary ------------------------------------------------------------------ */

void ops_rotary_backward(float *dx, const float *dout, size_t rows, size_t pos0, size_t n_heads, size_t dh,
                         size_t rot, const float *cos_tab, const float *sin_tab)
{
    const size_t w = n_heads * dh, half = rot / 2;
    for (size_t r = 0; r < rows; r++) {
        const float *c = cos_tab + (pos0 + r) * half, *s = sin_tab + (pos0 + r) * half;
        for (size_t h = 0; h < n_heads; h++) {
            const float *g = dout + r * w + h * dh;
            float *o = dx + r * w + h * dh;
            for (size_t i = 0; i < half; i++) {
                const float a = g[i], b = g[i + half];
                o[i] = a * c[i] + b * s[i];
                o[i + half] = b * c[i] - a * s[i];
            }
            for (size_t i = rot; i < dh; i++)
                o[i] = g[i];
        }
    }
}

/* ---- attention ------------------------------------------------------------------ */

typedef struct {
    float *dq, *dk, *dv, *dpattern;
    const float *dz, *q, *k, *v, *pattern;
    size_t T, row0, H, H_kv, dh;
    float scale;
} attn_bwd_task;

/* Key/value heads [H_kv*tid/nt, H_kv*(tid+1)/nt) with their query heads:
 * dk and dv of a key/value head are written by one thread only. */
static void attn_bwd_worker(void *arg, size_t tid, size_t nt)
{
    const attn_bwd_task *t = arg;
    const size_t T = t->T, row0 = t->row0, H = t->H, dh = t->dh, group = H / t->H_kv, dq_w = H * dh;
    const size_t dkv_w = t->H_kv * dh;
    for (size_t g = t->H_kv * tid / nt, ge = t->H_kv * (tid + 1) / nt; g < ge; g++) {
        for (size_t j = 0; j < T; j++) {
            memset(t->dk + j * dkv_w + g * dh, 0, dh * sizeof(float));
            memset(t->dv + j * dkv_w + g * dh, 0, dh * sizeof(float));
        }
        for (size_t h = g * group; h < (g + 1) * group; h++)
            for (size_t i = row0; i < T; i++) {
                const float *dzi = t->dz + i * dq_w + h * dh, *qi = t->q + i * dq_w + h * dh;
                const float *p = t->pattern + (h * T + i) * T;
                float *dp = t->dpattern + (h * T + i) * T, *dqi = t->dq + i * dq_w + h * dh;
                /* dpattern and dv over every key j (the mix reads them all) */
                for (size_t j = 0; j < T; j++) {
                    const float *vj = t->v + j * dkv_w + g * dh;
                    float *dvj = t->dv + j * dkv_w + g * dh;
                    float s = 0.0f;
                    for (size_t e = 0; e < dh; e++)
                        s += dzi[e] * vj[e];
                    dp[j] = s;
                    if (p[j] != 0.0f && j >= row0)
                        for (size_t e = 0; e < dh; e++)
                            dvj[e] += p[j] * dzi[e];
                }
                /* softmax over j <= i, then the scores' two factors */
                double dot = 0.0;
                for (size_t j = 0; j <= i; j++)
                    dot += (double)p[j] * dp[j];
                memset(dqi, 0, dh * sizeof(float));
                for (size_t j = 0; j <= i; j++) {
                    const float ds = p[j] * (dp[j] - (float)dot) * t->scale;
                    if (ds == 0.0f)
                        continue;
                    const float *kj = t->k + j * dkv_w + g * dh;
                    float *dkj = t->dk + j * dkv_w + g * dh;
                    for (size_t e = 0; e < dh; e++)
                        dqi[e] += ds * kj[e];
                    if (j >= row0)
                        for (size_t e = 0; e < dh; e++)
                            dkj[e] += ds * qi[e];
                }
            }
    }
}

void ops_attention_backward(float *dq, float *dk, float *dv, float *dpattern, const float *dz, const float *q,
                            const float *k, const float *v, const float *pattern, size_t T, size_t row0, size_t H,
                            size_t H_kv, size_t dh, float scale)
{
    attn_bwd_task t = {dq, dk, dv, dpattern, dz, q, k, v, pattern, T, row0, H, H_kv, dh, scale};
    pool_run(T * T * H * dh < 65536 ? 1 : H_kv, attn_bwd_worker, &t);
}
