/*
 * Unit tests for tokenizer.json (src/core/hftok.c) on small handmade files
 * (tests/unit/hftok/: byte-level BPE with a Split regex, ignore_merges and
 * lstrip/rstrip added tokens; SentencePiece-style BPE with Prepend/Replace,
 * byte_fallback, fuse_unk and a Replace/ByteFallback/Fuse/Strip decoder;
 * Metaspace with prepend_scheme first).  Expected ids and texts are the
 * reference's (@huggingface/tokenizers 0.2.0) for the same files; refusals
 * use inline files.  The byte-exact comparison on real files is
 * tests/integration/test_hftok.py.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
/* cmocka.h needs the four headers above first. */
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "hftok.h"

/* The data files beside this source (make runs the tests from the tree). */
static hftok *load(const char *name)
{
    char path[512];
    const char *src = __FILE__, *slash = strrchr(src, '/');
    snprintf(path, sizeof path, "%.*s/hftok/%s", slash ? (int)(slash - src) : 1, slash ? src : ".", name);
    hftok *t = NULL;
    ps_status st = hftok_load(&t, path, NULL);
    if (st != PS_OK)
        fail_msg("%s", err_msg());
    return t;
}

static void expect(const hftok *t, const char *text, const int32_t *want, size_t nwant, const char *want_text)
{
    int32_t *ids = NULL;
    size_t n = 0;
    assert_int_equal(hftok_encode(t, text, strlen(text), &ids, &n), PS_OK);
    if (n != nwant || (n && memcmp(ids, want, n * sizeof *ids) != 0)) {
        for (size_t i = 0; i < n; i++)
            print_message("%d ", (int)ids[i]);
        fail_msg("'%s': %zu ids, want %zu", text, n, nwant);
    }
    char *back = NULL;
    size_t bl = 0;
    assert_int_equal(hftok_decode(t, ids, n, &back, &bl), PS_OK);
    assert_string_equal(back, want_text);
    free(back);
    free(ids);
}

#define EXPECT(t, text, want_text, ...)                                                   \
    do {                                                                                  \
        static const int32_t w_[] = {__VA_ARGS__};                                        \
        expect(t, text, w_, sizeof w_ / sizeof w_[0], want_text);                         \
    } while (0)

static void test_bytelevel(void **state)
{
    (void)state;
    hftok *t = load("bytelevel.json");
    EXPECT(t, "the world", "the world", 116, 257, 263);
    /* \p{N}{1,3} splits digits; (?i:'s) takes 'S but the merges do not */
    EXPECT(t, "The 12345 'S 's", "The 12345 'S 's", 84, 257, 32, 265, 52, 53, 32, 39, 83, 32, 39, 115);
    EXPECT(t, "  the\n\nworld  ", "  the\n\nworld  ", 32, 258, 10, 10, 119, 260, 262, 266);
    EXPECT(t, "a<|end|>b", "a<|end|>b", 97, 300, 98);
    /* <x> has lstrip and rstrip: the spaces around it go */
    EXPECT(t, " a <x> b ", " a<x>b ", 32, 97, 301, 98, 32);
    EXPECT(t, "\xc3\xa9\xf0\x9f\x98\x80", "\xc3\xa9\xf0\x9f\x98\x80", 195, 169, 240, 159, 152, 128);
    int32_t *ids = NULL;
    size_t n = 9;
    assert_int_equal(hftok_encode(t, "", 0, &ids, &n), PS_OK);
    assert_int_equal(n, 0);
    free(ids);
    /* invalid UTF-8 becomes U+FFFD first */
    assert_int_equal(hftok_encode(t, "\xff", 1, &ids, &n), PS_OK);
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], 0xEF);
    free(ids);
    size_t l;
    const char *b = hftok_token_bytes(t, 263, &l);
    assert_non_null(b);
    assert_int_equal(l, 6);
    assert_memory_equal(b, " world", 6);
    assert_null(hftok_token_bytes(t, 299, &l)); /* a gap between vocab and added ids */
    assert_int_equal(hftok_vocab_size(t), 302);
    assert_int_equal(hftok_bos_id(t), -1);
    assert_false(hftok_add_bos(t));
    assert_int_equal(hftok_set_add_bos(t, true), PS_ERR_INVALID);
    int32_t bad = 299;
    char *txt = NULL;
    assert_int_equal(hftok_decode(t, &bad, 1, &txt, &l), PS_ERR_RANGE);
    hftok_free(t);
}

