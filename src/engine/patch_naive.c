/* The naive patching engine: one full forward of the base prompt per cell,
 * with a hook that overwrites the patched activation (the reference). */
#include "patch_internal.h"

#include <string.h>

typedef struct {
    const patch_cell *cell;
    const float *src;      /* the source's array for the cell's hook */
    patch_slice slice;
} naive_ctx;

static ps_status naive_hook(void *user, hook_point hp, float *act, const size_t *shape, size_t ndim)
{
    (void)shape, (void)ndim;
    naive_ctx *nc = user;
    if (hp.kind != patch_component_hook((patch_component)nc->cell->component) || hp.layer != nc->cell->layer)
        return PS_OK;
    const patch_slice *s = &nc->slice;
    for (size_t i = 0; i < s->count; i++) {
        size_t o = s->first + i * s->stride;
        memcpy(act + o, nc->src + o, s->len * sizeof *act);
    }
    return PS_OK;
}

ps_status patch_eval_naive(const model *m, const patch_pair *pairs, const patch_cell *cells, size_t n_cells,
                            const patch_opts *opts, double *values)
{
    forward_cache run = {0};
    patch_metric ms[PATCH_METRIC_COUNT];
    const size_t M = patch_opts_metrics(opts, ms);
    size_t cap = 0;
    ps_status st = PS_OK;
    for (size_t i = 0; i < n_cells && st == PS_OK; i++) {
        const patch_pair *p = &pairs[cells[i].pair];
        if (p->T > cap) {
            forward_cache_free(&run);
            if ((st = forward_cache_init(&run, &m->cfg, p->T, FORWARD_LOGITS_LAST)) != PS_OK)
                break;
            cap = p->T;
        }
        const forward_cache *base = patch_base_of(p, opts->direction), *src = patch_source_of(p, opts->direction);
        naive_ctx nc = {&cells[i], patch_component_array(src, (patch_component)cells[i].component, cells[i].layer),
                        patch_cell_slice(&cells[i], &m->cfg, p->T)};
        forward_hooks hooks = {naive_hook, &nc, NULL};
        if ((st = forward_run(m, &run, base->tokens, p->T, &hooks)) != PS_OK)
            break;
        /* every requested metric from this one patched forward */
        patch_metrics_of_logits(run.logits, m->cfg.vocab_size, p->answer, p->wrong, p->clean_logprobs, ms, M,
                                values + i * M);
    }
    forward_cache_free(&run);
    return st;
}
