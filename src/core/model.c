/*
 * model: GPT-2 config.json + model.safetensors -> float32 weight pointers.
 *
 * Loading is one pass over the file's tensors: each name is mapped to a
 * "slot" (a fixed position for every weight GPT-2 has), which detects
 * unknown names and names present both with and without "transformer." in
 * O(n_tensors); then every slot is checked for presence, dtype and shape.
 */
#include "model.h"

#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fsutil.h"
#include "sha256.h"
#include "jsonutil.h"

#define PREFIX "transformer."

/* ---- config.json ------------------------------------------------------- */

/* A positive integer field no larger than `cap`.  `v` is the field's value
 * (present and not null). */
static ps_status cfg_size(const char *path, const char *key, const json_t *v, size_t cap, size_t *out)
{
    if (!json_is_integer(v))
        return err_set(PS_ERR_FORMAT, "%s: field '%s' is %s, expected a positive integer", path,
                       key, jsonutil_kind(v));
    json_int_t x = json_integer_value(v);
    if (x <= 0)
        return err_set(PS_ERR_INVALID, "%s: field '%s' is %lld, must be positive", path, key,
                       (long long)x);
    if ((unsigned long long)x > cap)
        return err_set(PS_ERR_NOMEM, "%s: field '%s' is %lld, over the limit of %zu", path, key,
                       (long long)x, cap);
    *out = (size_t)x;
    return PS_OK;
}

static ps_status cfg_required(const char *path, json_t *root, const char *key, size_t cap, size_t *out)
{
    const json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v))
        return err_set(PS_ERR_FORMAT, "%s: missing field '%s'", path, key);
    return cfg_size(path, key, v, cap, out);
}

static ps_status config_from_json(model_config *c, const char *path, json_t *root)
{
    if (!json_is_object(root))
        return err_set(PS_ERR_FORMAT, "%s: top level is %s, expected an object", path, jsonutil_kind(root));
    ps_status st;
    if ((st = cfg_required(path, root, "n_layer", MODEL_MAX_N_LAYER, &c->n_layer)) != PS_OK ||
        (st = cfg_required(path, root, "n_head", MODEL_MAX_N_HEAD, &c->n_head)) != PS_OK ||
        (st = cfg_required(path, root, "n_embd", MODEL_MAX_N_EMBD, &c->n_embd)) != PS_OK ||
        (st = cfg_required(path, root, "vocab_size", MODEL_MAX_VOCAB_SIZE, &c->vocab_size)) != PS_OK)
        return st;

    /* HF's GPT2Config calls it n_positions; configs from before the rename
     * (and OpenAI's hparams) only have n_ctx. */
    const json_t *v = json_object_get(root, "n_positions");
    const char *pos_key = "n_positions";
    if (!v || json_is_null(v)) {
        v = json_object_get(root, "n_ctx");
        pos_key = "n_ctx";
    }
    if (!v || json_is_null(v))
        return err_set(PS_ERR_FORMAT, "%s: missing field 'n_positions' (nor the legacy 'n_ctx')", path);
    if ((st = cfg_size(path, pos_key, v, MODEL_MAX_N_POSITIONS, &c->n_positions)) != PS_OK)
        return st;

    v = json_object_get(root, "n_inner");
    if (!v || json_is_null(v))
        c->n_inner = 4 * c->n_embd; /* <= 2^18 = MODEL_MAX_N_INNER by the n_embd cap */
    else if ((st = cfg_size(path, "n_inner", v, MODEL_MAX_N_INNER, &c->n_inner)) != PS_OK)
        return st;

    if (c->n_embd % c->n_head != 0)
        return err_set(PS_ERR_INVALID, "%s: n_embd %zu is not divisible by n_head %zu", path,
                       c->n_embd, c->n_head);
    c->d_head = c->n_embd / c->n_head;

    c->ln_eps = 1e-5f;
    v = json_object_get(root, "layer_norm_epsilon");
    if (v) {
        if (!json_is_number(v))
            return err_set(PS_ERR_FORMAT, "%s: field 'layer_norm_epsilon' is %s, expected a number",
                           path, jsonutil_kind(v));
        double eps = json_number_value(v);
        /* (0, 1]: LayerNorm divides by sqrt(var + eps); a zero eps divides by
         * zero on constant rows, and one above 1 swamps the variance. */
        if (!(eps > 0.0 && eps <= 1.0) || (float)eps == 0.0f)
            return err_set(PS_ERR_INVALID, "%s: layer_norm_epsilon %g is not in (0, 1]", path, eps);
        c->ln_eps = (float)eps;
    }

    v = json_object_get(root, "activation_function");
    if (v) {
        if (!json_is_string(v))
            return err_set(PS_ERR_FORMAT, "%s: field 'activation_function' is %s, expected a string",
                           path, jsonutil_kind(v));
        /* Both names are the tanh approximation of GELU GPT-2 was trained with. */
        const char *act = json_string_value(v);
        if (strcmp(act, "gelu_new") != 0 && strcmp(act, "gelu_pytorch_tanh") != 0)
            return err_set(PS_ERR_INVALID,
                           "%s: activation_function '%s' is not supported (only gelu_new and "
                           "gelu_pytorch_tanh, GPT-2's tanh-approximated GELU)", path, act);
    }
    return PS_OK;
}

