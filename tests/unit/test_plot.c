/* Unit tests: the RdBu colour map, NaN cells, XML escaping of token labels,
 * SVG output of heatmaps (stacked and side by side), line plots and scatter
 * plots (to a buffer), write errors. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plot.h"

static void assert_rgb(plot_rgb c, int r, int g, int b)
{
    assert_int_equal(c.r, r);
    assert_int_equal(c.g, g);
    assert_int_equal(c.b, b);
}

/* Everything written to a memstream by f, as a malloc'd string. */
typedef struct {
    char *buf;
    size_t len;
    FILE *out;
} membuf;

static void mem_open(membuf *m)
{
    m->buf = NULL;
    m->len = 0;
    m->out = open_memstream(&m->buf, &m->len);
    assert_non_null(m->out);
}

static char *mem_close(membuf *m)
{
    assert_int_equal(fclose(m->out), 0);
    return m->buf;
}

static char *escaped(const char *s)
{
    membuf m;
    mem_open(&m);
    plot_xml_escape(m.out, s);
    return mem_close(&m);
}

static void test_colormap_endpoints_and_middle(void **state)
{
    (void)state;
    /* plotly's RdBu: low = dark red, high = dark blue, 0 = the middle stop */
    assert_rgb(plot_rdbu(-1.0, 1.0), 103, 0, 31);
    assert_rgb(plot_rdbu(1.0, 1.0), 5, 48, 97);
    assert_rgb(plot_rdbu(0.0, 1.0), 247, 247, 247);
    assert_rgb(plot_rdbu(0.0, 123.0), 247, 247, 247);
    /* every stop is hit exactly at its own value */
    for (size_t i = 0; i < PLOT_RDBU_STOPS; i++) {
        plot_rgb c = plot_rdbu(-2.0 + 4.0 * (double)i / (PLOT_RDBU_STOPS - 1), 2.0);
        assert_rgb(c, plot_rdbu_stops[i].r, plot_rdbu_stops[i].g, plot_rdbu_stops[i].b);
    }
    /* beyond the range and infinities clamp to the ends */
    assert_rgb(plot_rdbu(-7.0, 1.0), 103, 0, 31);
    assert_rgb(plot_rdbu(INFINITY, 1.0), 5, 48, 97);
    assert_rgb(plot_rdbu(-INFINITY, 1.0), 103, 0, 31);
    /* the range scales: v / zmax is what counts */
    plot_rgb a = plot_rdbu(0.5, 2.0), b = plot_rdbu(0.25, 1.0);
    assert_rgb(a, b.r, b.g, b.b);
}

static void test_colormap_interpolates_linearly(void **state)
{
    (void)state;
    /* 40% of the way from stop 0 (103,0,31) to stop 1 (178,24,43): t = 0.04 */
    assert_rgb(plot_rdbu(-0.92, 1.0), 133, 10, 36);
    /* 20% of the way from the middle (247,247,247) to stop 6 (209,229,240) */
    assert_rgb(plot_rdbu(0.04, 1.0), 239, 243, 246);
    /* red below 0, blue above: the sign is readable from the hue alone */
    for (int k = -50; k <= 50; k++) {
        plot_rgb c = plot_rdbu(k / 50.0, 1.0);
        if (k < 0)
            assert_true(c.r > c.b);
        else if (k > 0)
            assert_true(c.b > c.r);
    }
    char hex[8];
    plot_rgb_hex((plot_rgb){5, 48, 97}, hex);
    assert_string_equal(hex, "#053061");
}

static void test_nan_colour(void **state)
{
    (void)state;
    plot_rgb c = plot_rdbu(NAN, 1.0);
    assert_rgb(c, plot_nan_rgb.r, plot_nan_rgb.g, plot_nan_rgb.b);
    /* the NaN grey is not on the scale: not equal to any stop */
    for (size_t i = 0; i < PLOT_RDBU_STOPS; i++)
        assert_false(plot_rdbu_stops[i].r == c.r && plot_rdbu_stops[i].g == c.g && plot_rdbu_stops[i].b == c.b);
}

