#include "cmd_patch.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ablate.h"
#include "atp.h"
#include "atp_verify.h"
#include "bench.h"
#include "cli.h"
#include "cmd_patch_edges.h"
#include "clock.h"
#include "gemm.h"
#include "gemm_bf16.h"
#include "ncout.h"
#include "patch.h"
#include "prov.h"
#include "schema.h"
#include "sha256.h"
#include "strutil.h"

/* Options of the commands that patch one prompt pair. */
typedef struct {
    cli_common common;
    const char *clean, *corrupted, *answer, *wrong, *output, *save;
    const char *clean_ids, *corrupted_ids, *answer_id, *wrong_id; /* token ids instead of text */
    bool on[PATCH_COMPONENT_COUNT];
    bool components_given;
    patch_opts po;
    size_t reps;
    bool fast_only;
    patch_method method; /* patch only: exact, atp, atp+exact, atp*, atp*+exact, atp+verify, atp*+verify */
    size_t verify_top_k; /* +verify: cells per grid patched exactly (PATCH_VERIFY_TOP_K) */
    bool verify_given;
    bool graddrop;       /* with an estimating method: AtP*'s GradDrop */
    /* patch only: where cells take their values (patchspec.h, ablate.h) */
    patch_source source;
    bool source_given, direction_given, seed_given;
    const char *ablate_dataset, *mean_over;
    size_t resample_seed;
    bool edges; /* patch --method atp --edges: edge attribution patching (cmd_patch_edges.h) */
} patch_args;

enum { OPT_CLEAN = CLI_OPT_FIRST_FREE, OPT_EDGES, OPT_CORRUPTED, OPT_ANSWER, OPT_WRONG, OPT_COMPONENTS, OPT_METRIC,
       OPT_DIRECTION, OPT_ENGINE, OPT_REPS, OPT_SAVE, OPT_FAST_ONLY, OPT_CLEAN_IDS, OPT_CORRUPTED_IDS,
       OPT_ANSWER_ID, OPT_WRONG_ID, OPT_METHOD, OPT_GRADDROP, OPT_SOURCE, OPT_ABLATE_DATASET, OPT_MEAN_OVER,
       OPT_RESAMPLE_SEED, OPT_VERIFY_TOP_K };

static int parse_patch_args(const char *cmd, const char *help, int argc, char **argv, patch_args *a, bool is_patch)
{
    static const struct option opts[] = {CLI_COMMON_OPTIONS, CLI_COMPUTE_OPTION,
                                         {"clean", required_argument, 0, OPT_CLEAN},
                                         {"corrupted", required_argument, 0, OPT_CORRUPTED},
                                         {"answer", required_argument, 0, OPT_ANSWER},
                                         {"wrong", required_argument, 0, OPT_WRONG},
                                         {"components", required_argument, 0, OPT_COMPONENTS},
                                         {"metric", required_argument, 0, OPT_METRIC},
                                         {"direction", required_argument, 0, OPT_DIRECTION},
                                         {"engine", required_argument, 0, OPT_ENGINE},
                                         {"output", required_argument, 0, 'o'},
                                         {"reps", required_argument, 0, OPT_REPS},
                                         {"save", required_argument, 0, OPT_SAVE},
                                         {"fast-only", no_argument, 0, OPT_FAST_ONLY},
                                         {"clean-ids", required_argument, 0, OPT_CLEAN_IDS},
                                         {"corrupted-ids", required_argument, 0, OPT_CORRUPTED_IDS},
                                         {"answer-id", required_argument, 0, OPT_ANSWER_ID},
                                         {"wrong-id", required_argument, 0, OPT_WRONG_ID},
                                         {"method", required_argument, 0, OPT_METHOD},
                                         {"graddrop", no_argument, 0, OPT_GRADDROP},
                                         {"verify-top-k", required_argument, 0, OPT_VERIFY_TOP_K},
                                         {"source", required_argument, 0, OPT_SOURCE},
                                         {"ablate-dataset", required_argument, 0, OPT_ABLATE_DATASET},
                                         {"mean-over", required_argument, 0, OPT_MEAN_OVER},
                                         {"resample-seed", required_argument, 0, OPT_RESAMPLE_SEED},
                                         {"edges", no_argument, 0, OPT_EDGES},
                                         {0, 0, 0, 0}};
    memset(a, 0, sizeof *a);
    a->common.bos = true;
    a->po = (patch_opts){.metric = PATCH_LOGIT_DIFF, .direction = PATCH_DENOISE, .engine = PATCH_ENGINE_FAST};
    a->reps = 5;
    a->verify_top_k = PATCH_VERIFY_TOP_K;
    patch_components_parse("resid_pre", a->on);
    int ch, rc;
    while ((ch = getopt_long(argc, argv, "m:o:h", opts, NULL)) != -1) {
        /* options of the other command are usage errors, not silently ignored */
        const char *foreign = is_patch ? (ch == OPT_REPS            ? "--reps"
                                          : ch == OPT_SAVE          ? "--save"
                                          : ch == OPT_FAST_ONLY     ? "--fast-only"
                                                                    : NULL)
                                       : ch == 'o' ? "--output" : ch == OPT_DIRECTION ? "--direction"
                                                 : ch == OPT_METHOD ? "--method"
                                                 : ch == OPT_GRADDROP ? "--graddrop"
                                                 : ch == OPT_VERIFY_TOP_K ? "--verify-top-k"
                                                 : ch == OPT_SOURCE ? "--source"
                                                 : ch == OPT_ABLATE_DATASET ? "--ablate-dataset"
                                                 : ch == OPT_MEAN_OVER ? "--mean-over"
                                                 : ch == OPT_RESAMPLE_SEED ? "--resample-seed"
                                                 : ch == OPT_EDGES ? "--edges"
                                                 : ch == OPT_ENGINE ? "--engine" : NULL;
        if (foreign)
            return cli_usage(cmd, "option %s does not apply to %s", foreign, cmd);
        switch (ch) {
        case OPT_CLEAN: a->clean = optarg; break;
        case OPT_CORRUPTED: a->corrupted = optarg; break;
        case OPT_ANSWER: a->answer = optarg; break;
        case OPT_WRONG: a->wrong = optarg; break;
        case OPT_CLEAN_IDS: a->clean_ids = optarg; break;
        case OPT_CORRUPTED_IDS: a->corrupted_ids = optarg; break;
        case OPT_ANSWER_ID: a->answer_id = optarg; break;
        case OPT_WRONG_ID: a->wrong_id = optarg; break;
        case 'o': a->output = optarg; break;
        case OPT_SAVE: a->save = optarg; break;
        case OPT_FAST_ONLY: a->fast_only = true; break;
        case OPT_COMPONENTS:
            if (patch_components_parse(optarg, a->on) != PS_OK)
                return cli_usage(cmd, "%s", err_msg());
            a->components_given = true;
            break;
        case OPT_METRIC:
            if (patch_metric_list_parse(optarg, &a->po.metrics) != PS_OK)
                return cli_usage(cmd, "%s", err_msg());
            a->po.metric = a->po.metrics.m[0];
            if (a->po.metrics.n == 1)
                a->po.metrics.n = 0; /* one metric: the engines' one-metric call */
            else if (!is_patch)
                return cli_usage(cmd, "%s measures one metric, not %zu", cmd, a->po.metrics.n);
            break;
        case OPT_DIRECTION:
            if (strcmp(optarg, "denoise") && strcmp(optarg, "noise"))
                return cli_usage(cmd, "unknown direction '%s' (denoise or noise)", optarg);
            a->po.direction = strcmp(optarg, "noise") ? PATCH_DENOISE : PATCH_NOISE;
            a->direction_given = true;
            break;
        case OPT_SOURCE:
            if (patch_source_parse(optarg, &a->source) != PS_OK)
                return cli_usage(cmd, "%s", err_msg());
            a->source_given = true;
            break;
        case OPT_ABLATE_DATASET: a->ablate_dataset = optarg; break;
        case OPT_MEAN_OVER:
            if (ablate_mean_over_check(optarg) != PS_OK)
                return cli_usage(cmd, "--mean-over: %s", err_msg());
            a->mean_over = optarg;
            break;
        case OPT_RESAMPLE_SEED:
            if (!cli_parse_size(optarg, 0, (size_t)1 << 53, &a->resample_seed))
                return cli_usage(cmd, "--resample-seed takes a whole number from 0 to 2^53, not '%s'", optarg);
            a->seed_given = true;
            break;
        case OPT_ENGINE:
            if (strcmp(optarg, "fast") && strcmp(optarg, "naive"))
                return cli_usage(cmd, "unknown engine '%s' (fast or naive)", optarg);
            a->po.engine = strcmp(optarg, "naive") ? PATCH_ENGINE_FAST : PATCH_ENGINE_NAIVE;
            break;
        case OPT_METHOD:
            if (patch_method_parse(optarg, &a->method) != PS_OK)
                return cli_usage(cmd, "%s", err_msg());
            break;
        case OPT_GRADDROP:
            a->graddrop = true;
            break;
        case OPT_VERIFY_TOP_K:
            if (!cli_parse_size(optarg, 1, 1000000, &a->verify_top_k))
                return cli_usage(cmd, "--verify-top-k takes a whole number from 1 to 1000000, not '%s'", optarg);
            a->verify_given = true;
            break;
        case OPT_REPS:
            if (!cli_parse_size(optarg, 1, 1000, &a->reps))
                return cli_usage(cmd, "--reps takes a whole number from 1 to 1000, not '%s'", optarg);
            break;
        case OPT_EDGES:
            a->edges = true;
            break;
        default:
            if ((rc = cli_common_opt(cmd, help, ch, argv, &a->common)) != CLI_CONTINUE)
                return rc;
        }
    }
    if (optind != argc)
        return cli_usage(cmd, "unexpected argument '%s'", argv[optind]);
    if (a->po.metrics.n > 1 && a->method != PATCH_METHOD_EXACT)
        return cli_usage(cmd, "--method %s takes one metric, not %zu (its gradient is of one metric)",
                         patch_method_name(a->method), a->po.metrics.n);
    const bool any_ids = a->clean_ids || a->corrupted_ids || a->answer_id || a->wrong_id;
    if (any_ids && (a->clean || a->corrupted || a->answer || a->wrong))
        return cli_usage(cmd, "give the pair as text (--clean, --corrupted, --answer, --wrong) or as token ids "
                              "(--clean-ids, --corrupted-ids, --answer-id, --wrong-id), not both");
    if (any_ids && (!a->clean_ids || !a->corrupted_ids || !a->answer_id || !a->wrong_id))
        return cli_usage(cmd, "--clean-ids, --corrupted-ids, --answer-id and --wrong-id go together");
    if (!is_patch)
        return CLI_CONTINUE;
    /* the source and the direction (patchspec.h: an ablation ablates the clean run unless denoise is given) */
    if (a->source_given && patch_source_direction(a->source, a->direction_given, &a->po.direction) != PS_OK)
        return cli_usage(cmd, "%s", err_msg());
    const bool needs_set = a->source == PATCH_SOURCE_MEAN || a->source == PATCH_SOURCE_RESAMPLE;
    if (needs_set && !a->ablate_dataset)
        return cli_usage(cmd, "--source %s needs --ablate-dataset FILE.jsonl (the prompts it draws on)",
                         patch_source_name(a->source));
    if (!needs_set && a->ablate_dataset)
        return cli_usage(cmd, "--ablate-dataset applies to --source mean or resample only");
    if (a->mean_over && a->source != PATCH_SOURCE_MEAN)
        return cli_usage(cmd, "--mean-over applies to --source mean only");
    if (a->seed_given && a->source != PATCH_SOURCE_RESAMPLE)
        return cli_usage(cmd, "--resample-seed applies to --source resample only");
    if (a->verify_given && !patch_method_verifies(a->method))
        return cli_usage(cmd, "--verify-top-k applies to --method atp+verify or atp*+verify only");
    if (patch_source_ablation(a->source) && a->method != PATCH_METHOD_EXACT)
        return cli_usage(cmd, "--method %s does not take an ablation source yet (exact only)",
                         patch_method_name(a->method));
    /* edges are scored by attribution patching alone, over the whole node graph */
    if (a->edges && a->method != PATCH_METHOD_ATP)
        return cli_usage(cmd, "--edges needs --method atp (edge attribution patching; --method %s is not "
                              "implemented for edges)", patch_method_name(a->method));
    if (a->edges && (a->components_given || a->graddrop))
        return cli_usage(cmd, "--edges scores every edge of the node graph: %s does not apply",
                         a->components_given ? "--components" : "--graddrop");
    return CLI_CONTINUE;
}

