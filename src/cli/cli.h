/*
 * cli: what the command modules (src/cmd_*.c) share.  The CLI is the only
 * layer that prints and chooses exit codes; it is not part of the library.
 *
 * Exit status of every command: 0 success, CLI_EXIT_FAIL (1) when the work
 * failed (one line "patchsweep: <file>: <problem>" on stderr), CLI_EXIT_USAGE
 * (2) for a usage error.
 */
#ifndef PS_CLI_H
#define PS_CLI_H

#include <getopt.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "blas.h"
#include "err.h"
#include "model.h"
#include "tokenizer.h"

#define CLI_EXIT_FAIL 1
#define CLI_EXIT_USAGE 2
#define CLI_CONTINUE (-1)

/* Options every model-running command takes. */
typedef struct {
    const char *model_dir;
    const char *tokenizer_dir;
    bool bos;              /* prepend the tokenizer's BOS if it has one (default; --no-bos) */
    bool bos_forced;       /* --bos: prepend it even where add_bos_token is false */
    bool json;
    model_compute compute; /* --compute f32|bf16 (CLI_COMPUTE_OPTION; default f32) */
} cli_common;

enum { CLI_OPT_TOKENIZER = 900, CLI_OPT_NO_BOS, CLI_OPT_JSON, CLI_OPT_BOS, CLI_OPT_COMPUTE, CLI_OPT_FIRST_FREE = 1000 };

/* --compute f32|bf16, for the commands that run the model's blocks (not in
 * CLI_COMMON_OPTIONS: commands that run no product must not accept it);
 * handled by cli_common_opt, used by cli_load*. */
#define CLI_COMPUTE_OPTION {"compute", required_argument, 0, CLI_OPT_COMPUTE}
#define CLI_COMPUTE_HELP                                                                                               \
    "  --compute f32|bf16  the blocks' matrix products in F32 (default) or in BF16 with F32\n"                        \
    "                 accumulation (needs AMX-BF16 or AVX512_BF16; README \"BF16 arithmetic\")\n"

/* getopt_long entries for cli_common, to put first in a command's table. */
#define CLI_COMMON_OPTIONS                                        \
    {"model", required_argument, 0, 'm'},                         \
    {"tokenizer", required_argument, 0, CLI_OPT_TOKENIZER},       \
    {"no-bos", no_argument, 0, CLI_OPT_NO_BOS},                   \
    {"bos", no_argument, 0, CLI_OPT_BOS},                         \
    {"json", no_argument, 0, CLI_OPT_JSON},                       \
    {"help", no_argument, 0, 'h'}

/* Handle a getopt result that is a common option, 'h' (prints help, returns
 * 0) or an error ('?': one usage line naming the option, CLI_EXIT_USAGE).
 * CLI_CONTINUE when handled.  main() sets opterr = 0 so that this line is
 * the only one. */
int cli_common_opt(const char *cmd, const char *help, int ch, char **argv, cli_common *o);

/* Print err_msg() as one line and return CLI_EXIT_FAIL. */
int cli_fail(void);

/* "patchsweep CMD: <message> (see 'patchsweep CMD --help')"; CLI_EXIT_USAGE. */
int cli_usage(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A whole number in [lo, hi]. */
bool cli_parse_size(const char *s, size_t lo, size_t hi, size_t *out);

/* Load the model (when m != NULL) and its tokenizer; on failure prints and
 * returns the exit code (nothing stays allocated), else 0. */
int cli_load(const char *cmd, cli_common *o, model *m, tokenizer **tok);

/* The tokenizer of model m (NULL: any): tokenizer_load_for_model, refused
 * for a family other than GPT-2 unless it is a tokenizer.json, and refused
 * when it has more tokens than the model.  required = false: a failure
 * leaves *tok = NULL and returns PS_OK (ids-only runs). */
ps_status cli_model_tokenizer(const char *model_dir, const char *tokenizer_dir, const model *m, bool required,
                              tokenizer **tok);

/* "50256,1,2" -> malloc'd ids; false for a malformed list (a usage error). */
bool cli_parse_ids(const char *s, int32_t **ids, size_t *n);

/* The model for a run from token ids (--ids and the like): no tokenizer is
 * needed: the model's own is loaded for token strings when it has one it
 * can use (cli_model_tokenizer), else *tok = NULL; ids at or above the
 * vocabulary are refused.  As cli_load otherwise. */
int cli_load_ids(const char *cmd, const cli_common *o, model *m, tokenizer **tok, const int32_t *ids, size_t n);

/* The model for a command reading a dataset (evaluate, lens --dataset):
 * cli_load for GPT-2; the other families use their tokenizer.json when they
 * have one, else *tok = NULL and the items' token ids are used (clean_ids,
 * ...: dataset.h). */
int cli_load_for_dataset(const char *cmd, const cli_common *o, model *m, tokenizer **tok);

/* Tokenize a prompt, with the tokenizer's BOS first when bos and the
 * tokenizer adds one (tokenizer_add_bos). */
ps_status cli_encode_prompt(const tokenizer *tok, const char *text, bool bos, int32_t **ids, size_t *n);

/* 'text' with \n, \t and ' escaped. */
void cli_print_quoted(FILE *out, const char *s);

/* Print indented JSON on stdout and release it. */
void cli_print_json(json_t *j);

/* Write through PATH.partial + rename so a failed run leaves no file that
 * looks complete.  write(out, user) returns a status. */
ps_status cli_write_atomic(const char *path, ps_status (*write)(FILE *out, void *user), void *user);

/* Options of every command, taken out of argv by main() before the command
 * parses the rest (BLAS kernels must be chosen before the first BLAS call):
 *   --blas-core NAME (or --blas-core=NAME)  run OpenBLAS's NAME kernels
 *   --no-blas-autoselect                    keep OpenBLAS's own choice
 * Recognised anywhere after the program name, up to a "--" word. */
typedef struct {
    const char *core;   /* NULL: not given */
    bool no_autoselect;
} cli_blas_opts;

/* Parse those options; *out_argv becomes a malloc'd copy of argv without
 * them (NULL-terminated, *out_argc words; argv itself is untouched, for a
 * re-execution).  Returns CLI_CONTINUE, or CLI_EXIT_USAGE after printing one
 * line. */
int cli_blas_options(int argc, char **argv, cli_blas_opts *o, int *out_argc, char ***out_argv);

/* The BLAS set-up of this process, filled by main() at start-up. */
blas_report *cli_blas(void);

/* Run `threads` BLAS threads (openblas_set_num_threads; `why` names the
 * rule, blas_threads_choose) and record them in the report and the
 * provenance; per_rank adds "per rank" to the provenance line (sweeps). */
void cli_blas_set_threads(size_t threads, const char *why, bool per_rank);

/* The default thread count of this process (blas_threads_choose) with
 * `requested` (0: none) and `local_ranks` ranks on this node. */
size_t cli_blas_threads_default(size_t requested, size_t local_ranks, const char **why);

/* The report as a JSON object (info, bench). */
json_t *cli_blas_json(void);

#endif
