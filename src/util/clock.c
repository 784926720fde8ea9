#include "clock.h"

#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

double clock_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

double clock_process_age(void)
{
#ifdef CLOCK_BOOTTIME
    struct timespec now;
    if (clock_gettime(CLOCK_BOOTTIME, &now) != 0)
        return -1.0;
    FILE *f = fopen("/proc/self/stat", "r");
    if (!f)
        return -1.0;
    char buf[1024];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* the command name (field 2) is in parentheses and may hold spaces:
     * the fields are counted after its last ')'; starttime is field 22 */
    const char *s = strrchr(buf, ')');
    if (!s)
        return -1.0;
    unsigned long long start = 0;
    int field = 2;
    for (s++; *s && field < 22; s++)
        if (*s == ' ')
            field++;
    if (field != 22 || sscanf(s, "%llu", &start) != 1)
        return -1.0;
    const long hz = sysconf(_SC_CLK_TCK);
    if (hz <= 0)
        return -1.0;
    const double age = (double)now.tv_sec + 1e-9 * (double)now.tv_nsec - (double)start / (double)hz;
    return age >= 0 ? age : 0.0;
#else
    return -1.0;
#endif
}
