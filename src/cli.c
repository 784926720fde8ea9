#include "cli.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "fsutil.h"
#include "strutil.h"

int cli_fail(void)
{
    fprintf(stderr, "patchsweep: %s\n", err_msg());
    return CLI_EXIT_FAIL;
}

int cli_usage(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "patchsweep %s: ", cmd);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " (see 'patchsweep %s --help')\n", cmd);
    va_end(ap);
    return CLI_EXIT_USAGE;
}

int cli_common_opt(const char *cmd, const char *help, int ch, char **argv, cli_common *o)
{
    switch (ch) {
    case 'm': o->model_dir = optarg; return CLI_CONTINUE;
    case CLI_OPT_TOKENIZER: o->tokenizer_dir = optarg; return CLI_CONTINUE;
    case CLI_OPT_NO_BOS: o->bos = false; return CLI_CONTINUE;
    case CLI_OPT_JSON: o->json = true; return CLI_CONTINUE;
    case 'h': fputs(help, stdout); return 0;
    default:
        /* getopt has moved past the offending word */
        return cli_usage(cmd, "unknown option or missing value: '%s'", argv[optind - 1]);
    }
}

bool cli_parse_size(const char *s, size_t lo, size_t hi, size_t *out)
{
    if (!s || !*s || *s == '-')
        return false;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (*end || errno || v < lo || v > hi)
        return false;
    *out = (size_t)v;
    return true;
}

int cli_load(const char *cmd, const cli_common *o, model *m, tokenizer **tok)
{
    *tok = NULL;
    if (!o->model_dir)
        return cli_usage(cmd, "--model DIR is required");
    if (m && model_load(m, o->model_dir) != PS_OK)
        return cli_fail();
    if (tokenizer_load_for_model(tok, o->model_dir, o->tokenizer_dir) != PS_OK) {
        if (m)
            model_free(m);
        return cli_fail();
    }
    if (m && tokenizer_vocab_size(*tok) > m->cfg.vocab_size) {
        err_set(PS_ERR_INVALID, "%s: the tokenizer has %zu tokens but the model's vocab_size is %zu", o->model_dir,
                tokenizer_vocab_size(*tok), m->cfg.vocab_size);
        tokenizer_free(*tok);
        *tok = NULL;
        model_free(m);
        return cli_fail();
    }
    return 0;
}

ps_status cli_encode_prompt(const tokenizer *tok, const char *text, bool bos, int32_t **ids, size_t *n)
{
    int32_t *raw;
    size_t nr;
    ps_status st = tokenizer_encode(tok, text, strlen(text), &raw, &nr);
    if (st)
        return st;
    size_t total = nr + (bos ? 1 : 0);
    if (total == 0) {
        free(raw);
        return err_set(PS_ERR_INVALID, "the prompt is empty (and --no-bos leaves no token to run)");
    }
    int32_t *out = malloc(total * sizeof *out);
    if (!out) {
        free(raw);
        return err_set(PS_ERR_NOMEM, "out of memory");
    }
    size_t k = 0;
    if (bos)
        out[k++] = TOKENIZER_EOT;
    memcpy(out + k, raw, nr * sizeof *raw);
    free(raw);
    *ids = out;
    *n = total;
    return PS_OK;
}

char *cli_token_display(const tokenizer *tok, int32_t id)
{
    size_t len;
    const char *b = tokenizer_token_bytes(tok, id, &len);
    return b ? str_utf8_sanitize(b, len) : strdup("?");
}

void cli_print_quoted(FILE *out, const char *s)
{
    fputc('\'', out);
    for (const char *p = s; *p; p++) {
        if (*p == '\n')
            fputs("\\n", out);
        else if (*p == '\t')
            fputs("\\t", out);
        else if (*p == '\'')
            fputs("\\'", out);
        else
            fputc(*p, out);
    }
    fputc('\'', out);
}

void cli_print_json(json_t *j)
{
    char *s = json_dumps(j, JSON_INDENT(2) | JSON_ENSURE_ASCII);
    if (s) {
        puts(s);
        free(s);
    }
    json_decref(j);
}

ps_status cli_write_atomic(const char *path, ps_status (*write)(FILE *out, void *user), void *user)
{
    ps_status st = fs_check_output(path);
    if (st)
        return st;
    size_t n = strlen(path);
    char *tmp = malloc(n + sizeof ".partial");
    if (!tmp)
        return err_set(PS_ERR_NOMEM, "out of memory");
    memcpy(tmp, path, n);
    memcpy(tmp + n, ".partial", sizeof ".partial");
    FILE *out = fopen(tmp, "w");
    if (!out) {
        st = err_set(PS_ERR_IO, "%s: cannot create: %s", path, strerror(errno));
    } else {
        st = write(out, user);
        if (fclose(out) != 0 && st == PS_OK)
            st = err_set(PS_ERR_IO, "%s: write failed: %s", path, strerror(errno));
        if (st == PS_OK && rename(tmp, path) != 0)
            st = err_set(PS_ERR_IO, "%s: cannot rename from %s: %s", path, tmp, strerror(errno));
        if (st != PS_OK)
            remove(tmp);
    }
    free(tmp);
    return st;
}
