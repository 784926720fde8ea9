#include "cmd_sweep.h"

#include <malloc.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "atp.h"
#include "blas.h"
#include "cli.h"
#include "clock.h"
#include "comm.h"
#include "job.h"
#include "pool.h"
#include "prov.h"
#include "schema.h"
#include "sweep.h"

static const char *sweep_help =
    "usage: patchsweep sweep JOB.ini [--output OUT.nc] [--resume | --overwrite] [--threads N]\n"
    "  Activation patching over the job's dataset, on every rank when run under\n"
    "  mpirun or srun, gathered into one NetCDF file (see README: job files).\n"
    "  --output OUT.nc  write here instead of the job's [run] output\n"
    "  --resume         continue an interrupted run (also the default when the\n"
    "                   journal OUT.nc.journal of the same job, model and dataset exists)\n"
    "  --overwrite      discard earlier results of this output and start over\n"
    "  --resume-from-damage  the journal has a damaged record with intact ones after\n"
    "                   it (refused by default): recompute every prompt from it on\n"
    "  --slice K/N      only slice K (1..N) of N equal contiguous parts of the dataset\n"
    "                   (array jobs; stitch the parts with 'patchsweep merge')\n"
    "  --threads N      threads per rank (default: the job's, else\n"
    "                   $OPENBLAS_NUM_THREADS, else $SLURM_CPUS_PER_TASK, else the\n"
    "                   rank's CPUs (affinity mask) / ranks on the node)\n"
    "  --timings        rank 0 prints where its time went on stderr at the end\n"
    "                   (process start, MPI start-up, model, tokenizer, the\n"
    "                   sweep's phases, MPI_Finalize; README: writes overlap compute)\n"
    "  Exit status: 0 complete, 1 failed, 2 usage error, 3 stopped by SIGTERM/\n"
    "  SIGINT/SIGUSR1 after the chunk in flight (rerun to resume).\n";

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

typedef struct {
    bool tty;
    double every, last;
} progress_state;

static void fmt_time(char *buf, size_t n, double s)
{
    if (!isfinite(s) || s < 0)
        snprintf(buf, n, "--:--:--");
    else
        snprintf(buf, n, "%d:%02d:%02d", (int)(s / 3600), (int)fmod(s / 60, 60), (int)fmod(s, 60));
}

/* Rank 0 only: a live line on a terminal, a line every N seconds in a log. */
static void progress(void *user, const sweep_progress *p)
{
    progress_state *ps = user;
    bool last = p->chunk == p->n_chunks;
    if (!ps->tty && !last && p->seconds - ps->last < ps->every)
        return;
    ps->last = p->seconds;
    double rate = p->seconds > 0 ? (double)p->cells_done / p->seconds : 0.0;
    char el[32], eta[32];
    fmt_time(el, sizeof el, p->seconds);
    fmt_time(eta, sizeof eta, rate > 0 ? (double)(p->cells_total - p->cells_done) / rate : NAN);
    fprintf(stderr, "%ssweep: chunk %zu/%zu, prompts %zu/%zu, cells %zu/%zu (%.1f%%), %.0f cells/s, elapsed %s, ETA %s%s",
            ps->tty ? "\r" : "", p->chunk, p->n_chunks, p->prompts_done, p->prompts_total, p->cells_done,
            p->cells_total, p->cells_total ? 100.0 * (double)p->cells_done / (double)p->cells_total : 100.0, rate, el,
            eta, ps->tty ? (last ? "\n" : "") : "\n");
    fflush(stderr);
}

/* Threads per rank (the pool's; OpenBLAS runs one per pool thread): the
 * option, the job, then the default of blas_threads_choose (the user's
 * OPENBLAS_NUM_THREADS, Slurm's CPUs per task, else the rank's CPUs shared
 * among the node's ranks, now that MPI knows how many there are). */
static void set_blas_threads(size_t opt, const job *j, comm *c)
{
    const char *why;
    size_t n = cli_blas_threads_default(opt ? opt : j->threads, comm_local_size(c), &why);
    cli_blas_set_threads(n, why, true);
}

