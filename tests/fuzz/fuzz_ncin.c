/*
 * Fuzz target: the readers of NetCDF result files.
 *
 * What is read, whatever the file:
 *   1. ncin (plot's reader) on the image through nc_open_mem: every
 *      variable described and read as plot reads it (numbers as float and
 *      double, strings), its long_name, the global text attributes plot
 *      shows, the dimensions plot looks up, an out-of-range read;
 *   2. on the bytes written to a file in a private temporary directory,
 *      since these open paths: the plot command itself (cmd_plot, with one
 *      of a few option sets chosen by the input's first byte), resume's
 *      check of an existing output (schema_is_complete_run) and merge (merge_files
 *      of the file as a one-part sweep).
 *
 * Where the file comes from, by the first byte of the input:
 *   even: the rest is a classic or 64-bit-offset / CDF-5 file ("CDF" and a
 *         version byte are forced onto its first 4 bytes), parsed by
 *         netCDF's own classic reader;
 *   odd:  the rest describes a NetCDF-4 file that the target writes with
 *         the netCDF API (build_nc4 below): dimensions, variables of every
 *         type, attributes and values all chosen by the input, with the
 *         names patchsweep's readers look for.  Well-formed HDF5, hostile
 *         content: wrong dimensions and types, huge or empty dimensions,
 *         invalid UTF-8, fill values, packing, missing or contradictory
 *         attributes.
 * Raw bytes are not handed to HDF5: Debian 12's HDF5 1.10.8 crashes on
 * mutated files within seconds (e.g. H5G__link_release_table frees an
 * uninitialised pointer on a damaged link table, reached from nc_open), a
 * bug of the library that patchsweep cannot guard against and that would
 * stop every run of this target.
 *
 * Checked besides the error contract: strings come back as valid UTF-8,
 * reads past the end fail, plot exits 0 with a figure or 1 with one error
 * line naming the file and no figure, merge leaves no file behind when it
 * fails.
 * NetCDF and HDF5 are not instrumented: coverage guidance covers
 * patchsweep's code (and the harness), a crash inside them still shows.
 */
#include <getopt.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <netcdf.h>
#include <netcdf_mem.h>

#include "cmd_plot.h"
#include "fsutil.h"
#include "fuzz_common.h"
#include "merge.h"
#include "ncin.h"
#include "ncout.h"
#include "schema.h"
#include "strutil.h"

#define NAME "fuzz.nc"
/* Values read per variable: enough for every code path of a read. */
#define READ_MAX 4096

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char tmpdir[256], part_path[300], out_path[300], out_partial[320], svg_path[300], svg_partial[320];

