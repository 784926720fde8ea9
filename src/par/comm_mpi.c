/* comm over MPI: the only file of the project that calls MPI. */
#include "comm.h"

#include <dlfcn.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>

struct comm {
    MPI_Comm world, node;
    int rank, size, local_rank, local_size;
};

/* MPI counts are int: larger messages go in pieces of at most 1 GiB. */
#define COMM_PIECE ((size_t)1 << 30)

static ps_status check(int rc, const char *what)
{
    if (rc == MPI_SUCCESS)
        return PS_OK;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    return err_set(PS_ERR_INTERNAL, "MPI %s failed: %s", what, msg);
}

/* Every rank of the job on this node (Open MPI's launcher says so in each
 * rank's environment before MPI_Init): then the shared-memory transport is
 * the only one used, and Open MPI is asked for it directly (pml ob1, with
 * its shared-memory btl), unless the user chose a pml (OMPI_MCA_pml, which
 * mpirun --mca also sets).  Otherwise Open MPI opens every pml to pick one,
 * and the cm pml's probes of network libraries (its PSM and PSM2 mtl
 * components) took 0.21 of MPI_Init's 0.23 s on the demo's machine, on
 * every run of one node: more than a fifth of a one-second sweep, at 1
 * rank and at 2 (README: writes overlap compute).  Every rank decides the
 * same from the same variables, so they all pick the same pml. */
static void choose_node_transport(void)
{
#ifdef OPEN_MPI
    const char *size = getenv("OMPI_COMM_WORLD_SIZE"), *local = getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
    if (size && local && *size && !strcmp(size, local) && !getenv("OMPI_MCA_pml"))
        setenv("OMPI_MCA_pml", "ob1", 0);
#endif
}