/* A pair given as token ids (--clean-ids etc.). */
typedef struct {
    int32_t *clean, *corrupted;
    size_t nc, nr;
    int32_t answer, wrong;
} pair_ids;

static void pair_ids_free(pair_ids *p)
{
    free(p->clean);
    free(p->corrupted);
    memset(p, 0, sizeof *p);
}

/* Parse --clean-ids etc. into *p (a usage error prints and returns its code). */
static int parse_pair_ids(const char *cmd, const patch_args *a, pair_ids *p)
{
    memset(p, 0, sizeof *p);
    if (!cli_parse_ids(a->clean_ids, &p->clean, &p->nc))
        return cli_usage(cmd, "--clean-ids takes comma-separated token ids (whole numbers), not '%s'", a->clean_ids);
    if (!cli_parse_ids(a->corrupted_ids, &p->corrupted, &p->nr)) {
        pair_ids_free(p);
        return cli_usage(cmd, "--corrupted-ids takes comma-separated token ids (whole numbers), not '%s'",
                         a->corrupted_ids);
    }
    const char *arg[2] = {a->answer_id, a->wrong_id}, *names[2] = {"--answer-id", "--wrong-id"};
    int32_t *out[2] = {&p->answer, &p->wrong};
    for (int i = 0; i < 2; i++) {
        int32_t *one = NULL;
        size_t n = 0;
        bool ok = cli_parse_ids(arg[i], &one, &n) && n == 1;
        if (ok)
            *out[i] = one[0];
        free(one);
        if (!ok) {
            pair_ids_free(p);
            return cli_usage(cmd, "%s takes one token id (a whole number), not '%s'", names[i], arg[i]);
        }
    }
    return CLI_CONTINUE;
}

/* Load the model and its tokenizer; a pair given as token ids needs none:
 * then *tok is the model's own when it has one (token strings) or NULL, and
 * *ids holds the pair (every id checked against the
 * vocabulary). */
