/*
 * cmd_patch: activation patching of one prompt pair (patch) and the
 * engines' benchmark (bench).  Each returns the process exit status.
 */
#ifndef PS_CMD_PATCH_H
#define PS_CMD_PATCH_H

int cmd_patch(int argc, char **argv);
int cmd_bench(int argc, char **argv);

#endif
