/*
 * schema: the names, types and fill values of the NetCDF-4 files patchsweep
 * writes, in one place.  Writers (ncout, ncout_lens, sweep, merge) and
 * readers (ncin's callers: merge, plot, resume) use these names, never
 * string literals.  This comment is the file format's contract.
 *
 * Every file
 *   Written as PATH.partial and renamed to PATH when complete and closed
 *   (ncout_create / ncout_commit), so a file under its final name is never
 *   partial.  Global attributes (provenance, ncout_put_provenance):
 *   Conventions = "patchsweep-1.0", patchsweep_schema (NC_INT, the format's
 *   version SCHEMA_VERSION = 2; absent in schema 1 files), patchsweep_version,
 *   command_line,
 *   created (UTC ISO 8601), model_path, model_sha256, model_config
 *   (config.json text), model_dtype, compute ("f32" or "bf16": the
 *   blocks' matrix products, model.h model_compute; with "bf16" also
 *   compute_kernel, "amx_bf16" or "avx512_bf16"; files written before it
 *   existed are f32); a sharded checkpoint adds
 *   model_shard_sha256.  model_sha256 is the sha256 of model.safetensors,
 *   or for a sharded checkpoint the sha256 of the text of
 *   model_shard_sha256: one line "<sha256 of the shard>  <file name>\n" per
 *   shard in file-name order (sha256sum's output; model.h, model_hash);
 *   once the CLI has recorded its BLAS
 *   set-up: blas (one line: OpenBLAS version, core and why, self-check,
 *   threads), blas_core, blas_threads, gemm_kernel.  All text (NC_CHAR)
 *   but patchsweep_schema.
 *
 * Conventions of schema 2 (for xarray; readers take schema 1 files too)
 *   - Booleans are integers: global attributes complete and prepend_bos
 *     NC_INT 0/1 (schema 1: the text "true"/"false", schema_read_flag);
 *     variables done, skipped NC_BYTE 0/1 with flag_values 0b, 1b and
 *     flag_meanings (SCHEMA_DONE_MEANINGS, SCHEMA_SKIPPED_MEANINGS).
 *   - Token ids (token_id, clean/corrupted_token_id, answer_id, wrong_id,
 *     topk_id) are NC_INT, -1 where there is none (past a prompt's length,
 *     a prompt not done), valid_min 0 and no _FillValue: xarray keeps them
 *     int32 (a _FillValue would make them float64 to hold NaN); CF readers
 *     (netCDF4-python) mask the -1.
 *   - Other integer quantities have a _FillValue that xarray masks (NaN,
 *     float64 in xarray): length and rank -1 (SCHEMA_FILL_INT),
 *     role_position -1, item_NAME NC_FILL_INT64.  Floats: NC_FILL_*.
 *   - Strings have no _FillValue (netCDF's default fill is ""; xarray's
 *     to_netcdf cannot write a string _FillValue back).
 *   - The global attribute coordinates (a space-separated list) names the
 *     variables that label others, which xarray makes coordinates: the
 *     token strings and ids (label positions), layer_label (and hook) (label
 *     layers), item_NAME (label prompts).  ncout_add_coordinate adds one.
 *   - Coordinate variables of the dimensions: prompt(prompt) (the dataset
 *     index), layer(layer) NC_INT block numbers, -1 the embedding output
 *     (lens files only), long_name SCHEMA_LAYER_LONG_NAME, beside
 *     layer_label(layer) NC_STRING ("embed", "0", "1", ...) in patching and
 *     lens files alike: ds.sel(layer=2) is block 2 in both (in patching
 *     files the block whose hook is patched, in lens files block 2's output,
 *     see hook).
 *
 * Patching results (`patch -o`, `sweep`, `merge`)
 *   Dimensions: prompt (unlimited; id 0), layer, position (the longest
 *   prompt's tokens), head; kv_head (grouped-query models with k, v,
 *   k_all_pos or v_all_pos), src_position (with pattern_dest_src: as long as
 *   position).  Coordinates prompt(prompt) NC_INT (the pair's 0-based index
 *   in the whole dataset; files of a sliced sweep hold a contiguous part of
 *   it; schema 1: the variable prompt_index), layer(layer) with
 *   layer_label(layer), position(position), head(head), kv_head(kv_head),
 *   src_position(src_position): NC_INT 0..n-1.
 *   Per selected component C (patch_component_name): C and C_normalized,
 *   NC_FLOAT, dimensions (prompt, layer, position), (prompt, layer, head),
 *   (prompt, layer, position, head) or (prompt, layer, position,
 *   src_position, head), kv_head for head where the grid is per key/value
 *   head (patch_grid_shape; pattern and pattern_dest_src: position is the
 *   destination row), _FillValue
 *   NC_FILL_FLOAT (SCHEMA_FILL_GRID), long_name "<metric> after patching C"
 *   / "normalized <metric> after patching C".  C_normalized = (C -
 *   corrupted_metric) / (clean_metric - corrupted_metric), NaN when the two
 *   agree.
 *   Per prompt: clean_metric, corrupted_metric (NC_DOUBLE, _FillValue
 *   NC_FILL_DOUBLE = SCHEMA_FILL_METRIC); length (NC_INT, _FillValue -1);
 *   answer_id, wrong_id (NC_INT ids, -1 none); answer, wrong, skip_reason
 *   (NC_STRING, ""); done, skipped (NC_BYTE flags: done 1 when every value
 *   of the prompt is written, skipped 1 when the pair was invalid, reason in
 *   skip_reason).
 *   Per prompt and position: clean_token_id, corrupted_token_id (NC_INT ids,
 *   -1 past the prompt's length), clean_token, corrupted_token
 *   (NC_STRING display text, invalid UTF-8 shown as U+FFFD, "").
 *   Positions past a prompt's length, and every value of a prompt not done,
 *   hold the fill value (-1 for ids).  Every string cell is written (""
 *   where there is nothing): HDF5 cannot read a string cell never written.
 *   Chunks: whole prompts, about 4 KiB per chunk (strings: netCDF's own).
 *   Global attributes: provenance, metric, direction ("denoise" | "noise"),
 *   engine ("fast" | "naive"), normalized (the formula as text), coordinates.
 *   Sweeps add job_path, job_text, job_sha256, dataset_path, dataset_sha256,
 *   mpi_ranks, memory_per_rank, compute_seconds, write_seconds (the chunks'
 *   and the results writer's seconds), slice ("all" or "K/N",
 *   schema_parse_slice), complete (NC_INT 0/1), prompts_done (text).  merge
 *   adds merged_from and parts_NAME for attributes that differ between the
 *   parts (merge.h); a merge of schema 1 parts is a schema 1 file.
 *   The identity of a run (schema_identity_atts): job_sha256, model_sha256,
 *   dataset_sha256, metric, direction, engine.
 *   Several metrics (`--metric logit_diff,prob,kl`, `[patch] metric = ...`):
 *   the first metric M0 keeps every name above (metric = M0); each other
 *   metric M adds C_M and C_M_normalized per component (C's dims, type,
 *   fill), clean_M and corrupted_M (clean_metric's), each with the variable
 *   attribute metric = M and C_M_normalized = (C_M - corrupted_M) /
 *   (clean_M - corrupted_M); the global attribute metrics lists them all,
 *   M0 first ("logit_diff,prob,kl"; absent with one metric).  All come from
 *   the same patched forwards.
 *
 * Ablations (patch --source zero|mean|resample, [patch] source; patchspec.h,
 *   ablate.h): global attributes source ("zero" | "mean" | "resample"; absent
 *   for clean/corrupted, whose direction says it), ablation_dataset and
 *   ablation_dataset_sha256 (`patch`: the prompts a mean or resample draws
 *   on; a sweep draws on its own dataset, dataset_path),
 *   mean_over (the mean's subset as given, "all" by default) and
 *   mean_prompts (the prompts averaged, decimal), ablation_seed (resample,
 *   decimal); resample_from(prompt) NC_INT as the ids (-1 none, valid_min
 *   0, no _FillValue): the 0-based dataset index of the prompt whose
 *   activations replaced this one's.
 *
 * Roles and metadata (sweeps of a dataset; results_roles.h): dimension
 *   role, coordinate role(role) NC_STRING (the dataset's role names, END
 *   last unless named), role_position(prompt, role) NC_INT (_FillValue -1:
 *   the role's token position in the prompt, -1 when absent); per dataset
 *   metadata field NAME (strings or integers) item_NAME(prompt), NC_STRING
 *   ("") or NC_INT64 (_FillValue NC_FILL_INT64), listed in coordinates.
 *   When the dataset
 *   has a `template` field: dimension template and coordinate
 *   template(template) (its distinct values, sorted).  For every position
 *   grid V (C and C_normalized of a component with a position dimension):
 *   V_by_role(layer, role[, head]) the mean over done prompts that have the
 *   role (NaN values skipped), V_by_role_std (ddof = 0), V_by_role_count
 *   (NC_INT), all NC_DOUBLE with NaN where the count is 0; and per template
 *   V_by_role_template(template, layer, role[, head]), _std, _count.
 *
 * Guards (sweeps): guard(prompt) NC_INT bit flags (flag_masks 1 2 4 8,
 *   flag_meanings SCHEMA_GUARD_MEANINGS): 1 clean and corrupted are the same
 *   tokens (the normalized grid is NaN), 2 |clean_metric - corrupted_metric|
 *   < 0.1 x the standard deviation of the clean and corrupted metrics pooled
 *   over done prompts (the normalized values are noise), 4 the answer does
 *   not start with whitespace while the prompt does not end with it (GPT-2
 *   then predicts " Mary", not "Mary"), a check of the text; 8 the answer
 *   is not among the SCHEMA_GUARD_TOP_K most likely next tokens of the clean
 *   run (its rank in the clean run's next-token distribution, 1 + the
 *   number of tokens with a larger logit, is over 10): the metric follows a
 *   token the model does not predict.  Global attribute guards: one line
 *   per guard that fired (count and first prompts), "" when none.
 *
 * Activation cache (`run --cache`)
 *   Dimensions from hook_shape (position, d_model, head, d_head, d_mlp,
 *   vocab, ...); token_id(position) NC_INT, token(position) NC_STRING (both
 *   in coordinates), and one NC_FLOAT variable per selected hook, named by
 *   its hook name.  Global attributes: provenance, prepend_bos (NC_INT 0/1),
 *   coordinates.
 *
 * Lens files (`lens --dataset`, ncout_lens)
 *   Global attributes: provenance, analysis = "lens", prepend_bos (NC_INT
 *   0/1), dataset, decoded_position = "last", coordinates.  Dimensions:
 *   prompt (unlimited), layer (the embedding row and one per block), topk,
 *   position.  layer(layer) NC_INT -1 (embed), 0..n_layer-1 (the output of
 *   that block); layer_label(layer), hook(layer): NC_STRING; per prompt and
 *   layer prob, logprob, reciprocal_rank (NC_DOUBLE), rank (NC_INT,
 *   _FillValue -1); topk_id(prompt, layer, topk) NC_INT id, topk_prob
 *   NC_DOUBLE, topk_token NC_STRING; per prompt answer_id (id), length
 *   (NC_INT, _FillValue -1), answer (NC_STRING), done (NC_BYTE flag);
 *   token_id(prompt, position) NC_INT (id, -1 past the length),
 *   token(prompt, position) NC_STRING.  Every variable has a long_name.
 */
