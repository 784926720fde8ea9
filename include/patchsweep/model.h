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
 * from the read-only mmap, so ranks on one node share the page cache; the
 * blocks' weight matrices and the embeddings (wte, an untied unembedding)
 * stored as F16 or BF16 are packed in their 2 bytes (gemm.h: widened in
 * registers, results identical to the F32 path; their float pointers are
 * then NULL: model_embed_row, model_unembed_row, model_unembed read them);
 * every other tensor (F16, BF16 or F64 positions, norms and biases, F64
 * embeddings, misaligned F32) is converted
 * into one float32 arena, followed by every block's matrices packed for the
 * matrix kernels (packed once, read by every product; the mmap'd originals
 * are then only read while packing, and the pages of the converted ones are
 * given back).
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

/* The model families (HF architectures) patchsweep runs.  Mistral is
 * MODEL_FAMILY_LLAMA (with its sliding window off). */
typedef enum {
    MODEL_FAMILY_GPT2,   /* GPT2LMHeadModel */
    MODEL_FAMILY_NEOX,   /* GPTNeoXForCausalLM (Pythia) */
    MODEL_FAMILY_LLAMA,  /* LlamaForCausalLM, MistralForCausalLM */
    MODEL_FAMILY_QWEN2,  /* Qwen2ForCausalLM */
    MODEL_FAMILY_COUNT
} model_family;

typedef enum { MODEL_NORM_LAYERNORM, MODEL_NORM_RMSNORM } model_norm;
typedef enum { MODEL_POS_LEARNED, MODEL_POS_ROTARY } model_pos;
typedef enum { MODEL_ROPE_SCALING_NONE, MODEL_ROPE_SCALING_LINEAR, MODEL_ROPE_SCALING_LLAMA3 } model_rope_scaling;
typedef enum {
    MODEL_ACT_GELU_NEW,   /* tanh-approximated GELU (GPT-2's gelu_new) */
    MODEL_ACT_GELU_ERF,   /* exact GELU, 0.5 x (1 + erf(x / sqrt 2)) (HF "gelu") */
    MODEL_ACT_SILU_GATED  /* down(silu(gate(x)) * up(x)) */
} model_act;

/* The arithmetic of the blocks' matrix products (`--compute`, issue 21):
 * F32 (the default: gemm.h's kernels, 2-byte checkpoints widened exactly),
 * or BF16 (gemm_bf16.h: every block matrix rounded to BF16 once at load,
 * activations rounded to BF16 per product, F32 accumulation; needs
 * AMX-BF16 or AVX512_BF16).  The embedding, the norms, attention's
 * softmax and mixing, and the logits stay F32 (or the checkpoint's 2
 * bytes, widened) in both. */
typedef enum { MODEL_COMPUTE_F32 = 0, MODEL_COMPUTE_BF16, MODEL_COMPUTE_COUNT } model_compute;

/* "f32" / "bf16" (the flag's and the results attribute's values). */
const char *model_compute_name(model_compute c);

/* The value of --compute or [model] compute; false for an unknown name. */
bool model_compute_parse(const char *s, model_compute *out);

