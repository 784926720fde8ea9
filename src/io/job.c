#include "job.h"

#include <errno.h>
#include <ini.h>
#include <locale.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fsutil.h"
#include "sha256.h"
#include "strutil.h"

/* ---- the keys ------------------------------------------------------------- */

typedef enum {
    KEY_MODEL_DIR,
    KEY_MODEL_TOKENIZER,
    KEY_MODEL_COMPUTE,
    KEY_DATA_DATASET,
    KEY_DATA_BOS,
    KEY_DATA_SKIP_INVALID,
    KEY_DATA_MAX_PROMPTS,
    KEY_PATCH_COMPONENTS,
    KEY_PATCH_METRIC,
    KEY_PATCH_DIRECTION,
    KEY_PATCH_ENGINE,
    KEY_PATCH_METHOD,
    KEY_PATCH_SOURCE,
    KEY_PATCH_MEAN_OVER,
    KEY_PATCH_RESAMPLE_SEED,
    KEY_PATCH_GRADDROP,
    KEY_PATCH_VERIFY_TOP_K,
    KEY_PATCH_VERIFY_THRESHOLD,
    KEY_RUN_OUTPUT,
    KEY_RUN_CHUNK_PROMPTS,
    KEY_RUN_THREADS,
    KEY_RUN_WORK_MIB,
    KEY_RUN_PROGRESS_SECONDS,
    KEY_RUN_DISTRIBUTE,
    KEY_LENS_ENABLED,
    KEY_LENS_TOP_K,
    KEY_LENS_OUTPUT,
    KEY_COUNT
} key_id;

static const struct {
    const char *section, *name;
} key_names[KEY_COUNT] = {
    [KEY_MODEL_DIR] = {"model", "dir"},
    [KEY_MODEL_TOKENIZER] = {"model", "tokenizer"},
    [KEY_MODEL_COMPUTE] = {"model", "compute"},
    [KEY_DATA_DATASET] = {"data", "dataset"},
    [KEY_DATA_BOS] = {"data", "bos"},
    [KEY_DATA_SKIP_INVALID] = {"data", "skip_invalid"},
    [KEY_DATA_MAX_PROMPTS] = {"data", "max_prompts"},
    [KEY_PATCH_COMPONENTS] = {"patch", "components"},
    [KEY_PATCH_METRIC] = {"patch", "metric"},
    [KEY_PATCH_DIRECTION] = {"patch", "direction"},
    [KEY_PATCH_ENGINE] = {"patch", "engine"},
    [KEY_PATCH_METHOD] = {"patch", "method"},
    [KEY_PATCH_SOURCE] = {"patch", "source"},
    [KEY_PATCH_MEAN_OVER] = {"patch", "mean_over"},
    [KEY_PATCH_RESAMPLE_SEED] = {"patch", "resample_seed"},
    [KEY_PATCH_GRADDROP] = {"patch", "graddrop"},
    [KEY_PATCH_VERIFY_TOP_K] = {"patch", "verify_top_k"},
    [KEY_PATCH_VERIFY_THRESHOLD] = {"patch", "verify_threshold"},
    [KEY_RUN_OUTPUT] = {"run", "output"},
    [KEY_RUN_CHUNK_PROMPTS] = {"run", "chunk_prompts"},
    [KEY_RUN_THREADS] = {"run", "threads"},
    [KEY_RUN_WORK_MIB] = {"run", "work_mib"},
    [KEY_RUN_PROGRESS_SECONDS] = {"run", "progress_seconds"},
    [KEY_RUN_DISTRIBUTE] = {"run", "distribute"},
    [KEY_LENS_ENABLED] = {"lens", "enabled"},
    [KEY_LENS_TOP_K] = {"lens", "top_k"},
    [KEY_LENS_OUTPUT] = {"lens", "output"},
};

static const char *const section_names[] = {"model", "data", "patch", "run", "lens"};
#define SECTION_COUNT (sizeof section_names / sizeof section_names[0])

static bool section_known(const char *s, size_t len)
{
    for (size_t i = 0; i < SECTION_COUNT; i++)
        if (strlen(section_names[i]) == len && !memcmp(section_names[i], s, len))
            return true;
    return false;
}

/* ---- parser state ---------------------------------------------------------- */

