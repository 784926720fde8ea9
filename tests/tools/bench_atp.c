/*
 * bench_atp: the cost of attribution patching (issue 20, item 4) in one
 * process, on one prompt pair:
 *   bench_atp MODEL_DIR [REPS [THREADS (default 2)]]
 * times (median of REPS, default 3; the four phases interleaved in every
 * repetition, so that the machine's load hits them alike) one forward pass
 * of the prompt, the pair (both runs: patch_pair_init), atp_eval of
 * resid_pre, attn_out, mlp_out and z, and the fast exact engine (patch_eval)
 * on the same grids; prints one JSON line with the seconds and
 *   atp_forward_equivalents   (pair + atp_eval) / forward: all of AtP from
 *                             the two prompts, in forward passes
 *   exact_over_atp            patch_eval / atp_eval: both given the pair
 *                             (its two runs serve either method)
 *   exact_over_atp_with_pair  (pair + patch_eval) / (pair + atp_eval)
 * The pair: 17 token ids differing at position 10 (the shape of the
 * worksheet's IOI pair).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "atp.h"
#include "blas.h"
#include "forward.h"
#include "model.h"
#include "patch.h"
#include "pool.h"

#include "bench_tool.h"


int main(int argc, char **argv)
{
    if (argc < 2)
        return fprintf(stderr, "usage: bench_atp MODEL_DIR [REPS [THREADS]]\n"), 2;
    const int reps = argc > 2 ? atoi(argv[2]) : 3;
    bench_set_threads(argc > 3 ? (size_t)atoi(argv[3]) : 2);
    model m;
    if (model_load(&m, argv[1]) != PS_OK)
        return fprintf(stderr, "bench_atp: %s\n", err_msg()), 2;
    int32_t clean[BENCH_PAIR_T], corr[BENCH_PAIR_T];
    bench_pair_ids(clean, corr);
    const size_t T = BENCH_PAIR_T;
    bool on[PATCH_COMPONENT_COUNT] = {[PATCH_RESID_PRE] = true, [PATCH_ATTN_OUT] = true, [PATCH_MLP_OUT] = true,
                                      [PATCH_Z] = true};
    double *vals[PATCH_COMPONENT_COUNT] = {0};
    patch_cell *all = NULL;
    size_t n_all = 0;
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        if (!on[c])
            continue;
        patch_cell *cells;
        size_t n;
        if (patch_grid_cells((patch_component)c, &m.cfg, 0, T, &cells, &n) != PS_OK)
            return 2;
        vals[c] = malloc(n * sizeof(double));
        all = realloc(all, (n_all + n) * sizeof *all);
        memcpy(all + n_all, cells, n * sizeof *cells);
        n_all += n;
        free(cells);
    }
    double *exact = malloc(n_all * sizeof *exact);
    double t_fwd[64], t_pair[64], t_atp[64], t_exact[64];
    forward_cache fc;
    if (forward_cache_init(&fc, &m.cfg, T, FORWARD_LOGITS_LAST) != PS_OK)
        return 2;
    patch_opts po = {.metric = PATCH_LOGIT_DIFF, .direction = PATCH_DENOISE, .engine = PATCH_ENGINE_FAST};
    for (int r = 0; r < reps && r < 64; r++) {
        double t0 = clock_now();
        if (forward_run(&m, &fc, corr, T, NULL) != PS_OK)
            return 2;
        double t1 = clock_now();
        patch_pair pair;
        if (patch_pair_init(&pair, &m, clean, corr, T, 7, 8) != PS_OK)
            return fprintf(stderr, "bench_atp: %s\n", err_msg()), 2;
        double t2 = clock_now();
        if (atp_eval(&m, &pair, on, PATCH_LOGIT_DIFF, PATCH_DENOISE, vals) != PS_OK)
            return fprintf(stderr, "bench_atp: %s\n", err_msg()), 2;
        double t3 = clock_now();
        if (patch_eval(&m, &pair, 1, all, n_all, &po, exact) != PS_OK)
            return fprintf(stderr, "bench_atp: %s\n", err_msg()), 2;
        double t4 = clock_now();
        t_fwd[r] = t1 - t0, t_pair[r] = t2 - t1, t_atp[r] = t3 - t2, t_exact[r] = t4 - t3;
        patch_pair_free(&pair);
    }
    const int n = reps < 64 ? reps : 64;
    const double f = bench_median(t_fwd, (size_t)n), p = bench_median(t_pair, (size_t)n),
                 a = bench_median(t_atp, (size_t)n), e = bench_median(t_exact, (size_t)n);
    printf("{\"cells\": %zu, \"threads\": %zu, \"reps\": %d, \"forward_s\": %.5f, \"pair_s\": %.5f, "
           "\"atp_s\": %.5f, \"exact_fast_s\": %.5f, \"atp_forward_equivalents\": %.2f, \"exact_over_atp\": %.1f, "
           "\"exact_over_atp_with_pair\": %.1f}\n",
           n_all, pool_threads(), n, f, p, a, e, (p + a) / f, e / a, (p + e) / (p + a));
    forward_cache_free(&fc);
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        free(vals[c]);
    free(all), free(exact);
    model_free(&m);
    return 0;
}
