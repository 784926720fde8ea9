#include "cmd_model.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "gemm.h"
#include "pool.h"
#include "backward.h"
#include "forward.h"
#include "hooks.h"
#include "ncout.h"

/* ---- token ids as input (--ids) ------------------------------------------- */

/* ---- tokenize ------------------------------------------------------------ */

static const char *tokenize_help =
    "usage: patchsweep tokenize --model DIR [--tokenizer DIR] [--no-bos] [--json] TEXT\n"
    "  Byte-level BPE token ids and token strings of TEXT (GPT-2's tokenizer).\n"
    "  --model DIR      model directory (its vocab.json + merges.txt, or the default tokenizer)\n"
    "  --tokenizer DIR  use the tokenizer files in DIR\n"
    "  --no-bos         do not prepend <|endoftext|> (id 50256)\n"
    "  --json           {\"ids\": [...], \"tokens\": [...]}\n";

int cmd_tokenize(int argc, char **argv)
{
    static const struct option opts[] = {CLI_COMMON_OPTIONS, {0, 0, 0, 0}};
    cli_common o = {.bos = true};
    int ch, rc;
    while ((ch = getopt_long(argc, argv, "m:h", opts, NULL)) != -1)
        if ((rc = cli_common_opt("tokenize", tokenize_help, ch, argv, &o)) != CLI_CONTINUE)
            return rc;
    if (optind != argc - 1)
        return cli_usage("tokenize", "exactly one TEXT argument is required");
    tokenizer *tok;
    if ((rc = cli_load("tokenize", &o, NULL, &tok)))
        return rc;
    int32_t *ids;
    size_t n;
    if (cli_encode_prompt(tok, argv[optind], o.bos, &ids, &n) != PS_OK) {
        tokenizer_free(tok);
        return cli_fail();
    }
    json_t *jids = json_array(), *jtoks = json_array();
    for (size_t i = 0; i < n; i++) {
        char *s = tokenizer_token_display(tok, ids[i], "?");
        if (o.json) {
            json_array_append_new(jids, json_integer(ids[i]));
            json_array_append_new(jtoks, json_string(s));
        } else {
            printf("%4zu %6d ", i, ids[i]);
            cli_print_quoted(stdout, s);
            putchar('\n');
        }
        free(s);
    }
    if (o.json) {
        cli_print_json(json_pack("{s:o,s:o}", "ids", jids, "tokens", jtoks));
    } else {
        json_decref(jids);
        json_decref(jtoks);
    }
    free(ids);
    tokenizer_free(tok);
    return 0;
}

/* ---- run ----------------------------------------------------------------- */

static const char *run_help =
    "usage: patchsweep run --model DIR (--prompt TEXT | --ids ID,ID,...) [--top-k K] [--no-bos] [--json]\n"
    "       [--compute f32|bf16]\n"
    "  One forward pass; the next-token distribution after the prompt: the top K\n"
    "  tokens with probability and logit (default K = 10).\n"
    "  --ids   token ids instead of text (no tokenizer needed; no BOS is added)\n"
    CLI_COMPUTE_HELP;

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

enum { OPT_PROMPT = CLI_OPT_FIRST_FREE, OPT_TOP_K, OPT_HOOKS, OPT_IDS, OPT_GRAD, OPT_ANSWER_ID, OPT_WRONG_ID, OPT_CLEAN_IDS };

