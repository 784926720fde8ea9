/* Unit tests of the packed matrix product (gemm.h) and its thread pool: every
 * kernel this CPU supports against a double-precision reference over ragged
 * sizes, and the invariances the engines rely on: a row's result does not
 * depend on the other rows of the call or on the thread count. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gemm.h"
#include "pool.h"

static uint64_t rng = 7;
static float uniform(void)
{
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(rng >> 40) / (double)(1ull << 24) * 2.0 - 1.0);
}

typedef struct {
    size_t rows, k, n, ldw;
    float *x, *W, *bias, *packed, *out;
    double *ref; /* [rows, n] in double, with bias */
} problem;

static void problem_init(problem *p, size_t rows, size_t k, size_t n, size_t ldw)
{
    *p = (problem){.rows = rows, .k = k, .n = n, .ldw = ldw};
    p->x = malloc((rows * k + 1) * sizeof(float));
    p->W = malloc((k * ldw + 1) * sizeof(float));
    p->bias = malloc((n + 1) * sizeof(float));
    p->packed = malloc((gemm_packed_floats(k, n) + 1) * sizeof(float));
    p->out = malloc((rows * n + 1) * sizeof(float));
    p->ref = malloc((rows * n + 1) * sizeof(double));
    for (size_t i = 0; i < rows * k; i++)
        p->x[i] = uniform();
    for (size_t i = 0; i < k * ldw; i++)
        p->W[i] = uniform();
    for (size_t i = 0; i < n; i++)
        p->bias[i] = uniform();
    gemm_pack(p->packed, p->W, ldw, k, n);
    for (size_t r = 0; r < rows; r++)
        for (size_t j = 0; j < n; j++) {
            double s = p->bias[j];
            for (size_t kk = 0; kk < k; kk++)
                s += (double)p->x[r * k + kk] * p->W[kk * ldw + j];
            p->ref[r * n + j] = s;
        }
}

static void problem_free(problem *p)
{
    free(p->x), free(p->W), free(p->bias), free(p->packed), free(p->out), free(p->ref);
}

static double gelu_ref(double v) { return 0.5 * v * (1 + tanh(sqrt(2 / M_PI) * (v + 0.044715 * v * v * v))); }

/* Every supported ISA, ragged rows/k/n (partial row blocks and panels),
 * a row stride wider than n: within float rounding of the double product. */
static void test_kernels_match_double(void **state)
{
    (void)state;
    const size_t rows[] = {1, 5, 12, 13, 30}, ks[] = {1, 7, 64, 129}, ns[] = {1, 16, 17, 32, 45, 96};
    int checked = 0;
    for (int isa = 0; isa < GEMM_ISA_COUNT; isa++) {
        if (!gemm_isa_supported((gemm_isa)isa))
            continue;
        gemm_isa_set((gemm_isa)isa);
        assert_int_equal(gemm_isa_get(), isa);
        for (size_t a = 0; a < sizeof rows / sizeof *rows; a++)
            for (size_t b = 0; b < sizeof ks / sizeof *ks; b++)
                for (size_t c = 0; c < sizeof ns / sizeof *ns; c++) {
                    problem p;
                    problem_init(&p, rows[a], ks[b], ns[c], ns[c] + 3);
                    gemm_weight w = {p.k, p.n, p.packed, GEMM_F32, NULL};
                    gemm_run(p.out, p.x, p.rows, &w, p.bias, GEMM_PLAIN);
                    for (size_t i = 0; i < p.rows * p.n; i++)
                        assert_true(fabs(p.out[i] - p.ref[i]) <= 1e-5 * (double)p.k);
                    gemm_run(p.out, p.x, p.rows, &w, NULL, GEMM_GELU);
                    for (size_t i = 0; i < p.rows * p.n; i++) {
                        double want = gelu_ref(p.ref[i] - p.bias[i % p.n]);
                        assert_true(fabs(p.out[i] - want) <= 1e-5 * (double)p.k);
                    }
                    problem_free(&p);
                    checked++;
                }
    }
    assert_true(checked >= 120); /* at least the C kernel's 120 shapes */
    /* back to the widest supported kernel */
    for (int isa = GEMM_ISA_COUNT - 1; isa >= 0; isa--)
        if (gemm_isa_supported((gemm_isa)isa)) {
            gemm_isa_set((gemm_isa)isa);
            break;
        }
}

/* Row r of a 37-row product equals the same row computed alone, bit for
 * bit, with 1 and with 2 threads (big enough to be split among threads). */
