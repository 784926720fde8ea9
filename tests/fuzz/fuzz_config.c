/*
 * Fuzz target: the config.json reader (model_config_parse on the text, what
 * model_load runs on the file's bytes).
 *
 * An accepted config must hold the invariants the forward pass relies on:
 * every size positive and within its MODEL_MAX_* cap, d_head * n_head =
 * n_embd, layer_norm_epsilon in (0, 1].
 */
#include <stddef.h>
#include <stdint.h>

#include "fuzz_common.h"
#include "model.h"

#define NAME "fuzz/config.json"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* model_load refuses files over the cap before parsing; so does this. */
    if (size > MODEL_MAX_CONFIG_BYTES)
        return 0;
    model_config c;
    ps_status st = model_config_parse(&c, NAME, (const char *)data, size);
    fuzz_check_status(st, NAME);
    if (st != PS_OK)
        return 0;
    FUZZ_REQUIRE(c.n_layer >= 1 && c.n_layer <= MODEL_MAX_N_LAYER, "n_layer %zu", c.n_layer);
    FUZZ_REQUIRE(c.n_head >= 1 && c.n_head <= MODEL_MAX_N_HEAD, "n_head %zu", c.n_head);
    FUZZ_REQUIRE(c.n_embd >= 1 && c.n_embd <= MODEL_MAX_N_EMBD, "n_embd %zu", c.n_embd);
    FUZZ_REQUIRE(c.n_inner >= 1 && c.n_inner <= MODEL_MAX_N_INNER, "n_inner %zu", c.n_inner);
    FUZZ_REQUIRE(c.n_positions >= 1 && c.n_positions <= MODEL_MAX_N_POSITIONS, "n_positions %zu", c.n_positions);
    FUZZ_REQUIRE(c.vocab_size >= 1 && c.vocab_size <= MODEL_MAX_VOCAB_SIZE, "vocab_size %zu", c.vocab_size);
    FUZZ_REQUIRE(c.d_head * c.n_head == c.n_embd, "d_head %zu", c.d_head);
    FUZZ_REQUIRE(c.ln_eps > 0.0f && c.ln_eps <= 1.0f, "ln_eps %g", (double)c.ln_eps);
    return 0;
}
