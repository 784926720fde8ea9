#include "journal.h"
#include "fault.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sha256.h"

#define HEADER_BYTES 512
#define MAGIC "PSJRNL01"
#define RECORD_MAGIC 0x31525350u

static void checksum(const void *payload, size_t n, unsigned char out[8]);

static void header_encode(unsigned char h[HEADER_BYTES], const journal_identity *id)
{
    memset(h, 0, HEADER_BYTES);
    memcpy(h, MAGIC, 8);
    memcpy(h + 8, id->job_sha256, 64);
    memcpy(h + 8 + 65, id->model_sha256, 64);
    memcpy(h + 8 + 130, id->dataset_sha256, 64);
    memcpy(h + 8 + 195, &id->n_prompts, sizeof id->n_prompts);
    checksum(h, HEADER_BYTES - 8, h + HEADER_BYTES - 8);
}

/* The header's own checksum holds, or is absent (all zero: a journal of an
 * earlier version). */
static bool header_intact(const unsigned char h[HEADER_BYTES])
{
    static const unsigned char zero[8];
    unsigned char want[8];
    if (memcmp(h + HEADER_BYTES - 8, zero, 8) == 0)
        return true;
    checksum(h, HEADER_BYTES - 8, want);
    return memcmp(h + HEADER_BYTES - 8, want, 8) == 0;
}

static void header_decode(const unsigned char h[HEADER_BYTES], journal_identity *id)
{
    memset(id, 0, sizeof *id);
    memcpy(id->job_sha256, h + 8, 64);
    memcpy(id->model_sha256, h + 8 + 65, 64);
    memcpy(id->dataset_sha256, h + 8 + 130, 64);
    memcpy(&id->n_prompts, h + 8 + 195, sizeof id->n_prompts);
}

static ps_status write_all(int fd, const void *buf, size_t n, const char *path)
{
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return err_set(PS_ERR_IO, "%s: write failed: %s (the records before are intact: make room, then rerun "
                           "to resume)", path, w == 0 ? "no progress" : strerror(errno));
        p += w;
        n -= (size_t)w;
    }
    return PS_OK;
}

