#include "gemm_bf16.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "gemm.h"
#include "pool.h"
#include "safetensors.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define BF16_X86 1
#define TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
#define TARGET_AMX __attribute__((target("avx512f,avx512bw,amx-tile,amx-bf16")))
#define ALWAYS_INLINE __attribute__((always_inline)) inline
#endif

/* Rows of x per row block: two AMX tiles of 16 rows. */
#define BF16_RB 32
/* Rows per AVX512_BF16 tile: 12 rows x 32 columns = 24 zmm accumulators. */
#define BF16_MR 12
/* Panels visited together per row block (their bytes stay in L2 while the
 * row blocks pass over them), at most BF16_GROUP_MAX: their 32 x 32 F32
 * accumulators live in a stack buffer between k passes (32 KiB). */
#define BF16_GROUP_BYTES ((size_t)1536 * 1024)
#define BF16_GROUP_MAX 8
/* Below this many multiply-adds a call runs on one thread (waking the
 * workers would cost more than it saves): gemm.c's 2^22 for AVX512_BF16,
 * four times that for AMX, whose products are about 4x faster per MAC. */
#define BF16_MIN_PARALLEL_MACS ((size_t)1 << 22)
#define BF16_MIN_PARALLEL_MACS_AMX ((size_t)1 << 24)

/* ---- packing ------------------------------------------------------------- */

static size_t k_blocks(size_t k) { return (k + 31) / 32; }

size_t gemm_bf16_packed_elems(size_t k, size_t n)
{
    return (n + GEMM_NR - 1) / GEMM_NR * k_blocks(k) * 32 * GEMM_NR;
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

/* One source element as BF16. */
static inline uint16_t src_bf16(const void *src, gemm_dtype dt, size_t at)
{
    if (dt == GEMM_F32)
        return gemm_bf16_round(((const float *)src)[at]);
    const uint16_t h = ((const uint16_t *)src)[at];
    return dt == GEMM_BF16 ? h : gemm_bf16_round(st_f16_to_f32(h));
}

void gemm_bf16_pack(uint16_t *dst, const void *src, gemm_dtype src_dt, size_t ld, bool linear, const size_t *rows,
                    size_t k, size_t n)
{
    const size_t np = (n + GEMM_NR - 1) / GEMM_NR, kp_n = k_blocks(k) * 16;
    memset(dst, 0, gemm_bf16_packed_elems(k, n) * sizeof *dst); /* padding: k >= k, c >= n */
    for (size_t p = 0; p < np; p++) {
        uint16_t *d = dst + p * kp_n * GEMM_NR * 2;
        const size_t c0 = p * GEMM_NR, nc = n - c0 < GEMM_NR ? n - c0 : GEMM_NR;
        /* the source's contiguous direction innermost: c for Conv1D [k, n],
         * kk for nn.Linear [n, k] */
        if (linear) {
            for (size_t j = 0; j < nc; j++) {
                const size_t row = (rows ? rows[c0 + j] : c0 + j) * ld;
                for (size_t kk = 0; kk < k; kk++)
                    d[((kk / 2) * GEMM_NR + j) * 2 + kk % 2] = src_bf16(src, src_dt, row + kk);
            }
        } else {
            for (size_t kk = 0; kk < k; kk++)
                for (size_t j = 0; j < nc; j++)
                    d[((kk / 2) * GEMM_NR + j) * 2 + kk % 2] = src_bf16(src, src_dt, kk * ld + c0 + j);
        }
    }
}

float gemm_bf16_packed_at(const uint16_t *packed, size_t k, size_t kk, size_t c)
{
    const size_t kp_n = k_blocks(k) * 16;
    return st_bf16_to_f32(packed[(c / GEMM_NR) * kp_n * GEMM_NR * 2 + ((kk / 2) * GEMM_NR + c % GEMM_NR) * 2 + kk % 2]);
}

/* ---- detection ------------------------------------------------------------ */

static bool env_is_1(const char *name)
{
    const char *v = getenv(name);
    return v && strcmp(v, "1") == 0;
}

static bool detected[GEMM_BF16_ISA_COUNT];
static pthread_once_t detect_once = PTHREAD_ONCE_INIT;
/* -1: not forced (gemm_bf16_isa_set); atomic because pool workers read it */
static _Atomic int forced_isa = -1;

#ifdef BF16_X86
/* Linux: the tile data (8 KiB of XSAVE state) must be requested once per
 * process before any tile instruction (arch_prctl(2), x86 AMX doc). */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static bool detect_amx(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return false;
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) /* AMX-BF16, AMX-TILE */
        return false;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) /* OSXSAVE: xgetbv is allowed */
        return false;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3u) != 3u) /* XTILECFG and XTILEDATA enabled by the OS */
        return false;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}
