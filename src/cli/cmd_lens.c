#include "cmd_lens.h"

#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "dataset.h"
#include "forward.h"
#include "lens.h"
#include "lens_dataset.h"
#include "ncout.h"

enum { OPT_ANSWER = CLI_OPT_FIRST_FREE, OPT_WRONG, OPT_TOP_K, OPT_POSITION, OPT_DATASET, OPT_LAYER, OPT_SUBTRACT,
       OPT_ATTRIBUTION, OPT_IDS, OPT_ANSWER_ID, OPT_WRONG_ID };

/* A prompt given as token ids (--ids, --answer-id, --wrong-id): no tokenizer. */
typedef struct {
    const char *ids, *answer_id, *wrong_id;
} ids_input;

#define DEFAULT_TOP_K 10

/* ---- shared ---------------------------------------------------------------- */

/* One prompt, tokenized, checked against the command line, and run. */
typedef struct {
    int32_t *ids;
    size_t n;
    size_t position;
    int32_t answer, wrong;
    forward_cache c;
} prompt_run;

static void prompt_run_free(prompt_run *pr)
{
    free(pr->ids);
    pr->ids = NULL;
    forward_cache_free(&pr->c);
}

/* A single-token --answer / --wrong, or LENS_NO_TOKEN when not given. */
static int token_arg(const char *cmd, const tokenizer *tok, const char *opt, const char *text, int32_t *id)
{
    *id = LENS_NO_TOKEN;
    if (text && tokenizer_single_token(tok, text, id) != PS_OK)
        return cli_usage(cmd, "%s %s", opt, err_msg());
    return 0;
}

/* Tokenize the prompt, resolve --answer, --wrong and --position (default:
 * the last token) and run the forward pass without logits (the lens decodes
 * what it needs).  Returns 0 or the exit status after printing. */
/* A single --answer-id / --wrong-id below the vocabulary, or LENS_NO_TOKEN. */
static int id_arg(const char *cmd, const model *m, const char *opt, const char *text, int32_t *id)
{
    *id = LENS_NO_TOKEN;
    if (!text)
        return 0;
    int32_t *one = NULL;
    size_t n = 0;
    bool ok = cli_parse_ids(text, &one, &n) && n == 1;
    if (ok)
        *id = one[0];
    free(one);
    if (!ok)
        return cli_usage(cmd, "%s takes one token id (a whole number), not '%s'", opt, text);
    if ((size_t)*id >= m->cfg.vocab_size) {
        err_set(PS_ERR_RANGE, "%s: token id %d is not below the vocabulary size %zu", opt, *id, m->cfg.vocab_size);
        return cli_fail();
    }
    return 0;
}

static int prepare(const char *cmd, const model *m, const tokenizer *tok, bool bos, const char *prompt,
                   const char *answer, const char *wrong, const ids_input *in, const size_t *position,
                   prompt_run *pr)
{
    memset(pr, 0, sizeof *pr);
    int rc;
    if (in->ids) {
        if ((rc = id_arg(cmd, m, "--answer-id", in->answer_id, &pr->answer)) ||
            (rc = id_arg(cmd, m, "--wrong-id", in->wrong_id, &pr->wrong)))
            return rc;
        if (!cli_parse_ids(in->ids, &pr->ids, &pr->n))
            return cli_usage(cmd, "--ids takes comma-separated token ids (whole numbers), not '%s'", in->ids);
    } else {
        if ((rc = token_arg(cmd, tok, "--answer", answer, &pr->answer)) ||
            (rc = token_arg(cmd, tok, "--wrong", wrong, &pr->wrong)))
            return rc;
        if (cli_encode_prompt(tok, prompt, bos, &pr->ids, &pr->n) != PS_OK)
            return cli_fail();
    }
    pr->position = pr->n - 1;
    if (position) {
        if (*position >= pr->n) {
            rc = cli_usage(cmd, "--position %zu is out of range: the prompt has %zu tokens (positions 0..%zu)",
                           *position, pr->n, pr->n - 1);
            prompt_run_free(pr);
            return rc;
        }
        pr->position = *position;
    }
    if (forward_cache_init(&pr->c, &m->cfg, pr->n, FORWARD_LOGITS_NONE) != PS_OK ||
        forward_run(m, &pr->c, pr->ids, pr->n, NULL) != PS_OK) {
        prompt_run_free(pr);
        return cli_fail();
    }
    return 0;
}

