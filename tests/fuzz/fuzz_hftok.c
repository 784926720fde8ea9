/*
 * Fuzz target: tokenizer.json parsing (hftok_load_mem) and encoding with
 * what it accepts.  The input is the file's text, then optionally a NUL
 * byte and a text to encode (any bytes); without one a few fixed texts are
 * encoded.
 *
 * Checked: a refused file gives one line naming it; an accepted one encodes
 * any text to ids that all have a token, and decodes them back without
 * error; its BOS, when it has one, is a token.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "hftok.h"

#define NAME "fuzz/tokenizer.json"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_text(const hftok *t, const char *text, size_t len)
{
    int32_t *ids = NULL;
    size_t n = 0;
    ps_status st = hftok_encode(t, text, len, &ids, &n);
    fuzz_check_status(st, NULL);
    if (st != PS_OK)
        return; /* a regex may hit PCRE2's match limit: an error, not a crash */
    for (size_t i = 0; i < n; i++) {
        size_t l;
        FUZZ_REQUIRE(hftok_token_bytes(t, ids[i], &l) != NULL, "id %d has no token", (int)ids[i]);
    }
    char *back = NULL;
    size_t bl = 0;
    st = hftok_decode(t, ids, n, &back, &bl);
    fuzz_check_status(st, NULL);
    FUZZ_REQUIRE(st == PS_OK && back && back[bl] == '\0', "decode of encoded ids failed: %s", err_msg());
    free(back);
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* Keep runs fast: real files are megabytes, the fuzzer's a few kB. */
    if (size > ((size_t)1 << 16))
        return 0;
    const char *d = (const char *)data;
    const char *nul = memchr(d, '\0', size);
    size_t jl = nul ? (size_t)(nul - d) : size;
    hftok *t = NULL;
    ps_status st = hftok_load_mem(&t, NAME, d, jl);
    fuzz_check_status(st, NAME);
    if (st != PS_OK)
        return 0;
    int32_t bos = hftok_bos_id(t);
    size_t l;
    FUZZ_REQUIRE(bos < 0 || hftok_token_bytes(t, bos, &l), "BOS %d has no token", (int)bos);
    if (nul) {
        check_text(t, nul + 1, size - jl - 1);
    } else {
        static const char *const texts[] = {"", " ", "Hello world", "  a\tb\r\n\n 123456 <s> <|x|>",
                                            "\xe2\x96\x81\xf0\x9f\x98\x80\xff\xc3"};
        for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++)
            check_text(t, texts[i], strlen(texts[i]));
    }
    hftok_free(t);
    return 0;
}
