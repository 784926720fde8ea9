/*
 * gemm: out[rows, n] = x[rows, k] @ W[k, n] + bias[n] for the transformer's
 * weight matrices, with W packed once when the model is loaded.
 *
 * Why not cblas_sgemm: a BLAS call packs both operands into its own
 * layout on every call.  The patching engine multiplies 20-400 rows by a
 * weight matrix of up to 768 x 3072 (GPT-2 small) or 1600 x 6400 (xl), so
 * repacking W costs as much as the product itself (measured: OpenBLAS
 * SkylakeX at 28 rows reaches 26% of its 1024-row rate).  Here W is stored
 * as column panels of GEMM_NR floats,
 *     packed[p][kk][j] = W[kk, p*GEMM_NR + j]   (zero where p*NR + j >= n),
 * so the inner kernel streams one panel sequentially and every row block
 * of x reuses it from cache (BLIS's B-panel, kept for the model's lifetime).
 *
 * Every output element is one accumulation in k order (fused multiply-add
 * on AVX2/AVX-512), then + bias: a row's result does not depend on the
 * other rows in the call, on the thread count or on the row blocking, so
 * stacking cells differently (other chunking, other rank counts) gives
 * bitwise-identical values on a given instruction set.
 *
 * Threads: the panels are split among pool_threads() workers (pool.h).
 *
 * gemm_unembed is the one product with an unpacked operand: the
 * vocabulary product with the [V, d] unembedding (tied to the token
 * embedding), done by OpenBLAS on each pool thread's slice of the
 * vocabulary.  OpenBLAS itself runs single-threaded (the CLI sets it): its
 * own workers spin with sched_yield after every call, and beside the pool's
 * workers they took a fifth of a 2-thread sweep's CPU time (perf, demo
 * model).
 */
#ifndef PS_GEMM_H
#define PS_GEMM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define GEMM_NR 32

/* The element type of a packed matrix.  F16 and BF16 panels keep the
 * checkpoint's 2 bytes per weight; the kernels widen each panel row to
 * float in registers (vcvtph2ps; BF16: the 16 bits shifted left by 16),
 * which is exact, and then run the F32 kernel's arithmetic unchanged: the
 * product with 2-byte panels equals bit for bit the F32 product with the
 * widened weights, on every instruction set. */
typedef enum { GEMM_F32 = 0, GEMM_F16, GEMM_BF16, GEMM_BF16_PAIRS } gemm_dtype;
/* GEMM_BF16_PAIRS: `--compute bf16` (gemm_bf16.h): data16 holds the
 * matrix rounded to BF16 in gemm_bf16_pack's layout (k pairs interleaved,
 * k padded to 32), and gemm_run multiplies in BF16 with F32 accumulation
 * (gemm_bf16_run), rounding x to BF16; gemm_run_t reads the BF16 values
 * exactly (F32 arithmetic, portable C). */

/* A packed weight matrix (not owning: data lives in the model's arena). */
typedef struct {
    size_t k, n;
    const float *data;      /* GEMM_F32: [ceil(n / GEMM_NR)][k][GEMM_NR] */
    gemm_dtype dtype;       /* 0 (GEMM_F32) unless set */
    const uint16_t *data16; /* GEMM_F16 / GEMM_BF16: the same layout, 2 bytes per element;
                             * GEMM_BF16_PAIRS: gemm_bf16_pack's layout */
} gemm_weight;

/* Floats of the packed form of a [k, n] matrix. */
size_t gemm_packed_floats(size_t k, size_t n);

/* Pack W ([k, n], row stride ldw >= n) into dst (gemm_packed_floats(k, n)). */
void gemm_pack(float *dst, const float *W, size_t ldw, size_t k, size_t n);

/* Bytes of the packed form of a [k, n] matrix of type dt (GEMM_BF16_PAIRS:
 * 2 x gemm_bf16_packed_elems). */
size_t gemm_packed_bytes(size_t k, size_t n, gemm_dtype dt);

/* gemm_pack and gemm_pack_rows for 2-byte (F16 / BF16) elements, copied
 * as they are (dst: gemm_packed_floats(k, n) uint16_t; padding 0). */
void gemm_pack16(uint16_t *dst, const uint16_t *W, size_t ldw, size_t k, size_t n);
void gemm_pack_rows16(uint16_t *dst, const uint16_t *A, size_t lda, const size_t *rows, size_t k, size_t n);

/* One F16 (dt GEMM_F16) or BF16 (GEMM_BF16) value as float, exactly. */
float gemm_widen(gemm_dtype dt, uint16_t h);

