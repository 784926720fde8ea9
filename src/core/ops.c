#include "ops.h"

#include "pool.h"

#include <math.h>
#include <string.h>

/* ---- layernorm ---------------------------------------------------------- */

void ops_layernorm_stats(const float *x, size_t d, double *mean, double *var)
{
    /* Two passes in double: the mean first, then the biased variance of the
     * centred values, so large residual norms lose no precision. */
    double m = 0.0;
    for (size_t i = 0; i < d; i++)
        m += x[i];
    m /= (double)d;
    double v = 0.0;
    for (size_t i = 0; i < d; i++) {
        double c = x[i] - m;
        v += c * c;
    }
    *mean = m;
    *var = v / (double)d;
}

void ops_layernorm(float *out, const float *x, const float *w, const float *b, size_t rows, size_t d,
                   float eps)
{
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *o = out + r * d;
        double mean, var;
        ops_layernorm_stats(xr, d, &mean, &var);
        float rstd = (float)(1.0 / sqrt(var + (double)eps));
        float fmean = (float)mean;
        for (size_t i = 0; i < d; i++)
            o[i] = (xr[i] - fmean) * rstd * w[i] + b[i];
    }
}

/* The row-wise steps between the matrix products run on the pool's threads
 * too: with one thread they would be the serial fraction that caps the
 * patching engine's speed-up (Amdahl).  Rows are independent, so any split
 * gives the same bits. */
typedef struct {
    float *out;
    const float *x, *w, *bias;
    size_t rows, d;
    float eps;
} ln_task;

static void ln_worker(void *arg, size_t tid, size_t nt)
{
    const ln_task *t = arg;
    const size_t r0 = t->rows * tid / nt, r1 = t->rows * (tid + 1) / nt;
    ops_layernorm(t->out + r0 * t->d, t->x + r0 * t->d, t->w, t->bias, r1 - r0, t->d, t->eps);
}

/* Rows per thread below which a row-wise step stays on one thread. */
#define OPS_PAR_MIN_ROWS 8

void ops_layernorm_threaded(float *out, const float *x, const float *w, const float *b, size_t rows,
                            size_t d, float eps)
{
    ln_task t = {out, x, w, b, rows, d, eps};
    pool_run(rows / OPS_PAR_MIN_ROWS + 1, ln_worker, &t);
}

/* ---- residual, projections, MLP ----------------------------------------- */


void ops_qkv(float *q, float *k, float *v, const float *x, size_t rows, const model_block *b)
{
    /* Three GEMMs on the packed q, k, v weights (GPT-2: the column blocks
     * of the [d, 3d] c_attn weight) give contiguous [rows, H, dh] and
     * [rows, H_kv, dh] arrays; each output element is one k-order
     * accumulation, so computing one, two or three of them is the same. */
    if (q)
        gemm_run(q, x, rows, &b->q_w, b->q_b, GEMM_PLAIN);
    if (k)
        gemm_run(k, x, rows, &b->k_w, b->k_b, GEMM_PLAIN);
    if (v)
        gemm_run(v, x, rows, &b->v_w, b->v_b, GEMM_PLAIN);
}

void ops_attn_proj(float *out, const float *z, size_t rows, const model_block *b)
{
    gemm_run(out, z, rows, &b->attn_proj_p, b->attn_proj_b, GEMM_PLAIN);
}

typedef struct {
    float *out;
    const float *z, *w;
    size_t rows, H, dh, d;
} result_task;

static void attn_result_worker(void *arg, size_t tid, size_t nt)
{
    const result_task *t = arg;
    const size_t qd = t->H * t->dh, d = t->d;
    for (size_t h = tid; h < t->H; h += nt)
        for (size_t r = 0; r < t->rows; r++) {
            float *o = t->out + (h * t->rows + r) * d;
            const float *zr = t->z + r * qd + h * t->dh;
            memset(o, 0, d * sizeof *o);
            for (size_t j = 0; j < t->dh; j++) {
                const float a = zr[j], *wr = t->w + (h * t->dh + j) * d;
                for (size_t c = 0; c < d; c++)
                    o[c] += a * wr[c];
            }
        }
}

