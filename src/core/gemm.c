#include "gemm.h"

#include <cblas.h>
#include <stdint.h>
#include <string.h>

#include "gemm_bf16.h"
#include "pool.h"
#include "safetensors.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define GEMM_X86 1
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TARGET_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define ALWAYS_INLINE __attribute__((always_inline)) inline
#endif
#if defined(__GNUC__)
#define ALWAYS_INLINE_C __attribute__((always_inline)) inline
#else
#define ALWAYS_INLINE_C inline
#endif

/* Panels per thread visited together: their k x GEMM_NR floats (a group)
 * stay in L2 while every row block passes over them. */
#define PANEL_GROUP_BYTES ((size_t)512 * 1024)
/* Below this many multiply-adds a call runs on one thread: waking the
 * workers would cost more than it saves. */
#define GEMM_MIN_PARALLEL_MACS ((size_t)1 << 22)

size_t gemm_packed_floats(size_t k, size_t n) { return (n + GEMM_NR - 1) / GEMM_NR * k * GEMM_NR; }

void gemm_pack(float *dst, const float *W, size_t ldw, size_t k, size_t n)
{
    const size_t np = (n + GEMM_NR - 1) / GEMM_NR;
    for (size_t p = 0; p < np; p++) {
        const size_t c0 = p * GEMM_NR, nc = n - c0 < GEMM_NR ? n - c0 : GEMM_NR;
        float *d = dst + p * k * GEMM_NR;
        for (size_t kk = 0; kk < k; kk++) {
            memcpy(d + kk * GEMM_NR, W + kk * ldw + c0, nc * sizeof *d);
            memset(d + kk * GEMM_NR + nc, 0, (GEMM_NR - nc) * sizeof *d);
        }
    }
}

size_t gemm_packed_bytes(size_t k, size_t n, gemm_dtype dt)
{
    if (dt == GEMM_BF16_PAIRS)
        return gemm_bf16_packed_elems(k, n) * sizeof(uint16_t);
    return gemm_packed_floats(k, n) * (dt == GEMM_F32 ? sizeof(float) : sizeof(uint16_t));
}

void gemm_pack16(uint16_t *dst, const uint16_t *W, size_t ldw, size_t k, size_t n)
{
    const size_t np = (n + GEMM_NR - 1) / GEMM_NR;
    for (size_t p = 0; p < np; p++) {
        const size_t c0 = p * GEMM_NR, nc = n - c0 < GEMM_NR ? n - c0 : GEMM_NR;
        uint16_t *d = dst + p * k * GEMM_NR;
        for (size_t kk = 0; kk < k; kk++) {
            memcpy(d + kk * GEMM_NR, W + kk * ldw + c0, nc * sizeof *d);
            memset(d + kk * GEMM_NR + nc, 0, (GEMM_NR - nc) * sizeof *d);
        }
    }
}

void gemm_pack_rows16(uint16_t *dst, const uint16_t *A, size_t lda, const size_t *rows, size_t k, size_t n)
{
    const size_t np = (n + GEMM_NR - 1) / GEMM_NR;
    for (size_t p = 0; p < np; p++) {
        uint16_t *d = dst + p * k * GEMM_NR;
        for (size_t j = 0; j < GEMM_NR; j++) {
            const size_t c = p * GEMM_NR + j;
            if (c >= n) {
                for (size_t kk = 0; kk < k; kk++)
                    d[kk * GEMM_NR + j] = 0;
                continue;
            }
            const uint16_t *a = A + (rows ? rows[c] : c) * lda;
            for (size_t kk = 0; kk < k; kk++)
                d[kk * GEMM_NR + j] = a[kk];
        }
    }
}

float gemm_widen(gemm_dtype dt, uint16_t h) { return dt == GEMM_F16 ? st_f16_to_f32(h) : st_bf16_to_f32(h); }

bool gemm_is_panels(const gemm_weight *w)
{
    switch (w->dtype) {
    case GEMM_F32:
    case GEMM_F16:
    case GEMM_BF16: return true;
    default: return false;
    }
}

void gemm_unpack(float *dst, const gemm_weight *w)
{
    const size_t k = w->k, n = w->n;
    for (size_t kk = 0; kk < k; kk++) /* row by row: dst is written in order, each panel row read whole */
        for (size_t c0 = 0; c0 < n; c0 += GEMM_NR) {
            const size_t o = c0 * k + kk * GEMM_NR, nc = n - c0 < GEMM_NR ? n - c0 : GEMM_NR;
            float *d = dst + kk * n + c0;
            if (w->dtype == GEMM_F32)
                memcpy(d, w->data + o, nc * sizeof *d);
            else
                for (size_t j = 0; j < nc; j++)
                    d[j] = gemm_widen(w->dtype, w->data16[o + j]);
        }
}

void gemm_pack_rows(float *dst, const float *A, size_t lda, const size_t *rows, size_t k, size_t n)
{
    const size_t np = (n + GEMM_NR - 1) / GEMM_NR;
    for (size_t p = 0; p < np; p++) {
        float *d = dst + p * k * GEMM_NR;
        for (size_t j = 0; j < GEMM_NR; j++) {
            const size_t c = p * GEMM_NR + j;
            if (c >= n) {
                for (size_t kk = 0; kk < k; kk++)
                    d[kk * GEMM_NR + j] = 0.0f;
                continue;
            }
            const float *a = A + (rows ? rows[c] : c) * lda;
            for (size_t kk = 0; kk < k; kk++)
                d[kk * GEMM_NR + j] = a[kk];
        }
    }
}