ps_status comm_init(comm **out, int *argc, char ***argv)
{
    int provided, initialized;
    MPI_Initialized(&initialized);
    if (!initialized)
        choose_node_transport();
    if (!initialized && MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
        return err_set(PS_ERR_INTERNAL, "MPI_Init_thread failed");
    comm *c = calloc(1, sizeof *c);
    if (!c)
        return err_set(PS_ERR_NOMEM, "out of memory");
    c->world = MPI_COMM_WORLD;
    /* Errors come back as codes, so they become one-line messages. */
    MPI_Comm_set_errhandler(c->world, MPI_ERRORS_RETURN);
    MPI_Comm_rank(c->world, &c->rank);
    MPI_Comm_size(c->world, &c->size);
    ps_status st = check(MPI_Comm_split_type(c->world, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &c->node),
                         "Comm_split_type");
    if (st) {
        free(c);
        return st;
    }
    MPI_Comm_rank(c->node, &c->local_rank);
    MPI_Comm_size(c->node, &c->local_size);
    *out = c;
    return PS_OK;
}

void comm_finalize(comm *c)
{
    if (!c)
        return;
    MPI_Comm_free(&c->node);
    free(c);
    MPI_Finalize();
}

void comm_abort(comm *c, int code) { MPI_Abort(c ? c->world : MPI_COMM_WORLD, code); }

size_t comm_rank(const comm *c) { return (size_t)c->rank; }
size_t comm_size(const comm *c) { return (size_t)c->size; }
size_t comm_local_size(const comm *c) { return (size_t)c->local_size; }
size_t comm_local_rank(const comm *c) { return (size_t)c->local_rank; }

const char *comm_library(void)
{
    static char name[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    if (!name[0]) {
        MPI_Get_library_version(name, &len);
        name[strcspn(name, ",\n")] = '\0'; /* "Open MPI v4.1.4" */
    }
    return name;
}

ps_status comm_bcast(comm *c, void *buf, size_t bytes)
{
    for (size_t off = 0; off < bytes; off += COMM_PIECE) {
        size_t n = bytes - off < COMM_PIECE ? bytes - off : COMM_PIECE;
        ps_status st = check(MPI_Bcast((char *)buf + off, (int)n, MPI_BYTE, 0, c->world), "Bcast");
        if (st)
            return st;
    }
    return PS_OK;
}

ps_status comm_allreduce_sum_i64(comm *c, int64_t *buf, size_t n)
{
    const size_t piece = COMM_PIECE / sizeof *buf;
    for (size_t off = 0; off < n; off += piece) {
        size_t k = n - off < piece ? n - off : piece;
        ps_status st = check(MPI_Allreduce(MPI_IN_PLACE, buf + off, (int)k, MPI_INT64_T, MPI_SUM, c->world),
                             "Allreduce");
        if (st)
            return st;
    }
    return PS_OK;
}

ps_status comm_gatherv(comm *c, const void *send, size_t send_bytes, void *recv, const size_t *counts)
{
    /* Gatherv counts and displacements are int: refuse what does not fit
     * rather than truncate (a chunk's results are far smaller). */
    int *cnt = NULL, *disp = NULL;
    if (send_bytes > INT_MAX)
        return err_set(PS_ERR_RANGE, "MPI Gatherv: %zu bytes from one rank exceed an int count", send_bytes);
    if (c->rank == 0) {
        cnt = malloc((size_t)c->size * sizeof *cnt);
        disp = malloc((size_t)c->size * sizeof *disp);
        if (!cnt || !disp) {
            free(cnt), free(disp);
            return err_set(PS_ERR_NOMEM, "out of memory");
        }
        size_t off = 0;
        for (int r = 0; r < c->size; r++) {
            if (counts[r] > INT_MAX || off > INT_MAX) {
                free(cnt), free(disp);
                return err_set(PS_ERR_RANGE, "MPI Gatherv: %zu bytes exceed an int displacement", off);
            }
            cnt[r] = (int)counts[r];
            disp[r] = (int)off;
            off += counts[r];
        }
    }
    ps_status st = check(MPI_Gatherv(send, (int)send_bytes, MPI_BYTE, recv, cnt, disp, MPI_BYTE, 0, c->world),
                         "Gatherv");
    free(cnt);
    free(disp);
    return st;
}

/* The lowest failing rank of `group` (where this process is `me` of `n`)
 * gives its status and message to every member; ranks named by world rank. */
static ps_status agree_on(comm *c, MPI_Comm group, int me, int n, ps_status st)
{
    /* The lowest failing rank: MIN over (rank if failed else size). */
    int mine = st == PS_OK ? n : me, first;
    ps_status rc = check(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, group), "Allreduce");
    if (rc)
        return rc;
    if (first == n)
        return PS_OK;
    /* That rank's status and message to everyone. */
    struct {
        int status, world_rank;
        char msg[1000];
    } m = {(int)st, c->rank, ""};
    if (me == first)
        snprintf(m.msg, sizeof m.msg, "%s", err_msg());
    if ((rc = check(MPI_Bcast(&m, sizeof m, MPI_BYTE, first, group), "Bcast")))
        return rc;
    if (m.world_rank == 0 || me == first)
        err_set((ps_status)m.status, "%s", m.msg);
    else
        err_set((ps_status)m.status, "rank %d: %s", m.world_rank, m.msg);
    return (ps_status)m.status;
}

ps_status comm_agree(comm *c, ps_status st) { return agree_on(c, c->world, c->rank, c->size, st); }

ps_status comm_node_agree(comm *c, ps_status st) { return agree_on(c, c->node, c->local_rank, c->local_size, st); }

struct comm_shared {
    MPI_Win win;
};

/* Whether a line of an MCA parameter file (name = value, # comments) may
 * set `name`. */
static bool param_file_sets(const char *path, const char *name)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return false;
    char line[4096];
    bool found = false;
    while (!found && fgets(line, sizeof line, f)) {
        const char *s = line + strspn(line, " \t");
        found = *s != '#' && strstr(s, name) != NULL;
    }
    fclose(f);
    return found;
}

/* Open MPI 4.1's osc_sm_backing_directory without MPI_T: from the
 * environment (OMPI_MCA_..., which mpirun --mca sets too), else its
 * default /dev/shm unless a parameter file names it (the user's, the
 * system's: Debian's /etc/openmpi, $OPAL_PREFIX/etc or etc/ beside the
 * directory of the libmpi in use; or those of
 * OMPI_MCA_mca_base_param_files).  false: ask MPI_T.
 * MPI_T's initialization opens every MCA component: 0.21 s on the demo's
 * machine, once per node rank 0 of every run of 2 or more ranks a node. */