void ops_attn_result(float *out, const float *z, size_t rows, const model_block *b, size_t H, size_t dh,
                     float *wbuf)
{
    gemm_unpack(wbuf, &b->attn_proj_p);
    result_task t = {out, z, wbuf, rows, H, dh, b->attn_proj_p.n};
    pool_run(H, attn_result_worker, &t);
}

void ops_mlp_fc(float *h, const float *x, size_t rows, const model_block *b, gemm_epilogue ep)
{
    gemm_run(h, x, rows, &b->fc_p, b->fc_b, ep);
}

void ops_gelu(float *x, size_t n) { gemm_gelu(x, n); }

/* Element-wise steps on the pool's threads (each element alone: the same
 * bits for any split). */
typedef struct {
    float *out;
    const float *a, *b;
    size_t n;
} elem_task;

/* Elements per thread below which an element-wise step stays on one thread. */
#define OPS_PAR_MIN_ELEMS 16384

/* The residual sums on the pool's threads too: on one thread they were a
 * serial step between the products (Amdahl), 1-2% of a patching grid. */
typedef struct {
    float *out;
    const float *a, *b, *c;
    size_t n;
} add_task;

static void add_worker(void *arg, size_t tid, size_t nt)
{
    const add_task *t = arg;
    const size_t i0 = t->n * tid / nt, i1 = t->n * (tid + 1) / nt;
    if (t->c)
        for (size_t i = i0; i < i1; i++)
            t->out[i] = (t->a[i] + t->b[i]) + t->c[i];
    else
        for (size_t i = i0; i < i1; i++)
            t->out[i] = t->a[i] + t->b[i];
}

void ops_add(float *out, const float *a, const float *b, size_t n)
{
    add_task t = {out, a, b, NULL, n};
    pool_run(n / OPS_PAR_MIN_ELEMS + 1, add_worker, &t);
}

void ops_add3(float *out, const float *a, const float *b, const float *c, size_t n)
{
    add_task t = {out, a, b, c, n};
    pool_run(n / OPS_PAR_MIN_ELEMS + 1, add_worker, &t);
}

static void gelu_erf_worker(void *arg, size_t tid, size_t nt)
{
    const elem_task *t = arg;
    const size_t i0 = t->n * tid / nt, i1 = t->n * (tid + 1) / nt;
    gemm_gelu_erf(t->out + i0, i1 - i0);
}

void ops_gelu_erf(float *x, size_t n)
{
    elem_task t = {x, NULL, NULL, n};
    pool_run(n / OPS_PAR_MIN_ELEMS + 1, gelu_erf_worker, &t);
}

void ops_mlp_gate(float *g, const float *x, size_t rows, const model_block *b)
{
    gemm_run(g, x, rows, &b->gate_p, b->gate_b, GEMM_PLAIN);
}

static void silu_mul_worker(void *arg, size_t tid, size_t nt)
{
    const elem_task *t = arg;
    for (size_t i = t->n * tid / nt, e = t->n * (tid + 1) / nt; i < e; i++)
        t->out[i] = t->a[i] / (1.0f + expf(-t->a[i])) * t->b[i];
}

void ops_silu_mul(float *out, const float *gate, const float *lin, size_t n)
{
    elem_task t = {out, gate, lin, n};
    pool_run(n / OPS_PAR_MIN_ELEMS + 1, silu_mul_worker, &t);
}

/* ---- norms with their hook points ----------------------------------------- */

void ops_layernorm_normalize(float *normalized, float *scale, const float *x, size_t rows, size_t d, float eps)
{
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *o = normalized + r * d;
        double mean, var;
        ops_layernorm_stats(xr, d, &mean, &var);
        float rstd = (float)(1.0 / sqrt(var + (double)eps));
        float fmean = (float)mean;
        for (size_t i = 0; i < d; i++)
            o[i] = (xr[i] - fmean) * rstd;
        if (scale)
            scale[r] = (float)sqrt(var + (double)eps);
    }
}