ps_status model_config_parse(model_config *cfg, const char *path, const char *json_text, size_t len)
{
    memset(cfg, 0, sizeof *cfg);
    json_error_t jerr;
    json_t *root = json_loadb(json_text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return err_set(PS_ERR_FORMAT, "%s: not valid JSON: %s (line %d, column %d)", path,
                       jerr.text, jerr.line, jerr.column);
    model_config c = {0};
    ps_status st = config_from_json(&c, path, root);
    json_decref(root);
    if (st == PS_OK)
        *cfg = c;
    return st;
}

/* ---- tensor slots ------------------------------------------------------- */

enum { SLOT_WTE, SLOT_WPE, SLOT_LN_F_W, SLOT_LN_F_B, SLOT_LM_HEAD, N_GLOBAL_SLOTS };

static const char *const global_names[N_GLOBAL_SLOTS] = {
    "wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight",
};

/* Per-layer tensors, in model_block order; layer l's slot k is
 * N_GLOBAL_SLOTS + l * N_BLOCK_SLOTS + k. */
enum {
    B_LN_1_W, B_LN_1_B, B_ATTN_W, B_ATTN_B, B_ATTN_PROJ_W, B_ATTN_PROJ_B,
    B_LN_2_W, B_LN_2_B, B_FC_W, B_FC_B, B_MLP_PROJ_W, B_MLP_PROJ_B, N_BLOCK_SLOTS
};

static const char *const block_names[N_BLOCK_SLOTS] = {
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
    "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
};

typedef enum { NAME_SLOT, NAME_IGNORED, NAME_UNKNOWN, NAME_BAD_LAYER } name_kind;

/* Map a name without the prefix to its slot.  Layer numbers are canonical
 * decimals ("h.01." is unknown); a known suffix on a layer >= n_layer is
 * NAME_BAD_LAYER. */
static name_kind classify(const char *name, size_t n_layer, size_t *slot)
{
    for (size_t i = 0; i < N_GLOBAL_SLOTS; i++)
        if (strcmp(name, global_names[i]) == 0) {
            *slot = i;
            return NAME_SLOT;
        }
    if (strncmp(name, "h.", 2) != 0)
        return NAME_UNKNOWN;
    const char *p = name + 2;
    if (*p < '0' || *p > '9' || (p[0] == '0' && p[1] >= '0' && p[1] <= '9'))
        return NAME_UNKNOWN;
    size_t l = 0;
    for (; *p >= '0' && *p <= '9'; p++) {
        /* Stop accumulating past n_layer: the value only matters up to there
         * and this keeps a long digit string from overflowing. */
        if (l <= n_layer)
            l = l * 10 + (size_t)(*p - '0');
    }
    if (*p != '.')
        return NAME_UNKNOWN;
    p++;
    size_t k = N_BLOCK_SLOTS;
    for (size_t i = 0; i < N_BLOCK_SLOTS; i++)
        if (strcmp(p, block_names[i]) == 0)
            k = i;
    bool buffer = strcmp(p, "attn.bias") == 0 || strcmp(p, "attn.masked_bias") == 0;
    if (k == N_BLOCK_SLOTS && !buffer)
        return NAME_UNKNOWN;
    if (l >= n_layer)
        return NAME_BAD_LAYER;
    if (buffer)
        return NAME_IGNORED; /* the causal mask and its fill value, recomputed by the runtime */
    *slot = N_GLOBAL_SLOTS + l * N_BLOCK_SLOTS + k;
    return NAME_SLOT;
}

/* The name of slot s without prefix, into buf (for messages). */
static const char *slot_name(char *buf, size_t cap, size_t s)
{
    if (s < N_GLOBAL_SLOTS)
        snprintf(buf, cap, "%s", global_names[s]);
    else
        snprintf(buf, cap, "h.%zu.%s", (s - N_GLOBAL_SLOTS) / N_BLOCK_SLOTS,
                 block_names[(s - N_GLOBAL_SLOTS) % N_BLOCK_SLOTS]);
    return buf;
}

/* Expected shape of slot s (HF Conv1D weights are [in, out]). */
static size_t slot_shape(const model_config *c, size_t s, size_t shape[2])
{
    size_t d = c->n_embd, m = c->n_inner;
    switch (s) {
    case SLOT_WTE:
    case SLOT_LM_HEAD: shape[0] = c->vocab_size; shape[1] = d; return 2;
    case SLOT_WPE: shape[0] = c->n_positions; shape[1] = d; return 2;
    case SLOT_LN_F_W:
    case SLOT_LN_F_B: shape[0] = d; return 1;
    default: break;
    }
    switch ((s - N_GLOBAL_SLOTS) % N_BLOCK_SLOTS) {
    case B_ATTN_W: shape[0] = d; shape[1] = 3 * d; return 2;
    case B_ATTN_B: shape[0] = 3 * d; return 1;
    case B_ATTN_PROJ_W: shape[0] = d; shape[1] = d; return 2;
    case B_FC_W: shape[0] = d; shape[1] = m; return 2;
    case B_FC_B: shape[0] = m; return 1;
    case B_MLP_PROJ_W: shape[0] = m; shape[1] = d; return 2;
    default: shape[0] = d; return 1; /* ln_1/ln_2 weight and bias, both c_proj biases */
    }
}

static const char *format_shape(char *buf, size_t cap, const size_t *shape, size_t ndim)
{
    size_t k = (size_t)snprintf(buf, cap, "[");
    for (size_t i = 0; i < ndim && k < cap; i++)
        k += (size_t)snprintf(buf + k, cap - k, "%s%zu", i ? ", " : "", shape[i]);
    if (k < cap)
        snprintf(buf + k, cap - k, "]");
    return buf;
}

/* Map every tensor of the file to a slot (slots[s] = tensor or NULL). */
static ps_status assign_slots(const model *m, const st_tensor **slots)
{
    const st_file *f = &m->st;
    for (size_t i = 0; i < f->n_tensors; i++) {
        const st_tensor *t = &f->tensors[i];
        const char *base = t->name;
        bool prefixed = strncmp(base, PREFIX, strlen(PREFIX)) == 0;
        if (prefixed)
            base += strlen(PREFIX);
        size_t s = 0;
        name_kind kind = classify(base, m->cfg.n_layer, &s);
        /* lm_head sits outside GPT2Model in HF, so it never carries the prefix. */
        if (kind == NAME_SLOT && s == SLOT_LM_HEAD && prefixed)
            kind = NAME_UNKNOWN;
        if (kind == NAME_IGNORED)
            continue;
        if (kind == NAME_UNKNOWN)
            return err_set(PS_ERR_INVALID,
                           "%s: unknown tensor '%s' (not a GPT-2 GPT2LMHeadModel weight)", f->path,
                           t->name);
        if (kind == NAME_BAD_LAYER)
            return err_set(PS_ERR_INVALID,
                           "%s: tensor '%s' is for a layer past the last one (config.json has "
                           "n_layer %zu)", f->path, t->name, m->cfg.n_layer);
        if (slots[s])
            return err_set(PS_ERR_INVALID, "%s: tensor '%s' is present both as '%s' and as '%s'",
                           f->path, base, slots[s]->name, t->name);
        slots[s] = t;
    }
    return PS_OK;
}

/* Presence, dtype and shape of every slot (lm_head may be absent). */
static ps_status check_slots(const model *m, const st_tensor **slots, size_t n_slots)
{
    const char *path = m->st.path;
    char nbuf[64], want[64], got[160];
    for (size_t s = 0; s < n_slots; s++) {
        const st_tensor *t = slots[s];
        if (!t) {
            if (s == SLOT_LM_HEAD)
                continue;
            return err_set(PS_ERR_INVALID,
                           "%s: missing tensor '%s' (looked for it with and without '" PREFIX "')",
                           path, slot_name(nbuf, sizeof nbuf, s));
        }
        if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16 && t->dtype != ST_F64)
            return err_set(PS_ERR_INVALID,
                           "%s: tensor '%s' has dtype %s; weights must be F32, F16, BF16 or F64",
                           path, t->name, st_dtype_name(t->dtype));
        size_t shape[2];
        size_t nd = slot_shape(&m->cfg, s, shape);
        bool ok = t->ndim == nd;
        for (size_t i = 0; ok && i < nd; i++)
            ok = t->shape[i] == shape[i];
        if (!ok)
            return err_set(PS_ERR_INVALID, "%s: tensor '%s' has shape %s, expected %s from config.json",
                           path, t->name, format_shape(got, sizeof got, t->shape, t->ndim),
                           format_shape(want, sizeof want, shape, nd));
    }
    return PS_OK;
}

