/*
 * patchsweep: the command-line entry point.  Dispatches to the command
 * modules (src/cmd_*.c); they and src/cli.c are the only code that prints
 * or chooses an exit status.  Exit status: 0 success, 1 the work failed (one
 * line "patchsweep: <file>: <problem>" on stderr), 2 usage error.
 */
#include <cblas.h>
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "blas.h"
#include "cli.h"
#include "cmd_dataset.h"
#include "cmd_lens.h"
#include "cmd_diff.h"
#include "cmd_merge.h"
#include "cmd_model.h"
#include "cmd_patch.h"
#include "cmd_sweep.h"
#include "cmd_plot.h"
#include "hashcache.h"
#include "ncout.h"
#include "prov.h"

typedef struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} command;

static const command commands[] = {
    {"tokenize", cmd_tokenize, "token ids and strings of a text"},
    {"run", cmd_run, "next-token prediction of a prompt"},
    {"cache", cmd_cache, "every activation of a prompt as NetCDF (run_with_cache)"},
    {"lens", cmd_lens, "early decoding (logit lens) of every layer"}, {"decompose", cmd_decompose, "a block decoded without attn_out/mlp_out; logit attribution"},
    {"patch", cmd_patch, "activation patching of one prompt pair"},
    {"sweep", cmd_sweep, "activation patching over a dataset, MPI-parallel (job file)"},
    {"merge", cmd_merge, "the parts of a sliced sweep (array jobs) as one results file"},
    {"diff", cmd_diff, "max and mean |B - A| of two results files, per variable"},
    {"bench", cmd_bench, "naive vs fast patching engine, beside the sgemm peak"},
    {"info", cmd_info, "model config, size, hash; BLAS kernels and threads"},
    {"make-dataset", cmd_make_dataset, "IOI / capitals prompt pairs as JSONL"},
    {"evaluate", cmd_evaluate, "task accuracy and logit differences on a dataset"},
    {"plot", cmd_plot, "SVG heatmaps / lens curves of a result file"},
};

/* PATCHSWEEP_HASH_DEBUG=1: what this process hashed (hashcache.h), one
 * line on stderr at the end of the command; the tests check that a second
 * run reads no checkpoint and that only a sweep's rank 0 hashes. */
static void print_hash_debug(void)
{
    const char *v = getenv("PATCHSWEEP_HASH_DEBUG");
    if (!v || strcmp(v, "1") != 0)
        return;
    const hashcache_counters c = hashcache_get_counters();
    const char *dir = hashcache_dir();
    fprintf(stderr, "patchsweep: hash: pid=%ld files_hashed=%llu bytes_hashed=%llu cache_hits=%llu cache=%s\n",
            (long)getpid(), (unsigned long long)c.files_hashed, (unsigned long long)c.bytes_hashed,
            (unsigned long long)c.cache_hits, dir ? dir : "off");
}

static void print_help(FILE *out)
{
    fputs("usage: patchsweep COMMAND [OPTIONS]   (patchsweep COMMAND --help for each)\n", out);
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(out, "  %-13s %s\n", commands[i].name, commands[i].summary);
    fprintf(out, "  %-13s %s\n", "version", "software version");
    fputs("options of every command:\n"
          "  --blas-core NAME       run OpenBLAS's NAME kernels (SkylakeX, Haswell, Prescott, ...);\n"
          "                         also $OPENBLAS_CORETYPE.  Default: OpenBLAS's choice, or a better\n"
          "                         core the CPU supports when OpenBLAS fell back to generic ones\n"
          "  --no-blas-autoselect   keep OpenBLAS's own choice (README: BLAS kernels and threads)\n",
          out);
}

static int run_command(int argc, char **argv);

/* ---- BLAS set-up (include/patchsweep/blas.h) -------------------------------------------
 *
 * OpenBLAS reads OPENBLAS_CORETYPE only while the library loads, before
 * main().  To run other kernels than those it picked, the program sets the
 * variable and re-executes itself: execv("/proc/self/exe", argv) with the
 * same argv, here, before any BLAS call and before MPI_Init.  The process
 * keeps its pid, its open files and the environment (the variable, the
 * marker PATCHSWEEP_BLAS_SELECTED that stops a second re-execution, and
 * whatever mpirun/orted or srun/PMIx put there for MPI_Init), so launchers
 * never notice; /proc/self/exe is the running binary even when its file has
 * since been replaced.  The alternatives do not work: OpenBLAS has no API to
 * switch cores at run time; dlopen()ing a second copy of the library would
 * bring its own thread pool and symbol clashes with the linked one; asking
 * users to export the variable is what this replaces. */

