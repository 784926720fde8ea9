#include "plot.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "strutil.h"

const plot_rgb plot_rdbu_stops[PLOT_RDBU_STOPS] = {
    {103, 0, 31},   {178, 24, 43},  {214, 96, 77},  {244, 165, 130}, {253, 219, 199}, {247, 247, 247},
    {209, 229, 240}, {146, 197, 222}, {67, 147, 195}, {33, 102, 172},  {5, 48, 97},
};

const plot_rgb plot_nan_rgb = {217, 217, 217};

/* plotly's default qualitative palette, so lines look like the seed's figures. */
static const char *const line_colors[] = {"#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a",
                                          "#19d3f3", "#ff6692", "#b6e880", "#ff97ff", "#fecb52"};
#define N_LINE_COLORS (sizeof line_colors / sizeof line_colors[0])

#define FONT_FAMILY "Helvetica, Arial, sans-serif"
#define MARGIN 20.0
#define TICK_FS 11.0
#define AXIS_FS 13.0
#define COS45 0.70710678
/* Legends list at most this many lines; the rest are counted. */
#define MAX_LEGEND 12

plot_rgb plot_rdbu(double v, double zmax)
{
    if (isnan(v))
        return plot_nan_rgb;
    double t = (v + zmax) / (2.0 * zmax);
    t = t < 0.0 ? 0.0 : t > 1.0 ? 1.0 : t;
    double s = t * (PLOT_RDBU_STOPS - 1);
    size_t i = (size_t)s;
    if (i > PLOT_RDBU_STOPS - 2)
        i = PLOT_RDBU_STOPS - 2;
    double f = s - (double)i;
    const plot_rgb a = plot_rdbu_stops[i], b = plot_rdbu_stops[i + 1];
    return (plot_rgb){(uint8_t)lround(a.r + f * (b.r - a.r)), (uint8_t)lround(a.g + f * (b.g - a.g)),
                      (uint8_t)lround(a.b + f * (b.b - a.b))};
}

void plot_rgb_hex(plot_rgb c, char buf[8])
{
    snprintf(buf, 8, "#%02x%02x%02x", c.r, c.g, c.b);
}

void plot_xml_escape(FILE *out, const char *s)
{
    static const char replacement[] = "\xef\xbf\xbd"; /* U+FFFD */
    const unsigned char *p = (const unsigned char *)s;
    size_t n = strlen(s);
    for (size_t i = 0; i < n;) {
        unsigned char c = p[i];
        switch (c) {
        case '&': fputs("&amp;", out); i++; continue;
        case '<': fputs("&lt;", out); i++; continue;
        case '>': fputs("&gt;", out); i++; continue;
        case '"': fputs("&quot;", out); i++; continue;
        case '\'': fputs("&apos;", out); i++; continue;
        /* As references, so attribute values keep them (parsers turn a
         * literal newline in an attribute into a space). */
        case '\t': fputs("&#9;", out); i++; continue;
        case '\n': fputs("&#10;", out); i++; continue;
        case '\r': fputs("&#13;", out); i++; continue;
        default: break;
        }
        if (c < 0x20) {
            fputs(replacement, out);
            i++;
            continue;
        }
        if (c < 0x80) {
            fputc(c, out);
            i++;
            continue;
        }
        size_t len = str_utf8_seq_len(p + i, n - i, NULL);
        if (len == 0) {
            fputs(replacement, out);
            i++;
        } else if (len == 3 && p[i] == 0xef && p[i + 1] == 0xbf && (p[i + 2] == 0xbe || p[i + 2] == 0xbf)) {
            fputs(replacement, out); /* U+FFFE, U+FFFF: not XML characters */
            i += 3;
        } else {
            fwrite(p + i, 1, len, out);
            i += len;
        }
    }
}

char *plot_token_label(const char *token, size_t index)
{
    size_t n = strlen(token);
    /* Worst case every byte becomes \xNN, plus "_" and the index. */
    size_t cap = 4 * n + 2 + 3 * sizeof(size_t);
    char *out = malloc(cap);
    if (!out)
        return NULL;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)token[i];
        if (c == '\n')
            k += (size_t)snprintf(out + k, cap - k, "\\n");
        else if (c == '\t')
            k += (size_t)snprintf(out + k, cap - k, "\\t");
        else if (c == '\r')
            k += (size_t)snprintf(out + k, cap - k, "\\r");
        else if (c < 0x20 || c == 0x7f)
            k += (size_t)snprintf(out + k, cap - k, "\\x%02x", c);
        else
            out[k++] = (char)c;
    }
    snprintf(out + k, cap - k, "_%zu", index);
    return out;
}

/* ---- text and numbers ----------------------------------------------------- */

/* Width estimate: code points x 0.6 em, wide enough for Helvetica/Arial
 * digits and most letters (no font metrics without a font library). */
static double text_width(const char *s, double fs)
{
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)s; p && *p; p++)
        n += (*p & 0xc0) != 0x80;
    return (double)n * 0.6 * fs;
}

static void put_text(FILE *out, double x, double y, const char *attrs, const char *s)
{
    fprintf(out, "<text x=\"%.1f\" y=\"%.1f\"%s%s>", x, y, attrs ? " " : "", attrs ? attrs : "");
    plot_xml_escape(out, s);
    fputs("</text>\n", out);
}

/* 1, 2 or 5 times a power of ten, about range / target; always a normal,
 * finite number.  Values from a damaged file can make the range subnormal
 * (1e-310: log10 and pow lose it, the step could be 0) or overflow to inf;
 * the step is then clamped to [DBL_MIN, DBL_MAX / 10] and the axis is
 * merely coarse or fine, never an infinite loop or an undefined cast. */
static double nice_step(double range, double target)
{
    double raw = range / target;
    if (!(raw >= DBL_MIN))
        return DBL_MIN;
    if (!(raw <= DBL_MAX / 10))
        return DBL_MAX / 10;
    double mag = pow(10.0, floor(log10(raw)));
    double norm = raw / mag;
    return (norm < 1.5 ? 1.0 : norm < 3.0 ? 2.0 : norm < 7.0 ? 5.0 : 10.0) * mag;
}

/* A tick value with as many decimals as its step needs ("-0" shown as "0"). */
static void format_tick(double v, double step, char *buf, size_t size)
{
    if (!(step >= DBL_MIN) || !isfinite(step)) {
        snprintf(buf, size, "%.1e", v);
        return;
    }
    int dec = (int)ceil(-log10(step) - 1e-9);
    if (dec < 0)
        dec = 0;
    if (fabs(v) < step * 1e-6) {
        snprintf(buf, size, "0");
        return;
    }
    if (step < 1e-3 || step >= 1e6) {
        snprintf(buf, size, "%.1e", v); /* one style for every tick of an axis */
        return;
    }
    snprintf(buf, size, "%.*f", dec, v);
    /* "1.0" -> "1", "0.50" -> "0.5", as plotly labels its axes */
    if (strchr(buf, '.')) {
        size_t n = strlen(buf);
        while (n > 0 && buf[n - 1] == '0')
            buf[--n] = '\0';
        if (n > 0 && buf[n - 1] == '.')
            buf[--n] = '\0';
    }
}

