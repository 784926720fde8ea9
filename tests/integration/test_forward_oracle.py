#!/usr/bin/python3
"""patchsweep's forward pass against the float64 PyTorch oracle
(tests/tools/oracle.py), as llm.c tests against PyTorch.

Random GPT-2 checkpoints (tests/tools/make_model.py) in F32, BF16 (with the
"transformer." prefix and the attn.bias / masked_bias buffers) and F16 (with an
untied lm_head); prompts of 1, 7 and 40 tokens.  For each pair `patchsweep
cache` writes every hook to NetCDF, and every variable must match the oracle
run on the file's own token_id: max|c - ref| <= 1e-4 * max(1, max|ref|).
The oracle is first checked on its own (dtype decoding, softmax/causality,
LayerNorm, hook semantics, an independent numpy forward).

Environment: PS_BIN, PS_ROOT, PS_BUILD, PS_TOKENIZER (see run_integration.sh).
Prints one line per check and ends with `oracle: N passed, N failed`.
"""
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np
import torch
import xarray as xr

ROOT = os.environ.get("PS_ROOT") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("PS_BIN") or os.path.join(ROOT, "build/rel/patchsweep")
BUILD = os.environ.get("PS_BUILD") or os.path.join(ROOT, "build/rel")
TOKENIZER = os.environ.get("PS_TOKENIZER") or os.path.join(ROOT, "build/gpt-3-encoder/package")
PYTHON = os.environ.get("PS_PYTHON", "/usr/bin/python3")
MAKE_MODEL = os.path.join(ROOT, "tests/tools/make_model.py")
sys.path.insert(0, os.path.join(ROOT, "tests/tools"))
import oracle  # noqa: E402

TOL = 1e-4
EOT = 50256

# name, make_model.py options, expected dtype of the weights, prefix, buffers, untied.
# --std: at GPT-2's init (0.02) attention is uniform and mlp_pre ~0.2, so GELU's
# tanh approximation vs erf differs by < 1e-5, under the tolerance.  At 0.1 both
# that and a missing LayerNorm eps move some hook by >= 1.5e-4; at 0.3 attention
# is sharp (entropy ~0.3-0.4 of uniform) and the GELU variant by >= 5e-4.
MODELS = [
    ("a_1L1H_d8", ["--layers", "1", "--heads", "1", "--d-model", "8", "--dtype", "f32", "--std", "0.1",
                   "--seed", "11"], "F32", False, False, False),
    ("b_3L4H_d32", ["--layers", "3", "--heads", "4", "--d-model", "32", "--dtype", "f32", "--std", "0.3",
                    "--seed", "12"], "F32", False, False, False),
    ("c_2L3H_d48_bf16", ["--layers", "2", "--heads", "3", "--d-model", "48", "--dtype", "bf16", "--std", "0.3",
                         "--prefix", "--mask-buffers", "--seed", "13"], "BF16", True, True, False),
    ("d_2L2H_d16_f16", ["--layers", "2", "--heads", "2", "--d-model", "16", "--dtype", "f16", "--std", "0.1",
                        "--untied", "--seed", "14"], "F16", False, False, True),
]

# name, text, CLI options, expected token ids (OpenAI's encoder, npm gpt-3-encoder 1.1.4)
PROMPTS = [
    ("1tok", " Hello", ["--no-bos"], [18435]),
    ("7tok", "The quick brown fox jumps over", [], [EOT, 464, 2068, 7586, 21831, 18045, 625]),
    ("40tok", "When Mary and John went to the store, John gave a drink to Mary. Afterwards, the two of "
              "them walked slowly back home along the quiet river, talking about the weather and the news today",
     [], [EOT, 2215, 5335, 290, 1757, 1816, 284, 262, 3650, 11, 1757, 2921, 257, 4144, 284, 5335, 13, 39063, 11,
          262, 734, 286, 606, 6807, 6364, 736, 1363, 1863, 262, 5897, 7850, 11, 3375, 546, 262, 6193, 290, 262,
          1705, 1909]),
]
HOOK_FILTER = "blocks.*.hook_resid_post,logits"
OPTIONAL_HOOKS = ("ln1.hook_normalized", "ln2.hook_normalized")  # the oracle has them; the file may not
ATTRS = ("patchsweep_version", "command_line", "model_sha256", "model_config")