/* ---- gelu ----------------------------------------------------------------- */

/* exp(x) for x in [-87, 88] (clamped), Cephes' expf: x = n ln2 + r with
 * |r| <= ln2/2, e^r by a degree-7 polynomial, 2^n through the exponent
 * bits.  Branch-free so that the loops below vectorize; about 1 ulp. */
static inline float exp_clamped(float x)
{
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln2) */
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* gelu(v) = 0.5 v (1 + tanh(u)) = v / (1 + exp(-2u)),  u = sqrt(2/pi)(v + 0.044715 v^3).
 * One body compiled once per instruction set (below) so that the loop
 * vectorizes at the widest width the CPU has; the copy is chosen with the
 * kernels (gemm_isa_get), not by an ifunc, so tests can force each one.
 * Only correctly rounded IEEE operations (no contraction into FMA: ISO C
 * mode), so every copy and the scalar tail give the same bits for the same
 * input.  Vectorizing the clamps needs -fno-trapping-math for this file
 * (Makefile): we never read FP flags. */
#define GELU_BODY(x, n)                                                                                               \
    do {                                                                                                              \
        const float c2 = -2.0f * 0.7978845608028654f; /* -2 sqrt(2/pi) */                                            \
        for (size_t i = 0; i < (n); i++) {                                                                            \
            const float v = (x)[i];                                                                                   \
            (x)[i] = v / (1.0f + exp_clamped(c2 * (v + 0.044715f * v * v * v)));                                      \
        }                                                                                                             \
    } while (0)

static void gelu_c(float *x, size_t n) { GELU_BODY(x, n); }
#ifdef GEMM_X86
TARGET_AVX2 static void gelu_avx2(float *x, size_t n) { GELU_BODY(x, n); }
TARGET_AVX512 static void gelu_avx512(float *x, size_t n) { GELU_BODY(x, n); }
#endif

/* erf(u), branch-free so that the loops below vectorize (libm's erff is
 * scalar: it was 11% of the NeoX patching grid's time).  Two pieces, both
 * computed and one selected:
 *   |u| <= 1:  erf(u) = u P(u^2), P of degree 7 (relative error 4e-11);
 *   |u| > 1:   erf(u) = sign(u) (1 - exp(-u^2) S(s)), s = (|u| - 2.5) / 1.5,
 *              S ~ erfc(u) exp(u^2) of degree 12 (relative error 6e-9 of
 *              erfc <= 0.16), |u| clamped to 4 (erfc(4) = 1.5e-8 rounds
 *              1 - erfc to 1.0f).
 * Least-squares fits on Chebyshev nodes (numpy), evaluated in double (in
 * float the polynomials' rounding reached 3 ulp of erf), rounded to float
 * once (test_gemm: test_gelu_erf_accuracy).  Plain
 * multiplies and adds (no FMA contraction in ISO C mode), so every ISA's
 * copy gives the same bits, as the tanh GELU. */
static inline float erf_approx(float u)
{
    /* The high-order terms (at most 0.1 of the sum) in float, the last
     * ones in double. */
    const float af = u < 0.0f ? -u : u, tf = u * u;
    float pf = -9.689740964376353e-06f;
    pf = pf * tf + 0.00011274737904708396f;
    pf = pf * tf - 0.000848543891356958f;
    pf = pf * tf + 0.005221138695993439f;
    pf = pf * tf - 0.026865475514888163f;
    const double ud = u, a = af, t = ud * ud;
    double p = (double)pf * t + 0.11283783443883375;
    p = p * t - 0.37612638552827504;
    p = p * t + 1.128379167080104;
    const double small = ud * p;
    const float acf = af < 4.0f ? af : 4.0f, sf = (acf - 2.5f) * (1.0f / 1.5f);
    float qf = 1.2445648947110548e-05f;
    qf = qf * sf - 3.665494840900244e-05f;
    qf = qf * sf + 5.902049467583913e-05f;
    qf = qf * sf - 0.00014469410950404364f;
    qf = qf * sf + 0.0004099893438197334f;
    qf = qf * sf - 0.0010163813257714528f;
    qf = qf * sf + 0.0024040043781818647f;
    qf = qf * sf - 0.0055676501173921745f;
    qf = qf * sf + 0.012489175804615038f;
    const double ac = acf, s = (ac - 2.5) * (1.0 / 1.5);
    double q = (double)qf * s - 0.027005669797881052;
    q = q * s + 0.05611051653091422;
    q = q * s - 0.11152100739281137;
    q = q * s + 0.21080636368941658;
    /* exp in float: its relative error (about 1 ulp, times u^2 <= 16 for
     * the rounding of u^2) is of erfc <= 0.16, below 0.3 ulp of erf */
    const double big = 1.0 - (double)exp_clamped((float)-(ac * ac)) * q;
    return (float)(a <= 1.0 ? small : u < 0.0f ? -big : big);
}

/* gelu_erf(v) = 0.5 v (1 + erf(v / sqrt 2)), one body per ISA as GELU_BODY. */
#define GELU_ERF_BODY(x, n)                                                                                           \
    do {                                                                                                              \
        for (size_t i = 0; i < (n); i++) {                                                                            \
            const float v = (x)[i];                                                                                   \
            (x)[i] = 0.5f * v * (1.0f + erf_approx(v * 0.70710678118654752f));                                        \
        }                                                                                                             \
    } while (0)

static void gelu_erf_c(float *x, size_t n) { GELU_ERF_BODY(x, n); }
#ifdef GEMM_X86
TARGET_AVX2 static void gelu_erf_avx2(float *x, size_t n) { GELU_ERF_BODY(x, n); }
TARGET_AVX512 static void gelu_erf_avx512(float *x, size_t n) { GELU_ERF_BODY(x, n); }
#endif