void ops_rmsnorm_normalize(float *normalized, float *scale, const float *x, size_t rows, size_t d, float eps)
{
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *o = normalized + r * d;
        double ms = 0.0;
        for (size_t i = 0; i < d; i++)
            ms += (double)xr[i] * xr[i];
        ms /= (double)d;
        float rstd = (float)(1.0 / sqrt(ms + (double)eps));
        for (size_t i = 0; i < d; i++)
            o[i] = xr[i] * rstd;
        if (scale)
            scale[r] = (float)sqrt(ms + (double)eps);
    }
}

void ops_norm_affine(float *out, const float *normalized, const float *w, const float *b, size_t rows, size_t d)
{
    for (size_t r = 0; r < rows; r++) {
        const float *n = normalized + r * d;
        float *o = out + r * d;
        if (b)
            for (size_t i = 0; i < d; i++)
                o[i] = n[i] * w[i] + b[i];
        else
            for (size_t i = 0; i < d; i++)
                o[i] = n[i] * w[i];
    }
}

/* ---- rotary ----------------------------------------------------------------- */

void ops_rotary(float *out, const float *x, size_t rows, size_t pos0, size_t n_heads, size_t dh, size_t rot,
                const float *cos_tab, const float *sin_tab)
{
    const size_t w = n_heads * dh, half = rot / 2;
    for (size_t r = 0; r < rows; r++) {
        const float *c = cos_tab + (pos0 + r) * half, *s = sin_tab + (pos0 + r) * half;
        for (size_t h = 0; h < n_heads; h++) {
            const float *xi = x + r * w + h * dh;
            float *o = out + r * w + h * dh;
            for (size_t i = 0; i < half; i++) {
                const float a = xi[i], b = xi[i + half];
                o[i] = a * c[i] - b * s[i];
                o[i + half] = b * c[i] + a * s[i];
            }
            for (size_t i = rot; i < dh; i++)
                o[i] = xi[i];
        }
    }
}

void ops_mlp_proj(float *out, const float *h, size_t rows, const model_block *b)
{
    gemm_run(out, h, rows, &b->mlp_proj_p, b->mlp_proj_b, GEMM_PLAIN);
}

void ops_mlp(float *out, float *h, const float *x, size_t rows, const model_block *b)
{
    ops_mlp_fc(h, x, rows, b, GEMM_GELU);
    ops_mlp_proj(out, h, rows, b);
}

void ops_mlp_act(float *out, float *h, float *g, const float *x, size_t rows, const model_block *b, model_act act)
{
    const size_t m = b->fc_p.n;
    switch (act) {
    case MODEL_ACT_GELU_NEW: ops_mlp(out, h, x, rows, b); return;
    case MODEL_ACT_GELU_ERF: /* fused: the same bits as ops_gelu_erf after a plain product */
        ops_mlp_fc(h, x, rows, b, GEMM_GELU_ERF);
        break;
    case MODEL_ACT_SILU_GATED:
        ops_mlp_gate(g, x, rows, b);
        ops_mlp_fc(h, x, rows, b, GEMM_PLAIN);
        ops_silu_mul(h, g, h, rows * m);
        break;
    }
    ops_mlp_proj(out, h, rows, b);
}

typedef struct {
    float *out;
    const float *x, *w, *bias;
    size_t rows, d;
    float eps;
} rms_task;

static void rms_worker(void *arg, size_t tid, size_t nt)
{
    const rms_task *t = arg;
    const size_t r0 = t->rows * tid / nt, r1 = t->rows * (tid + 1) / nt;
    ops_rmsnorm_normalize(t->out + r0 * t->d, NULL, t->x + r0 * t->d, r1 - r0, t->d, t->eps);
    ops_norm_affine(t->out + r0 * t->d, t->out + r0 * t->d, t->w, t->bias, r1 - r0, t->d);
}

void ops_norm_threaded(float *out, const float *x, const float *w, const float *b, size_t rows, size_t d, float eps,
                       model_norm norm)
{
    if (norm == MODEL_NORM_LAYERNORM) {
        ops_layernorm_threaded(out, x, w, b, rows, d, eps);
        return;
    }
    rms_task t = {out, x, w, b, rows, d, eps};
    pool_run(rows / OPS_PAR_MIN_ROWS + 1, rms_worker, &t);
}

