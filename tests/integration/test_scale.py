"""Limits under load (issue 22, item 6), on a tiny random model so that the
compute is cheap:
  - the dataset is streamed, not held: rank 0's peak RSS (ru_maxrss of the
    process = VmHWM) after the plan is built (every record read, checked
    and tokenized; the run ends there by the fault build's exit at the
    first journal sync) grows by the per-prompt index alone (16 bytes a
    pair, sweep_internal.h; a state byte and 4 bytes a role) with the
    dataset's size;
  - a results file of many prompts written as 8 slices (`sweep --slice
    K/8`), merged, and read back (xarray and `plot`).
Two sizes: the default (make test) 10^3..10^5 pairs for the memory and
2,000 prompts merged (400 under PS_QUICK=1, the sanitizer pass, where
RSS is ASan's and not checked);
PS_SCALE=1 (make test-scale, not part of make test) 10^4..10^6 pairs and
10^5 prompts merged.  Each figure is printed as a `measured:` line."""
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np
import xarray as xr

from checks import check, finish, mpi_env, private_binary, skip

ROOT = os.environ["PS_ROOT"]
SCALE = os.environ.get("PS_SCALE") == "1"
QUICK = os.environ.get("PS_QUICK") == "1" and not SCALE
TMP = tempfile.mkdtemp(prefix="ps-scale-")
BIN = private_binary(os.environ["PS_BIN"], TMP)
FAULT_BIN = private_binary(os.path.join(os.environ["PS_BUILD"], "tests", "patchsweep-faults"), TMP)
ENV = mpi_env()
NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "James", "Sarah", "David", "Paul", "Anna"]


def make_model(name, *args):
    path = os.path.join(TMP, name)
    subprocess.run([sys.executable, f"{ROOT}/tests/tools/make_model.py", "-o", path] + list(args), check=True,
                   capture_output=True)
    return path


def write_dataset(path, n, long_prompts):
    """n pairs, equal token lengths, one-token answers (GPT-2's tokenizer)."""
    r = random.Random(n)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = r.sample(NAMES, 2)
            if long_prompts:
                clean = f"When {a} and {b} went to the store, {b} gave a drink to"
                corrupted = f"When {a} and {b} went to the store, {a} gave a drink to"
            else:
                clean, corrupted = f"{a} and {b}", f"{b} and {a}"
            f.write(json.dumps({"clean": clean, "corrupted": corrupted, "answer": " " + a, "wrong": " " + b}) + "\n")


def write_job(name, model, dataset, components):
    path = os.path.join(TMP, name + ".ini")
    with open(path, "w") as f:
        f.write(f"[model]\ndir = {model}\n[data]\ndataset = {dataset}\n[patch]\ncomponents = {components}\n"
                f"engine = fast\n[run]\noutput = {name}.nc\nprogress_seconds = 1000\n")
    return path


# The peak RSS of a process counts what its parent held before the exec (Linux
# carries the high-water mark across exec), so the binary is started by a
# small Python without site packages (~9 MiB), not by this one (~70 MiB with
# xarray), and that one reports the child's ru_maxrss.
SPAWN = ("import os, sys\n"
         "pid = os.fork()\n"
         "if pid == 0:\n"
         "    os.execv(sys.argv[1], sys.argv[1:])\n"
         "_, status, ru = os.wait4(pid, 0)\n"
         "sys.stderr.write('maxrss_kib=%d\\n' % ru.ru_maxrss)\n"
         "sys.exit(os.waitstatus_to_exitcode(status) & 255)\n")