static void remove_tmpdir(void)
{
    unlink(part_path);
    unlink(out_path);
    unlink(out_partial);
    unlink(svg_path);
    unlink(svg_partial);
    rmdir(tmpdir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    /* $TMPDIR, else /dev/shm (memory: up to three files are written per
     * input), else /tmp. */
    const char *base = getenv("TMPDIR");
    if (!base || !*base)
        base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(tmpdir, sizeof tmpdir, "%s/ps-fuzz-ncin-XXXXXX", base);
    if (!mkdtemp(tmpdir)) {
        perror("fuzz: mkdtemp");
        exit(1);
    }
    snprintf(part_path, sizeof part_path, "%s/part.nc", tmpdir);
    snprintf(out_path, sizeof out_path, "%s/merged.nc", tmpdir);
    snprintf(out_partial, sizeof out_partial, "%s.partial", out_path);
    snprintf(svg_path, sizeof svg_path, "%s/plot.svg", tmpdir);
    snprintf(svg_partial, sizeof svg_partial, "%s.partial", svg_path);
    atexit(remove_tmpdir);
    return 0;
}

static void check_utf8(const char *s)
{
    FUZZ_REQUIRE(s && str_utf8_valid(s, strlen(s)), "a string is not valid UTF-8");
}

static void read_var(const ncin_file *f, const char *name)
{
    ncin_var v;
    ps_status st = ncin_inq_var(f, name, &v);
    fuzz_check_status(st, NAME);
    if (st != PS_OK)
        return;
    FUZZ_REQUIRE(v.ndim <= NCIN_MAX_DIMS && !strcmp(v.name, name), "variable %s", name);
    char desc[512];
    ncin_describe(&v, desc, sizeof desc);
    static const char *const grid[] = {"prompt", "layer", "position"};
    fuzz_check_status(ncin_expect_dims(f, &v, grid, 3), NAME);

    char *long_name = NULL;
    st = ncin_get_text_att(f, name, "long_name", &long_name);
    fuzz_check_status(st, NAME);
    if (long_name)
        check_utf8(long_name);
    free(long_name);

    size_t stride = 0;
    st = ncin_stride(f, &v, &stride);
    fuzz_check_status(st, NAME);
    if (st != PS_OK || v.ndim == 0)
        return;
    /* The first rows that fit in READ_MAX values; then one past the end. */
    size_t rows = stride == 0 ? v.shape[0] : READ_MAX / stride;
    if (rows > v.shape[0])
        rows = v.shape[0];
    if (rows > READ_MAX)
        rows = READ_MAX;
    size_t total = rows * stride;
    if (ncin_is_numeric(&v)) {
        float *fl = malloc((total ? total : 1) * sizeof *fl);
        double *db = malloc((total ? total : 1) * sizeof *db);
        FUZZ_REQUIRE(fl && db, "out of memory");
        fuzz_check_status(ncin_read_float(f, &v, 0, rows, fl), NAME);
        fuzz_check_status(ncin_read_double(f, &v, 0, rows, db), NAME);
        st = ncin_read_float(f, &v, v.shape[0], 1, fl);
        fuzz_check_status(st, NAME);
        FUZZ_REQUIRE(st != PS_OK, "a read past the end of %s succeeded", name);
        free(fl);
        free(db);
    } else {
        char **s = calloc(total ? total : 1, sizeof *s);
        FUZZ_REQUIRE(s, "out of memory");
        st = ncin_read_strings(f, &v, 0, rows, s);
        fuzz_check_status(st, NAME);
        if (st == PS_OK) {
            for (size_t i = 0; i < total; i++)
                check_utf8(s[i]);
            ncin_names_free(s, total);
        } else {
            free(s);
        }
    }
}

/* What plot reads, through the memory image. */
static bool check_ncin(const uint8_t *data, size_t size)
{
    ncin_file f;
    ps_status st = ncin_open_mem(&f, NAME, data, size);
    fuzz_check_status(st, NAME);
    if (st != PS_OK) {
        FUZZ_REQUIRE(f.ncid == -1 && !f.path, "a failed open left state behind");
        return false;
    }
    static const char *const dims[] = {"prompt", "layer", "position", "head"};
    for (size_t i = 0; i < sizeof dims / sizeof *dims; i++) {
        size_t len;
        fuzz_check_status(ncin_dim_len(&f, dims[i], &len), NAME);
    }
    static const char *const atts[] = {"analysis", "metric", "direction", "model_path", "model_sha256",
                                       "command_line", "created", "patchsweep_version", "complete"};
    for (size_t i = 0; i < sizeof atts / sizeof *atts; i++) {
        char *v = NULL;
        fuzz_check_status(ncin_get_text_att(&f, NULL, atts[i], &v), NAME);
        if (v)
            check_utf8(v);
        free(v);
    }
    char **names = NULL;
    size_t n = 0;
    st = ncin_var_names(&f, &names, &n);
    fuzz_check_status(st, NAME);
    for (size_t i = 0; i < n; i++) {
        FUZZ_REQUIRE(ncin_has_var(&f, names[i]), "listed variable %s not found", names[i]);
        read_var(&f, names[i]);
    }
    ncin_names_free(names, n);
    ncin_close(&f);
    return true;
}

/* `patchsweep plot FILE -o SVG ...` with option set `variant`. */
static void check_plot(unsigned variant)
{
    static const char *const variants[][6] = {
        {NULL},
        {"--mean", NULL},
        {"--var", "all", "--prompt", "1", NULL},
        {"--mean", "--by-length", NULL},
        {"--mean", "--length", "2", "--tokens", "corrupted", NULL},
        {"--var", "all", "--mean", "--zmax", "2", NULL},
        {"--var", "resid_pre_normalized,z_all_pos_normalized", NULL},
        {"--var", "prob", "--title", "t", NULL},
    };
    const char *const *v = variants[variant % (sizeof variants / sizeof variants[0])];
    char *argv[12] = {"plot", part_path, "-o", svg_path};
    int argc = 4;
    for (size_t i = 0; v[i]; i++)
        argv[argc++] = (char *)v[i];
    argv[argc] = NULL;
    optind = 0; /* getopt starts over, as in a fresh process */
    opterr = 0;
    err_clear();
    int rc = cmd_plot(argc, argv);
    FUZZ_REQUIRE(rc == 0 || rc == 1, "plot exited %d", rc);
    FUZZ_REQUIRE((rc == 0) == fs_is_file(svg_path) && !fs_is_file(svg_partial), "plot exited %d, figure %s", rc,
                 fs_is_file(svg_path) ? "written" : "absent");
    if (rc == 1)
        fuzz_check_status(PS_ERR_FORMAT, part_path);
    unlink(svg_path);
}

/* plot, resume and merge, which open paths. */
static void check_paths(const uint8_t *data, size_t size, unsigned plot_variant)
{
    FILE *out = fopen(part_path, "wb");
    FUZZ_REQUIRE(out && fwrite(data, 1, size, out) == size && fclose(out) == 0, "cannot write %s", part_path);
    check_plot(plot_variant);
    /* resume's check of an existing output: false for anything but a
     * complete result of the run named (never this hostile file's) */
    FUZZ_REQUIRE(!schema_is_complete_run(part_path, "job", "model", "dataset", "all"), "schema_is_complete_run");
    const char *parts[] = {part_path};
    merge_result res;
    ps_status st = merge_files(parts, 1, out_path, &res);
    fuzz_check_status(st, NULL);
    FUZZ_REQUIRE(!fs_is_file(out_partial), "merge left %s behind", out_partial);
    FUZZ_REQUIRE((st == PS_OK) == fs_is_file(out_path), "merge returned %s but the output %s", err_name(st),
                 fs_is_file(out_path) ? "exists" : "does not exist");
    if (st == PS_OK)
        FUZZ_REQUIRE(res.parts == 1 && res.prompts == res.done + res.skipped, "merge result");
    unlink(out_path);
    unlink(part_path);
}

/* ---- building a NetCDF-4 file from the input ---------------------------- */

/* The input as a stream of choices; past its end every choice is 0. */
typedef struct {
    const uint8_t *p;
    size_t n;
} bytes_in;

static uint8_t take(bytes_in *in)
{
    if (in->n == 0)
        return 0;
    in->n--;
    return *in->p++;
}

static const char *const dim_names[] = {"prompt", "layer", "position", "head", "vocab", "k", "top_k"};
static const char *const var_names[] = {
    "resid_pre",      "resid_pre_normalized", "attn_out",     "z",          "z_all_pos_normalized",
    "clean_metric",   "corrupted_metric",     "length",       "answer_id",  "wrong_id",
    "answer",         "wrong",                "done",         "skipped",    "prompt_index",
    "skip_reason",    "clean_token_id",       "clean_token",  "corrupted_token", "layer_label",
    "p_answer",       "rank_answer",          "logit_diff",   "top_token",  "layer",
    "position",       "head",                 "token",        "prob",       "reciprocal_rank"};
static const nc_type types[] = {NC_BYTE,   NC_UBYTE, NC_SHORT, NC_USHORT, NC_INT,  NC_UINT,
                                NC_INT64,  NC_UINT64, NC_FLOAT, NC_DOUBLE, NC_CHAR, NC_STRING};
#define N_NUMERIC_TYPES 10
static const char *const att_names[] = {
    "analysis",     "metric",   "direction",   "engine",      "complete",   "slice",
    "job_sha256",   "model_sha256", "dataset_sha256", "patchsweep_version", "command_line", "created",
    "model_path",   "model_config", "prompts_done", "long_name", "_FillValue", "scale_factor",
    "add_offset",   "units"};
static const char *const att_texts[] = {"true", "false", "1/1", "2/3", "all", "0/1", "1/0",
                                        "99999999999999999999/1", "logit_diff", "prob", "logprob", "kl",
                                        "denoise", "noise", "fast", "naive", "lens", "patching", "x", ""};
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))
#define MAX_BUILD_DIMS 5
#define MAX_BUILD_VARS 10
#define MAX_BUILD_VALUES 256 /* values written per variable */

