/* Unit tests of the logit lens, the residual decomposition and the direct
 * logit attribution on an in-memory random GPT-2: decodings against a
 * double-precision reference and against the forward pass's own logits,
 * ranks as counts, top-k against a full sort, attribution parts summing to
 * the total, and the decomposition's identities.  Exactness against PyTorch
 * is tests/integration/test_lens_oracle.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lens.h"
#include "random_model.h"

enum { L = 3, H = 4, D = 32, V = 64, NPOS = 24 };
static const int32_t toks[] = {5, 17, 3, 60, 42, 8, 61, 0, 33, 17, 12};
#define NT (sizeof toks / sizeof toks[0])

typedef struct {
    random_model tm;
    forward_cache c;   /* every row's logits */
} fixture;

static int setup(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    random_model_init(&fx->tm, L, H, D, V, NPOS);
    if (forward_cache_init(&fx->c, &fx->tm.m.cfg, NT, FORWARD_LOGITS_ALL) != PS_OK ||
        forward_run(&fx->tm.m, &fx->c, toks, NT, NULL) != PS_OK)
        return -1;
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    fixture *fx = *state;
    forward_cache_free(&fx->c);
    random_model_free(&fx->tm);
    free(fx);
    return 0;
}

/* logits[v] = sum_i ln_f(x)_i W_U[v, i], all in double. */
static void decode_ref(const model *m, const float *x, double *logits)
{
    double mean = 0, var = 0, y[D];
    for (int i = 0; i < D; i++)
        mean += x[i];
    mean /= D;
    for (int i = 0; i < D; i++)
        var += (x[i] - mean) * (x[i] - mean);
    var /= D;
    for (int i = 0; i < D; i++)
        y[i] = (x[i] - mean) / sqrt(var + m->cfg.ln_eps) * m->ln_f_w[i] + m->ln_f_b[i];
    for (int v = 0; v < V; v++) {
        logits[v] = 0;
        for (int i = 0; i < D; i++)
            logits[v] += y[i] * m->unembed[v * D + i];
    }
}

/* Every row at every position against the double reference; the last row
 * against the forward pass's own logits. */
static void test_decode_matches_reference_and_forward(void **state)
{
    fixture *fx = *state;
    const model *m = &fx->tm.m;
    lens_view v;
    assert_int_equal(lens_view_init(&v, &m->cfg, lens_n_rows(&m->cfg), 5), PS_OK);
    for (size_t p = 0; p < NT; p++) {
        assert_int_equal(lens_run(&v, m, &fx->c, p, 7), PS_OK);
        for (size_t r = 0; r < L + 1; r++) {
            double ref[V];
            decode_ref(m, v.rows + r * D, ref);
            for (int i = 0; i < V; i++)
                assert_true(fabs(v.logits[r * V + i] - ref[i]) < 1e-4 * fmax(1, fabs(ref[i])));
        }
        /* row 0 is the embedding output, computed as hook_embed + hook_pos_embed */
        for (int i = 0; i < D; i++)
            assert_true(v.rows[i] == fx->c.embed[p * D + i] + fx->c.pos_embed[p * D + i]);
        const float *fwd = fx->c.logits + p * V, *last = v.logits + L * V;
        for (int i = 0; i < V; i++)
            assert_true(fabs(last[i] - fwd[i]) <= 1e-5 * fmax(1, fabs(fwd[i])));
        /* the forward pass's ln_final is the same kernel on the same row: bit for bit */
        assert_memory_equal(v.normed + L * D, fx->c.ln_final + p * D, D * sizeof(float));
    }
    lens_view_free(&v);
}