static void test_rows_independent_of_batch_and_threads(void **state)
{
    (void)state;
    problem p;
    problem_init(&p, 37, 200, 300, 300);
    gemm_weight w = {p.k, p.n, p.packed, GEMM_F32, NULL};
    float *single = malloc(p.n * sizeof *single), *two = malloc(p.rows * p.n * sizeof *two);
    pool_set_threads(1);
    gemm_run(p.out, p.x, p.rows, &w, p.bias, GEMM_PLAIN);
    pool_set_threads(2);
    gemm_run(two, p.x, p.rows, &w, p.bias, GEMM_PLAIN);
    assert_memory_equal(p.out, two, p.rows * p.n * sizeof(float));
    for (size_t r = 0; r < p.rows; r += 6) {
        gemm_run(single, p.x + r * p.k, 1, &w, p.bias, GEMM_PLAIN);
        assert_memory_equal(single, p.out + r * p.n, p.n * sizeof(float));
    }
    free(single);
    free(two);
    problem_free(&p);
    pool_set_threads(0);
    pool_shutdown();
}

/* The vocabulary product: U [V, d] with V not a multiple of the 64-column
 * slices, against double within float rounding; 1, 2 and 3 threads give the
 * same bits (each thread's OpenBLAS call is a column slice, which does not
 * change any output's sum); one row (sgemv) matches its row of the matrix
 * product to float rounding. */
static void test_unembed_slices(void **state)
{
    (void)state;
    enum { V = 1000, D = 256, ROWS = 20 }; /* 5.1M multiply-adds: split among threads */
    float *U = malloc((size_t)V * D * sizeof *U), *x = malloc((size_t)ROWS * D * sizeof *x);
    float *out[3], *one = malloc(V * sizeof *one);
    for (size_t i = 0; i < (size_t)V * D; i++)
        U[i] = uniform();
    for (size_t i = 0; i < (size_t)ROWS * D; i++)
        x[i] = uniform();
    for (size_t t = 0; t < 3; t++) {
        out[t] = malloc((size_t)ROWS * V * sizeof(float));
        pool_set_threads(t + 1);
        gemm_unembed(out[t], x, ROWS, U, V, D);
    }
    assert_memory_equal(out[0], out[1], (size_t)ROWS * V * sizeof(float));
    assert_memory_equal(out[0], out[2], (size_t)ROWS * V * sizeof(float));
    for (size_t r = 0; r < ROWS; r++)
        for (size_t v = 0; v < V; v++) {
            double s = 0, a = 0;
            for (size_t e = 0; e < D; e++) {
                s += (double)x[r * D + e] * U[v * D + e];
                a += fabs((double)x[r * D + e] * U[v * D + e]);
            }
            assert_true(fabs(out[0][r * V + v] - s) <= 1e-6 * a + 1e-30);
        }
    pool_set_threads(2);
    gemm_unembed(one, x + 7 * D, 1, U, V, D);
    for (size_t v = 0; v < V; v++)
        assert_true(fabsf(one[v] - out[0][7 * V + v]) <= 1e-4f);
    for (size_t t = 0; t < 3; t++)
        free(out[t]);
    free(one), free(U), free(x);
    pool_set_threads(0);
    pool_shutdown();
}

/* A random finite 2-byte weight: F16 from subnormals (exponent field 0) up
 * to 2^5, BF16 around 1 (exponents 2^-8..2^7); random sign and mantissa. */
static uint16_t random_half(gemm_dtype dt)
{
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    const uint16_t r = (uint16_t)(rng >> 40), sign = r & 0x8000;
    if (dt == GEMM_F16)
        return (uint16_t)(sign | ((uint16_t)((r >> 10) % 21) << 10) | (r & 0x3FF));
    return (uint16_t)(sign | ((uint16_t)(119 + (r >> 7) % 16) << 7) | (r & 0x7F));
}

/* 2-byte panels (issue 21): for random F16 and BF16 weights, the product
 * with the weights packed in 2 bytes equals bit for bit the F32 product
 * with the widened weights, for every supported ISA, ragged shapes (partial
 * row blocks and panels), bias and GELU epilogues, and both packers
 * (gemm_pack16 of a [k, n] matrix, gemm_pack_rows16 of an nn.Linear
 * [n, k] one with a row map), 1 and 2 threads. */