int cmd_run(int argc, char **argv)
{
    static const struct option opts[] = {CLI_COMMON_OPTIONS, CLI_COMPUTE_OPTION,
                                         {"prompt", required_argument, 0, 'p'},
                                         {"top-k", required_argument, 0, OPT_TOP_K},
                                         {"ids", required_argument, 0, OPT_IDS},
                                         {0, 0, 0, 0}};
    cli_common o = {.bos = true};
    const char *prompt = NULL, *ids_arg = NULL;
    size_t top_k = 10;
    int ch, rc;
    while ((ch = getopt_long(argc, argv, "m:p:h", opts, NULL)) != -1) {
        if (ch == 'p')
            prompt = optarg;
        else if (ch == OPT_IDS)
            ids_arg = optarg;
        else if (ch == OPT_TOP_K) {
            if (!cli_parse_size(optarg, 1, 1000000, &top_k))
                return cli_usage("run", "--top-k takes a whole number >= 1, not '%s'", optarg);
        } else if ((rc = cli_common_opt("run", run_help, ch, argv, &o)) != CLI_CONTINUE)
            return rc;
    }
    if (optind != argc)
        return cli_usage("run", "unexpected argument '%s'", argv[optind]);
    if (!prompt == !ids_arg)
        return cli_usage("run", "exactly one of --prompt TEXT and --ids ID,... is required");
    int32_t *ids = NULL;
    size_t n = 0;
    if (ids_arg && !cli_parse_ids(ids_arg, &ids, &n))
        return cli_usage("run", "--ids takes comma-separated token ids (whole numbers), not '%s'", ids_arg);
    model m;
    tokenizer *tok;
    if ((rc = ids_arg ? cli_load_ids("run", &o, &m, &tok, ids, n) : cli_load("run", &o, &m, &tok))) {
        free(ids);
        return rc;
    }
    forward_cache c = {0};
    scored *top = NULL;
    if ((!ids_arg && cli_encode_prompt(tok, prompt, o.bos, &ids, &n) != PS_OK) ||
        forward_cache_init(&c, &m.cfg, n, FORWARD_LOGITS_LAST) != PS_OK || forward_run(&m, &c, ids, n, NULL) != PS_OK) {
        rc = cli_fail();
        goto out;
    }
    const size_t V = m.cfg.vocab_size;
    size_t k = top_k < V ? top_k : V;
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
        rc = cli_fail();
        goto out;
    }
    for (size_t i = 0; i < V; i++)
        top[i] = (scored){(int32_t)i, c.logits[i]};
    qsort(top, V, sizeof *top, cmp_scored);
    json_t *jtop = json_array();
    if (!o.json)
        printf("%zu tokens; next token:\n%4s %6s %9s %9s  %s\n", n, "rank", "id", "prob", "logit", "token");
    for (size_t i = 0; i < k; i++) {
        double p = exp((double)top[i].logit - mx) / z;
        char *s = tokenizer_token_display(tok, top[i].id, "?");
        if (o.json) {
            json_array_append_new(jtop, json_pack("{s:i,s:s,s:f,s:f}", "id", top[i].id, "token", s, "prob", p,
                                                  "logit", (double)top[i].logit));
        } else {
            printf("%4zu %6d %9.6f %9.4f  ", i + 1, top[i].id, p, top[i].logit);
            cli_print_quoted(stdout, s);
            putchar('\n');
        }
        free(s);
    }
    if (o.json)
        cli_print_json(json_pack("{s:i,s:o}", "n_tokens", (int)n, "top", jtop));
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
    "usage: patchsweep cache --model DIR (--prompt TEXT | --ids ID,...) [--hooks PATTERN[,PATTERN...]] [--no-bos]\n"
    "       -o OUT.nc\n"
    "  TransformerLens' run_with_cache as a NetCDF-4 file: one variable per hook\n"
    "  point, named by its hook name (e.g. blocks.3.attn.hook_z(position, head, d_head)),\n"
    "  plus logits(position, vocab), token_id(position), token(position) and provenance.\n"
    "  --hooks   comma-separated shell globs over hook names (default: all), e.g.\n"
    "            'blocks.*.hook_resid_post,logits'\n"
    "  --ids     token ids instead of text (no tokenizer needed; no BOS is added;\n"
    "            the token strings are then empty)\n"
    "  --grad METRIC --answer-id ID --wrong-id ID [--clean-ids ID,...]\n"
    "            write instead the gradient of METRIC (logit_diff, prob, logprob, kl)\n"
    "            at the last position with respect to each hook (same names and\n"
    "            shapes; kl needs the clean prompt's ids)\n"
    CLI_COMPUTE_HELP;

