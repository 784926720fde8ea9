"""Ablations in sweeps ([patch] source = zero | mean | resample, mean_over, resample_seed; ablate.h):
  1. a mean-ablation sweep on 1, 2 and 3 MPI ranks, by prompt and by cell,
     gives bit-identical files (the mean's exact sums: MPI_Allreduce of
     integers), with source, mean_over and mean_prompts recorded;
  2. each prompt's grids equal `patch --source mean|zero --ablate-dataset`
     of that pair (the path test_ablate.py checks against the oracle), for
     the clean run ablated (noise) and the corrupted one (denoise);
  3. mean_over restricts the mean (mean_prompts);
  4. resample: every donor another pair of the same length, recorded in
     resample_from and reproducible from the seed, 1 and 2 ranks identical,
     grids equal to `patch --source resample` given that donor alone;
  5. bad job files: one line naming FILE:LINE, exit 1, no crash."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import xarray as xr

from checks import check, finish, mpi_env

ROOT = os.environ["PS_ROOT"]
BIN = os.environ["PS_BIN"]
TMP = tempfile.mkdtemp(prefix="ps-ablate-sweep-")
QUICK = os.environ.get("PS_QUICK") == "1"
ENV = mpi_env()

d = os.path.join(TMP, "model")
subprocess.run([sys.executable, os.path.join(ROOT, "tests/tools/make_model.py"), "--layers", "2", "--heads", "4",
                "--d-model", "32", "--std", "0.3", "--n-positions", "32", "--seed", "3", "-o", d], check=True)
DATA = os.path.join(TMP, "data.jsonl")


def n_tokens(text):
    return len(json.loads(subprocess.run([BIN, "tokenize", "--model", d, "--json", text], capture_output=True,
                                         text=True, check=True).stdout)["ids"])


# IOI pairs of several lengths, each length at least twice (resample needs another pair of it)
gen = [json.loads(x) for x in subprocess.run([BIN, "make-dataset", "ioi", "--n", "14", "--seed", "5"],
                                             capture_output=True, text=True, check=True).stdout.splitlines()]
glen = [n_tokens(it["clean"]) for it in gen]
items = [it for it, n in zip(gen, glen) if glen.count(n) >= 2][:8]
T = [n_tokens(it["clean"]) for it in items]
with open(DATA, "w") as f:
    for it in items:
        f.write(json.dumps(it) + "\n")
COMPS = "resid_pre,attn_out,z,z_all_pos,v_all_pos"


def job(name, patch_lines, run_lines=""):
    path = os.path.join(TMP, name + ".ini")
    with open(path, "w") as f:
        f.write(f"[model]\ndir = {d}\n[data]\ndataset = {DATA}\n[patch]\ncomponents = {COMPS}\n{patch_lines}\n"
                f"[run]\noutput = {name}.nc\nchunk_prompts = 3\n{run_lines}\n")
    return path


def sweep(path, ranks, output):
    cmd = [BIN, "sweep", path, "--output", output, "--overwrite"]
    if ranks > 1:
        cmd = ["mpirun", "--oversubscribe", "-np", str(ranks)] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)


def grids(path):
    ds = xr.open_dataset(path)
    out = {v: ds[v].values for v in ds.data_vars if ds[v].dims[:1] == ("prompt",) and ds[v].dtype.kind == "f"}
    attrs = dict(ds.attrs)
    ds.close()
    return out, attrs


# 1. 1, 2, 3 ranks; by prompt and by cell
mean_job = job("mean", "source = mean")
files = {}
for ranks, dist in ((1, "auto"), (2, "prompts"), (3, "cells")) if not QUICK else ((1, "auto"), (2, "cells")):
    path = job(f"mean-{dist}", "source = mean", f"distribute = {dist}")
    out = os.path.join(TMP, f"mean-{ranks}.nc")
    r = sweep(path, ranks, out)
    check(f"mean sweep on {ranks} rank(s), distribute {dist}", r.returncode == 0, r.stderr)
    if r.returncode == 0:
        files[ranks] = grids(out)
if 1 in files:
    ref, attrs = files[1]
    check("the file records the ablation: source mean, mean_over all, mean_prompts, direction noise",
          attrs.get("source") == "mean" and attrs.get("mean_over") == "all"
          and attrs.get("mean_prompts") == str(len(items)) and attrs.get("direction") == "noise", str(attrs))
    for ranks, (g, _) in files.items():
        if ranks == 1:
            continue
        same = all(np.array_equal(ref[v], g[v], equal_nan=True) for v in ref) and set(ref) == set(g)
        check(f"mean sweep: {ranks} ranks bit-identical to 1", same)


# 2. sweep == patch of each pair
def patch_json(item, *args):
    r = subprocess.run([BIN, "patch", "--model", d, "--clean", item["clean"], "--corrupted", item["corrupted"],
                        "--answer", item["answer"], "--wrong", item["wrong"], "--components", COMPS, "--json", *args],
                       capture_output=True, text=True, timeout=600)
    return json.loads(r.stdout) if r.returncode == 0 else None


def compare(label, nc, args, prompts):
    g, _ = grids(nc)
    worst = 0.0
    for k in prompts:
        res = patch_json(items[k], *args)
        if res is None:
            check(f"{label}: patch of prompt {k}", False)
            return
        for comp, data in res["components"].items():
            v = np.array(data["values"]).reshape(data["shape"])
            s = g[comp][k][tuple(slice(0, n) for n in v.shape)]
            worst = max(worst, float(np.max(np.abs(s - v) / np.maximum(1.0, np.abs(v)))))
    check(f"{label}: sweep == patch of the pair (worst {worst:.2g})", worst <= 1e-5)


PROMPTS = (0, 3) if QUICK else range(len(items))
if 1 in files:
    compare("mean, clean run ablated", os.path.join(TMP, "mean-1.nc"),
            ["--source", "mean", "--ablate-dataset", DATA], PROMPTS)
for name, lines, args in (("zero", "source = zero", ["--source", "zero"]),
                          ("mean-denoise", "source = mean\ndirection = denoise",
                           ["--source", "mean", "--direction", "denoise", "--ablate-dataset", DATA])):
    out = os.path.join(TMP, name + ".nc")
    r = sweep(job(name, lines), 1, out)
    check(f"{name} sweep", r.returncode == 0, r.stderr)
    if r.returncode == 0:
        compare(name, out, args, PROMPTS[:2])
        _, attrs = grids(out)
        check(f"{name}: source and direction recorded", attrs.get("source") == args[1]
              and attrs.get("direction") == ("denoise" if "denoise" in lines else "noise"), str(attrs))

# 3. mean_over: the longest prompts' subset
longest = max(T)
tmpl = items[T.index(longest)]["template"]
sub = [k for k, it in enumerate(items) if it["template"] == tmpl]
out = os.path.join(TMP, "sub.nc")
r = sweep(job("sub", f"source = mean\nmean_over = template={tmpl}"), 1, out)
check("mean_over sweep", r.returncode == 0, r.stderr)
if r.returncode == 0:
    _, attrs = grids(out)
    check("mean_over: the subset's prompts averaged", attrs.get("mean_over") == f"template={tmpl}"
          and attrs.get("mean_prompts") == str(len(sub)), str(attrs))
    compare("mean_over", out, ["--source", "mean", "--ablate-dataset", DATA, "--mean-over", f"template={tmpl}"], [0])

# 4. resample: donors recorded, the same on 1 and 2 ranks (by cell), each
#    prompt's grids those of `patch --source resample` with its donor alone
outs = {}
for ranks, dist in ((1, "prompts"), (2, "cells")):
    out = os.path.join(TMP, f"resample-{ranks}.nc")
    r = sweep(job(f"resample-{dist}", "source = resample\nresample_seed = 9", f"distribute = {dist}"), ranks, out)
    check(f"resample sweep on {ranks} rank(s), distribute {dist}", r.returncode == 0, r.stderr)
    if r.returncode == 0:
        outs[ranks] = out
if 1 in outs:
    ds = xr.open_dataset(outs[1])
    donors = [int(x) for x in ds["resample_from"].values]
    check("resample: seed and source recorded", ds.attrs.get("ablation_seed") == "9"
          and ds.attrs.get("source") == "resample", str(ds.attrs))
    ds.close()
    check("resample: every donor another pair of the same length",
          all(0 <= k < len(items) and k != i and T[k] == T[i] for i, k in enumerate(donors)), f"{donors} {T}")
    if 2 in outs:
        a, b = grids(outs[1])[0], grids(outs[2])[0]
        check("resample: 1 and 2 ranks bit-identical", all(np.array_equal(a[v], b[v], equal_nan=True) for v in a))
    for i in (PROMPTS[:2] if QUICK else range(3)):
        one = os.path.join(TMP, f"donor{i}.jsonl")
        with open(one, "w") as f:
            f.write(json.dumps(items[donors[i]]) + "\n")
        res = patch_json(items[i], "--source", "resample", "--ablate-dataset", one)
        g = grids(outs[1])[0]
        worst = max(float(np.max(np.abs(g[c][i][tuple(slice(0, n) for n in np.array(v["values"]).reshape(
            v["shape"]).shape)] - np.array(v["values"]).reshape(v["shape"])))) for c, v in res["components"].items())
        check(f"resample: prompt {i}'s grids == patch with its donor {donors[i]} (worst {worst:.2g})", worst <= 1e-5)
    r = sweep(job("resample-again", "source = resample\nresample_seed = 9"), 1, os.path.join(TMP, "again.nc"))
    ds = xr.open_dataset(os.path.join(TMP, "again.nc"))
    check("resample: the same seed, the same donors", [int(x) for x in ds["resample_from"].values] == donors)
    ds.close()

    # slices: the donors depend on the dataset and the seed alone, so the merged parts are the unsliced file
    path = job("resample-prompts", "source = resample\nresample_seed = 9", "distribute = prompts")
    parts = []
    for k in (1, 2):
        part = os.path.join(TMP, f"part{k}.nc")
        r = subprocess.run([BIN, "sweep", path, "--output", part, "--overwrite", "--slice", f"{k}/2"],
                           capture_output=True, text=True, timeout=600)
        check(f"resample: slice {k}/2 of the sweep exits 0", r.returncode == 0, r.stderr)
        parts.append(part)
    merged = os.path.join(TMP, "merged.nc")
    r = subprocess.run([BIN, "merge", *parts, "-o", merged], capture_output=True, text=True, timeout=600)
    ok = r.returncode == 0
    if ok:
        a, b = grids(outs[1])[0], grids(merged)[0]
        ds = xr.open_dataset(merged)
        ok = all(np.array_equal(a[v], b[v], equal_nan=True) for v in a) and \
            [int(x) for x in ds["resample_from"].values] == donors
        ds.close()
    check("resample: two slices merged == the unsliced sweep (values and resample_from)", ok, r.stderr)

# 5. bad job files
shortest = T.index(min(T))
BAD = [
    ("resample_seed without resample", "source = mean\nresample_seed = 3", "source = resample only"),
    ("unknown source", "source = shuffle", "unknown source 'shuffle'"),
    ("clean with noise", "source = clean\ndirection = noise", "its own values"),
    ("mean_over without mean", "source = zero\nmean_over = 0:2", "source = mean only"),
    ("bad mean_over", "source = mean\nmean_over = 3", "mean_over '3'"),
    ("a mean too short for the longest prompt", f"source = mean\nmean_over = {shortest}:{shortest + 1}",
     "the longest of the job"),
]
for name, lines, text in BAD:
    path = job("bad", lines)
    r = sweep(path, 1, os.path.join(TMP, "bad.nc"))
    err = r.stderr.strip().splitlines()
    check(f"bad job: {name}", r.returncode == 1 and len(err) >= 1 and text in err[-1] and
          (os.path.basename(path) in err[-1] or DATA in err[-1]), r.stderr)

finish("ablate_sweep")