static void print_summary(const job *j, const sweep_result *r)
{
    printf("%s: %zu of %zu prompts done", r->output, r->prompts_done, r->prompts_total);
    if (r->prompts_skipped)
        printf(", %zu skipped", r->prompts_skipped);
    if (r->prompts_resumed)
        printf(" (%zu from an earlier run)", r->prompts_resumed);
    printf("; %zu cells in %.1f s", r->cells_computed, r->seconds);
    if (r->write_bytes)
        printf("; file %.1f MB written in %.2f s (%.2f s after the chunks)", (double)r->write_bytes / 1e6,
               r->write_seconds, r->write_wait_seconds);
    putchar('\n');
    printf("%s: clean %.4f, corrupted %.4f (means over prompts)", patch_metric_name(j->metric), r->mean_clean_metric,
           r->mean_corrupted_metric);
    if (!isnan(r->accuracy))
        printf("; accuracy (clean %s > 0) %.1f%%", patch_metric_name(j->metric), 100.0 * r->accuracy);
    for (size_t k = 1; k < j->metrics.n; k++) /* summarized: the first metric; the others are in the file */
        printf("%s%s", k == 1 ? "; also in the file: " : ", ", patch_metric_name(j->metrics.m[k]));
    putchar('\n');
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        const sweep_summary *sm = &r->summary[c];
        if (!sm->mean)
            continue;
        /* the five cells that move the metric furthest in the job's
         * direction: denoise, patched toward clean = the normalized value;
         * noise, patched toward corrupted = 1 - the normalized value (a cell
         * with no effect stays at 1, the clean run) */
        const bool noise = j->direction == PATCH_NOISE;
        /* the summary is of the estimate unless the method also ran exact (atp+exact: exact) */
        const bool est = patch_method_estimates(j->method) && !patch_method_runs_exact(j->method);
        printf("  %-16s strongest (mean normalized%s%s%s%s):", patch_component_name((patch_component)c),
               est ? " " : "", est ? patch_method_name(j->method) : "", est && j->graddrop ? "+graddrop" : "",
               noise ? "; ranked by 1 - it, the move toward corrupted" : "");
        bool *used = calloc(sm->rows * sm->cols, sizeof *used);
        for (int k = 0; k < 5 && used; k++) {
            size_t best = SIZE_MAX;
            for (size_t i = 0; i < sm->rows * sm->cols; i++) {
                if (used[i] || isnan(sm->mean[i]))
                    continue;
                double e = noise ? 1.0 - sm->mean[i] : sm->mean[i];
                double eb = best == SIZE_MAX ? 0.0 : noise ? 1.0 - sm->mean[best] : sm->mean[best];
                if (best == SIZE_MAX || e > eb)
                    best = i;
            }
            if (best == SIZE_MAX)
                break;
            used[best] = true;
            size_t l = best / sm->cols, col = best % sm->cols;
            if (sm->by_head)
                printf(" L%zu.H%zu %.2f", l, col, sm->mean[best]);
            else if (sm->by_role && col < r->n_roles)
                printf(" L%zu@%s %.2f", l, r->role_names[col], sm->mean[best]);
            else if (col == 0)
                printf(" L%zu@last %.2f", l, sm->mean[best]);
            else
                printf(" L%zu@-%zu %.2f", l, col, sm->mean[best]);
        }
        free(used);
        putchar('\n');
    }
    if (r->n_roles)
        printf("  (position grids aligned by the dataset's roles: @IO = the token of role IO in each prompt)\n");
    else if (r->summary[PATCH_RESID_PRE].mean || r->summary[PATCH_ATTN_OUT].mean || r->summary[PATCH_MLP_OUT].mean)
        printf("  (positions counted from the end: @last = the final token, @-1 the one before)\n");
    /* atp+exact: the file's estimate-vs-exact summary, one line per component */
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        const ncout_atp_stats *a = &r->atp[c];
        if (!a->present)
            continue;
        printf("  %-16s %s%s vs exact: rank correlation median %.3f, mean %.3f (%zu prompts); %zu of the exact "
               "top-%d cells missed (%.2f a prompt)\n",
               patch_component_name((patch_component)c), patch_method_qk_fix(j->method) ? "AtP*" : "AtP",
               j->graddrop ? " with GradDrop" : "", a->median, a->mean, a->rank_prompts, a->missed_total, ATP_TOP_K,
               a->missed_prompts ? (double)a->missed_total / (double)a->missed_prompts : 0.0);
    }
}

/* Every rank's memory at the end, printed by rank 0: the peak RSS line that
 * scripts and people read, then one line per rank with the parts of its
 * resident set (README: resource sizing explains them). */