#ifndef PS_SCHEMA_H
#define PS_SCHEMA_H

#include <stdbool.h>
#include <stddef.h>

#include "err.h"
#include "ncin.h"

/* ---- dimensions ---- */
#define SCHEMA_DIM_PROMPT "prompt"
#define SCHEMA_DIM_LAYER "layer"
#define SCHEMA_DIM_POSITION "position"
#define SCHEMA_DIM_HEAD "head"
#define SCHEMA_DIM_KV_HEAD "kv_head"   /* k, v, k_all_pos, v_all_pos of grouped-query models */
#define SCHEMA_DIM_SRC_POSITION "src_position" /* pattern_dest_src: the source (key) position */
#define SCHEMA_DIM_TOPK "topk"

/* ---- variables of the patching results ---- */
#define SCHEMA_VAR_PROMPT "prompt"     /* coordinates (schema 2): the dataset index of each prompt */
#define SCHEMA_VAR_LAYER "layer"
#define SCHEMA_VAR_POSITION "position"
#define SCHEMA_VAR_HEAD "head"
#define SCHEMA_VAR_KV_HEAD "kv_head"
#define SCHEMA_VAR_SRC_POSITION "src_position"
#define SCHEMA_VAR_CLEAN_METRIC "clean_metric"
#define SCHEMA_VAR_CORRUPTED_METRIC "corrupted_metric"
#define SCHEMA_VAR_LENGTH "length"
#define SCHEMA_VAR_ANSWER_ID "answer_id"
#define SCHEMA_VAR_WRONG_ID "wrong_id"
#define SCHEMA_VAR_ANSWER "answer"
#define SCHEMA_VAR_WRONG "wrong"
#define SCHEMA_VAR_DONE "done"
#define SCHEMA_VAR_SKIPPED "skipped"
#define SCHEMA_VAR_PROMPT_INDEX "prompt_index" /* schema 1 only: the prompt coordinate's values */
#define SCHEMA_VAR_SKIP_REASON "skip_reason"
#define SCHEMA_VAR_CLEAN_TOKEN_ID "clean_token_id"
#define SCHEMA_VAR_CORRUPTED_TOKEN_ID "corrupted_token_id"
#define SCHEMA_VAR_CLEAN_TOKEN "clean_token"
#define SCHEMA_VAR_CORRUPTED_TOKEN "corrupted_token"
/* C_normalized beside each component C */
#define SCHEMA_NORMALIZED_SUFFIX "_normalized"
/* Several metrics: C + SCHEMA_METRIC_SEP + M (+ SCHEMA_NORMALIZED_SUFFIX);
 * SCHEMA_CLEAN_PREFIX + M, SCHEMA_CORRUPTED_PREFIX + M */
