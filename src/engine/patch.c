/* patch_eval: checks the cells and hands them to an engine (patch_naive.c,
 * patch_fast.c); and the helpers both engines share (patch_internal.h). */
#include "patch.h"

#include "patch_internal.h"

/* ---- what both engines share ---------------------------------------------- */

const forward_cache *patch_base_of(const patch_pair *p, patch_direction dir)
{
    return dir == PATCH_DENOISE ? &p->corrupted : &p->clean;
}
/* The one place both engines fetch a cell's value from: an ablation's cache
 * (zero, mean, resample: patch_pair.source) stands in for the other run, so
 * every component, present and future, takes ablations as it takes patches. */
const forward_cache *patch_source_of(const patch_pair *p, patch_direction dir)
{
    if (p->source)
        return p->source;
    return dir == PATCH_DENOISE ? &p->clean : &p->corrupted;
}

/* The cached array a component patches, at block `layer`. */
const float *patch_component_array(const forward_cache *c, patch_component comp, size_t layer)
{
    const forward_layer *ly = &c->layers[layer];
    switch (comp) {
    case PATCH_RESID_PRE: return ly->resid_pre;
    case PATCH_RESID_MID: return ly->resid_mid;
    case PATCH_ATTN_OUT: return ly->attn_out;
    case PATCH_MLP_OUT: return ly->mlp_out;
    case PATCH_Z:
    case PATCH_Z_ALL_POS: return ly->z;
    case PATCH_Q:
    case PATCH_Q_ALL_POS: return ly->q;
    case PATCH_K:
    case PATCH_K_ALL_POS: return ly->k;
    case PATCH_V:
    case PATCH_V_ALL_POS: return ly->v;
    case PATCH_PATTERN:
    case PATCH_PATTERN_DEST_SRC:
    case PATCH_PATTERN_ALL_POS: return ly->pattern;
    case PATCH_COMPONENT_COUNT: break;
    }
    return NULL;
}

patch_slice patch_cell_slice(const patch_cell *cell, const model_config *cfg, size_t T)
{
    const size_t d = cfg->n_embd, dh = cfg->d_head, h = cell->head, p = cell->position;
    const size_t qd = model_q_dim(cfg), kvd = model_kv_dim(cfg);
    switch ((patch_component)cell->component) {
    case PATCH_Z:
    case PATCH_Q: return (patch_slice){p * qd + h * dh, 1, 0, dh};
    case PATCH_K: /* h is a key/value head */
    case PATCH_V: return (patch_slice){p * kvd + h * dh, 1, 0, dh};
    /* pattern [H, T, T]: row p of head h (the destination), or its entry src_position */
    case PATCH_PATTERN: return (patch_slice){(h * T + p) * T, 1, 0, T};
    case PATCH_PATTERN_DEST_SRC: return (patch_slice){(h * T + p) * T + cell->src_position, 1, 0, 1};
    case PATCH_Z_ALL_POS:
    case PATCH_Q_ALL_POS: return (patch_slice){h * dh, T, qd, dh};
    case PATCH_K_ALL_POS: /* h is a key/value head */
    case PATCH_V_ALL_POS: return (patch_slice){h * dh, T, kvd, dh};
    case PATCH_PATTERN_ALL_POS: return (patch_slice){h * T * T, T, T, T};
    default: return (patch_slice){p * d, 1, 0, d};
    }
}

/* ---- dispatch ------------------------------------------------------------ */

size_t patch_opts_metrics(const patch_opts *opts, patch_metric ms[PATCH_METRIC_COUNT])
{
    if (opts->metrics.n == 0) {
        ms[0] = opts->metric;
        return 1;
    }
    for (size_t k = 0; k < opts->metrics.n; k++)
        ms[k] = opts->metrics.m[k];
    return opts->metrics.n;
}

ps_status patch_eval(const model *m, const patch_pair *pairs, size_t n_pairs, const patch_cell *cells,
                     size_t n_cells, const patch_opts *opts, double *values)
{
    if (opts->metrics.n > PATCH_METRIC_COUNT)
        return err_set(PS_ERR_INVALID, "%zu metrics requested, at most %d", opts->metrics.n, PATCH_METRIC_COUNT);
    for (size_t i = 0; i < n_cells; i++) {
        const patch_cell *c = &cells[i];
        if (c->pair >= n_pairs || c->component >= PATCH_COMPONENT_COUNT || c->layer >= m->cfg.n_layer ||
            c->head >= (c->component == PATCH_K_ALL_POS || c->component == PATCH_V_ALL_POS || c->component == PATCH_K ||
                                c->component == PATCH_V
                            ? model_kv_heads(&m->cfg)
                            : m->cfg.n_head) ||
            c->position >= pairs[c->pair].T || c->src_position >= pairs[c->pair].T)
            return err_set(PS_ERR_RANGE, "patching cell %zu is outside its grid", i);
        if (c->component == PATCH_RESID_MID && m->cfg.parallel_residual) {
            bool on[PATCH_COMPONENT_COUNT] = {[PATCH_RESID_MID] = true};
            return patch_components_check(on, &m->cfg);
        }
    }
    if (opts->engine == PATCH_ENGINE_NAIVE)
        return patch_eval_naive(m, pairs, cells, n_cells, opts, values);
    return patch_eval_fast(m, pairs, cells, n_cells, opts, values);
}
