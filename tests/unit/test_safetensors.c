/*
 * Unit tests: sha256 (FIPS 180-4 vectors) and the safetensors reader,
 * one test per kind of malformed input.  Every error test checks the status
 * and that the message names the file and the problem.  Files are written
 * into a fresh mkdtemp directory that teardown removes.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"
#include "safetensors.h"
#include "sha256.h"
#include "strutil.h"

#define TEST_TMPDIR_NAME "ps_test_st"
#include "test_tmpdir.h"

/* tmpdir/name, static storage (one path in use at a time per test). */
static const char *tmp_path(const char *name)
{
    static char p[PATH_MAX + 64];
    snprintf(p, sizeof p, "%s/%s", tmpdir, name);
    return p;
}

static const char *write_file(const char *name, const void *data, size_t len)
{
    const char *p = tmp_path(name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    if (len)
        assert_int_equal(fwrite(data, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
    return p;
}

/* [u64 LE header length][header][data]; the caller's header is used as is
 * (so tests control padding and malformations). */
static const char *write_st_n(const char *name, uint64_t hlen, const char *header, size_t header_len,
                              const void *data, size_t data_len)
{
    size_t n = 8 + header_len + data_len;
    uint8_t *buf = malloc(n);
    assert_non_null(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)(hlen >> (8 * i));
    memcpy(buf + 8, header, header_len);
    if (data_len)
        memcpy(buf + 8 + header_len, data, data_len);
    const char *p = write_file(name, buf, n);
    free(buf);
    return p;
}

static const char *write_st(const char *name, const char *header, const void *data, size_t data_len)
{
    return write_st_n(name, strlen(header), header, strlen(header), data, data_len);
}

static const uint8_t zeros[256];

/* ---- sha256 --------------------------------------------------------------- */

static void check_sha(const char *msg, size_t len, const char *want)
{
    char hex[65];
    sha256_hex(msg, len, hex);
    assert_string_equal(hex, want);
}

static void test_sha256_empty(void **state)
{
    (void)state;
    check_sha("", 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

static void test_sha256_abc(void **state)
{
    (void)state;
    check_sha("abc", 3, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

static void test_sha256_448_bits(void **state)
{
    (void)state;
    const char *m = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    check_sha(m, strlen(m), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

static void test_sha256_896_bits(void **state)
{
    (void)state;
    const char *m = "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopq"
                    "klmnopqrlmnopqrsmnopqrstnopqrstu";
    check_sha(m, strlen(m), "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
}

static const char *million_a_hex = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0";

static void test_sha256_million_a(void **state)
{
    (void)state;
    char *m = malloc(1000000);
    assert_non_null(m);
    memset(m, 'a', 1000000);
    check_sha(m, 1000000, million_a_hex);
    /* The same message in uneven pieces exercises the partial-block paths. */
    sha256_ctx c;
    sha256_init(&c);
    size_t off = 0, step = 1;
    while (off < 1000000) {
        size_t n = step < 1000000 - off ? step : 1000000 - off;
        sha256_update(&c, m + off, n);
        off += n;
        step = step % 131 + 7;
    }
    char hex[65];
    sha256_final_hex(&c, hex);
    assert_string_equal(hex, million_a_hex);
    free(m);
}

/* Lengths around the 56-byte padding boundary and whole blocks (digests from
 * coreutils sha256sum). */
static void test_sha256_block_boundaries(void **state)
{
    (void)state;
    static const struct {
        size_t n;
        const char *hex;
    } v[] = {
        {55, "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318"},
        {56, "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a"},
        {63, "7d3e74a05d7db15bce4ad9ec0658ea98e3f06eeecf16b4c6fff2da457ddc2f34"},
        {64, "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb"},
        {65, "635361c48bb9eab14198e76ea8ab7f1a41685d6ad62aa9146d301d4f17eb0ae0"},
        {119, "31eba51c313a5c08226adf18d4a359cfdfd8d2e816b13f4af952f7ea6584dcfb"},
        {120, "2f3d335432c70b580af0e8e1b3674a7c020d683aa5f73aaaedfdc55af904c21c"},
        {128, "6836cf13bac400e9105071cd6af47084dfacad4e5e302c94bfed24e013afb73e"},
    };
    char a[128];
    memset(a, 'a', sizeof a);
    for (size_t i = 0; i < sizeof v / sizeof *v; i++)
        check_sha(a, v[i].n, v[i].hex);
}

static void test_sha256_file(void **state)
{
    (void)state;
    char *m = malloc(1000000);
    assert_non_null(m);
    memset(m, 'a', 1000000);
    const char *p = write_file("million_a.txt", m, 1000000);
    free(m);
    char hex[65];
    assert_int_equal(sha256_file_hex(p, hex), PS_OK);
    assert_string_equal(hex, million_a_hex);
    p = write_file("empty.txt", "", 0);
    assert_int_equal(sha256_file_hex(p, hex), PS_OK);
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

static void test_sha256_file_missing(void **state)
{
    (void)state;
    char hex[65];
    ASSERT_ERROR(sha256_file_hex(tmp_path("no_such_file"), hex), PS_ERR_IO, "no_such_file",
                 "cannot open");
}

/* ---- dtypes and conversions ---------------------------------------------- */

static void test_dtype_names_and_sizes(void **state)
{
    (void)state;
    static const char *names[] = {"BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16",
                                  "BF16", "I32", "U32", "F32", "F64", "I64", "U64"};
    static const size_t sizes[] = {1, 1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 8, 8, 8};
    for (int t = 0; t < ST_DTYPE_COUNT; t++) {
        assert_string_equal(st_dtype_name((st_dtype)t), names[t]);
        assert_int_equal(st_dtype_size((st_dtype)t), sizes[t]);
    }
    assert_int_equal(st_dtype_size(ST_DTYPE_COUNT), 0);
}

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static void test_f16_values(void **state)
{
    (void)state;
    assert_true(st_f16_to_f32(0x3c00) == 1.0f);
    assert_true(st_f16_to_f32(0xc000) == -2.0f);
    assert_true(st_f16_to_f32(0x3800) == 0.5f);
    assert_true(st_f16_to_f32(0x7bff) == 65504.0f);          /* largest normal */
    assert_true(st_f16_to_f32(0x0400) == ldexpf(1.0f, -14)); /* smallest normal */
    assert_true(st_f16_to_f32(0x0001) == ldexpf(1.0f, -24)); /* smallest subnormal */
    assert_true(st_f16_to_f32(0x03ff) == ldexpf(1023.0f, -24)); /* largest subnormal */
    assert_true(st_f16_to_f32(0x8001) == -ldexpf(1.0f, -24));
    assert_true(st_f16_to_f32(0x0000) == 0.0f && !signbit(st_f16_to_f32(0x0000)));
    assert_true(st_f16_to_f32(0x8000) == 0.0f && signbit(st_f16_to_f32(0x8000)));
    assert_true(isinf(st_f16_to_f32(0x7c00)) && st_f16_to_f32(0x7c00) > 0);
    assert_true(isinf(st_f16_to_f32(0xfc00)) && st_f16_to_f32(0xfc00) < 0);
    assert_true(isnan(st_f16_to_f32(0x7e00)));
    assert_true(isnan(st_f16_to_f32(0xfc01)));
    assert_int_equal(f32_bits(st_f16_to_f32(0x7e00)), 0x7fc00000u);
}

/* Every one of the 65536 halves against the definition
 * value = (-1)^s * (e == 0 ? m * 2^-24 : (1024 + m) * 2^(e - 25)). */
static void test_f16_exhaustive(void **state)
{
    (void)state;
    for (uint32_t h = 0; h <= 0xffff; h++) {
        uint32_t e = (h >> 10) & 31, mant = h & 1023;
        float got = st_f16_to_f32((uint16_t)h);
        if (e == 31) {
            assert_true(mant ? isnan(got) : isinf(got));
            assert_int_equal(!!signbit(got), h >> 15);
            continue;
        }
        double want = e == 0 ? ldexp(mant, -24) : ldexp(1024 + mant, (int)e - 25);
        if (h & 0x8000)
            want = -want;
        if ((double)got != want || !!signbit(got) != (h >> 15))
            fail_msg("f16 0x%04x -> %.9g, want %.9g", h, (double)got, want);
    }
}

static void test_bf16_values(void **state)
{
    (void)state;
    assert_true(st_bf16_to_f32(0x3f80) == 1.0f);
    assert_true(st_bf16_to_f32(0xc000) == -2.0f);
    assert_true(st_bf16_to_f32(0x4049) == 3.140625f);
    assert_true(st_bf16_to_f32(0x0080) == ldexpf(1.0f, -126)); /* smallest normal */
    assert_true(st_bf16_to_f32(0x0001) == ldexpf(1.0f, -133)); /* smallest subnormal */
    assert_true(st_bf16_to_f32(0x007f) == ldexpf(127.0f, -133)); /* largest subnormal */
    assert_true(st_bf16_to_f32(0x8000) == 0.0f && signbit(st_bf16_to_f32(0x8000)));
    assert_true(isinf(st_bf16_to_f32(0x7f80)) && st_bf16_to_f32(0x7f80) > 0);
    assert_true(isinf(st_bf16_to_f32(0xff80)) && st_bf16_to_f32(0xff80) < 0);
    assert_true(isnan(st_bf16_to_f32(0x7fc0)));
    assert_true(isnan(st_bf16_to_f32(0xff81)));
    assert_true(st_bf16_to_f32(0x7f7f) == ldexpf(255.0f, 120)); /* largest finite */
}

static void test_to_f32_any_alignment(void **state)
{
    (void)state;
    /* Offset 1 makes every source misaligned for its type. */
    uint8_t buf[1 + 4 * 8];
    float out[4];

    const float f32[3] = {1.5f, -0.25f, 3e-40f};
    memcpy(buf + 1, f32, sizeof f32);
    assert_int_equal(st_to_f32(ST_F32, buf + 1, 3, out), PS_OK);
    assert_memory_equal(out, f32, sizeof f32);

    const uint8_t f16[] = {0x00, 0x3c, 0x01, 0x00, 0x00, 0xfc}; /* 1, 2^-24, -inf (LE) */
    memcpy(buf + 1, f16, sizeof f16);
    assert_int_equal(st_to_f32(ST_F16, buf + 1, 3, out), PS_OK);
    assert_true(out[0] == 1.0f && out[1] == ldexpf(1.0f, -24) && isinf(out[2]) && out[2] < 0);

    const uint8_t bf16[] = {0x80, 0x3f, 0x01, 0x00, 0xc0, 0x7f}; /* 1, 2^-133, nan */
    memcpy(buf + 1, bf16, sizeof bf16);
    assert_int_equal(st_to_f32(ST_BF16, buf + 1, 3, out), PS_OK);
    assert_true(out[0] == 1.0f && out[1] == ldexpf(1.0f, -133) && isnan(out[2]));

    const double f64[4] = {0.1, -2.0, 1e300, 1e-300};
    memcpy(buf + 1, f64, sizeof f64);
    assert_int_equal(st_to_f32(ST_F64, buf + 1, 4, out), PS_OK);
    assert_true(out[0] == 0.1f && out[1] == -2.0f && isinf(out[2]) && out[3] == 0.0f);

    ASSERT_ERROR(st_to_f32(ST_I32, buf, 1, out), PS_ERR_INVALID, "I32");
    ASSERT_ERROR(st_to_f32(ST_U8, buf, 1, out), PS_ERR_INVALID, "U8");
}

/* ---- valid files ------------------------------------------------------------ */

static void test_open_valid(void **state)
{
    (void)state;
    /* HF layout: compact JSON, __metadata__ first, padded with spaces to a
     * multiple of 8; then [b] F32 [2,3] (24 bytes), [a] F16 [2] (4 bytes),
     * scalar s F64 (8 bytes), empty e I32 [0, 5]. */
    const char *hdr = "{\"__metadata__\":{\"format\":\"pt\"},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
                      "\"a\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[24,28]},"
                      "\"s\":{\"dtype\":\"F64\",\"shape\":[],\"data_offsets\":[28,36]},"
                      "\"e\":{\"dtype\":\"I32\",\"shape\":[0,5],\"data_offsets\":[36,36]}}";
    char padded[512];
    size_t hl = strlen(hdr), pl = (hl + 7) / 8 * 8;
    memset(padded, ' ', pl);
    memcpy(padded, hdr, hl);
    uint8_t data[36];
    const float b[6] = {1, 2, 3, 4, 5, 6};
    const uint16_t a[2] = {0x3c00, 0xc000};
    const double s = 0.5;
    memcpy(data, b, 24);
    memcpy(data + 24, a, 4);
    memcpy(data + 28, &s, 8);
    const char *p = write_st_n("valid.safetensors", pl, padded, pl, data, sizeof data);

    st_file f;
    assert_int_equal(st_open(&f, p), PS_OK);
    assert_string_equal(f.path, p);
    assert_int_equal(f.header_bytes, pl);
    assert_int_equal(f.map_size, 8 + pl + sizeof data);
    assert_int_equal(f.n_tensors, 4);
    /* Header order is kept. */
    assert_string_equal(f.tensors[0].name, "b");
    assert_string_equal(f.tensors[1].name, "a");
    assert_string_equal(f.tensors[2].name, "s");
    assert_string_equal(f.tensors[3].name, "e");

    const st_tensor *tb = st_find(&f, "b");
    assert_non_null(tb);
    assert_int_equal(tb->dtype, ST_F32);
    assert_int_equal(tb->ndim, 2);
    assert_int_equal(tb->shape[0], 2);
    assert_int_equal(tb->shape[1], 3);
    assert_int_equal(tb->n_elements, 6);
    assert_int_equal(tb->n_bytes, 24);
    assert_int_equal(tb->offset, 8 + pl);
    assert_ptr_equal(tb->data, (const uint8_t *)f.map + 8 + pl);
    assert_memory_equal(tb->data, b, 24);

    const st_tensor *ta = st_find(&f, "a");
    assert_non_null(ta);
    float out[2];
    assert_int_equal(st_to_f32(ta->dtype, ta->data, ta->n_elements, out), PS_OK);
    assert_true(out[0] == 1.0f && out[1] == -2.0f);

    const st_tensor *ts = st_find(&f, "s");
    assert_non_null(ts);
    assert_int_equal(ts->ndim, 0);
    assert_int_equal(ts->n_elements, 1);
    assert_int_equal(ts->n_bytes, 8);

    const st_tensor *te = st_find(&f, "e");
    assert_non_null(te);
    assert_int_equal(te->n_elements, 0);
    assert_int_equal(te->n_bytes, 0);

    assert_null(st_find(&f, "c"));
    assert_null(st_find(&f, "__metadata__"));
    st_close(&f);
    assert_null(f.map);
    assert_int_equal(f.n_tensors, 0);
    st_close(&f); /* closing twice is safe */
}

static void test_open_no_tensors(void **state)
{
    (void)state;
    const char *p = write_st("none.safetensors", "{}      ", NULL, 0);
    st_file f;
    assert_int_equal(st_open(&f, p), PS_OK);
    assert_int_equal(f.n_tensors, 0);
    st_close(&f);
}

/* Byte-exact outputs of HF's own serializer (the tests of safetensors'
 * src/tensor.rs): test_serialization, test_serialization_forced_alignement
 * and test_empty with and without metadata.  The reader must accept them. */
static void test_upstream_vectors(void **state)
{
    (void)state;
    static const uint8_t ser[] = {
        64, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 46, 48, 34, 58, 123, 34, 100, 116,
        121, 112, 101, 34, 58, 34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34, 58, 91, 49,
        44, 50, 44, 51, 93, 44, 34, 100, 97, 116, 97, 95, 111, 102, 102, 115, 101, 116, 115, 34,
        58, 91, 48, 44, 50, 52, 93, 125, 125, 0, 0, 0, 0, 0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64,
        64, 0, 0, 128, 64, 0, 0, 160, 64};
    static const uint8_t aligned[] = {
        72, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 48, 34, 58, 123, 34, 100, 116, 121,
        112, 101, 34, 58, 34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34, 58, 91, 49, 44,
        49, 44, 50, 44, 51, 93, 44, 34, 100, 97, 116, 97, 95, 111, 102, 102, 115, 101, 116, 115,
        34, 58, 91, 48, 44, 50, 52, 93, 125, 125, 32, 32, 32, 32, 32, 32, 32, 0, 0, 0, 0, 0, 0,
        128, 63, 0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64};
    static const uint8_t empty[] = {8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32};
    static const uint8_t empty_meta[] = {
        40, 0, 0, 0, 0, 0, 0, 0, 123, 34, 95, 95, 109, 101, 116, 97, 100, 97, 116, 97, 95, 95, 34,
        58, 123, 34, 102, 114, 97, 109, 101, 119, 111, 114, 107, 34, 58, 34, 112, 116, 34, 125,
        125, 32, 32, 32, 32, 32};
    st_file f;
    const float want[6] = {0, 1, 2, 3, 4, 5};
    float got[6];

    assert_int_equal(st_open(&f, write_file("ser.safetensors", ser, sizeof ser)), PS_OK);
    const st_tensor *t = st_find(&f, "attn.0");
    assert_non_null(t);
    assert_int_equal(t->ndim, 3);
    assert_int_equal(t->shape[2], 3);
    assert_int_equal(st_to_f32(t->dtype, t->data, t->n_elements, got), PS_OK);
    assert_memory_equal(got, want, sizeof want);
    st_close(&f);

    assert_int_equal(st_open(&f, write_file("aligned.safetensors", aligned, sizeof aligned)), PS_OK);
    t = st_find(&f, "attn0");
    assert_non_null(t);
    assert_int_equal(t->ndim, 4);
    assert_int_equal((uintptr_t)t->data % 4, 0);
    st_close(&f);

    assert_int_equal(st_open(&f, write_file("e.safetensors", empty, sizeof empty)), PS_OK);
    assert_int_equal(f.n_tensors, 0);
    st_close(&f);
    assert_int_equal(st_open(&f, write_file("em.safetensors", empty_meta, sizeof empty_meta)), PS_OK);
    assert_int_equal(f.n_tensors, 0);
    st_close(&f);
}

/* st_parse on memory (the fuzz target's entry point). */
static void test_parse_memory(void **state)
{
    (void)state;
    const char *hdr = "{\"x\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]}}";
    size_t hl = strlen(hdr);
    uint8_t buf[128] = {0};
    buf[0] = (uint8_t)hl;
    memcpy(buf + 8, hdr, hl);
    memcpy(buf + 8 + hl, "xyz", 3);
    st_file f;
    assert_int_equal(st_parse(&f, "mem", buf, 8 + hl + 3), PS_OK);
    assert_int_equal(f.n_tensors, 1);
    assert_ptr_equal(f.tensors[0].data, buf + 8 + hl);
    assert_null(f.map);
    st_close(&f);
    ASSERT_ERROR(st_parse(&f, "mem", buf, 8 + hl + 2), PS_ERR_FORMAT, "mem: tensor 'x'",
                 "past the end of the file");
    assert_int_equal(f.n_tensors, 0);
    assert_null(f.tensors);
    st_close(&f);
}

/* ---- malformed files: one test each --------------------------------------- */

static void test_missing_file(void **state)
{
    (void)state;
    st_file f;
    ASSERT_ERROR(st_open(&f, tmp_path("absent.safetensors")), PS_ERR_IO, "absent.safetensors",
                 "cannot open");
    st_close(&f);
}

static void test_not_regular_file(void **state)
{
    (void)state;
    st_file f;
    ASSERT_ERROR(st_open(&f, tmpdir), PS_ERR_IO, tmpdir, "not a regular file");
}

static void test_empty_file(void **state)
{
    (void)state;
    const char *p = write_file("empty.safetensors", "", 0);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "empty.safetensors", "empty file");
    assert_null(f.map);
    st_close(&f);
}

static void test_truncated_length(void **state)
{
    (void)state;
    const char *p = write_file("trunc.safetensors", "\x10\0\0\0\0", 5);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "trunc.safetensors", "file is 5 bytes, too short");
}

static void test_truncated_data(void **state)
{
    (void)state;
    /* The header promises 16 bytes of data, the file holds 10. */
    const char *p = write_st("short.safetensors",
                             "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}",
                             zeros, 10);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "short.safetensors", "tensor 'w'",
                 "past the end of the file");
}

static void test_header_past_end(void **state)
{
    (void)state;
    const char *hdr = "{}";
    const char *p = write_st_n("hdrlen.safetensors", 1000, hdr, 2, NULL, 0);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "hdrlen.safetensors", "header length 1000",
                 "runs past the end of the file (10 bytes)");
}

static void test_header_huge(void **state)
{
    (void)state;
    const char *p = write_st_n("huge.safetensors", UINT64_MAX, "{}", 2, NULL, 0);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_NOMEM, "huge.safetensors", "header length 18446744073709551615",
                 "over the limit");
    p = write_st_n("huge2.safetensors", (uint64_t)ST_MAX_HEADER_BYTES + 1, "{}", 2, NULL, 0);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_NOMEM, "huge2.safetensors", "over the limit");
}

static void test_header_not_json(void **state)
{
    (void)state;
    const char *p = write_st("notjson.safetensors", "{\"a\": nope}", NULL, 0);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "notjson.safetensors", "header is not valid JSON");
}

static void test_header_not_object(void **state)
{
    (void)state;
    const char *p = write_st("array.safetensors", "[1, 2]", NULL, 0);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "array.safetensors", "header is an array",
                 "expected an object");
}

static void test_header_not_utf8(void **state)
{
    (void)state;
    const char *p = write_st("utf8.safetensors",
                             "{\"w\xff\xfe\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
                             zeros, 1);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "utf8.safetensors", "not valid JSON",
                 "unable to decode byte 0xff");
    /* An overlong encoding of '/' (C0 AF) is not UTF-8 either. */
    p = write_st("utf8b.safetensors",
                 "{\"w\xc0\xaf\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", zeros, 1);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "utf8b.safetensors", "not valid JSON");
}

static void test_header_nul_padding(void **state)
{
    (void)state;
    /* Spaces are the padding HF writes; NUL bytes are not JSON. */
    const char hdr[] = "{}\0\0\0\0\0";
    const char *p = write_st_n("nulpad.safetensors", 8, hdr, 8, NULL, 0);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "nulpad.safetensors", "not valid JSON");
}

