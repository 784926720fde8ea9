/*
 * cmd_patch_edges: `patch --method atp --edges`, edge attribution patching
 * of one prompt pair (atp_edges.h): the top 20 edges by |score| on the
 * console, or --json, and with -o the pair's results file with the edge
 * variables (ncout_edges.h).
 */
#ifndef PS_CMD_PATCH_EDGES_H
#define PS_CMD_PATCH_EDGES_H

#include <stdbool.h>

#include "err.h"
#include "model.h"
#include "ncout.h"
#include "patchspec.h"
#include "tokenizer.h"

/* The number of edges the console lists. */
#define PATCH_EDGES_TOP 20

/* Score the pair's edges and report them; f: an ncout_create'd file to
 * fill (the caller commits it), or NULL.  answer, wrong: the answer texts
 * (NULL when the pair was given as ids). */
ps_status patch_edges_report(model *m, const tokenizer *tok, const patch_pair *pair, patch_metric metric,
                             patch_direction dir, ncout_file *f, bool json, const char *answer, const char *wrong);

#endif