/* ---- micro-kernels ---------------------------------------------------------
 * A tile is mr rows (mr <= the kernel's MR) of x times one panel:
 *   c[r, j] = sum_kk a[r*lda + kk] * b[kk*GEMM_NR + j] (+ bias[j]),  j < nc.
 * Each ISA's tile function dispatches mr to a specialisation with mr known
 * at compile time, so the accumulators live in registers. */

typedef void (*tile_fn)(size_t mr, const float *a, size_t lda, const void *b, size_t k, float *c, size_t ldc,
                        size_t nc, const float *bias);

enum { MR_C = 4, MR_AVX2 = 6, MR_AVX512 = 12 };

/* bt: the panel's element type (gemm_dtype); 2-byte panels are widened
 * exactly to float one panel row at a time, so the arithmetic is the F32
 * kernel's. */
static ALWAYS_INLINE_C void tile_c_any(const int bt, size_t mr, const float *a, size_t lda, const void *bv, size_t k,
                                       float *c, size_t ldc, size_t nc, const float *bias)
{
    float acc[MR_C][GEMM_NR] = {{0}}, wide[GEMM_NR];
    for (size_t kk = 0; kk < k; kk++) {
        const float *b;
        if (bt == GEMM_F32) {
            b = (const float *)bv + kk * GEMM_NR;
        } else {
            const uint16_t *h = (const uint16_t *)bv + kk * GEMM_NR;
            for (size_t j = 0; j < GEMM_NR; j++)
                wide[j] = gemm_widen((gemm_dtype)bt, h[j]);
            b = wide;
        }
        for (size_t r = 0; r < mr; r++) {
            const float av = a[r * lda + kk];
            for (size_t j = 0; j < GEMM_NR; j++)
                acc[r][j] += av * b[j];
        }
    }
    for (size_t r = 0; r < mr; r++)
        for (size_t j = 0; j < nc; j++)
            c[r * ldc + j] = acc[r][j] + (bias ? bias[j] : 0.0f);
}

#define TILE_C(NAME, BT)                                                                                               \
    static void NAME(size_t mr, const float *a, size_t lda, const void *b, size_t k, float *c, size_t ldc, size_t nc,  \
                     const float *bias)                                                                                \
    {                                                                                                                  \
        tile_c_any(BT, mr, a, lda, b, k, c, ldc, nc, bias);                                                            \
    }
TILE_C(tile_c, GEMM_F32)
TILE_C(tile_c_f16, GEMM_F16)
TILE_C(tile_c_bf16, GEMM_BF16)

#ifdef GEMM_X86
/* AVX2: 6 rows x 16 columns (12 ymm accumulators), called for both
 * halves of a panel. */
/* 8 panel values from element i of a panel row, widened to float:
 * vcvtph2ps for F16, the 16-bit pattern shifted left by 16 for BF16 (both
 * exact). */
TARGET_AVX2 static ALWAYS_INLINE __m256 load8_avx2(const int bt, const void *b, size_t i)
{
    if (bt == GEMM_F32)
        return _mm256_loadu_ps((const float *)b + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)b + i));
    if (bt == GEMM_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

TARGET_AVX2 static ALWAYS_INLINE void tile16_avx2(const int bt, const size_t mr, const float *a, size_t lda,
                                                   const void *b, size_t k, float *c, size_t ldc, size_t nc,
                                                   const float *bias)
{
    __m256 c0[MR_AVX2], c1[MR_AVX2];
    for (size_t r = 0; r < mr; r++)
        c0[r] = c1[r] = _mm256_setzero_ps();
    for (size_t kk = 0; kk < k; kk++) {
        const __m256 b0 = load8_avx2(bt, b, kk * GEMM_NR), b1 = load8_avx2(bt, b, kk * GEMM_NR + 8);
        for (size_t r = 0; r < mr; r++) {
            const __m256 av = _mm256_broadcast_ss(a + r * lda + kk);
            c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
            c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
        }
    }
    float tmp[16];
    for (size_t r = 0; r < mr; r++) {
        _mm256_storeu_ps(tmp, c0[r]);
        _mm256_storeu_ps(tmp + 8, c1[r]);
        for (size_t j = 0; j < nc; j++)
            c[r * ldc + j] = tmp[j] + (bias ? bias[j] : 0.0f);
    }
}

TARGET_AVX2 static ALWAYS_INLINE void tile_avx2_any(const int bt, size_t mr, const float *a, size_t lda,
                                                     const void *b, size_t k, float *c, size_t ldc, size_t nc,
                                                     const float *bias)
{
    for (size_t half = 0; half < 2 && half * 16 < nc; half++) {
        const size_t off = half * 16, n16 = nc - off < 16 ? nc - off : 16;
        const void *bh = bt == GEMM_F32 ? (const void *)((const float *)b + off)
                                        : (const void *)((const uint16_t *)b + off);
        const float *biash = bias ? bias + off : NULL;
        float *ch = c + off;
        switch (mr) {
#define CASE(R)                                                                                                        \
    case R: tile16_avx2(bt, R, a, lda, bh, k, ch, ldc, n16, biash); break;
            CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6)
#undef CASE
        default: break;
        }
    }
}

#define TILE_AVX2(NAME, BT)                                                                                            \
    TARGET_AVX2 static void NAME(size_t mr, const float *a, size_t lda, const void *b, size_t k, float *c,             \
                                 size_t ldc, size_t nc, const float *bias)                                             \
    {                                                                                                                  \
        tile_avx2_any(BT, mr, a, lda, b, k, c, ldc, nc, bias);                                                         \
    }
