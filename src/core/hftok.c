/*
 * hftok: HuggingFace tokenizer.json, BPE models (include/patchsweep/hftok.h).
 *
 * Every rule here mirrors the reference the tests compare against,
 * @huggingface/tokenizers (tokenizers.js); where it departs from the Rust
 * library (Split behaviours it merges, Metaspace `split`) the file is
 * refused rather than tokenized one way or the other.
 */
#include "hftok.h"

#include <ctype.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>

#include "fsutil.h"
#include "strutil.h"

#define HFTOK_NONE UINT32_MAX
#define HFTOK_MAX_SEQUENCE 64 /* elements of a Sequence (normalizer, pre-tokenizer, decoder) */
#define HFTOK_MAX_CONFIG_BYTES ((size_t)16 << 20)

/* ------------------------------------------------------------------ */
/* Growing byte buffer                                                 */

typedef struct {
    char *p;
    size_t n, cap;
    bool oom;
} sbuf;

static bool sb_reserve(sbuf *b, size_t extra)
{
    if (b->oom)
        return false;
    if (b->n + extra + 1 <= b->cap)
        return true;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->n + extra + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        b->oom = true;
        return false;
    }
    b->p = p;
    b->cap = cap;
    return true;
}

static void sb_put(sbuf *b, const char *s, size_t n)
{
    if (!sb_reserve(b, n))
        return;
    if (n)
        memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void sb_puts(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...)
{
    char tmp[64];
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (k > 0)
        sb_put(b, tmp, (size_t)k < sizeof tmp ? (size_t)k : sizeof tmp - 1);
}

/* ------------------------------------------------------------------ */
/* UTF-8 (the text is valid after the input repair)                    */

static size_t u8_len(unsigned char c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

static uint32_t u8_cp(const unsigned char *s, size_t *len)
{
    size_t n = u8_len(s[0]);
    static const unsigned char mask[5] = {0, 0x7F, 0x1F, 0x0F, 0x07};
    uint32_t cp = s[0] & mask[n];
    for (size_t k = 1; k < n; k++)
        cp = (cp << 6) | (s[k] & 0x3Fu);
    *len = n;
    return cp;
}

static size_t u8_put(uint32_t cp, char *o)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* JavaScript's trim() set: WhiteSpace and LineTerminator (ECMA-262). */
static bool js_space(uint32_t c)
{
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
           c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000 || c == 0xFEFF;
}

static void js_trim_start(const char *s, size_t *off, size_t *len)
{
    while (*len) {
        size_t k;
        uint32_t c = u8_cp((const unsigned char *)s + *off, &k);
        if (!js_space(c))
            break;
        *off += k;
        *len -= k;
    }
}

static void js_trim_end(const char *s, size_t off, size_t *len)
{
    while (*len) {
        size_t b = *len - 1;
        while (b > 0 && ((unsigned char)s[off + b] & 0xC0) == 0x80)
            b--;
        size_t k;
        uint32_t c = u8_cp((const unsigned char *)s + off + b, &k);
        if (!js_space(c))
            break;
        *len = b;
    }
}

/* ------------------------------------------------------------------ */
/* String -> index hash table (open addressing, linear probing)        */

typedef struct {
    uint32_t *slot; /* index + 1, 0 = empty */
    size_t mask;
} strmap;

static uint64_t hash_bytes(const char *p, size_t n)
{
    uint64_t h = 1469598103934665603ULL ^ n;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)p[i]) * 1099511628211ULL;
    return h ^ (h >> 29);
}

static bool strmap_init(strmap *m, size_t n)
{
    size_t cap = 16;
    while (cap < 2 * n)
        cap *= 2;
    m->slot = calloc(cap, sizeof *m->slot);
    m->mask = cap - 1;
    return m->slot != NULL;
}

/* Slot for key: either holding it or empty. `get` returns the string of index i. */
typedef const char *(*strmap_get)(const void *ctx, uint32_t i, size_t *len);

static uint32_t *strmap_find(const strmap *m, const char *s, size_t n, strmap_get get, const void *ctx)
{
    size_t i = (size_t)hash_bytes(s, n) & m->mask;
    for (;;) {
        uint32_t v = m->slot[i];
        if (!v)
            return &m->slot[i];
        size_t kl;
        const char *k = get(ctx, v - 1, &kl);
        if (kl == n && memcmp(k, s, n) == 0)
            return &m->slot[i];
        i = (i + 1) & m->mask;
    }
}

/* ------------------------------------------------------------------ */
/* Types                                                               */

typedef enum {
    HFTOK_NORM_PREPEND,
    HFTOK_NORM_REPLACE,
    HFTOK_NORM_NFC,
    HFTOK_NORM_NFD,
    HFTOK_NORM_NFKC,
    HFTOK_NORM_NFKD,
} hftok_norm_kind;

typedef struct {
    hftok_norm_kind kind;
    char *a; /* Prepend: the prefix; Replace: the literal pattern (re == NULL) */
    size_t a_len;
    char *b; /* Replace: the content */
    size_t b_len;
    pcre2_code *re; /* Replace with a Regex pattern */
} hftok_norm;

typedef enum { HFTOK_PRE_SPLIT, HFTOK_PRE_BYTELEVEL, HFTOK_PRE_METASPACE } hftok_pre_kind;
typedef enum { HFTOK_SPLIT_ISOLATED, HFTOK_SPLIT_REMOVED, HFTOK_SPLIT_MATCHES } hftok_split_mode;
typedef enum { HFTOK_PREPEND_ALWAYS, HFTOK_PREPEND_FIRST, HFTOK_PREPEND_NEVER } hftok_prepend;

typedef struct {
    hftok_pre_kind kind;
    pcre2_code *re;         /* Split; ByteLevel with use_regex (shared, not owned) */
    hftok_split_mode mode;  /* Split */
    bool add_prefix_space;  /* ByteLevel */
    char *rep;              /* Metaspace: replacement */
    size_t rep_len;
    char *str_rep;          /* Metaspace: what replaces ' ' and is prepended */
    size_t str_rep_len;
    hftok_prepend prepend;  /* Metaspace */
} hftok_pre;

typedef enum {
    HFTOK_DEC_BYTELEVEL,
    HFTOK_DEC_METASPACE,
    HFTOK_DEC_REPLACE,
    HFTOK_DEC_BYTEFALLBACK,
    HFTOK_DEC_FUSE,
    HFTOK_DEC_STRIP,
} hftok_dec_kind;

typedef struct {
    hftok_dec_kind kind;
    char *a, *b; /* Replace: pattern, content; Metaspace: replacement */
    size_t a_len, b_len;
    uint32_t strip_cp; /* Strip: the content as one BMP code point, 0 = never matches */
    size_t start, stop;
} hftok_dec;

typedef struct {
    char *content;
    size_t len;
    char *norm; /* normalized content when `normalized` and a normalizer exist */
    size_t norm_len;
    int32_t id;
    bool lstrip, rstrip, normalized, special;
} hftok_added;

typedef struct {
    uint64_t key; /* left << 32 | right (model ids); UINT64_MAX = empty */
    uint32_t rank;
    int32_t id;
} hftok_merge;

/* A splitter dictionary (the reference's DictionarySplitter): leftmost
 * longest match of any of its strings. */
typedef struct {
    uint32_t *idx; /* into the added array, sorted by (first byte, length desc) */
    size_t n;
    size_t first[257]; /* idx[first[b] .. first[b+1]) start with byte b */
    bool norm;         /* match the normalized contents */
} hftok_dict;

struct hftok {
    char *path;
    /* model vocabulary, ids 0..n_model-1 */
    size_t n_model;
    char *mstr;
    size_t *moff;
    int32_t *mfinal; /* model id -> output id (an added token with the same string wins) */
    strmap vmap;
    hftok_merge *merges;
    size_t merge_mask, n_merges;
    /* every id 0..n_ids-1 */
    size_t n_ids;
    char *istr; /* the id's token string (added content overrides) */
    size_t *ioff;
    bool *ihas;
    char *dbytes; /* hftok_token_bytes */
    size_t *doff;
    hftok_added *added;
    size_t n_added;
    strmap amap;        /* content and normalized content -> added index */
    uint32_t *amap_key; /* per amap entry: added index << 1 | (key is normalized) */
    size_t n_amap;
    strmap cmap; /* content -> added index (the model's tokens_to_ids sees these) */
    hftok_dict dict_raw, dict_norm;
    hftok_norm *norms;
    size_t n_norms;
    hftok_pre *pres;
    size_t n_pres;
    bool has_pretok;
    bool byte_level; /* a ByteLevel pre-tokenizer (the last one) */
    pcre2_code *bl_re;
    hftok_dec *decs;
    size_t n_decs;
    bool has_decoder;
    int32_t byte_id[256];    /* model id of each byte's byte-level character */
    int32_t fb_id[256];      /* model id of <0xNN> */
    bool ignore_merges, byte_fallback, fuse_unk;
    int32_t unk_model;       /* -1: no unk_token */
    int32_t bos_id;
    bool add_bos;
};

/* ------------------------------------------------------------------ */
/* Small accessors                                                     */

static const char *model_str(const void *ctx, uint32_t i, size_t *len)
{
    const hftok *t = ctx;
    *len = t->moff[i + 1] - t->moff[i];
    return t->mstr + t->moff[i];
}

static const char *amap_str(const void *ctx, uint32_t i, size_t *len)
{
    const hftok *t = ctx;
    uint32_t k = t->amap_key[i];
    const hftok_added *a = &t->added[k >> 1];
    if (k & 1) {
        *len = a->norm_len;
        return a->norm;
    }
    *len = a->len;
    return a->content;
}

static const char *added_str(const void *ctx, uint32_t i, size_t *len)
{
    const hftok *t = ctx;
    *len = t->added[i].len;
    return t->added[i].content;
}

static int32_t model_lookup(const hftok *t, const char *s, size_t n)
{
    uint32_t v = *strmap_find(&t->vmap, s, n, model_str, t);
    return v ? (int32_t)(v - 1) : -1;
}

/* Added token whose content or normalized content is s, or NULL. */
static const hftok_added *added_lookup(const hftok *t, const char *s, size_t n)
{
    if (!t->n_amap)
        return NULL;
    uint32_t v = *strmap_find(&t->amap, s, n, amap_str, t);
    return v ? &t->added[t->amap_key[v - 1] >> 1] : NULL;
}

/* Added token whose content is s (the model's view), or NULL. */
static const hftok_added *content_lookup(const hftok *t, const char *s, size_t n)
{
    if (!t->n_added)
        return NULL;
    uint32_t v = *strmap_find(&t->cmap, s, n, added_str, t);
    return v ? &t->added[v - 1] : NULL;
}

static inline uint64_t merge_key(int32_t a, int32_t b) { return (uint64_t)(uint32_t)a << 32 | (uint32_t)b; }

static const hftok_merge *merge_find(const hftok *t, int32_t a, int32_t b)
{
    if (!t->merges)
        return NULL;
    uint64_t key = merge_key(a, b);
    size_t i = (size_t)((key * 0x9E3779B97F4A7C15ULL) >> 20) & t->merge_mask;
    for (;;) {
        const hftok_merge *m = &t->merges[i];
        if (m->key == UINT64_MAX)
            return NULL;
        if (m->key == key)
            return m;
        i = (i + 1) & t->merge_mask;
    }
}

/* ------------------------------------------------------------------ */
/* Regex: the file's Oniguruma pattern in PCRE2 syntax                 */

/*
 * The subset of Oniguruma the pre-tokenizers of real files use, rewritten
 * as the reference rewrites it for JavaScript: \s is White_Space (JS's own
 * \s differs), \d is \p{Nd}, (?i:...) folds ASCII letters only (PCRE2's
 * caseless mode would also match U+017F for 's' and U+212A for 'k'),
 * '.' is [^\n], atomic groups are plain groups and a possessive '+' is
 * dropped.  Anything else is refused: the message names the construct.
 */
typedef struct {
    const char *s;
    size_t n, i;
    sbuf out;
    const char *why; /* refusal */
    char why_buf[64];
} rx;

