"""BLAS kernels and threads (include/blas.h; README: BLAS kernels).
  - No variable set: `info` reports a core at the level the CPU supports
    (SkylakeX on AVX-512 machines; the level comes from /proc/cpuinfo here,
    it is not written into the test), self-check passed.
  - A user-set OPENBLAS_CORETYPE is kept: info reports it, source
    OPENBLAS_CORETYPE, no re-execution; also with --no-blas-autoselect.
  - --blas-core NAME / --blas-core=NAME switch by re-executing and beat the
    variable; an unknown or malformed name is refused (exit 2, one line).
  - Numbers: `patch` (every component, fast and naive engines), `run` and
    `lens` with the generic Prescott kernels agree with the default kernels
    within 1e-4, and differ from them at all (the switch took effect).
  - The real fallback, end to end: under qemu-x86_64 presenting a CPU of
    family 6 model 207 (the id of the machines of issue 11) with AVX2 and
    FMA, Debian's OpenBLAS 0.3.21 does not know the model and runs Prescott;
    patchsweep selects Haswell, re-executes (the new image runs natively:
    qemu-user passes execve to the kernel), passes the self-check and says so
    in info and in a sweep's header and file; --no-blas-autoselect keeps
    Prescott; a user's OPENBLAS_CORETYPE is kept; OPENBLAS_CORETYPE=SkylakeX
    (no AVX-512 in qemu) makes the self-check's child die of SIGILL, and the
    warning says so while the parent carries on.
  - mpirun -np 2: every rank re-executes before MPI_Init (--blas-core
    Prescott; and the qemu autoselection); the sweep's file records blas,
    blas_core, blas_threads; its numbers agree with the default core's.
  - Threads: the affinity CPUs alone, shared under mpirun -np 2 (never more
    in all than the CPUs), SLURM_CPUS_PER_TASK, OPENBLAS_NUM_THREADS,
    sweep --threads; OpenBLAS's pthreads build without an OpenMP runtime.
The qemu cases need an uninstrumented binary (an ASan binary's shadow memory
does not fit qemu-user): the sanitizer pass skips them and says so; every
qemu process runs with a 4 GiB address-space limit."""
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import xarray as xr

from checks import check, finish, skip

ROOT = os.environ["PS_ROOT"]
BIN = os.environ["PS_BIN"]
MODEL = os.path.join(ROOT, "jobs", "ioi-tiny", "model")
TMP = tempfile.mkdtemp(prefix="ps-blas-")
QEMU = shutil.which("qemu-x86_64")
# family 6, model 207 = 0xCF (extended model 0xC), AVX2 and FMA, no AVX-512 (TCG has none)
QEMU_CPU = "max,vendor=GenuineIntel,family=6,model=207"
ASAN = b"__asan_init" in open(BIN, "rb").read()
MPIRUN = ["mpirun", "--oversubscribe", "-np", "2"]
CLEAN = "After John and Mary went to the store, Mary gave a bottle of milk to"
CORRUPTED = "After John and Mary went to the store, John gave a bottle of milk to"


