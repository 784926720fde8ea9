#!/usr/bin/python3
"""Hash once (issue 21): the model's sha256 is computed once per checkpoint
file and then taken from the cache (hashcache.h), by one rank of a sweep.

Deterministic, not timed: with PATCHSWEEP_HASH_DEBUG=1 every process prints
`patchsweep: hash: pid=N files_hashed=N bytes_hashed=N cache_hits=N cache=DIR`
at its end.  Checks: the first `patch -o` hashes the checkpoint (its bytes),
the second reads no checkpoint (files_hashed=0, cache_hits=1) and records the
same model_sha256 (the file's sha256); a touched checkpoint is hashed again;
PATCHSWEEP_HASH_CACHE=off hashes every time; of a 2-rank sweep only one rank
hashes; a sharded checkpoint's model_sha256 is the sha256 of its
model_shard_sha256 lines, each the shard's own sha256 (sha256sum's format).

Environment: PS_BIN, PS_ROOT (see run_integration.sh)."""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

import xarray as xr

ROOT = os.environ.get("PS_ROOT") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("PS_BIN") or os.path.join(ROOT, "build/rel/patchsweep")
sys.path.insert(0, os.path.join(ROOT, "tests/tools"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle_families as of  # noqa: E402
from checks import check, finish, mpi_env  # noqa: E402

MODEL = os.path.join(ROOT, "jobs/ioi-tiny/model")
CLEAN = "After John and Mary went to the store, Mary gave a bottle of milk to"
CORR = "After John and Mary went to the store, John gave a bottle of milk to"
LINE = re.compile(r"patchsweep: hash: pid=(\d+) files_hashed=(\d+) bytes_hashed=(\d+) cache_hits=(\d+) cache=(\S+)")


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def counters(stderr):
    return [tuple(int(x) for x in m.groups()[1:4]) for m in LINE.finditer(stderr)]


with tempfile.TemporaryDirectory(prefix="ps-hash-") as tmp:
    env = dict(os.environ, PATCHSWEEP_HASH_DEBUG="1", PATCHSWEEP_HASH_CACHE_DIR=os.path.join(tmp, "cache"))
    env.pop("PATCHSWEEP_HASH_CACHE", None)
    mdir = os.path.join(tmp, "model")
    shutil.copytree(MODEL, mdir)  # its own inode and mtime, so touching it is harmless
    st_path = os.path.join(mdir, "model.safetensors")
    size, want = os.path.getsize(st_path), sha(st_path)
    out = os.path.join(tmp, "p.nc")

    def patch(extra_env=None):
        e = dict(env, **(extra_env or {}))
        r = subprocess.run([BIN, "patch", "--model", mdir, "--clean", CLEAN, "--corrupted", CORR, "--answer",
                            " Mary", "--wrong", " John", "--components", "resid_pre", "-o", out],
                           capture_output=True, text=True, env=e)
        c = counters(r.stderr)
        with xr.open_dataset(out) as ds:
            got = ds.attrs.get("model_sha256")
        return r, (c[0] if c else None), got

    r, c, got = patch()
    check("first patch -o hashes the checkpoint once", r.returncode == 0 and c == (1, size, 0), r.stderr)
    check("model_sha256 is the file's sha256", got == want, f"{got} != {want}")
    r, c, got = patch()
    check("second patch -o reads no checkpoint (cache hit)", r.returncode == 0 and c == (0, 0, 1), r.stderr)
    check("cached model_sha256 unchanged", got == want, f"{got} != {want}")
    r = subprocess.run([BIN, "patch", "--model", mdir, "--clean", CLEAN, "--corrupted", CORR, "--answer", " Mary",
                        "--wrong", " John", "--components", "resid_pre"], capture_output=True, text=True, env=env)
    check("patch without -o hashes nothing", counters(r.stderr) == [(0, 0, 0)], r.stderr)
    st = os.stat(st_path)
    os.utime(st_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # one nanosecond later
    r, c, got = patch()
    check("a touched checkpoint is hashed again", r.returncode == 0 and c == (1, size, 0) and got == want, r.stderr)
    r, c, got = patch({"PATCHSWEEP_HASH_CACHE": "off"})
    check("PATCHSWEEP_HASH_CACHE=off hashes every time", r.returncode == 0 and c == (1, size, 0) and got == want,
          r.stderr)
    ent = [f for f in os.listdir(env["PATCHSWEEP_HASH_CACHE_DIR"]) if not f.startswith(".")]
    check("one cache entry per version of the file, 64 hex digits and a newline", len(ent) == 2 and all(
        open(os.path.join(env["PATCHSWEEP_HASH_CACHE_DIR"], f)).read() == want + "\n" for f in ent), ent)

    # a sweep on 2 ranks: only rank 0 hashes (fresh cache: it must read the file)
    shutil.rmtree(env["PATCHSWEEP_HASH_CACHE_DIR"])
    data = os.path.join(tmp, "ioi.jsonl")
    subprocess.run([BIN, "make-dataset", "ioi", "--n", "4", "--seed", "5", "-o", data], check=True,
                   capture_output=True)
    job = os.path.join(tmp, "job.ini")
    with open(job, "w") as f:
        f.write(f"[model]\ndir = {mdir}\n[data]\ndataset = {data}\n[patch]\ncomponents = resid_pre\n"
                f"[run]\noutput = {os.path.join(tmp, 's.nc')}\n")
    r = subprocess.run(["mpirun", "-np", "2", BIN, "sweep", job, "--threads", "1"], capture_output=True, text=True,
                       env=mpi_env(env))
    c = sorted(counters(r.stderr))
    check("sweep on 2 ranks: one rank hashes, the other reads nothing", r.returncode == 0 and
          c == [(0, 0, 0), (1, size, 0)], r.stderr)
    with xr.open_dataset(os.path.join(tmp, "s.nc")) as ds:
        check("sweep: model_sha256 is the file's", ds.attrs.get("model_sha256") == want)

    # a sharded checkpoint: the hash of its shards' hashes
    sdir = os.path.join(tmp, "sharded")
    of.write_model(sdir, "llama", dtype="bf16", shards=3, seed=3, H=4, kv=2)
    names = sorted(f for f in os.listdir(sdir) if f.endswith(".safetensors"))
    lines = "".join(f"{sha(os.path.join(sdir, n))}  {n}\n" for n in names)
    ids = "1,2,3,4"
    for rep in (1, 2):
        r = subprocess.run([BIN, "cache", "--model", sdir, "--ids", ids, "-o", os.path.join(tmp, "c.nc")],
                           capture_output=True, text=True, env=env)
        c = counters(r.stderr)
        if not check(f"sharded: cache -o run {rep}", r.returncode == 0, r.stderr):
            continue
        with xr.open_dataset(os.path.join(tmp, "c.nc")) as ds:
            check(f"sharded run {rep}: model_shard_sha256 lists every shard's sha256",
                  ds.attrs.get("model_shard_sha256") == lines, ds.attrs.get("model_shard_sha256"))
            check(f"sharded run {rep}: model_sha256 = sha256 of those lines",
                  ds.attrs.get("model_sha256") == hashlib.sha256(lines.encode()).hexdigest())
        check(f"sharded run {rep}: " + ("each shard hashed once" if rep == 1 else "no shard read again"),
              c and c[0][0] == (3 if rep == 1 else 0) and c[0][2] == (0 if rep == 1 else 3), r.stderr)
    # a single-file model does not get the attribute
    with xr.open_dataset(out) as ds:
        check("single file: no model_shard_sha256", "model_shard_sha256" not in ds.attrs)

finish("test_hash")
