/* memstat: /proc/self/status and /proc/self/smaps_rollup. */
#include "memstat.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

/* The "Key:   123 kB" lines of a /proc file into the fields named in keys. */
static int read_kib(const char *path, const char *const *keys, size_t *const *out, size_t n)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    char line[256];
    int found = 0;
    while (fgets(line, sizeof line, f)) {
        for (size_t i = 0; i < n; i++) {
            size_t k = strlen(keys[i]);
            unsigned long long v;
            if (strncmp(line, keys[i], k) == 0 && line[k] == ':' && sscanf(line + k + 1, "%llu", &v) == 1) {
                *out[i] = (size_t)v;
                found++;
            }
        }
    }
    fclose(f);
    return found;
}

ps_status memstat_read(memstat *m)
{
    memset(m, 0, sizeof *m);
    static const char *const status_keys[] = {"VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"};
    size_t *const status_out[] = {&m->hwm_kib, &m->rss_kib, &m->anon_kib, &m->file_kib, &m->shmem_kib};
    int n = read_kib("/proc/self/status", status_keys, status_out, 5);
    if (n < 0)
        return err_set(PS_ERR_IO, "/proc/self/status: %s", strerror(errno));
    if (n < 5)
        return err_set(PS_ERR_FORMAT, "/proc/self/status: VmHWM, VmRSS, RssAnon, RssFile or RssShmem missing");
    static const char *const pss_key[] = {"Pss"};
    size_t *const pss_out[] = {&m->pss_kib};
    read_kib("/proc/self/smaps_rollup", pss_key, pss_out, 1); /* optional: stays 0 */
    return PS_OK;
}

void memstat_format(const memstat *m, char *buf, size_t cap)
{
    snprintf(buf, cap, "hwm_kib=%zu rss_kib=%zu anon_kib=%zu file_kib=%zu shmem_kib=%zu pss_kib=%zu", m->hwm_kib,
             m->rss_kib, m->anon_kib, m->file_kib, m->shmem_kib, m->pss_kib);
}