static void test_deeply_nested(void **state)
{
    (void)state;
    /* A million '[' would exhaust the stack of a naive recursive parser. */
    size_t n = 1000000;
    char *hdr = malloc(2 * n + 1);
    assert_non_null(hdr);
    memset(hdr, '[', n);
    memset(hdr + n, ']', n);
    hdr[2 * n] = '\0';
    const char *p = write_st("deep.safetensors", hdr, NULL, 0);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "deep.safetensors", "nests deeper than 3 levels");
    /* Nesting one level too deep inside an otherwise valid entry. */
    p = write_st("deep4.safetensors",
                 "{\"w\":{\"dtype\":\"U8\",\"shape\":[[1]],\"data_offsets\":[0,1]}}", zeros, 1);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "deep4.safetensors", "nests deeper than 3 levels",
                 "header byte 28");
    /* Brackets inside strings (even after an escaped quote) do not count. */
    p = write_st("strbr.safetensors",
                 "{\"__metadata__\":{\"k\":\"[[[[\\\"{{{{\"},"
                 "\"w[[[\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
                 zeros, 1);
    assert_int_equal(st_open(&f, p), PS_OK);
    assert_non_null(st_find(&f, "w[[["));
    st_close(&f);
    free(hdr);
}

/* A flat header of many values: a few bytes each, but 30-110 bytes each
 * once parsed, so their number is capped (ST_MAX_HEADER_VALUES). */
