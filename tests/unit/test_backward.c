/* Unit tests of backward_run_opts (backward.h), what attribution patching
 * runs: on a random GPT-2 in memory, from a cache trimmed to its core (the
 * MLP pre-activations rebuilt) and for rows >= row0 only, every gradient of
 * rows >= row0 equals the full pass's bit for bit and every earlier row is
 * 0; GradDrop of a block zeroes that block's gradients, passes d resid_post
 * to d resid_pre unchanged, and leaves the later blocks' gradients as they
 * were.  Per-node input gradients (backward_node_input_grads): the
 * residual stream is a sum, so the gradient of resid_pre of block l is the
 * sum of the input gradients of every node that reads it (the q, k, v
 * inputs and MLP inputs of blocks >= l, the logits), and resid_mid's the
 * same without block l's heads; a trimmed cache with row0 gives the full
 * run's rows >= row0 bit for bit. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "backward.h"
#include "forward.h"
#include "random_model.h"

enum { L = 3, H = 4, D = 32, V = 64, NPOS = 24, T = 11 };
static const int32_t tokens[T] = {63, 5, 17, 3, 9, 42, 8, 17, 11, 2, 30};

/* rows [0, T) of width w: rows < row0 all 0, rows >= row0 equal to full's */
static void rows_match(const float *got, const float *full, size_t w, size_t row0, const char *what)
{
    for (size_t r = 0; r < T; r++)
        for (size_t e = 0; e < w; e++) {
            const float g = got[r * w + e], f = r < row0 ? 0.0f : full[r * w + e];
            if (memcmp(&g, &f, sizeof g) != 0)
                fail_msg("%s row %zu (row0 %zu) element %zu: %.9g, want %.9g", what, r, row0, e, g, f);
        }
}

static void layer_matches(const forward_layer *g, const forward_layer *f, size_t row0)
{
    rows_match(g->resid_pre, f->resid_pre, D, row0, "resid_pre");
    rows_match(g->resid_mid, f->resid_mid, D, row0, "resid_mid");
    rows_match(g->attn_out, f->attn_out, D, row0, "attn_out");
    rows_match(g->mlp_out, f->mlp_out, D, row0, "mlp_out");
    rows_match(g->ln1, f->ln1, D, row0, "ln1");
    rows_match(g->ln2, f->ln2, D, row0, "ln2");
    rows_match(g->q, f->q, D, row0, "q");
    rows_match(g->k, f->k, D, row0, "k");
    rows_match(g->v, f->v, D, row0, "v");
    rows_match(g->z, f->z, D, row0, "z");
    rows_match(g->mlp_pre, f->mlp_pre, 4 * D, row0, "mlp_pre");
    rows_match(g->mlp_post, f->mlp_post, 4 * D, row0, "mlp_post");
    for (size_t h = 0; h < H; h++) /* pattern [H, T, T]: query rows >= row0 */
        rows_match(g->pattern + h * T * T, f->pattern + h * T * T, T, row0, "pattern");
}

