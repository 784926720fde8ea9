"""Faults a cluster really has (issue 22), each injected deterministically
by the test build of the binary (patchsweep-faults, include/patchsweep/fault.h)
or by a real small file system, never by a guessed sleep:
  - two sweeps on one output: the second is refused at once naming the
    owner's pid and host, the journal untouched; a dead owner's lock is
    taken over and the run resumes;
  - a journal damaged in the middle (bit flip, zeroed page): refused with
    the record and prompts, --resume-from-damage recomputes from there; a
    damaged or truncated results file is refused by plot, merge and resume;
  - disk full, quota, I/O error on write and fsync of the journal, the
    results file, the lens file and merge: exit 1, one line, no file under
    the final name, and the rerun ends identical;
  - the results writer thread fails (an error, SIGKILL) mid-run: exit 1 with
    one line (or the kill), the journal kept, the rerun resumes identical;
  - a rank that dies (SIGKILL, exit) or fails, rank 0 or not, in both
    distributions: the job ends within seconds, non-zero, and the rerun
    resumes with nothing lost.
PS_QUICK=1 (the sanitizer pass) runs each fault kind once: 4 of the 9 I/O
faults (each errno and site), one damaged-journal case, 3 of the 10 rank
deaths (each way to die, rank 0 and 1, both distributions), no tmpfs merge.
Each timed outcome is printed (`measured:` lines) for the failure-modes table."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import xarray as xr

from checks import check, finish, mpi_env, private_binary, skip

ROOT = os.environ["PS_ROOT"]
QUICK = os.environ.get("PS_QUICK") == "1"
TMP = tempfile.mkdtemp(prefix="ps-faults-")
BIN = private_binary(os.environ["PS_BIN"], TMP)
FAULT_BIN = private_binary(os.path.join(os.environ["PS_BUILD"], "tests", "patchsweep-faults"), TMP)
MPI_ENV = mpi_env()

model = os.path.join(TMP, "model")
subprocess.run([sys.executable, f"{ROOT}/tests/tools/make_model.py", "--layers", "3", "--heads", "4", "--d-model",
                "32", "--n-positions", "64", "--std", "0.3", "-o", model], check=True, capture_output=True)
subprocess.run([BIN, "make-dataset", "ioi", "--n", "24", "--seed", "11", "-o", os.path.join(TMP, "ioi.jsonl")],
               check=True, capture_output=True)


def write_job(name, chunk=2, run_extra="", extra="", out_dir=None):
    path = os.path.join(TMP, name + ".ini")
    out = os.path.join(out_dir, name + ".nc") if out_dir else name + ".nc"
    with open(path, "w") as f:
        f.write(f"[model]\ndir = {model}\n[data]\ndataset = {TMP}/ioi.jsonl\n"
                f"[patch]\ncomponents = resid_pre,z_all_pos\nengine = naive\n{extra}"
                f"[run]\noutput = {out}\nchunk_prompts = {chunk}\nprogress_seconds = 100\n{run_extra}")
    return path


def run(args, ranks=0, binary=None, fault=None, timeout=600):
    """Run to the end; (exit status, stdout, stderr, seconds).  Under mpirun
    -x passes PS_FAULT on; the process group is waited for."""
    cmd = ((["mpirun", "--oversubscribe", "-np", str(ranks)] + (["-x", "PS_FAULT"] if fault else []))
           if ranks else []) + [binary or (FAULT_BIN if fault else BIN)] + args
    env = dict(MPI_ENV, PS_FAULT=fault) if fault else MPI_ENV
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, cwd=TMP)
    so, se = p.communicate(timeout=timeout)
    secs = time.time() - t0
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    return p.returncode, so, se, secs


def wait_stopped(pid, timeout=120):
    """Wait until process pid is stopped (state T: a `stop` fault) or gone."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                    return True
        except FileNotFoundError:
            return False
        time.sleep(0.02)
    return False


