/* ablate: the replacement caches of zero, mean and resample ablations
 * (ablate.h explains the mean and its exact sums). */
#include "ablate.h"

#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "dataset.h"
#include "ops.h"

/* The per-position arrays of a block a patch can read, [T, width] each;
 * pattern [H, T, T] is handled apart, rot_k derived from k. */
typedef enum { W_D, W_Q, W_KV } width_kind;
static const struct {
    size_t offset;
    width_kind w;
} row_arrays[] = {
    {offsetof(forward_layer, resid_pre), W_D}, {offsetof(forward_layer, q), W_Q},
    {offsetof(forward_layer, k), W_KV},        {offsetof(forward_layer, v), W_KV},
    {offsetof(forward_layer, z), W_Q},         {offsetof(forward_layer, attn_out), W_D},
    {offsetof(forward_layer, resid_mid), W_D}, {offsetof(forward_layer, mlp_out), W_D},
    {offsetof(forward_layer, resid_post), W_D},
};
#define N_ROW_ARRAYS (sizeof row_arrays / sizeof row_arrays[0])

static size_t width_of(const model_config *cfg, width_kind w)
{
    return w == W_D ? cfg->n_embd : w == W_Q ? model_q_dim(cfg) : model_kv_dim(cfg);
}

static float *layer_array(const forward_layer *ly, size_t k)
{
    return *(float *const *)((const char *)ly + row_arrays[k].offset);
}

/* Values of one block for max_T positions: the row arrays, then the pattern. */
static size_t layer_values(const model_config *cfg, size_t max_T)
{
    size_t n = 0;
    for (size_t k = 0; k < N_ROW_ARRAYS; k++)
        n += max_T * width_of(cfg, row_arrays[k].w);
    return n + cfg->n_head * max_T * max_T;
}

ps_status ablate_mean_init(ablate_mean *a, const model_config *cfg, size_t max_T)
{
    memset(a, 0, sizeof *a);
    if (max_T == 0 || max_T > cfg->n_positions)
        return err_set(PS_ERR_RANGE, "a mean over prompts of %zu tokens does not fit the model's %zu positions", max_T,
                       cfg->n_positions);
    a->cfg = *cfg;
    a->max_T = max_T;
    a->n_values = cfg->n_layer * layer_values(cfg, max_T);
    a->n_words = 3 * a->n_values + max_T + 1;
    a->words = calloc(a->n_words, sizeof *a->words);
    if (!a->words)
        return err_set(PS_ERR_NOMEM, "cannot allocate the mean activations' sums (%zu MB)",
                       a->n_words * sizeof *a->words >> 20);
    return PS_OK;
}

void ablate_mean_free(ablate_mean *a)
{
    free(a->words);
    memset(a, 0, sizeof *a);
}

/* v (float32, exact in double) as three limbs l2 2^80 + l1 2^40 + l0 of
 * x = v 2^60: truncation toward zero keeps each remainder a subset of x's 24
 * significant bits, so every step is exact; l0 is rounded (|v| < 2^-36). */
static inline void fixed_add(int64_t *limb, float v)
{
    const double x = ldexp((double)v, 60);
    const double h = trunc(ldexp(x, -80));
    const double r = x - ldexp(h, 80);
    const double mid = trunc(ldexp(r, -40));
    const double lo = nearbyint(r - ldexp(mid, 40));
    limb[0] += (int64_t)lo;
    limb[1] += (int64_t)mid;
    limb[2] += (int64_t)h;
}

static inline double fixed_value(const int64_t *limb)
{
    return ldexp(((double)limb[2] * 1099511627776.0 + (double)limb[1]) * 1099511627776.0 + (double)limb[0], -60);
}