typedef struct {
    job *j;
    const char *path;
    char *dir;              /* base of relative paths */
    const char *cur;        /* the next line the reader hands to inih */
    size_t line;            /* 1-based number of the line inih is working on */
    /* Mirrors inih's "previous name": set by every key line, cleared by a
     * section header; while set, inih reads an indented line as the
     * continuation of that key's value. */
    bool key_since_header;
    key_id last_key;        /* the key of the latest key line */
    size_t key_line[KEY_COUNT]; /* where each key was set (0: absent) */
    ps_status st;           /* the first error we found, at err_line */
    size_t err_line;
} parse_state;

/* Record an error at `line` unless one is already recorded: err_msg() must
 * keep the first problem of the file, so nothing later may overwrite it. */
__attribute__((format(printf, 4, 5))) static void fail_at(parse_state *s, size_t line, ps_status st,
                                                         const char *fmt, ...)
{
    if (s->st != PS_OK)
        return;
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    s->st = err_set(st, "%s:%zu: %s", s->path, line, msg);
    s->err_line = line;
}

/* ---- the reader: raw-line checks inih cannot make ------------------------- */

static bool is_blank(char c) { return c == ' ' || c == '\t' || c == '\r'; }

/* Checks of one raw line line[0..len) (without its '\n'); records the first
 * problem.  These run before inih sees the line, because inih either cannot
 * report them (it has no notion of encodings) or accepts them silently (text
 * after a section header, a value continued on an indented line). */
static void check_raw_line(parse_state *s, const char *line, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)line[i];
        bool crlf = c == '\r' && i + 1 == len;
        if ((c < 0x20 && c != '\t' && !crlf) || c == 0x7f) {
            fail_at(s, s->line, PS_ERR_FORMAT, "control character 0x%02x in column %zu (only tab is allowed)", c,
                    i + 1);
            return;
        }
    }
    if (!str_utf8_valid(line, len)) {
        fail_at(s, s->line, PS_ERR_FORMAT, "invalid UTF-8");
        return;
    }
    const char *end = line + len;
    const char *p = line;
    /* inih skips a UTF-8 byte order mark at the start of the first line. */
    if (s->line == 1 && len >= 3 && !memcmp(p, "\xEF\xBB\xBF", 3))
        p += 3;
    const char *text_start = p;
    while (p < end && is_blank(*p))
        p++;
    if (p == end || *p == ';' || *p == '#')
        return;
    if (s->key_since_header && p > text_start) {
        fail_at(s, s->line, PS_ERR_FORMAT,
                "indented line would continue the value of [%s] %s (multi-line values are not allowed; remove "
                "the indentation)",
                key_names[s->last_key].section, key_names[s->last_key].name);
        return;
    }
    if (*p != '[')
        return;
    s->key_since_header = false;
    const char *close = memchr(p, ']', (size_t)(end - p));
    if (!close)
        return; /* inih reports the header without ']' as a parse error */
    const char *name = p + 1;
    size_t name_len = (size_t)(close - name);
    if (!section_known(name, name_len)) {
        fail_at(s, s->line, PS_ERR_INVALID, "unknown section [%.*s] (model, data, patch, run or lens)", (int)name_len,
                name);
        return;
    }
    /* inih ignores whatever follows ']', which would hide e.g. a key written
     * on the header's line; only a comment may follow. */
    const char *q = close + 1;
    while (q < end && is_blank(*q))
        q++;
    if (q < end && *q != ';')
        fail_at(s, s->line, PS_ERR_FORMAT, "text after the section header [%.*s] (only a ; comment may follow)",
                (int)name_len, name);
}

/* fgets-style reader handing inih one line of the text at a time, so the
 * handler always knows the line number (Debian builds inih without
 * INI_HANDLER_LINENO). */
static char *read_line(char *buf, int num, void *stream)
{
    parse_state *s = stream;
    if (s->st != PS_OK || !*s->cur)
        return NULL;
    s->line++;
    const char *nl = strchr(s->cur, '\n');
    size_t len = nl ? (size_t)(nl - s->cur) : strlen(s->cur);
    /* inih's buffer holds num - 1 bytes, the '\n' included; a longer line
     * would reach inih in pieces, each taken for a line of its own. */
    size_t limit = num > 2 ? (size_t)num - 2 : 0;
    if (len > limit) {
        fail_at(s, s->line, PS_ERR_FORMAT, "line of %zu bytes, over the INI parser's limit of %zu bytes", len, limit);
        return NULL;
    }
    check_raw_line(s, s->cur, len);
    if (s->st != PS_OK)
        return NULL;
    size_t take = nl ? len + 1 : len;
    memcpy(buf, s->cur, take);
    buf[take] = '\0';
    s->cur += take;
    return buf;
}