static void test_sentencepiece(void **state)
{
    (void)state;
    hftok *t = load("spm.json");
    EXPECT(t, "ab a", "ab a", 264, 262);
    EXPECT(t, "a  b", "a  b", 262, 259, 259, 261);
    EXPECT(t, "\xc3\xa9", "\xc3\xa9", 259, 198, 172); /* byte_fallback */
    EXPECT(t, "c c", "c c", 259, 265, 259, 265);
    EXPECT(t, "x<s>ab", "x<s> ab", 259, 123, 1, 264); /* each section gets its own "▁" */
    EXPECT(t, "ab</s> a", "ab</s>  a", 264, 2, 259, 262);
    size_t l;
    const char *b = hftok_token_bytes(t, 264, &l);
    assert_int_equal(l, 3);
    assert_memory_equal(b, " ab", 3);
    b = hftok_token_bytes(t, 3 + 0x41, &l); /* <0x41> */
    assert_int_equal(l, 1);
    assert_int_equal(b[0], 'A');
    /* the TemplateProcessing's <s> is the BOS, prepended by default */
    assert_int_equal(hftok_bos_id(t), 1);
    assert_true(hftok_add_bos(t));
    assert_int_equal(hftok_set_add_bos(t, false), PS_OK);
    assert_false(hftok_add_bos(t));
    hftok_free(t);
}

static void test_metaspace(void **state)
{
    (void)state;
    hftok *t = load("metaspace.json");
    EXPECT(t, "ab a", "ab a", 264, 262);
    EXPECT(t, " ab", "ab", 264);
    EXPECT(t, "a<s>ab", "a<s>ab", 262, 1, 263); /* prepend_scheme first: only section 0 */
    EXPECT(t, "xyz", "<unk>", 259, 0);           /* no byte_fallback: fuse_unk */
    hftok_free(t);
}

/* A minimal file with one element replaced. */
static ps_status try_load(const char *model, const char *normalizer, const char *pre, const char *decoder,
                          const char *added)
{
    char buf[4096];
    snprintf(buf, sizeof buf,
             "{\"added_tokens\": %s, \"normalizer\": %s, \"pre_tokenizer\": %s, \"post_processor\": null, "
             "\"decoder\": %s, \"model\": %s}",
             added ? added : "[]", normalizer ? normalizer : "null", pre ? pre : "null", decoder ? decoder : "null",
             model ? model
                   : "{\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a b\"]}");
    hftok *t = NULL;
    ps_status st = hftok_load_mem(&t, "x/tokenizer.json", buf, strlen(buf));
    hftok_free(t);
    return st;
}

static void refused(ps_status st, const char *needle)
{
    assert_int_not_equal(st, PS_OK);
    if (!strstr(err_msg(), needle))
        fail_msg("message '%s' lacks '%s'", err_msg(), needle);
    assert_null(strchr(err_msg(), '\n'));
}

