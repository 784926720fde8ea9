/*
 * sweep_writer: rank 0's writer thread, which builds the results file while
 * the chunks compute (issue 21 item 5).
 *
 * Before, rank 0 converted its journal into the NetCDF file after the last
 * chunk, so every value went through one process after the computation:
 * at thousands of ranks the write was the first bottleneck (README,
 * "Scaling to thousands of ranks").  Now:
 *
 *   compute thread (rank 0)            writer thread
 *   ---------------------------        ----------------------------------
 *   chunk k computed, journaled  --->  queue --->  records into the staged
 *   (fdatasync), then pushed           window (ncout.c: up to 1,024
 *   chunk k+1 computes ...             consecutive prompts), written with
 *                                      one call per variable when the
 *                                      queue is empty or the window full
 *   after the last chunk: finish --->  pending prompts, roles, guards,
 *   (waits)                            attributes, commit (fsync, sha256,
 *                                      rename)
 *
 * The journal stays the source of truth: a chunk is pushed only after it is
 * durable there, a crash leaves the journal (and a .partial file that the
 * rerun clobbers), and a resume writes the journal's earlier records first
 * (from a copy of the journal's state at the start: fd and end, read with
 * pread while the compute thread appends after that end), then the new
 * chunks in the order they are journaled: the file gets the same records
 * in the same order as when it was built from the journal at the end, so
 * it is the same file.
 *
 * NetCDF-C and HDF5 are not thread-safe: from the start, the writer thread
 * alone calls them (it creates the file), and the compute thread reads
 * nothing of the file.  The writer reads the dataset's records (answer
 * texts, roles) through a reader of its own.  Each side owns its fields of
 * sweep_result (the writer: counts, means, summary, guards, role names).
 *
 * Memory: the queue holds the chunks not written yet, at most
 * SWEEP_WRITER_QUEUE_BYTES (64 MiB) of values and token ids (one chunk is
 * always let in, whatever its size); a full queue makes the compute thread
 * wait (the disk is then slower than the ranks).  Beside it the staged
 * window (4 MiB at 1,024 prompts of the demo's cells).
 *
 * A failure in the thread (a full disk, an injected fault at the site
 * "sweep_writer") is kept with its message; the next push returns it, the
 * run stops on every rank (comm_agree) and the .partial file is deleted.
 * The journal has every chunk finished, so the rerun resumes.
 */
#include "sweep_internal.h"

#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "fault.h"
#include "gemm.h"

typedef struct item {
    struct item *next;
    size_t n, bytes;
    size_t *index;      /* [n] */
    dataset_tokens *tk; /* [n], owned */
    double *values;     /* the chunk's, owned */
} item;

struct sweep_writer {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t wake;  /* to the writer: an item, finish or cancel */
    pthread_cond_t room;  /* to the compute thread: the queue shrank or the writer failed */
    item *head, *tail;    /* the queue, under mu */
    size_t queued_bytes;  /* under mu */
    bool finish, cancel;  /* under mu */
    ps_status failed;     /* under mu: the writer's first error */
    char msg[1024];       /* its message (err.h's buffer is per thread) */
    /* set before the thread starts, read-only since */
    const job *j;
    model *m;
    const tokenizer *tok;
    sweep_plan plan;      /* a copy made by the compute thread before the start (the
                             thread must not read *p's reader, which the compute
                             thread moves); its arrays are shared, read-only
                             but for state[], read only after the finish */
    journal jr;           /* a copy: the records before this run, [header, end) */
    const char *output, *dataset_sha;
    const sweep_opts *o;
    sweep_result *res;
    /* set by the compute thread before finish, read by the writer after */
    const char *memory;
    double compute_seconds;
    /* the writer's, read after the join */
    double busy;          /* seconds in NetCDF and the records */
};

static void item_free(item *it)
{
    if (!it)
        return;
    for (size_t k = 0; it->tk && k < it->n; k++)
        dataset_tokens_free(&it->tk[k]);
    free(it->tk);
    free(it->index);
    free(it->values);
    free(it);
}