ps_status ablate_mean_add(ablate_mean *a, const forward_cache *run)
{
    const model_config *cfg = &a->cfg;
    const size_t T = run->T, mT = a->max_T, H = cfg->n_head;
    if (T == 0 || T > mT)
        return err_set(PS_ERR_RANGE, "a run of %zu tokens is longer than the mean's %zu", T, mT);
    int64_t *count = a->words + 3 * a->n_values;
    if ((size_t)count[mT] >= ABLATE_MAX_PROMPTS)
        return err_set(PS_ERR_RANGE, "a mean over more than %zu prompts is not supported", ABLATE_MAX_PROMPTS);
    size_t base = 0;
    for (size_t l = 0; l < cfg->n_layer; l++) {
        const forward_layer *ly = &run->layers[l];
        for (size_t k = 0; k < N_ROW_ARRAYS; k++) {
            const size_t w = width_of(cfg, row_arrays[k].w);
            const float *x = layer_array(ly, k);
            int64_t *s = a->words + 3 * base;
            for (size_t e = 0; e < T * w; e++)
                fixed_add(s + 3 * e, x[e]);
            base += mT * w;
        }
        /* pattern[h, i, j] of this run at (h, i, j) of the max_T layout */
        for (size_t h = 0; h < H; h++)
            for (size_t i = 0; i < T; i++) {
                int64_t *s = a->words + 3 * (base + (h * mT + i) * mT);
                const float *x = ly->pattern + (h * T + i) * T;
                for (size_t j = 0; j < T; j++)
                    fixed_add(s + 3 * j, x[j]);
            }
        base += H * mT * mT;
    }
    for (size_t t = 0; t < T; t++)
        count[t]++;
    count[mT]++;
    return PS_OK;
}

size_t ablate_mean_count(const ablate_mean *a) { return a->words ? (size_t)a->words[3 * a->n_values + a->max_T] : 0; }

bool ablate_mean_covers(const ablate_mean *a, size_t T)
{
    return a->words && T > 0 && T <= a->max_T && a->words[3 * a->n_values + T - 1] > 0;
}

/* rot_k of a replaced k: the rotary embedding at its positions, as forward.c
 * applies it to a hooked k. */
static void fill_rot_k(const model *m, forward_cache *c)
{
    const model_config *cfg = &m->cfg;
    if (cfg->pos != MODEL_POS_ROTARY)
        return;
    for (size_t l = 0; l < cfg->n_layer; l++)
        ops_rotary(c->layers[l].rot_k, c->layers[l].k, c->T, 0, model_kv_heads(cfg), cfg->d_head, cfg->rotary_dim,
                   m->rope_cos, m->rope_sin);
}

ps_status ablate_mean_cache(const ablate_mean *a, const model *m, size_t T, forward_cache *out)
{
    memset(out, 0, sizeof *out);
    const model_config *cfg = &a->cfg;
    const size_t mT = a->max_T, H = cfg->n_head;
    const int64_t *count = a->words + 3 * a->n_values;
    if (T == 0 || T > mT || count[T - 1] == 0)
        return err_set(PS_ERR_INVALID, "no prompt of the mean's %zu has %zu tokens or more (the mean at a position "
                       "is over the prompts that have it)", ablate_mean_count(a), T);
    ps_status st = forward_cache_init(out, cfg, T, FORWARD_LOGITS_NONE);
    if (st)
        return st;
    out->T = T;
    size_t base = 0;
    for (size_t l = 0; l < cfg->n_layer; l++) {
        forward_layer *ly = &out->layers[l];
        for (size_t k = 0; k < N_ROW_ARRAYS; k++) {
            const size_t w = width_of(cfg, row_arrays[k].w);
            float *x = layer_array(ly, k);
            const int64_t *s = a->words + 3 * base;
            for (size_t t = 0; t < T; t++)
                for (size_t e = 0; e < w; e++)
                    x[t * w + e] = (float)(fixed_value(s + 3 * (t * w + e)) / (double)count[t]);
            base += mT * w;
        }
        for (size_t h = 0; h < H; h++)
            for (size_t i = 0; i < T; i++) {
                const int64_t *s = a->words + 3 * (base + (h * mT + i) * mT);
                float *x = ly->pattern + (h * T + i) * T;
                for (size_t j = 0; j < T; j++)
                    x[j] = (float)(fixed_value(s + 3 * j) / (double)count[i]);
            }
        base += H * mT * mT;
    }
    fill_rot_k(m, out);
    return PS_OK;
}

ps_status ablate_zero_cache(const model *m, size_t T, forward_cache *out)
{
    /* forward_cache_init zeroes the arena (calloc) */
    ps_status st = forward_cache_init(out, &m->cfg, T, FORWARD_LOGITS_NONE);
    if (st == PS_OK)
        out->T = T;
    return st;
}

/* splitmix64 (Steele, Lea, Flood 2014): one well-mixed word per input. */
static uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