static void test_xml_escape(void **state)
{
    (void)state;
    char *s = escaped("<b>&\"'x'</b>");
    assert_string_equal(s, "&lt;b&gt;&amp;&quot;&apos;x&apos;&lt;/b&gt;");
    free(s);
    /* newlines and tabs as references (kept in attributes), other C0
     * controls and non-characters as U+FFFD, valid UTF-8 kept */
    s = escaped("a\nb\tc\rd\x01" "e\xc3\xa9" "f\xef\xbf\xbe" "g\xff" "h");
    assert_string_equal(s, "a&#10;b&#9;c&#13;d\xef\xbf\xbd" "e\xc3\xa9" "f\xef\xbf\xbd" "g\xef\xbf\xbd" "h");
    free(s);
    s = escaped("");
    assert_string_equal(s, "");
    free(s);
}

static void test_token_label(void **state)
{
    (void)state;
    char *l = plot_token_label(" John", 2);
    assert_string_equal(l, " John_2");
    free(l);
    l = plot_token_label("<|endoftext|>", 0);
    assert_string_equal(l, "<|endoftext|>_0");
    free(l);
    l = plot_token_label("\n\n", 14);
    assert_string_equal(l, "\\n\\n_14");
    free(l);
    l = plot_token_label("a\tb\rc\x01\x7f", 3);
    assert_string_equal(l, "a\\tb\\rc\\x01\\x7f_3");
    free(l);
    l = plot_token_label("", 12345);
    assert_string_equal(l, "_12345");
    free(l);
}

static const char *const meta[][2] = {{"patchsweep_version", "0.1.0 (git test)"},
                                      {"command_line", "patchsweep plot --var 'a&b' -o x.svg"},
                                      {"model_sha256", "abc123"}};

static void test_heatmap_svg(void **state)
{
    (void)state;
    const char *rows[] = {"0", "1"};
    char *c0 = plot_token_label("<a href=\"x\">&'", 0), *c1 = plot_token_label("\n", 1);
    char *c2 = plot_token_label(" Mary", 2);
    const char *cols[] = {c0, c1, c2};
    const float values[] = {-1.0f, 0.0f, 0.5f, 2.0f, NAN, -0.25f};
    plot_heatmap p = {.title = "normalized logit_diff after patching resid_pre",
                      .x_name = "Position",
                      .y_name = "Layer",
                      .n_rows = 2,
                      .n_cols = 3,
                      .row_labels = rows,
                      .col_labels = cols,
                      .values = values,
                      .hover_name = "resid_pre_normalized"};
    assert_true(plot_heatmap_zmax(&p, 1) == 2.0);
    plot_figure fig = {.title = "T <&>", .subtitle = "prompt 0", .meta = meta, .n_meta = 3};
    membuf m;
    mem_open(&m);
    assert_int_equal(plot_write_heatmaps(m.out, "x.svg", &fig, &p, 1, 2.0), PS_OK);
    char *svg = mem_close(&m);
    assert_non_null(strstr(svg, "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\""));
    /* labels escaped in text and in hover titles, never raw */
    assert_non_null(strstr(svg, ">&lt;a href=&quot;x&quot;&gt;&amp;&apos;_0</text>"));
    assert_non_null(strstr(svg, ">\\n_1</text>"));
    assert_null(strstr(svg, "<a href"));
    assert_non_null(strstr(svg, "<title>resid_pre_normalized [Layer 1, Position \\n_1] = NaN (no value)</title>"));
    assert_non_null(strstr(svg, "<title>resid_pre_normalized [Layer 0, Position  Mary_2] = 0.5</title>"));
    /* colours: -1 on [-2, 2] is t = 0.25, halfway between stops 2 and 3 */
    char hex[8], want[64];
    plot_rgb_hex(plot_rdbu(-1.0, 2.0), hex);
    snprintf(want, sizeof want, "fill=\"%s\"><title>resid_pre_normalized [Layer 0,", hex);
    assert_non_null(strstr(svg, want));
    assert_string_equal(hex, "#e58368"); /* 229, 130.5 -> 131, 103.5 -> 104 */
    /* the NaN cell is hatched, and the key explains it */
    assert_non_null(strstr(svg, "class=\"cell nan\""));
    assert_non_null(strstr(svg, "fill=\"url(#ps-nan)\"><title>"));
    assert_non_null(strstr(svg, ">no value</text>"));
    assert_non_null(strstr(svg, "<pattern id=\"ps-nan\""));
    /* provenance */
    assert_non_null(
        strstr(svg, "<entry key=\"command_line\">patchsweep plot --var &apos;a&amp;b&apos; -o x.svg</entry>"));
    assert_non_null(strstr(svg, "<entry key=\"model_sha256\">abc123</entry>"));
    /* colour bar ticks on [-2, 2] */
    assert_non_null(strstr(svg, ">-2</text>"));
    assert_non_null(strstr(svg, ">0</text>"));
    assert_non_null(strstr(svg, ">2</text>"));
    assert_non_null(strstr(svg, "</svg>\n"));
    free(svg);
    free(c0);
    free(c1);
    free(c2);
}