static void test_packed16_equals_widened_f32(void **state)
{
    (void)state;
    const size_t rows[] = {1, 5, 13, 30}, ks[] = {1, 7, 64, 129}, ns[] = {1, 17, 32, 45, 96};
    int checked = 0;
    for (int dti = GEMM_F16; dti <= GEMM_BF16; dti++) {
        const gemm_dtype dt = (gemm_dtype)dti;
        for (int isa = 0; isa < GEMM_ISA_COUNT; isa++) {
            if (!gemm_isa_supported((gemm_isa)isa))
                continue;
            gemm_isa_set((gemm_isa)isa);
            for (size_t a = 0; a < 4; a++)
                for (size_t b = 0; b < 4; b++)
                    for (size_t c = 0; c < 5; c++) {
                        const size_t R = rows[a], K = ks[b], N = ns[c], ld = N + 3;
                        uint16_t *h = malloc(K * ld * 2), *lin = malloc(N * K * 2);
                        uint16_t *p16 = malloc(gemm_packed_floats(K, N) * 2 + 2),
                                 *q16 = malloc(gemm_packed_floats(K, N) * 2 + 2);
                        float *wide = malloc(K * ld * 4), *lwide = malloc(N * K * 4 + 4);
                        float *p32 = malloc(gemm_packed_floats(K, N) * 4 + 4), *q32 = malloc(gemm_packed_floats(K, N) * 4 + 4);
                        float *x = malloc(R * K * 4), *bias = malloc(N * 4), *o32 = malloc(R * N * 4),
                              *o16 = malloc(R * N * 4);
                        size_t *map = malloc(N * sizeof *map);
                        for (size_t i = 0; i < K * ld; i++)
                            wide[i] = gemm_widen(dt, h[i] = random_half(dt));
                        for (size_t i = 0; i < N * K; i++)
                            lwide[i] = gemm_widen(dt, lin[i] = random_half(dt));
                        for (size_t i = 0; i < N; i++)
                            map[i] = (i * 7) % N, bias[i] = uniform();
                        for (size_t i = 0; i < R * K; i++)
                            x[i] = uniform();
                        gemm_pack(p32, wide, ld, K, N);
                        gemm_pack16(p16, h, ld, K, N);
                        gemm_pack_rows(q32, lwide, K, map, K, N);
                        gemm_pack_rows16(q16, lin, K, map, K, N);
                        const gemm_weight w32[2] = {{K, N, p32, GEMM_F32, NULL}, {K, N, q32, GEMM_F32, NULL}};
                        const gemm_weight w16[2] = {{K, N, NULL, dt, p16}, {K, N, NULL, dt, q16}};
                        for (int which = 0; which < 2; which++)
                            for (int ep = 0; ep < 2; ep++)
                                for (size_t th = 1; th <= 2; th++) {
                                    pool_set_threads(th);
                                    const gemm_epilogue e = ep ? GEMM_GELU : GEMM_PLAIN;
                                    gemm_run(o32, x, R, &w32[which], ep ? NULL : bias, e);
                                    gemm_run(o16, x, R, &w16[which], ep ? NULL : bias, e);
                                    assert_memory_equal(o32, o16, R * N * sizeof(float));
                                }
                        free(h), free(lin), free(p16), free(q16), free(wide), free(lwide), free(p32), free(q32);
                        free(x), free(bias), free(o32), free(o16), free(map);
                        checked++;
                    }
        }
    }
    assert_true(checked >= 2 * 80);
    assert_int_equal(gemm_packed_bytes(3, 40, GEMM_BF16) * 2, gemm_packed_bytes(3, 40, GEMM_F32));
    /* the widening itself: exact */
    assert_true(gemm_widen(GEMM_F16, 0x3C00) == 1.0f && gemm_widen(GEMM_F16, 0x0001) == ldexpf(1.0f, -24));
    assert_true(gemm_widen(GEMM_BF16, 0x3F80) == 1.0f && gemm_widen(GEMM_BF16, 0xC040) == -3.0f);
    for (int isa = GEMM_ISA_COUNT - 1; isa >= 0; isa--)
        if (gemm_isa_supported((gemm_isa)isa)) {
            gemm_isa_set((gemm_isa)isa);
            break;
        }
    pool_set_threads(0);
    pool_shutdown();
}

/* The same for the embeddings (issue 21): an F16/BF16 unembedding U [V, d]
 * is kept as the 2-byte panels of x @ U^T (gemm_pack_rows16, no row map;
 * model.c), and the logits are one gemm_run: equal bit for bit to the F32
 * panels of the widened U, for a vocabulary that is no multiple of the
 * panel width, the one row of a metric and the rows of a forward, every
 * instruction set and 1-2 threads.  The embedding lookup's row, gathered
 * from the panels and widened, is the widened row. */