TILE_AVX2(tile_avx2, GEMM_F32)
TILE_AVX2(tile_avx2_f16, GEMM_F16)
TILE_AVX2(tile_avx2_bf16, GEMM_BF16)

/* AVX-512: 12 rows x 32 columns (24 zmm accumulators, 2 for the panel
 * row, 1 broadcast); masked stores for a last panel narrower than 32. */
/* 16 panel values from element i of a panel row, widened as load8_avx2. */
TARGET_AVX512 static ALWAYS_INLINE __m512 load16_avx512(const int bt, const void *b, size_t i)
{
    if (bt == GEMM_F32)
        return _mm512_loadu_ps((const float *)b + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)b + i));
    if (bt == GEMM_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

TARGET_AVX512 static ALWAYS_INLINE void tile32_avx512(const int bt, const size_t mr, const float *a, size_t lda,
                                                       const void *b, size_t k, float *c, size_t ldc, size_t nc,
                                                       const float *bias)
{
    __m512 c0[MR_AVX512], c1[MR_AVX512];
    for (size_t r = 0; r < mr; r++)
        c0[r] = c1[r] = _mm512_setzero_ps();
    for (size_t kk = 0; kk < k; kk++) {
        const __m512 b0 = load16_avx512(bt, b, kk * GEMM_NR), b1 = load16_avx512(bt, b, kk * GEMM_NR + 16);
        for (size_t r = 0; r < mr; r++) {
            const __m512 av = _mm512_set1_ps(a[r * lda + kk]);
            c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
            c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
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

#define TILE_AVX512(NAME, BT)                                                                                          \
    TARGET_AVX512 static void NAME(size_t mr, const float *a, size_t lda, const void *b, size_t k, float *c,           \
                                   size_t ldc, size_t nc, const float *bias)                                           \
    {                                                                                                                  \
        switch (mr) {                                                                                                  \
        case 1: tile32_avx512(BT, 1, a, lda, b, k, c, ldc, nc, bias); break;                                          \
        case 2: tile32_avx512(BT, 2, a, lda, b, k, c, ldc, nc, bias); break;                                          \
        case 3: tile32_avx512(BT, 3, a, lda, b, k, c, ldc, nc, bias); break;                                          \
        case 4: tile32_avx512(BT, 4, a, lda, b, k, c, ldc, nc, bias); break;                                          \
        case 5: tile32_avx512(BT, 5, a, lda, b, k, c, ldc, nc, bias); break;                                          \
        case 6: tile32_avx512(BT, 6, a, lda, b, k, c, ldc, nc, bias); break;                                          \
        case 7: tile32_avx512(BT, 7, a, lda, b, k, c, ldc, nc, bias); break;                                          \
        case 8: tile32_avx512(BT, 8, a, lda, b, k, c, ldc, nc, bias); break;                                          \
        case 9: tile32_avx512(BT, 9, a, lda, b, k, c, ldc, nc, bias); break;                                          \
        case 10: tile32_avx512(BT, 10, a, lda, b, k, c, ldc, nc, bias); break;                                        \
        case 11: tile32_avx512(BT, 11, a, lda, b, k, c, ldc, nc, bias); break;                                        \
        case 12: tile32_avx512(BT, 12, a, lda, b, k, c, ldc, nc, bias); break;                                        \
        default: break;                                                                                                \
        }                                                                                                              \
    }
TILE_AVX512(tile_avx512, GEMM_F32)
TILE_AVX512(tile_avx512_f16, GEMM_F16)
TILE_AVX512(tile_avx512_bf16, GEMM_BF16)
#endif

/* ---- dispatch ---------------------------------------------------------------- */

static const struct {
    const char *name;
    size_t mr;
    tile_fn tile[3]; /* by gemm_dtype of the panels */
    void (*gelu)(float *x, size_t n);
    void (*gelu_erf)(float *x, size_t n);
} isa_table[GEMM_ISA_COUNT] = {
    [GEMM_ISA_C] = {"c", MR_C, {tile_c, tile_c_f16, tile_c_bf16}, gelu_c, gelu_erf_c},
#ifdef GEMM_X86
    [GEMM_ISA_AVX2] = {"avx2", MR_AVX2, {tile_avx2, tile_avx2_f16, tile_avx2_bf16}, gelu_avx2, gelu_erf_avx2},
    [GEMM_ISA_AVX512] = {"avx512", MR_AVX512, {tile_avx512, tile_avx512_f16, tile_avx512_bf16}, gelu_avx512, gelu_erf_avx512},
#else
    [GEMM_ISA_AVX2] = {"avx2", MR_C, {NULL, NULL, NULL}, NULL, NULL},
    [GEMM_ISA_AVX512] = {"avx512", MR_C, {NULL, NULL, NULL}, NULL, NULL},
#endif
};

#ifdef GEMM_X86
/* F16C (vcvtph2ps for the F16 panels): CPUID leaf 1, ECX bit 29 (clang's
 * __builtin_cpu_supports does not know "f16c"); the OS's AVX state is
 * checked with avx2 by the callers. */
static bool cpu_has_f16c(void)
{
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}
#endif

bool gemm_isa_supported(gemm_isa isa)
{
    switch (isa) {
    case GEMM_ISA_C: return true;
#ifdef GEMM_X86
    /* libgcc's cpu model also checks that the OS saves the AVX/AVX-512 state (xgetbv). */
    case GEMM_ISA_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
    case GEMM_ISA_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               cpu_has_f16c();
#endif
    default: return false;
    }
}

static int active_isa = -1;

gemm_isa gemm_isa_get(void)
{
    if (active_isa < 0) {
        active_isa = GEMM_ISA_C;
        for (int i = GEMM_ISA_COUNT - 1; i > GEMM_ISA_C; i--)
            if (gemm_isa_supported((gemm_isa)i)) {
                active_isa = i;
                break;
            }
    }
    return (gemm_isa)active_isa;
}

void gemm_isa_set(gemm_isa isa)
{
    if (isa < GEMM_ISA_COUNT && gemm_isa_supported(isa))
        active_isa = (int)isa;
}

void gemm_gelu(float *x, size_t n) { isa_table[gemm_isa_get()].gelu(x, n); }

void gemm_gelu_erf(float *x, size_t n) { isa_table[gemm_isa_get()].gelu_erf(x, n); }

void gemm_epilogue_apply(gemm_epilogue ep, float *x, size_t n)
{
    if (ep != GEMM_PLAIN)
        (ep == GEMM_GELU ? gemm_gelu : gemm_gelu_erf)(x, n);
}

void gemm_empty_sum(float *out, size_t rows, size_t n, const float *bias, gemm_epilogue ep)
{
    for (size_t i = 0; i < rows; i++)
        for (size_t j = 0; j < n; j++)
            out[i * n + j] = bias ? bias[j] : 0.0f;
    gemm_epilogue_apply(ep, out, rows * n);
}

const char *gemm_isa_name(gemm_isa isa) { return isa < GEMM_ISA_COUNT ? isa_table[isa].name : "?"; }

/* ---- driver ------------------------------------------------------------------ */

typedef struct {
    float *out;
    const float *x;
    size_t rows;
    const gemm_weight *w;
    const float *bias;
    gemm_epilogue ep;
    size_t mr;
    tile_fn tile;
} gemm_task;

/* Thread tid's share: panels [np*tid/nt, np*(tid+1)/nt) for every row.
 * Per group of panels, each row block (mr rows of x, reused from L1/L2 across
 * the group) passes over the group's panels (reused from L2 across row blocks). */
static void gemm_worker(void *arg, size_t tid, size_t nt)
{
    const gemm_task *t = arg;
    const size_t k = t->w->k, n = t->w->n, np = (n + GEMM_NR - 1) / GEMM_NR;
    const size_t p0 = np * tid / nt, p1 = np * (tid + 1) / nt;
    size_t group = PANEL_GROUP_BYTES / (k * GEMM_NR * sizeof(float));
    group = group < 1 ? 1 : group;
    for (size_t pg = p0; pg < p1; pg += group) {
        const size_t pe = pg + group < p1 ? pg + group : p1;
        for (size_t i = 0; i < t->rows; i += t->mr) {
            const size_t mr = t->rows - i < t->mr ? t->rows - i : t->mr;
            for (size_t p = pg; p < pe; p++) {
                const size_t c0 = p * GEMM_NR, nc = n - c0 < GEMM_NR ? n - c0 : GEMM_NR;
                const void *panel = t->w->dtype == GEMM_F32 ? (const void *)(t->w->data + p * k * GEMM_NR)
                                                            : (const void *)(t->w->data16 + p * k * GEMM_NR);
                t->tile(mr, t->x + i * k, k, panel, k, t->out + i * n + c0, n, nc,
                        t->bias ? t->bias + c0 : NULL);
            }
        }
        if (t->ep != GEMM_PLAIN) {
            const size_t c0 = pg * GEMM_NR, c1 = pe * GEMM_NR < n ? pe * GEMM_NR : n;
            for (size_t i = 0; i < t->rows; i++)
                gemm_epilogue_apply(t->ep, t->out + i * n + c0, c1 - c0);
        }
    }
}

void gemm_run(float *out, const float *x, size_t rows, const gemm_weight *w, const float *bias, gemm_epilogue ep)
{
    if (rows == 0 || w->n == 0)
        return;
    if (w->dtype == GEMM_BF16_PAIRS) { /* --compute bf16 */
        gemm_bf16_run(out, x, rows, w->data16, w->k, w->n, bias, ep);
        return;
    }
    const gemm_isa isa = gemm_isa_get();
    gemm_task t = {out, x, rows, w, bias, ep, isa_table[isa].mr, isa_table[isa].tile[w->dtype]};
    if (w->k == 0) {
        gemm_empty_sum(out, rows, w->n, bias, ep);
        return;
    }
    const size_t np = (w->n + GEMM_NR - 1) / GEMM_NR;
    const bool small = rows * w->k * w->n < GEMM_MIN_PARALLEL_MACS;
    pool_run(small ? 1 : np, gemm_worker, &t);
}

/* ---- the vocabulary product -------------------------------------------------- */

typedef struct {
    float *out;
    const float *x, *U;
    size_t rows, V, d;
} unembed_task;

/* Slices of whole 64-column blocks, so that each thread's sgemm keeps
 * OpenBLAS's blocking; the last slice takes the remainder. */
static void unembed_worker(void *arg, size_t tid, size_t nt)
{
    const unembed_task *t = arg;
    const size_t blocks = (t->V + 63) / 64;
    const size_t v0 = blocks * tid / nt * 64, v1e = blocks * (tid + 1) / nt * 64, v1 = v1e < t->V ? v1e : t->V;
    if (v1 <= v0)
        return;
    const float *u = t->U + v0 * t->d;
    if (t->rows == 1)
        cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)(v1 - v0), (int)t->d, 1.0f, u, (int)t->d, t->x, 1, 0.0f,
                    t->out + v0, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)t->rows, (int)(v1 - v0), (int)t->d, 1.0f, t->x,
                    (int)t->d, u, (int)t->d, 0.0f, t->out + v0, (int)t->V);
}

void gemm_unembed(float *out, const float *x, size_t rows, const float *U, size_t V, size_t d)
{
    if (rows == 0 || V == 0)
        return;
    unembed_task t = {out, x, U, rows, V, d};
    const bool small = rows * V * d < GEMM_MIN_PARALLEL_MACS;
    pool_run(small ? 1 : (V + 63) / 64, unembed_worker, &t);
}

/* ---- the transposed product (backward passes) ------------------------------- */

/* dx[r, kk] (+)= sum_c dy[r, c] W[kk, c] read from the packed panels: row kk
 * of panel p is W[kk, p*NR .. p*NR+NR), contiguous.  A tile is rb rows of dy
 * by kb consecutive kk: rb*kb vector accumulators, each summing the lane-wise
 * products dy[r, p*NR + j] * W[kk, p*NR + j] over every panel p in order,
 * reduced across lanes once at the end; the padding columns (c >= n) have
 * W = 0 and are masked out of dy, which may end there.  Every (r, kk) is one
 * such sum whatever the tile and thread split: the same bits for any row
 * count and thread count on one instruction set. */

typedef void (*tile_t_fn)(size_t rb, size_t kb, const float *dy, size_t n, const void *w, size_t k, float *dx,
                          size_t ldx, bool accumulate);

enum { TRB_C = 4, TKB_C = 4, TRB_AVX2 = 2, TKB_AVX2 = 4, TRB_AVX512 = 4, TKB_AVX512 = 4 };

/* C: 8 lanes (j mod 8), the lanes summed in order */
static ALWAYS_INLINE_C void tile_t_c_any(const int bt, size_t rb, size_t kb, const float *dy, size_t n,
                                         const void *wv, size_t k, float *dx, size_t ldx, bool accumulate)
{
    float lane[TRB_C][TKB_C][8] = {{{0}}}, wide[GEMM_NR];
    const size_t np = (n + GEMM_NR - 1) / GEMM_NR;
    for (size_t p = 0; p < np; p++) {
        const size_t c0 = p * GEMM_NR, nc = n - c0 < GEMM_NR ? n - c0 : GEMM_NR;
        for (size_t q = 0; q < kb; q++) {
            const float *wr;
            if (bt == GEMM_F32) {
                wr = (const float *)wv + (p * k + q) * GEMM_NR;
            } else {
                const uint16_t *h = (const uint16_t *)wv + (p * k + q) * GEMM_NR;
                for (size_t j = 0; j < GEMM_NR; j++)
                    wide[j] = gemm_widen((gemm_dtype)bt, h[j]);
                wr = wide;
            }
            for (size_t r = 0; r < rb; r++) {
                const float *y = dy + r * n + c0;
                for (size_t j = 0; j < nc; j++)
                    lane[r][q][j & 7] += y[j] * wr[j];
            }
        }
    }
    for (size_t r = 0; r < rb; r++)
        for (size_t q = 0; q < kb; q++) {
            float s = 0.0f;
            for (size_t e = 0; e < 8; e++)
                s += lane[r][q][e];
            dx[r * ldx + q] = accumulate ? dx[r * ldx + q] + s : s;
        }
}

#define TILE_T_C(NAME, BT)                                                                                             \
    static void NAME(size_t rb, size_t kb, const float *dy, size_t n, const void *w, size_t k, float *dx, size_t ldx,  \
                     bool accumulate)                                                                                  \
    {                                                                                                                  \
        tile_t_c_any(BT, rb, kb, dy, n, w, k, dx, ldx, accumulate);                                                    \
    }
TILE_T_C(tile_t_c, GEMM_F32)
TILE_T_C(tile_t_c_f16, GEMM_F16)
TILE_T_C(tile_t_c_bf16, GEMM_BF16)

#ifdef GEMM_X86
/* AVX2: 8 lanes, 2 rows x 4 kk = 8 ymm accumulators; the panel row in 4
 * chunks of 8 (the last panel's chunks past n masked out of dy). */
TARGET_AVX2 static ALWAYS_INLINE void tile_t_avx2_fix(const int bt, const size_t rb, const size_t kb, const float *dy,
                                                       size_t n, const void *w, size_t k, float *dx, size_t ldx,
                                                       bool accumulate)
{
    __m256 acc[TRB_AVX2][TKB_AVX2];
    for (size_t r = 0; r < rb; r++)
        for (size_t q = 0; q < kb; q++)
            acc[r][q] = _mm256_setzero_ps();
    const size_t np = (n + GEMM_NR - 1) / GEMM_NR;
    for (size_t p = 0; p < np; p++) {
        const size_t c0 = p * GEMM_NR, nc = n - c0 < GEMM_NR ? n - c0 : GEMM_NR;
        for (size_t j = 0; j < GEMM_NR && j < nc; j += 8) {
            __m256 y[TRB_AVX2];
            if (nc - j >= 8) {
                for (size_t r = 0; r < rb; r++)
                    y[r] = _mm256_loadu_ps(dy + r * n + c0 + j);
            } else {
                const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(nc - j)), idx);
                for (size_t r = 0; r < rb; r++)
                    y[r] = _mm256_maskload_ps(dy + r * n + c0 + j, mask);
            }
            for (size_t q = 0; q < kb; q++) {
                const __m256 wq = load8_avx2(bt, w, (p * k + q) * GEMM_NR + j);
                for (size_t r = 0; r < rb; r++)
                    acc[r][q] = _mm256_fmadd_ps(y[r], wq, acc[r][q]);
            }
        }
    }
    for (size_t r = 0; r < rb; r++)
        for (size_t q = 0; q < kb; q++) {
            float l[8], s = 0.0f;
            _mm256_storeu_ps(l, acc[r][q]);
            for (size_t e = 0; e < 8; e++)
                s += l[e];
            dx[r * ldx + q] = accumulate ? dx[r * ldx + q] + s : s;
        }
}