#define SCHEMA_METRIC_SEP "_"
#define SCHEMA_CLEAN_PREFIX "clean_"
#define SCHEMA_CORRUPTED_PREFIX "corrupted_"
/* Attribution patching (issue 20; patch --method atp | atp+exact): per
 * component C, C_atp and C_atp_normalized (the estimate, the exact grid's
 * dims and units) and, with atp+exact, C_atp_error = C_atp - C (raw metric
 * units), whose attributes atp_rank_correlation (Spearman, estimate vs
 * exact, NC_DOUBLE) and atp_missed_top_k (flat cell indices of the exact
 * top k by |effect| absent from the estimate's top k, NC_INT; k in
 * atp_top_k) measure the estimate.  Global attribute method = exact (absent:
 * exact), atp or atp+exact. */
#define SCHEMA_ATP_SUFFIX "_atp"
#define SCHEMA_ATP_NORMALIZED_SUFFIX "_atp_normalized"
#define SCHEMA_ATP_ERROR_SUFFIX "_atp_error"
#define SCHEMA_ATT_ATP_RANK_CORRELATION "atp_rank_correlation"
#define SCHEMA_ATT_ATP_MISSED_TOP_K "atp_missed_top_k"
#define SCHEMA_ATT_ATP_TOP_K "atp_top_k"
#define SCHEMA_ATT_METHOD "method"
/* Sweeps with method = atp+exact | atp*+exact (job.h): the exact grids C,
 * C_normalized as an exact sweep's, the estimate C_atp, C_atp_normalized,
 * C_atp_error = C_atp - C per prompt, and per prompt and component
 * C_atp_rank_correlation(prompt) (Spearman, NC_DOUBLE, NaN when a grid is
 * constant) and C_atp_missed(prompt) (how many of the exact top atp_top_k
 * cells by |effect| the estimate's top atp_top_k misses, NC_INT).  Their
 * dataset-level summary (ncout_atp_summary): attributes prompts, mean,
 * median on C_atp_rank_correlation, prompts and total on C_atp_missed.
 * method = atp+verify | atp*+verify: C_atp, C_atp_normalized for every
 * cell and C_verified, C_verified_normalized: the exact value at the cells
 * verified (the top verify_top_k of each prompt's grid by |C_atp - base|),
 * NaN at every other cell of a done prompt (attribute comment). */
