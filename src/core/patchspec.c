#include "patchspec.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "strutil.h"

/* ---- names, grids, cells ------------------------------------------------- */

static const char *const component_names[PATCH_COMPONENT_COUNT] = {
    [PATCH_RESID_PRE] = "resid_pre",         [PATCH_RESID_MID] = "resid_mid",
    [PATCH_ATTN_OUT] = "attn_out",           [PATCH_MLP_OUT] = "mlp_out",
    [PATCH_Z] = "z",                         [PATCH_Z_ALL_POS] = "z_all_pos",
    [PATCH_Q_ALL_POS] = "q_all_pos",         [PATCH_K_ALL_POS] = "k_all_pos",
    [PATCH_V_ALL_POS] = "v_all_pos",         [PATCH_PATTERN_ALL_POS] = "pattern_all_pos",
    [PATCH_Q] = "q",                         [PATCH_K] = "k",
    [PATCH_V] = "v",                         [PATCH_PATTERN] = "pattern",
    [PATCH_PATTERN_DEST_SRC] = "pattern_dest_src",
};
static const char *const metric_names[PATCH_METRIC_COUNT] = {
    [PATCH_LOGIT_DIFF] = "logit_diff", [PATCH_PROB] = "prob", [PATCH_LOGPROB] = "logprob", [PATCH_KL] = "kl"};

const char *patch_component_name(patch_component c) { return component_names[c]; }
const char *patch_metric_name(patch_metric m) { return metric_names[m]; }

ps_status patch_metric_parse(const char *s, patch_metric *m)
{
    for (int i = 0; i < PATCH_METRIC_COUNT; i++)
        if (!strcmp(s, metric_names[i])) {
            *m = (patch_metric)i;
            return PS_OK;
        }
    return err_set(PS_ERR_INVALID, "unknown metric '%s' (logit_diff, prob, logprob or kl)", s);
}

ps_status patch_metric_list_parse(const char *s, patch_metric_list *out)
{
    memset(out, 0, sizeof *out);
    const char *p = s;
    for (bool more = true; more;) {
        const char *a;
        size_t len;
        more = str_list_next(&p, &a, &len);
        char name[32];
        if (len == 0 || len >= sizeof name)
            return err_set(PS_ERR_INVALID, "bad metric list '%s' (comma-separated logit_diff, prob, logprob, kl)", s);
        memcpy(name, a, len);
        name[len] = '\0';
        patch_metric m = PATCH_LOGIT_DIFF;
        ps_status st = patch_metric_parse(name, &m);
        if (st)
            return st;
        for (size_t k = 0; k < out->n; k++)
            if (out->m[k] == m)
                return err_set(PS_ERR_INVALID, "metric '%s' is listed twice in '%s'", name, s);
        out->m[out->n++] = m; /* distinct names: at most PATCH_METRIC_COUNT */
    }
    return PS_OK;
}

bool patch_component_all_pos(patch_component c) { return c >= PATCH_Z_ALL_POS && c <= PATCH_PATTERN_ALL_POS; }

bool patch_component_per_head(patch_component c) { return c >= PATCH_Z && c < PATCH_COMPONENT_COUNT; }

hook_kind patch_component_hook(patch_component comp)
{
    static const hook_kind k[PATCH_COMPONENT_COUNT] = {
        [PATCH_RESID_PRE] = HOOK_RESID_PRE, [PATCH_RESID_MID] = HOOK_RESID_MID, [PATCH_ATTN_OUT] = HOOK_ATTN_OUT,
        [PATCH_MLP_OUT] = HOOK_MLP_OUT,     [PATCH_Z] = HOOK_Z,                 [PATCH_Z_ALL_POS] = HOOK_Z,
        [PATCH_Q_ALL_POS] = HOOK_Q,         [PATCH_K_ALL_POS] = HOOK_K,         [PATCH_V_ALL_POS] = HOOK_V,
        [PATCH_PATTERN_ALL_POS] = HOOK_PATTERN, [PATCH_Q] = HOOK_Q,               [PATCH_K] = HOOK_K,
        [PATCH_V] = HOOK_V,                     [PATCH_PATTERN] = HOOK_PATTERN,    [PATCH_PATTERN_DEST_SRC] = HOOK_PATTERN,
    };
    return k[comp];
}