/* One attribute of varid: a name, then a kind (text from the list, raw
 * bytes as text, an NC_STRING, or numbers of any numeric type). */
static void build_att(bytes_in *in, int ncid, int varid)
{
    const char *name = att_names[take(in) % COUNT(att_names)];
    uint8_t kind = take(in) % 4;
    /* netCDF 4.9.0 leaks a string variable's fill value when a second
     * _FillValue of another type is refused (nc4_put_att); patchsweep never
     * sets one twice, so neither does the file built here. */
    if (!strcmp(name, "_FillValue") && varid != NC_GLOBAL && nc_inq_att(ncid, varid, name, NULL, NULL) == NC_NOERR)
        return;
    if (kind == 0) {
        const char *t = att_texts[take(in) % COUNT(att_texts)];
        nc_put_att_text(ncid, varid, name, strlen(t), t);
    } else if (kind == 1) {
        char buf[64];
        size_t len = take(in) % sizeof buf;
        for (size_t i = 0; i < len; i++)
            buf[i] = (char)take(in);
        nc_put_att_text(ncid, varid, name, len, buf);
    } else if (kind == 2) {
        char buf[32];
        size_t len = take(in) % sizeof buf;
        for (size_t i = 0; i < len; i++)
            buf[i] = (char)(take(in) | 1); /* a C string: no NUL inside */
        buf[len] = '\0';
        const char *v = buf;
        nc_put_att_string(ncid, varid, name, 1, &v);
    } else {
        nc_type t = types[take(in) % N_NUMERIC_TYPES];
        size_t count = 1 + take(in) % 3, size = 0;
        nc_inq_type(ncid, t, NULL, &size);
        uint8_t buf[3 * 8];
        for (size_t i = 0; i < count * size; i++)
            buf[i] = take(in);
        nc_put_att(ncid, varid, name, t, count, buf);
    }
}

