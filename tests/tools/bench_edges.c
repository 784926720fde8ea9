/*
 * bench_edges: the cost of edge attribution patching (atp_edges.h) in one
 * process, on one prompt pair:
 *   bench_edges MODEL_DIR [REPS [THREADS (default 2)]]
 * times (median of REPS, default 3; the phases interleaved in every
 * repetition, so that the machine's load hits them alike) one forward pass
 * of the prompt, the pair (both runs: patch_pair_init), atp_eval of
 * resid_pre, attn_out, mlp_out and z (node AtP, for scale) and
 * atp_edges_eval (every edge); prints one JSON line with the seconds and
 *   edges_forward_equivalents   (pair + atp_edges_eval) / forward
 *   edges_over_atp              atp_edges_eval / atp_eval
 * The pair: 17 token ids differing at position 10 (the shape of the
 * worksheet's IOI pair), as bench_atp.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "atp.h"
#include "atp_edges.h"
#include "blas.h"
#include "forward.h"
#include "model.h"
#include "pool.h"

#include "bench_tool.h"


int main(int argc, char **argv)
{
    if (argc < 2)
        return fprintf(stderr, "usage: bench_edges MODEL_DIR [REPS [THREADS]]\n"), 2;
    const int reps = argc > 2 ? atoi(argv[2]) : 3;
    bench_set_threads(argc > 3 ? (size_t)atoi(argv[3]) : 2);
    model m;
    if (model_load(&m, argv[1]) != PS_OK)
        return fprintf(stderr, "bench_edges: %s\n", err_msg()), 2;
    int32_t clean[BENCH_PAIR_T], corr[BENCH_PAIR_T];
    bench_pair_ids(clean, corr);
    const size_t T = BENCH_PAIR_T;
    bool on[PATCH_COMPONENT_COUNT] = {[PATCH_RESID_PRE] = true, [PATCH_ATTN_OUT] = true, [PATCH_MLP_OUT] = true,
                                      [PATCH_Z] = true};
    double *vals[PATCH_COMPONENT_COUNT] = {0};
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        if (on[c])
            vals[c] = malloc(patch_grid_size((patch_component)c, &m.cfg, T) * sizeof(double));
    double t_fwd[64], t_pair[64], t_atp[64], t_edges[64];
    size_t n_edges = 0;
    forward_cache fc;
    if (forward_cache_init(&fc, &m.cfg, T, FORWARD_LOGITS_LAST) != PS_OK)
        return 2;
    for (int r = 0; r < reps && r < 64; r++) {
        double t0 = clock_now();
        if (forward_run(&m, &fc, corr, T, NULL) != PS_OK)
            return 2;
        double t1 = clock_now();
        patch_pair pair;
        if (patch_pair_init(&pair, &m, clean, corr, T, 7, 8) != PS_OK)
            return fprintf(stderr, "bench_edges: %s\n", err_msg()), 2;
        double t2 = clock_now();
        if (atp_eval(&m, &pair, on, PATCH_LOGIT_DIFF, PATCH_DENOISE, vals) != PS_OK)
            return fprintf(stderr, "bench_edges: %s\n", err_msg()), 2;
        double t3 = clock_now();
        atp_edges e;
        if (atp_edges_eval(&m, &pair, PATCH_LOGIT_DIFF, PATCH_DENOISE, &e) != PS_OK)
            return fprintf(stderr, "bench_edges: %s\n", err_msg()), 2;
        double t4 = clock_now();
        n_edges = 0;
        for (size_t i = 0; i < e.n_up * e.n_down; i++)
            n_edges += !isnan(e.score[i]);
        atp_edges_free(&e);
        t_fwd[r] = t1 - t0, t_pair[r] = t2 - t1, t_atp[r] = t3 - t2, t_edges[r] = t4 - t3;
        patch_pair_free(&pair);
    }
    const int n = reps < 64 ? reps : 64;
    const double f = bench_median(t_fwd, (size_t)n), p = bench_median(t_pair, (size_t)n),
                 a = bench_median(t_atp, (size_t)n), g = bench_median(t_edges, (size_t)n);
    printf("{\"edges\": %zu, \"threads\": %zu, \"reps\": %d, \"forward_s\": %.5f, \"pair_s\": %.5f, "
           "\"atp_s\": %.5f, \"edges_s\": %.5f, \"edges_forward_equivalents\": %.2f, \"edges_over_atp\": %.2f}\n",
           n_edges, pool_threads(), n, f, p, a, g, (p + g) / f, g / a);
    forward_cache_free(&fc);
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        free(vals[c]);
    model_free(&m);
    return 0;
}