bool patch_component_kv_heads(patch_component c, const model_config *cfg)
{
    return (c == PATCH_K_ALL_POS || c == PATCH_V_ALL_POS || c == PATCH_K || c == PATCH_V) &&
           model_kv_heads(cfg) != cfg->n_head;
}

ps_status patch_components_parse(const char *list, bool on[PATCH_COMPONENT_COUNT])
{
    memset(on, 0, PATCH_COMPONENT_COUNT * sizeof *on);
    size_t n_on = 0;
    const char *p = list;
    while (*p) {
        size_t len = strcspn(p, ",");
        char name[64];
        if (len == 0 || len >= sizeof name)
            return err_set(PS_ERR_INVALID, "bad component list '%s'", list);
        memcpy(name, p, len);
        name[len] = '\0';
        bool found = false;
        if (!strcmp(name, "block_every")) {
            on[PATCH_RESID_PRE] = on[PATCH_ATTN_OUT] = on[PATCH_MLP_OUT] = found = true;
        } else if (!strcmp(name, "head_all_pos_every")) {
            for (int c = PATCH_Z_ALL_POS; c <= PATCH_PATTERN_ALL_POS; c++)
                on[c] = true;
            found = true;
        } else if (!strcmp(name, "head_by_pos_every")) {
            on[PATCH_Z] = on[PATCH_Q] = on[PATCH_K] = on[PATCH_V] = on[PATCH_PATTERN] = found = true;
        } else {
            for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
                if (!strcmp(name, component_names[c]))
                    on[c] = found = true;
        }
        if (!found)
            return err_set(PS_ERR_INVALID,
                           "unknown component '%s' (resid_pre, resid_mid, attn_out, mlp_out, z, q, k, v, pattern, "
                           "pattern_dest_src, z_all_pos, q_all_pos, k_all_pos, v_all_pos, pattern_all_pos, "
                           "block_every, head_all_pos_every, head_by_pos_every)",
                           name);
        p += len;
        if (*p == ',')
            p++;
    }
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        n_on += on[c];
    if (n_on == 0)
        return err_set(PS_ERR_INVALID, "empty component list");
    return PS_OK;
}

ps_status patch_components_check(const bool on[PATCH_COMPONENT_COUNT], const model_config *cfg)
{
    if (on[PATCH_RESID_MID] && cfg->parallel_residual)
        return err_set(PS_ERR_INVALID, "component resid_mid does not exist with a parallel residual "
                       "(use_parallel_residual: x + attn(ln1(x)) + mlp(ln2(x)); TransformerLens has no hook_resid_mid)");
    return PS_OK;
}

size_t patch_grid_shape(patch_component c, const model_config *cfg, size_t T, size_t shape[PATCH_GRID_MAX_DIMS],
                        const char *dim_names[PATCH_GRID_MAX_DIMS])
{
    const char *dn[PATCH_GRID_MAX_DIMS] = {"layer", NULL, NULL, NULL};
    const char *head = patch_component_kv_heads(c, cfg) ? "kv_head" : "head";
    const size_t n_head = patch_component_kv_heads(c, cfg) ? model_kv_heads(cfg) : cfg->n_head;
    shape[0] = cfg->n_layer;
    size_t nd;
    if (c == PATCH_PATTERN_DEST_SRC) {
        /* (layer, destination, source, head) */
        shape[1] = T, shape[2] = T, shape[3] = n_head, nd = 4;
        dn[1] = "position", dn[2] = "src_position", dn[3] = head;
    } else if (patch_component_all_pos(c)) {
        shape[1] = n_head, dn[1] = head, nd = 2;
    } else if (patch_component_per_head(c)) {
        shape[1] = T, shape[2] = n_head, dn[1] = "position", dn[2] = head, nd = 3;
    } else {
        shape[1] = T, dn[1] = "position", nd = 2;
    }
    /* Three entries as before this grid had four axes (NULL past ndim), four
     * for pattern_dest_src alone: a caller sized for three stays safe for
     * every other component. */
    if (dim_names)
        for (size_t i = 0; i < (nd > 3 ? nd : 3); i++)
            dim_names[i] = i < nd ? dn[i] : NULL;
    return nd;
}