/* Use an F32 tensor straight from the mmap only if the host reads it as
 * stored (little-endian) and the pointer is aligned for float loads. */
static bool usable_in_place(const st_tensor *t)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return t->dtype == ST_F32 && (uintptr_t)t->data % _Alignof(float) == 0;
#else
    (void)t;
    return false;
#endif
}

static ps_status check_finite(const char *path, const char *name, const float *w, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(w[i]))
            return err_set(PS_ERR_INVALID, "%s: tensor '%s' element %zu is %s: refusing non-finite weights",
                           path, name, i, isnan(w[i]) ? "NaN" : w[i] > 0 ? "+inf" : "-inf");
    return PS_OK;
}

/* Parameters of the model (tied counted once) and floats of the arena (the
 * tensors not used in place), from the headers alone; also the dtype. */
static ps_status count_weights(model *m, const st_tensor **slots, size_t n_slots, size_t *arena_floats)
{
    const char *path = m->st.path;
    size_t total = 0, n_params = 0;
    st_dtype first = ST_DTYPE_COUNT;
    bool mixed = false;
    for (size_t s = 0; s < n_slots; s++) {
        const st_tensor *t = slots[s];
        if (!t)
            continue;
        if (n_params > SIZE_MAX - t->n_elements)
            return err_set(PS_ERR_NOMEM, "%s: parameter count overflows size_t", path);
        n_params += t->n_elements;
        if (!usable_in_place(t))
            total += t->n_elements; /* <= n_params, so no overflow */
        if (first == ST_DTYPE_COUNT)
            first = t->dtype;
        mixed |= t->dtype != first;
    }
    if (total > SIZE_MAX / sizeof(float))
        return err_set(PS_ERR_NOMEM, "%s: %zu converted weights overflow size_t bytes", path, total);
    m->n_params = n_params;
    snprintf(m->weights_dtype, sizeof m->weights_dtype, "%s", mixed ? "mixed" : st_dtype_name(first));
    *arena_floats = total;
    return PS_OK;
}

