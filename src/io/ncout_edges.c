#include "ncout_edges.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <netcdf.h>

#include "schema.h"

static ps_status def(ncout_file *f, const char *name, nc_type type, int nd, const int *dims, const char *long_name,
                     int *var)
{
    ps_status st = ncout_check(nc_def_var(f->ncid, name, type, nd, dims, var), f->tmp_path, name);
    if (st == PS_OK)
        st = ncout_check(nc_put_att_text(f->ncid, *var, SCHEMA_ATT_LONG_NAME, strlen(long_name), long_name),
                         f->tmp_path, name);
    return st;
}

/* a float grid with the fill value where the value is NaN (no edge) */
static ps_status put_grid(ncout_file *f, const int *dims, const char *name, const char *long_name, const double *x,
                          size_t n)
{
    int var;
    const float fill = SCHEMA_FILL_GRID;
    ps_status st = def(f, name, NC_FLOAT, 2, dims, long_name, &var);
    if (st == PS_OK)
        st = ncout_check(nc_def_var_fill(f->ncid, var, 0, &fill), f->tmp_path, name);
    float *buf = st == PS_OK ? malloc(n * sizeof *buf) : NULL;
    if (st == PS_OK && !buf)
        st = err_set(PS_ERR_NOMEM, "%s: out of memory", f->path);
    if (st == PS_OK) {
        for (size_t i = 0; i < n; i++)
            buf[i] = isnan(x[i]) ? fill : (float)x[i];
        st = ncout_check(nc_put_var_float(f->ncid, var, buf), f->tmp_path, name);
    }
    free(buf);
    return st;
}

ps_status ncout_edges_put(ncout_file *f, size_t n_up, size_t n_down, char *const *up, char *const *down,
                          const double *score, const double *normalized, const double *up_atp,
                          const double *down_atp)
{
    int dims[2], v_up, v_down, v_ua, v_da;
    ps_status st;
    if ((st = ncout_check(nc_def_dim(f->ncid, SCHEMA_DIM_UPSTREAM, n_up, &dims[0]), f->tmp_path,
                          SCHEMA_DIM_UPSTREAM)) ||
        (st = ncout_check(nc_def_dim(f->ncid, SCHEMA_DIM_DOWNSTREAM, n_down, &dims[1]), f->tmp_path,
                          SCHEMA_DIM_DOWNSTREAM)) ||
        (st = def(f, SCHEMA_VAR_UPSTREAM, NC_STRING, 1, &dims[0],
                  "upstream node: what writes into the residual stream (TransformerLens hook, head)", &v_up)) ||
        (st = def(f, SCHEMA_VAR_DOWNSTREAM, NC_STRING, 1, &dims[1],
                  "downstream node: what reads the residual stream (TransformerLens hook, head)", &v_down)) ||
        (st = ncout_check(nc_put_var_string(f->ncid, v_up, (const char **)up), f->tmp_path, SCHEMA_VAR_UPSTREAM)) ||
        (st = ncout_check(nc_put_var_string(f->ncid, v_down, (const char **)down), f->tmp_path,
                          SCHEMA_VAR_DOWNSTREAM)) ||
        (st = put_grid(f, dims, SCHEMA_VAR_EDGE_ATP,
                       "edge attribution patching score: (a_up^src - a_up^base) . dM/dx_down, an estimated metric "
                       "change", score, n_up * n_down)) ||
        (st = put_grid(f, dims, SCHEMA_VAR_EDGE_ATP_NORMALIZED,
                       "edge attribution patching score / (clean - corrupted metric)", normalized, n_up * n_down)) ||
        (st = def(f, SCHEMA_VAR_UPSTREAM_ATP, NC_DOUBLE, 1, &dims[0],
                  "node AtP of the upstream node: (a^src - a^base) . dM/da, the sum of its edges", &v_ua)) ||
        (st = def(f, SCHEMA_VAR_DOWNSTREAM_ATP, NC_DOUBLE, 1, &dims[1],
                  "input-node AtP of the downstream node: (x^src - x^base) . dM/dx, the sum of its edges", &v_da)) ||
        (st = ncout_check(nc_put_var_double(f->ncid, v_ua, up_atp), f->tmp_path, SCHEMA_VAR_UPSTREAM_ATP)))
        return st;
    return ncout_check(nc_put_var_double(f->ncid, v_da, down_atp), f->tmp_path, SCHEMA_VAR_DOWNSTREAM_ATP);
}
