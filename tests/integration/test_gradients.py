#!/usr/bin/python3
"""Gradients in C (issue 20, item 1): `patchsweep cache --grad METRIC` writes
the gradient of the metric at the last position with respect to every hook
of the run; each equals torch autograd in float64
(oracle_families.gradients) on random models of every family: GPT-2 (F32
and F16 untied), GPT-NeoX (parallel and sequential residual, partial
rotary), Llama (GQA; biases, tied head, llama3 rope scaling), Mistral
(head_dim), Qwen2 (GQA, BF16, q/k/v biases), for logit_diff, prob, logprob
and kl.

Error of a hook: max |C - reference| / max |reference| over the hook's
array (zero-gradient hooks: max |C| <= 1e-7); every hook of every case
within 1e-4.  Environment: PS_BIN, PS_ROOT (see run_integration.sh)."""
import os
import subprocess
import sys
import tempfile

import numpy as np
import xarray as xr

ROOT = os.environ.get("PS_ROOT") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("PS_BIN") or os.path.join(ROOT, "build/rel/patchsweep")
QUICK = os.environ.get("PS_QUICK") == "1"
sys.path.insert(0, os.path.join(ROOT, "tests/tools"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle  # noqa: E402
import oracle_families as of  # noqa: E402
from checks import check, finish  # noqa: E402

CLEAN = [3, 17, 0, 42, 96, 5, 11]
CORRUPTED = [3, 17, 9, 42, 96, 5, 11]
ANSWER, WRONG = 7, 8
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
CASES = [
    ("gpt2_f32", "gpt2", ["--layers", "2", "--heads", "4", "--d-model", "32", "--vocab", "97", "--std", "0.3"]),
    ("gpt2_f16_untied", "gpt2", ["--layers", "3", "--heads", "2", "--d-model", "16", "--vocab", "97", "--dtype",
                                 "f16", "--untied", "--std", "0.3"]),
    ("llama_gqa", "llama", dict(H=6, kv=2, L=2)),
    ("llama_bias_tied_llama3", "llama", dict(H=4, kv=4, attention_bias=True, mlp_bias=True, tied=True,
                                             rope_scaling=LLAMA3)),
    ("mistral_headdim", "llama", dict(H=4, kv=2, head_dim=16, mistral=True)),
    ("qwen2_gqa_bf16", "qwen2", dict(H=6, kv=2, tied=True, dtype="bf16")),
    ("neox_parallel", "neox", dict(H=4, d=64, parallel=True)),
    ("neox_sequential", "neox", dict(H=4, d=64, parallel=False, rotary_pct=0.5)),
]
METRICS = ["logit_diff", "kl"] if QUICK else ["logit_diff", "prob", "logprob", "kl"]
ids = lambda v: ",".join(map(str, v))  # noqa: E731


def c_grads(mdir, metric, out):
    r = subprocess.run([BIN, "cache", "--model", mdir, "--ids", ids(CORRUPTED), "--grad", metric, "--answer-id",
                        str(ANSWER), "--wrong-id", str(WRONG), "--clean-ids", ids(CLEAN), "-o", out],
                       capture_output=True, text=True)
    return r


worst = {}
with tempfile.TemporaryDirectory() as tmp:
    for name, fam, opts in CASES:
        mdir = os.path.join(tmp, name)
        if fam == "gpt2":
            subprocess.run([sys.executable, os.path.join(ROOT, "tests/tools/make_model.py"), *opts, "--n-positions",
                            "32", "--seed", "5", "-o", mdir], check=True)
            ref = oracle.load(mdir)
        else:
            of.write_model(mdir, fam, seed=len(name) + 3, **opts)
            ref = of.Family(mdir)
        for metric in METRICS:
            out = os.path.join(tmp, f"{name}-{metric}.nc")
            r = c_grads(mdir, metric, out)
            if not check(f"{name} {metric}: cache --grad", r.returncode == 0, r.stderr):
                continue
            want = of.gradients(ref, CORRUPTED, ANSWER, WRONG, metric, CLEAN)
            errs, bad = {}, []
            with xr.open_dataset(out) as ds:
                for hook in ds.data_vars:
                    if hook not in want:
                        continue
                    got = ds[hook].values.astype(np.float64)
                    w = want[hook]
                    if got.shape != w.shape:
                        bad.append(f"{hook}: shape {got.shape} != {w.shape}")
                        continue
                    top = float(np.abs(w).max())
                    e = float(np.abs(got - w).max()) / top if top > 0 else float(np.abs(got).max()) * 1e-3 / 1e-7
                    errs[hook] = e
            # every hook the C model has (GPT-2: no ln1/ln2 hooks, hooks.h); scales are not written
            missing = [h for h in want if h not in errs and not h.endswith("hook_scale")
                       and not (fam == "gpt2" and (".ln1." in h or ".ln2." in h))]
            e_max = max(errs.values()) if errs else np.inf
            arg = max(errs, key=errs.get) if errs else "-"
            worst[name] = max(worst.get(name, 0.0), e_max)
            check(f"{name} {metric}: {len(errs)} hooks' gradients = autograd (max rel {e_max:.1e} at {arg})",
                  e_max < 1e-4 and not bad and not missing, f"bad {bad} missing {missing} "
                  f"worst {sorted(errs.items(), key=lambda kv: -kv[1])[:4]}")

finish("gradients", "; max rel error per model: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