static void test_too_many_values(void **state)
{
    (void)state;
    size_t n = ST_MAX_HEADER_VALUES + 1;
    char *hdr = malloc(2 * n + 2);
    assert_non_null(hdr);
    hdr[0] = '[';
    for (size_t i = 0; i < n; i++)
        memcpy(hdr + 1 + 2 * i, i + 1 < n ? "0," : "0]", 2);
    hdr[2 * n + 1] = '\0';
    const char *p = write_st("values.safetensors", hdr, NULL, 0);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_NOMEM, "values.safetensors", "more than 8388608 values and keys");
    free(hdr);
}

/* Messages quote tensor names from the file; they stay one line of valid
 * UTF-8 whatever the names hold (err.h). */
static void test_messages_stay_one_line(void **state)
{
    (void)state;
    const char *p = write_st("nl.safetensors",
                             "{\"a\\nb\\u0001\":{\"dtype\":\"X\",\"shape\":[1],\"data_offsets\":[0,1]}}", zeros, 1);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "nl.safetensors", "tensor 'a\\nb\\x01': unknown dtype 'X'");
    assert_null(strchr(err_msg(), '\n'));
    p = write_st("bytes.safetensors", "{\"w\xff\xfe\":1}", NULL, 0);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "bytes.safetensors", "unable to decode byte 0xff");
    assert_true(str_utf8_valid(err_msg(), strlen(err_msg())));
}

