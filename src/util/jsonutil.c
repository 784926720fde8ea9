#include "jsonutil.h"

#include <stdbool.h>

const char *jsonutil_kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a real number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "?";
}

jsonutil_shape jsonutil_scan_shape(const char *s, size_t n, size_t max_depth, size_t max_values, size_t *values,
                                   size_t *at)
{
    size_t depth = 0, count = 1;
    bool in_string = false;
    jsonutil_shape r = JSONUTIL_SHAPE_OK;
    size_t i = 0;
    for (; i < n && r == JSONUTIL_SHAPE_OK; i++) {
        const char c = s[i];
        if (in_string) {
            if (c == '\\')
                i++;
            else if (c == '"')
                in_string = false;
        } else if (c == '"') {
            in_string = true;
        } else if (c == '{' || c == '[') {
            count++;
            if (++depth > max_depth)
                r = JSONUTIL_SHAPE_TOO_DEEP;
            else if (count > max_values)
                r = JSONUTIL_SHAPE_TOO_MANY;
        } else if (c == '}' || c == ']') {
            if (depth > 0)
                depth--;
        } else if (c == ',' || c == ':') {
            if (++count > max_values)
                r = JSONUTIL_SHAPE_TOO_MANY;
        }
    }
    *values = count;
    *at = r == JSONUTIL_SHAPE_OK ? n : i - 1;
    return r;
}
