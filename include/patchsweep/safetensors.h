/*
 * safetensors: parse and validate a .safetensors file (untrusted input) and
 * expose its tensors straight from a read-only mmap.
 *
 * File layout (https://huggingface.co/docs/safetensors):
 *   [u64 little-endian N][N bytes of UTF-8 JSON header][data]
 *   header = { "NAME": {"dtype": "F32", "shape": [d0, d1, ...],
 *                       "data_offsets": [begin, end]}, ...,
 *              "__metadata__": {"key": "string", ...} (optional) }
 *   offsets are relative to the start of the data section.
 *
 * Validation, in the spirit of ggml's gguf.cpp (every check is an error
 * naming the file and the tensor):
 *   - N <= ST_MAX_HEADER_BYTES and 8 + N <= file size; at most
 *     ST_MAX_HEADER_VALUES JSON values and keys;
 *   - the header is valid UTF-8 JSON, an object of objects, with the exact
 *     key types above; nesting deeper than the format needs is refused;
 *   - known dtype; 0 <= ndim <= ST_MAX_DIMS; every dim a non-negative integer;
 *   - bytes = product(shape) * dtype size, computed with overflow checks,
 *     equals end - begin;
 *   - begin <= end, and sorted by begin the tensors tile the data section
 *     exactly: no overlap, no gap, the last one ends at the end of the file;
 *   - no duplicate names (jansson keeps the last duplicate silently, so the
 *     parser checks with JSON_REJECT_DUPLICATES).
 */
#ifndef PS_SAFETENSORS_H
#define PS_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

/* HF's own reader refuses headers over 100 MB; we do the same.  jansson
 * spends 30-110 bytes per JSON value, so the values are capped too (a
 * tensor entry counts about 10 plus its dimensions; GPT-2 XL has 580): at most
 * about 1 GiB for the parsed header.  Over either: PS_ERR_NOMEM. */
#define ST_MAX_HEADER_BYTES ((size_t)100 * 1000 * 1000)
#define ST_MAX_HEADER_VALUES ((size_t)8 << 20)
#define ST_MAX_DIMS 8

typedef enum {
    ST_BOOL, ST_U8, ST_I8, ST_F8_E5M2, ST_F8_E4M3, ST_I16, ST_U16, ST_F16, ST_BF16,
    ST_I32, ST_U32, ST_F32, ST_F64, ST_I64, ST_U64,
    ST_DTYPE_COUNT
} st_dtype;

typedef struct {
    char *name;              /* owned */
    st_dtype dtype;
    size_t ndim;
    size_t shape[ST_MAX_DIMS];
    size_t n_elements;       /* product(shape); 1 for a scalar */
    size_t offset;           /* byte offset of the data from the start of the file */
    size_t n_bytes;
    const void *data;        /* points into the mmap; alignment is whatever the file gives */
} st_tensor;

typedef struct {
    char *path;              /* owned copy */
    void *map;               /* read-only mmap of the whole file */
    size_t map_size;
    size_t n_tensors;
    st_tensor *tensors;      /* owned, in header order */
    size_t header_bytes;     /* N */
} st_file;

/* Open, mmap and validate `path`. On error *f is left empty (st_close is safe). */
ps_status st_open(st_file *f, const char *path);

/* Validate an in-memory image (used by st_open and by the fuzz target). The
 * tensors' data pointers point into `buf`, which must outlive *f. */
ps_status st_parse(st_file *f, const char *name_for_errors, const void *buf, size_t size);

/* The tensor called `name`, or NULL. */
const st_tensor *st_find(const st_file *f, const char *name);

void st_close(st_file *f);

const char *st_dtype_name(st_dtype t);
size_t st_dtype_size(st_dtype t);

/* Convert n elements of F32/F16/BF16/F64 data (any alignment) to float32.
 * Returns PS_ERR_INVALID for other dtypes. */
ps_status st_to_f32(st_dtype t, const void *src, size_t n, float *dst);

/* IEEE half / bfloat16 helpers (round to nearest even), also used by writers. */
float st_f16_to_f32(uint16_t h);
float st_bf16_to_f32(uint16_t h);

#endif
