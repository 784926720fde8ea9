/*
 * dataset: JSONL prompt pairs (read, write, tokenize and validate).
 *
 * Every record keeps its whole JSON object, so fields this module does not
 * know (added by the CLI, e.g. token ids) survive a read/write round trip.
 * The generators are in dataset_gen.c.
 */
#include "dataset.h"
#include "dataset_internal.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "jsonutil.h"



/* Where item i came from, for messages: "file.jsonl:12" or "<generated> item 3". */
static void item_where(const dataset *d, size_t i, char *buf, size_t size)
{
    const char *path = d->path ? d->path : DATASET_GENERATED_PATH;
    if (d->items[i].line > 0)
        snprintf(buf, size, "%s:%zu", path, d->items[i].line);
    else
        snprintf(buf, size, "%s item %zu", path, i);
}

/* A short, one-line rendering of user text for error messages. */
void dataset_quote_text(const char *s, char *buf, size_t size)
{
    size_t k = 0;
    const size_t max_chars = 60;
    for (size_t i = 0; s[i] && k + 5 < size; i++) {
        if (i == max_chars) {
            memcpy(buf + k, "...", 3);
            k += 3;
            break;
        }
        unsigned char c = (unsigned char)s[i];
        if (c == '\n') {
            buf[k++] = '\\';
            buf[k++] = 'n';
        } else if (c < 0x20 || c == 0x7f) {
            buf[k++] = '?';
        } else {
            buf[k++] = (char)c;
        }
    }
    buf[k] = '\0';
}

void dataset_init(dataset *d)
{
    d->items = NULL;
    d->n = 0;
    d->path = NULL;
}

void dataset_free(dataset *d)
{
    if (!d)
        return;
    for (size_t i = 0; i < d->n; i++)
        json_decref(d->items[i].obj);
    free(d->items);
    free(d->path);
    dataset_init(d);
}

/* A token id field: a whole number in [0, INT32_MAX]. */
static bool is_token_id(const json_t *v)
{
    return json_is_integer(v) && json_integer_value(v) >= 0 && json_integer_value(v) <= INT32_MAX;
}

/* The token id fields of an item (clean_ids, corrupted_ids: non-empty
 * arrays of ids; answer_id, wrong_id: ids), all four or none; *has says
 * which. */
static ps_status item_check_ids(const json_t *obj, const char *where, bool *has)
{
    static const char *const fields[] = {"clean_ids", "corrupted_ids", "answer_id", "wrong_id"};
    size_t n_present = 0;
    for (size_t k = 0; k < 4; k++)
        n_present += json_object_get(obj, fields[k]) != NULL;
    *has = n_present == 4;
    if (n_present == 0)
        return PS_OK;
    for (size_t k = 0; k < 4; k++) {
        json_t *v = json_object_get(obj, fields[k]);
        if (!v)
            return err_set(PS_ERR_FORMAT, "%s: field '%s' is missing (clean_ids, corrupted_ids, answer_id and "
                           "wrong_id go together)", where, fields[k]);
        if (k >= 2 ? !is_token_id(v) : !json_is_array(v) || json_array_size(v) == 0)
            return err_set(PS_ERR_FORMAT, "%s: field '%s' is %s, not %s", where, fields[k], jsonutil_kind(v),
                           k >= 2 ? "a token id" : "a non-empty array of token ids");
        for (size_t i = 0; k < 2 && i < json_array_size(v); i++)
            if (!is_token_id(json_array_get(v, i)))
                return err_set(PS_ERR_FORMAT, "%s: field '%s' element %zu is not a token id (a whole number >= 0)",
                               where, fields[k], i);
    }
    return PS_OK;
}

/* Point the item's string fields into its object; `where` names it.  An
 * item with token ids may leave the text fields out ("" then). */