static void test_rows_and_trimmed_equal_full(void **state)
{
    (void)state;
    random_model tm;
    random_model_init(&tm, L, H, D, V, NPOS);
    forward_cache c, trimmed, full, g;
    assert_int_equal(forward_cache_init(&c, &tm.m.cfg, T, FORWARD_LOGITS_LAST), PS_OK);
    assert_int_equal(forward_cache_init(&trimmed, &tm.m.cfg, T, FORWARD_LOGITS_LAST), PS_OK);
    assert_int_equal(forward_cache_init(&full, &tm.m.cfg, T, FORWARD_LOGITS_NONE), PS_OK);
    assert_int_equal(forward_cache_init(&g, &tm.m.cfg, T, FORWARD_LOGITS_NONE), PS_OK);
    assert_int_equal(forward_run(&tm.m, &c, tokens, T, NULL), PS_OK);
    assert_int_equal(forward_run(&tm.m, &trimmed, tokens, T, NULL), PS_OK);
    forward_cache_trim(&trimmed);
    assert_true(trimmed.trimmed);
    for (int metric = 0; metric < 2; metric++) { /* logit_diff, prob (through the vocabulary) */
        const patch_metric pm = metric ? PATCH_PROB : PATCH_LOGIT_DIFF;
        assert_int_equal(backward_run(&tm.m, &c, &full, pm, 17, 3, NULL), PS_OK);
        const size_t rows0[] = {0, 4, T - 1};
        for (size_t k = 0; k < 3; k++) {
            const backward_opts o = {rows0[k], BACKWARD_NO_DROP};
            assert_int_equal(backward_run_opts(&tm.m, &trimmed, &g, &o, pm, 17, 3, NULL), PS_OK);
            for (size_t l = 0; l < L; l++)
                layer_matches(&g.layers[l], &full.layers[l], rows0[k]);
            rows_match(g.embed, full.embed, D, rows0[k], "embed");
        }
    }
    const backward_opts bad = {T, BACKWARD_NO_DROP};
    assert_int_equal(backward_run_opts(&tm.m, &trimmed, &g, &bad, PATCH_LOGIT_DIFF, 17, 3, NULL), PS_ERR_RANGE);
    forward_cache_free(&c), forward_cache_free(&trimmed), forward_cache_free(&full), forward_cache_free(&g);
    random_model_free(&tm);
}

static void test_graddrop(void **state)
{
    (void)state;
    random_model tm;
    random_model_init(&tm, L, H, D, V, NPOS);
    forward_cache c, full, g;
    assert_int_equal(forward_cache_init(&c, &tm.m.cfg, T, FORWARD_LOGITS_LAST), PS_OK);
    assert_int_equal(forward_cache_init(&full, &tm.m.cfg, T, FORWARD_LOGITS_NONE), PS_OK);
    assert_int_equal(forward_cache_init(&g, &tm.m.cfg, T, FORWARD_LOGITS_NONE), PS_OK);
    assert_int_equal(forward_run(&tm.m, &c, tokens, T, NULL), PS_OK);
    assert_int_equal(backward_run(&tm.m, &c, &full, PATCH_LOGIT_DIFF, 17, 3, NULL), PS_OK);
    const size_t drop = 1;
    const backward_opts o = {0, drop};
    assert_int_equal(backward_run_opts(&tm.m, &c, &g, &o, PATCH_LOGIT_DIFF, 17, 3, NULL), PS_OK);
    layer_matches(&g.layers[2], &full.layers[2], 0);              /* after the dropped block: unchanged */
    rows_match(g.layers[1].attn_out, full.layers[1].attn_out, D, T, "dropped attn_out"); /* all 0 */
    rows_match(g.layers[1].mlp_out, full.layers[1].mlp_out, D, T, "dropped mlp_out");
    rows_match(g.layers[1].z, full.layers[1].z, D, T, "dropped z");
    assert_memory_equal(g.layers[1].resid_pre, g.layers[1].resid_post, T * D * sizeof(float));
    bool differs = false; /* before it: another gradient (the block's paths are gone) */
    for (size_t i = 0; i < T * D && !differs; i++)
        differs = g.layers[0].mlp_out[i] != full.layers[0].mlp_out[i];
    assert_true(differs);
    forward_cache_free(&c), forward_cache_free(&full), forward_cache_free(&g);
    random_model_free(&tm);
}

/* max |a - b| over n floats relative to max |b| */
static double rel_err(const double *a, const float *b, size_t n)
{
    double e = 0.0, s = 0.0;
    for (size_t i = 0; i < n; i++) {
        e = fmax(e, fabs(a[i] - b[i]));
        s = fmax(s, fabs((double)b[i]));
    }
    return s > 0 ? e / s : e;
}

