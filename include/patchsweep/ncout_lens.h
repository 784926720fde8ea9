/*
 * ncout_lens: the logit lens of a dataset as one NetCDF-4 file
 * (`patchsweep lens --dataset FILE.jsonl -o OUT.nc`).  Each prompt is the
 * item's clean prompt, decoded at its last position, with its `answer`.
 *
 * Schema (contract):
 *   dimensions
 *     prompt    unlimited, one per dataset item, in file order
 *     layer     n_layer + 1: index 0 = the embedding output
 *               (hook_embed + hook_pos_embed = blocks.0.hook_resid_pre),
 *               index l + 1 = blocks.l.hook_resid_post
 *     topk      k of --top-k
 *     position  the longest prompt's tokens (with <|endoftext|> unless --no-bos)
 *   variables
 *     layer_label(layer)            string  "embed", "0", "1", ...
 *     hook(layer)                   string  the hook name each layer decodes
 *     prob(prompt, layer)           double  softmax(W_U ln_f(x))[answer]
 *     logprob(prompt, layer)        double  log of prob (logit - logsumexp)
 *     rank(prompt, layer)           int     logits strictly greater than the answer's (0 = top-1)
 *     reciprocal_rank(prompt, layer) double 1 / (rank + 1)
 *     topk_id(prompt, layer, topk)  int     the k most likely tokens, best first
 *     topk_prob(prompt, layer, topk) double their probabilities
 *     topk_token(prompt, layer, topk) string their text
 *     answer_id(prompt)             int
 *     answer(prompt)                string
 *     length(prompt)                int     tokens in the prompt
 *     token_id(prompt, position)    int     _FillValue -1 past length
 *     token(prompt, position)       string  "" past length
 *     done(prompt)                  byte    1 when every value of the prompt is written
 *   global attributes: the provenance of ncout.h, analysis = "lens",
 *     prepend_bos ("true"/"false"), dataset (the JSONL path), decoded_position = "last".
 * Token strings are the decoded bytes with invalid UTF-8 shown as U+FFFD.
 * The engine's lens_dataset.h runs the model and writes the file with this
 * writer.
 * Opens in xarray with no extra code: xr.open_dataset("lens.nc").
 */
#ifndef PS_NCOUT_LENS_H
#define PS_NCOUT_LENS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "model.h"
#include "ncout.h"
#include "tokenizer.h"

typedef struct {
    ncout_file *f;
    size_t n_rows, k, max_T;
    int v_prob, v_logprob, v_rank, v_rr, v_topk_id, v_topk_prob, v_topk_token;
    int v_answer_id, v_answer, v_length, v_token_id, v_token, v_done;
} ncout_lens;

/* One decoded layer's statistics of the answer (the engine's lens_answer,
 * as the file stores them). */
typedef struct {
    double prob, logprob, reciprocal_rank;
    size_t rank;             /* logits strictly greater than the answer's */
} ncout_lens_answer;

/* One prompt's logit lens as the writer takes it: n_rows layers, top k. */
typedef struct {
    size_t n_rows, k;
    int32_t answer;                 /* the answer's token id; < 0: none (refused) */
    const ncout_lens_answer *ans;   /* [n_rows] */
    const int32_t *top_id;          /* [n_rows, k] best first */
    const double *top_prob;         /* [n_rows, k] */
} ncout_lens_view;

/* Define the schema in a file made by ncout_create (provenance included) and
 * write the per-layer variables: layer_label[n_rows] and hook[n_rows] (the
 * hook name each layer decodes). */
ps_status ncout_lens_define(ncout_lens *w, ncout_file *f, model *m, size_t n_rows, const char *const *layer_label,
                            const char *const *hook, size_t max_T, size_t k, bool bos, const char *dataset_path);

/* Everything of one prompt at index `prompt`: v is its decoded lens (with an
 * answer), tokens[0..T) its ids, answer its text. */
ps_status ncout_lens_put(ncout_lens *w, size_t prompt, const ncout_lens_view *v, const tokenizer *tok,
                         const int32_t *tokens, size_t T, const char *answer);

#endif
