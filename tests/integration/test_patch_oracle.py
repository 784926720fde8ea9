"""Activation patching, end to end through `patchsweep patch`:
  1. the naive engine equals the float64 PyTorch oracle's own patching loop
     (the worksheet's: one full forward per cell with a hook that overwrites
     the activation) for every component, both directions;
  2. the fast engine equals the naive engine for every component, metric and
     direction on three random models (F32, BF16 with prefix, F16 untied);
  3. the NetCDF file of `patch -o` follows the results contract and holds
     the same values as --json.
Tolerances: 1e-4 * max(1, |ref|) in metric units; probabilities 1e-5 relative."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import xarray as xr

from checks import check, finish

ROOT = os.environ["PS_ROOT"]
BIN = os.environ["PS_BIN"]
sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
import oracle  # noqa: E402

TMP = tempfile.mkdtemp(prefix="ps-patch-")
CLEAN = "After John and Mary went to the store, Mary gave a bottle of milk to"
CORRUPTED = "After John and Mary went to the store, John gave a bottle of milk to"
ANSWER, WRONG = " John", " Mary"
ALL = "resid_pre,resid_mid,attn_out,mlp_out,z,head_all_pos_every"
# PS_QUICK (set for the sanitizer build, where the engines run ~10x slower):
# one model and two metrics; the release build runs everything.
QUICK = os.environ.get("PS_QUICK") == "1"
MODELS = {
    "f32": ["--layers", "2", "--heads", "4", "--d-model", "32", "--std", "0.3"],
    "bf16": ["--layers", "3", "--heads", "3", "--d-model", "48", "--dtype", "bf16", "--prefix",
             "--mask-buffers", "--std", "0.3"],
    "f16": ["--layers", "1", "--heads", "2", "--d-model", "16", "--dtype", "f16", "--untied", "--std", "0.3"],
}


def patch_json(model_dir, *args):
    r = subprocess.run([BIN, "patch", "--model", model_dir, "--clean", CLEAN, "--corrupted", CORRUPTED,
                        "--answer", ANSWER, "--wrong", WRONG, "--json", *args],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"patchsweep patch {' '.join(args)} failed: {r.stderr}")
    return json.loads(r.stdout)


def grid(comp):
    return np.array(comp["values"], dtype=np.float64).reshape(comp["shape"])


# Which oracle hook a component overwrites, and how (the slice of one cell).
HOOK = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "attn_out": "hook_attn_out",
        "mlp_out": "hook_mlp_out", "z": "attn.hook_z", "z_all_pos": "attn.hook_z", "q_all_pos": "attn.hook_q",
        "k_all_pos": "attn.hook_k", "v_all_pos": "attn.hook_v", "pattern_all_pos": "attn.hook_pattern"}


def oracle_grid(m, comp, base, source, a, w, shape):
    """The worksheet's loop in float64: a full forward of the base prompt per
    cell, the cell's activation overwritten with the source run's."""
    out = np.zeros(shape)
    for idx in np.ndindex(*shape):
        layer = idx[0]
        name = f"blocks.{layer}.{HOOK[comp]}"
        src = source[name]

        def hook(x, idx=idx):
            x = x.clone()
            if comp == "z":
                x[idx[1], idx[2]] = src[idx[1], idx[2]]
            elif comp == "pattern_all_pos":
                x[idx[1]] = src[idx[1]]
            elif comp.endswith("_all_pos"):
                x[:, idx[1]] = src[:, idx[1]]
            else:
                x[idx[1]] = src[idx[1]]
            return x
        logits = m.run(base_ids, {name: hook})["logits"][-1]
        out[idx] = float(logits[a] - logits[w])
    return out


for label, args in (list(MODELS.items())[:1] if QUICK else MODELS.items()):
    d = os.path.join(TMP, label)
    subprocess.run([sys.executable, os.path.join(ROOT, "tests/tools/make_model.py"), *args,
                    "--n-positions", "32", "--seed", "7", "-o", d], check=True)
    # 1. naive == oracle (logit difference, both directions, every component)
    m = oracle.load(d)
    for direction in ("denoise", "noise"):
        res = patch_json(d, "--engine", "naive", "--components", ALL, "--direction", direction)
        ids = subprocess.run([BIN, "tokenize", "--model", d, "--json", CLEAN], capture_output=True, text=True,
                             check=True)
        clean_ids = json.loads(ids.stdout)["ids"]
        ids = subprocess.run([BIN, "tokenize", "--model", d, "--json", CORRUPTED], capture_output=True, text=True,
                             check=True)
        corrupted_ids = json.loads(ids.stdout)["ids"]
        a, w = res["answer_id"], res["wrong_id"]
        clean_cache = m.run(clean_ids)
        corrupted_cache = m.run(corrupted_ids)
        if direction == "denoise":
            base_ids, source = corrupted_ids, clean_cache
        else:
            base_ids, source = clean_ids, corrupted_cache
        ref_clean = float(clean_cache["logits"][-1][a] - clean_cache["logits"][-1][w])
        check(f"{label} {direction} clean metric", abs(res["clean_metric"] - ref_clean) <= 1e-4 * max(1, abs(ref_clean)),
              f"{res['clean_metric']} vs {ref_clean}")
        for comp, data in res["components"].items():
            c = grid(data)
            ref = oracle_grid(m, comp, base_ids, source, a, w, c.shape)
            err = np.abs(c - ref) / np.maximum(1.0, np.abs(ref))
            check(f"{label} {direction} naive == oracle: {comp} {list(c.shape)}", err.max() <= 1e-4,
                  f"max rel err {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}")
    # 2. fast == naive, every metric and direction
    for metric in (("logit_diff", "kl") if QUICK else ("logit_diff", "prob", "logprob", "kl")):
        for direction in ("denoise", "noise"):
            naive = patch_json(d, "--engine", "naive", "--components", ALL, "--metric", metric, "--direction", direction)
            fast = patch_json(d, "--engine", "fast", "--components", ALL, "--metric", metric, "--direction", direction)
            worst = 0.0
            for comp in naive["components"]:
                n, f = grid(naive["components"][comp]), grid(fast["components"][comp])
                if metric == "prob":
                    err = np.abs(f - n) / np.maximum(np.abs(n), 1e-3) / 1e-5
                else:
                    err = np.abs(f - n) / np.maximum(1.0, np.abs(n)) / 1e-4
                worst = max(worst, float(err.max()))
            check(f"{label} fast == naive: {metric} {direction} (worst {worst:.3f} of tolerance)", worst <= 1.0)

# 3. the NetCDF results file
d = os.path.join(TMP, "f32")
out = os.path.join(TMP, "patch.nc")
res = patch_json(d, "--components", "block_every,z,z_all_pos", "-o", out)
ds = xr.open_dataset(out)
T = len(res["corrupted_tokens"])
check("nc dims", dict(ds.sizes) == {"prompt": 1, "layer": 2, "position": T, "head": 4}, str(dict(ds.sizes)))
check("nc dims of components", ds["resid_pre"].dims == ("prompt", "layer", "position")
      and ds["z"].dims == ("prompt", "layer", "position", "head") and ds["z_all_pos"].dims == ("prompt", "layer", "head"))
for comp in ("resid_pre", "attn_out", "mlp_out", "z", "z_all_pos"):
    v = ds[comp].values[0]
    check(f"nc {comp} == json", np.allclose(v, grid(res["components"][comp]), rtol=1e-6, atol=1e-6))
    nrm = ds[comp + "_normalized"].values[0]
    ref = (v - ds["corrupted_metric"].values[0]) / (ds["clean_metric"].values[0] - ds["corrupted_metric"].values[0])
    check(f"nc {comp}_normalized", np.allclose(nrm, ref, rtol=1e-5, atol=1e-5))
check("nc per-prompt variables", int(ds["done"].values[0]) == 1 and int(ds["length"].values[0]) == T
      and ds["answer"].values[0] == ANSWER and ds["wrong"].values[0] == WRONG
      and list(ds["corrupted_token"].values[0]) == res["corrupted_tokens"])
check("nc provenance", all(k in ds.attrs for k in ("patchsweep_version", "command_line", "model_sha256",
                                                   "model_config", "metric", "direction", "engine", "Conventions"))
      and ds.attrs["metric"] == "logit_diff" and ds.attrs["direction"] == "denoise")
ds.close()

# 4. `bench`: the numbers `make bench` reports, on a small model (their
#    values are timings; what is checked is how they fit together)
d = os.path.join(TMP, "f32")
r = subprocess.run([BIN, "bench", "--model", d, "--components", "resid_pre,z_all_pos", "--reps", "3", "--json",
                    "--save", os.path.join(TMP, "bench.json")], capture_output=True, text=True, timeout=600)
b = json.loads(r.stdout) if r.returncode == 0 else {}
rows = {c["component"]: c for c in b.get("components", [])}
check("bench: both components, naive and fast timed, saved with provenance", r.returncode == 0
      and set(rows) == {"resid_pre", "z_all_pos"} and all(c["naive_seconds"] > 0 and c["fast_seconds"] > 0
                                                            for c in rows.values())
      and json.load(open(os.path.join(TMP, "bench.json")))["model_sha256"] == b["model_sha256"], r.stderr)
if rows:
    T = b["tokens"]
    check("bench: cells = layers x positions (resid_pre), layers x heads (z_all_pos)",
          rows["resid_pre"]["cells"] == 2 * T and rows["z_all_pos"]["cells"] == 2 * 4, rows)
    check("bench: ratio, GFLOP/s and % of the sgemm rate sampled beside the fast runs agree",
          all(abs(c["ratio"] - c["naive_seconds"] / c["fast_seconds"]) < 1e-9 * c["ratio"]
              and abs(c["useful_gflops"] - c["useful_gflop"] / c["fast_seconds"]) < 1e-6 * c["useful_gflops"]
              and abs(c["percent_of_peak"] - 100 * c["useful_gflops"] / c["sgemm_peak_gflops"]) < 1e-6
              * c["percent_of_peak"] and c["useful_gflop"] > 0 for c in rows.values())
          and b["blas"]["sgemm_peak_gflops"] > 0, rows)

finish("patch")
