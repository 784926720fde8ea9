/* Unit tests of the forward pass on an in-memory random GPT-2: gelu against
 * its double-precision formula (the other kernels: test_ops.c), causality, hooks that observe and
 * overwrite, and suffix runs (forward_run_from) against full runs.  Exactness
 * against PyTorch is tests/integration/test_forward_oracle.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "forward.h"
#include "gemm.h"
#include "random_model.h"

static double max_abs_diff(const float *a, const float *b, size_t n)
{
    double mx = 0;
    for (size_t i = 0; i < n; i++)
        mx = fmax(mx, fabs((double)a[i] - b[i]));
    return mx;
}

static void test_gelu_values(void **state)
{
    (void)state;
    float x[] = {-3.0f, -1.0f, 0.0f, 0.5f, 2.0f};
    float y[5];
    memcpy(y, x, sizeof x);
    gemm_gelu(y, 5);
    for (int i = 0; i < 5; i++) {
        double v = x[i];
        double ref = 0.5 * v * (1 + tanh(sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
        assert_true(fabs(y[i] - ref) < 1e-6);
    }
}

static const int32_t toks[] = {5, 17, 3, 99, 42, 8, 61, 0, 77};
#define NT (sizeof toks / sizeof toks[0])

static void test_pattern_causal_and_normalized(void **state)
{
    (void)state;
    random_model tm;
    random_model_init(&tm, 2, 3, 24, 100, 16);
    forward_cache c;
    assert_int_equal(forward_cache_init(&c, &tm.m.cfg, NT, FORWARD_LOGITS_ALL), PS_OK);
    assert_int_equal(forward_run(&tm.m, &c, toks, NT, NULL), PS_OK);
    for (size_t l = 0; l < 2; l++)
        for (size_t h = 0; h < 3; h++)
            for (size_t i = 0; i < NT; i++) {
                double s = 0;
                for (size_t j = 0; j < NT; j++) {
                    float p = c.layers[l].pattern[(h * NT + i) * NT + j];
                    if (j > i)
                        assert_true(p == 0.0f);
                    s += p;
                }
                assert_true(fabs(s - 1.0) < 1e-5);
            }
    forward_cache_free(&c);
    random_model_free(&tm);
}

/* Causality: the activations of a prefix do not depend on later tokens. */
static void test_prefix_independence(void **state)
{
    (void)state;
    random_model tm;
    random_model_init(&tm, 2, 2, 16, 100, 16);
    forward_cache a, b;
    assert_int_equal(forward_cache_init(&a, &tm.m.cfg, NT, FORWARD_LOGITS_ALL), PS_OK);
    assert_int_equal(forward_cache_init(&b, &tm.m.cfg, NT, FORWARD_LOGITS_ALL), PS_OK);
    assert_int_equal(forward_run(&tm.m, &a, toks, NT, NULL), PS_OK);
    assert_int_equal(forward_run(&tm.m, &b, toks, 4, NULL), PS_OK);
    const size_t d = 16, V = 100;
    assert_true(max_abs_diff(a.layers[1].resid_post, b.layers[1].resid_post, 4 * d) < 1e-5);
    assert_true(max_abs_diff(a.logits, b.logits, 4 * V) < 1e-4);
    forward_cache_free(&a);
    forward_cache_free(&b);
    random_model_free(&tm);
}

/* The last row of FORWARD_LOGITS_LAST equals the last row of ALL. */
static void test_logits_last(void **state)
{
    (void)state;
    random_model tm;
    random_model_init(&tm, 1, 2, 16, 100, 16);
    forward_cache a, b;
    assert_int_equal(forward_cache_init(&a, &tm.m.cfg, NT, FORWARD_LOGITS_ALL), PS_OK);
    assert_int_equal(forward_cache_init(&b, &tm.m.cfg, NT, FORWARD_LOGITS_LAST), PS_OK);
    assert_int_equal(forward_run(&tm.m, &a, toks, NT, NULL), PS_OK);
    assert_int_equal(forward_run(&tm.m, &b, toks, NT, NULL), PS_OK);
    assert_true(max_abs_diff(a.logits + (NT - 1) * 100, b.logits, 100) < 1e-5);
    forward_cache_free(&a);
    forward_cache_free(&b);
    random_model_free(&tm);
}

typedef struct {
    size_t layer, row;
    const float *value; /* [d] */
    size_t calls;
} patch_ctx;

static ps_status patch_resid_pre(void *user, hook_point hp, float *act, const size_t *shape, size_t ndim)
{
    patch_ctx *p = user;
    assert_int_equal(ndim, 2);
    p->calls++;
    if (hp.kind == HOOK_RESID_PRE && hp.layer == p->layer)
        memcpy(act + p->row * shape[1], p->value, shape[1] * sizeof(float));
    return PS_OK;
}

/* A hook overwrite in a full run == modifying the cache and running only the
 * suffix (blocks >= L, rows >= p): the foundation of the fast patching engine. */
