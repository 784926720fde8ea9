"""Several metrics per run (issue 19 item 3): `[patch] metric = a,b,c` and
`patch --metric a,b,c` compute every metric from the same patched forwards.
  - a sweep with metric = logit_diff,prob,kl equals the three one-metric
    sweeps bit for bit (grids, normalized grids, clean/corrupted metrics,
    the role-aligned aggregates), under the extra metrics' names;
  - the naive engine agrees with the fast one;
  - 2 MPI ranks, by cell and by prompt, give the serial file's bits;
  - merge of two slices equals the unsliced file; plot draws an extra metric;
  - `patch --metric` likewise, with --json; attribution patching refuses
    several metrics in one line."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import xarray as xr

from checks import check, finish, mpi_env, private_binary

ROOT = os.environ["PS_ROOT"]
TMP = tempfile.mkdtemp(prefix="ps-metrics-")
BIN = private_binary(os.environ["PS_BIN"], TMP)
ENV = mpi_env()
METRICS = ["logit_diff", "prob", "kl"]


def run(args, ranks=0):
    cmd = (["mpirun", "--oversubscribe", "-np", str(ranks)] if ranks else []) + [BIN] + args
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, cwd=TMP)


model = os.path.join(TMP, "model")
subprocess.run([sys.executable, f"{ROOT}/tests/tools/make_model.py", "--layers", "2", "--heads", "2", "--d-model",
                "32", "--n-positions", "64", "--std", "0.3", "-o", model], check=True, capture_output=True)
subprocess.run([BIN, "make-dataset", "ioi", "--n", "8", "--seed", "5", "-o", os.path.join(TMP, "ioi.jsonl")],
               check=True, capture_output=True)


def write_job(name, metric, engine="fast", run_extra=""):
    path = os.path.join(TMP, name + ".ini")
    with open(path, "w") as f:
        f.write(f"[model]\ndir = model\n[data]\ndataset = ioi.jsonl\n[patch]\ncomponents = resid_pre,z_all_pos\n"
                f"metric = {metric}\nengine = {engine}\n[run]\noutput = {name}.nc\nchunk_prompts = 3\n{run_extra}")
    return path


def load(path):
    with xr.open_dataset(os.path.join(TMP, path)) as ds:
        return {k: ds[k].values.copy() for k in ds.data_vars if ds[k].dtype.kind in "fi"}, dict(ds.attrs)


def extra_name(var, metric):
    """The name a one-metric variable gets for `metric` in a several-metric file (schema.h)."""
    if metric == METRICS[0]:
        return var
    for p in ("clean_", "corrupted_"):
        if var == p + "metric":
            return p + metric
    comp = "z_all_pos" if var.startswith("z_all_pos") else "resid_pre"
    return comp + "_" + metric + var[len(comp):]


# --- sweeps ---------------------------------------------------------------------
job3 = write_job("m3", " logit_diff, prob ,kl")
r = run(["sweep", job3])
check("sweep with three metrics; the summary names the others", r.returncode == 0 and "8 of 8 prompts done" in r.stdout
      and "logit_diff: clean" in r.stdout and "; also in the file: prob, kl\n" in r.stdout, r.stderr + r.stdout)
m3, attrs = load("m3.nc")
check("attributes: metric is the first, metrics all of them",
      attrs["metric"] == "logit_diff" and attrs["metrics"] == "logit_diff,prob,kl", attrs.get("metrics"))
with xr.open_dataset(os.path.join(TMP, "m3.nc")) as ds:
    check("each extra variable names its metric", ds["resid_pre_kl_normalized"].attrs.get("metric") == "kl"
          and ds["clean_prob"].attrs.get("metric") == "prob" and "metric" not in ds["resid_pre"].attrs,
          dict(ds["resid_pre_kl_normalized"].attrs))
expected = set()
for met in METRICS:
    r = run(["sweep", write_job("one-" + met, met)])
    check(f"one-metric sweep {met}", r.returncode == 0, r.stderr)
    one, one_attrs = load(f"one-{met}.nc")
    check(f"{met}: no metrics attribute with one metric", "metrics" not in one_attrs and one_attrs["metric"] == met)
    bad = []
    for var, val in one.items():
        if var in ("guard",) or not (var.startswith(("resid_pre", "z_all_pos", "clean_metric", "corrupted_metric"))):
            continue
        name = extra_name(var, met)
        expected.add(name)
        if name not in m3 or not np.array_equal(m3[name], val, equal_nan=True):
            bad.append(name)
    check(f"{met}: every grid, aggregate and metric equals the one-metric sweep bit for bit "
          f"({sum(1 for v in one if v.startswith(('resid_pre', 'z_all_pos')))} grid variables)", not bad, bad)
check("role-aligned aggregates of the extra metrics exist",
      "resid_pre_prob_normalized_by_role" in m3 and "resid_pre_kl_by_role_template_std" in m3,
      sorted(k for k in m3 if "by_role" in k)[:8])
shared = set(k for k in m3 if k.startswith(("resid_pre", "z_all_pos", "clean_", "corrupted_")) and "token" not in k)
check("no variable beyond the three sweeps' ones", shared == expected, sorted(shared ^ expected))

r = run(["sweep", write_job("m3-naive", "logit_diff,prob,kl", engine="naive")])
naive, _ = load("m3-naive.nc")
worst = max(float(np.nanmax(np.abs(naive[k] - m3[k]) / np.maximum(1.0, np.abs(m3[k]))))
            for k in m3 if k.startswith(("resid_pre", "z_all_pos")) and "count" not in k)
check(f"naive engine = fast engine for all three metrics (worst relative difference {worst:.1e})",
      r.returncode == 0 and worst < 1e-4, r.stderr)

for dist in ("cells", "prompts"):
    r = run(["sweep", write_job(f"m3-{dist}", "logit_diff,prob,kl", run_extra=f"distribute = {dist}\n")], ranks=2)
    ok = r.returncode == 0
    if ok:
        two, a2 = load(f"m3-{dist}.nc")
        ok = two.keys() == m3.keys() and all(np.array_equal(two[k], m3[k], equal_nan=True) for k in m3)
    check(f"2 ranks by {dist}: bit for bit the serial file", ok, r.stderr[-800:])

# resume: a sweep that fails at its second chunk (fault build) keeps the
# first chunk's three-metric records; the rerun completes the same file
FAULT_BIN = private_binary(os.path.join(os.environ["PS_BUILD"], "tests", "patchsweep-faults"), TMP)
rjob = write_job("m3-resume", "logit_diff,prob,kl")
r1 = subprocess.run([FAULT_BIN, "sweep", rjob], capture_output=True, text=True, cwd=TMP, timeout=300,
                    env=dict(ENV, PS_FAULT="chunk_eval:2:error"))
r2 = run(["sweep", rjob])
ok = r1.returncode == 1 and r2.returncode == 0 and "(3 from an earlier run)" in r2.stdout
if ok:
    res, _ = load("m3-resume.nc")
    ok = res.keys() == m3.keys() and all(np.array_equal(res[k], m3[k], equal_nan=True) for k in m3)
check("resumed after a failed chunk: the uninterrupted file's values", ok,
      (r1.returncode, r1.stderr[-300:], r2.stderr[-300:]))

parts = []
for k in (1, 2):
    out = f"m3-{k}of2.nc"
    r = run(["sweep", job3, "--slice", f"{k}/2", "--output", out])
    parts.append(out)
r = run(["merge"] + parts + ["-o", "m3-merged.nc"])
ok = r.returncode == 0
if ok:
    merged, _ = load("m3-merged.nc")
    ok = merged.keys() == m3.keys() and all(np.array_equal(merged[k], m3[k], equal_nan=True) for k in m3)
check("merge of two slices equals the unsliced file", ok, r.stderr)
r = run(["plot", "m3.nc", "--var", "resid_pre_prob_normalized", "--prompt", "0", "-o", "prob.svg"])
svg = open(os.path.join(TMP, "prob.svg")).read() if r.returncode == 0 else ""
with xr.open_dataset(os.path.join(TMP, "m3.nc")) as ds:
    want = f"clean prob {float(ds.clean_prob[0]):.4g}"
check("plot draws an extra metric's grid, titled with its metric and unpatched values",
      "Activation patching (prob" in svg and want in svg, r.stderr + svg[:0])
r = run(["plot", "m3.nc", "--var", "resid_pre_normalized,resid_pre_kl_normalized", "--prompt", "0", "-o", "mix.svg"])
svg = open(os.path.join(TMP, "mix.svg")).read() if r.returncode == 0 else ""
check("plot of two metrics' grids names both", "Activation patching (logit_diff,prob,kl" in svg, r.stderr)

# --- patch ----------------------------------------------------------------------
PAIR = ["--model", model, "--clean-ids", "50256,10,11,12,13", "--corrupted-ids", "50256,10,14,12,13",
        "--answer-id", "11", "--wrong-id", "14", "--components", "resid_pre,z"]
r = run(["patch"] + PAIR + ["--metric", "kl,logit_diff,prob", "-o", "p3.nc", "--json"])
ok = r.returncode == 0
if ok:
    j = json.loads(r.stdout)
    ok = j["metric"] == "kl" and j["metrics"] == ["kl", "logit_diff", "prob"] and set(j["other_metrics"]) == {
        "logit_diff", "prob"}
check("patch --metric kl,logit_diff,prob --json", ok, r.stderr + r.stdout[:300])
p3, pattrs = load("p3.nc")
bad = []
for met in ("kl", "logit_diff", "prob"):
    r1 = run(["patch"] + PAIR + ["--metric", met, "-o", f"p-{met}.nc", "--json"])
    one, _ = load(f"p-{met}.nc")
    for var, val in one.items():
        if var.startswith(("resid_pre", "z", "clean_metric", "corrupted_metric")):
            name = var if met == "kl" else (
                var.replace("metric", met) if var.endswith("_metric") else
                var.split("_normalized")[0] + "_" + met + ("_normalized" if var.endswith("_normalized") else ""))
            if name not in p3 or not np.array_equal(p3[name], val, equal_nan=True):
                bad.append(name)
    jo = json.loads(r1.stdout)
    if met != "kl" and jo["components"]["z"]["values"] != j["other_metrics"][met]["components"]["z"]["values"]:
        bad.append(f"json {met}")
check("patch: each metric equals its one-metric run bit for bit (file and --json)", not bad, bad)
r = run(["patch"] + PAIR + ["--metric", "logit_diff,prob", "--method", "atp"])
check("--method atp with two metrics: refused in one line, exit 2",
      r.returncode == 2 and "takes one metric" in r.stderr and r.stderr.count("\n") <= 2, r.stderr)
r = run(["patch"] + PAIR + ["--metric", "prob,prob"])
check("a metric listed twice: refused", r.returncode == 2 and "listed twice" in r.stderr, r.stderr)
finish("test_metrics")
