/*
 * lens_dataset: the logit lens of a dataset into one NetCDF file
 * (ncout_lens.h's schema): each item's clean prompt run forward and decoded
 * at its last token with its answer (lens_run), written prompt by prompt by
 * the io writer.  The file appears under its name only when complete.
 */
#ifndef PS_LENS_DATASET_H
#define PS_LENS_DATASET_H

#include <stdbool.h>
#include <stddef.h>

#include "dataset.h"
#include "err.h"
#include "model.h"
#include "tokenizer.h"

/* Items [first, first + count) of the JSONL file dataset_path (count 0: to
 * the end).  Every item is tokenized and validated before any compute.
 * *n_written = prompts written. */
ps_status lens_dataset_write(const char *output, model *m, const tokenizer *tok, const char *dataset_path,
                             size_t first, size_t count, bool bos, size_t top_k, size_t *n_written);

/* The same from prompts already tokenized (the sweep's): tk[i] is item
 * first + i of d (tokenized with bos, every one valid); d->path is recorded
 * in the file. */
ps_status lens_dataset_write_tokens(const char *output, model *m, const tokenizer *tok, const dataset *d,
                                    size_t first, const dataset_tokens *tk, size_t n, bool bos, size_t top_k);

#endif
