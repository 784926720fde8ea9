/* Unit tests of the block kernels (ops.h) against plain double-precision
 * references: LayerNorm (and its threaded form, bit for bit), causal
 * attention of query rows against a KV prefix at row0 > 0 (and the fused
 * form against the pattern + z form the forward pass uses, bit for bit),
 * the projections and the MLP. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"
#include "pool.h"
#include "random_model.h"

static void fill(float *x, size_t n, float scale, float offset)
{
    for (size_t i = 0; i < n; i++)
        x[i] = offset + scale * random_model_uniform();
}

static double gelu_ref(double v) { return 0.5 * v * (1 + tanh(sqrt(2 / M_PI) * (v + 0.044715 * v * v * v))); }

/* y[r, :] = x[r, :] @ W[k, n] (row stride ldw) + b, in double. */
static void linear_ref(double *y, const double *x, size_t rows, const float *W, size_t ldw, const float *b, size_t k,
                       size_t n)
{
    for (size_t r = 0; r < rows; r++)
        for (size_t j = 0; j < n; j++) {
            double s = b[j];
            for (size_t i = 0; i < k; i++)
                s += x[r * k + i] * (double)W[i * ldw + j];
            y[r * n + j] = s;
        }
}

static void test_layernorm_matches_double(void **state)
{
    (void)state;
    enum { R = 5, D = 41 };
    float x[R * D], w[D], b[D], out[R * D];
    fill(x, R * D, 5.0f, 100.0f); /* a large mean stresses the variance */
    fill(w, D, 0.1f, 1.0f);
    fill(b, D, 0.1f, 0.0f);
    ops_layernorm(out, x, w, b, R, D, 1e-5f);
    for (int r = 0; r < R; r++) {
        double mean = 0, var = 0;
        for (int i = 0; i < D; i++)
            mean += x[r * D + i];
        mean /= D;
        for (int i = 0; i < D; i++)
            var += (x[r * D + i] - mean) * (x[r * D + i] - mean);
        var /= D; /* biased */
        for (int i = 0; i < D; i++) {
            double ref = (x[r * D + i] - mean) / sqrt(var + 1e-5) * w[i] + b[i];
            assert_true(fabs(out[r * D + i] - ref) < 1e-4);
        }
    }
}

static void test_layernorm_threaded_same_bits(void **state)
{
    (void)state;
    enum { R = 37, D = 24 };
    float x[R * D], w[D], b[D], one[R * D], par[R * D];
    fill(x, R * D, 3.0f, 1.0f);
    fill(w, D, 0.1f, 1.0f);
    fill(b, D, 0.1f, 0.0f);
    ops_layernorm(one, x, w, b, R, D, 1e-5f);
    for (size_t nt = 1; nt <= 3; nt++) {
        pool_set_threads(nt);
        memset(par, 0, sizeof par);
        ops_layernorm_threaded(par, x, w, b, R, D, 1e-5f);
        assert_memory_equal(one, par, sizeof one);
    }
    pool_set_threads(0); /* back to the default */
    pool_shutdown();
}

static void test_add(void **state)
{
    (void)state;
    float a[5] = {1, 2, 3, 4, 5}, b[5] = {0.5f, -2, 0, 1e-3f, -5}, out[5];
    ops_add(out, a, b, 5);
    for (int i = 0; i < 5; i++)
        assert_true(out[i] == a[i] + b[i]);
    ops_add(a, a, b, 5); /* in place, as the residual stream is updated */
    assert_memory_equal(a, out, sizeof out);
}

/* Attention of query rows [row0, T) against keys/values of a prefix (rows
 * < row0, one buffer) and the rows' own (another buffer), as a suffix job of
 * the fast engine reads them. */
static void test_attention_prefix_matches_double(void **state)
{
    (void)state;
    enum { T = 9, H = 3, DH = 5, D = H * DH, ROW0 = 4 };
    float q[T * D], k[T * D], v[T * D];
    fill(q, T * D, 1.0f, 0.0f);
    fill(k, T * D, 1.0f, 0.0f);
    fill(v, T * D, 1.0f, 0.0f);
    /* the suffix rows in their own buffers (stacked rows of a job) */
    float sk[(T - ROW0) * D], sv[(T - ROW0) * D];
    memcpy(sk, k + ROW0 * D, sizeof sk);
    memcpy(sv, v + ROW0 * D, sizeof sv);
    float z[(T - ROW0) * D], scratch[T];
    ops_attention(z, q + ROW0 * D, ROW0, T, k, v, sk, sv, ROW0, H, H, DH, 1.0f / sqrtf((float)DH), scratch);

    for (size_t i = ROW0; i < T; i++)
        for (size_t h = 0; h < H; h++) {
            double s[T], mx = -INFINITY, sum = 0;
            for (size_t j = 0; j <= i; j++) {
                s[j] = 0;
                for (size_t e = 0; e < DH; e++)
                    s[j] += (double)q[i * D + h * DH + e] * k[j * D + h * DH + e];
                s[j] /= sqrt((double)DH);
                mx = fmax(mx, s[j]);
            }
            for (size_t j = 0; j <= i; j++)
                sum += exp(s[j] - mx);
            for (size_t e = 0; e < DH; e++) {
                double ref = 0;
                for (size_t j = 0; j <= i; j++)
                    ref += exp(s[j] - mx) / sum * v[j * D + h * DH + e];
                assert_true(fabs(z[(i - ROW0) * D + h * DH + e] - ref) < 1e-5);
            }
        }
}

/* The forward pass's form (pattern [H, T, T] then z) and the fused form give
 * the same bits: the forward pass and the fast engine's suffix jobs agree. */