/* Point every slot at float32 data: in place, or at its place in the arena
 * (converted tensors packed in slot order).  `fill`: also convert into the
 * arena and check every weight (model_load, or the writer of a shared
 * arena); a reader of a shared arena only computes the pointers. */
static ps_status bind_weights(const model *m, const st_tensor **slots, size_t n_slots, const float **w, bool fill)
{
    const char *path = m->st.path;
    size_t used = 0;
    for (size_t s = 0; s < n_slots; s++) {
        const st_tensor *t = slots[s];
        if (!t)
            continue;
        if (usable_in_place(t)) {
            w[s] = t->data;
        } else {
            float *dst = m->arena + used;
            used += t->n_elements;
            w[s] = dst;
            if (fill) {
                ps_status st = st_to_f32(t->dtype, t->data, t->n_elements, dst);
                if (st != PS_OK)
                    return err_wrap(st, "%s: tensor '%s'", path, t->name);
            }
        }
        ps_status st = fill ? check_finite(path, t->name, w[s], t->n_elements) : PS_OK;
        if (st != PS_OK)
            return st;
    }
    return PS_OK;
}

/* config.json, the mmap and the tensor table checked against the config:
 * everything but the weights' values.  slots/w: calloc'd [*n_slots]. */
static ps_status open_checkpoint(model *m, const char *dir, const st_tensor ***slots, const float ***w,
                                 size_t *n_slots)
{
    m->dir = strdup(dir);
    char *cfg_path = fs_join(dir, "config.json");
    char *st_path = fs_join(dir, "model.safetensors");
    ps_status st = PS_OK;
    if (!m->dir || !cfg_path || !st_path)
        st = err_set(PS_ERR_NOMEM, "%s: cannot allocate path names", dir);
    size_t cfg_len = 0;
    if (st == PS_OK)
        st = fs_read_file(cfg_path, MODEL_MAX_CONFIG_BYTES, &m->config_json, &cfg_len);
    if (st == PS_OK)
        st = model_config_parse(&m->cfg, cfg_path, m->config_json, cfg_len);
    if (st == PS_OK)
        st = st_open(&m->st, st_path);
    free(cfg_path);
    free(st_path);
    if (st != PS_OK)
        return st;

    /* n_layer <= 2^10, so the slot count cannot overflow. */
    *n_slots = N_GLOBAL_SLOTS + m->cfg.n_layer * N_BLOCK_SLOTS;
    *slots = calloc(*n_slots, sizeof **slots);
    *w = calloc(*n_slots, sizeof **w);
    m->blocks = calloc(m->cfg.n_layer, sizeof *m->blocks);
    if (!*slots || !*w || !m->blocks)
        return err_set(PS_ERR_NOMEM, "%s: cannot allocate tables for %zu layers", m->st.path, m->cfg.n_layer);
    if ((st = assign_slots(m, *slots)) != PS_OK)
        return st;
    return check_slots(m, *slots, *n_slots);
}

