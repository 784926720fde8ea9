/*
 * evaluate: how well a model does a dataset's task, unpatched
 * (`patchsweep evaluate`).  Per prompt pair, the clean and corrupted forwards
 * of patch_pair_init give
 *   logit diff  = logit[answer] - logit[wrong]  after each prompt
 *   correct     = clean logit diff > 0
 *   top-1       = no token strictly more likely than the answer after the
 *                 clean prompt
 * and over the dataset their means.
 */
#ifndef PS_EVALUATE_H
#define PS_EVALUATE_H

#include <stdbool.h>
#include <stddef.h>

#include "dataset.h"
#include "err.h"
#include "model.h"
#include "tokenizer.h"

typedef struct {
    size_t n;                          /* prompt pairs */
    size_t correct, top1;              /* counts of correct and top-1 pairs */
    double sum_clean_logit_diff, sum_corrupted_logit_diff;
    double accuracy;                   /* correct / n */
    double mean_clean_logit_diff;      /* sum_clean_logit_diff / n */
    double mean_corrupted_logit_diff;  /* sum_corrupted_logit_diff / n */
    double answer_top1;                /* top1 / n */
} evaluate_result;

/* Evaluate every item of d (tokenized with <|endoftext|> when bos).  The
 * first item that does not tokenize stops it with that error; an empty
 * dataset is PS_ERR_INVALID. */
ps_status evaluate_dataset(const model *m, const tokenizer *tok, const dataset *d, bool bos, evaluate_result *r);

#endif