static int load_patch_model(const char *cmd, patch_args *a, model *m, tokenizer **tok, pair_ids *ids)
{
    memset(ids, 0, sizeof *ids);
    if (!a->clean_ids)
        return cli_load(cmd, &a->common, m, tok);
    int rc = parse_pair_ids(cmd, a, ids);
    if (rc != CLI_CONTINUE)
        return rc;
    int32_t *all = malloc((ids->nc + ids->nr + 2) * sizeof *all);
    if (!all) {
        pair_ids_free(ids);
        err_set(PS_ERR_NOMEM, "out of memory");
        return cli_fail();
    }
    memcpy(all, ids->clean, ids->nc * sizeof *all);
    memcpy(all + ids->nc, ids->corrupted, ids->nr * sizeof *all);
    all[ids->nc + ids->nr] = ids->answer, all[ids->nc + ids->nr + 1] = ids->wrong;
    rc = cli_load_ids(cmd, &a->common, m, tok, all, ids->nc + ids->nr + 2);
    free(all);
    if (rc)
        pair_ids_free(ids);
    return rc;
}

/* Tokenize and validate the pair (equal token lengths, within the model's
 * positions, single-token answers), then run both prompts. */
static ps_status prepare_pair(const model *m, const tokenizer *tok, const patch_args *a, const pair_ids *ids,
                              patch_pair *pair)
{
    int32_t *clean = NULL, *corrupted = NULL, answer = 0, wrong = 0;
    size_t nc = 0, nr = 0;
    ps_status st = PS_OK;
    if (ids->clean) {
        nc = ids->nc, nr = ids->nr, answer = ids->answer, wrong = ids->wrong;
    } else if ((st = cli_encode_prompt(tok, a->clean, a->common.bos, &clean, &nc)) ||
               (st = cli_encode_prompt(tok, a->corrupted, a->common.bos, &corrupted, &nr))) {
        goto out;
    }
    if (nc != nr) {
        st = err_set(PS_ERR_INVALID, "clean and corrupted prompts differ in token length (%zu vs %zu tokens)", nc, nr);
        goto out;
    }
    if (nc > m->cfg.n_positions) {
        st = err_set(PS_ERR_RANGE, "the prompts are %zu tokens, more than the model's %zu positions", nc,
                     m->cfg.n_positions);
        goto out;
    }
    if (!ids->clean &&
        ((st = tokenizer_single_token(tok, a->answer, &answer)) || (st = tokenizer_single_token(tok, a->wrong, &wrong))))
        goto out;
    st = patch_pair_init(pair, m, ids->clean ? ids->clean : clean, ids->clean ? ids->corrupted : corrupted, nc, answer,
                         wrong);
out:
    free(clean);
    free(corrupted);
    return st;
}

/* ---- patch --------------------------------------------------------------- */

static const char *patch_help =
    "usage: patchsweep patch --model DIR (--clean TEXT --corrupted TEXT --answer TOK --wrong TOK |\n"
    "                        --clean-ids IDS --corrupted-ids IDS --answer-id ID --wrong-id ID)\n"
    "                        [--components LIST] [--metric M] [--direction denoise|noise]\n"
    "                        [--engine fast|naive] [-o OUT.nc] [--json] [--no-bos] [--compute f32|bf16]\n"
    "                        [--source clean|corrupted|zero|mean|resample [--ablate-dataset F.jsonl]\n"
    "                         [--mean-over SET] [--resample-seed N]]\n"
    "  Activation patching of one prompt pair (the worksheet's IOI grid).\n"
    "  --components  comma-separated: resid_pre (default), resid_mid, attn_out, mlp_out\n"
    "                (layer x position); z, q, k, v, pattern (layer x position x head;\n"
    "                pattern: the destination row); pattern_dest_src (layer x position\n"
    "                x src_position x head: one pattern entry); z_all_pos, q_all_pos,\n"
    "                k_all_pos, v_all_pos, pattern_all_pos (layer x head); groups\n"
    "                block_every (resid_pre,attn_out,mlp_out), head_all_pos_every\n"
    "                (the five *_all_pos) and head_by_pos_every (z,q,k,v,pattern)\n"
    "  --metric      logit_diff (default: logit[answer] - logit[wrong]), prob, logprob, kl;\n"
    "                or several, comma-separated (logit_diff,prob,kl): all from the same\n"
    "                patched forwards, each printed and written with its own values\n"
    "  --direction   denoise (default: run corrupted, patch in clean) or noise\n"
    "  --engine      fast (default: recompute only what a patch changes) or naive\n"
    "                (one full forward per cell, the reference)\n"
    "  --method      exact (default), atp (attribution patching: every cell estimated\n"
    "                from one forward and one backward pass, (a_src - a_base) . dM/da),\n"
    "                atp+exact (both, with per-cell error, rank correlation and the\n"
    "                exact top-10 cells the estimate misses); atp*, atp*+exact: AtP*'s\n"
    "                QK fix (q, k, q_all_pos, k_all_pos through the exact softmax);\n"
    "                atp+verify, atp*+verify: the estimate, then the exact value of\n"
    "                only the top --verify-top-k cells of each grid by |estimate - base|\n"
    "  --verify-top-k K  cells per grid patched exactly with +verify (default 10)\n"
    "  --graddrop    with an atp method: AtP*'s GradDrop (L more backward passes;\n"
    "                |effect| averaged over the passes, each without one block)\n"
    "  --edges       with --method atp: edge attribution patching, a score for every\n"
    "                edge of the node graph (embedding, heads' outputs, MLPs' outputs ->\n"
    "                heads' q, k, v inputs, MLPs' inputs, logits); prints the top 20\n"
    "                by |score|; -o: edge_atp(upstream, downstream) and more\n"
    "  --clean-ids, --corrupted-ids, --answer-id, --wrong-id\n"
    "                the pair as comma-separated token ids (no tokenizer; no BOS added):\n"
    "                the way to patch the families whose tokenizer is not supported yet\n"
    "                (k, v, k_all_pos, v_all_pos: one cell per key/value head with grouped-query\n"
    "                attention; resid_mid does not exist with a parallel residual)\n"
    "  --source      where a cell's value comes from: clean (denoise) or corrupted (noise),\n"
    "                the direction's usual run; or an ablation of the clean run (of the\n"
    "                corrupted run with --direction denoise): zero, mean (the mean by\n"
    "                position over --ablate-dataset's prompts of that kind, --mean-over\n"
    "                all | A:B (dataset indices [A, B)) | FIELD=VALUE), resample (the\n"
    "                activations of another prompt of --ablate-dataset with the same\n"
    "                token length, chosen by --resample-seed N, default 0)\n"
    "  Prints each grid of normalized values, (patched - corrupted) / (clean - corrupted),\n"
    "  layers as rows and tokens as columns (ablations: 1 = no effect); -o writes the\n"
    "  NetCDF results file.\n"
    CLI_COMPUTE_HELP;

/* A column label as the worksheet's: token_index, cut to 9 chars. */
static void token_label(const tokenizer *tok, int32_t id, size_t j, char *label, size_t n)
{
    char *s = tokenizer_token_display(tok, id, "?");
    snprintf(label, n, "%s_%zu", s ? s : "?", j);
    free(s);
    for (char *q = label; *q; q++)
        if (*q == '\n' || *q == '\t')
            *q = ' ';
}

/* The table of one component's normalized grid: rows = layer (and head,
 * and for pattern_dest_src the destination token), columns = the token
 * positions (pattern_dest_src: the source positions) or the heads. */
