"""`patchsweep merge`: the parts of a sliced sweep (`sweep --slice K/N`)
stitched into one file
  - equal bit for bit, in every variable, to the unsliced run's file, for
    1, 3 and 4 parts, parts of different position lengths (padding), a
    dataset of mixed lengths with skipped pairs, the kl metric and the noise
    direction;
  - provenance: the parts' attributes, merged_from, merge's own version and
    command line, parts_* for what differs between parts;
  - refused with one line naming the files: overlaps, gaps, a missing last
    part, parts of other runs (job, model, dataset, metric, variables),
    incomplete parts, the output among the parts, files that are not results;
    no file is left behind.
PS_QUICK (the sanitizer build): 3 parts only."""
import json
import os
import shutil
import subprocess
import tempfile

import netCDF4
import numpy as np
import xarray as xr

from checks import check, finish

ROOT = os.environ["PS_ROOT"]
BIN = os.environ["PS_BIN"]
QUICK = os.environ.get("PS_QUICK") == "1"
TMP = tempfile.mkdtemp(prefix="ps-merge-")


def run(args):
    return subprocess.run([BIN] + args, capture_output=True, text=True, cwd=TMP, timeout=600)


def nc_values(path):
    """Every variable's raw bits (no masking), strings as lists."""
    out = {}
    with netCDF4.Dataset(path) as ds:
        ds.set_auto_mask(False)
        for name, var in ds.variables.items():
            v = var[:]
            out[name] = [str(x) for x in np.ravel(v)] if v.dtype.kind in "OUS" else (v.dtype.str, v.shape, v.tobytes())
    return out


def same(a, b):
    va, vb = nc_values(a), nc_values(b)
    return sorted(k for k in va.keys() | vb.keys() if va.get(k) != vb.get(k))


subprocess.run(["/usr/bin/python3", f"{ROOT}/tests/tools/make_model.py", "--layers", "3", "--heads", "4", "--d-model",
                "32", "--n-positions", "64", "--std", "0.3", "-o", os.path.join(TMP, "model")], check=True,
               capture_output=True)
run(["make-dataset", "ioi", "--n", "24", "--seed", "11", "-o", "ioi.jsonl"])
run(["make-dataset", "capitals", "--n", "10", "--seed", "5", "-o", "capitals.jsonl"])
# capitals pairs of different lengths, and pairs the sweep skips
lines = open(os.path.join(TMP, "ioi.jsonl")).read().splitlines()
mixed = lines[:4] + open(os.path.join(TMP, "capitals.jsonl")).read().splitlines()[:6] + lines[4:9]
bad = json.loads(lines[9])
bad["corrupted"] += " again"
mixed.insert(3, json.dumps(bad))
multi = json.loads(lines[10])
multi["answer"] = " John Smith"
mixed.append(json.dumps(multi))
open(os.path.join(TMP, "mixed.jsonl"), "w").write("\n".join(mixed) + "\n")


def write_job(name, dataset, components="resid_pre,attn_out,mlp_out,z_all_pos,z", extra=""):
    with open(os.path.join(TMP, name + ".ini"), "w") as f:
        f.write(f"[model]\ndir = model\n[data]\ndataset = {dataset}\nskip_invalid = true\n"
                f"[patch]\ncomponents = {components}\n{extra}[run]\noutput = {name}.nc\nchunk_prompts = 4\n")
    return name + ".ini"


JOBS = [("ioi", write_job("ioi", "ioi.jsonl")),
        ("mixed", write_job("mixed", "mixed.jsonl", components="resid_pre,z,pattern_all_pos,mlp_out",
                            extra="metric = kl\ndirection = noise\n"))]


def sweep_parts(job, n, tag):
    paths = []
    for k in range(1, n + 1):
        out = f"{tag}-{k}of{n}.nc"
        r = run(["sweep", job, "--slice", f"{k}/{n}", "--output", out])
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        paths.append(out)
    return paths


SPLITS = {"ioi": (3,) if QUICK else (1, 3, 4), "mixed": (3,)}
for name, job in JOBS:
    r = run(["sweep", job])
    check(f"{name}: unsliced run", r.returncode == 0, r.stderr)
    for n in SPLITS[name]:
        parts = sweep_parts(job, n, name)
        out = f"{name}-merged{n}.nc"
        r = run(["merge"] + parts[::-1] + ["-o", out])
        diff = same(os.path.join(TMP, f"{name}.nc"), os.path.join(TMP, out)) if r.returncode == 0 else r.stderr
        check(f"{name}: {n} part(s) merged equal the unsliced file bit for bit", r.returncode == 0 and not diff, diff)
        if n == 3:
            positions = [netCDF4.Dataset(os.path.join(TMP, p)).dimensions["position"].size for p in parts]
            check(f"{name}: parts of different lengths (padding exercised)", len(set(positions)) > 1, positions)

