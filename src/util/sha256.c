/*
 * sha256: libcrypto's SHA-256 (EVP: the CPU's SHA extensions or its best
 * vector code, about 1.5-2 GB/s here against 0.3 GB/s for portable C), with
 * the portable FIPS 180-4 SHA-256 (section 6.2) below as the fallback when
 * libcrypto cannot give a context (out of memory, a FIPS provider without
 * SHA-256): byte-oriented, so independent of host endianness and of the
 * alignment of the input.  Both give the same digest; the unit tests check
 * FIPS 180-4's examples.
 */
#include "sha256.h"

#include <errno.h>
#include <openssl/evp.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* FIPS 180-4 4.2.2: first 32 bits of the fractional parts of the cube roots
 * of the first 64 primes. */
static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static inline uint32_t rotr(uint32_t x, unsigned n) { return (x >> n) | (x << (32 - n)); }

/* One 64-byte block (FIPS 180-4 6.2.2): message schedule W[0..63], then 64
 * rounds over the working variables a..h. */
static void sha256_block(uint32_t st[8], const uint8_t *p)
{
    uint32_t w[64];
    for (int t = 0; t < 16; t++)
        w[t] = (uint32_t)p[4 * t] << 24 | (uint32_t)p[4 * t + 1] << 16 |
               (uint32_t)p[4 * t + 2] << 8 | (uint32_t)p[4 * t + 3];
    for (int t = 16; t < 64; t++) {
        uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
        uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
        w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    uint32_t a = st[0], b = st[1], c = st[2], d = st[3];
    uint32_t e = st[4], f = st[5], g = st[6], h = st[7];
    for (int t = 0; t < 64; t++) {
        uint32_t S1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25);
        uint32_t ch = (e & f) ^ (~e & g);
        uint32_t t1 = h + S1 + ch + K[t] + w[t];
        uint32_t S0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22);
        uint32_t maj = (a & b) ^ (a & c) ^ (b & c);
        uint32_t t2 = S0 + maj;
        h = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    st[0] += a;
    st[1] += b;
    st[2] += c;
    st[3] += d;
    st[4] += e;
    st[5] += f;
    st[6] += g;
    st[7] += h;
}

static void portable_init(sha256_ctx *c)
{
    /* FIPS 180-4 5.3.3: fractional parts of the square roots of the first 8 primes. */
    static const uint32_t H0[8] = {
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
        0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
    };
    memcpy(c->state, H0, sizeof H0);
    c->n_bytes = 0;
    c->block_len = 0;
}

static void portable_update(sha256_ctx *c, const void *data, size_t len)
{
    const uint8_t *p = data;
    if (c->block_len > 0) {
        size_t take = 64 - c->block_len;
        if (take > len)
            take = len;
        memcpy(c->block + c->block_len, p, take);
        c->block_len += take;
        p += take;
        len -= take;
        if (c->block_len < 64)
            return;
        sha256_block(c->state, c->block);
        c->block_len = 0;
    }
    /* Whole blocks straight from the input: no copy. */
    for (; len >= 64; p += 64, len -= 64)
        sha256_block(c->state, p);
    if (len > 0) {
        memcpy(c->block, p, len);
        c->block_len = len;
    }
}

static void portable_final_hex(sha256_ctx *c, char hex[65])
{
    /* FIPS 180-4 5.1.1: append 0x80, zeros up to 56 mod 64, then the message
     * length in bits as a 64-bit big-endian integer. */
    uint64_t bits = c->n_bytes * 8;
    uint8_t pad[72] = {0x80};
    size_t pad_len = (c->block_len < 56) ? 56 - c->block_len : 120 - c->block_len;
    for (int i = 0; i < 8; i++)
        pad[pad_len + (size_t)i] = (uint8_t)(bits >> (56 - 8 * i));
    portable_update(c, pad, pad_len + 8);

    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 4; j++) {
            uint8_t byte = (uint8_t)(c->state[i] >> (24 - 8 * j));
            hex[8 * i + 2 * j] = digits[byte >> 4];
            hex[8 * i + 2 * j + 1] = digits[byte & 15];
        }
    hex[64] = '\0';
}

/* ---- the API: EVP when it can, else the code above ---------------------- */

static void hex_of(const unsigned char *md, char hex[65])
{
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = digits[md[i] >> 4];
        hex[2 * i + 1] = digits[md[i] & 15];
    }
    hex[64] = '\0';
}

void sha256_init(sha256_ctx *c)
{
    c->n_bytes = 0;
    c->failed = false;
    portable_init(c);
    EVP_MD_CTX *e = EVP_MD_CTX_new();
    if (e && EVP_DigestInit_ex(e, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(e);
        e = NULL;
    }
    c->evp = e;
}

void sha256_update(sha256_ctx *c, const void *data, size_t len)
{
    c->n_bytes += len;
    if (c->evp) {
        if (EVP_DigestUpdate(c->evp, data, len) == 1)
            return;
        /* not with the default provider; the bytes so far are lost, so the
         * digest cannot be finished: final_hex gives 64 zeros */
        EVP_MD_CTX_free(c->evp);
        c->evp = NULL;
        c->failed = true;
        return;
    }
    portable_update(c, data, len);
}

void sha256_final_hex(sha256_ctx *c, char hex[65])
{
    if (c->evp) {
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned int n = 0;
        const int ok = EVP_DigestFinal_ex(c->evp, md, &n);
        EVP_MD_CTX_free(c->evp);
        c->evp = NULL;
        if (ok == 1 && n == 32) {
            hex_of(md, hex);
            return;
        }
        c->failed = true;
    }
    if (c->failed) { /* never a plausible digest */
        memset(hex, '0', 64);
        hex[64] = '\0';
        return;
    }
    portable_final_hex(c, hex);
}

void sha256_hex(const void *data, size_t len, char hex[65])
{
    sha256_ctx c;
    sha256_init(&c);
    sha256_update(&c, data, len);
    sha256_final_hex(&c, hex);
}

ps_status sha256_file_hex(const char *path, char hex[65])
{
    /* 1 MiB reads: few syscalls for multi-GB checkpoints, and a heap buffer
     * so callers on small thread stacks are safe. */
    enum { CHUNK = 1 << 20 };
    hex[0] = '\0';
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return err_set(PS_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    uint8_t *buf = malloc(CHUNK);
    if (!buf) {
        close(fd);
        return err_set(PS_ERR_NOMEM, "%s: cannot allocate a %d-byte read buffer", path, CHUNK);
    }
    sha256_ctx c;
    sha256_init(&c);
    for (;;) {
        ssize_t got = read(fd, buf, CHUNK);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            sha256_final_hex(&c, hex); /* frees the context */
            hex[0] = '\0';
            free(buf);
            close(fd);
            return err_set(PS_ERR_IO, "%s: read failed after %llu bytes: %s", path,
                           (unsigned long long)c.n_bytes, strerror(e));
        }
        if (got == 0)
            break;
        sha256_update(&c, buf, (size_t)got);
    }
    free(buf);
    close(fd);
    sha256_final_hex(&c, hex);
    return PS_OK;
}
