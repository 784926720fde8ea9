/* Unit tests: memstat reads this process's figures; private memory written
 * shows in RssAnon and in the peak, a shared mapping in RssShmem. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "memstat.h"

#define MB_32 ((size_t)32 << 20)

static void test_parts_add_up(void **state)
{
    (void)state;
    memstat m;
    assert_int_equal(memstat_read(&m), PS_OK);
    assert_true(m.rss_kib > 0);
    assert_int_equal(m.rss_kib, m.anon_kib + m.file_kib + m.shmem_kib);
    assert_true(m.hwm_kib >= m.rss_kib);
}

/* 32 MB written to a private mapping, then to a shared one. */
static void test_private_and_shared(void **state)
{
    (void)state;
    memstat before, priv, shared;
    assert_int_equal(memstat_read(&before), PS_OK);
    unsigned char *p = mmap(NULL, MB_32, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(p != MAP_FAILED);
    memset(p, 1, MB_32);
    assert_int_equal(memstat_read(&priv), PS_OK);
    assert_true(priv.anon_kib >= before.anon_kib + (MB_32 >> 10) - 1024);
    assert_true(priv.hwm_kib >= before.rss_kib + (MB_32 >> 10) - 1024);
    munmap(p, MB_32);

    unsigned char *s = mmap(NULL, MB_32, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(s != MAP_FAILED);
    memset(s, 1, MB_32);
    assert_int_equal(memstat_read(&shared), PS_OK);
    assert_true(shared.shmem_kib >= before.shmem_kib + (MB_32 >> 10) - 1024);
    /* mapped by this process alone: all of it in its Pss (when the kernel has smaps_rollup) */
    if (shared.pss_kib)
        assert_true(shared.pss_kib >= (MB_32 >> 10));
    munmap(s, MB_32);
}

static void test_format(void **state)
{
    (void)state;
    memstat m = {.hwm_kib = 1, .rss_kib = 2, .anon_kib = 3, .file_kib = 4, .shmem_kib = 5, .pss_kib = 6};
    char buf[256];
    memstat_format(&m, buf, sizeof buf);
    assert_string_equal(buf, "hwm_kib=1 rss_kib=2 anon_kib=3 file_kib=4 shmem_kib=5 pss_kib=6");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parts_add_up),
        cmocka_unit_test(test_private_and_shared),
        cmocka_unit_test(test_format),
    };
    return cmocka_run_group_tests_name("memstat", tests, NULL, NULL);
}
