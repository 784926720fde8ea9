"""Ablations as patch sources (patch --source zero|mean|resample, patchspec.h, ablate.h):
  1. zero and mean ablations of the clean run equal the float64 PyTorch
     oracle's loop (a full forward per cell, the activation overwritten with 0
     or with the mean by position over the dataset's clean prompts, prompts of
     several lengths), on a small random model;
  2. the fast engine equals the naive one for every component, for zero, mean
     and resample, ablating the clean run (noise) and the corrupted one
     (denoise), and on a rotary (Llama-family) model for the key/query heads;
  3. resample: the donor is recorded (JSON, resample_from in the file), has
     the same token length and other tokens, the values are the oracle's with
     the donor's activations, and the same seed gives the same donor;
  4. --mean-over A:B and FIELD=VALUE average the subset (mean_prompts);
  5. bad input: one line, non-zero exit, no crash.
Tolerance: 1e-4 * max(1, |ref|) in logit-difference units."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import xarray as xr

from checks import check, finish

ROOT = os.environ["PS_ROOT"]
BIN = os.environ["PS_BIN"]
sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
import oracle  # noqa: E402

QUICK = os.environ.get("PS_QUICK") == "1"
TMP = tempfile.mkdtemp(prefix="ps-ablate-")
CLEAN = "After John and Mary went to the store, Mary gave a bottle of milk to"
CORRUPTED = "After John and Mary went to the store, John gave a bottle of milk to"
ANSWER, WRONG = " John", " Mary"
PAIR = ["--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", ANSWER, "--wrong", WRONG]
ALL = "resid_pre,resid_mid,attn_out,mlp_out,z,head_all_pos_every"

d = os.path.join(TMP, "f32")
subprocess.run([sys.executable, os.path.join(ROOT, "tests/tools/make_model.py"), "--layers", "2", "--heads", "4",
                "--d-model", "32", "--std", "0.3", "--n-positions", "32", "--seed", "7", "-o", d], check=True)

# The dataset: generated IOI pairs of several lengths, three pairs of the
# worksheet pair's length with other names, and the worksheet pair itself
# (never its own donor: its tokens are the base run's).
DATA = os.path.join(TMP, "ablate.jsonl")
gen = subprocess.run([BIN, "make-dataset", "ioi", "--n", "6", "--seed", "3"], capture_output=True, text=True,
                     check=True).stdout.splitlines()
extra = []
for a, b in (("Paul", "Anna"), ("Kyle", "Amy"), ("Justin", "Angela")):
    extra.append({"clean": f"After {a} and {b} went to the store, {b} gave a bottle of milk to",
                  "corrupted": f"After {a} and {b} went to the store, {a} gave a bottle of milk to",
                  "answer": f" {a}", "wrong": f" {b}", "template": 99})
extra.append({"clean": CLEAN, "corrupted": CORRUPTED, "answer": ANSWER, "wrong": WRONG, "template": 99})
with open(DATA, "w") as f:
    for line in gen:
        f.write(line + "\n")
    for e in extra:
        f.write(json.dumps(e) + "\n")
items = [json.loads(x) for x in open(DATA)]


def ids_of(model_dir, text):
    r = subprocess.run([BIN, "tokenize", "--model", model_dir, "--json", text], capture_output=True, text=True,
                       check=True)
    return json.loads(r.stdout)["ids"]


def run(model_dir, *args, pair=PAIR):
    return subprocess.run([BIN, "patch", "--model", model_dir, *pair, *args], capture_output=True, text=True,
                          timeout=600)


def patch_json(model_dir, *args, pair=PAIR):
    r = run(model_dir, "--json", *args, pair=pair)
    if r.returncode != 0:
        raise RuntimeError(f"patchsweep patch {' '.join(args)} failed: {r.stderr}")
    return json.loads(r.stdout)


def grid(comp):
    return np.array(comp["values"], dtype=np.float64).reshape(comp["shape"])


HOOK = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "attn_out": "hook_attn_out",
        "mlp_out": "hook_mlp_out", "z": "attn.hook_z", "z_all_pos": "attn.hook_z", "q_all_pos": "attn.hook_q",
        "k_all_pos": "attn.hook_k", "v_all_pos": "attn.hook_v", "pattern_all_pos": "attn.hook_pattern"}


def oracle_grid(m, comp, base_ids, source, a, w, shape):
    """The worksheet's loop in float64 with source[name] as the replacement."""
    out = np.zeros(shape)
    for idx in np.ndindex(*shape):
        name = f"blocks.{idx[0]}.{HOOK[comp]}"
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


