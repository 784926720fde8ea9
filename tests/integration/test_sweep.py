"""The MPI sweep job end to end:
  - 1, 2, 3 and 4 ranks give bitwise identical files, distributing cells
    or prompts;
  - SIGKILL at fault points (after journal record N, inside the NetCDF
    write; and a torn journal record) then a rerun gives the values of an
    uninterrupted run; SIGTERM stops cleanly (exit 3, a readable file marked
    incomplete) and the rerun completes it; 1 and 2 ranks;
  - the file follows the results contract and matches `patchsweep patch`;
  - bad job files and datasets fail with one clear line."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import xarray as xr

from checks import check, finish, mpi_env, private_binary

ROOT = os.environ["PS_ROOT"]
BIN = os.environ["PS_BIN"]
# PS_QUICK (the sanitizer build): 1 and 2 ranks, two SIGKILL points.
QUICK = os.environ.get("PS_QUICK") == "1"
TMP = tempfile.mkdtemp(prefix="ps-sweep-")
BIN = private_binary(BIN, TMP)
MPI_ENV = mpi_env()


def run(args, ranks=0, **kw):
    cmd = ([ "mpirun", "--oversubscribe", "-np", str(ranks)] if ranks else []) + [BIN] + args
    return subprocess.run(cmd, capture_output=True, text=True, env=MPI_ENV, timeout=900, **kw)


model = os.path.join(TMP, "model")
subprocess.run([sys.executable, f"{ROOT}/tests/tools/make_model.py", "--layers", "3", "--heads", "4", "--d-model",
                "32", "--n-positions", "64", "--std", "0.3", "-o", model], check=True, capture_output=True)
data = os.path.join(TMP, "ioi.jsonl")
subprocess.run([BIN, "make-dataset", "ioi", "--n", "24", "--seed", "11", "-o", data], check=True, capture_output=True)


def write_job(name, components="resid_pre,attn_out,mlp_out,z_all_pos,z", engine="fast", chunk=3, dataset="ioi.jsonl",
              extra="", run_extra=""):
    path = os.path.join(TMP, name + ".ini")
    with open(path, "w") as f:
        f.write(f"; {name}\n[model]\ndir = model\n[data]\ndataset = {dataset}\n{extra}"
                f"[patch]\ncomponents = {components}\nengine = {engine}\n"
                f"[run]\noutput = {name}.nc\nchunk_prompts = {chunk}\nprogress_seconds = 0.1\n{run_extra}")
    return path


def values(path):
    with xr.open_dataset(path) as ds:
        return {k: ds[k].values.copy() for k in ds.data_vars if ds[k].dtype.kind in "fi"}, dict(ds.attrs)


def same(a, b):
    return all(np.array_equal(a[k], b[k], equal_nan=True) for k in a) and a.keys() == b.keys()


# --- ranks ---------------------------------------------------------------
job = write_job("ranks")
r = run(["sweep", job, "--output", f"{TMP}/r0.nc"])
check("serial run", r.returncode == 0 and "24 of 24 prompts done" in r.stdout, r.stderr + r.stdout)
ref, ref_attrs = values(f"{TMP}/r0.nc")
for n in ((1, 2) if QUICK else (1, 2, 3, 4)):
    r = run(["sweep", job, "--output", f"{TMP}/r{n}.nc"], ranks=n)
    ok = r.returncode == 0
    if ok:
        v, attrs = values(f"{TMP}/r{n}.nc")
        ok = same(ref, v) and attrs["mpi_ranks"] == str(n)
    check(f"{n} rank(s) bitwise equal to the serial run", ok, r.stderr[-500:])
check("rank 0 alone prints", r.stdout.count("prompts done") == 1, r.stdout)
# The same job distributed by prompt (each rank runs its own prompts'
# forwards; chunks of 8, the last one partial) gives the same bits.
pjob = write_job("ranks-prompts", chunk=8, run_extra="distribute = prompts\n")
for n in ((1, 2) if QUICK else (1, 2, 3, 4)):
    r = run(["sweep", pjob, "--output", f"{TMP}/p{n}.nc"], ranks=n)
    ok = r.returncode == 0 and same(ref, values(f"{TMP}/p{n}.nc")[0])
    check(f"{n} rank(s) distributing prompts: bitwise equal to the serial run", ok, r.stderr[-500:])

# --timings: rank 0 alone prints where its time went, every step and phase
# named once with a time, the steps adding up to the process's time from
# its start (the gaps between them are a few statements), the sweep's
# phases to at most its step; the file is the same bits.
r = run(["sweep", pjob, "--output", f"{TMP}/t2.nc", "--timings"], ranks=2)
STEPS = ["exec", "mpi_init", "job", "model", "tokenizer", "sweep", "report", "finalize"]
PHASES = ["dataset", "hash", "journal_open", "sources", "writer_start", "tokens", "compute", "journal", "push",
          "memory", "finish", "lens"]


def timing_line(prefix):
    lines = [l for l in r.stderr.splitlines() if l.startswith(prefix)]
    if len(lines) != 1:
        return None
    toks = lines[0][len(prefix):].split()
    return dict(zip(toks[0::2], map(float, toks[1::2]))), toks[0::2]


steps, phases = timing_line("sweep: timings (rank 0, seconds):"), timing_line("sweep: timings of the sweep (rank 0, seconds):")
total = [float(l.split()[3]) for l in r.stderr.splitlines() if l.startswith("sweep: timings: process ")]
ok = r.returncode == 0 and steps and phases and len(total) == 1 and same(ref, values(f"{TMP}/t2.nc")[0])
check("--timings: one line of steps, one of phases and the total (rank 0 alone); the same bits", ok, r.stderr[-800:])
if ok:
    (st, st_names), (ph, ph_names) = steps, phases
    check("--timings: every step and phase named once, in order, none negative",
          st_names == STEPS and ph_names == PHASES and min(st.values()) >= 0 and min(ph.values()) >= 0, r.stderr)
    check("--timings: the steps add up to the process's time from its start",
          abs(sum(st.values()) - total[0]) <= 0.05 + 0.02 * total[0] and st["exec"] < total[0],
          f"{st} sum {sum(st.values()):.3f} total {total[0]:.3f}")
    check("--timings: the sweep's phases within its step, the chunks' time in them",
          sum(ph.values()) <= st["sweep"] + 0.005 and 0 < ph["compute"] <= st["sweep"], f"{ph} {st['sweep']}")
r = run(["sweep", pjob, "--output", f"{TMP}/t0.nc"])
check("no --timings: no timings printed", r.returncode == 0 and "timings" not in r.stderr, r.stderr[-300:])

# One node: comm_init asks Open MPI for its shared-memory pml (ob1), so the
# cm pml's network libraries (its mtl components) are not even opened; a
# pml the user chose is kept (OMPI_MCA_pml=^ucx opens them; a bogus one
# fails in MPI_Init).
VERBOSE = {"OMPI_MCA_pml_base_verbose": "10", "OMPI_MCA_mtl_base_verbose": "10"}
for how, extra, want_mtl in (("ours", {}, False), ("the user's ^ucx", {"OMPI_MCA_pml": "^ucx"}, True)):
    r = subprocess.run(["mpirun", "--oversubscribe", "-np", "2", BIN, "sweep", pjob, "--output", f"{TMP}/pml.nc",
                        "--overwrite"], capture_output=True, text=True, env=dict(MPI_ENV, **VERBOSE, **extra),
                       timeout=300)
    check(f"pml {how}: the network libraries {'probed' if want_mtl else 'not probed'}, the same bits",
          r.returncode == 0 and ("opening mtl components" in r.stderr) == want_mtl
          and same(ref, values(f"{TMP}/pml.nc")[0]), r.stderr[-600:])
# (were it replaced by ob1 the run would succeed; Open MPI's message naming
# the component sometimes does not arrive: its show_help relay fails)
os.remove(f"{TMP}/pml.nc")
r = subprocess.run(["mpirun", "--oversubscribe", "-np", "2", BIN, "sweep", pjob, "--output", f"{TMP}/pml.nc",
                    "--overwrite"], capture_output=True, text=True, env=dict(MPI_ENV, OMPI_MCA_pml="bogus"),
                   timeout=300)
check("pml the user's (bogus): kept, MPI_Init fails, no file", r.returncode != 0
      and not os.path.exists(f"{TMP}/pml.nc"), r.stderr[-600:])

# The node-shared weights' backing directory (comm_mpi.c) is found without
# MPI_T when the environment or the default decides it, and through MPI_T
# when an MCA parameter file names it: both ways a directory without room
# (/proc: 0 bytes free) is refused with its one line before MPI tries.
conf = os.path.join(TMP, "mca-params.conf")
with open(conf, "w") as f:
    f.write("osc_sm_backing_directory = /proc\n")
for how, extra in (("the environment", {"OMPI_MCA_osc_sm_backing_directory": "/proc"}),
                   ("an MCA parameter file (MPI_T)", {"OMPI_MCA_mca_base_param_files": conf})):
    r = subprocess.run(["mpirun", "--oversubscribe", "-np", "2", BIN, "sweep", pjob, "--output", f"{TMP}/shm.nc"],
                       capture_output=True, text=True, env=dict(MPI_ENV, **extra), timeout=300)
    lines = [l for l in r.stderr.splitlines() if l.startswith("patchsweep")]
    check(f"shared window's directory from {how}: refused, one line naming it", r.returncode == 1 and len(lines) == 1
          and "/proc has 0 MiB free" in lines[0] and not os.path.exists(f"{TMP}/shm.nc"), r.stderr[-600:])

# --- contract and agreement with `patch` ----------------------------------
with xr.open_dataset(f"{TMP}/r0.nc") as ds:
    check("dims", ds.sizes["prompt"] == 24 and ds.sizes["layer"] == 3 and ds.sizes["head"] == 4
          and ds.sizes["position"] == int(ds["length"].max()), dict(ds.sizes))
    check("component dims", ds["resid_pre"].dims == ("prompt", "layer", "position")
          and ds["z"].dims == ("prompt", "layer", "position", "head") and ds["z_all_pos"].dims == ("prompt", "layer", "head"))
    check("coordinates", list(ds["layer"].values) == [0, 1, 2] and list(ds["head"].values) == [0, 1, 2, 3])
    check("done and not skipped", bool((ds["done"].values == 1).all()) and bool((ds["skipped"].values == 0).all()))
    check("provenance", all(k in ds.attrs for k in ("patchsweep_version", "command_line", "model_sha256", "job_text",
                                                     "job_sha256", "dataset_sha256", "mpi_ranks", "blas", "metric",
                                                     "direction", "engine", "Conventions"))
          and ds.attrs["complete"] == 1, list(ds.attrs))
    lengths = ds["length"].values
    short = int(np.argmin(lengths))
    check("fill past a prompt's length", lengths.min() == lengths.max()
          or bool(np.isnan(ds["resid_pre"].values[short, :, int(lengths[short]):]).all()))
    items = [json.loads(line) for line in open(data)]
    for i in (0, 7, 23):
        res = run(["patch", "--model", model, "--clean", items[i]["clean"], "--corrupted", items[i]["corrupted"],
                   "--answer", items[i]["answer"], "--wrong", items[i]["wrong"], "--components",
                   "resid_pre,attn_out,mlp_out,z_all_pos,z", "--json"])
        pj = json.loads(res.stdout)
        T = int(lengths[i])
        ok = abs(pj["clean_metric"] - float(ds["clean_metric"].values[i])) < 1e-6
        for comp, data_ in pj["components"].items():
            grid = np.array(data_["values"]).reshape(data_["shape"])
            mine = ds[comp].values[i]
            mine = mine[:, :T] if comp in ("resid_pre", "attn_out", "mlp_out", "z") else mine
            ok = ok and np.allclose(grid, mine, rtol=1e-6, atol=1e-6)
        check(f"prompt {i} equals `patchsweep patch`", ok)
        check(f"prompt {i} tokens", list(ds["clean_token_id"].values[i][:T]) ==
              json.loads(run(["tokenize", "--model", model, "--json", items[i]["clean"]]).stdout)["ids"])

# --- rerun of a complete job, other jobs against its file -----------------
r = run(["sweep", job, "--output", f"{TMP}/r0.nc"])
check("rerun of a complete job does nothing", r.returncode == 0 and "already the complete result" in r.stdout, r.stdout)
other = write_job("other", components="resid_pre")
r = run(["sweep", other, "--output", f"{TMP}/r0.nc"])
check("another job refuses an existing file", r.returncode == 1 and "--overwrite" in r.stderr, r.stderr)
r = run(["sweep", other, "--output", f"{TMP}/r0.nc", "--overwrite"])
check("--overwrite replaces it", r.returncode == 0 and "resid_pre" in values(f"{TMP}/r0.nc")[0]
      and "z" not in values(f"{TMP}/r0.nc")[0], r.stderr)

# --- SIGKILL and resume ---------------------------------------------------
# The kills come from the test build of the binary (patchsweep-faults,
# include/patchsweep/fault.h) at named points, not after a guessed sleep:
# PS_FAULT=journal_sync:N:kill dies once the journal holds N syncs (the first
# is at open, then one per chunk: 24 prompts in chunks of 2 make 13), and
# results_window:1:kill dies inside the writer thread's first NetCDF write (chunks
# journaled before it: it writes each chunk after the journal has it).
FAULT_BIN = private_binary(os.path.join(os.environ["PS_BUILD"], "tests", "patchsweep-faults"), TMP)
kjob = write_job("kill", engine="naive", components="resid_pre,z_all_pos", chunk=2)
r = run(["sweep", kjob, "--output", f"{TMP}/kref.nc"])
check("reference run of the kill job", r.returncode == 0, r.stderr[-400:])
kref, _ = values(f"{TMP}/kref.nc")
out = f"{TMP}/kill.nc"


def run_fault(fault, ranks, args):
    """Run the fault binary with PS_FAULT=fault (rank 0 acts on it; under
    mpirun -x passes it on) and wait for every process of the run."""
    cmd = ((["mpirun", "--oversubscribe", "-x", "PS_FAULT", "-np", str(ranks)] if ranks else [])
           + [FAULT_BIN] + args)
    p = subprocess.Popen(cmd, env=dict(MPI_ENV, PS_FAULT=fault), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    so, se = p.communicate(timeout=600)
    # mpirun may be reaped before its ranks are: wait for the group to go
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    return p.returncode, so, se


KILLS = ([("journal_sync:4:kill", 2), ("results_window:1:kill", 0)] if QUICK else
         [("journal_sync:1:kill", 0), ("journal_sync:4:kill", 2), ("journal_sync:8:kill", 0),
          ("journal_sync:13:kill", 2), ("results_window:1:kill", 0), ("results_window:1:kill", 2)])
for k, (fault, ranks) in enumerate(KILLS):
    if os.path.exists(out):
        os.remove(out)
    what = f"SIGKILL at {fault.rsplit(':', 1)[0]}{f' ({ranks} ranks)' if ranks else ''}"
    rc, so, se = run_fault(fault, ranks, ["sweep", kjob])
    site, n = fault.split(":")[:2]
    fired = f"fault: {site} #{n}: kill" in se
    check(f"{what}: the fault fired and killed the run", fired and rc != 0, f"exit {rc}: {se[-400:]}")
    j = out + ".journal"
    if fault == "journal_sync:4:kill":
        # a torn record: the tail of the last record cut off mid-write
        size = os.path.getsize(j) if os.path.exists(j) else 0
        check(f"{what}: a journal with records to tear", size > 600, size)
        if size > 600:
            with open(j, "r+b") as f:
                f.truncate(size - 5)
    check(f"{what}: no file under the final name", not os.path.exists(out))
    r = run(["sweep", kjob])
    ok = r.returncode == 0 and os.path.exists(out) and same(kref, values(out)[0])
    check(f"{what}, rerun: identical values", ok, r.stderr[-400:])
    # from the first chunk journaled on, the rerun takes prompts from the journal
    check(f"{what}, rerun: resumes from the journal" if fault != "journal_sync:1:kill" else
          f"{what}, rerun: nothing to resume", ("from an earlier run" in r.stdout) == (fault != "journal_sync:1:kill"),
          r.stdout[-400:])
    check(f"{what}: journal removed when complete", not os.path.exists(j))

# --- SIGTERM ----------------------------------------------------------------
# SIGTERM once the journal holds 3 syncs (open + 2 chunks of 2 prompts): a
# clean stop after the current chunk.  A run that finishes anyway fails.
for ranks in (0, 2):
    os.remove(out)
    what = f"SIGTERM{f' ({ranks} ranks)' if ranks else ''}"
    rc, so, se = run_fault("journal_sync:3:term", ranks, ["sweep", kjob])
    check(f"{what}: the fault fired", "fault: journal_sync #3: term" in se, se[-400:])
    check(f"{what} exits with status 3", rc == 3, f"{rc} {se[-300:]}")
    if not os.path.exists(out):
        check(f"{what} leaves a readable file", False, "no file")
        continue
    v, attrs = values(out)
    done = v["done"]
    check(f"{what} leaves a readable file marked incomplete", attrs["complete"] == 0 and 0 < done.sum() < 24,
          f"{attrs.get('complete')} {done.sum()}")
    pend = done == 0
    check(f"{what}: prompts not done read as NaN in xarray (metrics, grids, length), done ones as numbers",
          all(np.isnan(v[k][pend]).all() for k in ("clean_metric", "corrupted_metric", "resid_pre", "z_all_pos", "length"))
          and np.isfinite(v["clean_metric"][~pend]).all()
          and (v["length"][~pend] > 0).all(), {k: v[k][pend][:3] for k in ("clean_metric", "length")})
    r = run(["sweep", kjob, "--resume"])
    check(f"resume after {what} completes with identical values",
          r.returncode == 0 and "from an earlier run" in r.stdout and same(kref, values(out)[0]), r.stdout + r.stderr)

# --- bad input --------------------------------------------------------------
lines = open(data).read().splitlines()
bad = json.loads(lines[3])
bad["corrupted"] = bad["corrupted"] + " again"
multi = json.loads(lines[5])
multi["answer"] = " John Smith"
with open(f"{TMP}/bad.jsonl", "w") as f:
    f.write("\n".join(lines[:3] + [json.dumps(bad)] + [lines[4]] + [json.dumps(multi)] + lines[6:10]) + "\n")
ro = os.path.join(TMP, "nowhere")
CASES = [
    ("missing key", "[model]\ndir = model\n[run]\noutput = x.nc\n", "dataset", 1),
    ("unknown component", "[model]\ndir = model\n[data]\ndataset = ioi.jsonl\n[patch]\ncomponents = resid_pree\n"
                          "[run]\noutput = x.nc\n", "resid_pree", 1),
    ("unknown key", "[model]\ndir = model\ncolour = red\n[data]\ndataset = ioi.jsonl\n[run]\noutput = x.nc\n",
     "colour", 1),
    ("unequal lengths and multi-token answer", "[model]\ndir = model\n[data]\ndataset = bad.jsonl\n[run]\noutput = x.nc\n",
     "lines 4, 6", 1),
    ("output directory missing", "[model]\ndir = model\n[data]\ndataset = ioi.jsonl\n[run]\n"
                                 f"output = {ro}/x.nc\n", "does not exist", 1),
    ("dataset missing", "[model]\ndir = model\n[data]\ndataset = none.jsonl\n[run]\noutput = x.nc\n", "none.jsonl", 1),
]
for name, text, frag, code in CASES:
    path = os.path.join(TMP, "bad.ini")
    open(path, "w").write(text)
    r = run(["sweep", path], ranks=2 if name == "unknown component" else 0)
    # our lines only: mpirun adds its own banner when a rank exits non-zero
    lines_err = [l for l in r.stderr.strip().splitlines() if l.startswith("patchsweep")]
    check(f"bad input: {name}", r.returncode == code and len(lines_err) == 1 and frag in lines_err[0],
          f"{r.returncode} {r.stderr!r}")
    check(f"bad input: {name}: no output", not os.path.exists(os.path.join(TMP, "x.nc")))
skipjob = write_job("skip", dataset="bad.jsonl", extra="skip_invalid = true\n")
r = run(["sweep", skipjob])
with xr.open_dataset(f"{TMP}/skip.nc") as ds:
    check("skip_invalid records skipped pairs", r.returncode == 0 and list(ds["skipped"].values) ==
          [0, 0, 0, 1, 0, 1, 0, 0, 0, 0] and "token length" in str(ds["skip_reason"].values[3])
          and ds.attrs["complete"] == 1, r.stderr)

shutil.rmtree(TMP, ignore_errors=True)
finish("sweep")
