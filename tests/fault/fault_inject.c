/*
 * The test build's fault injection (include/patchsweep/fault.h):
 * PS_FAULT=SITE:N:ACTION[@RANK][,...].  Linked into patchsweep-faults ahead
 * of the library, whose no-op fault_point it replaces; its write(),
 * pwrite(), fsync() and fdatasync() stand in for libc's (symbol
 * interposition: the executable's definition wins for the library and for
 * HDF5 alike) and fail with ENOSPC/EDQUOT/EIO on the sites PS_FAULT names.
 */
#include "fault.h"

#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_SPECS 8

typedef struct {
    char site[64];
    unsigned long n, calls;
    char action[16];
    long rank; /* -1: every process */
} spec;

static spec specs[MAX_SPECS];
static int n_specs = -1; /* -1: PS_FAULT not read yet */

static long my_rank(void)
{
    const char *vars[] = {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        if (v && *v)
            return strtol(v, NULL, 10);
    }
    return 0;
}

static void parse(void)
{
    if (n_specs >= 0)
        return;
    n_specs = 0;
    const char *env = getenv("PS_FAULT");
    if (!env)
        return;
    char buf[512];
    snprintf(buf, sizeof buf, "%s", env);
    const long rank = my_rank();
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok && n_specs < MAX_SPECS;
         tok = strtok_r(NULL, ",", &save)) {
        spec s = {.rank = -1};
        char *c1 = strchr(tok, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (!c1 || !c2 || (size_t)(c1 - tok) >= sizeof s.site) {
            fprintf(stderr, "fault: PS_FAULT=%s: not SITE:N:ACTION[@RANK]\n", env);
            _exit(71);
        }
        memcpy(s.site, tok, (size_t)(c1 - tok));
        s.n = strtoul(c1 + 1, NULL, 10);
        char *at = strchr(c2 + 1, '@');
        if (at) {
            s.rank = strtol(at + 1, NULL, 10);
            *at = '\0';
        }
        snprintf(s.action, sizeof s.action, "%s", c2 + 1);
        if (s.rank >= 0 && s.rank != rank)
            continue; /* another rank's fault */
        specs[n_specs++] = s;
    }
}

static spec *find(const char *site)
{
    parse();
    for (int i = 0; i < n_specs; i++)
        if (strcmp(specs[i].site, site) == 0)
            return &specs[i];
    return NULL;
}

bool fault_point(const char *site)
{
    spec *s = site ? find(site) : NULL;
    if (!s || ++s->calls != s->n)
        return false;
    fprintf(stderr, "fault: %s #%lu: %s\n", site, s->n, s->action);
    if (strcmp(s->action, "kill") == 0)
        raise(SIGKILL);
    else if (strcmp(s->action, "term") == 0)
        raise(SIGTERM);
    else if (strcmp(s->action, "exit") == 0)
        _exit(70);
    else if (strcmp(s->action, "stop") == 0)
        raise(SIGSTOP);
    else if (strcmp(s->action, "error") == 0)
        return true;
    else if (strcmp(s->action, "parent-term") == 0 || strcmp(s->action, "parent-int") == 0) {
        /* mpirun ends the ranks on either (fault.h): held here until it
         * does, so the run cannot end first, however long mpirun takes */
        kill(getppid(), strcmp(s->action, "parent-term") == 0 ? SIGTERM : SIGINT);
        raise(SIGSTOP);
    }
    else if (strcmp(s->action, "parent-usr1") == 0)
        kill(getppid(), SIGUSR1);
    else {
        fprintf(stderr, "fault: %s: unknown action '%s'\n", site, s->action);
        _exit(71);
    }
    return false;
}

/* ---- I/O errors ------------------------------------------------------------ */

/* The errno the Nth and later calls of "OP.KIND" fail with, KIND from the
 * file behind fd (journal: *.journal; nc: *.partial); 0 to pass. */
static int io_fault(const char *op, int fd)
{
    parse();
    if (n_specs == 0)
        return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t len = readlink(link, path, sizeof path - 1);
    if (len <= 0)
        return 0;
    path[len] = '\0';
    const char *kind = NULL;
    size_t k = (size_t)len;
    if (k > 8 && strcmp(path + k - 8, ".journal") == 0)
        kind = "journal";
    else if (k > 8 && strcmp(path + k - 8, ".partial") == 0)
        kind = "nc";
    if (!kind)
        return 0;
    char site[64];
    snprintf(site, sizeof site, "%s.%s", op, kind);
    spec *s = find(site);
    if (!s || ++s->calls < s->n)
        return 0;
    int e = strcmp(s->action, "enospc") == 0 ? ENOSPC
            : strcmp(s->action, "edquot") == 0 ? EDQUOT
            : strcmp(s->action, "eio") == 0    ? EIO
                                               : -1;
    if (e < 0) {
        fprintf(stderr, "fault: %s: unknown I/O action '%s'\n", site, s->action);
        _exit(71);
    }
    if (s->calls == s->n)
        fprintf(stderr, "fault: %s #%lu: %s\n", site, s->n, s->action);
    return e;
}

typedef ssize_t (*write_fn)(int, const void *, size_t);
typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);
typedef int (*sync_fn)(int);

/* libc's own function (the next definition after this executable's). */
#define REAL(name, type) \
    static type real_##name; \
    if (!real_##name) \
        real_##name = (type)dlsym(RTLD_NEXT, #name)

ssize_t write(int fd, const void *buf, size_t n)
{
    REAL(write, write_fn);
    int e = io_fault("write", fd);
    if (e) {
        errno = e;
        return -1;
    }
    return real_write(fd, buf, n);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
    REAL(pwrite, pwrite_fn);
    int e = io_fault("write", fd);
    if (e) {
        errno = e;
        return -1;
    }
    return real_pwrite(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off)
{
    REAL(pwrite64, pwrite_fn);
    int e = io_fault("write", fd);
    if (e) {
        errno = e;
        return -1;
    }
    return real_pwrite64(fd, buf, n, off);
}

int fsync(int fd)
{
    REAL(fsync, sync_fn);
    int e = io_fault("fsync", fd);
    if (e) {
        errno = e;
        return -1;
    }
    return real_fsync(fd);
}

int fdatasync(int fd)
{
    REAL(fdatasync, sync_fn);
    int e = io_fault("fsync", fd);
    if (e) {
        errno = e;
        return -1;
    }
    return real_fdatasync(fd);
}
