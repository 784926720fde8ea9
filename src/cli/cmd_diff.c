#include "cmd_diff.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "diff.h"

static const char *diff_help =
    "usage: patchsweep diff A.nc B.nc [--json] [--svg DIR] [--tolerance X]\n"
    "  Compare two patching results files: for every float variable with a prompt\n"
    "  dimension (grids, normalized grids, metrics), the max and mean |B - A| over\n"
    "  the shared cells: prompts of the same prompt_index done in both, cells valid\n"
    "  (not fill, not NaN) in both, positions both files have.  Files of different\n"
    "  grids (components, layers, heads, model config) are refused.\n"
    "  --json         the table as JSON\n"
    "  --svg DIR      one heatmap per variable, DIR/NAME.svg: the mean of B - A per\n"
    "                 cell over the shared prompts (per prompt for per-prompt values)\n"
    "  --tolerance X  exit 1 when a variable's max |B - A| exceeds X (else 0)\n";

enum { OPT_SVG = CLI_OPT_FIRST_FREE, OPT_TOLERANCE };

typedef struct {
    const diff_result *r;
    size_t i;
    const char *a, *b, *path;
} svg_job;

static ps_status write_svg(FILE *out, void *user)
{
    const svg_job *j = user;
    return diff_write_svg(out, j->path, j->r, j->i, j->a, j->b);
}

static json_t *num(double v) { return isfinite(v) ? json_real(v) : json_null(); }

int cmd_diff(int argc, char **argv)
{
    static const struct option opts[] = {{"json", no_argument, 0, CLI_OPT_JSON},
                                         {"svg", required_argument, 0, OPT_SVG},
                                         {"tolerance", required_argument, 0, OPT_TOLERANCE},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    bool json = false, has_tol = false;
    const char *svg = NULL;
    double tol = 0.0;
    int ch;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case CLI_OPT_JSON: json = true; break;
        case OPT_SVG: svg = optarg; break;
        case OPT_TOLERANCE: {
            char *end;
            errno = 0;
            tol = strtod(optarg, &end);
            if (errno || end == optarg || *end || !isfinite(tol) || tol < 0)
                return cli_usage("diff", "--tolerance takes a number >= 0, not '%s'", optarg);
            has_tol = true;
            break;
        }
        case 'h': fputs(diff_help, stdout); return 0;
        default: return cli_usage("diff", "unknown option or missing value: '%s'", argv[optind - 1]);
        }
    }
    if (argc - optind != 2)
        return cli_usage("diff", "two files are needed, A.nc and B.nc");
    const char *a = argv[optind], *b = argv[optind + 1];
    if (svg) {
        struct stat sb;
        if (stat(svg, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
            err_set(PS_ERR_IO, "%s: --svg needs an existing directory", svg);
            return cli_fail();
        }
    }
    diff_result r;
    ps_status st = diff_files(a, b, &r);
    for (size_t i = 0; st == PS_OK && svg && i < r.n_vars; i++) {
        char path[4200];
        snprintf(path, sizeof path, "%s/%s.svg", svg, r.vars[i].name);
        svg_job j = {&r, i, a, b, path};
        st = cli_write_atomic(path, write_svg, &j);
    }
    if (st) {
        diff_result_free(&r);
        return cli_fail();
    }
    const diff_var *worst = NULL;
    for (size_t i = 0; i < r.n_vars; i++)
        if (r.vars[i].n_cells && (!worst || r.vars[i].max_abs > worst->max_abs))
            worst = &r.vars[i];
    if (json) {
        json_t *vars = json_array();
        for (size_t i = 0; i < r.n_vars; i++) {
            const diff_var *v = &r.vars[i];
            json_array_append_new(vars, json_pack("{s:s,s:I,s:o,s:o,s:I,s:I}", "name", v->name, "cells",
                                                  (json_int_t)v->n_cells, "max_abs", num(v->max_abs), "mean_abs",
                                                  num(v->mean_abs), "only_a", (json_int_t)v->only_a, "only_b",
                                                  (json_int_t)v->only_b));
        }
        cli_print_json(json_pack("{s:s,s:s,s:I,s:I,s:I,s:o,s:o}", "a", a, "b", b, "prompts_a",
                                 (json_int_t)r.prompts_a, "prompts_b", (json_int_t)r.prompts_b, "prompts_shared",
                                 (json_int_t)r.prompts_shared, "max_abs", num(worst ? worst->max_abs : NAN),
                                 "variables", vars));
    } else {
        printf("A %s (%zu prompts), B %s (%zu prompts): %zu shared\n", a, r.prompts_a, b, r.prompts_b,
               r.prompts_shared);
        printf("%-36s %10s %12s %12s %8s %8s\n", "variable", "cells", "max|B-A|", "mean|B-A|", "A only", "B only");
        for (size_t i = 0; i < r.n_vars; i++) {
            const diff_var *v = &r.vars[i];
            printf("%-36s %10zu %12.4g %12.4g %8zu %8zu\n", v->name, v->n_cells, v->max_abs, v->mean_abs, v->only_a,
                   v->only_b);
        }
        if (svg)
            printf("heatmaps: %s/NAME.svg (%zu)\n", svg, r.n_vars);
    }
    int rc = 0;
    if (has_tol && worst && worst->max_abs > tol) {
        fflush(stdout);
        fprintf(stderr, "patchsweep: diff: %s: max |B - A| %.6g exceeds the tolerance %.6g\n", worst->name,
                worst->max_abs, tol);
        rc = CLI_EXIT_FAIL;
    }
    diff_result_free(&r);
    return rc;
}