#define SCHEMA_ATP_RANK_CORRELATION_SUFFIX "_atp_rank_correlation"
#define SCHEMA_ATP_MISSED_SUFFIX "_atp_missed"
#define SCHEMA_VERIFIED_SUFFIX "_verified"
#define SCHEMA_VERIFIED_NORMALIZED_SUFFIX "_verified_normalized"
#define SCHEMA_ATT_SUMMARY_PROMPTS "prompts"
#define SCHEMA_ATT_SUMMARY_MEAN "mean"
#define SCHEMA_ATT_SUMMARY_MEDIAN "median"
#define SCHEMA_ATT_SUMMARY_TOTAL "total"
#define SCHEMA_ATT_VERIFY_TOP_K "verify_top_k"
/* plot's default variable */
#define SCHEMA_VAR_RESID_PRE_NORMALIZED "resid_pre_normalized"
/* Edge attribution patching (patch --method atp --edges; atp_edges.h,
 * ncout_edges.h): dimensions upstream and downstream, their string
 * coordinates (TransformerLens labels), edge_atp(upstream, downstream) the
 * raw score (an estimated metric change; _FillValue SCHEMA_FILL_GRID where
 * there is no edge), edge_atp_normalized (/ (clean - corrupted)), and the
 * node attributions upstream_atp(upstream), downstream_atp(downstream). */
