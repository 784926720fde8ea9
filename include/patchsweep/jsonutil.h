/*
 * jsonutil: what the readers of untrusted JSON (config.json, safetensors
 * headers, JSONL datasets) share.
 */
#ifndef PS_JSONUTIL_H
#define PS_JSONUTIL_H

#include <jansson.h>
#include <stddef.h>

/* What jsonutil_scan_shape found past its limits. */
typedef enum { JSONUTIL_SHAPE_OK = 0, JSONUTIL_SHAPE_TOO_DEEP, JSONUTIL_SHAPE_TOO_MANY } jsonutil_shape;

/* One pass over raw JSON text s[0..n), before jansson allocates anything:
 * every value or key but the first of a container follows a ',' (a key's
 * value a ':'), the first the '[' or '{' that opens it, so counting those
 * bounds the values and keys.  Brackets and separators inside strings
 * (with \" escapes) do not count; invalid JSON that this scan misreads is
 * still refused by jansson afterwards.  Stops at the first byte where the
 * nesting passes max_depth or the count passes max_values (*at = its
 * index); *values = the count so far. */
jsonutil_shape jsonutil_scan_shape(const char *s, size_t n, size_t max_depth, size_t max_values, size_t *values,
                                   size_t *at);

/* "an object", "an array", "a string", "an integer", "a real number",
 * "a boolean", "null": for messages such as "field 'n_layer' is a string". */
const char *jsonutil_kind(const json_t *v);

#endif
