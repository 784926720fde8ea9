/* ablate.h: the mean's exact sums do not depend on the order the runs are
 * added in, nor on how they are split among ranks (the split's words added
 * as comm_allreduce_sum_i64 adds them); the mean by position over prompts of
 * several lengths; the resample donor; the mean_over subsets. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ablate.h"

static const model_config CFG = {.n_layer = 2, .n_head = 2, .n_embd = 8, .d_head = 4, .n_inner = 16,
                                 .vocab_size = 10, .n_positions = 8};
enum { N_RUNS = 6 };
static const size_t LEN[N_RUNS] = {3, 5, 5, 8, 6, 1};

/* A run of LEN[r] tokens filled with values of mixed signs over ten orders
 * of magnitude (1e-6 .. 1e4): where a double sum's result depends on order. */
static void make_run(forward_cache *c, size_t r)
{
    assert_int_equal(forward_cache_init(c, &CFG, LEN[r], FORWARD_LOGITS_NONE), PS_OK);
    c->T = LEN[r];
    uint64_t x = 0x9e3779b97f4a7c15ull * (r + 1);
    for (size_t i = 0; i < c->core_floats; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        const double u = (double)(x >> 11) / 9007199254740992.0;
        c->arena[i] = (float)((x & 1 ? -1.0 : 1.0) * pow(10.0, -6.0 + 10.0 * u));
    }
}

static void sum_of(const size_t *order, size_t n, forward_cache *runs, ablate_mean *a)
{
    assert_int_equal(ablate_mean_init(a, &CFG, 8), PS_OK);
    for (size_t k = 0; k < n; k++)
        assert_int_equal(ablate_mean_add(a, &runs[order[k]]), PS_OK);
}

static void test_exact_sums(void **state)
{
    (void)state;
    forward_cache runs[N_RUNS];
    for (size_t r = 0; r < N_RUNS; r++)
        make_run(&runs[r], r);
    const size_t fwd[N_RUNS] = {0, 1, 2, 3, 4, 5}, rev[N_RUNS] = {5, 4, 3, 2, 1, 0};
    const size_t even[3] = {0, 2, 4}, odd[3] = {1, 3, 5};
    ablate_mean a, b, e, o;
    sum_of(fwd, N_RUNS, runs, &a);
    sum_of(rev, N_RUNS, runs, &b);
    sum_of(even, 3, runs, &e); /* two "ranks", then their words added */
    sum_of(odd, 3, runs, &o);
    for (size_t i = 0; i < e.n_words; i++)
        e.words[i] += o.words[i];
    assert_int_equal(ablate_mean_count(&a), N_RUNS);
    assert_memory_equal(a.words, b.words, a.n_words * sizeof *a.words);
    assert_memory_equal(a.words, e.words, a.n_words * sizeof *a.words);

    /* the mean by position: resid_pre[t, e] over the runs longer than t, and
     * pattern[h, i, j] over those with a row i, against a long double sum */
    model m = {0};
    m.cfg = CFG;
    forward_cache mean;
    const size_t T = 6, d = CFG.n_embd;
    assert_int_equal(ablate_mean_cache(&a, &m, T, &mean), PS_OK);
    for (size_t l = 0; l < CFG.n_layer; l++)
        for (size_t t = 0; t < T; t++)
            for (size_t k = 0; k < d; k++) {
                long double s = 0;
                size_t n = 0;
                for (size_t r = 0; r < N_RUNS; r++)
                    if (runs[r].T > t)
                        s += runs[r].layers[l].resid_pre[t * d + k], n++;
                const double ref = (double)(s / n), got = mean.layers[l].resid_pre[t * d + k];
                assert_true(fabs(got - ref) <= 1e-6 * fabs(ref) + 1e-12);
            }
    for (size_t h = 0; h < CFG.n_head; h++)
        for (size_t i = 0; i < T; i++)
            for (size_t j = 0; j < T; j++) {
                long double s = 0;
                size_t n = 0;
                for (size_t r = 0; r < N_RUNS; r++)
                    if (runs[r].T > i && runs[r].T > j)
                        s += runs[r].layers[1].pattern[(h * runs[r].T + i) * runs[r].T + j];
                for (size_t r = 0; r < N_RUNS; r++)
                    n += runs[r].T > i;
                const double ref = (double)(s / n), got = mean.layers[1].pattern[(h * T + i) * T + j];
                assert_true(fabs(got - ref) <= 1e-6 * fabs(ref) + 1e-12);
            }
    forward_cache_free(&mean);
    assert_true(ablate_mean_covers(&a, 8));
    ablate_mean_free(&e);
    ablate_mean_free(&o);
    /* the runs of 5 tokens or more alone: no mean of 8 tokens... */
    const size_t some[2] = {1, 2};
    sum_of(some, 2, runs, &e);
    assert_false(ablate_mean_covers(&e, 6));
    assert_int_equal(ablate_mean_cache(&e, &m, 6, &mean), PS_ERR_INVALID);
    /* ...and a run longer than the sum's length is refused */
    ablate_mean_free(&e);
    assert_int_equal(ablate_mean_init(&e, &CFG, 4), PS_OK);
    assert_int_equal(ablate_mean_add(&e, &runs[3]), PS_ERR_RANGE);
    ablate_mean_free(&e);
    ablate_mean_free(&a);
    ablate_mean_free(&b);
    for (size_t r = 0; r < N_RUNS; r++)
        forward_cache_free(&runs[r]);
}