size_t patch_grid_size(patch_component c, const model_config *cfg, size_t T)
{
    size_t shape[PATCH_GRID_MAX_DIMS];
    const size_t nd = patch_grid_shape(c, cfg, T, shape, NULL);
    size_t n = 1;
    for (size_t k = 0; k < nd; k++)
        n *= shape[k];
    return n;
}

ps_status patch_grid_cells(patch_component c, const model_config *cfg, uint32_t pair, size_t T,
                           patch_cell **cells, size_t *n)
{
    size_t shape[PATCH_GRID_MAX_DIMS];
    const size_t nd = patch_grid_shape(c, cfg, T, shape, NULL);
    for (size_t k = nd; k < PATCH_GRID_MAX_DIMS; k++)
        shape[k] = 1;
    const size_t total = patch_grid_size(c, cfg, T);
    patch_cell *out = malloc((total ? total : 1) * sizeof *out);
    if (!out)
        return err_set(PS_ERR_NOMEM, "cannot allocate %zu patching cells", total);
    /* Row-major over (layer, i, j, k): the axes after the layer are
     * (position), (position, head), (position, src_position, head) or (head). */
    size_t w = 0;
    for (size_t l = 0; l < shape[0]; l++)
        for (size_t i = 0; i < shape[1]; i++)
            for (size_t j = 0; j < shape[2]; j++)
                for (size_t k = 0; k < shape[3]; k++) {
                    patch_cell *cell = &out[w++];
                    *cell = (patch_cell){.pair = pair, .component = (uint16_t)c, .layer = (uint16_t)l};
                    if (c == PATCH_PATTERN_DEST_SRC)
                        cell->position = (uint16_t)i, cell->src_position = (uint16_t)j, cell->head = (uint16_t)k;
                    else if (patch_component_all_pos(c))
                        cell->head = (uint16_t)i;
                    else if (patch_component_per_head(c))
                        cell->position = (uint16_t)i, cell->head = (uint16_t)j;
                    else
                        cell->position = (uint16_t)i;
                }
    *cells = out;
    *n = total;
    return PS_OK;
}

/* ---- metrics ------------------------------------------------------------- */

/* The metric of one logits row; lse = logsumexp(logits), or NAN to have it
 * computed here when the metric needs it (logit_diff never does). */
static double metric_with_lse(const float *logits, size_t V, int32_t answer, int32_t wrong,
                              const float *clean_logprobs, patch_metric metric, double lse)
{
    if (metric != PATCH_LOGIT_DIFF && isnan(lse))
        lse = forward_logsumexp(logits, V);
    switch (metric) {
    case PATCH_LOGIT_DIFF:
        return (double)logits[answer] - (double)logits[wrong];
    case PATCH_PROB:
        return exp((double)logits[answer] - lse);
    case PATCH_LOGPROB:
        return (double)logits[answer] - lse;
    case PATCH_KL: {
        /* KL(clean || patched) = sum_i p_c(i) (log p_c(i) - log p(i)) */
        double kl = 0.0;
        for (size_t i = 0; i < V; i++) {
            double lc = clean_logprobs[i];
            kl += exp(lc) * (lc - ((double)logits[i] - lse));
        }
        return kl;
    }
    case PATCH_METRIC_COUNT:
        break;
    }
    return NAN;
}

