#include "prov.h"

#include <stdio.h>
#include <stdlib.h>
#include <stdbool.h>
#include <string.h>

#ifndef PS_VERSION
#define PS_VERSION "0.0.0"
#endif
#ifndef PS_GIT_REV
#define PS_GIT_REV "unknown"
#endif

static char *command_line;
static char blas_text[256], blas_core[256];
static size_t blas_threads;

/* Quote an argument for a POSIX shell only when it needs it, so the recorded
 * line can be pasted back to rerun the job. */
static size_t quote_arg(char *out, const char *a)
{
    bool plain = *a != '\0';
    for (const char *p = a; *p; p++)
        if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./=:,+@%", *p))
            plain = false;
    size_t n = 0;
    if (plain) {
        for (const char *p = a; *p; p++)
            out ? (void)(out[n++] = *p) : (void)n++;
        return n;
    }
    if (out) out[n] = '\'';
    n++;
    for (const char *p = a; *p; p++) {
        if (*p == '\'') {
            if (out) memcpy(out + n, "'\\''", 4);
            n += 4;
        } else {
            if (out) out[n] = *p;
            n++;
        }
    }
    if (out) out[n] = '\'';
    return n + 1;
}

void prov_init(int argc, char *const argv[])
{
    size_t len = 1;
    for (int i = 0; i < argc; i++)
        len += quote_arg(NULL, argv[i]) + 1;
    free(command_line);
    command_line = malloc(len);
    if (!command_line)
        return;
    size_t n = 0;
    for (int i = 0; i < argc; i++) {
        if (i)
            command_line[n++] = ' ';
        n += quote_arg(command_line + n, argv[i]);
    }
    command_line[n] = '\0';
}

const char *prov_command_line(void) { return command_line ? command_line : ""; }

const char *prov_version(void) { return PS_VERSION " (git " PS_GIT_REV ")"; }

void prov_set_blas(const char *description, const char *core, size_t threads)
{
    snprintf(blas_text, sizeof blas_text, "%s", description ? description : "");
    snprintf(blas_core, sizeof blas_core, "%s", core ? core : "");
    blas_threads = threads;
}

const char *prov_blas(void) { return blas_text; }
const char *prov_blas_core(void) { return blas_core; }
size_t prov_blas_threads(void) { return blas_threads; }