static void test_node_input_grads(void **state)
{
    (void)state;
    random_model tm;
    random_model_init(&tm, L, H, D, V, NPOS);
    const model_config *cfg = &tm.m.cfg;
    forward_cache c, trimmed, g, gt;
    assert_int_equal(forward_cache_init(&c, cfg, T, FORWARD_LOGITS_LAST), PS_OK);
    assert_int_equal(forward_cache_init(&trimmed, cfg, T, FORWARD_LOGITS_LAST), PS_OK);
    assert_int_equal(forward_cache_init(&g, cfg, T, FORWARD_LOGITS_NONE), PS_OK);
    assert_int_equal(forward_cache_init(&gt, cfg, T, FORWARD_LOGITS_NONE), PS_OK);
    assert_int_equal(forward_run(&tm.m, &c, tokens, T, NULL), PS_OK);
    assert_int_equal(forward_run(&tm.m, &trimmed, tokens, T, NULL), PS_OK);
    forward_cache_trim(&trimmed);
    assert_int_equal(backward_run(&tm.m, &c, &g, PATCH_PROB, 17, 3, NULL), PS_OK);
    const size_t R = backward_node_count(cfg, 0), row0 = 4;
    assert_int_equal(R, 3 * H + 1);
    assert_int_equal(backward_node_count(cfg, L), 1);
    float *nodes = malloc((L + 1) * R * T * D * sizeof *nodes), *part = malloc(R * T * D * sizeof *part);
    double *sum = calloc(T * D, sizeof *sum);
    assert_non_null(nodes), assert_non_null(part), assert_non_null(sum);
    for (size_t l = 0; l <= L; l++)
        assert_int_equal(backward_node_input_grads(&tm.m, &c, &g, l, 0, nodes + l * R * T * D), PS_OK);
    /* from the last readers back: after block l's MLP input, resid_mid of l; after its heads, resid_pre of l */
    for (size_t i = 0; i < T * D; i++)
        sum[i] = nodes[L * R * T * D + i];
    for (size_t l = L; l-- > 0;) {
        const float *blk = nodes + l * R * T * D;
        for (size_t i = 0; i < T * D; i++)
            sum[i] += blk[(R - 1) * T * D + i];
        const double e_mid = rel_err(sum, g.layers[l].resid_mid, T * D);
        if (e_mid > 1e-5)
            fail_msg("block %zu: sum of the node gradients after resid_mid is %.2g off its gradient", l, e_mid);
        for (size_t j = 0; j + 1 < R; j++)
            for (size_t i = 0; i < T * D; i++)
                sum[i] += blk[j * T * D + i];
        const double e_pre = rel_err(sum, g.layers[l].resid_pre, T * D);
        if (e_pre > 1e-5)
            fail_msg("block %zu: sum of the node gradients after resid_pre is %.2g off its gradient", l, e_pre);
    }
    /* trimmed, rows >= row0: the same bits */
    const backward_opts o = {row0, BACKWARD_NO_DROP};
    assert_int_equal(backward_run_opts(&tm.m, &trimmed, &gt, &o, PATCH_PROB, 17, 3, NULL), PS_OK);
    const size_t n = T - row0;
    for (size_t l = 0; l <= L; l++) {
        const size_t cnt = backward_node_count(cfg, l);
        assert_int_equal(backward_node_input_grads(&tm.m, &trimmed, &gt, l, row0, part), PS_OK);
        for (size_t j = 0; j < cnt; j++)
            assert_memory_equal(part + j * n * D, nodes + (l * R + j) * T * D + row0 * D, n * D * sizeof(float));
    }
    assert_int_equal(backward_node_input_grads(&tm.m, &c, &g, L + 1, 0, part), PS_ERR_INVALID);
    assert_int_equal(backward_node_input_grads(&tm.m, &c, &g, 0, T, part), PS_ERR_INVALID);
    free(nodes), free(part), free(sum);
    forward_cache_free(&c), forward_cache_free(&trimmed), forward_cache_free(&g), forward_cache_free(&gt);
    random_model_free(&tm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rows_and_trimmed_equal_full),
        cmocka_unit_test(test_graddrop),
        cmocka_unit_test(test_node_input_grads),
    };
    return cmocka_run_group_tests_name("backward", tests, NULL, NULL);
}