def mean_source(m, prompts, T):
    """The mean by position over prompts (token id lists) longer than t, as
    ablate.h defines it; pattern rows i over those with a row i."""
    caches = [m.run(p) for p in prompts]
    src = {}
    for name in caches[0]:
        if not name.startswith("blocks."):
            continue
        if name.endswith("hook_pattern"):
            acc = torch.zeros((caches[0][name].shape[0], T, T), dtype=torch.float64)
            for c in caches:
                n = min(T, c[name].shape[1])
                acc[:, :n, :n] += c[name][:, :n, :n]
            cnt = torch.tensor([sum(1 for c in caches if c[name].shape[1] > i) for i in range(T)], dtype=torch.float64)
            src[name] = acc / cnt[None, :, None]
        else:
            shape = (T,) + tuple(caches[0][name].shape[1:])
            acc = torch.zeros(shape, dtype=torch.float64)
            for c in caches:
                n = min(T, c[name].shape[0])
                acc[:n] += c[name][:n]
            cnt = torch.tensor([sum(1 for c in caches if c[name].shape[0] > t) for t in range(T)], dtype=torch.float64)
            src[name] = acc / cnt.reshape((T,) + (1,) * (len(shape) - 1))
    return src


def close(res, ref):
    err = np.abs(res - ref) / np.maximum(1.0, np.abs(ref))
    return err.max(), np.unravel_index(err.argmax(), err.shape)


m = oracle.load(d)
clean_ids, corrupted_ids = ids_of(d, CLEAN), ids_of(d, CORRUPTED)
T = len(clean_ids)
clean_prompts = [ids_of(d, it["clean"]) for it in items]
lengths = sorted({len(p) for p in clean_prompts})
lengths_at = [k for k, p in enumerate(clean_prompts) if len(p) < T]  # pairs shorter than the worksheet pair
check("the dataset mixes lengths, some shorter and some longer than the pair",
      lengths[0] < T < lengths[-1] or (lengths[0] < T and lengths[-1] >= T), str(lengths))

# 1. oracle: zero and mean ablations of the clean run (the naive engine is the reference loop)
ORACLE_COMPS = "resid_pre,attn_out,z_all_pos,v_all_pos,pattern_all_pos" if QUICK else "resid_pre,attn_out,mlp_out,head_all_pos_every"
for src in ("zero", "mean"):
    res = patch_json(d, "--engine", "naive", "--components", ORACLE_COMPS, "--source", src,
                     *(["--ablate-dataset", DATA] if src == "mean" else []))
    a, w = res["answer_id"], res["wrong_id"]
    if src == "zero":
        source = {k: torch.zeros_like(v) for k, v in m.run(clean_ids).items()}
    else:
        source = mean_source(m, clean_prompts, T)
        check("mean: mean_prompts = the dataset's pairs", res.get("mean_prompts") == len(items), str(res.get("mean_prompts")))
    check(f"{src}: the JSON names the source; direction noise (the clean run ablated)",
          res.get("source") == src and res["direction"] == "noise", str({k: res.get(k) for k in ("source", "direction")}))
    for comp, data in res["components"].items():
        c = grid(data)
        e, at = close(c, oracle_grid(m, comp, clean_ids, source, a, w, c.shape))
        check(f"{src} ablation == oracle: {comp} {list(c.shape)}", e <= 1e-4, f"max rel err {e:.3g} at {at}")

