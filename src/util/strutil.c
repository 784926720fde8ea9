#include "strutil.h"

#include <stdlib.h>
#include <string.h>

/* Unicode 15 Table 3-7 (well-formed byte sequences).  One U+FFFD per
 * maximal invalid subpart is the Unicode / WHATWG replacement rule that
 * node's Buffer.toString('utf8') and Python's decode(errors="replace") use. */
size_t str_utf8_seq_len(const unsigned char *s, size_t n, size_t *bad)
{
    size_t scratch;
    if (!bad)
        bad = &scratch;
    *bad = 1;
    if (n == 0)
        return 0;
    unsigned char b0 = s[0];
    size_t need;
    unsigned char lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (b0 < 0x80)
        return 1;
    if (b0 >= 0xC2 && b0 <= 0xDF) {
        need = 1;
    } else if (b0 == 0xE0) {
        need = 2;
        lo = 0xA0; /* no overlong 3-byte forms */
    } else if (b0 == 0xED) {
        need = 2;
        hi = 0x9F; /* no UTF-16 surrogates */
    } else if (b0 >= 0xE1 && b0 <= 0xEF) {
        need = 2;
    } else if (b0 == 0xF0) {
        need = 3;
        lo = 0x90; /* no overlong 4-byte forms */
    } else if (b0 >= 0xF1 && b0 <= 0xF3) {
        need = 3;
    } else if (b0 == 0xF4) {
        need = 3;
        hi = 0x8F; /* nothing above U+10FFFF */
    } else {
        return 0; /* 80..C1, F5..FF never start a sequence */
    }
    for (size_t k = 1; k <= need; k++) {
        if (k >= n || s[k] < lo || s[k] > hi) {
            *bad = k;
            return 0;
        }
        lo = 0x80;
        hi = 0xBF;
    }
    return need + 1;
}

bool str_utf8_valid(const char *s, size_t len)
{
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < len;) {
        size_t k = str_utf8_seq_len(u + i, len - i, NULL);
        if (k == 0)
            return false;
        i += k;
    }
    return true;
}

size_t str_utf8_repair(const char *s, size_t len, bool keep_nul, char *out, size_t *out_len)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t o = 0, n_bad = 0;
    for (size_t i = 0; i < len;) {
        size_t bad = 1, k = u[i] || keep_nul ? str_utf8_seq_len(u + i, len - i, &bad) : 0;
        if (k) {
            if (out)
                memcpy(out + o, u + i, k);
            o += k;
            i += k;
        } else {
            if (out)
                memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i += bad;
            n_bad++;
        }
    }
    if (out)
        out[o] = '\0';
    if (out_len)
        *out_len = o;
    return n_bad;
}

char *str_utf8_sanitize(const char *s, size_t len)
{
    char *out = malloc(3 * len + 1); /* worst case: every byte -> EF BF BD */
    if (out)
        str_utf8_repair(s, len, false, out, NULL);
    return out;
}

bool str_list_next(const char **p, const char **item, size_t *len)
{
    const size_t n = strcspn(*p, ",");
    const char *a = *p, *b = *p + n;
    while (a < b && (*a == ' ' || *a == '\t'))
        a++;
    while (b > a && (b[-1] == ' ' || b[-1] == '\t'))
        b--;
    *item = a;
    *len = (size_t)(b - a);
    const bool more = (*p)[n] == ',';
    *p += more ? n + 1 : n;
    return more;
}
