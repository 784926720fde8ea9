#include "cmd_plot.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "plotfig.h"

static const char *plot_help =
    "usage: patchsweep plot IN.nc -o OUT.svg [--var NAME[,NAME...]|all]\n"
    "                       [--prompt N | --mean [--by-length | --length N] | --by-role]\n"
    "                       [--tokens clean|corrupted] [--title T] [--zmax Z] [--caption F.html]\n"
    "                       [--atp | --scatter]\n"
    "  A self-contained SVG 1.1 figure of a result file; open it in a browser.\n"
    "\n"
    "  Patching results (patch, sweep): one heatmap per variable, on the worksheet's\n"
    "  diverging RdBu scale centred at 0 (red < 0 < blue, symmetric range [-Z, Z], one\n"
    "  range for the whole figure), a colour bar per panel; hover a cell for its exact\n"
    "  value; hatched grey cells have no value (NaN or _FillValue).\n"
    "    C(prompt, layer, position)        layer x position; x labels token_i (the seed's)\n"
    "    C(prompt, layer, head)            layer x head\n"
    "    C(prompt, layer, position, head)  one layer x position panel per head\n"
    "  Lens files (global attribute analysis = \"lens\"): probability and reciprocal rank\n"
    "  of the answer per layer, one line per prompt.\n"
    "\n"
    "  --var LIST     variables to plot, comma-separated, or 'all' (every *_normalized\n"
    "                 variable; lens: every (prompt, layer) variable).  Default:\n"
    "                 resid_pre_normalized, else the first *_normalized variable;\n"
    "                 lens: prob and reciprocal_rank\n"
    "  --prompt N     only prompt N (0-based).  Default: prompt 0 (results), every\n"
    "                 prompt (lens)\n"
    "  --mean         average over the prompts whose `done` is 1 (NaN cells skipped;\n"
    "                 hover shows how many values went in, their min and max).\n"
    "                 Position-wise means need prompts of one length and are refused\n"
    "                 otherwise; head components and lens curves average every prompt;\n"
    "                 lens means are drawn with a min-max band\n"
    "  --by-length    with --mean: one mean (panel) per prompt length\n"
    "  --length N     with --mean: only the prompts of N tokens\n"
    "  --by-role      role-aligned means of a sweep whose dataset names roles: per\n"
    "                 position grid V, V_by_role (layer x role: each prompt read at its\n"
    "                 roles' tokens, averaged over done prompts of any length or\n"
    "                 template; hover gives the count) and its spread V_by_role_std\n"
    "  --tokens WHICH x labels from clean_token (default, as the seed) or corrupted_token\n"
    "  --title T      figure title\n"
    "  --zmax Z       colour range [-Z, Z] (default: the largest |value| shown)\n"
    "  --atp          attribution patching (patch --method atp+exact, sweeps with\n"
    "                 method = atp...): one component C (--var C; default resid_pre,\n"
    "                 else the first with an estimate), per row three panels: exact\n"
    "                 C_normalized and the estimate C_atp_normalized on one colour scale,\n"
    "                 and the error C_atp_error (estimate - exact, raw metric) on its\n"
    "                 own; the exact top-10 cells the estimate's top 10 misses are\n"
    "                 outlined; the caption gives the rank correlation.  A file with\n"
    "                 the estimate only (method atp) gets the estimate alone, titled\n"
    "                 as an estimate\n"
    "  --scatter      one component C: the estimate (y) against the exact value (x),\n"
    "                 a point per cell, the line y = x, the 5 largest |errors| labelled.\n"
    "                 Both take --prompt, --mean (--by-length, --length) and --by-role\n"
    "                 (the role means; the error is their difference, normalized)\n"
    "  --caption F    also write the figure's caption to F as an HTML <figcaption>: what\n"
    "                 was patched, the metric and direction, the prompts and what to look\n"
    "                 for per component kind, from the file's attributes (the SVG carries\n"
    "                 the same text in its <desc>)\n"
    "  The file records patchsweep's version, this command line, the source file and\n"
    "  its model_sha256 in <metadata>.\n";

#define CMD "plot"

enum { OPT_VAR = CLI_OPT_FIRST_FREE, OPT_PROMPT, OPT_MEAN, OPT_BY_LENGTH, OPT_LENGTH, OPT_TOKENS, OPT_TITLE, OPT_ZMAX,
       OPT_BY_ROLE, OPT_CAPTION, OPT_ATP, OPT_SCATTER };

/* The options: the figure's (plotfig.h) and the output. */
typedef struct {
    plotfig_opts o;
    const char *output;
    const char *caption; /* --caption: the HTML caption's file, or NULL */
    const plotfig *fig; /* built, to write */
} plot_args;

/* ---- the command ------------------------------------------------------------------------ */

