/*
 * dataset_gen: generated prompt pairs (dataset.h's records, path
 * "<generated>").  Generators are deterministic by seed (own PRNG, not libc
 * rand) so a job's dataset can be regenerated bit for bit anywhere; at most
 * DATASET_MAX_ITEMS items.
 */
#ifndef PS_DATASET_GEN_H
#define PS_DATASET_GEN_H

#include <stddef.h>
#include <stdint.h>

#include "dataset.h"
#include "err.h"
#include "tokenizer.h"

typedef enum { IOI_CORRUPT_S2, IOI_CORRUPT_ABC } ioi_corruption;

/* Indirect-object identification after Wang et al. 2022: BABA and ABBA orders,
 * >= 10 templates, names that are single GPT-2 tokens with a leading space.
 * s2: the second subject mention is replaced by the indirect object;
 * abc: all three names replaced by fresh ones (a different-names baseline). */
ps_status dataset_make_ioi(dataset *d, const tokenizer *t, size_t n, uint64_t seed, ioi_corruption c);

/* Few-shot "Q: What is the capital of X?\nA: Y" prompts as in the worksheet,
 * answers single tokens, corrupted = another country of the same token length. */
ps_status dataset_make_capitals(dataset *d, const tokenizer *t, size_t n, uint64_t seed);

#endif
