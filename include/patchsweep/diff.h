/*
 * diff: two patching results files compared variable by variable
 * (`patchsweep diff A.nc B.nc`): did a change of code, engine, BLAS kernel
 * or machine move the numbers, and where.
 *
 * Compared: every NC_FLOAT / NC_DOUBLE variable whose first dimension is
 * prompt (the grids C and C_normalized, clean/corrupted metrics, the extra
 * metrics' and attribution patching's variables; schema.h).  Shared cells:
 * prompts with the same prompt_index done in both files (done = 1; files
 * without done: every prompt), and within them the cells valid (not fill,
 * not NaN) in both; position grids over the positions both files have.
 * Per variable: the number of shared cells, max and mean |B - A| over them,
 * and the cells valid in one file only; per cell (of the per-prompt grid)
 * the mean of B - A over the shared prompts, for heatmaps.
 *
 * Files of different grids are refused (PS_ERR_INVALID, one line naming
 * both files and what differs): a compared variable in one file only, a
 * variable's dimensions, the layer / head / kv_head lengths, or the shape
 * fields of model_config (config.json: layers, heads, widths, vocabulary,
 * model type).  Variables are read whole (ncin's NCIN_MAX_ELEMENTS each).
 */
#ifndef PS_DIFF_H
#define PS_DIFF_H

#include <stddef.h>
#include <stdio.h>

#include "err.h"
#include "ncin.h"

typedef struct {
    char name[NCIN_MAX_NAME + 1];
    size_t n_cells;          /* values compared: shared prompts x cells valid in both */
    size_t only_a, only_b;   /* cells of shared prompts valid in A only, in B only */
    double max_abs, mean_abs; /* over the compared values; NaN when there are none */
    /* The per-prompt grid (the variable's dimensions after prompt, over the
     * shared extent) as rows x cols: rows the first of them (layer; 1 for a
     * per-prompt scalar, whose cols are then the shared prompts), cols the
     * rest flattened; mean_diff[rows * cols] the mean of B - A over the
     * shared prompts (NaN where no prompt has both). */
    size_t rows, cols;
    size_t col_inner;        /* the axes after the first column axis (z: head; pattern_dest_src: src_position x head): their cells, else 1 */
    char row_dim[NCIN_MAX_NAME + 1], col_dims[2 * NCIN_MAX_NAME + 8];
    float *mean_diff;
} diff_var;

typedef struct {
    size_t prompts_a, prompts_b, prompts_shared;
    diff_var *vars;
    size_t n_vars;
} diff_result;

/* Compare the files at a and b into *out (diff_result_free in any case). */
ps_status diff_files(const char *a, const char *b, diff_result *out);
void diff_result_free(diff_result *r);

/* Variable i's heatmap of mean B - A (plot.h's RdBu scale centred at 0)
 * as SVG to out; out_name names it in messages, a and b in the figure. */
ps_status diff_write_svg(FILE *out, const char *out_name, const diff_result *r, size_t i, const char *a,
                         const char *b);

#endif