double patch_metric_of_logits(const float *logits, size_t V, int32_t answer, int32_t wrong,
                              const float *clean_logprobs, patch_metric metric)
{
    return metric_with_lse(logits, V, answer, wrong, clean_logprobs, metric, NAN);
}

void patch_metrics_of_logits(const float *logits, size_t V, int32_t answer, int32_t wrong,
                             const float *clean_logprobs, const patch_metric *ms, size_t n, double *out)
{
    double lse = NAN;
    for (size_t k = 0; k < n; k++)
        if (ms[k] != PATCH_LOGIT_DIFF && isnan(lse))
            lse = forward_logsumexp(logits, V);
    for (size_t k = 0; k < n; k++)
        out[k] = metric_with_lse(logits, V, answer, wrong, clean_logprobs, ms[k], lse);
}

double patch_normalize(const patch_pair *p, patch_metric metric, double patched)
{
    double c = p->clean_metric[metric], r = p->corrupted_metric[metric];
    if (c == r)
        return NAN;
    return (patched - r) / (c - r);
}

ps_status patch_pair_init(patch_pair *p, const model *m, const int32_t *clean, const int32_t *corrupted,
                          size_t T, int32_t answer, int32_t wrong)
{
    memset(p, 0, sizeof *p);
    const size_t V = m->cfg.vocab_size;
    if (answer < 0 || (size_t)answer >= V || wrong < 0 || (size_t)wrong >= V)
        return err_set(PS_ERR_RANGE, "answer id %d or wrong id %d is outside the vocabulary (%zu)", answer, wrong, V);
    ps_status st;
    if ((st = forward_cache_init(&p->clean, &m->cfg, T, FORWARD_LOGITS_LAST)) ||
        (st = forward_cache_init(&p->corrupted, &m->cfg, T, FORWARD_LOGITS_LAST)) ||
        (st = forward_run(m, &p->clean, clean, T, NULL)) ||
        (st = forward_run(m, &p->corrupted, corrupted, T, NULL))) {
        patch_pair_free(p);
        return st;
    }
    p->clean_logprobs = malloc(V * sizeof *p->clean_logprobs);
    if (!p->clean_logprobs) {
        patch_pair_free(p);
        return err_set(PS_ERR_NOMEM, "out of memory");
    }
    /* one logsumexp per run serves every metric */
    const double lse_clean = forward_logsumexp(p->clean.logits, V), lse_corrupted = forward_logsumexp(p->corrupted.logits, V);
    for (size_t i = 0; i < V; i++)
        p->clean_logprobs[i] = (float)((double)p->clean.logits[i] - lse_clean);
    p->T = T;
    p->answer = answer;
    p->wrong = wrong;
    for (int k = 0; k < PATCH_METRIC_COUNT; k++) {
        p->clean_metric[k] = metric_with_lse(p->clean.logits, V, answer, wrong, p->clean_logprobs, k, lse_clean);
        p->corrupted_metric[k] =
            metric_with_lse(p->corrupted.logits, V, answer, wrong, p->clean_logprobs, k, lse_corrupted);
    }
    /* The engines read the caches' core alone: return the rest (LayerNorm
     * outputs, the MLP hidden layer: about half of a cache) now. */
    forward_cache_trim(&p->clean);
    forward_cache_trim(&p->corrupted);
    return PS_OK;
}

void patch_pair_free(patch_pair *p)
{
    forward_cache_free(&p->clean);
    forward_cache_free(&p->corrupted);
    free(p->clean_logprobs);
    memset(p, 0, sizeof *p);
}

/* Image layout: u64 T | i32 answer, wrong | f64 clean_metric[M], corrupted_metric[M]
 * | i32 clean tokens[T], corrupted tokens[T] | f32 clean_logprobs[V]
 * | f32 clean core[C] | f32 corrupted core[C], C = core floats of a T-token cache. */
