#include "cli.h"

#include <cblas.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "fsutil.h"
#include "pool.h"
#include "prov.h"
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
    case CLI_OPT_NO_BOS: o->bos = false; o->bos_forced = false; return CLI_CONTINUE;
    case CLI_OPT_BOS: o->bos = true; o->bos_forced = true; return CLI_CONTINUE;
    case CLI_OPT_JSON: o->json = true; return CLI_CONTINUE;
    case CLI_OPT_COMPUTE:
        if (!model_compute_parse(optarg, &o->compute))
            return cli_usage(cmd, "--compute takes f32 or bf16, not '%s'", optarg);
        return CLI_CONTINUE;
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

ps_status cli_model_tokenizer(const char *model_dir, const char *tokenizer_dir, const model *m, bool required,
                              tokenizer **tok)
{
    *tok = NULL;
    ps_status st = tokenizer_load_for_model(tok, model_dir, tokenizer_dir);
    if (st == PS_OK && m && m->cfg.family != MODEL_FAMILY_GPT2 && !tokenizer_is_hf(*tok)) {
        /* GPT-2's vocab/merges (a fallback) would silently mis-tokenize this
         * model's text */
        st = err_set(PS_ERR_INVALID, "%s: a %s model needs its tokenizer.json (none in the model directory%s); "
                     "or give token ids (--ids)", model_dir, model_family_name(m->cfg.family),
                     tokenizer_dir ? " nor in --tokenizer" : "");
    }
    if (st == PS_OK && m && tokenizer_vocab_size(*tok) > m->cfg.vocab_size)
        st = err_set(PS_ERR_INVALID, "%s: the tokenizer has %zu tokens but the model's vocab_size is %zu", model_dir,
                     tokenizer_vocab_size(*tok), m->cfg.vocab_size);
    if (st != PS_OK) {
        tokenizer_free(*tok);
        *tok = NULL;
    }
    return required ? st : PS_OK;
}

int cli_load(const char *cmd, cli_common *o, model *m, tokenizer **tok)
{
    *tok = NULL;
    if (!o->model_dir)
        return cli_usage(cmd, "--model DIR is required");
    if (m && model_load_compute(m, o->model_dir, NULL, o->compute) != PS_OK)
        return cli_fail();
    /* --bos / --no-bos over the tokenizer's own BOS default; o->bos then
     * says whether prompts really start with a BOS. */
    if (cli_model_tokenizer(o->model_dir, o->tokenizer_dir, m, true, tok) != PS_OK ||
        (o->bos_forced && tokenizer_set_add_bos(*tok, true) != PS_OK)) {
        tokenizer_free(*tok);
        *tok = NULL;
        if (m)
            model_free(m);
        return cli_fail();
    }
    o->bos = o->bos && tokenizer_add_bos(*tok);
    return 0;
}

ps_status cli_encode_prompt(const tokenizer *tok, const char *text, bool bos, int32_t **ids, size_t *n)
{
    int32_t *raw;
    size_t nr;
    ps_status st = tokenizer_encode(tok, text, strlen(text), &raw, &nr);
    if (st)
        return st;
    bos = bos && tokenizer_add_bos(tok);
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
        out[k++] = tokenizer_bos_id(tok);
    memcpy(out + k, raw, nr * sizeof *raw);
    free(raw);
    *ids = out;
    *n = total;
    return PS_OK;
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

/* ---- BLAS ------------------------------------------------------------------ */

static bool core_name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n >= BLAS_CORE_MAX)
        return false;
    for (const char *p = s; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '_'))
            return false;
    return true;
}

int cli_blas_options(int argc, char **argv, cli_blas_opts *o, int *out_argc, char ***out_argv)
{
    *o = (cli_blas_opts){0};
    *out_argv = NULL;
    char **kept = malloc(((size_t)argc + 1) * sizeof *kept);
    if (!kept) {
        fprintf(stderr, "patchsweep: out of memory\n");
        return CLI_EXIT_FAIL;
    }
    int n = 0;
    bool rest = false; /* after "--": operands only */
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (i == 0 || rest) {
            kept[n++] = argv[i];
            continue;
        }
        if (!strcmp(a, "--")) {
            rest = true;
            kept[n++] = argv[i];
        } else if (!strcmp(a, "--no-blas-autoselect")) {
            o->no_autoselect = true;
        } else if (!strcmp(a, "--blas-core") || !strncmp(a, "--blas-core=", 12)) {
            const char *v = a[11] == '=' ? a + 12 : (i + 1 < argc ? argv[++i] : NULL);
            if (!v || !core_name_ok(v)) {
                free(kept);
                fprintf(stderr,
                        "patchsweep: --blas-core takes an OpenBLAS core name such as SkylakeX, Haswell or Prescott, "
                        "not %s%s%s\n",
                        v ? "'" : "nothing", v ? v : "", v ? "'" : "");
                return CLI_EXIT_USAGE;
            }
            o->core = v;
        } else {
            kept[n++] = argv[i];
        }
    }
    kept[n] = NULL;
    *out_argc = n;
    *out_argv = kept;
    return CLI_CONTINUE;
}

static blas_report blas_state;

blas_report *cli_blas(void) { return &blas_state; }