static ps_status item_bind(dataset_item *it, const char *where)
{
    static const char *const fields[] = {"clean", "corrupted", "answer", "wrong"};
    const char *vals[4];
    bool has_ids;
    ps_status st = item_check_ids(it->obj, where, &has_ids);
    if (st)
        return st;
    for (size_t k = 0; k < 4; k++) {
        json_t *v = json_object_get(it->obj, fields[k]);
        if (!v && has_ids) {
            vals[k] = "";
            continue;
        }
        if (!v)
            return err_set(PS_ERR_FORMAT, "%s: field '%s' is missing", where, fields[k]);
        if (!json_is_string(v))
            return err_set(PS_ERR_FORMAT, "%s: field '%s' is %s, not a string", where, fields[k],
                           jsonutil_kind(v));
        vals[k] = json_string_value(v);
    }
    it->clean = vals[0];
    it->corrupted = vals[1];
    it->answer = vals[2];
    it->wrong = vals[3];
    return PS_OK;
}

/* Append obj (reference stolen) as a new item. */
ps_status dataset_push(dataset *d, size_t *cap, json_t *obj, size_t line, const char *where)
{
    if (d->n >= DATASET_MAX_ITEMS) {
        json_decref(obj);
        return err_set(PS_ERR_NOMEM, "%s: more than %zu items, the limit of a dataset", where,
                       DATASET_MAX_ITEMS);
    }
    if (d->n == *cap) {
        size_t ncap = *cap ? *cap * 2 : 64;
        if (ncap > DATASET_MAX_ITEMS)
            ncap = DATASET_MAX_ITEMS;
        dataset_item *p = realloc(d->items, ncap * sizeof *p);
        if (!p) {
            json_decref(obj);
            return err_set(PS_ERR_NOMEM, "%s: cannot allocate %zu items", where, ncap);
        }
        d->items = p;
        *cap = ncap;
    }
    dataset_item *it = &d->items[d->n];
    memset(it, 0, sizeof *it);
    it->obj = obj;
    it->line = line;
    ps_status st = item_bind(it, where);
    if (st != PS_OK) {
        json_decref(obj);
        return st;
    }
    d->n++;
    return PS_OK;
}

/* ---------------------------------------------------------------- reader */

static bool is_blank(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r')
            return false;
    return true;
}

/* Upper bound on the JSON values and keys of line[0..n) (jsonutil). */
static size_t count_json_values(const char *s, size_t n)
{
    size_t values, at;
    jsonutil_scan_shape(s, n, SIZE_MAX, SIZE_MAX, &values, &at);
    return values;
}

ps_status dataset_read_jsonl(dataset *d, const char *path)
{
    dataset_init(d);
    FILE *f = fopen(path, "rb");
    if (!f)
        return err_set(PS_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) == 0 && S_ISDIR(sb.st_mode)) {
        fclose(f);
        return err_set(PS_ERR_IO, "%s: is a directory, not a JSONL file", path);
    }
    ps_status st = dataset_read_jsonl_stream(d, f, path);
    fclose(f);
    return st;
}

/* "path:line" into buf, for messages: formatted only when needed, since a
 * file of blank lines would otherwise spend its time here. */
static const char *where_at(char *buf, size_t cap, const char *path, size_t line)
{
    snprintf(buf, cap, "%s:%zu", path, line);
    return buf;
}

/* The next record of r: *obj (NULL at the end), its line in r->line and
 * the line's byte offset in *offset.  The file-wide limits count as in
 * dataset_read_jsonl, so both readers take and refuse the same files. */
