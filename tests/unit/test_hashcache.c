/*
 * hashcache: a file's sha256 computed once per (device, inode, size, mtime)
 * and then read from the cache; a touched file, a corrupt or unreadable
 * entry, and PATCHSWEEP_HASH_CACHE=off all lead back to hashing.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define TEST_TMPDIR_NAME "ps_test_hashcache"
#include "fsutil.h"
#include "hashcache.h"
#include "sha256.h"
#include "test_tmpdir.h"

static char cache_dir[PATH_MAX + 16], data_path[PATH_MAX + 16];

static int setup(void **state)
{
    if (setup_dir(state))
        return -1;
    snprintf(cache_dir, sizeof cache_dir, "%s/cache/sub", tmpdir); /* created on first store */
    snprintf(data_path, sizeof data_path, "%s/data.bin", tmpdir);
    setenv("PATCHSWEEP_HASH_CACHE_DIR", cache_dir, 1);
    unsetenv("PATCHSWEEP_HASH_CACHE");
    return 0;
}

static void write_data(const char *text)
{
    FILE *f = fopen(data_path, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* The cache's one entry (there is one per test below). */
static void entry_of(char *out, size_t n)
{
    DIR *d = opendir(cache_dir);
    assert_non_null(d);
    struct dirent *e;
    out[0] = '\0';
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            snprintf(out, n, "%s/%s", cache_dir, e->d_name);
    closedir(d);
    assert_true(out[0] != '\0');
}

static void rm_cache(void)
{
    DIR *d = opendir(cache_dir);
    if (!d)
        return;
    struct dirent *e;
    char p[PATH_MAX + 300];
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            snprintf(p, sizeof p, "%s/%s", cache_dir, e->d_name);
            unlink(p);
        }
    closedir(d);
}

static void test_hit_after_miss(void **state)
{
    (void)state;
    rm_cache();
    write_data("abc");
    char hex[65], want[65];
    sha256_hex("abc", 3, want);
    bool cached = true;
    hashcache_counters c0 = hashcache_get_counters();
    assert_int_equal(hashcache_file_sha256(data_path, hex, &cached), PS_OK);
    assert_string_equal(hex, want);
    assert_false(cached);
    hashcache_counters c1 = hashcache_get_counters();
    assert_int_equal(c1.files_hashed, c0.files_hashed + 1);
    assert_int_equal(c1.bytes_hashed, c0.bytes_hashed + 3);
    assert_int_equal(hashcache_file_sha256(data_path, hex, &cached), PS_OK);
    assert_string_equal(hex, want);
    assert_true(cached);
    hashcache_counters c2 = hashcache_get_counters();
    assert_int_equal(c2.files_hashed, c1.files_hashed);
    assert_int_equal(c2.cache_hits, c1.cache_hits + 1);
    /* the entry: 64 hex digits and a newline */
    char entry[PATH_MAX + 300], *text = NULL;
    size_t len = 0;
    entry_of(entry, sizeof entry);
    assert_int_equal(fs_read_file(entry, 100, &text, &len), PS_OK);
    assert_int_equal(len, 65);
    assert_memory_equal(text, want, 64);
    free(text);
}

/* A new mtime (same size, same inode) is a new key: hashed again, and the
 * new content's hash is returned, never the stale one. */
static void test_miss_after_touch(void **state)
{
    (void)state;
    rm_cache();
    write_data("abc");
    char hex[65], want[65];
    bool cached;
    assert_int_equal(hashcache_file_sha256(data_path, hex, &cached), PS_OK);
    write_data("abd");
    struct timespec ts[2] = {{.tv_nsec = UTIME_NOW}, {.tv_sec = 1234567890, .tv_nsec = 123456789}};
    assert_int_equal(utimensat(AT_FDCWD, data_path, ts, 0), 0);
    assert_int_equal(hashcache_file_sha256(data_path, hex, &cached), PS_OK);
    sha256_hex("abd", 3, want);
    assert_false(cached);
    assert_string_equal(hex, want);
    /* only the nanoseconds differ: still a different key */
    ts[1].tv_nsec = 123456790;
    assert_int_equal(utimensat(AT_FDCWD, data_path, ts, 0), 0);
    assert_int_equal(hashcache_file_sha256(data_path, hex, &cached), PS_OK);
    assert_false(cached);
    assert_int_equal(hashcache_file_sha256(data_path, hex, &cached), PS_OK);
    assert_true(cached);
    assert_string_equal(hex, want);
}

/* A corrupt entry (wrong length, not hex, unreadable) is ignored: the file
 * is hashed and the entry rewritten. */
static void test_corrupt_entry(void **state)
{
    (void)state;
    static const char *bad[] = {"", "0123", "zz", NULL};
    char big[80];
    memset(big, 'g', 64);
    strcpy(big + 64, "\n");
    bad[3] = big;
    for (size_t i = 0; i < 5; i++) {
        rm_cache();
        write_data("hello");
        char hex[65], want[65], entry[PATH_MAX + 300];
        sha256_hex("hello", 5, want);
        bool cached;
        assert_int_equal(hashcache_file_sha256(data_path, hex, &cached), PS_OK);
        entry_of(entry, sizeof entry);
        if (i < 4) {
            FILE *f = fopen(entry, "wb");
            assert_non_null(f);
            fputs(bad[i], f);
            fclose(f);
        } else { /* unreadable: a directory where the entry should be */
            assert_int_equal(unlink(entry), 0);
            assert_int_equal(mkdir(entry, 0700), 0);
        }
        hashcache_counters c0 = hashcache_get_counters();
        assert_int_equal(hashcache_file_sha256(data_path, hex, &cached), PS_OK);
        assert_false(cached);
        assert_string_equal(hex, want);
        assert_int_equal(hashcache_get_counters().files_hashed, c0.files_hashed + 1);
        if (i < 4) { /* rewritten: a hit next time */
            assert_int_equal(hashcache_file_sha256(data_path, hex, &cached), PS_OK);
            assert_true(cached);
            assert_string_equal(hex, want);
        } else {
            rmdir(entry);
        }
    }
}

static void test_disabled(void **state)
{
    (void)state;
    rm_cache();
    write_data("abc");
    setenv("PATCHSWEEP_HASH_CACHE", "off", 1);
    assert_null(hashcache_dir());
    char hex[65];
    bool cached;
    assert_int_equal(hashcache_file_sha256(data_path, hex, &cached), PS_OK);
    assert_int_equal(hashcache_file_sha256(data_path, hex, &cached), PS_OK);
    assert_false(cached);
    DIR *d = opendir(cache_dir); /* nothing written */
    assert_non_null(d);
    struct dirent *e;
    while ((e = readdir(d)))
        assert_true(e->d_name[0] == '.');
    closedir(d);
    unsetenv("PATCHSWEEP_HASH_CACHE");
    assert_string_equal(hashcache_dir(), cache_dir);
}

static void test_missing_file(void **state)
{
    (void)state;
    char hex[65], p[PATH_MAX + 32];
    snprintf(p, sizeof p, "%s/no_such_file", tmpdir);
    ASSERT_ERROR(hashcache_file_sha256(p, hex, NULL), PS_ERR_IO, "no_such_file", "cannot open");
    assert_string_equal(hex, "");
}

/* An unwritable cache directory is not an error: the hash is computed. */
static void test_cache_unwritable(void **state)
{
    (void)state;
    write_data("abc");
    char blocker[PATH_MAX + 32], want[65], hex[65];
    snprintf(blocker, sizeof blocker, "%s/blocker", tmpdir);
    FILE *f = fopen(blocker, "w");
    assert_non_null(f);
    fclose(f);
    char sub[PATH_MAX + 64];
    snprintf(sub, sizeof sub, "%s/under", blocker); /* a directory under a file */
    setenv("PATCHSWEEP_HASH_CACHE_DIR", sub, 1);
    sha256_hex("abc", 3, want);
    assert_int_equal(hashcache_file_sha256(data_path, hex, NULL), PS_OK);
    assert_string_equal(hex, want);
    setenv("PATCHSWEEP_HASH_CACHE_DIR", cache_dir, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hit_after_miss),   cmocka_unit_test(test_miss_after_touch),
        cmocka_unit_test(test_corrupt_entry),    cmocka_unit_test(test_disabled),
        cmocka_unit_test(test_missing_file),     cmocka_unit_test(test_cache_unwritable),
    };
    return cmocka_run_group_tests(tests, setup, teardown_dir);
}
