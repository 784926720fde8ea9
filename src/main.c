/*
 * patchsweep: the command-line entry point.  Dispatches to the command
 * modules (src/cmd_*.c); they and src/cli.c are the only code that prints
 * or chooses an exit status.  Exit status: 0 success, 1 the work failed (one
 * line "patchsweep: <file>: <problem>" on stderr), 2 usage error.
 */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "cmd_dataset.h"
#include "cmd_lens.h"
#include "cmd_merge.h"
#include "cmd_model.h"
#include "cmd_patch.h"
#include "cmd_sweep.h"
#include "cmd_plot.h"
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
    {"bench", cmd_bench, "naive vs fast patching engine, beside the sgemm peak"},
    {"info", cmd_info, "model config, size, hash; BLAS kernel"},
    {"make-dataset", cmd_make_dataset, "IOI / capitals prompt pairs as JSONL"},
    {"evaluate", cmd_evaluate, "task accuracy and logit differences on a dataset"},
    {"plot", cmd_plot, "SVG heatmaps / lens curves of a result file"},
};

static void print_help(FILE *out)
{
    fputs("usage: patchsweep COMMAND [OPTIONS]   (patchsweep COMMAND --help for each)\n", out);
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(out, "  %-13s %s\n", commands[i].name, commands[i].summary);
    fprintf(out, "  %-13s %s\n", "version", "software version");
}

int main(int argc, char **argv)
{
    prov_init(argc, argv);
    opterr = 0; /* the commands report option errors themselves, in one line */
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
            return commands[i].run(argc - 1, argv + 1);
        }
    fprintf(stderr, "patchsweep: unknown command '%s'\n", cmd);
    print_help(stderr);
    return CLI_EXIT_USAGE;
}
