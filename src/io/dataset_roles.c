/*
 * dataset_roles: the roles of dataset items (named spans of the clean
 * prompt mapped to token positions) and the metadata fields carried into
 * results files (dataset.h explains both).
 */
#include "dataset.h"
#include "dataset_internal.h"

#include <stdlib.h>
#include <string.h>

#include "jsonutil.h"

/* Where item i came from, for messages. */
static void roles_where(const dataset *d, size_t i, char *buf, size_t size)
{
    const char *path = d->path ? d->path : DATASET_GENERATED_PATH;
    if (d->items[i].line > 0)
        snprintf(buf, size, "%s:%zu", path, d->items[i].line);
    else
        snprintf(buf, size, "%s item %zu", path, i);
}

static bool role_name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > DATASET_MAX_ROLE_NAME)
        return false;
    for (size_t k = 0; k < n; k++) {
        char c = s[k];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '+' ||
              c == '-' || c == '.'))
            return false;
    }
    return true;
}

/* The byte span [*start, *end) of one role value in `clean`. */
static ps_status role_span(const json_t *v, const char *clean, const char *name, const char *where, size_t *start,
                           size_t *end)
{
    size_t len = strlen(clean);
    if (json_is_array(v)) {
        json_t *a = json_array_get(v, 0), *b = json_array_get(v, 1);
        if (json_array_size(v) != 2 || !json_is_integer(a) || !json_is_integer(b))
            return err_set(PS_ERR_FORMAT, "%s: role '%s' must be [start, end] (two integers) or {\"text\": ...}",
                           where, name);
        json_int_t s = json_integer_value(a), e = json_integer_value(b);
        if (s < 0 || e <= s || (unsigned long long)e > len)
            return err_set(PS_ERR_INVALID,
                           "%s: role '%s' [%lld, %lld] is not a non-empty byte span of the clean prompt (%zu bytes)",
                           where, name, (long long)s, (long long)e, len);
        *start = (size_t)s;
        *end = (size_t)e;
        return PS_OK;
    }
    if (json_is_object(v)) {
        json_t *text = json_object_get(v, "text"), *occ = json_object_get(v, "occurrence");
        if (!json_is_string(text) || json_string_length(text) == 0)
            return err_set(PS_ERR_FORMAT, "%s: role '%s' needs a non-empty string \"text\"", where, name);
        json_int_t k = 1;
        if (occ) {
            if (!json_is_integer(occ) || json_integer_value(occ) < 1)
                return err_set(PS_ERR_FORMAT, "%s: role '%s': \"occurrence\" must be an integer >= 1", where, name);
            k = json_integer_value(occ);
        }
        const char *t = json_string_value(text), *at = clean;
        for (json_int_t n = 0; at; n++) {
            at = strstr(at, t);
            if (at && n + 1 == k)
                break;
            if (at)
                at++;
        }
        if (!at) {
            char q[256];
            dataset_quote_text(t, q, sizeof q);
            return err_set(PS_ERR_INVALID, "%s: role '%s': '%s' does not occur %lld time%s in the clean prompt", where,
                           name, q, (long long)k, k > 1 ? "s" : "");
        }
        *start = (size_t)(at - clean);
        *end = *start + strlen(t);
        return PS_OK;
    }
    return err_set(PS_ERR_FORMAT, "%s: role '%s' is %s, not [start, end] or {\"text\": ...}", where, name,
                   jsonutil_kind(v));
}

void dataset_roles_free(dataset_roles *r)
{
    if (!r)
        return;
    for (size_t i = 0; i < r->n; i++)
        free(r->names[i]);
    free(r->names);
    r->names = NULL;
    r->n = 0;
}