static void test_refusals(void **state)
{
    (void)state;
    assert_int_equal(try_load(NULL, NULL, NULL, NULL, NULL), PS_OK);
    refused(try_load("{\"type\": \"WordPiece\", \"vocab\": {\"a\": 0}}", NULL, NULL, NULL, NULL),
            "model type WordPiece is not supported");
    refused(try_load("{\"type\": \"Unigram\", \"vocab\": []}", NULL, NULL, NULL, NULL), "Unigram");
    refused(try_load(NULL, "{\"type\": \"Lowercase\"}", NULL, NULL, NULL), "normalizer Lowercase is not supported");
    refused(try_load(NULL, "{\"type\": \"BertNormalizer\"}", NULL, NULL, NULL), "BertNormalizer");
    refused(try_load(NULL, NULL, "{\"type\": \"Whitespace\"}", NULL, NULL), "pre_tokenizer Whitespace");
    refused(try_load(NULL, NULL, NULL, "{\"type\": \"WordPiece\"}", NULL), "decoder WordPiece");
    refused(try_load("{\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [\"a b\"]}", NULL, NULL,
                     NULL, NULL),
            "names \"ab\", which is not in the vocabulary");
    refused(try_load("{\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"a zz\"]}", NULL, NULL, NULL, NULL),
            "\"zz\"");
    refused(try_load("{\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a b\", \"a b\"]}",
                     NULL, NULL, NULL, NULL),
            "repeats merges[0]");
    /* the reference reads only the first entry's form */
    refused(try_load("{\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2, \"ba\": 3}, \"merges\": [\"a b\", [\"b\", "
                     "\"a\"]]}",
                     NULL, NULL, NULL, NULL),
            "mixes");
    refused(try_load("{\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 0}, \"merges\": []}", NULL, NULL, NULL, NULL),
            "id 0 is used twice");
    refused(try_load("{\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 7}, \"merges\": []}", NULL, NULL, NULL, NULL),
            "out of range");
    refused(try_load(NULL, NULL,
                     "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"(a\"}, \"behavior\": \"Isolated\", "
                     "\"invert\": false}",
                     NULL, NULL),
            "unclosed group");
    refused(try_load(NULL, NULL,
                     "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"\\\\w+\"}, \"behavior\": \"Isolated\", "
                     "\"invert\": false}",
                     NULL, NULL),
            "the escape \\w");
    refused(try_load(NULL, NULL,
                     "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"a\"}, \"behavior\": \"MergedWithPrevious\", "
                     "\"invert\": false}",
                     NULL, NULL),
            "MergedWithPrevious");
    refused(try_load(NULL, NULL, "{\"type\": \"Metaspace\", \"replacement\": \"_\", \"split\": true}", NULL, NULL),
            "split: true");
    refused(try_load(NULL, NULL, NULL, NULL, "[{\"id\": 3, \"content\": \"a\"}, {\"id\": 4, \"content\": \"a\"}]"),
            "repeats the content");
    refused(try_load("{\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [], \"unk_token\": \"<unk>\"}", NULL,
                     NULL, NULL, NULL),
            "unk_token");
    hftok *t = NULL;
    refused(hftok_load_mem(&t, "x/tokenizer.json", "[1]", 3), "expected a JSON object");
    refused(hftok_load_mem(&t, "x/tokenizer.json", "{", 1), "not valid JSON");
    refused(hftok_load(&t, "/nonexistent/tokenizer.json", NULL), "/nonexistent/tokenizer.json");
}

/* The regex translation keeps Oniguruma's meaning where PCRE2's differs. */
static void test_regex_fold(void **state)
{
    (void)state;
    /* (?i:'s) must not match "'\u017f" (PCRE2's caseless would) */
    hftok *t = NULL;
    const char *j = "{\"added_tokens\": [], \"normalizer\": null, \"post_processor\": null, \"decoder\": null,"
                    "\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"(?i:'s)\"},"
                    " \"behavior\": \"Removed\", \"invert\": false},"
                    "\"model\": {\"type\": \"BPE\", \"unk_token\": \"?\", \"vocab\": {\"?\": 0, \"'\": 1, \"s\": 2, "
                    "\"S\": 3}, \"merges\": []}}";
    assert_int_equal(hftok_load_mem(&t, "x", j, strlen(j)), PS_OK);
    int32_t *ids = NULL;
    size_t n = 0;
    assert_int_equal(hftok_encode(t, "a'Sb's'\xc5\xbf", 9, &ids, &n), PS_OK);
    /* 'S and 's are removed; a, b and U+017F are unknown (?), the last ' stays */
    int32_t want[] = {0, 0, 1, 0};
    assert_int_equal(n, 4);
    assert_memory_equal(ids, want, sizeof want);
    free(ids);
    hftok_free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bytelevel),
        cmocka_unit_test(test_sentencepiece),
        cmocka_unit_test(test_metaspace),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_regex_fold),
    };
    return cmocka_run_group_tests_name("hftok", tests, NULL, NULL);
}
