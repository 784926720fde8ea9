/*
 * Unit tests for the GPT-2 tokenizer (src/tokenizer.c).
 *
 * The real GPT-2 files come from $PS_TOKENIZER, else the directory compiled
 * in as PS_TOKENIZER_DIR (`make tokenizer` fetches it).  Expected ids were
 * produced by OpenAI's encoder.py algorithm (Python `regex` module); the
 * byte-exact comparison on a large corpus is tests/integration/
 * test_tokenizer_js.py.  Loader errors and BPE corner cases use small
 * tokenizers written to a temporary directory.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
/* cmocka.h needs the four headers above first. */
#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"
#include "fsutil.h"
#include "tokenizer.h"

static tokenizer *gpt2;
static char tmp_dir[] = "/tmp/ps_test_tokenizer_XXXXXX";

/* ------------------------------------------------------------------ */
/* Helpers                                                             */

static const char *gpt2_dir(void)
{
    const char *env = getenv("PS_TOKENIZER");
    if (env && *env)
        return env;
#ifdef PS_TOKENIZER_DIR
    return PS_TOKENIZER_DIR;
#else
    return NULL;
#endif
}

/* Encode text (len bytes) and compare with the expected ids. */
static void expect_ids(const tokenizer *t, const char *text, size_t len, const int32_t *want, size_t n_want)
{
    int32_t *ids = NULL;
    size_t n = 0;
    ps_status st = tokenizer_encode(t, text, len, &ids, &n);
    if (st != PS_OK)
        fail_msg("encode failed: %s", err_msg());
    if (n != n_want)
        print_error("'%.*s': got %zu tokens, want %zu\n", (int)len, text, n, n_want);
    assert_int_equal(n, n_want);
    for (size_t i = 0; i < n; i++) {
        if (ids[i] != want[i])
            print_error("'%.*s': token %zu is %d, want %d\n", (int)len, text, i, ids[i], want[i]);
        assert_int_equal(ids[i], want[i]);
    }
    free(ids);
}

#define EXPECT(t, text, ...)                                                                      \
    do {                                                                                          \
        static const int32_t want_[] = {__VA_ARGS__};                                             \
        expect_ids((t), (text), sizeof(text) - 1, want_, sizeof want_ / sizeof want_[0]);         \
    } while (0)

/* decode(encode(text)) must give back exactly `expect` (expect_len bytes). */
static void expect_decoded(const tokenizer *t, const char *text, size_t len, const char *expect, size_t expect_len)
{
    int32_t *ids = NULL;
    size_t n = 0;
    assert_int_equal(tokenizer_encode(t, text, len, &ids, &n), PS_OK);
    char *back = NULL;
    size_t back_len = 0;
    assert_int_equal(tokenizer_decode(t, ids, n, &back, &back_len), PS_OK);
    assert_int_equal(back_len, expect_len);
    assert_memory_equal(back, expect, expect_len);
    assert_int_equal(back[back_len], '\0');
    free(back);
    free(ids);
}

/* Encoding a and b must give the same ids. */
static void expect_same_ids(const tokenizer *t, const char *a, size_t la, const char *b, size_t lb)
{
    int32_t *ia = NULL, *ib = NULL;
    size_t na = 0, nb = 0;
    assert_int_equal(tokenizer_encode(t, a, la, &ia, &na), PS_OK);
    assert_int_equal(tokenizer_encode(t, b, lb, &ib, &nb), PS_OK);
    assert_int_equal(na, nb);
    assert_memory_equal(ia, ib, na * sizeof *ia);
    free(ia);
    free(ib);
}

static char *tmp_path(const char *name)
{
    char *p = fs_join(tmp_dir, name);
    assert_non_null(p);
    return p;
}

static void write_file(const char *name, const char *content)
{
    char *p = tmp_path(name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(content, 1, strlen(content), f), strlen(content));
    assert_int_equal(fclose(f), 0);
    free(p);
}

static void remove_file(const char *name)
{
    char *p = tmp_path(name);
    unlink(p);
    free(p);
}

/* UTF-8 of GPT-2's bytes_to_unicode character for byte b. */
static size_t byte_char(unsigned b, char out[3])
{
    unsigned extra = 0, cp = 0;
    for (unsigned x = 0; x <= b; x++) {
        int printable = (x >= 0x21 && x <= 0x7E) || (x >= 0xA1 && x <= 0xAC) || x >= 0xAE;
        cp = printable ? x : 0x100 + extra++;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        out[1] = '\0';
        return 1;
    }
    out[0] = (char)(0xC0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3F));
    out[2] = '\0';
    return 2;
}

/*
 * A small vocabulary as JSON: the 256 byte characters with ids 0..255
 * (byte `skip_byte` left out when it is < 256) followed by `extra`, a
 * NUL-separated list of JSON-escaped tokens taking the next ids; `tail` is
 * appended inside the object verbatim (for malformed entries).
 */