/* A token as it is printed in tables: quoted, with \n, \t and ' escaped
 * (what cli_print_quoted prints), malloc'd. */
static char *quoted_token(const tokenizer *tok, int32_t id)
{
    char *s = tokenizer_token_display(tok, id, "?");
    if (!s)
        return NULL;
    char *q = malloc(2 * strlen(s) + 3), *o = q;
    if (q) {
        *o++ = '\'';
        for (const char *p = s; *p; p++) {
            if (*p == '\n' || *p == '\t' || *p == '\'') {
                *o++ = '\\';
                *o++ = *p == '\n' ? 'n' : *p == '\t' ? 't' : '\'';
            } else {
                *o++ = *p;
            }
        }
        *o++ = '\'';
        *o = '\0';
    }
    free(s);
    return q;
}

/* Terminal columns of a UTF-8 string, one per code point. */
static size_t text_width(const char *s)
{
    size_t w = 0;
    for (; *s; s++)
        w += ((unsigned char)*s & 0xC0) != 0x80;
    return w;
}

static void print_padded(const char *s, size_t width)
{
    fputs(s, stdout);
    for (size_t w = text_width(s); w < width; w++)
        putchar(' ');
}

/* Quoted strings of the top-k tokens of every row of a view: [n_rows * k],
 * NULL on allocation failure (error set). */
static char **top_strings(const lens_view *v, const tokenizer *tok)
{
    const size_t n = v->n_rows * v->k;
    char **s = calloc(n, sizeof *s);
    for (size_t i = 0; s && i < n; i++)
        if (!(s[i] = quoted_token(tok, v->top_id[i]))) {
            for (size_t j = 0; j < i; j++)
                free(s[j]);
            free(s);
            s = NULL;
        }
    if (!s)
        err_set(PS_ERR_NOMEM, "out of memory");
    return s;
}

static void free_strings(char **s, size_t n)
{
    for (size_t i = 0; s && i < n; i++)
        free(s[i]);
    free(s);
}

/* {"id", "token", "prob", "logit"} of row r's top-k. */
static json_t *top_json(const lens_view *v, size_t r, const tokenizer *tok)
{
    json_t *a = json_array();
    for (size_t j = 0; j < v->k; j++) {
        int32_t id = v->top_id[r * v->k + j];
        char *s = tokenizer_token_display(tok, id, "?");
        json_array_append_new(a, json_pack("{s:i,s:s,s:f,s:f}", "id", id, "token", s ? s : "?", "prob",
                                           v->top_prob[r * v->k + j], "logit", (double)v->logits[r * v->V + id]));
        free(s);
    }
    return a;
}

static void answer_json(json_t *o, const lens_answer *a)
{
    json_object_set_new(o, "answer_prob", json_real(a->prob));
    json_object_set_new(o, "answer_logprob", json_real(a->logprob));
    json_object_set_new(o, "answer_logit", json_real(a->logit));
    json_object_set_new(o, "answer_rank", json_integer((json_int_t)a->rank));
    json_object_set_new(o, "reciprocal_rank", json_real(a->reciprocal_rank));
}

