#include "schema.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ncin.h"

const char *const schema_identity_atts[SCHEMA_N_IDENTITY_ATTS] = {
    SCHEMA_ATT_JOB_SHA256, SCHEMA_ATT_MODEL_SHA256, SCHEMA_ATT_DATASET_SHA256,
    SCHEMA_ATT_METRIC,     SCHEMA_ATT_DIRECTION,    SCHEMA_ATT_ENGINE};

/* A run of decimal digits worth 1..max; *end after it.  (Leading zeros
 * are allowed: `sweep --slice 01/4` always was.) */
static bool parse_count(const char *s, size_t max, size_t *out, const char **end)
{
    if (*s < '0' || *s > '9')
        return false;
    size_t v = 0;
    for (; *s >= '0' && *s <= '9'; s++) {
        size_t d = (size_t)(*s - '0');
        if (v > (SIZE_MAX - d) / 10)
            return false;
        v = v * 10 + d;
    }
    if (v < 1 || v > max)
        return false;
    *out = v;
    *end = s;
    return true;
}

bool schema_parse_slice(const char *s, size_t max_n, size_t *k, size_t *n)
{
    size_t a, b;
    const char *end;
    if (!s || !parse_count(s, max_n, &a, &end) || *end != '/' || !parse_count(end + 1, max_n, &b, &end) || *end ||
        a > b)
        return false;
    *k = a;
    *n = b;
    return true;
}

bool schema_is_complete_run(const char *path, const char *job_sha256, const char *model_sha256,
                            const char *dataset_sha256, const char *slice)
{
    const char *const want[][2] = {{SCHEMA_ATT_JOB_SHA256, job_sha256},
                                   {SCHEMA_ATT_MODEL_SHA256, model_sha256},
                                   {SCHEMA_ATT_DATASET_SHA256, dataset_sha256},
                                   {SCHEMA_ATT_SLICE, slice},
                                   {SCHEMA_ATT_COMPLETE, SCHEMA_TRUE}};
    ncin_file f;
    if (ncin_open(&f, path) != PS_OK)
        return false;
    bool same = true;
    for (size_t i = 0; i < sizeof want / sizeof want[0] && same; i++) {
        char *v = NULL;
        same = ncin_get_text_att(&f, NULL, want[i][0], &v) == PS_OK && v && !strcmp(v, want[i][1]);
        free(v);
    }
    ncin_close(&f);
    return same;
}