/* The chunk's records into the file, in journal order. */
static ps_status write_item(sweep_writer *w, sweep_out *out, const item *it)
{
    if (fault_point("sweep_writer"))
        return err_set(PS_ERR_IO, "%s: injected fault at sweep_writer", w->output);
    ps_status st = PS_OK;
    for (size_t k = 0, off = 0; k < it->n && st == PS_OK; k++) {
        journal_prompt r;
        off += sweep_chunk_record(w->j, &w->m->cfg, it->index[k], &it->tk[k], it->values + off, &r);
        st = sweep_write_prompt(out, &r);
    }
    return st;
}

/* Record the writer's error (and wake a compute thread waiting for room). */
static void fail(sweep_writer *w, ps_status st)
{
    pthread_mutex_lock(&w->mu);
    if (!w->failed) {
        w->failed = st;
        snprintf(w->msg, sizeof w->msg, "%s", err_msg());
    }
    pthread_cond_broadcast(&w->room);
    pthread_mutex_unlock(&w->mu);
}

static void *writer_main(void *arg)
{
    sweep_writer *w = arg;
    sweep_out *out = NULL;
    double t = clock_now();
    ps_status st = sweep_write_begin(&out, w->j, w->m, w->tok, &w->plan, w->output, w->o, w->dataset_sha, w->res);
    if (st == PS_OK)
        st = sweep_write_journal(out, &w->jr);
    w->busy += clock_now() - t;
    if (st)
        fail(w, st);
    for (;;) {
        pthread_mutex_lock(&w->mu);
        while (!w->head && !w->finish && !w->cancel)
            pthread_cond_wait(&w->wake, &w->mu);
        item *it = w->head;
        if (it) {
            w->head = it->next;
            if (!w->head)
                w->tail = NULL;
        }
        const bool stop = !it && (w->finish || w->cancel), cancel = w->cancel;
        const ps_status failed = w->failed;
        pthread_mutex_unlock(&w->mu);
        if (stop) {
            if (!cancel && !failed) {
                t = clock_now();
                /* the busy time so far plus the finish's own, measured
                 * here (the attribute is written before the commit) */
                st = sweep_write_end(out, w->memory, w->compute_seconds, w->busy);
                w->busy += clock_now() - t;
                if (st)
                    fail(w, st);
            }
            break;
        }
        /* after a failure the items are only dropped (the compute thread
         * learns of it at its next push) */
        if (!failed && !cancel) {
            t = clock_now();
            st = write_item(w, out, it);
            /* Nothing else waiting: write the staged prompts now rather
             * than when the window of 1,024 fills, so that little is left
             * for after the last chunk (one call per variable per chunk
             * instead of per window, off the compute's path). */
            pthread_mutex_lock(&w->mu);
            const bool idle = !w->head;
            pthread_mutex_unlock(&w->mu);
            if (st == PS_OK && idle)
                st = sweep_write_flush(out);
            w->busy += clock_now() - t;
            if (st)
                fail(w, st);
        }
        pthread_mutex_lock(&w->mu);
        w->queued_bytes -= it->bytes;
        pthread_cond_broadcast(&w->room);
        pthread_mutex_unlock(&w->mu);
        item_free(it);
    }
    sweep_write_free(out); /* deletes the .partial file unless committed */
    return NULL;
}

ps_status sweep_writer_start(sweep_writer **wp, const job *j, model *m, const tokenizer *tok, const sweep_plan *p,
                             const journal *jr, const char *output, const sweep_opts *o, const char *dataset_sha,
                             sweep_result *res)
{
    *wp = NULL;
    sweep_writer *w = calloc(1, sizeof *w);
    if (!w)
        return err_set(PS_ERR_NOMEM, "out of memory");
    *w = (sweep_writer){.j = j, .m = m, .tok = tok, .plan = *p, .jr = *jr, .output = output, .o = o,
                        .dataset_sha = dataset_sha, .res = res};
    memset(&w->plan.rd, 0, sizeof w->plan.rd); /* sweep_write_begin opens its own */
    if (pthread_mutex_init(&w->mu, NULL) != 0) {
        free(w);
        return err_set(PS_ERR_NOMEM, "%s: cannot create the writer's mutex", output);
    }
    if (pthread_cond_init(&w->wake, NULL) != 0 || pthread_cond_init(&w->room, NULL) != 0) {
        pthread_mutex_destroy(&w->mu);
        free(w);
        return err_set(PS_ERR_NOMEM, "%s: cannot create the writer's condition variables", output);
    }
    /* Lazily initialised globals the thread reads (the provenance's
     * gemm_kernel) are initialised here, before it starts: else its first
     * read races with the compute thread's first product (ThreadSanitizer). */
    (void)gemm_isa_get();
    /* The sweep's signals (SIGTERM, SIGINT, SIGUSR1 set its stop flag) go
     * to the compute thread: the writer's system calls are never
     * interrupted by them.  The thread inherits this mask. */
    sigset_t all, old;
    sigfillset(&all);
    sigdelset(&all, SIGSEGV);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGFPE);
    sigdelset(&all, SIGILL);
    sigdelset(&all, SIGABRT);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&w->thread, NULL, writer_main, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        pthread_cond_destroy(&w->wake);
        pthread_cond_destroy(&w->room);
        pthread_mutex_destroy(&w->mu);
        free(w);
        return err_set(PS_ERR_NOMEM, "%s: cannot start the writer thread", output);
    }
    *wp = w;
    return PS_OK;
}