/* The prompt and position part of every JSON answer. */
static json_t *prompt_json(const prompt_run *pr, const tokenizer *tok)
{
    char *s = tokenizer_token_display(tok, pr->ids[pr->position], "?");
    json_t *o = json_pack("{s:i,s:i,s:i,s:s}", "n_tokens", (int)pr->n, "position", (int)pr->position, "token_id",
                          pr->ids[pr->position], "token", s ? s : "?");
    free(s);
    if (pr->answer != LENS_NO_TOKEN) {
        s = tokenizer_token_display(tok, pr->answer, "?");
        json_object_set_new(o, "answer", json_string(s ? s : "?"));
        json_object_set_new(o, "answer_id", json_integer(pr->answer));
        free(s);
    }
    return o;
}

static void print_prompt_line(const prompt_run *pr, const tokenizer *tok)
{
    char *q = quoted_token(tok, pr->ids[pr->position]);
    printf("%zu tokens; decoding position %zu %s", pr->n, pr->position, q ? q : "?");
    free(q);
    if (pr->answer != LENS_NO_TOKEN) {
        q = quoted_token(tok, pr->answer);
        printf("; answer %s (id %d)", q ? q : "?", pr->answer);
        free(q);
    }
    putchar('\n');
}

/* ---- lens ------------------------------------------------------------------ */

static const char *lens_help =
    "usage: patchsweep lens --model DIR --prompt TEXT [--answer TOK] [--top-k K] [--position P] [--json]\n"
    "       patchsweep lens --model DIR --ids ID,... [--answer-id ID] [--top-k K] [--position P] [--json]\n"
    "       patchsweep lens --model DIR --dataset FILE.jsonl [--top-k K] -o OUT.nc\n"
    "  Early decoding (the logit lens): the final LayerNorm and the unembedding\n"
    "  applied to the residual stream after the embedding (layer 'embed' =\n"
    "  blocks.0.hook_resid_pre) and after every block l (blocks.l.hook_resid_post),\n"
    "  at one position.  The last layer's row is the model's own prediction.\n"
    "  --answer TOK   a single token: its probability, log probability, rank\n"
    "                 (tokens with a strictly greater logit; 0 = top-1) and\n"
    "                 reciprocal rank 1/(rank+1) at every layer\n"
    "  --top-k K      most likely tokens per layer (default 10, at most the vocabulary)\n"
    "  --position P   token position to decode (default: the last)\n"
    "  --json         the table as JSON\n"
    "  --dataset F    decode every item's clean prompt at its last token, with its\n"
    "                 answer, into the NetCDF file -o OUT.nc (format: include/patchsweep/schema.h)\n"
    "  --no-bos       do not prepend <|endoftext|>;  --tokenizer DIR  tokenizer files\n"
    CLI_COMPUTE_HELP;

static void print_lens_table(const lens_view *v, char **tops)
{
    const bool ans = v->answer != LENS_NO_TOKEN;
    /* each top-k column as wide as its widest token */
    size_t *w = calloc(v->k, sizeof *w);
    for (size_t j = 0; w && j < v->k; j++)
        for (size_t r = 0; r < v->n_rows; r++) {
            size_t x = text_width(tops[r * v->k + j]);
            w[j] = x > w[j] ? x : w[j];
        }
    printf("%-6s", "layer");
    if (ans)
        printf(" %10s %9s %8s %8s", "p(answer)", "logprob", "rank", "rr");
    printf(" %9s  top-%zu\n", "p(top-1)", v->k);
    for (size_t r = 0; r < v->n_rows; r++) {
        char label[LENS_MAX_LABEL];
        lens_row_label(r, label);
        printf("%-6s", label);
        if (ans) {
            const lens_answer *a = &v->ans[r];
            printf(" %10.6f %9.4f %8zu %8.5f", a->prob, a->logprob, a->rank, a->reciprocal_rank);
        }
        printf(" %9.6f ", v->top_prob[r * v->k]);
        for (size_t j = 0; j < v->k; j++) {
            putchar(' ');
            if (w && j + 1 < v->k)
                print_padded(tops[r * v->k + j], w[j]);
            else
                fputs(tops[r * v->k + j], stdout);
        }
        putchar('\n');
    }
    free(w);
}

