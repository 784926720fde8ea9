/*
 * hftok: HuggingFace tokenizer.json (model.type BPE) in C, byte-exact with
 * the JavaScript reference @huggingface/tokenizers (tokenizers.js, the
 * implementation transformers.js uses), pinned by `make hf-tokenizers`.
 *
 * encode(text), as the reference's Tokenizer.encode(text, {add_special_tokens: false}):
 *   0. invalid UTF-8 is replaced by U+FFFD, one per maximal invalid subpart
 *      (what node's Buffer.toString('utf8') hands the reference);
 *   1. added tokens whose `normalized` is false (or with no normalizer) are
 *      matched in the raw text, leftmost-longest; `lstrip`/`rstrip` trim the
 *      neighbouring sections with JavaScript's trim() whitespace;
 *   2. each other section goes through the normalizer (Sequence, Prepend,
 *      Replace, NFC, NFD, NFKC, NFKD), then normalized added tokens are
 *      matched in it;
 *   3. the pre-tokenizer (Sequence, Split, ByteLevel, Metaspace) cuts it;
 *   4. BPE merges each piece in rank order (ties: leftmost first), with
 *      ignore_merges, byte_fallback <0xNN> tokens, unk_token and fuse_unk.
 * `single_word` is read but, as in the reference, has no effect.
 * BOS is not part of encode: hftok_bos_id/hftok_add_bos say what to prepend
 * (tokenizer_config.json's add_bos_token and bos_token, else
 * generation_config.json's bos_token_id, else the TemplateProcessing
 * post-processor's first special token; a known BOS with no add_bos_token
 * and no template is prepended, as TransformerLens does).
 *
 * decode(ids) runs the decoder (ByteLevel, Metaspace, Sequence of Replace,
 * ByteFallback, Fuse, Strip; none: tokens joined by spaces) and returns
 * bytes; clean_up_tokenization_spaces is never applied (it loses text).
 *
 * Anything else in the file (another model type, normalizer, pre-tokenizer,
 * decoder, a regex construct outside the supported subset) is refused with
 * one line naming it and the file.
 */
#ifndef PS_HFTOK_H
#define PS_HFTOK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

/* Llama 3's tokenizer.json is 9 MB, Qwen3's 11 MB. */
#define HFTOK_MAX_FILE_BYTES ((size_t)64 << 20)
#define HFTOK_MAX_VOCAB ((size_t)1 << 21)
#define HFTOK_MAX_MERGES ((size_t)1 << 22)
#define HFTOK_MAX_ADDED ((size_t)1 << 16)
#define HFTOK_MAX_TOKEN_BYTES ((size_t)1 << 12)
#define HFTOK_MAX_REGEX_BYTES ((size_t)1 << 12)
/* Inputs longer than this many bytes are refused rather than tokenized. */
#define HFTOK_MAX_TEXT_BYTES ((size_t)64 << 20)

typedef struct hftok hftok;

/* Load `json_path`; `config_dir` (may be NULL) holds tokenizer_config.json
 * and generation_config.json when the model has them. */
ps_status hftok_load(hftok **out, const char *json_path, const char *config_dir);
/* The same from a tokenizer.json held in memory (no config files); `name`
 * stands for the file in messages. */
ps_status hftok_load_mem(hftok **out, const char *name, const char *data, size_t len);
void hftok_free(hftok *t);

/* Largest id + 1 (model vocabulary and added tokens). */
size_t hftok_vocab_size(const hftok *t);

/* Ids of `len` bytes of text, without BOS. *ids is malloc'd (caller frees). */
ps_status hftok_encode(const hftok *t, const char *text, size_t len, int32_t **ids, size_t *n);

/* Text of ids through the file's decoder, malloc'd and NUL-terminated. */
ps_status hftok_decode(const hftok *t, const int32_t *ids, size_t n, char **text, size_t *len);

/* One token's bytes as the decoder shows it inside a text (Metaspace's "▁"
 * a space, <0xNN> its byte, byte-level characters their bytes); NULL if no
 * token has this id. */
const char *hftok_token_bytes(const hftok *t, int32_t id, size_t *len);

/* The BOS id, -1 if the tokenizer has none. */
int32_t hftok_bos_id(const hftok *t);
/* Whether prompts get the BOS prepended by default. */
bool hftok_add_bos(const hftok *t);
/* Override the default (--bos / --no-bos); on == true needs a BOS id. */
ps_status hftok_set_add_bos(hftok *t, bool on);

#endif