static void test_heatmap_mean_hover_and_bad_range(void **state)
{
    (void)state;
    const char *rows[] = {"0"}, *cols[] = {"0", "1"};
    const float values[] = {0.25f, NAN}, lo[] = {0.0f, 0.0f}, hi[] = {0.5f, 0.0f};
    const size_t n_used[] = {2, 0};
    plot_heatmap p = {.n_rows = 1, .n_cols = 2, .row_labels = rows, .col_labels = cols, .values = values,
                      .hover_name = "z_all_pos_normalized", .x_name = "Head", .y_name = "Layer",
                      .n_used = n_used, .lo = lo, .hi = hi};
    plot_figure fig = {0};
    membuf m;
    mem_open(&m);
    assert_int_equal(plot_write_heatmaps(m.out, "m.svg", &fig, &p, 1, 1.0), PS_OK);
    char *svg = mem_close(&m);
    assert_non_null(strstr(svg, "[Layer 0, Head 0] = 0.25 (mean of 2, min 0, max 0.5)</title>"));
    assert_non_null(strstr(svg, "[Layer 0, Head 1] = NaN (no value)</title>"));
    free(svg);
    mem_open(&m);
    assert_int_equal(plot_write_heatmaps(m.out, "m.svg", &fig, &p, 1, 0.0), PS_ERR_INVALID);
    assert_int_equal(plot_write_heatmaps(m.out, "m.svg", &fig, &p, 1, NAN), PS_ERR_INVALID);
    assert_non_null(strstr(err_msg(), "m.svg"));
    free(mem_close(&m));
    /* zmax ignores NaN and infinities; nothing finite or all zero gives 1 */
    const float only_nan[] = {NAN, INFINITY};
    p.values = only_nan;
    assert_true(plot_heatmap_zmax(&p, 1) == 1.0);
}