TARGET_AVX2 static ALWAYS_INLINE void tile_t_avx2_any(const int bt, size_t rb, size_t kb, const float *dy, size_t n,
                                                       const void *w, size_t k, float *dx, size_t ldx,
                                                       bool accumulate)
{
    switch (rb * 8 + kb) {
#define CASE(R, K)                                                                                                     \
    case R * 8 + K: tile_t_avx2_fix(bt, R, K, dy, n, w, k, dx, ldx, accumulate); break;
        CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4)
#undef CASE
    default: break;
    }
}

#define TILE_T_AVX2(NAME, BT)                                                                                          \
    TARGET_AVX2 static void NAME(size_t rb, size_t kb, const float *dy, size_t n, const void *w, size_t k, float *dx,   \
                                 size_t ldx, bool accumulate)                                                          \
    {                                                                                                                  \
        tile_t_avx2_any(BT, rb, kb, dy, n, w, k, dx, ldx, accumulate);                                                 \
    }
TILE_T_AVX2(tile_t_avx2, GEMM_F32)
TILE_T_AVX2(tile_t_avx2_f16, GEMM_F16)
TILE_T_AVX2(tile_t_avx2_bf16, GEMM_BF16)

/* AVX-512: 16 lanes, 4 rows x 4 kk = 16 zmm accumulators, the panel row as
 * two zmm (masked loads of dy for a last panel narrower than 32). */
