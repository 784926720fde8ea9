#include "gemm_bf16.h"

#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "gemm.h"
#include "pool.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define BF16_X86 1
#define TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
#define ALWAYS_INLINE __attribute__((always_inline)) inline
#endif

/* Rows of x per tile: 12 rows x 32 columns = 24 zmm accumulators, as the
 * F32 AVX-512 kernel. */
#define BF16_MR 12
/* Panels per thread visited together (their bytes stay in L2 while every
 * row block passes over them), as gemm.c. */
#define BF16_GROUP_BYTES ((size_t)512 * 1024)
/* Below this many multiply-adds a call runs on one thread. */
#define BF16_MIN_PARALLEL_MACS ((size_t)1 << 22)

bool gemm_bf16_supported(void)
{
    const char *off = getenv("PS_CPU_NO_BF16");
    if (off && strcmp(off, "1") == 0)
        return false;
#ifdef BF16_X86
    unsigned a, b, c, d;
    /* libgcc's cpu model checks that the OS saves the AVX-512 state */
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw"))
        return false;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d))
        return false;
    return (a >> 5) & 1u; /* CPUID.(EAX=7,ECX=1):EAX[5] = AVX512_BF16 */
#else
    return false;
#endif
}

size_t gemm_bf16_packed_elems(size_t k, size_t n)
{
    return (n + GEMM_NR - 1) / GEMM_NR * ((k + 1) / 2) * GEMM_NR * 2;
}

