/*
 * patchspec: what an activation-patching run is made of (the worksheet's
 * section 8.1.3, TransformerLens' `patching` module): components, grids and
 * cells, metrics, and the prompt pair with its two unpatched runs.  The
 * engines that evaluate cells are patch.h's; this layer (core) is what io
 * modules (job files, NetCDF output) may know of patching.
 *
 * Terms.  Two prompts of equal token length: clean (the model gets it right)
 * and corrupted.  Denoising (default, the worksheet): run the corrupted
 * prompt and overwrite one activation with its value from the clean run.
 * Noising: run the clean prompt and overwrite with the corrupted value.
 * The run being patched is the *base*, the run the value comes from the
 * *source*.  A cell is one (component, layer, position and/or head).
 *
 * Components (TransformerLens names, batch axis dropped) and grid shapes:
 *   resid_pre, resid_mid, attn_out, mlp_out   (layer, position)
 *   z, q, k, v                                (layer, position, head)
 *   pattern                                   (layer, position, head)
 *   pattern_dest_src                          (layer, position, src_position, head)
 *   z_all_pos, q_all_pos, k_all_pos,
 *   v_all_pos, pattern_all_pos                (layer, head)
 * TransformerLens' functions: z = get_act_patch_attn_head_out_by_pos, q/k/v
 * = get_act_patch_attn_head_{q,k,v}_by_pos (hook_q / hook_k: before the
 * rotary embedding, as TransformerLens patches them), pattern =
 * get_act_patch_attn_head_pattern_by_pos (row `position` of head h's
 * pattern, the destination, patched whole), pattern_dest_src =
 * get_act_patch_attn_head_pattern_dest_src_pos (the one entry [h, position,
 * src_position] overwritten, the row not renormalised).  TransformerLens
 * returns those two head-first, (layer, head, dest_pos[, src_pos]); here the
 * head axis is last in every grid, as in its get_act_patch_attn_head_by_pos_every
 * (which rearranges pattern to (layer, pos, head)).
 * With grouped-query attention (H_kv < H key/value heads) k, v, k_all_pos and
 * v_all_pos have a kv_head axis, one cell per key/value head, as
 * TransformerLens' get_act_patch_attn_head_{k,v}_{by,all}_pos; z, q and
 * pattern stay per query head.
 * Groups: block_every = resid_pre,attn_out,mlp_out;
 *         head_all_pos_every = z_all_pos,q_all_pos,k_all_pos,v_all_pos,pattern_all_pos;
 *         head_by_pos_every = z,q,k,v,pattern (TransformerLens'
 *         get_act_patch_attn_head_{all_pos,by_pos}_every, one variable each).
 *
 * Metrics of the next-token prediction at the last position:
 *   logit_diff  logit[answer] - logit[wrong]  (default)
 *   prob        p(answer)
 *   logprob     log p(answer)
 *   kl          KL(clean || patched) of the next-token distributions
 * normalized = (patched - corrupted) / (clean - corrupted), where clean and
 * corrupted are the metric of the unpatched runs, in both directions (0 = the
 * corrupted behaviour, 1 = the clean behaviour).
 *
 * Sources (patch --source, [patch] source): where a cell's value comes from.
 *   clean, corrupted  the other prompt's run, as above (clean: denoise,
 *                     corrupted: noise; the direction follows from it)
 *   zero              0 (zero ablation)
 *   mean              the mean activation over a set of prompts (mean
 *                     ablation): for position t the mean over the set's
 *                     prompts that have a position t (longer than t tokens);
 *                     pattern[h, i, j] the mean over those with a row i.
 *   resample          the activation of another prompt of the dataset with
 *                     the same token length (resample ablation; seeded).
 * An ablation overwrites the base run's activation, and the base run is the
 * clean one unless the direction says denoise (then the corrupted run is
 * ablated); its set and resampled prompts are runs of the same kind (clean
 * prompts when the clean run is ablated).  The normalization is unchanged:
 * for an ablation of the clean run 1 = no effect, 0 = the ablation brings
 * the metric down to the corrupted run's.  The engines take an ablation as
 * patch_pair.source, a cache holding the replacement values (ablate.h).
 */
#ifndef PS_PATCHSPEC_H
#define PS_PATCHSPEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "forward.h"
#include "model.h"

typedef enum {
    PATCH_RESID_PRE,
    PATCH_RESID_MID,
    PATCH_ATTN_OUT,
    PATCH_MLP_OUT,
    PATCH_Z,
    PATCH_Z_ALL_POS,
    PATCH_Q_ALL_POS,
    PATCH_K_ALL_POS,
    PATCH_V_ALL_POS,
    PATCH_PATTERN_ALL_POS,
    /* appended after the first ten so that their numbers (and the order of
     * a sweep record's values) stay as they were */
    PATCH_Q,
    PATCH_K,
    PATCH_V,
    PATCH_PATTERN,
    PATCH_PATTERN_DEST_SRC,
    PATCH_COMPONENT_COUNT
} patch_component;