def run(args, fault=None):
    """(exit status, stderr, seconds, peak RSS in MiB of the process)."""
    env = dict(ENV, PS_FAULT=fault) if fault else ENV
    t0 = time.time()
    p = subprocess.run([sys.executable, "-S", "-c", SPAWN, FAULT_BIN if fault else BIN] + args, env=env, cwd=TMP,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    se, _, tail = p.stderr.rpartition("maxrss_kib=")
    return p.returncode, se, time.time() - t0, int(tail.split()[0]) / 1024.0 if tail.strip() else float("nan")


# --- rank 0's memory vs the dataset's size ---------------------------------------
model = make_model("model", "--layers", "1", "--heads", "2", "--d-model", "16", "--n-positions", "64")
sizes = [10**4, 10**5, 10**6] if SCALE else [10**3, 10**4, 10**5]
rss = {}
for n in sizes:
    ds = os.path.join(TMP, f"ds{n}.jsonl")
    write_dataset(ds, n, long_prompts=True)
    job = write_job(f"plan{n}", model, ds, "resid_pre")
    # journal_sync #1: the end of the plan (read, checked, tokenized, journal opened)
    rc, se, secs, mib = run(["sweep", job], fault="journal_sync:1:exit")
    check(f"plan of {n} pairs built (the fault's exit 70 right after it)", rc == 70 and "journal_sync #1" in se,
          f"exit {rc}: {se[-800:]}")
    rss[n] = mib
    print(f"measured: plan of {n} pairs ({os.path.getsize(ds) / 2**20:.0f} MiB of JSONL): peak RSS {mib:.1f} MiB "
          f"in {secs:.1f} s", flush=True)
    os.remove(ds)
small, large = sizes[0], sizes[-1]
index_mib = (large - small) * 21 / 2**20  # the index (16 bytes), the state byte and END's role position (4)
growth = rss[large] - rss[small]
what = f"peak RSS grows by the per-prompt index alone from {small} to {large} pairs"
if QUICK:
    # AddressSanitizer keeps freed memory in quarantine (256 MiB) and maps
    # shadow memory: RSS measures it, not the program
    skip(what, f"the sanitizer build (PS_QUICK): its RSS is ASan's (+{growth:.1f} MiB here)")
else:
    check(f"{what} (+{growth:.1f} MiB; index {index_mib:.1f} MiB; holding the records cost +104 MiB at 10^5, "
          f"+1.1 GiB at 10^6)", growth < index_mib + 8, rss)

# --- many prompts: 8 slices, merge, read back ------------------------------------
# One cell a prompt (z_all_pos of one head) and 3-token prompts: the
# compute per prompt is the clean and corrupted runs and one patch.
n = 10**5 if SCALE else 400 if QUICK else 2000
tiny = make_model("tiny", "--layers", "1", "--heads", "1", "--d-model", "8", "--n-positions", "16")
ds = os.path.join(TMP, "short.jsonl")
write_dataset(ds, n, long_prompts=False)
job = write_job("many", tiny, ds, "z_all_pos")
parts, secs_sweep, peak = [], 0.0, 0.0
for k in range(1, 9):
    part = os.path.join(TMP, f"many-{k}of8.nc")
    rc, se, secs, mib = run(["sweep", job, "--slice", f"{k}/8", "--output", part])
    secs_sweep += secs
    peak = max(peak, mib)
    if not check(f"slice {k}/8 of {n} prompts", rc == 0, se[-800:]):
        break
    parts.append(part)
print(f"measured: {n} prompts as 8 slices: {secs_sweep:.1f} s, peak RSS {peak:.0f} MiB", flush=True)
merged = os.path.join(TMP, "many.nc")
if len(parts) == 8:
    rc, se, secs, mib = run(["merge"] + parts + ["-o", merged])
    check(f"merge of 8 slices into {n} prompts", rc == 0, se[-800:])
    print(f"measured: merge of {n} prompts: {secs:.1f} s, peak RSS {mib:.0f} MiB, "
          f"{os.path.getsize(merged) / 2**20:.1f} MiB written", flush=True)
if os.path.exists(merged):
    t0 = time.time()
    with xr.open_dataset(merged) as m:
        check("read back: every prompt, done, in order",
              m.sizes["prompt"] == n and bool((m["done"].values == 1).all())
              and np.array_equal(m["prompt"].values, np.arange(n)) and m.attrs.get("complete") == 1,
              f"{dict(m.sizes)} {m.attrs.get('complete')}")
        # the last slice's values, in place
        with xr.open_dataset(parts[-1]) as last:
            k0 = n - last.sizes["prompt"]
            same = all(np.array_equal(m[v].values[k0:], last[v].values, equal_nan=True)
                       for v in last.data_vars if last[v].dtype.kind == "f" and "prompt" in last[v].dims)
            check("read back: the last slice's values where they belong", same)
    print(f"measured: xarray read of {n} prompts: {time.time() - t0:.1f} s", flush=True)
    rc, se, secs, _ = run(["plot", merged, "--mean", "-o", os.path.join(TMP, "many.svg")])
    check(f"plot --mean of {n} prompts", rc == 0 and os.path.getsize(os.path.join(TMP, "many.svg")) > 0, se[-800:])
    print(f"measured: plot of {n} prompts: {secs:.1f} s", flush=True)

finish("test_scale")