/* Values of variable varid: `records` along unlimited dimensions, the
 * defined length along the others, at most MAX_BUILD_VALUES in all. */
static void build_values(bytes_in *in, int ncid, int varid)
{
    nc_type type;
    int ndims, dimids[NC_MAX_VAR_DIMS], unlim[MAX_BUILD_DIMS], n_unlim = 0;
    if (nc_inq_var(ncid, varid, NULL, &type, &ndims, dimids, NULL) != NC_NOERR || ndims > MAX_BUILD_DIMS)
        return;
    nc_inq_unlimdims(ncid, &n_unlim, unlim);
    size_t start[MAX_BUILD_DIMS] = {0}, count[MAX_BUILD_DIMS], total = 1;
    size_t records = take(in) % 4;
    for (int d = 0; d < ndims; d++) {
        bool is_unlim = false;
        for (int u = 0; u < n_unlim; u++)
            is_unlim |= unlim[u] == dimids[d];
        if (is_unlim)
            count[d] = records;
        else
            nc_inq_dimlen(ncid, dimids[d], &count[d]);
        total *= count[d];
    }
    if (total == 0 || total > MAX_BUILD_VALUES)
        return;
    if (type == NC_STRING) {
        char *strs[MAX_BUILD_VALUES];
        for (size_t i = 0; i < total; i++) {
            size_t len = take(in) % 12;
            strs[i] = malloc(len + 1);
            FUZZ_REQUIRE(strs[i], "out of memory");
            for (size_t k = 0; k < len; k++)
                strs[i][k] = (char)(take(in) | 1);
            strs[i][len] = '\0';
        }
        nc_put_vara_string(ncid, varid, start, count, (const char **)strs);
        for (size_t i = 0; i < total; i++)
            free(strs[i]);
        return;
    }
    size_t size = 0;
    if (nc_inq_type(ncid, type, NULL, &size) != NC_NOERR || size == 0 || size > 8)
        return;
    uint8_t buf[MAX_BUILD_VALUES * 8];
    for (size_t i = 0; i < total * size; i++)
        buf[i] = take(in);
    nc_put_vara(ncid, varid, start, count, buf);
}

