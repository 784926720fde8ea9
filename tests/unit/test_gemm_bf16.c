/* Unit tests of the BF16 product (gemm_bf16.h): the rounding to BF16, each
 * kernel (C reference, AVX512_BF16, AMX-BF16: those the CPU has) against a
 * double reference of the BF16-rounded operands and against the F32
 * product within BF16's precision, AMX against AVX512_BF16, their row and
 * thread invariance, the packing from every source layout, gemm_run and
 * gemm_run_t on GEMM_BF16_PAIRS weights, and the detection hooks
 * (PS_CPU_NO_BF16=1, PS_CPU_NO_AMX=1). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "err.h"
#include "gemm.h"
#include "gemm_bf16.h"
#include "pool.h"
#include "safetensors.h"

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

/* The detection hooks, in a child process (detection runs once per
 * process): PS_CPU_NO_BF16=1 leaves only the C reference and makes
 * gemm_bf16_supported false; PS_CPU_NO_AMX=1 leaves AVX512_BF16 (when the
 * CPU has it) and not AMX. */
static int child_check(const char *var)
{
    pid_t pid = fork();
    if (pid == 0) {
        setenv(var, "1", 1);
        int ok;
        if (strcmp(var, "PS_CPU_NO_BF16") == 0)
            ok = !gemm_bf16_supported() && gemm_bf16_isa_get() == GEMM_BF16_ISA_C &&
                 !gemm_bf16_isa_supported(GEMM_BF16_ISA_AMX) && !gemm_bf16_isa_supported(GEMM_BF16_ISA_AVX512);
        else
            ok = !gemm_bf16_isa_supported(GEMM_BF16_ISA_AMX) &&
                 gemm_bf16_isa_get() == (gemm_bf16_isa_supported(GEMM_BF16_ISA_AVX512) ? GEMM_BF16_ISA_AVX512
                                                                                      : GEMM_BF16_ISA_C);
        _exit(ok ? 0 : 1);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 2;
}

static void test_detection_hooks(void **state)
{
    (void)state;
    assert_int_equal(child_check("PS_CPU_NO_BF16"), 0);
    assert_int_equal(child_check("PS_CPU_NO_AMX"), 0);
    assert_true(gemm_bf16_isa_supported(GEMM_BF16_ISA_C));
    /* the fastest is the default */
    gemm_bf16_isa best = GEMM_BF16_ISA_C;
    for (int i = 0; i < GEMM_BF16_ISA_COUNT; i++)
        if (gemm_bf16_isa_supported((gemm_bf16_isa)i))
            best = (gemm_bf16_isa)i;
    assert_int_equal(gemm_bf16_isa_get(), best);
    print_message("bf16 kernels: c%s%s (default %s)\n",
                  gemm_bf16_isa_supported(GEMM_BF16_ISA_AVX512) ? " avx512_bf16" : "",
                  gemm_bf16_isa_supported(GEMM_BF16_ISA_AMX) ? " amx_bf16" : "", gemm_bf16_isa_name(best));
}

/* out of isa for x [R, K] @ W [K, N] + bias */
static void run_isa(gemm_bf16_isa isa, float *out, const float *x, size_t R, const uint16_t *pb, size_t K, size_t N,
                    const float *bias)
{
    gemm_bf16_isa_set(isa);
    assert_int_equal(gemm_bf16_isa_get(), isa);
    gemm_bf16_run(out, x, R, pb, K, N, bias, GEMM_PLAIN);
}

/* Ragged rows (partial 12-, 16- and 32-row blocks), odd k and k past one
 * pass of GEMM_BF16_KC (zero padding, accumulators carried between passes),
 * n not a multiple of 16 or 32: for every supported kernel, against the
 * double product of the BF16-rounded operands within F32 accumulation
 * error (each pair's product is exact in F32; at most one rounding per
 * pair and one per 16-pair tile step: 2^-23 (K + 2) sum |terms|), against
 * the F32 kernel of the unrounded operands within BF16 rounding, and each
 * row alone gives its bits in the batch.  AMX against AVX512_BF16: within
 * both bounds. */
static void test_kernel(void **state)
{
    (void)state;
    const size_t rows[] = {1, 5, 13, 16, 17, 33, 70}, ks[] = {1, 7, 64, 129, 1101}, ns[] = {1, 17, 32, 45, 96};
    int checked = 0, isas = 0;
    for (int isa = 0; isa < GEMM_BF16_ISA_COUNT; isa++)
        isas += gemm_bf16_isa_supported((gemm_bf16_isa)isa);
    for (size_t a = 0; a < sizeof rows / sizeof *rows; a++)
        for (size_t b = 0; b < sizeof ks / sizeof *ks; b++)
            for (size_t c = 0; c < sizeof ns / sizeof *ns; c++) {
                const size_t R = rows[a], K = ks[b], N = ns[c];
                float *x = malloc(R * K * sizeof *x), *W = malloc(K * N * sizeof *W), *bias = malloc(N * sizeof *bias);
                float *out[GEMM_BF16_ISA_COUNT], *f32 = malloc(R * N * sizeof *f32);
                double *ref = malloc(R * N * sizeof *ref), *mag = malloc(R * N * sizeof *mag);
                float *pf = malloc(gemm_packed_floats(K, N) * sizeof *pf);
                uint16_t *pb = malloc(gemm_bf16_packed_elems(K, N) * sizeof *pb);
                for (size_t i = 0; i < R * K; i++)
                    x[i] = uniform();
                for (size_t i = 0; i < K * N; i++)
                    W[i] = uniform();
                for (size_t i = 0; i < N; i++)
                    bias[i] = uniform();
                gemm_bf16_pack(pb, W, GEMM_F32, N, false, NULL, K, N);
                gemm_pack(pf, W, N, K, N);
                gemm_weight w = {K, N, pf, GEMM_F32, NULL};
                gemm_run(f32, x, R, &w, bias, GEMM_PLAIN);
                for (size_t r = 0; r < R; r++)
                    for (size_t j = 0; j < N; j++) {
                        double s = bias[j], m = fabs(bias[j]);
                        for (size_t kk = 0; kk < K; kk++) {
                            const double t = (double)bf16_f(gemm_bf16_round(x[r * K + kk])) *
                                             bf16_f(gemm_bf16_round(W[kk * N + j]));
                            s += t;
                            m += fabs(t);
                        }
                        ref[r * N + j] = s, mag[r * N + j] = m;
                    }
                for (int isa = 0; isa < GEMM_BF16_ISA_COUNT; isa++) {
                    out[isa] = NULL;
                    if (!gemm_bf16_isa_supported((gemm_bf16_isa)isa))
                        continue;
                    out[isa] = malloc(R * N * sizeof *out[isa]);
                    run_isa((gemm_bf16_isa)isa, out[isa], x, R, pb, K, N, bias);
                    for (size_t e = 0; e < R * N; e++) {
                        const double o = out[isa][e];
                        assert_true(fabs(o - ref[e]) <= 0x1p-23 * (double)(K + 2) * mag[e]);
                        assert_true(fabs(o - f32[e]) <= 0x1p-7 * mag[e] + 0x1p-20 * (double)K * mag[e]);
                    }
                    /* one row alone: the bits it has in the batch */
                    float one[96];
                    gemm_bf16_run(one, x + (R - 1) * K, 1, pb, K, N, bias, GEMM_PLAIN);
                    assert_memory_equal(one, out[isa] + (R - 1) * N, N * sizeof *one);
                    checked++;
                }
                if (out[GEMM_BF16_ISA_AMX] && out[GEMM_BF16_ISA_AVX512])
                    for (size_t e = 0; e < R * N; e++)
                        assert_true(fabs((double)out[GEMM_BF16_ISA_AMX][e] - out[GEMM_BF16_ISA_AVX512][e]) <=
                                    0x1p-22 * (double)(K + 2) * mag[e]);
                for (int isa = 0; isa < GEMM_BF16_ISA_COUNT; isa++)
                    free(out[isa]);
                free(x), free(W), free(bias), free(f32), free(ref), free(mag), free(pf), free(pb);
            }
    gemm_bf16_isa_set(GEMM_BF16_ISA_COUNT - 1 > 0 && gemm_bf16_isa_supported(GEMM_BF16_ISA_AMX) ? GEMM_BF16_ISA_AMX
                      : gemm_bf16_isa_supported(GEMM_BF16_ISA_AVX512)                           ? GEMM_BF16_ISA_AVX512
                                                                                                 : GEMM_BF16_ISA_C);
    assert_int_equal(checked, 7 * 5 * 5 * isas);
    print_message("%d products checked on %d kernels\n", checked, isas);
}

/* Products large enough to be split among threads (k past one pass, rows
 * and n ragged, several panel groups per thread): the same bits with 1 and
 * 2 threads on every kernel, and correct in both row blocks. */
static void test_threads(void **state)
{
    (void)state;
    const size_t R = 37, K = 1300, N = 1000;
    float *x = malloc(R * K * sizeof *x), *W = malloc(K * N * sizeof *W);
    float *o1 = malloc(R * N * sizeof *o1), *o2 = malloc(R * N * sizeof *o2);
    uint16_t *pb = malloc(gemm_bf16_packed_elems(K, N) * sizeof *pb);
    for (size_t i = 0; i < R * K; i++)
        x[i] = uniform();
    for (size_t i = 0; i < K * N; i++)
        W[i] = uniform();
    gemm_bf16_pack(pb, W, GEMM_F32, N, false, NULL, K, N);
    for (int isa = GEMM_BF16_ISA_AVX512; isa < GEMM_BF16_ISA_COUNT; isa++) {
        if (!gemm_bf16_isa_supported((gemm_bf16_isa)isa))
            continue;
        pool_set_threads(1);
        run_isa((gemm_bf16_isa)isa, o1, x, R, pb, K, N, NULL);
        pool_set_threads(2);
        run_isa((gemm_bf16_isa)isa, o2, x, R, pb, K, N, NULL);
        assert_memory_equal(o1, o2, R * N * sizeof *o1);
        /* several panel groups, row blocks and k passes: rows of both
         * blocks against the double reference */
        const size_t check_rows[] = {0, 31, 32, 36};
        for (size_t i = 0; i < 4; i++)
            for (size_t j = 0; j < N; j++) {
                const size_t r = check_rows[i];
                double ref = 0, mag = 0;
                for (size_t kk = 0; kk < K; kk++) {
                    const double t = (double)bf16_f(gemm_bf16_round(x[r * K + kk])) *
                                     bf16_f(gemm_bf16_round(W[kk * N + j]));
                    ref += t, mag += fabs(t);
                }
                assert_true(fabs((double)o1[r * N + j] - ref) <= 0x1p-23 * (double)(K + 2) * mag);
            }
    }
    pool_set_threads(0);
    pool_shutdown();
    free(x), free(W), free(o1), free(o2), free(pb);
}

/* gemm_bf16_pack from nn.Linear sources ([n, k], with and without a row
 * map) and from F16 / BF16 sources equals the pack of the equivalent F32
 * Conv1D matrix; gemm_bf16_packed_at reads every element back. */
static void test_pack_sources(void **state)
{
    (void)state;
    const size_t K = 37, N = 45;
    float *W = malloc(K * N * sizeof *W), *A = malloc(N * K * sizeof *A), *Wh = malloc(K * N * sizeof *Wh);
    uint16_t *h16 = malloc(K * N * sizeof *h16), *b16 = malloc(K * N * sizeof *b16);
    size_t rows[45];
    const size_t E = gemm_bf16_packed_elems(K, N);
    uint16_t *p0 = malloc(E * 2), *p1 = malloc(E * 2);
    for (size_t i = 0; i < K * N; i++)
        W[i] = uniform();
    for (size_t c = 0; c < N; c++)
        rows[c] = N - 1 - c;
    for (size_t kk = 0; kk < K; kk++)
        for (size_t c = 0; c < N; c++)
            A[rows[c] * K + kk] = W[kk * N + c];
    gemm_bf16_pack(p0, W, GEMM_F32, N, false, NULL, K, N);
    gemm_bf16_pack(p1, A, GEMM_F32, K, true, rows, K, N);
    assert_memory_equal(p0, p1, E * 2);
    for (size_t kk = 0; kk < K; kk++)
        for (size_t c = 0; c < N; c++)
            assert_true(gemm_bf16_packed_at(p0, K, kk, c) == bf16_f(gemm_bf16_round(W[kk * N + c])));
    /* BF16 source: its values as they are */
    for (size_t i = 0; i < K * N; i++)
        b16[i] = gemm_bf16_round(W[i]), Wh[i] = bf16_f(b16[i]);
    gemm_bf16_pack(p0, Wh, GEMM_F32, N, false, NULL, K, N);
    gemm_bf16_pack(p1, b16, GEMM_BF16, N, false, NULL, K, N);
    assert_memory_equal(p0, p1, E * 2);
    /* F16 source: widened, then rounded to BF16 */
    for (size_t i = 0; i < K * N; i++)
        h16[i] = (uint16_t)(0x3c00 + (i * 7919) % 0x3ff), Wh[i] = st_f16_to_f32(h16[i]);
    gemm_bf16_pack(p0, Wh, GEMM_F32, N, false, NULL, K, N);
    gemm_bf16_pack(p1, h16, GEMM_F16, N, false, NULL, K, N);
    assert_memory_equal(p0, p1, E * 2);
    free(W), free(A), free(Wh), free(h16), free(b16), free(p0), free(p1);
}

/* gemm_run on a GEMM_BF16_PAIRS weight is gemm_bf16_run (plain and with
 * the GELU epilogue, which equals gemm_gelu applied afterwards), and
 * gemm_run_t on it is the F32 transposed product of the BF16 values. */
static void test_gemm_dispatch(void **state)
{
    (void)state;
    const size_t R = 9, K = 70, N = 50;
    float *x = malloc(R * K * sizeof *x), *W = malloc(K * N * sizeof *W), *bias = malloc(N * sizeof *bias);
    float *o1 = malloc(R * N * sizeof *o1), *o2 = malloc(R * N * sizeof *o2), *dx = malloc(R * K * sizeof *dx);
    uint16_t *pb = malloc(gemm_bf16_packed_elems(K, N) * sizeof *pb);
    for (size_t i = 0; i < R * K; i++)
        x[i] = uniform();
    for (size_t i = 0; i < K * N; i++)
        W[i] = uniform();
    for (size_t i = 0; i < N; i++)
        bias[i] = uniform();
    gemm_bf16_pack(pb, W, GEMM_F32, N, false, NULL, K, N);
    gemm_weight w = {.k = K, .n = N, .dtype = GEMM_BF16_PAIRS, .data16 = pb};
    gemm_run(o1, x, R, &w, bias, GEMM_PLAIN);
    gemm_bf16_run(o2, x, R, pb, K, N, bias, GEMM_PLAIN);
    assert_memory_equal(o1, o2, R * N * sizeof *o1);
    gemm_gelu(o2, R * N);
    gemm_run(o1, x, R, &w, bias, GEMM_GELU);
    assert_memory_equal(o1, o2, R * N * sizeof *o1);
    /* dx = dy W^T with dy = x's first N columns reused as [R, N] */
    const float *dy = o2;
    gemm_run_t(dx, dy, R, &w, false);
    for (size_t r = 0; r < R; r++)
        for (size_t kk = 0; kk < K; kk++) {
            double s = 0, m = 0;
            for (size_t c = 0; c < N; c++) {
                const double t = (double)dy[r * N + c] * bf16_f(gemm_bf16_round(W[kk * N + c]));
                s += t, m += fabs(t);
            }
            assert_true(fabs(dx[r * K + kk] - s) <= 0x1p-23 * (double)(N + 2) * m);
        }
    free(x), free(W), free(bias), free(o1), free(o2), free(dx), free(pb);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round),
        cmocka_unit_test(test_detection_hooks),
        cmocka_unit_test(test_kernel),
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_pack_sources),
        cmocka_unit_test(test_gemm_dispatch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