static void format_value(double v, char *buf, size_t size)
{
    if (isnan(v))
        snprintf(buf, size, "NaN (no value)");
    else
        snprintf(buf, size, "%.9g", v);
}

/* x title under the tick labels, y title rotated along the left edge. */
static void put_axis_titles(FILE *out, double x0, double y0, double pw, double ph, double xlab_h, const char *x_name,
                            const char *y_name)
{
    char attrs[160];
    snprintf(attrs, sizeof attrs, "font-size=\"%.0f\" fill=\"#222\" text-anchor=\"middle\"", AXIS_FS);
    put_text(out, x0 + pw / 2, y0 + ph + xlab_h + AXIS_FS, attrs, x_name ? x_name : "");
    double cx = AXIS_FS, cy = y0 + ph / 2;
    snprintf(attrs, sizeof attrs,
             "font-size=\"%.0f\" fill=\"#222\" text-anchor=\"middle\" transform=\"rotate(-90 %.1f %.1f)\"", AXIS_FS,
             cx, cy);
    put_text(out, cx, cy, attrs, y_name ? y_name : "");
}

/* ---- figure frame ---------------------------------------------------------- */

static double header_height(const char *title, const char *subtitle, double title_fs, double sub_fs)
{
    return (title ? title_fs + 8 : 0) + (subtitle ? sub_fs + 6 : 0);
}

static double header_width(const char *title, const char *subtitle, double title_fs, double sub_fs)
{
    double a = title ? text_width(title, title_fs) : 0, b = subtitle ? text_width(subtitle, sub_fs) : 0;
    return a > b ? a : b;
}

/* Title and subtitle at (x, y) top-left; returns the height used. */
static double put_header(FILE *out, double x, double y, const char *title, const char *subtitle, double title_fs,
                         double sub_fs)
{
    double h = 0;
    char attrs[96];
    if (title) {
        snprintf(attrs, sizeof attrs, "font-size=\"%.0f\" font-weight=\"bold\" fill=\"#222\"", title_fs);
        put_text(out, x, y + title_fs, attrs, title);
        h += title_fs + 8;
    }
    if (subtitle) {
        snprintf(attrs, sizeof attrs, "font-size=\"%.0f\" fill=\"#555\"", sub_fs);
        put_text(out, x, y + h + sub_fs, attrs, subtitle);
        h += sub_fs + 6;
    }
    return h;
}

static void put_prologue(FILE *out, const plot_figure *fig, double width, double height)
{
    fprintf(out,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"%.0f\" height=\"%.0f\" "
            "viewBox=\"0 0 %.0f %.0f\" font-family=\"%s\">\n",
            width, height, width, height, FONT_FAMILY);
    if (fig->title) {
        fputs("<title>", out);
        plot_xml_escape(out, fig->title);
        fputs("</title>\n", out);
    }
    if (fig->caption) {
        fputs("<desc class=\"caption\">", out);
        plot_xml_escape(out, fig->caption);
        fputs("</desc>\n", out);
    }
    fputs("<metadata>\n<provenance xmlns=\"urn:patchsweep:provenance\">\n", out);
    for (size_t i = 0; i < fig->n_meta; i++) {
        fputs("<entry key=\"", out);
        plot_xml_escape(out, fig->meta[i][0]);
        fputs("\">", out);
        plot_xml_escape(out, fig->meta[i][1] ? fig->meta[i][1] : "");
        fputs("</entry>\n", out);
    }
    fputs("</provenance>\n</metadata>\n", out);
    /* A white page: a browser or a PNG export must not show the cells on
     * a transparent or dark background. */
    fputs("<rect x=\"0\" y=\"0\" width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n", out);
}

static ps_status finish(FILE *out, const char *out_name)
{
    fputs("</svg>\n", out);
    errno = 0;
    /* stdio keeps the first failure in the error flag; fflush reports a
     * failure of the last buffer (ENOSPC) with its errno */
    if (fflush(out) != 0 || ferror(out))
        return err_set(PS_ERR_IO, "%s: write failed%s%s", out_name, errno ? ": " : "", errno ? strerror(errno) : "");
    return PS_OK;
}

/* ---- heatmaps --------------------------------------------------------------- */

typedef struct {
    double head_h;          /* panel title + subtitle */
    double plot_x, plot_y;  /* plot area, relative to the panel */
    int cw, ch;             /* cell size */
    bool rotate;            /* x tick labels at -45 degrees */
    double xlab_h;          /* room for the x tick labels */
    double cb_x, cb_h;      /* colour bar */
    bool has_nan;
    bool *show;             /* [n_cols]: the x tick labels drawn (hm_thin_labels); malloc'd */
    double width, height;
} hm_layout;

#define CB_W 16.0

static int clampi(double v, int lo, int hi)
{
    int i = (int)floor(v);
    return i < lo ? lo : i > hi ? hi : i;
}

/* Room between two x tick labels a < b (columns) so that they do not
 * overlap.  Upright labels are centred on their columns: their boxes, of
 * the estimated widths w, must not meet:
 *   (b - a) cw >= (w_a + w_b) / 2 + PLOT_LABEL_GAP.
 * Labels rotated by -45 degrees are parallel strips one line high: their
 * distance across the text direction, (b - a) cw cos 45, must hold a line:
 *   (b - a) cw cos45 >= TICK_FS + PLOT_LABEL_GAP. */
#define PLOT_LABEL_GAP 3.0
static bool labels_apart(const hm_layout *l, const double *w, size_t a, size_t b)
{
    double dx = (double)(b > a ? b - a : a - b) * l->cw;
    return l->rotate ? dx * COS45 >= TICK_FS + PLOT_LABEL_GAP : dx >= (w[a] + w[b]) / 2 + PLOT_LABEL_GAP;
}

/* Whether column j's label keeps clear of the nearest shown label on each
 * side (labels are intervals along x, ordered by column: clearing the
 * nearest one on a side clears every one beyond it). */
static bool label_fits(const hm_layout *l, const double *w, size_t n, size_t j)
{
    for (size_t a = j; a-- > 0;)
        if (l->show[a]) {
            if (!labels_apart(l, w, a, j))
                return false;
            break;
        }
    for (size_t b = j + 1; b < n; b++)
        if (l->show[b])
            return labels_apart(l, w, j, b);
    return true;
}

