/*
 * patchsweep: the command-line interface.  The only code that prints to
 * stdout/stderr or exits; everything below it returns ps_status.
 *
 * Exit status: 0 success, 1 the work failed (bad input file, I/O error: one
 * line "patchsweep: <file>: <problem>" on stderr), 2 usage error.
 */
#include <cblas.h>
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "dataset.h"
#include "err.h"
#include "forward.h"
#include "hooks.h"
#include "model.h"
#include "ncout.h"
#include "patch.h"
#include "prov.h"
#include "strutil.h"
#include "tokenizer.h"

#define EXIT_FAIL 1
#define EXIT_USAGE 2

static int fail(void)
{
    fprintf(stderr, "patchsweep: %s\n", err_msg());
    return EXIT_FAIL;
}

static int usage_error(const char *cmd, const char *fmt, const char *arg)
{
    fprintf(stderr, "patchsweep %s: ", cmd);
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (see 'patchsweep %s --help')\n", cmd);
    return EXIT_USAGE;
}

/* Parse a non-negative integer option value in [lo, hi]. */
static bool parse_size(const char *s, size_t lo, size_t hi, size_t *out)
{
    if (!s || !*s || *s == '-')
        return false;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (*end || v < lo || v > hi)
        return false;
    *out = (size_t)v;
    return true;
}

/* ---- options shared by the model-running commands ------------------------ */

typedef struct {
    const char *model_dir;
    const char *tokenizer_dir;
    const char *prompt;
    const char *output;
    const char *hooks;
    const char *clean, *corrupted, *answer, *wrong;
    const char *components, *metric, *direction, *engine;
    bool bos;
    bool json;
    size_t top_k;
} common_opts;

enum {
    OPT_NO_BOS = 1000, OPT_TOKENIZER, OPT_JSON, OPT_HOOKS, OPT_TOP_K, OPT_IDS, OPT_CORRUPTION, OPT_SEED,
    OPT_CLEAN, OPT_CORRUPTED, OPT_ANSWER, OPT_WRONG, OPT_COMPONENTS, OPT_METRIC, OPT_DIRECTION, OPT_ENGINE, OPT_REPS
};

/* Load the model (if a model-running command) and its tokenizer. */
static int load_session(const common_opts *o, const char *cmd, model *m, tokenizer **tok, bool need_model)
{
    if (!o->model_dir)
        return usage_error(cmd, "%s--model DIR is required", "");
    if (need_model && model_load(m, o->model_dir) != PS_OK)
        return fail();
    if (tokenizer_load_for_model(tok, o->model_dir, o->tokenizer_dir) != PS_OK) {
        if (need_model)
            model_free(m);
        return fail();
    }
    if (need_model && tokenizer_vocab_size(*tok) > m->cfg.vocab_size) {
        err_set(PS_ERR_INVALID, "%s: the tokenizer has %zu tokens but the model's vocab_size is %zu",
                o->model_dir, tokenizer_vocab_size(*tok), m->cfg.vocab_size);
        tokenizer_free(*tok);
        model_free(m);
        return fail();
    }
    return 0;
}

/* Tokenize the prompt, with <|endoftext|> first unless --no-bos. */
static ps_status encode_prompt(const tokenizer *tok, const char *text, bool bos, int32_t **ids, size_t *n)
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

/* A token as a printable, quoted display string (malloc'd). */
static char *token_display(const tokenizer *tok, int32_t id)
{
    size_t len;
    const char *b = tokenizer_token_bytes(tok, id, &len);
    return b ? str_utf8_sanitize(b, len) : strdup("?");
}

static void print_quoted(FILE *out, const char *s)
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

static void print_json(json_t *j)
{
    char *s = json_dumps(j, JSON_INDENT(2) | JSON_ENSURE_ASCII);
    if (s) {
        puts(s);
        free(s);
    }
    json_decref(j);
}

/* ---- tokenize ------------------------------------------------------------ */

static const char *tokenize_help =
    "usage: patchsweep tokenize --model DIR [--tokenizer DIR] [--no-bos] [--json] TEXT\n"
    "  Byte-level BPE token ids and token strings of TEXT (GPT-2's tokenizer).\n"
    "  --model DIR      model directory (its vocab.json + merges.txt, or the default tokenizer)\n"
    "  --tokenizer DIR  use the tokenizer files in DIR\n"
    "  --no-bos         do not prepend <|endoftext|> (id 50256)\n"
    "  --json           {\"ids\": [...], \"tokens\": [...]}\n";