typedef struct {
    size_t n_layer;
    size_t n_head;        /* H: query heads */
    size_t n_embd;        /* d */
    size_t n_positions;   /* maximum tokens per prompt */
    size_t vocab_size;    /* V */
    size_t n_inner;       /* MLP width m (config "n_inner", null -> 4d) */
    size_t d_head;        /* dh: d / n_head, or config head_dim (Llama, Qwen2) */
    float ln_eps;         /* layer_norm_epsilon (LayerNorm) or rms_norm_eps (RMSNorm) */

    /* The family descriptor (model_config_parse fills it from config.json;
     * a zeroed model_config is GPT-2 with learned positions). */
    model_family family;
    model_norm norm;
    model_pos pos;
    model_act act;
    size_t n_kv_head;     /* H_kv: key/value heads (H_kv divides H; H for GPT-2/NeoX) */
    size_t rotary_dim;    /* dims rotated at the start of each head (even, <= dh); 0 when learned */
    double rope_theta;    /* rotary base */
    model_rope_scaling rope_scaling;
    double rope_factor;   /* linear / llama3 factor */
    double rope_low_freq_factor, rope_high_freq_factor; /* llama3 */
    double rope_original_max_pos;                       /* llama3: original_max_position_embeddings */
    bool qkv_bias;        /* q, k, v projections have biases */
    bool o_bias;          /* attention output projection has a bias */
    bool mlp_bias;        /* MLP projections have biases */
    bool parallel_residual; /* x + attn(ln1(x)) + mlp(ln2(x)) (NeoX use_parallel_residual) */
    bool tie_word_embeddings; /* GPT-2: lm_head optional (tied when absent); others: from config */
    bool attn_no_scale;   /* GPT-2 scale_attn_weights false: no 1/sqrt(dh) */
    bool attn_scale_by_layer; /* GPT-2 scale_attn_by_inverse_layer_idx: scores / (layer + 1) */
} model_config;

/* The name of a family ("gpt2", "gpt_neox", "llama", "qwen2"). */
const char *model_family_name(model_family f);

/* Query width H * dh and key/value width H_kv * dh of a row. */
static inline size_t model_q_dim(const model_config *c) { return c->n_head * c->d_head; }
static inline size_t model_kv_heads(const model_config *c) { return c->n_kv_head ? c->n_kv_head : c->n_head; }
static inline size_t model_kv_dim(const model_config *c) { return model_kv_heads(c) * c->d_head; }

/* The attention score scale of block `layer`: 1/sqrt(dh) (1 with GPT-2's
 * scale_attn_weights false), divided by layer + 1 with GPT-2's
 * scale_attn_by_inverse_layer_idx. */
float model_attn_scale(const model_config *c, size_t layer);