static int lens_one(const model *m, const tokenizer *tok, const cli_common *o, const char *prompt,
                    const char *answer, const ids_input *in, const size_t *position, size_t top_k)
{
    prompt_run pr;
    int rc = prepare("lens", m, tok, o->bos, prompt, answer, NULL, in, position, &pr);
    if (rc)
        return rc;
    lens_view v = {0};
    char **tops = NULL;
    if (lens_view_init(&v, &m->cfg, lens_n_rows(&m->cfg), top_k) != PS_OK ||
        lens_run(&v, m, &pr.c, pr.position, pr.answer) != PS_OK || !(tops = top_strings(&v, tok))) {
        rc = cli_fail();
        goto out;
    }
    if (o->json) {
        json_t *j = prompt_json(&pr, tok), *layers = json_array();
        for (size_t r = 0; r < v.n_rows; r++) {
            char label[LENS_MAX_LABEL], hook[HOOK_MAX_NAME];
            lens_row_label(r, label);
            hook_name(lens_row_hook(r), hook);
            json_t *row = json_pack("{s:s,s:s}", "layer", label, "hook", hook);
            if (pr.answer != LENS_NO_TOKEN)
                answer_json(row, &v.ans[r]);
            json_object_set_new(row, "top", top_json(&v, r, tok));
            json_array_append_new(layers, row);
        }
        json_object_set_new(j, "layers", layers);
        cli_print_json(j);
    } else {
        print_prompt_line(&pr, tok);
        print_lens_table(&v, tops);
    }
out:
    free_strings(tops, v.n_rows * v.k);
    lens_view_free(&v);
    prompt_run_free(&pr);
    return rc;
}

/* Every item's clean prompt at its last token into OUT.nc. */
static int lens_dataset(model *m, const tokenizer *tok, const cli_common *o, const char *path, const char *output,
                        size_t top_k)
{
    size_t n = 0;
    if (lens_dataset_write(output, m, tok, path, 0, 0, o->bos, top_k, &n) != PS_OK)
        return cli_fail();
    fprintf(stderr, "wrote %s: %zu prompts x %zu layers, top %zu\n", output, n, lens_n_rows(&m->cfg), top_k);
    return 0;
}