static int parse_args(int argc, char **argv, plot_args *a)
{
    static const struct option opts[] = {{"output", required_argument, 0, 'o'},
                                         {"var", required_argument, 0, OPT_VAR},
                                         {"prompt", required_argument, 0, OPT_PROMPT},
                                         {"mean", no_argument, 0, OPT_MEAN},
                                         {"by-length", no_argument, 0, OPT_BY_LENGTH},
                                         {"by-role", no_argument, 0, OPT_BY_ROLE},
                                         {"length", required_argument, 0, OPT_LENGTH},
                                         {"tokens", required_argument, 0, OPT_TOKENS},
                                         {"title", required_argument, 0, OPT_TITLE},
                                         {"zmax", required_argument, 0, OPT_ZMAX},
                                         {"caption", required_argument, 0, OPT_CAPTION},
                                         {"atp", no_argument, 0, OPT_ATP},
                                         {"scatter", no_argument, 0, OPT_SCATTER},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    memset(a, 0, sizeof *a);
    int ch;
    while ((ch = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
        switch (ch) {
        case 'o': a->output = optarg; break;
        case OPT_VAR:
            if (!*optarg)
                return cli_usage(CMD, "--var needs a variable name");
            a->o.vars = optarg;
            break;
        case OPT_PROMPT:
            if (!cli_parse_size(optarg, 0, SIZE_MAX, &a->o.sel.prompt))
                return cli_usage(CMD, "--prompt takes a prompt index (0, 1, ...), not '%s'", optarg);
            a->o.sel.has_prompt = true;
            break;
        case OPT_MEAN: a->o.sel.mean = true; break;
        case OPT_BY_LENGTH: a->o.sel.by_length = true; break;
        case OPT_BY_ROLE: a->o.sel.by_role = true; break;
        case OPT_LENGTH:
            if (!cli_parse_size(optarg, 1, SIZE_MAX, &a->o.sel.length))
                return cli_usage(CMD, "--length takes a number of tokens >= 1, not '%s'", optarg);
            a->o.sel.has_length = true;
            break;
        case OPT_TOKENS:
            if (strcmp(optarg, "clean") && strcmp(optarg, "corrupted"))
                return cli_usage(CMD, "--tokens takes clean or corrupted, not '%s'", optarg);
            a->o.tokens = optarg;
            break;
        case OPT_TITLE: a->o.title = optarg; break;
        case OPT_ATP:
        case OPT_SCATTER: {
            plotfig_kind k = ch == OPT_ATP ? PLOTFIG_ATP : PLOTFIG_SCATTER;
            if (a->o.kind != PLOTFIG_GRIDS && a->o.kind != k)
                return cli_usage(CMD, "--atp and --scatter exclude each other");
            a->o.kind = k;
            break;
        }
        case OPT_CAPTION:
            if (!*optarg)
                return cli_usage(CMD, "--caption needs a file name");
            a->caption = optarg;
            break;
        case OPT_ZMAX: {
            char *end;
            a->o.zmax = strtod(optarg, &end);
            if (end == optarg || *end || !(a->o.zmax > 0) || !isfinite(a->o.zmax))
                return cli_usage(CMD, "--zmax takes a positive number, not '%s'", optarg);
            a->o.has_zmax = true;
            break;
        }
        case 'h': fputs(plot_help, stdout); return 0;
        default: return cli_usage(CMD, "unknown option or missing value: '%s'", argv[optind - 1]);
        }
    }
    if (optind == argc)
        return cli_usage(CMD, "an input file IN.nc is required");
    if (optind != argc - 1)
        return cli_usage(CMD, "exactly one input file, not also '%s'", argv[optind + 1]);
    a->o.input = argv[optind];
    if (!a->output)
        return cli_usage(CMD, "-o OUT.svg is required");
    if (a->o.sel.has_prompt && a->o.sel.mean)
        return cli_usage(CMD, "--prompt and --mean exclude each other");
    if ((a->o.sel.by_length || a->o.sel.has_length) && !a->o.sel.mean)
        return cli_usage(CMD, "--by-length and --length go with --mean");
    if (a->o.sel.by_role && (a->o.sel.has_prompt || a->o.sel.mean))
        return cli_usage(CMD, "--by-role is a mean already: not with --prompt, --mean, --by-length or --length");
    if (a->o.kind == PLOTFIG_SCATTER && a->o.has_zmax)
        return cli_usage(CMD, "--zmax sets a heatmap's colour range: not with --scatter");
    if (a->o.sel.by_length && a->o.sel.has_length)
        return cli_usage(CMD, "--by-length and --length exclude each other");
    return CLI_CONTINUE;
}

static void print_note(void *user, const char *msg)
{
    (void)user;
    fprintf(stderr, "plot: %s\n", msg);
}

static ps_status write_figure(FILE *out, void *user)
{
    const plot_args *a = user;
    return plotfig_write(out, a->output, a->fig);
}

static ps_status write_caption(FILE *out, void *user)
{
    const plot_args *a = user;
    fputs("<figcaption class=\"patchsweep-caption\">", out);
    plot_xml_escape(out, a->fig->fig.caption ? a->fig->fig.caption : "");
    fputs("</figcaption>\n", out);
    if (fflush(out) != 0 || ferror(out))
        return err_set(PS_ERR_IO, "%s: write failed", a->caption);
    return PS_OK;
}

int cmd_plot(int argc, char **argv)
{
    plot_args a;
    int rc = parse_args(argc, argv, &a);
    if (rc != CLI_CONTINUE)
        return rc;
    a.o.sel.note = print_note;
    plotfig fig;
    ps_status st = plotfig_build(&a.o, &fig);
    a.fig = &fig;
    if (st == PS_OK)
        st = cli_write_atomic(a.output, write_figure, &a);
    if (st == PS_OK && a.caption)
        st = cli_write_atomic(a.caption, write_caption, &a);
    size_t n_panels = fig.n_panels;
    plotfig_free(&fig);
    if (st != PS_OK)
        return cli_fail();
    fprintf(stderr, "wrote %s: %zu panel%s\n", a.output, n_panels, n_panels == 1 ? "" : "s");
    return 0;
}