typedef struct {
    const float *ln_1_w, *ln_1_b;       /* [d]; ln_1_b NULL for RMSNorm */
    const float *attn_w;                /* GPT-2: [d, 3d] columns q | k | v, head h at h*dh within each;
                                         * NeoX: query_key_value [3*H*dh, d], rows [H, (q,k,v), dh];
                                         * NULL for Llama / Qwen2 */
    const float *attn_b;                /* GPT-2: [3d]; NeoX: [3*H*dh] per head as attn_w; or NULL */
    const float *q_proj_w, *k_proj_w, *v_proj_w; /* Llama / Qwen2: [H*dh, d], [H_kv*dh, d] x2 */
    const float *q_b, *k_b, *v_b;       /* [H*dh], [H_kv*dh], [H_kv*dh] or NULL (no bias) */
    const float *attn_proj_w;           /* GPT-2: [d, d] (Conv1D); others nn.Linear [d, H*dh] */
    const float *attn_proj_b;           /* [d] or NULL */
    const float *ln_2_w, *ln_2_b;       /* [d]; ln_2_b NULL for RMSNorm */
    const float *fc_w;                  /* GPT-2: [d, m]; others: up / dense_h_to_4h [m, d] */
    const float *fc_b;                  /* [m] or NULL */
    const float *gate_w;                /* gated MLP: gate_proj [m, d]; NULL otherwise */
    const float *gate_b;                /* [m] or NULL */
    const float *mlp_proj_w;            /* GPT-2: [m, d]; others: down / dense_4h_to_h [d, m] */
    const float *mlp_proj_b;            /* [d] or NULL */
    /* The matrices again, packed for gemm_run (model_pack_weights) as
     * x[rows, in] @ W[in, out]: q [d, H*dh], k and v [d, H_kv*dh] (GPT-2:
     * the three column blocks of attn_w), attn_proj [H*dh, d], fc (up) [d, m],
     * gate [d, m] (gated MLPs only), mlp_proj [m, d]. */
    gemm_weight q_w, k_w, v_w, attn_proj_p, fc_p, gate_p, mlp_proj_p;
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
    const float *wpe;        /* [n_positions, d]; NULL with rotary positions */
    float *rope_cos, *rope_sin; /* rotary: [n_positions, rotary_dim / 2] cos/sin of position * inv_freq
                              * (owned); NULL with learned positions */
    model_block *blocks;     /* [n_layer], owned */
    const float *ln_f_w, *ln_f_b; /* [d]; ln_f_b NULL for RMSNorm */
    const float *unembed;    /* [V, d]: lm_head.weight, or wte when tied */
    bool tied;               /* unembed == wte */
    /* F16/BF16 checkpoints keep the embedding and the unembedding in their
     * 2 bytes (issue 21), packed as the logits' x @ U^T panels ([d, V],
     * gemm.h; tied: unembed_p = wte_p); wte / unembed are then NULL.  Read
     * them through model_embed_row, model_unembed_row and model_unembed,
     * which serve both forms. */
    gemm_weight wte_p, unembed_p; /* dtype GEMM_F32 (data NULL): the float pointers above */

    char *dir;               /* owned copy of the model directory */
    char *config_json;       /* owned: config.json text, for provenance */
    char weights_dtype[16];  /* "F32", "F16", "BF16", "F64" or "mixed" */
    size_t n_params;         /* parameters of the model (tied counted once) */
    char sha256[65];         /* the model's hash, filled by model_hash(): see there */
    char *shard_sha256;      /* owned, filled by model_hash(): one line per shard, in file-name
                              * order, "<sha256 of the file>  <file name>\n" (sha256sum's format) */

    st_file *shards;         /* the mmap'd checkpoint: model.safetensors, or the files of
                              * model.safetensors.index.json in order (owned, [n_shards]) */
    size_t n_shards;
    float *arena;            /* converted tensors (arena_floats), then from the next 64-byte
                              * boundary the packed matrices: malloc'd, or from `alloc`
                              * when arena_shared */
    size_t arena_floats;     /* the converted tensors' floats */
    bool arena_shared;       /* arena came from alloc.alloc (model_load_shared) */
    model_alloc alloc;       /* model_load_shared's allocator (release on model_free) */
    void *packed;            /* the blocks' packed matrices (gemm.h; F32, or F16/BF16 in 2 bytes
                              * for such checkpoints): in the arena (model_load), or
                              * model_pack_weights' own copy (packed_owned) */
    size_t packed_bytes;
    bool packed_owned;
    model_compute compute;   /* the blocks' products: F32 (GEMM_F32/F16/BF16 panels) or BF16
                              * (GEMM_BF16_PAIRS panels, gemm_bf16.h); set by model_load_compute,
                              * or by the caller before model_pack_weights */
} model;

/* Row `token` of the token embedding as floats: a pointer into wte, or
 * (2-byte embedding) widened into buf[n_embd] (exact) and buf returned. */
const float *model_embed_row(const model *m, size_t token, float *buf);

/* Row v of the unembedding U [V, d] likewise (logit_diff's two rows, the
 * backward's d logits -> d x). */
const float *model_unembed_row(const model *m, size_t v, float *buf);

/* The logits: out[rows, V] (row stride V) = x[rows, d] @ U^T.  F32: OpenBLAS
 * per vocabulary slice (gemm_unembed); 2-byte: gemm_run on the packed
 * panels, equal bit for bit to gemm_run on the widened F32 panels. */
void model_unembed(const model *m, float *out, const float *x, size_t rows);

