/*
 * Fuzz target: the GPT-2 tokenizer on arbitrary input.  The first byte
 * chooses what the rest is:
 *   even: text to encode (any bytes, invalid UTF-8 and NULs included);
 *   odd:  int32 ids (native byte order) to decode, in range or not.
 *
 * Checked: encode always succeeds with ids in [0, V); decoding them gives
 * the text back with each maximal invalid UTF-8 subpart as U+FFFD (the
 * tokenizer's contract); tokenizer_single_token agrees with encode; decode
 * of in-range ids gives the concatenated token bytes, and an out-of-range id
 * is an error.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "fuzz_tok.h"
#include "strutil.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_encode(const char *text, size_t len)
{
    const size_t V = tokenizer_vocab_size(fuzz_tok);
    int32_t *ids = NULL;
    size_t n = 0;
    ps_status st = tokenizer_encode(fuzz_tok, text, len, &ids, &n);
    fuzz_check_status(st, NULL);
    FUZZ_REQUIRE(st == PS_OK, "encode failed: %s", err_msg());
    FUZZ_REQUIRE(len == 0 || n > 0, "%zu bytes encoded to no token", len);
    for (size_t i = 0; i < n; i++)
        FUZZ_REQUIRE(ids[i] >= 0 && (size_t)ids[i] < V, "id %d out of range", (int)ids[i]);

    char *back = NULL;
    size_t back_len = 0;
    st = tokenizer_decode(fuzz_tok, ids, n, &back, &back_len);
    fuzz_check_status(st, NULL);
    FUZZ_REQUIRE(st == PS_OK && back[back_len] == '\0', "decode of encoded ids failed: %s", err_msg());
    /* str_utf8_sanitize also replaces NULs, which the tokenizer keeps; so
     * compare against it only when there are none. */
    if (!memchr(text, '\0', len)) {
        char *want = str_utf8_sanitize(text, len);
        FUZZ_REQUIRE(want, "out of memory");
        FUZZ_REQUIRE(back_len == strlen(want) && memcmp(back, want, back_len) == 0,
                     "decode(encode(x)) differs from x with U+FFFD replacements (%zu vs %zu bytes)", back_len,
                     strlen(want));
        free(want);
    } else if (str_utf8_valid(text, len)) {
        FUZZ_REQUIRE(back_len == len && memcmp(back, text, len) == 0, "decode(encode(x)) != x");
    }
    free(back);

    /* single_token takes a C string: only texts without NUL compare. */
    if (!memchr(text, '\0', len)) {
        char *c = malloc(len + 1);
        FUZZ_REQUIRE(c, "out of memory");
        memcpy(c, text, len);
        c[len] = '\0';
        int32_t id = -1;
        st = tokenizer_single_token(fuzz_tok, c, &id);
        free(c);
        fuzz_check_status(st, NULL);
        FUZZ_REQUIRE((st == PS_OK) == (n == 1), "single_token says %s for %zu tokens",
                     st == PS_OK ? "one" : err_msg(), n);
        FUZZ_REQUIRE(st != PS_OK || id == ids[0], "single_token id %d, encode %d", (int)id, (int)ids[0]);
    }
    free(ids);
}

static void check_decode(const uint8_t *data, size_t size)
{
    const size_t V = tokenizer_vocab_size(fuzz_tok);
    size_t n = size / sizeof(int32_t);
    int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    FUZZ_REQUIRE(ids, "out of memory");
    memcpy(ids, data, n * sizeof *ids);
    bool in_range = true;
    size_t want = 0;
    for (size_t i = 0; i < n; i++) {
        size_t len = 0;
        const char *b = tokenizer_token_bytes(fuzz_tok, ids[i], &len);
        in_range &= ids[i] >= 0 && (size_t)ids[i] < V;
        FUZZ_REQUIRE((b != NULL) == (ids[i] >= 0 && (size_t)ids[i] < V), "token_bytes(%d)", (int)ids[i]);
        want += len;
    }
    char *text = NULL;
    size_t len = 0;
    ps_status st = tokenizer_decode(fuzz_tok, ids, n, &text, &len);
    fuzz_check_status(st, NULL);
    FUZZ_REQUIRE((st == PS_OK) == in_range, "decode returned %s", err_name(st));
    if (st == PS_OK) {
        FUZZ_REQUIRE(len == want && text[len] == '\0', "decoded %zu bytes, tokens hold %zu", len, want);
        free(text);
    }
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    if (data[0] % 2 == 0) {
        /* A copy of exactly the text, so reads past its end are caught. */
        char *text = malloc(size - 1 ? size - 1 : 1);
        FUZZ_REQUIRE(text, "out of memory");
        memcpy(text, data + 1, size - 1);
        check_encode(text, size - 1);
        free(text);
    } else {
        check_decode(data + 1, size - 1);
    }
    return 0;
}