/* ---- values ---------------------------------------------------------------- */

static ps_status parse_bool(const char *v, bool *out)
{
    static const char *const yes[] = {"true", "yes", "1"}, *const no[] = {"false", "no", "0"};
    for (size_t i = 0; i < 3; i++) {
        if (!strcasecmp(v, yes[i])) {
            *out = true;
            return PS_OK;
        }
        if (!strcasecmp(v, no[i])) {
            *out = false;
            return PS_OK;
        }
    }
    return err_set(PS_ERR_INVALID, "bad boolean '%s' (true, false, yes, no, 1 or 0)", v);
}

/* A plain decimal integer in [lo, hi]; zero_ok admits 0 below lo (the
 * "automatic" value of several keys). */
static ps_status parse_size(const char *v, size_t lo, size_t hi, bool zero_ok, size_t *out)
{
    const char *d = v[0] == '-' ? v + 1 : v;
    if (!*d || strspn(d, "0123456789") != strlen(d))
        return err_set(PS_ERR_INVALID, "'%s' is not a non-negative decimal integer", v);
    if (d != v)
        return err_set(PS_ERR_INVALID, "'%s' is negative", v);
    size_t x = 0;
    for (const char *p = d; *p; p++) {
        size_t digit = (size_t)(*p - '0');
        if (x > (SIZE_MAX - digit) / 10)
            return err_set(PS_ERR_INVALID, "'%s' is too large", v);
        x = x * 10 + digit;
    }
    if (!(zero_ok && x == 0) && (x < lo || x > hi)) {
        if (zero_ok)
            return err_set(PS_ERR_INVALID, "%zu is out of range (0 for automatic, or %zu..%zu)", x, lo, hi);
        return err_set(PS_ERR_INVALID, "%zu is out of range (%zu..%zu)", x, lo, hi);
    }
    *out = x;
    return PS_OK;
}

/* True if v is a decimal number: [-+]digits[.digits][e[-+]digits], with
 * digits on at least one side of the point.  strtod alone would also take
 * hex, "inf" and "nan". */
static bool is_decimal(const char *v)
{
    const char *p = v;
    if (*p == '+' || *p == '-')
        p++;
    size_t int_digits = strspn(p, "0123456789");
    p += int_digits;
    size_t frac_digits = 0;
    if (*p == '.') {
        p++;
        frac_digits = strspn(p, "0123456789");
        p += frac_digits;
    }
    if (int_digits + frac_digits == 0)
        return false;
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '+' || *p == '-')
            p++;
        size_t exp_digits = strspn(p, "0123456789");
        if (exp_digits == 0)
            return false;
        p += exp_digits;
    }
    return *p == '\0';
}

static ps_status parse_seconds(const char *v, double *out)
{
    if (!is_decimal(v))
        return err_set(PS_ERR_INVALID, "'%s' is not a decimal number", v);
    /* The job file means the same under any locale the caller may have set:
     * the decimal separator is always '.'. */
    locale_t c = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    if (c == (locale_t)0)
        return err_set(PS_ERR_NOMEM, "cannot create the C locale");
    double x = strtod_l(v, NULL, c);
    freelocale(c);
    if (!isfinite(x))
        return err_set(PS_ERR_INVALID, "'%s' is too large", v);
    if (!(x > 0))
        return err_set(PS_ERR_INVALID, "'%s' is not greater than 0", v);
    *out = x;
    return PS_OK;
}

/* Components with the blanks around each item dropped, then patch.c's parser
 * (whose messages name the bad component and list the valid ones). */
static ps_status parse_components(const char *v, bool on[PATCH_COMPONENT_COUNT])
{
    char *list = malloc(strlen(v) + 1);
    if (!list)
        return err_set(PS_ERR_NOMEM, "out of memory");
    size_t n = 0;
    const char *p = v;
    for (bool more = true; more;) {
        const char *a;
        size_t len;
        more = str_list_next(&p, &a, &len);
        memcpy(list + n, a, len);
        n += len;
        if (more)
            list[n++] = ',';
    }
    list[n] = '\0';
    ps_status st = patch_components_parse(list, on);
    free(list);
    return st;
}

