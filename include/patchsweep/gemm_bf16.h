/*
 * gemm_bf16: out[rows, n] = ep(bf16(x)[rows, k] @ bf16(W)[k, n] + bias[n])
 * with F32 accumulation, for the optional BF16 arithmetic (`--compute
 * bf16`, issue 21 item 4; never the default path: gemm.h is).  Kernels:
 * AMX-BF16 (tdpbf16ps on 16x16 F32 tiles) when the CPU and the OS allow
 * it, else AVX512_BF16 (vdpbf16ps), else portable C (a correct but slow
 * reference; the commands refuse --compute bf16 without one of the two).
 *
 * Both instructions multiply pairs of BF16 values along k and add both
 * products to an F32 accumulator, so W is packed as column panels of
 * GEMM_NR = 32 columns with the k pairs interleaved ("VNNI" layout), k
 * padded with zeros to a multiple of 32 (one AMX tile's depth):
 *     packed[p][kk/2][j][kk%2] = bf16(W[kk, p*32 + j]),  kk < KP = ceil(k/32)*32
 * (zero where kk >= k or p*32 + j >= n).  A row of a panel (one k pair,
 * 32 columns) is 128 bytes; an AMX B tile is 16 such pairs x 16 columns,
 * read with a 128-byte stride, so AMX and AVX512_BF16 share the layout.
 *
 * x is rounded to BF16 (round to nearest even, gemm_bf16_round) by each
 * worker, 32 rows by at most GEMM_BF16_KC columns at a time, into a buffer
 * on its stack (no allocation: gemm_run cannot fail).  Each output is one
 * accumulation over the k blocks of 32 in order (the AMX or AVX512_BF16
 * instruction's own order inside a block), then + bias: a row's value
 * depends neither on the other rows of the call nor on the thread count.
 * AMX and AVX512_BF16 give slightly different bits (their internal orders
 * differ; both within F32 accumulation error of the exact product of the
 * rounded operands).
 */
#ifndef PS_GEMM_BF16_H
#define PS_GEMM_BF16_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gemm.h"

/* Columns of x rounded per pass (a multiple of 32): 32 rows x 1024 BF16 =
 * 64 KiB of stack per worker. */
#define GEMM_BF16_KC 1024

typedef enum {
    GEMM_BF16_ISA_C = 0, /* portable reference, always available, slow */
    GEMM_BF16_ISA_AVX512, /* AVX512_BF16: vdpbf16ps, 12 rows x 32 columns per tile */
    GEMM_BF16_ISA_AMX,    /* AMX-BF16: tdpbf16ps, 32 rows x 32 columns (2 x 2 C tiles) */
    GEMM_BF16_ISA_COUNT
} gemm_bf16_isa;

/* Whether the CPU and OS can run `isa`.  AVX512_BF16: CPUID.(7,1):EAX[5]
 * with the AVX-512 state saved by the OS.  AMX: CPUID.(7,0):EDX[22,24]
 * (AMX-BF16, AMX-TILE), XCR0 bits 17-18, and Linux's permission for the
 * tile data (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)), asked
 * once per process.  Detected once (pthread_once).  Test hooks: the
 * environment variable PS_CPU_NO_BF16=1 makes both false (to test the
 * refusal), PS_CPU_NO_AMX=1 makes AMX false. */
bool gemm_bf16_isa_supported(gemm_bf16_isa isa);

/* The kernel gemm_bf16_run uses: the fastest supported one, unless forced
 * by gemm_bf16_isa_set (tests, bench; not while products run). */
gemm_bf16_isa gemm_bf16_isa_get(void);
void gemm_bf16_isa_set(gemm_bf16_isa isa); /* ignored if not supported */
const char *gemm_bf16_isa_name(gemm_bf16_isa isa);

/* true when AMX-BF16 or AVX512_BF16 is supported: what --compute bf16
 * needs (the C reference is far slower than the F32 path). */
bool gemm_bf16_supported(void);

/* uint16 elements of a packed [k, n] matrix: ceil(n/32) panels of
 * ceil(k/32)*16 pairs of 32 columns. */
size_t gemm_bf16_packed_elems(size_t k, size_t n);

/* f rounded to BF16, to nearest even (NaN stays NaN). */
uint16_t gemm_bf16_round(float f);

/* Pack W[kk, c] (kk < k, c < n), each value rounded to BF16 (exact from a
 * BF16 source), into dst (gemm_bf16_packed_elems(k, n)) as above.  The
 * source has element type src_dt (GEMM_F32: float, GEMM_F16 / GEMM_BF16:
 * uint16_t) and layout
 *     linear false: W[kk, c] = src[kk*ld + c]              (Conv1D [k, n])
 *     linear true:  W[kk, c] = src[(rows ? rows[c] : c)*ld + kk]  (nn.Linear [n, k]). */
void gemm_bf16_pack(uint16_t *dst, const void *src, gemm_dtype src_dt, size_t ld, bool linear, const size_t *rows,
                    size_t k, size_t n);

/* W[kk, c] as float from a packed matrix (exact; the backward reads it). */
float gemm_bf16_packed_at(const uint16_t *packed, size_t k, size_t kk, size_t c);

/* out[rows, n] (row stride n) = ep(bf16(x)[rows, k] @ W + bias) (bias may be
 * NULL), W packed by gemm_bf16_pack; split among the pool's threads by
 * panels (gemm.c's scheme).  out must not alias x. */
void gemm_bf16_run(float *out, const float *x, size_t rows, const uint16_t *packed, size_t k, size_t n,
                   const float *bias, gemm_epilogue ep);

#endif