#endif

static void detect(void)
{
    detected[GEMM_BF16_ISA_C] = true;
    if (env_is_1("PS_CPU_NO_BF16"))
        return;
#ifdef BF16_X86
    unsigned a, b, c, d;
    /* libgcc's cpu model checks that the OS saves the AVX-512 state */
    detected[GEMM_BF16_ISA_AVX512] = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                     __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1u);
    detected[GEMM_BF16_ISA_AMX] = detected[GEMM_BF16_ISA_AVX512] && !env_is_1("PS_CPU_NO_AMX") && detect_amx();
#endif
}

bool gemm_bf16_isa_supported(gemm_bf16_isa isa)
{
    pthread_once(&detect_once, detect);
    return isa < GEMM_BF16_ISA_COUNT && detected[isa];
}

gemm_bf16_isa gemm_bf16_isa_get(void)
{
    pthread_once(&detect_once, detect);
    const int f = atomic_load(&forced_isa);
    if (f >= 0)
        return (gemm_bf16_isa)f;
    for (int i = GEMM_BF16_ISA_COUNT - 1; i > 0; i--)
        if (detected[i])
            return (gemm_bf16_isa)i;
    return GEMM_BF16_ISA_C;
}

void gemm_bf16_isa_set(gemm_bf16_isa isa)
{
    if (gemm_bf16_isa_supported(isa))
        atomic_store(&forced_isa, (int)isa);
}

const char *gemm_bf16_isa_name(gemm_bf16_isa isa)
{
    static const char *const names[GEMM_BF16_ISA_COUNT] = {"c", "avx512_bf16", "amx_bf16"};
    return isa < GEMM_BF16_ISA_COUNT ? names[isa] : "?";
}

bool gemm_bf16_supported(void)
{
    return gemm_bf16_isa_supported(GEMM_BF16_ISA_AVX512) || gemm_bf16_isa_supported(GEMM_BF16_ISA_AMX);
}

/* ---- kernels -----------------------------------------------------------------
 * A pass: a row block of `rb` <= 32 rows, its k columns [kc0, kc0 + KC)
 * rounded into `a` ([32][GEMM_BF16_KC] BF16; rows rb.. up to a multiple of
 * 16 and columns past k zero), times the panels of a group; c[g] ([32][32] F32) holds panel g's
 * accumulators between passes:
 *     c[g][r][j] (first pass: 0) += sum over kk in the pass of a[r][kk] W[kc0 + kk, (p0+g)*32 + j]
 * in k blocks of 32.  `kb` k blocks in the pass; `first`: start from 0. */

typedef struct {
    const uint16_t *a;      /* [32][GEMM_BF16_KC] */
    const uint16_t *panels; /* the group's first panel at k block kb0 */
    size_t panel_elems;     /* uint16 per panel */
    size_t kb;              /* k blocks in this pass */
    size_t rb;              /* valid rows (<= 32) */
    size_t ng;              /* panels in the group */
    bool first;
    float (*c)[BF16_RB][GEMM_NR];
} bf16_pass;

/* Portable reference: each k pair as a0*b0 + a1*b1 in float, added in order. */
static void pass_c(const bf16_pass *s)
{
    for (size_t g = 0; g < s->ng; g++) {
        const uint16_t *b = s->panels + g * s->panel_elems;
        for (size_t r = 0; r < s->rb; r++)
            for (size_t j = 0; j < GEMM_NR; j++) {
                float acc = s->first ? 0.0f : s->c[g][r][j];
                for (size_t kp = 0; kp < s->kb * 16; kp++) {
                    const uint16_t *ap = s->a + r * GEMM_BF16_KC + 2 * kp, *bp = b + (kp * GEMM_NR + j) * 2;
                    acc += st_bf16_to_f32(ap[0]) * st_bf16_to_f32(bp[0]) + st_bf16_to_f32(ap[1]) * st_bf16_to_f32(bp[1]);
                }
                s->c[g][r][j] = acc;
            }
    }
}