static void test_rank_counts_strictly_greater(void **state)
{
    (void)state;
    const float l[] = {1, 3, 3, 2, 3, 0, -1};
    const size_t n = sizeof l / sizeof l[0];
    const double lse = forward_logsumexp(l, n);
    lens_answer a;
    lens_answer_stats(l, n, lse, 1, &a);
    assert_int_equal(a.rank, 0); /* equal logits do not push the answer down */
    lens_answer_stats(l, n, lse, 4, &a);
    assert_int_equal(a.rank, 0);
    lens_answer_stats(l, n, lse, 3, &a);
    assert_int_equal(a.rank, 3);
    assert_true(fabs(a.reciprocal_rank - 0.25) < 1e-15);
    lens_answer_stats(l, n, lse, 6, &a);
    assert_int_equal(a.rank, 6);
    double z = 0;
    for (size_t i = 0; i < n; i++)
        z += exp(l[i]);
    assert_true(fabs(a.prob - exp(-1.0) / z) < 1e-12);
    assert_true(fabs(a.logprob - log(exp(-1.0) / z)) < 1e-12);
    assert_true(a.logit == -1.0f);
}

/* On decoded rows: the rank is the brute-force count, probabilities sum to 1. */
static void test_answer_stats_on_rows(void **state)
{
    fixture *fx = *state;
    const model *m = &fx->tm.m;
    lens_view v;
    assert_int_equal(lens_view_init(&v, &m->cfg, lens_n_rows(&m->cfg), 3), PS_OK);
    for (int32_t ans = 0; ans < V; ans += 9) {
        assert_int_equal(lens_run(&v, m, &fx->c, NT - 1, ans), PS_OK);
        for (size_t r = 0; r < L + 1; r++) {
            const float *l = v.logits + r * V;
            size_t greater = 0;
            double psum = 0;
            for (int i = 0; i < V; i++) {
                greater += l[i] > l[ans];
                psum += exp(l[i] - v.lse[r]);
            }
            assert_int_equal(v.ans[r].rank, greater);
            assert_true(fabs(psum - 1) < 1e-12);
            assert_true(fabs(v.ans[r].prob - exp(l[ans] - v.lse[r])) < 1e-15);
            assert_true(fabs(v.ans[r].reciprocal_rank - 1.0 / (greater + 1)) < 1e-15);
        }
    }
    lens_view_free(&v);
}

static const float *sort_logits;

/* Logit descending, equal logits by lower id. */
static int cmp_rank(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (sort_logits[x] != sort_logits[y])
        return sort_logits[x] > sort_logits[y] ? -1 : 1;
    return x < y ? -1 : 1;
}

static void check_top_k(const float *l, size_t n, size_t k)
{
    int32_t *all = malloc(n * sizeof *all), *top = malloc(k * sizeof *top);
    for (size_t i = 0; i < n; i++)
        all[i] = (int32_t)i;
    sort_logits = l;
    qsort(all, n, sizeof *all, cmp_rank);
    lens_top_k(l, n, k, top);
    assert_memory_equal(top, all, k * sizeof *top);
    free(all);
    free(top);
}

static void test_top_k_equals_full_sort(void **state)
{
    fixture *fx = *state;
    const size_t ks[] = {1, 2, 5, 17, V - 1, V};
    for (size_t i = 0; i < sizeof ks / sizeof ks[0]; i++)
        check_top_k(fx->c.logits + 3 * V, V, ks[i]);
    /* ties everywhere: many equal logits, order by id */
    float tied[40];
    for (int i = 0; i < 40; i++)
        tied[i] = (float)((i * 7) % 5);
    for (size_t k = 1; k <= 40; k += 3)
        check_top_k(tied, 40, k);
    /* the view's top-k probabilities are descending and match the logits */
    lens_view v;
    assert_int_equal(lens_view_init(&v, &fx->tm.m.cfg, lens_n_rows(&fx->tm.m.cfg), 8), PS_OK);
    assert_int_equal(lens_run(&v, &fx->tm.m, &fx->c, 4, LENS_NO_TOKEN), PS_OK);
    for (size_t r = 0; r < v.n_rows; r++)
        for (size_t j = 0; j < v.k; j++) {
            int32_t id = v.top_id[r * v.k + j];
            assert_true(fabs(v.top_prob[r * v.k + j] - exp(v.logits[r * V + id] - v.lse[r])) < 1e-15);
            if (j > 0)
                assert_true(v.top_prob[r * v.k + j] <= v.top_prob[r * v.k + j - 1]);
        }
    lens_view_free(&v);
}

