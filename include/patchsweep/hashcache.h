/*
 * hashcache: the sha256 of a (large) file, computed once per version of the
 * file and then read back from a per-user cache.
 *
 * Key: the file's device, inode, size and modification time with its
 * nanoseconds (fstat of the opened file).  Any change to the file's bytes
 * through the file system changes its mtime, and a file replaced by another
 * (new inode) or copied elsewhere misses the cache; a file rewritten within
 * the same nanosecond to the same size by a tool that then restores its
 * mtime is the one case it cannot see (as make and rsync cannot).
 *
 * Where: $PATCHSWEEP_HASH_CACHE_DIR if set, else
 * $XDG_CACHE_HOME/patchsweep/sha256, else $HOME/.cache/patchsweep/sha256.
 * One entry per key, the file D-I-S-M.N (device, inode, size in hex,
 * mtime seconds and nanoseconds in decimal) holding the 64 lowercase hex
 * digits and a newline; written as a temporary file and renamed into place
 * (atomic: a reader sees the whole entry or none).  An entry that is not
 * exactly that (truncated, corrupt, unreadable) is ignored and rewritten.
 * An entry is stored only when the file's stat is the same after hashing as
 * before (not modified while it was read).  Failing to create or write the
 * cache is never an error: the hash is computed and returned.
 * PATCHSWEEP_HASH_CACHE=off (or 0, no) disables the cache (read and write).
 *
 * Hashing reads the file with read(2) in 4 MiB blocks through sha256.h
 * (libcrypto).
 */
#ifndef PS_HASHCACHE_H
#define PS_HASHCACHE_H

#include <stdbool.h>
#include <stdint.h>

#include "err.h"

/* The sha256 of the file at `path` as 64 lowercase hex digits and a NUL;
 * *cached (may be NULL) tells whether it came from the cache. */
ps_status hashcache_file_sha256(const char *path, char hex[65], bool *cached);

/* What this process did so far (for PATCHSWEEP_HASH_DEBUG and the tests). */
typedef struct {
    uint64_t files_hashed; /* files read and hashed */
    uint64_t bytes_hashed;
    uint64_t cache_hits;   /* hashes taken from the cache */
} hashcache_counters;

hashcache_counters hashcache_get_counters(void);

/* The cache directory in use (see above), or NULL when disabled or when
 * no directory can be named (no HOME); the string is static. */
const char *hashcache_dir(void);

#endif