#ifdef BF16_X86
/* AVX512_BF16: mr rows (a: pairs as 32-bit words, row stride KC/2) x one
 * panel (b), c[r][j] += sum_kp (a[r][2kp] b[2kp][j] + a[r][2kp+1] b[2kp+1][j]). */
TARGET_BF16 static ALWAYS_INLINE void tile_avx512(const size_t mr, const uint32_t *a, const uint16_t *b, size_t kp_n,
                                                   float (*c)[GEMM_NR], bool first)
{
    __m512 c0[BF16_MR], c1[BF16_MR];
    for (size_t r = 0; r < mr; r++) {
        c0[r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c[r]);
        c1[r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c[r] + 16);
    }
    for (size_t kp = 0; kp < kp_n; kp++) {
        const __m512i b0 = _mm512_loadu_si512(b + kp * GEMM_NR * 2);
        const __m512i b1 = _mm512_loadu_si512(b + kp * GEMM_NR * 2 + 32);
        for (size_t r = 0; r < mr; r++) {
            const __m512i av = _mm512_set1_epi32((int)a[r * (GEMM_BF16_KC / 2) + kp]);
            c0[r] = _mm512_dpbf16_ps(c0[r], (__m512bh)av, (__m512bh)b0);
            c1[r] = _mm512_dpbf16_ps(c1[r], (__m512bh)av, (__m512bh)b1);
        }
    }
    for (size_t r = 0; r < mr; r++) {
        _mm512_storeu_ps(c[r], c0[r]);
        _mm512_storeu_ps(c[r] + 16, c1[r]);
    }
}

TARGET_BF16 static void pass_avx512(const bf16_pass *s)
{
    const uint32_t *a = (const uint32_t *)(const void *)s->a;
    for (size_t g = 0; g < s->ng; g++)
        for (size_t i = 0; i < s->rb; i += BF16_MR) {
            const size_t mr = s->rb - i < BF16_MR ? s->rb - i : BF16_MR;
            const uint32_t *ai = a + i * (GEMM_BF16_KC / 2);
            const uint16_t *b = s->panels + g * s->panel_elems;
            float(*c)[GEMM_NR] = s->c[g] + i;
            switch (mr) {
#define CASE(R)                                                                                                        \
    case R: tile_avx512(R, ai, b, s->kb * 16, c, s->first); break;
                CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
#undef CASE
            default: break;
            }
        }
}

/* AMX-BF16: tiles 0-3 are C (rows 0-15 | 16-31) x (columns 0-15 | 16-31),
 * 4-5 A (rows 0-15, 16-31; 16 rows x 32 BF16 of one k block, stride
 * KC*2 bytes), 6-7 B (columns 0-15, 16-31: 16 k pairs x 16 columns x 2,
 * stride 128 bytes in the panel).  tdpbf16ps: C[m][n] += sum over the 16
 * pairs of A[m][2p] B[p][2n] + A[m][2p+1] B[p][2n+1] in F32.  Rows 16-31
 * are skipped when rb <= 16.  Tile configuration: amx_configure. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_tilecfg;

/* Palette 1, tiles 0-7 all 16 rows x 64 bytes.  A static object: gcc 12
 * dropped the stores to a local one before ldtilecfg (it does not see the
 * instruction read them). */
static const _Alignas(64) amx_tilecfg amx_cfg = {
    .palette = 1,
    .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {16, 16, 16, 16, 16, 16, 16, 16},
};

TARGET_AMX static void amx_configure(void) { _tile_loadconfig(&amx_cfg); }

TARGET_AMX static void amx_release(void) { _tile_release(); }

