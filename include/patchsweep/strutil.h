/*
 * strutil: text helpers for output (display strings of tokens, JSON) and
 * for comma-separated lists of settings.
 */
#ifndef PS_STRUTIL_H
#define PS_STRUTIL_H

#include <stdbool.h>
#include <stddef.h>

/* The next item of a comma-separated list: *item and *len the text from *p
 * to the next comma (or the end) without its leading and trailing blanks
 * (spaces, tabs; *len may be 0); *p moves past that comma.  Returns true when
 * a comma followed (another item comes), false at the list's last item. */
bool str_list_next(const char **p, const char **item, size_t *len);

/* True if s[0..len) is valid UTF-8 (no overlongs, surrogates or > U+10FFFF). */
bool str_utf8_valid(const char *s, size_t len);

/* A malloc'd NUL-terminated copy of s[0..len) with every maximal invalid
 * UTF-8 subpart replaced by U+FFFD (how tokens that are a fragment of a
 * multi-byte character are shown; NetCDF strings and JSON need valid UTF-8).
 * NUL bytes become U+FFFD too, so the result is a C string. NULL on OOM. */
char *str_utf8_sanitize(const char *s, size_t len);

/* The one replacement loop behind str_utf8_sanitize and the tokenizer's
 * input repair: s[0..len) with every maximal invalid UTF-8 subpart replaced
 * by U+FFFD, written to out (when not NULL: room for 3 * len + 1 bytes, or
 * the *out_len of a first call with out = NULL, plus 1) and NUL-terminated;
 * *out_len (when not NULL) is the repaired length.  keep_nul: NUL bytes are
 * kept as characters (the tokenizer encodes them), else replaced.  Returns
 * the number of replacements (0: s was valid). */
size_t str_utf8_repair(const char *s, size_t len, bool keep_nul, char *out, size_t *out_len);

/* Length in bytes of the well-formed UTF-8 sequence at s[0..n) (1..4), or 0
 * if s does not start one; then *bad (if not NULL) is the length of its
 * maximal invalid subpart: the longest prefix that could still begin a
 * well-formed sequence, at least 1 (what one U+FFFD replaces). */
size_t str_utf8_seq_len(const unsigned char *s, size_t n, size_t *bad);

#endif