static void report_memory(comm *c)
{
    const size_t n = comm_size(c);
    sweep_rank_memory *all = comm_rank(c) == 0 ? calloc(n, sizeof *all) : NULL;
    if (comm_agree(c, comm_rank(c) == 0 && !all ? PS_ERR_NOMEM : PS_OK) != PS_OK ||
        sweep_memory_gather(c, all) != PS_OK || comm_rank(c) != 0) {
        free(all);
        return;
    }
    fprintf(stderr, "sweep: peak RSS per rank (MiB):");
    for (size_t r = 0; r < n; r++)
        fprintf(stderr, " %.0f", (double)all[r].mem.hwm_kib / 1024.0);
    fputc('\n', stderr);
    for (size_t r = 0; r < n; r++) {
        char line[400];
        sweep_memory_format(&all[r], line, sizeof line);
        fprintf(stderr, "sweep: memory %s\n", line);
    }
    free(all);
}

/* The model's converted weights in memory shared by the node's ranks
 * (model_alloc over comm_shared_alloc): node rank 0 converts, the others
 * wait in publish and read the same pages. */
typedef struct {
    comm *c;
    const char *dir;   /* the model's, for messages */
    comm_shared *shm;
} node_weights;

static ps_status node_weights_alloc(void *user, ps_status st, size_t bytes, void **ptr, bool *is_writer)
{
    node_weights *nw = user;
    if ((st = comm_node_agree(nw->c, st)))
        return st;
    *is_writer = comm_local_rank(nw->c) == 0;
    st = comm_shared_alloc(nw->c, bytes, &nw->shm, ptr);
    if (st)
        err_wrap(st, "%s: cannot share the converted weights among the node's ranks", nw->dir);
    if (st == PS_ERR_INTERNAL) {
        /* MPI failed where the node's other ranks may wait forever */
        cli_fail();
        comm_abort(nw->c, CLI_EXIT_FAIL);
    }
    return st;
}

static ps_status node_weights_publish(void *user, ps_status st)
{
    node_weights *nw = user;
    return comm_shared_publish(nw->c, nw->shm, st);
}

static void node_weights_release(void *user, void *ptr)
{
    node_weights *nw = user;
    (void)ptr;
    comm_shared_free(nw->c, nw->shm);
    nw->shm = NULL;
}

/* --timings: rank 0's seconds per step of the command, in order (the
 * sweep's own phases are sweep_result.phase_seconds). */
typedef enum {
    TIMING_EXEC,      /* process start to main's sweep command (exec, dynamic linking) */
    TIMING_MPI_INIT,  /* comm_init: MPI_Init (the launcher's wire-up, topology) */
    TIMING_JOB,       /* the job file read and checked, threads set */
    TIMING_MODEL,     /* the model mapped, converted, packed (shared per node) */
    TIMING_TOKENIZER, /* rank 0's tokenizer loaded (GPT-2's merges parsed) */
    TIMING_SWEEP,     /* sweep_run (its phases printed after) */
    TIMING_REPORT,    /* the summary printed and every rank's memory gathered */
    TIMING_FINALIZE,  /* the model freed (weights unmapped), comm_finalize: MPI_Finalize */
    TIMING_COUNT
} timing_step;

static const char *const timing_names[TIMING_COUNT] = {"exec", "mpi_init", "job", "model", "tokenizer",
                                                       "sweep", "report", "finalize"};

/* One line per group on stderr: the command's steps, then sweep_run's
 * phases (summing to about its step), then the total since the process
 * started. */
static void print_timings(const double *step, const sweep_result *res, double total)
{
    fprintf(stderr, "sweep: timings (rank 0, seconds):");
    for (int k = 0; k < TIMING_COUNT; k++)
        fprintf(stderr, " %s %.3f", timing_names[k], step[k]);
    fprintf(stderr, "\nsweep: timings of the sweep (rank 0, seconds):");
    for (int k = 0; k < SWEEP_PHASE_COUNT; k++)
        fprintf(stderr, " %s %.3f", sweep_phase_name((sweep_phase)k), res->phase_seconds[k]);
    fprintf(stderr, "\nsweep: timings: process %.3f s from its start to exit\n", total);
}

enum { OPT_RESUME = CLI_OPT_FIRST_FREE, OPT_OVERWRITE, OPT_THREADS, OPT_SLICE, OPT_FROM_DAMAGE, OPT_TIMINGS };