static void test_suffix_run_equals_hooked_full_run(void **state)
{
    (void)state;
    random_model tm;
    random_model_init(&tm, 3, 2, 16, 100, 16);
    const size_t d = 16;
    float value[16];
    for (size_t i = 0; i < d; i++)
        value[i] = random_model_uniform();
    forward_cache base, hooked, suffix;
    assert_int_equal(forward_cache_init(&base, &tm.m.cfg, NT, FORWARD_LOGITS_ALL), PS_OK);
    assert_int_equal(forward_cache_init(&hooked, &tm.m.cfg, NT, FORWARD_LOGITS_ALL), PS_OK);
    assert_int_equal(forward_cache_init(&suffix, &tm.m.cfg, NT, FORWARD_LOGITS_ALL), PS_OK);
    assert_int_equal(forward_run(&tm.m, &base, toks, NT, NULL), PS_OK);
    for (size_t layer = 0; layer < 3; layer++) {
        for (size_t row = 0; row < NT; row += 3) {
            hook_set only;
            assert_int_equal(hook_set_parse(&only, "blocks.*.hook_resid_pre", &(model_config){.n_layer = 3}), PS_OK);
            patch_ctx pc = {layer, row, value, 0};
            forward_hooks hooks = {patch_resid_pre, &pc, &only};
            assert_int_equal(forward_run(&tm.m, &hooked, toks, NT, &hooks), PS_OK);
            assert_int_equal(pc.calls, 3); /* the selection limits the calls */
            hook_set_free(&only);

            forward_cache_copy(&suffix, &base);
            memcpy(suffix.layers[layer].resid_pre + row * d, value, d * sizeof(float));
            assert_int_equal(forward_run_from(&tm.m, &suffix, layer, row, NULL), PS_OK);
            assert_true(max_abs_diff(hooked.logits, suffix.logits, NT * 100) < 1e-4);
            assert_true(max_abs_diff(hooked.layers[2].resid_post, suffix.layers[2].resid_post, NT * d) < 1e-5);
        }
    }
    forward_cache_free(&base);
    forward_cache_free(&hooked);
    forward_cache_free(&suffix);
    random_model_free(&tm);
}

static ps_status zero_attn_out(void *user, hook_point hp, float *act, const size_t *shape, size_t ndim)
{
    (void)user;
    (void)hp;
    size_t n = 1;
    for (size_t i = 0; i < ndim; i++)
        n *= shape[i];
    memset(act, 0, n * sizeof *act);
    return PS_OK;
}

/* An overwritten activation is what the rest of the pass reads. */
static void test_hook_overwrite_flows_downstream(void **state)
{
    (void)state;
    random_model tm;
    random_model_init(&tm, 2, 2, 16, 100, 16);
    forward_cache c;
    assert_int_equal(forward_cache_init(&c, &tm.m.cfg, NT, FORWARD_LOGITS_ALL), PS_OK);
    hook_set only;
    assert_int_equal(hook_set_parse(&only, "blocks.1.hook_attn_out", &(model_config){.n_layer = 2}), PS_OK);
    forward_hooks hooks = {zero_attn_out, NULL, &only};
    assert_int_equal(forward_run(&tm.m, &c, toks, NT, &hooks), PS_OK);
    assert_true(max_abs_diff(c.layers[1].resid_mid, c.layers[1].resid_pre, NT * 16) == 0.0);
    hook_set_free(&only);
    forward_cache_free(&c);
    random_model_free(&tm);
}

static ps_status abort_hook(void *user, hook_point hp, float *act, const size_t *shape, size_t ndim)
{
    (void)user, (void)act, (void)shape, (void)ndim;
    return hp.kind == HOOK_MLP_OUT ? err_set(PS_ERR_INTERRUPTED, "stop") : PS_OK;
}

static void test_errors(void **state)
{
    (void)state;
    random_model tm;
    random_model_init(&tm, 1, 2, 16, 100, 8);
    forward_cache c;
    assert_int_equal(forward_cache_init(&c, &tm.m.cfg, 9, FORWARD_LOGITS_ALL), PS_ERR_RANGE);
    assert_non_null(strstr(err_msg(), "8 positions"));
    assert_int_equal(forward_cache_init(&c, &tm.m.cfg, 8, FORWARD_LOGITS_ALL), PS_OK);
    int32_t bad[] = {1, 100};
    assert_int_equal(forward_run(&tm.m, &c, bad, 2, NULL), PS_ERR_RANGE);
    assert_non_null(strstr(err_msg(), "token id 100"));
    forward_hooks hooks = {abort_hook, NULL, NULL};
    assert_int_equal(forward_run(&tm.m, &c, toks, 8, &hooks), PS_ERR_INTERRUPTED);
    forward_cache_free(&c);
    random_model_free(&tm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gelu_values),
        cmocka_unit_test(test_pattern_causal_and_normalized),
        cmocka_unit_test(test_prefix_independence),
        cmocka_unit_test(test_logits_last),
        cmocka_unit_test(test_suffix_run_equals_hooked_full_run),
        cmocka_unit_test(test_hook_overwrite_flows_downstream),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests_name("forward", tests, NULL, NULL);
}
