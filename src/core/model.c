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
#include <sys/mman.h>
#include <unistd.h>

#include "fsutil.h"
#include "gemm_bf16.h"
#include "hashcache.h"
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

/* An optional positive integer: absent or null -> *out = dflt. */
static ps_status cfg_optional(const char *path, json_t *root, const char *key, size_t cap, size_t dflt, size_t *out)
{
    const json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return PS_OK;
    }
    return cfg_size(path, key, v, cap, out);
}

/* An optional boolean: absent or null -> dflt. */
static ps_status cfg_bool(const char *path, json_t *root, const char *key, bool dflt, bool *out)
{
    const json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return PS_OK;
    }
    if (!json_is_boolean(v))
        return err_set(PS_ERR_FORMAT, "%s: field '%s' is %s, expected true or false", path, key, jsonutil_kind(v));
    *out = json_is_true(v);
    return PS_OK;
}

/* An optional number (integer or real) in (lo, hi]: absent or null -> dflt. */
static ps_status cfg_number(const char *path, json_t *root, const char *key, double lo, double hi, double dflt,
                            double *out)
{
    const json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return PS_OK;
    }
    if (!json_is_number(v))
        return err_set(PS_ERR_FORMAT, "%s: field '%s' is %s, expected a number", path, key, jsonutil_kind(v));
    double x = json_number_value(v);
    if (!(x > lo && x <= hi))
        return err_set(PS_ERR_INVALID, "%s: field '%s' is %g, not in (%g, %g]", path, key, x, lo, hi);
    *out = x;
    return PS_OK;
}

/* An optional string: absent or null -> NULL. */
static ps_status cfg_string(const char *path, json_t *root, const char *key, const char **out)
{
    const json_t *v = json_object_get(root, key);
    *out = NULL;
    if (!v || json_is_null(v))
        return PS_OK;
    if (!json_is_string(v))
        return err_set(PS_ERR_FORMAT, "%s: field '%s' is %s, expected a string", path, key, jsonutil_kind(v));
    *out = json_string_value(v);
    return PS_OK;
}

/* A norm epsilon in (0, 1]: LayerNorm and RMSNorm divide by sqrt(. + eps);
 * a zero eps divides by zero on constant rows, one above 1 swamps the
 * statistics. */
static ps_status cfg_eps(const char *path, json_t *root, const char *key, double dflt, float *out)
{
    const json_t *v = json_object_get(root, key);
    *out = (float)dflt;
    if (!v)
        return PS_OK;
    if (!json_is_number(v))
        return err_set(PS_ERR_FORMAT, "%s: field '%s' is %s, expected a number", path, key, jsonutil_kind(v));
    double eps = json_number_value(v);
    if (!(eps > 0.0 && eps <= 1.0) || (float)eps == 0.0f)
        return err_set(PS_ERR_INVALID, "%s: %s %g is not in (0, 1]", path, key, eps);
    *out = (float)eps;
    return PS_OK;
}

static const struct {
    const char *model_type, *architecture;
    model_family family;
} family_names[] = {
    {"gpt2", "GPT2LMHeadModel", MODEL_FAMILY_GPT2},
    {"gpt_neox", "GPTNeoXForCausalLM", MODEL_FAMILY_NEOX},
    {"llama", "LlamaForCausalLM", MODEL_FAMILY_LLAMA},
    {"mistral", "MistralForCausalLM", MODEL_FAMILY_LLAMA},
    {"qwen2", "Qwen2ForCausalLM", MODEL_FAMILY_QWEN2},
};
#define N_FAMILY_NAMES (sizeof family_names / sizeof family_names[0])

const char *model_family_name(model_family f)
{
    static const char *const names[MODEL_FAMILY_COUNT] = {"gpt2", "gpt_neox", "llama", "qwen2"};
    return f < MODEL_FAMILY_COUNT ? names[f] : "?";
}

/* The family from model_type and architectures[0]; *mistral for Mistral. */
static ps_status cfg_family(const char *path, json_t *root, model_family *fam, bool *mistral)
{
    const char *mt;
    ps_status st = cfg_string(path, root, "model_type", &mt);
    if (st != PS_OK)
        return st;
    const char *arch = NULL;
    const json_t *a = json_object_get(root, "architectures");
    if (a && !json_is_null(a)) {
        if (!json_is_array(a) || json_array_size(a) != 1 || !json_is_string(json_array_get(a, 0)))
            return err_set(PS_ERR_FORMAT, "%s: field 'architectures' must be an array of one string", path);
        arch = json_string_value(json_array_get(a, 0));
    }
    size_t i_mt = N_FAMILY_NAMES, i_arch = N_FAMILY_NAMES;
    for (size_t i = 0; i < N_FAMILY_NAMES; i++) {
        if (mt && strcmp(mt, family_names[i].model_type) == 0)
            i_mt = i;
        if (arch && strcmp(arch, family_names[i].architecture) == 0)
            i_arch = i;
    }
    if (mt && i_mt == N_FAMILY_NAMES)
        return err_set(PS_ERR_INVALID,
                       "%s: model_type '%s' is not supported (gpt2, gpt_neox, llama, mistral, qwen2)", path, mt);
    if (arch && i_arch == N_FAMILY_NAMES)
        return err_set(PS_ERR_INVALID,
                       "%s: architectures '%s' is not supported (GPT2LMHeadModel, GPTNeoXForCausalLM, "
                       "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)", path, arch);
    if (mt && arch && i_mt != i_arch)
        return err_set(PS_ERR_INVALID, "%s: architectures '%s' contradicts model_type '%s'", path, arch, mt);
    size_t i = mt ? i_mt : arch ? i_arch : 0; /* neither: GPT-2, as configs before model_type */
    *fam = family_names[i].family;
    *mistral = strcmp(family_names[i].model_type, "mistral") == 0;
    return PS_OK;
}

static ps_status config_gpt2(model_config *c, const char *path, json_t *root)
{
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

    /* 4 * n_embd <= 2^18 = MODEL_MAX_N_INNER by the n_embd cap */
    if ((st = cfg_optional(path, root, "n_inner", MODEL_MAX_N_INNER, 4 * c->n_embd, &c->n_inner)) != PS_OK)
        return st;

    if (c->n_embd % c->n_head != 0)
        return err_set(PS_ERR_INVALID, "%s: n_embd %zu is not divisible by n_head %zu", path,
                       c->n_embd, c->n_head);
    c->d_head = c->n_embd / c->n_head;
    c->n_kv_head = c->n_head;

    const char *act;
    if ((st = cfg_eps(path, root, "layer_norm_epsilon", 1e-5, &c->ln_eps)) != PS_OK ||
        (st = cfg_string(path, root, "activation_function", &act)) != PS_OK)
        return st;
    /* Both names are the tanh approximation of GELU GPT-2 was trained with. */
    if (act && strcmp(act, "gelu_new") != 0 && strcmp(act, "gelu_pytorch_tanh") != 0)
        return err_set(PS_ERR_INVALID,
                       "%s: activation_function '%s' is not supported (only gelu_new and "
                       "gelu_pytorch_tanh, GPT-2's tanh-approximated GELU)", path, act);
    bool scale = true, by_layer = false;
    if ((st = cfg_bool(path, root, "scale_attn_weights", true, &scale)) != PS_OK ||
        (st = cfg_bool(path, root, "scale_attn_by_inverse_layer_idx", false, &by_layer)) != PS_OK)
        return st;
    c->attn_no_scale = !scale;
    c->attn_scale_by_layer = by_layer;
    c->norm = MODEL_NORM_LAYERNORM;
    c->pos = MODEL_POS_LEARNED;
    c->act = MODEL_ACT_GELU_NEW;
    c->qkv_bias = c->o_bias = c->mlp_bias = true;
    c->tie_word_embeddings = true; /* lm_head.weight optional: tied to wte when absent */
    return PS_OK;
}

/* The sizes every HF config after GPT-2 names the same way. */
static ps_status config_hf_sizes(model_config *c, const char *path, json_t *root)
{
    ps_status st;
    if ((st = cfg_required(path, root, "num_hidden_layers", MODEL_MAX_N_LAYER, &c->n_layer)) != PS_OK ||
        (st = cfg_required(path, root, "num_attention_heads", MODEL_MAX_N_HEAD, &c->n_head)) != PS_OK ||
        (st = cfg_required(path, root, "hidden_size", MODEL_MAX_N_EMBD, &c->n_embd)) != PS_OK ||
        (st = cfg_required(path, root, "intermediate_size", MODEL_MAX_N_INNER, &c->n_inner)) != PS_OK ||
        (st = cfg_required(path, root, "vocab_size", MODEL_MAX_VOCAB_SIZE, &c->vocab_size)) != PS_OK ||
        (st = cfg_required(path, root, "max_position_embeddings", MODEL_MAX_N_POSITIONS, &c->n_positions)) != PS_OK)
        return st;
    return cfg_bool(path, root, "tie_word_embeddings", false, &c->tie_word_embeddings);
}