static void test_duplicate_names(void **state)
{
    (void)state;
    const char *p = write_st("dup.safetensors",
                             "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                             "\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
                             zeros, 2);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "dup.safetensors", "duplicate object key", "\"w\"");
}

static void test_unknown_dtype(void **state)
{
    (void)state;
    const char *p = write_st("dtype.safetensors",
                             "{\"w\":{\"dtype\":\"F12\",\"shape\":[1],\"data_offsets\":[0,1]}}", zeros, 1);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "dtype.safetensors", "tensor 'w'", "unknown dtype 'F12'");
    p = write_st("dtype2.safetensors",
                 "{\"w\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,1]}}", zeros, 1);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "dtype2.safetensors", "tensor 'w'",
                 "dtype is an integer, expected a string");
    /* Names are case-sensitive, as in the format. */
    p = write_st("dtype3.safetensors",
                 "{\"w\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", zeros, 4);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "dtype3.safetensors", "unknown dtype 'f32'");
}

static void test_shape_negative(void **state)
{
    (void)state;
    const char *p = write_st("neg.safetensors",
                             "{\"w\":{\"dtype\":\"U8\",\"shape\":[2,-1],\"data_offsets\":[0,2]}}", zeros, 2);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "neg.safetensors", "tensor 'w'", "shape[1] = -1 is negative");
}

