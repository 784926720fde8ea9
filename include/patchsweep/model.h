/*
 * model: a GPT-2 checkpoint in HuggingFace's layout, loaded for inference.
 *
 * A model directory holds config.json and model.safetensors (and usually
 * vocab.json + merges.txt, see tokenizer.h).  Tensor names are HF's
 * GPT2LMHeadModel names with or without the "transformer." prefix:
 *   wte.weight [V, d]    wpe.weight [n_pos, d]
 *   h.{l}.ln_1.weight/bias [d]
 *   h.{l}.attn.c_attn.weight [d, 3d]   c_attn.bias [3d]      (Conv1D: [in, out])
 *   h.{l}.attn.c_proj.weight [d, d]    c_proj.bias [d]
 *   h.{l}.ln_2.weight/bias [d]
 *   h.{l}.mlp.c_fc.weight [d, m]       c_fc.bias [m]         (m = n_inner or 4d)
 *   h.{l}.mlp.c_proj.weight [m, d]     c_proj.bias [d]
 *   ln_f.weight/bias [d]
 *   lm_head.weight [V, d] (optional: tied to wte when absent)
 * The buffers h.{l}.attn.bias and h.{l}.attn.masked_bias are ignored; any
 * other unknown tensor is an error (it would mean a different architecture).
 *
 * Memory (llm.c): F32 tensors whose data is 4-byte aligned are used in place
 * from the read-only mmap, so ranks on one node share the page cache; every
 * other tensor (F16, BF16, F64, or misaligned F32) is converted into one
 * float32 arena, followed by every block's four matrices packed for the
 * matrix kernels (gemm.h: packed once, read by every product; for F32
 * checkpoints the mmap'd originals are then only read while packing).
 * model_load mallocs the arena (one copy per process);
 * model_load_shared takes it from a model_alloc, so that the processes of a
 * node can share one copy that only one of them converts (the sweep's ranks:
 * see model_alloc and comm_shared_alloc).
 *
 * Every weight is checked once at load: model_load refuses a NaN or an
 * infinity in any tensor it uses (in place or converted), naming the tensor
 * and the element, since one non-finite weight poisons every activation.
 * With a model_alloc, the writing process checks for all of them.
 */
#ifndef PS_MODEL_H
#define PS_MODEL_H

#include <stdbool.h>
#include <stddef.h>

#include "err.h"
#include "gemm.h"
#include "safetensors.h"

/* config.json is tiny; anything bigger is not a GPT-2 config. */
#define MODEL_MAX_CONFIG_BYTES ((size_t)1 << 20)

/* Caps on config.json sizes (GPT-2 XL: 48 layers, 25 heads, d 1600, 1024
 * positions, V 50257), far above any GPT-2 but low enough that every size
 * product the library forms fits in a 64-bit size_t with room to spare:
 * V*d <= 2^40 and n_layer*d*m <= 2^44 elements, n_positions^2 <= 2^40.
 * Values above them are refused with PS_ERR_NOMEM (a documented limit). */
#define MODEL_MAX_N_LAYER     ((size_t)1 << 10)
#define MODEL_MAX_N_HEAD      ((size_t)1 << 10)
#define MODEL_MAX_N_EMBD      ((size_t)1 << 16)
#define MODEL_MAX_N_INNER     ((size_t)1 << 18)
#define MODEL_MAX_N_POSITIONS ((size_t)1 << 20)
#define MODEL_MAX_VOCAB_SIZE  ((size_t)1 << 24)

typedef struct {
    size_t n_layer;
    size_t n_head;
    size_t n_embd;        /* d */
    size_t n_positions;   /* maximum tokens per prompt */
    size_t vocab_size;    /* V */
    size_t n_inner;       /* MLP width m (config "n_inner", null -> 4d) */
    size_t d_head;        /* d / n_head */
    float ln_eps;         /* layer_norm_epsilon */
} model_config;

typedef struct {
    const float *ln_1_w, *ln_1_b;       /* [d] */
    const float *attn_w;                /* [d, 3d]: columns q | k | v, head h at h*dh within each */
    const float *attn_b;                /* [3d] */
    const float *attn_proj_w;           /* [d, d] */
    const float *attn_proj_b;           /* [d] */
    const float *ln_2_w, *ln_2_b;       /* [d] */
    const float *fc_w;                  /* [d, m] */
    const float *fc_b;                  /* [m] */
    const float *mlp_proj_w;            /* [m, d] */
    const float *mlp_proj_b;            /* [d] */
    /* The four matrices again, packed for gemm_run (model_pack_weights):
     * q, k, v are the three column blocks of attn_w, each [d, d]. */
    gemm_weight q_w, k_w, v_w, attn_proj_p, fc_p, mlp_proj_p;
} model_block;