int cmd_lens(int argc, char **argv)
{
    static const struct option opts[] = {CLI_COMMON_OPTIONS, CLI_COMPUTE_OPTION,
                                         {"prompt", required_argument, 0, 'p'},
                                         {"answer", required_argument, 0, OPT_ANSWER},
                                         {"top-k", required_argument, 0, OPT_TOP_K},
                                         {"position", required_argument, 0, OPT_POSITION},
                                         {"dataset", required_argument, 0, OPT_DATASET},
                                         {"output", required_argument, 0, 'o'},
                                         {"ids", required_argument, 0, OPT_IDS},
                                         {"answer-id", required_argument, 0, OPT_ANSWER_ID},
                                         {0, 0, 0, 0}};
    cli_common o = {.bos = true};
    const char *prompt = NULL, *answer = NULL, *dataset_path = NULL, *output = NULL;
    ids_input in = {0};
    size_t top_k = DEFAULT_TOP_K, position = 0;
    bool has_position = false;
    int ch, rc;
    while ((ch = getopt_long(argc, argv, "m:p:o:h", opts, NULL)) != -1) {
        switch (ch) {
        case 'p': prompt = optarg; break;
        case OPT_ANSWER: answer = optarg; break;
        case OPT_IDS: in.ids = optarg; break;
        case OPT_ANSWER_ID: in.answer_id = optarg; break;
        case OPT_DATASET: dataset_path = optarg; break;
        case 'o': output = optarg; break;
        case OPT_TOP_K:
            if (!cli_parse_size(optarg, 1, SIZE_MAX, &top_k))
                return cli_usage("lens", "--top-k takes a whole number >= 1, not '%s'", optarg);
            break;
        case OPT_POSITION:
            if (!cli_parse_size(optarg, 0, MODEL_MAX_N_POSITIONS, &position))
                return cli_usage("lens", "--position takes a token position (0, 1, ...), not '%s'", optarg);
            has_position = true;
            break;
        default:
            if ((rc = cli_common_opt("lens", lens_help, ch, argv, &o)) != CLI_CONTINUE)
                return rc;
        }
    }
    if (optind != argc)
        return cli_usage("lens", "unexpected argument '%s'", argv[optind]);
    if ((prompt != NULL) + (in.ids != NULL) + (dataset_path != NULL) != 1)
        return cli_usage("lens", "give --prompt TEXT, --ids ID,... or --dataset FILE.jsonl (one of them)");
    if (in.answer_id && !in.ids)
        return cli_usage("lens", "--answer-id goes with --ids (--answer with --prompt)");
    if (in.ids && answer)
        return cli_usage("lens", "--answer goes with --prompt (--answer-id with --ids)");
    if (dataset_path) {
        if (!output)
            return cli_usage("lens", "--dataset needs -o OUT.nc");
        if (answer || has_position || o.json)
            return cli_usage("lens", "%s does not apply to --dataset (each item's answer, at its last token, into -o)",
                             answer ? "--answer" : has_position ? "--position" : "--json");
    } else if (output) {
        return cli_usage("lens", "-o applies to --dataset; use --json for one prompt");
    }
    /* the file is written after every prompt's lens: a bad directory now, not then */
    if (output && ncout_check_writable(output) != PS_OK)
        return cli_fail();
    model m;
    tokenizer *tok;
    if ((rc = in.ids         ? cli_load_ids("lens", &o, &m, &tok, NULL, 0)
              : dataset_path ? cli_load_for_dataset("lens", &o, &m, &tok)
                             : cli_load("lens", &o, &m, &tok)))
        return rc;
    if (top_k > m.cfg.vocab_size)
        top_k = m.cfg.vocab_size;
    rc = dataset_path ? lens_dataset(&m, tok, &o, dataset_path, output, top_k)
                      : lens_one(&m, tok, &o, prompt, answer, &in, has_position ? &position : NULL, top_k);
    tokenizer_free(tok);
    model_free(&m);
    return rc;
}

/* ---- decompose ------------------------------------------------------------- */

static const char *decompose_help =
    "usage: patchsweep decompose --model DIR --prompt TEXT --layer L --subtract attn_out|mlp_out\n"
    "                            [--answer TOK] [--top-k K] [--position P] [--json]\n"
    "       patchsweep decompose --model DIR --prompt TEXT --attribution --answer TOK [--wrong TOK]\n"
    "  (or --ids ID,... with --answer-id ID / --wrong-id ID: token ids, no tokenizer)\n"
    "  Residual-stream decomposition (the worksheet's experiment): block L's output\n"
    "  (blocks.L.hook_resid_post) decoded through ln_f and the unembedding as is and\n"
    "  with the component's update at block L subtracted, side by side, with the\n"
    "  answer's probability and rank (tokens with a strictly greater logit) before\n"
    "  and after.  Subtracting mlp_out leaves blocks.L.hook_resid_mid.\n"
    "  --attribution  direct logit attribution of every component of the final\n"
    "                 residual (embed, pos_embed, each attn_out and mlp_out) to\n"
    "                 logit[answer] (- logit[wrong] with --wrong), through ln_f with the\n"
    "                 scale of the full residual, plus ln_f's bias; the parts sum to\n"
    "                 the model's total (the residual error is printed).  Combines\n"
    "                 with --layer/--subtract or stands alone.\n"
    "  --top-k K      most likely tokens on each side (default 10)\n"
    "  --position P   token position (default: the last)\n"
    "  --no-bos       do not prepend <|endoftext|>;  --tokenizer DIR  tokenizer files\n"
    CLI_COMPUTE_HELP;