# 2. fast == naive, every component, both runs ablated
for src in ("zero", "mean", "resample"):
    # the corrupted run ablated (denoise) once, with the mean
    for direction in ("noise", "denoise") if src == "mean" and not QUICK else ("noise",):
        extra_args = ["--source", src, "--direction", direction] + (["--ablate-dataset", DATA] if src != "zero" else [])
        naive = patch_json(d, "--engine", "naive", "--components", ALL, *extra_args)
        fast = patch_json(d, "--engine", "fast", "--components", ALL, *extra_args)
        worst = max(float(close(grid(fast["components"][c]), grid(naive["components"][c]))[0])
                    for c in naive["components"])
        check(f"fast == naive: {src}, {direction} (worst {worst:.2g})", worst <= 1e-4)

# rotary: rot_k of a replaced k (the fast engine reads it, the naive one rotates the hooked k)
if not QUICK:
    import oracle_families as of  # noqa: E402
    dl = os.path.join(TMP, "llama")
    of.write_model(dl, "llama", seed=5, L=2, H=4, kv=2, d=32, m=64, V=97, npos=32)
    rng = np.random.default_rng(1)
    lclean = [int(x) for x in rng.integers(1, 97, 9)]
    lcorrupted = list(lclean)
    lcorrupted[4] = (lcorrupted[4] + 1) % 97
    lpair = ["--clean-ids", ",".join(map(str, lclean)), "--corrupted-ids", ",".join(map(str, lcorrupted)),
             "--answer-id", "7", "--wrong-id", "8"]
    ldata = os.path.join(TMP, "ids.jsonl")
    with open(ldata, "w") as f:
        for n in (7, 9, 9, 11, 12):
            p = [int(x) for x in rng.integers(1, 97, n)]
            f.write(json.dumps({"clean_ids": p, "corrupted_ids": p, "answer_id": 7, "wrong_id": 8}) + "\n")
    for src in ("zero", "mean", "resample"):
        args = ["--components", "resid_pre,z,q_all_pos,k_all_pos,v_all_pos,pattern_all_pos", "--source", src]
        args += ["--ablate-dataset", ldata] if src != "zero" else []
        rn = run(dl, "--json", "--engine", "naive", *args, pair=lpair)
        rf = run(dl, "--json", "--engine", "fast", *args, pair=lpair)
        ok = rn.returncode == 0 and rf.returncode == 0
        worst = max(float(close(grid(json.loads(rf.stdout)["components"][c]),
                                grid(json.loads(rn.stdout)["components"][c]))[0])
                    for c in json.loads(rn.stdout)["components"]) if ok else 1.0
        check(f"llama (rotary, grouped-query) fast == naive: {src} (worst {worst:.2g})", ok and worst <= 1e-4,
              rn.stderr + rf.stderr)

# 3. resample: recorded, same length, other tokens, oracle values, reproducible
out = os.path.join(TMP, "resample.nc")
res = patch_json(d, "--engine", "naive", "--components", "resid_pre,z_all_pos", "--source", "resample",
                 "--ablate-dataset", DATA, "--resample-seed", "11", "-o", out)
donor = res.get("resample_from", -1)
check("resample: the donor has the pair's length and other tokens",
      0 <= donor < len(items) and len(clean_prompts[donor]) == T and clean_prompts[donor] != clean_ids, str(donor))
again = patch_json(d, "--engine", "naive", "--components", "resid_pre,z_all_pos", "--source", "resample",
                   "--ablate-dataset", DATA, "--resample-seed", "11")
check("resample: the same seed gives the same donor and the same values",
      again.get("resample_from") == donor and all(again["components"][c]["values"] == res["components"][c]["values"]
                                                   for c in res["components"]))
donors = {patch_json(d, "--components", "resid_pre", "--source", "resample", "--ablate-dataset", DATA,
                     "--resample-seed", str(s)).get("resample_from") for s in range(8)}
others = {k for k, p in enumerate(clean_prompts) if len(p) == T and p != clean_ids}
check("resample: seeds choose among the other pairs of that length, never the pair itself",
      donors <= others and len(donors) >= 2 and len(items) - 1 not in donors, f"{donors} of {others}")
if 0 <= donor < len(items):
    source = m.run(clean_prompts[donor])
    for comp, data in res["components"].items():
        c = grid(data)
        e, at = close(c, oracle_grid(m, comp, clean_ids, source, res["answer_id"], res["wrong_id"], c.shape))
        check(f"resample == oracle with the donor's activations: {comp}", e <= 1e-4, f"max rel err {e:.3g} at {at}")
