#include "hooks.h"

#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Name suffixes inside "blocks.{L}." for block hooks, full names otherwise. */
static const char *const hook_suffix[HOOK_KIND_COUNT] = {
    [HOOK_EMBED] = "hook_embed",
    [HOOK_POS_EMBED] = "hook_pos_embed",
    [HOOK_RESID_PRE] = "hook_resid_pre",
    [HOOK_LN1_SCALE] = "ln1.hook_scale",
    [HOOK_LN1_NORMALIZED] = "ln1.hook_normalized",
    [HOOK_Q] = "attn.hook_q",
    [HOOK_K] = "attn.hook_k",
    [HOOK_V] = "attn.hook_v",
    [HOOK_ROT_Q] = "attn.hook_rot_q",
    [HOOK_ROT_K] = "attn.hook_rot_k",
    [HOOK_PATTERN] = "attn.hook_pattern",
    [HOOK_Z] = "attn.hook_z",
    [HOOK_ATTN_OUT] = "hook_attn_out",
    [HOOK_RESID_MID] = "hook_resid_mid",
    [HOOK_LN2_SCALE] = "ln2.hook_scale",
    [HOOK_LN2_NORMALIZED] = "ln2.hook_normalized",
    [HOOK_MLP_PRE] = "mlp.hook_pre",
    [HOOK_MLP_PRE_LINEAR] = "mlp.hook_pre_linear",
    [HOOK_MLP_POST] = "mlp.hook_post",
    [HOOK_MLP_OUT] = "hook_mlp_out",
    [HOOK_RESID_POST] = "hook_resid_post",
    [HOOK_LN_FINAL] = "ln_final.hook_normalized",
    [HOOK_LOGITS] = "logits",
};

#define N_PRE_BLOCK 2                              /* embed, pos_embed */
#define N_BLOCK (HOOK_RESID_POST - HOOK_RESID_PRE + 1)
#define N_POST_BLOCK 2                             /* ln_final, logits */

bool hook_kind_in_block(hook_kind k) { return k >= HOOK_RESID_PRE && k <= HOOK_RESID_POST; }

bool hook_present(hook_kind k, const model_config *c)
{
    const bool gpt2 = c->family == MODEL_FAMILY_GPT2;
    switch (k) {
    case HOOK_LN1_SCALE:
    case HOOK_LN1_NORMALIZED:
    case HOOK_LN2_SCALE:
    case HOOK_LN2_NORMALIZED: return !gpt2;
    case HOOK_POS_EMBED: return c->pos == MODEL_POS_LEARNED;
    case HOOK_ROT_Q:
    case HOOK_ROT_K: return c->pos == MODEL_POS_ROTARY;
    case HOOK_RESID_MID: return !c->parallel_residual;
    case HOOK_MLP_PRE_LINEAR: return c->act == MODEL_ACT_SILU_GATED;
    default: return true;
    }
}

void hook_name(hook_point hp, char buf[HOOK_MAX_NAME])
{
    if (hook_kind_in_block(hp.kind))
        snprintf(buf, HOOK_MAX_NAME, "blocks.%zu.%s", hp.layer, hook_suffix[hp.kind]);
    else
        snprintf(buf, HOOK_MAX_NAME, "%s", hook_suffix[hp.kind]);
}

ps_status hook_parse(const char *name, size_t n_layer, hook_point *hp)
{
    for (int k = 0; k < HOOK_KIND_COUNT; k++) {
        if (!hook_kind_in_block((hook_kind)k) && strcmp(name, hook_suffix[k]) == 0) {
            *hp = (hook_point){(hook_kind)k, 0};
            return PS_OK;
        }
    }
    if (strncmp(name, "blocks.", 7) == 0) {
        const char *p = name + 7;
        char *end = NULL;
        if (*p >= '0' && *p <= '9') {
            unsigned long long l = strtoull(p, &end, 10);
            if (*end == '.') {
                for (int k = HOOK_RESID_PRE; k <= HOOK_RESID_POST; k++) {
                    if (strcmp(end + 1, hook_suffix[k]) == 0) {
                        if (l >= n_layer)
                            return err_set(PS_ERR_RANGE, "hook '%s': layer %llu out of range (the model has %zu layers)",
                                           name, l, n_layer);
                        *hp = (hook_point){(hook_kind)k, (size_t)l};
                        return PS_OK;
                    }
                }
            }
        }
    }
    return err_set(PS_ERR_INVALID, "unknown hook point '%s' (TransformerLens names, e.g. blocks.0.hook_resid_pre)", name);
}