/* Which x tick labels to draw so that no two overlap at any number of
 * columns: first the last column and the panel's col_keep ones (role
 * positions), each unless it would overlap one already kept; then every
 * k-th column, k the smallest step at which the widest labels clear each
 * other, where it clears its kept neighbours.  Every label stays in its
 * cells' hover text. */
static void hm_thin_labels(hm_layout *l, const plot_heatmap *p, double col_w)
{
    const size_t n = p->n_cols;
    double *w = malloc(n * sizeof *w);
    l->show = calloc(n, sizeof *l->show);
    if (!w || !l->show) {
        free(w);
        free(l->show);
        l->show = NULL;
        return;
    }
    for (size_t j = 0; j < n; j++)
        w[j] = text_width(p->col_labels[j], TICK_FS);
    double need = l->rotate ? (TICK_FS + PLOT_LABEL_GAP) / COS45 : col_w + PLOT_LABEL_GAP;
    size_t k = (size_t)ceil(need / l->cw - 1e-9);
    k = k < 1 ? 1 : k;
    l->show[n - 1] = true;
    for (size_t j = 0; p->col_keep && j + 1 < n; j++)
        if (p->col_keep[j] && label_fits(l, w, n, j))
            l->show[j] = true;
    for (size_t j = 0; j + 1 < n; j += k)
        if (!l->show[j] && label_fits(l, w, n, j))
            l->show[j] = true;
    free(w);
}

static hm_layout heatmap_layout(const plot_heatmap *p)
{
    hm_layout l = {0};
    l.head_h = header_height(p->title, p->subtitle, 14, 12);
    l.cw = clampi((p->plot_w > 0 ? p->plot_w : 720.0) / (double)p->n_cols, 14, 48);
    l.ch = clampi((p->plot_h > 0 ? p->plot_h : 360.0) / (double)p->n_rows, 14, 40);
    double row_w = 0, col_w = 0, need_left = 0;
    for (size_t i = 0; i < p->n_rows; i++) {
        double w = text_width(p->row_labels[i], TICK_FS);
        row_w = w > row_w ? w : row_w;
    }
    for (size_t j = 0; j < p->n_cols; j++) {
        double w = text_width(p->col_labels[j], TICK_FS);
        col_w = w > col_w ? w : col_w;
    }
    l.rotate = col_w > l.cw - 4;
    double left = AXIS_FS + 8 + row_w + 8;
    if (l.rotate) {
        /* Rotated labels hang down and to the left of their column. */
        for (size_t j = 0; j < p->n_cols; j++) {
            double reach = text_width(p->col_labels[j], TICK_FS) * COS45 - ((double)j + 0.5) * l.cw + 8;
            need_left = reach > need_left ? reach : need_left;
        }
        l.xlab_h = col_w * COS45 + TICK_FS + 10;
    } else {
        l.xlab_h = TICK_FS + 10;
    }
    l.plot_x = left > need_left ? left : need_left;
    l.plot_y = l.head_h + 8;
    hm_thin_labels(&l, p, col_w); /* l.show NULL: out of memory, refused by the caller */
    double plot_w = (double)p->n_cols * l.cw, plot_h = (double)p->n_rows * l.ch;
    for (size_t i = 0; i < p->n_rows * p->n_cols && !l.has_nan; i++)
        l.has_nan = isnan(p->values[i]);
    l.cb_x = l.plot_x + plot_w + 24;
    l.cb_h = plot_h > 140 ? plot_h : 140;
    double cb_right = l.cb_x + CB_W + 6 + 6 * 0.6 * TICK_FS;
    if (p->scale_name) {
        double sr = l.cb_x + text_width(p->scale_name, TICK_FS);
        cb_right = sr > cb_right ? sr : cb_right;
    }
    if (p->no_colorbar) /* the row's next panel draws the bar; NaN cells keep their key */
        cb_right = l.plot_x + plot_w + (l.has_nan ? 16 + text_width("no value", TICK_FS) : 0) + 8;
    if (l.has_nan && !p->no_colorbar) {
        double nan_right = l.cb_x + 16 + text_width("no value", TICK_FS);
        cb_right = nan_right > cb_right ? nan_right : cb_right;
    }
    double head_w = header_width(p->title, p->subtitle, 14, 12);
    l.width = cb_right > head_w ? cb_right : head_w;
    double bottom_plot = l.plot_y + plot_h + l.xlab_h + AXIS_FS + 8;
    double bottom_cb = p->no_colorbar ? 0 : l.plot_y + l.cb_h + (l.has_nan ? 30 : 0) + (p->scale_name ? 18 : 0) + 8;
    if (p->no_colorbar && l.has_nan) /* the key under the plot, beside the axis title */
        bottom_plot += 20;
    l.height = bottom_plot > bottom_cb ? bottom_plot : bottom_cb;
    return l;
}

double plot_heatmap_zmax(const plot_heatmap *panels, size_t n)
{
    double z = 0;
    for (size_t k = 0; k < n; k++)
        for (size_t i = 0; i < panels[k].n_rows * panels[k].n_cols; i++) {
            double a = fabs((double)panels[k].values[i]);
            if (isfinite(a) && a > z)
                z = a;
        }
    return z > 0 ? z : 1.0;
}

/* "NAME [ROW_AXIS ROW, COLUMN_AXIS COLUMN" of cell (i, j), escaped: the
 * start of a cell's and of a marked cell's hover text. */
static void put_cell_name(FILE *out, const plot_heatmap *p, const char *name, size_t i, size_t j)
{
    plot_xml_escape(out, name);
    fputs(" [", out);
    plot_xml_escape(out, p->y_name ? p->y_name : "row");
    fputc(' ', out);
    plot_xml_escape(out, p->row_labels[i]);
    fputs(", ", out);
    plot_xml_escape(out, p->x_name ? p->x_name : "column");
    fputc(' ', out);
    plot_xml_escape(out, p->col_labels[j]);
}

static void put_cell_title(FILE *out, const plot_heatmap *p, size_t i, size_t j)
{
    size_t idx = i * p->n_cols + j;
    char v[64];
    format_value(p->values[idx], v, sizeof v);
    fputs("<title>", out);
    put_cell_name(out, p, p->hover_name ? p->hover_name : "", i, j);
    fprintf(out, "] = %s", v);
    if (p->n_used && p->lo && p->hi && p->n_used[idx] > 0)
        fprintf(out, " (mean of %zu, min %.9g, max %.9g)", p->n_used[idx], (double)p->lo[idx], (double)p->hi[idx]);
    fputs("</title>", out);
}