TARGET_AVX512 static ALWAYS_INLINE void tile_t_avx512_fix(const int bt, const size_t rb, const size_t kb,
                                                           const float *dy, size_t n, const void *w, size_t k,
                                                           float *dx, size_t ldx, bool accumulate)
{
    __m512 acc[TRB_AVX512][TKB_AVX512];
    for (size_t r = 0; r < rb; r++)
        for (size_t q = 0; q < kb; q++)
            acc[r][q] = _mm512_setzero_ps();
    const size_t np = (n + GEMM_NR - 1) / GEMM_NR;
    for (size_t p = 0; p < np; p++) {
        const size_t c0 = p * GEMM_NR, nc = n - c0 < GEMM_NR ? n - c0 : GEMM_NR;
        __m512 y0[TRB_AVX512], y1[TRB_AVX512];
        if (nc == GEMM_NR) {
            for (size_t r = 0; r < rb; r++) {
                y0[r] = _mm512_loadu_ps(dy + r * n + c0);
                y1[r] = _mm512_loadu_ps(dy + r * n + c0 + 16);
            }
        } else {
            const __mmask16 m0 = nc >= 16 ? 0xFFFF : (__mmask16)((1u << nc) - 1);
            const __mmask16 m1 = nc > 16 ? (__mmask16)((1u << (nc - 16)) - 1) : 0;
            for (size_t r = 0; r < rb; r++) {
                y0[r] = _mm512_maskz_loadu_ps(m0, dy + r * n + c0);
                y1[r] = _mm512_maskz_loadu_ps(m1, dy + r * n + c0 + 16);
            }
        }
        for (size_t q = 0; q < kb; q++) {
            const size_t off = (p * k + q) * GEMM_NR;
            const __m512 w0 = load16_avx512(bt, w, off), w1 = load16_avx512(bt, w, off + 16);
            for (size_t r = 0; r < rb; r++) {
                acc[r][q] = _mm512_fmadd_ps(y0[r], w0, acc[r][q]);
                acc[r][q] = _mm512_fmadd_ps(y1[r], w1, acc[r][q]);
            }
        }
    }
    for (size_t r = 0; r < rb; r++)
        for (size_t q = 0; q < kb; q++) {
            const float s = _mm512_reduce_add_ps(acc[r][q]);
            dx[r * ldx + q] = accumulate ? dx[r * ldx + q] + s : s;
        }
}