/* The run's gradients (backward.h) in place of its activations. */
static ps_status cache_grads(const model *m, forward_cache *c, forward_cache *g, const char *metric_s,
                             const char *answer_s, const char *wrong_s, const char *clean_s)
{
    patch_metric metric;
    ps_status st = patch_metric_parse(metric_s, &metric);
    int32_t *a = NULL, *w = NULL, *clean = NULL;
    size_t na = 0, nw = 0, nc = 0;
    float *clean_lp = NULL;
    forward_cache cc = {0};
    if (st)
        return st;
    if (!answer_s || !wrong_s || !cli_parse_ids(answer_s, &a, &na) || !cli_parse_ids(wrong_s, &w, &nw) || na != 1 ||
        nw != 1) {
        st = err_set(PS_ERR_INVALID, "--grad needs --answer-id ID and --wrong-id ID (one token id each)");
        goto out;
    }
    if (metric == PATCH_KL) {
        const size_t V = m->cfg.vocab_size;
        if (!clean_s || !cli_parse_ids(clean_s, &clean, &nc)) {
            st = err_set(PS_ERR_INVALID, "--grad kl needs --clean-ids ID,... (the clean prompt)");
            goto out;
        }
        if (!(clean_lp = malloc(V * sizeof *clean_lp))) {
            st = err_set(PS_ERR_NOMEM, "out of memory");
            goto out;
        }
        if ((st = forward_cache_init(&cc, &m->cfg, nc, FORWARD_LOGITS_LAST)) ||
            (st = forward_run(m, &cc, clean, nc, NULL)))
            goto out;
        const double lse = forward_logsumexp(cc.logits, V);
        for (size_t v = 0; v < V; v++)
            clean_lp[v] = (float)(cc.logits[v] - lse);
    }
    if ((st = forward_cache_init(g, &m->cfg, c->T, c->logits_mode)) == PS_OK)
        st = backward_run(m, c, g, metric, a[0], w[0], clean_lp);
out:
    free(a), free(w), free(clean), free(clean_lp);
    forward_cache_free(&cc);
    return st;
}