static ps_status roles_add(dataset_roles *r, const char *name, const char *where)
{
    for (size_t k = 0; k < r->n; k++)
        if (!strcmp(r->names[k], name))
            return PS_OK;
    if (r->n == DATASET_MAX_ROLES)
        return err_set(PS_ERR_INVALID, "%s: role '%s' is one more than the limit of %zu roles in a dataset", where,
                       name, DATASET_MAX_ROLES);
    if (!r->names && !(r->names = calloc(DATASET_MAX_ROLES + 1, sizeof *r->names)))
        return err_set(PS_ERR_NOMEM, "out of memory");
    if (!(r->names[r->n] = strdup(name)))
        return err_set(PS_ERR_NOMEM, "out of memory");
    r->n++;
    return PS_OK;
}

ps_status dataset_roles_add_item(dataset_roles *r, const dataset_item *it, const char *where)
{
    json_t *roles = json_object_get(it->obj, DATASET_FIELD_ROLES);
    if (!roles)
        return PS_OK;
    if (!json_is_object(roles))
        return err_set(PS_ERR_FORMAT, "%s: field '" DATASET_FIELD_ROLES "' is %s, not an object", where,
                       jsonutil_kind(roles));
    ps_status st = PS_OK;
    const char *name;
    json_t *v;
    json_object_foreach(roles, name, v)
    {
        size_t s, e;
        if (!role_name_ok(name)) {
            char q[256];
            dataset_quote_text(name, q, sizeof q);
            return err_set(PS_ERR_INVALID, "%s: role name '%s' is not 1..%zu bytes of A-Z a-z 0-9 _ + - .", where, q,
                           DATASET_MAX_ROLE_NAME);
        }
        if ((st = role_span(v, it->clean, name, where, &s, &e)) || (st = roles_add(r, name, where)))
            return st;
    }
    return PS_OK;
}

ps_status dataset_roles_finish(dataset_roles *r, const char *where)
{
    return roles_add(r, DATASET_ROLE_END, where);
}

ps_status dataset_roles_collect(const dataset *d, dataset_roles *r)
{
    r->names = NULL;
    r->n = 0;
    char where[1200];
    ps_status st = PS_OK;
    for (size_t i = 0; i < d->n && st == PS_OK; i++) {
        if (!json_object_get(d->items[i].obj, DATASET_FIELD_ROLES))
            continue;
        roles_where(d, i, where, sizeof where);
        st = dataset_roles_add_item(r, &d->items[i], where);
    }
    if (st == PS_OK)
        st = dataset_roles_finish(r, d->path ? d->path : DATASET_GENERATED_PATH);
    if (st != PS_OK)
        dataset_roles_free(r);
    return st;
}

ps_status dataset_roles_resolve(const dataset *d, size_t i, const dataset_roles *r, const tokenizer *t,
                                const int32_t *ids, size_t n_ids, bool bos, int32_t *pos)
{
    char where[1200];
    roles_where(d, i, where, sizeof where);
    return dataset_roles_resolve_item(&d->items[i], where, r, t, ids, n_ids, bos, pos);
}