static void test_attention_forms_same_bits(void **state)
{
    (void)state;
    enum { T = 8, H = 2, DH = 6, D = H * DH, ROW0 = 3 };
    float q[T * D], k[T * D], v[T * D], pattern[H * T * T], z[T * D], zf[(T - ROW0) * D], scratch[T];
    fill(q, T * D, 2.0f, 0.0f);
    fill(k, T * D, 2.0f, 0.0f);
    fill(v, T * D, 1.0f, 0.0f);
    memset(pattern, 0x7f, sizeof pattern); /* rows < ROW0 must stay untouched */
    ops_attention_pattern(pattern, q, k, T, ROW0, H, H, DH, 1.0f / sqrtf((float)DH));
    ops_attention_z(z, pattern, v, T, ROW0, H, H, DH);
    ops_attention(zf, q + ROW0 * D, ROW0, T, k, v, k + ROW0 * D, v + ROW0 * D, ROW0, H, H, DH, 1.0f / sqrtf((float)DH), scratch);
    assert_memory_equal(z + ROW0 * D, zf, sizeof zf);
    for (size_t h = 0; h < H; h++)
        for (size_t i = 0; i < T; i++) {
            const float *p = pattern + (h * T + i) * T;
            if (i < ROW0) {
                uint32_t bits;
                memcpy(&bits, &p[0], sizeof bits);
                assert_int_equal(bits, 0x7f7f7f7f);
                continue;
            }
            double sum = 0;
            for (size_t j = 0; j < T; j++) {
                if (j > i)
                    assert_true(p[j] == 0.0f); /* causal */
                sum += p[j];
            }
            assert_true(fabs(sum - 1) < 1e-6);
        }
    /* the last query row alone (the fast engine's last block) */
    float zl[D];
    ops_attention(zl, q + (T - 1) * D, T - 1, T, k, v, k + ROW0 * D, v + ROW0 * D, ROW0, H, H, DH, 1.0f / sqrtf((float)DH), scratch);
    assert_memory_equal(zl, z + (T - 1) * D, sizeof zl);
}

/* A pattern written above the diagonal (a hook) is honoured by the mix. */
static void test_attention_mix_reads_whole_row(void **state)
{
    (void)state;
    enum { T = 4, DH = 3 };
    float p[T] = {0.25f, 0, 0.5f, 0.25f}, v[T * DH], z[DH];
    fill(v, T * DH, 1.0f, 0.0f);
    ops_attention_mix_row(z, p, v, v, 0, T, DH, DH);
    for (size_t e = 0; e < DH; e++) {
        double ref = 0.25 * v[e] + 0.5 * v[2 * DH + e] + 0.25 * v[3 * DH + e];
        assert_true(fabs(z[e] - ref) < 1e-6);
    }
}

static void test_projections_and_mlp_match_double(void **state)
{
    (void)state;
    enum { L = 1, H = 2, D = 8, V = 11, NPOS = 8, R = 3, M = 4 * D };
    random_model tm;
    random_model_init(&tm, L, H, D, V, NPOS);
    const model_block *b = &tm.m.blocks[0];
    float x[R * D], q[R * D], k[R * D], v[R * D], o[R * D], h[R * M], out[R * D];
    fill(x, R * D, 1.0f, 0.0f);
    double xd[R * D], ref[R * M], hd[R * M], od[R * D];
    for (size_t i = 0; i < R * D; i++)
        xd[i] = x[i];

    /* q | k | v: the column blocks of c_attn */
    ops_qkv(q, k, v, x, R, b);
    const float *qkv[3] = {q, k, v};
    for (size_t c = 0; c < 3; c++) {
        linear_ref(ref, xd, R, b->attn_w + c * D, 3 * D, b->attn_b + c * D, D, D);
        for (size_t i = 0; i < R * D; i++)
            assert_true(fabs(qkv[c][i] - ref[i]) < 1e-5);
    }
    float konly[R * D];
    ops_qkv(NULL, konly, NULL, x, R, b); /* one output alone: the same bits */
    assert_memory_equal(konly, k, sizeof konly);

    ops_attn_proj(o, x, R, b);
    linear_ref(ref, xd, R, b->attn_proj_w, D, b->attn_proj_b, D, D);
    for (size_t i = 0; i < R * D; i++)
        assert_true(fabs(o[i] - ref[i]) < 1e-5);

    /* MLP: gelu_new(x W_fc + b_fc) W_proj + b_proj */
    ops_mlp(out, h, x, R, b);
    linear_ref(hd, xd, R, b->fc_w, M, b->fc_b, D, M);
    for (size_t i = 0; i < R * M; i++)
        hd[i] = gelu_ref(hd[i]);
    linear_ref(od, hd, R, b->mlp_proj_w, D, b->mlp_proj_b, M, D);
    for (size_t i = 0; i < R * D; i++)
        assert_true(fabs(out[i] - od[i]) < 1e-5);

    /* the unfused steps (the forward pass, which hooks mlp_pre and mlp_post) */
    float pre[R * M], out2[R * D];
    ops_mlp_fc(pre, x, R, b, GEMM_PLAIN);
    ops_gelu(pre, R * M);
    ops_mlp_proj(out2, pre, R, b);
    for (size_t i = 0; i < R * D; i++)
        assert_true(fabs(out2[i] - od[i]) < 1e-5);
    random_model_free(&tm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layernorm_matches_double),
        cmocka_unit_test(test_layernorm_threaded_same_bits),
        cmocka_unit_test(test_add),
        cmocka_unit_test(test_attention_prefix_matches_double),
        cmocka_unit_test(test_attention_forms_same_bits),
        cmocka_unit_test(test_attention_mix_reads_whole_row),
        cmocka_unit_test(test_projections_and_mlp_match_double),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