size_t hook_shape(hook_kind k, const model_config *c, size_t T,
                  size_t shape[HOOK_MAX_DIMS], const char *dim_names[HOOK_MAX_DIMS])
{
    const char *dn[HOOK_MAX_DIMS] = {"position", NULL, NULL};
    size_t nd = 2;
    shape[0] = T;
    switch (k) {
    case HOOK_Q:
    case HOOK_ROT_Q:
    case HOOK_Z:
        shape[1] = c->n_head, dn[1] = "head";
        shape[2] = c->d_head, dn[2] = "d_head";
        nd = 3;
        break;
    case HOOK_K:
    case HOOK_V:
    case HOOK_ROT_K:
        shape[1] = model_kv_heads(c), dn[1] = model_kv_heads(c) == c->n_head ? "head" : "kv_head";
        shape[2] = c->d_head, dn[2] = "d_head";
        nd = 3;
        break;
    case HOOK_LN1_SCALE:
    case HOOK_LN2_SCALE:
        nd = 1;
        break;
    case HOOK_PATTERN:
        shape[0] = c->n_head, dn[0] = "head";
        shape[1] = T, dn[1] = "query_position";
        shape[2] = T, dn[2] = "key_position";
        nd = 3;
        break;
    case HOOK_MLP_PRE:
    case HOOK_MLP_PRE_LINEAR:
    case HOOK_MLP_POST:
        shape[1] = c->n_inner, dn[1] = "d_mlp";
        break;
    case HOOK_LOGITS:
        shape[1] = c->vocab_size, dn[1] = "vocab";
        break;
    default:
        shape[1] = c->n_embd, dn[1] = "d_model";
        break;
    }
    if (dim_names)
        for (size_t i = 0; i < nd; i++)
            dim_names[i] = dn[i];
    return nd;
}

size_t hook_count(size_t n_layer) { return N_PRE_BLOCK + n_layer * N_BLOCK + N_POST_BLOCK; }

size_t hook_index(hook_point hp, size_t n_layer)
{
    if (hp.kind < HOOK_RESID_PRE)
        return (size_t)hp.kind;
    if (hook_kind_in_block(hp.kind))
        return N_PRE_BLOCK + hp.layer * N_BLOCK + (size_t)(hp.kind - HOOK_RESID_PRE);
    return N_PRE_BLOCK + n_layer * N_BLOCK + (size_t)(hp.kind - HOOK_LN_FINAL);
}

hook_point hook_at(size_t index, size_t n_layer)
{
    if (index < N_PRE_BLOCK)
        return (hook_point){(hook_kind)index, 0};
    index -= N_PRE_BLOCK;
    if (index < n_layer * N_BLOCK)
        return (hook_point){(hook_kind)(HOOK_RESID_PRE + index % N_BLOCK), index / N_BLOCK};
    index -= n_layer * N_BLOCK;
    return (hook_point){(hook_kind)(HOOK_LN_FINAL + index), 0};
}

static ps_status hook_set_alloc(hook_set *s, size_t n_layer)
{
    s->n_layer = n_layer;
    s->n_on = 0;
    s->on = calloc(hook_count(n_layer), sizeof *s->on);
    if (!s->on)
        return err_set(PS_ERR_NOMEM, "cannot allocate a hook selection");
    return PS_OK;
}

ps_status hook_set_all(hook_set *s, const model_config *c)
{
    const size_t n_layer = c->n_layer;
    ps_status st = hook_set_alloc(s, n_layer);
    if (st)
        return st;
    size_t n = hook_count(n_layer);
    for (size_t i = 0; i < n; i++)
        if (hook_present(hook_at(i, n_layer).kind, c)) {
            s->on[i] = true;
            s->n_on++;
        }
    return PS_OK;
}

ps_status hook_set_parse(hook_set *s, const char *patterns, const model_config *c)
{
    const size_t n_layer = c->n_layer;
    ps_status st = hook_set_alloc(s, n_layer);
    if (st)
        return st;
    char *copy = strdup(patterns);
    if (!copy) {
        hook_set_free(s);
        return err_set(PS_ERR_NOMEM, "cannot copy hook patterns");
    }
    size_t n = hook_count(n_layer);
    char *save = NULL;
    for (char *pat = strtok_r(copy, ",", &save); pat; pat = strtok_r(NULL, ",", &save)) {
        while (*pat == ' ')
            pat++;
        size_t matched = 0;
        for (size_t i = 0; i < n; i++) {
            char name[HOOK_MAX_NAME];
            if (!hook_present(hook_at(i, n_layer).kind, c))
                continue;
            hook_name(hook_at(i, n_layer), name);
            if (fnmatch(pat, name, 0) == 0) {
                matched++;
                if (!s->on[i]) {
                    s->on[i] = true;
                    s->n_on++;
                }
            }
        }
        if (matched == 0) {
            st = err_set(PS_ERR_INVALID, "hook pattern '%s' matches no hook point of this %zu-layer model", pat, n_layer);
            free(copy);
            hook_set_free(s);
            return st;
        }
    }
    free(copy);
    if (s->n_on == 0) {
        hook_set_free(s);
        return err_set(PS_ERR_INVALID, "empty hook pattern list");
    }
    return PS_OK;
}

bool hook_set_has(const hook_set *s, hook_point hp) { return s->on[hook_index(hp, s->n_layer)]; }

void hook_set_free(hook_set *s)
{
    free(s->on);
    s->on = NULL;
    s->n_on = 0;
}
