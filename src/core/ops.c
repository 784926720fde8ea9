#include "ops.h"

#include "pool.h"

#include <math.h>
#include <string.h>

/* ---- layernorm ---------------------------------------------------------- */

void ops_layernorm(float *out, const float *x, const float *w, const float *b, size_t rows, size_t d,
                   float eps)
{
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *o = out + r * d;
        /* Two passes in double: the mean first, then the biased variance of
         * the centred values, so large residual norms lose no precision. */
        double mean = 0.0;
        for (size_t i = 0; i < d; i++)
            mean += xr[i];
        mean /= (double)d;
        double var = 0.0;
        for (size_t i = 0; i < d; i++) {
            double c = xr[i] - mean;
            var += c * c;
        }
        var /= (double)d;
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

void ops_add(float *out, const float *a, const float *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        out[i] = a[i] + b[i];
}

void ops_qkv(float *q, float *k, float *v, const float *x, size_t rows, const model_block *b, size_t d)
{
    /* Three GEMMs on the column blocks of the [d, 3d] c_attn weight give
     * contiguous [rows, H, dh] arrays; each output element is one k-order
     * accumulation, so computing one, two or three of them is the same. */
    if (q)
        gemm_run(q, x, rows, &b->q_w, b->attn_b, GEMM_PLAIN);
    if (k)
        gemm_run(k, x, rows, &b->k_w, b->attn_b + d, GEMM_PLAIN);
    if (v)
        gemm_run(v, x, rows, &b->v_w, b->attn_b + 2 * d, GEMM_PLAIN);
}

void ops_attn_proj(float *out, const float *z, size_t rows, const model_block *b)
{
    gemm_run(out, z, rows, &b->attn_proj_p, b->attn_proj_b, GEMM_PLAIN);
}

void ops_mlp_fc(float *h, const float *x, size_t rows, const model_block *b, gemm_epilogue ep)
{
    gemm_run(h, x, rows, &b->fc_p, b->fc_b, ep);
}

void ops_gelu(float *x, size_t n) { gemm_gelu(x, n); }

void ops_mlp_proj(float *out, const float *h, size_t rows, const model_block *b)
{
    gemm_run(out, h, rows, &b->mlp_proj_p, b->mlp_proj_b, GEMM_PLAIN);
}

void ops_mlp(float *out, float *h, const float *x, size_t rows, const model_block *b)
{
    ops_mlp_fc(h, x, rows, b, GEMM_GELU);
    ops_mlp_proj(out, h, rows, b);
}

/* ---- attention ---------------------------------------------------------- */

void ops_attention_softmax_row(float *p, const float *q, const float *k_prefix, const float *k_rows,
                               size_t split, size_t i, size_t n, size_t d, size_t dh)
{
    const float scale = 1.0f / sqrtf((float)dh);
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
                           size_t dh)
{
    const size_t d = H * dh;
    for (size_t h = 0; h < H; h++)
        for (size_t i = row0; i < T; i++)
            ops_attention_softmax_row(pattern + (h * T + i) * T, q + i * d + h * dh, k + h * dh, k + h * dh, 0,
                                      i, T, d, dh);
}

void ops_attention_z(float *z, const float *pattern, const float *v, size_t T, size_t row0, size_t H,
                     size_t dh)
{
    const size_t d = H * dh;
    for (size_t i = row0; i < T; i++)
        for (size_t h = 0; h < H; h++)
            ops_attention_mix_row(z + i * d + h * dh, pattern + (h * T + i) * T, v + h * dh, v + h * dh, 0, T,
                                  d, dh);
}

void ops_attention(float *z, const float *q, size_t row0, size_t row_end, const float *k_prefix,
                   const float *v_prefix, const float *k_rows, const float *v_rows, size_t split, size_t H,
                   size_t dh, float *scratch)
{
    const size_t d = H * dh;
    for (size_t i = row0; i < row_end; i++)
        for (size_t h = 0; h < H; h++) {
            const size_t o = h * dh;
            ops_attention_softmax_row(scratch, q + (i - row0) * d + o, k_prefix + o, k_rows + o, split, i, i + 1,
                                      d, dh);
            ops_attention_mix_row(z + (i - row0) * d + o, scratch, v_prefix + o, v_rows + o, split, i + 1, d, dh);
        }
}
