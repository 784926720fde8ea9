// Reference token ids from the npm package gpt-3-encoder (OpenAI's encoder.py
// ported to JS) for a hex corpus written by tokenizer_corpus.py.
//
// Usage: PS_TOKENIZER=DIR node tokenizer_js.js CORPUS
//   DIR holds the package (Encoder.js, encoder.json, vocab.bpe).
// Prints one JSON array of ids per corpus line.  Each item is decoded with
// Buffer.toString('utf8'), which replaces every maximal invalid UTF-8
// subpart by U+FFFD, as our C tokenizer does before matching.
'use strict';
const fs = require('fs');
const path = require('path');

function fail(msg) {
  process.stderr.write(`tokenizer_js.js: ${msg}\n`);
  process.exit(2);
}

const dir = process.env.PS_TOKENIZER;
if (!dir) fail('set PS_TOKENIZER to the gpt-3-encoder package directory');
if (process.argv.length !== 3) fail('usage: node tokenizer_js.js CORPUS');
const { encode } = require(path.resolve(dir, 'Encoder.js'));

const lines = fs.readFileSync(process.argv[2], 'ascii').split('\n');
// The file ends with a newline, so split() leaves one empty string after it.
if (lines.length > 0 && lines[lines.length - 1] === '') lines.pop();
const out = [];
lines.forEach((hex, i) => {
  if (!/^(?:[0-9a-fA-F]{2})*$/.test(hex)) fail(`${process.argv[2]}:${i + 1}: not hex`);
  const text = Buffer.from(hex, 'hex').toString('utf8');
  out.push(JSON.stringify(encode(text)));
});
process.stdout.write(out.length ? out.join('\n') + '\n' : '');