static void print_patch_table(const patch_pair *p, const tokenizer *tok, patch_component c, const model_config *cfg,
                              const double *values, patch_metric metric, const int32_t *labels)
{
    size_t shape[PATCH_GRID_MAX_DIMS];
    const size_t nd = patch_grid_shape(c, cfg, p->T, shape, NULL);
    const bool by_head = patch_component_all_pos(c), dest_src = c == PATCH_PATTERN_DEST_SRC;
    /* as (layer, row-axis i, column j, head h) with unused axes of length 1 */
    const size_t n_i = dest_src ? shape[1] : 1, n_j = dest_src ? shape[2] : shape[1];
    const size_t n_h = nd >= 3 ? shape[nd - 1] : 1;
    printf("\n%s (normalized %s; rows = layer%s%s, columns = %s)\n", patch_component_name(c), patch_metric_name(metric),
           nd >= 3 ? ".head" : "", dest_src ? ".destination" : "",
           by_head ? "head" : dest_src ? "source token_position" : "token_position");
    const int lw = dest_src ? 10 : 7; /* "L11.H11.99" */
    printf("%-*s", lw, "");
    for (size_t j = 0; j < n_j; j++) {
        if (by_head) {
            printf(" %7s%-2zu", "h", j);
            continue;
        }
        char label[64];
        token_label(tok, labels[j], j, label, sizeof label);
        printf(" %9.9s", label);
    }
    putchar('\n');
    for (size_t layer = 0; layer < shape[0]; layer++)
        for (size_t h = 0; h < n_h; h++)
            for (size_t i = 0; i < n_i; i++) {
                char label[96];
                if (dest_src)
                    snprintf(label, sizeof label, "L%zu.H%zu.%zu", layer, h, i);
                else if (nd == 3)
                    snprintf(label, sizeof label, "L%zu.H%zu", layer, h);
                else
                    snprintf(label, sizeof label, "L%zu", layer);
                printf("%-*s", lw, label);
                for (size_t j = 0; j < n_j; j++) {
                    const size_t idx = ((layer * n_i + i) * n_j + j) * n_h + h;
                    printf(" %9.3f", patch_normalize(p, metric, values[idx]));
                }
                putchar('\n');
            }
}

/* ---- attribution patching (atp.h) ----------------------------------------- */

static size_t grid_cells(patch_component c, const model_config *cfg, size_t T)
{
    return patch_grid_size(c, cfg, T);
}

static ps_status atp_values(const model *m, const patch_pair *pair, const bool on[PATCH_COMPONENT_COUNT],
                            const patch_opts *po, const atp_opts *ao, double *vals[PATCH_COMPONENT_COUNT])
{
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
        if (on[c] && !(vals[c] = malloc(grid_cells((patch_component)c, &m->cfg, pair->T) * sizeof *vals[c])))
            return err_set(PS_ERR_NOMEM, "out of memory");
    return atp_eval_opts(m, pair, on, po->metric, po->direction, ao, vals);
}

/* the unpatched base run's metric: what a cell that changes nothing gives */
static double pair_base_metric(const patch_pair *p, patch_metric metric, patch_direction dir)
{
    return dir == PATCH_DENOISE ? p->corrupted_metric[metric] : p->clean_metric[metric];
}

static json_t *atp_json(const patch_pair *p, patch_metric metric, patch_direction dir, const double *exact, const double *est, size_t n)
{
    atp_stats s;
    if (atp_compare(exact, est, n, pair_base_metric(p, metric, dir), ATP_TOP_K, &s) != PS_OK)
        return json_null();
    json_t *err = json_array(), *missed = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(err, json_real(est[i] - exact[i]));
    for (size_t i = 0; i < s.n_missed; i++)
        json_array_append_new(missed, json_integer((json_int_t)s.missed[i]));
    return json_pack("{s:o,s:o,s:o,s:i,s:f}", "error", err, "rank_correlation",
                     isfinite(s.rank_correlation) ? json_real(s.rank_correlation) : json_null(), "missed_top_k", missed,
                     "top_k", (int)s.k, "max_abs_error", s.max_abs_error);
}

static void print_atp_stats(const patch_pair *p, patch_component c, const model_config *cfg, patch_metric metric,
                            patch_direction dir, const double *exact, const double *est, const char *what)
{
    const size_t n = grid_cells(c, cfg, p->T);
    atp_stats s;
    if (atp_compare(exact, est, n, pair_base_metric(p, metric, dir), ATP_TOP_K, &s) != PS_OK)
        return;
    printf("%s: %s vs exact: rank correlation %.3f, max |error| %.4g, %zu of the exact top %zu missed\n",
           patch_component_name(c), what, s.rank_correlation, s.max_abs_error, s.n_missed, s.k);
}

/* One grid of raw patched-metric values (NaN stays NaN) and its normalized
 * copy (patch_normalize) into the results file as C<suffix> (long name
 * ln_raw) and C<nsuffix> (ln_norm). */
static ps_status put_raw_and_normalized(ncout_results *res, model *m, const patch_pair *p, patch_component pc,
                                        patch_metric metric, const double *raw, const char *suffix, const char *ln_raw,
                                        const char *nsuffix, const char *ln_norm)
{
    const size_t n = grid_cells(pc, &m->cfg, p->T);
    double *norm = malloc(n * sizeof *norm);
    if (!norm)
        return err_set(PS_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < n; i++)
        norm[i] = patch_normalize(p, metric, raw[i]);
    ps_status st = ncout_results_put_grid(res, m, pc, suffix, 0, raw, ln_raw, NULL);
    if (st == PS_OK)
        st = ncout_results_put_grid(res, m, pc, nsuffix, 0, norm, ln_norm, NULL);
    free(norm);
    return st;
}

/* The estimates (and with atp+exact the errors and their statistics) into the results file. */
static ps_status atp_write(ncout_results *res, model *m, const patch_pair *p, const bool on[PATCH_COMPONENT_COUNT],
                           patch_metric metric, patch_direction dir, patch_method method, bool graddrop,
                           double *const exact[PATCH_COMPONENT_COUNT], double *const est[PATCH_COMPONENT_COUNT])
{
    /* the method, "+graddrop" when GradDrop was on: "atp*+graddrop", "atp+exact+graddrop" */
    char mname[48];
    snprintf(mname, sizeof mname, "%s%s", patch_method_name(method), graddrop ? "+graddrop" : "");
    ps_status st = ncout_put_attr(res->f, SCHEMA_ATT_METHOD, mname);
    for (int c = 0; c < PATCH_COMPONENT_COUNT && st == PS_OK; c++) {
        if (!on[c])
            continue;
        const patch_component pc = (patch_component)c;
        const size_t n = grid_cells(pc, &m->cfg, p->T);
        char ln[160], lnn[160];
        snprintf(ln, sizeof ln, "attribution patching estimate of %s after patching %s", patch_metric_name(metric),
                 patch_component_name(pc));
        snprintf(lnn, sizeof lnn, "normalized attribution patching estimate, %s", patch_component_name(pc));
        st = put_raw_and_normalized(res, m, p, pc, metric, est[c], SCHEMA_ATP_SUFFIX, ln, SCHEMA_ATP_NORMALIZED_SUFFIX,
                                    lnn);
        if (st == PS_OK && patch_method_runs_exact(method)) {
            double *tmp = malloc(n * sizeof *tmp);
            if (!tmp)
                return err_set(PS_ERR_NOMEM, "out of memory");
            int var;
            atp_stats s;
            for (size_t i = 0; i < n; i++)
                tmp[i] = est[c][i] - exact[c][i];
            snprintf(ln, sizeof ln, "attribution patching estimate - exact value, %s", patch_component_name(pc));
            if ((st = ncout_results_put_grid(res, m, pc, SCHEMA_ATP_ERROR_SUFFIX, 0, tmp, ln, &var)) == PS_OK &&
                (st = atp_compare(exact[c], est[c], n, pair_base_metric(p, metric, dir), ATP_TOP_K, &s)) ==
                    PS_OK) {
                st = ncout_results_put_stats(res, var, s.rank_correlation, s.k, s.missed, s.n_missed);
            }
            free(tmp);
        }
    }
    return st;
}

