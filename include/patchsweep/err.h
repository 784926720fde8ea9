/*
 * err: status codes and the last error message of the calling thread.
 *
 * Library code never prints and never exits (netCDF-C style): a failing
 * function records one human-readable line with err_set() and returns its
 * status; the CLI prints err_msg() and chooses the exit code.  The message
 * names the file and the problem, e.g.
 *   "model/model.safetensors: tensor 'h.0.attn.c_attn.weight' ends at byte 812 past the end of the file (640 bytes)".
 */
#ifndef PS_ERR_H
#define PS_ERR_H

typedef enum {
    PS_OK = 0,
    PS_ERR_IO,        /* open/read/write/mmap failed (errno text in the message) */
    PS_ERR_FORMAT,    /* malformed file: safetensors, JSON, BPE files, NetCDF */
    PS_ERR_INVALID,   /* well-formed but unusable input: bad shape, bad argument, unknown name */
    PS_ERR_NOMEM,     /* allocation failed or a documented size limit was exceeded */
    PS_ERR_RANGE,     /* index out of range: layer, position, token id */
    PS_ERR_INTERNAL,  /* a library (BLAS, NetCDF) reported something unexpected */
    PS_ERR_INTERRUPTED /* a signal asked the work to stop; state is consistent */
} ps_status;

/* Record `fmt` (printf-style) as this thread's last error and return `st`,
 * so callers can write `return err_set(PS_ERR_FORMAT, "%s: ...", path);`.
 * The message is kept on one line of valid UTF-8: line feeds and carriage
 * returns become \n and \r, other control characters (but tab) and bytes
 * of invalid UTF-8 \xHH; at most 1023 bytes. */
ps_status err_set(ps_status st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prefix the current message with "prefix: " (adds context on the way up). */
ps_status err_wrap(ps_status st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The last message set on this thread ("" if none). Valid until the next err_set. */
const char *err_msg(void);

/* Short name of a status ("io error", "format error", ...). */
const char *err_name(ps_status st);

/* Clear the message. */
void err_clear(void);

#endif
