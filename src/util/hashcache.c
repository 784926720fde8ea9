/*
 * hashcache: a file's sha256 once per version of the file (hashcache.h).
 */
#include "hashcache.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sha256.h"

#define HASHCACHE_READ_BYTES ((size_t)4 << 20)

static hashcache_counters counters;

hashcache_counters hashcache_get_counters(void) { return counters; }

static bool cache_disabled(void)
{
    const char *v = getenv("PATCHSWEEP_HASH_CACHE");
    return v && (strcasecmp(v, "off") == 0 || strcmp(v, "0") == 0 || strcasecmp(v, "no") == 0);
}

const char *hashcache_dir(void)
{
    static char dir[4096];
    if (cache_disabled())
        return NULL;
    const char *own = getenv("PATCHSWEEP_HASH_CACHE_DIR"), *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    int n;
    if (own && own[0])
        n = snprintf(dir, sizeof dir, "%s", own);
    else if (xdg && xdg[0] == '/')
        n = snprintf(dir, sizeof dir, "%s/patchsweep/sha256", xdg);
    else if (home && home[0] == '/')
        n = snprintf(dir, sizeof dir, "%s/.cache/patchsweep/sha256", home);
    else
        return NULL;
    return n > 0 && (size_t)n < sizeof dir ? dir : NULL;
}

/* mkdir -p of an absolute or relative path (mode 0700 for what it creates). */
static bool make_dirs(const char *path)
{
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf)
        return false;
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] != '/' && buf[i] != '\0')
            continue;
        const char c = buf[i];
        buf[i] = '\0';
        if (mkdir(buf, 0700) != 0 && errno != EEXIST)
            return false;
        buf[i] = c;
    }
    return true;
}

static bool same_version(const struct stat *a, const struct stat *b)
{
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
           a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

static bool entry_path(char *out, size_t cap, const char *dir, const struct stat *s)
{
    int n = snprintf(out, cap, "%s/%llx-%llx-%llx-%lld.%09ld", dir, (unsigned long long)s->st_dev,
                     (unsigned long long)s->st_ino, (unsigned long long)s->st_size, (long long)s->st_mtim.tv_sec,
                     (long)s->st_mtim.tv_nsec);
    return n > 0 && (size_t)n < cap;
}

/* An entry is exactly 64 lowercase hex digits and a newline. */
static bool entry_read(const char *path, char hex[65])
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    char buf[80];
    ssize_t got = read(fd, buf, sizeof buf);
    close(fd);
    if (got != 65 || buf[64] != '\n')
        return false;
    for (int i = 0; i < 64; i++)
        if (!((buf[i] >= '0' && buf[i] <= '9') || (buf[i] >= 'a' && buf[i] <= 'f')))
            return false;
    memcpy(hex, buf, 64);
    hex[64] = '\0';
    return true;
}

/* Write the entry beside its final name and rename it there; failures are
 * silent (the cache is an optimisation). */
static void entry_write(const char *dir, const char *path, const char hex[65])
{
    if (!make_dirs(dir))
        return;
    char tmp[4200];
    int n = snprintf(tmp, sizeof tmp, "%s/.tmp-XXXXXX", dir);
    if (n <= 0 || (size_t)n >= sizeof tmp)
        return;
    int fd = mkstemp(tmp);
    if (fd < 0)
        return;
    char line[65];
    memcpy(line, hex, 64);
    line[64] = '\n';
    const bool ok = write(fd, line, sizeof line) == (ssize_t)sizeof line;
    if (close(fd) != 0 || !ok || rename(tmp, path) != 0)
        unlink(tmp);
}

/* Hash an open file by reads; *after: its stat once read. */
static ps_status hash_fd(int fd, const char *path, char hex[65], struct stat *after)
{
    unsigned char *buf = malloc(HASHCACHE_READ_BYTES);
    if (!buf)
        return err_set(PS_ERR_NOMEM, "%s: cannot allocate a read buffer for hashing", path);
#ifdef POSIX_FADV_SEQUENTIAL
    (void)posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
#endif
    sha256_ctx c;
    sha256_init(&c);
    ps_status st = PS_OK;
    for (;;) {
        ssize_t got = read(fd, buf, HASHCACHE_READ_BYTES);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            st = err_set(PS_ERR_IO, "%s: read failed after %llu bytes while hashing: %s", path,
                         (unsigned long long)c.n_bytes, strerror(errno));
            break;
        }
        if (got == 0)
            break;
        sha256_update(&c, buf, (size_t)got);
    }
    free(buf);
    counters.bytes_hashed += c.n_bytes;
    sha256_final_hex(&c, hex);
    if (st != PS_OK) {
        hex[0] = '\0';
        return st;
    }
    counters.files_hashed++;
    if (fstat(fd, after) != 0)
        return err_set(PS_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    return PS_OK;
}

ps_status hashcache_file_sha256(const char *path, char hex[65], bool *cached)
{
    hex[0] = '\0';
    if (cached)
        *cached = false;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return err_set(PS_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat before, after;
    if (fstat(fd, &before) != 0) {
        int e = errno;
        close(fd);
        return err_set(PS_ERR_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    const char *dir = hashcache_dir();
    char entry[4400];
    const bool use = dir && S_ISREG(before.st_mode) && entry_path(entry, sizeof entry, dir, &before);
    if (use && entry_read(entry, hex)) {
        close(fd);
        counters.cache_hits++;
        if (cached)
            *cached = true;
        return PS_OK;
    }
    ps_status st = hash_fd(fd, path, hex, &after);
    close(fd);
    if (st == PS_OK && use && same_version(&before, &after))
        entry_write(dir, entry, hex);
    return st;
}
