/*
 * tok_dump: our side of the tokenizer comparison with the JS reference
 * (tests/integration/test_tokenizer_js.py).
 *
 *   tok_dump CORPUS [TOKENIZER_DIR]
 *     CORPUS has one hex-encoded item per line (tokenizer_corpus.py).  Prints
 *     one JSON array of ids per line on stdout.  Checks on every item:
 *       valid UTF-8 x:    decode(encode(x)) == x;
 *       invalid UTF-8 x:  decode(encode(x)) is valid UTF-8 and encodes to
 *                         the same ids (replacement happened once, up front);
 *     a failure prints "ROUNDTRIP-FAIL line N: ..." on stderr and makes the
 *     exit status 1.  A summary line goes to stderr.
 *   tok_dump --bench FILE [TOKENIZER_DIR]
 *     Encodes FILE as one text and prints bytes, tokens and MB/s on stdout.
 *
 * TOKENIZER_DIR defaults to $PS_TOKENIZER, then tokenizer_load_for_model's
 * search.  Exit status 2: usage, I/O or tokenizer error.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fsutil.h"
#include "tokenizer.h"

/* The corpus is a few hundred kB; --bench texts a few MB. */
#define DUMP_MAX_FILE_BYTES ((size_t)256 << 20)

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Well-formed UTF-8 per Unicode Table 3-7: lead byte -> number of
 * continuation bytes and the allowed range of the first of them. */
static bool utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char b = s[i], lo = 0x80, hi = 0xBF;
        size_t need = 0;
        if (b >= 0xC2 && b <= 0xDF) {
            need = 1;
        } else if (b >= 0xE0 && b <= 0xEF) {
            need = 2;
            lo = b == 0xE0 ? 0xA0 : 0x80;
            hi = b == 0xED ? 0x9F : 0xBF;
        } else if (b >= 0xF0 && b <= 0xF4) {
            need = 3;
            lo = b == 0xF0 ? 0x90 : 0x80;
            hi = b == 0xF4 ? 0x8F : 0xBF;
        } else if (b >= 0x80) {
            return false;
        }
        for (size_t k = 1; k <= need; k++) {
            if (i + k >= n || s[i + k] < lo || s[i + k] > hi)
                return false;
            lo = 0x80;
            hi = 0xBF;
        }
        i += need + 1;
    }
    return true;
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static int load(tokenizer **t, const char *dir)
{
    if (!dir) {
        const char *env = getenv("PS_TOKENIZER");
        dir = env && *env ? env : NULL;
    }
    ps_status st = dir ? tokenizer_load_dir(t, dir) : tokenizer_load_for_model(t, NULL, NULL);
    if (st != PS_OK) {
        fprintf(stderr, "tok_dump: %s: %s\n", err_name(st), err_msg());
        return 2;
    }
    return 0;
}

static int bench(const char *path, const char *dir)
{
    tokenizer *t;
    char *data;
    size_t len;
    ps_status st = fs_read_file(path, DUMP_MAX_FILE_BYTES, &data, &len);
    if (st != PS_OK) {
        fprintf(stderr, "tok_dump: %s\n", err_msg());
        return 2;
    }
    if (load(&t, dir)) {
        free(data);
        return 2;
    }
    int32_t *ids;
    size_t n;
    double t0 = now_seconds();
    st = tokenizer_encode(t, data, len, &ids, &n);
    double secs = now_seconds() - t0;
    if (st != PS_OK) {
        fprintf(stderr, "tok_dump: %s\n", err_msg());
    } else {
        printf("bytes %zu tokens %zu seconds %.4f MB/s %.2f\n", len, n, secs, (double)len / 1e6 / secs);
        free(ids);
    }
    free(data);
    tokenizer_free(t);
    return st == PS_OK ? 0 : 2;
}