ds = xr.open_dataset(out)
check("resample: the file records source, seed, dataset and resample_from(prompt)",
      ds.attrs.get("source") == "resample" and ds.attrs.get("ablation_seed") == "11"
      and ds.attrs.get("ablation_dataset") == DATA and len(ds.attrs.get("ablation_dataset_sha256", "")) == 64
      and ds["resample_from"].dims == ("prompt",) and int(ds["resample_from"].values[0]) == donor
      and ds.attrs.get("direction") == "noise", str(ds.attrs))
ds.close()

# 4. subsets of the mean
sub = patch_json(d, "--engine", "naive", "--components", "resid_pre", "--source", "mean", "--ablate-dataset", DATA,
                 "--mean-over", f"{len(gen)}:{len(items)}")
c = grid(sub["components"]["resid_pre"])
ref = oracle_grid(m, "resid_pre", clean_ids, mean_source(m, clean_prompts[len(gen):], T), sub["answer_id"],
                  sub["wrong_id"], c.shape)
check("mean over A:B == oracle over those pairs", sub.get("mean_prompts") == len(extra) and close(c, ref)[0] <= 1e-4,
      f"{sub.get('mean_prompts')} {close(c, ref)}")
out = os.path.join(TMP, "mean.nc")
fld = patch_json(d, "--engine", "naive", "--components", "resid_pre", "--source", "mean", "--ablate-dataset", DATA,
                 "--mean-over", "template=99", "-o", out)
check("mean over FIELD=VALUE (an integer field) takes the same pairs",
      fld.get("mean_prompts") == len(extra) and fld["components"]["resid_pre"]["values"]
      == sub["components"]["resid_pre"]["values"])
ds = xr.open_dataset(out)
check("mean: the file records source, mean_over, mean_prompts",
      ds.attrs.get("source") == "mean" and ds.attrs.get("mean_over") == "template=99"
      and ds.attrs.get("mean_prompts") == str(len(extra)) and "resample_from" not in ds, str(ds.attrs))
ds.close()

# 5. bad input: one line, exit 2 (usage) or 1 (the work failed)
BAD = [
    ("unknown source", ["--source", "shuffle"], 2, "unknown source 'shuffle'"),
    ("mean without a dataset", ["--source", "mean"], 2, "needs --ablate-dataset"),
    ("resample without a dataset", ["--source", "resample"], 2, "needs --ablate-dataset"),
    ("a dataset with zero", ["--source", "zero", "--ablate-dataset", DATA], 2, "mean or resample only"),
    ("clean with noise", ["--source", "clean", "--direction", "noise"], 2, "its own values"),
    ("mean-over without mean", ["--source", "zero", "--mean-over", "0:2"], 2, "--source mean only"),
    ("bad mean-over", ["--source", "mean", "--ablate-dataset", DATA, "--mean-over", "5:2"], 2, "mean_over '5:2'"),
    ("empty subset", ["--source", "mean", "--ablate-dataset", DATA, "--mean-over", "template=12345"], 1,
     "no pair of the dataset"),
    ("subset too short for the pair", ["--source", "mean", "--ablate-dataset", DATA, "--mean-over",
                                       f"{lengths_at[0]}:{lengths_at[0] + 1}"], 1, "tokens or more"),
    ("missing dataset", ["--source", "mean", "--ablate-dataset", os.path.join(TMP, "none.jsonl")], 1, "none.jsonl"),
    ("atp with an ablation", ["--source", "zero", "--method", "atp"], 2, "ablation source"),
]
short = os.path.join(TMP, "short.jsonl")
with open(short, "w") as f:
    f.write(gen[0] + "\n")
if len(clean_prompts[0]) != T:
    BAD.append(("resample without a prompt of that length", ["--source", "resample", "--ablate-dataset", short], 1,
                "to resample from"))
for name, args, code, text in BAD:
    r = run(d, *args)
    lines = r.stderr.strip().splitlines()
    check(f"bad input: {name}", r.returncode == code and len(lines) == 1 and text in lines[0],
          f"exit {r.returncode}: {r.stderr}")

finish("ablate")
