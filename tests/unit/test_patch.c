/* Unit tests of the patching engines on in-memory random models: the fast
 * engine equals the naive one (a full forward per cell with a hook) for
 * every component, metric and direction, over several prompt pairs of
 * different lengths at once and with row budgets small enough to split the
 * work into many sgemm groups. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "patch.h"
#include "random_model.h"

enum { N_PAIRS = 3 };

typedef struct {
    random_model tm;
    patch_pair pairs[N_PAIRS];
} fixture;

/* Pairs shaped like IOI: equal prefixes, a difference at one or two
 * positions, different lengths. */
static int setup(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    random_model_init(&fx->tm, 3, 4, 32, 64, 24);
    static const int32_t c0[] = {63, 5, 17, 3, 9, 42, 8, 17, 11}, r0[] = {63, 5, 17, 3, 9, 42, 8, 3, 11};
    static const int32_t c1[] = {63, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}, r1[] = {63, 1, 2, 30, 4, 5, 6, 7, 8, 9, 40, 11};
    static const int32_t c2[] = {7, 20, 21, 22, 23, 24, 25}, r2[] = {8, 20, 21, 22, 23, 24, 25};
    const int32_t *cl[] = {c0, c1, c2}, *co[] = {r0, r1, r2};
    const size_t T[] = {9, 12, 7};
    for (int i = 0; i < N_PAIRS; i++)
        assert_int_equal(patch_pair_init(&fx->pairs[i], &fx->tm.m, cl[i], co[i], T[i], 17 + i, 3 + i), PS_OK);
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    fixture *fx = *state;
    for (int i = 0; i < N_PAIRS; i++)
        patch_pair_free(&fx->pairs[i]);
    random_model_free(&fx->tm);
    free(fx);
    return 0;
}

/* All cells of all components of all pairs (pattern_dest_src, T x T cells
 * a head, only with_dest_src: its cost is that of all the others twice over). */
static patch_cell *all_cells(const fixture *fx, size_t *n, bool with_dest_src)
{
    patch_cell *all = NULL;
    size_t total = 0;
    for (uint32_t p = 0; p < N_PAIRS; p++)
        for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
            if (c == PATCH_PATTERN_DEST_SRC && !with_dest_src)
                continue;
            patch_cell *cells;
            size_t k;
            assert_int_equal(patch_grid_cells((patch_component)c, &fx->tm.m.cfg, p, fx->pairs[p].T, &cells, &k), PS_OK);
            all = realloc(all, (total + k) * sizeof *all);
            memcpy(all + total, cells, k * sizeof *cells);
            total += k;
            free(cells);
        }
    *n = total;
    return all;
}

static void check_engines_agree(fixture *fx, patch_metric metric, patch_direction dir)
{
    size_t n;
    patch_cell *cells = all_cells(fx, &n, metric == PATCH_LOGIT_DIFF);
    double *naive = malloc(n * sizeof *naive), *fast = malloc(n * sizeof *fast), *split = malloc(n * sizeof *split);
    patch_opts o = {.metric = metric, .direction = dir, .engine = PATCH_ENGINE_NAIVE};
    assert_int_equal(patch_eval(&fx->tm.m, fx->pairs, N_PAIRS, cells, n, &o, naive), PS_OK);
    o.engine = PATCH_ENGINE_FAST;
    assert_int_equal(patch_eval(&fx->tm.m, fx->pairs, N_PAIRS, cells, n, &o, fast), PS_OK);
    o.max_rows = 13; /* many small groups; a job of 12 rows fits, two rarely do */
    assert_int_equal(patch_eval(&fx->tm.m, fx->pairs, N_PAIRS, cells, n, &o, split), PS_OK);
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double tol = metric == PATCH_PROB ? 1e-5 * fmax(fabs(naive[i]), 1e-3) : 1e-4 * fmax(1.0, fabs(naive[i]));
        double e = fmax(fabs(fast[i] - naive[i]), fabs(split[i] - naive[i]));
        if (!(e <= tol))
            fail_msg("%s %s cell %zu (component %s, layer %u, position %u, src_position %u, head %u, pair %u): "
                     "naive %.9g fast %.9g split %.9g",
                     patch_metric_name(metric), dir == PATCH_DENOISE ? "denoise" : "noise", i,
                     patch_component_name((patch_component)cells[i].component), cells[i].layer, cells[i].position,
                     cells[i].src_position, cells[i].head, cells[i].pair, naive[i], fast[i], split[i]);
        worst = fmax(worst, e / tol);
    }
    /* Grouping must not change a single bit. */
    assert_memory_equal(fast, split, n * sizeof *fast);
    printf("  %s/%s: %zu cells, worst error %.3f of the tolerance\n", patch_metric_name(metric),
           dir == PATCH_DENOISE ? "denoise" : "noise", n, worst);
    free(naive);
    free(fast);
    free(split);
    free(cells);
}

