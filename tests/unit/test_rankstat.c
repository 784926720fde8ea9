/*
 * rankstat: Spearman's correlation with ties, the total order by effect
 * (NaN last, ties by index) and the top-k misses, on hand-computed cases.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "rankstat.h"

static void test_spearman_ties(void **state)
{
    (void)state;
    /* ranks of b: 1, 2, 3.5, 5, 3.5; rho = 8 / sqrt(10 * 9.5) */
    const double a[] = {1, 2, 3, 4, 5}, b[] = {5, 6, 7, 8, 7};
    double rho;
    assert_int_equal(rankstat_spearman(a, b, 5, &rho), PS_OK);
    assert_true(fabs(rho - 8.0 / sqrt(95.0)) < 1e-15);
    const double c[] = {3, 1, 2, 2, 5, 4}, d[] = {0.1, 0.3, 0.2, 0.2, 0.9, -1};
    assert_int_equal(rankstat_spearman(c, d, 6, &rho), PS_OK);
    assert_true(fabs(rho - (-2.0 / 17.0)) < 1e-15);
    /* the same order: 1; reversed: -1 */
    const double e[] = {10, 20, 30, 40, 50}, f[] = {-1, -2, -3, -4, -5};
    assert_int_equal(rankstat_spearman(a, e, 5, &rho), PS_OK);
    assert_true(fabs(rho - 1.0) < 1e-15);
    assert_int_equal(rankstat_spearman(a, f, 5, &rho), PS_OK);
    assert_true(fabs(rho + 1.0) < 1e-15);
}

static void test_spearman_undefined(void **state)
{
    (void)state;
    const double a[] = {1, 2, 3}, k[] = {7, 7, 7};
    double rho = 0;
    assert_int_equal(rankstat_spearman(a, k, 3, &rho), PS_OK);
    assert_true(isnan(rho));
    rho = 0;
    assert_int_equal(rankstat_spearman(a, k, 0, &rho), PS_OK);
    assert_true(isnan(rho));
}

static void test_order_by_effect(void **state)
{
    (void)state;
    /* effects |v - 1|: 0.5, NaN, 3, 1, 1 -> 2, then 3 and 4 (a tie: by index), 0, the NaN last */
    const double v[] = {1.5, NAN, -2, 2, 0};
    size_t order[5];
    assert_int_equal(rankstat_order_by_effect(v, 5, 1.0, order), PS_OK);
    const size_t want[] = {2, 3, 4, 0, 1};
    for (size_t i = 0; i < 5; i++)
        assert_int_equal(order[i], want[i]);
}

static void test_missed_top_k(void **state)
{
    (void)state;
    /* exact top 2 by effect: 0, 1; the estimate's: 3, 1 -> cell 0 missed */
    const double exact[] = {10, 9, 8, 1, 0}, est[] = {0, 9, 8, 10, 1};
    size_t missed[5], n = 99;
    assert_int_equal(rankstat_missed_top_k(exact, est, 5, 0.0, 2, missed, &n), PS_OK);
    assert_int_equal(n, 1);
    assert_int_equal(missed[0], 0);
    /* k over n is clamped: every cell is in both top k, nothing missed */
    assert_int_equal(rankstat_missed_top_k(exact, est, 5, 0.0, 9, missed, &n), PS_OK);
    assert_int_equal(n, 0);
    /* base moves the effects: with base 9, exact's effects 1, 0, 1, 8, 9 -> top 2 = 4, 3;
     * est's 9, 0, 1, 1, 8 -> 0, 4: cell 3 missed */
    assert_int_equal(rankstat_missed_top_k(exact, est, 5, 9.0, 2, missed, &n), PS_OK);
    assert_int_equal(n, 1);
    assert_int_equal(missed[0], 3);
    assert_int_equal(rankstat_missed_top_k(exact, est, 0, 0.0, 2, missed, &n), PS_OK);
    assert_int_equal(n, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_spearman_ties),
        cmocka_unit_test(test_spearman_undefined),
        cmocka_unit_test(test_order_by_effect),
        cmocka_unit_test(test_missed_top_k),
    };
    return cmocka_run_group_tests_name("rankstat", tests, NULL, NULL);
}