ps_status ablate_resample_pick(uint64_t seed, size_t self, const size_t *cand, size_t n, size_t *donor)
{
    /* self's place among the sorted candidates (n if absent) */
    size_t lo = 0, hi = n;
    while (lo < hi) {
        const size_t mid = lo + (hi - lo) / 2;
        if (cand[mid] < self)
            lo = mid + 1;
        else
            hi = mid;
    }
    const bool self_in = lo < n && cand[lo] == self;
    const size_t others = n - self_in;
    if (others == 0)
        return err_set(PS_ERR_INVALID, "no other prompt of the same token length to resample from");
    /* the k-th candidate other than self, k uniform in [0, others) (modulo
     * bias below 2^-40 for any dataset that fits) */
    const size_t k = (size_t)(splitmix64(splitmix64(seed) ^ (uint64_t)self) % others);
    *donor = cand[self_in && k >= lo ? k + 1 : k];
    return PS_OK;
}

/* ---- ablations over a dataset ---------------------------------------------- */

ps_status ablate_mean_over_check(const char *mean_over)
{
    patch_subset f;
    return patch_subset_parse(mean_over, &f);
}

static bool filter_match(const patch_subset *f, size_t index, const dataset_item *it)
{
    if (f->kind == PATCH_SUBSET_ALL)
        return true;
    if (f->kind == PATCH_SUBSET_RANGE)
        return index >= f->a && index < f->b;
    const json_t *v = json_object_get(it->obj, f->field);
    if (json_is_string(v))
        return !strcmp(json_string_value(v), f->value);
    if (json_is_integer(v)) {
        char buf[32];
        snprintf(buf, sizeof buf, "%lld", (long long)json_integer_value(v));
        return !strcmp(buf, f->value);
    }
    return false;
}

/* The set's base prompts: n of them, prompt k of len[k] tokens at ids +
 * off[k], dataset index index[k]. */
typedef struct {
    size_t n, cap, n_ids, cap_ids;
    size_t *index, *len, *off;
    int32_t *ids;
} set_tokens;

static void set_tokens_free(set_tokens *t)
{
    free(t->index), free(t->len), free(t->off), free(t->ids);
    memset(t, 0, sizeof *t);
}

static ps_status set_tokens_push(set_tokens *t, size_t index, const int32_t *ids, size_t T)
{
    if (t->n == t->cap) {
        size_t cap = t->cap ? 2 * t->cap : 64;
        size_t *a = realloc(t->index, cap * sizeof *a);
        if (a)
            t->index = a;
        size_t *b = a ? realloc(t->len, cap * sizeof *b) : NULL;
        if (b)
            t->len = b;
        size_t *c = b ? realloc(t->off, cap * sizeof *c) : NULL;
        if (!c)
            return err_set(PS_ERR_NOMEM, "out of memory");
        t->off = c;
        t->cap = cap;
    }
    if (t->n_ids + T > t->cap_ids) {
        size_t cap = t->cap_ids ? 2 * t->cap_ids : 4096;
        while (cap < t->n_ids + T)
            cap *= 2;
        int32_t *p = realloc(t->ids, cap * sizeof *p);
        if (!p)
            return err_set(PS_ERR_NOMEM, "out of memory");
        t->ids = p;
        t->cap_ids = cap;
    }
    t->index[t->n] = index, t->len[t->n] = T, t->off[t->n] = t->n_ids;
    memcpy(t->ids + t->n_ids, ids, T * sizeof *ids);
    t->n_ids += T;
    t->n++;
    return PS_OK;
}

/* Read the set: every valid pair (an invalid one is an error naming
 * FILE:LINE); those the filter takes (all of them when !filtered). */
