#include "fsutil.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

ps_status fs_read_file(const char *path, size_t max_bytes, char **data, size_t *len)
{
    *data = NULL;
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return err_set(PS_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        fclose(f);
        return err_set(PS_ERR_IO, "%s: not a regular file", path);
    }
    if ((unsigned long long)sb.st_size > max_bytes) {
        fclose(f);
        return err_set(PS_ERR_NOMEM, "%s: file is %lld bytes, over the limit of %zu bytes",
                       path, (long long)sb.st_size, max_bytes);
    }
    size_t n = (size_t)sb.st_size;
    char *buf = malloc(n + 1);
    if (!buf) {
        fclose(f);
        return err_set(PS_ERR_NOMEM, "%s: cannot allocate %zu bytes", path, n + 1);
    }
    size_t got = fread(buf, 1, n, f);
    int rerr = ferror(f);
    fclose(f);
    if (got != n || rerr) {
        free(buf);
        return err_set(PS_ERR_IO, "%s: short read (%zu of %zu bytes)", path, got, n);
    }
    buf[n] = '\0';
    *data = buf;
    *len = n;
    return PS_OK;
}

char *fs_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *s = malloc(a + b + 2);
    if (!s)
        return NULL;
    memcpy(s, dir, a);
    size_t k = a;
    if (a > 0 && dir[a - 1] != '/')
        s[k++] = '/';
    memcpy(s + k, name, b + 1);
    return s;
}

bool fs_is_file(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

char *fs_dirname(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return strdup(".");
    if (slash == path)
        return strdup("/");
    size_t n = (size_t)(slash - path);
    char *s = malloc(n + 1);
    if (!s)
        return NULL;
    memcpy(s, path, n);
    s[n] = '\0';
    return s;
}

char *fs_exe_dir(void)
{
    /* readlink does not say whether it truncated: grow until it fits. */
    for (size_t cap = 256; cap <= ((size_t)1 << 20); cap *= 2) {
        char *buf = malloc(cap);
        if (!buf)
            return NULL;
        ssize_t n = readlink("/proc/self/exe", buf, cap);
        if (n < 0) {
            free(buf);
            return NULL;
        }
        if ((size_t)n < cap) {
            buf[n] = '\0';
            char *dir = fs_dirname(buf);
            free(buf);
            return dir;
        }
        free(buf);
    }
    return NULL;
}

ps_status fs_check_output(const char *path)
{
    struct stat sb;
    if (lstat(path, &sb) == 0 && !S_ISREG(sb.st_mode))
        return err_set(PS_ERR_IO, "%s: exists and is not a regular file; refusing to replace it", path);
    return PS_OK;
}

/* ---- locks ------------------------------------------------------------------ */

ps_status fs_lock_take(fs_lock *l, const char *path, const char *what)
{
    l->fd = -1;
    l->path = strdup(path);
    if (!l->path)
        return err_set(PS_ERR_NOMEM, "out of memory");
    /* A few rounds at most: a round only repeats when the owner released
     * (and removed) the file between our open and our lock. */
    for (int round = 0; round < 100; round++) {
        int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0) {
            ps_status st = err_set(PS_ERR_IO, "%s: cannot create the lock file: %s", path, strerror(errno));
            fs_lock_release(l);
            return st;
        }
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
        if (fcntl(fd, F_SETLK, &fl) != 0) {
            int e = errno;
            char owner[256] = "";
            ssize_t n = e == EACCES || e == EAGAIN ? pread(fd, owner, sizeof owner - 1, 0) : -1;
            close(fd);
            ps_status st;
            if (n >= 0) {
                owner[n] = '\0';
                owner[strcspn(owner, "\n")] = '\0';
                st = err_set(PS_ERR_INVALID,
                             "%s is in use by another run (%s; lock %s): wait for it to end or stop it, or give "
                             "this run another output", what, owner[0] ? owner : "owner not recorded yet", path);
            } else {
                st = err_set(PS_ERR_IO, "%s: cannot lock: %s", path, strerror(e));
            }
            fs_lock_release(l);
            return st;
        }
        /* Ours, unless the file we locked was removed by its last owner
         * after we opened it: then lock the one now under the name. */
        struct stat a, b;
        if (fstat(fd, &a) != 0 || stat(path, &b) != 0 || a.st_ino != b.st_ino || a.st_dev != b.st_dev) {
            close(fd);
            continue;
        }
        char host[256] = "?", since[32] = "?", line[400];
        gethostname(host, sizeof host - 1);
        time_t now = time(NULL);
        struct tm tm;
        if (gmtime_r(&now, &tm))
            strftime(since, sizeof since, "%Y-%m-%dT%H:%M:%SZ", &tm);
        int len = snprintf(line, sizeof line, "pid %ld on host %s since %s\n", (long)getpid(), host, since);
        /* the text is for messages only: a failure to write it is no failure to lock */
        if (ftruncate(fd, 0) == 0 && pwrite(fd, line, (size_t)len, 0) < 0)
            (void)0;
        l->fd = fd;
        return PS_OK;
    }
    fs_lock_release(l);
    return err_set(PS_ERR_IO, "%s: the lock file keeps being replaced", path);
}

void fs_lock_release(fs_lock *l)
{
    /* Remove while still locked: a process waiting on this inode sees it
     * gone (fs_lock_take compares inodes) and locks the next file. */
    if (l->fd >= 0) {
        unlink(l->path);
        close(l->fd);
    }
    free(l->path);
    l->path = NULL;
    l->fd = -1;
}
