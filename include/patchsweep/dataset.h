/*
 * dataset: prompt pairs for patching, as JSONL (one JSON object a line):
 *   {"clean": "...", "corrupted": "...", "answer": " John", "wrong": " Mary",
 *    ...descriptive fields: "template", "io", "s", "order", "country", ...}
 * `answer` is the right next token after the clean prompt, `wrong` the one the
 * corrupted prompt points to; both must be single GPT-2 tokens, and clean and
 * corrupted must tokenize to the same length (checked by dataset_validate).
 *
 * The generators (IOI, capitals) are in dataset_gen.h.
 */
#ifndef PS_DATASET_H
#define PS_DATASET_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "err.h"
#include "tokenizer.h"

/* Limits of a JSONL file (over one: PS_ERR_NOMEM naming the file, the line
 * and the limit).  Together they keep the reader's memory near 1 GiB at
 * most: jansson spends 30-110 bytes per JSON value, so the value count, not
 * the file size, bounds a file of tiny values.  An IOI record is about 200
 * bytes and 20 values. */
#define DATASET_MAX_LINE_BYTES ((size_t)1 << 20)      /* one line, without its '\n' */
#define DATASET_MAX_BYTES ((size_t)256 << 20)         /* the whole file */
#define DATASET_MAX_VALUES ((size_t)16 << 20)         /* JSON values and keys in the file */
#define DATASET_MAX_ITEMS ((size_t)1000 * 1000)       /* records (also the generators' cap) */

typedef struct {
    json_t *obj;            /* owned reference: the whole record */
    const char *clean;      /* point into obj */
    const char *corrupted;
    const char *answer;
    const char *wrong;
    size_t line;            /* 1-based line in the source file (0 if generated) */
} dataset_item;

typedef struct {
    dataset_item *items;    /* owned */
    size_t n;
    char *path;             /* owned; "<generated>" for generators */
} dataset;

/* Read a JSONL file; blank lines are skipped; errors name path:line. */
ps_status dataset_read_jsonl(dataset *d, const char *path);

/* The same from an open stream (read to its end, not closed); `name` stands
 * for the file in messages and in d->path.  The fuzz target's entry point. */
ps_status dataset_read_jsonl_stream(dataset *d, FILE *f, const char *name);

/* Streaming, for a dataset too large to hold (the sweep): one record at a
 * time, each with its line's byte offset, and any record again by that
 * offset.  The same limits and messages as dataset_read_jsonl. */
typedef struct {
    FILE *f;
    char *buf;                  /* the line buffer */
    char *path;
    size_t line;                /* of the record read last */
    uint64_t offset;            /* of the next line */
    size_t n;                   /* records read by dataset_reader_next */
    size_t total_bytes, total_values;
    bool eof;
} dataset_reader;

ps_status dataset_reader_open(dataset_reader *r, const char *path);

/* The next record into *it (it->obj is the caller's: json_decref it), its
 * line's byte offset into *offset; it->obj NULL at the end of the file. */
ps_status dataset_reader_next(dataset_reader *r, dataset_item *it, uint64_t *offset);

/* The record on line `line` at byte offset `offset` (as dataset_reader_next
 * gave them) again; reading in file order costs no seek.  A record no
 * longer there (the file changed) is PS_ERR_IO. */
ps_status dataset_reader_read_at(dataset_reader *r, uint64_t offset, size_t line, dataset_item *it);

void dataset_reader_close(dataset_reader *r);

/* Write one compact JSON object a line. */
ps_status dataset_write_jsonl(const dataset *d, FILE *out, const char *name_for_errors);

void dataset_free(dataset *d);

/* Tokenized, validated view of one item (prepends <|endoftext|> when bos). */
typedef struct {
    int32_t *clean_ids, *corrupted_ids;  /* owned, [n_tokens] */
    size_t n_tokens;
    int32_t answer_id, wrong_id;
} dataset_tokens;

/* Tokenize item i; errors (unequal lengths, multi-token answers, longer than
 * max_tokens) name "path:line". */
ps_status dataset_tokenize(const dataset *d, size_t i, const tokenizer *t, bool bos,
                           size_t max_tokens, dataset_tokens *out);
/* The same for one record, named `where` in messages ("path:line"). */
ps_status dataset_item_tokenize(const dataset_item *it, const char *where, const tokenizer *t, bool bos,
                                size_t max_tokens, dataset_tokens *out);
void dataset_tokens_free(dataset_tokens *tk);

#endif
