/* Unit tests of the transposed packed product gemm_run_t (gemm.h), the
 * backward pass's matrix product dx (+)= dy @ W^T: every kernel this CPU
 * supports and every panel type against a double-precision reference over
 * ragged sizes (partial row and column tiles, a last panel narrower than
 * GEMM_NR), accumulate and overwrite, and the invariance the gradient tests
 * rely on: a row's result does not depend on the other rows of the call or on
 * the thread count. */
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

static uint64_t rng = 11;
static float uniform(void)
{
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(rng >> 40) / (double)(1ull << 24) * 2.0 - 1.0);
}

/* BF16 of x by truncation (exactly representable: the reference widens it back) */
static uint16_t to_bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (uint16_t)(u >> 16);
}

typedef struct {
    size_t rows, k, n;
    float *dy, *W, *packed, *dx, *dx0;
    uint16_t *W16, *packed16;
    double *ref; /* [rows, k] = dx0 + dy @ W^T in double */
} problem;

/* W16 holds W rounded to BF16 and W is replaced by its widened value, so
 * that one reference serves both panel types. */
static void problem_init(problem *p, size_t rows, size_t k, size_t n)
{
    *p = (problem){.rows = rows, .k = k, .n = n};
    p->dy = malloc((rows * n + 1) * sizeof(float));
    p->W = malloc((k * n + 1) * sizeof(float));
    p->W16 = malloc((k * n + 1) * sizeof(uint16_t));
    p->packed = malloc((gemm_packed_floats(k, n) + 1) * sizeof(float));
    p->packed16 = malloc((gemm_packed_floats(k, n) + 1) * sizeof(uint16_t));
    p->dx = malloc((rows * k + 1) * sizeof(float));
    p->dx0 = malloc((rows * k + 1) * sizeof(float));
    p->ref = malloc((rows * k + 1) * sizeof(double));
    for (size_t i = 0; i < rows * n; i++)
        p->dy[i] = uniform();
    for (size_t i = 0; i < k * n; i++) {
        p->W16[i] = to_bf16(uniform());
        p->W[i] = gemm_widen(GEMM_BF16, p->W16[i]);
    }
    for (size_t i = 0; i < rows * k; i++)
        p->dx0[i] = uniform();
    gemm_pack(p->packed, p->W, n, k, n);
    gemm_pack16(p->packed16, p->W16, n, k, n);
    for (size_t r = 0; r < rows; r++)
        for (size_t kk = 0; kk < k; kk++) {
            double s = 0.0;
            for (size_t c = 0; c < n; c++)
                s += (double)p->dy[r * n + c] * p->W[kk * n + c];
            p->ref[r * k + kk] = s;
        }
}

static void problem_free(problem *p)
{
    free(p->dy), free(p->W), free(p->W16), free(p->packed), free(p->packed16), free(p->dx), free(p->dx0);
    free(p->ref);
}

static void widest_isa(void)
{
    for (int isa = GEMM_ISA_COUNT - 1; isa >= 0; isa--)
        if (gemm_isa_supported((gemm_isa)isa)) {
            gemm_isa_set((gemm_isa)isa);
            break;
        }
}

static void test_kernels_match_double(void **state)
{
    (void)state;
    const size_t rows[] = {1, 3, 4, 5, 9, 17}, ks[] = {1, 3, 4, 7, 66}, ns[] = {1, 15, 16, 17, 32, 45, 96};
    int checked = 0;
    for (int isa = 0; isa < GEMM_ISA_COUNT; isa++) {
        if (!gemm_isa_supported((gemm_isa)isa))
            continue;
        gemm_isa_set((gemm_isa)isa);
        for (size_t a = 0; a < sizeof rows / sizeof *rows; a++)
            for (size_t b = 0; b < sizeof ks / sizeof *ks; b++)
                for (size_t c = 0; c < sizeof ns / sizeof *ns; c++) {
                    problem p;
                    problem_init(&p, rows[a], ks[b], ns[c]);
                    const gemm_weight w32 = {p.k, p.n, p.packed, GEMM_F32, NULL};
                    const gemm_weight w16 = {p.k, p.n, NULL, GEMM_BF16, p.packed16};
                    const double tol = 1e-5 * (double)p.n;
                    for (int bf = 0; bf < 2; bf++) {
                        const gemm_weight *w = bf ? &w16 : &w32;
                        memset(p.dx, 0xff, p.rows * p.k * sizeof(float)); /* NaN: overwritten */
                        gemm_run_t(p.dx, p.dy, p.rows, w, false);
                        for (size_t i = 0; i < p.rows * p.k; i++)
                            assert_true(fabs(p.dx[i] - p.ref[i]) <= tol);
                        memcpy(p.dx, p.dx0, p.rows * p.k * sizeof(float));
                        gemm_run_t(p.dx, p.dy, p.rows, w, true);
                        for (size_t i = 0; i < p.rows * p.k; i++)
                            assert_true(fabs(p.dx[i] - (p.dx0[i] + p.ref[i])) <= tol);
                    }
                    problem_free(&p);
                    checked++;
                }
    }
    assert_true(checked >= 210); /* at least the C kernel's shapes */
    widest_isa();
}

