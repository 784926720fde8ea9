/*
 * results_roles: the role-aligned view of a patching results file (names in
 * schema.h): the role dimension, role_position(prompt, role), the dataset's
 * metadata as item_NAME(prompt), and for every position grid V the mean,
 * standard deviation (ddof = 0) and count over done prompts at each role,
 * V_by_role(layer, role[, head]), also per template.
 *
 * results_roles_put writes what comes from the dataset (sweep_write);
 * results_roles_aggregate computes the aggregates from what the file holds
 * (so merge recomputes them for the whole dataset).  Both work on a
 * NetCDF-4 file open for writing, in or out of define mode.
 */
#ifndef PS_RESULTS_ROLES_H
#define PS_RESULTS_ROLES_H

#include <stddef.h>
#include <stdint.h>

#include "dataset.h"
#include "err.h"

/* The distinct values of the dataset's template field (SCHEMA_META_TEMPLATE)
 * over every record (so that slices agree), gathered one record at a time
 * as the dataset is streamed; start from {0}. */
typedef struct {
    long long *ints;
    char **strs; /* owned */
    size_t n_ints, n_strs, cap_ints, cap_strs, n_distinct;
} results_roles_templates;

ps_status results_roles_templates_add(results_roles_templates *t, const dataset_item *it);
void results_roles_templates_free(results_roles_templates *t);

typedef struct {
    size_t first, n;            /* prompt p of the file is item first + p */
    const dataset_roles *roles;
    const int32_t *role_pos;    /* [n * roles->n]: -1 absent */
    const dataset_meta *meta;
    results_roles_templates *templates; /* the template coordinate (sorted in place) */
    /* prompt p's record into *obj (json_decref it), in prompt order: the
     * metadata values are read again, not held */
    ps_status (*item)(void *user, size_t p, json_t **obj);
    void *user;
} results_roles_in;

/* Define and write role, role_position, item_NAME and the template
 * coordinate (when the dataset has a template field). */
ps_status results_roles_put(int ncid, const char *path, const results_roles_in *in);

/* Define (when absent) and write every V_by_role* variable from the file's
 * grids, done and role_position; nothing when the file has no role
 * dimension. */
ps_status results_roles_aggregate(int ncid, const char *path);

/* The guard(prompt) flags (schema.h: SCHEMA_GUARD_*) of prompts [0, n)
 * and the global attribute guards (text, "" when none fired). */
ps_status results_roles_put_guards(int ncid, const char *path, const int *flags, size_t n, const char *text);

/* Set or clear SCHEMA_GUARD_SMALL_GAP in flags[0..n) from the metrics of
 * the prompts done (NaN: not done), the spread pooled over them. */
void results_roles_gap_flags(const double *clean, const double *corrupted, size_t n, int *flags);

/* merge: recompute the small-gap flag of guard(prompt) over the whole file
 * (the parts' spreads were their own); nothing when there is no guard. */
ps_status results_roles_regap(int ncid, const char *path);

#endif