static void test_fast_equals_naive(void **state)
{
    for (int m = 0; m < PATCH_METRIC_COUNT; m++) {
        check_engines_agree(*state, (patch_metric)m, PATCH_DENOISE);
        check_engines_agree(*state, (patch_metric)m, PATCH_NOISE);
    }
}

/* Several metrics from one patched forward (issue 19): for both engines and
 * directions, each metric of metrics = kl,logit_diff,prob,logprob equals a
 * run of that metric alone bit for bit, skipped cells included. */
static void test_several_metrics(void **state)
{
    fixture *fx = *state;
    size_t n;
    patch_cell *cells = all_cells(fx, &n, false);
    patch_metric_list list;
    assert_int_equal(patch_metric_list_parse(" kl, logit_diff ,prob,logprob", &list), PS_OK);
    assert_int_equal(list.n, 4);
    assert_int_equal(list.m[0], PATCH_KL);
    assert_int_equal(list.m[1], PATCH_LOGIT_DIFF);
    const size_t M = list.n;
    double *many = malloc(n * M * sizeof *many), *one = malloc(n * sizeof *one);
    for (int e = 0; e < 2; e++)
        for (int dir = 0; dir < 2; dir++) {
            patch_opts o = {.direction = (patch_direction)dir, .engine = (patch_engine)e, .max_rows = 13,
                            .metrics = list};
            assert_int_equal(patch_eval(&fx->tm.m, fx->pairs, N_PAIRS, cells, n, &o, many), PS_OK);
            for (size_t k = 0; k < M; k++) {
                patch_opts o1 = {.metric = list.m[k], .direction = (patch_direction)dir, .engine = (patch_engine)e,
                                 .max_rows = 13};
                assert_int_equal(patch_eval(&fx->tm.m, fx->pairs, N_PAIRS, cells, n, &o1, one), PS_OK);
                for (size_t i = 0; i < n; i++)
                    if (memcmp(&many[i * M + k], &one[i], sizeof one[i]))
                        fail_msg("engine %d dir %d metric %s cell %zu: %.17g together, %.17g alone", e, dir,
                                 patch_metric_name(list.m[k]), i, many[i * M + k], one[i]);
            }
        }
    /* bad lists: unknown, repeated, empty */
    assert_int_equal(patch_metric_list_parse("prob,accuracy", &list), PS_ERR_INVALID);
    assert_int_equal(patch_metric_list_parse("prob, prob", &list), PS_ERR_INVALID);
    assert_int_equal(patch_metric_list_parse("prob,,kl", &list), PS_ERR_INVALID);
    assert_int_equal(patch_metric_list_parse("", &list), PS_ERR_INVALID);
    free(many);
    free(one);
    free(cells);
}

/* Cells before the first differing token change nothing: both engines give
 * the unpatched metric exactly, and the fast engine's cost is 0. */
static void test_unchanged_cells(void **state)
{
    fixture *fx = *state;
    const patch_pair *p = &fx->pairs[1]; /* first difference at position 3 */
    patch_cell *cells;
    size_t n;
    assert_int_equal(patch_grid_cells(PATCH_RESID_PRE, &fx->tm.m.cfg, 1, p->T, &cells, &n), PS_OK);
    double *v = malloc(n * sizeof *v);
    for (int e = 0; e < 2; e++) {
        patch_opts o = {.metric = PATCH_LOGIT_DIFF, .direction = PATCH_DENOISE, .engine = (patch_engine)e};
        assert_int_equal(patch_eval(&fx->tm.m, fx->pairs, N_PAIRS, cells, n, &o, v), PS_OK);
        for (size_t i = 0; i < n; i++)
            if (cells[i].position < 3) {
                assert_true(v[i] == p->corrupted_metric[PATCH_LOGIT_DIFF]);
                assert_int_equal(patch_cell_cost(&fx->tm.m, fx->pairs, &cells[i], PATCH_DENOISE), 0);
            }
    }
    /* resid_pre at layer 0 of the differing position restores the clean run */
    size_t i3 = 3; /* layer 0, position 3 */
    patch_opts o = {.metric = PATCH_LOGIT_DIFF, .direction = PATCH_DENOISE, .engine = PATCH_ENGINE_FAST};
    assert_int_equal(patch_eval(&fx->tm.m, fx->pairs, N_PAIRS, cells, n, &o, v), PS_OK);
    assert_int_equal(patch_cell_cost(&fx->tm.m, fx->pairs, &cells[i3], PATCH_DENOISE), 3 * (p->T - 3));
    free(v);
    free(cells);
}