static int cmd_tokenize(int argc, char **argv, common_opts *o)
{
    if (optind != argc - 1)
        return usage_error("tokenize", "%sexactly one TEXT argument is required", "");
    tokenizer *tok = NULL;
    int rc = load_session(o, "tokenize", NULL, &tok, false);
    if (rc)
        return rc;
    int32_t *ids;
    size_t n;
    if (encode_prompt(tok, argv[optind], o->bos, &ids, &n) != PS_OK) {
        tokenizer_free(tok);
        return fail();
    }
    json_t *jids = json_array(), *jtoks = json_array();
    for (size_t i = 0; i < n; i++) {
        char *s = token_display(tok, ids[i]);
        if (o->json) {
            json_array_append_new(jids, json_integer(ids[i]));
            json_array_append_new(jtoks, json_string(s));
        } else {
            printf("%4zu %6d ", i, ids[i]);
            print_quoted(stdout, s);
            putchar('\n');
        }
        free(s);
    }
    if (o->json)
        print_json(json_pack("{s:o,s:o}", "ids", jids, "tokens", jtoks));
    else {
        json_decref(jids);
        json_decref(jtoks);
    }
    free(ids);
    tokenizer_free(tok);
    return 0;
}

/* ---- run ----------------------------------------------------------------- */

static const char *run_help =
    "usage: patchsweep run --model DIR --prompt TEXT [--top-k K] [--no-bos] [--json]\n"
    "  One forward pass; the next-token distribution after the prompt: the top K\n"
    "  tokens with probability and logit (default K = 10).\n";

typedef struct {
    int32_t id;
    float logit;
} scored;

static int cmp_scored(const void *a, const void *b)
{
    const scored *x = a, *y = b;
    if (x->logit != y->logit)
        return x->logit < y->logit ? 1 : -1;
    return x->id - y->id;
}

static int cmd_run(common_opts *o)
{
    if (!o->prompt)
        return usage_error("run", "%s--prompt TEXT is required", "");
    model m;
    tokenizer *tok = NULL;
    int rc = load_session(o, "run", &m, &tok, true);
    if (rc)
        return rc;
    int32_t *ids = NULL;
    size_t n = 0;
    forward_cache c = {0};
    scored *top = NULL;
    if (encode_prompt(tok, o->prompt, o->bos, &ids, &n) != PS_OK ||
        forward_cache_init(&c, &m.cfg, n, FORWARD_LOGITS_LAST) != PS_OK ||
        forward_run(&m, &c, ids, n, NULL) != PS_OK) {
        rc = fail();
        goto out;
    }
    const size_t V = m.cfg.vocab_size;
    size_t k = o->top_k < V ? o->top_k : V;
    /* softmax over the last row: p_i = exp(l_i - max) / sum_j exp(l_j - max) */
    float mx = -INFINITY;
    for (size_t i = 0; i < V; i++)
        mx = fmaxf(mx, c.logits[i]);
    double z = 0.0;
    for (size_t i = 0; i < V; i++)
        z += exp((double)c.logits[i] - mx);
    top = malloc(V * sizeof *top);
    if (!top) {
        err_set(PS_ERR_NOMEM, "out of memory");
        rc = fail();
        goto out;
    }
    for (size_t i = 0; i < V; i++)
        top[i] = (scored){(int32_t)i, c.logits[i]};
    qsort(top, V, sizeof *top, cmp_scored);
    json_t *jtop = json_array();
    if (!o->json)
        printf("%zu tokens; next token:\n%4s %6s %9s %9s  %s\n", n, "rank", "id", "prob", "logit", "token");
    for (size_t i = 0; i < k; i++) {
        double p = exp((double)top[i].logit - mx) / z;
        char *s = token_display(tok, top[i].id);
        if (o->json) {
            json_array_append_new(jtop, json_pack("{s:i,s:s,s:f,s:f}", "id", top[i].id, "token", s,
                                                  "prob", p, "logit", (double)top[i].logit));
        } else {
            printf("%4zu %6d %9.6f %9.4f  ", i + 1, top[i].id, p, top[i].logit);
            print_quoted(stdout, s);
            putchar('\n');
        }
        free(s);
    }
    if (o->json)
        print_json(json_pack("{s:i,s:o}", "n_tokens", (int)n, "top", jtop));
    else
        json_decref(jtop);
out:
    free(top);
    free(ids);
    forward_cache_free(&c);
    tokenizer_free(tok);
    model_free(&m);
    return rc;
}

/* ---- cache --------------------------------------------------------------- */

static const char *cache_help =
    "usage: patchsweep cache --model DIR --prompt TEXT [--hooks PATTERN[,PATTERN...]] [--no-bos] -o OUT.nc\n"
    "  TransformerLens' run_with_cache as a NetCDF-4 file: one variable per hook\n"
    "  point, named by its hook name (e.g. blocks.3.attn.hook_z(position, head, d_head)),\n"
    "  plus logits(position, vocab), token_id(position), token(position) and provenance.\n"
    "  --hooks   comma-separated shell globs over hook names (default: all), e.g.\n"
    "            'blocks.*.hook_resid_post,logits'\n";

