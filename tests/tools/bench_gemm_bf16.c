/*
 * bench_gemm_bf16: the raw speed of the BF16 products (gemm_bf16.h) against
 * the F32 kernel (gemm.h, the widest ISA) at GPT-2 small's shapes:
 *   bench_gemm_bf16 [REPS (default 7) [THREADS (default 2)]]
 * For rows in {28, 336} and [k, n] in {768 x 2304 (q,k,v), 768 x 768
 * (attention output), 768 x 3072 (MLP in), 3072 x 768 (MLP out)}: the
 * median seconds of a batch of products per kernel (F32, AVX512_BF16 and
 * AMX-BF16 when the CPU has them), the kernels interleaved in every
 * repetition so that the machine's load hits them alike; prints one JSON
 * line per shape with the seconds, GFLOP/s and speed-ups over F32.  The
 * batch cycles through N_COPIES = 12 copies of the weight matrix (as a
 * 12-layer model's forward does), so the weights come from memory as in a
 * forward pass and not from a cache that one matrix would fit.
 */
#include <stdio.h>
#include <stdlib.h>

#include "gemm.h"
#include "gemm_bf16.h"
#include "pool.h"

#include "bench_tool.h"


int main(int argc, char **argv)
{
    const int reps = argc > 1 ? atoi(argv[1]) : 7;
    const size_t threads = argc > 2 ? (size_t)atoi(argv[2]) : 2;
    if (reps < 1 || reps > 1000 || threads < 1)
        return fprintf(stderr, "usage: bench_gemm_bf16 [REPS [THREADS]]\n"), 2;
    pool_set_threads(threads);
    const size_t rows_set[] = {28, 336}, shapes[][2] = {{768, 2304}, {768, 768}, {768, 3072}, {3072, 768}};
    enum { F32, AVX512BF16, AMX, NK, N_COPIES = 12 };
    const char *names[NK] = {"f32", "avx512_bf16", "amx_bf16"};
    const bool have[NK] = {true, gemm_bf16_isa_supported(GEMM_BF16_ISA_AVX512),
                           gemm_bf16_isa_supported(GEMM_BF16_ISA_AMX)};
    for (size_t ri = 0; ri < 2; ri++)
        for (size_t si = 0; si < 4; si++) {
            const size_t R = rows_set[ri], K = shapes[si][0], N = shapes[si][1];
            float *x = malloc(R * K * sizeof *x), *W = malloc(K * N * sizeof *W), *out = malloc(R * N * sizeof *out);
            float *pf = malloc(N_COPIES * gemm_packed_floats(K, N) * sizeof *pf);
            uint16_t *pb = malloc(N_COPIES * gemm_bf16_packed_elems(K, N) * sizeof *pb);
            if (!x || !W || !out || !pf || !pb)
                return fprintf(stderr, "bench_gemm_bf16: out of memory\n"), 2;
            for (size_t i = 0; i < R * K; i++)
                x[i] = (float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
            for (size_t i = 0; i < K * N; i++)
                W[i] = (float)((i * 40503u) % 1000) / 1000.0f - 0.5f;
            gemm_weight wf[N_COPIES], wb[N_COPIES];
            for (size_t c = 0; c < N_COPIES; c++) {
                float *f = pf + c * gemm_packed_floats(K, N);
                uint16_t *b = pb + c * gemm_bf16_packed_elems(K, N);
                gemm_pack(f, W, N, K, N);
                gemm_bf16_pack(b, W, GEMM_F32, N, false, NULL, K, N);
                wf[c] = (gemm_weight){K, N, f, GEMM_F32, NULL};
                wb[c] = (gemm_weight){.k = K, .n = N, .dtype = GEMM_BF16_PAIRS, .data16 = b};
            }
            /* about 0.05 s of F32 work per timed batch */
            const size_t batch = N_COPIES * (1 + (size_t)(2e8 / (2.0 * (double)(R * K * N))));
            double t[NK][1000];
            for (int r = -1; r < reps; r++) /* r = -1: warm-up */
                for (int kk = 0; kk < NK; kk++) {
                    if (!have[kk])
                        continue;
                    if (kk != F32)
                        gemm_bf16_isa_set(kk == AMX ? GEMM_BF16_ISA_AMX : GEMM_BF16_ISA_AVX512);
                    const double t0 = clock_now();
                    for (size_t b = 0; b < batch; b++)
                        gemm_run(out, x, R, kk == F32 ? &wf[b % N_COPIES] : &wb[b % N_COPIES], NULL, GEMM_PLAIN);
                    if (r >= 0)
                        t[kk][r] = (clock_now() - t0) / (double)batch;
                }
            double med[NK] = {0};
            for (int kk = 0; kk < NK; kk++)
                if (have[kk])
                    med[kk] = bench_median(t[kk], (size_t)reps);
            printf("{\"rows\": %zu, \"k\": %zu, \"n\": %zu, \"threads\": %zu, \"reps\": %d", R, K, N, threads, reps);
            for (int kk = 0; kk < NK; kk++)
                if (have[kk])
                    printf(", \"%s_s\": %.4g, \"%s_gflops\": %.1f", names[kk], med[kk], names[kk],
                           2.0 * (double)(R * K * N) / med[kk] * 1e-9);
            for (int kk = 1; kk < NK; kk++)
                if (have[kk])
                    printf(", \"%s_speedup\": %.3f", names[kk], med[F32] / med[kk]);
            printf("}\n");
            fflush(stdout);
            free(x), free(W), free(out), free(pf), free(pb);
        }
    pool_shutdown();
    return 0;
}