static void test_labels_and_hooks(void **state)
{
    (void)state;
    char buf[LENS_MAX_LABEL], name[HOOK_MAX_NAME];
    lens_row_label(0, buf);
    assert_string_equal(buf, "embed");
    lens_row_label(3, buf);
    assert_string_equal(buf, "2");
    hook_name(lens_row_hook(0), name);
    assert_string_equal(name, "blocks.0.hook_resid_pre");
    hook_name(lens_row_hook(2), name);
    assert_string_equal(name, "blocks.1.hook_resid_post");
    const char *want[] = {"embed", "pos_embed", "0_attn_out", "0_mlp_out", "1_attn_out",
                          "1_mlp_out", "2_attn_out", "2_mlp_out", "ln_final.b"};
    assert_int_equal(lens_attribution_count(L), 9);
    for (size_t i = 0; i < 9; i++) {
        lens_attribution_label(i, L, buf);
        assert_string_equal(buf, want[i]);
    }
    lens_component c;
    assert_int_equal(lens_component_parse("attn_out", &c), PS_OK);
    assert_int_equal(c, LENS_ATTN_OUT);
    assert_int_equal(lens_component_parse("mlp_out", &c), PS_OK);
    assert_int_equal(c, LENS_MLP_OUT);
    assert_int_equal(lens_component_parse("resid_mid", &c), PS_ERR_INVALID);
    assert_non_null(strstr(err_msg(), "resid_mid"));
    hook_name(lens_component_hook(LENS_MLP_OUT, 2), name);
    assert_string_equal(name, "blocks.2.hook_mlp_out");
}

static double max_diff(const float *a, const float *b, size_t n)
{
    double mx = 0;
    for (size_t i = 0; i < n; i++)
        mx = fmax(mx, fabs((double)a[i] - b[i]));
    return mx;
}

/* Subtracting mlp_out leaves resid_mid; subtracting attn_out leaves
 * resid_pre + mlp_out; subtracting a zero update changes nothing. */
static void test_decompose_identities(void **state)
{
    fixture *fx = *state;
    const model *m = &fx->tm.m;
    lens_view v, ref;
    assert_int_equal(lens_view_init(&v, &m->cfg, 2, 4), PS_OK);
    assert_int_equal(lens_view_init(&ref, &m->cfg, 1, 4), PS_OK);
    for (size_t layer = 0; layer < L; layer++) {
        const size_t p = (layer * 4 + 2) % NT, o = p * D;
        const forward_layer *ly = &fx->c.layers[layer];
        assert_int_equal(lens_decompose(&v, m, &fx->c, layer, LENS_MLP_OUT, p, 11), PS_OK);
        assert_memory_equal(v.rows, ly->resid_post + o, D * sizeof(float));
        assert_true(max_diff(v.rows + D, ly->resid_mid + o, D) < 1e-5);
        memcpy(ref.rows, ly->resid_mid + o, D * sizeof(float));
        assert_int_equal(lens_view_decode(&ref, m, 11), PS_OK);
        assert_true(max_diff(v.logits + V, ref.logits, V) < 1e-4);
        assert_true(fabs(v.ans[1].prob - ref.ans[0].prob) < 1e-6);

        assert_int_equal(lens_decompose(&v, m, &fx->c, layer, LENS_ATTN_OUT, p, 11), PS_OK);
        for (int i = 0; i < D; i++)
            ref.rows[i] = ly->resid_pre[o + i] + ly->mlp_out[o + i];
        assert_true(max_diff(v.rows + D, ref.rows, D) < 1e-5);

        /* as is == the lens row of the same block */
        lens_view lv;
        assert_int_equal(lens_view_init(&lv, &m->cfg, lens_n_rows(&m->cfg), 4), PS_OK);
        assert_int_equal(lens_run(&lv, m, &fx->c, p, 11), PS_OK);
        assert_memory_equal(v.rows, lv.rows + (layer + 1) * D, D * sizeof(float));
        assert_true(fabs(v.ans[0].prob - lv.ans[layer + 1].prob) < 1e-7);
        assert_int_equal(v.ans[0].rank, lv.ans[layer + 1].rank);
        lens_view_free(&lv);
    }
    /* a zero update: both rows, logits and statistics identical bit for bit */
    forward_cache z;
    assert_int_equal(forward_cache_init(&z, &m->cfg, NT, FORWARD_LOGITS_ALL), PS_OK);
    forward_cache_copy(&z, &fx->c);
    memset(z.layers[1].mlp_out + 5 * D, 0, D * sizeof(float));
    assert_int_equal(lens_decompose(&v, m, &z, 1, LENS_MLP_OUT, 5, 2), PS_OK);
    assert_memory_equal(v.rows, v.rows + D, D * sizeof(float));
    assert_memory_equal(v.logits, v.logits + V, V * sizeof(float));
    assert_memory_equal(v.top_id, v.top_id + v.k, v.k * sizeof(int32_t));
    assert_true(v.ans[0].prob == v.ans[1].prob && v.ans[0].rank == v.ans[1].rank);
    forward_cache_free(&z);
    lens_view_free(&v);
    lens_view_free(&ref);
}