def values(path):
    with xr.open_dataset(path) as ds:
        return {k: ds[k].values.copy() for k in ds.data_vars if ds[k].dtype.kind in "fi"}, dict(ds.attrs)


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def clean(out):
    for suffix in ("", ".journal", ".lock", ".partial", ".sha256"):
        if os.path.exists(out + suffix):
            os.remove(out + suffix)


def measured(what, rc, secs):
    print(f"measured: {what}: exit {rc} after {secs:.1f} s", flush=True)


job = write_job("f")
OUT = os.path.join(TMP, "f.nc")
rc, so, se, _ = run(["sweep", job, "--output", "ref.nc"])
check("reference run", rc == 0, se[-400:])
REF, _ = values(os.path.join(TMP, "ref.nc"))

# --- two sweeps, one output ---------------------------------------------------
# A stops itself (SIGSTOP) once its journal holds the open and 2 chunks: it
# owns the output; B on the same output must be refused at once.
for second in (["sweep", job], ["sweep", job, "--overwrite"]):
    clean(OUT)
    how = " ".join(second[2:]) or "plain"
    a = subprocess.Popen([FAULT_BIN, "sweep", job], env=dict(MPI_ENV, PS_FAULT="journal_sync:3:stop"), cwd=TMP,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    check(f"two sweeps ({how}): the first stops holding the output", wait_stopped(a.pid))
    jsize = os.path.getsize(OUT + ".journal")
    rc, so, se, secs = run(second)
    measured(f"second sweep on a locked output ({how})", rc, secs)
    check(f"two sweeps ({how}): the second is refused with the owner's pid and host",
          rc == 1 and f"pid {a.pid} on host {socket.gethostname()}" in se and "in use by another run" in se
          and len([l for l in se.splitlines() if l.startswith("patchsweep:")]) == 1, se[-600:])
    check(f"two sweeps ({how}): the owner's journal untouched", os.path.getsize(OUT + ".journal") == jsize)
    os.kill(a.pid, signal.SIGCONT)
    a.communicate(timeout=600)
    check(f"two sweeps ({how}): the owner completes, identical values", a.returncode == 0 and same(REF, values(OUT)[0]),
          a.returncode)
    check(f"two sweeps ({how}): lock released", not os.path.exists(OUT + ".lock"))

# A stale lock: its owner killed while it held it.
clean(OUT)
a = subprocess.Popen([FAULT_BIN, "sweep", job], env=dict(MPI_ENV, PS_FAULT="journal_sync:3:stop"), cwd=TMP,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
wait_stopped(a.pid)
os.kill(a.pid, signal.SIGKILL)
a.communicate()
stale = open(OUT + ".lock").read() if os.path.exists(OUT + ".lock") else ""
check("stale lock: the dead owner's lock file is left behind", f"pid {a.pid}" in stale, stale)
rc, so, se, secs = run(["sweep", job])
measured("sweep on the stale lock of a killed sweep", rc, secs)
check("stale lock: taken over, the run resumes and ends identical",
      rc == 0 and "from an earlier run" in so and same(REF, values(OUT)[0]) and not os.path.exists(OUT + ".lock"),
      se[-400:])

# --- disk full, quota, I/O errors -------------------------------------------------
# Injected: from the Nth write/fsync of a site on, every call fails with the
# errno (fault.h).  Each: exit 1, one line with the system's reason, no file
# under the final name, the journal's finished records kept; the rerun
# without the fault ends identical to the reference.
lens_job = write_job("fl", extra="", run_extra="") 
with open(lens_job, "a") as f:
    f.write("[lens]\nenabled = true\ntop_k = 3\noutput = fl-lens.nc\n")
LENS_OUT = os.path.join(TMP, "fl-lens.nc")
rc, so, se, _ = run(["sweep", lens_job, "--output", "lensref.nc"])
check("reference run with [lens]", rc == 0 and os.path.exists(LENS_OUT), se[-300:])
os.rename(LENS_OUT, os.path.join(TMP, "lensref-lens.nc"))
os.rename(LENS_OUT + ".sha256", os.path.join(TMP, "lensref-lens.nc.sha256"))
LENS_REF, _ = values(os.path.join(TMP, "lensref-lens.nc"))
IO_FAULTS = [
    ("journal append: ENOSPC", "write.journal:5:enospc", "No space left on device"),
    ("journal append: EIO", "write.journal:9:eio", "Input/output error"),
    ("journal fsync: EDQUOT", "fsync.journal:3:edquot", "Disk quota exceeded"),
    ("journal fsync: EIO", "fsync.journal:4:eio", "Input/output error"),
    ("NetCDF create: ENOSPC", "write.nc:1:enospc", "No space left on device"),
    ("NetCDF write: EDQUOT", "write.nc:30:edquot", "Disk quota exceeded"),
    ("NetCDF write: EIO", "write.nc:12:eio", "Input/output error"),
    ("NetCDF fsync: ENOSPC", "fsync.nc:1:enospc", "No space left on device"),
    ("lens file write: ENOSPC", "fsync.nc:2:enospc", "No space left on device"),
]
# PS_QUICK (the sanitizer pass): each errno, the journal's write and fsync,
# the NetCDF file's write and the lens file once.
QUICK_IO = [IO_FAULTS[0], IO_FAULTS[2], IO_FAULTS[6], IO_FAULTS[8]]
for what, fault, frag in (QUICK_IO if QUICK else IO_FAULTS):
    lens = what.startswith("lens")
    j = lens_job if lens else job
    out = os.path.join(TMP, "fl.nc" if lens else "f.nc")
    for p_ in (out, LENS_OUT):
        clean(p_)
    rc, so, se, secs = run(["sweep", j], fault=fault)
    measured(f"sweep with {what}", rc, secs)
    lines = [l for l in se.splitlines() if l.startswith("patchsweep:")]
    check(f"{what}: exit 1, one line with the reason", rc == 1 and len(lines) == 1 and frag in lines[0]
          and f"fault: {fault.split(':')[0]}" in se, se[-500:])
    final = LENS_OUT if lens else out
    check(f"{what}: nothing under the final name, no .partial", not os.path.exists(final)
          and not os.path.exists(final + ".partial") and not os.path.exists(final + ".sha256"))
    rc, so, se, secs = run(["sweep", j])
    ok = rc == 0 and same(REF, values(out)[0]) and (not lens or same(LENS_REF, values(LENS_OUT)[0]))
    resumed = lens or "from an earlier run" in so or "already the complete result" in so
    check(f"{what}: the rerun ends identical{' (lens written)' if lens else ''}", ok and resumed, se[-400:] + so[-300:])

def run_bounded(args, ranks, fault, limit=120):
    cmd = ["mpirun", "--oversubscribe", "-np", str(ranks), "-x", "PS_FAULT", FAULT_BIN] + args
    t0 = time.time()
    p = subprocess.Popen(cmd, env=dict(MPI_ENV, PS_FAULT=fault), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True, cwd=TMP)
    try:
        so, se = p.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        so, se = p.communicate()
        return None, so, se, time.time() - t0
    secs = time.time() - t0
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    return p.returncode, so, se, secs



# --- the writer thread fails -------------------------------------------------------
# Rank 0's writer thread builds the results file while the chunks compute
# (src/engine/sweep_writer.c).  A failure there in the middle of the run
# (the site sweep_writer: its Nth chunk taken from the queue) stops the run
# on every rank: exit 1 with one line, nothing under the final name, no
# .partial file; the journal keeps every chunk finished, and the rerun
# resumes and ends identical.  A SIGKILL there leaves the journal (and a
# .partial file that the rerun replaces).
WRITER_FAULTS = [("sweep_writer:3:error", 0), ("sweep_writer:2:error@0", 2), ("sweep_writer:4:kill", 0)]
for fault, ranks in (WRITER_FAULTS[:2] if QUICK else WRITER_FAULTS):
    clean(OUT)
    where = f"{fault}, {ranks or 1} rank{'s' if ranks else ''}"
    if ranks:
        rc, so, se, secs = run_bounded(["sweep", job], ranks, fault)
    else:
        rc, so, se, secs = run(["sweep", job], fault=fault)
    measured(f"writer thread {where}", rc, secs)
    lines = [l for l in se.splitlines() if l.startswith("patchsweep:")]
    if fault.split(":")[2].startswith("error"):
        check(f"writer {where}: exit 1, one line", rc == 1 and len(lines) == 1
              and "injected fault at sweep_writer" in lines[0] and "fault: sweep_writer #" in se, f"exit {rc}: {se[-500:]}")
        check(f"writer {where}: no file under the final name, no .partial", not os.path.exists(OUT)
              and not os.path.exists(OUT + ".partial") and not os.path.exists(OUT + ".sha256"))
    else:
        check(f"writer {where}: killed, no file under the final name", rc == -signal.SIGKILL and not os.path.exists(OUT),
              f"exit {rc}: {se[-300:]}")
    check(f"writer {where}: the journal kept", os.path.exists(OUT + ".journal"))
    rc, so, se, secs = run(["sweep", job], ranks=ranks)
    check(f"writer {where}: the rerun resumes and ends identical", rc == 0 and "from an earlier run" in so
          and same(REF, values(OUT)[0]), se[-400:] + so[-300:])

# merge onto a failing disk
for fault in ("write.nc:20:enospc",) if QUICK else ("write.nc:20:enospc", "fsync.nc:1:eio"):
    rc, so, se, secs = run(["merge", "part1.nc", "part2.nc", "-o", "m3.nc"], fault=fault)
    measured(f"merge with {fault}", rc, secs)
    check(f"merge with {fault}: exit 1, one line, no output", rc == 1 and
          len([l for l in se.splitlines() if l.startswith("patchsweep:")]) == 1
          and not os.path.exists(os.path.join(TMP, "m3.nc")) and not os.path.exists(os.path.join(TMP, "m3.nc.partial")),
          se[-400:])

# --- damaged files --------------------------------------------------------------
# A journal of 10 chunks (20 records) left by a kill, then damaged in the
# middle: a flipped bit in record 5, a zeroed page.  Records are found by
# their magic "PSR1" after the 512-byte header.
def record_offsets(path):
    data = open(path, "rb").read()
    offs, off = [], 512
    while off + 8 <= len(data) and data[off:off + 4] == b"PSR1":
        end = off + 16 + int.from_bytes(data[off + 4:off + 8], "little")
        if end > len(data):
            break  # a torn last record
        offs.append(off)
        off = end
    return offs


for how in ("bit flip in record 5",) if QUICK else ("bit flip in record 5", "zeroed page"):
    clean(OUT)
    rc, so, se, _ = run(["sweep", job], fault="journal_sync:11:kill")
    jpath = OUT + ".journal"
    offs = record_offsets(jpath)
    check(f"damaged journal ({how}): 20 records journaled before the kill", rc != 0 and len(offs) == 20, len(offs))
    with open(jpath, "r+b") as f:
        if how.startswith("bit"):
            f.seek(offs[4] + 8 + 40)  # a metric of record 5's payload
            b = f.read(1)
            f.seek(offs[4] + 8 + 40)
            f.write(bytes([b[0] ^ 0x04]))
            first_bad = 5
        else:
            f.seek(4096)
            f.write(bytes(4096))
            first_bad = 1 + max(i for i, o in enumerate(offs) if o < 4096)
    size = os.path.getsize(jpath)
    rc, so, se, secs = run(["sweep", job])
    lines = [l for l in se.splitlines() if l.startswith("patchsweep:")]
    measured(f"sweep on a journal with {how}", rc, secs)
    check(f"damaged journal ({how}): refused with the record, the prompts and what to do",
          rc == 1 and len(lines) == 1 and f"record {first_bad} (byte" in lines[0] and "prompts" in lines[0]
          and "--resume-from-damage" in lines[0], se[-600:])
    check(f"damaged journal ({how}): journal untouched, no result", os.path.getsize(jpath) == size
          and not os.path.exists(OUT))
    rc, so, se, secs = run(["sweep", job, "--resume-from-damage"])
    check(f"damaged journal ({how}): --resume-from-damage recomputes from record {first_bad}: identical values",
          rc == 0 and f"journal record {first_bad} was damaged" in se and same(REF, values(OUT)[0])
          and f"({first_bad - 1} from an earlier run)" in so, se[-600:] + so[-300:])

# The journal's header: a flipped bit in the job's hash is damage, not "another job".
clean(OUT)
run(["sweep", job], fault="journal_sync:3:kill")
with open(OUT + ".journal", "r+b") as f:
    f.seek(20)
    b = f.read(1)
    f.seek(20)
    f.write(bytes([b[0] ^ 1]))
rc, so, se, _ = run(["sweep", job])
check("damaged journal header: refused as damaged", rc == 1 and "header is damaged" in se, se[-400:])
clean(OUT)

# Results files: the whole file's sha256 in NAME.sha256, checked by every reader.
ref = os.path.join(TMP, "ref.nc")
check("results file: its sha256 recorded beside it", os.path.exists(ref + ".sha256") and
      subprocess.run(["sha256sum", "-c", "--quiet", "ref.nc.sha256"], cwd=TMP).returncode == 0)
for k in (1, 2):
    rc, so, se, _ = run(["sweep", job, "--slice", f"{k}/2", "--output", f"part{k}.nc"])
rc, so, se, _ = run(["merge", "part1.nc", "part2.nc", "-o", "merged.nc"])
check("merge of intact parts", rc == 0, se[-300:])
rc, so, se, _ = run(["plot", "ref.nc", "--var", "z_all_pos_normalized", "--mean", "-o", "ok.svg"])
check("plot of an intact file", rc == 0, se[-300:])
for n in ("part1.nc", "part1.nc.sha256"):
    shutil.copy(os.path.join(TMP, n), os.path.join(TMP, "orig-" + n))
shutil.copy(ref, os.path.join(TMP, "orig-f.nc"))
shutil.copy(ref + ".sha256", os.path.join(TMP, "orig-f.nc.sha256"))
for how in ("bit flip", "truncated"):
    # the same damage to a plot's input, a merge part and a complete sweep result
    for name in ("bad.nc", "part1.nc", "f.nc"):
        src = os.path.join(TMP, "orig-" + (name if name != "bad.nc" else "f.nc"))
        dst = os.path.join(TMP, name)
        shutil.copy(src, dst)
        shutil.copy(src + ".sha256", dst + ".sha256")
        with open(dst, "r+b") as f:
            if how == "bit flip":
                n = os.path.getsize(dst) // 2
                f.seek(n)
                b = f.read(1)
                f.seek(n)
                f.write(bytes([b[0] ^ 0x01]))
            else:
                f.truncate(os.path.getsize(dst) - 1000)
    for what, args in (("plot", ["plot", "bad.nc", "--var", "z_all_pos_normalized", "--mean", "-o", "bad.svg"]),
                       ("merge", ["merge", "part1.nc", "part2.nc", "-o", "m2.nc"]),
                       ("resume", ["sweep", job])):
        rc, so, se, _ = run(args)
        lines = [l for l in se.strip().splitlines() if l.startswith("patchsweep:")]
        check(f"results file ({how}): {what} refuses it in one line",
              rc == 1 and len(lines) == 1 and "damaged" in lines[0] and not os.path.exists(os.path.join(TMP, "m2.nc"))
              and not os.path.exists(os.path.join(TMP, "bad.svg")), se[-400:])
    # without the sidecar: what netCDF/HDF5 make of it alone (reported, not required)
    os.remove(os.path.join(TMP, "bad.nc.sha256"))
    rc, so, se, _ = run(["plot", "bad.nc", "--var", "z_all_pos_normalized", "--mean", "-o", "bad.svg"])
    print(f"measured: {how} results file without its .sha256: plot exits {rc}: {se.strip()[-200:]!r}", flush=True)
    for f_ in ("bad.svg", "f.nc", "f.nc.sha256"):
        if os.path.exists(os.path.join(TMP, f_)):
            os.remove(os.path.join(TMP, f_))
for n in ("part1.nc", "part1.nc.sha256"):
    shutil.copy(os.path.join(TMP, "orig-" + n), os.path.join(TMP, n))

# The same on a real full file system: a tmpfs of 64 KiB (the journal fits,
# the 220 KB results file does not), then of 8 KiB (the journal does not),
# then grown (`mount -o remount,size=`: space freed) and the sweep rerun.
SMALL = os.path.join(TMP, "small")
os.makedirs(SMALL)
mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", SMALL], capture_output=True, text=True)
if mounted.returncode != 0:
    for what in ("results file", "journal", "merge"):
        skip(f"full tmpfs: {what}", f"cannot mount a tmpfs: {mounted.stderr.strip()}")
else:
    try:
        sjob = write_job("s", out_dir=SMALL)
        sout = os.path.join(SMALL, "s.nc")
        for what, size in (("results file", "64k"), ("journal", "8k")):
            for f_ in os.listdir(SMALL):
                os.remove(os.path.join(SMALL, f_))
            subprocess.run(["mount", "-o", f"remount,size={size}", SMALL], check=True)
            rc, so, se, secs = run(["sweep", sjob])
            measured(f"sweep on a full tmpfs of {size} ({what} does not fit)", rc, secs)
            lines = [l for l in se.splitlines() if l.startswith("patchsweep:")]
            check(f"full tmpfs ({what}): exit 1, one line: no space left",
                  rc == 1 and len(lines) == 1 and "No space left on device" in lines[0], se[-400:])
            check(f"full tmpfs ({what}): no file under the final name, no .partial",
                  not os.path.exists(sout) and not os.path.exists(sout + ".partial"), os.listdir(SMALL))
            jn = len(record_offsets(sout + ".journal")) if os.path.exists(sout + ".journal") else 0
            check(f"full tmpfs ({what}): the journal's finished records kept", jn == 24 if what == "results file"
                  else 0 < jn < 24, jn)
            subprocess.run(["mount", "-o", "remount,size=4m", SMALL], check=True)
            rc, so, se, secs = run(["sweep", sjob])
            check(f"full tmpfs ({what}): rerun after space is freed resumes ({jn} prompts) and ends identical",
                  rc == 0 and f"({jn} from an earlier run)" in so and same(REF, values(sout)[0]), se[-400:] + so)
        # merge onto a full disk: in the release pass (PS_QUICK has the injected case)
        if not QUICK:
            for f_ in os.listdir(SMALL):
                os.remove(os.path.join(SMALL, f_))
            subprocess.run(["mount", "-o", "remount,size=64k", SMALL], check=True)
            rc, so, se, secs = run(["merge", "part1.nc", "part2.nc", "-o", os.path.join(SMALL, "m.nc")])
            measured("merge onto a full tmpfs of 64k", rc, secs)
            check("full tmpfs (merge): exit 1, one line, no output", rc == 1 and "No space left on device" in se
                  and not os.listdir(SMALL), se[-400:] + str(os.listdir(SMALL)))
            subprocess.run(["mount", "-o", "remount,size=4m", SMALL], check=True)
            rc, so, se, secs = run(["merge", "part1.nc", "part2.nc", "-o", os.path.join(SMALL, "m.nc")])
            check("full tmpfs (merge): rerun after space is freed equals the unsliced run",
                  rc == 0 and same({k: v for k, v in REF.items()}, values(os.path.join(SMALL, "m.nc"))[0]), se[-400:])
    finally:
        subprocess.run(["umount", SMALL])

# --- a rank dies ---------------------------------------------------------------------
# mpirun (Open MPI) shares the fate of its ranks: when one dies by a signal,
# or exits non-zero, it kills the others, which would otherwise wait forever
# in the chunk's collective.  A rank whose call fails returns the error to
# every rank through comm_agree: all exit 1 with its one line.  Each run:
# 2 ranks, the fault at rank R's 3rd chunk (2 chunks journaled), bounded by
# a 120 s timeout (a hang fails the check), then the rerun resumes.
DEATHS = [("kill", 1, "SIGKILL of rank 1"), ("exit", 1, "rank 1 exits (70) without MPI_Finalize"),
          ("error", 1, "an error on rank 1"), ("kill", 0, "SIGKILL of rank 0"), ("error", 0, "an error on rank 0")]
# PS_QUICK: each way to die once (SIGKILL, exit, error; rank 0 and not),
# the two distributions shared among them.
QUICK_DEATHS = {"prompts": [DEATHS[0], DEATHS[4]], "cells": [DEATHS[1]]}
for mode in ("prompts", "cells"):
    djob = write_job(f"d-{mode}", run_extra=f"distribute = {mode}\n")
    dout = os.path.join(TMP, f"d-{mode}.nc")
    for action, rank, what in (QUICK_DEATHS[mode] if QUICK else DEATHS):
        clean(dout)
        rc, so, se, secs = run_bounded(["sweep", djob], 2, f"chunk_eval:3:{action}@{rank}")
        measured(f"{what}, distribute = {mode}", rc, secs)
        check(f"{what} ({mode}): the job ends, non-zero, within the bound",
              rc is not None and rc != 0 and f"fault: chunk_eval #3: {action}" in se, f"exit {rc}: {se[-500:]}")
        if action == "error":
            lines = [l for l in se.splitlines() if l.startswith("patchsweep:")]
            check(f"{what} ({mode}): exit 1 with the failing rank's line", rc == 1 and len(lines) == 1
                  and "injected fault at chunk_eval" in lines[0] and (rank == 0 or "rank 1:" in lines[0]), se[-500:])
        check(f"{what} ({mode}): no file under the final name", not os.path.exists(dout))
        rc, so, se, secs = run(["sweep", djob], ranks=2)
        check(f"{what} ({mode}): the rerun resumes (4 prompts) and ends identical",
              rc == 0 and "(4 from an earlier run)" in so and same(REF, values(dout)[0]), se[-400:] + so[-200:])

# --- a signal to mpirun ---------------------------------------------------------------
# Open MPI's mpirun forwards SIGUSR1 to the ranks (the sweep finishes its
# chunk and exits 3, so mpirun does), but answers SIGTERM and SIGINT itself:
# it kills the ranks (SIGTERM, then SIGKILL after odls_base_sigkill_timeout,
# 1 s) and exits 1 whatever they return; ess_base_forward_signals refuses
# SIGTERM.  Hence slurm/patchsweep.sbatch passes a SIGTERM on to mpirun as
# SIGUSR1.  Rank 0 signals mpirun (its parent) once 2 chunks are journaled.
# SIGINT is Ctrl-C: mpirun puts each rank in a process group of its own, so
# the terminal's SIGINT reaches mpirun alone, as here.
sjob = write_job("sig")
sout = os.path.join(TMP, "sig.nc")
for sig, want in (("usr1", 3), ("term", 1), ("int", 1)):
    clean(sout)
    rc, so, se, secs = run_bounded(["sweep", sjob], 2, f"journal_sync:3:parent-{sig}@0")
    measured(f"SIG{sig.upper()} to mpirun -np 2", rc, secs)
    check(f"SIG{sig.upper()} to mpirun: exit {want}", rc == want, f"exit {rc}: {se[-400:]}")
    if want == 3:
        check("SIGUSR1 to mpirun: a readable file marked incomplete",
              os.path.exists(sout) and values(sout)[1].get("complete") == 0)
    rc, so, se, secs = run(["sweep", sjob], ranks=2)
    # The ranks end when mpirun ends them (term, int) or when they see the
    # forwarded signal (usr1); a run whose ranks finished every chunk before
    # that has a complete file, which the rerun reports as such.
    resumed, done = "from an earlier run" in so, "is already the complete result" in so + se
    if want == 1:
        measured(f"SIG{sig.upper()} to mpirun: the rerun {'resumed' if resumed else 'found the run complete'}", rc,
                 secs)
    check(f"SIG{sig.upper()} to mpirun: the rerun resumes and ends identical",
          rc == 0 and (resumed or (want == 1 and done)) and same(REF, values(sout)[0]), se[-300:] + so[-300:])

shutil.rmtree(TMP, ignore_errors=True)
finish("faults")