static char *vocab_json(unsigned skip_byte, const char *const *extra, size_t n_extra, const char *tail)
{
    size_t cap = 256 * 16 + 64 * n_extra + strlen(tail) + 64, o = 0;
    char *s = malloc(cap);
    assert_non_null(s);
    int id = 0;
    o += (size_t)snprintf(s + o, cap - o, "{");
    for (unsigned b = 0; b < 256; b++) {
        if (b == skip_byte)
            continue;
        char c[3];
        byte_char(b, c);
        const char *esc = b == '"' ? "\\\"" : b == '\\' ? "\\\\" : c;
        o += (size_t)snprintf(s + o, cap - o, "%s\"%s\": %d", id ? ", " : "", esc, id);
        id++;
    }
    for (size_t i = 0; i < n_extra; i++) {
        o += (size_t)snprintf(s + o, cap - o, ", \"%s\": %d", extra[i], id);
        id++;
    }
    snprintf(s + o, cap - o, "%s}", tail);
    return s;
}

/* Write vocab.json (the bytes plus `extra` tokens, then `tail`) and merges.txt. */
static void write_tiny(const char *const *extra, size_t n_extra, const char *tail, const char *merges)
{
    char *v = vocab_json(256, extra, n_extra, tail);
    write_file("vocab.json", v);
    free(v);
    write_file("merges.txt", merges);
}

static const char *const tiny_tokens[] = {"ab", "abc", "<|endoftext|>"};
#define TINY_N 3
#define TINY_MERGES "#version: 0.2\na b\nab c\n"

/* Load vocab.json + merges.txt from tmp_dir; returns the status. */
static ps_status load_tiny(tokenizer **t)
{
    char *v = tmp_path("vocab.json"), *m = tmp_path("merges.txt");
    ps_status st = tokenizer_load(t, v, m);
    free(v);
    free(m);
    return st;
}

/* Loading must fail with `want` and a message containing `needle`. */
static void expect_load_error(ps_status want, const char *needle)
{
    tokenizer *t = (tokenizer *)&t;
    ps_status st = load_tiny(&t);
    if (st != want || !strstr(err_msg(), needle))
        print_error("status %s, message: %s (wanted %s containing \"%s\")\n", err_name(st), err_msg(),
                    err_name(want), needle);
    assert_int_equal(st, want);
    assert_non_null(strstr(err_msg(), needle));
    assert_null(t);
}

/* ------------------------------------------------------------------ */
/* Fixtures                                                            */