void cli_blas_set_threads(size_t threads, const char *why, bool per_rank)
{
    /* One set of threads per process, the pool's: OpenBLAS runs on each
     * pool thread's share of a product (gemm_unembed), single-threaded,
     * so that its spinning workers never compete with the pool's. */
    pool_set_threads(threads);
    openblas_set_num_threads(1);
    blas_state.threads = pool_threads();
    blas_state.threads_why = why;
    char line[512];
    blas_describe(&blas_state, line, sizeof line);
    if (per_rank)
        strncat(line, " per rank", sizeof line - strlen(line) - 1);
    prov_set_blas(line, blas_state.core, blas_state.threads);
}

size_t cli_blas_threads_default(size_t requested, size_t local_ranks, const char **why)
{
    const char *env = getenv("OPENBLAS_NUM_THREADS");
    if (!env || !*env)
        env = getenv("OMP_NUM_THREADS");
    blas_threads_in in = {.requested = requested,
                          .env_threads = env,
                          .slurm_cpus_per_task = getenv("SLURM_CPUS_PER_TASK"),
                          .affinity_cpus = blas_affinity_cpus(),
                          .local_ranks = local_ranks};
    return blas_threads_choose(&in, why);
}

json_t *cli_blas_json(void)
{
    const blas_report *r = &blas_state;
    const blas_cpu *c = &r->cpu;
    char features[256];
    blas_cpu_describe(c, features, sizeof features);
    const char *best = blas_cpu_best_core(c);
    return json_pack("{s:s,s:s,s:s,s:s,s:s,s:s?,s:s?,s:s,s:f,s:b,s:i,s:s,s:{s:s,s:i,s:i,s:s,s:s?}}", "library",
                     "OpenBLAS", "version", r->version, "threading", r->threading, "core", r->core, "source",
                     blas_source_name(r->source), "openblas_choice", r->openblas_choice[0] ? r->openblas_choice : NULL,
                     "rejected", r->rejected[0] ? r->rejected : NULL, "selfcheck", blas_check_name(r->check),
                     "selfcheck_worst", r->check_worst, "reexecuted", r->reexecuted, "threads", (int)r->threads,
                     "threads_rule", r->threads_why ? r->threads_why : "", "cpu", "vendor", c->vendor, "family",
                     (int)c->family, "model", (int)c->model, "description", features, "best_core", best);
}

/* ---- token ids as input (--ids, issue 17) ---------------------------------- */

/* "50256,1,2" -> ids; a malformed list is a usage error (returns false). */
bool cli_parse_ids(const char *s, int32_t **ids, size_t *n)
{
    size_t cap = 1;
    for (const char *p = s; *p; p++)
        cap += *p == ',';
    int32_t *out = malloc(cap * sizeof *out);
    if (!out)
        return false;
    size_t k = 0;
    const char *p = s;
    for (;;) {
        char *end = NULL;
        if (*p < '0' || *p > '9') {
            free(out);
            return false;
        }
        errno = 0;
        long long v = strtoll(p, &end, 10);
        if (errno || v > INT32_MAX) {
            free(out);
            return false;
        }
        out[k++] = (int32_t)v;
        if (*end == '\0')
            break;
        if (*end != ',') {
            free(out);
            return false;
        }
        p = end + 1;
    }
    *ids = out;
    *n = k;
    return true;
}

/* The model for a run from token ids: no tokenizer is needed (models of the
 * other families have none yet), and none is loaded (tok = NULL); ids at or
 * above the vocabulary are refused. */
int cli_load_ids(const char *cmd, const cli_common *o, model *m, tokenizer **tok, const int32_t *ids, size_t n)
{
    *tok = NULL;
    if (!o->model_dir)
        return cli_usage(cmd, "--model DIR is required");
    if (model_load_compute(m, o->model_dir, NULL, o->compute) != PS_OK)
        return cli_fail();
    /* token strings for the output when the model has a tokenizer it can
     * use; the ids alone otherwise */
    cli_model_tokenizer(o->model_dir, o->tokenizer_dir, m, false, tok);
    for (size_t i = 0; i < n; i++)
        if ((size_t)ids[i] >= m->cfg.vocab_size) {
            err_set(PS_ERR_RANGE, "--ids: token id %d at position %zu is not below the vocabulary size %zu", ids[i], i,
                    m->cfg.vocab_size);
            tokenizer_free(*tok);
            *tok = NULL;
            model_free(m);
            return cli_fail();
        }
    return 0;
}

int cli_load_for_dataset(const char *cmd, const cli_common *o, model *m, tokenizer **tok)
{
    *tok = NULL;
    if (!o->model_dir)
        return cli_usage(cmd, "--model DIR is required");
    if (model_load_compute(m, o->model_dir, NULL, o->compute) != PS_OK)
        return cli_fail();
    /* GPT-2 always tokenizes (its files are found as for cli_load); the
     * other families with their tokenizer.json, or else the items' token
     * ids are used (clean_ids, ...: dataset.h) */
    if (cli_model_tokenizer(o->model_dir, o->tokenizer_dir, m, m->cfg.family == MODEL_FAMILY_GPT2, tok) != PS_OK) {
        model_free(m);
        return cli_fail();
    }
    return 0;
}
