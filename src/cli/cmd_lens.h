/*
 * cmd_lens: early decoding and residual-stream decomposition commands:
 *   lens       the logit lens of one prompt (table or --json), or of a
 *              dataset's clean prompts into NetCDF (--dataset, -o)
 *   decompose  block L's output decoded as is and without one component's
 *              update; --attribution: direct logit attribution
 * Each returns the process exit status.
 */
#ifndef PS_CMD_LENS_H
#define PS_CMD_LENS_H

int cmd_lens(int argc, char **argv);
int cmd_decompose(int argc, char **argv);

#endif