/* Where model_load_shared puts the converted arena: memory that several
 * processes share, of which exactly one (the writer) converts and checks the
 * weights while the others (readers) only compute their pointers into it.
 *
 * The calls may be collective among the sharing processes (an MPI window):
 * on every process model_load_shared calls alloc once and then publish once,
 * in that order, whatever happened before (an earlier failure travels in
 * `st`), so no process waits for one that gave up; release is called once,
 * by model_free, exactly when alloc returned PS_OK. */
typedef struct {
    /* Agree on `st` with the other processes and return the first failure
     * (PS_OK if none, with that process's message); when all are PS_OK,
     * allocate `bytes` (the same on every process: same checkpoint) and set
     * *ptr to the shared memory (NULL allowed when bytes is 0) and
     * *is_writer on exactly one process. */
    ps_status (*alloc)(void *user, ps_status st, size_t bytes, void **ptr, bool *is_writer);
    /* Called once the writer has converted and checked every weight (`st`:
     * its outcome; PS_OK on the readers): make the writer's stores visible
     * to all and return the writer's status (and message) on every process. */
    ps_status (*publish)(void *user, ps_status st);
    /* Free what alloc returned. */
    void (*release)(void *user, void *ptr);
    void *user;
} model_alloc;

typedef struct {
    model_config cfg;
    const float *wte;        /* [V, d] */
    const float *wpe;        /* [n_positions, d] */
    model_block *blocks;     /* [n_layer], owned */
    const float *ln_f_w, *ln_f_b; /* [d] */
    const float *unembed;    /* [V, d]: lm_head.weight, or wte when tied */
    bool tied;               /* unembed == wte */

    char *dir;               /* owned copy of the model directory */
    char *config_json;       /* owned: config.json text, for provenance */
    char weights_dtype[16];  /* "F32", "F16", "BF16", "F64" or "mixed" */
    size_t n_params;         /* parameters of the model (tied counted once) */
    char sha256[65];         /* of model.safetensors, filled by model_hash() */

    st_file st;              /* the mmap'd checkpoint */
    float *arena;            /* converted tensors (arena_floats), then from the next 64-byte
                              * boundary the packed matrices: malloc'd, or from `alloc`
                              * when arena_shared */
    size_t arena_floats;     /* the converted tensors' floats */
    bool arena_shared;       /* arena came from alloc.alloc (model_load_shared) */
    model_alloc alloc;       /* model_load_shared's allocator (release on model_free) */
    float *packed;           /* the blocks' packed matrices (gemm.h): in the arena (model_load),
                              * or model_pack_weights' own copy (packed_owned) */
    size_t packed_floats;
    bool packed_owned;
} model;

/* Parse and validate config.json (`path` names the file for messages).
 * Required: n_layer, n_head, n_embd, vocab_size, n_positions (or the legacy
 * n_ctx when n_positions is absent).  Optional: n_inner (absent or null ->
 * 4*n_embd), layer_norm_epsilon (default 1e-5, must be in (0, 1]),
 * activation_function (default gelu_new).
 * Refuses activation functions other than gelu_new / gelu_pytorch_tanh,
 * n_embd not divisible by n_head, zero sizes, sizes over the MODEL_MAX_*
 * caps, missing fields and fields of the wrong JSON type. */
ps_status model_config_parse(model_config *cfg, const char *path, const char *json_text, size_t len);

/* Load dir/config.json and dir/model.safetensors, validate every tensor's
 * presence and shape against the config, and set up the pointers.
 * On error *m is left freed (model_free is safe). */
ps_status model_load(model *m, const char *dir);

/* Pack every block's matrices for gemm_run into a copy of its own,
 * m->packed: for models built in memory (the unit tests').  model_load packs
 * them into the arena itself, after the converted tensors, so that they are
 * one copy per node too.  Costs the matrices' size once more in float32:
 * 85M floats (340 MB) for GPT-2 small. */
ps_status model_pack_weights(model *m);

/* model_load with the converted arena from `a` (see model_alloc): the same
 * checks and pointers; on the writer the same work as model_load, on a
 * reader no conversion and no pass over the weights (the writer checked
 * them; a reader reports the writer's error).  Every process must call it
 * with the same directory.  NULL `a`: model_load.  On error *m is freed. */
ps_status model_load_shared(model *m, const char *dir, const model_alloc *a);

/* Compute m->sha256 of the safetensors file, hashing the mmap (portable C,
 * roughly 150-250 MB/s: seconds per GB; the file is read once). */
ps_status model_hash(model *m);

void model_free(model *m);

#endif