static ps_status config_neox(model_config *c, const char *path, json_t *root)
{
    ps_status st = config_hf_sizes(c, path, root);
    if (st != PS_OK)
        return st;
    if (c->n_embd % c->n_head != 0)
        return err_set(PS_ERR_INVALID, "%s: hidden_size %zu is not divisible by num_attention_heads %zu", path,
                       c->n_embd, c->n_head);
    c->d_head = c->n_embd / c->n_head;
    c->n_kv_head = c->n_head;
    double pct = 0.25, base = 1e4, base2 = 1e4;
    const char *act;
    bool parallel = true, bias = true;
    if ((st = cfg_eps(path, root, "layer_norm_eps", 1e-5, &c->ln_eps)) != PS_OK ||
        (st = cfg_number(path, root, "rotary_pct", 0.0, 1.0, 0.25, &pct)) != PS_OK ||
        (st = cfg_number(path, root, "rotary_emb_base", 0.0, 1e300, 10000.0, &base)) != PS_OK ||
        (st = cfg_number(path, root, "rope_theta", 0.0, 1e300, base, &base2)) != PS_OK ||
        (st = cfg_bool(path, root, "use_parallel_residual", true, &parallel)) != PS_OK ||
        (st = cfg_bool(path, root, "attention_bias", true, &bias)) != PS_OK ||
        (st = cfg_string(path, root, "hidden_act", &act)) != PS_OK)
        return st;
    if (base2 != base)
        return err_set(PS_ERR_INVALID, "%s: rope_theta %g contradicts rotary_emb_base %g", path, base2, base);
    const json_t *rs = json_object_get(root, "rope_scaling");
    if (rs && !json_is_null(rs))
        return err_set(PS_ERR_INVALID, "%s: rope_scaling is not supported for gpt_neox (only null)", path);
    /* HF: rotary_ndims = int(head_size * rotary_pct) */
    c->rotary_dim = (size_t)((double)c->d_head * pct);
    if (c->rotary_dim == 0 || c->rotary_dim % 2 != 0)
        return err_set(PS_ERR_INVALID, "%s: rotary_pct %g gives %zu rotary dims of %zu; need an even number > 0",
                       path, pct, c->rotary_dim, c->d_head);
    if (!act || strcmp(act, "gelu") == 0)
        c->act = MODEL_ACT_GELU_ERF;
    else if (strcmp(act, "gelu_new") == 0 || strcmp(act, "gelu_pytorch_tanh") == 0)
        c->act = MODEL_ACT_GELU_NEW;
    else
        return err_set(PS_ERR_INVALID, "%s: hidden_act '%s' is not supported for gpt_neox (gelu, gelu_new)", path,
                       act);
    c->norm = MODEL_NORM_LAYERNORM;
    c->pos = MODEL_POS_ROTARY;
    c->rope_theta = base;
    c->rope_scaling = MODEL_ROPE_SCALING_NONE;
    c->qkv_bias = c->o_bias = bias;
    c->mlp_bias = true;
    c->parallel_residual = parallel;
    return PS_OK;
}

static ps_status config_rope_scaling(model_config *c, const char *path, json_t *root)
{
    json_t *rs = json_object_get(root, "rope_scaling");
    c->rope_scaling = MODEL_ROPE_SCALING_NONE;
    if (!rs || json_is_null(rs))
        return PS_OK;
    if (!json_is_object(rs))
        return err_set(PS_ERR_FORMAT, "%s: field 'rope_scaling' is %s, expected an object or null", path,
                       jsonutil_kind(rs));
    const char *type, *type2;
    ps_status st;
    if ((st = cfg_string(path, rs, "rope_type", &type)) != PS_OK || (st = cfg_string(path, rs, "type", &type2)) != PS_OK)
        return st;
    if (!type)
        type = type2;
    if (!type)
        return err_set(PS_ERR_FORMAT, "%s: rope_scaling has no 'rope_type' (nor 'type')", path);
    if (strcmp(type, "default") == 0)
        return PS_OK;
    bool linear = strcmp(type, "linear") == 0, llama3 = strcmp(type, "llama3") == 0;
    if (!linear && !llama3)
        return err_set(PS_ERR_INVALID, "%s: rope_scaling rope_type '%s' is not supported (default, linear, llama3)",
                       path, type);
    if (!json_object_get(rs, "factor"))
        return err_set(PS_ERR_FORMAT, "%s: rope_scaling: missing field 'factor'", path);
    if ((st = cfg_number(path, rs, "factor", 0.0, 1e6, 1.0, &c->rope_factor)) != PS_OK)
        return st;
    c->rope_scaling = linear ? MODEL_ROPE_SCALING_LINEAR : MODEL_ROPE_SCALING_LLAMA3;
    if (llama3) {
        static const char *const keys[] = {"low_freq_factor", "high_freq_factor", "original_max_position_embeddings"};
        double *dst[] = {&c->rope_low_freq_factor, &c->rope_high_freq_factor, &c->rope_original_max_pos};
        for (size_t i = 0; i < 3; i++) {
            if (!json_object_get(rs, keys[i]))
                return err_set(PS_ERR_FORMAT, "%s: rope_scaling: missing field '%s'", path, keys[i]);
            if ((st = cfg_number(path, rs, keys[i], 0.0, 1e12, 1.0, dst[i])) != PS_OK)
                return st;
        }
        if (!(c->rope_high_freq_factor > c->rope_low_freq_factor))
            return err_set(PS_ERR_INVALID, "%s: rope_scaling high_freq_factor %g must exceed low_freq_factor %g", path,
                           c->rope_high_freq_factor, c->rope_low_freq_factor);
    }
    return PS_OK;
}

static ps_status config_llama(model_config *c, const char *path, json_t *root, bool mistral)
{
    ps_status st = config_hf_sizes(c, path, root);
    if (st != PS_OK)
        return st;
    const char *fam = c->family == MODEL_FAMILY_QWEN2 ? "qwen2" : mistral ? "mistral" : "llama";
    if ((st = cfg_optional(path, root, "num_key_value_heads", MODEL_MAX_N_HEAD, c->n_head, &c->n_kv_head)) != PS_OK)
        return st;
    if (c->n_head % c->n_kv_head != 0)
        return err_set(PS_ERR_INVALID, "%s: num_attention_heads %zu is not divisible by num_key_value_heads %zu",
                       path, c->n_head, c->n_kv_head);
    size_t dflt_dh = c->n_embd / c->n_head;
    if ((st = cfg_optional(path, root, "head_dim", MODEL_MAX_N_EMBD, dflt_dh, &c->d_head)) != PS_OK)
        return st;
    if (c->d_head == 0 || c->n_head * c->d_head > MODEL_MAX_N_INNER)
        return err_set(PS_ERR_INVALID, "%s: %zu heads of head_dim %zu are not supported", path, c->n_head, c->d_head);
    double theta = 1e4, partial = 1;
    const char *act;
    if ((st = cfg_eps(path, root, "rms_norm_eps", 1e-6, &c->ln_eps)) != PS_OK ||
        (st = cfg_number(path, root, "rope_theta", 0.0, 1e300, 10000.0, &theta)) != PS_OK ||
        (st = cfg_number(path, root, "partial_rotary_factor", 0.0, 1.0, 1.0, &partial)) != PS_OK ||
        (st = cfg_string(path, root, "hidden_act", &act)) != PS_OK || (st = config_rope_scaling(c, path, root)) != PS_OK)
        return st;
    if (partial != 1.0)
        return err_set(PS_ERR_INVALID, "%s: partial_rotary_factor %g is not supported for %s (only 1)", path, partial,
                       fam);
    if (c->d_head % 2 != 0)
        return err_set(PS_ERR_INVALID, "%s: head_dim %zu is odd; rotary needs an even head size", path, c->d_head);
    if (act && strcmp(act, "silu") != 0)
        return err_set(PS_ERR_INVALID, "%s: hidden_act '%s' is not supported for %s (only silu)", path, act, fam);
    bool attn_bias = false, mlp_bias = false;
    if (c->family == MODEL_FAMILY_QWEN2) {
        bool sw;
        if ((st = cfg_bool(path, root, "use_sliding_window", false, &sw)) != PS_OK)
            return st;
        if (sw)
            return err_set(PS_ERR_INVALID, "%s: use_sliding_window true is not supported (sliding-window attention)",
                           path);
        c->qkv_bias = true; /* Qwen2: q/k/v biases, none on o_proj or the MLP */
    } else {
        size_t window;
        if ((st = cfg_optional(path, root, "sliding_window", SIZE_MAX, 0, &window)) != PS_OK)
            return st;
        /* a window at least as long as any prompt never masks anything */
        if (window != 0 && window < c->n_positions)
            return err_set(PS_ERR_INVALID,
                           "%s: sliding_window %zu is not supported (sliding-window attention; only null or >= "
                           "max_position_embeddings %zu)", path, window, c->n_positions);
        if (!mistral && ((st = cfg_bool(path, root, "attention_bias", false, &attn_bias)) != PS_OK ||
                         (st = cfg_bool(path, root, "mlp_bias", false, &mlp_bias)) != PS_OK))
            return st;
        c->qkv_bias = c->o_bias = attn_bias;
        c->mlp_bias = mlp_bias;
    }
    c->norm = MODEL_NORM_RMSNORM;
    c->pos = MODEL_POS_ROTARY;
    c->act = MODEL_ACT_SILU_GATED;
    c->rotary_dim = c->d_head;
    c->rope_theta = theta;
    return PS_OK;
}