static bool rx_refuse(rx *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool rx_refuse(rx *r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->why_buf, sizeof r->why_buf, fmt, ap);
    va_end(ap);
    r->why = r->why_buf;
    return false;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* A code point escape at s[i] = 'x' or 'u' (after the backslash); -1 if malformed. */
static long rx_cp_escape(rx *r)
{
    char k = r->s[r->i];
    long v = 0;
    if (k == 'x' && r->i + 1 < r->n && r->s[r->i + 1] == '{') {
        size_t j = r->i + 2, d = 0;
        while (j < r->n && hexval(r->s[j]) >= 0 && d < 8) {
            v = v * 16 + hexval(r->s[j++]);
            d++;
        }
        if (j >= r->n || r->s[j] != '}' || d == 0 || v > 0x10FFFF)
            return -1;
        r->i = j + 1;
        return v;
    }
    size_t need = k == 'x' ? 2 : 4;
    for (size_t d = 1; d <= need; d++) {
        if (r->i + d >= r->n || hexval(r->s[r->i + d]) < 0)
            return -1;
        v = v * 16 + hexval(r->s[r->i + d]);
    }
    r->i += need + 1;
    return v;
}

static void rx_put_cp(rx *r, long cp, bool fold, bool in_class)
{
    if (fold && cp < 128 && isalpha((int)cp)) {
        if (in_class)
            sb_printf(&r->out, "%c%c", tolower((int)cp), toupper((int)cp));
        else
            sb_printf(&r->out, "[%c%c]", tolower((int)cp), toupper((int)cp));
        return;
    }
    sb_printf(&r->out, "\\x{%lx}", cp);
}

/* Literal UTF-8 character at s[i]: copied (escaped if ASCII punctuation). */
static void rx_literal(rx *r, bool fold, bool in_class)
{
    unsigned char c = (unsigned char)r->s[r->i];
    if (c < 0x80) {
        if (fold && isalpha(c)) {
            rx_put_cp(r, c, true, in_class);
        } else if (!isalnum(c) && c != ' ' && c != '_') {
            char e[2] = {'\\', (char)c};
            sb_put(&r->out, e, 2);
        } else {
            sb_put(&r->out, (const char *)&c, 1);
        }
        r->i++;
        return;
    }
    size_t k = u8_len(c);
    if (r->i + k > r->n)
        k = r->n - r->i;
    sb_put(&r->out, r->s + r->i, k);
    r->i += k;
}

/* Escape after '\' (r->i at the escaped character). */
static bool rx_escape(rx *r, bool fold, bool in_class)
{
    if (r->i >= r->n)
        return rx_refuse(r, "a trailing backslash");
    char e = r->s[r->i];
    switch (e) {
    case 'r': case 'n': case 't': case 'f': case 'v': {
        char o[2] = {'\\', e};
        sb_put(&r->out, o, 2);
        r->i++;
        return true;
    }
    case 's': sb_puts(&r->out, "\\p{White_Space}"); r->i++; return true;
    case 'S': sb_puts(&r->out, "\\P{White_Space}"); r->i++; return true;
    case 'd': sb_puts(&r->out, "\\p{Nd}"); r->i++; return true;
    case 'D': sb_puts(&r->out, "\\P{Nd}"); r->i++; return true;
    case 'p': case 'P': {
        size_t j = r->i + 1;
        if (j >= r->n || r->s[j] != '{')
            return rx_refuse(r, "\\%c without {name}", e);
        size_t k = j + 1;
        while (k < r->n && (isalnum((unsigned char)r->s[k]) || r->s[k] == '_'))
            k++;
        if (k >= r->n || r->s[k] != '}' || k == j + 1)
            return rx_refuse(r, "a malformed \\%c{...}", e);
        if (k - j - 1 == 4 && memcmp(r->s + j + 1, "Word", 4) == 0)
            return rx_refuse(r, "\\%c{Word}", e);
        sb_put(&r->out, r->s + r->i - 1, k + 1 - (r->i - 1));
        r->i = k + 1;
        return true;
    }
    case 'x': case 'u': {
        long cp = rx_cp_escape(r);
        if (cp < 0)
            return rx_refuse(r, "a malformed \\%c escape", e);
        rx_put_cp(r, cp, fold, in_class);
        return true;
    }
    default:
        if (isalnum((unsigned char)e))
            return rx_refuse(r, "the escape \\%c", e);
        rx_literal(r, false, in_class);
        return true;
    }
}

/* Character class at s[i] == '['. */
static bool rx_class(rx *r, bool fold)
{
    r->i++;
    sb_put(&r->out, "[", 1);
    if (r->i < r->n && r->s[r->i] == '^') {
        sb_put(&r->out, "^", 1);
        r->i++;
    }
    if (r->i < r->n && r->s[r->i] == ']')
        return rx_refuse(r, "a class starting with ']'");
    for (;;) {
        if (r->i >= r->n)
            return rx_refuse(r, "an unterminated class");
        char c = r->s[r->i];
        if (c == ']') {
            r->i++;
            sb_put(&r->out, "]", 1);
            return true;
        }
        if (c == '[')
            return rx_refuse(r, "a nested class or POSIX bracket");
        if (c == '&' && r->i + 1 < r->n && r->s[r->i + 1] == '&')
            return rx_refuse(r, "a class intersection (&&)");
        /* A single character, maybe the start of a range. */
        long lo = -1;
        size_t at = r->i;
        if (c == '\\') {
            r->i++;
            if (r->i < r->n && (r->s[r->i] == 'x' || r->s[r->i] == 'u')) {
                lo = rx_cp_escape(r);
                if (lo < 0)
                    return rx_refuse(r, "a malformed escape in a class");
            } else {
                if (!rx_escape(r, fold, true))
                    return false;
                continue;
            }
        } else {
            size_t k;
            lo = (long)u8_cp((const unsigned char *)r->s + r->i, &k);
            r->i += k;
        }
        if (r->i + 1 < r->n && r->s[r->i] == '-' && r->s[r->i + 1] != ']') {
            r->i++;
            long hi;
            if (r->s[r->i] == '\\') {
                r->i++;
                if (r->i >= r->n || (r->s[r->i] != 'x' && r->s[r->i] != 'u'))
                    return rx_refuse(r, "a class range ending in an escape");
                hi = rx_cp_escape(r);
                if (hi < 0)
                    return rx_refuse(r, "a malformed escape in a class");
            } else {
                size_t k;
                hi = (long)u8_cp((const unsigned char *)r->s + r->i, &k);
                r->i += k;
            }
            if (hi < lo)
                return rx_refuse(r, "a reversed class range");
            sb_printf(&r->out, "\\x{%lx}-\\x{%lx}", lo, hi);
            if (fold) {
                bool lower = lo >= 'a' && hi <= 'z', upper = lo >= 'A' && hi <= 'Z';
                bool letters = !(hi < 'A' || lo > 'z' || (lo > 'Z' && hi < 'a'));
                if (lower)
                    sb_printf(&r->out, "%c-%c", toupper((int)lo), toupper((int)hi));
                else if (upper)
                    sb_printf(&r->out, "%c-%c", tolower((int)lo), tolower((int)hi));
                else if (letters)
                    return rx_refuse(r, "a case-insensitive class range across letters and others");
            }
            continue;
        }
        (void)at;
        rx_put_cp(r, lo, fold, true);
    }
}

/* Translate; *out malloc'd.  False: r->why says what is refused. */
static bool rx_translate(rx *r)
{
    bool fold_stack[256];
    size_t depth = 0;
    bool fold = false, last_quant = false, have_atom = false;
    while (r->i < r->n && !r->out.oom) {
        char c = r->s[r->i];
        switch (c) {
        case '\\':
            r->i++;
            if (!rx_escape(r, fold, false))
                return false;
            have_atom = true;
            last_quant = false;
            break;
        case '[':
            if (!rx_class(r, fold))
                return false;
            have_atom = true;
            last_quant = false;
            break;
        case '.':
            sb_puts(&r->out, "[^\\n]");
            r->i++;
            have_atom = true;
            last_quant = false;
            break;
        case '^': case '$':
            return rx_refuse(r, "the anchor '%c'", c);
        case '(': {
            const char *p = r->s + r->i;
            size_t left = r->n - r->i;
            if (depth >= sizeof fold_stack / sizeof fold_stack[0])
                return rx_refuse(r, "groups nested deeper than 256");
            fold_stack[depth++] = fold;
            if (left >= 4 && memcmp(p, "(?i:", 4) == 0) {
                fold = true;
                sb_puts(&r->out, "(?:");
                r->i += 4;
            } else if (left >= 3 && memcmp(p, "(?>", 3) == 0) {
                sb_puts(&r->out, "(?:");
                r->i += 3;
            } else if (left >= 4 && (memcmp(p, "(?<=", 4) == 0 || memcmp(p, "(?<!", 4) == 0)) {
                sb_put(&r->out, p, 4);
                r->i += 4;
            } else if (left >= 3 && (memcmp(p, "(?:", 3) == 0 || memcmp(p, "(?=", 3) == 0 ||
                                     memcmp(p, "(?!", 3) == 0)) {
                sb_put(&r->out, p, 3);
                r->i += 3;
            } else if (left >= 2 && p[1] == '?') {
                return rx_refuse(r, "the group '(?%c'", left >= 3 ? p[2] : ' ');
            } else {
                sb_put(&r->out, "(", 1);
                r->i++;
            }
            have_atom = false;
            last_quant = false;
            break;
        }
        case ')':
            if (!depth)
                return rx_refuse(r, "an unmatched ')'");
            fold = fold_stack[--depth];
            sb_put(&r->out, ")", 1);
            r->i++;
            have_atom = true;
            last_quant = false;
            break;
        case '|':
            sb_put(&r->out, "|", 1);
            r->i++;
            have_atom = false;
            last_quant = false;
            break;
        case '{': {
            size_t j = r->i + 1, a = 0, b = 0;
            bool comma = false, lo_digits = false, hi_digits = false;
            while (j < r->n && isdigit((unsigned char)r->s[j]) && a < 100000) {
                a = a * 10 + (size_t)(r->s[j++] - '0');
                lo_digits = true;
            }
            if (j < r->n && r->s[j] == ',') {
                comma = true;
                j++;
                while (j < r->n && isdigit((unsigned char)r->s[j]) && b < 100000) {
                    b = b * 10 + (size_t)(r->s[j++] - '0');
                    hi_digits = true;
                }
            }
            bool quant = j < r->n && r->s[j] == '}' && (lo_digits || (comma && hi_digits)) && have_atom;
            if (!quant) {
                sb_puts(&r->out, "\\{");
                r->i++;
                have_atom = true;
                last_quant = false;
                break;
            }
            if (j + 1 < r->n && (r->s[j + 1] == '+' || r->s[j + 1] == '*'))
                return rx_refuse(r, "a stacked quantifier after {...}");
            if (!comma)
                sb_printf(&r->out, "{%zu}", a);
            else if (hi_digits)
                sb_printf(&r->out, "{%zu,%zu}", a, b);
            else
                sb_printf(&r->out, "{%zu,}", a);
            r->i = j + 1;
            last_quant = true;
            break;
        }
        case '}':
            sb_puts(&r->out, "\\}");
            r->i++;
            have_atom = true;
            last_quant = false;
            break;
        case '+':
            r->i++;
            if (last_quant)
                break; /* possessive: the reference drops it */
            sb_put(&r->out, "+", 1);
            last_quant = true;
            break;
        case '*': case '?':
            sb_put(&r->out, &c, 1);
            r->i++;
            last_quant = true;
            break;
        case ']':
            sb_puts(&r->out, "\\]");
            r->i++;
            have_atom = true;
            last_quant = false;
            break;
        default:
            rx_literal(r, fold, false);
            have_atom = true;
            last_quant = false;
            break;
        }
    }
    if (depth)
        return rx_refuse(r, "an unclosed group");
    return !r->out.oom || rx_refuse(r, "out of memory");
}

static ps_status re_compile(const char *src, size_t n, const char *path, const char *what, pcre2_code **out)
{
    *out = NULL;
    int code;
    PCRE2_SIZE off;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)src, n, PCRE2_UTF | PCRE2_UCP, &code, &off, NULL);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        return err_set(PS_ERR_FORMAT, "%s: %s: the regex does not compile (PCRE2, offset %zu): %s", path, what,
                       (size_t)off, (const char *)msg);
    }
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* an optimisation only */
    *out = re;
    return PS_OK;
}

/* A tokenizer.json pattern object {"Regex": ...} or {"String": ...}. */
static ps_status pattern_compile(const json_t *pat, const char *path, const char *what, pcre2_code **out,
                                 bool *is_string)
{
    *out = NULL;
    const json_t *re = json_object_get(pat, "Regex"), *st = json_object_get(pat, "String");
    if (json_is_string(st)) {
        *is_string = true;
        size_t n = json_string_length(st);
        if (n == 0)
            return err_set(PS_ERR_FORMAT, "%s: %s: an empty String pattern", path, what);
        if (n > HFTOK_MAX_REGEX_BYTES)
            return err_set(PS_ERR_NOMEM, "%s: %s: the pattern has %zu bytes (limit %zu)", path, what, n,
                           HFTOK_MAX_REGEX_BYTES);
        rx r = {.s = json_string_value(st), .n = n};
        while (r.i < r.n)
            rx_literal(&r, false, false);
        ps_status s = r.out.oom ? err_set(PS_ERR_NOMEM, "%s: out of memory", path)
                                : re_compile(r.out.p, r.out.n, path, what, out);
        free(r.out.p);
        return s;
    }
    if (!json_is_string(re))
        return err_set(PS_ERR_FORMAT, "%s: %s: the pattern is neither {\"Regex\": ...} nor {\"String\": ...}", path,
                       what);
    *is_string = false;
    size_t n = json_string_length(re);
    if (n > HFTOK_MAX_REGEX_BYTES)
        return err_set(PS_ERR_NOMEM, "%s: %s: the regex has %zu bytes (limit %zu)", path, what, n,
                       HFTOK_MAX_REGEX_BYTES);
    rx r = {.s = json_string_value(re), .n = n};
    ps_status s;
    if (!rx_translate(&r))
        s = err_set(PS_ERR_INVALID, "%s: %s: unsupported regex construct: %s", path, what, r.why);
    else
        s = re_compile(r.out.p, r.out.n, path, what, out);
    free(r.out.p);
    return s;
}