/* The two decoded rows side by side: answer statistics, then the top-k. */
static void print_decompose_table(const lens_view *v, char **tops, size_t layer, lens_component comp)
{
    char hook[HOOK_MAX_NAME], sub[HOOK_MAX_NAME];
    hook_name((hook_point){HOOK_RESID_POST, layer}, hook);
    hook_name(lens_component_hook(comp, layer), sub);
    const size_t k = v->k;
    /* width of the left side: its widest "token  prob" cell */
    size_t tw = 0;
    for (size_t j = 0; j < 2 * k; j++) {
        size_t x = text_width(tops[j]);
        tw = x > tw ? x : tw;
    }
    const size_t left = tw + 10 > 12 ? tw + 10 : 12;
    printf("block %zu output (%s), as is and without %s\n", layer, hook, sub);
    printf("%-11s", "");
    print_padded("as is", left);
    printf("   without %s\n", lens_component_name(comp));
    if (v->answer != LENS_NO_TOKEN) {
        const char *labels[4] = {"p(answer)", "logprob", "rank", "rr"};
        for (int s = 0; s < 4; s++) {
            printf("%-11s", labels[s]);
            for (size_t r = 0; r < 2; r++) {
                const lens_answer *a = &v->ans[r];
                char cell[64];
                if (s == 0)
                    snprintf(cell, sizeof cell, "%.6f", a->prob);
                else if (s == 1)
                    snprintf(cell, sizeof cell, "%.4f", a->logprob);
                else if (s == 2)
                    snprintf(cell, sizeof cell, "%zu", a->rank);
                else
                    snprintf(cell, sizeof cell, "%.5f", a->reciprocal_rank);
                if (r == 0)
                    print_padded(cell, left);
                else
                    printf("   %s", cell);
            }
            putchar('\n');
        }
    }
    printf("top-%zu\n", k);
    for (size_t j = 0; j < k; j++) {
        printf("  %-9zu", j + 1);
        for (size_t r = 0; r < 2; r++) {
            if (r == 1)
                fputs("   ", stdout);
            print_padded(tops[r * k + j], tw);
            char p[32];
            snprintf(p, sizeof p, "  %.6f", v->top_prob[r * k + j]);
            if (r == 0)
                print_padded(p, left - tw);
            else
                fputs(p, stdout);
        }
        putchar('\n');
    }
}

static void print_attribution(const lens_attribution *a, const model_config *cfg, const prompt_run *pr,
                              const tokenizer *tok)
{
    char *qa = quoted_token(tok, pr->answer), *qw = pr->wrong != LENS_NO_TOKEN ? quoted_token(tok, pr->wrong) : NULL;
    printf("direct logit attribution to logit[%s]", qa ? qa : "?");
    if (pr->wrong != LENS_NO_TOKEN)
        printf(" - logit[%s]", qw ? qw : "?");
    printf(" at position %zu\n(ln_f scale sqrt(var + eps) of the full final residual: %.6f)\n", pr->position,
           a->scale);
    free(qa);
    free(qw);
    printf("%-16s %12s\n", "component", "attribution");
    for (size_t i = 0; i < a->n_parts; i++) {
        char label[LENS_MAX_LABEL];
        lens_attribution_label(i, cfg->n_layer, label);
        printf("%-16s %12.6f\n", label, a->value[i]);
    }
    printf("%-16s %12.6f\n%-16s %12.6f\n%-16s %12.3g\n", "sum of parts", a->sum, "total (model)", a->total,
           "residual error", a->total - a->sum);
}

static json_t *attribution_json(const lens_attribution *a, const model_config *cfg, const prompt_run *pr,
                                const tokenizer *tok)
{
    json_t *parts = json_array();
    for (size_t i = 0; i < a->n_parts; i++) {
        char label[LENS_MAX_LABEL];
        lens_attribution_label(i, cfg->n_layer, label);
        json_array_append_new(parts, json_pack("{s:s,s:f}", "component", label, "value", a->value[i]));
    }
    json_t *o = json_pack("{s:f,s:o,s:f,s:f,s:f}", "scale", a->scale, "parts", parts, "sum", a->sum, "total",
                          a->total, "residual_error", a->total - a->sum);
    if (pr->wrong != LENS_NO_TOKEN) {
        char *s = tokenizer_token_display(tok, pr->wrong, "?");
        json_object_set_new(o, "wrong", json_string(s ? s : "?"));
        json_object_set_new(o, "wrong_id", json_integer(pr->wrong));
        free(s);
    }
    return o;
}