static ps_status reader_next(dataset_reader *r, json_t **obj, uint64_t *offset)
{
    *obj = NULL;
    char where[1200];
    const char *path = r->path;
    while (!r->eof) {
        size_t len = 0;
        int c;
        r->line++;
        *offset = r->offset;
        while ((c = getc_unlocked(r->f)) != EOF && c != '\n') {
            if (len == DATASET_MAX_LINE_BYTES)
                return err_set(PS_ERR_NOMEM, "%s: line is longer than the limit of %zu bytes",
                               where_at(where, sizeof where, path, r->line), DATASET_MAX_LINE_BYTES);
            r->buf[len++] = (char)c;
        }
        if (c == EOF) {
            if (ferror(r->f))
                return err_set(PS_ERR_IO, "%s: read failed: %s", where_at(where, sizeof where, path, r->line),
                               strerror(errno));
            r->eof = true;
        }
        r->offset += len + !r->eof;
        /* Both totals bound the memory the records take: jansson spends
         * 30-110 bytes per value, so a file of tiny values would cost up
         * to 16 times its size. */
        r->total_bytes += len + !r->eof;
        if (r->total_bytes > DATASET_MAX_BYTES)
            return err_set(PS_ERR_NOMEM, "%s: the file is larger than the limit of %zu bytes",
                           where_at(where, sizeof where, path, r->line), DATASET_MAX_BYTES);
        if (is_blank(r->buf, len))
            continue;
        where_at(where, sizeof where, path, r->line);
        r->total_values += count_json_values(r->buf, len);
        if (r->total_values > DATASET_MAX_VALUES)
            return err_set(PS_ERR_NOMEM,
                           "%s: more than %zu JSON values and keys in the file, the limit of a dataset", where,
                           DATASET_MAX_VALUES);
        json_error_t jerr;
        json_t *o = json_loadb(r->buf, len, JSON_REJECT_DUPLICATES, &jerr);
        if (!o)
            return err_set(PS_ERR_FORMAT, "%s: invalid JSON at column %d: %s", where, jerr.column, jerr.text);
        if (!json_is_object(o)) {
            ps_status st = err_set(PS_ERR_FORMAT, "%s: expected a JSON object, got %s", where, jsonutil_kind(o));
            json_decref(o);
            return st;
        }
        *obj = o;
        return PS_OK;
    }
    return PS_OK;
}

static ps_status reader_init(dataset_reader *r, FILE *f, const char *path)
{
    memset(r, 0, sizeof *r);
    r->f = f;
    /* One fixed buffer of the line cap (+1 to detect overflow): a file
     * without newlines cannot make us allocate more than that. */
    r->buf = malloc(DATASET_MAX_LINE_BYTES + 1);
    r->path = strdup(path);
    if (!r->buf || !r->path)
        return err_set(PS_ERR_NOMEM, "%s: cannot allocate the line buffer", path);
    return PS_OK;
}

ps_status dataset_read_jsonl_stream(dataset *d, FILE *f, const char *path)
{
    dataset_init(d);
    dataset_reader r;
    ps_status st = reader_init(&r, f, path);
    d->path = strdup(path);
    if (st == PS_OK && !d->path)
        st = err_set(PS_ERR_NOMEM, "%s: cannot allocate the line buffer", path);
    size_t cap = 0;
    char where[1200];
    while (st == PS_OK) {
        json_t *obj;
        uint64_t offset;
        if ((st = reader_next(&r, &obj, &offset)) || !obj)
            break;
        st = dataset_push(d, &cap, obj, r.line, where_at(where, sizeof where, path, r.line));
    }
    r.f = NULL; /* the caller's */
    dataset_reader_close(&r);
    if (st == PS_OK && d->n == 0)
        st = err_set(PS_ERR_INVALID, "%s: no records (the file is empty or blank)", path);
    if (st != PS_OK)
        dataset_free(d);
    return st;
}

/* ------------------------------------------------------------- streaming */

ps_status dataset_reader_open(dataset_reader *r, const char *path)
{
    memset(r, 0, sizeof *r);
    FILE *f = fopen(path, "rb");
    if (!f)
        return err_set(PS_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) == 0 && S_ISDIR(sb.st_mode)) {
        fclose(f);
        return err_set(PS_ERR_IO, "%s: is a directory, not a JSONL file", path);
    }
    ps_status st = reader_init(r, f, path);
    if (st)
        dataset_reader_close(r);
    return st;
}