static ps_status parse_direction(const char *v, patch_direction *out)
{
    if (!strcmp(v, "denoise"))
        *out = PATCH_DENOISE;
    else if (!strcmp(v, "noise"))
        *out = PATCH_NOISE;
    else
        return err_set(PS_ERR_INVALID, "unknown direction '%s' (denoise or noise)", v);
    return PS_OK;
}

static ps_status parse_engine(const char *v, patch_engine *out)
{
    if (!strcmp(v, "fast"))
        *out = PATCH_ENGINE_FAST;
    else if (!strcmp(v, "naive"))
        *out = PATCH_ENGINE_NAIVE;
    else
        return err_set(PS_ERR_INVALID, "unknown engine '%s' (fast or naive)", v);
    return PS_OK;
}

static ps_status parse_distribute(const char *v, job_distribute *out)
{
    if (!strcmp(v, "auto"))
        *out = JOB_DISTRIBUTE_AUTO;
    else if (!strcmp(v, "prompts"))
        *out = JOB_DISTRIBUTE_PROMPTS;
    else if (!strcmp(v, "cells"))
        *out = JOB_DISTRIBUTE_CELLS;
    else
        return err_set(PS_ERR_INVALID, "unknown distribution '%s' (auto, prompts or cells)", v);
    return PS_OK;
}

static ps_status parse_path(const parse_state *s, const char *v, bool want_nc, char **out)
{
    if (want_nc) {
        size_t n = strlen(v);
        if (n < 4 || strcmp(v + n - 3, ".nc") != 0)
            return err_set(PS_ERR_INVALID, "'%s' does not end in .nc", v);
    }
    char *p = v[0] == '/' ? strdup(v) : fs_join(s->dir, v);
    if (!p)
        return err_set(PS_ERR_NOMEM, "out of memory");
    free(*out);
    *out = p;
    return PS_OK;
}

static ps_status parse_method(const char *v, patch_method *out)
{
    if (patch_method_parse(v, out) != PS_OK)
        return err_set(PS_ERR_INVALID, "unknown method '%s' (exact, atp, atp*, atp+exact, atp*+exact, atp+verify or "
                       "atp*+verify)", v);
    return PS_OK;
}

static ps_status set_value(parse_state *s, key_id k, const char *v)
{
    job *j = s->j;
    switch (k) {
    case KEY_MODEL_DIR: return parse_path(s, v, false, &j->model_dir);
    case KEY_MODEL_TOKENIZER: return parse_path(s, v, false, &j->tokenizer_dir);
    case KEY_MODEL_COMPUTE:
        return model_compute_parse(v, &j->compute) ? PS_OK
                                                   : err_set(PS_ERR_INVALID, "unknown compute '%s' (f32 or bf16)", v);
    case KEY_DATA_DATASET: return parse_path(s, v, false, &j->dataset);
    case KEY_DATA_BOS: return parse_bool(v, &j->bos);
    case KEY_DATA_SKIP_INVALID: return parse_bool(v, &j->skip_invalid);
    case KEY_DATA_MAX_PROMPTS: return parse_size(v, 0, SIZE_MAX, false, &j->max_prompts);
    case KEY_PATCH_COMPONENTS: return parse_components(v, j->components);
    case KEY_PATCH_METRIC: {
        ps_status st = patch_metric_list_parse(v, &j->metrics);
        j->metric = j->metrics.m[0];
        return st;
    }
    case KEY_PATCH_DIRECTION: return parse_direction(v, &j->direction);
    case KEY_PATCH_ENGINE: return parse_engine(v, &j->engine);
    case KEY_PATCH_METHOD: return parse_method(v, &j->method);
    case KEY_PATCH_GRADDROP: return parse_bool(v, &j->graddrop);
    case KEY_PATCH_VERIFY_TOP_K: return parse_size(v, 1, JOB_VERIFY_TOP_K_MAX, false, &j->verify_top_k);
    case KEY_PATCH_VERIFY_THRESHOLD:
        /* a threshold would make the verified cells' number per prompt vary; not implemented */
        return err_set(PS_ERR_INVALID, "verify_threshold is not implemented (use verify_top_k: the top K cells of "
                       "each grid)");
    case KEY_PATCH_SOURCE: return patch_source_parse(v, &j->source);
    case KEY_PATCH_RESAMPLE_SEED: return parse_size(v, 0, (size_t)1 << 53, false, &j->resample_seed);
    case KEY_PATCH_MEAN_OVER: {
        patch_subset sub;
        ps_status st = patch_subset_parse(v, &sub);
        if (st == PS_OK && !(j->mean_over = strdup(v)))
            st = err_set(PS_ERR_NOMEM, "out of memory");
        return st;
    }
    case KEY_RUN_OUTPUT: return parse_path(s, v, true, &j->output);
    case KEY_RUN_CHUNK_PROMPTS: return parse_size(v, 1, JOB_CHUNK_PROMPTS_MAX, true, &j->chunk_prompts);
    case KEY_RUN_THREADS: return parse_size(v, 1, JOB_THREADS_MAX, true, &j->threads);
    case KEY_RUN_DISTRIBUTE: return parse_distribute(v, &j->distribute);
    case KEY_RUN_WORK_MIB: return parse_size(v, 1, JOB_WORK_MIB_MAX, true, &j->work_mib);
    case KEY_RUN_PROGRESS_SECONDS: return parse_seconds(v, &j->progress_seconds);
    case KEY_LENS_ENABLED: return parse_bool(v, &j->lens);
    case KEY_LENS_TOP_K: return parse_size(v, 1, JOB_LENS_TOP_K_MAX, false, &j->lens_top_k);
    case KEY_LENS_OUTPUT: return parse_path(s, v, true, &j->lens_output);
    case KEY_COUNT: break;
    }
    return err_set(PS_ERR_INTERNAL, "key %d has no parser", (int)k);
}

