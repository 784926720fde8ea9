/*
 * hftok_dump: our side of the tokenizer.json comparison with the JS
 * reference (tests/integration/test_hftok.py, tests/tools/hftok_js.js).
 *
 *   hftok_dump CORPUS DIR
 *     CORPUS has one hex-encoded item per line (hftok_corpus.py); DIR holds
 *     tokenizer.json (loaded through tokenizer_load_dir, as the CLI does).
 *     Prints per item one JSON array [ids, ids with the BOS the tokenizer
 *     adds by default, hex of decode(ids) with invalid UTF-8 shown as U+FFFD].
 *   hftok_dump --bench FILE DIR
 *     Encodes FILE as one text; prints "bytes N tokens N seconds S MB/s X".
 *
 * Exit status 2: usage, I/O or tokenizer error.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fsutil.h"
#include "strutil.h"
#include "tokenizer.h"

#define DUMP_MAX_FILE_BYTES ((size_t)256 << 20)

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
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

static void print_ids(const int32_t *ids, size_t n, int32_t first, int has_first)
{
    putchar('[');
    size_t k = 0;
    if (has_first)
        printf("%d", (int)first), k++;
    for (size_t i = 0; i < n; i++, k++)
        printf(k ? ",%d" : "%d", (int)ids[i]);
    putchar(']');
}

static int bench(const char *path, const tokenizer *t)
{
    char *data;
    size_t len;
    if (fs_read_file(path, DUMP_MAX_FILE_BYTES, &data, &len) != PS_OK) {
        fprintf(stderr, "hftok_dump: %s\n", err_msg());
        return 2;
    }
    int32_t *ids = NULL;
    size_t n = 0;
    double t0 = now_seconds();
    ps_status st = tokenizer_encode(t, data, len, &ids, &n);
    double dt = now_seconds() - t0;
    free(data);
    free(ids);
    if (st != PS_OK) {
        fprintf(stderr, "hftok_dump: %s\n", err_msg());
        return 2;
    }
    printf("bytes %zu tokens %zu seconds %.4f MB/s %.3f\n", len, n, dt, dt > 0 ? (double)len / dt / 1e6 : 0.0);
    return 0;
}

int main(int argc, char **argv)
{
    int is_bench = argc == 4 && strcmp(argv[1], "--bench") == 0;
    if (argc != 3 && !is_bench) {
        fprintf(stderr, "usage: hftok_dump CORPUS DIR | hftok_dump --bench FILE DIR\n");
        return 2;
    }
    tokenizer *t = NULL;
    if (tokenizer_load_dir(&t, argv[argc - 1]) != PS_OK) {
        fprintf(stderr, "hftok_dump: %s\n", err_msg());
        return 2;
    }
    if (is_bench) {
        int rc = bench(argv[2], t);
        tokenizer_free(t);
        return rc;
    }
    char *data;
    size_t len;
    if (fs_read_file(argv[1], DUMP_MAX_FILE_BYTES, &data, &len) != PS_OK) {
        fprintf(stderr, "hftok_dump: %s\n", err_msg());
        tokenizer_free(t);
        return 2;
    }
    int rc = 0;
    char *item = malloc(len / 2 + 1);
    if (!item) {
        fprintf(stderr, "hftok_dump: out of memory\n");
        rc = 2;
    }
    int add_bos = tokenizer_add_bos(t);
    int32_t bos = tokenizer_bos_id(t);
    size_t line = 0;
    for (char *p = data; rc == 0 && p < data + len; line++) {
        char *nl = memchr(p, '\n', (size_t)(data + len - p));
        size_t hl = nl ? (size_t)(nl - p) : (size_t)(data + len - p), n = 0;
        for (size_t i = 0; i + 1 < hl + 1 && i < hl; i += 2) {
            int a = hex_value(p[i]), b = i + 1 < hl ? hex_value(p[i + 1]) : -1;
            if (a < 0 || b < 0) {
                fprintf(stderr, "hftok_dump: %s:%zu: not hex\n", argv[1], line + 1);
                rc = 2;
                break;
            }
            item[n++] = (char)(a * 16 + b);
        }
        if (rc)
            break;
        int32_t *ids = NULL;
        size_t ni = 0;
        char *dec = NULL;
        size_t dl = 0;
        if (tokenizer_encode(t, item, n, &ids, &ni) != PS_OK || tokenizer_decode(t, ids, ni, &dec, &dl) != PS_OK) {
            fprintf(stderr, "hftok_dump: %s:%zu: %s\n", argv[1], line + 1, err_msg());
            free(ids);
            rc = 2;
            break;
        }
        /* invalid UTF-8 as U+FFFD, NUL kept: the reference's string */
        size_t sl = 0;
        str_utf8_repair(dec, dl, true, NULL, &sl);
        char *shown = malloc(sl + 1);
        if (shown)
            str_utf8_repair(dec, dl, true, shown, &sl);
        putchar('[');
        print_ids(ids, ni, 0, 0);
        putchar(',');
        print_ids(ids, ni, bos, add_bos);
        printf(",\"");
        for (size_t k = 0; shown && k < sl; k++)
            printf("%02x", (unsigned char)shown[k]);
        printf("\"]\n");
        free(shown);
        free(dec);
        free(ids);
        p = nl ? nl + 1 : data + len;
    }
    free(item);
    free(data);
    tokenizer_free(t);
    return rc;
}
