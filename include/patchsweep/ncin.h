/*
 * ncin: a small reader of the NetCDF files patchsweep writes (patching
 * results, lens files) for the commands that consume them (plot).
 *
 * The file is untrusted input: every nc_* status is checked, a variable's
 * rank and sizes are taken from the file and checked against what the
 * caller expects (ncin_expect_dims) before anything is read, element counts
 * are overflow-checked and capped (NCIN_MAX_ELEMENTS), and strings are
 * returned as valid UTF-8 (invalid bytes shown as U+FFFD), since they end up
 * in XML.  Numeric values equal to the variable's fill value (its _FillValue
 * attribute, or NetCDF's default fill for the type when it has none and
 * fill mode is on) are returned as NaN, so "no value" has one representation.
 *
 * Every error is one line naming the file and the problem (err.h).
 */
#ifndef PS_NCIN_H
#define PS_NCIN_H

#include <stdbool.h>
#include <stddef.h>

#include "err.h"

#define NCIN_MAX_DIMS 8
#define NCIN_MAX_NAME 256                  /* NC_MAX_NAME */
#define NCIN_MAX_ELEMENTS ((size_t)1 << 28) /* per read: 1 GiB of float */

typedef struct {
    int ncid;     /* -1 when closed */
    char *path;   /* as given, owned; used in messages */
} ncin_file;

typedef struct {
    char name[NCIN_MAX_NAME + 1];
    int varid;
    int type;                                   /* nc_type */
    size_t ndim;
    char dim_names[NCIN_MAX_DIMS][NCIN_MAX_NAME + 1];
    size_t shape[NCIN_MAX_DIMS];
} ncin_var;

/* Open read-only.  A file NetCDF does not recognise is PS_ERR_FORMAT
 * ("not a NetCDF file"); a missing or unreadable one PS_ERR_IO; one that
 * fails ncin_verify its message, before NetCDF or HDF5 read a byte of it. */
ps_status ncin_open(ncin_file *f, const char *path);

/* Whether PATH is the file written: patchsweep records the sha256 of every
 * file it writes, whole (data, attributes, HDF5's metadata), in
 * PATH.sha256 (`sha256sum -c` format; ncout.h).  PS_ERR_FORMAT "damaged"
 * when it differs (a flipped bit, a truncation, a zeroed page); PS_OK when
 * it holds or when there is no PATH.sha256 (a file of an earlier version,
 * or copied without it: unverified, as NetCDF would read it). */
ps_status ncin_verify(const char *path);

/* Open the image buf[0..size) of a NetCDF file (classic, 64-bit offset or
 * NetCDF-4) read-only, with nc_open_mem; `name` stands for the file in
 * messages.  buf must stay valid and unchanged until ncin_close.  The fuzz
 * target's entry point; messages and statuses as ncin_open's. */
ps_status ncin_open_mem(ncin_file *f, const char *name, const void *buf, size_t size);

void ncin_close(ncin_file *f);

/* Length of dimension `name`; PS_ERR_FORMAT naming it when absent. */
ps_status ncin_dim_len(const ncin_file *f, const char *name, size_t *len);

bool ncin_has_var(const ncin_file *f, const char *name);

/* Names of every variable in file order; free with ncin_names_free. */
ps_status ncin_var_names(const ncin_file *f, char ***names, size_t *n);
void ncin_names_free(char **names, size_t n);

/* Describe variable `name`: PS_ERR_INVALID "no variable" when absent. */
ps_status ncin_inq_var(const ncin_file *f, const char *name, ncin_var *v);

/* True when v's dimensions are exactly dims[0..n) by name. */
bool ncin_dims_are(const ncin_var *v, const char *const *dims, size_t n);

/* Like ncin_dims_are, but a mismatch is PS_ERR_FORMAT naming the file, the
 * variable, its dimensions and the expected ones. */
ps_status ncin_expect_dims(const ncin_file *f, const ncin_var *v, const char *const *dims, size_t n);

/* True for the integer and floating-point types (not char, string, compound). */
bool ncin_is_numeric(const ncin_var *v);

/* "name(dim0, dim1, ...)" into buf (truncated to size). */
void ncin_describe(const ncin_var *v, char *buf, size_t size);

/* Elements per index of the first dimension (product of shape[1..]), with
 * overflow and NCIN_MAX_ELEMENTS checks. */
ps_status ncin_stride(const ncin_file *f, const ncin_var *v, size_t *stride);

/* Read indices [first, first + count) of v's first dimension of a numeric
 * variable into out[count * stride] (row-major), fill values -> NaN.  A
 * string or compound variable is PS_ERR_FORMAT; a range past the
 * dimension's length PS_ERR_RANGE. */
ps_status ncin_read_float(const ncin_file *f, const ncin_var *v, size_t first, size_t count, float *out);
ps_status ncin_read_double(const ncin_file *f, const ncin_var *v, size_t first, size_t count, double *out);

/* The same for an NC_STRING variable: out[count * stride] malloc'd valid
 * UTF-8 strings (a NULL string in the file becomes ""); free with
 * ncin_names_free(out, count * stride). */
ps_status ncin_read_strings(const ncin_file *f, const ncin_var *v, size_t first, size_t count, char **out);

/* A text attribute (NC_CHAR, or a single NC_STRING) of variable `var`
 * (NULL: global) as a malloc'd valid UTF-8 string; *value = NULL when the
 * attribute is absent, PS_ERR_FORMAT when it is not text. */
ps_status ncin_get_text_att(const ncin_file *f, const char *var, const char *name, char **value);

/* A numeric attribute of variable `var` (NULL: global) as doubles: its
 * length into *n and its values into vals[0..*n) (*n = 0 when absent or of
 * length 0; *present says which).  PS_ERR_FORMAT when it is text or has
 * more than cap values. */
ps_status ncin_get_num_att(const ncin_file *f, const char *var, const char *name, double *vals, size_t cap,
                           size_t *n, bool *present);

#endif