int cmd_cache(int argc, char **argv)
{
    static const struct option opts[] = {CLI_COMMON_OPTIONS, CLI_COMPUTE_OPTION,
                                         {"prompt", required_argument, 0, 'p'},
                                         {"hooks", required_argument, 0, OPT_HOOKS},
                                         {"output", required_argument, 0, 'o'},
                                         {"ids", required_argument, 0, OPT_IDS},
                                         {"grad", required_argument, 0, OPT_GRAD},
                                         {"answer-id", required_argument, 0, OPT_ANSWER_ID},
                                         {"wrong-id", required_argument, 0, OPT_WRONG_ID},
                                         {"clean-ids", required_argument, 0, OPT_CLEAN_IDS},
                                         {0, 0, 0, 0}};
    cli_common o = {.bos = true};
    const char *prompt = NULL, *hooks = NULL, *output = NULL, *ids_arg = NULL;
    const char *grad = NULL, *answer_id = NULL, *wrong_id = NULL, *clean_ids = NULL;
    int ch, rc;
    while ((ch = getopt_long(argc, argv, "m:p:o:h", opts, NULL)) != -1) {
        if (ch == 'p')
            prompt = optarg;
        else if (ch == OPT_HOOKS)
            hooks = optarg;
        else if (ch == 'o')
            output = optarg;
        else if (ch == OPT_IDS)
            ids_arg = optarg;
        else if (ch == OPT_GRAD)
            grad = optarg;
        else if (ch == OPT_ANSWER_ID)
            answer_id = optarg;
        else if (ch == OPT_WRONG_ID)
            wrong_id = optarg;
        else if (ch == OPT_CLEAN_IDS)
            clean_ids = optarg;
        else if ((rc = cli_common_opt("cache", cache_help, ch, argv, &o)) != CLI_CONTINUE)
            return rc;
    }
    if (optind != argc)
        return cli_usage("cache", "unexpected argument '%s'", argv[optind]);
    if (!prompt == !ids_arg)
        return cli_usage("cache", "exactly one of --prompt TEXT and --ids ID,... is required");
    if (!output)
        return cli_usage("cache", "-o OUT.nc is required");
    int32_t *ids = NULL;
    size_t n = 0;
    if (ids_arg && !cli_parse_ids(ids_arg, &ids, &n))
        return cli_usage("cache", "--ids takes comma-separated token ids (whole numbers), not '%s'", ids_arg);
    model m;
    tokenizer *tok;
    if ((rc = ids_arg ? cli_load_ids("cache", &o, &m, &tok, ids, n) : cli_load("cache", &o, &m, &tok))) {
        free(ids);
        return rc;
    }
    forward_cache c = {0}, gc = {0};
    hook_set hs = {0};
    ncout_file f = {.ncid = -1};
    ps_status st = hooks ? hook_set_parse(&hs, hooks, &m.cfg) : hook_set_all(&hs, &m.cfg);
    bool want_logits = st == PS_OK && hook_set_has(&hs, (hook_point){HOOK_LOGITS, 0});
    if (st || (!ids_arg && (st = cli_encode_prompt(tok, prompt, o.bos, &ids, &n))) || (st = ncout_create(&f, output)) ||
        (st = forward_cache_init(&c, &m.cfg, n, want_logits ? FORWARD_LOGITS_ALL : FORWARD_LOGITS_NONE)) ||
        (st = forward_run(&m, &c, ids, n, NULL)) ||
        (grad && (st = cache_grads(&m, &c, &gc, grad, answer_id, wrong_id, clean_ids))) ||
        (st = ncout_write_cache(&f, &m, tok, grad ? &gc : &c, &hs, ids_arg ? false : o.bos)) ||
        (st = ncout_commit(&f))) {
        ncout_abort(&f);
        rc = cli_fail();
    } else {
        fprintf(stderr, "wrote %s: %zu tokens, %zu hook points\n", output, n, hs.n_on);
    }
    free(ids);
    hook_set_free(&hs);
    forward_cache_free(&c);
    forward_cache_free(&gc);
    tokenizer_free(tok);
    model_free(&m);
    return rc;
}

/* ---- info ---------------------------------------------------------------- */

static const char *info_help =
    "usage: patchsweep info --model DIR [--json]\n"
    "  The model's config, parameter count, weight dtype, file sha256, tokenizer,\n"
    "  and the BLAS kernels (OpenBLAS core, why it was chosen, self-check) and\n"
    "  threads this process uses, with the CPU's vector extensions.\n";

