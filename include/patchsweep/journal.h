/*
 * journal: an append-only file of checksummed records, the crash-safe store
 * of a sweep's completed prompts.
 *
 * Why: a NetCDF-4 (HDF5) file whose writer dies with it open can be
 * unreadable as a whole, so a sweep's results file is never the record of
 * what is done.  Each finished chunk is appended here and fdatasync'ed
 * first; the NetCDF file (NAME.partial, written beside the computation by
 * rank 0's writer thread) appears under its final name by rename, and a
 * crash leaves the journal, from which the rerun resumes.  A
 * process killed mid-append leaves a torn last record, which the next open
 * detects (length, checksum) and cuts off: every record before it survives.
 *
 * A record damaged in the middle of the file (a flipped bit, a zeroed page:
 * intact records follow it) is no torn tail: it is reported with its
 * number and the prompts around it and the open fails, unless asked to drop
 * everything from it on (the sweep's --resume-from-damage recomputes them).
 * The rule that tells a tear from damage: a torn append only ever
 * shortens the last record, so only a record cut short by the end of the
 * file (its head incomplete, or the file ending before the length its head
 * gives) is torn and cut off silently.  A full-length last record whose
 * checksum fails, or a head there that is no record's, is damage and
 * reported like damage in the middle (with no intact records after it).
 * Two cases cannot be told apart: a flipped bit that lengthens the last
 * record's length field looks torn (that prompt is recomputed), and a file
 * system that leaves zeros after a crash in the appended bytes (the size
 * written, not the data) looks damaged (--resume-from-damage recomputes it).
 *
 * Layout: a 512-byte header (magic "PSJRNL01", then the identity below as
 * NUL-padded text fields and a u64; its last 8 bytes the first 8 of the
 * sha256 of the 504 before, all zero in journals of earlier versions), then
 * records
 *   u32 magic 0x31525350 ("PSR1") | u32 n | n payload bytes | 8 bytes of the
 *   payload's sha256.
 * Native byte order: a journal is read back on the machine type that wrote it.
 *
 * A sweep's payloads (journal_prompt), one record per prompt:
 *   u64 prompt | i32 kind (1 done, 2 skipped) | i32 T | i32 answer | i32 wrong
 *   | f64 clean_metric | f64 corrupted_metric
 *   | done:    i32 clean[T] | i32 corrupted[T] | f64 values[n_values] (the
 *              sweep's cells of the prompt, in its order; with several
 *              metrics, the first's cells then, per other metric,
 *              clean, corrupted and its cells: sweep_prompt_values)
 *   | skipped: the reason, UTF-8, to the end of the record
 */
#ifndef PS_JOURNAL_H
#define PS_JOURNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "err.h"

/* One record at most (a prompt's results); a larger length means corruption. */
#define JOURNAL_MAX_RECORD ((size_t)1 << 30)

/* What a journal belongs to: resuming with anything else is refused. */
typedef struct {
    char job_sha256[65];
    char model_sha256[65];
    char dataset_sha256[65];
    uint64_t n_prompts;
} journal_identity;

typedef struct {
    int fd;
    char *path;
    journal_identity id;
    off_t end;          /* end of the last good record */
    size_t n_records;
    size_t dropped_at;      /* open with drop_damaged: 1-based number of the damaged record cut off, 0 none */
    size_t dropped_intact;  /* ...and the intact records after it dropped with it */
} journal;

/* Open PATH for appending.  A missing file (or overwrite) starts a new
 * journal; an existing one must carry the same identity (else PS_ERR_INVALID
 * naming what differs; a damaged header PS_ERR_FORMAT) and is scanned: a
 * torn tail is cut off.  A damaged record with intact ones after it is
 * PS_ERR_FORMAT naming it and the prompts around it, unless drop_damaged:
 * then it and everything after it are cut off (dropped_at, dropped_intact). */
ps_status journal_open(journal *j, const char *path, const journal_identity *id, bool overwrite, bool drop_damaged);

/* Append one record (not yet durable). */
ps_status journal_append(journal *j, const void *payload, size_t n);

/* Make everything appended so far durable (fdatasync). */
ps_status journal_sync(journal *j);

/* Call fn for every record in order; stops at the first non-OK status. */
ps_status journal_each(journal *j, ps_status (*fn)(void *user, const void *payload, size_t n), void *user);

/* Close (and with remove, delete the file). */
void journal_close(journal *j, bool remove);

/* ---- a sweep's prompt records ---------------------------------------------- */

typedef enum { JOURNAL_PROMPT_DONE = 1, JOURNAL_PROMPT_SKIPPED = 2 } journal_prompt_kind;

/* One prompt's record.  Appending reads the arrays of a done prompt (T and
 * n_values long) or the reason of a skipped one; decoding points them into
 * `mem` (owned: journal_prompt_free). */
typedef struct {
    uint64_t prompt;
    int32_t kind;                        /* journal_prompt_kind; decoding passes others on as read */
    size_t T;
    int32_t answer_id, wrong_id;
    double clean_metric, corrupted_metric;
    const int32_t *clean_ids, *corrupted_ids; /* [T] */
    const double *values;                /* [n_values] */
    size_t n_values;
    const char *reason;                  /* skipped: NUL-terminated */
    void *mem;
} journal_prompt;

/* Append a prompt's record (not yet durable). */
ps_status journal_append_prompt(journal *j, const journal_prompt *r);

/* Decode a payload (from journal_each).  A done record whose size is not its
 * 2 x T token ids and whole values is PS_ERR_FORMAT; a record of another kind
 * decodes its head only (the caller judges the kind). */
ps_status journal_prompt_decode(journal_prompt *r, const void *payload, size_t n);
void journal_prompt_free(journal_prompt *r);

#endif