TARGET_AVX512 static ALWAYS_INLINE void tile_t_avx512_any(const int bt, size_t rb, size_t kb, const float *dy,
                                                           size_t n, const void *w, size_t k, float *dx, size_t ldx,
                                                           bool accumulate)
{
    switch (rb * 8 + kb) {
#define CASE(R, K)                                                                                                     \
    case R * 8 + K: tile_t_avx512_fix(bt, R, K, dy, n, w, k, dx, ldx, accumulate); break;
        CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4)
        CASE(3, 1) CASE(3, 2) CASE(3, 3) CASE(3, 4) CASE(4, 1) CASE(4, 2) CASE(4, 3) CASE(4, 4)
#undef CASE
    default: break;
    }
}

#define TILE_T_AVX512(NAME, BT)                                                                                        \
    TARGET_AVX512 static void NAME(size_t rb, size_t kb, const float *dy, size_t n, const void *w, size_t k,           \
                                   float *dx, size_t ldx, bool accumulate)                                             \
    {                                                                                                                  \
        tile_t_avx512_any(BT, rb, kb, dy, n, w, k, dx, ldx, accumulate);                                               \
    }
TILE_T_AVX512(tile_t_avx512, GEMM_F32)
TILE_T_AVX512(tile_t_avx512_f16, GEMM_F16)
TILE_T_AVX512(tile_t_avx512_bf16, GEMM_BF16)
#endif