static void test_shape_not_integer(void **state)
{
    (void)state;
    const char *p = write_st("real.safetensors",
                             "{\"w\":{\"dtype\":\"U8\",\"shape\":[2.0],\"data_offsets\":[0,2]}}", zeros, 2);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "real.safetensors", "tensor 'w'",
                 "shape[0] is a real number");
    p = write_st("str.safetensors",
                 "{\"w\":{\"dtype\":\"U8\",\"shape\":[\"2\"],\"data_offsets\":[0,2]}}", zeros, 2);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "str.safetensors", "shape[0] is a string");
    p = write_st("obj.safetensors",
                 "{\"w\":{\"dtype\":\"U8\",\"shape\":{},\"data_offsets\":[0,2]}}", zeros, 2);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "obj.safetensors", "shape is an object");
}

static void test_shape_overflow(void **state)
{
    (void)state;
    st_file f;
    /* 2^31 * 2^31 * 2^3 = 2^65 elements. */
    const char *p = write_st(
        "ovf.safetensors",
        "{\"w\":{\"dtype\":\"U8\",\"shape\":[2147483648,2147483648,8],\"data_offsets\":[0,1]}}", zeros, 1);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "ovf.safetensors", "tensor 'w'",
                 "more bytes than fit in size_t");
    /* 2^62 elements fit, 2^62 * 8 bytes do not. */
    p = write_st("ovf2.safetensors",
                 "{\"w\":{\"dtype\":\"F64\",\"shape\":[4611686018427387904],\"data_offsets\":[0,1]}}",
                 zeros, 1);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "ovf2.safetensors", "more bytes than fit in size_t");
    /* Bigger than any JSON integer jansson holds. */
    p = write_st("ovf3.safetensors",
                 "{\"w\":{\"dtype\":\"U8\",\"shape\":[99999999999999999999],\"data_offsets\":[0,1]}}",
                 zeros, 1);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "ovf3.safetensors", "too big integer");
    /* A zero dimension makes the product 0 whatever the others are. */
    p = write_st("zero.safetensors",
                 "{\"w\":{\"dtype\":\"U8\",\"shape\":[2147483648,2147483648,8,0],\"data_offsets\":[0,0]}}",
                 NULL, 0);
    assert_int_equal(st_open(&f, p), PS_OK);
    assert_int_equal(f.tensors[0].n_elements, 0);
    st_close(&f);
}

