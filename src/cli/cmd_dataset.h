/*
 * cmd_dataset: prompt-pair datasets: make-dataset (generators to JSONL) and
 * evaluate (how well a model does the task on a dataset, without patching).
 */
#ifndef PS_CMD_DATASET_H
#define PS_CMD_DATASET_H

int cmd_make_dataset(int argc, char **argv);
int cmd_evaluate(int argc, char **argv);

#endif