static int cmd_cache(common_opts *o)
{
    if (!o->prompt)
        return usage_error("cache", "%s--prompt TEXT is required", "");
    if (!o->output)
        return usage_error("cache", "%s-o OUT.nc is required", "");
    model m;
    tokenizer *tok = NULL;
    int rc = load_session(o, "cache", &m, &tok, true);
    if (rc)
        return rc;
    int32_t *ids = NULL;
    size_t n = 0;
    forward_cache c = {0};
    hook_set hs = {0};
    ncout_file f = {.ncid = -1};
    ps_status st = o->hooks ? hook_set_parse(&hs, o->hooks, m.cfg.n_layer) : hook_set_all(&hs, m.cfg.n_layer);
    bool want_logits = st == PS_OK && hook_set_has(&hs, (hook_point){HOOK_LOGITS, 0});
    if (st || (st = encode_prompt(tok, o->prompt, o->bos, &ids, &n)) ||
        (st = ncout_create(&f, o->output)) ||
        (st = forward_cache_init(&c, &m.cfg, n, want_logits ? FORWARD_LOGITS_ALL : FORWARD_LOGITS_NONE)) ||
        (st = forward_run(&m, &c, ids, n, NULL)) ||
        (st = ncout_write_cache(&f, &m, tok, &c, &hs, o->bos)) || (st = ncout_commit(&f))) {
        ncout_abort(&f);
        rc = fail();
    } else {
        fprintf(stderr, "wrote %s: %zu tokens, %zu hook points\n", o->output, n, hs.n_on);
    }
    free(ids);
    hook_set_free(&hs);
    forward_cache_free(&c);
    tokenizer_free(tok);
    model_free(&m);
    return rc;
}


/* ---- patch --------------------------------------------------------------- */

static const char *patch_help =
    "usage: patchsweep patch --model DIR --clean TEXT --corrupted TEXT --answer TOK --wrong TOK\n"
    "                        [--components LIST] [--metric M] [--direction denoise|noise]\n"
    "                        [--engine fast|naive] [-o OUT.nc] [--json] [--no-bos]\n"
    "  Activation patching of one prompt pair (the worksheet's IOI grid).\n"
    "  --components  comma-separated: resid_pre (default), resid_mid, attn_out, mlp_out,\n"
    "                z (layer x position x head), z_all_pos, q_all_pos, k_all_pos,\n"
    "                v_all_pos, pattern_all_pos (layer x head); groups block_every\n"
    "                (resid_pre,attn_out,mlp_out) and head_all_pos_every\n"
    "  --metric      logit_diff (default: logit[answer] - logit[wrong]), prob, logprob, kl\n"
    "  --direction   denoise (default: run corrupted, patch in clean) or noise\n"
    "  --engine      fast (default: recompute only what a patch changes) or naive\n"
    "                (one full forward per cell, the reference)\n"
    "  Prints each grid of normalized values, (patched - corrupted) / (clean - corrupted),\n"
    "  layers as rows and tokens as columns; -o writes the NetCDF results file.\n";

/* The table of one component's normalized grid. */
static void print_patch_table(const patch_pair *p, const tokenizer *tok, patch_component c, const model_config *cfg,
                              const double *values, patch_metric metric)
{
    size_t shape[3];
    size_t nd = patch_grid_shape(c, cfg, p->T, shape, NULL);
    printf("\n%s (normalized %s; rows = layer%s, columns = %s)\n", patch_component_name(c), patch_metric_name(metric),
           nd == 3 ? ".head" : "", c >= PATCH_Z_ALL_POS ? "head" : "token_position");
    const size_t ncol = shape[1] == p->T && c < PATCH_Z_ALL_POS ? p->T : shape[1];
    printf("%-7s", "");
    for (size_t j = 0; j < ncol; j++) {
        if (c >= PATCH_Z_ALL_POS) {
            printf(" %7s%-2zu", "h", j);
            continue;
        }
        /* Column labels as the worksheet's: token_index, cut to 9 chars. */
        size_t len;
        const char *b = tokenizer_token_bytes(tok, p->corrupted.tokens[j], &len);
        char *s = b ? str_utf8_sanitize(b, len) : strdup("?");
        char label[64];
        snprintf(label, sizeof label, "%s_%zu", s ? s : "?", j);
        free(s);
        for (char *q = label; *q; q++)
            if (*q == '\n' || *q == '\t')
                *q = ' ';
        printf(" %9.9s", label);
    }
    putchar('\n');
    size_t rows = shape[0] * (nd == 3 ? shape[2] : 1);
    for (size_t r = 0; r < rows; r++) {
        size_t layer = nd == 3 ? r / shape[2] : r, head = nd == 3 ? r % shape[2] : 0;
        char label[48];
        if (nd == 3)
            snprintf(label, sizeof label, "L%zu.H%zu", layer, head);
        else
            snprintf(label, sizeof label, "L%zu", layer);
        printf("%-7s", label);
        for (size_t j = 0; j < ncol; j++) {
            size_t idx = nd == 3 ? (layer * shape[1] + j) * shape[2] + head : layer * shape[1] + j;
            printf(" %9.3f", patch_normalize(p, metric, values[idx]));
        }
        putchar('\n');
    }
}

