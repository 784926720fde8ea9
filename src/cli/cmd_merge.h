/*
 * cmd_merge: `patchsweep merge PART.nc... -o ALL.nc`: the parts of a sliced
 * sweep (array jobs, `sweep --slice K/N`) as the one file of the unsliced
 * run (merge.h).  Returns the process exit status.
 */
#ifndef PS_CMD_MERGE_H
#define PS_CMD_MERGE_H

int cmd_merge(int argc, char **argv);

#endif