static ps_status set_read(const model *m, const tokenizer *tok, const ablate_set *s, bool filtered, set_tokens *out)
{
    memset(out, 0, sizeof *out);
    patch_subset f;
    ps_status st = patch_subset_parse(filtered ? s->mean_over : NULL, &f);
    if (st)
        return st;
    dataset_reader rd;
    if ((st = dataset_reader_open(&rd, s->path)))
        return st;
    for (size_t k = 0; !s->max_prompts || k < s->max_prompts; k++) {
        dataset_item it;
        uint64_t off;
        if ((st = dataset_reader_next(&rd, &it, &off)) || !it.obj)
            break;
        char where[1100];
        snprintf(where, sizeof where, "%s:%zu", s->path, it.line);
        dataset_tokens tk = {0};
        if (filter_match(&f, k, &it) &&
            (st = dataset_item_tokenize(&it, where, tok, s->bos, m->cfg.n_positions, &tk)) == PS_OK)
            st = set_tokens_push(out, k, s->direction == PATCH_NOISE ? tk.clean_ids : tk.corrupted_ids, tk.n_tokens);
        else if (st && s->skip_invalid && st != PS_ERR_NOMEM)
            st = PS_OK; /* the sweep skips it, so does its mean */
        dataset_tokens_free(&tk);
        json_decref(it.obj);
        if (st)
            break;
    }
    dataset_reader_close(&rd);
    if (st == PS_OK && out->n == 0)
        st = err_set(PS_ERR_INVALID, "%s: no pair of the dataset is in the ablation's set (mean_over '%s')", s->path,
                     filtered && s->mean_over ? s->mean_over : "all");
    if (st)
        set_tokens_free(out);
    return st;
}

ps_status ablate_mean_of_dataset(const model *m, const tokenizer *tok, comm *c, const ablate_set *s,
                                 ablate_mean *out)
{
    memset(out, 0, sizeof *out);
    const bool root = !c || comm_rank(c) == 0;
    set_tokens t = {0};
    ps_status st = root ? set_read(m, tok, s, true, &t) : PS_OK;
    if (c)
        st = comm_agree(c, st);
    if (st)
        return st;
    /* rank 0's prompts to every rank: counts, then lengths, then ids */
    uint64_t head[2] = {t.n, t.n_ids};
    if (c && (st = comm_bcast(c, head, sizeof head)))
        goto out;
    if (!root) {
        t.n = t.cap = (size_t)head[0], t.n_ids = t.cap_ids = (size_t)head[1];
        t.len = malloc(t.n * sizeof *t.len), t.off = malloc(t.n * sizeof *t.off), t.index = NULL;
        t.ids = malloc((t.n_ids ? t.n_ids : 1) * sizeof *t.ids);
        st = !t.len || !t.off || !t.ids ? err_set(PS_ERR_NOMEM, "out of memory") : PS_OK;
    }
    if (c)
        st = comm_agree(c, st);
    if (st || (c && ( (st = comm_bcast(c, t.len, t.n * sizeof *t.len)) ||
              (st = comm_bcast(c, t.off, t.n * sizeof *t.off)) || (st = comm_bcast(c, t.ids, t.n_ids * sizeof *t.ids)))))
        goto out;
    size_t max_T = 0;
    for (size_t k = 0; k < t.n; k++)
        max_T = t.len[k] > max_T ? t.len[k] : max_T;
    if ((st = ablate_mean_init(out, &m->cfg, max_T)) == PS_OK) {
        const size_t rank = c ? comm_rank(c) : 0, ranks = c ? comm_size(c) : 1;
        forward_cache run = {0};
        if ((st = forward_cache_init(&run, &m->cfg, max_T, FORWARD_LOGITS_NONE)) == PS_OK)
            for (size_t k = rank; k < t.n && st == PS_OK; k += ranks)
                if ((st = forward_run(m, &run, t.ids + t.off[k], t.len[k], NULL)) == PS_OK)
                    st = ablate_mean_add(out, &run);
        forward_cache_free(&run);
    }
    if (c && (st = comm_agree(c, st)) == PS_OK)
        st = comm_allreduce_sum_i64(c, out->words, out->n_words);
    /* every rank runs with *out or with the error, never half of each */
out:
    if (st)
        ablate_mean_free(out);
    set_tokens_free(&t);
    return st;
}

ps_status ablate_resample_of_dataset(const model *m, const tokenizer *tok, const ablate_set *s, uint64_t seed,
                                     const int32_t *base, size_t T, size_t *donor, forward_cache *run)
{
    memset(run, 0, sizeof *run);
    set_tokens t;
    ps_status st = set_read(m, tok, s, false, &t);
    if (st)
        return st;
    size_t *cand = malloc(t.n * sizeof *cand), n = 0;
    if (!cand) {
        set_tokens_free(&t);
        return err_set(PS_ERR_NOMEM, "out of memory");
    }
    for (size_t k = 0; k < t.n; k++)
        if (t.len[k] == T && memcmp(t.ids + t.off[k], base, T * sizeof *base) != 0)
            cand[n++] = k;
    size_t pick = 0;
    if (n == 0)
        st = err_set(PS_ERR_INVALID, "%s: no prompt of %zu tokens (other than this one) to resample from", s->path, T);
    else
        st = ablate_resample_pick(seed, SIZE_MAX, cand, n, &pick);
    if (st == PS_OK) {
        *donor = t.index[pick];
        if ((st = forward_cache_init(run, &m->cfg, T, FORWARD_LOGITS_NONE)) == PS_OK)
            st = forward_run(m, run, t.ids + t.off[pick], T, NULL);
        if (st)
            forward_cache_free(run);
    }
    free(cand);
    set_tokens_free(&t);
    return st;
}

