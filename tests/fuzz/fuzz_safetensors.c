/*
 * Fuzz target: the safetensors header parser (st_parse on a memory image,
 * what st_open runs on the mmap of model.safetensors).
 *
 * Accepted files must satisfy what the rest of the library relies on: every
 * tensor's bytes lie inside the image after the header, sizes agree with
 * dtype x shape, the tensors tile the data section, names are unique (found
 * by st_find), and float data converts (st_to_f32 on a prefix).
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "fuzz_common.h"
#include "safetensors.h"

#define NAME "fuzz.safetensors"
#define CONVERT_MAX 256  /* elements converted per tensor: enough to touch every code path */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    st_file f;
    ps_status st = st_parse(&f, NAME, data, size);
    fuzz_check_status(st, NAME);
    if (st != PS_OK) {
        FUZZ_REQUIRE(f.n_tensors == 0 && !f.tensors && !f.path, "a failed parse left state behind");
        return 0;
    }
    const size_t data_start = 8 + f.header_bytes;
    FUZZ_REQUIRE(data_start <= size, "header of %zu bytes in a %zu-byte image", f.header_bytes, size);
    size_t total = 0;
    float out[CONVERT_MAX];
    for (size_t i = 0; i < f.n_tensors; i++) {
        const st_tensor *t = &f.tensors[i];
        size_t n_el = 1;
        for (size_t k = 0; k < t->ndim; k++)
            n_el *= t->shape[k];
        FUZZ_REQUIRE(t->ndim <= ST_MAX_DIMS && n_el == t->n_elements, "tensor %zu: shape", i);
        FUZZ_REQUIRE(t->n_bytes == t->n_elements * st_dtype_size(t->dtype), "tensor %zu: bytes", i);
        FUZZ_REQUIRE(t->offset >= data_start && t->offset <= size && t->n_bytes <= size - t->offset,
                     "tensor %zu: [%zu, +%zu) outside the %zu-byte image", i, t->offset, t->n_bytes, size);
        FUZZ_REQUIRE((const uint8_t *)t->data == data + t->offset, "tensor %zu: data pointer", i);
        FUZZ_REQUIRE(st_find(&f, t->name) == t, "tensor %zu: st_find", i);
        total += t->n_bytes;
        size_t n = t->n_elements < CONVERT_MAX ? t->n_elements : CONVERT_MAX;
        ps_status cs = st_to_f32(t->dtype, t->data, n, out);
        bool is_float = t->dtype == ST_F32 || t->dtype == ST_F16 || t->dtype == ST_BF16 || t->dtype == ST_F64;
        FUZZ_REQUIRE((cs == PS_OK) == is_float, "tensor %zu: st_to_f32 on %s", i, st_dtype_name(t->dtype));
    }
    FUZZ_REQUIRE(total == size - data_start, "tensors cover %zu of %zu data bytes", total, size - data_start);
    st_close(&f);
    return 0;
}
