/*
 * prov: provenance that every file patchsweep writes carries (software
 * version, the exact command line, plus the model hash which the writers take
 * from the model).  The CLI records argv once at start-up.
 */
#ifndef PS_PROV_H
#define PS_PROV_H

/* Record the command line (shell-quoted where needed). */
void prov_init(int argc, char *const argv[]);

/* "patchsweep ARGS..." as recorded, or "" before prov_init. */
const char *prov_command_line(void);

/* "0.1.0 (git abc1234)" */
const char *prov_version(void);

#endif