uint16_t gemm_bf16_round(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it a (quiet) NaN */
        return (uint16_t)((u >> 16) | 0x40u);
    /* round to nearest, ties to even: add 0x7fff plus the kept part's lowest bit */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

void gemm_bf16_pack(uint16_t *dst, const float *W, size_t ldw, size_t k, size_t n)
{
    const size_t np = (n + GEMM_NR - 1) / GEMM_NR, kh = (k + 1) / 2;
    for (size_t p = 0; p < np; p++) {
        uint16_t *d = dst + p * kh * GEMM_NR * 2;
        for (size_t kp = 0; kp < kh; kp++)
            for (size_t j = 0; j < GEMM_NR; j++)
                for (size_t e = 0; e < 2; e++) {
                    const size_t kk = 2 * kp + e, c = p * GEMM_NR + j;
                    d[(kp * GEMM_NR + j) * 2 + e] = kk < k && c < n ? gemm_bf16_round(W[kk * ldw + c]) : 0;
                }
    }
}

#ifdef BF16_X86
/* mr rows (ax: BF16 pairs, row stride kh pairs) times one panel:
 * c[r, j] = sum over pairs kp of (a[r, 2kp] b[2kp, j] + a[r, 2kp+1] b[2kp+1, j]) + bias[j],
 * j < nc; vdpbf16ps accumulates in F32. */
TARGET_BF16 static ALWAYS_INLINE void tile_bf16(const size_t mr, const uint32_t *ax, size_t kh,
                                                 const uint16_t *panel, float *c, size_t ldc, size_t nc,
                                                 const float *bias)
{
    __m512 c0[BF16_MR], c1[BF16_MR];
    for (size_t r = 0; r < mr; r++)
        c0[r] = c1[r] = _mm512_setzero_ps();
    for (size_t kp = 0; kp < kh; kp++) {
        const __m512i b0 = _mm512_loadu_si512(panel + kp * GEMM_NR * 2);
        const __m512i b1 = _mm512_loadu_si512(panel + kp * GEMM_NR * 2 + 32);
        for (size_t r = 0; r < mr; r++) {
            const __m512i a = _mm512_set1_epi32((int)ax[r * kh + kp]);
            c0[r] = _mm512_dpbf16_ps(c0[r], (__m512bh)a, (__m512bh)b0);
            c1[r] = _mm512_dpbf16_ps(c1[r], (__m512bh)a, (__m512bh)b1);
        }
    }
    const __mmask16 m0 = nc >= 16 ? 0xFFFF : (__mmask16)((1u << nc) - 1);
    const __mmask16 m1 = nc >= 32 ? 0xFFFF : nc > 16 ? (__mmask16)((1u << (nc - 16)) - 1) : 0;
    const __m512 bias0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
    const __m512 bias1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
    for (size_t r = 0; r < mr; r++) {
        _mm512_mask_storeu_ps(c + r * ldc, m0, _mm512_add_ps(c0[r], bias0));
        _mm512_mask_storeu_ps(c + r * ldc + 16, m1, _mm512_add_ps(c1[r], bias1));
    }
}

TARGET_BF16 static void tile_bf16_any(size_t mr, const uint32_t *ax, size_t kh, const uint16_t *panel, float *c,
                                      size_t ldc, size_t nc, const float *bias)
{
    switch (mr) {
#define CASE(R)                                                                                                        \
    case R: tile_bf16(R, ax, kh, panel, c, ldc, nc, bias); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
#undef CASE
    default: break;
    }
}
#endif

typedef struct {
    float *out;
    const uint32_t *ax; /* x rounded to BF16, [rows][kh] pairs */
    size_t rows, kh, n;
    const uint16_t *packed;
    const float *bias;
} bf16_task;

/* Thread tid's share: panels [np*tid/nt, np*(tid+1)/nt) for every row, a
 * group of panels at a time (gemm.c's order). */
static void bf16_worker(void *arg, size_t tid, size_t nt)
{
#ifdef BF16_X86
    const bf16_task *t = arg;
    const size_t np = (t->n + GEMM_NR - 1) / GEMM_NR, panel_elems = t->kh * GEMM_NR * 2;
    const size_t p0 = np * tid / nt, p1 = np * (tid + 1) / nt;
    size_t group = BF16_GROUP_BYTES / (panel_elems * sizeof(uint16_t));
    group = group < 1 ? 1 : group;
    for (size_t pg = p0; pg < p1; pg += group) {
        const size_t pe = pg + group < p1 ? pg + group : p1;
        for (size_t i = 0; i < t->rows; i += BF16_MR) {
            const size_t mr = t->rows - i < BF16_MR ? t->rows - i : BF16_MR;
            for (size_t p = pg; p < pe; p++) {
                const size_t c0 = p * GEMM_NR, nc = t->n - c0 < GEMM_NR ? t->n - c0 : GEMM_NR;
                tile_bf16_any(mr, t->ax + i * t->kh, t->kh, t->packed + p * panel_elems, t->out + i * t->n + c0,
                              t->n, nc, t->bias ? t->bias + c0 : NULL);
            }
        }
    }
#else
    (void)arg, (void)tid, (void)nt;
#endif
}

ps_status gemm_bf16_run(float *out, const float *x, size_t rows, const uint16_t *packed, size_t k, size_t n,
                        const float *bias)
{
    if (!gemm_bf16_supported())
        return err_set(PS_ERR_INVALID, "BF16 arithmetic needs a CPU with AVX512_BF16 (this one has none)");
    if (rows == 0 || n == 0)
        return PS_OK;
    const size_t kh = (k + 1) / 2;
    /* x rounded to BF16 once (rows x k roundings against rows x k x n
     * products), an odd k padded with a zero */
    uint16_t *ax = calloc(rows * kh * 2 + 2, sizeof *ax);
    if (!ax)
        return err_set(PS_ERR_NOMEM, "cannot allocate %zu rows of BF16 activations", rows);
    for (size_t r = 0; r < rows; r++)
        for (size_t kk = 0; kk < k; kk++)
            ax[r * kh * 2 + kk] = gemm_bf16_round(x[r * k + kk]);
    if (kh == 0) { /* an empty sum: bias (or 0) */
        for (size_t i = 0; i < rows; i++)
            for (size_t j = 0; j < n; j++)
                out[i * n + j] = bias ? bias[j] : 0.0f;
        free(ax);
        return PS_OK;
    }
    /* pairs as 32-bit words: element 2kp in the low half (little endian),
     * as vdpbf16ps reads them */
    bf16_task t = {out, (const uint32_t *)(const void *)ax, rows, kh, n, packed, bias};
    const size_t np = (n + GEMM_NR - 1) / GEMM_NR;
    const bool small = rows * k * n < BF16_MIN_PARALLEL_MACS;
    pool_run(small ? 1 : np, bf16_worker, &t);
    free(ax);
    return PS_OK;
}
