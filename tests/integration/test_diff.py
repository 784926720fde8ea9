"""`patchsweep diff A.nc B.nc` (issue 19 item 7):
  - a file against itself: every difference 0, exit 0;
  - a run against a perturbed copy: max and mean |B - A|, the cells valid in
    one file only and the shared prompts (done in both) as numpy computes
    them from the files, in the table and in --json;
  - a slice against the whole run: prompts matched by prompt_index;
  - files of different grids (components, layers) refused in one line
    naming both files;
  - --svg writes one readable heatmap per variable;
  - --tolerance: exit 0 at or under it, 1 over it."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import netCDF4
import numpy as np

from checks import check, finish, private_binary

ROOT = os.environ["PS_ROOT"]
TMP = tempfile.mkdtemp(prefix="ps-diff-")
BIN = private_binary(os.environ["PS_BIN"], TMP)


def run(args):
    return subprocess.run([BIN] + args, capture_output=True, text=True, timeout=300, cwd=TMP)


def model(name, layers):
    subprocess.run([sys.executable, f"{ROOT}/tests/tools/make_model.py", "--layers", str(layers), "--heads", "2",
                    "--d-model", "32", "--n-positions", "64", "--std", "0.3", "-o", os.path.join(TMP, name)],
                   check=True, capture_output=True)


model("model", 2)
model("model3", 3)
subprocess.run([BIN, "make-dataset", "ioi", "--n", "6", "--seed", "3", "-o", os.path.join(TMP, "ioi.jsonl")],
               check=True, capture_output=True)


def sweep(name, components="resid_pre,z", model_dir="model", extra=()):
    with open(os.path.join(TMP, name + ".ini"), "w") as f:
        f.write(f"[model]\ndir = {model_dir}\n[data]\ndataset = ioi.jsonl\n[patch]\ncomponents = {components}\n"
                f"[run]\noutput = {name}.nc\n")
    r = run(["sweep", name + ".ini"] + list(extra))
    check(f"sweep {name} {' '.join(extra)}", r.returncode == 0, r.stderr)


sweep("a")
r = run(["diff", "a.nc", "a.nc", "--json"])
j = json.loads(r.stdout) if r.returncode == 0 else {}
check("a file against itself: every difference 0, exit 0",
      r.returncode == 0 and j["prompts_shared"] == 6 and all(v["max_abs"] == 0 and v["mean_abs"] == 0 and v["cells"] > 0
                                                            for v in j["variables"]), r.stderr + r.stdout[:500])
names = {v["name"] for v in j.get("variables", [])}
check("compared: the grids and metrics", {"resid_pre", "resid_pre_normalized", "z", "z_normalized", "clean_metric",
                                          "corrupted_metric"} <= names, names)

# B: a copy with perturbed values, a NaN cell and a prompt not done
shutil.copy(os.path.join(TMP, "a.nc"), os.path.join(TMP, "b.nc"))
rng = np.random.default_rng(7)
with netCDF4.Dataset(os.path.join(TMP, "b.nc"), "a") as ds:
    rp = ds["resid_pre"][:]
    noise = np.zeros(rp.shape, np.float32)
    noise[1, 0, :5] = rng.normal(0, 0.1, 5).astype(np.float32)
    noise[3, 1, 2] = 0.75
    ds["resid_pre"][:] = rp + noise
    ds["z"][2, 1, 3, 0] = np.nan
    ds["done"][4] = 0
with netCDF4.Dataset(os.path.join(TMP, "a.nc")) as A, netCDF4.Dataset(os.path.join(TMP, "b.nc")) as B:
    shared = [p for p in range(6) if B["done"][p] == 1]
    a_rp = np.ma.filled(A["resid_pre"][:].astype(np.float64), np.nan)[shared]
    b_rp = np.ma.filled(B["resid_pre"][:].astype(np.float64), np.nan)[shared]
    ok = ~np.isnan(a_rp) & ~np.isnan(b_rp)
    d = np.abs(b_rp - a_rp)[ok]
    want_rp = (int(ok.sum()), float(d.max()), float(d.mean()))
    a_z = np.ma.filled(A["z"][:].astype(np.float64), np.nan)[shared]
    b_z = np.ma.filled(B["z"][:].astype(np.float64), np.nan)[shared]
    want_z_only_a = int((~np.isnan(a_z) & np.isnan(b_z)).sum())
r = run(["diff", "a.nc", "b.nc", "--json"])
j = json.loads(r.stdout) if r.returncode == 0 else {"variables": []}
v = {x["name"]: x for x in j["variables"]}
rp = v.get("resid_pre", {})
check(f"perturbed copy: resid_pre cells, max, mean as numpy computes them {want_rp}",
      j.get("prompts_shared") == 5 and rp.get("cells") == want_rp[0] and rp.get("max_abs") == want_rp[1]
      and abs(rp.get("mean_abs", -1) - want_rp[2]) <= 1e-12 * max(1, want_rp[2]), (rp, want_rp))
check("the NaN cell counts as valid in A only", v.get("z", {}).get("only_a") == want_z_only_a == 1
      and v["z"]["max_abs"] == 0, v.get("z"))
check("unperturbed variables: 0", v.get("corrupted_metric", {}).get("max_abs") == 0, v.get("corrupted_metric"))
check("top-level max_abs is the largest", j.get("max_abs") == max(x["max_abs"] for x in j["variables"]), j.get("max_abs"))
r = run(["diff", "a.nc", "b.nc"])
line = next((ln for ln in r.stdout.splitlines() if ln.startswith("resid_pre ")), "")
check("the table has the same numbers", r.returncode == 0 and "5 shared" in r.stdout
      and line.split()[1] == str(want_rp[0]) and abs(float(line.split()[2]) - want_rp[1]) <= 1e-3 * want_rp[1],
      r.stdout)

# --tolerance
r0 = run(["diff", "a.nc", "b.nc", "--tolerance", str(want_rp[1] * 1.01)])
r1 = run(["diff", "a.nc", "b.nc", "--tolerance", str(want_rp[1] * 0.99)])
r2 = run(["diff", "a.nc", "a.nc", "--tolerance", "0"])
check("--tolerance over the max: exit 0; under it: exit 1 with one line naming the variable; 0 for equal files",
      r0.returncode == 0 and r1.returncode == 1 and "resid_pre: max |B - A|" in r1.stderr
      and r1.stderr.count("\n") == 1 and r2.returncode == 0, (r0.returncode, r1.returncode, r1.stderr, r2.returncode))

# --svg
os.makedirs(os.path.join(TMP, "svg"))
r = run(["diff", "a.nc", "b.nc", "--svg", "svg"])
files = sorted(os.listdir(os.path.join(TMP, "svg")))
ok = r.returncode == 0 and files == sorted(n + ".svg" for n in names)
try:
    root = ET.parse(os.path.join(TMP, "svg", "resid_pre.svg")).getroot()
    text = "".join(root.itertext())
    ok = ok and "resid_pre: mean of B - A" in text and "A: a.nc; B: b.nc" in text
except (ET.ParseError, FileNotFoundError) as e:
    ok, text = False, str(e)
check("--svg: one readable heatmap per variable", ok, (r.stderr, files, text[:300]))
r = run(["diff", "a.nc", "b.nc", "--svg", "no-such-dir"])
check("--svg to a missing directory: one line, exit 1", r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr)

# no shared prompt: nothing compared (null in JSON), exit 0, heatmaps of no value
shutil.copy(os.path.join(TMP, "a.nc"), os.path.join(TMP, "none.nc"))
with netCDF4.Dataset(os.path.join(TMP, "none.nc"), "a") as ds:
    ds["done"][:] = 0
os.makedirs(os.path.join(TMP, "svg-none"))
r = run(["diff", "a.nc", "none.nc", "--json", "--svg", "svg-none", "--tolerance", "0"])
j = json.loads(r.stdout) if r.returncode == 0 else {"variables": []}
check("no shared prompt: nothing compared, exit 0, a heatmap per variable",
      j.get("prompts_shared") == 0 and j.get("max_abs") is None
      and all(x["cells"] == 0 and x["max_abs"] is None for x in j["variables"])
      and len(os.listdir(os.path.join(TMP, "svg-none"))) == len(names), r.stderr + r.stdout[:300])

# prompts matched by prompt_index: a slice against the whole run
sweep("a", extra=("--slice", "2/2", "--output", "a-2of2.nc"))
r = run(["diff", "a-2of2.nc", "a.nc", "--json"])
j = json.loads(r.stdout) if r.returncode == 0 else {"variables": []}
check("slice 2/2 against the whole run: its 3 prompts shared, all equal",
      j.get("prompts_shared") == 3 and j.get("prompts_a") == 3 and j.get("prompts_b") == 6
      and all(x["max_abs"] == 0 for x in j["variables"]), r.stderr + r.stdout[:300])

# different grids
sweep("c", components="resid_pre")
r = run(["diff", "a.nc", "c.nc"])
check("other components: refused in one line naming both files",
      r.returncode == 1 and "a.nc and c.nc have different grids: z only in a.nc" in r.stderr
      and r.stderr.count("\n") == 1, r.stderr)
sweep("d", model_dir="model3")
r = run(["diff", "a.nc", "d.nc"])
check("another number of layers: refused in one line", r.returncode == 1 and "different grids: layer 2 vs 3" in r.stderr
      and r.stderr.count("\n") == 1, r.stderr)
r = run(["diff", "a.nc", "missing.nc"])
check("a missing file: one line, exit 1", r.returncode == 1 and "missing.nc" in r.stderr and r.stderr.count("\n") == 1,
      r.stderr)
r = run(["diff", "a.nc"])
check("one file: usage error, exit 2", r.returncode == 2, r.stderr)
finish("test_diff")
