#include "cmd_dataset.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "dataset.h"
#include "dataset_gen.h"
#include "evaluate.h"

/* ---- make-dataset -------------------------------------------------------- */

static const char *make_dataset_help =
    "usage: patchsweep make-dataset ioi|capitals --n N [--seed S] [--corruption s2|abc] [--ids]\n"
    "                               [--model DIR | --tokenizer DIR] [-o FILE.jsonl]\n"
    "  Deterministic prompt pairs as JSONL (clean, corrupted, answer, wrong, ...).\n"
    "  ioi       indirect-object identification (Wang et al. 2022), BABA and ABBA\n"
    "  capitals  few-shot 'Q: What is the capital of X?\\nA: Y' prompts\n"
    "  --corruption s2   (ioi) second subject replaced by the indirect object (default)\n"
    "  --corruption abc  (ioi) all three names replaced by fresh names\n"
    "  --ids     add clean_ids, corrupted_ids, answer_id, wrong_id (with <|endoftext|>)\n"
    "  Without -o the JSONL goes to stdout.\n";

enum { OPT_N = CLI_OPT_FIRST_FREE, OPT_SEED, OPT_CORRUPTION, OPT_IDS, OPT_DATASET };

static ps_status write_dataset(FILE *out, void *user)
{
    return dataset_write_jsonl(user, out, "output");
}

/* Add the token ids of every item (what training scripts consume). */
static ps_status add_ids(dataset *d, const tokenizer *tok)
{
    for (size_t i = 0; i < d->n; i++) {
        dataset_tokens tk;
        ps_status st = dataset_tokenize(d, i, tok, true, SIZE_MAX, &tk);
        if (st)
            return st;
        json_t *a = json_array(), *b = json_array();
        for (size_t t = 0; t < tk.n_tokens; t++) {
            json_array_append_new(a, json_integer(tk.clean_ids[t]));
            json_array_append_new(b, json_integer(tk.corrupted_ids[t]));
        }
        json_object_set_new(d->items[i].obj, "clean_ids", a);
        json_object_set_new(d->items[i].obj, "corrupted_ids", b);
        json_object_set_new(d->items[i].obj, "answer_id", json_integer(tk.answer_id));
        json_object_set_new(d->items[i].obj, "wrong_id", json_integer(tk.wrong_id));
        dataset_tokens_free(&tk);
    }
    return PS_OK;
}

int cmd_make_dataset(int argc, char **argv)
{
    static const struct option opts[] = {CLI_COMMON_OPTIONS,
                                         {"n", required_argument, 0, OPT_N},
                                         {"seed", required_argument, 0, OPT_SEED},
                                         {"corruption", required_argument, 0, OPT_CORRUPTION},
                                         {"ids", no_argument, 0, OPT_IDS},
                                         {"output", required_argument, 0, 'o'},
                                         {0, 0, 0, 0}};
    cli_common o = {.bos = true};
    size_t n = 0, seed = 0;
    const char *output = NULL;
    ioi_corruption corr = IOI_CORRUPT_S2;
    bool with_ids = false;
    int ch, rc;
    while ((ch = getopt_long(argc, argv, "m:o:h", opts, NULL)) != -1) {
        switch (ch) {
        case OPT_N:
            if (!cli_parse_size(optarg, 1, DATASET_MAX_ITEMS, &n))
                return cli_usage("make-dataset", "--n takes a whole number from 1 to %zu, not '%s'",
                                 DATASET_MAX_ITEMS, optarg);
            break;
        case OPT_SEED:
            if (!cli_parse_size(optarg, 0, SIZE_MAX, &seed))
                return cli_usage("make-dataset", "--seed takes a whole number, not '%s'", optarg);
            break;
        case OPT_CORRUPTION:
            if (strcmp(optarg, "s2") && strcmp(optarg, "abc"))
                return cli_usage("make-dataset", "unknown corruption '%s' (s2 or abc)", optarg);
            corr = strcmp(optarg, "abc") ? IOI_CORRUPT_S2 : IOI_CORRUPT_ABC;
            break;
        case OPT_IDS: with_ids = true; break;
        case 'o': output = optarg; break;
        default:
            if ((rc = cli_common_opt("make-dataset", make_dataset_help, ch, argv, &o)) != CLI_CONTINUE)
                return rc;
        }
    }
    if (optind != argc - 1)
        return cli_usage("make-dataset", "name one generator: ioi or capitals");
    const char *kind = argv[optind];
    if (strcmp(kind, "ioi") && strcmp(kind, "capitals"))
        return cli_usage("make-dataset", "unknown generator '%s' (ioi or capitals)", kind);
    if (n == 0)
        return cli_usage("make-dataset", "--n N (N >= 1) is required");
    tokenizer *tok = NULL;
    if (tokenizer_load_for_model(&tok, o.model_dir, o.tokenizer_dir) != PS_OK)
        return cli_fail();
    dataset d = {0};
    ps_status st = !strcmp(kind, "ioi") ? dataset_make_ioi(&d, tok, n, seed, corr) : dataset_make_capitals(&d, tok, n, seed);
    if (st == PS_OK && with_ids)
        st = add_ids(&d, tok);
    if (st == PS_OK)
        st = output ? cli_write_atomic(output, write_dataset, &d) : dataset_write_jsonl(&d, stdout, "<stdout>");
    if (st != PS_OK)
        rc = cli_fail();
    else {
        rc = 0;
        if (output)
            fprintf(stderr, "wrote %s: %zu %s prompt pairs (seed %zu)\n", output, d.n, kind, seed);
    }
    dataset_free(&d);
    tokenizer_free(tok);
    return rc;
}