/* "dir, tokenizer": the keys of a section, for the unknown-key message. */
static void section_keys(const char *section, char *buf, size_t size)
{
    size_t n = 0;
    buf[0] = '\0';
    for (size_t k = 0; k < KEY_COUNT; k++) {
        if (strcmp(key_names[k].section, section) != 0)
            continue;
        int w = snprintf(buf + n, size - n, "%s%s", n ? ", " : "", key_names[k].name);
        if (w < 0 || (size_t)w >= size - n)
            return;
        n += (size_t)w;
    }
}

/* True if v holds a blank followed by '#': an intended comment that inih
 * would keep as part of the value. */
static bool has_hash_comment(const char *v)
{
    for (const char *p = v; *p; p++)
        if (*p == '#' && p > v && (p[-1] == ' ' || p[-1] == '\t'))
            return true;
    return false;
}

static int handle_key(void *user, const char *section, const char *name, const char *value)
{
    parse_state *s = user;
    if (s->st != PS_OK)
        return 0;
    s->key_since_header = true;
    size_t line = s->line;
    if (!*section) {
        fail_at(s, line, PS_ERR_FORMAT, "key '%s' before any [section]", name);
        return 0;
    }
    key_id k = KEY_COUNT;
    for (size_t i = 0; i < KEY_COUNT; i++)
        if (!strcmp(key_names[i].section, section) && !strcmp(key_names[i].name, name))
            k = (key_id)i;
    if (k == KEY_COUNT) {
        char keys[256];
        section_keys(section, keys, sizeof keys);
        fail_at(s, line, PS_ERR_INVALID, "unknown key '%s' in [%s] (%s)", name, section, keys);
        return 0;
    }
    if (s->key_line[k]) {
        fail_at(s, line, PS_ERR_INVALID, "duplicated key [%s] %s (first set on line %zu)", section, name,
                s->key_line[k]);
        return 0;
    }
    s->key_line[k] = line;
    s->last_key = k;
    if (!*value) {
        fail_at(s, line, PS_ERR_INVALID, "[%s] %s: empty value", section, name);
        return 0;
    }
    if (has_hash_comment(value)) {
        fail_at(s, line, PS_ERR_INVALID,
                "[%s] %s: '#' after a value is not a comment (use ' ; comment'): '%s'", section, name, value);
        return 0;
    }
    ps_status st = set_value(s, k, value);
    if (st != PS_OK) {
        s->st = err_wrap(st, "%s:%zu: [%s] %s", s->path, line, section, name);
        s->err_line = line;
        return 0;
    }
    return 1;
}

/* ---- checks of the whole file ---------------------------------------------- */