static void test_lines_svg(void **state)
{
    (void)state;
    const char *x[] = {"embed", "0", "1", "2"};
    const double y0[] = {0.1, NAN, 0.3, 0.4}, y1[] = {0.2, 0.2, 0.2, 0.2};
    const double lo[] = {0.0, 0.1, 0.1, 0.1}, hi[] = {0.5, 0.3, 0.3, 0.9};
    plot_series s[14];
    for (size_t i = 0; i < 14; i++)
        s[i] = (plot_series){.label = i == 0 ? "prompt 0: ' <Paris>'" : "other", .y = i == 0 ? y0 : y1};
    s[1].band_lo = lo;
    s[1].band_hi = hi;
    plot_lines p = {.title = "Probability", .x_name = "Layer", .y_name = "p(answer)", .n_x = 4, .x_labels = x,
                    .series = s, .n_series = 14, .y_cap = 1.0};
    plot_figure fig = {.title = "Logit lens", .meta = meta, .n_meta = 3};
    membuf m;
    mem_open(&m);
    assert_int_equal(plot_write_lines(m.out, "l.svg", &fig, &p, 1), PS_OK);
    char *svg = mem_close(&m);
    /* the NaN point leaves a gap: no marker at layer 0 for prompt 0 */
    assert_null(strstr(svg, "prompt 0: &apos; &lt;Paris&gt;&apos; [Layer 0]"));
    assert_non_null(strstr(svg, "prompt 0: &apos; &lt;Paris&gt;&apos; [Layer 1] p(answer) = 0.3</title>"));
    assert_non_null(strstr(svg, "[Layer 2] p(answer) = 0.2 (min 0.1, max 0.9)</title>"));
    assert_non_null(strstr(svg, "class=\"band\""));
    assert_non_null(strstr(svg, "... and 2 more"));
    assert_non_null(strstr(svg, ">embed</text>"));
    /* y axis 0..1 (0.9 is the largest value, capped at 1) */
    assert_non_null(strstr(svg, ">1</text>"));
    assert_non_null(strstr(svg, ">0.8</text>"));
    assert_null(strstr(svg, ">1.2</text>"));
    free(svg);
}

/* Values near the smallest doubles (a damaged file) still give a few
 * ticks, not a loop over 1e-300 / 5e-311 of them; huge ones and ranges
 * that overflow neither (UBSan checks the casts in the sanitizer pass). */
static void test_lines_extreme_values(void **state)
{
    (void)state;
    const char *x[] = {"embed", "0"};
    const double tiny[] = {2.5e-310, 1e-311}, huge[] = {1e300, -1e300}, widest[] = {DBL_MAX, -DBL_MAX},
                 least[] = {5e-324, 0};
    const double *cases[] = {tiny, huge, widest, least};
    for (size_t c = 0; c < 4; c++) {
        plot_series s = {.label = "p", .y = cases[c]};
        plot_lines p = {.x_name = "Layer", .y_name = "y", .n_x = 2, .x_labels = x, .series = &s, .n_series = 1};
        plot_figure fig = {0};
        membuf m;
        mem_open(&m);
        assert_int_equal(plot_write_lines(m.out, "x.svg", &fig, &p, 1), PS_OK);
        char *svg = mem_close(&m);
        size_t ticks = 0;
        for (const char *q = strstr(svg, "class=\"yticks\""); q && (q = strstr(q, "stroke=\"#e5e5e5\"")); q++)
            ticks++;
        assert_true(ticks >= 1 && ticks <= 12);
        free(svg);
    }
    /* a colour bar of the smallest and largest ranges */
    const char *rows[] = {"0"}, *cols[] = {"0"};
    const float one[] = {1e-45f};
    plot_heatmap h = {.n_rows = 1, .n_cols = 1, .row_labels = rows, .col_labels = cols, .values = one};
    plot_figure fig = {0};
    const double zmaxes[] = {5e-324, DBL_MAX};
    for (size_t z = 0; z < 2; z++) {
        membuf m;
        mem_open(&m);
        assert_int_equal(plot_write_heatmaps(m.out, "h.svg", &fig, &h, 1, zmaxes[z]), PS_OK);
        free(mem_close(&m));
    }
}

static void test_write_error_names_output(void **state)
{
    (void)state;
    FILE *full = fopen("/dev/full", "w");
    if (!full)
        skip();
    const char *rows[] = {"0"}, *cols[] = {"0"};
    const float values[] = {1.0f};
    plot_heatmap p = {.n_rows = 1, .n_cols = 1, .row_labels = rows, .col_labels = cols, .values = values};
    plot_figure fig = {0};
    assert_int_equal(plot_write_heatmaps(full, "out/fig.svg", &fig, &p, 1, 1.0), PS_ERR_IO);
    assert_non_null(strstr(err_msg(), "out/fig.svg: write failed"));
    fclose(full);
}