static ps_status config_from_json(model_config *c, const char *path, json_t *root)
{
    if (!json_is_object(root))
        return err_set(PS_ERR_FORMAT, "%s: top level is %s, expected an object", path, jsonutil_kind(root));
    bool mistral = false;
    ps_status st = cfg_family(path, root, &c->family, &mistral);
    if (st != PS_OK)
        return st;
    switch (c->family) {
    case MODEL_FAMILY_GPT2: return config_gpt2(c, path, root);
    case MODEL_FAMILY_NEOX: return config_neox(c, path, root);
    case MODEL_FAMILY_LLAMA:
    case MODEL_FAMILY_QWEN2: return config_llama(c, path, root, mistral);
    case MODEL_FAMILY_COUNT: break;
    }
    return err_set(PS_ERR_INVALID, "%s: unknown model family", path);
}

float model_attn_scale(const model_config *c, size_t layer)
{
    float s = c->attn_no_scale ? 1.0f : 1.0f / sqrtf((float)c->d_head);
    if (c->attn_scale_by_layer)
        s /= (float)(layer + 1);
    return s;
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

enum { SLOT_EMBED, SLOT_POS, SLOT_LN_F_W, SLOT_LN_F_B, SLOT_LM_HEAD, N_GLOBAL_SLOTS };

/* Per-layer tensors of every family; layer l's slot k is
 * N_GLOBAL_SLOTS + l * N_BLOCK_SLOTS + k.  QKV is a fused q|k|v weight
 * (GPT-2's Conv1D c_attn, NeoX's per-head query_key_value); UP is GPT-2's
 * c_fc and NeoX's dense_h_to_4h, DOWN their MLP output projection. */
enum {
    B_LN_1_W, B_LN_1_B, B_QKV_W, B_QKV_B, B_Q_W, B_Q_B, B_K_W, B_K_B, B_V_W, B_V_B, B_O_W, B_O_B,
    B_LN_2_W, B_LN_2_B, B_GATE_W, B_GATE_B, B_UP_W, B_UP_B, B_DOWN_W, B_DOWN_B, N_BLOCK_SLOTS
};

/* A family's HF names: globals and blocks without the prefix (NULL: the
 * family has no such tensor), blocks under "<prefix><layers>{l}.". */
typedef struct {
    const char *what;                 /* for messages */
    const char *prefix;               /* of the base model's tensors */
    bool prefix_optional;             /* GPT-2: names with or without it */
    const char *layers;               /* "h." / "layers." */
    const char *n_layer_key;          /* config key of the layer count, for messages */
    const char *global[N_GLOBAL_SLOTS];
    const char *block[N_BLOCK_SLOTS];
    const char *buffers[4];           /* per-layer buffers ignored (recomputed by the runtime) */
} family_names_t;

static const family_names_t names_gpt2 = {
    "GPT-2 GPT2LMHeadModel", "transformer.", true, "h.", "n_layer",
    {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight"},
    {[B_LN_1_W] = "ln_1.weight", [B_LN_1_B] = "ln_1.bias", [B_QKV_W] = "attn.c_attn.weight",
     [B_QKV_B] = "attn.c_attn.bias", [B_O_W] = "attn.c_proj.weight", [B_O_B] = "attn.c_proj.bias",
     [B_LN_2_W] = "ln_2.weight", [B_LN_2_B] = "ln_2.bias", [B_UP_W] = "mlp.c_fc.weight", [B_UP_B] = "mlp.c_fc.bias",
     [B_DOWN_W] = "mlp.c_proj.weight", [B_DOWN_B] = "mlp.c_proj.bias"},
    {"attn.bias", "attn.masked_bias", NULL, NULL},
};

static const family_names_t names_neox = {
    "GPT-NeoX GPTNeoXForCausalLM", "gpt_neox.", false, "layers.", "num_hidden_layers",
    {"embed_in.weight", NULL, "final_layer_norm.weight", "final_layer_norm.bias", "embed_out.weight"},
    {[B_LN_1_W] = "input_layernorm.weight", [B_LN_1_B] = "input_layernorm.bias",
     [B_QKV_W] = "attention.query_key_value.weight", [B_QKV_B] = "attention.query_key_value.bias",
     [B_O_W] = "attention.dense.weight", [B_O_B] = "attention.dense.bias",
     [B_LN_2_W] = "post_attention_layernorm.weight", [B_LN_2_B] = "post_attention_layernorm.bias",
     [B_UP_W] = "mlp.dense_h_to_4h.weight", [B_UP_B] = "mlp.dense_h_to_4h.bias",
     [B_DOWN_W] = "mlp.dense_4h_to_h.weight", [B_DOWN_B] = "mlp.dense_4h_to_h.bias"},
    {"attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq", NULL},
};

#define LLAMA_BLOCK_NAMES                                                                                         \
    {[B_LN_1_W] = "input_layernorm.weight", [B_Q_W] = "self_attn.q_proj.weight", [B_Q_B] = "self_attn.q_proj.bias", \
     [B_K_W] = "self_attn.k_proj.weight", [B_K_B] = "self_attn.k_proj.bias", [B_V_W] = "self_attn.v_proj.weight",     \
     [B_V_B] = "self_attn.v_proj.bias", [B_O_W] = "self_attn.o_proj.weight", [B_O_B] = "self_attn.o_proj.bias",       \
     [B_LN_2_W] = "post_attention_layernorm.weight", [B_GATE_W] = "mlp.gate_proj.weight",                           \
     [B_GATE_B] = "mlp.gate_proj.bias", [B_UP_W] = "mlp.up_proj.weight", [B_UP_B] = "mlp.up_proj.bias",              \
     [B_DOWN_W] = "mlp.down_proj.weight", [B_DOWN_B] = "mlp.down_proj.bias"}

static const family_names_t names_llama = {
    "Llama LlamaForCausalLM / MistralForCausalLM", "model.", false, "layers.", "num_hidden_layers",
    {"embed_tokens.weight", NULL, "norm.weight", NULL, "lm_head.weight"},
    LLAMA_BLOCK_NAMES,
    {"self_attn.rotary_emb.inv_freq", NULL, NULL, NULL},
};

static const family_names_t names_qwen2 = {
    "Qwen2 Qwen2ForCausalLM", "model.", false, "layers.", "num_hidden_layers",
    {"embed_tokens.weight", NULL, "norm.weight", NULL, "lm_head.weight"},
    LLAMA_BLOCK_NAMES,
    {"self_attn.rotary_emb.inv_freq", NULL, NULL, NULL},
};

static const family_names_t *family_tensor_names(model_family f)
{
    switch (f) {
    case MODEL_FAMILY_NEOX: return &names_neox;
    case MODEL_FAMILY_LLAMA: return &names_llama;
    case MODEL_FAMILY_QWEN2: return &names_qwen2;
    default: return &names_gpt2;
    }
}

typedef enum { NAME_SLOT, NAME_IGNORED, NAME_UNKNOWN, NAME_BAD_LAYER } name_kind;

/* Map a name without the prefix to its slot.  Layer numbers are canonical
 * decimals ("h.01." is unknown); a known suffix on a layer >= n_layer is
 * NAME_BAD_LAYER. */
static name_kind classify(const family_names_t *fn, const char *name, size_t n_layer, size_t *slot)
{
    for (size_t i = 0; i < N_GLOBAL_SLOTS; i++)
        if (fn->global[i] && i != SLOT_LM_HEAD && strcmp(name, fn->global[i]) == 0) {
            *slot = i;
            return NAME_SLOT;
        }
    const size_t nl = strlen(fn->layers);
    if (strncmp(name, fn->layers, nl) != 0)
        return NAME_UNKNOWN;
    const char *p = name + nl;
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
        if (fn->block[i] && strcmp(p, fn->block[i]) == 0)
            k = i;
    bool buffer = false;
    for (size_t i = 0; i < 4 && fn->buffers[i]; i++)
        buffer |= strcmp(p, fn->buffers[i]) == 0;
    if (k == N_BLOCK_SLOTS && !buffer)
        return NAME_UNKNOWN;
    if (l >= n_layer)
        return NAME_BAD_LAYER;
    if (buffer)
        return NAME_IGNORED; /* causal masks, their fill value, rotary frequencies: recomputed */
    *slot = N_GLOBAL_SLOTS + l * N_BLOCK_SLOTS + k;
    return NAME_SLOT;
}

/* The name of slot s (for messages): GPT-2's without the prefix, the other
 * families' in full. */
static const char *slot_name(const family_names_t *fn, char *buf, size_t cap, size_t s)
{
    const char *pre = fn->prefix_optional ? "" : fn->prefix;
    if (s == SLOT_LM_HEAD)
        snprintf(buf, cap, "%s", fn->global[s]);
    else if (s < N_GLOBAL_SLOTS)
        snprintf(buf, cap, "%s%s", pre, fn->global[s]);
    else
        snprintf(buf, cap, "%s%s%zu.%s", pre, fn->layers, (s - N_GLOBAL_SLOTS) / N_BLOCK_SLOTS,
                 fn->block[(s - N_GLOBAL_SLOTS) % N_BLOCK_SLOTS]);
    return buf;
}

typedef enum { EXPECT_ABSENT, EXPECT_REQUIRED, EXPECT_OPTIONAL } slot_expect;

/* Whether slot s is expected, and its shape (GPT-2's Conv1D weights are
 * [in, out]; every other family's nn.Linear weights [out, in]). */
static slot_expect slot_shape(const model_config *c, size_t s, size_t shape[2], size_t *ndim)
{
    const size_t d = c->n_embd, m = c->n_inner, qd = model_q_dim(c), kvd = model_kv_dim(c);
    const bool gpt2 = c->family == MODEL_FAMILY_GPT2, gated = c->act == MODEL_ACT_SILU_GATED;
    const bool ln = c->norm == MODEL_NORM_LAYERNORM;
    *ndim = 1;
    shape[0] = d;
    switch (s) {
    case SLOT_EMBED: shape[0] = c->vocab_size, shape[1] = d, *ndim = 2; return EXPECT_REQUIRED;
    case SLOT_LM_HEAD:
        shape[0] = c->vocab_size, shape[1] = d, *ndim = 2;
        return gpt2 ? EXPECT_OPTIONAL : c->tie_word_embeddings ? EXPECT_ABSENT : EXPECT_REQUIRED;
    case SLOT_POS:
        shape[0] = c->n_positions, shape[1] = d, *ndim = 2;
        return c->pos == MODEL_POS_LEARNED ? EXPECT_REQUIRED : EXPECT_ABSENT;
    case SLOT_LN_F_W: return EXPECT_REQUIRED;
    case SLOT_LN_F_B: return ln ? EXPECT_REQUIRED : EXPECT_ABSENT;
    default: break;
    }
    const bool fused = gpt2 || c->family == MODEL_FAMILY_NEOX;
    slot_expect e = EXPECT_REQUIRED;
    switch ((s - N_GLOBAL_SLOTS) % N_BLOCK_SLOTS) {
    case B_LN_1_W: case B_LN_2_W: return EXPECT_REQUIRED;
    case B_LN_1_B: case B_LN_2_B: return ln ? EXPECT_REQUIRED : EXPECT_ABSENT;
    case B_QKV_W:
        if (gpt2)
            shape[0] = d, shape[1] = 3 * d;
        else
            shape[0] = 3 * qd, shape[1] = d;
        *ndim = 2;
        return fused ? EXPECT_REQUIRED : EXPECT_ABSENT;
    case B_QKV_B: shape[0] = 3 * qd; return fused && c->qkv_bias ? EXPECT_REQUIRED : EXPECT_ABSENT;
    case B_Q_W: shape[0] = qd, shape[1] = d, *ndim = 2; return fused ? EXPECT_ABSENT : e;
    case B_K_W:
    case B_V_W: shape[0] = kvd, shape[1] = d, *ndim = 2; return fused ? EXPECT_ABSENT : e;
    case B_Q_B: shape[0] = qd; return !fused && c->qkv_bias ? e : EXPECT_ABSENT;
    case B_K_B:
    case B_V_B: shape[0] = kvd; return !fused && c->qkv_bias ? e : EXPECT_ABSENT;
    case B_O_W:
        shape[0] = gpt2 ? qd : d, shape[1] = gpt2 ? d : qd, *ndim = 2;
        return e;
    case B_O_B: return c->o_bias ? e : EXPECT_ABSENT;
    case B_GATE_W: shape[0] = m, shape[1] = d, *ndim = 2; return gated ? e : EXPECT_ABSENT;
    case B_GATE_B: shape[0] = m; return gated && c->mlp_bias ? e : EXPECT_ABSENT;
    case B_UP_W:
        shape[0] = gpt2 ? d : m, shape[1] = gpt2 ? m : d, *ndim = 2;
        return e;
    case B_UP_B: shape[0] = m; return c->mlp_bias ? e : EXPECT_ABSENT;
    case B_DOWN_W:
        shape[0] = gpt2 ? m : d, shape[1] = gpt2 ? d : m, *ndim = 2;
        return e;
    case B_DOWN_B: return c->mlp_bias ? e : EXPECT_ABSENT;
    default: return EXPECT_ABSENT;
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

/* Every tensor of every shard, with its file's path for messages. */
typedef struct {
    const st_tensor *t;
    const char *path;
} tensor_ref;

/* Map every tensor of the checkpoint to a slot (slots[s] = tensor or NULL). */
static ps_status assign_slots(const model *m, const tensor_ref *all, size_t n_all, tensor_ref *slots)
{
    const family_names_t *fn = family_tensor_names(m->cfg.family);
    const size_t np = strlen(fn->prefix);
    for (size_t i = 0; i < n_all; i++) {
        const st_tensor *t = all[i].t;
        const char *path = all[i].path, *base = t->name;
        bool prefixed = strncmp(base, fn->prefix, np) == 0;
        if (prefixed)
            base += np;
        size_t s = 0;
        name_kind kind;
        /* the LM head sits outside the base model in HF, so it never carries the prefix */
        if (!prefixed && strcmp(base, fn->global[SLOT_LM_HEAD]) == 0) {
            kind = NAME_SLOT;
            s = SLOT_LM_HEAD;
        } else if (!prefixed && !fn->prefix_optional) {
            kind = NAME_UNKNOWN;
        } else {
            kind = classify(fn, base, m->cfg.n_layer, &s);
        }
        if (kind == NAME_IGNORED)
            continue;
        if (kind == NAME_UNKNOWN)
            return err_set(PS_ERR_INVALID, "%s: unknown tensor '%s' (not a %s weight)", path, t->name, fn->what);
        if (kind == NAME_BAD_LAYER)
            return err_set(PS_ERR_INVALID,
                           "%s: tensor '%s' is for a layer past the last one (config.json has "
                           "%s %zu)", path, t->name, fn->n_layer_key, m->cfg.n_layer);
        size_t shape[2], nd;
        if (slot_shape(&m->cfg, s, shape, &nd) == EXPECT_ABSENT)
            return err_set(PS_ERR_INVALID,
                           "%s: tensor '%s' is not used by this config.json (a bias its attention_bias / "
                           "mlp_bias leaves out, or an lm_head with tie_word_embeddings true)", path, t->name);
        if (slots[s].t)
            return err_set(PS_ERR_INVALID, "%s: tensor '%s' is present both as '%s' and as '%s'",
                           path, base, slots[s].t->name, t->name);
        slots[s] = all[i];
    }
    return PS_OK;
}

/* Presence, dtype and shape of every slot. */
static ps_status check_slots(const model *m, const tensor_ref *slots, size_t n_slots)
{
    const family_names_t *fn = family_tensor_names(m->cfg.family);
    char nbuf[160], want[64], got[160];
    for (size_t s = 0; s < n_slots; s++) {
        const st_tensor *t = slots[s].t;
        size_t shape[2], nd;
        slot_expect e = slot_shape(&m->cfg, s, shape, &nd);
        if (!t) {
            if (e != EXPECT_REQUIRED)
                continue;
            if (fn->prefix_optional)
                return err_set(PS_ERR_INVALID, "%s: missing tensor '%s' (looked for it with and without '%s')",
                               m->shards[0].path, slot_name(fn, nbuf, sizeof nbuf, s), fn->prefix);
            return err_set(PS_ERR_INVALID, "%s: missing tensor '%s'%s", m->shards[0].path,
                           slot_name(fn, nbuf, sizeof nbuf, s),
                           s == SLOT_LM_HEAD ? " (config.json has tie_word_embeddings false)" : "");
        }
        const char *path = slots[s].path;
        if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16 && t->dtype != ST_F64)
            return err_set(PS_ERR_INVALID,
                           "%s: tensor '%s' has dtype %s; weights must be F32, F16, BF16 or F64",
                           path, t->name, st_dtype_name(t->dtype));
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

/* A block's weight matrix stored as F16 or BF16 is packed for the kernels
 * in its 2 bytes (gemm.h: widened in registers, results identical to the
 * F32 path) instead of being converted to float: the node then holds it in
 * 2 bytes, once.  Only on a little-endian host (the file's byte order) and
 * with 2-byte-aligned data. */
static bool is_matrix_slot(size_t s)
{
    if (s < N_GLOBAL_SLOTS)
        return false;
    switch ((s - N_GLOBAL_SLOTS) % N_BLOCK_SLOTS) {
    case B_QKV_W: case B_Q_W: case B_K_W: case B_V_W: case B_O_W: case B_GATE_W: case B_UP_W: case B_DOWN_W:
        return true;
    default: return false;
    }
}

/* The token embedding and an untied unembedding stored as F16 or BF16
 * stay 2 bytes too (issue 21): packed as the unembedding's x @ U^T panels
 * ([d, V], gemm.h), from which the embedding lookup widens one row
 * (model_embed_row) and the logits are one gemm_run. */
static bool is_embed_slot(size_t s) { return s == SLOT_EMBED || s == SLOT_LM_HEAD; }

static gemm_dtype packed_dtype(const st_tensor *t, size_t s)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (t && (is_matrix_slot(s) || is_embed_slot(s)) && (t->dtype == ST_F16 || t->dtype == ST_BF16) && (uintptr_t)t->data % 2 == 0)
        return t->dtype == ST_F16 ? GEMM_F16 : GEMM_BF16;
#else
    (void)t, (void)s;
#endif
    return GEMM_F32;
}

/* check_finite for 2-byte data: exponent all ones is an infinity or a NaN. */
static ps_status check_finite16(const char *path, const char *name, gemm_dtype dt, const uint16_t *w, size_t n)
{
    const uint16_t e = dt == GEMM_F16 ? 0x7C00 : 0x7F80;
    for (size_t i = 0; i < n; i++)
        if ((w[i] & e) == e) {
            const float v = gemm_widen(dt, w[i]);
            return err_set(PS_ERR_INVALID, "%s: tensor '%s' element %zu is %s: refusing non-finite weights", path,
                           name, i, isnan(v) ? "NaN" : v > 0 ? "+inf" : "-inf");
        }
    return PS_OK;
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
static ps_status count_weights(model *m, const tensor_ref *slots, size_t n_slots, size_t *arena_floats)
{
    const char *path = m->shards[0].path;
    size_t total = 0, n_params = 0;
    st_dtype first = ST_DTYPE_COUNT;
    bool mixed = false;
    for (size_t s = 0; s < n_slots; s++) {
        const st_tensor *t = slots[s].t;
        if (!t)
            continue;
        if (n_params > SIZE_MAX - t->n_elements)
            return err_set(PS_ERR_NOMEM, "%s: parameter count overflows size_t", path);
        n_params += t->n_elements;
        if (!usable_in_place(t) && packed_dtype(t, s) == GEMM_F32)
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
static ps_status bind_weights(const model *m, const tensor_ref *slots, size_t n_slots, const float **w, bool fill)
{
    size_t used = 0;
    for (size_t s = 0; s < n_slots; s++) {
        const st_tensor *t = slots[s].t;
        const char *path = slots[s].path;
        if (!t)
            continue;
        const gemm_dtype pd = packed_dtype(t, s);
        if (pd != GEMM_F32) { /* packed from the mmap in its 2 bytes (pack_into) */
            w[s] = NULL;
            ps_status st = fill ? check_finite16(path, t->name, pd, t->data, t->n_elements) : PS_OK;
            if (st != PS_OK)
                return st;
            continue;
        }
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

/* ---- sharded checkpoints ------------------------------------------------- */

/* Caps on model.safetensors.index.json (Llama-3-405B: 191 files, ~1300
 * tensors; these are far above any checkpoint). */
#define MODEL_MAX_INDEX_BYTES ((size_t)64 << 20)
#define MODEL_MAX_SHARDS ((size_t)1 << 14)
#define MODEL_MAX_INDEX_TENSORS ((size_t)1 << 20)

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* A shard's file name: a plain name inside the model directory. */
static bool shard_name_ok(const char *f)
{
    size_t n = strlen(f), e = strlen(".safetensors");
    return n > e && n <= 255 && strchr(f, '/') == NULL && strchr(f, '\\') == NULL && f[0] != '.' &&
           strcmp(f + n - e, ".safetensors") == 0;
}

/* Open the files of dir/model.safetensors.index.json (in file-name order)
 * and check the index against their headers: every tensor of every file
 * listed once, with that file; every listed tensor present in its file. */
static ps_status open_shards(model *m, const char *dir, const char *index_path)
{
    char *text = NULL;
    size_t len = 0;
    ps_status st = fs_read_file(index_path, MODEL_MAX_INDEX_BYTES, &text, &len);
    if (st != PS_OK)
        return st;
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    free(text);
    if (!root)
        return err_set(PS_ERR_FORMAT, "%s: not valid JSON: %s (line %d, column %d)", index_path, jerr.text, jerr.line,
                       jerr.column);
    json_t *wm = json_is_object(root) ? json_object_get(root, "weight_map") : NULL;
    const char **files = NULL;
    size_t n_files = 0, n_map = 0;
    if (!wm || !json_is_object(wm)) {
        st = err_set(PS_ERR_FORMAT, "%s: no 'weight_map' object", index_path);
        goto out;
    }
    n_map = json_object_size(wm);
    if (n_map == 0 || n_map > MODEL_MAX_INDEX_TENSORS) {
        st = err_set(n_map ? PS_ERR_NOMEM : PS_ERR_FORMAT, "%s: weight_map has %zu tensors (1..%zu)", index_path,
                     n_map, MODEL_MAX_INDEX_TENSORS);
        goto out;
    }
    files = malloc(n_map * sizeof *files);
    if (!files) {
        st = err_set(PS_ERR_NOMEM, "%s: out of memory", index_path);
        goto out;
    }
    const char *key;
    json_t *val;
    json_object_foreach(wm, key, val)
    {
        if (!json_is_string(val) || !shard_name_ok(json_string_value(val))) {
            st = err_set(PS_ERR_INVALID, "%s: weight_map['%s'] is not a .safetensors file name inside the model "
                                         "directory", index_path, key);
            goto out;
        }
        files[n_files++] = json_string_value(val);
    }
    qsort(files, n_files, sizeof *files, cmp_str);
    size_t u = 0;
    for (size_t i = 0; i < n_files; i++)
        if (u == 0 || strcmp(files[u - 1], files[i]) != 0)
            files[u++] = files[i];
    n_files = u;
    if (n_files > MODEL_MAX_SHARDS) {
        st = err_set(PS_ERR_NOMEM, "%s: %zu files, over the limit of %zu", index_path, n_files, MODEL_MAX_SHARDS);
        goto out;
    }
    m->shards = calloc(n_files, sizeof *m->shards);
    if (!m->shards) {
        st = err_set(PS_ERR_NOMEM, "%s: out of memory", index_path);
        goto out;
    }
    size_t n_found = 0;
    for (size_t i = 0; i < n_files && st == PS_OK; i++) {
        char *p = fs_join(dir, files[i]);
        st = p ? st_open(&m->shards[i], p) : err_set(PS_ERR_NOMEM, "out of memory");
        free(p);
        if (st != PS_OK)
            break;
        m->n_shards = i + 1;
        const st_file *f = &m->shards[i];
        for (size_t t = 0; t < f->n_tensors; t++) {
            const json_t *where = json_object_get(wm, f->tensors[t].name);
            if (!where) {
                st = err_set(PS_ERR_INVALID, "%s: tensor '%s' is not listed in %s", f->path, f->tensors[t].name,
                             index_path);
                break;
            }
            if (strcmp(json_string_value(where), files[i]) != 0) {
                st = err_set(PS_ERR_INVALID, "%s: tensor '%s' is listed in %s under '%s'", f->path, f->tensors[t].name,
                             index_path, json_string_value(where));
                break;
            }
            n_found++;
        }
    }
    if (st == PS_OK && n_found != n_map) {
        /* some listed tensor is missing from its file: name it */
        json_object_foreach(wm, key, val)
        {
            const char *fname = json_string_value(val);
            const st_file *f = bsearch(&fname, files, n_files, sizeof *files, cmp_str)
                                   ? &m->shards[(const char **)bsearch(&fname, files, n_files, sizeof *files, cmp_str) - files]
                                   : NULL;
            if (f && !st_find(f, key)) {
                st = err_set(PS_ERR_INVALID, "%s: lists tensor '%s' in %s, which has no such tensor", index_path, key,
                             fname);
                break;
            }
        }
        if (st == PS_OK)
            st = err_set(PS_ERR_INVALID, "%s: %zu tensors listed but %zu found", index_path, n_map, n_found);
    }
out:
    free(files);
    json_decref(root);
    return st;
}

/* config.json, the mmap(s) and the tensor table checked against the config:
 * everything but the weights' values.  slots/w: calloc'd [*n_slots]. */
static ps_status open_checkpoint(model *m, const char *dir, tensor_ref **slots, const float ***w, size_t *n_slots)
{
    m->dir = strdup(dir);
    char *cfg_path = fs_join(dir, "config.json");
    char *st_path = fs_join(dir, "model.safetensors");
    char *index_path = fs_join(dir, "model.safetensors.index.json");
    ps_status st = PS_OK;
    if (!m->dir || !cfg_path || !st_path || !index_path)
        st = err_set(PS_ERR_NOMEM, "%s: cannot allocate path names", dir);
    size_t cfg_len = 0;
    if (st == PS_OK)
        st = fs_read_file(cfg_path, MODEL_MAX_CONFIG_BYTES, &m->config_json, &cfg_len);
    if (st == PS_OK)
        st = model_config_parse(&m->cfg, cfg_path, m->config_json, cfg_len);
    /* HF's order: a single model.safetensors first, then the sharded index */
    if (st == PS_OK && !fs_is_file(st_path) && fs_is_file(index_path)) {
        st = open_shards(m, dir, index_path);
    } else if (st == PS_OK) {
        m->shards = calloc(1, sizeof *m->shards);
        st = m->shards ? st_open(&m->shards[0], st_path) : err_set(PS_ERR_NOMEM, "out of memory");
        m->n_shards = st == PS_OK ? 1 : 0;
    }
    free(cfg_path);
    free(st_path);
    free(index_path);
    if (st != PS_OK)
        return st;

    size_t n_all = 0;
    for (size_t i = 0; i < m->n_shards; i++)
        n_all += m->shards[i].n_tensors;
    tensor_ref *all = malloc((n_all ? n_all : 1) * sizeof *all);
    /* n_layer <= 2^10, so the slot count cannot overflow. */
    *n_slots = N_GLOBAL_SLOTS + m->cfg.n_layer * N_BLOCK_SLOTS;
    *slots = calloc(*n_slots, sizeof **slots);
    *w = calloc(*n_slots, sizeof **w);
    m->blocks = calloc(m->cfg.n_layer, sizeof *m->blocks);
    if (!all || !*slots || !*w || !m->blocks) {
        free(all);
        return err_set(PS_ERR_NOMEM, "%s: cannot allocate tables for %zu layers", m->shards[0].path, m->cfg.n_layer);
    }
    n_all = 0;
    for (size_t i = 0; i < m->n_shards; i++)
        for (size_t t = 0; t < m->shards[i].n_tensors; t++)
            all[n_all++] = (tensor_ref){&m->shards[i].tensors[t], m->shards[i].path};
    st = assign_slots(m, all, n_all, *slots);
    free(all);
    if (st != PS_OK)
        return st;
    return check_slots(m, *slots, *n_slots);
}

static void set_pointers(model *m, const float **w, const tensor_ref *slots)
{
    const size_t d = m->cfg.n_embd;
    m->wte = w[SLOT_EMBED]; /* NULL when kept in 2 bytes (pack_into sets wte_p) */
    m->wpe = w[SLOT_POS];
    m->ln_f_w = w[SLOT_LN_F_W];
    m->ln_f_b = w[SLOT_LN_F_B];
    m->tied = slots[SLOT_LM_HEAD].t == NULL;
    m->unembed = m->tied ? m->wte : w[SLOT_LM_HEAD];
    const bool gpt2 = m->cfg.family == MODEL_FAMILY_GPT2;
    for (size_t l = 0; l < m->cfg.n_layer; l++) {
        const float **b = w + N_GLOBAL_SLOTS + l * N_BLOCK_SLOTS;
        m->blocks[l] = (model_block){
            .ln_1_w = b[B_LN_1_W], .ln_1_b = b[B_LN_1_B],
            .attn_w = b[B_QKV_W], .attn_b = b[B_QKV_B],
            .q_proj_w = b[B_Q_W], .k_proj_w = b[B_K_W], .v_proj_w = b[B_V_W],
            .q_b = b[B_Q_B], .k_b = b[B_K_B], .v_b = b[B_V_B],
            .attn_proj_w = b[B_O_W], .attn_proj_b = b[B_O_B],
            .ln_2_w = b[B_LN_2_W], .ln_2_b = b[B_LN_2_B],
            .fc_w = b[B_UP_W], .fc_b = b[B_UP_B],
            .gate_w = b[B_GATE_W], .gate_b = b[B_GATE_B],
            .mlp_proj_w = b[B_DOWN_W], .mlp_proj_b = b[B_DOWN_B],
        };
        if (gpt2) {
            model_block *mb = &m->blocks[l];
            mb->q_b = mb->attn_b, mb->k_b = mb->attn_b + d, mb->v_b = mb->attn_b + 2 * d;
        }
    }
}

/* Bytes of one packed matrix in the packed region: from a 64-byte
 * boundary, so every panel is aligned whatever the element size. */
static size_t packed_region_bytes(size_t k, size_t n, gemm_dtype dt)
{
    return (gemm_packed_bytes(k, n, dt) + 63) / 64 * 64;
}

/* One matrix to pack: F32 source (`f`, HF's layout) or 2-byte source (`h`,
 * dtype dt), as gemm_pack ([k, n], row stride ld) or gemm_pack_rows
 * (nn.Linear [n, k] with an optional row map). */
typedef struct {
    gemm_weight *out;
    const float *f;
    const uint16_t *h;
    gemm_dtype dt;
    bool linear;
    const size_t *rows;
    size_t k, n, ld;
} pack_job;

/* Lay out (and if `fill`, pack) every block's matrices from `base`
 * (NULL: only count) and return the region's bytes in *bytes: GPT-2's
 * Conv1D [in, out] matrices as they are (q, k, v: the three column blocks
 * of attn_w), the other families' nn.Linear [out, in] ones transposed
 * (NeoX's q, k, v: rows h*3*dh + part*dh + e of query_key_value, HF's view
 * [H, 3*dh] split in three).  `slots` (NULL for models built in memory):
 * the checkpoint's tensors, whose F16/BF16 matrices are packed in 2 bytes
 * straight from the mmap (packed_dtype); the others from the float
 * pointers of the blocks. */
static ps_status pack_into(model *m, unsigned char *base, const tensor_ref *slots, bool fill, size_t *bytes)
{
    const model_config *c = &m->cfg;
    const size_t d = c->n_embd, mm = c->n_inner, qd = model_q_dim(c), kvd = model_kv_dim(c), dh = c->d_head;
    const bool gpt2 = c->family == MODEL_FAMILY_GPT2, neox = c->family == MODEL_FAMILY_NEOX;
    const bool bf16 = m->compute == MODEL_COMPUTE_BF16;
    size_t *rows = NULL, off = 0;
    if (neox) {
        rows = malloc(3 * qd * sizeof *rows);
        if (!rows)
            return err_set(PS_ERR_NOMEM, "out of memory packing the weights");
        for (size_t part = 0; part < 3; part++)
            for (size_t col = 0; col < qd; col++)
                rows[part * qd + col] = (col / dh) * 3 * dh + part * dh + col % dh;
    }
    for (size_t l = 0; l < c->n_layer; l++) {
        model_block *b = &m->blocks[l];
        const tensor_ref *sl = slots ? slots + N_GLOBAL_SLOTS + l * N_BLOCK_SLOTS : NULL;
        /* the 2-byte source of block slot k, or NULL */
#define SRC16(k) (sl && packed_dtype(sl[k].t, N_GLOBAL_SLOTS + (k)) != GEMM_F32 ? (const uint16_t *)sl[k].t->data : NULL)
#define DT(k) (sl ? packed_dtype(sl[k].t, N_GLOBAL_SLOTS + (k)) : GEMM_F32)
        pack_job jobs[7];
        size_t nj = 0;
        if (gpt2) {
            const uint16_t *qkv16 = SRC16(B_QKV_W);
            for (size_t i = 0; i < 3; i++)
                jobs[nj++] = (pack_job){i == 0 ? &b->q_w : i == 1 ? &b->k_w : &b->v_w,
                                        b->attn_w ? b->attn_w + i * d : NULL, qkv16 ? qkv16 + i * d : NULL,
                                        DT(B_QKV_W), false, NULL, d, d, 3 * d};
            jobs[nj++] = (pack_job){&b->attn_proj_p, b->attn_proj_w, SRC16(B_O_W), DT(B_O_W), false, NULL, d, d, d};
            jobs[nj++] = (pack_job){&b->fc_p, b->fc_w, SRC16(B_UP_W), DT(B_UP_W), false, NULL, d, mm, mm};
            jobs[nj++] = (pack_job){&b->mlp_proj_p, b->mlp_proj_w, SRC16(B_DOWN_W), DT(B_DOWN_W), false, NULL, mm, d, d};
            if (base)
                b->q_b = b->attn_b, b->k_b = b->attn_b + d, b->v_b = b->attn_b + 2 * d;
        } else {
            /* x @ A^T for nn.Linear A [n, k] */
            if (neox) {
                for (size_t i = 0; i < 3; i++)
                    jobs[nj++] = (pack_job){i == 0 ? &b->q_w : i == 1 ? &b->k_w : &b->v_w, b->attn_w, SRC16(B_QKV_W),
                                            DT(B_QKV_W), true, rows + i * qd, d, i == 0 ? qd : kvd, d};
            } else {
                jobs[nj++] = (pack_job){&b->q_w, b->q_proj_w, SRC16(B_Q_W), DT(B_Q_W), true, NULL, d, qd, d};
                jobs[nj++] = (pack_job){&b->k_w, b->k_proj_w, SRC16(B_K_W), DT(B_K_W), true, NULL, d, kvd, d};
                jobs[nj++] = (pack_job){&b->v_w, b->v_proj_w, SRC16(B_V_W), DT(B_V_W), true, NULL, d, kvd, d};
            }
            jobs[nj++] = (pack_job){&b->attn_proj_p, b->attn_proj_w, SRC16(B_O_W), DT(B_O_W), true, NULL, qd, d, qd};
            jobs[nj++] = (pack_job){&b->fc_p, b->fc_w, SRC16(B_UP_W), DT(B_UP_W), true, NULL, d, mm, d};
            if (c->act == MODEL_ACT_SILU_GATED)
                jobs[nj++] = (pack_job){&b->gate_p, b->gate_w, SRC16(B_GATE_W), DT(B_GATE_W), true, NULL, d, mm, d};
            jobs[nj++] = (pack_job){&b->mlp_proj_p, b->mlp_proj_w, SRC16(B_DOWN_W), DT(B_DOWN_W), true, NULL, mm, d,
                                    mm};
        }
#undef SRC16
#undef DT
        if (base)
            b->gate_p = (gemm_weight){0};
        for (size_t i = 0; i < nj; i++) {
            const pack_job *j = &jobs[i];
            /* --compute bf16: every block matrix rounded to BF16 in the pairs layout */
            const gemm_dtype out_dt = bf16 ? GEMM_BF16_PAIRS : j->dt;
            if (base) {
                gemm_weight *w = j->out;
                *w = (gemm_weight){.k = j->k, .n = j->n, .dtype = out_dt};
                if (bf16) {
                    uint16_t *dst = (uint16_t *)(base + off);
                    w->data16 = dst;
                    if (fill)
                        gemm_bf16_pack(dst, j->dt == GEMM_F32 ? (const void *)j->f : (const void *)j->h, j->dt, j->ld,
                                       j->linear, j->rows, j->k, j->n);
                } else if (j->dt == GEMM_F32) {
                    float *dst = (float *)(base + off);
                    w->data = dst;
                    if (fill && j->linear)
                        gemm_pack_rows(dst, j->f, j->ld, j->rows, j->k, j->n);
                    else if (fill)
                        gemm_pack(dst, j->f, j->ld, j->k, j->n);
                } else {
                    uint16_t *dst = (uint16_t *)(base + off);
                    w->data16 = dst;
                    if (fill && j->linear)
                        gemm_pack_rows16(dst, j->h, j->ld, j->rows, j->k, j->n);
                    else if (fill)
                        gemm_pack16(dst, j->h, j->ld, j->k, j->n);
                }
            }
            off += packed_region_bytes(j->k, j->n, out_dt);
        }
        if (neox && c->qkv_bias) {
            /* the fused bias [H, 3, dh] as q | k | v */
            if (base) {
                float *dst = (float *)(base + off);
                if (fill)
                    for (size_t i = 0; i < 3 * qd; i++)
                        dst[i] = b->attn_b[rows[i]];
                b->q_b = dst, b->k_b = dst + qd, b->v_b = dst + 2 * qd;
            }
            off += (3 * qd * sizeof(float) + 63) / 64 * 64;
        }
    }
    free(rows);
    /* 2-byte embeddings (is_embed_slot): x @ U^T panels, U [V, d] nn.Linear-like */
    const size_t emb[2] = {SLOT_EMBED, SLOT_LM_HEAD};
    for (size_t i = 0; i < 2 && slots; i++) {
        const st_tensor *t = slots[emb[i]].t;
        const gemm_dtype dt = packed_dtype(t, emb[i]);
        if (dt == GEMM_F32)
            continue;
        if (base) {
            uint16_t *dst = (uint16_t *)(base + off);
            gemm_weight *w = i == 0 ? &m->wte_p : &m->unembed_p;
            *w = (gemm_weight){.k = c->n_embd, .n = c->vocab_size, .dtype = dt, .data16 = dst};
            if (fill)
                gemm_pack_rows16(dst, t->data, c->n_embd, NULL, c->n_embd, c->vocab_size);
        }
        off += packed_region_bytes(c->n_embd, c->vocab_size, dt);
    }
    if (base && slots && !slots[SLOT_LM_HEAD].t)
        m->unembed_p = m->wte_p; /* tied */
    *bytes = off;
    return PS_OK;
}
/* The rotary tables: cos/sin of position * inv_freq[i], i < rotary_dim/2,
 * inv_freq[i] = theta^(-2i / rotary_dim) rescaled as HF's rope_scaling
 * (modeling_rope_utils: linear divides by factor; llama3 divides the low
 * frequencies by factor, keeps the high ones and interpolates between). */
static ps_status rope_tables(model *m)
{
    const model_config *c = &m->cfg;
    if (c->pos != MODEL_POS_ROTARY)
        return PS_OK;
    const size_t half = c->rotary_dim / 2, P = c->n_positions;
    m->rope_cos = malloc(P * half * sizeof *m->rope_cos);
    m->rope_sin = malloc(P * half * sizeof *m->rope_sin);
    double *inv = malloc(half * sizeof *inv);
    if (!m->rope_cos || !m->rope_sin || !inv) {
        free(inv);
        return err_set(PS_ERR_NOMEM, "%s: cannot allocate rotary tables for %zu positions", m->dir, P);
    }
    for (size_t i = 0; i < half; i++) {
        double f = 1.0 / pow(c->rope_theta, (double)(2 * i) / (double)c->rotary_dim);
        if (c->rope_scaling == MODEL_ROPE_SCALING_LINEAR) {
            f /= c->rope_factor;
        } else if (c->rope_scaling == MODEL_ROPE_SCALING_LLAMA3) {
            const double low_wl = c->rope_original_max_pos / c->rope_low_freq_factor;
            const double high_wl = c->rope_original_max_pos / c->rope_high_freq_factor;
            const double wl = 2.0 * M_PI / f;
            if (wl > low_wl) {
                f /= c->rope_factor;
            } else if (wl >= high_wl) {
                double s = (c->rope_original_max_pos / wl - c->rope_low_freq_factor) /
                           (c->rope_high_freq_factor - c->rope_low_freq_factor);
                f = (1.0 - s) * f / c->rope_factor + s * f;
            }
        }
        inv[i] = f;
    }
    for (size_t p = 0; p < P; p++)
        for (size_t i = 0; i < half; i++) {
            double a = (double)p * inv[i];
            m->rope_cos[p * half + i] = (float)cos(a);
            m->rope_sin[p * half + i] = (float)sin(a);
        }
    free(inv);
    return PS_OK;
}

/* After converting and packing: give back the mmap's pages of the tensors
 * not used in place (converted to float or packed in 2 bytes), so that the
 * checkpoint's file pages do not stay in this process's resident set (and
 * in the node's Pss) beside their converted copy; the page cache keeps
 * them, reclaimable.  Whole pages inside each such tensor only: a page
 * shared with an in-place F32 tensor stays. */
static void release_converted_pages(const tensor_ref *slots, size_t n_slots)
{
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    for (size_t s = 0; s < n_slots; s++) {
        const st_tensor *t = slots[s].t;
        if (!t || usable_in_place(t) || page == 0 || page == (uintptr_t)-1)
            continue;
        const uintptr_t a = ((uintptr_t)t->data + page - 1) / page * page,
                        e = ((uintptr_t)t->data + t->n_bytes) / page * page;
        if (e > a)
            (void)madvise((void *)a, e - a, MADV_DONTNEED);
    }
}

ps_status model_pack_weights(model *m)
{
    if (m->cfg.n_kv_head == 0)
        m->cfg.n_kv_head = m->cfg.n_head; /* models built in memory: GPT-2 */
    if (m->packed_owned)
        free(m->packed);
    m->packed = NULL;
    m->packed_owned = false;
    size_t bytes = 0;
    ps_status st = pack_into(m, NULL, NULL, false, &bytes);
    if (st != PS_OK)
        return st;
    m->packed_bytes = bytes;
    m->packed = aligned_alloc(64, bytes ? bytes : 64);
    m->packed_owned = m->packed != NULL;
    if (!m->packed)
        return err_set(PS_ERR_NOMEM, "cannot allocate %zu bytes for the packed weights", bytes);
    return pack_into(m, m->packed, NULL, true, &bytes);
}

static ps_status load_into(model *m, const char *dir, const model_alloc *a, ps_status st)
{
    tensor_ref *slots = NULL;
    const float **w = NULL;
    size_t n_slots = 0, total = 0, packed = 0;
    if (st == PS_OK)
        st = open_checkpoint(m, dir, &slots, &w, &n_slots);
    if (st == PS_OK)
        st = count_weights(m, slots, n_slots, &total);
    if (st == PS_OK)
        st = rope_tables(m);
    /* the arena: converted tensors, then (from a 64-byte boundary) the packed matrices */
    const size_t packed_off = (total + 15) / 16 * 16;
    if (st == PS_OK)
        st = pack_into(m, NULL, slots, false, &packed);
    if (st == PS_OK && packed > SIZE_MAX - packed_off * sizeof(float))
        st = err_set(PS_ERR_NOMEM, "%s: the packed weights overflow size_t bytes", m->shards[0].path);
    const size_t arena_bytes = st == PS_OK ? packed_off * sizeof(float) + packed : 0;
    bool fill = true;
    if (a) {
        /* Called whatever st is: the other processes may be waiting in it. */
        void *ptr = NULL;
        bool writer = false;
        st = a->alloc(a->user, st, arena_bytes, &ptr, &writer);
        if (st == PS_OK) {
            m->arena = ptr;
            m->arena_floats = total;
            m->arena_shared = true;
            m->alloc = *a;
            fill = writer;
        }
    } else if (st == PS_OK) {
        m->arena = aligned_alloc(64, (arena_bytes + 63) / 64 * 64 + 64);
        if (!m->arena)
            st = err_set(PS_ERR_NOMEM, "%s: cannot allocate %zu bytes for converted and packed weights",
                         m->shards[0].path, arena_bytes);
        m->arena_floats = total;
    }
    if (st == PS_OK)
        st = bind_weights(m, slots, n_slots, w, fill);
    if (st == PS_OK) {
        /* the writer packs before publishing; readers only take the pointers */
        set_pointers(m, w, slots);
        m->packed = m->arena + packed_off;
        m->packed_bytes = packed;
        st = pack_into(m, m->packed, slots, fill, &packed);
    }
    if (st == PS_OK && fill)
        release_converted_pages(slots, n_slots);
    if (a)
        st = a->publish(a->user, st);
    free(slots);
    free(w);
    return st;
}

const char *model_compute_name(model_compute c) { return c == MODEL_COMPUTE_BF16 ? "bf16" : "f32"; }

bool model_compute_parse(const char *s, model_compute *out)
{
    if (s && strcmp(s, "f32") == 0)
        *out = MODEL_COMPUTE_F32;
    else if (s && strcmp(s, "bf16") == 0)
        *out = MODEL_COMPUTE_BF16;
    else
        return false;
    return true;
}

ps_status model_load_compute(model *m, const char *dir, const model_alloc *a, model_compute compute)
{
    memset(m, 0, sizeof *m);
    m->compute = compute;
    ps_status st = PS_OK;
    if (compute == MODEL_COMPUTE_BF16 && !gemm_bf16_supported())
        st = err_set(PS_ERR_INVALID, "compute bf16 needs a CPU with AMX-BF16 or AVX512_BF16 (this one has neither)");
    /* a shared arena's allocator is collective: called whatever st is */
    if (st == PS_OK || a)
        st = load_into(m, dir, a, st);
    if (st != PS_OK)
        model_free(m);
    return st;
}

ps_status model_load_shared(model *m, const char *dir, const model_alloc *a)
{
    return model_load_compute(m, dir, a, MODEL_COMPUTE_F32);
}

ps_status model_load(model *m, const char *dir) { return model_load_shared(m, dir, NULL); }

ps_status model_hash(model *m)
{
    if (m->n_shards == 0 || !m->shards[0].map)
        return err_set(PS_ERR_INVALID, "model_hash: no model loaded");
    size_t cap = 1;
    for (size_t i = 0; i < m->n_shards; i++)
        cap += 64 + 2 + strlen(m->shards[i].path) + 1;
    char *text = malloc(cap), hex[65];
    if (!text)
        return err_set(PS_ERR_NOMEM, "model_hash: out of memory");
    size_t len = 0;
    for (size_t i = 0; i < m->n_shards; i++) {
        ps_status st = hashcache_file_sha256(m->shards[i].path, hex, NULL);
        if (st != PS_OK) {
            free(text);
            return st;
        }
        const char *slash = strrchr(m->shards[i].path, '/');
        len += (size_t)snprintf(text + len, cap - len, "%s  %s\n", hex, slash ? slash + 1 : m->shards[i].path);
    }
    if (m->n_shards == 1)
        memcpy(m->sha256, hex, sizeof hex);
    else
        sha256_hex(text, len, m->sha256);
    free(m->shard_sha256);
    m->shard_sha256 = text;
    return PS_OK;
}

void model_free(model *m)
{
    for (size_t i = 0; i < m->n_shards; i++)
        st_close(&m->shards[i]);
    free(m->shards);
    if (m->arena_shared)
        m->alloc.release(m->alloc.user, m->arena);
    else
        free(m->arena);
    if (m->packed_owned)
        free(m->packed);
    free(m->rope_cos);
    free(m->rope_sin);
    free(m->blocks);
    free(m->dir);
    free(m->config_json);
    free(m->shard_sha256);
    memset(m, 0, sizeof *m);
}

/* Row c of a packed [k, n] matrix's column c: packed[c / NR][kk][c % NR]. */
static const float *packed_column(const gemm_weight *w, size_t c, float *buf)
{
    const uint16_t *p = w->data16 + (c / GEMM_NR) * w->k * GEMM_NR + c % GEMM_NR;
    for (size_t kk = 0; kk < w->k; kk++)
        buf[kk] = gemm_widen(w->dtype, p[kk * GEMM_NR]);
    return buf;
}

const float *model_embed_row(const model *m, size_t token, float *buf)
{
    if (m->wte_p.dtype != GEMM_F32)
        return packed_column(&m->wte_p, token, buf);
    return m->wte + token * m->cfg.n_embd;
}

const float *model_unembed_row(const model *m, size_t v, float *buf)
{
    if (m->unembed_p.dtype != GEMM_F32)
        return packed_column(&m->unembed_p, v, buf);
    return m->unembed + v * m->cfg.n_embd;
}

void model_unembed(const model *m, float *out, const float *x, size_t rows)
{
    if (m->unembed_p.dtype != GEMM_F32)
        gemm_run(out, x, rows, &m->unembed_p, NULL, GEMM_PLAIN);
    else
        gemm_unembed(out, x, rows, m->unembed, m->cfg.vocab_size, m->cfg.n_embd);
}
