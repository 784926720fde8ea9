/* Unit tests of the BF16 product (gemm_bf16.h): the rounding to BF16, the
 * kernel against a double reference of the BF16-rounded operands and
 * against the F32 product within BF16's precision, its row and thread
 * invariance, and the refusal without AVX512_BF16 (PS_CPU_NO_BF16=1, the
 * documented test hook). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "gemm.h"
#include "gemm_bf16.h"
#include "pool.h"

static uint64_t rng = 11;
static float uniform(void)
{
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(rng >> 40) / (double)(1ull << 24) * 2.0 - 1.0);
}

static float bits_f(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static float bf16_f(uint16_t h) { return bits_f((uint32_t)h << 16); }

/* Round to nearest, ties to even; exact values kept; NaN stays NaN; the
 * largest finite values round to infinity as in IEEE. */
static void test_round(void **state)
{
    (void)state;
    assert_int_equal(gemm_bf16_round(1.0f), 0x3f80);
    assert_int_equal(gemm_bf16_round(-2.0f), 0xc000);
    assert_int_equal(gemm_bf16_round(bits_f(0x3f808000u)), 0x3f80); /* tie, even below */
    assert_int_equal(gemm_bf16_round(bits_f(0x3f818000u)), 0x3f82); /* tie, even above */
    assert_int_equal(gemm_bf16_round(bits_f(0x3f808001u)), 0x3f81); /* above the tie */
    assert_int_equal(gemm_bf16_round(bits_f(0x3f807fffu)), 0x3f80); /* below the tie */
    assert_int_equal(gemm_bf16_round(INFINITY), 0x7f80);
    assert_int_equal(gemm_bf16_round(bits_f(0x7f7fffffu)), 0x7f80);
    assert_true(isnan(bf16_f(gemm_bf16_round(NAN))));
    assert_true(isnan(bf16_f(gemm_bf16_round(bits_f(0x7f800001u))))); /* a NaN whose high half is inf's */
    /* relative error at most 2^-8 (half an ulp of an 8-bit significand) */
    for (int i = 0; i < 10000; i++) {
        const float f = uniform() * 1000.0f;
        assert_true(fabsf(bf16_f(gemm_bf16_round(f)) - f) <= fabsf(f) * 0x1p-8f);
    }
}

/* The refusal hook: PS_CPU_NO_BF16=1 turns support off and the product
 * refuses with one line naming AVX512_BF16. */
static void test_refused_without_bf16(void **state)
{
    (void)state;
    setenv("PS_CPU_NO_BF16", "1", 1);
    assert_false(gemm_bf16_supported());
    float x[2] = {1, 2}, out[1] = {0};
    uint16_t packed[64] = {0};
    assert_int_equal(gemm_bf16_run(out, x, 1, packed, 2, 1, NULL), PS_ERR_INVALID);
    assert_non_null(strstr(err_msg(), "AVX512_BF16"));
    unsetenv("PS_CPU_NO_BF16");
}

/* Ragged rows (partial 12-row blocks), odd k (a zero-padded pair), n not a
 * multiple of 32 (masked stores): against the double product of the
 * BF16-rounded operands within F32 accumulation error, and against the
 * F32 kernel of the unrounded operands within BF16 rounding (2^-7 of the
 * sum of |x W| terms). */
static void test_kernel(void **state)
{
    (void)state;
    if (!gemm_bf16_supported())
        skip();
    const size_t rows[] = {1, 5, 12, 13, 30}, ks[] = {1, 7, 64, 129}, ns[] = {1, 17, 32, 45, 96};
    int checked = 0;
    for (size_t a = 0; a < sizeof rows / sizeof *rows; a++)
        for (size_t b = 0; b < sizeof ks / sizeof *ks; b++)
            for (size_t c = 0; c < sizeof ns / sizeof *ns; c++) {
                const size_t R = rows[a], K = ks[b], N = ns[c];
                float *x = malloc(R * K * sizeof *x), *W = malloc(K * N * sizeof *W), *bias = malloc(N * sizeof *bias);
                float *out = malloc(R * N * sizeof *out), *f32 = malloc(R * N * sizeof *f32);
                float *pf = malloc(gemm_packed_floats(K, N) * sizeof *pf);
                uint16_t *pb = malloc(gemm_bf16_packed_elems(K, N) * sizeof *pb);
                for (size_t i = 0; i < R * K; i++)
                    x[i] = uniform();
                for (size_t i = 0; i < K * N; i++)
                    W[i] = uniform();
                for (size_t i = 0; i < N; i++)
                    bias[i] = uniform();
                gemm_bf16_pack(pb, W, N, K, N);
                gemm_pack(pf, W, N, K, N);
                assert_int_equal(gemm_bf16_run(out, x, R, pb, K, N, bias), PS_OK);
                gemm_weight w = {K, N, pf, GEMM_F32, NULL};
                gemm_run(f32, x, R, &w, bias, GEMM_PLAIN);
                for (size_t r = 0; r < R; r++)
                    for (size_t j = 0; j < N; j++) {
                        double s = bias[j], mag = fabs(bias[j]);
                        for (size_t kk = 0; kk < K; kk++) {
                            const double t = (double)bf16_f(gemm_bf16_round(x[r * K + kk])) *
                                             bf16_f(gemm_bf16_round(W[kk * N + j]));
                            s += t;
                            mag += fabs(t);
                        }
                        const double o = out[r * N + j];
                        assert_true(fabs(o - s) <= 0x1p-23 * (double)(K + 2) * mag);
                        assert_true(fabs(o - f32[r * N + j]) <= 0x1p-7 * mag + 0x1p-20 * (double)K * mag);
                    }
                /* one row alone: the bits it has in the batch */
                float one[96];
                assert_int_equal(gemm_bf16_run(one, x + (R - 1) * K, 1, pb, K, N, bias), PS_OK);
                assert_memory_equal(one, out + (R - 1) * N, N * sizeof *one);
                free(x), free(W), free(bias), free(out), free(f32), free(pf), free(pb);
                checked++;
            }
    assert_int_equal(checked, 100);
}

/* A product large enough to be split among threads: the same bits with 1
 * and 2 threads. */
static void test_threads(void **state)
{
    (void)state;
    if (!gemm_bf16_supported())
        skip();
    const size_t R = 37, K = 256, N = 1000;
    float *x = malloc(R * K * sizeof *x), *W = malloc(K * N * sizeof *W);
    float *o1 = malloc(R * N * sizeof *o1), *o2 = malloc(R * N * sizeof *o2);
    uint16_t *pb = malloc(gemm_bf16_packed_elems(K, N) * sizeof *pb);
    for (size_t i = 0; i < R * K; i++)
        x[i] = uniform();
    for (size_t i = 0; i < K * N; i++)
        W[i] = uniform();
    gemm_bf16_pack(pb, W, N, K, N);
    pool_set_threads(1);
    assert_int_equal(gemm_bf16_run(o1, x, R, pb, K, N, NULL), PS_OK);
    pool_set_threads(2);
    assert_int_equal(gemm_bf16_run(o2, x, R, pb, K, N, NULL), PS_OK);
    assert_memory_equal(o1, o2, R * N * sizeof *o1);
    pool_set_threads(0);
    pool_shutdown();
    free(x), free(W), free(o1), free(o2), free(pb);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round),
        cmocka_unit_test(test_refused_without_bf16),
        cmocka_unit_test(test_kernel),
        cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