/* +verify: the verified cells, one line each: flat index, estimate, exact value (normalized). */
static void print_verified(const patch_pair *p, patch_component c, const model_config *cfg, patch_metric metric,
                           const double *est, const double *ver, size_t k)
{
    const size_t n = grid_cells(c, cfg, p->T);
    printf("%s: the top %zu cells by |estimate - base| patched exactly (flat index: estimate -> exact, "
           "normalized):\n", patch_component_name(c), k < n ? k : n);
    for (size_t i = 0; i < n; i++)
        if (!isnan(ver[i]))
            printf("  %zu: %.4f -> %.4f (%.3f -> %.3f)\n", i, est[i], ver[i], patch_normalize(p, metric, est[i]),
                   patch_normalize(p, metric, ver[i]));
}

/* +verify: C_verified and C_verified_normalized (NaN at the cells not verified) into the results file. */
static ps_status verify_write(ncout_results *res, model *m, const patch_pair *p, const bool on[PATCH_COMPONENT_COUNT],
                              patch_metric metric, size_t k, double *const ver[PATCH_COMPONENT_COUNT])
{
    char num[32];
    snprintf(num, sizeof num, "%zu", k);
    ps_status st = ncout_put_attr(res->f, SCHEMA_ATT_VERIFY_TOP_K, num);
    for (int c = 0; c < PATCH_COMPONENT_COUNT && st == PS_OK; c++) {
        if (!on[c])
            continue;
        const patch_component pc = (patch_component)c;
        char ln[160], lnn[160];
        snprintf(ln, sizeof ln, "exact %s at the verified cells (NaN: not verified), %s", patch_metric_name(metric),
                 patch_component_name(pc));
        snprintf(lnn, sizeof lnn, "normalized exact value at the verified cells, %s", patch_component_name(pc));
        st = put_raw_and_normalized(res, m, p, pc, metric, ver[c], SCHEMA_VERIFIED_SUFFIX, ln,
                                    SCHEMA_VERIFIED_NORMALIZED_SUFFIX, lnn);
    }
    return st;
}

/* ---- ablations (patchspec.h's sources zero, mean, resample; ablate.h) ---- */

typedef struct {
    forward_cache cache;  /* the replacement values, pair->source */
    size_t mean_prompts;  /* mean */
    size_t donor;         /* resample: the donor's dataset index */
    char sha256[65];      /* of --ablate-dataset */
} patch_ablation;

static ps_status ablation_build(const model *m, const tokenizer *tok, const patch_args *a, patch_pair *pair,
                                patch_ablation *ab)
{
    memset(ab, 0, sizeof *ab);
    const ablate_set set = {.path = a->ablate_dataset, .mean_over = a->mean_over, .bos = a->common.bos,
                            .direction = a->po.direction};
    ps_status st = PS_OK;
    if (a->ablate_dataset && (st = sha256_file_hex(a->ablate_dataset, ab->sha256)))
        return st;
    if (a->source == PATCH_SOURCE_ZERO) {
        st = ablate_zero_cache(m, pair->T, &ab->cache);
    } else if (a->source == PATCH_SOURCE_MEAN) {
        ablate_mean mean;
        if ((st = ablate_mean_of_dataset(m, tok, NULL, &set, &mean)))
            return st;
        ab->mean_prompts = ablate_mean_count(&mean);
        st = ablate_mean_cache(&mean, m, pair->T, &ab->cache);
        if (st)
            err_set(st, "%s: %s", a->ablate_dataset, err_msg());
        ablate_mean_free(&mean);
    } else {
        const forward_cache *base = a->po.direction == PATCH_NOISE ? &pair->clean : &pair->corrupted;
        st = ablate_resample_of_dataset(m, tok, &set, a->resample_seed, base->tokens, pair->T, &ab->donor,
                                        &ab->cache);
    }
    if (st == PS_OK)
        pair->source = &ab->cache;
    return st;
}

/* The ablation's attributes and resample_from (schema.h). */
static ps_status ablation_write(ncout_results *res, const patch_args *a, const patch_ablation *ab)
{
    char num[32];
    ps_status st = ncout_put_attr(res->f, SCHEMA_ATT_SOURCE, patch_source_name(a->source));
    if (st == PS_OK && a->ablate_dataset &&
        ((st = ncout_put_attr(res->f, SCHEMA_ATT_ABLATION_DATASET, a->ablate_dataset)) ||
         (st = ncout_put_attr(res->f, SCHEMA_ATT_ABLATION_DATASET_SHA256, ab->sha256))))
        return st;
    if (st == PS_OK && a->source == PATCH_SOURCE_MEAN) {
        snprintf(num, sizeof num, "%zu", ab->mean_prompts);
        if ((st = ncout_put_attr(res->f, SCHEMA_ATT_MEAN_OVER, a->mean_over ? a->mean_over : "all")) == PS_OK)
            st = ncout_put_attr(res->f, SCHEMA_ATT_MEAN_PROMPTS, num);
    }
    if (st == PS_OK && a->source == PATCH_SOURCE_RESAMPLE) {
        const int donor = (int)ab->donor;
        snprintf(num, sizeof num, "%zu", a->resample_seed);
        if ((st = ncout_put_attr(res->f, SCHEMA_ATT_ABLATION_SEED, num)) == PS_OK)
            st = ncout_results_put_prompt_id(res, SCHEMA_VAR_RESAMPLE_FROM,
                                             "dataset index of the prompt whose activations were patched in", 0, 1,
                                             &donor);
    }
    return st;
}

static void ablation_describe(char *buf, size_t n, const patch_args *a, const patch_ablation *ab)
{
    if (a->source == PATCH_SOURCE_MEAN)
        snprintf(buf, n, "; source: the mean of %zu prompts of %s (mean_over %s)", ab->mean_prompts,
                 a->ablate_dataset, a->mean_over ? a->mean_over : "all");
    else if (a->source == PATCH_SOURCE_RESAMPLE)
        snprintf(buf, n, "; source: prompt %zu of %s (seed %zu)", ab->donor, a->ablate_dataset, a->resample_seed);
    else if (a->source == PATCH_SOURCE_ZERO)
        snprintf(buf, n, "; source: zero");
    else
        buf[0] = 0;
}

/* One more metric's grids for --json: {clean_metric, corrupted_metric,
 * components: {C: {values, normalized}}}. */
static json_t *metric_json(const patch_pair *pair, const bool *on, const model_config *cfg, patch_metric met,
                           double *const vals[PATCH_COMPONENT_COUNT])
{
    json_t *comps = json_object();
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        if (!on[c])
            continue;
        size_t shape[PATCH_GRID_MAX_DIMS], n = 1;
        const size_t nd = patch_grid_shape((patch_component)c, cfg, pair->T, shape, NULL);
        for (size_t k = 0; k < nd; k++)
            n *= shape[k];
        json_t *raw = json_array(), *norm = json_array();
        for (size_t i = 0; i < n; i++) {
            const double v = patch_normalize(pair, met, vals[c][i]);
            json_array_append_new(raw, json_real(vals[c][i]));
            json_array_append_new(norm, isfinite(v) ? json_real(v) : json_null());
        }
        json_object_set_new(comps, patch_component_name((patch_component)c),
                            json_pack("{s:o,s:o}", "values", raw, "normalized", norm));
    }
    return json_pack("{s:f,s:f,s:o}", "clean_metric", pair->clean_metric[met], "corrupted_metric",
                     pair->corrupted_metric[met], "components", comps);
}

