/*
 * safetensors: validating reader (see safetensors.h for the checks).
 *
 * The file is untrusted: every size read from it is bounded before it is
 * used in arithmetic, and every product is computed with an overflow check.
 */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "jsonutil.h"

/* The format needs 3 levels: root object > tensor object > shape array (or
 * root > "__metadata__" object).  Anything deeper is refused by a linear scan
 * before jansson's recursive parser sees it (jansson's own limit is 2048). */
#define ST_MAX_JSON_DEPTH 3

static const struct {
    const char *name;
    size_t size;
} dtype_info[ST_DTYPE_COUNT] = {
    [ST_BOOL] = {"BOOL", 1},   [ST_U8] = {"U8", 1},       [ST_I8] = {"I8", 1},
    [ST_F8_E5M2] = {"F8_E5M2", 1}, [ST_F8_E4M3] = {"F8_E4M3", 1},
    [ST_I16] = {"I16", 2},     [ST_U16] = {"U16", 2},     [ST_F16] = {"F16", 2},
    [ST_BF16] = {"BF16", 2},   [ST_I32] = {"I32", 4},     [ST_U32] = {"U32", 4},
    [ST_F32] = {"F32", 4},     [ST_F64] = {"F64", 8},     [ST_I64] = {"I64", 8},
    [ST_U64] = {"U64", 8},
};

const char *st_dtype_name(st_dtype t)
{
    return ((unsigned)t < ST_DTYPE_COUNT) ? dtype_info[t].name : "?";
}

size_t st_dtype_size(st_dtype t)
{
    return ((unsigned)t < ST_DTYPE_COUNT) ? dtype_info[t].size : 0;
}

static bool dtype_from_name(const char *s, st_dtype *t)
{
    for (int i = 0; i < ST_DTYPE_COUNT; i++)
        if (strcmp(s, dtype_info[i].name) == 0) {
            *t = (st_dtype)i;
            return true;
        }
    return false;
}

/* ---- element conversion -------------------------------------------------- */

