/*
 * ablate: the replacement values of ablations (patchspec.h's sources zero,
 * mean, resample) as T-token caches that stand in for the source run
 * (patch_pair.source), so both engines and every component take them where
 * they fetch the source activation.
 *
 * Which arrays: every per-block activation a patch can read (resid_pre, q,
 * k, v, pattern, z, attn_out, resid_mid, mlp_out, resid_post) and, for
 * rotary families, rot_k = the rotary embedding of the replaced k at its
 * positions (what the forward pass computes from a hooked k).
 *
 * Mean by position.  Prompts of different lengths: the mean at position t
 * is over the set's prompts longer than t tokens; pattern[h, i, j] over
 * those with a row i (rows still sum to 1).  A length T needs a prompt of
 * at least T tokens in the set.
 *
 * Exact sums.  Each float32 value is added as a fixed-point number with
 * quantum 2^-60, split into three signed 40-bit limbs kept in int64
 * (value = l2 2^20 + l1 2^-20 + l0 2^-60); integer addition is associative,
 * so the sums, and the means, are the same bits whatever the order and the
 * number of ranks (comm_allreduce_sum_i64 adds the ranks' limbs).  Exact
 * for |v| in [2^-36, 2^43) (below: rounded to 2^-60); at most 2^23 prompts.
 */
#ifndef PS_ABLATE_H
#define PS_ABLATE_H

#include <stddef.h>
#include <stdint.h>

#include "comm.h"
#include "err.h"
#include "forward.h"
#include "model.h"
#include "patchspec.h"
#include "tokenizer.h"

/* Most prompts one sum may take (each limb stays below 2^63). */
#define ABLATE_MAX_PROMPTS ((size_t)1 << 23)

typedef struct {
    model_config cfg;
    size_t max_T;
    size_t n_values;  /* per-position values over every array, for max_T positions */
    size_t n_words;   /* 3 * n_values limbs, then max_T counts, then the prompt count */
    int64_t *words;   /* owned: what comm_allreduce_sum_i64 adds across ranks */
} ablate_mean;

/* An empty sum for prompts of up to max_T tokens. */
ps_status ablate_mean_init(ablate_mean *a, const model_config *cfg, size_t max_T);
void ablate_mean_free(ablate_mean *a);

/* Add one run (its T <= max_T rows).  PS_ERR_RANGE past ABLATE_MAX_PROMPTS. */
ps_status ablate_mean_add(ablate_mean *a, const forward_cache *run);

/* Prompts summed. */
size_t ablate_mean_count(const ablate_mean *a);

/* Whether a prompt of the set has T tokens or more (ablate_mean_cache of T works). */
bool ablate_mean_covers(const ablate_mean *a, size_t T);

/* The mean activations of a T-token run into *out (initialised here;
 * forward_cache_free it).  An error when no prompt of the set has T tokens. */
ps_status ablate_mean_cache(const ablate_mean *a, const model *m, size_t T, forward_cache *out);

/* Zeros as a T-token run (k zero, so rot_k is zero too). */
ps_status ablate_zero_cache(const model *m, size_t T, forward_cache *out);

/* Resampling: the donor of prompt `self` among the n candidates (dataset
 * indices of the prompts of its length, ascending, self among them or not):
 * splitmix64(splitmix64(seed) ^ self) mod (the others' count) picks the
 * k-th of those other than self (no fixed points).  The same seed,
 * index and candidates give the same donor on any machine or rank count.
 * PS_ERR_INVALID when there is no other candidate. */
ps_status ablate_resample_pick(uint64_t seed, size_t self, const size_t *cand, size_t n, size_t *donor);

/* ---- ablations over a dataset (patch --ablate-dataset, sweeps) ---------- */

/* The prompts an ablation draws on: a JSONL dataset of pairs (dataset.h;
 * every pair of it must be valid), the base kind's prompt of each (the
 * clean prompt when the clean run is ablated: direction noise). */