int cmd_patch(int argc, char **argv)
{
    patch_args a;
    int rc = parse_patch_args("patch", patch_help, argc, argv, &a, true);
    if (rc != CLI_CONTINUE)
        return rc;
    if (!a.clean_ids && (!a.clean || !a.corrupted || !a.answer || !a.wrong))
        return cli_usage("patch", "--clean, --corrupted, --answer and --wrong are required (or --clean-ids, "
                                  "--corrupted-ids, --answer-id and --wrong-id)");
    if (a.graddrop && !patch_method_estimates(a.method))
        return cli_usage("patch", "--graddrop needs an attribution method (--method atp, atp*, atp+exact, "
                                  "atp*+exact, atp+verify or atp*+verify)");
    bool *on = a.on;
    patch_opts po = a.po;
    tokenizer *tok;
    model m;
    pair_ids ids;
    if ((rc = load_patch_model("patch", &a, &m, &tok, &ids)))
        return rc;
    patch_pair pair = {0};
    patch_ablation ab = {0};
    char ab_text[1200] = "";
    int32_t answer, wrong;
    double *values[PATCH_COMPONENT_COUNT] = {0}, *atp_vals[PATCH_COMPONENT_COUNT] = {0};
    double *ver_vals[PATCH_COMPONENT_COUNT] = {0}; /* +verify: exact at the verified cells, NaN elsewhere */
    /* several metrics: ms[k]'s grids in mvals[k] (mvals[0] = values) */
    patch_metric ms[PATCH_METRIC_COUNT];
    const size_t M = patch_opts_metrics(&po, ms);
    double *mvals[PATCH_METRIC_COUNT][PATCH_COMPONENT_COUNT] = {{0}};
    ncout_file f = {.ncid = -1};
    ps_status st = PS_OK;
    if (a.output && (st = ncout_create(&f, a.output)))
        goto out;
    if ((st = patch_components_check(on, &m.cfg)) || (st = prepare_pair(&m, tok, &a, &ids, &pair)))
        goto out;
    if (patch_source_ablation(a.source) && (st = ablation_build(&m, tok, &a, &pair, &ab)))
        goto out;
    ablation_describe(ab_text, sizeof ab_text, &a, &ab);
    if (a.edges) { /* cmd_patch_edges.h: its own output */
        if ((st = patch_edges_report(&m, tok, &pair, po.metric, po.direction, a.output ? &f : NULL, a.common.json,
                                     a.answer, a.wrong)) == PS_OK &&
            a.output && (st = ncout_commit(&f)) == PS_OK)
            fprintf(stderr, "wrote %s\n", a.output);
        goto out;
    }
    answer = pair.answer;
    wrong = pair.wrong;
    const size_t nc = pair.T;
    const bool exact = patch_method_runs_exact(a.method), atp = patch_method_estimates(a.method);
    const atp_opts ao = {patch_method_qk_fix(a.method), a.graddrop};
    for (int c = 0; c < PATCH_COMPONENT_COUNT && st == PS_OK; c++) {
        if (!on[c] || !exact)
            continue;
        patch_cell *cells;
        size_t n;
        if ((st = patch_grid_cells((patch_component)c, &m.cfg, 0, nc, &cells, &n)))
            break;
        values[c] = malloc(n * M * sizeof *values[c]);
        if (!values[c])
            st = err_set(PS_ERR_NOMEM, "out of memory");
        else
            st = patch_eval(&m, &pair, 1, cells, n, &po, values[c]);
        free(cells);
        /* values[c][i * M + k] -> mvals[k][c][i], metric 0 back in values[c] */
        for (size_t k = 1; k < M && st == PS_OK; k++) {
            if (!(mvals[k][c] = malloc(n * sizeof *mvals[k][c]))) {
                st = err_set(PS_ERR_NOMEM, "out of memory");
                break;
            }
            for (size_t i = 0; i < n; i++)
                mvals[k][c][i] = values[c][i * M + k];
        }
        for (size_t i = 0; i < n && M > 1 && st == PS_OK; i++)
            values[c][i] = values[c][i * M];
        mvals[0][c] = values[c];
    }
    if (st || (atp && (st = atp_values(&m, &pair, on, &po, &ao, atp_vals))))
        goto out;
    const bool verify = patch_method_verifies(a.method);
    for (int c = 0; c < PATCH_COMPONENT_COUNT && verify && st == PS_OK; c++)
        if (on[c] && !(ver_vals[c] = malloc(patch_grid_size((patch_component)c, &m.cfg, nc) * sizeof *ver_vals[c])))
            st = err_set(PS_ERR_NOMEM, "out of memory");
    if (st || (verify && (st = atp_verify_pair(&m, &pair, on, &po, a.verify_top_k, atp_vals, ver_vals))))
        goto out;
    if (a.output) {
        ncout_results res;
        const ncout_prompt prompt = {.T = pair.T, .answer_id = pair.answer, .wrong_id = pair.wrong,
                                     .clean_metric = pair.clean_metric[po.metric],
                                     .corrupted_metric = pair.corrupted_metric[po.metric],
                                     .clean_tokens = pair.clean.tokens, .corrupted_tokens = pair.corrupted.tokens,
                                     .answer = a.answer ? a.answer : "", .wrong = a.wrong ? a.wrong : ""};
        const bool none[PATCH_COMPONENT_COUNT] = {0};
        const patch_metric_list one = {.n = 1, .m = {po.metric}};
        if ((st = ncout_results_define_metrics(&res, &f, &m, nc, exact ? on : none, M > 1 ? &po.metrics : &one,
                                               po.direction, po.engine)) == PS_OK &&
            (st = ncout_results_put(&res, 0, &prompt, tok, values)) == PS_OK) {
            for (size_t k = 1; k < M && st == PS_OK; k++)
                st = ncout_results_put_metric(&res, 0, k, pair.clean_metric[ms[k]], pair.corrupted_metric[ms[k]],
                                              mvals[k]);
            if (st == PS_OK)
                st = ncout_results_flush(&res);
        }
        if (st == PS_OK && patch_source_ablation(a.source))
            st = ablation_write(&res, &a, &ab);
        if (st == PS_OK && atp)
            st = atp_write(&res, &m, &pair, on, po.metric, po.direction, a.method, a.graddrop, values, atp_vals);
        if (st == PS_OK && verify)
            st = verify_write(&res, &m, &pair, on, po.metric, a.verify_top_k, ver_vals);
        ncout_results_free(&res);
        if (st || (st = ncout_commit(&f)))
            goto out;
        fprintf(stderr, "wrote %s\n", a.output);
    }
    if (a.common.json) {
        json_t *comps = json_object();
        for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
            if (!on[c])
                continue;
            size_t shape[PATCH_GRID_MAX_DIMS];
            const char *dn[PATCH_GRID_MAX_DIMS];
            size_t nd = patch_grid_shape((patch_component)c, &m.cfg, nc, shape, dn);
            size_t n = patch_grid_size((patch_component)c, &m.cfg, nc);
            json_t *dims = json_array(), *shp = json_array(), *raw = json_array(), *norm = json_array();
            for (size_t k = 0; k < nd; k++) {
                json_array_append_new(dims, json_string(dn[k]));
                json_array_append_new(shp, json_integer((json_int_t)shape[k]));
            }
            const double *vals = exact ? values[c] : atp_vals[c];
            for (size_t i = 0; i < n; i++) {
                double v = patch_normalize(&pair, po.metric, vals[i]);
                json_array_append_new(raw, json_real(vals[i]));
                json_array_append_new(norm, isfinite(v) ? json_real(v) : json_null());
            }
            json_t *one = json_pack("{s:o,s:o,s:o,s:o}", "dims", dims, "shape", shp, "values", raw, "normalized", norm);
            if (exact && atp)
                json_object_set_new(one, "atp", atp_json(&pair, po.metric, po.direction, values[c], atp_vals[c], n));
            if (verify) {
                /* the exact value at the verified cells, null at the others */
                json_t *ver = json_array();
                for (size_t i = 0; i < n; i++)
                    json_array_append_new(ver, isfinite(ver_vals[c][i]) ? json_real(ver_vals[c][i]) : json_null());
                json_object_set_new(one, "verified", ver);
            }
            json_object_set_new(comps, patch_component_name((patch_component)c), one);
        }
        json_t *toks = json_array();
        for (size_t t = 0; t < nc; t++) {
            char *s = tokenizer_token_display(tok, pair.corrupted.tokens[t], "?");
            json_array_append_new(toks, json_string(s ? s : ""));
            free(s);
        }
        json_t *out_json = json_pack("{s:s,s:s,s:s,s:f,s:f,s:i,s:i,s:o,s:o}", "metric", patch_metric_name(po.metric),
                             "direction", po.direction == PATCH_DENOISE ? "denoise" : "noise", "engine",
                             po.engine == PATCH_ENGINE_FAST ? "fast" : "naive", "clean_metric",
                             pair.clean_metric[po.metric], "corrupted_metric", pair.corrupted_metric[po.metric],
                             "answer_id", answer, "wrong_id", wrong, "corrupted_tokens", toks, "components", comps);
        if (M > 1) { /* the other metrics, as "metric" .. "components" above */
            json_t *names = json_array(), *others = json_object();
            for (size_t k = 0; k < M; k++)
                json_array_append_new(names, json_string(patch_metric_name(ms[k])));
            for (size_t k = 1; k < M; k++)
                json_object_set_new(others, patch_metric_name(ms[k]),
                                    metric_json(&pair, on, &m.cfg, ms[k], mvals[k]));
            json_object_set_new(out_json, "metrics", names);
            json_object_set_new(out_json, "other_metrics", others);
        }
        /* "method" only when not exact: exact outputs stay as they were */
        if (a.method != PATCH_METHOD_EXACT)
            json_object_set_new(out_json, "method", json_string(patch_method_name(a.method)));
        if (a.graddrop)
            json_object_set_new(out_json, "graddrop", json_true());
        if (verify)
            json_object_set_new(out_json, "verify_top_k", json_integer((json_int_t)a.verify_top_k));
        /* the ablation's keys only with one: other outputs stay as they were */
        if (patch_source_ablation(a.source)) {
            json_object_set_new(out_json, "source", json_string(patch_source_name(a.source)));
            if (a.source == PATCH_SOURCE_MEAN)
                json_object_set_new(out_json, "mean_prompts", json_integer((json_int_t)ab.mean_prompts));
            if (a.source == PATCH_SOURCE_RESAMPLE)
                json_object_set_new(out_json, "resample_from", json_integer((json_int_t)ab.donor));
        }
        cli_print_json(out_json);
    } else {
        const char *what = patch_method_qk_fix(a.method) ? (a.graddrop ? "AtP* with GradDrop" : "AtP*")
                                                         : (a.graddrop ? "AtP with GradDrop" : "AtP");
        printf("%zu tokens; %s: clean %.4f, corrupted %.4f (%s, %s engine%s)\n", nc, patch_metric_name(po.metric),
               pair.clean_metric[po.metric], pair.corrupted_metric[po.metric],
               patch_source_ablation(a.source) ? (po.direction == PATCH_NOISE ? "ablating the clean run"
                                                                               : "ablating the corrupted run")
               : po.direction == PATCH_DENOISE ? "denoising" : "noising",
               po.engine == PATCH_ENGINE_FAST ? "fast" : "naive", ab_text);
        /* columns: the corrupted tokens, as always; an ablated run's own */
        const int32_t *labels = patch_source_ablation(a.source) && po.direction == PATCH_NOISE ? pair.clean.tokens
                                                                                             : pair.corrupted.tokens;
        for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
            if (!on[c])
                continue;
            if (exact)
                print_patch_table(&pair, tok, (patch_component)c, &m.cfg, values[c], po.metric, labels);
            if (atp) {
                printf("\n(attribution patching estimate, %s)", what);
                print_patch_table(&pair, tok, (patch_component)c, &m.cfg, atp_vals[c], po.metric, labels);
            }
            if (exact && atp)
                print_atp_stats(&pair, (patch_component)c, &m.cfg, po.metric, po.direction, values[c], atp_vals[c],
                                what);
            if (verify)
                print_verified(&pair, (patch_component)c, &m.cfg, po.metric, atp_vals[c], ver_vals[c],
                               a.verify_top_k);
        }
        for (size_t k = 1; k < M; k++) {
            printf("\n%s: clean %.4f, corrupted %.4f\n", patch_metric_name(ms[k]), pair.clean_metric[ms[k]],
                   pair.corrupted_metric[ms[k]]);
            for (int c = 0; c < PATCH_COMPONENT_COUNT; c++)
                if (on[c])
                    print_patch_table(&pair, tok, (patch_component)c, &m.cfg, mvals[k][c], ms[k], labels);
        }
    }
