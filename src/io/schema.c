#include "schema.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <netcdf.h>

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
                                   {SCHEMA_ATT_SLICE, slice}};
    ncin_file f;
    if (ncin_open(&f, path) != PS_OK)
        return false;
    /* complete: 1 (schema 2) or "true" (schema 1) */
    bool complete = false, present = false;
    bool same = schema_read_flag(&f, SCHEMA_ATT_COMPLETE, &complete, &present) == PS_OK && present && complete;
    for (size_t i = 0; i < sizeof want / sizeof want[0] && same; i++) {
        char *v = NULL;
        same = ncin_get_text_att(&f, NULL, want[i][0], &v) == PS_OK && v && !strcmp(v, want[i][1]);
        free(v);
    }
    ncin_close(&f);
    return same;
}

int schema_version(const ncin_file *f)
{
    nc_type type;
    size_t len;
    int v = 1;
    if (nc_inq_att(f->ncid, NC_GLOBAL, SCHEMA_ATT_SCHEMA, &type, &len) != NC_NOERR)
        return 1;
    if (len != 1 || type < NC_BYTE || type > NC_UINT64 || type == NC_CHAR || type == NC_FLOAT || type == NC_DOUBLE ||
        nc_get_att_int(f->ncid, NC_GLOBAL, SCHEMA_ATT_SCHEMA, &v) != NC_NOERR)
        return -1;
    return v;
}

ps_status schema_read_flag(const ncin_file *f, const char *name, bool *value, bool *present)
{
    *value = *present = false;
    nc_type type;
    size_t len;
    if (nc_inq_att(f->ncid, NC_GLOBAL, name, &type, &len) != NC_NOERR)
        return PS_OK;
    if (type == NC_CHAR || type == NC_STRING) {
        char *v = NULL;
        ps_status st = ncin_get_text_att(f, NULL, name, &v);
        if (st == PS_OK && v && (!strcmp(v, SCHEMA_TRUE) || !strcmp(v, SCHEMA_FALSE))) {
            *value = !strcmp(v, SCHEMA_TRUE);
            *present = true;
        } else if (st == PS_OK) {
            st = err_set(PS_ERR_FORMAT, "%s: global attribute '%s' is \"%s\", not 0 or 1", f->path, name, v ? v : "");
        }
        free(v);
        return st;
    }
    /* any integer type: xarray writes back what it read (int8, int32, int64) */
    long long v = -1;
    if (len == 1 && type >= NC_BYTE && type <= NC_UINT64 && type != NC_FLOAT && type != NC_DOUBLE &&
        nc_get_att_longlong(f->ncid, NC_GLOBAL, name, &v) == NC_NOERR && (v == 0 || v == 1)) {
        *value = v == 1;
        *present = true;
        return PS_OK;
    }
    return err_set(PS_ERR_FORMAT, "%s: global attribute '%s' is not 0 or 1", f->path, name);
}

const char *schema_prompt_index_var(const ncin_file *f)
{
    /* schema 2's coordinate; a schema 1 file has a prompt_index variable
     * and no variable named prompt */
    if (ncin_has_var(f, SCHEMA_VAR_PROMPT))
        return SCHEMA_VAR_PROMPT;
    if (ncin_has_var(f, SCHEMA_VAR_PROMPT_INDEX))
        return SCHEMA_VAR_PROMPT_INDEX;
    return NULL;
}
