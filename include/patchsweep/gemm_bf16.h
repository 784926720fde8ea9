/*
 * gemm_bf16: out[rows, n] = bf16(x)[rows, k] @ bf16(W)[k, n] + bias[n] with
 * F32 accumulation, on AVX512_BF16 (vdpbf16ps), for the optional BF16
 * arithmetic of issue 21 item 4 (never the default path: gemm.h is).
 *
 * vdpbf16ps multiplies pairs of BF16 values along k and adds both products
 * to an F32 lane, so W is packed as column panels of GEMM_NR columns with
 * the k pairs interleaved:
 *     packed[p][kk/2][j][kk%2] = bf16(W[kk, p*GEMM_NR + j])
 * (zero where kk >= k or p*GEMM_NR + j >= n).  x is rounded to BF16
 * (round to nearest even, vcvtne2ps2bf16) per row block as it is used.
 *
 * As in gemm.h, each output is one accumulation in k order (pair by pair),
 * then + bias: a row's value depends neither on the other rows of the call
 * nor on the thread count.
 */
#ifndef PS_GEMM_BF16_H
#define PS_GEMM_BF16_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

/* true when the CPU (cpuid leaf 7 subleaf 1, EAX bit 5) and the OS
 * (AVX-512 state) support AVX512_BF16.  Test hook: the environment
 * variable PS_CPU_NO_BF16=1 makes it false, to test the refusal on a CPU
 * that has it. */
bool gemm_bf16_supported(void);

/* uint16 elements of a packed [k, n] matrix: ceil(n/GEMM_NR) panels of
 * ceil(k/2) pairs of GEMM_NR columns. */
size_t gemm_bf16_packed_elems(size_t k, size_t n);

/* Pack W ([k, n], row stride ldw, F32) as above, each value rounded to
 * BF16 to nearest even.  Portable C (no AVX512_BF16 needed). */
void gemm_bf16_pack(uint16_t *dst, const float *W, size_t ldw, size_t k, size_t n);

/* f rounded to BF16, to nearest even (NaN stays NaN). */
uint16_t gemm_bf16_round(float f);

/* out[rows, n] (row stride n) = bf16(x)[rows, k] @ W + bias (bias may be
 * NULL), W packed by gemm_bf16_pack; split among the pool's threads.  out
 * must not alias x.  PS_ERR_INVALID (one line naming AVX512_BF16) when
 * !gemm_bf16_supported(); PS_ERR_NOMEM if the rounded copy of x cannot be
 * allocated. */
ps_status gemm_bf16_run(float *out, const float *x, size_t rows, const uint16_t *packed, size_t k, size_t n,
                        const float *bias);

#endif