ps_status dataset_reader_next(dataset_reader *r, dataset_item *it, uint64_t *offset)
{
    memset(it, 0, sizeof *it);
    json_t *obj;
    ps_status st = reader_next(r, &obj, offset);
    if (st || !obj)
        return st;
    if (r->n >= DATASET_MAX_ITEMS) {
        json_decref(obj);
        return err_set(PS_ERR_NOMEM, "%s:%zu: more than %zu items, the limit of a dataset", r->path, r->line,
                       DATASET_MAX_ITEMS);
    }
    char where[1200];
    it->obj = obj;
    it->line = r->line;
    if ((st = item_bind(it, where_at(where, sizeof where, r->path, r->line)))) {
        json_decref(obj);
        memset(it, 0, sizeof *it);
        return st;
    }
    r->n++;
    return PS_OK;
}

ps_status dataset_reader_read_at(dataset_reader *r, uint64_t offset, size_t line, dataset_item *it)
{
    memset(it, 0, sizeof *it);
    if (offset != r->offset || r->eof) {
        if (fseeko(r->f, (off_t)offset, SEEK_SET) != 0)
            return err_set(PS_ERR_IO, "%s:%zu: cannot seek: %s", r->path, line, strerror(errno));
        r->offset = offset;
        r->eof = false;
    }
    /* the limits were checked on the first pass */
    r->total_bytes = r->total_values = 0;
    r->line = line - 1;
    json_t *obj = NULL;
    uint64_t at;
    ps_status st = reader_next(r, &obj, &at);
    if (st == PS_OK && (!obj || r->line != line || at != offset)) {
        json_decref(obj);
        return err_set(PS_ERR_IO, "%s:%zu: the record is not where it was (the file changed while in use)",
                       r->path, line);
    }
    if (st)
        return err_wrap(st, "%s changed while in use", r->path);
    char where[1200];
    it->obj = obj;
    it->line = line;
    if ((st = item_bind(it, where_at(where, sizeof where, r->path, line)))) {
        json_decref(obj);
        memset(it, 0, sizeof *it);
    }
    return st;
}

void dataset_reader_close(dataset_reader *r)
{
    if (r->f)
        fclose(r->f);
    free(r->buf);
    free(r->path);
    memset(r, 0, sizeof *r);
}

/* ---------------------------------------------------------------- writer */

ps_status dataset_write_jsonl(const dataset *d, FILE *out, const char *name_for_errors)
{
    const char *name = name_for_errors ? name_for_errors : "output";
    for (size_t i = 0; i < d->n; i++) {
        /* JSON_PRESERVE_ORDER keeps fields in insertion order, so a dataset
         * written twice is byte-identical. */
        if (json_dumpf(d->items[i].obj, out, JSON_COMPACT | JSON_PRESERVE_ORDER) != 0 ||
            fputc('\n', out) == EOF)
            return err_set(PS_ERR_IO, "%s: write failed at record %zu: %s", name, i + 1,
                           strerror(errno));
    }
    if (fflush(out) != 0 || ferror(out))
        return err_set(PS_ERR_IO, "%s: write failed: %s", name, strerror(errno));
    return PS_OK;
}

/* -------------------------------------------------------------- tokenize */

ps_status dataset_count_tokens(const tokenizer *t, const char *s, size_t *n, const char *where)
{
    int32_t *ids = NULL;
    ps_status st = tokenizer_encode(t, s, strlen(s), &ids, n);
    free(ids);
    if (st != PS_OK)
        return err_wrap(st, "%s", where);
    return PS_OK;
}

/* The id of a one-token completion of `prompt`, or an error saying how many
 * it has.  GPT-2's vocab/merges: `s` encoded alone (its regex never lets a
 * word's leading space merge with what precedes it).  A tokenizer.json: the
 * token `s` adds after the prompt itself (tokenizer_next_token), which is
 * the one the model predicts there; a SentencePiece-style normalizer
 * prepends "▁" to a text encoded alone, so " Paris" alone is two tokens. */
