/* comm over MPI: the only file of the project that calls MPI. */
#include "comm.h"

#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

ps_status comm_init(comm **out, int *argc, char ***argv)
{
    int provided, initialized;
    MPI_Initialized(&initialized);
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

ps_status comm_agree(comm *c, ps_status st)
{
    /* The lowest failing rank: MIN over (rank if failed else size). */
    int mine = st == PS_OK ? c->size : c->rank, first;
    ps_status rc = check(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, c->world), "Allreduce");
    if (rc)
        return rc;
    if (first == c->size)
        return PS_OK;
    /* That rank's status and message to everyone. */
    struct {
        int status;
        char msg[1000];
    } m = {(int)st, ""};
    if (c->rank == first)
        snprintf(m.msg, sizeof m.msg, "%s", err_msg());
    if ((rc = check(MPI_Bcast(&m, sizeof m, MPI_BYTE, first, c->world), "Bcast")))
        return rc;
    if (first == 0 || c->rank == first)
        err_set((ps_status)m.status, "%s", m.msg);
    else
        err_set((ps_status)m.status, "rank %d: %s", first, m.msg);
    return (ps_status)m.status;
}
