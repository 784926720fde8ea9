"""BF16 arithmetic (`--compute bf16`, issue 21 item 4), end to end:
  - the IOI grids (resid_pre, attn_out, mlp_out) of one prompt pair on the
    embedded GPT-2 (jobs/ioi-tiny/model), the embedded Llama
    (jobs/ioi-tiny-llama/model), a random GPT-2 with F32 weights and the same
    random GPT-2 stored in BF16, with --compute f32 and --compute bf16: the
    normalized grids (the random models: the raw logit_diff grids, since
    their |clean - corrupted| is a few 1e-3) differ by at most 1e-2
    everywhere, and do differ (bf16 really ran); the files record compute = "bf16" / "f32" and, for bf16,
    compute_kernel; with PS_CPU_NO_AMX=1 the AVX512_BF16 kernel gives the
    same agreement;
  - a sweep whose job file says [model] compute = bf16 (8 IOI pairs of the
    demo) against the same job in f32: the same bound; on 2 MPI ranks (the
    node's shared BF16 window) the same bits as on 1; merge refuses to
    stitch an f32 slice with a bf16 slice (their job_sha256 differ);
  - refusals, one line each: --compute bf16 on a CPU without AMX-BF16 or
    AVX512_BF16 (PS_CPU_NO_BF16=1), an unknown --compute value, --compute on
    a command that runs no matrix product (tokenize), an unknown
    [model] compute in a job file.
Skipped (not passed) on a CPU without AVX512_BF16."""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import xarray as xr

from checks import check, finish, mpi_env, private_binary, skip

ROOT = os.environ["PS_ROOT"]
TMP = tempfile.mkdtemp(prefix="ps-compute-bf16-")
BIN = private_binary(os.environ["PS_BIN"], TMP)  # mpirun starts ranks from it
GRIDS = ("resid_pre", "attn_out", "mlp_out")
PAIR = ["--clean", "When John and Mary went to the store, John gave a drink to",
        "--corrupted", "When John and Mary went to the store, Mary gave a drink to",
        "--answer", " Mary", "--wrong", " John"]
TOL = 1e-2


def run(*args, env=None):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, **(env or {})))


def one_line_refusal(name, r, rc, needle):
    lines = r.stderr.strip().splitlines()
    check(f"{name}: exit {rc}, one line naming '{needle}'",
          r.returncode == rc and len(lines) == 1 and needle in lines[0], f"rc {r.returncode}: {r.stderr}")


cpu = open("/proc/cpuinfo").read()
if "avx512_bf16" not in cpu and "amx_bf16" not in cpu:
    skip("bf16 grids", "this CPU has neither AVX512_BF16 nor AMX-BF16")
    r = run("run", "--model", os.path.join(ROOT, "jobs/ioi-tiny/model"), "--prompt", "Hi", "--compute", "bf16")
    one_line_refusal("no BF16 CPU: --compute bf16 refused", r, 1, "AVX512_BF16")
    finish("test_compute_bf16")

# random GPT-2s: F32 and the same weights stored in BF16
rand = {}
for dtype in ("f32", "bf16"):
    d = os.path.join(TMP, "random-" + dtype)
    subprocess.run([sys.executable, os.path.join(ROOT, "tests/tools/make_model.py"), "--layers", "3", "--heads", "4",
                    "--d-model", "64", "--n-positions", "32", "--seed", "11", "--dtype", dtype, "-o", d], check=True)
    rand[dtype] = d
MODELS = {"embedded GPT-2": os.path.join(ROOT, "jobs/ioi-tiny/model"),
          "embedded Llama": os.path.join(ROOT, "jobs/ioi-tiny-llama/model"),
          "random GPT-2 F32": rand["f32"], "random GPT-2 BF16 checkpoint": rand["bf16"]}
TOKENIZER = os.environ.get("PS_TOKENIZER")


def patch(model, compute, out, env=None):
    args = ["patch", "--model", model, *PAIR, "--components", ",".join(GRIDS), "-o", out]
    if compute:
        args += ["--compute", compute]
    if model.startswith(TMP) and TOKENIZER:
        args += ["--tokenizer", TOKENIZER]
    return run(*args, env=env)


def grids(path, suffix="_normalized"):
    with xr.open_dataset(path) as ds:
        return {g: ds[g + suffix].values.astype(np.float64) for g in GRIDS}, dict(ds.attrs)