static ps_status check_complete(parse_state *s)
{
    static const key_id required[] = {KEY_MODEL_DIR, KEY_DATA_DATASET, KEY_RUN_OUTPUT};
    for (size_t i = 0; i < sizeof required / sizeof required[0]; i++) {
        key_id k = required[i];
        if (!s->key_line[k])
            return err_set(PS_ERR_INVALID, "%s: [%s] %s is required", s->path, key_names[k].section,
                           key_names[k].name);
    }
    const job *j = s->j;
    if (j->lens && !j->lens_output)
        return err_set(PS_ERR_INVALID, "%s:%zu: [lens] enabled = true but [lens] output is missing", s->path,
                       s->key_line[KEY_LENS_ENABLED]);
    if (patch_method_estimates(j->method) && j->distribute == JOB_DISTRIBUTE_CELLS)
        return err_set(PS_ERR_INVALID, "%s:%zu: [run] distribute = cells needs [patch] method = exact (an "
                       "attribution method runs each prompt's backward pass whole, by prompt)", s->path,
                       s->key_line[KEY_RUN_DISTRIBUTE]);
    /* the source and the direction (patchspec.h): an ablation ablates the clean run unless direction = denoise */
    const size_t src_line = s->key_line[KEY_PATCH_SOURCE];
    if (!src_line)
        s->j->source = j->direction == PATCH_NOISE ? PATCH_SOURCE_CORRUPTED : PATCH_SOURCE_CLEAN;
    else if (patch_source_direction(j->source, s->key_line[KEY_PATCH_DIRECTION] != 0, &s->j->direction) != PS_OK)
        return err_set(PS_ERR_INVALID, "%s:%zu: [patch] %s", s->path, src_line, err_msg());
    if (s->key_line[KEY_PATCH_RESAMPLE_SEED] && j->source != PATCH_SOURCE_RESAMPLE)
        return err_set(PS_ERR_INVALID, "%s:%zu: [patch] resample_seed applies to source = resample only", s->path,
                       s->key_line[KEY_PATCH_RESAMPLE_SEED]);
    if (j->mean_over && j->source != PATCH_SOURCE_MEAN)
        return err_set(PS_ERR_INVALID, "%s:%zu: [patch] mean_over applies to source = mean only", s->path,
                       s->key_line[KEY_PATCH_MEAN_OVER]);
    /* attribution patching estimates clean/corrupted swaps of one metric (atp.h) */
    if (patch_method_estimates(j->method) && patch_source_ablation(j->source))
        return err_set(PS_ERR_INVALID, "%s:%zu: [patch] method = %s takes source = clean or corrupted, not %s",
                       s->path, s->key_line[KEY_PATCH_METHOD], patch_method_name(j->method),
                       patch_source_name(j->source));
    if (patch_method_estimates(j->method) && j->metrics.n > 1)
        return err_set(PS_ERR_INVALID, "%s:%zu: [patch] method = %s takes one metric (metric lists %zu)", s->path,
                       s->key_line[KEY_PATCH_METHOD], patch_method_name(j->method), j->metrics.n);
    if (j->graddrop && !patch_method_estimates(j->method))
        return err_set(PS_ERR_INVALID, "%s:%zu: [patch] graddrop = true needs an attribution method (method = atp, "
                       "atp*, atp+exact, atp*+exact, atp+verify or atp*+verify)", s->path, s->key_line[KEY_PATCH_GRADDROP]);
    if (s->key_line[KEY_PATCH_VERIFY_TOP_K] && !patch_method_verifies(j->method))
        return err_set(PS_ERR_INVALID, "%s:%zu: [patch] verify_top_k applies to method = atp+verify or atp*+verify "
                       "only", s->path, s->key_line[KEY_PATCH_VERIFY_TOP_K]);
    if (j->lens_output && !strcmp(j->lens_output, j->output))
        return err_set(PS_ERR_INVALID, "%s:%zu: [lens] output is the same file as [run] output (line %zu)", s->path,
                       s->key_line[KEY_LENS_OUTPUT], s->key_line[KEY_RUN_OUTPUT]);
    return PS_OK;
}

/* ---- API ------------------------------------------------------------------- */

void job_free(job *j)
{
    free(j->path);
    free(j->text);
    free(j->model_dir);
    free(j->tokenizer_dir);
    free(j->dataset);
    free(j->output);
    free(j->lens_output);
    free(j->mean_over);
    memset(j, 0, sizeof *j);
}

