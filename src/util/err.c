#include "err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "strutil.h"

/* One message per thread: OpenBLAS threads never call us, but keeping it
 * thread-local makes the library safe for callers that use threads. */
static _Thread_local char err_buf[1024];

/* Copy src into err_buf (truncating), with control characters and bytes
 * of invalid UTF-8 escaped: messages quote names and text from untrusted
 * files (a tensor name may hold "\n", jansson quotes the bytes it could
 * not decode), and an error must stay one line of text on a terminal. */
static void put_escaped(const char *src)
{
    size_t o = 0, len = strlen(src);
    const size_t end = sizeof err_buf - 1;
    const unsigned char *s = (const unsigned char *)src;
    for (size_t i = 0; i < len && o < end;) {
        char esc[5];
        const unsigned char *from = (const unsigned char *)esc;
        size_t n = 1, k = s[i] < 0x80 ? 1 : str_utf8_seq_len(s + i, len - i, NULL);
        if (s[i] == '\n' || s[i] == '\r') {
            esc[0] = '\\';
            esc[1] = s[i] == '\n' ? 'n' : 'r';
            n = 2;
        } else if ((s[i] < 0x20 && s[i] != '\t') || s[i] == 0x7f || k == 0) {
            snprintf(esc, sizeof esc, "\\x%02x", s[i]);
            n = 4;
        } else {
            from = s + i;
            n = k;
        }
        if (o + n > end)
            break;
        memcpy(err_buf + o, from, n);
        o += n;
        i += k ? k : 1;
    }
    err_buf[o] = '\0';
}

ps_status err_set(ps_status st, const char *fmt, ...)
{
    char raw[sizeof err_buf];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(raw, sizeof raw, fmt, ap);
    va_end(ap);
    put_escaped(raw);
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
    /* Truncation of an over-long message is acceptable; it stays one line
     * (the old message is already escaped). */
    put_escaped(prefix);
    size_t n = strlen(err_buf);
    if (n > sizeof err_buf - 3)
        n = sizeof err_buf - 3;
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