/* The parts sum to the total, the total is the forward's logit difference,
 * and each part is its component's centred projection (checked for embed
 * + pos_embed against blocks.0.hook_resid_pre, a sum the forward pass made). */
static void test_attribution_sums_to_total(void **state)
{
    fixture *fx = *state;
    const model *m = &fx->tm.m;
    for (size_t p = 0; p < NT; p += 2) {
        const int32_t a = (int32_t)(p * 5 % V), w = (int32_t)((p * 5 + 17) % V);
        lens_attribution at;
        assert_int_equal(lens_attribute(&at, m, &fx->c, p, a, w), PS_OK);
        assert_int_equal(at.n_parts, 3 + 2 * L);
        double s = 0;
        for (size_t i = 0; i < at.n_parts; i++)
            s += at.value[i];
        assert_true(fabs(s - at.sum) < 1e-12);
        const double fwd = (double)fx->c.logits[p * V + a] - fx->c.logits[p * V + w];
        assert_true(fabs(at.total - fwd) < 1e-4 * fmax(1, fabs(fwd)));
        assert_true(fabs(at.sum - at.total) < 1e-4 * fmax(1, fabs(fwd)));
        /* bias part = ln_f.b . (W_U[a] - W_U[w]) */
        double b = 0, g_embed = 0, mean = 0;
        for (int i = 0; i < D; i++)
            b += (double)m->ln_f_b[i] * ((double)m->unembed[a * D + i] - m->unembed[w * D + i]);
        assert_true(fabs(at.value[at.n_parts - 1] - b) < 1e-12);
        const float *r0 = fx->c.layers[0].resid_pre + p * D;
        for (int i = 0; i < D; i++)
            mean += r0[i];
        mean /= D;
        for (int i = 0; i < D; i++)
            g_embed += (r0[i] - mean) * m->ln_f_w[i] * ((double)m->unembed[a * D + i] - m->unembed[w * D + i]);
        assert_true(fabs(at.value[0] + at.value[1] - g_embed / at.scale) < 1e-5);
        lens_attribution_free(&at);

        /* without a wrong token: the answer's own logit */
        assert_int_equal(lens_attribute(&at, m, &fx->c, p, a, LENS_NO_TOKEN), PS_OK);
        const double la = fx->c.logits[p * V + a];
        assert_true(fabs(at.total - la) < 1e-4 * fmax(1, fabs(la)));
        assert_true(fabs(at.sum - at.total) < 1e-4 * fmax(1, fabs(la)));
        lens_attribution_free(&at);
    }
}

