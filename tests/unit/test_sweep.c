/* sweep's scheduler and distribution (src/engine/sweep_internal.h) over the
 * serial comm the library links (1 rank): every cell and prompt is run
 * exactly once and the results come back in chunk order, bit for bit what
 * patch_eval gives each prompt alone. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../src/engine/sweep_internal.h"
#include "comm.h"
#include "random_model.h"

#define N_PROMPTS 3

typedef struct {
    random_model tm;
    comm *c;
    dataset_tokens tk[N_PROMPTS];
} fixture;

static int32_t *dup_ids(const int32_t *ids, size_t n)
{
    int32_t *p = malloc(n * sizeof *p);
    memcpy(p, ids, n * sizeof *p);
    return p;
}

static int setup(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    random_model_init(&fx->tm, 2, 4, 32, 64, 24);
    if (comm_init(&fx->c, NULL, NULL) != PS_OK)
        return -1;
    static const int32_t c0[] = {63, 5, 17, 3, 9, 42, 8, 17, 11}, r0[] = {63, 5, 17, 3, 9, 42, 8, 3, 11};
    static const int32_t c1[] = {63, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}, r1[] = {63, 1, 2, 30, 4, 5, 6, 7, 8, 9, 40, 11};
    static const int32_t c2[] = {7, 20, 21, 22, 23, 24, 25}, r2[] = {8, 20, 21, 22, 23, 24, 25};
    const int32_t *cl[] = {c0, c1, c2}, *co[] = {r0, r1, r2};
    const size_t T[] = {9, 12, 7};
    for (int i = 0; i < N_PROMPTS; i++)
        fx->tk[i] = (dataset_tokens){.clean_ids = dup_ids(cl[i], T[i]), .corrupted_ids = dup_ids(co[i], T[i]),
                                     .n_tokens = T[i], .answer_id = 17 + i, .wrong_id = 3 + i};
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    fixture *fx = *state;
    for (int i = 0; i < N_PROMPTS; i++)
        dataset_tokens_free(&fx->tk[i]);
    comm_finalize(fx->c);
    random_model_free(&fx->tm);
    free(fx);
    return 0;
}

/* Every item dealt to exactly one rank; longest first to the least loaded. */
static void test_deal(void **state)
{
    (void)state;
    enum { N = 37, RANKS = 4 };
    sweep_cost items[N];
    uint32_t owner[N];
    size_t load[RANKS] = {0}, total = 0, max_cost = 0;
    for (size_t i = 0; i < N; i++) {
        items[i] = (sweep_cost){.cost = 1 + (i * 7919) % 23, .index = i};
        total += items[i].cost;
        max_cost = items[i].cost > max_cost ? items[i].cost : max_cost;
        owner[i] = UINT32_MAX;
    }
    assert_int_equal(sweep_deal(items, N, RANKS, owner), PS_OK);
    /* sorted longest first, equal costs in index order */
    for (size_t i = 1; i < N; i++)
        assert_true(items[i - 1].cost > items[i].cost ||
                    (items[i - 1].cost == items[i].cost && items[i - 1].index < items[i].index));
    for (size_t i = 0; i < N; i++) {
        assert_true(owner[i] < RANKS);
        load[owner[i]] += 1 + (i * 7919) % 23;
    }
    size_t sum = 0;
    for (size_t r = 0; r < RANKS; r++) {
        sum += load[r];
        /* greedy longest-first: no rank above the mean by more than one item */
        assert_true(load[r] <= total / RANKS + max_cost);
    }
    assert_int_equal(sum, total);
    /* the same costs give the same plan */
    uint32_t again[N];
    for (size_t i = 0; i < N; i++)
        items[i] = (sweep_cost){.cost = 1 + (i * 7919) % 23, .index = i};
    assert_int_equal(sweep_deal(items, N, RANKS, again), PS_OK);
    assert_memory_equal(owner, again, sizeof owner);
}

/* Every prompt not done comes out of sweep_plan_next exactly once, in order. */
static void test_plan_next(void **state)
{
    (void)state;
    unsigned char st[11] = {0, 1, 0, 0, 2, 0, 1, 1, 0, 0, 0};
    sweep_plan p = {.n = 11, .state = st};
    size_t next = 0, index[3], got[11], n_got = 0, n;
    while ((n = sweep_plan_next(&p, &next, 3, index)) > 0) {
        assert_true(n <= 3);
        memcpy(got + n_got, index, n * sizeof *index);
        n_got += n;
    }
    const size_t want[] = {0, 2, 3, 5, 8, 9, 10};
    assert_int_equal(n_got, sizeof want / sizeof *want);
    assert_memory_equal(got, want, sizeof want);
}