/*
 * Next match of re in s[0..n) from *pos, as JavaScript's matchAll: after an
 * empty match the search resumes one code point later.  1 = match [*ms,
 * *me), 0 = none, < 0 = PCRE2 error.
 */
static int re_next(const pcre2_code *re, pcre2_match_data *md, const char *s, size_t n, size_t *pos, size_t *ms,
                   size_t *me)
{
    if (*pos > n)
        return 0;
    int rc = pcre2_match(re, (PCRE2_SPTR)s, n, *pos, PCRE2_NO_UTF_CHECK, md, NULL);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
        rc = pcre2_match(re, (PCRE2_SPTR)s, n, *pos, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md, NULL);
    if (rc == PCRE2_ERROR_NOMATCH)
        return 0;
    if (rc < 0)
        return rc;
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
    if (ov[1] < ov[0])
        return PCRE2_ERROR_INTERNAL;
    *ms = ov[0];
    *me = ov[1];
    *pos = *me == *ms ? (*me < n ? *me + u8_len((unsigned char)s[*me]) : n + 1) : *me;
    return 1;
}

static ps_status re_error(int rc)
{
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(rc, msg, sizeof msg);
    return err_set(PS_ERR_INTERNAL, "tokenizer.json regex: PCRE2 match failed: %s", (const char *)msg);
}

/* ------------------------------------------------------------------ */
/* Normalizers                                                         */

static ps_status icu_normalize(hftok_norm_kind kind, const char *s, size_t n, sbuf *out)
{
    /* Code points below U+0300 are stable under every form and never
     * combine with what precedes them: skip ICU for them. */
    bool plain = true;
    for (size_t i = 0; i < n && plain; i++)
        plain = (unsigned char)s[i] < 0xCC;
    if (plain) {
        sb_put(out, s, n);
        return out->oom ? err_set(PS_ERR_NOMEM, "tokenizer: out of memory") : PS_OK;
    }
    if (n > (size_t)INT32_MAX / 4)
        return err_set(PS_ERR_NOMEM, "tokenizer: text too long to normalize");
    UErrorCode ec = U_ZERO_ERROR;
    const UNormalizer2 *nz = kind == HFTOK_NORM_NFC    ? unorm2_getNFCInstance(&ec)
                             : kind == HFTOK_NORM_NFD  ? unorm2_getNFDInstance(&ec)
                             : kind == HFTOK_NORM_NFKC ? unorm2_getNFKCInstance(&ec)
                                                       : unorm2_getNFKDInstance(&ec);
    if (U_FAILURE(ec))
        return err_set(PS_ERR_INTERNAL, "tokenizer: ICU normalizer unavailable: %s", u_errorName(ec));
    int32_t n16 = 0;
    u_strFromUTF8(NULL, 0, &n16, s, (int32_t)n, &ec);
    ec = U_ZERO_ERROR;
    UChar *a = malloc(((size_t)n16 + 1) * sizeof *a);
    size_t cap = (size_t)n16 * 18 + 16; /* NFKD expands at most 18x */
    UChar *b = malloc(cap * sizeof *b);
    ps_status st = PS_OK;
    if (!a || !b) {
        st = err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
        goto done;
    }
    u_strFromUTF8(a, n16 + 1, NULL, s, (int32_t)n, &ec);
    int32_t m = U_SUCCESS(ec) ? unorm2_normalize(nz, a, n16, b, (int32_t)cap, &ec) : 0;
    int32_t n8 = 0;
    if (U_SUCCESS(ec))
        u_strToUTF8(NULL, 0, &n8, b, m, &ec);
    if (ec == U_BUFFER_OVERFLOW_ERROR)
        ec = U_ZERO_ERROR;
    if (U_FAILURE(ec) || !sb_reserve(out, (size_t)n8)) {
        st = U_FAILURE(ec) ? err_set(PS_ERR_INTERNAL, "tokenizer: ICU normalization failed: %s", u_errorName(ec))
                           : err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
        goto done;
    }
    u_strToUTF8(out->p + out->n, n8 + 1, NULL, b, m, &ec);
    out->n += (size_t)n8;
    out->p[out->n] = 0;
done:
    free(a);
    free(b);
    return st;
}

/* Replace every match (literal or regex) of s[0..n) by content, into out. */
static ps_status replace_all(const char *pat, size_t pat_len, const pcre2_code *re, const char *content,
                             size_t content_len, const char *s, size_t n, sbuf *out)
{
    if (!re) {
        size_t i = 0;
        while (i < n) {
            const char *hit = pat_len ? memmem(s + i, n - i, pat, pat_len) : NULL;
            if (!hit) {
                sb_put(out, s + i, n - i);
                break;
            }
            sb_put(out, s + i, (size_t)(hit - (s + i)));
            sb_put(out, content, content_len);
            i = (size_t)(hit - s) + pat_len;
        }
        return out->oom ? err_set(PS_ERR_NOMEM, "tokenizer: out of memory") : PS_OK;
    }
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
    if (!md)
        return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
    size_t pos = 0, prev = 0, ms, me;
    int rc;
    while ((rc = re_next(re, md, s, n, &pos, &ms, &me)) == 1) {
        sb_put(out, s + prev, ms - prev);
        sb_put(out, content, content_len);
        prev = me;
    }
    pcre2_match_data_free(md);
    if (rc < 0)
        return re_error(rc);
    sb_put(out, s + prev, n - prev);
    return out->oom ? err_set(PS_ERR_NOMEM, "tokenizer: out of memory") : PS_OK;
}

/* The normalizer chain on s[0..n); *out is a fresh buffer. */
static ps_status normalize(const hftok *t, const char *s, size_t n, sbuf *out)
{
    sbuf a = {0};
    sb_put(&a, s, n);
    if (a.oom)
        return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
    for (size_t k = 0; k < t->n_norms; k++) {
        const hftok_norm *z = &t->norms[k];
        sbuf b = {0};
        ps_status st = PS_OK;
        switch (z->kind) {
        case HFTOK_NORM_PREPEND:
            sb_put(&b, z->a, z->a_len);
            sb_put(&b, a.p, a.n);
            if (b.oom)
                st = err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
            break;
        case HFTOK_NORM_REPLACE:
            st = replace_all(z->a, z->a_len, z->re, z->b, z->b_len, a.p, a.n, &b);
            break;
        default:
            st = icu_normalize(z->kind, a.p, a.n, &b);
            break;
        }
        free(a.p);
        a = b;
        if (st == PS_OK && !a.p)
            sb_put(&a, "", 0);
        if (st != PS_OK || a.oom) {
            free(a.p);
            return st != PS_OK ? st : err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
        }
    }
    *out = a;
    return PS_OK;
}

/* ------------------------------------------------------------------ */
/* Encoding                                                            */

typedef struct {
    size_t off, len;
} span;

typedef struct {
    int32_t *ids;
    size_t n, cap;
    sbuf buf;          /* pieces' text */
    span *pa, *pb;     /* piece lists */
    size_t na, nb, capa, capb;
    pcre2_match_data *md;
    /* BPE scratch */
    int32_t *sym;
    uint32_t *next, *prev, *start, *len;
    uint64_t *heap;
    size_t nheap, cap_sym, cap_heap;
    sbuf word;
    bool oom;
} enc;

static void enc_free(enc *e)
{
    free(e->ids);
    free(e->buf.p);
    free(e->pa);
    free(e->pb);
    pcre2_match_data_free(e->md);
    free(e->sym);
    free(e->next);
    free(e->prev);
    free(e->start);
    free(e->len);
    free(e->heap);
    free(e->word.p);
}

static bool grow(void **p, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap)
        return true;
    size_t c = *cap ? *cap : 16;
    while (c < need)
        c *= 2;
    void *q = realloc(*p, c * size);
    if (!q)
        return false;
    *p = q;
    *cap = c;
    return true;
}

static bool enc_push(enc *e, int32_t id)
{
    if (!grow((void **)&e->ids, &e->cap, e->n + 1, sizeof *e->ids))
        return e->oom = true, false;
    e->ids[e->n++] = id;
    return true;
}

static bool piece_push(span **p, size_t *n, size_t *cap, size_t off, size_t len)
{
    if (!grow((void **)p, cap, *n + 1, sizeof **p))
        return false;
    (*p)[(*n)++] = (span){off, len};
    return true;
}

static bool heap_push(enc *e, uint64_t v)
{
    if (!grow((void **)&e->heap, &e->cap_heap, e->nheap + 1, sizeof *e->heap))
        return false;
    size_t i = e->nheap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (e->heap[p] <= v)
            break;
        e->heap[i] = e->heap[p];
        i = p;
    }
    e->heap[i] = v;
    return true;
}

static uint64_t heap_pop(enc *e)
{
    uint64_t top = e->heap[0], v = e->heap[--e->nheap];
    size_t i = 0, n = e->nheap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && e->heap[c + 1] < e->heap[c])
            c++;
        if (e->heap[c] >= v)
            break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    if (n)
        e->heap[i] = v;
    return top;
}

static bool pair_push(const hftok *t, enc *e, uint32_t i)
{
    uint32_t j = e->next[i];
    if (j == HFTOK_NONE || e->sym[i] < 0 || e->sym[j] < 0)
        return true;
    const hftok_merge *m = merge_find(t, e->sym[i], e->sym[j]);
    return !m || heap_push(e, (uint64_t)m->rank << 32 | i);
}

/* The string of a symbol that is not in the model vocabulary (a single
 * character: merges only produce vocabulary tokens), into e->word. */