def denominator(path):
    """min over prompts of |clean - corrupted| metric: the normalization's scale"""
    with xr.open_dataset(path) as ds:
        return float(np.nanmin(np.abs(ds["clean_metric"].values - ds["corrupted_metric"].values)))


def compare(name, f32_path, bf16_path, normalized=True):
    """max |bf16 - f32| of the normalized grids (raw metric grids with
    normalized=False), checked <= TOL and > 0; cells missing in f32 (padding
    of shorter prompts) must be missing in bf16 too."""
    suffix = "_normalized" if normalized else ""
    a, _ = grids(f32_path, suffix)
    b, _ = grids(bf16_path, suffix)
    diff = max(float(np.nanmax(np.abs(a[g] - b[g]))) for g in GRIDS)
    same_cells = all(np.array_equal(np.isfinite(a[g]), np.isfinite(b[g])) for g in GRIDS)
    what = "normalized" if normalized else "raw logit_diff"
    check(f"{name}: max |{what} bf16 - f32| = {diff:.2e} <= {TOL}", same_cells and diff <= TOL)
    check(f"{name}: bf16 differs from f32 (it ran in bf16)", diff > 0)
    return diff


summary = []
for name, model in MODELS.items():
    f32, bf16 = os.path.join(TMP, name.replace(" ", "_") + "-f32.nc"), os.path.join(TMP, name.replace(" ", "_") +
                                                                                      "-bf16.nc")
    r1, r2 = patch(model, None, f32), patch(model, "bf16", bf16)
    if not check(f"{name}: patch f32 and --compute bf16 run", r1.returncode == 0 and r2.returncode == 0,
                 r1.stderr + r2.stderr):
        continue
    # A random model barely tells the two prompts apart (|clean - corrupted|
    # of a few 1e-3), so its normalized grids divide BF16's rounding by
    # that: their bound is on the raw grids; the trained models' on the
    # normalized ones.
    den = denominator(f32)
    if name.startswith("random"):
        raw = compare(name, f32, bf16, normalized=False)
        a, _ = grids(f32)
        b, _ = grids(bf16)
        norm = max(float(np.nanmax(np.abs(a[g] - b[g]))) for g in GRIDS)
        summary.append(f"{name}: raw {raw:.2e}, normalized {norm:.2e} (|clean - corrupted| = {den:.2e})")
    else:
        summary.append(f"{name}: normalized {compare(name, f32, bf16):.2e} (|clean - corrupted| = {den:.2f})")
    _, at32 = grids(f32)
    _, at16 = grids(bf16)
    check(f"{name}: attributes compute = f32 / bf16", at32.get("compute") == "f32" and at16.get("compute") == "bf16",
          f"{at32.get('compute')} {at16.get('compute')}")
    want = "amx_bf16" if "amx_bf16" in cpu else "avx512_bf16"
    check(f"{name}: compute_kernel = {want} (absent with f32)",
          at16.get("compute_kernel") == want and "compute_kernel" not in at32, at16.get("compute_kernel"))

# the AVX512_BF16 kernel on an AMX CPU
if "amx_bf16" in cpu and "avx512_bf16" in cpu:
    model = MODELS["embedded GPT-2"]
    out = os.path.join(TMP, "avx512.nc")
    r = patch(model, "bf16", out, env={"PS_CPU_NO_AMX": "1"})
    if check("PS_CPU_NO_AMX=1 patch --compute bf16 runs", r.returncode == 0, r.stderr):
        _, at = grids(out)
        check("PS_CPU_NO_AMX=1: compute_kernel = avx512_bf16", at.get("compute_kernel") == "avx512_bf16",
              at.get("compute_kernel"))
        compare("embedded GPT-2, AVX512_BF16 kernel", os.path.join(TMP, "embedded_GPT-2-f32.nc"), out)
else:
    skip("AVX512_BF16 kernel beside AMX", "the CPU lacks one of the two")

# a sweep with [model] compute = bf16
JOB = os.path.join(ROOT, "jobs/ioi-tiny")


def job(compute, name):
    path = os.path.join(TMP, name + ".ini")
    with open(path, "w") as f:
        f.write(f"[model]\ndir = {JOB}/model\n" + (f"compute = {compute}\n" if compute else "") +
                f"[data]\ndataset = {JOB}/ioi.jsonl\nmax_prompts = 8\n[patch]\ncomponents = resid_pre,attn_out,mlp_out\n"
                f"[run]\noutput = {TMP}/{name}.nc\n")
    return path


