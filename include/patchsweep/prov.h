/*
 * prov: provenance that every file patchsweep writes carries (software
 * version, the exact command line, the BLAS kernels and threads, plus the
 * model hash which the writers take from the model).  The CLI records argv
 * and the BLAS set-up once at start-up.
 */
#ifndef PS_PROV_H
#define PS_PROV_H

#include <stddef.h>

/* Record the command line (shell-quoted where needed). */
void prov_init(int argc, char *const argv[]);

/* "patchsweep ARGS..." as recorded, or "" before prov_init. */
const char *prov_command_line(void);

/* "0.1.0 (git abc1234)" */
const char *prov_version(void);

/* The BLAS set-up this process computes with (see include/blas.h): a
 * one-line description, the OpenBLAS core name and the thread count (per
 * rank in sweeps).  The strings are copied (truncated to 255 bytes). */
void prov_set_blas(const char *description, const char *core, size_t threads);

/* As set; "" (and 0) before prov_set_blas. */
const char *prov_blas(void);
const char *prov_blas_core(void);
size_t prov_blas_threads(void);

#endif