/* Read exactly n bytes at off; false at end of file or on error. */
static bool read_at(int fd, void *buf, size_t n, off_t off)
{
    char *p = buf;
    while (n > 0) {
        ssize_t r = pread(fd, p, n, off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return false;
        p += r;
        n -= (size_t)r;
        off += r;
    }
    return true;
}

static void checksum(const void *payload, size_t n, unsigned char out[8])
{
    char hex[65];
    sha256_hex(payload, n, hex);
    for (int i = 0; i < 8; i++) {
        unsigned v;
        sscanf(hex + 2 * i, "%2x", &v);
        out[i] = (unsigned char)v;
    }
}

/* Validate the record at off; its payload size in *n, or false if torn/corrupt. */
static bool record_at(int fd, off_t off, off_t file_end, size_t *n, void **payload_out)
{
    uint32_t head[2];
    if (off + 8 > file_end || !read_at(fd, head, sizeof head, off) || head[0] != RECORD_MAGIC ||
        head[1] > JOURNAL_MAX_RECORD || off + 8 + (off_t)head[1] + 8 > file_end)
        return false;
    void *payload = malloc(head[1] ? head[1] : 1);
    unsigned char sum[8], want[8];
    if (!payload || !read_at(fd, payload, head[1], off + 8) || !read_at(fd, sum, 8, off + 8 + head[1])) {
        free(payload);
        return false;
    }
    checksum(payload, head[1], want);
    if (memcmp(sum, want, 8) != 0) {
        free(payload);
        return false;
    }
    *n = head[1];
    if (payload_out)
        *payload_out = payload;
    else
        free(payload);
    return true;
}

/* The next intact record at or after `from` (a record magic whose length
 * and checksum hold), or -1: where the records resume after damage. */
static off_t next_intact(int fd, off_t from, off_t file_end)
{
    enum { BLOCK = 1 << 20 };
    static const uint32_t magic = RECORD_MAGIC;
    unsigned char *buf = malloc(BLOCK);
    if (!buf)
        return -1;
    off_t found = -1;
    for (off_t base = from; found < 0 && base + 4 <= file_end; base += BLOCK - 3) {
        size_t want = (size_t)(file_end - base < BLOCK ? file_end - base : BLOCK);
        if (!read_at(fd, buf, want, base))
            break;
        for (size_t k = 0; k + 4 <= want && found < 0; k++) {
            size_t n;
            if (memcmp(buf + k, &magic, 4) == 0 && record_at(fd, base + (off_t)k, file_end, &n, NULL))
                found = base + (off_t)k;
        }
        if (want < BLOCK)
            break;
    }
    free(buf);
    return found;
}

/* The prompt a sweep's record is about (journal_prompt: its first u64). */
static bool record_prompt(int fd, off_t off, off_t file_end, uint64_t *prompt)
{
    size_t n;
    void *payload;
    if (!record_at(fd, off, file_end, &n, &payload))
        return false;
    bool ok = n >= sizeof *prompt;
    if (ok)
        memcpy(prompt, payload, sizeof *prompt);
    free(payload);
    return ok;
}

/* Damage at `bad` (record number `index`, 0-based): count the intact
 * records after it.  0 means a torn tail. */
static size_t intact_after(int fd, off_t bad, off_t file_end, uint64_t *first, uint64_t *last)
{
    size_t count = 0;
    for (off_t off = next_intact(fd, bad + 1, file_end); off >= 0;) {
        size_t n;
        uint64_t prompt;
        if (record_prompt(fd, off, file_end, &prompt)) {
            if (count == 0 || prompt < *first)
                *first = prompt;
            if (count == 0 || prompt > *last)
                *last = prompt;
        }
        count++;
        if (!record_at(fd, off, file_end, &n, NULL))
            break;
        off += 8 + (off_t)n + 8;
        size_t m;
        if (!record_at(fd, off, file_end, &m, NULL))
            off = next_intact(fd, off + 1, file_end);
    }
    return count;
}

/* The bytes at off (to the end of the file, the first record that fails)
 * are a write cut short by a crash: the record's head is incomplete, or it
 * is a record's head and the file ends before the record does.  Anything
 * else there (a full-length record whose checksum fails, a head that is no
 * record's) is damage: a torn append only ever shortens the last record. */
static bool tail_is_torn(int fd, off_t off, off_t file_end)
{
    uint32_t head[2];
    if (off + 8 > file_end)
        return true;
    if (!read_at(fd, head, sizeof head, off))
        return false;
    return head[0] == RECORD_MAGIC && head[1] <= JOURNAL_MAX_RECORD && off + 8 + (off_t)head[1] + 8 > file_end;
}

ps_status journal_open(journal *j, const char *path, const journal_identity *id, bool overwrite, bool drop_damaged)
{
    memset(j, 0, sizeof *j);
    j->fd = -1;
    j->path = strdup(path);
    j->id = *id;
    if (!j->path)
        return err_set(PS_ERR_NOMEM, "out of memory");
    int fd = open(path, O_RDWR | O_CREAT | (overwrite ? O_TRUNC : 0), 0644);
    if (fd < 0) {
        ps_status st = err_set(PS_ERR_IO, "%s: cannot open the journal: %s", path, strerror(errno));
        journal_close(j, false);
        return st;
    }
    j->fd = fd;
    off_t size = lseek(fd, 0, SEEK_END);
    unsigned char h[HEADER_BYTES];
    if (size < HEADER_BYTES) {
        /* new (or torn before its header was complete): start over */
        header_encode(h, id);
        ps_status st;
        if (ftruncate(fd, 0) != 0 || lseek(fd, 0, SEEK_SET) != 0)
            st = err_set(PS_ERR_IO, "%s: cannot reset: %s", path, strerror(errno));
        else if ((st = write_all(fd, h, sizeof h, path)) == PS_OK && fdatasync(fd) != 0)
            st = err_set(PS_ERR_IO, "%s: fdatasync failed: %s", path, strerror(errno));
        if (st) {
            journal_close(j, false);
            return st;
        }
        j->end = HEADER_BYTES;
        return PS_OK;
    }
    journal_identity have;
    if (!read_at(fd, h, sizeof h, 0) || memcmp(h, MAGIC, 8) != 0) {
        journal_close(j, false);
        return err_set(PS_ERR_FORMAT, "%s: not a patchsweep journal (use --overwrite to replace it)", path);
    }
    if (!header_intact(h)) {
        journal_close(j, false);
        return err_set(PS_ERR_FORMAT,
                       "%s: the journal's header is damaged (its checksum fails), so its records cannot be trusted "
                       "to belong to this job: --overwrite starts over", path);
    }
    header_decode(h, &have);
    const char *what = strcmp(have.job_sha256, id->job_sha256)       ? "job file"
                       : strcmp(have.model_sha256, id->model_sha256) ? "model"
                       : strcmp(have.dataset_sha256, id->dataset_sha256) ? "dataset"
                       : have.n_prompts != id->n_prompts                 ? "number of prompts"
                                                                         : NULL;
    if (what) {
        journal_close(j, false);
        return err_set(PS_ERR_INVALID, "%s: the results so far come from a different %s (use --overwrite to start over)",
                       path, what);
    }
    off_t off = HEADER_BYTES;
    size_t n;
    uint64_t last_good = 0;
    bool any_good = false;
    void *payload;
    while (record_at(fd, off, size, &n, &payload)) {
        if (n >= sizeof last_good) {
            memcpy(&last_good, payload, sizeof last_good); /* journal_prompt's prompt */
            any_good = true;
        }
        free(payload);
        off += 8 + (off_t)n + 8;
        j->n_records++;
    }
    uint64_t first_after = 0, last_after = 0;
    size_t after = off < size ? intact_after(fd, off, size, &first_after, &last_after) : 0;
    const bool damaged = after > 0 || (off < size && !tail_is_torn(fd, off, size));
    if (damaged && !drop_damaged) {
        char before[64] = "the first";
        if (any_good)
            snprintf(before, sizeof before, "prompt %llu", (unsigned long long)last_good);
        const size_t bad = j->n_records + 1;
        journal_close(j, false);
        if (after == 0)
            return err_set(PS_ERR_FORMAT,
                           "%s: record %zu (byte %lld), the last, is damaged (full length and its checksum fails, or "
                           "its head is no record's: not a write cut short by a crash); it lies after %s: rerun "
                           "with --resume-from-damage to recompute every prompt from that record on (or "
                           "--overwrite to start over)",
                           path, bad, (long long)off, before);
        return err_set(PS_ERR_FORMAT,
                       "%s: record %zu (byte %lld) is damaged (its checksum fails) and %zu intact record%s follow%s "
                       "it (prompts %llu to %llu); the damaged part lies after %s: rerun with --resume-from-damage "
                       "to recompute every prompt from that record on (or --overwrite to start over)",
                       path, bad, (long long)off, after, after > 1 ? "s" : "", after > 1 ? "" : "s",
                       (unsigned long long)first_after, (unsigned long long)last_after, before);
    }
    if (damaged) {
        j->dropped_at = j->n_records + 1;
        j->dropped_intact = after;
    }
    if (off < size && ftruncate(fd, off) != 0) {
        ps_status st = err_set(PS_ERR_IO, "%s: cannot cut off a torn record: %s", path, strerror(errno));
        journal_close(j, false);
        return st;
    }
    j->end = off;
    return PS_OK;
}

ps_status journal_append(journal *j, const void *payload, size_t n)
{
    if (n > JOURNAL_MAX_RECORD)
        return err_set(PS_ERR_RANGE, "%s: a record of %zu bytes is over the limit", j->path, n);
    uint32_t head[2] = {RECORD_MAGIC, (uint32_t)n};
    unsigned char sum[8];
    checksum(payload, n, sum);
    ps_status st;
    if (lseek(j->fd, j->end, SEEK_SET) != j->end)
        return err_set(PS_ERR_IO, "%s: seek failed: %s", j->path, strerror(errno));
    if ((st = write_all(j->fd, head, sizeof head, j->path)) || (st = write_all(j->fd, payload, n, j->path)) ||
        (st = write_all(j->fd, sum, sizeof sum, j->path)))
        return st;
    j->end += 8 + (off_t)n + 8;
    j->n_records++;
    return PS_OK;
}

ps_status journal_sync(journal *j)
{
    if (fdatasync(j->fd) != 0)
        return err_set(PS_ERR_IO, "%s: fdatasync failed: %s (the records synced before are intact: rerun to "
                       "resume)", j->path, strerror(errno));
    fault_point("journal_sync");
    return PS_OK;
}

ps_status journal_each(journal *j, ps_status (*fn)(void *user, const void *payload, size_t n), void *user)
{
    off_t off = HEADER_BYTES;
    while (off < j->end) {
        size_t n;
        void *payload;
        if (!record_at(j->fd, off, j->end, &n, &payload))
            return err_set(PS_ERR_FORMAT, "%s: record at byte %lld changed under us", j->path, (long long)off);
        ps_status st = fn(user, payload, n);
        free(payload);
        if (st)
            return st;
        off += 8 + (off_t)n + 8;
    }
    return PS_OK;
}

void journal_close(journal *j, bool remove)
{
    if (j->fd >= 0)
        close(j->fd);
    if (remove && j->path)
        unlink(j->path);
    free(j->path);
    memset(j, 0, sizeof *j);
    j->fd = -1;
}

/* ---- a sweep's prompt records (journal.h) ---------------------------------- */

typedef struct {
    uint64_t prompt;
    int32_t kind, T, answer, wrong;
    double clean_metric, corrupted_metric;
} prompt_head;

ps_status journal_append_prompt(journal *j, const journal_prompt *r)
{
    const bool done = r->kind == JOURNAL_PROMPT_DONE;
    const size_t len = done ? 0 : strlen(r->reason);
    const size_t bytes = sizeof(prompt_head) +
                         (done ? 2 * r->T * sizeof(int32_t) + r->n_values * sizeof(double) : len);
    unsigned char *buf = malloc(bytes);
    if (!buf)
        return err_set(PS_ERR_NOMEM, "out of memory");
    prompt_head h = {.prompt = r->prompt, .kind = r->kind};
    if (done)
        h = (prompt_head){.prompt = r->prompt, .kind = r->kind, .T = (int32_t)r->T, .answer = r->answer_id,
                          .wrong = r->wrong_id, .clean_metric = r->clean_metric,
                          .corrupted_metric = r->corrupted_metric};
    unsigned char *w = buf;
    memcpy(w, &h, sizeof h), w += sizeof h;
    if (done) {
        memcpy(w, r->clean_ids, r->T * sizeof(int32_t)), w += r->T * sizeof(int32_t);
        memcpy(w, r->corrupted_ids, r->T * sizeof(int32_t)), w += r->T * sizeof(int32_t);
        memcpy(w, r->values, r->n_values * sizeof(double));
    } else {
        memcpy(w, r->reason, len);
    }
    ps_status st = journal_append(j, buf, bytes);
    free(buf);
    return st;
}

ps_status journal_prompt_decode(journal_prompt *r, const void *payload, size_t n)
{
    memset(r, 0, sizeof *r);
    prompt_head h;
    if (n < sizeof h)
        return err_set(PS_ERR_FORMAT, "journal record too short (%zu bytes)", n);
    memcpy(&h, payload, sizeof h);
    const unsigned char *rest = (const unsigned char *)payload + sizeof h;
    const size_t rn = n - sizeof h;
    *r = (journal_prompt){.prompt = h.prompt, .kind = h.kind, .T = h.T > 0 ? (size_t)h.T : 0, .answer_id = h.answer,
                          .wrong_id = h.wrong, .clean_metric = h.clean_metric,
                          .corrupted_metric = h.corrupted_metric};
    if (h.kind == JOURNAL_PROMPT_SKIPPED) {
        char *reason = malloc(rn + 1);
        if (!reason)
            return err_set(PS_ERR_NOMEM, "out of memory");
        memcpy(reason, rest, rn);
        reason[rn] = '\0';
        r->reason = reason;
        r->mem = reason;
        return PS_OK;
    }
    if (h.kind != JOURNAL_PROMPT_DONE)
        return PS_OK;
    const size_t ids = 2 * r->T * sizeof(int32_t);
    if (h.T < 0 || rn < ids || (rn - ids) % sizeof(double) != 0)
        return err_set(PS_ERR_FORMAT, "journal record for prompt %llu has %zu bytes, not 2 x %d token ids and values",
                       (unsigned long long)h.prompt, rn, (int)h.T);
    r->n_values = (rn - ids) / sizeof(double);
    /* values first: the block is malloc-aligned for doubles */
    unsigned char *mem = malloc(rn ? rn : 1);
    if (!mem)
        return err_set(PS_ERR_NOMEM, "out of memory");
    memcpy(mem, rest + ids, rn - ids);
    memcpy(mem + (rn - ids), rest, ids);
    r->mem = mem;
    r->values = (const double *)(void *)mem;
    r->clean_ids = (const int32_t *)(void *)(mem + (rn - ids));
    r->corrupted_ids = r->clean_ids + r->T;
    return PS_OK;
}

void journal_prompt_free(journal_prompt *r)
{
    free(r->mem);
    memset(r, 0, sizeof *r);
}