/* Whether w is in gemm_pack's panel layout (GEMM_F32, GEMM_F16, GEMM_BF16),
 * the one gemm_unpack reads; other layouts are refused by its callers. */
bool gemm_is_panels(const gemm_weight *w);

/* The inverse of gemm_pack for a panel-layout w (gemm_is_panels), widened
 * to float: dst[kk * n + c] = W[kk, c], dst [k, n] plain row-major.  For
 * the per-head products (ops_heads_backward, ops_attn_result), which read
 * a head's slice of W that the panels (GEMM_NR columns) need not align
 * with. */
void gemm_unpack(float *dst, const gemm_weight *w);

/* Pack the transpose of an nn.Linear-style matrix A ([n_rows, k], row
 * stride lda, one row per output): W[kk, c] = A[rows[c], kk] for c < n
 * (rows NULL: rows[c] = c), so that x @ W = x @ A[rows]^T.  dst as gemm_pack. */
void gemm_pack_rows(float *dst, const float *A, size_t lda, const size_t *rows, size_t k, size_t n);

typedef enum {
    GEMM_PLAIN, /* out = x W + b */
    GEMM_GELU,    /* out = gelu_new(x W + b), applied per panel while it is in cache */
    GEMM_GELU_ERF /* out = gelu_erf(x W + b) (gemm_gelu_erf), likewise */
} gemm_epilogue;

/* out[rows, w->n] (row stride w->n) = epilogue(x[rows, w->k] @ W + bias);
 * bias may be NULL.  out must not alias x. */
void gemm_run(float *out, const float *x, size_t rows, const gemm_weight *w, const float *bias,
              gemm_epilogue ep);

/* out[rows, V] (row stride V) = x[rows, d] @ U[V, d]^T: the logits.
 * OpenBLAS's sgemm (sgemv for one row) per slice of the vocabulary, one
 * slice per pool thread; slicing the columns does not change any output's
 * k-order, so the values do not depend on the thread count. */
void gemm_unembed(float *out, const float *x, size_t rows, const float *U, size_t V, size_t d);

/* The backward of gemm_run for its input: dx[rows, w->k] (+)= dy[rows, w->n] @ W^T
 * (accumulate: added to dx; otherwise dx is overwritten), read from the
 * packed panels; threaded over the columns of dx, the same bits for any
 * thread count.  dx must not alias dy. */
void gemm_run_t(float *dx, const float *dy, size_t rows, const gemm_weight *w, bool accumulate);

/* dx[rows, k] (+)= sum_i dy[i][rows, w[i]->n] @ W_i^T over n_w weights with
 * the same k: the bits of gemm_run_t for each in order (the first with
 * `accumulate`, the others accumulating) in one pass of the pool's threads
 * (one wake-up and one barrier instead of n_w: the backward of q, k and v). */
void gemm_run_t_sum(float *dx, const float *const *dy, const gemm_weight *const *w, size_t n_w, size_t rows,
                    bool accumulate);

/* gelu_new(v) = 0.5 v (1 + tanh(u)), u = sqrt(2/pi) (v + 0.044715 v^3),
 * computed as v / (1 + exp(-2u)) (the same function: 1 + tanh(u) =
 * 2 / (1 + exp(-2u))) with a vectorizable exp; relative error < 1e-6. */
void gemm_gelu(float *x, size_t n);

/* The exact GELU in place: x = 0.5 x (1 + erf(x / sqrt 2)) (HF's "gelu",
 * GPT-NeoX); element by element, so applying it in the product
 * (GEMM_GELU_ERF) or afterwards gives the same bits. */
void gemm_gelu_erf(float *x, size_t n);

/* The epilogue ep applied in place to x[0 .. n) (nothing for GEMM_PLAIN):
 * what gemm_run's products do to each block of their output. */
void gemm_epilogue_apply(gemm_epilogue ep, float *x, size_t n);

/* out[rows, n] of a product with k = 0 (an empty sum): the bias (or 0) in
 * every row, then the epilogue. */
void gemm_empty_sum(float *out, size_t rows, size_t n, const float *bias, gemm_epilogue ep);

/* Kernel variants: chosen once from the CPU (the widest it supports);
 * tests force each supported one to compare them. */
typedef enum { GEMM_ISA_C, GEMM_ISA_AVX2, GEMM_ISA_AVX512, GEMM_ISA_COUNT } gemm_isa;
bool gemm_isa_supported(gemm_isa isa);
gemm_isa gemm_isa_get(void);
void gemm_isa_set(gemm_isa isa); /* ignored if not supported */
const char *gemm_isa_name(gemm_isa isa);

#endif