/* Heatmaps in a row: per-panel scales, a shared colour bar, marked cells. */
static void test_heatmap_grid(void **state)
{
    (void)state;
    const char *rows[] = {"0", "1"}, *cols[] = {"a_0", "b_1"};
    const float exact[] = {1.0f, 0.0f, 0.5f, -0.5f}, est[] = {0.5f, 0.0f, 1.0f, -1.0f}, err[] = {-4, 0, 4, 2};
    const bool marked[] = {false, false, true, false};
    plot_heatmap p[3] = {
        {.title = "exact", .x_name = "Position", .y_name = "Layer", .n_rows = 2, .n_cols = 2, .row_labels = rows,
         .col_labels = cols, .values = exact, .hover_name = "e", .no_colorbar = true, .marked = marked,
         .marked_name = "missed"},
        {.title = "estimate", .x_name = "Position", .y_name = "Layer", .n_rows = 2, .n_cols = 2, .row_labels = rows,
         .col_labels = cols, .values = est, .hover_name = "a", .scale_name = "normalized"},
        {.title = "error", .x_name = "Position", .y_name = "Layer", .n_rows = 2, .n_cols = 2, .row_labels = rows,
         .col_labels = cols, .values = err, .hover_name = "d", .scale_name = "estimate - exact"},
    };
    const double z[] = {1.0, 1.0, 4.0};
    plot_figure fig = {.title = "T"};
    membuf m;
    mem_open(&m);
    assert_int_equal(plot_write_heatmap_grid(m.out, "g.svg", &fig, p, 3, 3, z), PS_OK);
    char *svg = mem_close(&m);
    /* two colour bars (estimate's, shared with exact, and the error's) */
    size_t bars = 0;
    for (const char *q = svg; (q = strstr(q, "class=\"colorbar\"")); q++)
        bars++;
    assert_int_equal(bars, 2);
    assert_non_null(strstr(svg, "RdBu colour scale from -1 (red) through 0 (white) to 1 (blue)"));
    assert_non_null(strstr(svg, "RdBu colour scale from -4 (red) through 0 (white) to 4 (blue)"));
    assert_non_null(strstr(svg, ">normalized</text>"));
    /* 1.0 in exact and in estimate: one colour; 4 on the error's scale: the same end colour */
    char hex[8], want[96];
    plot_rgb_hex(plot_rdbu(1.0, 1.0), hex);
    snprintf(want, sizeof want, "fill=\"%s\"><title>e [Layer 0, Position a_0] = 1</title>", hex);
    assert_non_null(strstr(svg, want));
    snprintf(want, sizeof want, "fill=\"%s\"><title>a [Layer 1, Position a_0] = 1</title>", hex);
    assert_non_null(strstr(svg, want));
    snprintf(want, sizeof want, "fill=\"%s\"><title>d [Layer 1, Position a_0] = 4</title>", hex);
    assert_non_null(strstr(svg, want));
    /* one outline, on the marked cell */
    const char *mk = strstr(svg, "class=\"marked\"");
    assert_non_null(mk);
    assert_null(strstr(mk + 1, "class=\"marked\""));
    assert_non_null(strstr(mk, "<title>missed [Layer 1, Position a_0]</title>"));
    /* panels side by side: three translate() x offsets, increasing, one y */
    double xs[3], ys[3];
    const char *q = svg;
    for (int k = 0; k < 3; k++) {
        q = strstr(q, "class=\"panel heatmap\" transform=\"translate(");
        assert_non_null(q);
        q += strlen("class=\"panel heatmap\" transform=\"translate(");
        assert_int_equal(sscanf(q, "%lf,%lf", &xs[k], &ys[k]), 2);
    }
    assert_true(xs[0] < xs[1] && xs[1] < xs[2] && ys[0] == ys[1] && ys[1] == ys[2]);
    free(svg);
    /* a bad scale is refused */
    const double bad[] = {1.0, 0.0, 4.0};
    mem_open(&m);
    assert_int_equal(plot_write_heatmap_grid(m.out, "g.svg", &fig, p, 3, 3, bad), PS_ERR_INVALID);
    free(mem_close(&m));
}