static int cmd_patch(common_opts *o)
{
    const char *missing = !o->clean ? "--clean TEXT" : !o->corrupted ? "--corrupted TEXT" : !o->answer ? "--answer TOK"
                          : !o->wrong ? "--wrong TOK" : NULL;
    if (missing)
        return usage_error("patch", "%s is required", missing);
    bool on[PATCH_COMPONENT_COUNT];
    patch_opts po = {.metric = PATCH_LOGIT_DIFF, .direction = PATCH_DENOISE, .engine = PATCH_ENGINE_FAST};
    if (patch_components_parse(o->components ? o->components : "resid_pre", on) != PS_OK)
        return usage_error("patch", "%s", err_msg());
    if (o->metric && patch_metric_parse(o->metric, &po.metric) != PS_OK)
        return usage_error("patch", "%s", err_msg());
    if (o->direction && strcmp(o->direction, "denoise") && strcmp(o->direction, "noise"))
        return usage_error("patch", "unknown direction '%s' (denoise or noise)", o->direction);
    if (o->direction && !strcmp(o->direction, "noise"))
        po.direction = PATCH_NOISE;
    if (o->engine && strcmp(o->engine, "fast") && strcmp(o->engine, "naive"))
        return usage_error("patch", "unknown engine '%s' (fast or naive)", o->engine);
    if (o->engine && !strcmp(o->engine, "naive"))
        po.engine = PATCH_ENGINE_NAIVE;
    model m;
    tokenizer *tok = NULL;
    int rc = load_session(o, "patch", &m, &tok, true);
    if (rc)
        return rc;
    int32_t *clean = NULL, *corrupted = NULL;
    size_t nc = 0, nr = 0;
    int32_t answer, wrong;
    patch_pair pair = {0};
    double *values[PATCH_COMPONENT_COUNT] = {0};
    ncout_file f = {.ncid = -1};
    ps_status st;
    if ((st = encode_prompt(tok, o->clean, o->bos, &clean, &nc)) ||
        (st = encode_prompt(tok, o->corrupted, o->bos, &corrupted, &nr)))
        goto out;
    if (nc != nr) {
        st = err_set(PS_ERR_INVALID, "clean and corrupted prompts differ in token length (%zu vs %zu tokens)", nc, nr);
        goto out;
    }
    if (nc > m.cfg.n_positions) {
        st = err_set(PS_ERR_RANGE, "the prompts are %zu tokens, more than the model's %zu positions", nc,
                     m.cfg.n_positions);
        goto out;
    }
    if ((st = tokenizer_single_token(tok, o->answer, &answer)) ||
        (st = tokenizer_single_token(tok, o->wrong, &wrong)))
        goto out;
    if (o->output && (st = ncout_create(&f, o->output)))
        goto out;
    if ((st = patch_pair_init(&pair, &m, clean, corrupted, nc, answer, wrong)))
        goto out;
    for (int c = 0; c < PATCH_COMPONENT_COUNT && st == PS_OK; c++) {
        if (!on[c])
            continue;
        patch_cell *cells;
        size_t n;
        if ((st = patch_grid_cells((patch_component)c, &m.cfg, 0, nc, &cells, &n)))
            break;
        values[c] = malloc(n * sizeof *values[c]);
        if (!values[c])
            st = err_set(PS_ERR_NOMEM, "out of memory");
        else
            st = patch_eval(&m, &pair, 1, cells, n, &po, values[c]);
        free(cells);
    }
    if (st)
        goto out;
    if (o->output) {
        ncout_results res;
        if ((st = ncout_results_define(&res, &f, &m, nc, on, po.metric, po.direction, po.engine)) ||
            (st = ncout_results_put(&res, 0, &pair, tok, o->answer, o->wrong, values)) || (st = ncout_commit(&f)))
            goto out;
        fprintf(stderr, "wrote %s\n", o->output);
    }
    if (o->json) {
        json_t *comps = json_object();
        for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
            if (!on[c])
                continue;
            size_t shape[3];
            const char *dn[3];
            size_t nd = patch_grid_shape((patch_component)c, &m.cfg, nc, shape, dn);
            size_t n = shape[0] * shape[1] * (nd == 3 ? shape[2] : 1);
            json_t *dims = json_array(), *shp = json_array(), *raw = json_array(), *norm = json_array();
            for (size_t k = 0; k < nd; k++) {
                json_array_append_new(dims, json_string(dn[k]));
                json_array_append_new(shp, json_integer((json_int_t)shape[k]));
            }
            for (size_t i = 0; i < n; i++) {
                double v = patch_normalize(&pair, po.metric, values[c][i]);
                json_array_append_new(raw, json_real(values[c][i]));
                json_array_append_new(norm, isfinite(v) ? json_real(v) : json_null());
            }
            json_object_set_new(comps, patch_component_name((patch_component)c),
                                json_pack("{s:o,s:o,s:o,s:o}", "dims", dims, "shape", shp, "values", raw,
                                          "normalized", norm));
        }
        json_t *toks = json_array();
        for (size_t t = 0; t < nc; t++) {
            char *s = token_display(tok, corrupted[t]);
            json_array_append_new(toks, json_string(s ? s : ""));
            free(s);
        }
        print_json(json_pack("{s:s,s:s,s:s,s:f,s:f,s:i,s:i,s:o,s:o}", "metric", patch_metric_name(po.metric),
                             "direction", po.direction == PATCH_DENOISE ? "denoise" : "noise", "engine",
                             po.engine == PATCH_ENGINE_FAST ? "fast" : "naive", "clean_metric",
                             pair.clean_metric[po.metric], "corrupted_metric", pair.corrupted_metric[po.metric],
                             "answer_id", answer, "wrong_id", wrong, "corrupted_tokens", toks, "components", comps));
    } else {
        printf("%zu tokens; %s: clean %.4f, corrupted %.4f (%s, %s engine)\n", nc, patch_metric_name(po.metric),
               pair.clean_metric[po.metric], pair.corrupted_metric[po.metric],
               po.direction == PATCH_DENOISE ? "denoising" : "noising",
               po.engine == PATCH_ENGINE_FAST ? "fast" : "naive");
        for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
            if (on[c])
                print_patch_table(&pair, tok, (patch_component)c, &m.cfg, values[c], po.metric);
    }
