/*
 * sweep_memory: a rank's working-memory budget and every rank's memory
 * figures (the file's memory_per_rank provenance).
 */
#include "sweep_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "memstat.h"

/* ---- working memory --------------------------------------------------------
 * Beside the weights (one copy per node, see model_alloc), a rank's memory is
 * mostly its working memory: the chunk's caches (on the ranks that receive
 * them, each pair's core as broadcast, patch_pair_packed_bytes; rank 0 holds
 * the full caches, about twice that) and the fast engine's stacked rows
 * (x, a, q, k, v, z [d] and h [m] floats per row: patch.c's fast_buffers).
 * Both come out of one budget per rank, the job's work_mib or else 1/16 of
 * the model's F32 weights (at least 24 MiB), so that an extra rank costs a
 * node about a tenth of the model's F32 size (README: resource sizing).  The
 * caches get at most half of it, but always one pair; the rows get the rest,
 * within [256, 2048] rows (2048 is the engine's default: fewer rows mean
 * smaller sgemm calls, which run slower). */
#define WORK_FRACTION 16
#define WORK_MIN_BYTES ((size_t)24 << 20)
#define WORK_CHUNK_MAX 64
#define FAST_ROWS_MIN 256
#define FAST_ROWS_MAX 2048

static size_t clamp_size(size_t x, size_t lo, size_t hi) { return x < lo ? lo : x > hi ? hi : x; }

void sweep_work_plan(const job *j, const model *m, size_t max_T, sweep_work *w)
{
    const model_config *cfg = &m->cfg;
    size_t share = m->n_params / WORK_FRACTION * sizeof(float);
    w->budget_bytes = j->work_mib ? j->work_mib << 20 : share > WORK_MIN_BYTES ? share : WORK_MIN_BYTES;
    w->pair_bytes = patch_pair_packed_bytes(cfg, max_T);
    w->chunk = j->chunk_prompts ? j->chunk_prompts : clamp_size(w->budget_bytes / 2 / w->pair_bytes, 1, WORK_CHUNK_MAX);
    size_t caches = w->chunk > SIZE_MAX / w->pair_bytes ? SIZE_MAX : w->chunk * w->pair_bytes;
    size_t row = (6 * cfg->n_embd + cfg->n_inner) * sizeof(float);
    w->fast_rows = clamp_size(caches < w->budget_bytes ? (w->budget_bytes - caches) / row : 0, FAST_ROWS_MIN,
                              FAST_ROWS_MAX);
}


/* ---- memory per rank ------------------------------------------------------- */

ps_status sweep_memory_gather(comm *c, sweep_rank_memory *all)
{
    sweep_rank_memory mine = {.rank = comm_rank(c), .node_rank = comm_local_rank(c), .pid = (long)getpid()};
    if (gethostname(mine.host, sizeof mine.host) != 0)
        snprintf(mine.host, sizeof mine.host, "?");
    mine.host[sizeof mine.host - 1] = '\0';
    if (memstat_read(&mine.mem) != PS_OK)
        memset(&mine.mem, 0, sizeof mine.mem);
    const size_t n = comm_size(c);
    size_t *counts = comm_rank(c) == 0 ? malloc(n * sizeof *counts) : NULL;
    ps_status st = comm_rank(c) == 0 && !counts ? err_set(PS_ERR_NOMEM, "out of memory") : PS_OK;
    for (size_t r = 0; counts && r < n; r++)
        counts[r] = sizeof mine;
    if ((st = comm_agree(c, st)) == PS_OK)
        st = comm_gatherv(c, &mine, sizeof mine, all, counts);
    free(counts);
    return st;
}

void sweep_memory_format(const sweep_rank_memory *r, char *buf, size_t cap)
{
    char mem[256];
    memstat_format(&r->mem, mem, sizeof mem);
    snprintf(buf, cap, "rank=%zu pid=%ld host=%s node_rank=%zu %s", r->rank, r->pid, r->host, r->node_rank, mem);
}

ps_status sweep_memory_text(comm *c, char **text)
{
    *text = NULL;
    const size_t n = comm_size(c);
    const bool root = comm_rank(c) == 0;
    sweep_rank_memory *all = root ? calloc(n, sizeof *all) : NULL;
    ps_status st = root && !all ? err_set(PS_ERR_NOMEM, "out of memory") : PS_OK;
    if ((st = comm_agree(c, st)) || (st = sweep_memory_gather(c, all)) || !root) {
        free(all);
        return st;
    }
    const size_t line = 400;
    char *t = malloc(n * line + 1);
    if (!t) {
        free(all);
        return err_set(PS_ERR_NOMEM, "out of memory");
    }
    size_t k = 0;
    t[0] = '\0';
    for (size_t r = 0; r < n; r++) {
        sweep_memory_format(&all[r], t + k, line);
        k += strlen(t + k);
        if (r + 1 < n)
            t[k++] = '\n', t[k] = '\0';
    }
    free(all);
    *text = t;
    return PS_OK;
}
