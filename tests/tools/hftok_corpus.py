#!/usr/bin/python3
"""Deterministic corpus for comparing our tokenizer.json encoder (src/core/hftok.c)
with the JS reference @huggingface/tokenizers (tests/integration/test_hftok.py).

Usage: hftok_corpus.py [OUT]   one item per line, hex-encoded; stdout without
OUT.  Importable: corpus() returns [(category, bytes), ...].

Every item of the GPT-2 corpus (tokenizer_corpus.py: English, contractions,
digits, whitespace, punctuation, scripts, emoji, combining marks, controls,
invalid UTF-8, random mixes), plus what the three tokenizer.json files make
hard: their special and added tokens embedded in text (and near misses),
Llama 3's 1-3 digit groups, code with tabs and long whitespace runs, CRLF,
text that NFC changes (Qwen3), the case-insensitive contractions of the
Llama 3 / Qwen regex next to U+017F and U+212A, U+0085 and U+FEFF (the
GPT-2 corpus leaves them out; here the reference's own rules decide).

Invalid UTF-8: both sides see U+FFFD for each maximal invalid subpart (the
JS side decodes the bytes with Buffer.toString('utf8'), hftok_encode repairs
them the same way before anything else).

Standard library only; the same items on every run (random.Random with
fixed string seeds; only randrange and choice).  Characters come from blocks
complete by Unicode 14 (Debian 12's PCRE2); node's tables are newer.
"""
import random
import sys

import tokenizer_corpus as base

SEED = 20250518

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|reserved_special_token_0|>", "<|reserved_special_token_250|>", "<s>", "</s>", "<unk>",
            "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
            "<|fim_prefix|>", "<|vision_start|>"]
NEAR = ["<|begin_of_text", "<|im_start", "<s", "s>", "<<s>>", "<|endoftext|", "|>", "<|", "<think", "</s",
        "<|reserved_special_token_|>", "<|im_start|>>", "<</s>>", "<|IM_START|>", "< s>", "<S>"]


def gen_specials(rng):
    for s in SPECIALS:
        yield from [s, " " + s, s + " ", "a" + s + "b", " a " + s + " b ", s + s, s + "\n" + s,
                    "\n" + s + "\n", s + "hello", "hello" + s, "  " + s + "  ", s + " " + s + " x"]
    for n in NEAR:
        yield from [n, "a " + n + " b", n + "x"]
    for _ in range(150):
        parts = []
        for _ in range(1 + rng.randrange(6)):
            r = rng.randrange(4)
            if r == 0:
                parts.append(rng.choice(SPECIALS))
            elif r == 1:
                parts.append(rng.choice(NEAR))
            else:
                parts.append(base.sentence(rng, 1 + rng.randrange(5)))
        yield rng.choice(["", " ", "\n", "  "]).join(parts)
    yield "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    yield ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\n")
    yield "<s>[INST] Hello [/INST] Hi there</s><s>[INST] again [/INST]"


def gen_digit_runs(rng):
    for k in range(1, 25):
        d = "".join(str(rng.randrange(10)) for _ in range(k))
        yield from [d, " " + d, "x" + d, d + "x", d + " " + d, "-" + d, d + ".5"]
    for _ in range(60):
        yield " ".join(str(rng.randrange(10 ** rng.randrange(1, 12))) for _ in range(1 + rng.randrange(6)))


CODE = [
    "def f(x):\n\treturn x * 2\n",
    "int main(void)\n{\n    printf(\"%d\\n\", 42);\n    return 0;\n}\n",
    "for (i = 0; i < n; i++) {\n\t\tsum += a[i];\t// accumulate\n\t}\n",
    "if x:\r\n    y = 1\r\nelse:\r\n    y = 2\r\n",
    "    \n        \n\t\t\n",
    "SELECT *\n  FROM t\n WHERE a >= 10 AND b <> 'x';",
    "const re = /[a-z]+/gi; // regex\n",
    "<html>\n  <body>\n    <p class='x'>Hi</p>\n  </body>\n</html>\n",
    "#include <stdio.h>\n#define MAX(a, b) ((a) > (b) ? (a) : (b))\n",
    "x = [1,2,3]  # trailing comment   \n\n\n",
    "fn main() -> Result<(), Box<dyn Error>> {\n    Ok(())\n}",
    "\t\t\t\tdeep\t\ttabs\t",
    "a" + " " * 40 + "b",
    "\n" * 12 + "x",
    " " * 100,
    "\t" * 33,
    "\r\n" * 7,
    "  \r\n  \r\n\r\n  x  \r\n",
]