static void test_resample_pick(void **state)
{
    (void)state;
    const size_t cand[5] = {2, 5, 7, 9, 11};
    size_t seen[12] = {0}, donor, again;
    for (uint64_t seed = 0; seed < 200; seed++) {
        assert_int_equal(ablate_resample_pick(seed, 7, cand, 5, &donor), PS_OK);
        assert_int_equal(ablate_resample_pick(seed, 7, cand, 5, &again), PS_OK);
        assert_int_equal(donor, again);   /* reproducible */
        assert_int_not_equal(donor, 7);   /* no fixed point */
        seen[donor]++;
    }
    assert_true(seen[2] && seen[5] && seen[9] && seen[11]); /* every other candidate is drawn */
    const size_t alone[1] = {3};
    assert_int_equal(ablate_resample_pick(1, 3, alone, 1, &donor), PS_ERR_INVALID);
    assert_int_equal(ablate_resample_pick(1, 99, alone, 1, &donor), PS_OK);
    assert_int_equal(donor, 3);
}

static void test_subsets(void **state)
{
    (void)state;
    patch_subset s;
    assert_int_equal(patch_subset_parse(NULL, &s), PS_OK);
    assert_int_equal(s.kind, PATCH_SUBSET_ALL);
    assert_int_equal(patch_subset_parse("all", &s), PS_OK);
    assert_int_equal(patch_subset_parse("3:10", &s), PS_OK);
    assert_true(s.kind == PATCH_SUBSET_RANGE && s.a == 3 && s.b == 10);
    assert_int_equal(patch_subset_parse("template=3", &s), PS_OK);
    assert_true(s.kind == PATCH_SUBSET_FIELD && !strcmp(s.field, "template") && !strcmp(s.value, "3"));
    const char *bad[] = {"10:3", "3:3", "3", ":4", "4:", "a:b", "=3", "-1:4"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(patch_subset_parse(bad[i], &s), PS_ERR_INVALID);
    patch_source src;
    patch_direction dir = PATCH_DENOISE;
    assert_int_equal(patch_source_parse("mean", &src), PS_OK);
    assert_int_equal(patch_source_direction(src, false, &dir), PS_OK);
    assert_int_equal(dir, PATCH_NOISE); /* an ablation ablates the clean run by default */
    dir = PATCH_DENOISE;
    assert_int_equal(patch_source_direction(src, true, &dir), PS_OK);
    assert_int_equal(dir, PATCH_DENOISE);
    dir = PATCH_NOISE;
    assert_int_equal(patch_source_direction(PATCH_SOURCE_CLEAN, true, &dir), PS_ERR_INVALID);
    assert_int_equal(patch_source_parse("shuffle", &src), PS_ERR_INVALID);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exact_sums),
        cmocka_unit_test(test_resample_pick),
        cmocka_unit_test(test_subsets),
    };
    return cmocka_run_group_tests_name("ablate", tests, NULL, NULL);
}
