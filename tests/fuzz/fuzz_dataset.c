/*
 * Fuzz target: the JSONL dataset reader (dataset_read_jsonl_stream on the
 * bytes through fmemopen, what sweep and lens run on the file), then what a
 * sweep does next with each record: dataset_tokenize with the GPT-2
 * tokenizer (with and without <|endoftext|>, 64 positions).
 *
 * Checked besides the error contract: every accepted record has its four
 * string fields; tokenized prompts have equal lengths within the limit and
 * single-token answers in the vocabulary; a small dataset written with
 * dataset_write_jsonl reads back to the same records.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dataset.h"
#include "fuzz_common.h"
#include "fuzz_tok.h"

#define NAME "fuzz.jsonl"
#define MAX_TOKENS 64
/* Written back only below this: jansson's compact form of a real number can
 * be 5 times its input ("1e300"), which could pass the line limit. */
#define ROUND_TRIP_MAX ((size_t)128 << 10)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_tokens(const dataset *d)
{
    const size_t V = tokenizer_vocab_size(fuzz_tok);
    for (size_t i = 0; i < d->n; i++) {
        const dataset_item *it = &d->items[i];
        FUZZ_REQUIRE(it->clean && it->corrupted && it->answer && it->wrong && it->line >= 1, "item %zu", i);
        dataset_tokens tk;
        bool bos = i % 2 == 0;
        ps_status st = dataset_tokenize(d, i, fuzz_tok, bos, MAX_TOKENS, &tk);
        fuzz_check_status(st, NAME);
        if (st != PS_OK) {
            FUZZ_REQUIRE(!tk.clean_ids && !tk.corrupted_ids, "a failed tokenize left ids behind");
            continue;
        }
        FUZZ_REQUIRE(tk.n_tokens >= 1 && tk.n_tokens <= MAX_TOKENS, "%zu tokens", tk.n_tokens);
        FUZZ_REQUIRE(!bos || (tk.clean_ids[0] == TOKENIZER_EOT && tk.corrupted_ids[0] == TOKENIZER_EOT), "bos");
        for (size_t k = 0; k < tk.n_tokens; k++)
            FUZZ_REQUIRE(tk.clean_ids[k] >= 0 && (size_t)tk.clean_ids[k] < V && tk.corrupted_ids[k] >= 0 &&
                             (size_t)tk.corrupted_ids[k] < V,
                         "token %zu out of range", k);
        FUZZ_REQUIRE(tk.answer_id != tk.wrong_id && tk.answer_id >= 0 && (size_t)tk.answer_id < V &&
                         tk.wrong_id >= 0 && (size_t)tk.wrong_id < V,
                     "answer %d wrong %d", (int)tk.answer_id, (int)tk.wrong_id);
        dataset_tokens_free(&tk);
    }
}

static void check_round_trip(const dataset *d)
{
    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    FUZZ_REQUIRE(out, "open_memstream failed");
    ps_status st = dataset_write_jsonl(d, out, "memory");
    fclose(out);
    FUZZ_REQUIRE(st == PS_OK, "write failed: %s", err_msg());
    FILE *in = fmemopen(text, len, "r");
    FUZZ_REQUIRE(in, "fmemopen failed");
    dataset back;
    st = dataset_read_jsonl_stream(&back, in, "written");
    fclose(in);
    FUZZ_REQUIRE(st == PS_OK, "the written dataset does not read back: %s", err_msg());
    FUZZ_REQUIRE(back.n == d->n, "%zu records written, %zu read back", d->n, back.n);
    for (size_t i = 0; i < d->n; i++) {
        const dataset_item *a = &d->items[i], *b = &back.items[i];
        FUZZ_REQUIRE(!strcmp(a->clean, b->clean) && !strcmp(a->corrupted, b->corrupted) &&
                         !strcmp(a->answer, b->answer) && !strcmp(a->wrong, b->wrong) &&
                         json_equal(a->obj, b->obj),
                     "record %zu changed in the round trip", i);
    }
    dataset_free(&back);
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* fmemopen reads the bytes in place; "r" never writes them. */
    FILE *f = fmemopen((void *)data, size, "r");
    FUZZ_REQUIRE(f, "fmemopen of %zu bytes failed", size);
    dataset d;
    ps_status st = dataset_read_jsonl_stream(&d, f, NAME);
    fclose(f);
    fuzz_check_status(st, NAME);
    if (st != PS_OK) {
        FUZZ_REQUIRE(d.n == 0 && !d.items && !d.path, "a failed read left records behind");
        return 0;
    }
    FUZZ_REQUIRE(d.n >= 1 && d.n <= DATASET_MAX_ITEMS && !strcmp(d.path, NAME), "%zu records", d.n);
    check_tokens(&d);
    if (size <= ROUND_TRIP_MAX)
        check_round_trip(&d);
    dataset_free(&d);
    return 0;
}
