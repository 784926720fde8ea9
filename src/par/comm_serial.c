/* comm for one process without MPI: every collective is the identity. */
#include "comm.h"

#include <stdlib.h>
#include <string.h>

struct comm {
    int unused;
};

ps_status comm_init(comm **c, int *argc, char ***argv)
{
    (void)argc, (void)argv;
    *c = calloc(1, sizeof **c);
    return *c ? PS_OK : err_set(PS_ERR_NOMEM, "out of memory");
}

void comm_finalize(comm *c) { free(c); }

void comm_abort(comm *c, int code)
{
    (void)c;
    exit(code);
}

size_t comm_rank(const comm *c) { (void)c; return 0; }
size_t comm_size(const comm *c) { (void)c; return 1; }
size_t comm_local_size(const comm *c) { (void)c; return 1; }
size_t comm_local_rank(const comm *c) { (void)c; return 0; }
const char *comm_library(void) { return "serial (no MPI)"; }

ps_status comm_bcast(comm *c, void *buf, size_t bytes)
{
    (void)c, (void)buf, (void)bytes;
    return PS_OK;
}

ps_status comm_gatherv(comm *c, const void *send, size_t send_bytes, void *recv, const size_t *counts)
{
    (void)c, (void)counts;
    if (send_bytes && recv != send)
        memmove(recv, send, send_bytes);
    return PS_OK;
}

ps_status comm_allreduce_sum_i64(comm *c, int64_t *buf, size_t n)
{
    (void)c, (void)buf, (void)n;
    return PS_OK;
}

ps_status comm_agree(comm *c, ps_status st)
{
    (void)c;
    return st;
}

ps_status comm_node_agree(comm *c, ps_status st)
{
    (void)c;
    return st;
}

struct comm_shared {
    void *mem;
};

ps_status comm_shared_alloc(comm *c, size_t bytes, comm_shared **shm, void **ptr)
{
    (void)c;
    *ptr = NULL;
    *shm = calloc(1, sizeof **shm);
    if (!*shm)
        return err_set(PS_ERR_NOMEM, "out of memory");
    if (bytes && !((*shm)->mem = malloc(bytes))) {
        free(*shm);
        *shm = NULL;
        return err_set(PS_ERR_NOMEM, "cannot allocate %zu bytes of shared memory", bytes);
    }
    *ptr = (*shm)->mem;
    return PS_OK;
}

ps_status comm_shared_publish(comm *c, comm_shared *shm, ps_status st)
{
    (void)c, (void)shm;
    return st;
}

void comm_shared_free(comm *c, comm_shared *shm)
{
    (void)c;
    if (shm)
        free(shm->mem);
    free(shm);
}