#define SCHEMA_DIM_UPSTREAM "upstream"
#define SCHEMA_DIM_DOWNSTREAM "downstream"
#define SCHEMA_VAR_UPSTREAM "upstream"
#define SCHEMA_VAR_DOWNSTREAM "downstream"
#define SCHEMA_VAR_EDGE_ATP "edge_atp"
#define SCHEMA_VAR_EDGE_ATP_NORMALIZED "edge_atp_normalized"
#define SCHEMA_VAR_UPSTREAM_ATP "upstream_atp"
#define SCHEMA_VAR_DOWNSTREAM_ATP "downstream_atp"

/* ---- roles and dataset metadata (results_roles.h) ---- */
#define SCHEMA_DIM_ROLE "role"
#define SCHEMA_VAR_ROLE "role"                   /* coordinate: role names (NC_STRING) */
#define SCHEMA_VAR_ROLE_POSITION "role_position" /* (prompt, role) NC_INT, -1 absent */
#define SCHEMA_ITEM_PREFIX "item_"               /* item_NAME(prompt): the dataset field NAME */
#define SCHEMA_META_TEMPLATE "template"          /* the dataset field that groups prompts */
#define SCHEMA_DIM_TEMPLATE "template"
#define SCHEMA_VAR_TEMPLATE "template"           /* coordinate: the template ids (item_template's type) */
/* V_by_role(layer, role[, head]) beside each position grid V, and so on */
#define SCHEMA_BY_ROLE_SUFFIX "_by_role"
#define SCHEMA_BY_ROLE_STD_SUFFIX "_by_role_std"
#define SCHEMA_BY_ROLE_COUNT_SUFFIX "_by_role_count"
#define SCHEMA_BY_ROLE_TEMPLATE_SUFFIX "_by_role_template"
#define SCHEMA_BY_ROLE_TEMPLATE_STD_SUFFIX "_by_role_template_std"
#define SCHEMA_BY_ROLE_TEMPLATE_COUNT_SUFFIX "_by_role_template_count"

/* ---- guards against wrong conclusions (results_roles_put_guards) ---- */
#define SCHEMA_VAR_GUARD "guard"        /* (prompt) NC_INT bit flags, 0 = none */
#define SCHEMA_ATT_GUARDS "guards"      /* global: one line per guard that fired, "" none */
#define SCHEMA_ATT_FLAG_MASKS "flag_masks"
#define SCHEMA_ATT_FLAG_MEANINGS "flag_meanings"
#define SCHEMA_GUARD_IDENTICAL 1        /* clean and corrupted prompts are the same tokens */
#define SCHEMA_GUARD_SMALL_GAP 2        /* |clean - corrupted metric| < SCHEMA_GUARD_GAP_FRACTION x spread */
#define SCHEMA_GUARD_UNSPACED_ANSWER 4  /* answer lacks the leading space the prompt calls for */
#define SCHEMA_GUARD_NOT_TOP_K 8        /* the answer's rank in the clean run's next-token distribution > SCHEMA_GUARD_TOP_K */
#define SCHEMA_GUARD_TOP_K 10
#define SCHEMA_GUARD_MEANINGS \
    "identical_prompts small_metric_gap answer_without_leading_space answer_not_in_clean_top_k"
#define SCHEMA_GUARD_GAP_FRACTION 0.1

/* ---- variables of the cache and lens files ---- */
#define SCHEMA_VAR_TOKEN_ID "token_id"
#define SCHEMA_VAR_TOKEN "token"
#define SCHEMA_VAR_LAYER_LABEL "layer_label"
#define SCHEMA_VAR_HOOK "hook"
#define SCHEMA_VAR_PROB "prob"
#define SCHEMA_VAR_LOGPROB "logprob"
#define SCHEMA_VAR_RANK "rank"
#define SCHEMA_VAR_RECIPROCAL_RANK "reciprocal_rank"
#define SCHEMA_VAR_TOPK_ID "topk_id"
#define SCHEMA_VAR_TOPK_PROB "topk_prob"
#define SCHEMA_VAR_TOPK_TOKEN "topk_token"