static void test_too_many_dims(void **state)
{
    (void)state;
    const char *p = write_st("dims.safetensors",
                             "{\"w\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}",
                             zeros, 1);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "dims.safetensors", "tensor 'w'", "9 dimensions");
}

static void test_size_mismatch(void **state)
{
    (void)state;
    const char *p = write_st(
        "size.safetensors",
        "{\"h.0.ln_1.weight\":{\"dtype\":\"F32\",\"shape\":[8],\"data_offsets\":[0,40]}}", zeros, 40);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT,
                 "size.safetensors: tensor 'h.0.ln_1.weight': data_offsets [0, 40] hold 40 bytes but "
                 "F32 [8] needs 32");
}

static void test_offsets_begin_after_end(void **state)
{
    (void)state;
    const char *p = write_st("order.safetensors",
                             "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[2,1]}}", zeros, 2);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "order.safetensors", "tensor 'w'", "begin after they end");
}

static void test_offsets_bad_form(void **state)
{
    (void)state;
    st_file f;
    const char *p = write_st("offs3.safetensors",
                             "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1,2]}}", zeros, 1);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "offs3.safetensors", "tensor 'w'",
                 "data_offsets must be an array [begin, end]");
    p = write_st("offsneg.safetensors",
                 "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[-1,0]}}", zeros, 1);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "offsneg.safetensors", "data_offsets[0] = -1 is negative");
}