static const struct {
    size_t rb, kb;
    tile_t_fn tile[3]; /* by gemm_dtype of the panels */
} isa_t_table[GEMM_ISA_COUNT] = {
    [GEMM_ISA_C] = {TRB_C, TKB_C, {tile_t_c, tile_t_c_f16, tile_t_c_bf16}},
#ifdef GEMM_X86
    [GEMM_ISA_AVX2] = {TRB_AVX2, TKB_AVX2, {tile_t_avx2, tile_t_avx2_f16, tile_t_avx2_bf16}},
    [GEMM_ISA_AVX512] = {TRB_AVX512, TKB_AVX512, {tile_t_avx512, tile_t_avx512_f16, tile_t_avx512_bf16}},
#else
    [GEMM_ISA_AVX2] = {TRB_C, TKB_C, {NULL, NULL, NULL}},
    [GEMM_ISA_AVX512] = {TRB_C, TKB_C, {NULL, NULL, NULL}},
#endif
};

/* Up to GEMM_T_MAX weights of one call (gemm_run_t_sum). */
#define GEMM_T_MAX 4

typedef struct {
    float *dx;
    const float *dy[GEMM_T_MAX];
    size_t rows, n_w;
    const gemm_weight *w[GEMM_T_MAX];
    bool accumulate;
    size_t rb, kb;
    tile_t_fn tile[GEMM_T_MAX];
} gemm_t_task;

/* Thread tid's share: columns [k*tid/nt, k*(tid+1)/nt) of dx for every row,
 * kb columns at a time; their rows of every panel (kb*NR floats per panel,
 * n*kb in all) stay in L2 while the row blocks pass over them.  The weights
 * one after the other, the first overwriting (unless accumulate), the others
 * adding: per (r, kk) the bits of separate calls in that order. */
static void gemm_t_worker(void *arg, size_t tid, size_t nt)
{
    const gemm_t_task *t = arg;
    const size_t k = t->w[0]->k;
    const size_t k0 = k * tid / nt, k1 = k * (tid + 1) / nt;
    for (size_t i = 0; i < t->n_w; i++) {
        const gemm_weight *gw = t->w[i];
        const size_t n = gw->n;
        const bool acc = t->accumulate || i > 0;
        if (n == 0) { /* an empty sum */
            for (size_t r = 0; r < t->rows && !acc; r++)
                memset(t->dx + r * k + k0, 0, (k1 - k0) * sizeof(float));
            continue;
        }
        if (gw->dtype == GEMM_BF16_PAIRS) {
            /* BF16 weights of --compute bf16: each (r, kk) one F32 sum in
             * column order of the exact BF16 values (portable C: the
             * backward is not what bf16 accelerates) */
            for (size_t kk = k0; kk < k1; kk++)
                for (size_t r = 0; r < t->rows; r++) {
                    const float *y = t->dy[i] + r * n;
                    float s = 0.0f;
                    for (size_t c = 0; c < n; c++)
                        s += y[c] * gemm_bf16_packed_at(gw->data16, k, kk, c);
                    t->dx[r * k + kk] = acc ? t->dx[r * k + kk] + s : s;
                }
            continue;
        }
        for (size_t kk = k0; kk < k1; kk += t->kb) {
            const size_t kb = k1 - kk < t->kb ? k1 - kk : t->kb;
            const void *w = gw->dtype == GEMM_F32 ? (const void *)(gw->data + kk * GEMM_NR)
                                                  : (const void *)(gw->data16 + kk * GEMM_NR);
            for (size_t r = 0; r < t->rows; r += t->rb) {
                const size_t rb = t->rows - r < t->rb ? t->rows - r : t->rb;
                t->tile[i](rb, kb, t->dy[i] + r * n, n, w, k, t->dx + r * k + kk, k, acc);
            }
        }
    }
}

void gemm_run_t_sum(float *dx, const float *const *dy, const gemm_weight *const *w, size_t n_w, size_t rows,
                    bool accumulate)
{
    if (rows == 0 || n_w == 0 || w[0]->k == 0)
        return;
    const gemm_isa isa = gemm_isa_get();
    gemm_t_task t = {.dx = dx, .rows = rows, .accumulate = accumulate, .rb = isa_t_table[isa].rb,
                     .kb = isa_t_table[isa].kb};
    size_t macs = 0;
    for (size_t i = 0; i < n_w; i += GEMM_T_MAX) {
        t.n_w = n_w - i < GEMM_T_MAX ? n_w - i : GEMM_T_MAX;
        macs = 0;
        for (size_t j = 0; j < t.n_w; j++) {
            t.dy[j] = dy[i + j], t.w[j] = w[i + j], t.tile[j] = w[i + j]->dtype == GEMM_BF16_PAIRS ? NULL : isa_t_table[isa].tile[w[i + j]->dtype];
            macs += rows * w[i + j]->k * w[i + j]->n;
        }
        t.accumulate = accumulate || i > 0;
        pool_run(macs < GEMM_MIN_PARALLEL_MACS ? 1 : (w[0]->k + 15) / 16, gemm_t_worker, &t);
    }
}

void gemm_run_t(float *dx, const float *dy, size_t rows, const gemm_weight *w, bool accumulate)
{
    gemm_run_t_sum(dx, &dy, &w, 1, rows, accumulate);
}
