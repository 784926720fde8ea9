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
    bool bos;              /* prepend <|endoftext|> (default) */
    bool json;
} cli_common;

enum { CLI_OPT_TOKENIZER = 900, CLI_OPT_NO_BOS, CLI_OPT_JSON, CLI_OPT_FIRST_FREE = 1000 };

/* getopt_long entries for cli_common, to put first in a command's table. */
#define CLI_COMMON_OPTIONS                                        \
    {"model", required_argument, 0, 'm'},                         \
    {"tokenizer", required_argument, 0, CLI_OPT_TOKENIZER},       \
    {"no-bos", no_argument, 0, CLI_OPT_NO_BOS},                   \
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
int cli_load(const char *cmd, const cli_common *o, model *m, tokenizer **tok);

/* Tokenize a prompt, with <|endoftext|> first when bos. */
ps_status cli_encode_prompt(const tokenizer *tok, const char *text, bool bos, int32_t **ids, size_t *n);

/* A token as display text (invalid UTF-8 shown as U+FFFD), malloc'd. */
char *cli_token_display(const tokenizer *tok, int32_t id);

/* 'text' with \n, \t and ' escaped. */
void cli_print_quoted(FILE *out, const char *s);

/* Print indented JSON on stdout and release it. */
void cli_print_json(json_t *j);

/* Write through PATH.partial + rename so a failed run leaves no file that
 * looks complete.  write(out, user) returns a status. */
ps_status cli_write_atomic(const char *path, ps_status (*write)(FILE *out, void *user), void *user);

#endif
