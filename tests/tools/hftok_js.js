// Reference ids and decodings from @huggingface/tokenizers (tokenizers.js,
// pinned by `make hf-tokenizers`) for a hex corpus (hftok_corpus.py).
//
// Usage: node hftok_js.js TOKENIZERS_CJS MODEL_DIR CORPUS
//   TOKENIZERS_CJS  the package's dist/tokenizers.cjs
//   MODEL_DIR       holds tokenizer.json and tokenizer_config.json
// Prints one line per item: a JSON array
//   [ids, ids_with_special_tokens, hex of decode(ids)]
// ids: encode(text, {add_special_tokens: false}); the decoding uses
// clean_up_tokenization_spaces: false (hftok never applies it).  Each item
// is decoded with Buffer.toString('utf8'): every maximal invalid UTF-8
// subpart becomes U+FFFD, as hftok_encode does before matching.
'use strict';
const fs = require('fs');
const path = require('path');

function fail(msg) {
  process.stderr.write(`hftok_js.js: ${msg}\n`);
  process.exit(2);
}

if (process.argv.length !== 5) fail('usage: node hftok_js.js TOKENIZERS_CJS MODEL_DIR CORPUS');
const { Tokenizer } = require(path.resolve(process.argv[2]));
const dir = process.argv[3];
const tj = JSON.parse(fs.readFileSync(path.join(dir, 'tokenizer.json'), 'utf8'));
const cfgPath = path.join(dir, 'tokenizer_config.json');
const tc = fs.existsSync(cfgPath) ? JSON.parse(fs.readFileSync(cfgPath, 'utf8')) : {};
const tok = new Tokenizer(tj, tc);

const lines = fs.readFileSync(process.argv[4], 'ascii').split('\n');
if (lines.length > 0 && lines[lines.length - 1] === '') lines.pop();
const out = [];
lines.forEach((hex, i) => {
  if (!/^(?:[0-9a-fA-F]{2})*$/.test(hex)) fail(`${process.argv[4]}:${i + 1}: not hex`);
  const text = Buffer.from(hex, 'hex').toString('utf8');
  const ids = tok.encode(text, { add_special_tokens: false }).ids;
  const withSpecial = tok.encode(text).ids;
  const dec = ids.length ? tok.decode(ids, { clean_up_tokenization_spaces: false }) : '';
  out.push(JSON.stringify([ids, withSpecial, Buffer.from(dec, 'utf8').toString('hex')]));
});
process.stdout.write(out.length ? out.join('\n') + '\n' : '');
