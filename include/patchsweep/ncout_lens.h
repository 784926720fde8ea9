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
 * Opens in xarray with no extra code: xr.open_dataset("lens.nc").
 */
#ifndef PS_NCOUT_LENS_H
#define PS_NCOUT_LENS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "lens.h"
#include "model.h"
#include "ncout.h"
#include "tokenizer.h"

typedef struct {
    ncout_file *f;
    size_t n_rows, k, max_T;
    int v_prob, v_logprob, v_rank, v_rr, v_topk_id, v_topk_prob, v_topk_token;
    int v_answer_id, v_answer, v_length, v_token_id, v_token, v_done;
} ncout_lens;

/* Define the schema in a file made by ncout_create (provenance included) and
 * write the per-layer variables. */
ps_status ncout_lens_define(ncout_lens *w, ncout_file *f, model *m, size_t max_T, size_t k, bool bos,
                            const char *dataset_path);

/* Everything of one prompt at index `prompt`: v is its decoded lens
 * (lens_run with an answer), tokens[0..T) its ids, answer its text. */
ps_status ncout_lens_put(ncout_lens *w, size_t prompt, const lens_view *v, const tokenizer *tok,
                         const int32_t *tokens, size_t T, const char *answer);

/* The lens file of a dataset: items [first, first + count) (count 0: to the
 * end), each clean prompt decoded at its last token with its answer.  Every
 * item is tokenized and validated before any compute; the file appears under
 * its name only when complete.  *n_written = prompts written. */
ps_status ncout_lens_write_dataset(const char *output, model *m, const tokenizer *tok, const char *dataset_path,
                                   size_t first, size_t count, bool bos, size_t top_k, size_t *n_written);

#endif