def gen_code(rng):
    yield from CODE
    for _ in range(120):
        lines = []
        for _ in range(1 + rng.randrange(6)):
            indent = rng.choice(["", "    ", "\t", "\t\t", "  ", " " * (1 + rng.randrange(20))])
            body = rng.choice(["x = {n}", "return {w}", "{w}({n}, {w})", "if ({w} == {n}) {{", "}}", "// {w} {w}",
                               "{w}.{w} = [{n}, {n}]", "print(\"{w}\")", "for {w} in range({n}):"]).format(
                                   n=rng.randrange(100000), w=base.word(rng))
            tail = rng.choice(["", " ", "   ", "\t", " \t "])
            lines.append(indent + body + tail)
        yield rng.choice(["\n", "\r\n", "\n\n"]).join(lines) + rng.choice(["", "\n", "\r\n", "\n\n\n"])


def gen_edges(rng):
    yield from ["", " ", "  ", "\n", "\r\n", "\t", "a", " a", "a ", " a ", "  a  ", "\n a \n", "\r\n\r\n",
                "\u0085", "a\u0085b", " \u0085!", "\u0085\u0085", "\ufeff", "\ufeffx", "a \ufeff b", " \ufeff!",
                "\u2028", "x\u2029y", "\u00a0", "\u3000x", "\u180e", "'s", "'S", "'\u017f", "it'\u017f",
                "'\u212a", "'LL", "'Ll", "'lL", "'RE", "'rE", "'VE", "'D", "'M", "'T", "I'M", "WE'VE",
                "\u212a", "\u017f", "K\u212a"]
    for _ in range(100):
        s = base.sentence(rng, 1 + rng.randrange(6))
        yield rng.choice([" ", "  ", "\n", "\t", "\r\n", " \n"]) * (1 + rng.randrange(3)) + s + \
            rng.choice(["", " ", "  ", "\n", "\r\n", "\t "]) * (1 + rng.randrange(3))


def gen_nfc(rng):
    # Decomposed forms that NFC composes, singletons it replaces, Hangul jamo.
    yield from ["e\u0301", "E\u0301", "a\u0308", "o\u0302\u0301", "n\u0303o", "A\u030a", "\u212b", "\u2126",
                "\u212a", "\uf900", "\uf91d", "\u1100\u1161", "\u1100\u1161\u11a8", "\u1112\u1161\u11ab\u1100\u1173\u11af",
                "\u0041\u0327\u0301", "\u0063\u0327", "\u1e0a\u0323", "\u1e0c\u0307", "\u0071\u0307\u0323",
                "\u00c5", "\u0340", "\u0341", "\u0343", "\u0344", "\u0374", "\u037e", "\u0387",
                "\u0915\u093c", "\u09c7\u09be", "\u0b47\u0b3e", "\u0dd9\u0dcf"]
    for _ in range(80):
        base_ch = rng.choice("aeiouAEIOUcnsyzCNSYZ")
        marks = "".join(rng.choice(["\u0300", "\u0301", "\u0302", "\u0303", "\u0308", "\u030a", "\u0327",
                                    "\u0323", "\u0331"]) for _ in range(1 + rng.randrange(3)))
        yield rng.choice(["{b}{m}", " {b}{m}", "caf{b}{m}", "{b}{m} {b}{m}", "x{b}{m}y"]).format(b=base_ch, m=marks)
    for _ in range(40):
        yield "".join(chr(0x1100 + rng.randrange(19)) + chr(0x1161 + rng.randrange(21)) +
                      (chr(0x11A8 + rng.randrange(27)) if rng.randrange(2) else "") for _ in range(1 + rng.randrange(4)))


def gen_long(rng):
    for _ in range(12):
        yield "\n\n".join(" ".join(base.sentence(rng) for _ in range(8)) for _ in range(5))
    yield "x" * 3000
    yield "ab" * 1500
    yield "\u4e00" * 500
    yield "\U0001F600" * 300
    yield ("a" + " " * 17) * 60
    yield "1234567890" * 100


GENERATORS = base.GENERATORS + [("specials", gen_specials), ("digit-runs", gen_digit_runs), ("code", gen_code),
                                ("edges", gen_edges), ("nfc", gen_nfc), ("long", gen_long)]


def corpus():
    """[(category, bytes)]: every generator's items, deduplicated, in order."""
    items, seen = [], set()
    for name, gen in GENERATORS:
        rng = random.Random(f"{SEED}:{name}" if name not in dict(base.GENERATORS) else f"{base.SEED}:{name}")
        for item in gen(rng):
            data = item if isinstance(item, bytes) else item.encode("utf-8")
            if data not in seen:
                seen.add(data)
                items.append((name, data))
    return items


def main(argv):
    text = "".join(data.hex() + "\n" for _, data in corpus())
    if len(argv) > 1:
        with open(argv[1], "w", encoding="ascii") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