TARGET_AMX static void pass_amx(const bf16_pass *s)
{
    const size_t sa = GEMM_BF16_KC * sizeof(uint16_t), sb = GEMM_NR * 2 * sizeof(uint16_t), sc = GEMM_NR * sizeof(float);
    for (size_t g = 0; g < s->ng; g++) {
        const uint16_t *b = s->panels + g * s->panel_elems;
        float(*c)[GEMM_NR] = s->c[g];
        if (s->first) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
        } else {
            _tile_loadd(0, c[0], sc);
            _tile_loadd(1, c[0] + 16, sc);
            _tile_loadd(2, c[16], sc);
            _tile_loadd(3, c[16] + 16, sc);
        }
        if (s->rb > 16) {
            for (size_t q = 0; q < s->kb; q++) {
                _tile_loadd(4, s->a + q * 32, sa);
                _tile_loadd(5, s->a + 16 * GEMM_BF16_KC + q * 32, sa);
                _tile_loadd(6, b + q * 16 * GEMM_NR * 2, sb);
                _tile_loadd(7, b + q * 16 * GEMM_NR * 2 + 32, sb);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
        } else {
            for (size_t q = 0; q < s->kb; q++) {
                _tile_loadd(4, s->a + q * 32, sa);
                _tile_loadd(6, b + q * 16 * GEMM_NR * 2, sb);
                _tile_loadd(7, b + q * 16 * GEMM_NR * 2 + 32, sb);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
            }
        }
        _tile_stored(0, c[0], sc);
        _tile_stored(1, c[0] + 16, sc);
        if (s->rb > 16) {
            _tile_stored(2, c[16], sc);
            _tile_stored(3, c[16] + 16, sc);
        }
    }
}

/* Round rows [0, rb) x columns [0, kc) of x (row stride k) to BF16 into
 * a[32][KC], zero elsewhere up to kpad columns (and rows up to a multiple of
 * 16): 16 at a
 * time, the same integer operations as gemm_bf16_round (so the same bits,
 * denormals and NaNs included; vcvtneps2bf16 would flush denormals). */
TARGET_BF16 static void round_rows_avx512(uint16_t *a, const float *x, size_t k, size_t rb, size_t kc, size_t kpad)
{
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), quiet = _mm512_set1_epi32(0x40);
    /* rows past rb up to the AMX tile's 16 read as zeros (their outputs are
     * never stored; zero keeps them defined) */
    const size_t r_end = (rb + 15) / 16 * 16;
    for (size_t r = 0; r < r_end; r++) {
        uint16_t *d = a + r * GEMM_BF16_KC;
        size_t t = 0;
        if (r < rb)
            for (; t < kc; t += 16) {
                const __mmask16 m = kc - t >= 16 ? 0xFFFF : (__mmask16)((1u << (kc - t)) - 1);
                const __m512i u = _mm512_maskz_loadu_epi32(m, x + r * k + t);
                const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs_mask), inf);
                const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
                __m512i v = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, lsb)), 16);
                v = _mm512_mask_mov_epi32(v, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), quiet));
                /* masked-off lanes are 0 (zero-masked load): the padding */
                _mm256_storeu_si256((__m256i *)(d + t), _mm512_cvtepi32_epi16(v));
            }
        for (; t < kpad; t++)
            d[t] = 0;
    }
}
#endif

static void round_rows_c(uint16_t *a, const float *x, size_t k, size_t rb, size_t kc, size_t kpad)
{
    /* rows past rb up to the AMX tile's 16 read as zeros (their outputs are
     * never stored; zero keeps them defined) */
    const size_t r_end = (rb + 15) / 16 * 16;
    for (size_t r = 0; r < r_end; r++) {
        uint16_t *d = a + r * GEMM_BF16_KC;
        size_t t = 0;
        if (r < rb)
            for (; t < kc; t++)
                d[t] = gemm_bf16_round(x[r * k + t]);
        for (; t < kpad; t++)
            d[t] = 0;
    }
}

/* ---- driver -------------------------------------------------------------------- */

typedef struct {
    float *out;
    const float *x;
    size_t rows, k, n;
    const uint16_t *packed;
    const float *bias;
    gemm_epilogue ep;
    gemm_bf16_isa isa;
} bf16_task;

/* Thread tid's share: panels [np*tid/nt, np*(tid+1)/nt) for every row
 * (gemm.c's split), a group of panels at a time; per group and row block
 * of 32 rows, the k passes of GEMM_BF16_KC columns, then bias and the
 * epilogue.  Every output is the same sequence of instructions whatever
 * the split: the same bits for any thread count. */