static bool backing_directory_fast(char *dir, size_t cap)
{
#if defined(OPEN_MPI) && OMPI_MAJOR_VERSION == 4 && OMPI_MINOR_VERSION == 1
    const char *name = "osc_sm_backing_directory", *env = getenv("OMPI_MCA_osc_sm_backing_directory");
    if (env) {
        snprintf(dir, cap, "%s", env);
        return true;
    }
    char path[4096];
    const char *home = getenv("HOME"), *files = getenv("OMPI_MCA_mca_base_param_files");
    if (files) {
        /* a list separated by ',' (or ':') */
        for (const char *s = files; *s;) {
            size_t n = strcspn(s, ",:");
            snprintf(path, sizeof path, "%.*s", (int)n, s);
            if (param_file_sets(path, name))
                return false;
            s += n + (s[n] != '\0');
        }
    } else {
        snprintf(path, sizeof path, "%s/.openmpi/mca-params.conf", home ? home : "");
        if ((home && param_file_sets(path, name)) || param_file_sets("/etc/openmpi/openmpi-mca-params.conf", name))
            return false;
        const char *prefix = getenv("OPAL_PREFIX");
        snprintf(path, sizeof path, "%s/etc/openmpi-mca-params.conf", prefix ? prefix : "");
        if (prefix && param_file_sets(path, name))
            return false;
        /* PREFIX/lib/libmpi.so -> PREFIX/etc/openmpi-mca-params.conf */
        Dl_info di;
        if (dladdr((void *)MPI_Init, &di) && di.dli_fname) {
            snprintf(path, sizeof path, "%s", di.dli_fname);
            char *slash = strrchr(path, '/');
            if (slash) {
                *slash = '\0';
                slash = strrchr(path, '/');
            }
            if (slash) {
                *slash = '\0';
                size_t used = strlen(path);
                snprintf(path + used, sizeof path - used, "/etc/openmpi-mca-params.conf");
                if (param_file_sets(path, name))
                    return false;
            }
        }
    }
    snprintf(dir, cap, "/dev/shm");
    return true;
#else
    (void)dir, (void)cap;
    return false;
#endif
}

/* Where Open MPI puts a shared window's backing file: its MCA variable
 * osc_sm_backing_directory (default /dev/shm), read through MPI_T unless
 * backing_directory_fast knows it; "" when the MPI library has no such
 * variable. */
static void backing_directory(char *dir, size_t cap)
{
    dir[0] = '\0';
    if (backing_directory_fast(dir, cap))
        return;
    int provided, index, count = 0;
    if (MPI_T_init_thread(MPI_THREAD_SINGLE, &provided) != MPI_SUCCESS)
        return;
    MPI_T_cvar_handle h;
    if (MPI_T_cvar_get_index("osc_sm_backing_directory", &index) == MPI_SUCCESS &&
        MPI_T_cvar_handle_alloc(index, NULL, &h, &count) == MPI_SUCCESS) {
        char *buf = count > 0 ? calloc((size_t)count + 1, 1) : NULL;
        if (buf && MPI_T_cvar_read(h, buf) == MPI_SUCCESS)
            snprintf(dir, cap, "%s", buf);
        free(buf);
        MPI_T_cvar_handle_free(&h);
    }
    MPI_T_finalize();
}

/* Node rank 0, before the window: does its backing file fit?  Open MPI
 * fails the allocation on node rank 0 alone when it does not, leaving the
 * others waiting inside MPI_Win_allocate_shared, so this is checked first,
 * where every rank of the node can learn of it. */
static ps_status check_room(size_t bytes)
{
    char dir[4096];
    backing_directory(dir, sizeof dir);
    struct statvfs vfs;
    if (!dir[0] || statvfs(dir, &vfs) != 0)
        return PS_OK; /* unknown: let MPI try */
    double avail = (double)vfs.f_bavail * (double)vfs.f_frsize;
    if (avail < (double)bytes)
        return err_set(PS_ERR_NOMEM,
                       "%s has %.0f MiB free but the node's shared memory needs %.0f MiB (Open MPI's "
                       "osc_sm_backing_directory: give it more room, e.g. docker run --shm-size, or set "
                       "OMPI_MCA_osc_sm_backing_directory to a local directory that has it)",
                       dir, avail / 1048576.0, (double)bytes / 1048576.0);
    return PS_OK;
}