/* Patching resid_pre of block 0 at every position where the prompts differ
 * turns the corrupted run into the clean one: normalized value 1. */
static void test_full_restore(void **state)
{
    fixture *fx = *state;
    const patch_pair *p = &fx->pairs[2]; /* differs only at position 0 */
    patch_cell cell = {.pair = 2, .component = PATCH_RESID_PRE, .layer = 0, .position = 0};
    double v;
    patch_opts o = {.metric = PATCH_LOGIT_DIFF, .direction = PATCH_DENOISE, .engine = PATCH_ENGINE_FAST};
    assert_int_equal(patch_eval(&fx->tm.m, fx->pairs, N_PAIRS, &cell, 1, &o, &v), PS_OK);
    assert_true(fabs(patch_normalize(p, PATCH_LOGIT_DIFF, v) - 1.0) < 1e-4);
    o.direction = PATCH_NOISE;
    assert_int_equal(patch_eval(&fx->tm.m, fx->pairs, N_PAIRS, &cell, 1, &o, &v), PS_OK);
    assert_true(fabs(patch_normalize(p, PATCH_LOGIT_DIFF, v)) < 1e-4);
    /* KL of the clean run against itself is 0 */
    assert_true(fabs(p->clean_metric[PATCH_KL]) < 1e-6);
}

static void test_parse_and_shapes(void **state)
{
    fixture *fx = *state;
    bool on[PATCH_COMPONENT_COUNT];
    assert_int_equal(patch_components_parse("block_every,z", on), PS_OK);
    assert_true(on[PATCH_RESID_PRE] && on[PATCH_ATTN_OUT] && on[PATCH_MLP_OUT] && on[PATCH_Z]);
    assert_false(on[PATCH_RESID_MID]);
    assert_int_equal(patch_components_parse("head_all_pos_every", on), PS_OK);
    assert_true(on[PATCH_PATTERN_ALL_POS] && !on[PATCH_Z]);
    assert_int_equal(patch_components_parse("head_by_pos_every", on), PS_OK);
    assert_true(on[PATCH_Z] && on[PATCH_Q] && on[PATCH_K] && on[PATCH_V] && on[PATCH_PATTERN]);
    assert_false(on[PATCH_PATTERN_DEST_SRC] || on[PATCH_Z_ALL_POS] || on[PATCH_RESID_PRE]);
    assert_int_equal(patch_components_parse("pattern_dest_src", on), PS_OK);
    assert_true(on[PATCH_PATTERN_DEST_SRC] && !on[PATCH_PATTERN]);
    assert_int_equal(patch_components_parse("resid_pre,bogus", on), PS_ERR_INVALID);
    assert_non_null(strstr(err_msg(), "bogus"));
    patch_metric m;
    assert_int_equal(patch_metric_parse("kl", &m), PS_OK);
    assert_int_equal(m, PATCH_KL);
    assert_int_equal(patch_metric_parse("accuracy", &m), PS_ERR_INVALID);
    size_t shape[PATCH_GRID_MAX_DIMS];
    const char *dn[PATCH_GRID_MAX_DIMS];
    assert_int_equal(patch_grid_shape(PATCH_Z, &fx->tm.m.cfg, 9, shape, dn), 3);
    assert_int_equal(shape[0] * shape[1] * shape[2], 3 * 9 * 4);
    assert_int_equal(patch_grid_shape(PATCH_V_ALL_POS, &fx->tm.m.cfg, 9, shape, dn), 2);
    assert_string_equal(dn[1], "head");
    for (int c = PATCH_Q; c <= PATCH_PATTERN; c++) {
        assert_int_equal(patch_grid_shape((patch_component)c, &fx->tm.m.cfg, 9, shape, dn), 3);
        assert_true(shape[0] == 3 && shape[1] == 9 && shape[2] == 4);
        assert_string_equal(dn[1], "position");
        assert_string_equal(dn[2], "head");
    }
    /* (layer, position = destination, src_position, head), row-major */
    assert_int_equal(patch_grid_shape(PATCH_PATTERN_DEST_SRC, &fx->tm.m.cfg, 9, shape, dn), 4);
    assert_true(shape[0] == 3 && shape[1] == 9 && shape[2] == 9 && shape[3] == 4);
    assert_string_equal(dn[2], "src_position");
    assert_string_equal(dn[3], "head");
    assert_int_equal(patch_grid_size(PATCH_PATTERN_DEST_SRC, &fx->tm.m.cfg, 9), 3 * 9 * 9 * 4);
    patch_cell *cells;
    size_t n;
    assert_int_equal(patch_grid_cells(PATCH_PATTERN_DEST_SRC, &fx->tm.m.cfg, 0, 9, &cells, &n), PS_OK);
    assert_int_equal(n, 3 * 9 * 9 * 4);
    const patch_cell *c7 = &cells[((2 * 9 + 5) * 9 + 3) * 4 + 1];
    assert_true(c7->layer == 2 && c7->position == 5 && c7->src_position == 3 && c7->head == 1);
    free(cells);
    patch_cell bad = {.pair = 0, .component = PATCH_RESID_PRE, .layer = 3};
    double v;
    patch_opts o = {0};
    assert_int_equal(patch_eval(&fx->tm.m, fx->pairs, N_PAIRS, &bad, 1, &o, &v), PS_ERR_RANGE);
    patch_cell bad_src = {.pair = 0, .component = PATCH_PATTERN_DEST_SRC, .src_position = (uint16_t)fx->pairs[0].T};
    assert_int_equal(patch_eval(&fx->tm.m, fx->pairs, N_PAIRS, &bad_src, 1, &o, &v), PS_ERR_RANGE);
}