/* ---- attributes of variables ---- */
#define SCHEMA_ATT_LONG_NAME "long_name"
#define SCHEMA_ATT_FILL_VALUE "_FillValue"
#define SCHEMA_ATT_FLAG_VALUES "flag_values"   /* 0 1 (NC_BYTE) of a boolean variable */
#define SCHEMA_ATT_VALID_MIN "valid_min"       /* 0 of an id variable: -1 = none (CF: missing) */
#define SCHEMA_ATT_COORDINATES "coordinates"   /* global: the variables that label others (CF/xarray) */

/* ---- global attributes ---- */
#define SCHEMA_ATT_CONVENTIONS "Conventions"
#define SCHEMA_ATT_SCHEMA "patchsweep_schema"   /* NC_INT SCHEMA_VERSION; absent: 1 */
#define SCHEMA_ATT_PATCHSWEEP_VERSION "patchsweep_version"
#define SCHEMA_ATT_COMMAND_LINE "command_line"
#define SCHEMA_ATT_CREATED "created"
#define SCHEMA_ATT_MODEL_PATH "model_path"
#define SCHEMA_ATT_MODEL_SHA256 "model_sha256"
#define SCHEMA_ATT_MODEL_SHARD_SHA256 "model_shard_sha256"
#define SCHEMA_ATT_MODEL_CONFIG "model_config"
#define SCHEMA_ATT_MODEL_DTYPE "model_dtype"
#define SCHEMA_ATT_BLAS "blas"
#define SCHEMA_ATT_BLAS_CORE "blas_core"
#define SCHEMA_ATT_BLAS_THREADS "blas_threads"
#define SCHEMA_ATT_GEMM_KERNEL "gemm_kernel"
#define SCHEMA_ATT_COMPUTE "compute"               /* "f32" | "bf16"; absent: f32 */
#define SCHEMA_ATT_COMPUTE_KERNEL "compute_kernel" /* bf16 only: gemm_bf16_isa_name */
#define SCHEMA_ATT_PREPEND_BOS "prepend_bos"
#define SCHEMA_ATT_SOURCE "source"
#define SCHEMA_ATT_ABLATION_DATASET "ablation_dataset"
#define SCHEMA_ATT_ABLATION_DATASET_SHA256 "ablation_dataset_sha256"
#define SCHEMA_ATT_MEAN_OVER "mean_over"
#define SCHEMA_ATT_MEAN_PROMPTS "mean_prompts"
#define SCHEMA_ATT_ABLATION_SEED "ablation_seed"
#define SCHEMA_VAR_RESAMPLE_FROM "resample_from"   /* (prompt) NC_INT, an id: -1 none, valid_min 0 */
#define SCHEMA_ATT_METRIC "metric"     /* global: the (first) metric; on a variable: its metric */
#define SCHEMA_ATT_METRICS "metrics"   /* global, several metrics: all of them, comma-separated */
#define SCHEMA_ATT_DIRECTION "direction"
#define SCHEMA_ATT_ENGINE "engine"
#define SCHEMA_ATT_NORMALIZED "normalized"
#define SCHEMA_ATT_SLICE "slice"
#define SCHEMA_ATT_JOB_PATH "job_path"
#define SCHEMA_ATT_JOB_TEXT "job_text"
#define SCHEMA_ATT_JOB_SHA256 "job_sha256"
#define SCHEMA_ATT_DATASET_PATH "dataset_path"
#define SCHEMA_ATT_DATASET_SHA256 "dataset_sha256"
#define SCHEMA_ATT_MPI_RANKS "mpi_ranks"
#define SCHEMA_ATT_MEMORY_PER_RANK "memory_per_rank"
#define SCHEMA_ATT_COMPUTE_SECONDS "compute_seconds" /* sweep: the chunks, rank 0's wall time */
#define SCHEMA_ATT_WRITE_SECONDS "write_seconds"     /* sweep: the writer thread's busy time */
#define SCHEMA_ATT_COMPLETE "complete"
#define SCHEMA_ATT_PROMPTS_DONE "prompts_done"
#define SCHEMA_ATT_MERGED_FROM "merged_from"
#define SCHEMA_ATT_PARTS_PREFIX "parts_"
#define SCHEMA_ATT_ANALYSIS "analysis"
#define SCHEMA_ATT_DATASET "dataset"
#define SCHEMA_ATT_DECODED_POSITION "decoded_position"