/* Parse and validate config.json (`path` names the file for messages).
 * The family comes from "model_type" (gpt2, gpt_neox, llama, mistral,
 * qwen2) and "architectures"[0] (GPT2LMHeadModel, GPTNeoXForCausalLM,
 * LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM); both absent:
 * GPT-2; disagreeing or unknown: refused.  Each family reads HF's keys:
 *   GPT-2: n_layer, n_head, n_embd, vocab_size, n_positions (or the legacy
 *     n_ctx), n_inner (null -> 4*n_embd), layer_norm_epsilon (1e-5),
 *     activation_function (gelu_new | gelu_pytorch_tanh), scale_attn_weights,
 *     scale_attn_by_inverse_layer_idx;
 *   NeoX: num_hidden_layers, hidden_size, num_attention_heads,
 *     intermediate_size, vocab_size, max_position_embeddings, rotary_pct
 *     (0.25), rotary_emb_base or rope_theta (10000), use_parallel_residual
 *     (true), layer_norm_eps (1e-5), hidden_act (gelu | gelu_new),
 *     attention_bias (true), tie_word_embeddings (false);
 *   Llama / Mistral / Qwen2: the same sizes plus num_key_value_heads (=
 *     heads), head_dim (hidden_size / heads), rms_norm_eps (1e-6), rope_theta
 *     (10000), rope_scaling (null | linear | llama3), hidden_act (silu),
 *     attention_bias / mlp_bias (false; Qwen2: q/k/v biases always),
 *     sliding_window / use_sliding_window (off), tie_word_embeddings (false).
 * A setting that changes the computation and is not supported (another rope
 * type, a sliding window that is on, another activation, partial rotary on
 * Llama, ...) is refused with one line naming the key and its value; so are
 * sizes that are zero, over the MODEL_MAX_* caps, of the wrong JSON type or
 * missing. */
ps_status model_config_parse(model_config *cfg, const char *path, const char *json_text, size_t len);

/* Load dir/config.json and dir/model.safetensors (or the shards listed by
 * dir/model.safetensors.index.json, validated: every tensor in exactly one
 * listed file, each file a plain name inside dir, no tensor of a file left
 * out of the index), validate every tensor's presence and shape against the
 * config (the family's HF names, below), and set up the pointers.
 *   NeoX: gpt_neox.embed_in, gpt_neox.layers.L.{input_layernorm,
 *     post_attention_layernorm}.{weight,bias},
 *     attention.query_key_value.{weight [3*H*dh, d] laid out per head
 *     [H, (q,k,v), dh], bias}, attention.dense, mlp.dense_h_to_4h,
 *     mlp.dense_4h_to_h, gpt_neox.final_layer_norm, embed_out (untied);
 *     buffers attention.bias/masked_bias/rotary_emb.inv_freq ignored.
 *   Llama / Mistral / Qwen2: model.embed_tokens, model.layers.L.{
 *     input_layernorm, post_attention_layernorm}.weight,
 *     self_attn.{q,k,v,o}_proj.{weight (nn.Linear [out, in]), bias},
 *     mlp.{gate,up,down}_proj.{weight, bias}, model.norm.weight, lm_head
 *     (absent when tied); buffers self_attn.rotary_emb.inv_freq ignored.
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

/* model_load_shared with the blocks' matrices packed for `compute`:
 * MODEL_COMPUTE_BF16 rounds every block matrix (F32, F16 or BF16 in the
 * checkpoint) to BF16 once, in the (shared) arena: 2 bytes per weight.
 * PS_ERR_INVALID (one line) when BF16 is asked for on a CPU without
 * AMX-BF16 or AVX512_BF16 (gemm_bf16_supported). */
ps_status model_load_compute(model *m, const char *dir, const model_alloc *a, model_compute compute);

/* Fill m->sha256 and m->shard_sha256.  The model's hash is
 *   a single model.safetensors: the sha256 of that file;
 *   a sharded checkpoint: the sha256 of the text m->shard_sha256, i.e. of
 *     the lines "<sha256 of the shard>  <shard's file name>\n" for every
 *     shard in file-name (strcmp) order: in the model directory,
 *     `LC_ALL=C sha256sum $(LC_ALL=C ls model-*.safetensors) | sha256sum`
 *     (the shards only, not the index or config.json).
 * Each file's hash comes from hashcache.h: read and hashed (libcrypto) the
 * first time, then taken from the per-user cache keyed by device, inode,
 * size and mtime (PATCHSWEEP_HASH_CACHE=off: always hashed).  Commands call
 * it only where they write a file; a sweep, on rank 0 only. */
ps_status model_hash(model *m);

void model_free(model *m);

#endif