static void set_pointers(model *m, const float **w)
{
    m->wte = w[SLOT_WTE];
    m->wpe = w[SLOT_WPE];
    m->ln_f_w = w[SLOT_LN_F_W];
    m->ln_f_b = w[SLOT_LN_F_B];
    m->tied = w[SLOT_LM_HEAD] == NULL;
    m->unembed = m->tied ? m->wte : w[SLOT_LM_HEAD];
    for (size_t l = 0; l < m->cfg.n_layer; l++) {
        const float **b = w + N_GLOBAL_SLOTS + l * N_BLOCK_SLOTS;
        m->blocks[l] = (model_block){
            .ln_1_w = b[B_LN_1_W], .ln_1_b = b[B_LN_1_B],
            .attn_w = b[B_ATTN_W], .attn_b = b[B_ATTN_B],
            .attn_proj_w = b[B_ATTN_PROJ_W], .attn_proj_b = b[B_ATTN_PROJ_B],
            .ln_2_w = b[B_LN_2_W], .ln_2_b = b[B_LN_2_B],
            .fc_w = b[B_FC_W], .fc_b = b[B_FC_B],
            .mlp_proj_w = b[B_MLP_PROJ_W], .mlp_proj_b = b[B_MLP_PROJ_B],
        };
    }
}

/* Floats of every block's packed matrices (model_pack_weights' layout). */
static size_t packed_floats_of(const model_config *c)
{
    const size_t d = c->n_embd, mm = c->n_inner;
    /* d <= 2^16, m <= 2^18, n_layer <= 2^10 (MODEL_MAX_*): no overflow */
    return c->n_layer * (4 * gemm_packed_floats(d, d) + gemm_packed_floats(d, mm) + gemm_packed_floats(mm, d));
}

/* Point every block's gemm_weight at its place in dst and, if `fill`, pack
 * the matrices there (q, k, v: the three column blocks of attn_w). */
