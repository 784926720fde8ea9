/*
 * plotfig: the figure of a result file (`patchsweep plot`), built from what
 * results_agg reads and averages, as panels for plot.h's SVG writer.
 *
 *   Patching results: one heatmap per grid variable (C or C_normalized) and
 *   group of prompts (one prompt, or a mean per length); a (prompt, layer,
 *   position, head) variable gives one panel per head.  Column labels are
 *   the first prompt's tokens ("*": differs in another prompt of the mean).
 *   Lens files (analysis = "lens"): one line chart per (prompt, layer)
 *   variable, a line per prompt or the mean with a min-max band.
 *   Attribution patching (plotfig_kind): one component's exact, estimate
 *   and error heatmaps side by side, or its estimate-vs-exact scatter.
 *
 * Library code: it never prints (remarks go to opts.sel.note) and does not
 * write the file; the caller writes plotfig_write's SVG where it wants.
 */
#ifndef PS_PLOTFIG_H
#define PS_PLOTFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "err.h"
#include "plot.h"
#include "results_agg.h"

/* The kind of figure of a patching result file. */
typedef enum {
    PLOTFIG_GRIDS,   /* heatmaps of the --var grids (default) */
    /* one component C of an attribution-patching file: per panel row
     * C_normalized (exact) | C_atp_normalized (estimate) on one scale, and
     * C_atp_error (estimate - exact, raw metric units) on its own scale, the
     * exact top-k cells the estimate misses outlined; a file without C
     * (method atp): the estimate alone, labelled as one */
    PLOTFIG_ATP,
    /* one component C: C_atp_normalized (y) against C_normalized (x), one
     * point per cell, the line y = x, the largest |errors| labelled */
    PLOTFIG_SCATTER,
} plotfig_kind;

typedef struct {
    plotfig_kind kind;
    const char *input;   /* the result file, also named in the figure */
    const char *vars;    /* --var: comma-separated names, "all", or NULL (default) */
    const char *title;   /* NULL: "Activation patching (...)" / "Logit lens: ..." */
    const char *tokens;  /* "clean" (NULL) or "corrupted": the position labels */
    bool has_zmax;
    double zmax;
    agg_select sel;      /* prompts: one, or means */
} plotfig_opts;

/* Provenance recorded in the SVG's <metadata>. */
typedef struct {
    const char *pairs[8][2];
    size_t n;
} plotfig_provenance;

typedef struct {
    agg_pool pool;          /* everything below lives here */
    plotfig_provenance prov;
    plot_figure fig;
    const plot_heatmap *panels; /* results: n_panels heatmaps */
    const plot_lines *lines;    /* lens: n_panels line charts */
    const plot_scatter *scatter; /* PLOTFIG_SCATTER: one scatter plot (n_panels 1) */
    size_t n_panels;
    double zmax;
    /* PLOTFIG_ATP: panels in rows of panel_cols, panel k on [-panel_zmax[k], +panel_zmax[k]] */
    size_t panel_cols;
    const double *panel_zmax;
} plotfig;

/* Read o->input and build its figure into *pf (plotfig_free in any case). */
ps_status plotfig_build(const plotfig_opts *o, plotfig *pf);

/* Write the figure as SVG to out; `path` names the output in messages. */
ps_status plotfig_write(FILE *out, const char *path, const plotfig *pf);

void plotfig_free(plotfig *pf);

#endif