static void unknown_symbol(const hftok *t, enc *e, const char *w, uint32_t i)
{
    e->word.n = 0;
    if (t->byte_level) {
        /* bytes_to_unicode(): printable Latin-1 bytes stand for themselves,
         * the others are U+0100 + k in order. */
        unsigned char b = (unsigned char)w[e->start[i]];
        uint32_t cp = b;
        if (!((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE)) {
            uint32_t k = 0;
            for (uint32_t x = 0; x < b; x++)
                k += !((x >= 0x21 && x <= 0x7E) || (x >= 0xA1 && x <= 0xAC) || x >= 0xAE);
            cp = 0x100 + k;
        }
        char o[4];
        sb_put(&e->word, o, u8_put(cp, o));
    } else {
        sb_put(&e->word, w + e->start[i], e->len[i]);
    }
}

/* BPE on one piece w[0..n): appends ids (the reference's BPE.encode). */
static ps_status bpe_piece(const hftok *t, enc *e, const char *w, size_t n)
{
    if (n == 0)
        return PS_OK;
    /* ignore_merges: the whole piece is a token (the model's map also holds
     * the added tokens' contents). */
    if (t->ignore_merges) {
        const char *ws = w;
        size_t wn = n;
        if (t->byte_level) {
            e->word.n = 0;
            for (size_t i = 0; i < n; i++) {
                int32_t id = t->byte_id[(unsigned char)w[i]];
                if (id < 0) {
                    e->word.n = 0;
                    break;
                }
                size_t l;
                const char *s = model_str(t, (uint32_t)id, &l);
                sb_put(&e->word, s, l);
            }
            ws = e->word.p;
            wn = e->word.n;
        }
        if (ws && wn) {
            int32_t id = model_lookup(t, ws, wn);
            if (id >= 0)
                return enc_push(e, t->mfinal[id]) ? PS_OK : err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
            const hftok_added *a = content_lookup(t, ws, wn);
            if (a)
                return enc_push(e, a->id) ? PS_OK : err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
        }
    }
    /* Initial symbols: bytes (byte-level) or characters. */
    if (!grow((void **)&e->sym, &e->cap_sym, n, sizeof *e->sym))
        return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
    size_t cap = e->cap_sym, c2 = 0;
    uint32_t **arrs[4] = {&e->next, &e->prev, &e->start, &e->len};
    for (int k = 0; k < 4; k++) {
        void *q = realloc(*arrs[k], cap * sizeof(uint32_t));
        if (!q)
            return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
        *arrs[k] = q;
    }
    (void)c2;
    uint32_t ns = 0;
    for (size_t i = 0; i < n;) {
        size_t k = t->byte_level ? 1 : u8_len((unsigned char)w[i]);
        if (i + k > n)
            k = n - i;
        e->sym[ns] = t->byte_level ? t->byte_id[(unsigned char)w[i]] : model_lookup(t, w + i, k);
        e->start[ns] = (uint32_t)i;
        e->len[ns] = (uint32_t)k;
        e->prev[ns] = ns ? ns - 1 : HFTOK_NONE;
        e->next[ns] = HFTOK_NONE;
        if (ns)
            e->next[ns - 1] = ns;
        ns++;
        i += k;
    }
    e->nheap = 0;
    for (uint32_t i = 0; i + 1 < ns; i++)
        if (!pair_push(t, e, i))
            return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
    while (e->nheap) {
        uint64_t v = heap_pop(e);
        uint32_t i = (uint32_t)v, rank = (uint32_t)(v >> 32);
        uint32_t j = e->next[i];
        if (e->len[i] == 0 || j == HFTOK_NONE || e->sym[i] < 0 || e->sym[j] < 0)
            continue;
        const hftok_merge *m = merge_find(t, e->sym[i], e->sym[j]);
        if (!m || m->rank != rank)
            continue; /* stale: this pair changed since it was queued */
        e->sym[i] = m->id;
        e->len[i] += e->len[j];
        e->len[j] = 0;
        e->next[i] = e->next[j];
        if (e->next[i] != HFTOK_NONE)
            e->prev[e->next[i]] = i;
        if ((e->prev[i] != HFTOK_NONE && !pair_push(t, e, e->prev[i])) || !pair_push(t, e, i))
            return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
    }
    for (uint32_t i = 0; i != HFTOK_NONE && i < ns; i = e->next[i]) {
        if (e->sym[i] >= 0) {
            if (!enc_push(e, t->mfinal[e->sym[i]]))
                break;
            continue;
        }
        unknown_symbol(t, e, w, i);
        const hftok_added *a = content_lookup(t, e->word.p, e->word.n);
        if (a) {
            enc_push(e, a->id);
            continue;
        }
        bool done = false;
        if (t->byte_fallback) {
            bool all = true;
            for (size_t k = 0; k < e->word.n && all; k++)
                all = t->fb_id[(unsigned char)e->word.p[k]] >= 0;
            if (all) {
                for (size_t k = 0; k < e->word.n; k++)
                    enc_push(e, t->mfinal[t->fb_id[(unsigned char)e->word.p[k]]]);
                done = true;
            }
        }
        if (!done && t->unk_model >= 0)
            enc_push(e, t->mfinal[t->unk_model]);
        /* no unk_token: the character is dropped, as the reference does */
    }
    return e->oom || e->word.oom ? err_set(PS_ERR_NOMEM, "tokenizer: out of memory") : PS_OK;
}

/* The pre-tokenizer chain on buf[off..off+len) -> e->pa (pieces in e->buf). */
static ps_status pretokenize(const hftok *t, enc *e, size_t off, size_t len, size_t section_index)
{
    e->na = 0;
    if (!piece_push(&e->pa, &e->na, &e->capa, off, len))
        return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
    for (size_t k = 0; k < t->n_pres; k++) {
        const hftok_pre *p = &t->pres[k];
        e->nb = 0;
        for (size_t q = 0; q < e->na; q++) {
            size_t po = e->pa[q].off, pl = e->pa[q].len;
            if (p->kind == HFTOK_PRE_METASPACE) {
                /* every ' ' -> str_rep; str_rep first unless it starts with the replacement */
                if (!sb_reserve(&e->buf, pl * p->str_rep_len + p->str_rep_len))
                    return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
                size_t start = e->buf.n;
                for (size_t i = 0; i < pl; i++) {
                    char c = e->buf.p[po + i];
                    if (c == ' ')
                        sb_put(&e->buf, p->str_rep, p->str_rep_len);
                    else
                        sb_put(&e->buf, &c, 1);
                }
                size_t nl = e->buf.n - start;
                bool starts = nl >= p->rep_len && memcmp(e->buf.p + start, p->rep, p->rep_len) == 0;
                if (!starts && (p->prepend == HFTOK_PREPEND_ALWAYS ||
                                (p->prepend == HFTOK_PREPEND_FIRST && section_index == 0))) {
                    sb_put(&e->buf, p->str_rep, p->str_rep_len);
                    if (e->buf.oom)
                        return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
                    memmove(e->buf.p + start + p->str_rep_len, e->buf.p + start, nl);
                    memcpy(e->buf.p + start, p->str_rep, p->str_rep_len);
                    nl += p->str_rep_len;
                }
                if (e->buf.oom || !piece_push(&e->pb, &e->nb, &e->capb, start, nl))
                    return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
                continue;
            }
            if (p->kind == HFTOK_PRE_BYTELEVEL && p->add_prefix_space && (pl == 0 || e->buf.p[po] != ' ')) {
                if (!sb_reserve(&e->buf, pl + 1))
                    return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
                size_t start = e->buf.n;
                sb_put(&e->buf, " ", 1);
                sb_put(&e->buf, e->buf.p + po, pl);
                po = start;
                pl++;
            }
            if (p->kind == HFTOK_PRE_BYTELEVEL && !p->re) {
                if (!piece_push(&e->pb, &e->nb, &e->capb, po, pl))
                    return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
                continue;
            }
            /* A regex: Split, or ByteLevel's GPT-2 pattern (matches only). */
            hftok_split_mode mode = p->kind == HFTOK_PRE_BYTELEVEL ? HFTOK_SPLIT_MATCHES : p->mode;
            if (!e->md || pcre2_get_ovector_count(e->md) < 64) {
                pcre2_match_data_free(e->md);
                e->md = pcre2_match_data_create(64, NULL);
                if (!e->md)
                    return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
            }
            size_t pos = 0, prev = 0, ms, me;
            int rc;
            const char *s = e->buf.p + po;
            while ((rc = re_next(p->re, e->md, s, pl, &pos, &ms, &me)) == 1) {
                bool ok = true;
                if (mode != HFTOK_SPLIT_MATCHES && ms > prev)
                    ok = piece_push(&e->pb, &e->nb, &e->capb, po + prev, ms - prev);
                if (ok && mode != HFTOK_SPLIT_REMOVED && me > ms)
                    ok = piece_push(&e->pb, &e->nb, &e->capb, po + ms, me - ms);
                if (!ok)
                    return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
                prev = me;
            }
            if (rc < 0)
                return re_error(rc);
            if (mode != HFTOK_SPLIT_MATCHES && prev < pl &&
                !piece_push(&e->pb, &e->nb, &e->capb, po + prev, pl - prev))
                return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
        }
        span *tp = e->pa;
        size_t tc = e->capa;
        e->pa = e->pb;
        e->capa = e->capb;
        e->na = e->nb;
        e->pb = tp;
        e->capb = tc;
    }
    return PS_OK;
}

/* Pre-tokenize and BPE one text section (no added token in it). */
static ps_status encode_plain(const hftok *t, enc *e, const char *s, size_t n, size_t section_index)
{
    e->buf.n = 0;
    sb_put(&e->buf, s, n);
    if (e->buf.oom)
        return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
    ps_status st = pretokenize(t, e, 0, n, section_index);
    size_t first = e->n;
    for (size_t q = 0; q < e->na && st == PS_OK; q++)
        st = bpe_piece(t, e, e->buf.p + e->pa[q].off, e->pa[q].len);
    if (st == PS_OK && t->fuse_unk && t->unk_model >= 0) {
        int32_t unk = t->mfinal[t->unk_model];
        size_t o = first;
        for (size_t i = first; i < e->n; i++)
            if (!(e->ids[i] == unk && o > first && e->ids[o - 1] == unk))
                e->ids[o++] = e->ids[i];
        e->n = o;
    }
    return st;
}

/* Split s[0..n) by a dictionary: spans; lstrip/rstrip applied as the
 * reference does (to the neighbours of every section that names an added
 * token). */
static ps_status dict_split(const hftok *t, const hftok_dict *d, const char *s, size_t n, span **out, size_t *nout)
{
    span *v = NULL;
    size_t nv = 0, cap = 0, start = 0, i = 0;
    while (i < n && d->n) {
        unsigned char b = (unsigned char)s[i];
        size_t best = 0;
        for (size_t k = d->first[b]; k < d->first[b + 1]; k++) {
            const hftok_added *a = &t->added[d->idx[k]];
            const char *c = d->norm ? a->norm : a->content;
            size_t cl = d->norm ? a->norm_len : a->len;
            if (cl <= n - i && memcmp(s + i, c, cl) == 0) {
                best = cl;
                break; /* sorted longest first */
            }
        }
        if (!best) {
            i++;
            continue;
        }
        if ((i > start && !piece_push(&v, &nv, &cap, start, i - start)) || !piece_push(&v, &nv, &cap, i, best)) {
            free(v);
            return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
        }
        i += best;
        start = i;
    }
    if (start < n && !piece_push(&v, &nv, &cap, start, n - start)) {
        free(v);
        return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
    }
    for (size_t k = 0; k < nv; k++) {
        const hftok_added *a = added_lookup(t, s + v[k].off, v[k].len);
        if (!a)
            continue;
        if (a->lstrip && k > 0)
            js_trim_end(s, v[k - 1].off, &v[k - 1].len);
        if (a->rstrip && k + 1 < nv)
            js_trim_start(s, &v[k + 1].off, &v[k + 1].len);
    }
    *out = v;
    *nout = nv;
    return PS_OK;
}

ps_status hftok_encode(const hftok *t, const char *text, size_t len, int32_t **ids, size_t *n)
{
    if (!t || !ids || !n || (!text && len))
        return err_set(PS_ERR_INVALID, "hftok_encode: NULL argument");
    *ids = NULL;
    *n = 0;
    if (len > HFTOK_MAX_TEXT_BYTES)
        return err_set(PS_ERR_NOMEM, "tokenizer: text of %zu bytes exceeds the %zu-byte limit", len,
                       HFTOK_MAX_TEXT_BYTES);
    /* Invalid UTF-8 -> U+FFFD per maximal subpart, as node's Buffer decodes. */
    size_t fixed_len = 0;
    char *fixed = NULL;
    if (len && str_utf8_repair(text, len, true, NULL, &fixed_len) != 0) {
        fixed = malloc(fixed_len + 1);
        if (!fixed)
            return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
        str_utf8_repair(text, len, true, fixed, &fixed_len);
        text = fixed;
        len = fixed_len;
    }
    enc e = {0};
    span *sec = NULL, *sub = NULL;
    size_t nsec = 0, nsub = 0;
    ps_status st = dict_split(t, &t->dict_raw, text ? text : "", len, &sec, &nsec);
    for (size_t i = 0; i < nsec && st == PS_OK; i++) {
        const char *s = text + sec[i].off;
        size_t sl = sec[i].len;
        if (sl == 0)
            continue;
        const hftok_added *a = added_lookup(t, s, sl);
        if (a) {
            if (!enc_push(&e, a->id))
                st = err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
            continue;
        }
        sbuf z = {0};
        st = normalize(t, s, sl, &z);
        if (st != PS_OK)
            break;
        if (z.n) {
            free(sub);
            sub = NULL;
            st = dict_split(t, &t->dict_norm, z.p, z.n, &sub, &nsub);
            for (size_t j = 0; j < nsub && st == PS_OK; j++) {
                const char *ss = z.p + sub[j].off;
                size_t sn = sub[j].len;
                if (sn == 0)
                    continue;
                const hftok_added *b = added_lookup(t, ss, sn);
                if (b)
                    st = enc_push(&e, b->id) ? PS_OK : err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
                else
                    st = encode_plain(t, &e, ss, sn, i);
            }
        }
        free(z.p);
    }
    free(sec);
    free(sub);
    free(fixed);
    if (st == PS_OK && e.oom)
        st = err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
    if (st == PS_OK) {
        *ids = e.ids;
        *n = e.n;
        e.ids = NULL;
    }
    enc_free(&e);
    return st;
}

/* ------------------------------------------------------------------ */
/* Decoding                                                            */

typedef struct {
    sbuf *s;
    size_t n, cap;
} strlist;

static void strlist_free(strlist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->s[i].p);
    free(l->s);
    l->s = NULL;
    l->n = l->cap = 0;
}

static bool strlist_add(strlist *l, const char *p, size_t n)
{
    if (!grow((void **)&l->s, &l->cap, l->n + 1, sizeof *l->s))
        return false;
    sbuf b = {0};
    sb_put(&b, p, n);
    if (!b.p)
        sb_put(&b, "", 0);
    if (b.oom) {
        free(b.p);
        return false;
    }
    l->s[l->n++] = b;
    return true;
}

