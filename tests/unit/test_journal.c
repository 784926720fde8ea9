/* journal: records survive, a torn tail is cut off on open, a damaged
 * record (in the middle or last) is refused
 * (include/patchsweep/journal.h), and the sweep's prompt records round-trip. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "journal.h"

#define TEST_TMPDIR_NAME "ps_test_journal"
#include "test_tmpdir.h"

#define N_RECORDS 3

static journal_identity test_id(void)
{
    journal_identity id = {.n_prompts = 7};
    memset(id.job_sha256, 'a', 64);
    memset(id.model_sha256, 'b', 64);
    memset(id.dataset_sha256, 'c', 64);
    return id;
}

/* Payload i: i + 5 bytes of a pattern (the last is the longest). */
static size_t payload(size_t i, unsigned char *buf)
{
    const size_t n = i + 5;
    for (size_t k = 0; k < n; k++)
        buf[k] = (unsigned char)(31 * i + k);
    return n;
}

typedef struct {
    size_t n;
    bool ok;
} seen;

static ps_status check_record(void *user, const void *p, size_t n)
{
    seen *s = user;
    unsigned char want[64];
    size_t wn = payload(s->n, want);
    s->ok = s->ok && n == wn && memcmp(p, want, n) == 0;
    s->n++;
    return PS_OK;
}

static void path_of(char *buf, size_t cap) { snprintf(buf, cap, "%s/j.journal", tmpdir); }

/* A journal of N_RECORDS records; its bytes in *bytes (malloc'd), the
 * offset where the last record starts in *last. */
static size_t write_journal(unsigned char **bytes, off_t *last)
{
    char path[PATH_MAX + 32];
    path_of(path, sizeof path);
    journal_identity id = test_id();
    journal j;
    assert_int_equal(journal_open(&j, path, &id, true, false), PS_OK);
    unsigned char buf[64];
    for (size_t i = 0; i < N_RECORDS; i++) {
        if (i == N_RECORDS - 1)
            *last = j.end;
        assert_int_equal(journal_append(&j, buf, payload(i, buf)), PS_OK);
    }
    assert_int_equal(journal_sync(&j), PS_OK);
    journal_close(&j, false);
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    *bytes = malloc((size_t)sb.st_size);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fread(*bytes, 1, (size_t)sb.st_size, f), (size_t)sb.st_size);
    fclose(f);
    return (size_t)sb.st_size;
}

static void put_file(const unsigned char *bytes, size_t n)
{
    char path[PATH_MAX + 32];
    path_of(path, sizeof path);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(bytes, 1, n, f), n);
    fclose(f);
}

/* Open the file as it is and expect `want` good records, the file cut to
 * `want_end`; an append after it must read back. */
static void expect_records(size_t want, off_t want_end)
{
    char path[PATH_MAX + 32];
    path_of(path, sizeof path);
    journal_identity id = test_id();
    journal j;
    assert_int_equal(journal_open(&j, path, &id, false, false), PS_OK);
    assert_int_equal(j.n_records, want);
    assert_int_equal(j.end, want_end);
    seen s = {0, true};
    assert_int_equal(journal_each(&j, check_record, &s), PS_OK);
    assert_int_equal(s.n, want);
    assert_true(s.ok);
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    assert_int_equal(sb.st_size, want_end);
    /* appending after the cut: the journal goes on */
    unsigned char buf[64];
    assert_int_equal(journal_append(&j, buf, payload(want, buf)), PS_OK);
    journal_close(&j, false);
    assert_int_equal(journal_open(&j, path, &id, false, false), PS_OK);
    assert_int_equal(j.n_records, want + 1);
    journal_close(&j, false);
}

static void test_intact(void **state)
{
    (void)state;
    unsigned char *bytes;
    off_t last;
    size_t n = write_journal(&bytes, &last);
    expect_records(N_RECORDS, (off_t)n);
    free(bytes);
}

/* A record cut at every byte offset of the last record: dropped, the
 * earlier ones kept. */
static void test_torn_tail(void **state)
{
    (void)state;
    unsigned char *bytes;
    off_t last;
    size_t n = write_journal(&bytes, &last);
    for (size_t cut = (size_t)last; cut < n; cut++) {
        put_file(bytes, cut);
        expect_records(N_RECORDS - 1, last);
    }
    free(bytes);
}

