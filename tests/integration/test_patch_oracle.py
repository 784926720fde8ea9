"""Activation patching, end to end through `patchsweep patch`:
  1. the naive engine equals the float64 PyTorch oracle's own patching loop
     (the worksheet's: one full forward per cell with a hook that overwrites
     the activation) for every component, both directions (the by-position
     head grids q, k, v, pattern on the first model; pattern_dest_src, L x T
     x T x H cells, on it for a 9-token pair, denoising);
  2. the fast engine equals the naive engine for every component, metric and
     direction on three random models (F32, BF16 with prefix, F16 untied)
     (q, k, v, pattern with logit_diff and kl, pattern_dest_src with
     logit_diff denoising);
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
BY_POS = "q,k,v,pattern"  # with z: the group head_by_pos_every
DEST_SRC = "pattern_dest_src"
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
        "k_all_pos": "attn.hook_k", "v_all_pos": "attn.hook_v", "pattern_all_pos": "attn.hook_pattern",
        "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v", "pattern": "attn.hook_pattern",
        "pattern_dest_src": "attn.hook_pattern"}


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
            if comp in ("z", "q", "k", "v"):  # (layer, position, head): [T, H, dh]
                x[idx[1], idx[2]] = src[idx[1], idx[2]]
            elif comp == "pattern":  # (layer, dest, head): TransformerLens' [H, Tq, Tk] row
                x[idx[2], idx[1]] = src[idx[2], idx[1]]
            elif comp == "pattern_dest_src":  # (layer, dest, src, head): one entry, no renormalisation
                x[idx[3], idx[1], idx[2]] = src[idx[3], idx[1], idx[2]]
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
        # the oracle's loop costs ~6 ms a cell: the by-position head grids
        # on the first model, denoising (test_families_patch has both directions)
        by_pos = label == "f32" and direction == "denoise"
        res = patch_json(d, "--engine", "naive", "--components", ALL + ("," + BY_POS if by_pos else ""),
                         "--direction", direction)
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
            # the new head grids with the metric code paths that differ: logit_diff (no
            # vocabulary) and kl (the full distribution); dest x src in one of them
            comps = ALL + ("," + BY_POS if metric in ("logit_diff", "kl") else "") + \
                ("," + DEST_SRC if (metric, direction) == ("logit_diff", "denoise") else "")
            naive = patch_json(d, "--engine", "naive", "--components", comps, "--metric", metric, "--direction", direction)
            fast = patch_json(d, "--engine", "fast", "--components", comps, "--metric", metric, "--direction", direction)
            worst = 0.0
            for comp in naive["components"]:
                n, f = grid(naive["components"][comp]), grid(fast["components"][comp])
                if metric == "prob":
                    err = np.abs(f - n) / np.maximum(np.abs(n), 1e-3) / 1e-5
                else:
                    err = np.abs(f - n) / np.maximum(1.0, np.abs(n)) / 1e-4
                worst = max(worst, float(err.max()))
            check(f"{label} fast == naive: {metric} {direction} (worst {worst:.3f} of tolerance)", worst <= 1.0)

# 1b. pattern_dest_src against the oracle on a 9-token pair (the last 9
#     tokens of the prompts; they differ at position 2): cells with src <=
#     dest run the oracle's loop; above the diagonal both patterns are 0, the
#     patch writes 0 over 0 and the value must be the corrupted metric itself.
d = os.path.join(TMP, "f32")
m = oracle.load(d)
ids = lambda t: json.loads(subprocess.run([BIN, "tokenize", "--model", d, "--json", t], capture_output=True,  # noqa: E731
                                          text=True, check=True).stdout)["ids"]
short_clean, short_corrupted = ids(CLEAN)[-9:], ids(CORRUPTED)[-9:]
r = subprocess.run([BIN, "patch", "--model", d, "--clean-ids", ",".join(map(str, short_clean)), "--corrupted-ids",
                    ",".join(map(str, short_corrupted)), "--answer-id", str(res["answer_id"]), "--wrong-id",
                    str(res["wrong_id"]), "--engine", "naive", "--components", DEST_SRC, "--json"],
                   capture_output=True, text=True)
if check("pattern_dest_src of a 9-token pair (ids)", r.returncode == 0, r.stderr):
    j = json.loads(r.stdout)
    got = grid(j["components"][DEST_SRC])
    a, w = j["answer_id"], j["wrong_id"]
    source = m.run(short_clean)
    base_ids = short_corrupted
    ref = np.full(got.shape, j["corrupted_metric"])
    for l, p, s, h in np.ndindex(*got.shape):
        if s > p:
            continue
        name = f"blocks.{l}.attn.hook_pattern"

        def hook(x, h=h, p=p, s=s, src=source[name]):
            x = x.clone()
            x[h, p, s] = src[h, p, s]
            return x
        logits = m.run(base_ids, {name: hook})["logits"][-1]
        ref[l, p, s, h] = float(logits[a] - logits[w])
    err = np.abs(got - ref) / np.maximum(1.0, np.abs(ref))
    check(f"naive == oracle: pattern_dest_src {list(got.shape)} (TransformerLens' [layer, head, dest, src] "
          "transposed), the entry overwritten without renormalising", err.max() <= 1e-4,
          f"max rel err {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}")
    upper = np.triu(np.ones(got.shape[1:3], bool), 1)
    check("pattern_dest_src above the diagonal = the corrupted metric exactly",
          all((got[l][upper] == j["corrupted_metric"]).all() for l in range(got.shape[0])))

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

# 3b. the new grids in the file: dimensions (src_position beside position),
#     the same values as --json; plot draws the (layer, position, head) ones and
#     leaves pattern_dest_src out with a note; attribution patching estimates
#     them with the exact grids' shapes (its values: test_atp.py)
out = os.path.join(TMP, "patch_grids.nc")
res = patch_json(d, "--components", "q,pattern,pattern_dest_src", "-o", out)
with xr.open_dataset(out) as ds:
    check("nc: q, pattern (prompt, layer, position, head); pattern_dest_src (prompt, layer, position, "
          "src_position, head), coordinate src_position",
          ds["q"].dims == ("prompt", "layer", "position", "head") and ds["pattern"].dims == ds["q"].dims
          and ds["pattern_dest_src"].dims == ("prompt", "layer", "position", "src_position", "head")
          and list(ds["src_position"].values) == list(range(T)), {k: ds[k].dims for k in ("q", "pattern_dest_src")})
    check("nc: pattern_dest_src == json", np.allclose(ds["pattern_dest_src"].values[0],
                                                      grid(res["components"]["pattern_dest_src"]), rtol=1e-6, atol=1e-6))
r = subprocess.run([BIN, "plot", out, "-o", os.path.join(TMP, "grids.svg"), "--var", "all"], capture_output=True,
                   text=True)
svg = open(os.path.join(TMP, "grids.svg")).read() if r.returncode == 0 else ""
check("plot --var all: q and pattern drawn per head, pattern_dest_src left out with a note",
      r.returncode == 0 and "pattern_normalized head 3" in svg and "q_normalized head 0" in svg
      and "pattern_dest_src_normalized(prompt, layer, position, src_position, head): not drawn" in r.stderr, r.stderr)
est = patch_json(d, "--components", "q,pattern,pattern_dest_src", "--method", "atp")
check("patch --method atp: q, pattern, pattern_dest_src with the exact grids' shapes",
      all(est["components"][c]["shape"] == res["components"][c]["shape"] for c in ("q", "pattern", "pattern_dest_src")),
      {c: (est["components"][c]["shape"], res["components"][c]["shape"]) for c in ("q", "pattern", "pattern_dest_src")})

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