static int group_setup(void **state)
{
    (void)state;
    const char *dir = gpt2_dir();
    if (!dir) {
        print_error("no GPT-2 tokenizer: set PS_TOKENIZER or run `make tokenizer`\n");
        return -1;
    }
    if (tokenizer_load_dir(&gpt2, dir) != PS_OK) {
        print_error("loading the GPT-2 tokenizer from %s: %s\n", dir, err_msg());
        return -1;
    }
    if (!mkdtemp(tmp_dir)) {
        print_error("mkdtemp failed\n");
        return -1;
    }
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    tokenizer_free(gpt2);
    static const char *const names[] = {"vocab.json", "merges.txt", "encoder.json", "vocab.bpe"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        remove_file(names[i]);
    char *empty = tmp_path("empty");
    rmdir(empty);
    free(empty);
    rmdir(tmp_dir);
    return 0;
}

/* ------------------------------------------------------------------ */
/* GPT-2                                                               */

static void test_vocab_size(void **state)
{
    (void)state;
    assert_int_equal(tokenizer_vocab_size(gpt2), 50257);
    assert_int_equal(tokenizer_vocab_size(NULL), 0);
}

static void test_known_encodings(void **state)
{
    (void)state;
    EXPECT(gpt2, "Hello world", 15496, 995);
    EXPECT(gpt2, " John", 1757);
    EXPECT(gpt2, " John Smith", 1757, 4176);
    EXPECT(gpt2, "I'm here, don't", 40, 1101, 994, 11, 836, 470);
    EXPECT(gpt2, "it's", 270, 338);
    /* Contractions are case-sensitive in GPT-2's regex: 'S is not one. */
    EXPECT(gpt2, "IT'S", 2043, 6, 50);
    EXPECT(gpt2, "They'RE 'Ve", 2990, 6, 2200, 705, 26979);
    EXPECT(gpt2, "  leading", 220, 3756);
    EXPECT(gpt2, "trailing  ", 9535, 4386, 220, 220);
    /* \s+(?!\S) leaves the last newline to go with nothing: two tokens. */
    EXPECT(gpt2, "a\n\nb", 64, 198, 198, 65);
    EXPECT(gpt2, "tab\there\n\n  ", 8658, 197, 1456, 628, 220, 220);
    EXPECT(gpt2, "   ", 220, 220, 220);
    EXPECT(gpt2, "1234567890", 10163, 2231, 30924, 3829);
    EXPECT(gpt2, "3.14159", 18, 13, 1415, 19707);
    EXPECT(gpt2, ",,,,,,,,", 47682);
    EXPECT(gpt2, "\xE3\x81\x93\xE3\x82\x93\xE3\x81\xAB\xE3\x81\xA1\xE3\x81\xAF\xE4\xB8\x96\xE7\x95\x8C",
           46036, 22174, 28618, 2515, 94, 31676, 10310, 244, 45911, 234);
    EXPECT(gpt2, "\xD0\x9F\xD1\x80\xD0\xB8\xD0\xB2\xD0\xB5\xD1\x82, \xD0\xBC\xD0\xB8\xD1\x80!", 140, 253, 21169,
           18849, 38857, 16843, 20375, 11, 12466, 120, 18849, 21169, 0);
    EXPECT(gpt2, "\xD9\x85\xD8\xB1\xD8\xAD\xD8\xA8\xD8\xA7", 25405, 26897, 148, 255, 39848, 12919);
    EXPECT(gpt2, "\xE0\xA4\xA8\xE0\xA4\xAE\xE0\xA4\xB8\xE0\xA5\x8D\xE0\xA4\xA4\xE0\xA5\x87", 11976, 101, 11976,
           106, 11976, 116, 24231, 235, 11976, 97, 24231, 229);
    EXPECT(gpt2, "\xF0\x9F\xA4\x97", 8582, 97, 245);
    /* ZWJ family: man ZWJ woman ZWJ girl. */
    EXPECT(gpt2, "\xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x91\xA7", 41840, 101, 447,
           235, 41840, 102, 447, 235, 41840, 100);
    /* Precomposed and combining e-acute. */
    EXPECT(gpt2, "caf\xC3\xA9 cafe\xCC\x81", 66, 1878, 2634, 26725, 136, 223);
    EXPECT(gpt2, "\0a\0", 188, 64, 188);
}

/* encoder.py's \s is Unicode White_Space: U+0085 is whitespace (the JS
 * port disagrees: [1587, 227, 0]) and U+180E is not (PCRE2's \s says it is). */
static void test_whitespace_class(void **state)
{
    (void)state;
    EXPECT(gpt2, " \xC2\x85!", 220, 126, 227, 0);
    EXPECT(gpt2, "a\xE1\xA0\x8E" "b", 64, 157, 254, 236, 65);
    /* U+3000 IDEOGRAPHIC SPACE and U+00A0 NO-BREAK SPACE are whitespace. */
    EXPECT(gpt2, "x\xE3\x80\x80", 87, 5099, 222);
    EXPECT(gpt2, "x\xC2\xA0", 87, 1849);
}

static void test_endoftext(void **state)
{
    (void)state;
    EXPECT(gpt2, "<|endoftext|>", TOKENIZER_EOT);
    EXPECT(gpt2, "a<|endoftext|>b", 64, TOKENIZER_EOT, 65);
    EXPECT(gpt2, "<|endoftext|><|endoftext|>", TOKENIZER_EOT, TOKENIZER_EOT);
    /* Pieces are pre-tokenized separately: the lookahead stops at the EOT. */
    EXPECT(gpt2, "a  <|endoftext|>  b", 64, 220, 220, TOKENIZER_EOT, 220, 275);
    /* A partial marker is ordinary text. */
    EXPECT(gpt2, "<|endoftext|", 27, 91, 437, 1659, 5239, 91);
    int32_t id = -1;
    assert_int_equal(tokenizer_single_token(gpt2, "<|endoftext|>", &id), PS_OK);
    assert_int_equal(id, TOKENIZER_EOT);
    size_t len = 0;
    const char *b = tokenizer_token_bytes(gpt2, TOKENIZER_EOT, &len);
    assert_int_equal(len, 13);
    assert_memory_equal(b, "<|endoftext|>", 13);
}

static void test_empty(void **state)
{
    (void)state;
    int32_t *ids = NULL;
    size_t n = 99;
    assert_int_equal(tokenizer_encode(gpt2, "", 0, &ids, &n), PS_OK);
    assert_int_equal(n, 0);
    assert_non_null(ids);
    free(ids);
    assert_int_equal(tokenizer_encode(gpt2, NULL, 0, &ids, &n), PS_OK);
    assert_int_equal(n, 0);
    free(ids);
    char *text = NULL;
    size_t len = 99;
    assert_int_equal(tokenizer_decode(gpt2, NULL, 0, &text, &len), PS_OK);
    assert_int_equal(len, 0);
    assert_string_equal(text, "");
    free(text);
}

static void test_roundtrip(void **state)
{
    (void)state;
    static const char *const texts[] = {
        "Hello world",
        "The quick brown fox jumps over the lazy dog.\n\nIt's 3:45pm -- isn't it?  ",
        "  \t\n\r\n mixed   whitespace \t",
        "\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E \xD8\xB9\xD8\xB1\xD8\xA8\xD9\x8A \xCE\x95\xCE\xBB\xCE\xBB\xCE\xB7\xCE\xBD\xCE\xB9\xCE\xBA\xCE\xAC",
        "\xF0\x9F\x8F\xB3\xEF\xB8\x8F\xE2\x80\x8D\xF0\x9F\x8C\x88 flags \xF0\x9F\x87\xBA\xF0\x9F\x87\xB8",
        "Z\xCD\x91\xCD\x97\xCD\x82\xCC\x80\xCC\x81\xCC\x82 zalgo",
        "\xEF\xBB\xBF" "BOM first",
        "code: if (a[i] != b) { return -1; } // done",
        "<|endoftext|>between<|endoftext|>",
    };
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++)
        expect_decoded(gpt2, texts[i], strlen(texts[i]), texts[i], strlen(texts[i]));
    /* Embedded NUL bytes: lengths, not C strings. */
    expect_decoded(gpt2, "a\0b\0\0c", 6, "a\0b\0\0c", 6);
}