/* bytes_to_unicode() inverse: -1 for characters that stand for no byte. */
static int cp_to_byte(uint32_t cp)
{
    if ((cp >= 0x21 && cp <= 0x7E) || (cp >= 0xA1 && cp <= 0xAC) || (cp >= 0xAE && cp <= 0xFF))
        return (int)cp;
    if (cp < 0x100 || cp >= 0x100 + 68)
        return -1;
    uint32_t k = cp - 0x100, seen = 0;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        if (!printable && seen++ == k)
            return b;
    }
    return -1;
}

static bool is_byte_token(const char *s, size_t n, int *byte)
{
    /* "<0x" + two UTF-16 units + ">" with parseInt(hex) of the two, as the
     * reference's ByteFallback decoder reads it. */
    if (n < 6 || memcmp(s, "<0x", 3) != 0 || s[n - 1] != '>')
        return false;
    size_t units = 0, i = 3;
    uint32_t cps[2] = {0, 0};
    while (i < n - 1) {
        size_t k;
        uint32_t cp = u8_cp((const unsigned char *)s + i, &k);
        if (units < 2)
            cps[units] = cp;
        units += cp >= 0x10000 ? 2 : 1;
        i += k;
    }
    if (units != 2)
        return false;
    int h0 = cps[0] < 128 ? hexval((int)cps[0]) : -1, h1 = cps[1] < 128 ? hexval((int)cps[1]) : -1;
    if (h0 < 0)
        return false;
    *byte = h1 < 0 ? h0 : h0 * 16 + h1;
    return true;
}

/* The decoder chain on l (in place).  display: one token shown alone, so
 * the rules for the first token of a text (Metaspace, Strip) are skipped. */
static ps_status decode_chain(const hftok *t, strlist *l, bool display)
{
    if (!t->has_decoder) {
        sbuf j = {0};
        for (size_t i = 0; i < l->n; i++) {
            if (i)
                sb_put(&j, " ", 1);
            sb_put(&j, l->s[i].p, l->s[i].n);
        }
        if (!j.p)
            sb_put(&j, "", 0);
        if (j.oom) {
            free(j.p);
            return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
        }
        strlist_free(l);
        if (!grow((void **)&l->s, &l->cap, 1, sizeof *l->s)) {
            free(j.p);
            return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
        }
        l->s[0] = j;
        l->n = 1;
        return PS_OK;
    }
    for (size_t k = 0; k < t->n_decs; k++) {
        const hftok_dec *d = &t->decs[k];
        strlist o = {0};
        bool ok = true;
        switch (d->kind) {
        case HFTOK_DEC_BYTELEVEL: {
            sbuf cur = {0};
            bool have = false;
            for (size_t i = 0; i <= l->n && ok; i++) {
                bool added = i < l->n && content_lookup(t, l->s[i].p, l->s[i].n);
                if (i == l->n || added) {
                    if (have)
                        ok = strlist_add(&o, cur.p ? cur.p : "", cur.n);
                    cur.n = 0;
                    have = false;
                    if (i < l->n && ok)
                        ok = strlist_add(&o, l->s[i].p, l->s[i].n);
                    continue;
                }
                have = true;
                for (size_t p = 0; p < l->s[i].n;) {
                    size_t m;
                    int b = cp_to_byte(u8_cp((const unsigned char *)l->s[i].p + p, &m));
                    char c = (char)(b < 0 ? 0 : b); /* Uint8Array of undefined: 0 */
                    sb_put(&cur, &c, 1);
                    p += m;
                }
            }
            ok = ok && !cur.oom;
            free(cur.p);
            break;
        }
        case HFTOK_DEC_METASPACE:
        case HFTOK_DEC_REPLACE:
            for (size_t i = 0; i < l->n && ok; i++) {
                sbuf b = {0};
                const char *pat = d->a, *con = d->kind == HFTOK_DEC_REPLACE ? d->b : " ";
                size_t pl = d->a_len, cl = d->kind == HFTOK_DEC_REPLACE ? d->b_len : 1;
                ok = replace_all(pat, pl, NULL, con, cl, l->s[i].p, l->s[i].n, &b) == PS_OK;
                size_t skip = 0;
                if (ok && d->kind == HFTOK_DEC_METASPACE && i == 0 && !display && b.n && b.p[0] == ' ')
                    skip = 1;
                ok = ok && strlist_add(&o, b.p ? b.p + skip : "", b.n - skip);
                free(b.p);
            }
            break;
        case HFTOK_DEC_BYTEFALLBACK: {
            sbuf cur = {0};
            bool have = false;
            for (size_t i = 0; i <= l->n && ok; i++) {
                int byte;
                if (i < l->n && is_byte_token(l->s[i].p, l->s[i].n, &byte)) {
                    char c = (char)byte;
                    sb_put(&cur, &c, 1);
                    have = true;
                    continue;
                }
                if (have)
                    ok = strlist_add(&o, cur.p, cur.n);
                cur.n = 0;
                have = false;
                if (i < l->n && ok)
                    ok = strlist_add(&o, l->s[i].p, l->s[i].n);
            }
            ok = ok && !cur.oom;
            free(cur.p);
            break;
        }
        case HFTOK_DEC_FUSE: {
            sbuf j = {0};
            for (size_t i = 0; i < l->n; i++)
                sb_put(&j, l->s[i].p, l->s[i].n);
            ok = !j.oom && strlist_add(&o, j.p ? j.p : "", j.n);
            free(j.p);
            break;
        }
        case HFTOK_DEC_STRIP:
            for (size_t i = 0; i < l->n && ok; i++) {
                const char *p = l->s[i].p;
                size_t n = l->s[i].n, a = 0, z = n;
                if (!display && d->strip_cp) {
                    /* JS indexes UTF-16 units; an astral character never equals the content */
                    size_t unit = 0;
                    while (unit < d->start && a < n) {
                        size_t m;
                        uint32_t cp = u8_cp((const unsigned char *)p + a, &m);
                        if (cp != d->strip_cp)
                            break;
                        a += m;
                        unit++;
                    }
                    unit = 0;
                    while (unit < d->stop && z > a) {
                        size_t b = z - 1;
                        while (b > a && ((unsigned char)p[b] & 0xC0) == 0x80)
                            b--;
                        size_t m;
                        uint32_t cp = u8_cp((const unsigned char *)p + b, &m);
                        if (cp != d->strip_cp)
                            break;
                        z = b;
                        unit++;
                    }
                }
                ok = strlist_add(&o, p + a, z - a);
            }
            break;
        }
        if (!ok) {
            strlist_free(&o);
            return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
        }
        strlist_free(l);
        *l = o;
    }
    return PS_OK;
}

ps_status hftok_decode(const hftok *t, const int32_t *ids, size_t n, char **text, size_t *len)
{
    if (!t || !text || !len || (!ids && n))
        return err_set(PS_ERR_INVALID, "hftok_decode: NULL argument");
    *text = NULL;
    *len = 0;
    strlist l = {0};
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || (size_t)ids[i] >= t->n_ids || !t->ihas[ids[i]]) {
            strlist_free(&l);
            return err_set(PS_ERR_RANGE, "tokenizer: token id %d is not in the vocabulary (%zu ids)", (int)ids[i],
                           t->n_ids);
        }
        if (!strlist_add(&l, t->istr + t->ioff[ids[i]], t->ioff[ids[i] + 1] - t->ioff[ids[i]])) {
            strlist_free(&l);
            return err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
        }
    }
    ps_status st = n ? decode_chain(t, &l, false) : PS_OK;
    sbuf out = {0};
    for (size_t i = 0; st == PS_OK && i < l.n; i++)
        sb_put(&out, l.s[i].p, l.s[i].n);
    if (st == PS_OK && !out.p)
        sb_put(&out, "", 0);
    strlist_free(&l);
    if (st == PS_OK && out.oom)
        st = err_set(PS_ERR_NOMEM, "tokenizer: out of memory");
    if (st != PS_OK) {
        free(out.p);
        return st;
    }
    *text = out.p;
    *len = out.n;
    return PS_OK;
}

const char *hftok_token_bytes(const hftok *t, int32_t id, size_t *len)
{
    if (!t || id < 0 || (size_t)id >= t->n_ids || !t->ihas[id])
        return NULL;
    *len = t->doff[id + 1] - t->doff[id];
    return t->dbytes + t->doff[id];
}

size_t hftok_vocab_size(const hftok *t) { return t ? t->n_ids : 0; }
int32_t hftok_bos_id(const hftok *t) { return t ? t->bos_id : -1; }
bool hftok_add_bos(const hftok *t) { return t && t->add_bos && t->bos_id >= 0; }

ps_status hftok_set_add_bos(hftok *t, bool on)
{
    if (on && t->bos_id < 0)
        return err_set(PS_ERR_INVALID, "%s: --bos: the tokenizer has no BOS token (no bos_token in "
                                       "tokenizer_config.json, bos_token_id in generation_config.json or "
                                       "template)", t->path);
    t->add_bos = on;
    return PS_OK;
}

/* ------------------------------------------------------------------ */
/* Loading                                                             */

void hftok_free(hftok *t)
{
    if (!t)
        return;
    free(t->path);
    free(t->mstr);
    free(t->moff);
    free(t->mfinal);
    free(t->vmap.slot);
    free(t->merges);
    free(t->istr);
    free(t->ioff);
    free(t->ihas);
    free(t->dbytes);
    free(t->doff);
    for (size_t i = 0; i < t->n_added; i++) {
        free(t->added[i].content);
        free(t->added[i].norm);
    }
    free(t->added);
    free(t->amap.slot);
    free(t->amap_key);
    free(t->cmap.slot);
    free(t->dict_raw.idx);
    free(t->dict_norm.idx);
    for (size_t i = 0; i < t->n_norms; i++) {
        free(t->norms[i].a);
        free(t->norms[i].b);
        pcre2_code_free(t->norms[i].re);
    }
    free(t->norms);
    for (size_t i = 0; i < t->n_pres; i++) {
        if (t->pres[i].kind == HFTOK_PRE_SPLIT)
            pcre2_code_free(t->pres[i].re);
        free(t->pres[i].rep);
        free(t->pres[i].str_rep);
    }
    free(t->pres);
    pcre2_code_free(t->bl_re);
    for (size_t i = 0; i < t->n_decs; i++) {
        free(t->decs[i].a);
        free(t->decs[i].b);
    }
    free(t->decs);
    free(t);
}

static char *dup_n(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = 0;
    }
    return p;
}

static const char *jtype(const json_t *o)
{
    const json_t *ty = json_object_get(o, "type");
    return json_is_string(ty) ? json_string_value(ty) : NULL;
}

static bool jbool(const json_t *o, const char *key, bool dflt)
{
    const json_t *v = json_object_get(o, key);
    return json_is_boolean(v) ? json_is_true(v) : dflt;
}

/* Flatten a {"type": "Sequence", KEY: [...]} (nested too) into items. */
static ps_status flatten(const json_t *o, const char *key, const char *path, const char *what, const json_t **items,
                         size_t *n)
{
    if (json_is_null(o) || !o)
        return PS_OK;
    if (!json_is_object(o))
        return err_set(PS_ERR_FORMAT, "%s: %s is not an object", path, what);
    const char *ty = jtype(o);
    if (ty && strcmp(ty, "Sequence") == 0) {
        const json_t *arr = json_object_get(o, key);
        if (!json_is_array(arr))
            return err_set(PS_ERR_FORMAT, "%s: %s Sequence without a \"%s\" array", path, what, key);
        size_t i;
        const json_t *v;
        json_array_foreach(arr, i, v) {
            ps_status st = flatten(v, key, path, what, items, n);
            if (st)
                return st;
        }
        return PS_OK;
    }
    if (*n >= HFTOK_MAX_SEQUENCE)
        return err_set(PS_ERR_NOMEM, "%s: %s has more than %d elements", path, what, HFTOK_MAX_SEQUENCE);
    items[(*n)++] = o;
    return PS_OK;
}