static void test_offsets_overlap(void **state)
{
    (void)state;
    const char *p = write_st("overlap.safetensors",
                             "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                             "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                             zeros, 12);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "overlap.safetensors",
                 "tensor 'b' (data_offsets [4, 12]) overlaps tensor 'a' (data_offsets [0, 8])");
    /* Two names for the very same bytes overlap too. */
    p = write_st("alias.safetensors",
                 "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                 "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                 zeros, 8);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "alias.safetensors", "overlaps tensor");
}

static void test_offsets_out_of_bounds(void **state)
{
    (void)state;
    const char *hdr = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}";
    const char *p = write_st("oob.safetensors", hdr, zeros, 12);
    st_file f;
    char want[128];
    snprintf(want, sizeof want, "tensor 'b' ends at byte %zu past the end of the file (%zu bytes)",
             8 + strlen(hdr) + 16, 8 + strlen(hdr) + 12);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "oob.safetensors", want);
    /* Offsets near 2^64 must not wrap around in the check. */
    p = write_st("oob2.safetensors",
                 "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],"
                 "\"data_offsets\":[18446744073709551614,18446744073709551615]}}",
                 zeros, 1);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "oob2.safetensors", "too big integer");
    p = write_st("oob3.safetensors",
                 "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],"
                 "\"data_offsets\":[9223372036854775806,9223372036854775807]}}",
                 zeros, 1);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "oob3.safetensors", "tensor 'a'", "past the end of the file");
}

static void test_offsets_gap(void **state)
{
    (void)state;
    const char *p = write_st("gap.safetensors",
                             "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                             "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}",
                             zeros, 20);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "gap.safetensors", "gap: data bytes [8, 12)",
                 "tensors 'a' and 'b'");
}

static void test_offsets_not_from_zero(void **state)
{
    (void)state;
    const char *p = write_st("start.safetensors",
                             "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", zeros, 12);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "start.safetensors", "data bytes [0, 4) belong to no tensor");
}

static void test_offsets_not_ending_at_file_end(void **state)
{
    (void)state;
    const char *p = write_st("tail.safetensors",
                             "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", zeros, 11);
    st_file f;
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "tail.safetensors",
                 "the last 3 bytes of the file belong to no tensor");
    p = write_st("tail0.safetensors", "{}", zeros, 4);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "tail0.safetensors", "no tensors but 4 bytes of data");
}

static void test_entry_keys(void **state)
{
    (void)state;
    st_file f;
    const char *p = write_st("nokey.safetensors", "{\"w\":{\"dtype\":\"U8\",\"shape\":[1]}}", zeros, 1);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "nokey.safetensors", "tensor 'w'",
                 "missing key 'data_offsets'");
    p = write_st("extra.safetensors",
                 "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"x\":1}}", zeros, 1);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "extra.safetensors", "tensor 'w'", "unexpected key 'x'");
    p = write_st("entry.safetensors", "{\"w\":[1]}", zeros, 0);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "entry.safetensors", "tensor 'w' is an array");
}