/* The most axes of a grid: pattern_dest_src's (layer, position, src_position, head). */
#define PATCH_GRID_MAX_DIMS 4

typedef enum { PATCH_LOGIT_DIFF, PATCH_PROB, PATCH_LOGPROB, PATCH_KL, PATCH_METRIC_COUNT } patch_metric;
typedef enum { PATCH_DENOISE, PATCH_NOISE } patch_direction;
typedef enum {
    PATCH_SOURCE_CLEAN,
    PATCH_SOURCE_CORRUPTED,
    PATCH_SOURCE_ZERO,
    PATCH_SOURCE_MEAN,
    PATCH_SOURCE_RESAMPLE,
    PATCH_SOURCE_COUNT
} patch_source;
const char *patch_source_name(patch_source s); /* "clean", "corrupted", "zero", "mean", "resample" */
ps_status patch_source_parse(const char *s, patch_source *src);
/* zero, mean, resample */
bool patch_source_ablation(patch_source s);
/* The direction a source runs in: clean -> denoise, corrupted -> noise; an
 * ablation -> noise (the clean run is ablated) unless denoise was given.
 * *dir holds the given direction when dir_given; a contradiction (clean with
 * noise, corrupted with denoise) is an error naming both. */
ps_status patch_source_direction(patch_source s, bool dir_given, patch_direction *dir);

/* The subset of a dataset a mean ablation averages (patch --mean-over,
 * [patch] mean_over): NULL, "" or "all"; "A:B" the pairs of 0-based dataset
 * indices [A, B), A < B; "FIELD=VALUE" the pairs whose field FIELD (at most
 * 127 bytes) is the string VALUE or the integer written VALUE. */
typedef struct {
    enum { PATCH_SUBSET_ALL, PATCH_SUBSET_RANGE, PATCH_SUBSET_FIELD } kind;
    size_t a, b;        /* range [a, b) */
    char field[128];    /* field name */
    const char *value;  /* into the parsed text */
} patch_subset;
ps_status patch_subset_parse(const char *s, patch_subset *out);
/* Which engine evaluates the cells (patch.h); named here for job files and outputs. */
typedef enum { PATCH_ENGINE_FAST, PATCH_ENGINE_NAIVE } patch_engine;

/* How cells are evaluated: exactly (the engines), by attribution patching
 * (atp.h; atp* with AtP*'s QK fix), both with the estimate's error, or the
 * estimate with only its top cells patched exactly (+verify, atp_verify.h)
 * (patch --method, [patch] method). */
typedef enum {
    PATCH_METHOD_EXACT,
    PATCH_METHOD_ATP,
    PATCH_METHOD_ATP_EXACT,
    PATCH_METHOD_ATP_STAR,
    PATCH_METHOD_ATP_STAR_EXACT,
    PATCH_METHOD_ATP_VERIFY,
    PATCH_METHOD_ATP_STAR_VERIFY,
    PATCH_METHOD_COUNT
} patch_method;
/* "exact", "atp", "atp+exact", "atp*", "atp*+exact", "atp+verify", "atp*+verify" */
const char *patch_method_name(patch_method m);
ps_status patch_method_parse(const char *s, patch_method *m);
bool patch_method_runs_exact(patch_method m);  /* exact, atp+exact, atp*+exact (every cell) */
bool patch_method_estimates(patch_method m);   /* every method but exact */
bool patch_method_qk_fix(patch_method m);      /* atp*, atp*+exact, atp*+verify */
bool patch_method_verifies(patch_method m);    /* atp+verify, atp*+verify */
/* +verify: cells of each grid patched exactly by default ([patch] verify_top_k, patch --verify-top-k) */
#define PATCH_VERIFY_TOP_K ((size_t)10)

const char *patch_component_name(patch_component c);
/* z_all_pos .. pattern_all_pos: one cell per (layer, head), every position. */
bool patch_component_all_pos(patch_component c);
/* Every component patched per attention head (z, q, k, v, pattern,
 * pattern_dest_src and the *_all_pos ones): the grid has a head axis. */
bool patch_component_per_head(patch_component c);
/* k, v, k_all_pos, v_all_pos of a model with fewer key/value heads than query
 * heads: the grid's head axis is the H_kv key/value heads ("kv_head"). */
bool patch_component_kv_heads(patch_component c, const model_config *cfg);
/* The hook a component's cells overwrite (hooks.h): the by-position and the
 * all-position head grids of one activation patch the same hook (z and
 * z_all_pos: HOOK_Z; q, q_all_pos: HOOK_Q before rotary, as TransformerLens). */
hook_kind patch_component_hook(patch_component c);
const char *patch_metric_name(patch_metric m);
ps_status patch_metric_parse(const char *s, patch_metric *m);