/* The key of the hatched "no value" cells: a swatch at (x, y) and its label. */
static void put_nan_key(FILE *out, double x, double y)
{
    fprintf(out, "<rect class=\"nan-key\" x=\"%.0f\" y=\"%.0f\" width=\"12\" height=\"12\" fill=\"url(#ps-nan)\" "
                 "stroke=\"#444\" stroke-width=\"0.5\"/>\n",
            x, y);
    char a[64];
    snprintf(a, sizeof a, "font-size=\"%.0f\" fill=\"#222\" dy=\"0.35em\"", TICK_FS);
    put_text(out, x + 16, y + 6, a, "no value");
}

static void put_heatmap(FILE *out, const plot_heatmap *p, const hm_layout *l, double ox, double oy, double zmax)
{
    fprintf(out, "<g class=\"panel heatmap\" transform=\"translate(%.1f,%.1f)\">\n", ox, oy);
    put_header(out, 0, 0, p->title, p->subtitle, 14, 12);
    const double x0 = l->plot_x, y0 = l->plot_y;
    const double pw = (double)p->n_cols * l->cw, ph = (double)p->n_rows * l->ch;
    fputs("<g class=\"cells\" shape-rendering=\"crispEdges\">\n", out);
    for (size_t i = 0; i < p->n_rows; i++)
        for (size_t j = 0; j < p->n_cols; j++) {
            float v = p->values[i * p->n_cols + j];
            char fill[16];
            if (isnan(v))
                snprintf(fill, sizeof fill, "url(#ps-nan)");
            else
                plot_rgb_hex(plot_rdbu(v, zmax), fill);
            fprintf(out, "<rect class=\"%s\" x=\"%.0f\" y=\"%.0f\" width=\"%d\" height=\"%d\" fill=\"%s\">",
                    isnan(v) ? "cell nan" : "cell", x0 + (double)j * l->cw, y0 + (double)i * l->ch, l->cw, l->ch,
                    fill);
            put_cell_title(out, p, i, j);
            fputs("</rect>\n", out);
        }
    fputs("</g>\n", out);
    fprintf(out, "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" stroke=\"#444\" "
                 "stroke-width=\"1\"/>\n",
            x0, y0, pw, ph);
    /* outlines inside the cell (inset by 1.5 px, the stroke 2 px wide) so
     * that neighbouring marks stay apart; from the cell's corner as printed
     * (%.0f rounds as rint does) */
    for (size_t i = 0; p->marked && i < p->n_rows; i++)
        for (size_t j = 0; j < p->n_cols; j++) {
            if (!p->marked[i * p->n_cols + j])
                continue;
            fprintf(out, "<rect class=\"marked\" x=\"%.1f\" y=\"%.1f\" width=\"%d\" height=\"%d\" fill=\"none\" "
                         "stroke=\"#000\" stroke-width=\"2\"><title>",
                    rint(x0 + (double)j * l->cw) + 1.5, rint(y0 + (double)i * l->ch) + 1.5, l->cw - 3, l->ch - 3);
            put_cell_name(out, p, p->marked_name ? p->marked_name : "marked", i, j);
            fputs("]</title></rect>\n", out);
        }
    /* y tick labels (rows), right-aligned against the plot area */
    fprintf(out, "<g class=\"yticks\" font-size=\"%.0f\" fill=\"#222\" text-anchor=\"end\">\n", TICK_FS);
    for (size_t i = 0; i < p->n_rows; i++)
        put_text(out, x0 - 6, y0 + ((double)i + 0.5) * l->ch, "dy=\"0.35em\"", p->row_labels[i]);
    fputs("</g>\n", out);
    /* x tick labels (columns) */
    fprintf(out, "<g class=\"xticks\" font-size=\"%.0f\" fill=\"#222\" text-anchor=\"%s\">\n", TICK_FS,
            l->rotate ? "end" : "middle");
    for (size_t j = 0; j < p->n_cols; j++) {
        if (!l->show[j])
            continue;
        double cx = x0 + ((double)j + 0.5) * l->cw, ty = y0 + ph + 6;
        if (l->rotate) {
            char attrs[96];
            snprintf(attrs, sizeof attrs, "dy=\"0.7em\" transform=\"rotate(-45 %.1f %.1f)\"", cx, ty);
            put_text(out, cx, ty, attrs, p->col_labels[j]);
        } else {
            put_text(out, cx, ty, "dy=\"0.8em\"", p->col_labels[j]);
        }
    }
    fputs("</g>\n", out);
    put_axis_titles(out, x0, y0, pw, ph, l->xlab_h, p->x_name, p->y_name);
    if (p->no_colorbar) {
        if (l->has_nan)
            put_nan_key(out, x0, y0 + ph + l->xlab_h + AXIS_FS + 8);
        fputs("</g>\n", out);
        return;
    }
    /* colour bar: high (blue) at the top, as plotly draws it */
    const double cbx = l->cb_x, cby = y0, cbh = l->cb_h;
    fprintf(out, "<g class=\"colorbar\">\n<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" "
                 "fill=\"url(#ps-rdbu)\" stroke=\"#444\" stroke-width=\"0.5\">",
            cbx, cby, CB_W, cbh);
    fprintf(out, "<title>RdBu colour scale from %.9g (red) through 0 (white) to %.9g (blue)</title></rect>\n", -zmax,
            zmax);
    double step = nice_step(zmax, 2); /* (2 zmax) / 4 without overflow */
    fprintf(out, "<g font-size=\"%.0f\" fill=\"#222\">\n", TICK_FS);
    /* ticks k * step for k = -n..n within [-zmax, zmax], counted (see
     * ln_last_tick): zmax * (1 + 1e-9) would overflow for the largest zmax */
    const double n_ticks = floor(zmax / step + 1e-9);
    const long kmax = n_ticks >= 0 && n_ticks <= 1000 ? (long)n_ticks : 0;
    for (long k = -kmax; k <= kmax; k++) {
        double v = (double)k * step, ty = cby + cbh * (1.0 - (v / zmax + 1) / 2);
        char lab[32];
        format_tick(v, step, lab, sizeof lab);
        fprintf(out, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#444\"/>\n", cbx + CB_W, ty,
                cbx + CB_W + 4, ty);
        put_text(out, cbx + CB_W + 6, ty, "class=\"cbtick\" dy=\"0.35em\"", lab);
    }
    fputs("</g>\n", out);
    double key_y = cby + cbh + 12;
    if (p->scale_name) {
        char a1[64];
        snprintf(a1, sizeof a1, "class=\"scale-name\" font-size=\"%.0f\" fill=\"#222\" dy=\"0.7em\"", TICK_FS);
        put_text(out, cbx, key_y - 4, a1, p->scale_name);
        key_y += 18;
    }
    if (l->has_nan)
        put_nan_key(out, cbx, key_y);
    fputs("</g>\n</g>\n", out);
}