counts = {"passed": 0, "failed": 0}


def check(ok, what, detail=""):
    counts["passed" if ok else "failed"] += 1
    print(f"{'ok  ' if ok else 'FAIL'} {what}" + (f": {detail}" if detail else ""), flush=True)
    return ok


def finish():
    print(f"oracle: {counts['passed']} passed, {counts['failed']} failed")
    sys.exit(1 if counts["failed"] else 0)


def one_line(text, n=400):
    return " | ".join(text.strip().splitlines())[-n:]


def rel_err(got, ref):
    """max|got - ref| / max(1, max|ref|); inf on a shape mismatch, nan if got has a nan."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return math.inf
    return float(np.max(np.abs(got - ref))) / max(1.0, float(np.max(np.abs(ref))))


def expected_dims(name):
    if name == "logits":
        return ("position", "vocab")
    if name.endswith("attn.hook_pattern"):
        return ("head", "query_position", "key_position")
    if name.endswith(("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")):
        return ("position", "head", "d_head")
    if name.endswith(("mlp.hook_pre", "mlp.hook_post")):
        return ("position", "d_mlp")
    return ("position", "d_model")


def header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h, 8 + n


# --- the oracle on its own -------------------------------------------------

def numpy_forward(model_dir, ids):
    """GPT-2 in plain numpy loops, float64: logits only."""
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    W = {k.replace("transformer.", "", 1): np.asarray(a, np.float64)
         for k, a in oracle.read_safetensors(os.path.join(model_dir, "model.safetensors")).items()}
    H, d, eps = cfg["n_head"], cfg["n_embd"], cfg.get("layer_norm_epsilon", 1e-5)
    dh, T = d // H, len(ids)

    def ln(x, p):
        mu = x.mean(axis=1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(axis=1, keepdims=True) + eps) * W[p + ".weight"] + W[p + ".bias"]

    x = np.stack([W["wte.weight"][i] + W["wpe.weight"][t] for t, i in enumerate(ids)])
    for L in range(cfg["n_layer"]):
        p = f"h.{L}."
        qkv = ln(x, p + "ln_1") @ W[p + "attn.c_attn.weight"] + W[p + "attn.c_attn.bias"]
        z = np.zeros((T, d))
        for h in range(H):
            q, k, v = (qkv[:, j * d + h * dh:j * d + (h + 1) * dh] for j in range(3))
            for t in range(T):
                s = np.array([q[t] @ k[j] for j in range(t + 1)]) / math.sqrt(dh)
                e = np.exp(s - s.max())
                z[t, h * dh:(h + 1) * dh] = (e / e.sum()) @ v[:t + 1]
        x = x + z @ W[p + "attn.c_proj.weight"] + W[p + "attn.c_proj.bias"]
        u = ln(x, p + "ln_2") @ W[p + "mlp.c_fc.weight"] + W[p + "mlp.c_fc.bias"]
        u = 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        x = x + u @ W[p + "mlp.c_proj.weight"] + W[p + "mlp.c_proj.bias"]
    return ln(x, "ln_f") @ W.get("lm_head.weight", W["wte.weight"]).T


def check_model_file(name, mdir, dtype, prefix, buffers, untied):
    """make_model.py wrote what was asked, and the oracle decodes it exactly."""
    path = os.path.join(mdir, "model.safetensors")
    h, base = header(path)
    weights = {k: v for k, v in h.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    check(all(v["dtype"] == dtype for v in weights.values()), f"{name}: weights are {dtype}",
          str(sorted({v["dtype"] for v in weights.values()})))
    check(all(k.startswith("transformer.") for k in weights if k != "lm_head.weight") == prefix,
          f"{name}: 'transformer.' prefix {'present' if prefix else 'absent'}")
    check(any(k.endswith(".attn.bias") for k in h) == buffers and any(k.endswith(".attn.masked_bias") for k in h) == buffers,
          f"{name}: attn.bias/masked_bias buffers {'present' if buffers else 'absent'}")
    check(("lm_head.weight" in h) == untied, f"{name}: lm_head.weight {'present' if untied else 'absent (tied)'}")
    m = oracle.load(mdir)
    if untied:
        check(not torch.equal(m.w["lm_head.weight"], m.w["wte.weight"]), f"{name}: untied lm_head differs from wte")
    if dtype in ("F16", "BF16"):
        # an independent decoder: numpy's float16, torch's bfloat16
        got = oracle.read_safetensors(path)
        bad = []
        with open(path, "rb") as f:
            data = f.read()
        for k, v in weights.items():
            b = data[base + v["data_offsets"][0]:base + v["data_offsets"][1]]
            ref = (np.frombuffer(b, "<f2").astype(np.float64) if dtype == "F16"
                   else torch.frombuffer(bytearray(b), dtype=torch.bfloat16).double().numpy())
            if not np.array_equal(np.asarray(got[k], np.float64).ravel(), ref):
                bad.append(k)
        check(not bad, f"{name}: {dtype} decoding equals {'numpy float16' if dtype == 'F16' else 'torch bfloat16'}",
              f"{len(weights)} tensors" + (f", differ: {bad[:3]}" if bad else ""))
    return m


def check_oracle(name, m):
    c = m.cfg
    ids = PROMPTS[2][3]
    ref = m.run(ids)
    worst_sum = max(float((ref[f"blocks.{L}.attn.hook_pattern"].sum(-1) - 1).abs().max()) for L in range(c["n_layer"]))
    check(worst_sum < 1e-12, f"{name}: oracle pattern rows sum to 1", f"max |sum-1| {worst_sum:.1e}")
    above = torch.ones(len(ids), len(ids), dtype=torch.bool).triu(1)
    causal = all(float(ref[f"blocks.{L}.attn.hook_pattern"][:, above].abs().max()) == 0
                 and float(ref[f"blocks.{L}.attn.hook_pattern"].min()) >= 0 for L in range(c["n_layer"]))
    check(causal, f"{name}: oracle pattern is causal (0 above the diagonal, >= 0)")
    # ln_final.hook_normalized (x / scale, before weight and bias): mean 0 and variance var/(var+eps)
    resid = ref[f"blocks.{c['n_layer'] - 1}.hook_resid_post"]
    xhat = ref["ln_final.hook_normalized"]
    var = resid.var(-1, unbiased=False)
    err = max(float(xhat.mean(-1).abs().max()), float((xhat.var(-1, unbiased=False) - var / (var + c["eps"])).abs().max()))
    check(err < 1e-9, f"{name}: oracle ln_final normalized = standardize(resid_post)", f"err {err:.1e}")
    e = rel_err(ref["logits"], numpy_forward(m.dir, ids))
    check(e < 1e-10, f"{name}: oracle logits equal a numpy float64 forward", f"rel err {e:.1e}")
    # hooks: observing changes nothing; a replaced value is what the rest of the forward uses
    seen = m.run(ids, {k: (lambda t: None) for k in ref})
    check(all(torch.equal(seen[k], ref[k]) for k in ref), f"{name}: oracle observe-only hooks change nothing")
    zeroed = m.run(ids, {"blocks.0.hook_attn_out": lambda t: torch.zeros_like(t)})
    check(torch.equal(zeroed["blocks.0.hook_resid_mid"], zeroed["blocks.0.hook_resid_pre"])
          and not torch.equal(zeroed["logits"], ref["logits"]), f"{name}: oracle zero-ablated attn_out is used downstream")
    # the worksheet's loop: clean resid_pre[L][pos] into a corrupted run.  Positions
    # before pos must not move; patching every position must give the clean logits.
    clean_ids = PROMPTS[1][3]
    corrupt_ids = clean_ids[:3] + [2266] + clean_ids[4:]          # " brown" -> " red"
    clean, corrupt = m.run(clean_ids), m.run(corrupt_ids)
    ok = not torch.equal(clean["logits"], corrupt["logits"])
    for L in range(c["n_layer"]):
        key = f"blocks.{L}.hook_resid_pre"
        for pos in range(len(clean_ids)):
            def patch(t, pos=pos, key=key):
                t = t.clone()
                t[pos] = clean[key][pos]
                return t
            got = m.run(corrupt_ids, {key: patch})
            ok &= torch.equal(got[key][pos], clean[key][pos])
            ok &= torch.allclose(got["logits"][:pos], corrupt["logits"][:pos], rtol=0, atol=1e-12)
        full = m.run(corrupt_ids, {key: lambda t, key=key: clean[key]})
        ok &= torch.allclose(full["logits"], clean["logits"], rtol=0, atol=1e-12)
    check(bool(ok), f"{name}: oracle patching clean resid_pre[L][pos] into a corrupted run")
    try:
        m.run(ids, {"blocks.0.hook_nonexistent": lambda t: t})
        check(False, f"{name}: oracle refuses an unknown hook name")
    except KeyError:
        check(True, f"{name}: oracle refuses an unknown hook name")


# --- patchsweep against the oracle --------------------------------------

def run_cache(mdir, text, opts, out, hooks=None):
    cmd = [BIN, "cache", "--model", mdir, "--prompt", text, "-o", out] + opts
    if hooks:
        cmd += ["--hooks", hooks]
    env = dict(os.environ, PATCHSWEEP_TOKENIZER=TOKENIZER)
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return False, "timed out after 600 s"
    return p.returncode == 0 and os.path.exists(out), f"exit {p.returncode}: {one_line(p.stderr)}"


def compare_file(label, m, mdir, out, prompt, worst, expect_hooks=None):
    _, text, opts, want_ids = prompt
    with xr.open_dataset(out, mask_and_scale=False, decode_times=False) as ds:
        ds.load()
    for a in ATTRS:
        value = " ".join(str(ds.attrs.get(a, "(missing)")).split())
        check(bool(str(ds.attrs.get(a, "")).strip()), f"{label}: attribute {a}", value[:60] + ("..." if len(value) > 60 else ""))
    sha = hashlib.sha256(open(os.path.join(mdir, "model.safetensors"), "rb").read()).hexdigest()
    check(ds.attrs.get("model_sha256") == sha, f"{label}: model_sha256 is the safetensors file's sha256")
    if not check("token_id" in ds and ds["token_id"].dims == ("position",) and ds["token_id"].dtype == np.int32,
                 f"{label}: token_id(position) int32"):
        return
    ids = [int(i) for i in ds["token_id"].values]
    check(ids == want_ids, f"{label}: {len(ids)} tokens, ids as OpenAI's encoder", f"got {ids[:8]}{'...' if len(ids) > 8 else ''}")
    tokens = [str(t) for t in ds["token"].values] if "token" in ds else None
    bos = "--no-bos" not in opts
    check(tokens is not None and ds["token"].dims == ("position",)
          and "".join(tokens[1 if bos else 0:]) == text and (not bos or tokens[0] == "<|endoftext|>"),
          f"{label}: token(position) strings spell the prompt")
    ref = m.run(ids)
    hooks = [v for v in ds.data_vars if v not in ("token_id", "token")]
    if expect_hooks is None:
        expect_hooks = [k for k in ref if not k.endswith(OPTIONAL_HOOKS)]
        missing = [k for k in expect_hooks if k not in hooks]
        check(not missing, f"{label}: every hook written ({len(hooks)} variables)", f"missing {missing[:5]}" if missing else "")
    else:
        check(sorted(hooks) == sorted(expect_hooks), f"{label}: --hooks '{HOOK_FILTER}' selects exactly those",
              f"got {sorted(hooks)}")
    for name in hooks:
        if name not in ref:
            check(False, f"{label}: {name}", "no oracle reference for this variable")
            continue
        dims_ok = ds[name].dims == expected_dims(name)
        e = rel_err(ds[name].values, ref[name])
        ok = dims_ok and e <= TOL
        check(ok, f"{label}: {name}", f"rel err {e:.2e}" + ("" if dims_ok else f", dims {ds[name].dims} != {expected_dims(name)}"))
        if not (e <= worst[0]):
            worst[:] = [e, f"{name} @ {prompt[0]}"]


def compare_file_safely(label, *args, **kw):
    try:
        compare_file(label, *args, **kw)
    except Exception as e:  # e.g. a file xarray cannot read
        check(False, f"{label}: reading and comparing the file", repr(e))


def main():
    if not check(os.path.exists(MAKE_MODEL), "tests/tools/make_model.py exists"):
        finish()
    work = tempfile.mkdtemp(prefix="forward_oracle.", dir=os.path.join(BUILD, "tests") if os.path.isdir(os.path.join(BUILD, "tests")) else None)
    models = []
    for name, args, dtype, prefix, buffers, untied in MODELS:
        mdir = os.path.join(work, name)
        p = subprocess.run([PYTHON, MAKE_MODEL, *args, "--n-positions", "64", "-o", mdir], capture_output=True, text=True)
        if not check(p.returncode == 0, f"{name}: make_model.py {' '.join(args)}", one_line(p.stderr)):
            continue
        try:
            m = check_model_file(name, mdir, dtype, prefix, buffers, untied)
        except Exception as e:  # the oracle refused the checkpoint
            check(False, f"{name}: oracle loads the checkpoint", repr(e))
            continue
        try:
            check_oracle(name, m)
        except Exception as e:
            check(False, f"{name}: oracle self-checks", repr(e))
        models.append((name, mdir, m))

    have_cli = check(os.access(BIN, os.X_OK), f"PS_BIN {BIN} is executable")
    if have_cli:
        p = subprocess.run([BIN, "cache", "--help"], capture_output=True, text=True)
        have_cli = check(p.returncode == 0, "patchsweep cache --help", f"exit {p.returncode}")
    if have_cli:
        for name, mdir, m in models:
            worst = [-1.0, "nothing compared"]
            for prompt in PROMPTS:
                label = f"{name}/{prompt[0]}"
                out = os.path.join(work, f"{name}.{prompt[0]}.nc")
                ok, err = run_cache(mdir, prompt[1], prompt[2], out)
                if check(ok, f"{label}: patchsweep cache", "" if ok else err):
                    compare_file_safely(label, m, mdir, out, prompt, worst)
            label = f"{name}/{PROMPTS[1][0]}/--hooks"
            out = os.path.join(work, f"{name}.hooks.nc")
            ok, err = run_cache(mdir, PROMPTS[1][1], PROMPTS[1][2], out, HOOK_FILTER)
            if check(ok, f"{label}: patchsweep cache --hooks", "" if ok else err):
                sel = [f"blocks.{L}.hook_resid_post" for L in range(m.cfg["n_layer"])] + ["logits"]
                compare_file_safely(label, m, mdir, out, PROMPTS[1], worst, expect_hooks=sel)
            print(f"---- {name}: largest relative error {max(worst[0], 0):.3e} ({worst[1]})", flush=True)
    if counts["failed"] == 0:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"(files kept in {work})")
    finish()


if __name__ == "__main__":
    main()
