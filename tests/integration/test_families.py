#!/usr/bin/python3
"""Model families (issue 17, first part): random GPT-NeoX, Llama, Mistral and
Qwen2 checkpoints in HF's on-disk layout, run through `patchsweep cache --ids`
and compared hook by hook with a float64 PyTorch reference written from HF's
modeling code (tests/tools/oracle_families.py): every hook and the logits
within 1e-4 * max(1, max|ref|).  Covers GQA (6 query / 2 kv heads), head_dim
!= hidden/heads, partial rotary (rotary_pct 0.25), llama3 and linear rope
scaling, parallel and sequential NeoX, biases on and off, tied and untied,
sharded BF16 and F16.  Plus `run --ids`, `info`, and the refusals that are
not config rows (text prompts on a model without its tokenizer.json, bad
ids).  Patching, lens and sweeps of the families: test_families_patch.py.

Environment: PS_BIN, PS_ROOT (see run_integration.sh)."""
import os
import subprocess
import sys
import tempfile

import numpy as np
import xarray as xr

ROOT = os.environ.get("PS_ROOT") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("PS_BIN") or os.path.join(ROOT, "build/rel/patchsweep")
sys.path.insert(0, os.path.join(ROOT, "tests/tools"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle_families as of  # noqa: E402
from checks import check, finish  # noqa: E402

IDS = [3, 17, 0, 42, 96, 5, 17, 8, 61]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
CASES = [
    # name, family, writer options
    ("llama_gqa_untied", "llama", dict(H=6, kv=2)),
    ("llama_bias_tied_llama3", "llama", dict(H=6, kv=6, attention_bias=True, mlp_bias=True, tied=True,
                                             rope_scaling=LLAMA3)),
    ("mistral_headdim_linear", "llama", dict(H=4, kv=2, head_dim=16, mistral=True,
                                             rope_scaling={"type": "linear", "factor": 2.0})),
    ("qwen2_gqa_tied_bf16_sharded", "qwen2", dict(H=6, kv=2, tied=True, dtype="bf16", shards=3)),
    ("neox_parallel", "neox", dict(H=4, d=64, parallel=True)),
    ("neox_sequential_f16_sharded", "neox", dict(H=4, d=64, parallel=False, rotary_pct=0.5, dtype="f16", shards=2)),
]


def run(args):
    return subprocess.run([BIN, *args], capture_output=True, text=True)


worst = {}
with tempfile.TemporaryDirectory() as tmp:
    for name, fam, opts in CASES:
        mdir = os.path.join(tmp, name)
        of.write_model(mdir, fam, seed=len(name), **opts)
        ref = of.Family(mdir).run(IDS)
        out = os.path.join(tmp, name + ".nc")
        r = run(["cache", "--model", mdir, "--ids", ",".join(map(str, IDS)), "-o", out])
        if not check(f"{name}: cache --ids", r.returncode == 0, r.stderr):
            continue
        with xr.open_dataset(out) as ds:
            got = {k: ds[k].values for k in ds.data_vars if k not in ("token_id", "token")}
            check(f"{name}: token ids", list(ds["token_id"].values) == IDS)
        missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
        check(f"{name}: the family's hooks, no more, no fewer", not missing and not extra,
              f"missing {missing[:5]} extra {extra[:5]}")
        errs = {}
        for k in sorted(set(ref) & set(got)):
            rv = ref[k].numpy()
            if rv.shape != got[k].shape:
                errs[k] = float("inf")
                continue
            errs[k] = float(np.abs(got[k] - rv).max() / max(1.0, float(np.abs(rv).max())))
        bad = {k: e for k, e in errs.items() if not e < 1e-4}
        w = max(errs.values()) if errs else float("inf")
        worst[name] = w
        check(f"{name}: {len(errs)} hooks and logits within 1e-4 relative (worst {w:.1e})", not bad,
              str(sorted(bad.items())[:5]))
        r = run(["run", "--model", mdir, "--ids", ",".join(map(str, IDS)), "--top-k", "3", "--json"])
        top = int(np.argmax(ref["logits"][-1].numpy()))
        check(f"{name}: run --ids predicts the reference's top token", r.returncode == 0 and
              f'"id": {top},' in r.stdout.replace("\n", " ").split('"top"')[1][:80], r.stdout + r.stderr)

    m = os.path.join(tmp, "llama_gqa_untied")
    r = run(["info", "--model", m, "--json"])
    check("info: family, GQA, rotary, norm", r.returncode == 0 and '"family": "llama"' in r.stdout and
          '"n_kv_head": 2' in r.stdout and '"norm": "rmsnorm"' in r.stdout, r.stdout + r.stderr)
    r = run(["info", "--model", os.path.join(tmp, "neox_parallel")])
    check("info (text): parallel residual, rotary dims", r.returncode == 0 and "parallel" in r.stdout and
          "rotary on 4 of 16 dims" in r.stdout, r.stdout + r.stderr)
    # refusals beyond config.json (one line each, exit 1)
    for label, args, want in [
        ("text prompt on a family without its tokenizer.json", ["run", "--model", m, "--prompt", "hi"],
         "needs its tokenizer.json"),
        ("id at the vocabulary size", ["run", "--model", m, "--ids", "1,97"], "not below the vocabulary size 97"),
        ("malformed --ids", ["cache", "--model", m, "--ids", "1,x", "-o", os.path.join(tmp, "x.nc")], "--ids takes"),
        ("lens", ["lens", "--model", m, "--prompt", "hi"], "needs its tokenizer.json"),
        ("GPT-2's tokenizer given to a Llama model", ["run", "--model", m, "--prompt", "hi", "--tokenizer",
                                                     os.environ["PS_TOKENIZER"]],
         "needs its tokenizer.json"),
    ]:
        r = run(args)
        lines = r.stderr.strip().splitlines()
        check(f"refused: {label}", r.returncode in (1, 2) and len(lines) == 1 and want in r.stderr, r.stderr)

print("max relative error per model: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
finish("test_families")