static ps_status single_token(const tokenizer *t, const char *prompt, const char *s, const char *field,
                              const char *where, int32_t *id)
{
    if (tokenizer_is_hf(t)) {
        ps_status st = tokenizer_next_token(t, prompt, s, id);
        if (st != PS_OK)
            return err_wrap(st, "%s: %s after the clean prompt", where, field);
        return PS_OK;
    }
    int32_t *ids = NULL;
    size_t n = 0;
    ps_status st = tokenizer_encode(t, s, strlen(s), &ids, &n);
    if (st != PS_OK)
        return err_wrap(st, "%s: %s", where, field);
    if (n != 1) {
        char q[256], spaced[512];
        dataset_quote_text(s, q, sizeof q);
        free(ids);
        /* the usual mistake: the answer without its leading space */
        int32_t sid;
        snprintf(spaced, sizeof spaced, " %s", s);
        bool hint = s[0] != ' ' && strlen(s) < 256 && tokenizer_single_token(t, spaced, &sid) == PS_OK;
        return err_set(PS_ERR_INVALID, "%s: %s '%s' is %zu tokens, not one%s%s%s", where, field, q, n,
                       hint ? " (did you mean ' " : "", hint ? q : "", hint ? "', one token, with its leading space?)" : "");
    }
    *id = ids[0];
    free(ids);
    return PS_OK;
}

void dataset_tokens_free(dataset_tokens *tk)
{
    if (!tk)
        return;
    free(tk->clean_ids);
    free(tk->corrupted_ids);
    memset(tk, 0, sizeof *tk);
}

/* Encode a prompt into dst[off..]; dst is allocated with room for bos. */
static ps_status encode_prompt(const tokenizer *t, const char *s, bool bos, const char *what,
                               const char *where, int32_t **dst, size_t *n)
{
    *dst = NULL;
    *n = 0;
    if (!*s)
        return err_set(PS_ERR_INVALID, "%s: %s prompt is empty", where, what);
    int32_t *ids = NULL;
    size_t m = 0;
    ps_status st = tokenizer_encode(t, s, strlen(s), &ids, &m);
    if (st != PS_OK)
        return err_wrap(st, "%s: %s prompt", where, what);
    size_t off = bos ? 1 : 0;
    int32_t *out = malloc((m + off) * sizeof *out);
    if (!out) {
        free(ids);
        return err_set(PS_ERR_NOMEM, "%s: cannot allocate %zu token ids", where, m + off);
    }
    if (bos)
        out[0] = tokenizer_bos_id(t);
    if (m)
        memcpy(out + off, ids, m * sizeof *ids);
    free(ids);
    *dst = out;
    *n = m + off;
    return PS_OK;
}

/* An item's token ids as they are (no BOS added: the ids are the whole
 * prompt), checked like the tokenized text. */
static ps_status item_ids(const dataset_item *it, const char *where, size_t max_tokens, dataset_tokens *out)
{
    const json_t *a = json_object_get(it->obj, "clean_ids"), *b = json_object_get(it->obj, "corrupted_ids");
    const size_t nc = json_array_size(a), nk = json_array_size(b);
    if (nc != nk)
        return err_set(PS_ERR_INVALID, "%s: clean_ids and corrupted_ids differ in length (%zu vs %zu)", where, nc, nk);
    if (max_tokens > 0 && nc > max_tokens)
        return err_set(PS_ERR_INVALID, "%s: prompt is %zu tokens, longer than the limit of %zu", where, nc,
                       max_tokens);
    out->clean_ids = malloc(nc * sizeof *out->clean_ids);
    out->corrupted_ids = malloc(nc * sizeof *out->corrupted_ids);
    if (!out->clean_ids || !out->corrupted_ids) {
        dataset_tokens_free(out);
        return err_set(PS_ERR_NOMEM, "%s: cannot allocate %zu token ids", where, 2 * nc);
    }
    for (size_t t = 0; t < nc; t++) {
        out->clean_ids[t] = (int32_t)json_integer_value(json_array_get(a, t));
        out->corrupted_ids[t] = (int32_t)json_integer_value(json_array_get(b, t));
    }
    out->answer_id = (int32_t)json_integer_value(json_object_get(it->obj, "answer_id"));
    out->wrong_id = (int32_t)json_integer_value(json_object_get(it->obj, "wrong_id"));
    if (out->answer_id == out->wrong_id) {
        dataset_tokens_free(out);
        return err_set(PS_ERR_INVALID, "%s: answer_id and wrong_id are the same token (%d)", where,
                       (int)json_integer_value(json_object_get(it->obj, "answer_id")));
    }
    out->n_tokens = nc;
    return PS_OK;
}

