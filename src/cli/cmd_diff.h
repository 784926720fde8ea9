/*
 * cmd_diff: `patchsweep diff A.nc B.nc [--json] [--svg DIR] [--tolerance X]`:
 * per-variable max and mean |B - A| of two results files over their shared
 * cells (diff.h).  Returns the process exit status.
 */
#ifndef PS_CMD_DIFF_H
#define PS_CMD_DIFF_H

int cmd_diff(int argc, char **argv);

#endif
