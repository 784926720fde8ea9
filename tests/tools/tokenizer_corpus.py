#!/usr/bin/python3
"""Deterministic corpus for comparing our GPT-2 tokenizer with the npm
gpt-3-encoder JS encoder (tests/integration/test_tokenizer_js.py).

Usage: tokenizer_corpus.py [OUT]   writes one item per line, hex-encoded
(items are arbitrary bytes: newlines and invalid UTF-8 included); stdout
without OUT.  Importable: corpus() returns [(category, bytes), ...].

Standard library only; the same items on every run and Python 3 version
(random.Random seeded with fixed strings; only randrange and choice).

Left out on purpose, because the JS reference differs from OpenAI's
encoder.py there (the test checks those cases separately, see
JS_DIVERGENT in the test):
  - U+0085 (NEL) and U+FEFF (BOM): JS's \\s excludes the first and includes
    the second; encoder.py's `regex` \\s is Unicode White_Space, the reverse;
  - "<|endoftext|>": special for us (id 50256), plain text for the JS encoder;
  - characters assigned after Unicode 14 (Debian 12's PCRE2 tables): only
    code points from blocks complete by Unicode 14 are generated.
"""
import random
import sys

SEED = 20240517

# (first, last) code point ranges fully assigned long before Unicode 14.
SCRIPTS = {
    "cjk": [(0x4E00, 0x9FA5)],
    "kana": [(0x3041, 0x3096), (0x30A1, 0x30FA)],
    "hangul": [(0xAC00, 0xD7A3)],
    "arabic": [(0x0621, 0x063A), (0x0641, 0x064A)],
    "hebrew": [(0x05D0, 0x05EA)],
    "devanagari": [(0x0905, 0x0939)],
    "thai": [(0x0E01, 0x0E30)],
    "cyrillic": [(0x0410, 0x044F)],
    "greek": [(0x0391, 0x03A1), (0x03A3, 0x03A9), (0x03B1, 0x03C9)],
    "armenian": [(0x0531, 0x0556)],
    "georgian": [(0x10D0, 0x10FA)],
    "latin1": [(0x00C0, 0x00D6), (0x00D8, 0x00F6), (0x00F8, 0x00FF)],
    "latinext": [(0x0100, 0x017F)],
}
EMOJI = [(0x1F600, 0x1F64F), (0x1F300, 0x1F5FF), (0x1F680, 0x1F6C5), (0x2600, 0x26FF)]
COMBINING = [(0x0300, 0x036F)]

WORDS = ("the of and to in is was for that with as on by it he she they we you this "
         "model layer head attention residual stream token patch logit probe neuron "
         "Paris London Tokyo Mary John Smith Alice Bob GPT transformer embedding "
         "interpretability circuit activation gradient softmax January Monday "
         "quick brown fox jumps over lazy dog hello world Hello World HELLO").split()
PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
UPPER_CONTRACTIONS = ["'S", "'T", "'RE", "'Re", "'rE", "'VE", "'Ve", "'M", "'LL", "'Ll", "'D"]
SPACES = [" ", "\t", "\n", "\r", "\r\n", "\u00a0", "\u2003", "\u3000", "\u2028", "\u2029",
          "\u000b", "\u000c", "\u202f", "\u205f", "\u1680"]
INVALID = [b"\x80", b"\xbf", b"\xc0", b"\xc1", b"\xc2", b"\xdf", b"\xe0", b"\xe0\x80",
           b"\xe0\x9f\x80", b"\xe0\xa0", b"\xe2\x82", b"\xed\xa0\x80", b"\xed\xbf\xbf",
           b"\xf0", b"\xf0\x8f\xbf\xbf", b"\xf0\x90", b"\xf0\x9f\x98", b"\xf4\x90\x80\x80",
           b"\xf5", b"\xf8\x88\x80\x80\x80", b"\xfe", b"\xff", b"\xc0\x80", b"\xc1\xbf",
           b"\xe0\x80\x80", b"\xf0\x80\x80\x80", b"\xed\xa0\xbd\xed\xb8\x80", b"\x80\x80\x80"]


def pick(rng, ranges):
    first, last = rng.choice(ranges)
    return chr(first + rng.randrange(last - first + 1))


def word(rng):
    return rng.choice(WORDS)


def sentence(rng, n=None):
    n = n or 3 + rng.randrange(12)
    out = []
    for i in range(n):
        w = word(rng)
        if rng.randrange(8) == 0:
            w = w.capitalize()
        out.append(w)
        if i + 1 < n and rng.randrange(6) == 0:
            out[-1] += rng.choice([",", ";", ":", " -", " --"])
    return " ".join(out) + rng.choice([".", "!", "?", "...", "", "\n"])