ps_status dataset_roles_resolve_item(const dataset_item *it, const char *where, const dataset_roles *r,
                                     const tokenizer *t, const int32_t *ids, size_t n_ids, bool bos, int32_t *pos)
{
    for (size_t k = 0; k < r->n; k++)
        pos[k] = -1;
    const size_t off = bos ? 1 : 0;
    if (n_ids <= off)
        return err_set(PS_ERR_INVALID, "%s: no tokens to place roles on", where);
    const char *clean = it->clean;
    const size_t len = strlen(clean);
    json_t *roles = json_object_get(it->obj, DATASET_FIELD_ROLES);
    if (!roles) {
        for (size_t k = 0; k < r->n; k++)
            if (!strcmp(r->names[k], DATASET_ROLE_END))
                pos[k] = (int32_t)(n_ids - 1);
        return PS_OK;
    }
    /* Byte offset where each token starts: the length of the decoded text of
     * the tokens before it.  Decoding, not concatenating the tokens' bytes,
     * so that SentencePiece pieces ("\xe2\x96\x81John") count as the text they
     * stand for; for byte-level BPE the two are the same.  The decoded
     * prefixes must grow and the whole must be the clean prompt. */
    const size_t nt = n_ids - off;
    size_t *start = malloc((nt + 1) * sizeof *start);
    if (!start)
        return err_set(PS_ERR_NOMEM, "out of memory");
    start[0] = 0;
    ps_status st = PS_OK;
    for (size_t k = 1; k <= nt && st == PS_OK; k++) {
        char *text = NULL;
        size_t tl = 0;
        if ((st = tokenizer_decode(t, ids + off, k, &text, &tl)) != PS_OK)
            break;
        const bool whole = k == nt;
        if (tl < start[k - 1] || tl > len || memcmp(clean, text, tl) != 0 || (whole && tl != len))
            st = err_set(PS_ERR_INVALID,
                         "%s: roles: the first %zu tokens do not decode to the start of the clean prompt, so spans "
                         "cannot be placed on them",
                         where, k);
        start[k] = tl;
        free(text);
    }
    if (st != PS_OK) {
        free(start);
        return st;
    }
    for (size_t k = 0; k < r->n && st == PS_OK; k++) {
        json_t *v = roles ? json_object_get(roles, r->names[k]) : NULL;
        if (!v) {
            if (!strcmp(r->names[k], DATASET_ROLE_END))
                pos[k] = (int32_t)(n_ids - 1);
            continue;
        }
        size_t s, e;
        if ((st = role_span(v, clean, r->names[k], where, &s, &e)))
            break;
        /* the token whose bytes contain byte s */
        size_t tok = 0;
        while (tok + 1 < nt && start[tok + 1] <= s)
            tok++;
        pos[k] = (int32_t)(tok + off);
    }
    free(start);
    return st;
}

/* ---------------------------------------------------------------- metadata */

static bool meta_name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > DATASET_MAX_META_NAME)
        return false;
    for (size_t k = 0; k < n; k++) {
        char c = s[k];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'))
            return false;
    }
    return true;
}

void dataset_meta_begin(dataset_meta_builder *b)
{
    memset(b, 0, sizeof *b);
}

void dataset_meta_add_item(dataset_meta_builder *b, const dataset_item *it)
{
    static const char *const reserved[] = {"clean", "corrupted", "answer", "wrong", DATASET_FIELD_ROLES};
    dataset_meta *m = &b->m;
    const char *key;
    json_t *v;
    json_object_foreach(it->obj, key, v)
    {
        bool skip = !meta_name_ok(key);
        for (size_t r = 0; r < sizeof reserved / sizeof *reserved && !skip; r++)
            skip = !strcmp(key, reserved[r]);
        if (skip)
            continue;
        dataset_meta_kind kind;
        bool known = true;
        if (json_is_string(v))
            kind = DATASET_META_STRING;
        else if (json_is_integer(v))
            kind = DATASET_META_INT;
        else
            known = false;
        size_t k = 0;
        while (k < m->n && strcmp(m->f[k].name, key))
            k++;
        if (k == m->n) {
            if (m->n == DATASET_MAX_META)
                continue;
            snprintf(m->f[k].name, sizeof m->f[k].name, "%s", key);
            m->f[k].kind = known ? kind : DATASET_META_STRING;
            b->bad[k] = !known;
            m->n++;
        } else if (!known || m->f[k].kind != kind) {
            b->bad[k] = true;
        }
    }
}

void dataset_meta_end(const dataset_meta_builder *b, dataset_meta *m)
{
    /* drop the fields of another type (arrays, reals, mixed kinds) */
    size_t w = 0;
    for (size_t k = 0; k < b->m.n; k++)
        if (!b->bad[k])
            m->f[w++] = b->m.f[k];
    m->n = w;
}

void dataset_meta_collect(const dataset *d, dataset_meta *m)
{
    dataset_meta_builder b;
    dataset_meta_begin(&b);
    for (size_t i = 0; i < d->n; i++)
        dataset_meta_add_item(&b, &d->items[i]);
    dataset_meta_end(&b, m);
}
