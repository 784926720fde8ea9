/*
 * dataset: prompt pairs for patching, as JSONL (one JSON object a line):
 *   {"clean": "...", "corrupted": "...", "answer": " John", "wrong": " Mary",
 *    ...descriptive fields: "template", "io", "s", "order", "country", ...}
 * `answer` is the right next token after the clean prompt, `wrong` the one the
 * corrupted prompt points to; both must be single GPT-2 tokens, and clean and
 * corrupted must tokenize to the same length (checked by dataset_validate).
 *
 * Roles (optional field "roles" of an item): named spans of the clean
 * prompt, each mapped to one token position (dataset_roles_resolve):
 *   "roles": {"IO": [start, end], "S2": {"text": " Mary", "occurrence": 2}}
 * [start, end) are byte offsets into the clean prompt's UTF-8 (characters
 * for ASCII text), 0 <= start < end <= its length; or the `occurrence`-th
 * (1-based, default 1) occurrence of `text` in the clean prompt.  A role's
 * position is the token that contains the span's first byte; END, unless
 * the item names it, is the last token.  Role names: 1..32 bytes of
 * [A-Za-z0-9_+-.]; at most DATASET_MAX_ROLES per dataset.
 *
 * Metadata: every other field whose value is a string in every item that
 * has it, or an integer in every item that has it, and whose name is
 * [A-Za-z0-9_] (at most 64 bytes), is carried into results files as a
 * per-prompt variable item_NAME (dataset_meta_collect).
 *
 * The generators (IOI, capitals) are in dataset_gen.h.
 *
 * Token ids as input (issue 17): an item may carry
 *   "clean_ids": [...], "corrupted_ids": [...], "answer_id": N, "wrong_id": N
 * (all four or none; make-dataset --ids writes them, with <|endoftext|>
 * first).  dataset_tokenize takes them as they are (no BOS added) when there
 * is no tokenizer (the families whose tokenizer is not supported yet) or no
 * text; with a tokenizer and text the text is tokenized as before.  An item
 * with ids may leave out the text fields.  Ids are checked against the
 * vocabulary by the model run (forward_run, patch_pair_init).
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

/* Tokenize item i (t NULL: the item's token ids; see above); errors
 * (unequal lengths, multi-token answers, longer than max_tokens) name
 * "path:line". */
ps_status dataset_tokenize(const dataset *d, size_t i, const tokenizer *t, bool bos,
                           size_t max_tokens, dataset_tokens *out);
/* The same for one record, named `where` in messages ("path:line"). */
ps_status dataset_item_tokenize(const dataset_item *it, const char *where, const tokenizer *t, bool bos,
                                size_t max_tokens, dataset_tokens *out);
void dataset_tokens_free(dataset_tokens *tk);

/* ---- roles ---- */
#define DATASET_FIELD_ROLES "roles"
#define DATASET_ROLE_END "END"
#define DATASET_MAX_ROLES ((size_t)64)
#define DATASET_MAX_ROLE_NAME ((size_t)32)

/* The roles of a dataset: every name any item gives, in order of first
 * appearance, then END if no item names it. */
typedef struct {
    char **names; /* owned, [n] */
    size_t n;
} dataset_roles;

/* Collect the role names of items [0, n_items) (the whole dataset, so that
 * the slices of one sweep agree); validates every item's roles field (its
 * shape and names; offsets against its clean prompt).  Errors name path:line. */
ps_status dataset_roles_collect(const dataset *d, dataset_roles *r);
void dataset_roles_free(dataset_roles *r);

/* The same one record at a time (a streamed dataset): the role names of
 * `it` (named `where` in messages) added to *r (start from {0}), then
 * dataset_roles_finish adds END when no record named it. */
ps_status dataset_roles_add_item(dataset_roles *r, const dataset_item *it, const char *where);
ps_status dataset_roles_finish(dataset_roles *r, const char *where);

/* pos[r->n]: the token position of each role of item i in its clean prompt
 * (tokenized as dataset_tokenize did: ids[n_ids], BOS first when bos), -1
 * when the item does not name it; END is the last token unless named.  The
 * tokens must spell the clean prompt byte for byte (GPT-2's byte-level BPE
 * does), else an error naming the item. */
ps_status dataset_roles_resolve(const dataset *d, size_t i, const dataset_roles *r, const tokenizer *t,
                                const int32_t *ids, size_t n_ids, bool bos, int32_t *pos);
/* The same for one record, named `where` in messages.  Roles of r that the
 * record does not name are -1 (END the last token). */
ps_status dataset_roles_resolve_item(const dataset_item *it, const char *where, const dataset_roles *r,
                                     const tokenizer *t, const int32_t *ids, size_t n_ids, bool bos, int32_t *pos);

/* ---- metadata ---- */
#define DATASET_MAX_META ((size_t)64)
#define DATASET_MAX_META_NAME ((size_t)64)

typedef enum { DATASET_META_STRING, DATASET_META_INT } dataset_meta_kind;

typedef struct {
    char name[DATASET_MAX_META_NAME + 1];
    dataset_meta_kind kind;
} dataset_meta_field;

/* The metadata fields of the dataset (see the opening comment), in order of
 * first appearance; fields past DATASET_MAX_META are dropped. */
typedef struct {
    dataset_meta_field f[DATASET_MAX_META];
    size_t n;
} dataset_meta;

void dataset_meta_collect(const dataset *d, dataset_meta *m);

/* The same one record at a time (a streamed dataset): begin, add every
 * record in file order, end. */
typedef struct {
    dataset_meta m;
    bool bad[DATASET_MAX_META]; /* seen with another type */
} dataset_meta_builder;

void dataset_meta_begin(dataset_meta_builder *b);
void dataset_meta_add_item(dataset_meta_builder *b, const dataset_item *it);
void dataset_meta_end(const dataset_meta_builder *b, dataset_meta *m);

#endif