/* ---- attribute values ---- */
#define SCHEMA_CONVENTIONS "patchsweep-1.0"
/* The file format's version (global attribute patchsweep_schema).  1 (no
 * attribute): up to December 2026.  2: the prompt coordinate, the
 * coordinates attribute, booleans as integers, masked integer fills, no
 * string _FillValue, the layer coordinate of lens files (embed = -1).
 * Readers take both (schema_version and the schema_read_* below). */
#define SCHEMA_VERSION 2
#define SCHEMA_TRUE "true"                /* schema 1's boolean attributes */
#define SCHEMA_FALSE "false"
#define SCHEMA_DONE_MEANINGS "not_done done"
#define SCHEMA_SKIPPED_MEANINGS "not_skipped skipped"
#define SCHEMA_LAYER_EMBED (-1)           /* layer coordinate of the embedding row (lens) */
#define SCHEMA_LAYER_LONG_NAME "block index (-1: the embedding output)"
#define SCHEMA_SLICE_ALL "all"
#define SCHEMA_ANALYSIS_LENS "lens"
#define SCHEMA_DIRECTION_DENOISE "denoise"
#define SCHEMA_DIRECTION_NOISE "noise"
#define SCHEMA_ENGINE_FAST "fast"
#define SCHEMA_ENGINE_NAIVE "naive"
#define SCHEMA_NORMALIZED_FORMULA "(patched - corrupted_metric) / (clean_metric - corrupted_metric)"

/* ---- fill values (spelled out so that this header needs no netcdf.h;
 * tests/unit/test_ncout.c checks them against netCDF's) ---- */
#define SCHEMA_FILL_GRID 9.9692099683868690e+36f   /* NC_FILL_FLOAT: C, C_normalized */
#define SCHEMA_FILL_METRIC 9.9692099683868690e+36  /* NC_FILL_DOUBLE: clean/corrupted_metric */
#define SCHEMA_FILL_TOKEN_ID (-1)                  /* *token_id, answer_id, wrong_id, topk_id: written, no _FillValue */
#define SCHEMA_FILL_INT (-1)                       /* length, rank: _FillValue (masked) */
#define SCHEMA_FILL_ROLE_POSITION (-1)             /* role_position */
#define SCHEMA_FILL_ITEM_INT (-9223372036854775806LL) /* NC_FILL_INT64: item_NAME integers */

/* The global attributes that identify a run: the parts of one merge agree
 * on all of them. */
extern const char *const schema_identity_atts[];
#define SCHEMA_N_IDENTITY_ATTS ((size_t)6)

/* The largest N of `sweep --slice K/N`. */
#define SCHEMA_SLICE_MAX ((size_t)1000000)

/* "K/N" (decimal digits only, no sign or space) with 1 <= K <= N <= max_n: the slice option of
 * sweep and the slice attribute of a part.  False otherwise ("all" too). */
bool schema_parse_slice(const char *s, size_t max_n, size_t *k, size_t *n);

/* The resume check: whether `path` is the complete result of this run, i.e.
 * a readable NetCDF file whose text attributes job_sha256, model_sha256,
 * dataset_sha256 and slice equal the arguments and complete is "true".
 * Any failure to read says false. */
bool schema_is_complete_run(const char *path, const char *job_sha256, const char *model_sha256,
                            const char *dataset_sha256, const char *slice);

/* The schema version of an open file: its patchsweep_schema attribute, 1
 * when absent, -1 when the attribute is not one integer. */
int schema_version(const ncin_file *f);

/* A boolean global attribute (complete, prepend_bos): an integer 0/1
 * (schema 2) or the text "true"/"false" (schema 1).  *present false when
 * absent; PS_ERR_FORMAT naming the file when it is anything else. */
ps_status schema_read_flag(const ncin_file *f, const char *name, bool *value, bool *present);

/* The variable holding each prompt's dataset index: prompt (schema 2) or
 * prompt_index (schema 1); NULL when the file has neither. */
const char *schema_prompt_index_var(const ncin_file *f);

#endif