/* The scatter: NaN points left out, outliers the largest |y - x|, y = x. */
static void test_scatter(void **state)
{
    (void)state;
    const double x[] = {0.0, 1.0, 0.5, NAN, -0.5, 0.2}, y[] = {0.1, 0.2, 0.5, 1.0, 0.5, 0.2};
    const char *labels[] = {"p0", "p1", "p2", "p3", "p4", "p5"};
    plot_scatter s = {.title = "S", .x_name = "exact", .y_name = "estimate", .n = 6, .x = x, .y = y,
                      .labels = labels, .n_labelled = 2};
    plot_figure fig = {.title = "T"};
    membuf m;
    mem_open(&m);
    assert_int_equal(plot_write_scatter(m.out, "s.svg", &fig, &s), PS_OK);
    char *svg = mem_close(&m);
    size_t n_points = 0, n_out = 0;
    for (const char *q = svg; (q = strstr(q, "<circle class=\"point")); q++) {
        n_points++;
        n_out += !strncmp(q, "<circle class=\"point outlier\"", 29);
    }
    assert_int_equal(n_points, 5); /* p3 has a NaN x */
    assert_int_equal(n_out, 2);
    assert_null(strstr(svg, "p3:"));
    /* |y - x|: p4 1.0, p1 0.8, then p0 0.1: the two labelled are p4 and p1 */
    assert_non_null(strstr(svg, "class=\"outlier-label\" dy=\"0.35em\">p4</text>"));
    assert_non_null(strstr(svg, "class=\"outlier-label\" dy=\"0.35em\">p1</text>"));
    assert_null(strstr(svg, ">p0</text>"));
    assert_non_null(strstr(svg, "<title>p1: exact = 1, estimate = 0.2, difference = -0.8</title>"));
    /* the identity line: a 45-degree diagonal of the square */
    const char *ln = strstr(svg, "class=\"identity\"");
    assert_non_null(ln);
    double x1, y1, x2, y2;
    assert_int_equal(sscanf(ln, "class=\"identity\" x1=\"%lf\" y1=\"%lf\" x2=\"%lf\" y2=\"%lf\"", &x1, &y1, &x2, &y2),
                     4);
    assert_true(x2 > x1 && fabs((x2 - x1) - (y1 - y2)) < 1e-6);
    /* p2 lies on y = x: its centre is on the line */
    const char *p2 = strstr(svg, "<title>p2:");
    assert_non_null(p2);
    const char *c = p2;
    while (c > svg && strncmp(c, "<circle", 7))
        c--;
    double cx, cy;
    assert_int_equal(sscanf(strstr(c, "cx="), "cx=\"%lf\" cy=\"%lf\"", &cx, &cy), 2);
    assert_true(fabs((cx - x1) - (y1 - cy)) < 0.02);
    free(svg);
    /* nothing finite: refused */
    const double nx[] = {NAN};
    plot_scatter e = {.n = 1, .x = nx, .y = nx, .labels = labels};
    mem_open(&m);
    assert_int_equal(plot_write_scatter(m.out, "s.svg", &fig, &e), PS_ERR_INVALID);
    free(mem_close(&m));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_colormap_endpoints_and_middle),
        cmocka_unit_test(test_colormap_interpolates_linearly),
        cmocka_unit_test(test_nan_colour),
        cmocka_unit_test(test_xml_escape),
        cmocka_unit_test(test_token_label),
        cmocka_unit_test(test_heatmap_svg),
        cmocka_unit_test(test_heatmap_mean_hover_and_bad_range),
        cmocka_unit_test(test_lines_svg),
        cmocka_unit_test(test_lines_extreme_values),
        cmocka_unit_test(test_write_error_names_output),
        cmocka_unit_test(test_heatmap_grid),
        cmocka_unit_test(test_scatter),
    };
    return cmocka_run_group_tests_name("plot", tests, NULL, NULL);
}