def base_env(**extra):
    """The environment without any BLAS or launcher setting of the caller."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith(("OPENBLAS_", "OMP_", "GOTO_", "PATCHSWEEP_BLAS", "SLURM_", "PMIX_", "PMI_"))
                   or k.startswith("OMPI_COMM_WORLD"))}
    env.update(extra)
    return env


def limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def run(args, env=None, prefix=(), qemu=False, timeout=600):
    cmd = list(prefix) + ([QEMU, "-cpu", QEMU_CPU] if qemu else []) + [BIN] + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=TMP, env=env or base_env(), timeout=timeout,
                          preexec_fn=limit_memory if qemu else None)


def json_docs(text):
    """Every JSON document of a stream (mpirun: one per rank)."""
    dec, i, out = json.JSONDecoder(), 0, []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return out
        doc, i = dec.raw_decode(text, i)
        out.append(doc)


def info(*args, **kw):
    r = run(["info", "--model", MODEL, "--json", *args], **kw)
    if r.returncode != 0:
        return None, r
    return json_docs(r.stdout)[0]["blas"], r


LEVELS = {"prescott": 0, "core2": 0, "nehalem": 0, "barcelona": 0, "sandybridge": 1, "haswell": 2, "zen": 2,
          "skylakex": 3, "cooperlake": 3, "sapphirerapids": 3}

# --- what the CPU supports, as Linux lists it -----------------------------------------
flags = set()
for line in open("/proc/cpuinfo"):
    if line.startswith("flags"):
        flags = set(line.split(":", 1)[1].split())
        break
if {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= flags:
    cpu_level = 3
elif {"avx2", "fma"} <= flags:
    cpu_level = 2
elif "avx" in flags:
    cpu_level = 1
else:
    cpu_level = 0
affinity = len(os.sched_getaffinity(0))

# --- the default: OpenBLAS's choice or patchsweep's, at the CPU's level -----------
b, r = info()
check("info --json runs", b is not None, r.stderr)
print("default:", json.dumps(b))
check(f"default core {b['core']} at the CPU's level ({cpu_level}) or above",
      LEVELS.get(b["core"].lower(), -1) >= cpu_level, b)
check("default: chosen by OpenBLAS or patchsweep, self-check passed, nothing on stderr",
      b["source"] in ("openblas", "autoselect") and b["selfcheck"] == "passed" and r.stderr == "", (b, r.stderr))
r = run(["info", "--model", MODEL])
check("info (text) names the core, why, the self-check and the CPU",
      re.search(r"^blas +OpenBLAS [0-9.]+ \(pthreads\), core " + b["core"] + r" \(.*self-check passed\), \d+ threads$",
                r.stdout, re.M) is not None and re.search(r"^cpu +\S+ family \d+ model \d+:", r.stdout, re.M)
      is not None, r.stdout)
check("OpenBLAS's pthreads build, no OpenMP runtime linked", b["threading"] == "pthreads"
      and "libgomp" not in subprocess.run(["ldd", BIN], capture_output=True, text=True).stdout, b["threading"])

# --- the user's variable is kept -----------------------------------------------------
for core in ("Haswell", "Prescott"):
    u, r = info(env=base_env(OPENBLAS_CORETYPE=core))
    check(f"OPENBLAS_CORETYPE={core} kept: reported, no re-execution",
          u and u["core"] == core and u["source"] == "OPENBLAS_CORETYPE" and not u["reexecuted"]
          and u["openblas_choice"] is None and u["selfcheck"] == "passed" and r.stderr == "", (u, r.stderr))
u, r = info("--no-blas-autoselect", env=base_env(OPENBLAS_CORETYPE="Nehalem"))
check("OPENBLAS_CORETYPE with --no-blas-autoselect kept", u and u["core"] == "Nehalem"
      and u["source"] == "OPENBLAS_CORETYPE" and not u["reexecuted"], u)
u, r = info(env=base_env(OPENBLAS_CORETYPE="NoSuchCore"))
# OpenBLAS's detection after an unknown name need not pick the core it picks
# with nothing set (0.3.21 on a family 6 model 167 CPU: Cooperlake, not
# SkylakeX): the check is that the kernels it runs suit the CPU and are named.
check("an unknown OPENBLAS_CORETYPE: kept, OpenBLAS's detection runs, one warning naming its core",
      u and LEVELS.get(u["core"].lower(), -1) >= cpu_level and u["source"] == "OPENBLAS_CORETYPE"
      and r.stderr.count("\n") == 1
      and f"OPENBLAS_CORETYPE=NoSuchCore, but OpenBLAS runs its {u['core']} kernels" in r.stderr,
      (u, r.stderr))

# --- --blas-core -----------------------------------------------------------------------
o, r = info("--blas-core", "Prescott")
check("--blas-core Prescott: re-executed, reported", o and o["core"] == "Prescott" and o["source"] == "--blas-core"
      and o["reexecuted"] and o["openblas_choice"] == b["core"] and o["selfcheck"] == "passed", (o, r.stderr))
o, r = info("--blas-core=Nehalem", env=base_env(OPENBLAS_CORETYPE="Haswell"))
check("--blas-core=Nehalem beats OPENBLAS_CORETYPE=Haswell", o and o["core"] == "Nehalem"
      and o["source"] == "--blas-core", (o, r.stderr))
o, r = info("--blas-core", b["core"].lower())
check("--blas-core naming the running core (any case): no re-execution", o and o["core"] == b["core"]
      and o["source"] == "--blas-core" and not o["reexecuted"], o)
r = run(["--blas-core", "Prescott", "info", "--model", MODEL, "--json"])
check("--blas-core before the command", r.returncode == 0 and json_docs(r.stdout)[0]["blas"]["core"] == "Prescott",
      r.stderr)
for bad, msg in ((["--blas-core", "NoSuchCore"], "--blas-core NoSuchCore: OpenBLAS runs its"),
                 (["--blas-core", "Sky lake"], "--blas-core takes an OpenBLAS core name"),
                 (["--blas-core"], "--blas-core takes an OpenBLAS core name such as SkylakeX, Haswell or Prescott, "
                                   "not nothing")):
    r = run(["info", "--model", MODEL] + bad)
    check(f"refused: {' '.join(bad)}", r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1
          and msg in r.stderr, (r.returncode, r.stderr))
r = run(["tokenize", "--model", MODEL, "--", "--blas-core"])
check("after --, --blas-core is an operand", r.returncode == 0 and "--" in r.stdout, (r.stdout, r.stderr))

# --- numbers: generic kernels vs the default ones --------------------------------------
# An F32 model: OpenBLAS computes its full-vocabulary logits (a 2-byte
# model's go through patchsweep's own kernels, like its blocks' products,
# so the OpenBLAS core would not show in its results).
MODEL32 = os.path.join(TMP, "f32-model")
subprocess.run([sys.executable, os.path.join(ROOT, "tests/tools/make_model.py"), "-o", MODEL32, "--layers", "2",
                "--heads", "4", "--d-model", "128", "--vocab", "50257", "--n-positions", "64", "--dtype", "f32",
                "--seed", "7", "--tokenizer", os.environ["PS_TOKENIZER"]], check=True, capture_output=True)
PATCH = ["patch", "--model", MODEL32, "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", " John", "--wrong",
         " Mary", "--components", "block_every,resid_mid,z,head_all_pos_every", "--json"]
for engine in ("fast", "naive"):
    res = {}
    for core in (None, "Prescott"):
        r = run(PATCH + ["--engine", engine] + (["--blas-core", core] if core else []))
        res[core] = json.loads(r.stdout) if r.returncode == 0 else None
        check(f"patch --engine {engine} with {core or 'the default core'}", res[core] is not None, r.stderr)
    a, g = res[None], res["Prescott"]
    worst, identical = 0.0, True
    for comp, v in a["components"].items():
        x, y = np.array(v["values"], dtype=float), np.array(g["components"][comp]["values"], dtype=float)
        worst = max(worst, float(np.nanmax(np.abs(x - y))), abs(a["clean_metric"] - g["clean_metric"]))
        identical = identical and np.array_equal(x, y, equal_nan=True)
    check(f"patch --engine {engine}: Prescott within 1e-4 of {b['core']} (max |diff| {worst:.2e}), "
          f"{len(a['components'])} components", worst < 1e-4, worst)
    # The transformer's own products run on patchsweep's gemm kernels whatever
    # the OpenBLAS core; OpenBLAS computes the full-vocabulary logits (the
    # unpatched metrics, and every naive forward's last row), so the
    # switch shows there.
    identical = identical and a["clean_metric"] == g["clean_metric"] and a["corrupted_metric"] == g["corrupted_metric"]
    check(f"patch --engine {engine}: the kernels differ (results not bit-identical)", not identical)
for cmd in (["run", "--model", MODEL32, "--prompt", "The capital of France is", "--top-k", "20", "--json"],
            ["lens", "--model", MODEL32, "--prompt", CLEAN, "--answer", " John", "--json"]):
    outs = [run(cmd + extra) for extra in ([], ["--blas-core", "Prescott"])]
    ok = all(o.returncode == 0 for o in outs)
    nums = [np.array([float(t) for t in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", o.stdout)]) for o in outs] if ok else []
    same_shape = ok and nums[0].shape == nums[1].shape and nums[0].size > 10
    worst = float(np.max(np.abs(nums[0] - nums[1]))) if same_shape else None
    check(f"{cmd[0]}: Prescott within 1e-4 of the default core ({worst})", same_shape and worst < 1e-4,
          [o.stderr for o in outs])

# --- provenance of a written file ----------------------------------------------------------
r = run(PATCH[:-1] + ["-o", "p.nc", "--blas-core", "Prescott"])
with xr.open_dataset(os.path.join(TMP, "p.nc")) as ds:
    a = ds.attrs
    check("patch -o: blas, blas_core, blas_threads", a.get("blas_core") == "Prescott"
          and "core Prescott (set by --blas-core; self-check passed)" in a.get("blas", "")
          and a.get("blas_threads") == str(affinity), a)

# --- threads ---------------------------------------------------------------------------
t, _ = info()
check(f"threads: the affinity CPUs ({affinity})", t["threads"] == affinity and t["threads_rule"] == "CPUs", t)
r = subprocess.run([BIN, "info", "--model", MODEL, "--json"], capture_output=True, text=True, env=base_env(),
                   preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
t = json_docs(r.stdout)[0]["blas"] if r.returncode == 0 else {}
check("threads: a one-CPU affinity mask gives 1", t.get("threads") == 1, (t, r.stderr))
t, _ = info(env=base_env(SLURM_CPUS_PER_TASK="1"))
check("threads: SLURM_CPUS_PER_TASK", t["threads"] == 1 and t["threads_rule"] == "SLURM_CPUS_PER_TASK", t)
t, _ = info(env=base_env(OPENBLAS_NUM_THREADS="1"))
check("threads: the user's OPENBLAS_NUM_THREADS", t["threads"] == 1
      and t["threads_rule"] == "OPENBLAS_NUM_THREADS/OMP_NUM_THREADS", t)
# --tag-output: the two ranks' JSON documents reach mpirun's stdout in chunks
# that may interleave; each line tagged "[job,rank]<stdout>:" is put back
# with its own rank's lines before parsing.
r = run(["info", "--model", MODEL, "--json"], prefix=MPIRUN + ["--tag-output"])
by_rank = {}
for line in r.stdout.splitlines():
    tag, sep, rest = line.partition("<stdout>:")
    if sep:
        by_rank.setdefault(tag, []).append(rest)
docs = [d for lines in by_rank.values() for d in json_docs("\n".join(lines))] if r.returncode == 0 else []
check("mpirun -np 2 info: each rank's threads shared, never more than the CPUs in all",
      len(docs) == 2 and all(d["blas"]["threads_rule"] == "CPUs / ranks on the node"
                             and 2 * d["blas"]["threads"] <= max(2, affinity) for d in docs), (r.stdout, r.stderr))

# --- mpirun: every rank re-executes before MPI_Init --------------------------------------
subprocess.run([BIN, "make-dataset", "ioi", "--n", "6", "--seed", "4711", "-o", os.path.join(TMP, "ioi.jsonl")],
               check=True, capture_output=True)
with open(os.path.join(TMP, "job.ini"), "w") as f:
    f.write(f"[model]\ndir = {MODEL}\n[data]\ndataset = ioi.jsonl\n[patch]\n"
            "components = resid_pre,attn_out,z_all_pos\n[run]\noutput = default.nc\nchunk_prompts = 3\n")


def sweep(out, *extra, qemu=False):
    r = run(["sweep", "job.ini", "--overwrite", "--output", out, *extra], prefix=MPIRUN, qemu=qemu)
    if r.returncode != 0:
        return None, r
    with xr.open_dataset(os.path.join(TMP, out)) as ds:
        return ({k: ds[k].values.copy() for k in ("resid_pre", "attn_out", "z_all_pos", "clean_metric")},
                dict(ds.attrs)), r


ref, r = sweep("default.nc")
check("mpirun -np 2 sweep, default core", ref is not None, r.stderr)
gen, r = sweep("prescott.nc", "--blas-core", "Prescott")
check("mpirun -np 2 sweep --blas-core Prescott: both ranks switched before MPI_Init", gen is not None
      and gen[1]["blas_core"] == "Prescott" and gen[1]["mpi_ranks"] == "2"
      and "core Prescott (set by --blas-core; self-check passed)" in r.stderr
      and re.search(r"\d+ threads per rank", gen[1]["blas"]) is not None, r.stderr)
if ref and gen:
    worst = max(float(np.nanmax(np.abs(ref[0][k] - gen[0][k]))) for k in ref[0])
    check(f"sweep: Prescott within 1e-4 of the default core ({worst:.2e})", worst < 1e-4, worst)
r = run(["sweep", "job.ini", "--overwrite", "--output", "t1.nc", "--threads", "1"])
with xr.open_dataset(os.path.join(TMP, "t1.nc")) as ds:
    check("sweep --threads 1: header and file", r.returncode == 0 and "1 threads per rank" in r.stderr
          and ds.attrs["blas_threads"] == "1", r.stderr)
# More threads than CPUs (a rank bound to one core): a warning that says how
# to give the rank its cores; none when it has them.
r = run(["sweep", "job.ini", "--overwrite", "--output", "t2.nc", "--threads", "2"], prefix=["taskset", "-c", "0"])
check("sweep --threads 2 on one CPU: the warning names mpirun's and srun's remedies", r.returncode == 0
      and "warning: 2 threads per rank, but rank 0 may run on 1 CPU only" in r.stderr
      and "--map-by slot:PE=2" in r.stderr and "srun --cpus-per-task=2" in r.stderr, r.stderr)
if affinity >= 2:
    r = run(["sweep", "job.ini", "--overwrite", "--output", "t2.nc", "--threads", "2"])
    check("sweep --threads 2 on 2 CPUs: no warning", r.returncode == 0 and "warning" not in r.stderr, r.stderr)

# --- the real fallback, under qemu -----------------------------------------------------
if ASAN:
    skip("the qemu cases", "an ASan binary does not run under qemu-user (the release pass runs them)")
else:
    check("qemu-x86_64 installed (make deps: qemu-user)", QEMU is not None)
    if QEMU:
        q, r = info("--no-blas-autoselect", qemu=True)
        check("qemu, model 207, --no-blas-autoselect: OpenBLAS 0.3.21 falls back to Prescott",
              q and q["core"] == "Prescott" and q["source"] == "openblas" and q["cpu"]["model"] == 207
              and q["cpu"]["best_core"] == "Haswell" and not q["reexecuted"], (q, r.stderr))
        q, r = info(qemu=True)
        check("qemu, model 207: patchsweep selects Haswell, re-executes, self-check passes",
              q and q["core"] == "Haswell" and q["source"] == "autoselect" and q["openblas_choice"] == "Prescott"
              and q["reexecuted"] and q["selfcheck"] == "passed" and r.stderr == "", (q, r.stderr))
        r = run(["info", "--model", MODEL], qemu=True)
        check("qemu: info (text) says so", "core Haswell (selected by patchsweep over OpenBLAS's generic Prescott; "
              "self-check passed)" in r.stdout, r.stdout)
        q, r = info(qemu=True, env=base_env(OPENBLAS_CORETYPE="Nehalem"))
        check("qemu: the user's OPENBLAS_CORETYPE is kept", q and q["core"] == "Nehalem"
              and q["source"] == "OPENBLAS_CORETYPE" and not q["reexecuted"], (q, r.stderr))
        q, r = info(qemu=True, env=base_env(OPENBLAS_CORETYPE="SkylakeX"))
        check("qemu: SkylakeX kernels without AVX-512 die in the self-check's child (SIGILL), one warning",
              q and q["core"] == "SkylakeX" and q["selfcheck"] == "failed"
              and "failed the BLAS self-check (killed by signal 4" in r.stderr, (q, r.stderr))
        auto, r = sweep("qemu.nc", qemu=True)
        check("qemu, mpirun -np 2 sweep: both ranks select Haswell and re-execute before MPI_Init",
              auto is not None and auto[1]["blas_core"] == "Haswell"
              and "selected by patchsweep over OpenBLAS's generic Prescott" in auto[1]["blas"]
              and "core Haswell (selected by patchsweep" in r.stderr, r.stderr)
        if ref and auto:
            worst = max(float(np.nanmax(np.abs(ref[0][k] - auto[0][k]))) for k in ref[0])
            check(f"qemu sweep: Haswell within 1e-4 of the default core ({worst:.2e})", worst < 1e-4, worst)

shutil.rmtree(TMP, ignore_errors=True)
finish("blas")