static size_t core_floats_for(const model_config *cfg, size_t T) { return forward_core_floats(cfg, T); }

size_t patch_pair_packed_bytes(const model_config *cfg, size_t T)
{
    return sizeof(uint64_t) + 2 * sizeof(int32_t) + 2 * PATCH_METRIC_COUNT * sizeof(double) +
           2 * T * sizeof(int32_t) + cfg->vocab_size * sizeof(float) + 2 * core_floats_for(cfg, T) * sizeof(float);
}

#define PUT(ptr, n)                   \
    do {                              \
        memcpy(w, (ptr), (n));        \
        w += (n);                     \
    } while (0)
#define GET(ptr, n)                   \
    do {                              \
        memcpy((ptr), r, (n));        \
        r += (n);                     \
    } while (0)

void patch_pair_pack(const patch_pair *p, void *buf)
{
    const model_config *cfg = &p->clean.cfg;
    const size_t core = core_floats_for(cfg, p->T);
    unsigned char *w = buf;
    uint64_t T = p->T;
    PUT(&T, sizeof T);
    PUT(&p->answer, sizeof p->answer);
    PUT(&p->wrong, sizeof p->wrong);
    PUT(p->clean_metric, sizeof p->clean_metric);
    PUT(p->corrupted_metric, sizeof p->corrupted_metric);
    PUT(p->clean.tokens, p->T * sizeof(int32_t));
    PUT(p->corrupted.tokens, p->T * sizeof(int32_t));
    PUT(p->clean_logprobs, cfg->vocab_size * sizeof(float));
    PUT(p->clean.arena, core * sizeof(float));
    PUT(p->corrupted.arena, core * sizeof(float));
}

size_t patch_pair_packed_T(const void *buf)
{
    uint64_t T;
    memcpy(&T, buf, sizeof T);
    return (size_t)T;
}

ps_status patch_pair_unpack(patch_pair *p, const model_config *cfg, const void *buf)
{
    memset(p, 0, sizeof *p);
    const unsigned char *r = buf;
    uint64_t T;
    GET(&T, sizeof T);
    ps_status st;
    if ((st = forward_cache_init(&p->clean, cfg, (size_t)T, FORWARD_LOGITS_LAST)) ||
        (st = forward_cache_init(&p->corrupted, cfg, (size_t)T, FORWARD_LOGITS_LAST))) {
        patch_pair_free(p);
        return st;
    }
    p->clean_logprobs = malloc(cfg->vocab_size * sizeof *p->clean_logprobs);
    if (!p->clean_logprobs) {
        patch_pair_free(p);
        return err_set(PS_ERR_NOMEM, "out of memory");
    }
    const size_t core = core_floats_for(cfg, (size_t)T);
    p->T = p->clean.T = p->corrupted.T = (size_t)T;
    GET(&p->answer, sizeof p->answer);
    GET(&p->wrong, sizeof p->wrong);
    GET(p->clean_metric, sizeof p->clean_metric);
    GET(p->corrupted_metric, sizeof p->corrupted_metric);
    GET(p->clean.tokens, p->T * sizeof(int32_t));
    GET(p->corrupted.tokens, p->T * sizeof(int32_t));
    GET(p->clean_logprobs, cfg->vocab_size * sizeof(float));
    GET(p->clean.arena, core * sizeof(float));
    GET(p->corrupted.arena, core * sizeof(float));
    return PS_OK;
}
#undef PUT
#undef GET


static const char *const method_names[PATCH_METHOD_COUNT] = {"exact",      "atp",        "atp+exact",  "atp*",
                                                              "atp*+exact", "atp+verify", "atp*+verify"};

const char *patch_method_name(patch_method m) { return m < PATCH_METHOD_COUNT ? method_names[m] : "?"; }