out:
    if (st) {
        ncout_abort(&f);
        rc = cli_fail();
    }
    for (int c = 0; c < PATCH_COMPONENT_COUNT; c++) {
        free(values[c]), free(atp_vals[c]), free(ver_vals[c]);
        for (size_t k = 1; k < PATCH_METRIC_COUNT; k++)
            free(mvals[k][c]);
    }
    patch_pair_free(&pair);
    forward_cache_free(&ab.cache);
    pair_ids_free(&ids);
    tokenizer_free(tok);
    model_free(&m);
    return rc;
}



/* ---- bench --------------------------------------------------------------- */

static const char *bench_help =
    "usage: patchsweep bench --model DIR [--clean TEXT --corrupted TEXT --answer TOK --wrong TOK |\n"
    "                        --clean-ids IDS --corrupted-ids IDS --answer-id ID --wrong-id ID]\n"
    "                        [--components LIST] [--metric M] [--reps N] [--fast-only] [--json]\n"
    "                        [--save FILE.json] [--compute f32|bf16]\n"
    "  Times the naive and the fast patching engine side by side in this process\n"
    "  on one prompt pair (default: the worksheet's IOI pair), beside the sgemm\n"
    "  peak measured in the same run (a sample before each fast run).  Fast:\n"
    "  median of N runs (default 5), peak: median of its samples; naive: one run.  Useful GFLOP/s = the FLOPs the fast engine's plan needs\n"
    "  (recomputed rows and blocks of the cells that change anything) / time.\n"
    "  --fast-only       skip the naive engine (long prompts: it costs layers x T forwards)\n"
    "  --save FILE.json  also write the JSON report there (with provenance)\n"
    CLI_COMPUTE_HELP;

static ps_status write_json(FILE *out, void *user)
{
    if (json_dumpf(user, out, JSON_INDENT(2)) != 0 || fputc('\n', out) == EOF)
        return err_set(PS_ERR_IO, "cannot write the JSON report");
    return PS_OK;
}

