/*
 * plot: self-contained SVG 1.1 figures from in-memory arrays, written to a
 * FILE* (a file, or a buffer through open_memstream): heatmaps with axis
 * labels, a colour bar and a hover <title> per cell, and line plots with
 * optional bands.  No plotting library, no fonts or scripts: any browser
 * shows the file, and xml.etree / xmllint can read it back.
 *
 * Colour map (the seed's px.imshow(..., color_continuous_scale="RdBu",
 * color_continuous_midpoint=0)): plotly's "RdBu" is ColorBrewer's 11-class
 * RdBu, low values red, high values blue, 0 the near-white middle stop.  A
 * value v in a symmetric range [-zmax, +zmax] maps to
 *   t = (v + zmax) / (2 zmax), clamped to [0, 1]
 *   s = 10 t,  i = min(floor(s), 9),  f = s - i
 *   rgb = round(stop[i] + f (stop[i + 1] - stop[i]))  per channel
 * with stop[] = plot_rdbu_stops below.  The colour bar is an SVG
 * linearGradient over the same 11 stops, which SVG also interpolates
 * linearly per channel, so bar and cells agree.  NaN (no value, _FillValue)
 * has no colour on the scale: such cells are drawn with a grey hatch
 * (fill="url(#ps-nan)", background plot_nan_rgb).
 *
 * Text: every string is XML-escaped on output (& < > " '), and characters
 * XML 1.0 cannot carry (C0 controls other than tab and newline, U+FFFE,
 * U+FFFF) become U+FFFD.  Input strings must be valid UTF-8 (ncin returns
 * them so).
 *
 * Errors: a failed write is PS_ERR_IO naming `out_name`.
 */
#ifndef PS_PLOT_H
#define PS_PLOT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "err.h"

typedef struct {
    uint8_t r, g, b;
} plot_rgb;

#define PLOT_RDBU_STOPS 11

/* ColorBrewer RdBu, 11 classes, from low (dark red #67001f) through the
 * middle (#f7f7f7) to high (dark blue #053061). */
extern const plot_rgb plot_rdbu_stops[PLOT_RDBU_STOPS];

/* Background grey of the NaN hatch. */
extern const plot_rgb plot_nan_rgb;

/* Colour of v on [-zmax, +zmax] (zmax > 0); NaN -> plot_nan_rgb; values
 * beyond the range (and +-inf) take the end colours. */
plot_rgb plot_rdbu(double v, double zmax);

/* "#rrggbb" into buf[8]. */
void plot_rgb_hex(plot_rgb c, char buf[8]);

/* XML-escape s onto out (see "Text" above). */
void plot_xml_escape(FILE *out, const char *s);

/* The seed's tick label "{token}_{index}" with control characters made
 * visible (newline as \n, tab as \t, carriage return as \r, other C0
 * controls as \xNN), since a label is one line; malloc'd (NULL on OOM). */
char *plot_token_label(const char *token, size_t index);

/* Figure-level text and provenance, shared by both kinds of figure. */
typedef struct {
    const char *title;         /* top line; NULL: none */
    const char *subtitle;      /* second line; NULL: none */
    /* What the figure shows and what to look for, a paragraph written as
     * the SVG's <desc> (plotfig builds it from the file's attributes); NULL: none */
    const char *caption;
    /* Provenance as <metadata><entry key="K">V</entry>...</metadata>
     * (namespace urn:patchsweep:provenance); keys and values are escaped. */
    const char *const (*meta)[2];
    size_t n_meta;
} plot_figure;

/* One heatmap panel: rows are y (drawn top to bottom, as px.imshow does),
 * columns x. */
