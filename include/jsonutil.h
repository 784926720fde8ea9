/*
 * jsonutil: what the readers of untrusted JSON (config.json, safetensors
 * headers, JSONL datasets) share.
 */
#ifndef PS_JSONUTIL_H
#define PS_JSONUTIL_H

#include <jansson.h>

/* "an object", "an array", "a string", "an integer", "a real number",
 * "a boolean", "null": for messages such as "field 'n_layer' is a string". */
const char *jsonutil_kind(const json_t *v);

#endif