/* Before MPI_Init a rank knows its number from the launcher's environment. */
static bool first_rank(void)
{
    static const char *const vars[] = {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        if (v)
            return !strcmp(v, "0");
    }
    return true;
}

/* Ranks of this job on this node as the launcher tells before MPI_Init
 * (sweeps ask MPI itself once it runs). */
static size_t local_ranks_from_env(void)
{
    static const char *const vars[] = {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"};
    size_t n;
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        if (v && cli_parse_size(v, 1, 1000000, &n))
            return n;
    }
    return 1;
}

/* The self-check of kernels OpenBLAS did not pick itself (selected by
 * patchsweep or forced by the user) runs in a child process: one that uses
 * an instruction the CPU lacks dies of SIGILL there, not here.  fork()
 * before MPI_Init and before any thread of ours is safe; OpenBLAS stops its
 * thread pool around fork (pthread_atfork) and restarts it on the next call.
 * OpenBLAS's own choice passed its own cpuid tests: checked in this process
 * (2 ms, and its buffers are set up for the work that follows). */
static blas_check run_selfcheck(bool isolated, double *worst, char *detail, size_t n)
{
    struct {
        int ok;
        double worst;
        char msg[sizeof ((blas_situation *)0)->check_detail];
    } r = {0};
    int fds[2];
    fflush(stdout);
    fflush(stderr);
    pid_t pid = -1;
    if (isolated && pipe(fds) == 0 && (pid = fork()) < 0) {
        close(fds[0]);
        close(fds[1]);
    }
    if (pid == 0) {
        close(fds[0]);
        ps_status st = blas_selfcheck(NULL, &r.worst);
        r.ok = st == PS_OK;
        snprintf(r.msg, sizeof r.msg, "%s", st ? err_msg() : "");
        ssize_t w = write(fds[1], &r, sizeof r); /* <= PIPE_BUF: one atomic write */
        _exit(w == (ssize_t)sizeof r ? 0 : 1);
    }
    if (pid < 0) { /* not isolated, or no child to be had: check in this process */
        ps_status st = blas_selfcheck(NULL, worst);
        snprintf(detail, n, "%s", st ? err_msg() : "");
        return st ? BLAS_CHECK_FAILED : BLAS_CHECK_PASSED;
    }
    close(fds[1]);
    size_t got = 0;
    while (got < sizeof r) {
        ssize_t k = read(fds[0], (char *)&r + got, sizeof r - got);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            break;
        got += (size_t)k;
    }
    close(fds[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    *worst = r.worst;
    if (WIFSIGNALED(status)) {
        snprintf(detail, n, "killed by signal %d, %s", WTERMSIG(status), strsignal(WTERMSIG(status)));
        return BLAS_CHECK_FAILED;
    }
    if (got != sizeof r) {
        snprintf(detail, n, "the checking process gave no result");
        return BLAS_CHECK_FAILED;
    }
    snprintf(detail, n, "%s", r.msg);
    return r.ok ? BLAS_CHECK_PASSED : BLAS_CHECK_FAILED;
}

/* Decide (blas_decide), self-check, re-execute when the decision says so,
 * and record what runs.  Returns CLI_CONTINUE or an exit status. */
static int blas_startup(char **argv, const cli_blas_opts *o)
{
    blas_situation s = {0};
    blas_cpu_detect(&s.cpu);
    s.core = openblas_get_corename();
    const char *cfg = openblas_get_config();
    s.dynamic_arch = cfg && strstr(cfg, "DYNAMIC_ARCH");
    s.env_coretype = getenv(BLAS_ENV_CORETYPE);
    if (s.env_coretype && !*s.env_coretype)
        s.env_coretype = NULL;
    s.env_marker = getenv(BLAS_ENV_MARKER);
    s.opt_core = o->core;
    s.no_autoselect = o->no_autoselect;
    blas_decision d;
    double worst = 0.0;
    for (blas_decide(&s, &d); d.action == BLAS_SELFCHECK; blas_decide(&s, &d))
        s.check = run_selfcheck(d.source != BLAS_SOURCE_OPENBLAS && d.source != BLAS_SOURCE_FALLBACK, &worst,
                                s.check_detail, sizeof s.check_detail);
    if (d.action == BLAS_REFUSE) {
        if (first_rank())
            fprintf(stderr, "patchsweep: %s\n", d.message);
        return CLI_EXIT_USAGE;
    }
    if (d.message[0] && first_rank())
        fprintf(stderr, "patchsweep: %s\n", d.message);
    if (d.action == BLAS_REEXEC) {
        char *old_core = s.env_coretype ? strdup(s.env_coretype) : NULL;
        char *old_marker = s.env_marker ? strdup(s.env_marker) : NULL;
        setenv(BLAS_ENV_CORETYPE, d.core, 1);
        setenv(BLAS_ENV_MARKER, d.marker, 1);
        fflush(stdout);
        fflush(stderr);
        execv("/proc/self/exe", argv);
        int e = errno;
        /* still here: put the environment back for any child we start */
        old_core ? setenv(BLAS_ENV_CORETYPE, old_core, 1) : unsetenv(BLAS_ENV_CORETYPE);
        old_marker ? setenv(BLAS_ENV_MARKER, old_marker, 1) : unsetenv(BLAS_ENV_MARKER);
        free(old_core);
        free(old_marker);
        if (!strncmp(d.marker, "auto:", 5)) {
            /* OpenBLAS's own generic kernels: slow but sound */
            if (first_rank())
                fprintf(stderr, "patchsweep: warning: cannot re-execute /proc/self/exe (%s) to run OpenBLAS's %s "
                        "kernels: keeping its %s\n", strerror(e), d.core, s.core);
            d.action = BLAS_KEEP;
            d.source = BLAS_SOURCE_OPENBLAS;
        } else {
            /* --blas-core not honoured, or kernels that failed the self-check */
            fprintf(stderr, "patchsweep: cannot re-execute /proc/self/exe (%s) to run OpenBLAS's %s kernels\n",
                    strerror(e), d.core);
            return CLI_EXIT_FAIL;
        }
    }
    blas_report *r = cli_blas();
    blas_report_library(r);
    snprintf(r->openblas_choice, sizeof r->openblas_choice, "%s", d.openblas_choice);
    snprintf(r->rejected, sizeof r->rejected, "%s", d.rejected);
    r->source = d.source;
    r->check = s.check;
    r->check_worst = worst;
    r->reexecuted = d.reexecuted;
    r->cpu = s.cpu;
    const char *why;
    size_t threads = cli_blas_threads_default(0, local_ranks_from_env(), &why);
    cli_blas_set_threads(threads, why, false);
    return CLI_CONTINUE;
}

int main(int argc, char **argv)
{
    prov_init(argc, argv);
    opterr = 0; /* the commands report option errors themselves, in one line */
    if (argc < 2) {
        print_help(stderr);
        return CLI_EXIT_USAGE;
    }
    cli_blas_opts bo;
    char **args;
    int nargs, rc = cli_blas_options(argc, argv, &bo, &nargs, &args);
    if (rc != CLI_CONTINUE)
        return rc;
    if ((rc = blas_startup(argv, &bo)) != CLI_CONTINUE) {
        free(args);
        return rc;
    }
    rc = run_command(nargs, args);
    free(args);
    if (ncout_exit_unsafe()) {
        /* HDF5's exit handler would crash on the file whose close failed
         * (ncout.h): the exit status is the error's, not SIGSEGV's. */
        fflush(stdout);
        fflush(stderr);
        _exit(rc);
    }
    return rc;
}

static int run_command(int argc, char **argv)
{
    if (argc < 2) {
        print_help(stderr);
        return CLI_EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        print_help(stdout);
        return 0;
    }
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        printf("patchsweep %s\n", prov_version());
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(cmd, commands[i].name)) {
            /* getopt_long sees "COMMAND OPTIONS...": argv[0] is the command. */
            const int rc = commands[i].run(argc - 1, argv + 1);
            print_hash_debug();
            return rc;
        }
    fprintf(stderr, "patchsweep: unknown command '%s'\n", cmd);
    print_help(stderr);
    return CLI_EXIT_USAGE;
}