static void put_heatmap_defs(FILE *out)
{
    fputs("<defs>\n<linearGradient id=\"ps-rdbu\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">\n", out);
    for (size_t i = 0; i < PLOT_RDBU_STOPS; i++) {
        char hex[8];
        plot_rgb_hex(plot_rdbu_stops[i], hex);
        fprintf(out, "<stop offset=\"%g\" stop-color=\"%s\"/>\n", (double)i / (PLOT_RDBU_STOPS - 1), hex);
    }
    char bg[8];
    plot_rgb_hex(plot_nan_rgb, bg);
    fprintf(out,
            "</linearGradient>\n"
            "<pattern id=\"ps-nan\" patternUnits=\"userSpaceOnUse\" width=\"6\" height=\"6\">"
            "<rect width=\"6\" height=\"6\" fill=\"%s\"/>"
            "<path d=\"M-1,1 l2,-2 M0,6 l6,-6 M5,7 l2,-2\" stroke=\"#737373\" stroke-width=\"1\"/></pattern>\n"
            "</defs>\n",
            bg);
}

ps_status plot_write_heatmap_grid(FILE *out, const char *out_name, const plot_figure *fig, const plot_heatmap *panels,
                                  size_t n, size_t n_cols, const double *zmax)
{
    if (n_cols == 0)
        return err_set(PS_ERR_INVALID, "%s: a grid of panels needs at least one column", out_name);
    for (size_t k = 0; k < n; k++) {
        if (!(zmax[k] > 0) || !isfinite(zmax[k]))
            return err_set(PS_ERR_INVALID, "%s: the colour range must be a positive number, not %g", out_name,
                           zmax[k]);
        if (panels[k].n_rows == 0 || panels[k].n_cols == 0)
            return err_set(PS_ERR_INVALID, "%s: panel %zu has no cells", out_name, k);
    }
    const size_t n_rows = (n + n_cols - 1) / n_cols;
    hm_layout *ls = malloc((n ? n : 1) * sizeof *ls);
    double *col_w = calloc(n_cols, sizeof *col_w), *row_h = calloc(n_rows ? n_rows : 1, sizeof *row_h);
    if (!ls || !col_w || !row_h) {
        free(ls), free(col_w), free(row_h);
        return err_set(PS_ERR_NOMEM, "%s: out of memory", out_name);
    }
    double head_h = header_height(fig->title, fig->subtitle, 18, 13);
    size_t n_laid = 0;
    for (size_t k = 0; k < n; k++, n_laid++) {
        ls[k] = heatmap_layout(&panels[k]);
        if (!ls[k].show)
            break;
        /* a column is as wide as its widest panel, a row as high as its highest */
        col_w[k % n_cols] = ls[k].width > col_w[k % n_cols] ? ls[k].width : col_w[k % n_cols];
        row_h[k / n_cols] = ls[k].height > row_h[k / n_cols] ? ls[k].height : row_h[k / n_cols];
    }
    if (n_laid < n) {
        for (size_t k = 0; k < n_laid; k++)
            free(ls[k].show);
        free(ls), free(col_w), free(row_h);
        return err_set(PS_ERR_NOMEM, "%s: out of memory", out_name);
    }
    double width = 0, height = MARGIN + head_h + 10;
    for (size_t c = 0; c < n_cols; c++)
        width += col_w[c] + (c + 1 < n_cols ? 24 : 0);
    double hw = header_width(fig->title, fig->subtitle, 18, 13);
    width = hw > width ? hw : width;
    for (size_t r = 0; r < n_rows; r++)
        height += row_h[r] + 16;
    width += 2 * MARGIN;
    height += MARGIN;
    put_prologue(out, fig, width, height);
    put_heatmap_defs(out);
    double y = MARGIN + put_header(out, MARGIN, MARGIN, fig->title, fig->subtitle, 18, 13) + 10;
    for (size_t r = 0; r < n_rows; r++) {
        double x = MARGIN;
        for (size_t c = 0; c < n_cols && r * n_cols + c < n; c++) {
            size_t k = r * n_cols + c;
            put_heatmap(out, &panels[k], &ls[k], x, y, zmax[k]);
            x += col_w[c] + 24;
            free(ls[k].show);
        }
        y += row_h[r] + 16;
    }
    free(ls), free(col_w), free(row_h);
    return finish(out, out_name);
}

ps_status plot_write_heatmaps(FILE *out, const char *out_name, const plot_figure *fig, const plot_heatmap *panels,
                              size_t n, double zmax)
{
    if (!(zmax > 0) || !isfinite(zmax))
        return err_set(PS_ERR_INVALID, "%s: the colour range must be a positive number, not %g", out_name, zmax);
    double *z = malloc((n ? n : 1) * sizeof *z);
    if (!z)
        return err_set(PS_ERR_NOMEM, "%s: out of memory", out_name);
    for (size_t k = 0; k < n; k++)
        z[k] = zmax;
    ps_status st = plot_write_heatmap_grid(out, out_name, fig, panels, n, 1, z);
    free(z);
    return st;
}

/* ---- line plots --------------------------------------------------------------- */

typedef struct {
    double head_h, plot_x, plot_y, plot_w, plot_h;
    double y_lo, y_hi, y_step;
    bool rotate;
    double xlab_h, legend_x, width, height;
} ln_layout;

#define LN_PLOT_H 260.0

static void series_range(const plot_lines *p, double *lo, double *hi)
{
    *lo = INFINITY;
    *hi = -INFINITY;
    for (size_t s = 0; s < p->n_series; s++)
        for (size_t i = 0; i < p->n_x; i++) {
            const double *arrs[3] = {p->series[s].y, p->series[s].band_lo, p->series[s].band_hi};
            for (size_t a = 0; a < 3; a++)
                if (arrs[a] && isfinite(arrs[a][i])) {
                    *lo = arrs[a][i] < *lo ? arrs[a][i] : *lo;
                    *hi = arrs[a][i] > *hi ? arrs[a][i] : *hi;
                }
        }
}

/* Index of the last y tick: y_lo + k * y_step for k = 0..n stays within
 * y_hi.  Counted, not found by stepping until y_hi is passed: with values
 * near the smallest doubles (subnormal, ~1e-310) any absolute slack in that
 * test is a billion steps. */
static long ln_last_tick(const ln_layout *l)
{
    double n = floor((l->y_hi - l->y_lo) / l->y_step + 1e-6);
    return n >= 0 && n <= 1000 ? (long)n : 0;
}

static ln_layout lines_layout(const plot_lines *p)
{
    ln_layout l = {0};
    double lo, hi;
    series_range(p, &lo, &hi);
    if (!(lo <= hi)) {
        lo = 0;
        hi = 1;
    }
    lo = lo < 0 ? lo : 0;
    if (hi <= lo)
        hi = lo + 1;
    l.y_step = nice_step(hi / 2 - lo / 2, 2.5); /* (hi - lo) / 5 without overflow */
    l.y_hi = ceil(hi / l.y_step - 1e-9) * l.y_step;
    l.y_lo = floor(lo / l.y_step + 1e-9) * l.y_step;
    if (p->y_cap > 0 && hi <= p->y_cap && l.y_hi > p->y_cap)
        l.y_hi = p->y_cap;
    if (!(l.y_hi > l.y_lo)) /* values under the clamped step (subnormal) */
        l.y_hi = l.y_lo + l.y_step;
    l.head_h = header_height(p->title, p->subtitle, 14, 12);
    double ytick_w = 0;
    for (long k = 0, n = ln_last_tick(&l); k <= n; k++) {
        double v = l.y_lo + (double)k * l.y_step;
        char lab[32];
        format_tick(v, l.y_step, lab, sizeof lab);
        double w = text_width(lab, TICK_FS);
        ytick_w = w > ytick_w ? w : ytick_w;
    }
    l.plot_x = AXIS_FS + 8 + ytick_w + 8;
    l.plot_y = l.head_h + 8;
    double slot = p->n_x * 44.0;
    l.plot_w = slot < 360 ? 360 : slot > 900 ? 900 : slot;
    l.plot_h = LN_PLOT_H;
    double col_w = 0, spacing = l.plot_w / (double)(p->n_x > 1 ? p->n_x - 1 : 1);
    for (size_t i = 0; i < p->n_x; i++) {
        double w = text_width(p->x_labels[i], TICK_FS);
        col_w = w > col_w ? w : col_w;
    }
    l.rotate = col_w > spacing - 4;
    if (l.rotate) {
        l.xlab_h = col_w * COS45 + TICK_FS + 10;
        double reach = text_width(p->x_labels[0], TICK_FS) * COS45 + 8;
        l.plot_x = reach > l.plot_x ? reach : l.plot_x;
    } else {
        l.xlab_h = TICK_FS + 10;
    }
    l.legend_x = l.plot_x + l.plot_w + 24;
    double leg_w = 0;
    size_t shown = p->n_series < MAX_LEGEND ? p->n_series : MAX_LEGEND;
    for (size_t s = 0; s < shown; s++) {
        double w = text_width(p->series[s].label ? p->series[s].label : "", TICK_FS);
        leg_w = w > leg_w ? w : leg_w;
    }
    double more = text_width("... and 100000 more", TICK_FS);
    if (p->n_series > MAX_LEGEND && more > leg_w)
        leg_w = more;
    double right = l.legend_x + 30 + leg_w, head_w = header_width(p->title, p->subtitle, 14, 12);
    l.width = right > head_w ? right : head_w;
    double legend_h = l.plot_y + 18.0 * (double)(shown + (p->n_series > shown)) + 8;
    double plot_bottom = l.plot_y + l.plot_h + l.xlab_h + AXIS_FS + 8;
    l.height = plot_bottom > legend_h ? plot_bottom : legend_h;
    return l;
}

static double ln_x(const ln_layout *l, const plot_lines *p, size_t i)
{
    return l->plot_x + (p->n_x > 1 ? (double)i * l->plot_w / (double)(p->n_x - 1) : l->plot_w / 2);
}

static double ln_y(const ln_layout *l, double v)
{
    return l->plot_y + l->plot_h * (1.0 - (v - l->y_lo) / (l->y_hi - l->y_lo));
}

/* The band of a series as closed polygons, one per run of finite bounds. */
static void put_band(FILE *out, const ln_layout *l, const plot_lines *p, const plot_series *s, const char *color)
{
    size_t i = 0;
    while (i < p->n_x) {
        while (i < p->n_x && !(isfinite(s->band_lo[i]) && isfinite(s->band_hi[i])))
            i++;
        size_t a = i;
        while (i < p->n_x && isfinite(s->band_lo[i]) && isfinite(s->band_hi[i]))
            i++;
        if (i == a)
            continue;
        fprintf(out, "<path class=\"band\" fill=\"%s\" fill-opacity=\"0.2\" stroke=\"none\" d=\"", color);
        for (size_t k = a; k < i; k++)
            fprintf(out, "%s%.2f,%.2f ", k == a ? "M" : "L", ln_x(l, p, k), ln_y(l, s->band_hi[k]));
        for (size_t k = i; k-- > a;)
            fprintf(out, "L%.2f,%.2f ", ln_x(l, p, k), ln_y(l, s->band_lo[k]));
        fputs("Z\"/>\n", out);
    }
}

static void put_series(FILE *out, const ln_layout *l, const plot_lines *p, const plot_series *s, const char *color)
{
    size_t i = 0;
    while (i < p->n_x) {
        while (i < p->n_x && !isfinite(s->y[i]))
            i++;
        size_t a = i;
        while (i < p->n_x && isfinite(s->y[i]))
            i++;
        if (i - a < 2)
            continue;
        fprintf(out, "<polyline class=\"line\" fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"", color);
        for (size_t k = a; k < i; k++)
            fprintf(out, "%.2f,%.2f ", ln_x(l, p, k), ln_y(l, s->y[k]));
        fputs("\"/>\n", out);
    }
    for (size_t k = 0; k < p->n_x; k++) {
        if (!isfinite(s->y[k]))
            continue;
        fprintf(out, "<circle class=\"point\" cx=\"%.2f\" cy=\"%.2f\" r=\"3\" fill=\"%s\"><title>", ln_x(l, p, k),
                ln_y(l, s->y[k]), color);
        plot_xml_escape(out, s->label ? s->label : "");
        fputs(" [", out);
        plot_xml_escape(out, p->x_name ? p->x_name : "x");
        fputc(' ', out);
        plot_xml_escape(out, p->x_labels[k]);
        fputs("] ", out);
        plot_xml_escape(out, p->y_name ? p->y_name : "y");
        fprintf(out, " = %.9g", s->y[k]);
        if (s->band_lo && s->band_hi && isfinite(s->band_lo[k]) && isfinite(s->band_hi[k]))
            fprintf(out, " (min %.9g, max %.9g)", s->band_lo[k], s->band_hi[k]);
        fputs("</title></circle>\n", out);
    }
}

static void put_lines(FILE *out, const plot_lines *p, const ln_layout *l, double ox, double oy)
{
    fprintf(out, "<g class=\"panel lines\" transform=\"translate(%.1f,%.1f)\">\n", ox, oy);
    put_header(out, 0, 0, p->title, p->subtitle, 14, 12);
    const double x0 = l->plot_x, y0 = l->plot_y, pw = l->plot_w, ph = l->plot_h;
    /* grid and y ticks */
    fprintf(out, "<g class=\"yticks\" font-size=\"%.0f\" fill=\"#222\" text-anchor=\"end\">\n", TICK_FS);
    for (long k = 0, n = ln_last_tick(l); k <= n; k++) {
        double v = l->y_lo + (double)k * l->y_step;
        double y = ln_y(l, v);
        char lab[32];
        format_tick(v, l->y_step, lab, sizeof lab);
        fprintf(out, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e5e5e5\"/>\n", x0, y, x0 + pw, y);
        put_text(out, x0 - 6, y, "dy=\"0.35em\"", lab);
    }
    fputs("</g>\n", out);
    fprintf(out, "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" stroke=\"#444\"/>\n", x0, y0,
            pw, ph);
    fprintf(out, "<g class=\"xticks\" font-size=\"%.0f\" fill=\"#222\" text-anchor=\"%s\">\n", TICK_FS,
            l->rotate ? "end" : "middle");
    for (size_t i = 0; i < p->n_x; i++) {
        double cx = ln_x(l, p, i), ty = y0 + ph + 6;
        fprintf(out, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#444\"/>\n", cx, y0 + ph, cx,
                y0 + ph + 4);
        if (l->rotate) {
            char attrs[96];
            snprintf(attrs, sizeof attrs, "dy=\"0.7em\" transform=\"rotate(-45 %.1f %.1f)\"", cx, ty);
            put_text(out, cx, ty, attrs, p->x_labels[i]);
        } else {
            put_text(out, cx, ty, "dy=\"0.8em\"", p->x_labels[i]);
        }
    }
    fputs("</g>\n", out);
    put_axis_titles(out, x0, y0, pw, ph, l->xlab_h, p->x_name, p->y_name);
    /* bands first, so every line stays visible on top of them */
    for (size_t s = 0; s < p->n_series; s++)
        if (p->series[s].band_lo && p->series[s].band_hi)
            put_band(out, l, p, &p->series[s], line_colors[s % N_LINE_COLORS]);
    for (size_t s = 0; s < p->n_series; s++)
        put_series(out, l, p, &p->series[s], line_colors[s % N_LINE_COLORS]);
    /* legend */
    fprintf(out, "<g class=\"legend\" font-size=\"%.0f\" fill=\"#222\">\n", TICK_FS);
    size_t shown = p->n_series < MAX_LEGEND ? p->n_series : MAX_LEGEND;
    for (size_t s = 0; s < shown; s++) {
        double y = y0 + 9 + 18.0 * (double)s;
        const char *color = line_colors[s % N_LINE_COLORS];
        if (p->series[s].band_lo && p->series[s].band_hi)
            fprintf(out, "<rect x=\"%.1f\" y=\"%.1f\" width=\"22\" height=\"10\" fill=\"%s\" fill-opacity=\"0.2\"/>\n",
                    l->legend_x, y - 5, color);
        fprintf(out, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"2\"/>\n",
                l->legend_x, y, l->legend_x + 22, y, color);
        put_text(out, l->legend_x + 28, y, "dy=\"0.35em\"", p->series[s].label ? p->series[s].label : "");
    }
    if (p->n_series > shown) {
        char more[64];
        snprintf(more, sizeof more, "... and %zu more", p->n_series - shown);
        put_text(out, l->legend_x, y0 + 9 + 18.0 * (double)shown, "dy=\"0.35em\" fill=\"#555\"", more);
    }
    fputs("</g>\n</g>\n", out);
}

ps_status plot_write_lines(FILE *out, const char *out_name, const plot_figure *fig, const plot_lines *panels,
                           size_t n)
{
    for (size_t k = 0; k < n; k++)
        if (panels[k].n_x == 0)
            return err_set(PS_ERR_INVALID, "%s: line panel %zu has no points", out_name, k);
    ln_layout *ls = malloc((n ? n : 1) * sizeof *ls);
    if (!ls)
        return err_set(PS_ERR_NOMEM, "%s: out of memory", out_name);
    double head_h = header_height(fig->title, fig->subtitle, 18, 13);
    double width = header_width(fig->title, fig->subtitle, 18, 13), height = MARGIN + head_h + 10;
    for (size_t k = 0; k < n; k++) {
        ls[k] = lines_layout(&panels[k]);
        width = ls[k].width > width ? ls[k].width : width;
        height += ls[k].height + 16;
    }
    width += 2 * MARGIN;
    height += MARGIN;
    put_prologue(out, fig, width, height);
    double y = MARGIN + put_header(out, MARGIN, MARGIN, fig->title, fig->subtitle, 18, 13) + 10;
    for (size_t k = 0; k < n; k++) {
        put_lines(out, &panels[k], &ls[k], MARGIN, y);
        y += ls[k].height + 16;
    }
    free(ls);
    return finish(out, out_name);
}

/* ---- scatter plots ---------------------------------------------------------- */

#define SC_SIZE 420.0 /* the square plot area, px */

typedef struct {
    double lo, hi, step; /* one range for both axes, ticks lo + k step */
    double plot_x, plot_y;
} sc_layout;

static double sc_pos(const sc_layout *l, double v)
{
    return (v - l->lo) / (l->hi - l->lo) * SC_SIZE;
}

/* Indices of the k finite points farthest from y = x (largest |y - x|,
 * ties by index), k = min(n_labelled, finite points); into out[k]. */
static size_t sc_outliers(const plot_scatter *s, size_t *out)
{
    size_t k = 0;
    for (size_t i = 0; i < s->n; i++) {
        if (!isfinite(s->x[i]) || !isfinite(s->y[i]))
            continue;
        double d = fabs(s->y[i] - s->x[i]);
        /* insertion into the sorted top list out[0..k) */
        size_t at = k;
        while (at > 0 && fabs(s->y[out[at - 1]] - s->x[out[at - 1]]) < d)
            at--;
        if (at >= s->n_labelled)
            continue;
        size_t last = k < s->n_labelled ? k : s->n_labelled - 1;
        memmove(out + at + 1, out + at, (last - at) * sizeof *out);
        out[at] = i;
        if (k < s->n_labelled)
            k++;
    }
    return k;
}

ps_status plot_write_scatter(FILE *out, const char *out_name, const plot_figure *fig, const plot_scatter *s)
{
    sc_layout l = {0};
    double lo = INFINITY, hi = -INFINITY;
    size_t n_finite = 0;
    for (size_t i = 0; i < s->n; i++) {
        if (!isfinite(s->x[i]) || !isfinite(s->y[i]))
            continue;
        n_finite++;
        double a = s->x[i] < s->y[i] ? s->x[i] : s->y[i], b = s->x[i] > s->y[i] ? s->x[i] : s->y[i];
        lo = a < lo ? a : lo;
        hi = b > hi ? b : hi;
    }
    if (n_finite == 0)
        return err_set(PS_ERR_INVALID, "%s: no point has two finite coordinates", out_name);
    lo = lo < 0 ? lo : 0; /* 0 (no effect) always on the axes */
    hi = hi > 0 ? hi : 0;
    if (!(hi > lo))
        hi = lo + 1;
    l.step = nice_step(hi / 2 - lo / 2, 2.5);
    l.lo = floor(lo / l.step + 1e-9) * l.step;
    l.hi = ceil(hi / l.step - 1e-9) * l.step;
    if (!(l.hi > l.lo))
        l.hi = l.lo + l.step;
    size_t *top = malloc((s->n_labelled ? s->n_labelled : 1) * sizeof *top);
    if (!top)
        return err_set(PS_ERR_NOMEM, "%s: out of memory", out_name);
    size_t n_top = s->n_labelled ? sc_outliers(s, top) : 0;
    double tick_w = 0;
    const double n_ticks = floor((l.hi - l.lo) / l.step + 1e-6);
    const long kmax = n_ticks >= 0 && n_ticks <= 1000 ? (long)n_ticks : 0;
    for (long k = 0; k <= kmax; k++) {
        char lab[32];
        format_tick(l.lo + (double)k * l.step, l.step, lab, sizeof lab);
        double w = text_width(lab, TICK_FS);
        tick_w = w > tick_w ? w : tick_w;
    }
    double fig_head = header_height(fig->title, fig->subtitle, 18, 13);
    double panel_head = header_height(s->title, s->subtitle, 14, 12);
    l.plot_x = MARGIN + AXIS_FS + 8 + tick_w + 8;
    l.plot_y = MARGIN + fig_head + 10 + panel_head + 8;
    double label_w = 0;
    for (size_t k = 0; k < n_top; k++) {
        double w = text_width(s->labels[top[k]], TICK_FS);
        label_w = w > label_w ? w : label_w;
    }
    double width = l.plot_x + SC_SIZE + 8 + label_w + MARGIN;
    double hw = MARGIN + header_width(fig->title, fig->subtitle, 18, 13) + MARGIN,
           pw = l.plot_x - AXIS_FS - 8 - tick_w - 8 + header_width(s->title, s->subtitle, 14, 12) + MARGIN;
    width = hw > width ? hw : width;
    width = pw > width ? pw : width;
    double height = l.plot_y + SC_SIZE + TICK_FS + 10 + AXIS_FS + 8 + MARGIN;
    put_prologue(out, fig, width, height);
    put_header(out, MARGIN, MARGIN, fig->title, fig->subtitle, 18, 13);
    fprintf(out, "<g class=\"panel scatter\">\n");
    put_header(out, MARGIN, MARGIN + fig_head + 10, s->title, s->subtitle, 14, 12);
    const double x0 = l.plot_x, y0 = l.plot_y;
    /* grid lines and ticks: the same values on both axes */
    fprintf(out, "<g class=\"ticks\" font-size=\"%.0f\" fill=\"#222\">\n", TICK_FS);
    for (long k = 0; k <= kmax; k++) {
        double v = l.lo + (double)k * l.step, p = sc_pos(&l, v);
        char lab[32];
        format_tick(v, l.step, lab, sizeof lab);
        fprintf(out, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\"/>\n", x0 + p, y0,
                x0 + p, y0 + SC_SIZE, fabs(v) < l.step * 1e-6 ? "#bbb" : "#eee");
        fprintf(out, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\"/>\n", x0,
                y0 + SC_SIZE - p, x0 + SC_SIZE, y0 + SC_SIZE - p, fabs(v) < l.step * 1e-6 ? "#bbb" : "#eee");
        put_text(out, x0 + p, y0 + SC_SIZE + 6, "class=\"xtick\" dy=\"0.8em\" text-anchor=\"middle\"", lab);
        put_text(out, x0 - 6, y0 + SC_SIZE - p, "class=\"ytick\" dy=\"0.35em\" text-anchor=\"end\"", lab);
    }
    fputs("</g>\n", out);
    fprintf(out, "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" stroke=\"#444\"/>\n",
            x0, y0, SC_SIZE, SC_SIZE);
    put_axis_titles(out, x0, y0, SC_SIZE, SC_SIZE, TICK_FS + 10, s->x_name, s->y_name);
    /* the line y = x: a perfect estimate puts every point on it */
    fprintf(out, "<line class=\"identity\" x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\" stroke=\"#888\" "
                 "stroke-dasharray=\"5,4\"><title>y = x</title></line>\n",
            x0, y0 + SC_SIZE, x0 + SC_SIZE, y0);
    fputs("<g class=\"points\">\n", out);
    for (int pass = 0; pass < 2; pass++) /* outliers last, on top */
        for (size_t i = 0; i < s->n; i++) {
            if (!isfinite(s->x[i]) || !isfinite(s->y[i]))
                continue;
            bool is_top = false;
            for (size_t k = 0; k < n_top && !is_top; k++)
                is_top = top[k] == i;
            if (is_top != (pass == 1))
                continue;
            double cx = x0 + sc_pos(&l, s->x[i]), cy = y0 + SC_SIZE - sc_pos(&l, s->y[i]);
            fprintf(out, "<circle class=\"%s\" cx=\"%.2f\" cy=\"%.2f\" r=\"%s\" fill=\"%s\" fill-opacity=\"0.75\">"
                         "<title>",
                    is_top ? "point outlier" : "point", cx, cy, is_top ? "4" : "3", is_top ? "#ef553b" : "#636efa");
            plot_xml_escape(out, s->labels[i]);
            fputs(": ", out);
            plot_xml_escape(out, s->x_name ? s->x_name : "x");
            fprintf(out, " = %.9g, ", s->x[i]);
            plot_xml_escape(out, s->y_name ? s->y_name : "y");
            fprintf(out, " = %.9g, ", s->y[i]);
            fprintf(out, "difference = %.9g</title></circle>\n", s->y[i] - s->x[i]);
        }
    fputs("</g>\n", out);
    fprintf(out, "<g class=\"outlier-labels\" font-size=\"%.0f\" fill=\"#222\">\n", TICK_FS);
    for (size_t k = 0; k < n_top; k++) {
        size_t i = top[k];
        double cx = x0 + sc_pos(&l, s->x[i]), cy = y0 + SC_SIZE - sc_pos(&l, s->y[i]);
        put_text(out, cx + 6, cy, "class=\"outlier-label\" dy=\"0.35em\"", s->labels[i]);
    }
    fputs("</g>\n</g>\n", out);
    free(top);
    return finish(out, out_name);
}
