/*
 * What dataset.c (JSONL, tokenize) shares with dataset_gen.c (generators):
 * building a dataset item by item and the wording of messages.
 */
#ifndef PS_DATASET_INTERNAL_H
#define PS_DATASET_INTERNAL_H

#include <jansson.h>
#include <stddef.h>

#include "dataset.h"
#include "err.h"
#include "tokenizer.h"

/* d->path of generated datasets, and how their items are named in messages. */
#define DATASET_GENERATED_PATH "<generated>"

/* An empty dataset (no allocation). */
void dataset_init(dataset *d);

/* Append obj (reference stolen) as a new item of source line `line` (0 if
 * generated); *cap is the items' capacity; `where` names it in messages. */
ps_status dataset_push(dataset *d, size_t *cap, json_t *obj, size_t line, const char *where);

/* Tokens of s (no <|endoftext|>); errors are wrapped with `where`. */
ps_status dataset_count_tokens(const tokenizer *t, const char *s, size_t *n, const char *where);

/* A short, one-line rendering of user text for error messages. */
void dataset_quote_text(const char *s, char *buf, size_t size);

#endif