/* Damage in the last record, full length (a bad checksum byte, a payload
 * byte, a length over the limit, a shorter length, the record zeroed): not
 * a tear (a torn append only shortens the last record), so refused like
 * damage in the middle, naming record 3; drop_damaged cuts it off. */
static void test_damaged_last_record(void **state)
{
    (void)state;
    unsigned char *bytes;
    off_t last;
    size_t n = write_journal(&bytes, &last);
    char path[PATH_MAX + 32], want[64];
    path_of(path, sizeof path);
    snprintf(want, sizeof want, "record 3 (byte %lld), the last, is damaged", (long long)last);
    journal_identity id = test_id();
    for (int how = 0; how < 5; how++) {
        unsigned char *copy = malloc(n);
        assert_non_null(copy);
        memcpy(copy, bytes, n);
        uint32_t len = how == 2 ? (uint32_t)JOURNAL_MAX_RECORD + 1 : 1;
        if (how == 0)
            copy[n - 1] ^= 0x5a; /* the checksum's last byte */
        else if (how == 1)
            copy[last + 8 + 2] ^= 0x5a; /* a payload byte */
        else if (how < 4)
            memcpy(copy + last + 4, &len, sizeof len); /* the head's length */
        else
            memset(copy + last, 0, n - (size_t)last); /* a lost page */
        put_file(copy, n);
        journal j;
        ASSERT_ERROR(journal_open(&j, path, &id, false, false), PS_ERR_FORMAT, want, "--resume-from-damage");
        assert_int_equal(journal_open(&j, path, &id, false, true), PS_OK);
        assert_int_equal(j.n_records, N_RECORDS - 1);
        assert_int_equal(j.dropped_at, N_RECORDS);
        assert_int_equal(j.dropped_intact, 0);
        assert_int_equal(j.end, last);
        journal_close(&j, false);
        /* cut off: the journal goes on from record 2 */
        expect_records(N_RECORDS - 1, last);
        free(copy);
    }
    /* a full-length damaged record, then a torn one after it: still damage */
    unsigned char *longer = malloc(n + 6);
    assert_non_null(longer);
    memcpy(longer, bytes, n);
    memcpy(longer + n, bytes + last, 6); /* the head of a record, cut */
    longer[last + 8] ^= 1;
    put_file(longer, n + 6);
    journal j;
    ASSERT_ERROR(journal_open(&j, path, &id, false, false), PS_ERR_FORMAT, want);
    free(longer);
    free(bytes);
}

static void test_identity(void **state)
{
    (void)state;
    unsigned char *bytes;
    off_t last;
    write_journal(&bytes, &last);
    free(bytes);
    char path[PATH_MAX + 32];
    path_of(path, sizeof path);
    journal_identity id = test_id();
    id.model_sha256[3] = 'x';
    journal j;
    ASSERT_ERROR(journal_open(&j, path, &id, false, false), PS_ERR_INVALID, "different model", "--overwrite");
    /* overwrite starts over */
    assert_int_equal(journal_open(&j, path, &id, true, false), PS_OK);
    assert_int_equal(j.n_records, 0);
    journal_close(&j, true);
    assert_int_not_equal(access(path, F_OK), 0);
}

/* Damage in the middle (a flipped payload byte of record 2 of 3, then the
 * whole record zeroed as by a lost page): refused naming record 2, unless
 * drop_damaged, which cuts the journal after record 1. */
static void test_damage_in_the_middle(void **state)
{
    (void)state;
    unsigned char *bytes;
    off_t last;
    size_t n = write_journal(&bytes, &last);
    const size_t second = 512 + 8 + 5 + 8; /* record 1: 5 payload bytes */
    char path[PATH_MAX + 32];
    path_of(path, sizeof path);
    journal_identity id = test_id();
    journal j;
    for (int how = 0; how < 2; how++) {
        unsigned char *copy = malloc(n);
        assert_non_null(copy);
        memcpy(copy, bytes, n);
        if (how == 0)
            copy[second + 8 + 1] ^= 0x10;
        else
            memset(copy + second, 0, (size_t)last - second);
        put_file(copy, n);
        ASSERT_ERROR(journal_open(&j, path, &id, false, false), PS_ERR_FORMAT, "record 2 (byte 533) is damaged",
                     "--resume-from-damage");
        assert_int_equal(journal_open(&j, path, &id, false, true), PS_OK);
        assert_int_equal(j.n_records, 1);
        assert_int_equal(j.dropped_at, 2);
        assert_int_equal(j.dropped_intact, 1);
        assert_int_equal(j.end, (off_t)second);
        journal_close(&j, false);
        free(copy);
    }
    /* a flipped bit in the header's identity: not taken for another job's */
    bytes[100] ^= 1;
    put_file(bytes, n);
    ASSERT_ERROR(journal_open(&j, path, &id, false, false), PS_ERR_FORMAT, "header is damaged", "--overwrite");
    free(bytes);
}