ps_status dataset_tokenize(const dataset *d, size_t i, const tokenizer *t, bool bos,
                           size_t max_tokens, dataset_tokens *out)
{
    memset(out, 0, sizeof *out);
    if (i >= d->n)
        return err_set(PS_ERR_RANGE, "%s: item %zu out of range (%zu items)",
                       d->path ? d->path : DATASET_GENERATED_PATH, i, d->n);
    char where[1200];
    item_where(d, i, where, sizeof where);
    return dataset_item_tokenize(&d->items[i], where, t, bos, max_tokens, out);
}

ps_status dataset_item_tokenize(const dataset_item *it, const char *where, const tokenizer *t, bool bos,
                                size_t max_tokens, dataset_tokens *out)
{
    memset(out, 0, sizeof *out);
    const bool has_text = json_object_get(it->obj, "clean") != NULL;
    if ((!t || !has_text) && json_object_get(it->obj, "clean_ids"))
        return item_ids(it, where, max_tokens, out);
    if (!t)
        return err_set(PS_ERR_INVALID, "%s: the item has no clean_ids, corrupted_ids, answer_id and wrong_id, and "
                       "this model's tokenizer is not supported yet (give token ids)", where);
    size_t nc = 0, nk = 0;
    bos = bos && tokenizer_add_bos(t); /* a tokenizer without BOS (Qwen3) gets none */
    ps_status st = encode_prompt(t, it->clean, bos, "clean", where, &out->clean_ids, &nc);
    if (st == PS_OK)
        st = encode_prompt(t, it->corrupted, bos, "corrupted", where, &out->corrupted_ids, &nk);
    if (st == PS_OK && nc != nk) {
        size_t off = bos ? 1 : 0;
        st = err_set(PS_ERR_INVALID, "%s: clean and corrupted prompts differ in token length (%zu vs %zu)",
                     where, nc - off, nk - off);
    }
    if (st == PS_OK && max_tokens > 0 && nc > max_tokens) {
        size_t bl = 0;
        const char *bt = bos ? tokenizer_token_bytes(t, tokenizer_bos_id(t), &bl) : NULL;
        st = err_set(PS_ERR_INVALID, "%s: prompt is %zu tokens%s%.*s, longer than the limit of %zu",
                     where, nc, bt ? " with " : "", (int)(bl > 64 ? 64 : bl), bt ? bt : "", max_tokens);
    }
    if (st == PS_OK)
        st = single_token(t, it->clean, it->answer, "answer", where, &out->answer_id);
    if (st == PS_OK)
        st = single_token(t, it->clean, it->wrong, "wrong", where, &out->wrong_id);
    if (st == PS_OK && out->answer_id == out->wrong_id) {
        char q[256];
        dataset_quote_text(it->answer, q, sizeof q);
        st = err_set(PS_ERR_INVALID, "%s: answer and wrong are the same token ('%s')", where, q);
    }
    if (st != PS_OK) {
        dataset_tokens_free(out);
        return st;
    }
    out->n_tokens = nc;
    return PS_OK;
}