def gen_english(rng):
    for _ in range(250):
        yield sentence(rng)
    for _ in range(50):
        yield " ".join(sentence(rng) for _ in range(2 + rng.randrange(4)))


def gen_contractions(rng):
    for c in CONTRACTIONS + UPPER_CONTRACTIONS:
        for fmt in ("it{c}", "IT{c}", " {c}", "{c}", "{c} ", "x{c}x", "''{c}", "{c}{c}",
                    "don{c} stop", "  {c}", "\n{c}", "{c}s", "{c}123", "a {c}b"):
            yield fmt.format(c=c)
    for _ in range(60):
        w = word(rng)
        c = rng.choice(CONTRACTIONS + UPPER_CONTRACTIONS)
        yield f"{sentence(rng, 3)} {w}{c} {sentence(rng, 3)}"
    yield from ["I'm", "you're", "we've", "they'll", "he'd", "DON'T", "Can'T", "rock'n'roll",
                "it\u2019s", "'''", "' s", "'", "''", "'ss", "'tt", "'rere", "O'Neil's",
                "'llama", "'dog", "'mm", "x'S'T'RE'VE"]


def gen_digits(rng):
    for _ in range(120):
        n = rng.randrange(10 ** rng.randrange(1, 16))
        yield rng.choice(["{n}", " {n}", "{n} ", "x{n}", "{n}x", "-{n}", "{n}.{m}", "{n},{m}",
                          "${n}", "{n}%", "v{n}.{m}.{m}", "({n})", "#{n}", "{n}:{m}"]).format(
                              n=n, m=rng.randrange(1000))
    yield from ["3.14159265358979", "1,000,000", "2024-05-17", "+1 (555) 123-4567", "0x1F600",
                "1e-9", "12abc34", "abc 123 def", "007", "1 2 3 4 5", "١٢٣٤", "०१२३",
                "\uff11\uff12\uff13", "\u00b2\u00b3\u00b9", "\u2160\u216b", "\u00bd\u00be",
                "\u2460\u2461", "x\u00b2+y\u00b2", "50\u00b0C", "\u0661\u0662 abc"]
    for _ in range(40):
        yield "".join(rng.choice("0123456789 ,.") for _ in range(1 + rng.randrange(30)))


def gen_whitespace(rng):
    for _ in range(220):
        parts = []
        for _ in range(1 + rng.randrange(5)):
            if rng.randrange(2):
                parts.append(word(rng))
            parts.append("".join(rng.choice(SPACES) for _ in range(1 + rng.randrange(6))))
        yield "".join(parts)
    for s in SPACES:
        yield from [s, s * 3, "a" + s, s + "a", "a" + s * 2 + "b", s + "!" + s, "x " + s]
    yield from ["", " ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\t\t", " \n ", "a  b", "a   b",
                "trailing   ", "trailing\n", "trailing \n\n ", "   leading", "\n\nleading",
                "a\t\tb", "a \t b", "x\r\n\r\ny", "  \u00a0  ", "end\u3000\u3000"]


def gen_punctuation(rng):
    for _ in range(150):
        yield "".join(rng.choice(PUNCT) for _ in range(1 + rng.randrange(12)))
    for _ in range(80):
        yield "".join(rng.choice(PUNCT + [" ", ",", ",", ",", "a"]) for _ in range(1 + rng.randrange(20)))
    yield from ['{"a": 1, "b": [1, 2, 3]}', "def f(x):\n    return x**2\n", "int main(void) { return 0; }",
                "https://example.com/path?q=1&r=2#frag", "user@example.com", "<div class=\"x\">hi</div>",
                "a == b && c != d || !e", "// comment", "/* block */", "$ ls -la | grep foo",
                "...", "!!!", "???", "--", "---", "\u2014", "\u2026", "\u00ab\u00bb", "\u201chi\u201d",
                "\u20ac100", "\u00a3\u00a5\u00a2", "\u2190\u2192\u2194", "\u2211\u222b\u221a", "\u2122\u00ae\u00a9",
                ",,,", ",,,,", ",,,,,,,,", ",,,,,,,,,,,,,,,,,", ", ,", "\",\"", "\",", ",\"", "),", "},{\"",
                "\"],", "'),", "),(", "],[", "\",\"\",\"", "a,b,c", "1,2,3", ",\u2014", ", ,, ,,,"]


def gen_scripts(rng):
    names = sorted(SCRIPTS)
    for name in names:
        for _ in range(25):
            n = 1 + rng.randrange(15)
            text = "".join(pick(rng, SCRIPTS[name]) for _ in range(n))
            yield rng.choice(["{t}", " {t}", "{t} {t}", "{t}, {t}.", "abc{t}", "{t}123"]).format(t=text)
    yield from ["\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8", "\u4f60\u597d\uff0c\u4e16\u754c\uff01",
                "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8", "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
                "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
                "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!", "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u039a\u03cc\u03c3\u03bc\u03b5",
                "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd", "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
                "Stra\u00dfe \u00fcber M\u00e4dchen", "na\u00efve caf\u00e9 r\u00e9sum\u00e9"]