/* The writer's error as this thread's (err.h). */
static ps_status failed_status(sweep_writer *w) { return err_set(w->failed, "%s", w->msg); }

ps_status sweep_writer_push(sweep_writer *w, const size_t *index, dataset_tokens *tk, size_t n, double *values)
{
    item *it = calloc(1, sizeof *it);
    if (it) {
        it->index = malloc((n ? n : 1) * sizeof *it->index);
        it->tk = calloc(n ? n : 1, sizeof *it->tk);
    }
    if (!it || !it->index || !it->tk) {
        if (it) {
            free(it->index);
            free(it->tk);
            free(it);
        }
        free(values);
        return err_set(PS_ERR_NOMEM, "out of memory");
    }
    it->n = n;
    it->values = values;
    size_t nv = 0;
    for (size_t k = 0; k < n; k++) {
        it->index[k] = index[k];
        it->tk[k] = tk[k];
        memset(&tk[k], 0, sizeof tk[k]);
        nv += 2 + sweep_prompt_cells(w->j->components, &w->m->cfg, it->tk[k].n_tokens);
        it->bytes += 2 * it->tk[k].n_tokens * sizeof(int32_t);
    }
    it->bytes += nv * sizeof(double) + n * (sizeof(size_t) + sizeof(dataset_tokens));
    pthread_mutex_lock(&w->mu);
    /* bounded: wait while the queue is full (but always let one chunk in) */
    while (!w->failed && w->head && w->queued_bytes + it->bytes > SWEEP_WRITER_QUEUE_BYTES)
        pthread_cond_wait(&w->room, &w->mu);
    ps_status st = PS_OK;
    if (w->failed) {
        st = failed_status(w);
    } else {
        if (w->tail)
            w->tail->next = it;
        else
            w->head = it;
        w->tail = it;
        w->queued_bytes += it->bytes;
        it = NULL;
        pthread_cond_signal(&w->wake);
    }
    pthread_mutex_unlock(&w->mu);
    item_free(it);
    return st;
}

/* Tell the thread to finish or cancel, wait for it and free w. */
static void stop_join(sweep_writer *w, bool cancel)
{
    pthread_mutex_lock(&w->mu);
    if (cancel)
        w->cancel = true;
    else
        w->finish = true;
    pthread_cond_signal(&w->wake);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    /* a cancel can leave items the thread never took */
    while (w->head) {
        item *it = w->head;
        w->head = it->next;
        item_free(it);
    }
    pthread_cond_destroy(&w->wake);
    pthread_cond_destroy(&w->room);
    pthread_mutex_destroy(&w->mu);
}

ps_status sweep_writer_finish(sweep_writer *w, const char *memory, double compute_seconds)
{
    const double t = clock_now();
    /* read by the thread after it sees finish under the mutex */
    pthread_mutex_lock(&w->mu);
    w->memory = memory ? memory : "";
    w->compute_seconds = compute_seconds;
    pthread_mutex_unlock(&w->mu);
    stop_join(w, false);
    w->res->write_seconds = w->busy;
    w->res->write_wait_seconds = clock_now() - t;
    ps_status st = w->failed ? failed_status(w) : PS_OK;
    free(w);
    return st;
}

void sweep_writer_cancel(sweep_writer *w)
{
    if (!w)
        return;
    stop_join(w, true);
    free(w);
}