typedef struct {
    const char *path;
    const char *mean_over;     /* the mean's subset (patch_subset_parse) */
    size_t max_prompts;        /* only the first N pairs (0: all) */
    bool bos;
    bool skip_invalid;         /* leave out invalid pairs (a sweep's skip_invalid); else one is an error */
    patch_direction direction; /* noise: clean prompts; denoise: corrupted prompts */
} ablate_set;

/* Check a mean_over text; PS_ERR_INVALID naming it otherwise. */
ps_status ablate_mean_over_check(const char *mean_over);

/* Collective over c (NULL: this process alone): rank 0 reads and tokenizes
 * the set's prompts (tok, rank 0's; NULL: the items' token ids) and sends
 * their ids; rank r runs the forwards of the set's prompts k with k mod
 * ranks = r; comm_allreduce_sum_i64 adds the exact sums.  *out is the same
 * on every rank, whatever the number of ranks.  An empty subset is an error. */
ps_status ablate_mean_of_dataset(const model *m, const tokenizer *tok, comm *c, const ablate_set *s,
                                 ablate_mean *out);

/* The donor of a prompt not in the set (patch --source resample): among the
 * set's prompts of T tokens whose base tokens differ from base[0..T),
 * ablate_resample_pick(seed, SIZE_MAX, ...); *donor its 0-based dataset
 * index, *run its forward (forward_cache_free it). */
ps_status ablate_resample_of_dataset(const model *m, const tokenizer *tok, const ablate_set *s, uint64_t seed,
                                     const int32_t *base, size_t T, size_t *donor, forward_cache *run);

/* ---- the sources of a sweep ------------------------------------------------
 * zero, mean: one cache per prompt length, the same on every rank.
 * resample: rank 0 reads the set's base prompts (every valid pair of the
 * dataset, max_prompts applied) and gives dataset index i the donor
 * ablate_resample_pick(seed, i, the indices of the pairs of its length);
 * per chunk it sends the donors' token ids to every rank
 * (ablate_sources_chunk), and the rank that runs a pair runs its donor's
 * forward (attach). */

typedef struct {
    patch_source source;   /* zero, mean or resample */
    const model *m;
    ablate_mean mean;      /* mean: the sums (the same on every rank) */
    forward_cache *by_T;   /* zero, mean: [n_positions + 1], built on first use */
    /* resample */
    size_t n_set;          /* rank 0: pairs read (dataset indices 0..n_set) */
    size_t *donor;         /* rank 0: [n_set] the donor's dataset index, SIZE_MAX none (invalid
                              pair, or no other pair of its length) */
    size_t *set_len, *set_off;  /* rank 0: [n_set] base prompt tokens at set_ids + set_off */
    int32_t *set_ids;
    size_t chunk_n;        /* every rank: the current chunk's donors */
    size_t *chunk_len, *chunk_off;
    int32_t *chunk_ids;
    forward_cache *chunk_runs; /* [chunk_n], run on first use */
} ablate_sources;

/* Collective over c: the sources of a job (zero; mean:
 * ablate_mean_of_dataset over `set`; resample: the donors with `seed`).
 * clean / corrupted give an empty *s (attach does nothing). */
ps_status ablate_sources_init(ablate_sources *s, const model *m, const tokenizer *tok, comm *c, patch_source source,
                              const ablate_set *set, uint64_t seed);
/* Collective (resample; nothing otherwise): rank 0 names the chunk's
 * prompts by dataset index, dataset_index[0..n); every rank receives their
 * donors' tokens.  A prompt without a donor is an error naming it. */
ps_status ablate_sources_chunk(ablate_sources *s, comm *c, const size_t *dataset_index, size_t n);
/* p->source = the replacement of the chunk's prompt k (NULL s: nothing). */
ps_status ablate_sources_attach(ablate_sources *s, patch_pair *p, size_t k);
void ablate_sources_free(ablate_sources *s);

#endif