def gen_emoji(rng):
    zwj = "\u200d"
    singles = ["\U0001F600", "\U0001F44D", "\u2764\ufe0f", "\U0001F1FA\U0001F1F8", "\U0001F1EF\U0001F1F5",
               "#\ufe0f\u20e3", "1\ufe0f\u20e3", "\U0001F44B\U0001F3FD", "\U0001F469\u200d\U0001F4BB",
               "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466", "\U0001F3F3\ufe0f\u200d\U0001F308",
               "\U0001F9D1\U0001F3FF\u200d\U0001F91D\u200d\U0001F9D1\U0001F3FB", "\u263a", "\u2603\ufe0e"]
    for s in singles:
        yield from [s, " " + s, s * 3, "hi " + s + " there", s + "!", "a" + s + "b"]
    for _ in range(110):
        parts = []
        for _ in range(1 + rng.randrange(6)):
            e = pick(rng, EMOJI)
            r = rng.randrange(5)
            if r == 0:
                e += zwj + pick(rng, EMOJI)
            elif r == 1:
                e += chr(0x1F3FB + rng.randrange(5))
            elif r == 2:
                e += "\ufe0f"
            parts.append(e)
        sep = rng.choice(["", " ", "  ", "\n", word(rng)])
        yield sep.join(parts)


def gen_combining(rng):
    for _ in range(100):
        base = rng.choice(["a", "e", "o", " ", "Z", "1", "!", "\u0430", "\u03b1", "\u4e00"])
        marks = "".join(pick(rng, COMBINING) for _ in range(1 + rng.randrange(8)))
        yield rng.choice(["{b}{m}", "{b}{m} x", "x {b}{m}", "{m}", " {m}", "{b}{m}{b}{m}"]).format(b=base, m=marks)
    yield from ["e\u0301", "\u00e9", "cafe\u0301", "n\u0303", "\u0915\u093f", "\u0915\u094d\u0937",
                "\u05e9\u05c1", "a\u20dd", "\u0301", " \u0301", "1\u0301", "a\u0300\u0301\u0302\u0303"]


def gen_controls(rng):
    for c in list(range(0x00, 0x20)) + [0x7F] + [c for c in range(0x80, 0xA0) if c != 0x85]:
        ch = chr(c)
        yield from [ch, "a" + ch + "b", " " + ch, ch + ch]
    yield from ["\u200b", "a\u200bb", "\u200c\u200d", "\u00ad", "soft\u00adhyphen", "\u2060", "\u180e x"]


def gen_invalid(rng):
    for b in INVALID:
        yield from [b, b"a" + b, b + b"a", b" " + b + b" ", b + b, b"hello" + b + b"world", b + b"\xe2\x82\xac"]
    for _ in range(80):
        out = bytearray()
        for _ in range(1 + rng.randrange(12)):
            r = rng.randrange(4)
            if r == 0:
                out += rng.choice(INVALID)
            elif r == 1:
                out.append(0x80 + rng.randrange(0x80))
            elif r == 2:
                out += word(rng).encode()
            else:
                out += pick(rng, SCRIPTS[rng.choice(sorted(SCRIPTS))]).encode()[:1 + rng.randrange(3)]
        yield bytes(out)


def gen_random(rng):
    pools = [list(SCRIPTS.values()), [EMOJI], [COMBINING], [[(0x21, 0x7E)]], [[(0x20, 0x20)]]]
    for _ in range(300):
        out = []
        for _ in range(1 + rng.randrange(40)):
            ranges = rng.choice(rng.choice(pools))
            out.append(pick(rng, ranges))
            if rng.randrange(10) == 0:
                out.append(rng.choice(SPACES))
        yield "".join(out)


GENERATORS = [("english", gen_english), ("contractions", gen_contractions), ("digits", gen_digits),
              ("whitespace", gen_whitespace), ("punctuation", gen_punctuation), ("scripts", gen_scripts),
              ("emoji", gen_emoji), ("combining", gen_combining), ("controls", gen_controls),
              ("invalid-utf8", gen_invalid), ("random", gen_random)]


def usable(data):
    text = data.decode("utf-8", "replace")
    return "\x85" not in text and "\ufeff" not in text and "<|endoftext|>" not in text


def corpus():
    """[(category, bytes)]: every generator's items, deduplicated, in order."""
    items, seen = [], set()
    for name, gen in GENERATORS:
        rng = random.Random(f"{SEED}:{name}")
        for item in gen(rng):
            data = item if isinstance(item, bytes) else item.encode("utf-8")
            if data not in seen and usable(data):
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