/* What one prompt alone gives: [clean metric, corrupted metric, cells...]. */
static size_t reference(const fixture *fx, const job *j, const dataset_tokens *tk, double *out)
{
    const model *m = &fx->tm.m;
    patch_pair pair;
    assert_int_equal(patch_pair_init(&pair, m, tk->clean_ids, tk->corrupted_ids, tk->n_tokens, tk->answer_id,
                                     tk->wrong_id),
                     PS_OK);
    size_t w = 0;
    out[w++] = pair.clean_metric[j->metric];
    out[w++] = pair.corrupted_metric[j->metric];
    /* the clean run's SWEEP_TOP_K most likely next tokens, by repeated
     * argmax (ties: the lower id), independent of sweep_top_ids */
    const size_t V = m->cfg.vocab_size;
    for (size_t k = 0; k < SWEEP_TOP_K; k++) {
        size_t best = V;
        for (size_t i = 0; i < V; i++) {
            bool taken = false;
            for (size_t q = 0; q < k && !taken; q++)
                taken = out[w - k + q] == (double)i;
            if (!taken && (best == V || pair.clean_logprobs[i] > pair.clean_logprobs[best]))
                best = i;
        }
        out[w++] = best == V ? -1.0 : (double)best;
    }
    patch_opts po = {.metric = j->metric, .direction = j->direction, .engine = j->engine};
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        if (!j->components[c])
            continue;
        patch_cell *cells;
        size_t n;
        assert_int_equal(patch_grid_cells((patch_component)c, &m->cfg, 0, tk->n_tokens, &cells, &n), PS_OK);
        assert_int_equal(patch_eval(m, &pair, 1, cells, n, &po, out + w), PS_OK);
        w += n;
        free(cells);
    }
    patch_pair_free(&pair);
    return w;
}

static void check_chunk(fixture *fx, job_distribute dist, bool want_by_prompt)
{
    job j = {0};
    j.components[PATCH_RESID_PRE] = j.components[PATCH_ATTN_OUT] = j.components[PATCH_Z_ALL_POS] = true;
    j.metric = PATCH_LOGIT_DIFF;
    j.direction = PATCH_DENOISE;
    j.engine = PATCH_ENGINE_FAST;
    j.distribute = dist;
    const model *m = &fx->tm.m;
    /* out of dataset order: results must follow the chunk's order */
    const size_t index[N_PROMPTS] = {2, 0, 1};
    dataset_tokens chunk[N_PROMPTS]; /* the chunk's tokens, in its order (shallow copies) */
    for (size_t k = 0; k < N_PROMPTS; k++)
        chunk[k] = fx->tk[index[k]];
    sweep_chunk ch;
    assert_int_equal(sweep_dist_chunk(&j, m, fx->c, chunk, N_PROMPTS, 64, 512, &ch), PS_OK);
    assert_int_equal(ch.n_pairs, N_PROMPTS);
    assert_int_equal(ch.by_prompt, want_by_prompt);
    size_t cells = 0, off = 0;
    double want[4096];
    for (size_t k = 0; k < N_PROMPTS; k++) {
        const dataset_tokens *tk = &fx->tk[index[k]];
        const size_t nv = sweep_prompt_cells(j.components, &m->cfg, tk->n_tokens);
        const size_t n_rec = sweep_prompt_values(&j, &m->cfg, tk->n_tokens); /* one metric: 2 + top ids + cells */
        assert_int_equal(n_rec, 2 + SWEEP_TOP_K + nv);
        assert_int_equal(reference(fx, &j, tk, want), n_rec);
        /* bit for bit, in order: the metrics, the clean top ids, every cell exactly once */
        assert_memory_equal(ch.values + off, want, n_rec * sizeof *want);
        off += n_rec;
        cells += nv;
    }
    assert_int_equal(ch.n_cells, cells);
    sweep_chunk_free(&ch);
    /* an empty chunk ends the loop */
    assert_int_equal(sweep_dist_chunk(&j, m, fx->c, chunk, 0, 64, 512, &ch), PS_OK);
    assert_int_equal(ch.n_pairs, 0);
    assert_null(ch.values);
}

static void test_chunk_by_cell(void **state) { check_chunk(*state, JOB_DISTRIBUTE_CELLS, false); }
static void test_chunk_by_prompt(void **state) { check_chunk(*state, JOB_DISTRIBUTE_PROMPTS, true); }

static void test_auto(void **state)
{
    (void)state;
    job j = {0};
    j.distribute = JOB_DISTRIBUTE_AUTO;
    assert_false(sweep_dist_by_prompt(&j, 3, 8, 1));  /* fits, < 4 a rank */
    assert_true(sweep_dist_by_prompt(&j, 9, 8, 4));   /* over the budget */
    assert_true(sweep_dist_by_prompt(&j, 8, 8, 2));   /* 4 a rank */
    assert_false(sweep_dist_by_prompt(&j, 7, 8, 2));
    j.distribute = JOB_DISTRIBUTE_CELLS;
    assert_false(sweep_dist_by_prompt(&j, 100, 8, 1));
    j.distribute = JOB_DISTRIBUTE_PROMPTS;
    assert_true(sweep_dist_by_prompt(&j, 1, 8, 1));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_deal),          cmocka_unit_test(test_plan_next),
        cmocka_unit_test(test_chunk_by_cell), cmocka_unit_test(test_chunk_by_prompt),
        cmocka_unit_test(test_auto),
    };
    return cmocka_run_group_tests_name("sweep", tests, setup, teardown);
}