float st_bf16_to_f32(uint16_t h)
{
    /* bfloat16 is the top half of a float32: same sign, 8-bit exponent and
     * bias, so widening is exact for every class (subnormal, inf, nan). */
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

float st_f16_to_f32(uint16_t h)
{
    /* IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.  Every
     * half is exactly representable as a float, so no rounding is involved. */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        /* inf (mant 0) or nan: keep the payload, shifted to float's 23 bits. */
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp - 15 + 127) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {
        /* Subnormal half: value = mant * 2^-24.  Normalise: shift the mantissa
         * until its leading 1 reaches bit 10; each shift lowers the exponent.
         * The result is a normal float (smallest half subnormal 2^-24 >> 2^-126). */
        int e = -14;
        while (!(mant & 0x400u)) {
            mant <<= 1;
            e--;
        }
        mant &= 0x3ffu;
        bits = sign | ((uint32_t)(e + 127) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Little-endian loads from bytes: safetensors data is little-endian and may
 * sit at any alignment inside the mmap. */
static inline uint16_t load_le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

static inline uint32_t load_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t load_le64(const uint8_t *p)
{
    return (uint64_t)load_le32(p) | (uint64_t)load_le32(p + 4) << 32;
}

ps_status st_to_f32(st_dtype t, const void *src, size_t n, float *dst)
{
    const uint8_t *p = src;
    switch (t) {
    case ST_F32:
        for (size_t i = 0; i < n; i++) {
            uint32_t b = load_le32(p + 4 * i);
            memcpy(&dst[i], &b, sizeof b);
        }
        return PS_OK;
    case ST_F16:
        for (size_t i = 0; i < n; i++)
            dst[i] = st_f16_to_f32(load_le16(p + 2 * i));
        return PS_OK;
    case ST_BF16:
        for (size_t i = 0; i < n; i++)
            dst[i] = st_bf16_to_f32(load_le16(p + 2 * i));
        return PS_OK;
    case ST_F64:
        for (size_t i = 0; i < n; i++) {
            uint64_t b = load_le64(p + 8 * i);
            double d;
            memcpy(&d, &b, sizeof d);
            dst[i] = (float)d;
        }
        return PS_OK;
    default:
        return err_set(PS_ERR_INVALID, "cannot convert %s data to F32 (only F32, F16, BF16, F64)",
                       st_dtype_name(t));
    }
}

/* ---- header parsing ------------------------------------------------------ */

/* Refuse nesting deeper than the format needs, and more JSON values than
 * ST_MAX_HEADER_VALUES, before jansson allocates for them. */
static ps_status check_json_shape(const char *name, const char *s, size_t n)
{
    size_t values, at;
    switch (jsonutil_scan_shape(s, n, ST_MAX_JSON_DEPTH, ST_MAX_HEADER_VALUES, &values, &at)) {
    case JSONUTIL_SHAPE_TOO_DEEP:
        return err_set(PS_ERR_FORMAT, "%s: header JSON nests deeper than %d levels at header byte %zu "
                       "(the format needs %d)", name, ST_MAX_JSON_DEPTH, at, ST_MAX_JSON_DEPTH);
    case JSONUTIL_SHAPE_TOO_MANY:
        return err_set(PS_ERR_NOMEM, "%s: header JSON holds more than %zu values and keys (at header byte %zu), "
                       "over the limit", name, ST_MAX_HEADER_VALUES, at);
    case JSONUTIL_SHAPE_OK: break;
    }
    return PS_OK;
}

static ps_status parse_metadata(const char *name, json_t *meta)
{
    if (!json_is_object(meta))
        return err_set(PS_ERR_FORMAT, "%s: \"__metadata__\" is %s, expected an object of strings",
                       name, jsonutil_kind(meta));
    const char *k;
    json_t *v;
    json_object_foreach(meta, k, v) {
        if (!json_is_string(v))
            return err_set(PS_ERR_FORMAT, "%s: \"__metadata__\" key '%s' is %s, expected a string",
                           name, k, jsonutil_kind(v));
    }
    return PS_OK;
}

/* Non-negative integer element `i` of `arr` as size_t. */
static ps_status array_size_at(const char *name, const char *tname, const char *what,
                               const json_t *arr, size_t i, size_t *out)
{
    const json_t *v = json_array_get(arr, i);
    if (!json_is_integer(v))
        return err_set(PS_ERR_FORMAT, "%s: tensor '%s': %s[%zu] is %s, expected a non-negative integer",
                       name, tname, what, i, jsonutil_kind(v));
    json_int_t x = json_integer_value(v);
    if (x < 0)
        return err_set(PS_ERR_FORMAT, "%s: tensor '%s': %s[%zu] = %lld is negative",
                       name, tname, what, i, (long long)x);
    if ((unsigned long long)x > SIZE_MAX)
        return err_set(PS_ERR_FORMAT, "%s: tensor '%s': %s[%zu] = %lld does not fit in size_t",
                       name, tname, what, i, (long long)x);
    *out = (size_t)x;
    return PS_OK;
}

/* "[2, 3]" into buf (for messages). */
static const char *format_shape(char *buf, size_t cap, const size_t *shape, size_t ndim)
{
    size_t k = 0;
    k += (size_t)snprintf(buf, cap, "[");
    for (size_t i = 0; i < ndim && k < cap; i++)
        k += (size_t)snprintf(buf + k, cap - k, "%s%zu", i ? ", " : "", shape[i]);
    if (k < cap)
        snprintf(buf + k, cap - k, "]");
    return buf;
}

/* Fill `t` from one header entry; `data_size` bounds the offsets and
 * `data_start` (8 + N) turns them into file offsets. */
static ps_status parse_tensor(const char *name, const char *tname, json_t *obj,
                              const uint8_t *buf, size_t data_start, size_t data_size, st_tensor *t)
{
    if (!json_is_object(obj))
        return err_set(PS_ERR_FORMAT, "%s: tensor '%s' is %s, expected an object", name, tname,
                       jsonutil_kind(obj));
    /* Exactly the three keys: an unknown key means a format we do not know,
     * so it is refused rather than ignored. */
    const char *k;
    json_t *v;
    json_object_foreach(obj, k, v) {
        if (strcmp(k, "dtype") != 0 && strcmp(k, "shape") != 0 && strcmp(k, "data_offsets") != 0)
            return err_set(PS_ERR_FORMAT, "%s: tensor '%s': unexpected key '%s'", name, tname, k);
    }
    const json_t *jd = json_object_get(obj, "dtype");
    const json_t *js = json_object_get(obj, "shape");
    const json_t *jo = json_object_get(obj, "data_offsets");
    if (!jd || !js || !jo)
        return err_set(PS_ERR_FORMAT, "%s: tensor '%s': missing key '%s'", name, tname,
                       !jd ? "dtype" : !js ? "shape" : "data_offsets");

    if (!json_is_string(jd))
        return err_set(PS_ERR_FORMAT, "%s: tensor '%s': dtype is %s, expected a string", name,
                       tname, jsonutil_kind(jd));
    if (!dtype_from_name(json_string_value(jd), &t->dtype))
        return err_set(PS_ERR_FORMAT, "%s: tensor '%s': unknown dtype '%s'", name, tname,
                       json_string_value(jd));

    if (!json_is_array(js))
        return err_set(PS_ERR_FORMAT, "%s: tensor '%s': shape is %s, expected an array", name,
                       tname, jsonutil_kind(js));
    size_t ndim = json_array_size(js);
    if (ndim > ST_MAX_DIMS)
        return err_set(PS_ERR_FORMAT, "%s: tensor '%s': shape has %zu dimensions, over the limit of %d",
                       name, tname, ndim, ST_MAX_DIMS);
    t->ndim = ndim;
    bool has_zero = false;
    for (size_t i = 0; i < ndim; i++) {
        ps_status st = array_size_at(name, tname, "shape", js, i, &t->shape[i]);
        if (st != PS_OK)
            return st;
        has_zero |= t->shape[i] == 0;
    }
    /* n_elements = prod(shape), 1 for a scalar; a zero dimension makes it 0
     * whatever the other dimensions are, so only a product without zeros can
     * overflow. */
    size_t n_el = has_zero ? 0 : 1;
    bool overflow = false;
    for (size_t i = 0; i < ndim && !has_zero && !overflow; i++) {
        if (n_el > SIZE_MAX / t->shape[i])
            overflow = true;
        else
            n_el *= t->shape[i];
    }
    char sbuf[160];
    size_t esz = st_dtype_size(t->dtype);
    if (overflow || n_el > SIZE_MAX / esz)
        return err_set(PS_ERR_FORMAT, "%s: tensor '%s': %s %s has more bytes than fit in size_t",
                       name, tname, st_dtype_name(t->dtype),
                       format_shape(sbuf, sizeof sbuf, t->shape, ndim));
    t->n_elements = n_el;
    t->n_bytes = n_el * esz;

    if (!json_is_array(jo) || json_array_size(jo) != 2)
        return err_set(PS_ERR_FORMAT, "%s: tensor '%s': data_offsets must be an array [begin, end]",
                       name, tname);
    size_t begin = 0, end = 0;
    ps_status st = array_size_at(name, tname, "data_offsets", jo, 0, &begin);
    if (st == PS_OK)
        st = array_size_at(name, tname, "data_offsets", jo, 1, &end);
    if (st != PS_OK)
        return st;
    if (begin > end)
        return err_set(PS_ERR_FORMAT, "%s: tensor '%s': data_offsets [%zu, %zu] begin after they end",
                       name, tname, begin, end);
    if (end - begin != t->n_bytes)
        return err_set(PS_ERR_FORMAT,
                       "%s: tensor '%s': data_offsets [%zu, %zu] hold %zu bytes but %s %s needs %zu",
                       name, tname, begin, end, end - begin, st_dtype_name(t->dtype),
                       format_shape(sbuf, sizeof sbuf, t->shape, ndim), t->n_bytes);
    if (end > data_size)
        return err_set(PS_ERR_FORMAT,
                       "%s: tensor '%s' ends at byte %zu past the end of the file (%zu bytes)",
                       name, tname, data_start + end, data_start + data_size);
    t->offset = data_start + begin;
    t->data = buf + t->offset;
    return PS_OK;
}

static int cmp_by_offset(const void *a, const void *b)
{
    const st_tensor *x = *(const st_tensor *const *)a, *y = *(const st_tensor *const *)b;
    if (x->offset != y->offset)
        return x->offset < y->offset ? -1 : 1;
    if (x->n_bytes != y->n_bytes)
        return x->n_bytes < y->n_bytes ? -1 : 1;
    return 0;
}

/* Sorted by (begin, end), each tensor must begin where the previous one
 * ended, the first at data offset 0 and the last at the end of the file:
 * overlapping tensors could alias, and unclaimed bytes could hide data. */
static ps_status check_tiling(const st_file *f, const char *name, size_t data_start, size_t data_size)
{
    if (f->n_tensors == 0) {
        if (data_size != 0)
            return err_set(PS_ERR_FORMAT, "%s: no tensors but %zu bytes of data after the header",
                           name, data_size);
        return PS_OK;
    }
    const st_tensor **order = malloc(f->n_tensors * sizeof *order);
    if (!order)
        return err_set(PS_ERR_NOMEM, "%s: cannot allocate an index of %zu tensors", name, f->n_tensors);
    for (size_t i = 0; i < f->n_tensors; i++)
        order[i] = &f->tensors[i];
    qsort(order, f->n_tensors, sizeof *order, cmp_by_offset);

    ps_status st = PS_OK;
    size_t pos = 0; /* data offset where the tiling has reached */
    const st_tensor *prev = NULL;
    for (size_t i = 0; i < f->n_tensors && st == PS_OK; i++) {
        const st_tensor *t = order[i];
        size_t begin = t->offset - data_start, end = begin + t->n_bytes;
        if (begin < pos)
            st = err_set(PS_ERR_FORMAT,
                         "%s: tensor '%s' (data_offsets [%zu, %zu]) overlaps tensor '%s' "
                         "(data_offsets [%zu, %zu])",
                         name, t->name, begin, end, prev->name, prev->offset - data_start, pos);
        else if (begin > pos && !prev)
            st = err_set(PS_ERR_FORMAT,
                         "%s: data bytes [0, %zu) belong to no tensor (the first, '%s', begins at %zu)",
                         name, begin, t->name, begin);
        else if (begin > pos)
            st = err_set(PS_ERR_FORMAT,
                         "%s: gap: data bytes [%zu, %zu) between tensors '%s' and '%s' belong to no tensor",
                         name, pos, begin, prev->name, t->name);
        pos = end;
        prev = t;
    }
    if (st == PS_OK && pos != data_size)
        st = err_set(PS_ERR_FORMAT,
                     "%s: the last %zu bytes of the file belong to no tensor (the last, '%s', ends at "
                     "data offset %zu of %zu)",
                     name, data_size - pos, prev->name, pos, data_size);
    free(order);
    return st;
}

static void free_tensors(st_file *f)
{
    for (size_t i = 0; i < f->n_tensors; i++)
        free(f->tensors[i].name);
    free(f->tensors);
    f->tensors = NULL;
    f->n_tensors = 0;
}

static ps_status parse_header(st_file *f, const char *name, const uint8_t *buf, size_t size)
{
    if (size < 8)
        return size == 0
                   ? err_set(PS_ERR_FORMAT, "%s: empty file (a safetensors file starts with an "
                                            "8-byte header length)", name)
                   : err_set(PS_ERR_FORMAT, "%s: file is %zu bytes, too short for the 8-byte "
                                            "header length", name, size);
    uint64_t n = load_le64(buf);
    if (n > ST_MAX_HEADER_BYTES)
        return err_set(PS_ERR_NOMEM, "%s: header length %llu is over the limit of %zu bytes",
                       name, (unsigned long long)n, ST_MAX_HEADER_BYTES);
    if (n > size - 8)
        return err_set(PS_ERR_FORMAT,
                       "%s: header length %llu runs past the end of the file (%zu bytes)",
                       name, (unsigned long long)n, size);
    size_t hn = (size_t)n, data_start = 8 + hn, data_size = size - data_start;
    f->header_bytes = hn;
    const char *hdr = (const char *)buf + 8;

    ps_status st = check_json_shape(name, hdr, hn);
    if (st != PS_OK)
        return st;
    /* jansson validates UTF-8 and allows the trailing spaces HF pads with. */
    json_error_t jerr;
    json_t *root = json_loadb(hdr, hn, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return err_set(PS_ERR_FORMAT, "%s: header is not valid JSON: %s (header byte %d)", name,
                       jerr.text, jerr.position);
    if (!json_is_object(root)) {
        st = err_set(PS_ERR_FORMAT, "%s: header is %s, expected an object", name,
                     jsonutil_kind(root));
        json_decref(root);
        return st;
    }

    size_t n_entries = json_object_size(root);
    size_t n_tensors = n_entries - (json_object_get(root, "__metadata__") ? 1 : 0);
    if (n_tensors > 0) {
        f->tensors = calloc(n_tensors, sizeof *f->tensors);
        if (!f->tensors) {
            json_decref(root);
            return err_set(PS_ERR_NOMEM, "%s: cannot allocate %zu tensor records", name, n_tensors);
        }
    }
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0) {
            st = parse_metadata(name, val);
        } else {
            st_tensor *t = &f->tensors[f->n_tensors];
            st = parse_tensor(name, key, val, buf, data_start, data_size, t);
            if (st == PS_OK) {
                t->name = strdup(key);
                if (!t->name)
                    st = err_set(PS_ERR_NOMEM, "%s: cannot copy tensor name", name);
                else
                    f->n_tensors++;
            }
        }
        if (st != PS_OK)
            break;
    }
    json_decref(root);
    if (st != PS_OK)
        return st;
    return check_tiling(f, name, data_start, data_size);
}

ps_status st_parse(st_file *f, const char *name_for_errors, const void *buf, size_t size)
{
    memset(f, 0, sizeof *f);
    ps_status st = parse_header(f, name_for_errors, buf, size);
    if (st == PS_OK) {
        f->path = strdup(name_for_errors);
        if (!f->path)
            st = err_set(PS_ERR_NOMEM, "%s: cannot copy the file name", name_for_errors);
    }
    if (st != PS_OK) {
        free_tensors(f);
        memset(f, 0, sizeof *f);
    }
    return st;
}

ps_status st_open(st_file *f, const char *path)
{
    memset(f, 0, sizeof *f);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return err_set(PS_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return err_set(PS_ERR_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return err_set(PS_ERR_IO, "%s: not a regular file", path);
    }
    if ((unsigned long long)sb.st_size > SIZE_MAX) {
        close(fd);
        return err_set(PS_ERR_NOMEM, "%s: file of %lld bytes does not fit in the address space",
                       path, (long long)sb.st_size);
    }
    size_t size = (size_t)sb.st_size;
    /* mmap of length 0 fails with EINVAL; an empty file is a format error
     * that st_parse reports, so it never gets mapped. */
    void *map = NULL;
    if (size > 0) {
        map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            int e = errno;
            close(fd);
            return err_set(PS_ERR_IO, "%s: cannot mmap %zu bytes: %s", path, size, strerror(e));
        }
    }
    close(fd); /* the mapping keeps the file open */
    ps_status st = st_parse(f, path, map, size);
    if (st != PS_OK) {
        if (map)
            munmap(map, size);
        return st;
    }
    f->map = map;
    f->map_size = size;
    return PS_OK;
}

const st_tensor *st_find(const st_file *f, const char *name)
{
    for (size_t i = 0; i < f->n_tensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0)
            return &f->tensors[i];
    return NULL;
}

void st_close(st_file *f)
{
    free_tensors(f);
    free(f->path);
    if (f->map)
        munmap(f->map, f->map_size);
    memset(f, 0, sizeof *f);
}