static ps_status load_normalizers(hftok *t, const json_t *root)
{
    const json_t *items[HFTOK_MAX_SEQUENCE];
    size_t n = 0;
    ps_status st = flatten(json_object_get(root, "normalizer"), "normalizers", t->path, "normalizer", items, &n);
    if (st)
        return st;
    t->norms = calloc(n ? n : 1, sizeof *t->norms);
    if (!t->norms)
        return err_set(PS_ERR_NOMEM, "%s: out of memory", t->path);
    for (size_t i = 0; i < n; i++) {
        const char *ty = jtype(items[i]);
        hftok_norm *z = &t->norms[t->n_norms++];
        if (!ty)
            return err_set(PS_ERR_FORMAT, "%s: a normalizer without a \"type\"", t->path);
        if (strcmp(ty, "Prepend") == 0) {
            const json_t *p = json_object_get(items[i], "prepend");
            if (!json_is_string(p))
                return err_set(PS_ERR_FORMAT, "%s: normalizer Prepend without a \"prepend\" string", t->path);
            z->kind = HFTOK_NORM_PREPEND;
            z->a_len = json_string_length(p);
            z->a = dup_n(json_string_value(p), z->a_len);
        } else if (strcmp(ty, "Replace") == 0) {
            const json_t *c = json_object_get(items[i], "content");
            z->kind = HFTOK_NORM_REPLACE;
            z->b_len = json_is_string(c) ? json_string_length(c) : 0;
            z->b = dup_n(json_is_string(c) ? json_string_value(c) : "", z->b_len);
            if (z->b && memchr(z->b, '$', z->b_len))
                return err_set(PS_ERR_INVALID, "%s: normalizer Replace: a content with '$' (the reference "
                                               "expands it as a replacement pattern) is not supported", t->path);
            const json_t *pat = json_object_get(items[i], "pattern");
            const json_t *ps = json_object_get(pat, "String");
            if (json_is_string(ps)) {
                z->a_len = json_string_length(ps);
                if (!z->a_len)
                    return err_set(PS_ERR_FORMAT, "%s: normalizer Replace: an empty String pattern", t->path);
                z->a = dup_n(json_string_value(ps), z->a_len);
            } else {
                bool is_string;
                if ((st = pattern_compile(pat, t->path, "normalizer Replace", &z->re, &is_string)))
                    return st;
            }
        } else if (strcmp(ty, "NFC") == 0) {
            z->kind = HFTOK_NORM_NFC;
        } else if (strcmp(ty, "NFD") == 0) {
            z->kind = HFTOK_NORM_NFD;
        } else if (strcmp(ty, "NFKC") == 0) {
            z->kind = HFTOK_NORM_NFKC;
        } else if (strcmp(ty, "NFKD") == 0) {
            z->kind = HFTOK_NORM_NFKD;
        } else {
            return err_set(PS_ERR_INVALID, "%s: normalizer %s is not supported", t->path, ty);
        }
        if ((z->kind == HFTOK_NORM_PREPEND && !z->a) || (z->kind == HFTOK_NORM_REPLACE && (!z->b || (!z->re && !z->a))))
            return err_set(PS_ERR_NOMEM, "%s: out of memory", t->path);
    }
    return PS_OK;
}

/* GPT-2's pattern as the reference's ByteLevel pre-tokenizer spells it in
 * JavaScript, whose \s is not Unicode White_Space: it has U+FEFF and lacks
 * U+0085. */
