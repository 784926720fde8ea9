/*
 * cmd_model: the commands that run a model on one prompt:
 * tokenize, run, cache, info.  Each returns the process exit status.
 */
#ifndef PS_CMD_MODEL_H
#define PS_CMD_MODEL_H

int cmd_tokenize(int argc, char **argv);
int cmd_run(int argc, char **argv);
int cmd_cache(int argc, char **argv);
int cmd_info(int argc, char **argv);

#endif