/* A pair sent through its byte image gives the same values, bit for bit. */
static void test_pack_round_trip(void **state)
{
    fixture *fx = *state;
    const patch_pair *p = &fx->pairs[1];
    size_t bytes = patch_pair_packed_bytes(&fx->tm.m.cfg, p->T);
    assert_int_equal(p->clean.core_floats, (bytes - 8 - 8 - 2 * PATCH_METRIC_COUNT * 8 - 2 * p->T * 4 - 64 * 4) / 8);
    void *buf = malloc(bytes);
    patch_pair_pack(p, buf);
    assert_int_equal(patch_pair_packed_T(buf), p->T);
    patch_pair q;
    assert_int_equal(patch_pair_unpack(&q, &fx->tm.m.cfg, buf), PS_OK);
    patch_pair both[2] = {*p, q};
    patch_cell *cells;
    size_t n;
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        assert_int_equal(patch_grid_cells((patch_component)c, &fx->tm.m.cfg, 0, p->T, &cells, &n), PS_OK);
        patch_cell *twice = malloc(2 * n * sizeof *twice);
        memcpy(twice, cells, n * sizeof *cells);
        for (size_t i = 0; i < n; i++)
            twice[n + i] = cells[i], twice[n + i].pair = 1;
        double *v = malloc(2 * n * sizeof *v);
        for (int e = 0; e < 2; e++) {
            patch_opts o = {.metric = PATCH_KL, .direction = PATCH_DENOISE, .engine = (patch_engine)e};
            assert_int_equal(patch_eval(&fx->tm.m, both, 2, twice, 2 * n, &o, v), PS_OK);
            assert_memory_equal(v, v + n, n * sizeof *v);
        }
        free(v);
        free(twice);
        free(cells);
    }
    patch_pair_free(&q);
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fast_equals_naive),
        cmocka_unit_test(test_unchanged_cells),
        cmocka_unit_test(test_several_metrics),
        cmocka_unit_test(test_full_restore),
        cmocka_unit_test(test_parse_and_shapes),
        cmocka_unit_test(test_pack_round_trip),
    };
    return cmocka_run_group_tests_name("patch", tests, setup, teardown);
}