static void test_unembed16_equals_widened_f32(void **state)
{
    (void)state;
    const size_t V = 1000 + 13, D = 96, rows[] = {1, 17};
    int checked = 0;
    for (int dti = GEMM_F16; dti <= GEMM_BF16; dti++) {
        const gemm_dtype dt = (gemm_dtype)dti;
        uint16_t *u16 = malloc(V * D * 2), *p16 = malloc(gemm_packed_floats(D, V) * 2);
        float *wide = malloc(V * D * 4), *p32 = malloc(gemm_packed_floats(D, V) * 4);
        float *x = malloc(17 * D * 4), *o32 = malloc(17 * V * 4), *o16 = malloc(17 * V * 4);
        for (size_t i = 0; i < V * D; i++)
            wide[i] = gemm_widen(dt, u16[i] = random_half(dt));
        for (size_t i = 0; i < 17 * D; i++)
            x[i] = uniform();
        gemm_pack_rows(p32, wide, D, NULL, D, V);
        gemm_pack_rows16(p16, u16, D, NULL, D, V);
        /* row v of U from the panels: packed[v / NR][kk][v % NR] */
        for (size_t v = 0; v < V; v += 37)
            for (size_t kk = 0; kk < D; kk++)
                assert_true(gemm_widen(dt, p16[(v / GEMM_NR) * D * GEMM_NR + kk * GEMM_NR + v % GEMM_NR]) ==
                            wide[v * D + kk]);
        const gemm_weight w32 = {D, V, p32, GEMM_F32, NULL}, w16 = {D, V, NULL, dt, p16};
        for (int isa = 0; isa < GEMM_ISA_COUNT; isa++) {
            if (!gemm_isa_supported((gemm_isa)isa))
                continue;
            gemm_isa_set((gemm_isa)isa);
            for (size_t a = 0; a < 2; a++)
                for (size_t th = 1; th <= 2; th++) {
                    pool_set_threads(th);
                    gemm_run(o32, x, rows[a], &w32, NULL, GEMM_PLAIN);
                    gemm_run(o16, x, rows[a], &w16, NULL, GEMM_PLAIN);
                    assert_memory_equal(o32, o16, rows[a] * V * sizeof(float));
                    checked++;
                }
        }
        free(u16), free(p16), free(wide), free(p32), free(x), free(o32), free(o16);
    }
    assert_true(checked >= 2 * 4);
    for (int isa = GEMM_ISA_COUNT - 1; isa >= 0; isa--)
        if (gemm_isa_supported((gemm_isa)isa)) {
            gemm_isa_set((gemm_isa)isa);
            break;
        }
    pool_set_threads(0);
    pool_shutdown();
}

/* gelu over [-12, 12] and at the extremes: relative error < 1e-6 where the
 * value is not tiny, absolute < 1e-6 near zero, finite far out (gelu(-1e30)
 * is 0 to within 1e-6: v / (1 + e^88)); every instruction set's copy gives
 * the portable copy's bits. */
static void test_gelu_accuracy(void **state)
{
    (void)state;
    enum { N = 24001 };
    float *x = malloc(N * sizeof *x), *y = malloc(N * sizeof *y), *y_c = malloc(N * sizeof *y_c);
    for (int i = 0; i < N; i++)
        x[i] = -12.0f + 24.0f * (float)i / (float)(N - 1);
    const gemm_isa native = gemm_isa_get();
    for (int isa = GEMM_ISA_C; isa < GEMM_ISA_COUNT; isa++) {
        if (!gemm_isa_supported((gemm_isa)isa))
            continue;
        gemm_isa_set((gemm_isa)isa);
        memcpy(y, x, N * sizeof *x);
        gemm_gelu(y, N);
        double worst = 0;
        for (int i = 0; i < N; i++) {
            double want = gelu_ref(x[i]), err = fabs(y[i] - want);
            worst = fmax(worst, fabs(want) > 1e-3 ? err / fabs(want) : err);
        }
        assert_true(worst < 1e-6);
        if (isa == GEMM_ISA_C)
            memcpy(y_c, y, N * sizeof *y);
        else
            assert_memory_equal(y, y_c, N * sizeof *y);
        float big[] = {-1e30f, -100.0f, 100.0f, 1e30f, 0.0f};
        gemm_gelu(big, 5);
        assert_true(fabsf(big[0]) < 1e-6f && fabsf(big[1]) < 1e-30f && big[4] == 0.0f);
        assert_true(big[2] == 100.0f && big[3] == 1e30f);
    }
    gemm_isa_set(native);
    free(x);
    free(y);
    free(y_c);
}

/* The exact GELU (gemm_gelu_erf, its own vectorized erf): against
 * 0.5 v (1 + erf(v / sqrt 2)) in double over [-10, 10] every 2^-12 and
 * 100,000 random floats, error <= 2e-7 |gelu| + 6e-8 |v| (the second term:
 * 1 ulp of erf near -1, where 1 + erf cancels, as with libm's erff);
 * every instruction set's copy gives the portable copy's bits; the product's
 * GEMM_GELU_ERF epilogue gives the bits of a plain product followed by it. */