/* Write the NetCDF-4 file the input describes into *mem (malloc'd by
 * netCDF; the caller frees mem->memory).  False when netCDF refused it. */
static bool build_nc4(bytes_in *in, NC_memio *mem)
{
    int ncid;
    if (nc_create_mem("fuzz-built.nc", NC_NETCDF4, 1 << 16, &ncid) != NC_NOERR)
        return false;
    size_t n_dims = 1 + take(in) % MAX_BUILD_DIMS;
    for (size_t i = 0; i < n_dims; i++) {
        const char *name = dim_names[take(in) % COUNT(dim_names)];
        uint8_t len = take(in);
        int id;
        nc_def_dim(ncid, name, len == 255 ? NC_UNLIMITED : (size_t)(len % 8), &id);
    }
    int nd = 0;
    nc_inq_ndims(ncid, &nd);
    size_t n_vars = take(in) % (MAX_BUILD_VARS + 1);
    for (size_t i = 0; i < n_vars && nd > 0; i++) {
        const char *name = var_names[take(in) % COUNT(var_names)];
        nc_type type = types[take(in) % COUNT(types)];
        int ndims = take(in) % 5, dimids[4];
        for (int d = 0; d < ndims; d++)
            dimids[d] = take(in) % nd;
        int varid;
        if (nc_def_var(ncid, name, type, ndims, dimids, &varid) != NC_NOERR)
            continue;
        /* Small chunks: HDF5 fills a whole chunk of strings on the first
         * write, one global-heap insert per element, and netCDF's default
         * chunks of 512 strings along `prompt` made some inputs take 10 s;
         * the readers do not depend on the chunking. */
        size_t chunks[4];
        for (int d = 0; d < ndims; d++) {
            size_t len = 0;
            nc_inq_dimlen(ncid, dimids[d], &len);
            chunks[d] = len == 0 ? 1 : len < 4 ? len : 4;
        }
        if (ndims > 0)
            nc_def_var_chunking(ncid, varid, NC_CHUNKED, chunks);
        size_t n_atts = take(in) % 4;
        for (size_t a = 0; a < n_atts; a++)
            build_att(in, ncid, varid);
    }
    size_t n_global = take(in) % 16;
    for (size_t a = 0; a < n_global; a++)
        build_att(in, ncid, NC_GLOBAL);
    if (nc_enddef(ncid) == NC_NOERR) {
        int nv = 0;
        nc_inq_nvars(ncid, &nv);
        for (int v = 0; v < nv; v++)
            build_values(in, ncid, v);
    }
    memset(mem, 0, sizeof *mem);
    if (nc_close_memio(ncid, mem) != NC_NOERR) {
        free(mem->memory);
        return false;
    }
    return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    if (data[0] % 2 == 0) {
        /* classic formats: force the magic so that netCDF never tries HDF5 */
        static const uint8_t versions[] = {1, 2, 5};
        size_t n = size - 1 < 4 ? 4 : size - 1;
        uint8_t *img = calloc(n, 1);
        FUZZ_REQUIRE(img, "out of memory");
        memcpy(img, data + 1, size - 1);
        memcpy(img, "CDF", 3);
        if (img[3] != 1 && img[3] != 2 && img[3] != 5)
            img[3] = versions[img[3] % 3];
        if (check_ncin(img, n))
            check_paths(img, n, data[0] >> 1);
        free(img);
        return 0;
    }
    bytes_in in = {data + 1, size - 1};
    NC_memio mem;
    if (!build_nc4(&in, &mem))
        return 0;
    if (check_ncin(mem.memory, mem.size))
        check_paths(mem.memory, mem.size, data[0] >> 1);
    free(mem.memory);
    return 0;
}