static void test_metadata_types(void **state)
{
    (void)state;
    st_file f;
    const char *p = write_st("meta1.safetensors", "{\"__metadata__\":[\"pt\"]}", NULL, 0);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "meta1.safetensors", "\"__metadata__\" is an array");
    p = write_st("meta2.safetensors", "{\"__metadata__\":{\"format\":1}}", NULL, 0);
    ASSERT_ERROR(st_open(&f, p), PS_ERR_FORMAT, "meta2.safetensors", "key 'format' is an integer");
}

/* Random corruptions of a valid file: each must parse or fail cleanly
 * (under ASan/UBSan this is a small fuzz run). */
static void test_mutations_fail_cleanly(void **state)
{
    (void)state;
    const char *hdr = "{\"__metadata__\":{\"format\":\"pt\"},"
                      "\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
                      "\"b\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[16,22]}}";
    size_t hl = strlen(hdr), n = 8 + hl + 22;
    uint8_t *orig = calloc(1, n), *buf = malloc(n);
    assert_true(orig && buf);
    orig[0] = (uint8_t)hl;
    memcpy(orig + 8, hdr, hl);
    st_file f;
    assert_int_equal(st_parse(&f, "fuzz", orig, n), PS_OK);
    st_close(&f);
    uint32_t rng = 12345;
    for (int it = 0; it < 20000; it++) {
        memcpy(buf, orig, n);
        int flips = 1 + it % 4;
        for (int k = 0; k < flips; k++) {
            rng = rng * 1664525u + 1013904223u;
            size_t pos = (rng >> 8) % (8 + hl);
            rng = rng * 1664525u + 1013904223u;
            static const char alphabet[] = "0123456789-[]{}\",:. \\eE\x80\xff";
            buf[pos] = (uint8_t)alphabet[(rng >> 8) % (sizeof alphabet - 1)];
        }
        rng = rng * 1664525u + 1013904223u;
        size_t len = (it % 8 == 0) ? (rng >> 8) % (n + 1) : n;
        ps_status st = st_parse(&f, "fuzz", buf, len);
        if (st == PS_OK) {
            for (size_t i = 0; i < f.n_tensors; i++)
                assert_true(f.tensors[i].offset + f.tensors[i].n_bytes <= len);
        } else {
            assert_non_null(strstr(err_msg(), "fuzz"));
            assert_int_equal(f.n_tensors, 0);
        }
        st_close(&f);
    }
    free(orig);
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sha256_empty),
        cmocka_unit_test(test_sha256_abc),
        cmocka_unit_test(test_sha256_448_bits),
        cmocka_unit_test(test_sha256_896_bits),
        cmocka_unit_test(test_sha256_million_a),
        cmocka_unit_test(test_sha256_block_boundaries),
        cmocka_unit_test(test_sha256_file),
        cmocka_unit_test(test_sha256_file_missing),
        cmocka_unit_test(test_dtype_names_and_sizes),
        cmocka_unit_test(test_f16_values),
        cmocka_unit_test(test_f16_exhaustive),
        cmocka_unit_test(test_bf16_values),
        cmocka_unit_test(test_to_f32_any_alignment),
        cmocka_unit_test(test_open_valid),
        cmocka_unit_test(test_open_no_tensors),
        cmocka_unit_test(test_upstream_vectors),
        cmocka_unit_test(test_parse_memory),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_not_regular_file),
        cmocka_unit_test(test_empty_file),
        cmocka_unit_test(test_truncated_length),
        cmocka_unit_test(test_truncated_data),
        cmocka_unit_test(test_header_past_end),
        cmocka_unit_test(test_header_huge),
        cmocka_unit_test(test_header_not_json),
        cmocka_unit_test(test_header_not_object),
        cmocka_unit_test(test_header_not_utf8),
        cmocka_unit_test(test_header_nul_padding),
        cmocka_unit_test(test_too_many_values),
        cmocka_unit_test(test_messages_stay_one_line),
        cmocka_unit_test(test_deeply_nested),
        cmocka_unit_test(test_duplicate_names),
        cmocka_unit_test(test_unknown_dtype),
        cmocka_unit_test(test_shape_negative),
        cmocka_unit_test(test_shape_not_integer),
        cmocka_unit_test(test_shape_overflow),
        cmocka_unit_test(test_too_many_dims),
        cmocka_unit_test(test_size_mismatch),
        cmocka_unit_test(test_offsets_begin_after_end),
        cmocka_unit_test(test_offsets_bad_form),
        cmocka_unit_test(test_offsets_overlap),
        cmocka_unit_test(test_offsets_out_of_bounds),
        cmocka_unit_test(test_offsets_gap),
        cmocka_unit_test(test_offsets_not_from_zero),
        cmocka_unit_test(test_offsets_not_ending_at_file_end),
        cmocka_unit_test(test_entry_keys),
        cmocka_unit_test(test_metadata_types),
        cmocka_unit_test(test_mutations_fail_cleanly),
    };
    return cmocka_run_group_tests_name("safetensors", tests, setup_dir, teardown_dir);
}