ps_status job_parse(job *j, const char *path, const char *text)
{
    memset(j, 0, sizeof *j);
    j->components[PATCH_RESID_PRE] = true;
    j->metric = PATCH_LOGIT_DIFF;
    j->metrics = (patch_metric_list){.n = 1, .m = {PATCH_LOGIT_DIFF}};
    j->direction = PATCH_DENOISE;
    j->engine = PATCH_ENGINE_FAST;
    j->source = PATCH_SOURCE_CLEAN; /* with denoise: the direction's usual source */
    j->bos = true;
    j->progress_seconds = 10.0;
    j->lens_top_k = 10;
    j->verify_top_k = PATCH_VERIFY_TOP_K;

    parse_state s = {.j = j, .path = path, .cur = text};
    j->path = strdup(path);
    j->text = strdup(text);
    s.dir = fs_dirname(path);
    if (!j->path || !j->text || !s.dir) {
        free(s.dir);
        job_free(j);
        return err_set(PS_ERR_NOMEM, "%s: out of memory", path);
    }
    sha256_hex(text, strlen(text), j->sha256);

    int bad_line = ini_parse_stream(read_line, &s, handle_key, &s);
    ps_status st = s.st;
    /* inih keeps parsing after a line it cannot read and returns the first
     * such line; ours stop at the first problem, so the earlier one wins
     * (same line: our message is the more precise). */
    if (bad_line > 0 && (st == PS_OK || (size_t)bad_line < s.err_line))
        st = err_set(PS_ERR_FORMAT,
                     "%s:%d: cannot parse this line (expected [section], key = value, or a comment starting with ; "
                     "or #)",
                     path, bad_line);
    else if (bad_line < 0 && st == PS_OK)
        st = err_set(bad_line == -2 ? PS_ERR_NOMEM : PS_ERR_INTERNAL, "%s: the INI parser failed (%d)", path,
                     bad_line);
    if (st == PS_OK)
        st = check_complete(&s);
    j->model_dir_line = s.key_line[KEY_MODEL_DIR];
    j->lens_output_line = s.key_line[KEY_LENS_OUTPUT];
    free(s.dir);
    if (st != PS_OK)
        job_free(j);
    return st;
}

ps_status job_check_paths(const job *j, bool lens)
{
    struct stat sb;
    if (stat(j->model_dir, &sb) != 0)
        return err_set(PS_ERR_IO, "%s:%zu: [model] dir: '%s' %s", j->path, j->model_dir_line, j->model_dir,
                       errno == ENOENT ? "does not exist" : strerror(errno));
    if (!S_ISDIR(sb.st_mode))
        return err_set(PS_ERR_IO, "%s:%zu: [model] dir: '%s' is not a directory", j->path, j->model_dir_line,
                       j->model_dir);
    if (!lens || !j->lens_output)
        return PS_OK;
    /* the lens file is written after the whole sweep: a directory that is
     * not there must stop the job now, not after the computation */
    char *dir = fs_dirname(j->lens_output);
    if (!dir)
        return err_set(PS_ERR_NOMEM, "%s: out of memory", j->path);
    ps_status st = PS_OK;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
        st = err_set(PS_ERR_IO, "%s:%zu: [lens] output: directory '%s' of '%s' does not exist", j->path,
                     j->lens_output_line, dir, j->lens_output);
    else if (access(dir, W_OK) != 0)
        st = err_set(PS_ERR_IO, "%s:%zu: [lens] output: directory '%s' is not writable", j->path,
                     j->lens_output_line, dir);
    free(dir);
    return st;
}

ps_status job_parse_mem(job *j, const char *path, const char *buf, size_t len)
{
    memset(j, 0, sizeof *j);
    if (len > JOB_MAX_BYTES)
        return err_set(PS_ERR_NOMEM, "%s: file is %zu bytes, over the limit of %zu bytes", path, len,
                       JOB_MAX_BYTES);
    const char *nul = memchr(buf, '\0', len);
    if (nul) {
        size_t line = 1;
        for (const char *p = buf; p < nul; p++)
            line += *p == '\n';
        return err_set(PS_ERR_FORMAT, "%s:%zu: NUL byte", path, line);
    }
    char *text = malloc(len + 1);
    if (!text)
        return err_set(PS_ERR_NOMEM, "%s: out of memory", path);
    memcpy(text, buf, len);
    text[len] = '\0';
    ps_status st = job_parse(j, path, text);
    free(text);
    return st;
}

ps_status job_load(job *j, const char *path)
{
    memset(j, 0, sizeof *j);
    char *text;
    size_t len;
    ps_status st = fs_read_file(path, JOB_MAX_BYTES, &text, &len);
    if (st != PS_OK)
        return st;
    st = job_parse_mem(j, path, text, len);
    free(text);
    return st;
}