/* ---- attention ---------------------------------------------------------- */

void ops_attention_softmax_row(float *p, const float *q, const float *k_prefix, const float *k_rows,
                               size_t split, size_t i, size_t n, size_t d, size_t dh, float scale)
{
    /* fmaxf rather than a comparison: the same maximum for every finite or
     * NaN score, and exp(s - max) is the same for either sign of a zero max. */
    float mx = -INFINITY;
    for (size_t j = 0; j <= i; j++) {
        const float *kj = j < split ? k_prefix + j * d : k_rows + (j - split) * d;
        float s = 0.0f;
        for (size_t e = 0; e < dh; e++)
            s += q[e] * kj[e];
        s *= scale;
        p[j] = s;
        mx = fmaxf(mx, s);
    }
    double sum = 0.0;
    for (size_t j = 0; j <= i; j++) {
        p[j] = expf(p[j] - mx);
        sum += p[j];
    }
    const float inv = (float)(1.0 / sum);
    for (size_t j = 0; j <= i; j++)
        p[j] *= inv;
    for (size_t j = i + 1; j < n; j++)
        p[j] = 0.0f;
}

void ops_attention_mix_row(float *z, const float *p, const float *v_prefix, const float *v_rows,
                           size_t split, size_t n, size_t d, size_t dh)
{
    memset(z, 0, dh * sizeof *z);
    for (size_t j = 0; j < n; j++) {
        const float pj = p[j];
        /* Skipping a zero weight gives the same sum for finite values (z is
         * never -0, so z + 0*v == z) and lets a hook's pattern above the
         * diagonal count without paying for the causal zeros. */
        if (pj == 0.0f)
            continue;
        const float *vj = j < split ? v_prefix + j * d : v_rows + (j - split) * d;
        for (size_t e = 0; e < dh; e++)
            z[e] += pj * vj[e];
    }
}

void ops_attention_pattern(float *pattern, const float *q, const float *k, size_t T, size_t row0, size_t H,
                           size_t H_kv, size_t dh, float scale)
{
    const size_t dq = H * dh, dkv = H_kv * dh, group = H / H_kv;
    for (size_t h = 0; h < H; h++) {
        const float *kh = k + (h / group) * dh;
        for (size_t i = row0; i < T; i++)
            ops_attention_softmax_row(pattern + (h * T + i) * T, q + i * dq + h * dh, kh, kh, 0, i, T, dkv, dh, scale);
    }
}

void ops_attention_z(float *z, const float *pattern, const float *v, size_t T, size_t row0, size_t H, size_t H_kv,
                     size_t dh)
{
    const size_t dq = H * dh, dkv = H_kv * dh, group = H / H_kv;
    for (size_t i = row0; i < T; i++)
        for (size_t h = 0; h < H; h++) {
            const float *vh = v + (h / group) * dh;
            ops_attention_mix_row(z + i * dq + h * dh, pattern + (h * T + i) * T, vh, vh, 0, T, dkv, dh);
        }
}

void ops_attention(float *z, const float *q, size_t row0, size_t row_end, const float *k_prefix,
                   const float *v_prefix, const float *k_rows, const float *v_rows, size_t split, size_t H,
                   size_t H_kv, size_t dh, float scale, float *scratch)
{
    const size_t dq = H * dh, dkv = H_kv * dh, group = H / H_kv;
    for (size_t i = row0; i < row_end; i++)
        for (size_t h = 0; h < H; h++) {
            const size_t o = h * dh, okv = (h / group) * dh;
            ops_attention_softmax_row(scratch, q + (i - row0) * dq + o, k_prefix + okv, k_rows + okv, split, i, i + 1,
                                      dkv, dh, scale);
            ops_attention_mix_row(z + (i - row0) * dq + o, scratch, v_prefix + okv, v_rows + okv, split, i + 1, dkv,
                                  dh);
        }
}