/* ---- the sources of a sweep ------------------------------------------------- */

static void chunk_free(ablate_sources *s)
{
    for (size_t k = 0; s->chunk_runs && k < s->chunk_n; k++)
        forward_cache_free(&s->chunk_runs[k]);
    free(s->chunk_runs), free(s->chunk_len), free(s->chunk_off), free(s->chunk_ids);
    s->chunk_runs = NULL, s->chunk_len = s->chunk_off = NULL, s->chunk_ids = NULL;
    s->chunk_n = 0;
}

/* Set positions by (length, position): positions ascend with dataset
 * indices, so each length's group lists its indices in order. */
static const size_t *sort_len;
static int cmp_len_index(const void *a, const void *b)
{
    const size_t x = *(const size_t *)a, y = *(const size_t *)b;
    if (sort_len[x] != sort_len[y])
        return sort_len[x] < sort_len[y] ? -1 : 1;
    return x < y ? -1 : x > y;
}

/* Rank 0: every pair's donor among the pairs of its length. */
static ps_status resample_donors(ablate_sources *s, const model *m, const tokenizer *tok, const ablate_set *set,
                                 uint64_t seed)
{
    set_tokens t;
    ablate_set all = *set;
    all.mean_over = NULL;
    ps_status st = set_read(m, tok, &all, false, &t);
    if (st)
        return st;
    const size_t n = t.n ? t.index[t.n - 1] + 1 : 0;
    size_t *order = malloc((t.n ? t.n : 1) * sizeof *order), *cand = malloc((t.n ? t.n : 1) * sizeof *cand);
    s->donor = malloc((n ? n : 1) * sizeof *s->donor);
    s->set_len = calloc(n ? n : 1, sizeof *s->set_len);
    s->set_off = calloc(n ? n : 1, sizeof *s->set_off);
    if (!order || !cand || !s->donor || !s->set_len || !s->set_off) {
        free(order), free(cand), set_tokens_free(&t);
        return err_set(PS_ERR_NOMEM, "out of memory");
    }
    s->n_set = n;
    for (size_t i = 0; i < n; i++)
        s->donor[i] = SIZE_MAX;
    for (size_t k = 0; k < t.n; k++) {
        order[k] = k;
        s->set_len[t.index[k]] = t.len[k];
        s->set_off[t.index[k]] = t.off[k];
    }
    /* groups of one length, dataset indices ascending within each */
    sort_len = t.len;
    qsort(order, t.n, sizeof *order, cmp_len_index);
    for (size_t g = 0; g < t.n;) {
        size_t e = g;
        while (e < t.n && t.len[order[e]] == t.len[order[g]])
            e++;
        for (size_t q = g; q < e; q++)
            cand[q - g] = t.index[order[q]];
        for (size_t q = g; q < e && e - g > 1; q++)
            ablate_resample_pick(seed, t.index[order[q]], cand, e - g, &s->donor[t.index[order[q]]]);
        g = e;
    }
    s->set_ids = t.ids;
    t.ids = NULL;
    free(order), free(cand);
    set_tokens_free(&t);
    return PS_OK;
}

ps_status ablate_sources_init(ablate_sources *s, const model *m, const tokenizer *tok, comm *c, patch_source source,
                              const ablate_set *set, uint64_t seed)
{
    memset(s, 0, sizeof *s);
    if (!patch_source_ablation(source))
        return PS_OK;
    s->m = m;
    s->source = source;
    ps_status st = PS_OK;
    if (source == PATCH_SOURCE_RESAMPLE) {
        if (!c || comm_rank(c) == 0)
            st = resample_donors(s, m, tok, set, seed);
    } else if (!(s->by_T = calloc(m->cfg.n_positions + 1, sizeof *s->by_T))) {
        st = err_set(PS_ERR_NOMEM, "out of memory");
    }
    if (c)
        st = comm_agree(c, st);
    if (st == PS_OK && source == PATCH_SOURCE_MEAN)
        st = ablate_mean_of_dataset(m, tok, c, set, &s->mean);
    if (st)
        ablate_sources_free(s);
    return st;
}

