/*
 * lens: early decoding (the logit lens) and residual-stream decomposition,
 * over a finished forward_cache: the worksheet's layer_decode, rr_per_layer,
 * prob_of_answer and "subtract the FFN update" experiment, and the direct
 * logit attribution of TransformerLens' decompose_resid + logit_attrs.
 *
 * Residual rows of a run at one position p ("layers" of the lens), n_layer + 1:
 *   row 0      blocks.0.hook_resid_pre = hook_embed + hook_pos_embed  label "embed"
 *   row l + 1  blocks.l.hook_resid_post                              label "l"
 * Decoding a row x [d] applies the final LayerNorm and the unembedding:
 *   logits[V] = W_U ln_f(x),  W_U = model.unembed [V, d]
 * so the last row's decoding is the model's own logits at p (the seed's
 * layer_decode without its HF quirk of ln_f already applied to the last
 * hidden state).
 *
 * Per decoded row and answer token a:
 *   prob = softmax(logits)[a],  logprob = logits[a] - logsumexp(logits)
 *   rank = #{v : logits[v] > logits[a]}   (0 = top-1; equal logits do not
 *          push a down; a count, so no vocabulary sort)
 *   reciprocal_rank = 1 / (rank + 1)      (the seed's rr_per_layer)
 * Top-k: the k largest logits by partial selection (a k-entry min-heap over
 * the vocabulary, O(V log k)), ordered by logit descending, equal logits by
 * lower id.  Sums are in double; logits are float32 as in the forward pass.
 *
 * Decomposition: block L's output with one component's update removed,
 *   resid_post[L] - attn_out[L]   or   resid_post[L] - mlp_out[L]
 * (the latter is resid_mid[L] up to float rounding).
 *
 * Direct logit attribution to u = W_U[answer] - W_U[wrong] (u = W_U[answer]
 * without a wrong token), at position p, with the final residual
 * r = blocks.{n_layer-1}.hook_resid_post[p] = sum of its components
 *   embed, pos_embed, 0_attn_out, 0_mlp_out, ..., {n_layer-1}_mlp_out
 * and scale = sqrt(var(r) + eps) (biased variance, as ln_f computes it):
 *   part(c)       = (c - mean(c)) / scale . (ln_f.w * u)
 *   part(ln_f.b)  = ln_f.b . u
 * Because centring and the dot product are linear, the parts sum to
 * ln_f(r) . u = logit[answer] - logit[wrong], up to float rounding of the
 * forward pass (the residual error the CLI prints).
 *
 * Families (model.h): the final norm is the family's.  RMSNorm (Llama,
 * Mistral, Qwen2): decoding is x / sqrt(mean(x^2) + eps) * w; the attribution
 * uses no centring and scale = sqrt(mean(r^2) + eps) of the full final
 * residual (TransformerLens' apply_ln_to_stack with ln_final.hook_scale),
 *   part(c) = c / scale . (ln_f.w * u),  part(ln_f.b) = 0 (no bias);
 * rotary models have no position embedding: part(pos_embed) = 0.  The parts
 * still sum to logit[answer] - logit[wrong].  GPT-NeoX: LayerNorm as GPT-2,
 * its parallel residual changes nothing (r is still the sum of the parts).
 */
#ifndef PS_LENS_H
#define PS_LENS_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "forward.h"
#include "hooks.h"
#include "model.h"

/* "No answer" / "no wrong token". */
#define LENS_NO_TOKEN ((int32_t)-1)
#define LENS_MAX_LABEL 32

/* n_layer + 1 residual rows. */
size_t lens_n_rows(const model_config *cfg);

/* The hook a lens row reads: row 0 blocks.0.hook_resid_pre, row l + 1
 * blocks.l.hook_resid_post. */
hook_point lens_row_hook(size_t row);

/* "embed" for row 0, "l" for row l + 1. */
void lens_row_label(size_t row, char buf[LENS_MAX_LABEL]);

/* Copy the n_layer + 1 residual rows at `position` into rows [n_layer + 1, d].
 * A position outside the run's T tokens is PS_ERR_RANGE. */
ps_status lens_gather_rows(const forward_cache *c, size_t position, float *rows);

/* logits[n, V] = ln_f(rows[n, d]) @ W_U^T, with normed [n, d] as the
 * LayerNorm output (the same kernel and weights as the forward pass). */