ps_status patch_method_parse(const char *s, patch_method *m)
{
    for (int i = 0; i < PATCH_METHOD_COUNT; i++)
        if (!strcmp(s, method_names[i])) {
            *m = (patch_method)i;
            return PS_OK;
        }
    return err_set(PS_ERR_INVALID, "unknown method '%s' (exact, atp, atp+exact, atp*, atp*+exact, atp+verify or "
                   "atp*+verify)", s);
}

bool patch_method_runs_exact(patch_method m)
{
    return m == PATCH_METHOD_EXACT || m == PATCH_METHOD_ATP_EXACT || m == PATCH_METHOD_ATP_STAR_EXACT;
}

bool patch_method_estimates(patch_method m) { return m != PATCH_METHOD_EXACT; }

bool patch_method_qk_fix(patch_method m)
{
    return m == PATCH_METHOD_ATP_STAR || m == PATCH_METHOD_ATP_STAR_EXACT || m == PATCH_METHOD_ATP_STAR_VERIFY;
}

bool patch_method_verifies(patch_method m) { return m == PATCH_METHOD_ATP_VERIFY || m == PATCH_METHOD_ATP_STAR_VERIFY; }

static const char *source_names[PATCH_SOURCE_COUNT] = {"clean", "corrupted", "zero", "mean", "resample"};

const char *patch_source_name(patch_source s) { return s < PATCH_SOURCE_COUNT ? source_names[s] : "?"; }

ps_status patch_source_parse(const char *s, patch_source *src)
{
    for (int i = 0; i < PATCH_SOURCE_COUNT; i++)
        if (!strcmp(s, source_names[i])) {
            *src = (patch_source)i;
            return PS_OK;
        }
    return err_set(PS_ERR_INVALID, "unknown source '%s' (clean, corrupted, zero, mean or resample)", s);
}

bool patch_source_ablation(patch_source s) { return s >= PATCH_SOURCE_ZERO && s < PATCH_SOURCE_COUNT; }

ps_status patch_source_direction(patch_source s, bool dir_given, patch_direction *dir)
{
    if (s == PATCH_SOURCE_CLEAN || s == PATCH_SOURCE_CORRUPTED) {
        const patch_direction want = s == PATCH_SOURCE_CLEAN ? PATCH_DENOISE : PATCH_NOISE;
        if (dir_given && *dir != want)
            return err_set(PS_ERR_INVALID,
                           "source %s with direction %s would patch a run with its own values (source clean "
                           "goes with denoise, corrupted with noise)",
                           source_names[s], *dir == PATCH_DENOISE ? "denoise" : "noise");
        *dir = want;
        return PS_OK;
    }
    if (!dir_given)
        *dir = PATCH_NOISE;
    return PS_OK;
}

static bool parse_index(const char *s, size_t n, size_t *out)
{
    if (n == 0 || n > 18)
        return false;
    size_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (size_t)(s[i] - '0');
    }
    *out = v;
    return true;
}

ps_status patch_subset_parse(const char *s, patch_subset *f)
{
    memset(f, 0, sizeof *f);
    if (!s || !*s || !strcmp(s, "all"))
        return PS_OK;
    const char *eq = strchr(s, '='), *colon = strchr(s, ':');
    if (eq && eq != s && (size_t)(eq - s) < sizeof f->field) {
        f->kind = PATCH_SUBSET_FIELD;
        memcpy(f->field, s, (size_t)(eq - s));
        f->value = eq + 1;
        return PS_OK;
    }
    if (!eq && colon && parse_index(s, (size_t)(colon - s), &f->a) &&
        parse_index(colon + 1, strlen(colon + 1), &f->b) && f->a < f->b) {
        f->kind = PATCH_SUBSET_RANGE;
        return PS_OK;
    }
    return err_set(PS_ERR_INVALID,
                   "mean_over '%s' is neither all, a range A:B of dataset indices (A < B) nor FIELD=VALUE", s);
}
