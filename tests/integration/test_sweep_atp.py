#!/usr/bin/python3
"""[patch] method in sweeps (issue 20, item 3): attribution patching over a
dataset, on the embedded model (12 IOI pairs of the demo's dataset).

1. method = atp* with resid_pre, z_all_pos, q_all_pos, k_all_pos on 1 rank
   and on 2 ranks (mpirun): the same values bit for bit, stored as C_atp and
   C_atp_normalized (no exact C), global attribute method = atp*.
2. Each prompt's values equal `patch --method atp*` on its token ids (to
   float32 storage), and method = atp gives the same values but on q/k.
3. Refused with one line naming the job file: an unknown method, and
   method = atp with distribute = cells (atp+exact, atp+verify and GradDrop
   in sweeps: test_sweep_atp_exact.py).
Environment: PS_BIN, PS_ROOT (see run_integration.sh)."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import xarray as xr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checks import check, finish, mpi_env, private_binary  # noqa: E402

ROOT = os.environ["PS_ROOT"]
TMP = tempfile.mkdtemp(prefix="ps-sweep-atp-")
BIN = private_binary(os.environ["PS_BIN"], TMP)
ENV = mpi_env()
MODEL = os.path.join(ROOT, "jobs/ioi-tiny/model")
COMPS = ["resid_pre", "z_all_pos", "q_all_pos", "k_all_pos"]

data = os.path.join(TMP, "ioi.jsonl")
with open(os.path.join(ROOT, "jobs/ioi-tiny/ioi.jsonl")) as src, open(data, "w") as dst:
    dst.writelines(src.readlines()[:12])


def job(name, method, extra=""):
    path = os.path.join(TMP, name + ".ini")
    with open(path, "w") as f:
        f.write(f"[model]\ndir = {MODEL}\n[data]\ndataset = {data}\n[patch]\ncomponents = {','.join(COMPS)}\n"
                f"method = {method}\n[run]\noutput = {name}.nc\nchunk_prompts = 5\n{extra}")
    return path, os.path.join(TMP, name + ".nc")


def sweep(path, ranks=0):
    cmd = (["mpirun", "--oversubscribe", "-np", str(ranks)] if ranks else []) + [BIN, "sweep", path]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)


# 1. 1 rank vs 2 ranks
files = {}
for ranks in (0, 2):
    path, out = job(f"star{ranks}", "atp*")
    r = sweep(path, ranks)
    if check(f"sweep method = atp* on {max(ranks, 1)} rank(s)", r.returncode == 0, r.stderr):
        files[ranks] = out
if len(files) == 2:
    with xr.open_dataset(files[0]) as a, xr.open_dataset(files[2]) as b:
        names = [c + s for c in COMPS for s in ("_atp", "_atp_normalized")]
        check("C_atp, C_atp_normalized stored, no exact C; method = atp*",
              all(n in a for n in names) and not any(c in a for c in COMPS) and a.attrs.get("method") == "atp*",
              f"{list(a)} {a.attrs.get('method')}")
        check("1 and 2 ranks: the same values bit for bit",
              all(np.array_equal(a[n].values, b[n].values, equal_nan=True) for n in names), "differ")
        done = int(a["done"].values.sum())
        check("every prompt done", done == 12, done)

        # 2. against patch --method atp* and atp on the same ids
        with open(data) as f:
            items = [json.loads(line) for line in f]
        worst = 0.0
        for p in (0, 7):
            T = int(a["length"].values[p])
            clean = ",".join(str(int(x)) for x in a["clean_token_id"].values[p][:T])
            corr = ",".join(str(int(x)) for x in a["corrupted_token_id"].values[p][:T])
            got = {}
            for method in ("atp*", "atp"):
                r = subprocess.run([BIN, "patch", "--model", MODEL, "--clean-ids", clean, "--corrupted-ids", corr,
                                    "--answer-id", str(int(a["answer_id"].values[p])), "--wrong-id",
                                    str(int(a["wrong_id"].values[p])), "--components", ",".join(COMPS), "--method",
                                    method, "--json"], capture_output=True, text=True)
                if not check(f"prompt {p}: patch --method {method}", r.returncode == 0, r.stderr):
                    continue
                got[method] = json.loads(r.stdout)["components"]
            if len(got) < 2:
                continue
            for c in COMPS:
                v = np.array(got["atp*"][c]["values"]).reshape(got["atp*"][c]["shape"])
                s = a[c + "_atp"].values[p]
                s = s[tuple(slice(0, n) for n in v.shape)]
                e = float(np.abs(s - v).max()) / max(1.0, float(np.abs(v).max()))
                worst = max(worst, e)
                check(f"prompt {p} {c}: sweep = patch --method atp* ({e:.1e})", e < 1e-6, f"{s.ravel()[:4]} {v.ravel()[:4]}")
                plain = np.array(got["atp"][c]["values"]).reshape(got["atp"][c]["shape"])
                same = np.array_equal(plain, v)
                check(f"prompt {p} {c}: atp* {'differs from' if c in ('q_all_pos', 'k_all_pos') else 'equals'} atp",
                      same != (c in ("q_all_pos", "k_all_pos")), f"{plain.ravel()[:4]} {v.ravel()[:4]}")

# 3. refused
for name, method, extra, frag in [
        ("unknown", "atp2", "", "unknown method 'atp2'"),
        ("cells", "atp", "distribute = cells\n", "distribute = cells needs [patch] method = exact")]:
    path, out = job(name, method, extra)
    r = sweep(path)
    lines = r.stderr.strip().splitlines()
    check(f"method = {method}{' with ' + extra.strip() if extra else ''}: refused in one line naming the job",
          r.returncode != 0 and len(lines) == 1 and frag in lines[0] and name + ".ini" in lines[0]
          and not os.path.exists(out), r.stderr)

finish("sweep_atp")