/* ---- evaluate ------------------------------------------------------------ */

static const char *evaluate_help =
    "usage: patchsweep evaluate --model DIR --dataset FILE.jsonl [--no-bos] [--json]\n"
    "       [--compute f32|bf16]\n"
    "  How well the model does the task, unpatched: over every prompt pair,\n"
    "  accuracy (logit[answer] > logit[wrong] after the clean prompt), the mean\n"
    "  logit difference after the clean and after the corrupted prompt, and how\n"
    "  often the answer is the top-1 next token after the clean prompt.\n"
    CLI_COMPUTE_HELP;

int cmd_evaluate(int argc, char **argv)
{
    static const struct option opts[] = {CLI_COMMON_OPTIONS, CLI_COMPUTE_OPTION, {"dataset", required_argument, 0, OPT_DATASET}, {0, 0, 0, 0}};
    cli_common o = {.bos = true};
    const char *path = NULL;
    int ch, rc;
    while ((ch = getopt_long(argc, argv, "m:h", opts, NULL)) != -1) {
        if (ch == OPT_DATASET)
            path = optarg;
        else if ((rc = cli_common_opt("evaluate", evaluate_help, ch, argv, &o)) != CLI_CONTINUE)
            return rc;
    }
    if (optind != argc)
        return cli_usage("evaluate", "unexpected argument '%s'", argv[optind]);
    if (!path)
        return cli_usage("evaluate", "--dataset FILE.jsonl is required");
    model m;
    tokenizer *tok;
    if ((rc = cli_load_for_dataset("evaluate", &o, &m, &tok)))
        return rc;
    dataset d = {0};
    evaluate_result r;
    if (dataset_read_jsonl(&d, path) != PS_OK || evaluate_dataset(&m, tok, &d, o.bos, &r) != PS_OK)
        rc = cli_fail();
    else if (o.json)
        cli_print_json(json_pack("{s:s,s:i,s:f,s:f,s:f,s:f}", "dataset", path, "n", (int)r.n, "accuracy", r.accuracy,
                                 "mean_clean_logit_diff", r.mean_clean_logit_diff, "mean_corrupted_logit_diff",
                                 r.mean_corrupted_logit_diff, "answer_top1", r.answer_top1));
    else
        printf("%s: %zu prompt pairs\naccuracy (logit[answer] > logit[wrong])  %.4f\n"
               "mean clean logit diff                   %.4f\nmean corrupted logit diff               %.4f\n"
               "answer is top-1 after the clean prompt  %.4f\n",
               path, r.n, r.accuracy, r.mean_clean_logit_diff, r.mean_corrupted_logit_diff, r.answer_top1);
    dataset_free(&d);
    tokenizer_free(tok);
    model_free(&m);
    return rc;
}