out:
    if (st) {
        ncout_abort(&f);
        rc = fail();
    }
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        free(values[c]);
    patch_pair_free(&pair);
    free(clean);
    free(corrupted);
    tokenizer_free(tok);
    model_free(&m);
    return rc;
}


/* ---- bench --------------------------------------------------------------- */

static const char *bench_help =
    "usage: patchsweep bench --model DIR [--clean TEXT --corrupted TEXT --answer TOK --wrong TOK]\n"
    "                        [--components LIST] [--metric M] [--reps N] [--json]\n"
    "  Times the naive and the fast patching engine side by side in this process\n"
    "  on one prompt pair (default: the worksheet's IOI pair), beside the sgemm\n"
    "  peak measured in the same run.  Fast: median of N runs (default 5);\n"
    "  naive: one run.  Useful GFLOP/s = the FLOPs the fast engine's plan needs\n"
    "  (recomputed rows and blocks of the cells that change anything) / time.\n";

static int cmd_bench(common_opts *o, size_t reps)
{
    const char *clean = o->clean ? o->clean : "After John and Mary went to the store, Mary gave a bottle of milk to";
    const char *corr = o->corrupted ? o->corrupted : "After John and Mary went to the store, John gave a bottle of milk to";
    const char *ans = o->answer ? o->answer : " John", *wr = o->wrong ? o->wrong : " Mary";
    bool on[PATCH_COMPONENT_COUNT];
    patch_opts po = {.metric = PATCH_LOGIT_DIFF, .direction = PATCH_DENOISE};
    if (patch_components_parse(o->components ? o->components : "resid_pre,attn_out,mlp_out,z_all_pos", on) != PS_OK)
        return usage_error("bench", "%s", err_msg());
    if (o->metric && patch_metric_parse(o->metric, &po.metric) != PS_OK)
        return usage_error("bench", "%s", err_msg());
    model m;
    tokenizer *tok = NULL;
    int rc = load_session(o, "bench", &m, &tok, true);
    if (rc)
        return rc;
    int32_t *a = NULL, *b = NULL, answer, wrong;
    size_t na = 0, nb = 0;
    patch_pair pair = {0};
    ps_status st;
    if ((st = encode_prompt(tok, clean, o->bos, &a, &na)) || (st = encode_prompt(tok, corr, o->bos, &b, &nb)))
        goto out;
    if (na != nb) {
        st = err_set(PS_ERR_INVALID, "clean and corrupted prompts differ in token length (%zu vs %zu tokens)", na, nb);
        goto out;
    }
    if ((st = tokenizer_single_token(tok, ans, &answer)) || (st = tokenizer_single_token(tok, wr, &wrong)) ||
        (st = patch_pair_init(&pair, &m, a, b, na, answer, wrong)))
        goto out;
    const size_t d = m.cfg.n_embd;
    double peak = bench_sgemm_gflops(1024, d, 4 * d, 7);
    const char *core = openblas_get_corename();
    int threads = openblas_get_num_threads();
    json_t *rows = json_array();
    if (!o->json) {
        printf("BLAS: OpenBLAS core %s, %d threads; sgemm peak (1024 x %zu x %zu): %.1f GFLOP/s\n", core, threads, d,
               4 * d, peak);
        printf("model: %zu layers, d_model %zu, %zu heads, vocab %zu; prompt pair of %zu tokens; metric %s\n",
               m.cfg.n_layer, d, m.cfg.n_head, m.cfg.vocab_size, na, patch_metric_name(po.metric));
        printf("%-16s %6s %9s %9s %7s %10s %10s %9s %9s %7s\n", "component", "cells", "naive_s", "fast_s", "ratio",
               "naive_c/s", "fast_c/s", "useful_GF", "GFLOP/s", "%peak");
    }
    for (int c = 0; c < PATCH_COMPONENT_COUNT && st == PS_OK; c++) {
        if (!on[c])
            continue;
        patch_cell *cells;
        size_t n;
        if ((st = patch_grid_cells((patch_component)c, &m.cfg, 0, na, &cells, &n)))
            break;
        double *v = malloc(n * sizeof *v), *times = malloc(reps * sizeof *times), useful = 0.0;
        for (size_t i = 0; i < n; i++)
            useful += bench_cell_flops(&m, &pair, &cells[i], &po);
        po.engine = PATCH_ENGINE_NAIVE;
        double t0 = bench_now();
        st = patch_eval(&m, &pair, 1, cells, n, &po, v);
        double naive_s = bench_now() - t0;
        po.engine = PATCH_ENGINE_FAST;
        for (size_t r = 0; r < reps && st == PS_OK; r++) {
            t0 = bench_now();
            st = patch_eval(&m, &pair, 1, cells, n, &po, v);
            times[r] = bench_now() - t0;
        }
        if (st == PS_OK) {
            for (size_t i = 1; i < reps; i++) /* insertion sort: reps is small */
                for (size_t j = i; j > 0 && times[j] < times[j - 1]; j--) {
                    double t = times[j];
                    times[j] = times[j - 1];
                    times[j - 1] = t;
                }
            double fast_s = times[reps / 2], gf = useful / fast_s / 1e9;
            const char *cn = patch_component_name((patch_component)c);
            json_array_append_new(rows, json_pack("{s:s,s:i,s:f,s:f,s:f,s:f,s:f,s:f}", "component", cn, "cells", (int)n,
                                                  "naive_seconds", naive_s, "fast_seconds", fast_s, "ratio",
                                                  naive_s / fast_s, "useful_gflop", useful / 1e9, "useful_gflops",
                                                  gf, "percent_of_peak", 100.0 * gf / peak));
            if (!o->json)
                printf("%-16s %6zu %9.3f %9.4f %6.1fx %10.1f %10.1f %9.2f %9.1f %6.1f%%\n", cn, n, naive_s, fast_s,
                       naive_s / fast_s, (double)n / naive_s, (double)n / fast_s, useful / 1e9, gf,
                       100.0 * gf / peak);
        }
        free(v);
        free(times);
        free(cells);
    }
    if (st == PS_OK && o->json)
        print_json(json_pack("{s:{s:s,s:i,s:f},s:i,s:s,s:o}", "blas", "core", core, "threads", threads,
                             "sgemm_peak_gflops", peak, "tokens", (int)na, "metric", patch_metric_name(po.metric),
                             "components", rows));
    else
        json_decref(rows);
out:
    if (st)
        rc = fail();
    patch_pair_free(&pair);
    free(a);
    free(b);
    tokenizer_free(tok);
    model_free(&m);
    return rc;
}

