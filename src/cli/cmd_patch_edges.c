#include "cmd_patch_edges.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "atp_edges.h"
#include "cli.h"
#include "ncout_edges.h"
#include "schema.h"

typedef struct {
    double a;
    size_t i;
} ranked;

/* descending |score|, then index */
static int by_abs_desc(const void *x, const void *y)
{
    const ranked *a = x, *b = y;
    return a->a > b->a ? -1 : a->a < b->a ? 1 : (a->i > b->i) - (a->i < b->i);
}

static json_t *json_num(double v) { return isfinite(v) ? json_real(v) : json_null(); }

/* the pair's prompt variables (ncout.h) with no grid, then the edges */
static ps_status edges_write(ncout_file *f, model *m, const tokenizer *tok, const patch_pair *p, patch_metric metric,
                             patch_direction dir, const char *answer, const char *wrong, const atp_edges *e,
                             const double *norm)
{
    ncout_results res;
    const ncout_prompt prompt = {.T = p->T, .answer_id = p->answer, .wrong_id = p->wrong,
                                 .clean_metric = p->clean_metric[metric],
                                 .corrupted_metric = p->corrupted_metric[metric], .clean_tokens = p->clean.tokens,
                                 .corrupted_tokens = p->corrupted.tokens, .answer = answer ? answer : "",
                                 .wrong = wrong ? wrong : ""};
    const bool none[PATCH_COMPONENT_COUNT] = {0};
    double *no_values[PATCH_COMPONENT_COUNT] = {0};
    ps_status st = ncout_results_define(&res, f, m, p->T, none, metric, dir, PATCH_ENGINE_FAST);
    if (st == PS_OK && (st = ncout_results_put(&res, 0, &prompt, tok, no_values)) == PS_OK)
        st = ncout_results_flush(&res);
    ncout_results_free(&res);
    if (st == PS_OK)
        st = ncout_put_attr(f, SCHEMA_ATT_METHOD, "atp");
    if (st == PS_OK)
        st = ncout_edges_put(f, e->n_up, e->n_down, e->up_labels, e->down_labels, e->score, norm, e->up_atp,
                             e->down_atp);
    return st;
}

ps_status patch_edges_report(model *m, const tokenizer *tok, const patch_pair *pair, patch_metric metric,
                             patch_direction dir, ncout_file *f, bool json, const char *answer, const char *wrong)
{
    atp_edges e;
    ps_status st = atp_edges_eval(m, pair, metric, dir, &e);
    const size_t n = e.n_up * e.n_down;
    double *norm = st == PS_OK ? malloc(n * sizeof *norm) : NULL;
    ranked *top = st == PS_OK ? malloc(n * sizeof *top) : NULL;
    if (st == PS_OK && (!norm || !top))
        st = err_set(PS_ERR_NOMEM, "out of memory for %zu edges", n);
    if (st)
        goto out;
    /* an effect's normalized value: patch_normalize of base + effect minus that of base */
    const double scale = pair->clean_metric[metric] - pair->corrupted_metric[metric];
    size_t valid = 0;
    for (size_t i = 0; i < n; i++) {
        norm[i] = scale != 0.0 ? e.score[i] / scale : NAN;
        if (!isnan(e.score[i]))
            top[valid++] = (ranked){fabs(e.score[i]), i};
    }
    qsort(top, valid, sizeof *top, by_abs_desc);
    if (f && (st = edges_write(f, m, tok, pair, metric, dir, answer, wrong, &e, norm)))
        goto out;
    const char *dname = dir == PATCH_DENOISE ? "denoise" : "noise";
    if (json) {
        json_t *up = json_array(), *down = json_array(), *sc = json_array(), *nsc = json_array();
        json_t *ua = json_array(), *da = json_array();
        for (size_t u = 0; u < e.n_up; u++) {
            json_array_append_new(up, json_string(e.up_labels[u]));
            json_array_append_new(ua, json_num(e.up_atp[u]));
            json_t *row = json_array(), *nrow = json_array();
            for (size_t v = 0; v < e.n_down; v++) {
                json_array_append_new(row, json_num(e.score[u * e.n_down + v]));
                json_array_append_new(nrow, json_num(norm[u * e.n_down + v]));
            }
            json_array_append_new(sc, row);
            json_array_append_new(nsc, nrow);
        }
        for (size_t v = 0; v < e.n_down; v++) {
            json_array_append_new(down, json_string(e.down_labels[v]));
            json_array_append_new(da, json_num(e.down_atp[v]));
        }
        cli_print_json(json_pack("{s:s,s:s,s:s,s:b,s:f,s:f,s:i,s:i,s:o,s:o,s:o,s:o,s:o,s:o}", "metric",
                                 patch_metric_name(metric), "direction", dname, "method", "atp", "edges", 1,
                                 "clean_metric", pair->clean_metric[metric], "corrupted_metric",
                                 pair->corrupted_metric[metric], "answer_id", pair->answer, "wrong_id", pair->wrong,
                                 "upstream", up, "downstream", down, "edge_atp", sc, "edge_atp_normalized", nsc,
                                 "upstream_atp", ua, "downstream_atp", da));
        goto out;
    }
    printf("%zu tokens; %s: clean %.4f, corrupted %.4f (%s, edge attribution patching)\n", pair->T,
           patch_metric_name(metric), pair->clean_metric[metric], pair->corrupted_metric[metric],
           dir == PATCH_DENOISE ? "denoising" : "noising");
    printf("%zu edges between %zu upstream and %zu downstream nodes; the top %d by |score|:\n", valid, e.n_up,
           e.n_down, valid < PATCH_EDGES_TOP ? (int)valid : PATCH_EDGES_TOP);
    printf("%4s %12s %11s  %s\n", "rank", "score", "normalized", "edge");
    for (size_t k = 0; k < valid && k < PATCH_EDGES_TOP; k++) {
        const size_t i = top[k].i;
        printf("%4zu %+12.5f %+11.4f  %s -> %s\n", k + 1, e.score[i], norm[i], e.up_labels[i / e.n_down],
               e.down_labels[i % e.n_down]);
    }
out:
    free(norm), free(top);
    atp_edges_free(&e);
    return st;
}