/* Several metrics of one run (patch --metric logit_diff,prob,kl; [patch]
 * metric = ...): distinct metrics in the order given, all computed from the
 * same patched logits.  m[0] is the primary metric: its results keep the
 * one-metric names (schema.h). */
typedef struct {
    size_t n;                          /* 1..PATCH_METRIC_COUNT */
    patch_metric m[PATCH_METRIC_COUNT];
} patch_metric_list;

/* A comma-separated list of metric names (blanks around names ignored); an
 * unknown, empty or repeated name is an error naming it. */
ps_status patch_metric_list_parse(const char *s, patch_metric_list *out);

/* Parse a comma-separated list of components and groups into a set
 * (on[PATCH_COMPONENT_COUNT]); unknown names are an error listing the valid ones. */
ps_status patch_components_parse(const char *list, bool on[PATCH_COMPONENT_COUNT]);

/* Refuse a set of components the model lacks: resid_mid with a parallel
 * residual (GPT-NeoX use_parallel_residual), one line naming it. */
ps_status patch_components_check(const bool on[PATCH_COMPONENT_COUNT], const model_config *cfg);

/* Grid of a component for T tokens: (layer, position), (layer, position,
 * head | kv_head), (layer, position, src_position, head), (layer, head) or
 * (layer, kv_head).  Returns ndim (<= PATCH_GRID_MAX_DIMS); dim_names as
 * used in NetCDF. */
size_t patch_grid_shape(patch_component c, const model_config *cfg, size_t T, size_t shape[PATCH_GRID_MAX_DIMS],
                        const char *dim_names[PATCH_GRID_MAX_DIMS]);
/* Cells of that grid: the product of its shape. */
size_t patch_grid_size(patch_component c, const model_config *cfg, size_t T);

/* One prompt pair with its unpatched runs. */
typedef struct {
    size_t T;
    int32_t answer, wrong;
    forward_cache clean, corrupted;  /* the core activations (trimmed: no ln1/ln2/MLP hidden, no logits) */
    double clean_metric[PATCH_METRIC_COUNT];
    double corrupted_metric[PATCH_METRIC_COUNT];
    float *clean_logprobs;           /* [V] log softmax of the clean last row (for kl) */
    /* NULL: cells take the other prompt's run (by direction).  Else an
     * ablation's replacement values as a T-token cache (ablate.h), read by
     * both engines where they fetch the source activation; not owned, not
     * packed (patch_pair_unpack leaves it NULL). */
    const forward_cache *source;
} patch_pair;

/* Run both prompts (equal length T, checked) and fill the metrics. */
ps_status patch_pair_init(patch_pair *p, const model *m, const int32_t *clean, const int32_t *corrupted,
                          size_t T, int32_t answer, int32_t wrong);
void patch_pair_free(patch_pair *p);

/* A pair as one flat byte image, for broadcasting from the rank that ran
 * the prompts: T, ids, metrics, tokens, the clean log-probabilities and the
 * caches' core (forward_cache.core_floats: what both engines read; the
 * unpacked caches hold zeros elsewhere, logits included). */
size_t patch_pair_packed_bytes(const model_config *cfg, size_t T);
void patch_pair_pack(const patch_pair *p, void *buf);
/* Reads T from the image first: patch_pair_packed_T() gives it to size buffers. */
size_t patch_pair_packed_T(const void *buf);
ps_status patch_pair_unpack(patch_pair *p, const model_config *cfg, const void *buf);

/* One cell of one prompt pair. */
typedef struct {
    uint32_t pair;      /* index into the pairs array */
    uint16_t component; /* patch_component */
    uint16_t layer;
    uint16_t position;  /* unused for *_all_pos; pattern*: the destination (query) row */
    uint16_t head;      /* per-head components (a key/value head for k, v with GQA) */
    uint16_t src_position; /* pattern_dest_src: the source (key) column; 0 otherwise */
} patch_cell;

/* Every cell of a component's grid for pair `pair`, in the grid's row-major
 * order; *cells is malloc'd. */
ps_status patch_grid_cells(patch_component c, const model_config *cfg, uint32_t pair, size_t T,
                           patch_cell **cells, size_t *n);

/* The metric of one next-token logits row [V]; clean_logprobs [V] (the clean
 * run's log-softmax) is read by kl only. */
double patch_metric_of_logits(const float *logits, size_t V, int32_t answer, int32_t wrong,
                              const float *clean_logprobs, patch_metric metric);

/* out[k] = metric ms[k] of one logits row, k < n (one logsumexp for all:
 * the same bits as patch_metric_of_logits of each). */
void patch_metrics_of_logits(const float *logits, size_t V, int32_t answer, int32_t wrong,
                             const float *clean_logprobs, const patch_metric *ms, size_t n, double *out);

/* (patched - corrupted) / (clean - corrupted); NaN when clean == corrupted. */
double patch_normalize(const patch_pair *p, patch_metric metric, double patched);

#endif