void lens_decode(const model *m, const float *rows, size_t n, float *normed, float *logits);

/* log sum_v exp(logits[v]), in double, shifted by the maximum. */

typedef struct {
    float logit;
    double prob, logprob;
    size_t rank;              /* logits strictly greater than the answer's */
    double reciprocal_rank;   /* 1 / (rank + 1) */
} lens_answer;

/* Statistics of token `answer` (0 <= answer < V) in one logits row whose
 * logsumexp is lse. */
void lens_answer_stats(const float *logits, size_t V, double lse, int32_t answer, lens_answer *out);

/* ids[0..k) = the k largest logits, best first (k <= V; the caller clamps). */
void lens_top_k(const float *logits, size_t V, size_t k, int32_t *ids);

/* Decoded residual rows with their statistics.  The caller (or
 * lens_gather_rows / lens_decompose) fills rows; lens_view_decode does the
 * rest.  One view can be reused for many runs of the same model. */
typedef struct {
    size_t n_rows, k, V, d;
    int32_t answer;          /* LENS_NO_TOKEN: no answer statistics */
    float *rows;             /* [n_rows, d] the residual rows */
    float *normed;           /* [n_rows, d] ln_f(rows) */
    float *logits;           /* [n_rows, V] */
    double *lse;             /* [n_rows] logsumexp of each logits row */
    int32_t *top_id;         /* [n_rows, k] */
    double *top_prob;        /* [n_rows, k] */
    lens_answer *ans;        /* [n_rows], filled when answer != LENS_NO_TOKEN */
} lens_view;

/* A view of n_rows rows keeping the top k (1 <= k <= vocab_size). */
ps_status lens_view_init(lens_view *v, const model_config *cfg, size_t n_rows, size_t k);
void lens_view_free(lens_view *v);

/* Decode v->rows; answer is a token id or LENS_NO_TOKEN. */
ps_status lens_view_decode(lens_view *v, const model *m, int32_t answer);

/* The logit lens of a run at `position`: gather the n_layer + 1 rows and
 * decode them (v must have lens_n_rows rows). */
ps_status lens_run(lens_view *v, const model *m, const forward_cache *c, size_t position, int32_t answer);

typedef enum { LENS_ATTN_OUT, LENS_MLP_OUT, LENS_COMPONENT_COUNT } lens_component;

/* "attn_out", "mlp_out". */
const char *lens_component_name(lens_component comp);

/* Parse a component name; anything else is PS_ERR_INVALID naming the valid ones. */
ps_status lens_component_parse(const char *s, lens_component *comp);

/* The hook of a component's update at block `layer` (hook_attn_out / hook_mlp_out). */
hook_point lens_component_hook(lens_component comp, size_t layer);

/* Decode block `layer`'s output at `position` as is (row 0) and with the
 * component's update subtracted (row 1); v must have 2 rows.  A layer or
 * position out of range is PS_ERR_RANGE. */
ps_status lens_decompose(lens_view *v, const model *m, const forward_cache *c, size_t layer, lens_component comp,
                         size_t position, int32_t answer);

/* Direct logit attribution (see the top of this file). */
typedef struct {
    size_t n_parts;    /* 2 + 2 n_layer components, then ln_f's bias: 3 + 2 n_layer */
    double *value;     /* [n_parts], owned */
    double scale;      /* sqrt(var(r) + eps) of the full final residual */
    double sum;        /* sum of value */
    double total;      /* ln_final[p] . u: the model's logit[answer] - logit[wrong] */
} lens_attribution;

size_t lens_attribution_count(size_t n_layer);

/* "embed", "pos_embed", "{l}_attn_out", "{l}_mlp_out" (TransformerLens'
 * decompose_resid labels), then "ln_final.b". */
void lens_attribution_label(size_t part, size_t n_layer, char buf[LENS_MAX_LABEL]);

/* Attribute at `position` to answer (and wrong, or LENS_NO_TOKEN).  Token ids
 * outside the vocabulary and positions outside the run are PS_ERR_RANGE. */
ps_status lens_attribute(lens_attribution *a, const model *m, const forward_cache *c, size_t position,
                         int32_t answer, int32_t wrong);
void lens_attribution_free(lens_attribution *a);

#endif