int cmd_sweep(int argc, char **argv)
{
    static const struct option opts[] = {{"output", required_argument, 0, 'o'},
                                         {"resume", no_argument, 0, OPT_RESUME},
                                         {"overwrite", no_argument, 0, OPT_OVERWRITE},
                                         {"resume-from-damage", no_argument, 0, OPT_FROM_DAMAGE},
                                         {"threads", required_argument, 0, OPT_THREADS},
                                         {"slice", required_argument, 0, OPT_SLICE},
                                         {"timings", no_argument, 0, OPT_TIMINGS},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *output = NULL;
    bool resume = false, overwrite = false, from_damage = false, timings = false;
    double step[TIMING_COUNT] = {0};
    /* the process's age now is the time before this command ran */
    const double age0 = clock_process_age(), t_main = clock_now();
    step[TIMING_EXEC] = age0 > 0 ? age0 : 0.0;
    size_t threads = 0, slice = 0, n_slices = 0;
    int ch;
    while ((ch = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
        switch (ch) {
        case 'o': output = optarg; break;
        case OPT_RESUME: resume = true; break;
        case OPT_OVERWRITE: overwrite = true; break;
        case OPT_FROM_DAMAGE: from_damage = true; break;
        case OPT_TIMINGS: timings = true; break;
        case OPT_THREADS:
            if (!cli_parse_size(optarg, 1, 4096, &threads))
                return cli_usage("sweep", "--threads takes a whole number from 1 to 4096, not '%s'", optarg);
            break;
        case OPT_SLICE:
            if (!schema_parse_slice(optarg, SCHEMA_SLICE_MAX, &slice, &n_slices))
                return cli_usage("sweep", "--slice takes K/N with 1 <= K <= N, not '%s'", optarg);
            break;
        case 'h': fputs(sweep_help, stdout); return 0;
        default: return cli_usage("sweep", "unknown option or missing value: '%s'", argv[optind - 1]);
        }
    }
    if (resume && overwrite)
        return cli_usage("sweep", "--resume and --overwrite exclude each other");
    if (optind != argc - 1)
        return cli_usage("sweep", "exactly one JOB.ini argument is required");
    const char *job_path = argv[optind];

    /* A fixed mmap threshold (glibc's default one grows after the first
     * large free, after which caches of a few MB come from the heap): every
     * large block is its own mapping, so a calloc'd cache costs only the
     * pages written (a received pair's core, about half) and every free
     * returns its pages, which keeps each rank's working memory within its
     * budget (sweep.h, sweep_work).  4 MiB, not lower: HDF5 allocates and
     * frees chunk buffers of up to 1 MiB for every record it writes, and as
     * fresh mappings each one costs page faults and zeroing (256 KiB made
     * rank 0's file write 10x slower: 35 s for 512 prompts). */
    mallopt(M_MMAP_THRESHOLD, 4 << 20);
    /* Setting the mmap threshold also fixes the trim threshold at 128 KiB:
     * every free at the top of the heap would return its pages and the next
     * allocation fault them in again (HDF5's buffers, for each record). */
    mallopt(M_TRIM_THRESHOLD, 64 << 20);
    /* Before MPI_Init, which can take seconds: a signal during start-up
     * must already mean "stop after the current chunk", not "die". */
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    comm *c = NULL;
    double t = clock_now();
    if (comm_init(&c, &argc, &argv) != PS_OK)
        return cli_fail();
    const bool root = comm_rank(c) == 0;
    step[TIMING_MPI_INIT] = clock_now() - t;
    t = clock_now();

    job j = {0};
    model m = {0};
    node_weights nw = {.c = c};
    const model_alloc weights_alloc = {.alloc = node_weights_alloc, .publish = node_weights_publish,
                                       .release = node_weights_release, .user = &nw};
    tokenizer *tok = NULL;
    sweep_result res = {0};
    int rc = 0;
    ps_status st = job_load(&j, job_path);
    /* a missing model directory or [lens] output directory named with its
     * job file line, before the model is loaded (a sliced run writes no lens) */
    if (st == PS_OK)
        st = job_check_paths(&j, j.lens && !n_slices);
    if ((st = comm_agree(c, st)))
        goto out;
    set_blas_threads(threads, &j, c);
    step[TIMING_JOB] = clock_now() - t;
    t = clock_now();
    /* Every rank loads the model: F32 tensors in place from the mmap (the
     * node's ranks share the page cache), the others converted, and every
     * block's matrices packed, once per node into shared memory; the
     * tokenizer is rank 0's. */
    nw.dir = j.model_dir;
    st = model_load_compute(&m, j.model_dir, &weights_alloc, j.compute);
    /* rank 0's tokenizer: GPT-2's always; another family's tokenizer.json
     * when it has one, else the dataset's token ids (clean_ids, ...) are
     * used, never GPT-2's tokenizer (cli_model_tokenizer) */
    if (st == PS_OK)
        st = patch_components_check(j.components, &m.cfg);
    step[TIMING_MODEL] = clock_now() - t;
    t = clock_now();
    if (st == PS_OK && root)
        st = cli_model_tokenizer(j.model_dir, j.tokenizer_dir, &m, m.cfg.family == MODEL_FAMILY_GPT2, &tok);
    if ((st = comm_agree(c, st)))
        goto out;
    step[TIMING_TOKENIZER] = clock_now() - t;
    if (root)
        fprintf(stderr, "sweep: %s on %s; %zu rank%s (%s), %s\n", job_path, j.model_dir, comm_size(c),
                comm_size(c) > 1 ? "s" : "", comm_library(), prov_blas());
    /* More threads than CPUs the rank may run on: they take turns on one
     * core and a spinning worker slows the others (measured: 2 threads
     * bound to one core made a sweep 2.7x slower than unbound).  The usual
     * cause is mpirun binding each rank to one core. */
    const size_t cpus = blas_affinity_cpus();
    if (root && cpus > 0 && pool_threads() > cpus)
        fprintf(stderr,
                "sweep: warning: %zu threads per rank, but rank 0 may run on %zu CPU%s only (its affinity; mpirun binds "
                "each rank to one core by default): give each rank its CPUs with mpirun --map-by slot:PE=%zu or "
                "--bind-to none, or srun --cpus-per-task=%zu\n",
                pool_threads(), cpus, cpus > 1 ? "s" : "", pool_threads(), pool_threads());
    progress_state ps = {.tty = isatty(STDERR_FILENO), .every = j.progress_seconds, .last = -1e30};
    sweep_opts so = {.output = output, .overwrite = overwrite, .resume_from_damage = from_damage, .slice = slice, .n_slices = n_slices,
                     .stop = &stop_requested,
                     .ranks_for_provenance = comm_size(c),
                     .progress = progress, .progress_user = &ps};
    t = clock_now();
    st = sweep_run(&j, &m, tok, c, &so, &res);
    step[TIMING_SWEEP] = clock_now() - t;
    t = clock_now();
    if (root && res.journal_dropped_at)
        fprintf(stderr,
                "sweep: --resume-from-damage: journal record %zu was damaged; it and the %zu intact record%s after it "
                "were dropped and their prompts recomputed\n",
                res.journal_dropped_at, res.journal_dropped_intact, res.journal_dropped_intact == 1 ? "" : "s");
    if (st == PS_OK && root) {
        if (res.was_complete)
            printf("%s is already the complete result of this job (--overwrite recomputes it)\n", res.output);
        else
            print_summary(&j, &res);
        if (res.guards && *res.guards)
            fputs(res.guards, stderr); /* one line per guard that fired */
        if (res.lens_written)
            printf("%s: logit lens of the same prompts ([lens] section)\n", j.lens_output);
        if (res.lens_skipped_slice)
            fprintf(stderr, "sweep: [lens] is not run in sliced runs: use 'patchsweep lens --dataset %s -o %s'\n",
                    j.dataset, j.lens_output);
        if (!res.was_complete)
            fprintf(stderr,
                    "sweep: working memory per rank %.0f MiB ([run] work_mib): %zu prompt pair%s a chunk "
                    "(caches up to %.1f MiB a pair), %zu rows in the fast engine\n",
                    (double)res.work.budget_bytes / 1048576.0, res.work.chunk, res.work.chunk > 1 ? "s" : "",
                    (double)res.work.pair_bytes / 1048576.0, res.work.fast_rows);
        if (res.interrupted)
            fprintf(stderr, "sweep: stopped by a signal after %zu of %zu prompts; rerun the same command to resume\n",
                    res.prompts_done + res.prompts_skipped, res.prompts_total);
    }
    if (st == PS_OK && res.interrupted)
        rc = SWEEP_EXIT_INTERRUPTED;
    if (st == PS_OK)
        report_memory(c);
    step[TIMING_REPORT] = clock_now() - t;
out:
    if (st) {
        if (root)
            cli_fail();
        rc = CLI_EXIT_FAIL;
    }
    fflush(stdout);
    t = clock_now();
    tokenizer_free(tok);
    model_free(&m);
    job_free(&j);
    comm_finalize(c);
    step[TIMING_FINALIZE] = clock_now() - t;
    if (timings && root && st == PS_OK)
        print_timings(step, &res, step[TIMING_EXEC] + clock_now() - t_main);
    sweep_result_free(&res);
    return rc;
}