/* ---- info ---------------------------------------------------------------- */

static const char *info_help =
    "usage: patchsweep info --model DIR [--json]\n"
    "  The model's config, parameter count, weight dtype, file sha256, tokenizer,\n"
    "  and the BLAS kernel and threads this process uses.\n";

static int cmd_info(common_opts *o)
{
    model m;
    tokenizer *tok = NULL;
    int rc = load_session(o, "info", &m, &tok, true);
    if (rc)
        return rc;
    if (model_hash(&m) != PS_OK) {
        rc = fail();
        goto out;
    }
    const model_config *c = &m.cfg;
    const char *core = openblas_get_corename();
    int threads = openblas_get_num_threads();
    if (o->json) {
        print_json(json_pack("{s:s,s:s,s:{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:f},s:I,s:s,s:b,s:i,s:{s:s,s:i}}",
                             "model", m.dir, "sha256", m.sha256, "config", "n_layer", (int)c->n_layer,
                             "n_head", (int)c->n_head, "n_embd", (int)c->n_embd, "d_head", (int)c->d_head,
                             "n_inner", (int)c->n_inner, "n_positions", (int)c->n_positions, "vocab_size",
                             (int)c->vocab_size, "layer_norm_epsilon", (double)c->ln_eps, "n_params",
                             (json_int_t)m.n_params, "dtype", m.weights_dtype, "tied_unembed", m.tied,
                             "tokenizer_vocab", (int)tokenizer_vocab_size(tok), "blas", "core", core, "threads",
                             threads));
    } else {
        printf("model        %s\n", m.dir);
        printf("sha256       %s\n", m.sha256);
        printf("layers       %zu\nheads        %zu (d_head %zu)\nd_model      %zu\nd_mlp        %zu\n",
               c->n_layer, c->n_head, c->d_head, c->n_embd, c->n_inner);
        printf("positions    %zu\nvocab        %zu (tokenizer %zu)\nln eps       %g\n", c->n_positions,
               c->vocab_size, tokenizer_vocab_size(tok), (double)c->ln_eps);
        printf("parameters   %zu (%.1f M)\ndtype        %s\nunembedding  %s\n", m.n_params, m.n_params / 1e6,
               m.weights_dtype, m.tied ? "tied to wte" : "lm_head.weight");
        printf("blas         OpenBLAS core %s, %d threads\n", core, threads);
    }
out:
    tokenizer_free(tok);
    model_free(&m);
    return rc;
}

/* ---- make-dataset -------------------------------------------------------- */