int cmd_info(int argc, char **argv)
{
    static const struct option opts[] = {CLI_COMMON_OPTIONS, {0, 0, 0, 0}};
    cli_common o = {.bos = true};
    int ch, rc;
    while ((ch = getopt_long(argc, argv, "m:h", opts, NULL)) != -1)
        if ((rc = cli_common_opt("info", info_help, ch, argv, &o)) != CLI_CONTINUE)
            return rc;
    if (optind != argc)
        return cli_usage("info", "unexpected argument '%s'", argv[optind]);
    model m;
    tokenizer *tok = NULL;
    if (!o.model_dir)
        return cli_usage("info", "--model DIR is required");
    if (model_load(&m, o.model_dir) != PS_OK)
        return cli_fail();
    rc = 0;
    /* GPT-2's tokenizer (as cli_load); the other families have none yet */
    if (m.cfg.family == MODEL_FAMILY_GPT2) {
        model_free(&m);
        if ((rc = cli_load("info", &o, &m, &tok)))
            return rc;
    }
    if (model_hash(&m) != PS_OK) {
        rc = cli_fail();
        goto out;
    }
    const model_config *c = &m.cfg;
    if (o.json) {
        json_t *info = json_pack(
            "{s:s,s:s,s:{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:f},s:I,s:s,s:b,s:i,s:o}", "model", m.dir, "sha256", m.sha256,
            "config", "n_layer", (int)c->n_layer, "n_head", (int)c->n_head, "n_embd", (int)c->n_embd, "d_head",
            (int)c->d_head, "n_inner", (int)c->n_inner, "n_positions", (int)c->n_positions, "vocab_size",
            (int)c->vocab_size, "layer_norm_epsilon", (double)c->ln_eps, "n_params", (json_int_t)m.n_params, "dtype",
            m.weights_dtype, "tied_unembed", m.tied, "tokenizer_vocab", tok ? (int)tokenizer_vocab_size(tok) : 0, "blas",
            cli_blas_json());
        json_object_set_new(info, "family", json_string(model_family_name(c->family)));
        json_object_set_new(info, "n_kv_head", json_integer((json_int_t)c->n_kv_head));
        json_object_set_new(info, "norm", json_string(c->norm == MODEL_NORM_RMSNORM ? "rmsnorm" : "layernorm"));
        json_object_set_new(info, "rotary_dim", json_integer((json_int_t)c->rotary_dim));
        json_object_set_new(info, "parallel_residual", json_boolean(c->parallel_residual));
        /* the kernel of the transformer's own matrix products (gemm.h), threads from the BLAS setting */
        json_object_set_new(info, "gemm_kernel", json_string(gemm_isa_name(gemm_isa_get())));
        json_object_set_new(info, "gemm_threads", json_integer((json_int_t)pool_threads()));
        cli_print_json(info);
    } else {
        printf("model        %s\n", m.dir);
        printf("sha256       %s\n", m.sha256);
        printf("layers       %zu\nheads        %zu (d_head %zu)\nd_model      %zu\nd_mlp        %zu\n", c->n_layer,
               c->n_head, c->d_head, c->n_embd, c->n_inner);
        printf("positions    %zu\nvocab        %zu (tokenizer %zu)\nln eps       %g\n", c->n_positions, c->vocab_size,
               tok ? tokenizer_vocab_size(tok) : 0, (double)c->ln_eps);
        if (c->family != MODEL_FAMILY_GPT2) {
            printf("family       %s\nattention    %zu query / %zu key-value heads%s\n", model_family_name(c->family),
                   c->n_head, c->n_kv_head, c->n_kv_head < c->n_head ? " (grouped-query)" : "");
            printf("norm         %s\npositions    rotary on %zu of %zu dims, theta %g%s\nresidual     %s\n",
                   c->norm == MODEL_NORM_RMSNORM ? "RMSNorm" : "LayerNorm", c->rotary_dim, c->d_head, c->rope_theta,
                   c->rope_scaling == MODEL_ROPE_SCALING_LLAMA3   ? ", llama3 scaling"
                   : c->rope_scaling == MODEL_ROPE_SCALING_LINEAR ? ", linear scaling"
                                                                  : "",
                   c->parallel_residual ? "parallel" : "sequential");
        }
        printf("parameters   %zu (%.1f M)\ndtype        %s\nunembedding  %s\n", m.n_params, m.n_params / 1e6,
               m.weights_dtype, m.tied ? "tied to wte" : "lm_head.weight");
        const blas_report *b = cli_blas();
        char line[512];
        blas_describe(b, line, sizeof line);
        printf("blas         %s\n", line);
        blas_cpu_describe(&b->cpu, line, sizeof line);
        const char *best = blas_cpu_best_core(&b->cpu);
        printf("cpu          %s; best core %s\n", line, best ? best : "(none above generic)");
        printf("gemm         patchsweep %s kernels, %zu threads (the transformer's matrix products)\n",
               gemm_isa_name(gemm_isa_get()), pool_threads());
    }
out:
    tokenizer_free(tok);
    model_free(&m);
    return rc;
}
