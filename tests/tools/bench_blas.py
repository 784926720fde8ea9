#!/usr/bin/python3
"""make bench: OpenBLAS's generic kernels against the ones patchsweep runs.

Runs `patchsweep bench` twice on the same model and prompt pair: once with
--blas-core Prescott (the generic SSE3 kernels OpenBLAS falls back to on a
CPU it does not know) and once as patchsweep runs by default (OpenBLAS's
choice, or the better core patchsweep selected over a generic fallback, see
README: BLAS kernels).  Prints the naive and fast engines' times and the
sgemm peak side by side with the speed-up, and writes both reports and the
table as JSON (another bench report can fold it in).

Usage: bench_blas.py PATCHSWEEP MODEL_DIR OUT.json [bench options...]
(default options: --components resid_pre,z_all_pos --reps 3, the worksheet's
pair; the naive engine dominates the time: several minutes per run).
"""
import json
import os
import subprocess
import sys

GENERIC = "Prescott"


def bench(ps, model, opts, extra):
    cmd = [ps, "bench", "--model", model, "--json", *opts, *extra]
    print("running:", " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench_blas: {' '.join(cmd)} failed (exit {r.returncode}): {r.stderr.strip()}")
    return json.loads(r.stdout)


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    ps, model, out = sys.argv[1:4]
    opts = sys.argv[4:] or ["--components", "resid_pre,z_all_pos", "--reps", "3"]
    generic = bench(ps, model, opts, ["--blas-core", GENERIC])
    selected = bench(ps, model, opts, [])
    g, s = generic["blas"], selected["blas"]
    rows = []
    for gc, sc in zip(generic["components"], selected["components"]):
        assert gc["component"] == sc["component"] and gc["cells"] == sc["cells"]
        rows.append({"component": gc["component"], "cells": gc["cells"],
                     "naive_seconds_generic": gc["naive_seconds"], "naive_seconds_selected": sc["naive_seconds"],
                     "naive_speedup": gc["naive_seconds"] / sc["naive_seconds"],
                     "fast_seconds_generic": gc["fast_seconds"], "fast_seconds_selected": sc["fast_seconds"],
                     "fast_speedup": gc["fast_seconds"] / sc["fast_seconds"]})
    peak = {"generic": g["sgemm_peak_gflops"], "selected": s["sgemm_peak_gflops"],
            "speedup": s["sgemm_peak_gflops"] / g["sgemm_peak_gflops"]}
    report = {"what": "patchsweep bench with OpenBLAS's generic kernels (--blas-core Prescott) and with the kernels "
                      "patchsweep runs by default",
              "model": model, "options": opts,
              "generic": {"core": g["core"], "source": g["source"], "threads": g["threads"]},
              "selected": {"core": s["core"], "source": s["source"], "openblas_choice": s["openblas_choice"],
                           "threads": s["threads"], "cpu": s["cpu"]["description"]},
              "sgemm_peak_gflops": peak, "components": rows,
              "bench_generic": generic, "bench_selected": selected}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".partial", "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(out + ".partial", out)

    sel = s["core"] + (f" ({s['source']})" if s["source"] != "openblas" else " (OpenBLAS's choice)")
    print(f"BLAS kernels: generic = OpenBLAS {g['version']} {g['core']}, selected = {sel}; "
          f"{s['threads']} threads; {s['cpu']['description']}")
    print(f"model {model}, {selected['tokens']} tokens; naive: one run, fast: median of the runs")
    w = max(len(g["core"]), len(s["core"]), 8)
    print(f"{'':16} {'':>6}  {'naive engine (s)':^{2 * w + 10}}  {'fast engine (s)':^{2 * w + 10}}")
    print(f"{'component':16} {'cells':>6}  {g['core']:>{w}} {s['core']:>{w}} {'speed-up':>8}  "
          f"{g['core']:>{w}} {s['core']:>{w}} {'speed-up':>8}")
    for r in rows:
        print(f"{r['component']:16} {r['cells']:>6}  {r['naive_seconds_generic']:>{w}.2f} "
              f"{r['naive_seconds_selected']:>{w}.2f} {r['naive_speedup']:>7.2f}x  "
              f"{r['fast_seconds_generic']:>{w}.3f} {r['fast_seconds_selected']:>{w}.3f} {r['fast_speedup']:>7.2f}x")
    print(f"{'sgemm peak GFLOP/s':23}  {peak['generic']:>{w}.1f} {peak['selected']:>{w}.1f} {peak['speedup']:>7.2f}x")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