#define HFTOK_JS_WS "\\t-\\r\\x{20}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}\\x{feff}"
static const char hftok_bl_pattern[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" HFTOK_JS_WS
                                       "\\p{L}\\p{N}]+|[" HFTOK_JS_WS "]+(?![^" HFTOK_JS_WS "])|[" HFTOK_JS_WS "]+";

static ps_status load_pretokenizers(hftok *t, const json_t *root)
{
    const json_t *items[HFTOK_MAX_SEQUENCE];
    size_t n = 0;
    const json_t *pt = json_object_get(root, "pre_tokenizer");
    t->has_pretok = pt && !json_is_null(pt);
    ps_status st = flatten(pt, "pretokenizers", t->path, "pre_tokenizer", items, &n);
    if (st)
        return st;
    t->pres = calloc(n ? n : 1, sizeof *t->pres);
    if (!t->pres)
        return err_set(PS_ERR_NOMEM, "%s: out of memory", t->path);
    for (size_t i = 0; i < n; i++) {
        const json_t *o = items[i];
        const char *ty = jtype(o);
        hftok_pre *p = &t->pres[t->n_pres++];
        if (!ty)
            return err_set(PS_ERR_FORMAT, "%s: a pre_tokenizer without a \"type\"", t->path);
        if (t->byte_level)
            return err_set(PS_ERR_INVALID, "%s: pre_tokenizer %s after ByteLevel is not supported", t->path, ty);
        if (strcmp(ty, "Split") == 0) {
            p->kind = HFTOK_PRE_SPLIT;
            bool invert = jbool(o, "invert", false), is_string = false;
            const json_t *bj = json_object_get(o, "behavior");
            const char *beh = json_is_string(bj) ? json_string_value(bj) : "";
            if ((st = pattern_compile(json_object_get(o, "pattern"), t->path, "pre_tokenizer Split", &p->re,
                                      &is_string)))
                return st;
            if (invert) {
                p->mode = HFTOK_SPLIT_MATCHES;
            } else if (strcasecmp(beh, "Removed") == 0) {
                uint32_t caps = 0;
                size_t minlen = 0;
                pcre2_pattern_info(p->re, PCRE2_INFO_CAPTURECOUNT, &caps);
                pcre2_pattern_info(p->re, PCRE2_INFO_MINLENGTH, &minlen);
                if (is_string || caps || minlen == 0)
                    return err_set(PS_ERR_INVALID,
                                   "%s: pre_tokenizer Split: behavior Removed with %s is not supported (the "
                                   "reference keeps what it should remove)",
                                   t->path, is_string ? "a String pattern" : caps ? "capture groups" : "empty matches");
                p->mode = HFTOK_SPLIT_REMOVED;
            } else if (strcmp(beh, "Isolated") == 0) {
                p->mode = HFTOK_SPLIT_ISOLATED;
            } else {
                return err_set(PS_ERR_INVALID, "%s: pre_tokenizer Split: behavior \"%s\" is not supported (the "
                                               "reference treats it as Isolated)", t->path, beh);
            }
        } else if (strcmp(ty, "ByteLevel") == 0) {
            p->kind = HFTOK_PRE_BYTELEVEL;
            p->add_prefix_space = jbool(o, "add_prefix_space", false);
            if (jbool(o, "use_regex", true)) {
                if (!t->bl_re && (st = re_compile(hftok_bl_pattern, sizeof hftok_bl_pattern - 1, t->path,
                                                  "ByteLevel", &t->bl_re)))
                    return st;
                p->re = t->bl_re;
            }
            t->byte_level = true;
        } else if (strcmp(ty, "Metaspace") == 0) {
            p->kind = HFTOK_PRE_METASPACE;
            const json_t *r = json_object_get(o, "replacement"), *sr = json_object_get(o, "str_rep");
            const json_t *ps = json_object_get(o, "prepend_scheme");
            const char *rep = json_is_string(r) ? json_string_value(r) : "\xe2\x96\x81";
            p->rep_len = json_is_string(r) ? json_string_length(r) : 3;
            p->rep = dup_n(rep, p->rep_len);
            bool sr_ok = json_is_string(sr) && json_string_length(sr) > 0;
            p->str_rep_len = sr_ok ? json_string_length(sr) : p->rep_len;
            p->str_rep = dup_n(sr_ok ? json_string_value(sr) : rep, p->str_rep_len);
            if (!p->rep || !p->str_rep)
                return err_set(PS_ERR_NOMEM, "%s: out of memory", t->path);
            if (jbool(o, "split", false))
                return err_set(PS_ERR_INVALID, "%s: pre_tokenizer Metaspace with split: true is not supported "
                                               "(the reference does not split)", t->path);
            const char *scheme = json_is_string(ps) ? json_string_value(ps) : NULL;
            if (!scheme && !jbool(o, "add_prefix_space", true))
                return err_set(PS_ERR_INVALID, "%s: pre_tokenizer Metaspace with add_prefix_space: false and no "
                                               "prepend_scheme is not supported (the reference prepends)", t->path);
            if (!scheme || strcmp(scheme, "always") == 0)
                p->prepend = HFTOK_PREPEND_ALWAYS;
            else if (strcmp(scheme, "first") == 0)
                p->prepend = HFTOK_PREPEND_FIRST;
            else if (strcmp(scheme, "never") == 0)
                p->prepend = HFTOK_PREPEND_NEVER;
            else
                return err_set(PS_ERR_FORMAT, "%s: pre_tokenizer Metaspace: unknown prepend_scheme \"%s\"", t->path,
                               scheme);
        } else {
            return err_set(PS_ERR_INVALID, "%s: pre_tokenizer %s is not supported", t->path, ty);
        }
    }
    return PS_OK;
}

static ps_status load_decoders(hftok *t, const json_t *root)
{
    const json_t *items[HFTOK_MAX_SEQUENCE];
    size_t n = 0;
    const json_t *dj = json_object_get(root, "decoder");
    t->has_decoder = dj && !json_is_null(dj);
    ps_status st = flatten(dj, "decoders", t->path, "decoder", items, &n);
    if (st)
        return st;
    t->decs = calloc(n ? n : 1, sizeof *t->decs);
    if (!t->decs)
        return err_set(PS_ERR_NOMEM, "%s: out of memory", t->path);
    for (size_t i = 0; i < n; i++) {
        const json_t *o = items[i];
        const char *ty = jtype(o);
        hftok_dec *d = &t->decs[t->n_decs++];
        if (!ty)
            return err_set(PS_ERR_FORMAT, "%s: a decoder without a \"type\"", t->path);
        if (strcmp(ty, "ByteLevel") == 0) {
            d->kind = HFTOK_DEC_BYTELEVEL;
        } else if (strcmp(ty, "Metaspace") == 0) {
            d->kind = HFTOK_DEC_METASPACE;
            const json_t *r = json_object_get(o, "replacement");
            d->a_len = json_is_string(r) ? json_string_length(r) : 3;
            d->a = dup_n(json_is_string(r) ? json_string_value(r) : "\xe2\x96\x81", d->a_len);
            if (!d->a)
                return err_set(PS_ERR_NOMEM, "%s: out of memory", t->path);
            if (!d->a_len)
                return err_set(PS_ERR_FORMAT, "%s: decoder Metaspace: an empty replacement", t->path);
        } else if (strcmp(ty, "Replace") == 0) {
            d->kind = HFTOK_DEC_REPLACE;
            const json_t *ps = json_object_get(json_object_get(o, "pattern"), "String");
            const json_t *c = json_object_get(o, "content");
            if (!json_is_string(ps) || !json_string_length(ps))
                return err_set(PS_ERR_INVALID, "%s: decoder Replace: only a non-empty String pattern is supported",
                               t->path);
            d->a_len = json_string_length(ps);
            d->a = dup_n(json_string_value(ps), d->a_len);
            d->b_len = json_is_string(c) ? json_string_length(c) : 0;
            d->b = dup_n(json_is_string(c) ? json_string_value(c) : "", d->b_len);
            if (!d->a || !d->b)
                return err_set(PS_ERR_NOMEM, "%s: out of memory", t->path);
            if (memchr(d->b, '$', d->b_len))
                return err_set(PS_ERR_INVALID, "%s: decoder Replace: a content with '$' is not supported", t->path);
        } else if (strcmp(ty, "ByteFallback") == 0) {
            d->kind = HFTOK_DEC_BYTEFALLBACK;
        } else if (strcmp(ty, "Fuse") == 0) {
            d->kind = HFTOK_DEC_FUSE;
        } else if (strcmp(ty, "Strip") == 0) {
            d->kind = HFTOK_DEC_STRIP;
            const json_t *c = json_object_get(o, "content"), *a = json_object_get(o, "start"),
                         *z = json_object_get(o, "stop");
            if ((a && !json_is_integer(a)) || (z && !json_is_integer(z)) || json_integer_value(a) < 0 ||
                json_integer_value(z) < 0)
                return err_set(PS_ERR_FORMAT, "%s: decoder Strip: start/stop must be non-negative integers", t->path);
            d->start = (size_t)json_integer_value(a);
            d->stop = (size_t)json_integer_value(z);
            if (json_is_string(c)) {
                size_t m, cl = json_string_length(c);
                uint32_t cp = cl ? u8_cp((const unsigned char *)json_string_value(c), &m) : 0;
                /* JS compares one UTF-16 unit with the content */
                d->strip_cp = cl && m == cl && cp < 0x10000 ? cp : 0;
            }
        } else {
            return err_set(PS_ERR_INVALID, "%s: decoder %s is not supported", t->path, ty);
        }
    }
    return PS_OK;
}

/* The model: vocab, merges, flags. */
static ps_status load_model(hftok *t, const json_t *root)
{
    const json_t *m = json_object_get(root, "model");
    if (!json_is_object(m))
        return err_set(PS_ERR_FORMAT, "%s: no \"model\" object", t->path);
    const char *ty = jtype(m);
    if (!ty)
        return err_set(PS_ERR_FORMAT, "%s: model without a \"type\"", t->path);
    if (strcmp(ty, "BPE") != 0)
        return err_set(PS_ERR_INVALID, "%s: model type %s is not supported (BPE only)", t->path, ty);
    const json_t *dropout = json_object_get(m, "dropout");
    if (dropout && !json_is_null(dropout) && json_number_value(dropout) != 0.0)
        return err_set(PS_ERR_INVALID, "%s: model BPE with dropout is not supported", t->path);
    const char *opt[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (size_t i = 0; i < 2; i++) {
        const json_t *v = json_object_get(m, opt[i]);
        if (json_is_string(v) && json_string_length(v))
            return err_set(PS_ERR_INVALID, "%s: model BPE with a non-empty %s is not supported", t->path, opt[i]);
    }
    t->ignore_merges = jbool(m, "ignore_merges", false);
    t->byte_fallback = jbool(m, "byte_fallback", false);
    t->fuse_unk = jbool(m, "fuse_unk", false);

    const json_t *vocab = json_object_get(m, "vocab");
    if (!json_is_object(vocab))
        return err_set(PS_ERR_FORMAT, "%s: model.vocab is not an object", t->path);
    size_t n = json_object_size(vocab);
    if (n == 0 || n > HFTOK_MAX_VOCAB)
        return err_set(n ? PS_ERR_NOMEM : PS_ERR_FORMAT, "%s: model.vocab has %zu tokens (need 1 to %zu)", t->path,
                       n, HFTOK_MAX_VOCAB);
    t->n_model = n;
    const char **keys = calloc(n, sizeof *keys);
    size_t *klen = calloc(n, sizeof *klen);
    t->moff = calloc(n + 1, sizeof *t->moff);
    t->mfinal = malloc(n * sizeof *t->mfinal);
    ps_status st = PS_OK;
    if (!keys || !klen || !t->moff || !t->mfinal || !strmap_init(&t->vmap, n)) {
        st = err_set(PS_ERR_NOMEM, "%s: out of memory for %zu tokens", t->path, n);
        goto done;
    }
    const char *key;
    size_t key_len, total = 0;
    json_t *val;
    json_object_keylen_foreach((json_t *)vocab, key, key_len, val) {
        json_int_t id = json_is_integer(val) ? json_integer_value(val) : -1;
        if (id < 0 || (size_t)id >= n) {
            st = err_set(PS_ERR_FORMAT, "%s: model.vocab: token \"%.48s\" has id %s (ids must be 0..%zu)", t->path,
                         key, json_is_integer(val) ? "out of range" : "that is not an integer", n - 1);
            goto done;
        }
        if (keys[id]) {
            st = err_set(PS_ERR_FORMAT, "%s: model.vocab: id %lld is used twice (\"%.48s\" and \"%.48s\")", t->path,
                         (long long)id, keys[id], key);
            goto done;
        }
        if (key_len > HFTOK_MAX_TOKEN_BYTES) {
            st = err_set(PS_ERR_NOMEM, "%s: model.vocab: token %lld has %zu bytes (limit %zu)", t->path,
                         (long long)id, key_len, HFTOK_MAX_TOKEN_BYTES);
            goto done;
        }
        keys[id] = key;
        klen[id] = key_len;
        total += key_len;
    }
    t->mstr = malloc(total + 1);
    if (!t->mstr) {
        st = err_set(PS_ERR_NOMEM, "%s: out of memory", t->path);
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        memcpy(t->mstr + t->moff[i], keys[i], klen[i]);
        t->moff[i + 1] = t->moff[i] + klen[i];
        t->mfinal[i] = (int32_t)i;
        uint32_t *slot = strmap_find(&t->vmap, keys[i], klen[i], model_str, t);
        *slot = (uint32_t)i + 1; /* jansson refused duplicate keys */
    }
    /* unk_token, byte tables */
    const json_t *unk = json_object_get(m, "unk_token");
    t->unk_model = -1;
    if (json_is_string(unk)) {
        t->unk_model = model_lookup(t, json_string_value(unk), json_string_length(unk));
        if (t->unk_model < 0) {
            st = err_set(PS_ERR_FORMAT, "%s: model.unk_token \"%.48s\" is not in the vocabulary", t->path,
                         json_string_value(unk));
            goto done;
        }
    }
    for (int b = 0; b < 256; b++) {
        char o[8];
        int k = snprintf(o, sizeof o, "<0x%02X>", b);
        t->fb_id[b] = model_lookup(t, o, (size_t)k);
        uint32_t cp = (uint32_t)b;
        if (!((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE)) {
            uint32_t kk = 0;
            for (int x = 0; x < b; x++)
                kk += !((x >= 0x21 && x <= 0x7E) || (x >= 0xA1 && x <= 0xAC) || x >= 0xAE);
            cp = 0x100 + kk;
        }
        char u[4];
        t->byte_id[b] = model_lookup(t, u, u8_put(cp, u));
    }
    /* merges: "a b" strings or [a, b] pairs; parts and result in the vocabulary */
    const json_t *merges = json_object_get(m, "merges");
    if (!json_is_array(merges)) {
        st = err_set(PS_ERR_FORMAT, "%s: model.merges is not an array", t->path);
        goto done;
    }
    size_t nm = json_array_size(merges);
    if (nm > HFTOK_MAX_MERGES) {
        st = err_set(PS_ERR_NOMEM, "%s: model.merges has %zu entries (limit %zu)", t->path, nm, HFTOK_MAX_MERGES);
        goto done;
    }
    size_t cap = 16;
    while (cap < 2 * nm)
        cap *= 2;
    t->merges = malloc(cap * sizeof *t->merges);
    if (!t->merges) {
        st = err_set(PS_ERR_NOMEM, "%s: out of memory for %zu merges", t->path, nm);
        goto done;
    }
    for (size_t i = 0; i < cap; i++)
        t->merges[i].key = UINT64_MAX;
    t->merge_mask = cap - 1;
    sbuf cat = {0};
    for (size_t r = 0; r < nm; r++) {
        const json_t *e = json_array_get(merges, r);
        const char *a, *b;
        size_t al, bl;
        if (r > 0 && json_is_string(e) != json_is_string(json_array_get(merges, 0))) {
            /* the reference reads every entry in the first one's form */
            st = err_set(PS_ERR_FORMAT, "%s: model.merges[%zu] mixes \"a b\" strings and [\"a\", \"b\"] pairs", t->path, r);
            break;
        }
        if (json_is_string(e)) {
            const char *s = json_string_value(e);
            size_t sl = json_string_length(e);
            const char *sp = memchr(s, ' ', sl);
            if (!sp || memchr(sp + 1, ' ', sl - (size_t)(sp + 1 - s))) {
                st = err_set(PS_ERR_FORMAT, "%s: model.merges[%zu] \"%.48s\" is not two tokens separated by one space",
                             t->path, r, s);
                break;
            }
            a = s;
            al = (size_t)(sp - s);
            b = sp + 1;
            bl = sl - al - 1;
        } else if (json_is_array(e) && json_array_size(e) == 2 && json_is_string(json_array_get(e, 0)) &&
                   json_is_string(json_array_get(e, 1))) {
            a = json_string_value(json_array_get(e, 0));
            al = json_string_length(json_array_get(e, 0));
            b = json_string_value(json_array_get(e, 1));
            bl = json_string_length(json_array_get(e, 1));
        } else {
            st = err_set(PS_ERR_FORMAT, "%s: model.merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]", t->path, r);
            break;
        }
        /* Empty parts are refused, so a merge's result is longer than
         * either part: no merge can (re)create its own parts, no cycles. */
        int32_t ia = al ? model_lookup(t, a, al) : -1, ib = bl ? model_lookup(t, b, bl) : -1;
        cat.n = 0;
        sb_put(&cat, a, al);
        sb_put(&cat, b, bl);
        if (cat.oom) {
            st = err_set(PS_ERR_NOMEM, "%s: out of memory", t->path);
            break;
        }
        int32_t iab = model_lookup(t, cat.p, cat.n);
        if (ia < 0 || ib < 0 || iab < 0) {
            const char *which = ia < 0 ? a : ib < 0 ? b : cat.p;
            int wl = (int)(ia < 0 ? al : ib < 0 ? bl : cat.n);
            st = err_set(PS_ERR_FORMAT, "%s: model.merges[%zu] names \"%.*s\", which is not in the vocabulary",
                         t->path, r, wl > 48 ? 48 : wl, which);
            break;
        }
        uint64_t k = merge_key(ia, ib);
        size_t i = (size_t)((k * 0x9E3779B97F4A7C15ULL) >> 20) & t->merge_mask;
        while (t->merges[i].key != UINT64_MAX && t->merges[i].key != k)
            i = (i + 1) & t->merge_mask;
        if (t->merges[i].key == k) {
            st = err_set(PS_ERR_FORMAT, "%s: model.merges[%zu] repeats merges[%u] (\"%.*s\" + \"%.*s\")", t->path, r,
                         t->merges[i].rank, (int)(al > 48 ? 48 : al), a, (int)(bl > 48 ? 48 : bl), b);
            break;
        }
        t->merges[i] = (hftok_merge){k, (uint32_t)r, iab};
        t->n_merges++;
    }
    free(cat.p);
done:
    free(keys);
    free(klen);
    return st;
}

static int u64_cmp(const void *x, const void *y)
{
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return a < b ? -1 : a > b;
}

/* Sort by (first byte, length descending, index): one 64-bit key each
 * (lengths are at most HFTOK_MAX_TOKEN_BYTES < 2^16, indices < 2^32). */
static ps_status dict_build(hftok *t, hftok_dict *d, bool norm)
{
    d->norm = norm;
    size_t cap = t->n_added ? t->n_added : 1;
    d->idx = malloc(cap * sizeof *d->idx);
    uint64_t *key = malloc(cap * sizeof *key);
    if (!d->idx || !key) {
        free(key);
        return err_set(PS_ERR_NOMEM, "%s: out of memory", t->path);
    }
    for (size_t i = 0; i < t->n_added; i++) {
        const hftok_added *a = &t->added[i];
        const char *s = norm ? a->norm : a->content;
        size_t l = norm ? a->norm_len : a->len;
        if ((a->norm != NULL) == norm && l > 0)
            key[d->n++] = (uint64_t)(unsigned char)s[0] << 48 | (uint64_t)(0xFFFF - l) << 32 | (uint64_t)i;
    }
    qsort(key, d->n, sizeof *key, u64_cmp);
    memset(d->first, 0, sizeof d->first);
    for (size_t k = 0; k < d->n; k++) {
        d->idx[k] = (uint32_t)key[k];
        d->first[(key[k] >> 48) + 1]++;
    }
    for (int b = 0; b < 256; b++)
        d->first[b + 1] += d->first[b];
    free(key);
    return PS_OK;
}

static ps_status load_added(hftok *t, const json_t *root)
{
    const json_t *arr = json_object_get(root, "added_tokens");
    size_t n = json_is_array(arr) ? json_array_size(arr) : 0;
    if (arr && !json_is_null(arr) && !json_is_array(arr))
        return err_set(PS_ERR_FORMAT, "%s: added_tokens is not an array", t->path);
    if (n > HFTOK_MAX_ADDED)
        return err_set(PS_ERR_NOMEM, "%s: %zu added_tokens (limit %zu)", t->path, n, HFTOK_MAX_ADDED);
    t->added = calloc(n ? n : 1, sizeof *t->added);
    t->amap_key = malloc((2 * n + 1) * sizeof *t->amap_key);
    if (!t->added || !t->amap_key || !strmap_init(&t->amap, 2 * n) || !strmap_init(&t->cmap, n))
        return err_set(PS_ERR_NOMEM, "%s: out of memory", t->path);
    size_t max_id = t->n_model;
    for (size_t i = 0; i < n; i++) {
        const json_t *o = json_array_get(arr, i), *c = json_object_get(o, "content"), *id = json_object_get(o, "id");
        if (!json_is_string(c) || !json_is_integer(id))
            return err_set(PS_ERR_FORMAT, "%s: added_tokens[%zu] needs a string \"content\" and an integer \"id\"",
                           t->path, i);
        json_int_t v = json_integer_value(id);
        size_t cl = json_string_length(c);
        if (v < 0 || (size_t)v >= HFTOK_MAX_VOCAB + HFTOK_MAX_ADDED)
            return err_set(PS_ERR_FORMAT, "%s: added_tokens[%zu] has id %lld (limit %zu)", t->path, i, (long long)v,
                           HFTOK_MAX_VOCAB + HFTOK_MAX_ADDED - 1);
        if (cl == 0 || cl > HFTOK_MAX_TOKEN_BYTES)
            return err_set(PS_ERR_FORMAT, "%s: added_tokens[%zu] has a content of %zu bytes (need 1 to %zu)", t->path,
                           i, cl, HFTOK_MAX_TOKEN_BYTES);
        hftok_added *a = &t->added[t->n_added++];
        a->content = dup_n(json_string_value(c), cl);
        a->len = cl;
        a->id = (int32_t)v;
        a->special = jbool(o, "special", false);
        a->lstrip = jbool(o, "lstrip", false);
        a->rstrip = jbool(o, "rstrip", false);
        a->normalized = jbool(o, "normalized", !a->special);
        if (!a->content)
            return err_set(PS_ERR_NOMEM, "%s: out of memory", t->path);
        uint32_t *slot = strmap_find(&t->cmap, a->content, cl, added_str, t);
        if (*slot)
            return err_set(PS_ERR_FORMAT, "%s: added_tokens[%zu] repeats the content \"%.48s\"", t->path, i,
                           a->content);
        *slot = (uint32_t)i + 1;
        for (size_t j = 0; j < i; j++)
            if (t->added[j].id == a->id)
                return err_set(PS_ERR_FORMAT, "%s: added_tokens[%zu] and [%zu] share the id %d", t->path, j, i, a->id);
        if ((size_t)v + 1 > max_id)
            max_id = (size_t)v + 1;
        if (a->normalized && t->n_norms) {
            sbuf z = {0};
            ps_status st = normalize(t, a->content, cl, &z);
            if (st)
                return st;
            a->norm = z.p;
            a->norm_len = z.n;
            if (!a->norm_len) {
                free(a->norm);
                return err_set(PS_ERR_FORMAT, "%s: added_tokens[%zu] normalizes to nothing", t->path, i);
            }
        }
    }
    /* The reference's added_tokens_map: content, then normalized content,
     * token after token, a later key replacing an earlier one. */
    for (size_t i = 0; i < t->n_added; i++) {
        for (int k = 0; k < 2; k++) {
            hftok_added *a = &t->added[i];
            if (k == 1 && !a->norm)
                continue;
            uint32_t key = (uint32_t)i << 1 | (uint32_t)k;
            t->amap_key[t->n_amap] = key;
            uint32_t *slot = strmap_find(&t->amap, k ? a->norm : a->content, k ? a->norm_len : a->len, amap_str, t);
            if (*slot) {
                t->amap_key[*slot - 1] = key;
            } else {
                *slot = (uint32_t)++t->n_amap;
            }
        }
    }
    t->n_ids = max_id;
    /* model ids whose string names an added token come out as its id */
    for (size_t i = 0; i < t->n_model; i++) {
        const hftok_added *a = added_lookup(t, t->mstr + t->moff[i], t->moff[i + 1] - t->moff[i]);
        if (a)
            t->mfinal[i] = a->id;
    }
    ps_status st = dict_build(t, &t->dict_raw, false);
    return st ? st : dict_build(t, &t->dict_norm, true);
}

/* Token strings of every id, and their display bytes. */
static ps_status build_ids(hftok *t)
{
    size_t n = t->n_ids;
    t->ioff = calloc(n + 1, sizeof *t->ioff);
    t->doff = calloc(n + 1, sizeof *t->doff);
    t->ihas = calloc(n, sizeof *t->ihas);
    const char **s = calloc(n, sizeof *s);
    size_t *l = calloc(n, sizeof *l);
    ps_status st = PS_OK;
    if (!t->ioff || !t->doff || !t->ihas || !s || !l) {
        st = err_set(PS_ERR_NOMEM, "%s: out of memory", t->path);
        goto done;
    }
    for (size_t i = 0; i < t->n_model; i++) {
        s[i] = t->mstr + t->moff[i];
        l[i] = t->moff[i + 1] - t->moff[i];
        t->ihas[i] = true;
    }
    for (size_t i = 0; i < t->n_added; i++) {
        s[t->added[i].id] = t->added[i].content;
        l[t->added[i].id] = t->added[i].len;
        t->ihas[t->added[i].id] = true;
    }
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += l[i];
    t->istr = malloc(total + 1);
    if (!t->istr) {
        st = err_set(PS_ERR_NOMEM, "%s: out of memory", t->path);
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        if (l[i])
            memcpy(t->istr + t->ioff[i], s[i], l[i]);
        t->ioff[i + 1] = t->ioff[i] + l[i];
    }
    sbuf d = {0};
    for (size_t i = 0; i < n && st == PS_OK; i++) {
        if (t->ihas[i]) {
            strlist one = {0};
            if (!strlist_add(&one, t->istr + t->ioff[i], l[i])) {
                st = err_set(PS_ERR_NOMEM, "%s: out of memory", t->path);
                break;
            }
            st = decode_chain(t, &one, true);
            for (size_t k = 0; st == PS_OK && k < one.n; k++)
                sb_put(&d, one.s[k].p, one.s[k].n);
            strlist_free(&one);
        }
        t->doff[i + 1] = d.n;
    }
    if (st == PS_OK && d.oom)
        st = err_set(PS_ERR_NOMEM, "%s: out of memory", t->path);
    t->dbytes = d.p ? d.p : calloc(1, 1);
    if (st == PS_OK && !t->dbytes)
        st = err_set(PS_ERR_NOMEM, "%s: out of memory", t->path);
done:
    free(s);
    free(l);
    return st;
}

/* A token given as "text" or {"content": "text"} (tokenizer_config.json). */
static const char *token_text(const json_t *v)
{
    if (json_is_string(v))
        return json_string_value(v);
    if (json_is_object(v) && json_is_string(json_object_get(v, "content")))
        return json_string_value(json_object_get(v, "content"));
    return NULL;
}

static int32_t id_of_text(const hftok *t, const char *s)
{
    size_t n = strlen(s);
    const hftok_added *a = content_lookup(t, s, n);
    if (a)
        return a->id;
    int32_t m = model_lookup(t, s, n);
    return m >= 0 ? t->mfinal[m] : -1;
}

/* as_real: configuration files, whose model_max_length (1e30) is no JSON
 * integer jansson takes; every number is then a real. */
static ps_status load_json(const char *path, size_t limit, bool as_real, json_t **out)
{
    char *data = NULL;
    size_t len = 0;
    *out = NULL;
    ps_status st = fs_read_file(path, limit, &data, &len);
    if (st)
        return st;
    json_error_t je;
    json_t *root = json_loadb(data, len, JSON_REJECT_DUPLICATES | (as_real ? JSON_DECODE_INT_AS_REAL : 0), &je);
    free(data);
    if (!root)
        return err_set(PS_ERR_FORMAT, "%s: not valid JSON (line %d, column %d): %s", path, je.line, je.column,
                       je.text);
    if (!json_is_object(root)) {
        json_decref(root);
        return err_set(PS_ERR_FORMAT, "%s: expected a JSON object", path);
    }
    *out = root;
    return PS_OK;
}

/* BOS: tokenizer_config.json, generation_config.json, the template. */
static ps_status load_bos(hftok *t, const json_t *root, const char *config_dir)
{
    t->bos_id = -1;
    int add = -1; /* -1: not said */
    ps_status st = PS_OK;
    char *cfg = config_dir ? fs_join(config_dir, "tokenizer_config.json") : NULL;
    char *gen = config_dir ? fs_join(config_dir, "generation_config.json") : NULL;
    if (config_dir && (!cfg || !gen)) {
        st = err_set(PS_ERR_NOMEM, "%s: out of memory", t->path);
        goto done;
    }
    if (cfg && fs_is_file(cfg)) {
        json_t *c;
        if ((st = load_json(cfg, HFTOK_MAX_CONFIG_BYTES, true, &c)))
            goto done;
        const char *flags[] = {"remove_space", "do_lowercase_and_remove_accent"};
        for (size_t i = 0; i < 2; i++)
            if (jbool(c, flags[i], false)) {
                json_decref(c);
                st = err_set(PS_ERR_INVALID, "%s: %s: true is not supported", cfg, flags[i]);
                goto done;
            }
        const json_t *ab = json_object_get(c, "add_bos_token");
        if (json_is_boolean(ab))
            add = json_is_true(ab);
        const char *bos = token_text(json_object_get(c, "bos_token"));
        if (bos) {
            t->bos_id = id_of_text(t, bos);
            if (t->bos_id < 0) {
                st = err_set(PS_ERR_FORMAT, "%s: bos_token \"%.48s\" is not a token of %s", cfg, bos, t->path);
                json_decref(c);
                goto done;
            }
        }
        json_decref(c);
    }
    if (t->bos_id < 0 && gen && fs_is_file(gen)) {
        json_t *g;
        if ((st = load_json(gen, HFTOK_MAX_CONFIG_BYTES, true, &g)))
            goto done;
        const json_t *b = json_object_get(g, "bos_token_id");
        if (json_is_number(b)) {
            double d = json_number_value(b);
            long long v = d >= 0 && d < 1e9 && d == (double)(long long)d ? (long long)d : -1;
            if (v < 0 || (size_t)v >= t->n_ids || !t->ihas[v]) {
                st = err_set(PS_ERR_FORMAT, "%s: bos_token_id %g is not a token of %s", gen, d, t->path);
                json_decref(g);
                goto done;
            }
            t->bos_id = (int32_t)v;
        }
        json_decref(g);
    }
    /* TemplateProcessing whose single sequence starts with a special token */
    const json_t *pp = json_object_get(root, "post_processor");
    const char *pty = json_is_object(pp) ? jtype(pp) : NULL;
    bool template_bos = false;
    if (pty && strcmp(pty, "TemplateProcessing") == 0) {
        const json_t *first = json_array_get(json_object_get(pp, "single"), 0);
        const json_t *sp = json_object_get(first, "SpecialToken");
        const char *name = json_is_object(sp) ? json_string_value(json_object_get(sp, "id")) : NULL;
        if (name) {
            const json_t *ids = json_object_get(json_object_get(json_object_get(pp, "special_tokens"), name), "ids");
            const json_t *id0 = json_array_get(ids, 0);
            int32_t id = json_is_integer(id0) ? (int32_t)json_integer_value(id0) : id_of_text(t, name);
            if (id >= 0 && (size_t)id < t->n_ids && t->ihas[id]) {
                template_bos = true;
                if (t->bos_id < 0)
                    t->bos_id = id;
            }
        }
    }
    /* TransformerLens prepends the BOS unless told otherwise. */
    t->add_bos = add >= 0 ? add == 1 : (template_bos || t->bos_id >= 0);
done:
    free(cfg);
    free(gen);
    return st;
}

/* Everything but reading the file: root (owned by the caller), name for messages. */
static ps_status hftok_build(hftok **out, const char *name, json_t *root, const char *config_dir)
{
    *out = NULL;
    hftok *t = calloc(1, sizeof *t);
    if (!t || !(t->path = dup_n(name, strlen(name)))) {
        free(t);
        return err_set(PS_ERR_NOMEM, "%s: out of memory", name);
    }
    ps_status st = PS_OK;
    const json_t *tr = json_object_get(root, "truncation"), *pd = json_object_get(root, "padding");
    if ((tr && !json_is_null(tr)) || (pd && !json_is_null(pd)))
        st = err_set(PS_ERR_INVALID, "%s: %s is not supported", name, tr && !json_is_null(tr) ? "truncation" : "padding");
    if (st == PS_OK)
        st = load_model(t, root);
    if (st == PS_OK)
        st = load_normalizers(t, root);
    if (st == PS_OK)
        st = load_pretokenizers(t, root);
    if (st == PS_OK)
        st = load_decoders(t, root);
    if (st == PS_OK)
        st = load_added(t, root);
    if (st == PS_OK)
        st = build_ids(t);
    if (st == PS_OK)
        st = load_bos(t, root, config_dir);
    if (st != PS_OK) {
        hftok_free(t);
        return st;
    }
    *out = t;
    return PS_OK;
}

ps_status hftok_load(hftok **out, const char *json_path, const char *config_dir)
{
    if (!out || !json_path)
        return err_set(PS_ERR_INVALID, "hftok_load: NULL argument");
    *out = NULL;
    json_t *root = NULL;
    ps_status st = load_json(json_path, HFTOK_MAX_FILE_BYTES, false, &root);
    if (st == PS_OK)
        st = hftok_build(out, json_path, root, config_dir);
    json_decref(root);
    return st;
}

ps_status hftok_load_mem(hftok **out, const char *name, const char *data, size_t len)
{
    if (!out || !name || (!data && len))
        return err_set(PS_ERR_INVALID, "hftok_load_mem: NULL argument");
    *out = NULL;
    if (len > HFTOK_MAX_FILE_BYTES)
        return err_set(PS_ERR_NOMEM, "%s: %zu bytes (limit %zu)", name, len, HFTOK_MAX_FILE_BYTES);
    json_error_t je;
    json_t *root = json_loadb(data ? data : "", len, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return err_set(PS_ERR_FORMAT, "%s: not valid JSON (line %d, column %d): %s", name, je.line, je.column,
                       je.text);
    ps_status st = json_is_object(root) ? hftok_build(out, name, root, NULL)
                                        : err_set(PS_ERR_FORMAT, "%s: expected a JSON object", name);
    json_decref(root);
    return st;
}