typedef struct {
    const char *title;                  /* panel title; NULL: none */
    const char *subtitle;               /* line under it; NULL: none */
    const char *x_name, *y_name;        /* axis titles, e.g. "Position", "Layer" */
    size_t n_rows, n_cols;
    const char *const *row_labels;      /* n_rows display labels */
    const char *const *col_labels;      /* n_cols display labels */
    /* Optional [n_cols]: labels to show first (role positions) when there is
     * no room for all.  Labels are thinned so that none overlap at any
     * number of columns: the last column's and these first (one that would
     * overlap a label already kept is dropped), then every k-th column's,
     * k the smallest step at which the widest labels clear each other
     * (estimated width: 0.6 em a code point at 11 px; upright labels need
     * their half-widths plus 3 px between centres, labels rotated by -45
     * degrees a line (11 + 3 px) across the text).  The hover text of the
     * cells keeps every label. */
    const bool *col_keep;
    const float *values;                /* [n_rows * n_cols] row-major; NaN = no value */
    /* Hover text of a cell: "{hover_name} [{y_name} {row}, {x_name} {col}] = {value}"
     * with the value as %.9g (exact for float32) or "NaN (no value)". */
    const char *hover_name;
    /* Optional, for means: per cell the number of values averaged and
     * their min and max, appended as " (mean of N, min A, max B)". */
    const size_t *n_used;
    const float *lo, *hi;
    /* Optional [n_rows * n_cols]: cells drawn with a black outline (class
     * "marked"), e.g. the exact top cells an estimate misses; marked_name is
     * the outline's hover text. */
    const bool *marked;
    const char *marked_name;
    /* Target size of the plot area in px (0: 720 x 360); cells are 14 to 48
     * px wide and 14 to 40 px high whatever the target. */
    double plot_w, plot_h;
    /* No colour bar of its own: the panel shares the one drawn by the next
     * panel of its row (plot_write_heatmap_grid), on the same scale. */
    bool no_colorbar;
    /* Title of the colour bar (drawn above it); NULL: none. */
    const char *scale_name;
} plot_heatmap;

/* The symmetric range of a set of panels: max |v| over every finite value,
 * or 1 when there is none or all are 0. */
double plot_heatmap_zmax(const plot_heatmap *panels, size_t n);

/* Panels stacked top to bottom, all on the colour scale [-zmax, +zmax]
 * (zmax > 0, finite), each with its own colour bar and, when it has NaN
 * cells, a "no value" swatch. */
ps_status plot_write_heatmaps(FILE *out, const char *out_name, const plot_figure *fig, const plot_heatmap *panels,
                              size_t n, double zmax);

/* Panels in a grid of n_cols columns, row-major (panel k in row k / n_cols,
 * column k % n_cols; rows stacked top to bottom, columns aligned), panel k
 * on its own colour scale [-zmax[k], +zmax[k]] (each > 0, finite).  Panels
 * meant to be compared share one zmax, and all but the last of them set
 * no_colorbar. */
ps_status plot_write_heatmap_grid(FILE *out, const char *out_name, const plot_figure *fig, const plot_heatmap *panels,
                                  size_t n, size_t n_cols, const double *zmax);

/* A scatter plot of n points (x[i], y[i]) on one square range for both axes
 * with the line y = x: e.g. an estimate (y) against the exact value (x),
 * one point per cell.  Points with a NaN coordinate are left out.  The
 * n_labelled points farthest from the line (largest |y - x|) are drawn in
 * another colour (class "point outlier") and labelled with labels[i]; the
 * hover text of every point is "{labels[i]}: {x_name} = X, {y_name} = Y,
 * difference = D" (D = Y - X; %.9g). */
typedef struct {
    const char *title, *subtitle;       /* panel title lines; NULL: none */
    const char *x_name, *y_name;        /* axis titles */
    size_t n;
    const double *x, *y;                /* [n] */
    const char *const *labels;          /* [n] */
    size_t n_labelled;
} plot_scatter;

ps_status plot_write_scatter(FILE *out, const char *out_name, const plot_figure *fig, const plot_scatter *s);

/* One line of a line plot; NaN points leave a gap. */
typedef struct {
    const char *label;                  /* legend and hover */
    const double *y;                    /* [n_x] */
    const double *band_lo, *band_hi;    /* optional band drawn behind the line */
} plot_series;

typedef struct {
    const char *title, *subtitle;       /* NULL: none */
    const char *x_name, *y_name;
    size_t n_x;
    const char *const *x_labels;        /* n_x category labels */
    const plot_series *series;
    size_t n_series;
    /* y axis from 0 to the smallest "nice" number >= every value, at most
     * y_cap (e.g. 1 for probabilities; 0: no cap). */
    double y_cap;
} plot_lines;

/* Line plot panels stacked top to bottom. */
ps_status plot_write_lines(FILE *out, const char *out_name, const plot_figure *fig, const plot_lines *panels,
                           size_t n);

#endif
