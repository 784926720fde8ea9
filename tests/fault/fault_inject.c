/*
 * The test build's fault_point (include/patchsweep/fault.h): acts on the
 * Nth call of the site named by PS_FAULT=SITE:N:ACTION.  Linked into
 * patchsweep-faults ahead of the library, whose no-op version it replaces.
 */
#include "fault.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void fault_point(const char *site)
{
    static unsigned long calls;
    const char *spec = getenv("PS_FAULT");
    if (!spec || !site)
        return;
    size_t n = strlen(site);
    if (strncmp(spec, site, n) != 0 || spec[n] != ':')
        return;
    char *end;
    unsigned long want = strtoul(spec + n + 1, &end, 10);
    if (*end != ':' || ++calls != want)
        return;
    const char *action = end + 1;
    fprintf(stderr, "fault: %s #%lu: %s\n", site, want, action);
    if (strcmp(action, "kill") == 0)
        raise(SIGKILL);
    else if (strcmp(action, "term") == 0)
        raise(SIGTERM);
    else if (strcmp(action, "exit") == 0)
        _exit(70);
    else {
        fprintf(stderr, "fault: PS_FAULT=%s: unknown action '%s'\n", spec, action);
        _exit(71);
    }
}