j32, j16 = job(None, "sweep-f32"), job("bf16", "sweep-bf16")
r1, r2 = run("sweep", j32), run("sweep", j16)
if check("sweep of the f32 job and of the [model] compute = bf16 job", r1.returncode == 0 and r2.returncode == 0,
         r1.stderr + r2.stderr):
    summary.append(f"sweep: normalized {compare('sweep of 8 IOI pairs', TMP + '/sweep-f32.nc', TMP + '/sweep-bf16.nc'):.2e}")
    _, at = grids(TMP + "/sweep-bf16.nc")
    check("sweep file records compute = bf16", at.get("compute") == "bf16", at.get("compute"))
    # 2 ranks sharing the node's BF16 window (one rank packs, the other
    # takes pointers): the 1-rank file's bits
    r = subprocess.run(["mpirun", "--oversubscribe", "-np", "2", BIN, "sweep", j16, "--output", TMP + "/sweep-2r.nc"],
                       capture_output=True, text=True, timeout=900, env=mpi_env())
    if check("2-rank sweep of the bf16 job runs", r.returncode == 0, r.stderr):
        a, _ = grids(TMP + "/sweep-bf16.nc", "")
        b, at2 = grids(TMP + "/sweep-2r.nc", "")
        check("2 ranks: the 1-rank bf16 grids bit for bit, compute = bf16",
              all(np.array_equal(a[g], b[g], equal_nan=True) for g in GRIDS) and at2.get("compute") == "bf16")
    # slices 1/2 in f32 and 2/2 in bf16 do not merge
    s1, s2 = TMP + "/s1.nc", TMP + "/s2.nc"
    r1 = run("sweep", j32, "--slice", "1/2", "--output", s1)
    r2 = run("sweep", j16, "--slice", "2/2", "--output", s2)
    if check("sliced sweeps (f32 1/2, bf16 2/2) run", r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr):
        r = run("merge", s1, s2, "-o", TMP + "/mixed.nc")
        one_line_refusal("merge of an f32 and a bf16 slice refused", r, 1, "job_sha256")

# refusals
model = MODELS["embedded GPT-2"]
r = run("run", "--model", model, "--prompt", "Hi", "--compute", "bf16", env={"PS_CPU_NO_BF16": "1"})
one_line_refusal("PS_CPU_NO_BF16=1: run --compute bf16 refused", r, 1, "AMX-BF16 or AVX512_BF16")
r = patch(model, "bf16", TMP + "/refused.nc", env={"PS_CPU_NO_BF16": "1"})
one_line_refusal("PS_CPU_NO_BF16=1: patch --compute bf16 refused", r, 1, "AMX-BF16 or AVX512_BF16")
check("PS_CPU_NO_BF16=1: no results file left", not os.path.exists(TMP + "/refused.nc"))
r = run("sweep", j16, "--output", TMP + "/refused-sweep.nc", env={"PS_CPU_NO_BF16": "1"})
check("PS_CPU_NO_BF16=1: sweep of a compute = bf16 job refused (exit 1, names AVX512_BF16)",
      r.returncode == 1 and "AVX512_BF16" in r.stderr, r.stderr)
r = run("run", "--model", model, "--prompt", "Hi", "--compute", "fp16")
one_line_refusal("unknown --compute value refused", r, 2, "--compute takes f32 or bf16, not 'fp16'")
r = run("tokenize", "--model", model, "--compute", "bf16", "Hi")
one_line_refusal("tokenize --compute refused (no matrix product to run)", r, 2, "--compute")
bad = os.path.join(TMP, "bad.ini")
with open(j16) as f:
    open(bad, "w").write(f.read().replace("compute = bf16", "compute = fp8"))
r = run("sweep", bad)
one_line_refusal("[model] compute = fp8 refused", r, 2 if r.returncode == 2 else 1, "unknown compute 'fp8'")
# f32 stays the default and is unchanged by the flag
a, b = TMP + "/default.nc", TMP + "/explicit.nc"
r1, r2 = patch(model, None, a), patch(model, "f32", b)
if check("patch and patch --compute f32 run", r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr):
    ga, _ = grids(a)
    gb, _ = grids(b)
    check("--compute f32 gives the default's bits", all(np.array_equal(ga[g], gb[g]) for g in GRIDS))

print("summary max |bf16 - f32|: " + "; ".join(summary))
shutil.rmtree(TMP, ignore_errors=True)
finish("test_compute_bf16")
