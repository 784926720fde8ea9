#include "pool.h"

#include <cblas.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

/* Task hand-off: the caller publishes fn/arg/nt, then bumps `gen`; each
 * worker runs its tid when it sees a new generation and decrements
 * `pending`.  The mutex and condition variable are only for sleeping. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t th[POOL_MAX_THREADS];
    size_t n_workers;      /* started workers (tids 1..n_workers) */
    size_t threads;        /* pool_set_threads, 0 = follow OpenBLAS */
    atomic_uint gen;
    unsigned created_gen;  /* gen when the workers were started */
    atomic_size_t pending;
    atomic_bool stop;
    void (*fn)(void *, size_t, size_t);
    void *arg;
    size_t nt;
} P = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void *worker_main(void *p)
{
    const size_t tid = (size_t)(uintptr_t)p;
    /* Not the current gen: the task that started this worker may already
     * have been published when the thread first runs. */
    unsigned seen = P.created_gen;
    for (;;) {
        /* Spin for the next generation, then sleep. */
        long t0 = now_ns();
        unsigned g;
        for (unsigned i = 0; (g = atomic_load(&P.gen)) == seen && !atomic_load(&P.stop); i++) {
            cpu_relax();
            if ((i & 255) == 255 && now_ns() - t0 > POOL_SPIN_NS) {
                pthread_mutex_lock(&P.mu);
                while ((g = atomic_load(&P.gen)) == seen && !atomic_load(&P.stop))
                    pthread_cond_wait(&P.cv, &P.mu);
                pthread_mutex_unlock(&P.mu);
                break;
            }
        }
        if (atomic_load(&P.stop))
            return NULL;
        seen = g;
        if (tid < P.nt)
            P.fn(P.arg, tid, P.nt);
        atomic_fetch_sub(&P.pending, 1);
    }
}

void pool_set_threads(size_t n) { P.threads = n > POOL_MAX_THREADS ? POOL_MAX_THREADS : n; }

size_t pool_threads(void)
{
    if (P.threads)
        return P.threads;
    /* Follow OpenBLAS's setting, which the CLI makes per rank. */
    int n = openblas_get_num_threads();
    return n < 1 ? 1 : (size_t)n > POOL_MAX_THREADS ? POOL_MAX_THREADS : (size_t)n;
}

/* Start workers up to tid want-1; returns how many threads can run. */
static size_t ensure_workers(size_t want)
{
    P.created_gen = atomic_load(&P.gen);
    while (P.n_workers + 1 < want) {
        size_t tid = P.n_workers + 1;
        if (pthread_create(&P.th[tid], NULL, worker_main, (void *)(uintptr_t)tid) != 0)
            break;
        P.n_workers++;
    }
    return P.n_workers + 1;
}

void pool_run(size_t n, void (*fn)(void *arg, size_t tid, size_t nt), void *arg)
{
    size_t nt = n < pool_threads() ? n : pool_threads();
    if (nt > 1) {
        const size_t avail = ensure_workers(nt);
        nt = nt < avail ? nt : avail;
    }
    if (nt <= 1) {
        fn(arg, 0, 1);
        return;
    }
    P.fn = fn;
    P.arg = arg;
    P.nt = nt;
    atomic_store(&P.pending, P.n_workers);
    pthread_mutex_lock(&P.mu);
    atomic_fetch_add(&P.gen, 1);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    fn(arg, 0, nt);
    while (atomic_load(&P.pending) != 0)
        cpu_relax();
}

void pool_shutdown(void)
{
    if (P.n_workers == 0)
        return;
    pthread_mutex_lock(&P.mu);
    atomic_store(&P.stop, true);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    for (size_t t = 1; t <= P.n_workers; t++)
        pthread_join(P.th[t], NULL);
    P.n_workers = 0;
    atomic_store(&P.stop, false);
}