static const char *make_dataset_help =
    "usage: patchsweep make-dataset ioi|capitals --n N [--seed S] [--corruption s2|abc] [--ids]\n"
    "                               [--model DIR | --tokenizer DIR] [-o FILE.jsonl]\n"
    "  Deterministic prompt pairs as JSONL (clean, corrupted, answer, wrong, ...).\n"
    "  ioi       indirect-object identification (Wang et al. 2022), BABA and ABBA\n"
    "  capitals  few-shot 'Q: What is the capital of X?\\nA: Y' prompts\n"
    "  --corruption s2   (ioi) second subject replaced by the indirect object (default)\n"
    "  --corruption abc  (ioi) all three names replaced by fresh names\n"
    "  --ids     add clean_ids, corrupted_ids, answer_id, wrong_id (with <|endoftext|>)\n";

static int cmd_make_dataset(int argc, char **argv, common_opts *o, size_t n, unsigned long long seed,
                            const char *corruption, bool with_ids)
{
    if (optind != argc - 1)
        return usage_error("make-dataset", "%sname one generator: ioi or capitals", "");
    const char *kind = argv[optind];
    if (strcmp(kind, "ioi") && strcmp(kind, "capitals"))
        return usage_error("make-dataset", "unknown generator '%s' (ioi or capitals)", kind);
    if (n == 0)
        return usage_error("make-dataset", "%s--n N (N >= 1) is required", "");
    ioi_corruption corr = IOI_CORRUPT_S2;
    if (corruption && !strcmp(corruption, "abc"))
        corr = IOI_CORRUPT_ABC;
    else if (corruption && strcmp(corruption, "s2"))
        return usage_error("make-dataset", "unknown corruption '%s' (s2 or abc)", corruption);
    tokenizer *tok = NULL;
    if (tokenizer_load_for_model(&tok, o->model_dir, o->tokenizer_dir) != PS_OK)
        return fail();
    dataset d = {0};
    ps_status st = !strcmp(kind, "ioi") ? dataset_make_ioi(&d, tok, n, seed, corr)
                                        : dataset_make_capitals(&d, tok, n, seed);
    if (st == PS_OK && with_ids) {
        for (size_t i = 0; i < d.n && st == PS_OK; i++) {
            dataset_tokens tk;
            if ((st = dataset_tokenize(&d, i, tok, true, SIZE_MAX, &tk)) != PS_OK)
                break;
            json_t *a = json_array(), *b = json_array();
            for (size_t t = 0; t < tk.n_tokens; t++) {
                json_array_append_new(a, json_integer(tk.clean_ids[t]));
                json_array_append_new(b, json_integer(tk.corrupted_ids[t]));
            }
            json_object_set_new(d.items[i].obj, "clean_ids", a);
            json_object_set_new(d.items[i].obj, "corrupted_ids", b);
            json_object_set_new(d.items[i].obj, "answer_id", json_integer(tk.answer_id));
            json_object_set_new(d.items[i].obj, "wrong_id", json_integer(tk.wrong_id));
            dataset_tokens_free(&tk);
        }
    }
    int rc = 0;
    if (st == PS_OK) {
        /* Write FILE.partial and rename, so a failed run leaves no file that
         * looks complete. */
        if (o->output) {
            char *tmp = malloc(strlen(o->output) + sizeof ".partial");
            sprintf(tmp, "%s.partial", o->output);
            FILE *out = fopen(tmp, "w");
            if (!out)
                st = err_set(PS_ERR_IO, "%s: cannot create: %s", o->output, strerror(errno));
            else {
                st = dataset_write_jsonl(&d, out, o->output);
                if (fclose(out) != 0 && st == PS_OK)
                    st = err_set(PS_ERR_IO, "%s: write failed: %s", o->output, strerror(errno));
                if (st == PS_OK && rename(tmp, o->output) != 0)
                    st = err_set(PS_ERR_IO, "%s: cannot rename: %s", o->output, strerror(errno));
                if (st != PS_OK)
                    remove(tmp);
            }
            free(tmp);
        } else {
            st = dataset_write_jsonl(&d, stdout, "<stdout>");
        }
    }
    if (st != PS_OK)
        rc = fail();
    else if (o->output)
        fprintf(stderr, "wrote %s: %zu %s prompt pairs (seed %llu)\n", o->output, d.n, kind, seed);
    dataset_free(&d);
    tokenizer_free(tok);
    return rc;
}

/* ---- dispatch ------------------------------------------------------------ */

static const char *main_help =
    "usage: patchsweep COMMAND [OPTIONS]   (patchsweep COMMAND --help for each)\n"
    "  tokenize      token ids and strings of a text\n"
    "  run           next-token prediction of a prompt\n"
    "  cache         every activation of a prompt as NetCDF (run_with_cache)\n"
    "  patch         activation patching of one prompt pair\n"
    "  bench         naive vs fast patching engine, beside the sgemm peak\n"
    "  info          model config, size, hash; BLAS kernel\n"
    "  make-dataset  IOI / capitals prompt pairs as JSONL\n"
    "  version       software version\n";

