/*
 * What the unit tests that write files share: a fresh mkdtemp directory
 * per test group (under $TMPDIR, else /tmp), removed with everything in
 * it by the group teardown, and ASSERT_ERROR for the error contract.
 * Define TEST_TMPDIR_NAME (e.g. "ps_test_model") before including.
 */
#ifndef PS_TEST_TMPDIR_H
#define PS_TEST_TMPDIR_H

#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"

static char tmpdir[PATH_MAX];

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static int setup_dir(void **state)
{
    (void)state;
    const char *base = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/" TEST_TMPDIR_NAME ".XXXXXX", base && *base ? base : "/tmp");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown_dir(void **state)
{
    (void)state;
    return nftw(tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* Fails with the whole message when `frag` is not in it. */
static void assert_msg_has(const char *frag)
{
    if (!strstr(err_msg(), frag))
        fail_msg("error message \"%s\" does not contain \"%s\"", err_msg(), frag);
}

/* call returns status, and the error message holds every fragment. */
#define ASSERT_ERROR(call, status, ...)                                        \
    do {                                                                       \
        err_clear();                                                           \
        assert_int_equal((call), (status));                                    \
        const char *frags_[] = {__VA_ARGS__};                                  \
        for (size_t i_ = 0; i_ < sizeof frags_ / sizeof *frags_; i_++)         \
            assert_msg_has(frags_[i_]);                                        \
    } while (0)

#endif