static void test_errors(void **state)
{
    fixture *fx = *state;
    const model *m = &fx->tm.m;
    lens_view v, two;
    assert_int_equal(lens_view_init(&v, &m->cfg, 1, 0), PS_ERR_RANGE);
    assert_int_equal(lens_view_init(&v, &m->cfg, 1, V + 1), PS_ERR_RANGE);
    assert_int_equal(lens_view_init(&v, &m->cfg, lens_n_rows(&m->cfg), 3), PS_OK);
    assert_int_equal(lens_view_init(&two, &m->cfg, 2, 3), PS_OK);
    assert_int_equal(lens_run(&v, m, &fx->c, NT, 1), PS_ERR_RANGE);
    assert_non_null(strstr(err_msg(), "position"));
    assert_int_equal(lens_run(&v, m, &fx->c, 0, V), PS_ERR_RANGE);
    assert_int_equal(lens_run(&two, m, &fx->c, 0, 1), PS_ERR_INVALID);
    assert_int_equal(lens_decompose(&two, m, &fx->c, L, LENS_MLP_OUT, 0, 1), PS_ERR_RANGE);
    assert_non_null(strstr(err_msg(), "layer 3"));
    assert_int_equal(lens_decompose(&two, m, &fx->c, 0, LENS_MLP_OUT, NT, 1), PS_ERR_RANGE);
    assert_int_equal(lens_decompose(&v, m, &fx->c, 0, LENS_MLP_OUT, 0, 1), PS_ERR_INVALID);
    lens_attribution at;
    assert_int_equal(lens_attribute(&at, m, &fx->c, NT, 1, 2), PS_ERR_RANGE);
    assert_int_equal(lens_attribute(&at, m, &fx->c, 0, -2, 2), PS_ERR_RANGE);
    assert_int_equal(lens_attribute(&at, m, &fx->c, 0, 1, V), PS_ERR_RANGE);
    lens_attribution_free(&at);
    lens_view_free(&v);
    lens_view_free(&two);
}

/* One view reused over runs of different lengths gives what a fresh view gives. */
static void test_view_reuse(void **state)
{
    fixture *fx = *state;
    const model *m = &fx->tm.m;
    forward_cache c;
    assert_int_equal(forward_cache_init(&c, &m->cfg, NT, FORWARD_LOGITS_NONE), PS_OK);
    lens_view reused, fresh;
    assert_int_equal(lens_view_init(&reused, &m->cfg, lens_n_rows(&m->cfg), 6), PS_OK);
    static const size_t lengths[] = {NT, 8, 5, 2, 1};
    for (size_t li = 0; li < sizeof lengths / sizeof lengths[0]; li++) {
        const size_t T = lengths[li];
        assert_int_equal(forward_run(m, &c, toks + (NT - T), T, NULL), PS_OK);
        assert_int_equal(lens_run(&reused, m, &c, T - 1, 9), PS_OK);
        assert_int_equal(lens_view_init(&fresh, &m->cfg, lens_n_rows(&m->cfg), 6), PS_OK);
        assert_int_equal(lens_run(&fresh, m, &c, T - 1, 9), PS_OK);
        assert_memory_equal(reused.logits, fresh.logits, reused.n_rows * V * sizeof(float));
        assert_memory_equal(reused.top_id, fresh.top_id, reused.n_rows * 6 * sizeof(int32_t));
        lens_view_free(&fresh);
    }
    lens_view_free(&reused);
    forward_cache_free(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decode_matches_reference_and_forward),
        cmocka_unit_test(test_rank_counts_strictly_greater),
        cmocka_unit_test(test_answer_stats_on_rows),
        cmocka_unit_test(test_top_k_equals_full_sort),
        cmocka_unit_test(test_labels_and_hooks),
        cmocka_unit_test(test_decompose_identities),
        cmocka_unit_test(test_attribution_sums_to_total),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_view_reuse),
    };
    return cmocka_run_group_tests_name("lens", tests, setup, teardown);
}
