/*
 * merge: the result files of a sliced sweep (`sweep --slice K/N`, one per
 * array task) stitched into the file the unsliced run writes.
 *
 * Checks, each failure one line naming the files (err.h):
 *   - every part is a readable NetCDF results file with the dimension
 *     `prompt` (unlimited, at most DATASET_MAX_ITEMS long), the variables
 *     prompt_index, done and skipped,
 *     and the global attributes complete = "true" and slice = "K/N";
 *   - the parts come from one job, model and dataset: job_sha256,
 *     model_sha256, dataset_sha256, metric, direction and engine are equal,
 *     and so are the variables (names, types, dimensions: the components)
 *     and every dimension's length except position;
 *   - every prompt of every part is done or skipped;
 *   - stitched by prompt_index (consecutive within a part): two parts
 *     holding one index is an overlap, an index no part holds a gap (a
 *     missing part is a gap, also the last one: the slices must be 1..N of
 *     one N), and each part holds exactly the prompts of its slice.
 *
 * The result: prompt i holds prompt_index i; the position dimension is the
 * largest part's, shorter parts padded with each variable's fill value
 * (string cells written as "", since HDF5 cannot read a string cell never
 * written); variables, their attributes, fill values and chunking as in the
 * parts, values copied bit for bit, so the file equals the unsliced run's in
 * every variable.  Global attributes: the parts' (equal in every part: as
 * is; differing: `parts_NAME`, the parts' values one per line in slice
 * order), then slice = "all", complete = "true", prompts_done (the sum),
 * merged_from (the part paths as given, one per line, in slice order), and
 * merge's own patchsweep_version, command_line and created (the parts' are
 * kept as parts_patchsweep_version, parts_command_line, parts_created).
 *
 * Written through ncout_create/ncout_commit (OUT.partial + rename): a failed
 * merge leaves no file under the final name.  The output may not be one of
 * the parts.
 */
#ifndef PS_MERGE_H
#define PS_MERGE_H

#include <stddef.h>

#include "err.h"

#define MERGE_MAX_PARTS ((size_t)100000)

typedef struct {
    size_t parts;      /* files merged */
    size_t prompts;    /* prompts in the result (done + skipped) */
    size_t done, skipped;
    size_t positions;  /* length of the position dimension (0 when there is none) */
    size_t variables;
} merge_result;

/* Merge parts[0..n_parts) (any order) into `output`. */
ps_status merge_files(const char *const *parts, size_t n_parts, const char *output, merge_result *res);

#endif