/* F32 and BF16 panels of the same (BF16-exact) weights give the same bits. */
static void test_bf16_panels_equal_f32(void **state)
{
    (void)state;
    problem p;
    problem_init(&p, 7, 70, 77);
    const gemm_weight w32 = {p.k, p.n, p.packed, GEMM_F32, NULL}, w16 = {p.k, p.n, NULL, GEMM_BF16, p.packed16};
    float *other = malloc(p.rows * p.k * sizeof *other);
    for (int isa = 0; isa < GEMM_ISA_COUNT; isa++) {
        if (!gemm_isa_supported((gemm_isa)isa))
            continue;
        gemm_isa_set((gemm_isa)isa);
        gemm_run_t(p.dx, p.dy, p.rows, &w32, false);
        gemm_run_t(other, p.dy, p.rows, &w16, false);
        assert_memory_equal(p.dx, other, p.rows * p.k * sizeof(float));
    }
    widest_isa();
    free(other);
    problem_free(&p);
}

/* Row r of a 23-row product equals the same row computed alone, bit for
 * bit, with 1, 2 and 3 threads (big enough to be split among threads). */
static void test_rows_independent_of_batch_and_threads(void **state)
{
    (void)state;
    problem p;
    problem_init(&p, 23, 301, 700);
    const gemm_weight w = {p.k, p.n, p.packed, GEMM_F32, NULL};
    float *single = malloc(p.k * sizeof *single), *other = malloc(p.rows * p.k * sizeof *other);
    pool_set_threads(1);
    gemm_run_t(p.dx, p.dy, p.rows, &w, false);
    for (size_t nt = 2; nt <= 3; nt++) {
        pool_set_threads(nt);
        gemm_run_t(other, p.dy, p.rows, &w, false);
        assert_memory_equal(p.dx, other, p.rows * p.k * sizeof(float));
    }
    for (size_t r = 0; r < p.rows; r += 5) {
        gemm_run_t(single, p.dy + r * p.n, 1, &w, false);
        assert_memory_equal(single, p.dx + r * p.k, p.k * sizeof(float));
    }
    free(single), free(other);
    problem_free(&p);
    pool_set_threads(0);
    pool_shutdown();
}

/* gemm_run_t_sum over three weights (one BF16) = three gemm_run_t calls in
 * order, bit for bit, overwriting and accumulating, at 1 and 2 threads. */
static void test_sum_equals_calls(void **state)
{
    (void)state;
    problem p[3];
    problem_init(&p[0], 9, 200, 190);
    problem_init(&p[1], 9, 200, 64);
    problem_init(&p[2], 9, 200, 33);
    const gemm_weight w0 = {p[0].k, p[0].n, p[0].packed, GEMM_F32, NULL};
    const gemm_weight w1 = {p[1].k, p[1].n, NULL, GEMM_BF16, p[1].packed16};
    const gemm_weight w2 = {p[2].k, p[2].n, p[2].packed, GEMM_F32, NULL};
    const gemm_weight *w[3] = {&w0, &w1, &w2};
    const float *dy[3] = {p[0].dy, p[1].dy, p[2].dy};
    const size_t n = p[0].rows * p[0].k;
    float *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b);
    for (size_t nt = 1; nt <= 2; nt++) {
        pool_set_threads(nt);
        for (int acc = 0; acc < 2; acc++) {
            memcpy(a, p[0].dx0, n * sizeof *a);
            memcpy(b, p[0].dx0, n * sizeof *b);
            for (int i = 0; i < 3; i++)
                gemm_run_t(a, dy[i], p[0].rows, w[i], acc || i > 0);
            gemm_run_t_sum(b, dy, w, 3, p[0].rows, acc);
            assert_memory_equal(a, b, n * sizeof *a);
        }
    }
    pool_set_threads(0);
    pool_shutdown();
    free(a), free(b);
    for (int i = 0; i < 3; i++)
        problem_free(&p[i]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kernels_match_double),
        cmocka_unit_test(test_bf16_panels_equal_f32),
        cmocka_unit_test(test_rows_independent_of_batch_and_threads),
        cmocka_unit_test(test_sum_equals_calls),
    };
    return cmocka_run_group_tests_name("gemm_t", tests, NULL, NULL);
}