typedef struct {
    journal_prompt got[2];
    size_t n;
} decoded;

static ps_status decode_record(void *user, const void *p, size_t n)
{
    decoded *d = user;
    return journal_prompt_decode(&d->got[d->n++], p, n);
}

static void test_prompt_records(void **state)
{
    (void)state;
    char path[PATH_MAX + 32];
    path_of(path, sizeof path);
    journal_identity id = test_id();
    journal j;
    assert_int_equal(journal_open(&j, path, &id, true, false), PS_OK);
    const int32_t clean[3] = {50256, 7, 9}, corrupted[3] = {50256, 7, 11};
    const double values[5] = {0.5, -1.25, 3.0, 1e-300, -0.0};
    journal_prompt done = {.prompt = 4, .kind = JOURNAL_PROMPT_DONE, .T = 3, .answer_id = 12, .wrong_id = 13,
                           .clean_metric = 2.5, .corrupted_metric = -0.75, .clean_ids = clean,
                           .corrupted_ids = corrupted, .values = values, .n_values = 5};
    journal_prompt skipped = {.prompt = 6, .kind = JOURNAL_PROMPT_SKIPPED, .reason = "x.jsonl:3: too long"};
    assert_int_equal(journal_append_prompt(&j, &done), PS_OK);
    assert_int_equal(journal_append_prompt(&j, &skipped), PS_OK);
    decoded d = {0};
    assert_int_equal(journal_each(&j, decode_record, &d), PS_OK);
    assert_int_equal(d.n, 2);
    const journal_prompt *a = &d.got[0], *b = &d.got[1];
    assert_int_equal(a->prompt, 4);
    assert_int_equal(a->kind, JOURNAL_PROMPT_DONE);
    assert_int_equal(a->T, 3);
    assert_int_equal(a->answer_id, 12);
    assert_int_equal(a->wrong_id, 13);
    assert_true(a->clean_metric == 2.5 && a->corrupted_metric == -0.75);
    assert_int_equal(a->n_values, 5);
    assert_memory_equal(a->clean_ids, clean, sizeof clean);
    assert_memory_equal(a->corrupted_ids, corrupted, sizeof corrupted);
    assert_memory_equal(a->values, values, sizeof values);
    assert_int_equal(b->prompt, 6);
    assert_int_equal(b->kind, JOURNAL_PROMPT_SKIPPED);
    assert_string_equal(b->reason, "x.jsonl:3: too long");
    journal_prompt_free(&d.got[0]);
    journal_prompt_free(&d.got[1]);
    /* a done record whose size does not fit its T */
    unsigned char bad[40 + 5] = {0};
    int32_t kind = JOURNAL_PROMPT_DONE, T = 2;
    memcpy(bad + 8, &kind, 4);
    memcpy(bad + 12, &T, 4);
    journal_prompt r;
    ASSERT_ERROR(journal_prompt_decode(&r, bad, sizeof bad), PS_ERR_FORMAT, "prompt 0");
    journal_prompt_free(&r);
    assert_int_equal(journal_prompt_decode(&r, bad, 10), PS_ERR_FORMAT);
    journal_prompt_free(&r);
    journal_close(&j, true);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_intact),        cmocka_unit_test(test_torn_tail),
        cmocka_unit_test(test_damaged_last_record),  cmocka_unit_test(test_identity),
        cmocka_unit_test(test_prompt_records), cmocka_unit_test(test_damage_in_the_middle),
    };
    return cmocka_run_group_tests_name("journal", tests, setup_dir, teardown_dir);
}