static void test_gelu_erf_accuracy(void **state)
{
    (void)state;
    enum { NG = 20 * 4096 + 1, NR = 100000, N = NG + NR + 6 };
    float *x = malloc(N * sizeof *x), *y = malloc(N * sizeof *y), *y_c = malloc(N * sizeof *y_c);
    for (int i = 0; i < NG; i++)
        x[i] = -10.0f + (float)i / 4096.0f;
    uint32_t r = 12345;
    for (int i = 0; i < NR; i++) {
        r = r * 1664525u + 1013904223u;
        x[NG + i] = ((float)(r >> 8) / 16777216.0f - 0.5f) * 16.0f;
    }
    const float special[] = {0.0f, -0.0f, 1e-30f, -1e-30f, 40.0f, -40.0f};
    memcpy(x + NG + NR, special, sizeof special);
    const gemm_isa native = gemm_isa_get();
    int checked = 0;
    for (int isa = GEMM_ISA_C; isa < GEMM_ISA_COUNT; isa++) {
        if (!gemm_isa_supported((gemm_isa)isa))
            continue;
        gemm_isa_set((gemm_isa)isa);
        memcpy(y, x, N * sizeof *x);
        gemm_gelu_erf(y, N);
        double worst = 0;
        for (int i = 0; i < N; i++) {
            const double v = x[i], want = 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
            const double bound = 2e-7 * fabs(want) + 6e-8 * fabs(v) + 1e-37;
            worst = fmax(worst, fabs(y[i] - want) / bound);
        }
        print_message("gelu_erf %s: worst %.3f of the bound\n", gemm_isa_name((gemm_isa)isa), worst);
        assert_true(worst <= 1.0);
        assert_true(y[NG + NR] == 0.0f && y[NG + NR + 4] == 40.0f && y[NG + NR + 5] == 0.0f);
        if (isa == GEMM_ISA_C)
            memcpy(y_c, y, N * sizeof *y);
        else
            assert_memory_equal(y, y_c, N * sizeof *y);
        /* fused into the product: the same bits as afterwards */
        problem p;
        problem_init(&p, 13, 64, 45, 45);
        gemm_weight w = {p.k, p.n, p.packed, GEMM_F32, NULL};
        float *sep = malloc(p.rows * p.n * sizeof *sep);
        gemm_run(sep, p.x, p.rows, &w, p.bias, GEMM_PLAIN);
        gemm_gelu_erf(sep, p.rows * p.n);
        gemm_run(p.out, p.x, p.rows, &w, p.bias, GEMM_GELU_ERF);
        assert_memory_equal(p.out, sep, p.rows * p.n * sizeof *sep);
        free(sep);
        problem_free(&p);
        checked++;
    }
    assert_true(checked >= 1);
    gemm_isa_set(native);
    free(x);
    free(y);
    free(y_c);
}

/* pool_run gives every tid exactly once, also after a shutdown. */
static void count_tid(void *arg, size_t tid, size_t nt)
{
    int *seen = arg;
    assert_true(tid < nt);
    __atomic_fetch_add(&seen[tid], 1, __ATOMIC_SEQ_CST);
}

static void test_pool_runs_each_tid_once(void **state)
{
    (void)state;
    pool_set_threads(3);
    for (int round = 0; round < 2; round++) {
        for (int rep = 0; rep < 100; rep++) {
            int seen[3] = {0};
            pool_run(3, count_tid, seen);
            assert_int_equal(seen[0] + seen[1] + seen[2], 3);
            assert_true(seen[0] == 1 && seen[1] == 1 && seen[2] == 1);
        }
        pool_shutdown();
    }
    int one[1] = {0};
    pool_run(1, count_tid, one);
    assert_int_equal(one[0], 1);
    pool_set_threads(0);
    pool_shutdown();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kernels_match_double),
        cmocka_unit_test(test_rows_independent_of_batch_and_threads),
        cmocka_unit_test(test_unembed_slices),
        cmocka_unit_test(test_packed16_equals_widened_f32),
        cmocka_unit_test(test_unembed16_equals_widened_f32),
        cmocka_unit_test(test_gelu_accuracy),
        cmocka_unit_test(test_gelu_erf_accuracy),
        cmocka_unit_test(test_pool_runs_each_tid_once),
    };
    return cmocka_run_group_tests_name("gemm", tests, NULL, NULL);
}
