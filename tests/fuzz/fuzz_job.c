/*
 * Fuzz target: the job.ini reader (job_parse_mem on the bytes, what
 * job_load runs on the file).
 *
 * An accepted job must hold what sweep relies on: the required paths, .nc
 * outputs (two different files when the lens is on), values in their
 * documented ranges, the text and its sha256 kept for provenance.
 */
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fuzz_common.h"
#include "job.h"

#define NAME "fuzz/job.ini"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int ends_with_nc(const char *s)
{
    size_t n = strlen(s);
    return n >= 3 && !strcmp(s + n - 3, ".nc");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    job j;
    ps_status st = job_parse_mem(&j, NAME, (const char *)data, size);
    fuzz_check_status(st, NAME);
    if (st != PS_OK) {
        FUZZ_REQUIRE(!j.path && !j.text && !j.model_dir && !j.output, "a failed parse left state behind");
        return 0;
    }
    FUZZ_REQUIRE(j.model_dir && j.dataset && j.output && ends_with_nc(j.output), "required keys");
    FUZZ_REQUIRE(!j.lens || (j.lens_output && ends_with_nc(j.lens_output) && strcmp(j.lens_output, j.output)),
                 "lens output");
    FUZZ_REQUIRE(j.chunk_prompts <= JOB_CHUNK_PROMPTS_MAX && j.threads <= JOB_THREADS_MAX, "ranges");
    FUZZ_REQUIRE(j.lens_top_k >= 1 && j.lens_top_k <= JOB_LENS_TOP_K_MAX, "top_k %zu", j.lens_top_k);
    FUZZ_REQUIRE(isfinite(j.progress_seconds) && j.progress_seconds > 0, "progress_seconds %g", j.progress_seconds);
    FUZZ_REQUIRE(strlen(j.text) == size && !memcmp(j.text, data, size), "text kept");
    FUZZ_REQUIRE(strlen(j.sha256) == 64 && !strcmp(j.path, NAME), "provenance");
    bool any = false;
    for (size_t c = 0; c < PATCH_COMPONENT_COUNT; c++)
        any |= j.components[c];
    FUZZ_REQUIRE(any, "no component selected");
    job_free(&j);
    return 0;
}
