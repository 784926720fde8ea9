#include "cmd_merge.h"

#include <stdio.h>

#include "cli.h"
#include "merge.h"

static const char *merge_help =
    "usage: patchsweep merge PART.nc [PART.nc...] -o ALL.nc\n"
    "  Stitch the files of a sliced sweep (sweep --slice K/N, e.g. one per Slurm\n"
    "  array task) into the file the unsliced sweep writes: prompts ordered by\n"
    "  dataset index (the prompt coordinate), the position dimension padded to\n"
    "  the longest part.\n"
    "  The parts (any order) must be complete and come from one job, model and\n"
    "  dataset (job_sha256, model_sha256, dataset_sha256, metric, direction,\n"
    "  engine, variables and dimensions equal), and be the slices 1..N of one N:\n"
    "  overlapping and missing prompt indices (a missing part) are errors.\n"
    "  The result has slice = \"all\", complete = 1, merged_from (the parts,\n"
    "  one per line), this command's version and command line; the parts'\n"
    "  differing attributes are kept as parts_NAME (one line per part).\n"
    "  -o, --output ALL.nc  the merged file (written as ALL.nc.partial, then renamed;\n"
    "                       replaced if it exists; may not be one of the parts)\n";

int cmd_merge(int argc, char **argv)
{
    static const struct option opts[] = {{"output", required_argument, 0, 'o'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *output = NULL;
    int ch;
    while ((ch = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
        switch (ch) {
        case 'o': output = optarg; break;
        case 'h': fputs(merge_help, stdout); return 0;
        default: return cli_usage("merge", "unknown option or missing value: '%s'", argv[optind - 1]);
        }
    }
    if (!output)
        return cli_usage("merge", "-o ALL.nc is required");
    if (optind >= argc)
        return cli_usage("merge", "at least one PART.nc is required");
    merge_result res;
    if (merge_files((const char *const *)argv + optind, (size_t)(argc - optind), output, &res) != PS_OK)
        return cli_fail();
    printf("%s: %zu prompts (%zu done, %zu skipped) from %zu parts, %zu positions, %zu variables\n", output,
           res.prompts, res.done, res.skipped, res.parts, res.positions, res.variables);
    return 0;
}