int cmd_bench(int argc, char **argv)
{
    patch_args a;
    int rc = parse_patch_args("bench", bench_help, argc, argv, &a, false);
    if (rc != CLI_CONTINUE)
        return rc;
    if (!a.clean_ids) {
        if (!a.clean)
            a.clean = "After John and Mary went to the store, Mary gave a bottle of milk to";
        if (!a.corrupted)
            a.corrupted = "After John and Mary went to the store, John gave a bottle of milk to";
        if (!a.answer)
            a.answer = " John";
        if (!a.wrong)
            a.wrong = " Mary";
    }
    if (!a.components_given)
        patch_components_parse("resid_pre,attn_out,mlp_out,z_all_pos", a.on);
    if (a.graddrop && !patch_method_estimates(a.method))
        return cli_usage("patch", "--graddrop needs an attribution method (--method atp, atp*, atp+exact, "
                                  "atp*+exact, atp+verify or atp*+verify)");
    bool *on = a.on;
    patch_opts po = a.po;
    const size_t reps = a.reps;
    model m;
    tokenizer *tok;
    pair_ids ids;
    if ((rc = load_patch_model("bench", &a, &m, &tok, &ids)))
        return rc;
    patch_pair pair = {0};
    ps_status st = patch_components_check(on, &m.cfg);
    if (st == PS_OK)
        st = prepare_pair(&m, tok, &a, &ids, &pair);
    if (st)
        goto out;
    const size_t na = pair.T;
    const size_t d = m.cfg.n_embd;
    /* The sgemm rate is sampled beside every fast repetition (below); the
     * report's peak is the median of the components' medians. */
    double all_peaks[PATCH_COMPONENT_COUNT];
    size_t n_peaks = 0;
    json_t *rows = json_array();
    if (!a.common.json) {
        printf("BLAS: %s; sgemm peak sampled beside each fast run (1024 x %zu x %zu); patchsweep gemm kernel %s\n",
               prov_blas(), d, 4 * d, gemm_isa_name(gemm_isa_get()));
        printf("model: %zu layers, d_model %zu, %zu heads, vocab %zu; prompt pair of %zu tokens; metric %s\n",
               m.cfg.n_layer, d, m.cfg.n_head, m.cfg.vocab_size, na, patch_metric_name(po.metric));
        printf("%-16s %6s %9s %9s %7s %10s %10s %9s %9s %7s %7s\n", "component", "cells", "naive_s", "fast_s", "ratio",
               "naive_c/s", "fast_c/s", "useful_GF", "GFLOP/s", "peak", "%peak");
    }
    for (int c = 0; c < PATCH_COMPONENT_COUNT && st == PS_OK; c++) {
        if (!on[c])
            continue;
        patch_cell *cells;
        size_t n;
        if ((st = patch_grid_cells((patch_component)c, &m.cfg, 0, na, &cells, &n)))
            break;
        double *v = malloc(n * sizeof *v), *times = malloc(reps * sizeof *times), *peaks = malloc(reps * sizeof *peaks);
        double useful = 0.0;
        if (!v || !times || !peaks)
            st = err_set(PS_ERR_NOMEM, "out of memory");
        for (size_t i = 0; i < n; i++)
            useful += bench_cell_flops(&m, &pair, &cells[i], &po);
        double t0 = clock_now(), naive_s = NAN;
        if (st == PS_OK && !a.fast_only) {
            po.engine = PATCH_ENGINE_NAIVE;
            st = patch_eval(&m, &pair, 1, cells, n, &po, v);
            naive_s = clock_now() - t0;
        }
        /* Each repetition of the fast engine right after an sgemm rate
         * sample (median of 3 calls): on a shared machine the rate moves by
         * a factor of 2 within minutes, so the percentage compares the two
         * under the same conditions; medians of both over the repetitions. */
        po.engine = PATCH_ENGINE_FAST;
        for (size_t r = 0; r < reps && st == PS_OK; r++) {
            peaks[r] = bench_sgemm_gflops(1024, d, 4 * d, 3);
            t0 = clock_now();
            st = patch_eval(&m, &pair, 1, cells, n, &po, v);
            times[r] = clock_now() - t0;
        }
        if (st == PS_OK) {
            const double fast_s = bench_median(times, reps), gf = useful / fast_s / 1e9;
            const double pk = bench_median(peaks, reps);
            all_peaks[n_peaks++] = pk;
            const char *cn = patch_component_name((patch_component)c);
            /* naive_seconds and ratio are null with --fast-only */
            json_t *row = json_pack("{s:s,s:i,s:f,s:f,s:f,s:f,s:f}", "component", cn, "cells", (int)n,
                                    "fast_seconds", fast_s, "useful_gflop", useful / 1e9, "useful_gflops", gf,
                                    "sgemm_peak_gflops", pk, "percent_of_peak", 100.0 * gf / pk);
            json_object_set_new(row, "naive_seconds", a.fast_only ? json_null() : json_real(naive_s));
            json_object_set_new(row, "ratio", a.fast_only ? json_null() : json_real(naive_s / fast_s));
            json_array_append_new(rows, row);
            if (!a.common.json)
                printf("%-16s %6zu %9.3f %9.4f %6.1fx %10.1f %10.1f %9.2f %9.1f %7.1f %6.1f%%\n", cn, n, naive_s,
                       fast_s, naive_s / fast_s, (double)n / naive_s, (double)n / fast_s, useful / 1e9, gf, pk,
                       100.0 * gf / pk);
        }
        free(v);
        free(times);
        free(peaks);
        free(cells);
    }
    if (st == PS_OK) {
        if (model_hash(&m) != PS_OK) {
            st = PS_ERR_IO;
            json_decref(rows);
            goto out;
        }
        /* "blas": cli_blas_json() (core, threads, why, self-check) plus the peak */
        json_t *blas = cli_blas_json();
        json_object_set_new(blas, "sgemm_peak_gflops", json_real(bench_median(all_peaks, n_peaks)));
        json_object_set_new(blas, "gemm_kernel", json_string(gemm_isa_name(gemm_isa_get())));
        json_t *report = json_pack("{s:s,s:s,s:s,s:s,s:o,s:{s:i,s:i,s:i,s:i},s:i,s:s,s:o}",
                                   "patchsweep_version", prov_version(), "command_line", prov_command_line(),
                                   "model", m.dir, "model_sha256", m.sha256, "blas", blas, "model_shape",
                                   "n_layer", (int)m.cfg.n_layer, "n_embd", (int)d, "n_head", (int)m.cfg.n_head,
                                   "vocab_size", (int)m.cfg.vocab_size, "tokens", (int)na, "metric",
                                   patch_metric_name(po.metric), "components", rows);
        /* --compute: the blocks' arithmetic, and its kernel for bf16 */
        json_object_set_new(report, "compute", json_string(model_compute_name(m.compute)));
        if (m.compute == MODEL_COMPUTE_BF16)
            json_object_set_new(report, "compute_kernel", json_string(gemm_bf16_isa_name(gemm_bf16_isa_get())));
        if (a.save && (st = cli_write_atomic(a.save, write_json, report)) == PS_OK)
            fprintf(stderr, "wrote %s\n", a.save);
        if (st == PS_OK && a.common.json)
            cli_print_json(json_incref(report));
        json_decref(report);
    } else {
        json_decref(rows);
    }
out:
    if (st)
        rc = cli_fail();
    patch_pair_free(&pair);
    pair_ids_free(&ids);
    tokenizer_free(tok);
    model_free(&m);
    return rc;
}

