#include "err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* One message per thread: OpenBLAS threads never call us, but keeping it
 * thread-local makes the library safe for callers that use threads. */
static _Thread_local char err_buf[1024];

ps_status err_set(ps_status st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_buf, sizeof err_buf, fmt, ap);
    va_end(ap);
    return st;
}

ps_status err_wrap(ps_status st, const char *fmt, ...)
{
    char prefix[512];
    char old[sizeof err_buf];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, err_buf, sizeof old);
    /* Truncation of an over-long message is acceptable; it stays one line. */
    size_t n = strlen(prefix);
    if (n > sizeof err_buf - 3)
        n = sizeof err_buf - 3;
    memcpy(err_buf, prefix, n);
    memcpy(err_buf + n, ": ", 2);
    size_t room = sizeof err_buf - n - 3;
    size_t m = strnlen(old, room);
    memcpy(err_buf + n + 2, old, m);
    err_buf[n + 2 + m] = '\0';
    return st;
}

const char *err_msg(void) { return err_buf; }

void err_clear(void) { err_buf[0] = '\0'; }

const char *err_name(ps_status st)
{
    switch (st) {
    case PS_OK: return "ok";
    case PS_ERR_IO: return "i/o error";
    case PS_ERR_FORMAT: return "format error";
    case PS_ERR_INVALID: return "invalid input";
    case PS_ERR_NOMEM: return "out of memory or over a size limit";
    case PS_ERR_RANGE: return "out of range";
    case PS_ERR_INTERNAL: return "internal error";
    case PS_ERR_INTERRUPTED: return "interrupted";
    }
    return "unknown error";
}
