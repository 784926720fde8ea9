/* Unit tests: hook names and selections, UTF-8 display strings, provenance. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "hooks.h"
#include "prov.h"
#include "strutil.h"

static void test_names_round_trip(void **state)
{
    (void)state;
    const size_t L = 12;
    size_t n = hook_count(L);
    assert_int_equal(n, 2 + 12 * 19 + 2); /* every family's hook kinds */
    for (size_t i = 0; i < n; i++) {
        hook_point hp = hook_at(i, L);
        assert_int_equal(hook_index(hp, L), i);
        char name[HOOK_MAX_NAME];
        hook_name(hp, name);
        hook_point back;
        assert_int_equal(hook_parse(name, L, &back), PS_OK);
        assert_int_equal(back.kind, hp.kind);
        assert_int_equal(back.layer, hp.layer);
    }
}

static void test_known_names(void **state)
{
    (void)state;
    char name[HOOK_MAX_NAME];
    hook_name((hook_point){HOOK_Z, 3}, name);
    assert_string_equal(name, "blocks.3.attn.hook_z");
    hook_name((hook_point){HOOK_MLP_POST, 11}, name);
    assert_string_equal(name, "blocks.11.mlp.hook_post");
    hook_name((hook_point){HOOK_LN_FINAL, 0}, name);
    assert_string_equal(name, "ln_final.hook_normalized");
    hook_name((hook_point){HOOK_EMBED, 0}, name);
    assert_string_equal(name, "hook_embed");
}

static void test_parse_errors(void **state)
{
    (void)state;
    hook_point hp;
    assert_int_equal(hook_parse("blocks.12.hook_resid_pre", 12, &hp), PS_ERR_RANGE);
    assert_non_null(strstr(err_msg(), "out of range"));
    assert_int_equal(hook_parse("blocks.1.hook_nothing", 12, &hp), PS_ERR_INVALID);
    assert_non_null(strstr(err_msg(), "blocks.1.hook_nothing"));
    assert_int_equal(hook_parse("blocks.x.hook_resid_pre", 12, &hp), PS_ERR_INVALID);
    assert_int_equal(hook_parse("blocks.1.hook_resid_pre.", 12, &hp), PS_ERR_INVALID);
    assert_int_equal(hook_parse("", 12, &hp), PS_ERR_INVALID);
}

static void test_shapes(void **state)
{
    (void)state;
    model_config c = {.n_layer = 2, .n_head = 4, .n_embd = 32, .d_head = 8, .n_inner = 128, .vocab_size = 100};
    size_t s[HOOK_MAX_DIMS];
    const char *dn[HOOK_MAX_DIMS];
    assert_int_equal(hook_shape(HOOK_PATTERN, &c, 7, s, dn), 3);
    assert_int_equal(s[0], 4);
    assert_int_equal(s[1], 7);
    assert_int_equal(s[2], 7);
    assert_string_equal(dn[1], "query_position");
    assert_int_equal(hook_shape(HOOK_Z, &c, 7, s, dn), 3);
    assert_int_equal(s[1], 4);
    assert_int_equal(s[2], 8);
    assert_int_equal(hook_shape(HOOK_MLP_PRE, &c, 7, s, dn), 2);
    assert_int_equal(s[1], 128);
    assert_string_equal(dn[1], "d_mlp");
    assert_int_equal(hook_shape(HOOK_LOGITS, &c, 7, s, dn), 2);
    assert_int_equal(s[1], 100);
}

static void test_globs(void **state)
{
    (void)state;
    hook_set s;
    assert_int_equal(hook_set_parse(&s, "blocks.*.hook_resid_post,logits", &(model_config){.n_layer = 4}), PS_OK);
    assert_int_equal(s.n_on, 5);
    assert_true(hook_set_has(&s, (hook_point){HOOK_RESID_POST, 3}));
    assert_true(hook_set_has(&s, (hook_point){HOOK_LOGITS, 0}));
    assert_false(hook_set_has(&s, (hook_point){HOOK_RESID_PRE, 0}));
    hook_set_free(&s);
    assert_int_equal(hook_set_parse(&s, "blocks.1.attn.*", &(model_config){.n_layer = 4}), PS_OK);
    assert_int_equal(s.n_on, 5); /* q k v pattern z */
    hook_set_free(&s);
    assert_int_equal(hook_set_parse(&s, "blocks.9.*", &(model_config){.n_layer = 4}), PS_ERR_INVALID);
    assert_non_null(strstr(err_msg(), "matches no hook"));
    assert_null(s.on);
    assert_int_equal(hook_set_all(&s, &(model_config){.n_layer = 4}), PS_OK);
    assert_int_equal(s.n_on, hook_count(4) - 4 * 7); /* GPT-2: no ln1/ln2, rot_q/k, pre_linear hooks */
    hook_set_free(&s);
}

static void test_utf8_sanitize(void **state)
{
    (void)state;
    struct { const char *in; size_t len; const char *out; } cases[] = {
        {"abc", 3, "abc"},
        {"\xC3\xA9", 2, "\xC3\xA9"},
        {"\xC3", 1, "\xEF\xBF\xBD"},                          /* truncated 2-byte */
        {"\xE2\x82", 2, "\xEF\xBF\xBD"},                      /* one maximal subpart */
        {"\xE2\x82x", 3, "\xEF\xBF\xBDx"},
        {"\xED\xA0\x80", 3, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"}, /* surrogate: 3 */
        {"\xC0\xAF", 2, "\xEF\xBF\xBD\xEF\xBF\xBD"},          /* overlong */
        {"\xF0\x9F\x98\x80", 4, "\xF0\x9F\x98\x80"},
        {"a\0b", 3, "a\xEF\xBF\xBD" "b"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *s = str_utf8_sanitize(cases[i].in, cases[i].len);
        assert_non_null(s);
        assert_string_equal(s, cases[i].out);
        assert_true(str_utf8_valid(s, strlen(s)));
        free(s);
    }
    assert_false(str_utf8_valid("\xFF", 1));
}

static void test_prov_quoting(void **state)
{
    (void)state;
    char *argv[] = {"patchsweep", "run", "--prompt", "it's a test", "--model=m"};
    prov_init(5, argv);
    assert_string_equal(prov_command_line(), "patchsweep run --prompt 'it'\\''s a test' --model=m");
    assert_non_null(strstr(prov_version(), "git"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names_round_trip), cmocka_unit_test(test_known_names),
        cmocka_unit_test(test_parse_errors),     cmocka_unit_test(test_shapes),
        cmocka_unit_test(test_globs),            cmocka_unit_test(test_utf8_sanitize),
        cmocka_unit_test(test_prov_quoting),
    };
    return cmocka_run_group_tests_name("hooks", tests, NULL, NULL);
}