static json_t *side_json(const lens_view *v, size_t r, const tokenizer *tok)
{
    json_t *o = json_object();
    if (v->answer != LENS_NO_TOKEN)
        answer_json(o, &v->ans[r]);
    json_object_set_new(o, "top", top_json(v, r, tok));
    return o;
}

int cmd_decompose(int argc, char **argv)
{
    static const struct option opts[] = {CLI_COMMON_OPTIONS, CLI_COMPUTE_OPTION,
                                         {"prompt", required_argument, 0, 'p'},
                                         {"layer", required_argument, 0, OPT_LAYER},
                                         {"subtract", required_argument, 0, OPT_SUBTRACT},
                                         {"answer", required_argument, 0, OPT_ANSWER},
                                         {"wrong", required_argument, 0, OPT_WRONG},
                                         {"top-k", required_argument, 0, OPT_TOP_K},
                                         {"position", required_argument, 0, OPT_POSITION},
                                         {"attribution", no_argument, 0, OPT_ATTRIBUTION},
                                         {"ids", required_argument, 0, OPT_IDS},
                                         {"answer-id", required_argument, 0, OPT_ANSWER_ID},
                                         {"wrong-id", required_argument, 0, OPT_WRONG_ID},
                                         {0, 0, 0, 0}};
    cli_common o = {.bos = true};
    const char *prompt = NULL, *answer = NULL, *wrong = NULL;
    ids_input in = {0};
    size_t top_k = DEFAULT_TOP_K, position = 0, layer = 0;
    bool has_position = false, has_layer = false, has_comp = false, attribution = false;
    lens_component comp = LENS_MLP_OUT;
    int ch, rc;
    while ((ch = getopt_long(argc, argv, "m:p:h", opts, NULL)) != -1) {
        switch (ch) {
        case 'p': prompt = optarg; break;
        case OPT_ANSWER: answer = optarg; break;
        case OPT_WRONG: wrong = optarg; break;
        case OPT_IDS: in.ids = optarg; break;
        case OPT_ANSWER_ID: in.answer_id = optarg; break;
        case OPT_WRONG_ID: in.wrong_id = optarg; break;
        case OPT_ATTRIBUTION: attribution = true; break;
        case OPT_LAYER:
            if (!cli_parse_size(optarg, 0, MODEL_MAX_N_LAYER, &layer))
                return cli_usage("decompose", "--layer takes a block index (0, 1, ...), not '%s'", optarg);
            has_layer = true;
            break;
        case OPT_SUBTRACT:
            if (lens_component_parse(optarg, &comp) != PS_OK)
                return cli_usage("decompose", "--subtract: %s", err_msg());
            has_comp = true;
            break;
        case OPT_TOP_K:
            if (!cli_parse_size(optarg, 1, SIZE_MAX, &top_k))
                return cli_usage("decompose", "--top-k takes a whole number >= 1, not '%s'", optarg);
            break;
        case OPT_POSITION:
            if (!cli_parse_size(optarg, 0, MODEL_MAX_N_POSITIONS, &position))
                return cli_usage("decompose", "--position takes a token position (0, 1, ...), not '%s'", optarg);
            has_position = true;
            break;
        default:
            if ((rc = cli_common_opt("decompose", decompose_help, ch, argv, &o)) != CLI_CONTINUE)
                return rc;
        }
    }
    if (optind != argc)
        return cli_usage("decompose", "unexpected argument '%s'", argv[optind]);
    if (!prompt == !in.ids)
        return cli_usage("decompose", "give --prompt TEXT or --ids ID,... (one of them)");
    if (in.ids ? (answer || wrong) : (in.answer_id || in.wrong_id))
        return cli_usage("decompose", "--answer/--wrong go with --prompt, --answer-id/--wrong-id with --ids");
    if (in.ids)
        answer = in.answer_id, wrong = in.wrong_id; /* for the checks below only */
    if (has_layer != has_comp)
        return cli_usage("decompose", "--layer L and --subtract attn_out|mlp_out go together");
    if (!has_layer && !attribution)
        return cli_usage("decompose", "give --layer L --subtract attn_out|mlp_out, or --attribution");
    if (attribution && !answer)
        return cli_usage("decompose", "--attribution needs --answer TOK");
    if (wrong && !attribution)
        return cli_usage("decompose", "--wrong applies to --attribution");
    model m;
    tokenizer *tok;
    if ((rc = in.ids ? cli_load_ids("decompose", &o, &m, &tok, NULL, 0) : cli_load("decompose", &o, &m, &tok)))
        return rc;
    prompt_run pr = {0};
    lens_view v = {0};
    lens_attribution attr = {0};
    char **tops = NULL;
    if (has_layer && layer >= m.cfg.n_layer) {
        rc = cli_usage("decompose", "--layer %zu is out of range: the model has %zu blocks (layers 0..%zu)", layer,
                       m.cfg.n_layer, m.cfg.n_layer - 1);
        goto out;
    }
    if ((rc = prepare("decompose", &m, tok, o.bos, prompt, answer, wrong, &in, has_position ? &position : NULL, &pr)))
        goto out;
    if (attribution && pr.wrong == pr.answer) {
        rc = cli_usage("decompose", "--answer and --wrong are the same token (id %d)", pr.answer);
        goto out;
    }
    if (top_k > m.cfg.vocab_size)
        top_k = m.cfg.vocab_size;
    if (has_layer && (lens_view_init(&v, &m.cfg, 2, top_k) != PS_OK ||
                      lens_decompose(&v, &m, &pr.c, layer, comp, pr.position, pr.answer) != PS_OK ||
                      !(tops = top_strings(&v, tok)))) {
        rc = cli_fail();
        goto out;
    }
    if (attribution && lens_attribute(&attr, &m, &pr.c, pr.position, pr.answer, pr.wrong) != PS_OK) {
        rc = cli_fail();
        goto out;
    }
    if (o.json) {
        json_t *j = prompt_json(&pr, tok);
        if (has_layer) {
            char hook[HOOK_MAX_NAME], sub[HOOK_MAX_NAME];
            hook_name((hook_point){HOOK_RESID_POST, layer}, hook);
            hook_name(lens_component_hook(comp, layer), sub);
            json_object_set_new(j, "layer", json_integer((json_int_t)layer));
            json_object_set_new(j, "subtract", json_string(lens_component_name(comp)));
            json_object_set_new(j, "hook", json_string(hook));
            json_object_set_new(j, "subtracted_hook", json_string(sub));
            json_object_set_new(j, "as_is", side_json(&v, 0, tok));
            json_object_set_new(j, "subtracted", side_json(&v, 1, tok));
        }
        if (attribution)
            json_object_set_new(j, "attribution", attribution_json(&attr, &m.cfg, &pr, tok));
        cli_print_json(j);
    } else {
        print_prompt_line(&pr, tok);
        if (has_layer)
            print_decompose_table(&v, tops, layer, comp);
        if (has_layer && attribution)
            putchar('\n');
        if (attribution)
            print_attribution(&attr, &m.cfg, &pr, tok);
    }
out:
    free_strings(tops, v.n_rows * v.k);
    lens_attribution_free(&attr);
    lens_view_free(&v);
    prompt_run_free(&pr);
    tokenizer_free(tok);
    model_free(&m);
    return rc;
}