static void bf16_worker(void *arg, size_t tid, size_t nt)
{
    const bf16_task *t = arg;
    const size_t np = (t->n + GEMM_NR - 1) / GEMM_NR, kbn = k_blocks(t->k), panel_elems = kbn * 32 * GEMM_NR;
    const size_t p0 = np * tid / nt, p1 = np * (tid + 1) / nt;
    if (p0 >= p1)
        return;
    size_t group = BF16_GROUP_BYTES / (panel_elems * sizeof(uint16_t));
    group = group < 1 ? 1 : group > BF16_GROUP_MAX ? BF16_GROUP_MAX : group;
    _Alignas(64) uint16_t a[BF16_RB * GEMM_BF16_KC];
    _Alignas(64) float c[BF16_GROUP_MAX][BF16_RB][GEMM_NR];
    void (*pass)(const bf16_pass *) = pass_c;
    void (*round_rows)(uint16_t *, const float *, size_t, size_t, size_t, size_t) = round_rows_c;
#ifdef BF16_X86
    if (t->isa != GEMM_BF16_ISA_C)
        round_rows = round_rows_avx512;
    if (t->isa == GEMM_BF16_ISA_AVX512)
        pass = pass_avx512;
    if (t->isa == GEMM_BF16_ISA_AMX) {
        amx_configure();
        pass = pass_amx;
    }
#endif
    for (size_t pg = p0; pg < p1; pg += group) {
        const size_t pe = pg + group < p1 ? pg + group : p1;
        for (size_t i = 0; i < t->rows; i += BF16_RB) {
            const size_t rb = t->rows - i < BF16_RB ? t->rows - i : BF16_RB;
            for (size_t kc0 = 0; kc0 < t->k; kc0 += GEMM_BF16_KC) {
                const size_t kc = t->k - kc0 < GEMM_BF16_KC ? t->k - kc0 : GEMM_BF16_KC, kb = k_blocks(kc);
                round_rows(a, t->x + i * t->k + kc0, t->k, rb, kc, kb * 32);
                const bf16_pass s = {a, t->packed + pg * panel_elems + kc0 / 32 * 32 * GEMM_NR, panel_elems, kb, rb,
                                     pe - pg, kc0 == 0, c};
                pass(&s);
            }
            for (size_t p = pg; p < pe; p++) {
                const size_t c0 = p * GEMM_NR, nc = t->n - c0 < GEMM_NR ? t->n - c0 : GEMM_NR;
                for (size_t r = 0; r < rb; r++) {
                    float *o = t->out + (i + r) * t->n + c0;
                    for (size_t j = 0; j < nc; j++)
                        o[j] = c[p - pg][r][j] + (t->bias ? t->bias[c0 + j] : 0.0f);
                }
            }
            if (t->ep != GEMM_PLAIN) {
                const size_t c0 = pg * GEMM_NR, c1 = pe * GEMM_NR < t->n ? pe * GEMM_NR : t->n;
                for (size_t r = 0; r < rb; r++)
                    gemm_epilogue_apply(t->ep, t->out + (i + r) * t->n + c0, c1 - c0);
            }
        }
    }
#ifdef BF16_X86
    if (t->isa == GEMM_BF16_ISA_AMX)
        amx_release();
#endif
}

void gemm_bf16_run(float *out, const float *x, size_t rows, const uint16_t *packed, size_t k, size_t n,
                   const float *bias, gemm_epilogue ep)
{
    if (rows == 0 || n == 0)
        return;
    if (k == 0) {
        gemm_empty_sum(out, rows, n, bias, ep);
        return;
    }
    bf16_task t = {out, x, rows, k, n, packed, bias, ep, gemm_bf16_isa_get()};
    const size_t np = (n + GEMM_NR - 1) / GEMM_NR;
    const bool small = rows * k * n < (t.isa == GEMM_BF16_ISA_AMX ? BF16_MIN_PARALLEL_MACS_AMX : BF16_MIN_PARALLEL_MACS);
    pool_run(small ? 1 : np, bf16_worker, &t);
}