ps_status ablate_sources_chunk(ablate_sources *s, comm *c, const size_t *dataset_index, size_t n)
{
    if (s->source != PATCH_SOURCE_RESAMPLE)
        return PS_OK;
    chunk_free(s);
    const bool root = !c || comm_rank(c) == 0;
    uint64_t head[2] = {n, 0};
    ps_status st = PS_OK;
    for (size_t k = 0; root && k < n && st == PS_OK; k++) {
        const size_t i = dataset_index[k];
        if (i >= s->n_set || s->donor[i] == SIZE_MAX)
            st = err_set(PS_ERR_INVALID, "pair %zu of the dataset has no other pair of its token length to "
                         "resample from", i);
        else
            head[1] += s->set_len[s->donor[i]];
    }
    if (c && ((st = comm_agree(c, st)) || (st = comm_bcast(c, head, sizeof head))))
        return st;
    if (st)
        return st;
    s->chunk_n = (size_t)head[0];
    const size_t nk = s->chunk_n ? s->chunk_n : 1;
    s->chunk_len = malloc(nk * sizeof *s->chunk_len), s->chunk_off = malloc(nk * sizeof *s->chunk_off);
    s->chunk_ids = malloc((head[1] ? head[1] : 1) * sizeof *s->chunk_ids);
    s->chunk_runs = calloc(nk, sizeof *s->chunk_runs);
    if (!s->chunk_len || !s->chunk_off || !s->chunk_ids || !s->chunk_runs)
        st = err_set(PS_ERR_NOMEM, "out of memory");
    for (size_t k = 0, off = 0; root && st == PS_OK && k < s->chunk_n; k++) {
        const size_t d = s->donor[dataset_index[k]];
        s->chunk_len[k] = s->set_len[d], s->chunk_off[k] = off;
        memcpy(s->chunk_ids + off, s->set_ids + s->set_off[d], s->set_len[d] * sizeof *s->chunk_ids);
        off += s->set_len[d];
    }
    if (c && ((st = comm_agree(c, st)) || (st = comm_bcast(c, s->chunk_len, s->chunk_n * sizeof *s->chunk_len)) ||
              (st = comm_bcast(c, s->chunk_off, s->chunk_n * sizeof *s->chunk_off)) ||
              (st = comm_bcast(c, s->chunk_ids, (size_t)head[1] * sizeof *s->chunk_ids))))
        return st;
    return st;
}

ps_status ablate_sources_attach(ablate_sources *s, patch_pair *p, size_t k)
{
    if (!s || !patch_source_ablation(s->source))
        return PS_OK;
    forward_cache *c;
    ps_status st = PS_OK;
    if (s->source == PATCH_SOURCE_RESAMPLE) {
        if (k >= s->chunk_n || s->chunk_len[k] != p->T)
            return err_set(PS_ERR_INTERNAL, "resample: the donor of the chunk's prompt %zu is not of its length", k);
        c = &s->chunk_runs[k];
        if (!c->arena && ((st = forward_cache_init(c, &s->m->cfg, p->T, FORWARD_LOGITS_NONE)) ||
                          (st = forward_run(s->m, c, s->chunk_ids + s->chunk_off[k], p->T, NULL)))) {
            forward_cache_free(c);
            return st;
        }
    } else {
        c = &s->by_T[p->T];
        if (!c->arena && (st = s->source == PATCH_SOURCE_ZERO ? ablate_zero_cache(s->m, p->T, c)
                                                              : ablate_mean_cache(&s->mean, s->m, p->T, c)))
            return st;
    }
    p->source = c;
    return PS_OK;
}

void ablate_sources_free(ablate_sources *s)
{
    if (s->by_T)
        for (size_t t = 0; t <= s->m->cfg.n_positions; t++)
            forward_cache_free(&s->by_T[t]);
    free(s->by_T);
    ablate_mean_free(&s->mean);
    chunk_free(s);
    free(s->donor), free(s->set_len), free(s->set_off), free(s->set_ids);
    memset(s, 0, sizeof *s);
}