# --- provenance ---------------------------------------------------------
parts3 = [f"ioi-{k}of3.nc" for k in (1, 2, 3)]
with xr.open_dataset(os.path.join(TMP, "ioi-merged3.nc")) as ds, xr.open_dataset(os.path.join(TMP, "ioi.nc")) as ref:
    a = ds.attrs
    check("slice all, complete, prompts_done", a["slice"] == "all" and a["complete"] == 1
          and a["prompts_done"] == ref.attrs["prompts_done"], a)
    check("merged_from: the parts in slice order", a["merged_from"].split("\n") == parts3, a["merged_from"])
    check("merge's own version and command line", a["patchsweep_version"] == ref.attrs["patchsweep_version"]
          and a["command_line"].split()[1] == "merge" and "-o ioi-merged3.nc" in a["command_line"], a["command_line"])
    check("the parts' command lines kept", a["parts_command_line"].split("\n") ==
          [f"{BIN} sweep ioi.ini --slice {k}/3 --output ioi-{k}of3.nc" for k in (1, 2, 3)], a["parts_command_line"])
    check("identity and provenance copied", all(a[k] == ref.attrs[k] for k in (
        "job_sha256", "model_sha256", "dataset_sha256", "job_text", "model_config", "metric", "direction", "engine",
        "Conventions", "model_path", "model_dtype")))
    check("xarray: NaN past a prompt's length", bool(np.isnan(ds["resid_pre"].values[0, :, int(ds["length"][0]):])
                                                     .all()) and ds.sizes == ref.sizes, dict(ds.sizes))
with xr.open_dataset(os.path.join(TMP, "mixed-merged3.nc")) as ds:
    check("skipped pairs kept with their reason", int(ds["skipped"].sum()) == 2
          and "token length" in str(ds["skip_reason"].values[3]), list(ds["skipped"].values))

# --- refusals -------------------------------------------------------------


def craft(src, dst, attrs=None, rename=None, done0=None):
    shutil.copy(os.path.join(TMP, src), os.path.join(TMP, dst))
    with netCDF4.Dataset(os.path.join(TMP, dst), "a") as ds:
        for k, v in (attrs or {}).items():
            ds.setncattr(k, v)
        if rename:
            ds.renameVariable(*rename)
        if done0 is not None:
            ds["done"][done0] = 0
    return dst


r = run(["sweep", JOBS[0][1], "--slice", "2/4", "--output", "q2of4.nc"])
open(os.path.join(TMP, "junk.nc"), "w").write("not netcdf\n")
p1, p2, p3 = parts3
CASES = [
    ("overlap", [p1, p2, p2, p3], "overlap: ioi-2of3.nc and ioi-2of3.nc both hold prompt_index 8..15"),
    ("gap", [p1, p3], "gap: prompt_index 8..15 is in no part (between ioi-1of3.nc and ioi-3of3.nc)"),
    ("first part missing", [p2, p3], "gap: prompt_index 0..7 is in no part"),
    ("last part missing", [p1, p2], "gap: slice 3/3 is missing"),
    ("another split", [p1, "q2of4.nc", p3], "q2of4.nc is slice 2/4 but ioi-1of3.nc is slice 1/3"),
    ("another job", [p1, "mixed-2of3.nc", p3], "mixed-2of3.nc: job_sha256"),
    ("another model", [p1, craft(p2, "model.nc", {"model_sha256": "0" * 64}), p3], "model.nc: model_sha256"),
    ("another dataset", [p1, craft(p2, "data.nc", {"dataset_sha256": "1" * 64}), p3], "data.nc: dataset_sha256"),
    ("another metric", [p1, craft(p2, "metric.nc", {"metric": "prob"}), p3], "metric.nc: metric \"prob\""),
    ("other variables", [p1, craft(p2, "vars.nc", rename=("z", "zz")), p3], "vars.nc: no variable 'z'"),
    ("incomplete part", [p1, craft(p2, "inc.nc", {"complete": np.int32(0)}), p3], "inc.nc: not complete"),
    ("a prompt not done", [p1, craft(p2, "notdone.nc", done0=2), p3], "notdone.nc: prompt_index 10 is neither"),
    ("whole file", ["ioi.nc"], "ioi.nc: slice = \"all\""),
    ("not NetCDF", [p1, "junk.nc"], "junk.nc: not a readable NetCDF file"),
    ("missing file", [p1, "nothere.nc"], "nothere.nc: not a readable NetCDF file"),
]
for name, parts, frag in CASES:
    r = run(["merge"] + parts + ["-o", "bad.nc"])
    lines_err = r.stderr.strip().splitlines()
    check(f"refused: {name}", r.returncode == 1 and len(lines_err) == 1 and frag in lines_err[0] and not r.stdout,
          f"{r.returncode} {r.stderr!r}")
    check(f"refused: {name}: no file left", not os.path.exists(os.path.join(TMP, "bad.nc"))
          and not os.path.exists(os.path.join(TMP, "bad.nc.partial")))
before = open(os.path.join(TMP, p1), "rb").read()
r = run(["merge", p1, p2, p3, "-o", p1])
check("refused: output is a part", r.returncode == 1 and "the output is one of the parts" in r.stderr
      and open(os.path.join(TMP, p1), "rb").read() == before, r.stderr)
for args, frag in ((["merge", p1], "-o ALL.nc is required"), (["merge", "-o", "x.nc"], "at least one PART.nc"),
                   (["merge", "--bogus", p1, "-o", "x.nc"], "unknown option")):
    r = run(args)
    check(f"usage: {frag}", r.returncode == 2 and frag in r.stderr and len(r.stderr.strip().splitlines()) == 1,
          r.stderr)
r = run(["merge", "--help"])
check("--help", r.returncode == 0 and r.stdout.startswith("usage: patchsweep merge"), r.stdout)

shutil.rmtree(TMP, ignore_errors=True)
finish("merge")
