#!/usr/bin/python3
"""bench_large: `make bench-large` (issue 21), an 8B model on one node.

On the random Llama-3-8B-shaped BF16 checkpoint (make_llama_checkpoint.py,
sharded like HF's, about 16 GB):
  1. load: wall seconds of `run --ids` of one token (load, hash-free, one
     forward), the checkpoint's size;
  2. engine: `bench --fast-only` of the IOI resid_pre grid (the worksheet's
     pair through the model's tokenizer.json), useful GFLOP/s against the
     sgemm peak measured in the same process;
  3. sweep: 2 ranks x 1 thread, 2 IOI pairs, resid_pre, wall time, and the
     node's memory: sum of the ranks' Pss (`sweep: memory` lines) against
     1.15 x checkpoint + the ranks' working memory (RssAnon).
Saved as results/bench_large.json.  Needs patching of Llama-family models
(the fast engine with rotary and GQA).
Usage: bench_large.py --ps BIN --model DIR --out FILE.json
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
CLEAN = "After John and Mary went to the store, Mary gave a bottle of milk to"
CORRUPTED = "After John and Mary went to the store, John gave a bottle of milk to"


def run(cmd, env=None):
    e = dict(os.environ, **(env or {}))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=e, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"bench_large: {' '.join(cmd)} failed (exit {r.returncode}):\n{r.stderr.strip()[-2000:]}")
    return r, secs


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ps", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    ps, model = os.path.abspath(a.ps), os.path.abspath(a.model)
    ckpt = sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model) if f.endswith(".safetensors"))
    rep = {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "checkpoint_bytes": ckpt}
    print(f"CPU: {rep['cpu_model']}, {rep['cpus']} CPUs; checkpoint {ckpt / 1e9:.2f} GB", flush=True)

    _, load_s = run([ps, "run", "--model", model, "--ids", "128000", "--top-k", "1"], {"OPENBLAS_NUM_THREADS": "2"})
    rep["load_and_one_token_seconds"] = load_s
    print(f"load + one forward of one token: {load_s:.1f} s", flush=True)

    r, _ = run([ps, "bench", "--model", model, "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", " John",
                "--wrong", " Mary", "--components", "resid_pre", "--fast-only", "--reps", "3", "--json"],
               {"OPENBLAS_NUM_THREADS": "2"})
    b = json.loads(r.stdout)
    c = b["components"][0]
    rep["engine"] = {"grid_seconds": c["fast_seconds"], "useful_gflops": c["useful_gflops"],
                     "sgemm_peak_gflops": c["sgemm_peak_gflops"], "percent_of_peak": c["percent_of_peak"],
                     "cells": c["cells"]}
    print(f"resid_pre grid: {c['fast_seconds']:.2f} s, {c['useful_gflops']:.1f} useful GFLOP/s = "
          f"{c['percent_of_peak']:.0f}% of sgemm {c['sgemm_peak_gflops']:.1f} (target >= 60%)", flush=True)

    with tempfile.TemporaryDirectory(prefix="ps-bench-large-") as d:
        data = os.path.join(d, "ioi.jsonl")
        run([ps, "make-dataset", "ioi", "--n", "2", "--seed", "21", "-o", data])
        job = os.path.join(d, "job.ini")
        with open(job, "w") as f:
            f.write(f"[model]\ndir = {model}\n[data]\ndataset = {data}\n[patch]\ncomponents = resid_pre\n"
                    f"[run]\noutput = {os.path.join(d, 'out.nc')}\n")
        r, secs = run(["mpirun", "--oversubscribe", "-np", "2", ps, "sweep", job, "--threads", "1"], MPI_ENV)
    ranks = [dict((k, int(v)) for k, v in re.findall(r"(\w+_kib)=(\d+)", l))
             for l in r.stderr.splitlines() if "sweep: memory rank=" in l]
    pss = sum(x.get("pss_kib", 0) for x in ranks) * 1024
    anon = sum(x.get("anon_kib", 0) for x in ranks) * 1024
    rep["sweep_2_ranks"] = {"seconds": secs, "node_pss_bytes": pss, "working_memory_bytes": anon,
                            "bound_bytes": 1.15 * ckpt + anon, "ratio_to_checkpoint": (pss - anon) / ckpt,
                            "ranks": ranks}
    print(f"sweep, 2 ranks: {secs:.1f} s; node memory {pss / 2**30:.2f} GiB = {(pss - anon) / ckpt:.2f} x checkpoint "
          f"+ {anon / 2**20:.0f} MiB working memory (target <= 1.15 x + working memory)", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".partial", "w") as f:
        json.dump(rep, f, indent=2)
    os.replace(a.out + ".partial", a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