ps_status comm_shared_alloc(comm *c, size_t bytes, comm_shared **shm, void **ptr)
{
    *shm = NULL;
    *ptr = NULL;
    /* Same size everywhere first: a rank that loaded another checkpoint (a
     * file replaced under a running job) must not read past node rank 0's. */
    unsigned long long want = bytes;
    ps_status st = check(MPI_Bcast(&want, 1, MPI_UNSIGNED_LONG_LONG, 0, c->node), "Bcast");
    if (st == PS_OK && want != bytes)
        st = err_set(PS_ERR_INVALID, "shared memory of %zu bytes requested here but %llu on the node's first rank",
                     bytes, want);
    if (st == PS_OK && bytes > (size_t)PTRDIFF_MAX)
        st = err_set(PS_ERR_NOMEM, "shared memory of %zu bytes is over MPI's limit", bytes);
    /* (a node of one rank: Open MPI mallocs the window) */
    if (st == PS_OK && c->local_rank == 0 && c->local_size > 1 && bytes > 0)
        st = check_room(bytes);
    comm_shared *s = st == PS_OK ? calloc(1, sizeof *s) : NULL;
    if (st == PS_OK && !s)
        st = err_set(PS_ERR_NOMEM, "out of memory");
    if ((st = comm_node_agree(c, st))) {
        free(s);
        return st;
    }
    void *base = NULL;
    st = check(MPI_Win_allocate_shared(c->local_rank == 0 ? (MPI_Aint)bytes : 0, 1, MPI_INFO_NULL, c->node, &base,
                                       &s->win),
               "Win_allocate_shared");
    if (st) {
        /* Not collective: the other ranks of the node may be inside it. */
        free(s);
        return err_wrap(PS_ERR_INTERNAL, "%zu bytes of node-shared memory (the node's other ranks may be "
                        "waiting for it: end the job)", bytes);
    }
    MPI_Win_set_errhandler(s->win, MPI_ERRORS_RETURN);
    MPI_Aint size = 0;
    int disp_unit = 0;
    st = check(MPI_Win_shared_query(s->win, 0, &size, &disp_unit, &base), "Win_shared_query");
    if (st == PS_OK && (size_t)size < bytes)
        st = err_set(PS_ERR_INTERNAL, "MPI shared window of %zu bytes is only %zu bytes long", bytes, (size_t)size);
    /* One passive-target epoch for the window's life: MPI_Win_sync (in
     * comm_shared_publish) is only defined inside one. */
    if (st == PS_OK)
        st = check(MPI_Win_lock_all(MPI_MODE_NOCHECK, s->win), "Win_lock_all");
    bool locked = st == PS_OK;
    if ((st = comm_node_agree(c, st))) {
        if (locked)
            MPI_Win_unlock_all(s->win);
        MPI_Win_free(&s->win);
        free(s);
        /* agreed: every rank of the node returns it, none is left waiting */
        return st == PS_ERR_INTERNAL ? err_wrap(PS_ERR_INVALID, "node-shared memory") : st;
    }
    *shm = s;
    *ptr = bytes ? base : NULL;
    return PS_OK;
}

ps_status comm_shared_publish(comm *c, comm_shared *shm, ps_status st)
{
    /* MPI's "unified" shared window: sync, process synchronization, sync
     * (MPI 4.0 section 12.7, example 12.21). */
    if (!shm)
        return comm_node_agree(c, st);
    ps_status rc = check(MPI_Win_sync(shm->win), "Win_sync");
    st = comm_node_agree(c, st ? st : rc);
    rc = check(MPI_Win_sync(shm->win), "Win_sync");
    return st ? st : comm_node_agree(c, rc);
}

void comm_shared_free(comm *c, comm_shared *shm)
{
    (void)c;
    if (!shm)
        return;
    MPI_Win_unlock_all(shm->win);
    MPI_Win_free(&shm->win);
    free(shm);
}