static void pack_into(model *m, float *dst, bool fill)
{
    const size_t d = m->cfg.n_embd, mm = m->cfg.n_inner;
    for (size_t l = 0; l < m->cfg.n_layer; l++) {
        model_block *b = &m->blocks[l];
        gemm_weight *out[] = {&b->q_w, &b->k_w, &b->v_w, &b->attn_proj_p, &b->fc_p, &b->mlp_proj_p};
        const float *src[] = {b->attn_w, b->attn_w + d, b->attn_w + 2 * d, b->attn_proj_w, b->fc_w, b->mlp_proj_w};
        const size_t ks[] = {d, d, d, d, d, mm}, ns[] = {d, d, d, d, mm, d}, ld[] = {3 * d, 3 * d, 3 * d, d, mm, d};
        for (size_t i = 0; i < 6; i++) {
            if (fill)
                gemm_pack(dst, src[i], ld[i], ks[i], ns[i]);
            *out[i] = (gemm_weight){.k = ks[i], .n = ns[i], .data = dst};
            dst += gemm_packed_floats(ks[i], ns[i]);
        }
    }
}

ps_status model_pack_weights(model *m)
{
    if (m->packed_owned)
        free(m->packed);
    m->packed_floats = packed_floats_of(&m->cfg);
    size_t bytes = (m->packed_floats * sizeof(float) + 63) / 64 * 64;
    m->packed = aligned_alloc(64, bytes ? bytes : 64);
    m->packed_owned = m->packed != NULL;
    if (!m->packed)
        return err_set(PS_ERR_NOMEM, "cannot allocate %zu bytes for the packed weights", bytes);
    pack_into(m, m->packed, true);
    return PS_OK;
}

static ps_status load_into(model *m, const char *dir, const model_alloc *a)
{
    const st_tensor **slots = NULL;
    const float **w = NULL;
    size_t n_slots = 0, total = 0, packed = 0;
    ps_status st = open_checkpoint(m, dir, &slots, &w, &n_slots);
    if (st == PS_OK)
        st = count_weights(m, slots, n_slots, &total);
    /* the arena: converted tensors, then (from a 64-byte boundary) the packed matrices */
    const size_t packed_off = (total + 15) / 16 * 16;
    if (st == PS_OK) {
        packed = packed_floats_of(&m->cfg);
        if (packed > SIZE_MAX / sizeof(float) - packed_off)
            st = err_set(PS_ERR_NOMEM, "%s: the packed weights overflow size_t bytes", m->st.path);
    }
    const size_t floats = st == PS_OK ? packed_off + packed : 0;
    bool fill = true;
    if (a) {
        /* Called whatever st is: the other processes may be waiting in it. */
        void *ptr = NULL;
        bool writer = false;
        st = a->alloc(a->user, st, floats * sizeof(float), &ptr, &writer);
        if (st == PS_OK) {
            m->arena = ptr;
            m->arena_floats = total;
            m->arena_shared = true;
            m->alloc = *a;
            fill = writer;
        }
    } else if (st == PS_OK) {
        m->arena = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64 + 64);
        if (!m->arena)
            st = err_set(PS_ERR_NOMEM, "%s: cannot allocate %zu bytes for converted and packed weights",
                         m->st.path, floats * sizeof(float));
        m->arena_floats = total;
    }
    if (st == PS_OK)
        st = bind_weights(m, slots, n_slots, w, fill);
    if (st == PS_OK) {
        /* the writer packs before publishing; readers only take the pointers */
        set_pointers(m, w);
        m->packed = m->arena + packed_off;
        m->packed_floats = packed;
        pack_into(m, m->packed, fill);
    }
    if (a)
        st = a->publish(a->user, st);
    free(slots);
    free(w);
    return st;
}

ps_status model_load_shared(model *m, const char *dir, const model_alloc *a)
{
    memset(m, 0, sizeof *m);
    ps_status st = load_into(m, dir, a);
    if (st != PS_OK)
        model_free(m);
    return st;
}

ps_status model_load(model *m, const char *dir) { return model_load_shared(m, dir, NULL); }

ps_status model_hash(model *m)
{
    if (!m->st.map)
        return err_set(PS_ERR_INVALID, "model_hash: no model loaded");
    sha256_hex(m->st.map, m->st.map_size, m->sha256);
    return PS_OK;
}

void model_free(model *m)
{
    st_close(&m->st);
    if (m->arena_shared)
        m->alloc.release(m->alloc.user, m->arena);
    else
        free(m->arena);
    if (m->packed_owned)
        free(m->packed);
    free(m->blocks);
    free(m->dir);
    free(m->config_json);
    memset(m, 0, sizeof *m);
}
