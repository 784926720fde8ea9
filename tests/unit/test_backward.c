/* Unit tests of backward_run_opts (backward.h), what attribution patching
 * runs: on a random GPT-2 in memory, from a cache trimmed to its core (the
 * MLP pre-activations rebuilt) and for rows >= row0 only, every gradient of
 * rows >= row0 equals the full pass's bit for bit and every earlier row is
 * 0; GradDrop of a block zeroes that block's gradients, passes d resid_post
 * to d resid_pre unchanged, and leaves the later blocks' gradients as they
 * were. */
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rows_and_trimmed_equal_full),
        cmocka_unit_test(test_graddrop),
    };
    return cmocka_run_group_tests_name("backward", tests, NULL, NULL);
}