static void test_invalid_utf8(void **state)
{
    (void)state;
    /* {input, input length, expected text after one U+FFFD per maximal subpart} */
    static const struct {
        const char *in;
        size_t in_len;
        const char *out;
    } cases[] = {
        {"\xFF", 1, "\xEF\xBF\xBD"},
        {"\x80\x80", 2, "\xEF\xBF\xBD\xEF\xBF\xBD"},
        {"a\xE2\x82", 3, "a\xEF\xBF\xBD"},                  /* truncated euro sign: one */
        {"\xE2\x82" "a", 3, "\xEF\xBF\xBD" "a"},
        {"\xF0\x9F\x98", 3, "\xEF\xBF\xBD"},                /* truncated emoji: one */
        {"\xF0\x9F\x98\xC3\xA9", 5, "\xEF\xBF\xBD\xC3\xA9"},
        {"\xED\xA0\x80", 3, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},  /* surrogate: three */
        {"\xC0\x80", 2, "\xEF\xBF\xBD\xEF\xBF\xBD"},        /* overlong NUL: two */
        {"\xE0\x80\x80", 3, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},
        {"\xF4\x90\x80\x80", 4, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"}, /* > U+10FFFF */
        {"\xF8\x88\x80\x80\x80", 5,
         "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},
        {"hi \xE2\x28\xA1 there", 12, "hi \xEF\xBF\xBD(\xEF\xBF\xBD there"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t out_len = strlen(cases[i].out);
        expect_same_ids(gpt2, cases[i].in, cases[i].in_len, cases[i].out, out_len);
        expect_decoded(gpt2, cases[i].in, cases[i].in_len, cases[i].out, out_len);
    }
    EXPECT(gpt2, "\xFF", 4210);
}

static void test_single_token(void **state)
{
    (void)state;
    int32_t id = -1;
    assert_int_equal(tokenizer_single_token(gpt2, " John", &id), PS_OK);
    assert_int_equal(id, 1757);
    assert_int_equal(tokenizer_single_token(gpt2, " John Smith", &id), PS_ERR_INVALID);
    assert_string_equal(err_msg(), "' John Smith' is 2 tokens (' John' 1757, ' Smith' 4176), not one");
    assert_int_equal(tokenizer_single_token(gpt2, "", &id), PS_ERR_INVALID);
    assert_string_equal(err_msg(), "'' is 0 tokens, not one");
    /* Control characters are shown escaped. */
    assert_int_equal(tokenizer_single_token(gpt2, "a\nb", &id), PS_ERR_INVALID);
    assert_string_equal(err_msg(), "'a\\nb' is 3 tokens ('a' 64, '\\n' 198, 'b' 65), not one");
    /* A token that is part of a UTF-8 sequence is shown as its bytes. */
    assert_int_equal(tokenizer_single_token(gpt2, "\xF0\x9F\xA4\x97", &id), PS_ERR_INVALID);
    assert_string_equal(err_msg(), "'\xF0\x9F\xA4\x97' is 3 tokens ('\\xF0\\x9F' 8582, '\\xA4' 97, '\\x97' 245), not one");
    /* Long inputs: the message stays one bounded line. */
    char big[4000];
    memset(big, 'x', sizeof big - 1);
    for (size_t i = 0; i < sizeof big - 1; i += 2)
        big[i] = ' ';
    big[sizeof big - 1] = '\0';
    assert_int_equal(tokenizer_single_token(gpt2, big, &id), PS_ERR_INVALID);
    assert_non_null(strstr(err_msg(), "' is 2000 tokens (' x' 2124, "));
    assert_non_null(strstr(err_msg(), ", ...), not one"));
    assert_int_equal(tokenizer_single_token(NULL, "x", &id), PS_ERR_INVALID);
    assert_int_equal(tokenizer_single_token(gpt2, NULL, &id), PS_ERR_INVALID);
}

/* A SentencePiece-style tokenizer.json (tests/unit/hftok/spm.json: Prepend
 * "▁" and Replace " " -> "▁"; "▁"=259, "▁a"=262, "▁ab"=264, "b"=261,
 * "c"=265): " a" alone is "▁▁a", two tokens, but one after a word. */
static void test_single_token_in_context(void **state)
{
    (void)state;
    char src[512];
    const char *file = __FILE__, *slash = strrchr(file, '/');
    snprintf(src, sizeof src, "%.*s/hftok/spm.json", slash ? (int)(slash - file) : 1, slash ? file : ".");
    char *data = NULL;
    size_t len = 0;
    assert_int_equal(fs_read_file(src, 1 << 20, &data, &len), PS_OK);
    char *dir = tmp_path("spm");
    mkdir(dir, 0700);
    write_file("spm/tokenizer.json", data);
    free(data);
    tokenizer *t = NULL;
    assert_int_equal(tokenizer_load_dir(&t, dir), PS_OK);
    int32_t id = -1;
    int32_t *ids = NULL;
    size_t n = 0;
    assert_int_equal(tokenizer_encode(t, " a", 2, &ids, &n), PS_OK);
    assert_int_equal(n, 2); /* the trap: "▁" 259, "▁a" 262 */
    free(ids);
    assert_int_equal(tokenizer_single_token(t, " a", &id), PS_OK);
    assert_int_equal(id, 262);
    assert_int_equal(tokenizer_single_token(t, " ab", &id), PS_OK);
    assert_int_equal(id, 264);
    assert_int_equal(tokenizer_next_token(t, "ab ab", " a", &id), PS_OK);
    assert_int_equal(id, 262);
    assert_int_equal(tokenizer_next_token(t, "", "a", &id), PS_OK);
    assert_int_equal(id, 262);
    assert_int_equal(tokenizer_single_token(t, " c", &id), PS_ERR_INVALID);
    assert_string_equal(err_msg(), "' c' is 2 tokens after the text before it (' ' 259, 'c' 265), not one");
    /* "b" continues the word before it: "▁a" + "b" is "▁ab" */
    assert_int_equal(tokenizer_single_token(t, "b", &id), PS_ERR_INVALID);
    assert_string_equal(err_msg(),
                        "'b' is 1 token after the text before it, and changes that text's last tokens "
                        "(' ab' 264), not one");
    assert_int_equal(tokenizer_next_token(t, "a", "", &id), PS_ERR_INVALID);
    assert_int_equal(tokenizer_next_token(t, NULL, " a", &id), PS_ERR_INVALID);
    tokenizer_free(t);
    remove_file("spm/tokenizer.json");
    rmdir(dir);
    free(dir);
}

static void test_token_bytes(void **state)
{
    (void)state;
    size_t len = 99;
    const char *b = tokenizer_token_bytes(gpt2, 15496, &len);
    assert_int_equal(len, 5);
    assert_memory_equal(b, "Hello", 5);
    b = tokenizer_token_bytes(gpt2, 220, &len);
    assert_int_equal(len, 1);
    assert_int_equal(b[0], ' ');
    /* Ids 0..255 are the 256 single bytes, each once. */
    int seen[256] = {0};
    for (int32_t id = 0; id < 256; id++) {
        b = tokenizer_token_bytes(gpt2, id, &len);
        assert_int_equal(len, 1);
        seen[(unsigned char)b[0]]++;
    }
    for (int i = 0; i < 256; i++)
        assert_int_equal(seen[i], 1);
    assert_null(tokenizer_token_bytes(gpt2, -1, &len));
    assert_int_equal(len, 0);
    assert_null(tokenizer_token_bytes(gpt2, 50257, &len));
    assert_null(tokenizer_token_bytes(NULL, 0, &len));
    assert_non_null(tokenizer_token_bytes(gpt2, 0, NULL));
}

static void test_decode_errors(void **state)
{
    (void)state;
    const int32_t bad_hi[] = {15496, 50257};
    const int32_t bad_lo[] = {-1};
    char *text = (char *)&text;
    size_t len = 99;
    assert_int_equal(tokenizer_decode(gpt2, bad_hi, 2, &text, &len), PS_ERR_RANGE);
    assert_null(text);
    assert_non_null(strstr(err_msg(), "50257 at position 1"));
    assert_int_equal(tokenizer_decode(gpt2, bad_lo, 1, &text, &len), PS_ERR_RANGE);
    assert_int_equal(tokenizer_decode(gpt2, NULL, 1, &text, &len), PS_ERR_INVALID);
}

static void test_encode_errors(void **state)
{
    (void)state;
    int32_t *ids = (int32_t *)&ids;
    size_t n = 99;
    assert_int_equal(tokenizer_encode(NULL, "x", 1, &ids, &n), PS_ERR_INVALID);
    assert_null(ids);
    assert_int_equal(tokenizer_encode(gpt2, NULL, 1, &ids, &n), PS_ERR_INVALID);
    assert_int_equal(tokenizer_encode(gpt2, "x", 1, NULL, &n), PS_ERR_INVALID);
    /* The limit is checked before the text is read. */
    assert_int_equal(tokenizer_encode(gpt2, "x", TOKENIZER_MAX_TEXT_BYTES + 1, &ids, &n), PS_ERR_NOMEM);
    assert_non_null(strstr(err_msg(), "over the limit"));
}

/* 200k letters are one pre-token: BPE must be O(n log n), not O(n^2). */
static void test_long_word(void **state)
{
    (void)state;
    size_t len = 200000;
    char *s = malloc(len);
    assert_non_null(s);
    memset(s, 'a', len);
    expect_decoded(gpt2, s, len, s, len);
    for (size_t i = 0; i < len; i++)
        s[i] = (char)('a' + (i * 7 + i / 13) % 26);
    expect_decoded(gpt2, s, len, s, len);
    free(s);
}

/* More distinct words than the per-call cache keeps: encoding the halves
 * separately (split before a " word") must give the same ids as the whole. */
static void test_many_distinct_words(void **state)
{
    (void)state;
    size_t n_words = 50000, cap = n_words * 8 + 1, o = 0;
    char *s = malloc(cap);
    assert_non_null(s);
    size_t half = 0;
    for (size_t w = 0; w < n_words; w++) {
        if (w == n_words / 2)
            half = o;
        s[o++] = ' ';
        for (size_t x = w + 1; x > 0; x /= 26)
            s[o++] = (char)('a' + x % 26);
    }
    int32_t *all = NULL, *a = NULL, *b = NULL;
    size_t n_all, n_a, n_b;
    assert_int_equal(tokenizer_encode(gpt2, s, o, &all, &n_all), PS_OK);
    assert_int_equal(tokenizer_encode(gpt2, s, half, &a, &n_a), PS_OK);
    assert_int_equal(tokenizer_encode(gpt2, s + half, o - half, &b, &n_b), PS_OK);
    assert_int_equal(n_all, n_a + n_b);
    assert_memory_equal(all, a, n_a * sizeof *a);
    assert_memory_equal(all + n_a, b, n_b * sizeof *b);
    expect_decoded(gpt2, s, o, s, o);
    free(all);
    free(a);
    free(b);
    free(s);
}

typedef struct {
    const char *text;
    size_t len;
    const int32_t *want;
    size_t n_want;
    int ok;
} thread_job;

static void *encode_thread(void *arg)
{
    thread_job *job = arg;
    job->ok = 1;
    for (int rep = 0; rep < 20; rep++) {
        int32_t *ids = NULL;
        size_t n = 0;
        if (tokenizer_encode(gpt2, job->text, job->len, &ids, &n) != PS_OK || n != job->n_want ||
            memcmp(ids, job->want, n * sizeof *ids) != 0)
            job->ok = 0;
        free(ids);
    }
    return NULL;
}

/* encode takes a const tokenizer: concurrent calls must not interfere. */
static void test_threads(void **state)
{
    (void)state;
    size_t len = 0, cap = 64 * 1024;
    char *text = malloc(cap);
    assert_non_null(text);
    while (len + 80 < cap)
        len += (size_t)snprintf(text + len, cap - len, "Sentence %zu: it's a \xE2\x80\x9Ctest\xE2\x80\x9D of threads. ", len);
    int32_t *want = NULL;
    size_t n_want = 0;
    assert_int_equal(tokenizer_encode(gpt2, text, len, &want, &n_want), PS_OK);
    pthread_t th[4];
    thread_job jobs[4];
    for (int i = 0; i < 4; i++) {
        jobs[i] = (thread_job){text, len, want, n_want, 0};
        assert_int_equal(pthread_create(&th[i], NULL, encode_thread, &jobs[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        assert_int_equal(pthread_join(th[i], NULL), 0);
        assert_true(jobs[i].ok);
    }
    free(want);
    free(text);
}

/* ------------------------------------------------------------------ */
/* Small tokenizers: BPE semantics and loader errors                  */

static void test_tiny_tokenizer(void **state)
{
    (void)state;
    write_tiny(tiny_tokens, TINY_N, "", TINY_MERGES);
    tokenizer *t = NULL;
    assert_int_equal(load_tiny(&t), PS_OK);
    /* Not 50257 tokens: accepted. */
    assert_int_equal(tokenizer_vocab_size(t), 259);
    /* Byte b has id b here; "ab"=256, "abc"=257, EOT=258. */
    EXPECT(t, "abcab", 257, 256);
    EXPECT(t, "abc<|endoftext|>ab c", 257, 258, 256, 32, 99);
    tokenizer_free(t);

    /* CRLF line ends and no "#version" line are accepted. */
    write_tiny(tiny_tokens, TINY_N, "", "a b\r\nab c\r\n");
    assert_int_equal(load_tiny(&t), PS_OK);
    EXPECT(t, "abcab", 257, 256);
    tokenizer_free(t);

    /* Without "<|endoftext|>" in the vocabulary the marker is plain text. */
    write_tiny(tiny_tokens, 2, "", TINY_MERGES);
    assert_int_equal(load_tiny(&t), PS_OK);
    EXPECT(t, "<|endoftext|>", '<', '|', 'e', 'n', 'd', 'o', 'f', 't', 'e', 'x', 't', '|', '>');
    tokenizer_free(t);
}

/*
 * encoder.py merges every occurrence of the best pair in one pass before
 * looking at the pairs that pass creates.  With ranks "ab a" (0) < "a b"
 * (1), "abab" -> a b a b -> (pass of "a b") ab ab: done, because "ab ab"
 * has no rank.  Merging greedily one pair at a time would instead take
 * "ab a" as soon as the first "ab" exists and end with "aba" "b".
 */
static void test_bpe_pass_semantics(void **state)
{
    (void)state;
    static const char *const toks[] = {"ab", "aba", "aa"};
    write_tiny(toks, 3, "", "#version: 0.2\nab a\na b\na a\n");
    tokenizer *t = NULL;
    assert_int_equal(load_tiny(&t), PS_OK);
    EXPECT(t, "abab", 256, 256);
    /* Non-overlapping, leftmost first: a a a -> aa a. */
    EXPECT(t, "aaa", 258, 'a');
    EXPECT(t, "aaaa", 258, 258);
    tokenizer_free(t);
}

static void test_load_errors(void **state)
{
    (void)state;
    static const char *const ok_merges = TINY_MERGES;

    /* Missing files. */
    remove_file("vocab.json");
    write_file("merges.txt", ok_merges);
    expect_load_error(PS_ERR_IO, "vocab.json: cannot open");
    write_tiny(tiny_tokens, TINY_N, "", ok_merges);
    remove_file("merges.txt");
    expect_load_error(PS_ERR_IO, "merges.txt: cannot open");

    /* Truncated JSON. */
    char *v = vocab_json(256, tiny_tokens, TINY_N, "");
    v[strlen(v) / 2] = '\0';
    write_file("vocab.json", v);
    free(v);
    write_file("merges.txt", ok_merges);
    expect_load_error(PS_ERR_FORMAT, "vocab.json: not valid JSON");

    /* Not an object. */
    write_file("vocab.json", "[\"a\", \"b\"]");
    expect_load_error(PS_ERR_FORMAT, "expected a JSON object");
    write_file("vocab.json", "{}");
    expect_load_error(PS_ERR_FORMAT, "vocabulary has 0 tokens");

    /* Id out of range, negative, reused, not an integer. */
    write_tiny(tiny_tokens, TINY_N, ", \"zz\": 5000", ok_merges);
    expect_load_error(PS_ERR_FORMAT, "token 'zz' has id 5000, outside 0..259");
    write_tiny(tiny_tokens, TINY_N, ", \"zz\": -1", ok_merges);
    expect_load_error(PS_ERR_FORMAT, "has id -1");
    write_tiny(tiny_tokens, TINY_N, ", \"zz\": 256", ok_merges);
    expect_load_error(PS_ERR_FORMAT, "id 256 is used by both");
    write_tiny(tiny_tokens, TINY_N, ", \"zz\": 259.0", ok_merges);
    expect_load_error(PS_ERR_FORMAT, "token 'zz' has a fractional id");
    write_tiny(tiny_tokens, TINY_N, ", \"zz\": \"259\"", ok_merges);
    expect_load_error(PS_ERR_FORMAT, "token 'zz' has a non-numeric id");
    /* Duplicate key (jansson's message names it). */
    write_tiny(tiny_tokens, TINY_N, ", \"ab\": 259", ok_merges);
    expect_load_error(PS_ERR_FORMAT, "vocab.json: not valid JSON");

    /* A character that is not a byte character, a byte without a token. */
    write_tiny(tiny_tokens, TINY_N, ", \"a b\": 259", ok_merges);
    expect_load_error(PS_ERR_FORMAT, "contains U+0020");
    v = vocab_json('A', tiny_tokens, TINY_N, "");
    write_file("vocab.json", v);
    free(v);
    expect_load_error(PS_ERR_FORMAT, "no token for byte 0x41");

    /* Bad merges lines: line numbers count the "#version" line. */
    write_tiny(tiny_tokens, TINY_N, "", "#version: 0.2\na b\nab c d\n");
    expect_load_error(PS_ERR_FORMAT, "merges.txt:3: expected two tokens separated by one space, got 'ab c d'");
    write_tiny(tiny_tokens, TINY_N, "", "#version: 0.2\na b\nabc\n");
    expect_load_error(PS_ERR_FORMAT, "merges.txt:3: expected two tokens");
    write_tiny(tiny_tokens, TINY_N, "", "#version: 0.2\na  b\n");
    expect_load_error(PS_ERR_FORMAT, "merges.txt:2: expected two tokens");
    write_tiny(tiny_tokens, TINY_N, "", "#version: 0.2\na b\nab zz\n");
    expect_load_error(PS_ERR_FORMAT, "merges.txt:3: merge 'ab zz' uses 'zz', which is not in the vocabulary");
    write_tiny(tiny_tokens, TINY_N, "", "#version: 0.2\nb c\n");
    expect_load_error(PS_ERR_FORMAT, "merges.txt:2: merge 'b c' uses 'bc', which is not in the vocabulary");
    write_tiny(tiny_tokens, TINY_N, "", "#version: 0.2\na b\nab c\na b\n");
    expect_load_error(PS_ERR_FORMAT, "merges.txt:4: merge 'a b' repeats line 2");
    write_tiny(tiny_tokens, TINY_N, "", "#version: 0.2\na b\n\nab c\n");
    expect_load_error(PS_ERR_FORMAT, "merges.txt:3: blank line between merges");
    /* Trailing blank lines are fine. */
    write_tiny(tiny_tokens, TINY_N, "", "#version: 0.2\na b\nab c\n\n\n");
    tokenizer *t = NULL;
    assert_int_equal(load_tiny(&t), PS_OK);
    tokenizer_free(t);

    /* NULL arguments. */
    assert_int_equal(tokenizer_load(NULL, "v", "m"), PS_ERR_INVALID);
    assert_int_equal(tokenizer_load(&t, NULL, "m"), PS_ERR_INVALID);
    assert_null(t);
}

static void test_load_dir_and_model(void **state)
{
    (void)state;
    tokenizer *t = NULL;
    char *empty = tmp_path("empty");
    mkdir(empty, 0700);

    /* No files: the error names both layouts. */
    assert_int_equal(tokenizer_load_dir(&t, empty), PS_ERR_IO);
    assert_non_null(strstr(err_msg(), "vocab.json + merges.txt or encoder.json + vocab.bpe"));
    assert_null(t);

    /* OpenAI's file names work as well as HF's. */
    write_tiny(tiny_tokens, TINY_N, "", TINY_MERGES);
    char *v = tmp_path("vocab.json"), *m = tmp_path("merges.txt");
    char *e = tmp_path("encoder.json"), *b = tmp_path("vocab.bpe");
    assert_int_equal(rename(v, e), 0);
    assert_int_equal(rename(m, b), 0);
    assert_int_equal(tokenizer_load_dir(&t, tmp_dir), PS_OK);
    assert_int_equal(tokenizer_vocab_size(t), 259);
    tokenizer_free(t);

    /* Explicit directory first, and never replaced by a fallback. */
    assert_int_equal(tokenizer_load_for_model(&t, gpt2_dir(), tmp_dir), PS_OK);
    assert_int_equal(tokenizer_vocab_size(t), 259);
    tokenizer_free(t);
    assert_int_equal(tokenizer_load_for_model(&t, tmp_dir, empty), PS_ERR_IO);
    assert_null(t);

    /* Then the model directory, then $PATCHSWEEP_TOKENIZER. */
    unsetenv("PATCHSWEEP_TOKENIZER");
    assert_int_equal(tokenizer_load_for_model(&t, tmp_dir, NULL), PS_OK);
    assert_int_equal(tokenizer_vocab_size(t), 259);
    tokenizer_free(t);
    setenv("PATCHSWEEP_TOKENIZER", tmp_dir, 1);
    assert_int_equal(tokenizer_load_for_model(&t, empty, NULL), PS_OK);
    assert_int_equal(tokenizer_vocab_size(t), 259);
    tokenizer_free(t);
    assert_int_equal(tokenizer_load_for_model(&t, NULL, NULL), PS_OK);
    assert_int_equal(tokenizer_vocab_size(t), 259);
    tokenizer_free(t);
    unsetenv("PATCHSWEEP_TOKENIZER");
#ifdef PS_TOKENIZER_DIR
    /* Finally the directory `make tokenizer` fetched. */
    if (fs_is_file(PS_TOKENIZER_DIR "/encoder.json")) {
        assert_int_equal(tokenizer_load_for_model(&t, empty, NULL), PS_OK);
        assert_int_equal(tokenizer_vocab_size(t), 50257);
        tokenizer_free(t);
    }
#endif
    /* A directory whose files are broken is an error, not skipped. */
    write_file("encoder.json", "{");
    assert_int_equal(tokenizer_load_for_model(&t, tmp_dir, NULL), PS_ERR_FORMAT);
    assert_non_null(strstr(err_msg(), "encoder.json: not valid JSON"));
    assert_null(t);

    unlink(e);
    unlink(b);
    free(v);
    free(m);
    free(e);
    free(b);
    rmdir(empty);
    free(empty);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vocab_size),
        cmocka_unit_test(test_known_encodings),
        cmocka_unit_test(test_whitespace_class),
        cmocka_unit_test(test_endoftext),
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_invalid_utf8),
        cmocka_unit_test(test_single_token),
        cmocka_unit_test(test_single_token_in_context),
        cmocka_unit_test(test_token_bytes),
        cmocka_unit_test(test_decode_errors),
        cmocka_unit_test(test_encode_errors),
        cmocka_unit_test(test_long_word),
        cmocka_unit_test(test_many_distinct_words),
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_tiny_tokenizer),
        cmocka_unit_test(test_bpe_pass_semantics),
        cmocka_unit_test(test_load_errors),
        cmocka_unit_test(test_load_dir_and_model),
    };
    return cmocka_run_group_tests_name("tokenizer", tests, group_setup, group_teardown);
}