/* The checks described at the top for item `line_no`; false on failure. */
static bool check_item(const tokenizer *t, size_t line_no, const unsigned char *item, size_t len,
                       const int32_t *ids, size_t n)
{
    char *back;
    size_t back_len;
    ps_status st = tokenizer_decode(t, ids, n, &back, &back_len);
    if (st != PS_OK) {
        fprintf(stderr, "ROUNDTRIP-FAIL line %zu: decode: %s\n", line_no, err_msg());
        return false;
    }
    bool ok;
    if (utf8_valid(item, len)) {
        ok = back_len == len && memcmp(back, item, len) == 0;
        if (!ok)
            fprintf(stderr, "ROUNDTRIP-FAIL line %zu: decode(encode(x)) has %zu bytes, x has %zu or differs\n",
                    line_no, back_len, len);
    } else {
        int32_t *again = NULL;
        size_t n2 = 0;
        ok = utf8_valid((const unsigned char *)back, back_len) &&
             tokenizer_encode(t, back, back_len, &again, &n2) == PS_OK && n2 == n &&
             memcmp(again, ids, n * sizeof *ids) == 0;
        if (!ok)
            fprintf(stderr, "ROUNDTRIP-FAIL line %zu: invalid UTF-8 item: decoded text is not valid UTF-8 "
                            "or does not re-encode to the same ids\n", line_no);
        free(again);
    }
    free(back);
    return ok;
}

static int dump(const char *path, const char *dir)
{
    tokenizer *t;
    char *data;
    size_t len;
    ps_status st = fs_read_file(path, DUMP_MAX_FILE_BYTES, &data, &len);
    if (st != PS_OK) {
        fprintf(stderr, "tok_dump: %s\n", err_msg());
        return 2;
    }
    if (load(&t, dir)) {
        free(data);
        return 2;
    }
    unsigned char *item = malloc(len / 2 + 1);
    if (!item) {
        fprintf(stderr, "tok_dump: out of memory\n");
        free(data);
        tokenizer_free(t);
        return 2;
    }
    size_t line_no = 0, n_items = 0, n_bytes = 0, n_tokens = 0, n_fail = 0;
    double secs = 0;
    int rc = 0;
    char *p = data, *end = data + len;
    while (p < end) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        char *le = nl ? nl : end;
        line_no++;
        size_t hex_len = (size_t)(le - p), k = 0;
        bool ok = hex_len % 2 == 0;
        for (size_t i = 0; ok && i < hex_len; i += 2) {
            int hi = hex_value(p[i]), lo = hex_value(p[i + 1]);
            ok = hi >= 0 && lo >= 0;
            item[k++] = (unsigned char)(hi * 16 + lo);
        }
        if (!ok) {
            fprintf(stderr, "tok_dump: %s:%zu: not an even number of hex digits\n", path, line_no);
            rc = 2;
            break;
        }
        int32_t *ids;
        size_t n;
        double t0 = now_seconds();
        st = tokenizer_encode(t, (const char *)item, k, &ids, &n);
        secs += now_seconds() - t0;
        if (st != PS_OK) {
            fprintf(stderr, "tok_dump: %s:%zu: %s\n", path, line_no, err_msg());
            rc = 2;
            break;
        }
        putchar('[');
        for (size_t i = 0; i < n; i++)
            printf(i ? ",%ld" : "%ld", (long)ids[i]);
        fputs("]\n", stdout);
        if (!check_item(t, line_no, item, k, ids, n))
            n_fail++;
        n_items++;
        n_bytes += k;
        n_tokens += n;
        free(ids);
        p = nl ? nl + 1 : end;
    }
    fprintf(stderr, "tok_dump: %zu items, %zu bytes, %zu tokens, %zu round-trip failures, %.1f MB/s\n", n_items,
            n_bytes, n_tokens, n_fail, secs > 0 ? (double)n_bytes / 1e6 / secs : 0.0);
    free(item);
    free(data);
    tokenizer_free(t);
    if (fflush(stdout) != 0) {
        fprintf(stderr, "tok_dump: cannot write the ids\n");
        rc = 2;
    }
    return rc ? rc : n_fail ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && argc <= 4 && strcmp(argv[1], "--bench") == 0)
        return bench(argv[2], argc == 4 ? argv[3] : NULL);
    if (argc < 2 || argc > 3 || argv[1][0] == '-') {
        fprintf(stderr, "usage: tok_dump CORPUS [TOKENIZER_DIR]\n       tok_dump --bench FILE [TOKENIZER_DIR]\n");
        return 2;
    }
    return dump(argv[1], argc == 3 ? argv[2] : NULL);
}