int main(int argc, char **argv)
{
    prov_init(argc, argv);
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        fputs(main_help, argc < 2 ? stderr : stdout);
        return argc < 2 ? EXIT_USAGE : 0;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        printf("patchsweep %s\n", prov_version());
        return 0;
    }
    const char *help = !strcmp(cmd, "tokenize")       ? tokenize_help
                       : !strcmp(cmd, "run")          ? run_help
                       : !strcmp(cmd, "cache")        ? cache_help
                       : !strcmp(cmd, "info")         ? info_help
                       : !strcmp(cmd, "patch")        ? patch_help
                       : !strcmp(cmd, "bench")        ? bench_help
                       : !strcmp(cmd, "make-dataset") ? make_dataset_help
                                                      : NULL;
    if (!help) {
        fprintf(stderr, "patchsweep: unknown command '%s'\n%s", cmd, main_help);
        return EXIT_USAGE;
    }
    static const struct option longopts[] = {
        {"model", required_argument, 0, 'm'},
        {"prompt", required_argument, 0, 'p'},
        {"output", required_argument, 0, 'o'},
        {"tokenizer", required_argument, 0, OPT_TOKENIZER},
        {"no-bos", no_argument, 0, OPT_NO_BOS},
        {"json", no_argument, 0, OPT_JSON},
        {"hooks", required_argument, 0, OPT_HOOKS},
        {"top-k", required_argument, 0, OPT_TOP_K},
        {"n", required_argument, 0, 'n'},
        {"seed", required_argument, 0, OPT_SEED},
        {"corruption", required_argument, 0, OPT_CORRUPTION},
        {"ids", no_argument, 0, OPT_IDS},
        {"clean", required_argument, 0, OPT_CLEAN},
        {"corrupted", required_argument, 0, OPT_CORRUPTED},
        {"answer", required_argument, 0, OPT_ANSWER},
        {"wrong", required_argument, 0, OPT_WRONG},
        {"components", required_argument, 0, OPT_COMPONENTS},
        {"metric", required_argument, 0, OPT_METRIC},
        {"direction", required_argument, 0, OPT_DIRECTION},
        {"engine", required_argument, 0, OPT_ENGINE},
        {"reps", required_argument, 0, OPT_REPS},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    common_opts o = {.bos = true, .top_k = 10};
    size_t n_items = 0, seed = 0, reps = 5;
    const char *corruption = NULL;
    bool with_ids = false;
    optind = 2;
    int ch;
    while ((ch = getopt_long(argc, argv, "m:p:o:n:h", longopts, NULL)) != -1) {
        switch (ch) {
        case 'm': o.model_dir = optarg; break;
        case 'p': o.prompt = optarg; break;
        case 'o': o.output = optarg; break;
        case OPT_TOKENIZER: o.tokenizer_dir = optarg; break;
        case OPT_NO_BOS: o.bos = false; break;
        case OPT_JSON: o.json = true; break;
        case OPT_HOOKS: o.hooks = optarg; break;
        case OPT_TOP_K:
            if (!parse_size(optarg, 1, 1000000, &o.top_k))
                return usage_error(cmd, "--top-k takes a whole number >= 1, not '%s'", optarg);
            break;
        case 'n':
            if (!parse_size(optarg, 1, DATASET_MAX_ITEMS, &n_items))
                return usage_error(cmd, "--n takes a whole number from 1 to 10000000, not '%s'", optarg);
            break;
        case OPT_SEED:
            if (!parse_size(optarg, 0, SIZE_MAX, &seed))
                return usage_error(cmd, "--seed takes a whole number, not '%s'", optarg);
            break;
        case OPT_CORRUPTION: corruption = optarg; break;
        case OPT_IDS: with_ids = true; break;
        case OPT_CLEAN: o.clean = optarg; break;
        case OPT_CORRUPTED: o.corrupted = optarg; break;
        case OPT_ANSWER: o.answer = optarg; break;
        case OPT_WRONG: o.wrong = optarg; break;
        case OPT_COMPONENTS: o.components = optarg; break;
        case OPT_METRIC: o.metric = optarg; break;
        case OPT_DIRECTION: o.direction = optarg; break;
        case OPT_ENGINE: o.engine = optarg; break;
        case OPT_REPS:
            if (!parse_size(optarg, 1, 1000, &reps))
                return usage_error(cmd, "--reps takes a whole number from 1 to 1000, not '%s'", optarg);
            break;
        case 'h': fputs(help, stdout); return 0;
        default: return usage_error(cmd, "%sbad option", "");
        }
    }
    if (!strcmp(cmd, "tokenize"))
        return cmd_tokenize(argc, argv, &o);
    if (!strcmp(cmd, "make-dataset"))
        return cmd_make_dataset(argc, argv, &o, n_items, seed, corruption, with_ids);
    if (optind != argc)
        return usage_error(cmd, "unexpected argument '%s'", argv[optind]);
    if (!strcmp(cmd, "run"))
        return cmd_run(&o);
    if (!strcmp(cmd, "cache"))
        return cmd_cache(&o);
    if (!strcmp(cmd, "patch"))
        return cmd_patch(&o);
    if (!strcmp(cmd, "bench"))
        return cmd_bench(&o, reps);
    return cmd_info(&o);
}
