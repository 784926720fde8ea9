#!/usr/bin/python3
"""bench_report: `make bench`, every number side by side in one run on this
machine, printed as tables and saved as results/bench.json.

  1. engines: patchsweep's fast and naive patching engines on a random
     GPT-2-small-shaped model and the worksheet's IOI pair (`patchsweep
     bench`: seconds per grid, useful GFLOP/s beside the sgemm peak measured
     in the same process), at 2 and at 1 thread;
  2. baseline: the worksheet's TransformerLens-style loop in PyTorch
     (tests/tools/bench_torch.py, one forward per cell) on the same model and
     pair at 1 and 2 threads, its grid checked against patchsweep's;
  3. sweep scaling: the demo job's settings over 512 IOI pairs on the
     embedded model, 1 rank x 2 threads vs 2 ranks x 1 thread, with every
     rank's peak RSS;
  4. cost growth: fast-engine seconds per prompt as the prompt grows
     16 -> 64 -> 256 tokens, and sweep seconds per prompt as the dataset
     grows 10 -> 100 -> 1000 prompts;
  5. the scaling model (README): predicted efficiency at 64, 512 and 4096
     ranks for GPT-2 small and xl on 1e5 IOI prompts, from the numbers above;
  6. OpenBLAS's generic kernels against the selected ones
     (tests/tools/bench_blas.py, also saved as results/bench_blas.json);
  7. model families (issue 17): the resid_pre grid, fast vs naive and % of
     the sgemm peak, on a Llama-shaped (GQA 12/4, d_mlp 2048, V 32000) and a
     NeoX-shaped (parallel residual, V 50304) random model of GPT-2-small
     size, the IOI pair as token ids (targets: fast >= 30x naive, >= 60% of
     the peak).  --families-only runs this section alone;
  8. attribution patching (issue 20): AtP of resid_pre, attn_out, mlp_out
     and z (per position and head) for the IOI-shaped pair on the
     GPT-2-small-shaped model, in forward-pass equivalents and against the
     fast exact engine on the same grids in the same process
     (tests/tools/bench_atp.c; targets: at most 4 forward passes, at least
     20x faster than exact).  --atp-only runs this section alone;
  9. attribution patching's error (issue 20, not timed): `atp+exact` and
     `atp*+exact` sweeps over the 128 IOI pairs of jobs/ioi-tiny (the
     embedded GPT-2) and jobs/ioi-tiny-llama (the embedded Llama), and per
     component the median (and mean) over prompts of the rank correlation
     of estimate and exact grid, and the false negatives: exact top-10
     cells missed by the estimate's top 10, in total and per prompt (the
     files' C_atp_rank_correlation, C_atp_missed).  --atp-stats-only runs
     this section alone and updates its key in an existing --out file.
  10. BF16 arithmetic (issue 21 item 4, `--compute bf16`): the raw product
     kernels at GPT-2 small's shapes (tests/tools/bench_gemm_bf16.c: F32
     AVX-512 vs AVX512_BF16 vs AMX-BF16, 28 and 336 rows), the IOI resid_pre
     grid (fast engine) on the GPT-2-small-shaped model with --compute f32
     and bf16 interleaved in one run, at 1 and 2 threads (median; target
     >= 1.5x), and the max
     |bf16 - f32| of the normalized grids (resid_pre, attn_out, mlp_out) on
     that model, the embedded GPT-2 and the embedded Llama (target <= 1e-2),
     with the CPU and the load.  --bf16-only runs this section alone.
  11. 1 -> 2 rank efficiency of the demo (issue 21 item 5): the demo's
     main job (jobs/ioi-tiny, 128 pairs, embedded model) with `mpirun -np 1`
     and `-np 2`, one thread per rank, interleaved, medians: wall time of
     mpirun, the program's own time from its start to its exit (`sweep
     --timings`, without mpirun's launch), the chunks' time, and rank 0's
     phases.  --scaling-only runs this section alone (`make bench-scaling`).

Usage: bench_report.py --ps BIN --model DIR --embedded DIR --out FILE.json [--reps N]
Times are wall-clock seconds on a machine that should otherwise be idle.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CLEAN = "After John and Mary went to the store, Mary gave a bottle of milk to"
CORRUPTED = "After John and Mary went to the store, John gave a bottle of milk to"
DEMO = "resid_pre,attn_out,mlp_out,z_all_pos"  # the demo job's components
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def run(cmd, env=None, **kw):
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"bench_report: {' '.join(cmd)} failed (exit {r.returncode}):\n{r.stderr.strip()}")
    return r


def threads_env(n):
    return {"OPENBLAS_NUM_THREADS": str(n)}


def token_ids(ps, model, text, bos=True):
    cmd = [ps, "tokenize", "--model", model, "--json"] + ([] if bos else ["--no-bos"]) + [text]
    return json.loads(run(cmd).stdout)["ids"]


def ps_bench(ps, model, threads, components, reps, extra=()):
    cmd = [ps, "bench", "--model", model, "--components", components, "--reps", str(reps), "--json", *extra]
    return json.loads(run(cmd, threads_env(threads)).stdout)


def torch_loop(model, clean, corrupted, answer, wrong, threads, reps):
    cmd = ["/usr/bin/python3", os.path.join(HERE, "bench_torch.py"), model,
           "--clean-ids", ",".join(map(str, clean)), "--corrupted-ids", ",".join(map(str, corrupted)),
           "--answer", str(answer), "--wrong", str(wrong), "--threads", str(threads), "--reps", str(reps), "--json"]
    return json.loads(run(cmd, threads_env(threads)).stdout)


def write_job(d, model, dataset, output):
    path = os.path.join(d, "job.ini")
    with open(path, "w") as f:
        f.write(f"; make bench (tests/tools/bench_report.py)\n[model]\ndir = {model}\n[data]\ndataset = {dataset}\n"
                f"[patch]\ncomponents = resid_pre,attn_out,mlp_out,z_all_pos\n[run]\noutput = {output}\n"
                "progress_seconds = 1000\n")
    return path


def sweep(ps, job, ranks, threads, info=None):
    """Wall seconds of one sweep (start-up included), the cells it computed,
    and the peak RSS per rank (MiB) it reports; info gets the file write."""
    # Each rank gets `threads` cores of its own (PE = processing elements per
    # rank): by default mpirun binds a rank to one core, and its threads
    # would take turns on it.
    cmd = ["mpirun", "--oversubscribe", "--map-by", f"slot:PE={threads}", "-np", str(ranks), ps, "sweep", job,
           "--overwrite", "--threads", str(threads)]
    t0 = time.perf_counter()
    r = run(cmd, MPI_ENV)
    secs = time.perf_counter() - t0
    out = r.stdout + r.stderr
    cells = int(re.search(r"prompts done; (\d+) cells", out).group(1))
    m = re.search(r"peak RSS per rank \(MiB\): ([\d ]+)", out)
    rss = [int(x) for x in m.group(1).split()] if m else []
    w = re.search(r"file ([\d.]+) MB written in ([\d.]+) s", out)
    if info is not None and w:
        info.update(file_mb=float(w.group(1)), write_seconds=float(w.group(2)))
    return secs, cells, rss


def hash_bench(ps, model, reps):
    """`patch -o` against the same command without -o (the hash from the
    cache, warm), and the first-time hash (PATCHSWEEP_HASH_CACHE=off) in
    GB/s, medians of `reps` interleaved runs."""
    print("== 0. model hash (provenance): patch -o vs patch, GPT-2-small-shaped ==", flush=True)
    st_file = os.path.join(model, "model.safetensors")
    size = os.path.getsize(st_file)
    with tempfile.TemporaryDirectory(prefix="ps-bench-hash-") as d:
        base = [ps, "patch", "--model", model, "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", " John",
                "--wrong", " Mary", "--components", "resid_pre"]
        env = dict(threads_env(2), PATCHSWEEP_HASH_CACHE_DIR=os.path.join(d, "cache"), PATCHSWEEP_HASH_DEBUG="1")
        run(base + ["-o", os.path.join(d, "warm.nc")], env)  # fills the cache
        t = {"plain": [], "with_o": [], "with_o_no_cache": []}
        for _ in range(reps):
            for k, extra, e in (("plain", [], {}), ("with_o", ["-o", os.path.join(d, "o.nc")], {}),
                                ("with_o_no_cache", ["-o", os.path.join(d, "n.nc")], {"PATCHSWEEP_HASH_CACHE": "off"})):
                t0 = time.perf_counter()
                run(base + extra, dict(env, **e))
                t[k].append(time.perf_counter() - t0)
        sha_t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run(["openssl", "dgst", "-sha256", st_file])
            sha_t.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in t.items()}
    extra_s = max(1e-9, med["with_o_no_cache"] - med["plain"])
    r = {"checkpoint_bytes": size, "patch_seconds": med["plain"], "patch_o_cached_seconds": med["with_o"],
         "patch_o_uncached_seconds": med["with_o_no_cache"], "ratio_cached": med["with_o"] / med["plain"],
         "ratio_uncached": med["with_o_no_cache"] / med["plain"],
         "first_time_hash_gbps": size / extra_s / 1e9, "openssl_dgst_seconds": statistics.median(sha_t)}
    print(f"patch {med['plain']:.3f} s; patch -o {med['with_o']:.3f} s with the cache ({r['ratio_cached']:.2f}x), "
          f"{med['with_o_no_cache']:.3f} s without ({r['ratio_uncached']:.2f}x); first-time hash "
          f"{r['first_time_hash_gbps']:.2f} GB/s ({size / 1e6:.0f} MB; openssl dgst {r['openssl_dgst_seconds']:.3f} s)\n")
    return r


def filler_prompt(n_tokens_before):
    """The IOI sentence after a neutral context of about n words (the
    difference sits near the end, as in a long-context IOI prompt)."""
    context = " ".join(["The weather was calm and the streets were quiet."] * (n_tokens_before // 11 + 1))
    words = context.split(" ")
    return " ".join(words[:max(0, n_tokens_before)])


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ps", required=True)
    ap.add_argument("--model", help="GPT-2-small-shaped model directory")
    ap.add_argument("--embedded", help="the embedded model (sweeps)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-blas", action="store_true", help="skip section 6 (about 9 minutes)")
    ap.add_argument("--families-only", action="store_true", help="section 7 alone")
    ap.add_argument("--atp-only", action="store_true", help="section 8 alone")
    ap.add_argument("--atp-stats-only", action="store_true",
                    help="section 9 alone (its key updated in an existing --out file)")
    ap.add_argument("--bf16-only", action="store_true", help="section 10 alone")
    ap.add_argument("--scaling-only", action="store_true", help="section 11 alone")
    ap.add_argument("--scaling-reps", type=int, default=7, help="runs of each rank count in section 11")
    a = ap.parse_args(argv)
    ps = os.path.abspath(a.ps)
    if a.scaling_only:
        report = {"what": "make bench-scaling: 1 -> 2 rank efficiency of the demo job",
                  "host": {"cpus": os.cpu_count(), "cpu_model": cpu_model()}}
        report["demo_scaling"] = demo_scaling(ps, a.scaling_reps)
        return finish(report, a.out, argv)
    if not a.model or not a.embedded:
        ap.error("--model and --embedded are required (but with --scaling-only)")
    model = os.path.abspath(a.model)
    report = {"what": "make bench: patchsweep vs the PyTorch loop, engines, sweep scaling, cost growth",
              "host": {"cpus": os.cpu_count(), "cpu_model": cpu_model()}}
    if a.families_only:
        report["families"] = families(ps, model)
        return finish(report, a.out, argv)
    if a.atp_only:
        report["attribution_patching"] = atp_bench(ps, model, report["host"]["cpu_model"])
        return finish(report, a.out, argv)
    if a.atp_stats_only:
        if os.path.exists(a.out):  # the other sections' numbers stay
            with open(a.out) as f:
                report = dict(json.load(f), host=report["host"])
        report["atp_error_statistics"] = atp_stats(ps)
        return finish(report, a.out, argv)
    if a.bf16_only:
        report["bf16"] = bf16_bench(ps, model, os.path.abspath(a.embedded), report["host"]["cpu_model"])
        return finish(report, a.out, argv)

    # 0. hashing the checkpoint for provenance (issue 21)
    report["hash"] = hash_bench(ps, model, a.reps)

    # 1. engines at 2 and 1 threads
    print("== 1. patching engines (patchsweep bench), GPT-2-small-shaped random model, IOI pair ==", flush=True)
    eng = {}
    for th in (2, 1):
        eng[th] = ps_bench(ps, model, th, "resid_pre", 5) if th == 1 else ps_bench(ps, model, th, DEMO, 5)
        b = eng[th]["blas"]
        print(f"-- {th} thread(s): OpenBLAS {b['core']}, sgemm peak {b['sgemm_peak_gflops']:.1f} GFLOP/s, "
              f"gemm kernel {b.get('gemm_kernel', '?')}")
        print(f"{'component':<12} {'cells':>6} {'naive s':>9} {'fast s':>9} {'ratio':>7} {'useful GF/s':>12} "
              f"{'sgemm GF/s':>11} {'% peak':>7}")
        for c in eng[th]["components"]:
            print(f"{c['component']:<12} {c['cells']:>6} {c['naive_seconds']:>9.3f} {c['fast_seconds']:>9.4f} "
                  f"{c['ratio']:>6.1f}x {c['useful_gflops']:>12.1f} {c['sgemm_peak_gflops']:>11.1f} "
                  f"{c['percent_of_peak']:>6.1f}%")
    report["engines"] = {f"{th}_threads": eng[th] for th in eng}
    # one core's fast engine over the demo's four grids: the scaling model's unit of work
    one = ps_bench(ps, model, 1, DEMO, 3, ["--fast-only"])
    report["engines"]["1_thread_demo_components_fast"] = one

    # 2. PyTorch baseline on the same pair
    print("\n== 2. the worksheet's loop in PyTorch (one forward per cell) vs patchsweep, resid_pre grid ==", flush=True)
    clean, corrupted = token_ids(ps, model, CLEAN), token_ids(ps, model, CORRUPTED)
    (answer,), (wrong,) = token_ids(ps, model, " John", False), token_ids(ps, model, " Mary", False)
    grid = json.loads(run([ps, "patch", "--model", model, "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer",
                           " John", "--wrong", " Mary", "--json"]).stdout)["components"]["resid_pre"]
    n_pos = grid["shape"][1]  # values: the [layer, position] grid, row-major
    ref = [grid["values"][i:i + n_pos] for i in range(0, len(grid["values"]), n_pos)]
    base = {}
    print(f"{'threads':>7} {'torch s':>9} {'naive s':>9} {'fast s':>9} {'fast vs torch':>14} {'naive vs torch':>15} "
          f"{'max |grid diff|':>16}")
    for th in (1, 2):
        t = torch_loop(model, clean, corrupted, answer, wrong, th, max(1, a.reps - 1))
        diff = max(abs(x - y) for rx, ry in zip(t["grid"], ref) for x, y in zip(rx, ry))
        e = next(c for c in eng[th]["components"] if c["component"] == "resid_pre")
        base[th] = {"torch_seconds": t["seconds"], "torch_version": t["torch_version"], "cells": t["cells"],
                    "naive_seconds": e["naive_seconds"], "fast_seconds": e["fast_seconds"],
                    "fast_speedup_vs_torch": t["seconds"] / e["fast_seconds"],
                    "naive_speedup_vs_torch": t["seconds"] / e["naive_seconds"],
                    "max_abs_grid_difference": diff}
        print(f"{th:>7} {t['seconds']:>9.3f} {e['naive_seconds']:>9.3f} {e['fast_seconds']:>9.4f} "
              f"{base[th]['fast_speedup_vs_torch']:>13.1f}x {base[th]['naive_speedup_vs_torch']:>14.2f}x {diff:>16.2e}")
    report["pytorch_baseline"] = {f"{th}_threads": base[th] for th in base}

    # 3. sweep scaling on the embedded model
    print("\n== 3. sweep scaling: demo job settings, 512 IOI pairs, embedded model ==", flush=True)
    work = os.path.join(ROOT, "build", "bench", "sweep")
    os.makedirs(work, exist_ok=True)
    data512 = os.path.join(work, "ioi-512.jsonl")
    if not os.path.exists(data512):
        run([ps, "make-dataset", "ioi", "--n", "512", "--seed", "9301", "-o", data512])
    job = write_job(work, os.path.abspath(a.embedded), data512, os.path.join(work, "out.nc"))
    layouts = {(1, 2): [], (2, 1): []}
    rss, cells = {}, 0
    for _ in range(a.reps):  # interleaved, so drift hits both layouts alike
        for (r, th) in layouts:
            s, cells, rss[(r, th)] = sweep(ps, job, r, th)
            layouts[(r, th)].append(s)
    med = {k: statistics.median(v) for k, v in layouts.items()}
    eff = med[(1, 2)] / med[(2, 1)]
    print(f"{'ranks x threads':<16} {'seconds':>8} {'cells/s':>9} {'efficiency':>11}  peak RSS per rank (MiB)")
    for (r, th), s in med.items():
        e = f"{100 * med[(1, 2)] / s:.0f}%" if r > 1 else "-"
        print(f"{r} x {th:<12} {s:>8.2f} {cells / s:>9.0f} {e:>11}  {' '.join(map(str, rss[(r, th)]))}")
    report["sweep_scaling"] = {"cells": cells, "prompts": 512, "reps": a.reps,
                               "layouts": [{"ranks": r, "threads": th, "median_seconds": med[(r, th)],
                                            "peak_rss_mib": rss[(r, th)]} for (r, th) in med],
                               "parallel_efficiency_1_to_2_ranks": eff}

    # 4. cost growth
    print("\n== 4. cost growth ==", flush=True)
    growth = []
    print(f"{'prompt tokens':>13} {'cells':>7} {'fast s/prompt':>14}   (GPT-2-small-shaped, 4 components, 2 threads)")
    for n in (16, 64, 256):
        ctx = filler_prompt(n - 17) if n > 17 else ""
        cl, co = (ctx + " " + CLEAN).strip(), (ctx + " " + CORRUPTED).strip()
        T = len(token_ids(ps, model, cl))
        r = ps_bench(ps, model, 2, "resid_pre,attn_out,mlp_out,z_all_pos", 3,
                     ["--fast-only", "--clean", cl, "--corrupted", co])
        secs = sum(c["fast_seconds"] for c in r["components"])
        cc = sum(c["cells"] for c in r["components"])
        growth.append({"tokens": T, "cells": cc, "fast_seconds": secs})
        print(f"{T:>13} {cc:>7} {secs:>14.3f}")
    sizes = []
    print(f"{'dataset prompts':>15} {'seconds':>8} {'s/prompt':>9}   (embedded model, 1 rank x 2 threads, start-up included)")
    with tempfile.TemporaryDirectory(prefix="ps-bench-") as d:
        for n in (10, 100, 1000):
            data = os.path.join(d, f"ioi-{n}.jsonl")
            run([ps, "make-dataset", "ioi", "--n", str(n), "--seed", "9302", "-o", data])
            j = write_job(d, os.path.abspath(a.embedded), data, os.path.join(d, f"out-{n}.nc"))
            info = {}
            s, c, _ = sweep(ps, j, 1, 2, info)
            sizes.append({"prompts": n, "cells": c, "seconds": s, "seconds_per_prompt": s / n, **info})
            print(f"{n:>15} {s:>8.2f} {s / n:>9.4f}")
    report["cost_growth"] = {"prompt_length": growth, "dataset_size": sizes}

    # 5. the scaling model, from the numbers above
    report["scaling_model"] = scaling_model(one, eng[2], sizes[-1])
    # 11. the demo at 1 and 2 ranks (issue 21 item 5)
    report["demo_scaling"] = demo_scaling(ps, a.scaling_reps)

    # 6. OpenBLAS's generic kernels vs the selected ones (issue 11): naive and
    #    fast engines, and the sgemm peak (tests/tools/bench_blas.py)
    report["families"] = families(ps, model)
    report["attribution_patching"] = atp_bench(ps, model, report["host"]["cpu_model"])
    report["atp_error_statistics"] = atp_stats(ps)
    report["bf16"] = bf16_bench(ps, model, os.path.abspath(a.embedded), report["host"]["cpu_model"])
    if a.no_blas:
        return finish(report, a.out, argv)
    print("\n== 6. OpenBLAS kernels: generic (Prescott) vs selected ==", flush=True)
    blas_json = os.path.join(os.path.dirname(os.path.abspath(a.out)), "bench_blas.json")
    r = run(["/usr/bin/python3", os.path.join(HERE, "bench_blas.py"), ps, model, blas_json])
    print(r.stdout, end="")
    with open(blas_json) as f:
        b = json.load(f)
    report["blas_kernels"] = {k: b[k] for k in ("generic", "selected", "sgemm_peak_gflops", "components")}
    return finish(report, a.out, argv)


FAMILIES = {  # GPT-2-small size: 12 layers, d 768, 12 heads
    "llama-shaped": ("llama", dict(L=12, H=12, kv=4, d=768, m=2048, V=32000, npos=1024)),
    "neox-shaped": ("neox", dict(L=12, H=12, d=768, m=3072, V=50304, npos=1024, parallel=True)),
}


def families(ps, gpt2_model):
    """Section 7: the resid_pre grid on the families' random models (written
    once into build/bench/families by oracle_families.write_model)."""
    sys.path.insert(0, HERE)
    import oracle_families as of
    print("\n== 7. model families: resid_pre grid, fast vs naive, % of the sgemm peak (2 threads) ==", flush=True)
    clean, corrupted = token_ids(ps, gpt2_model, CLEAN), token_ids(ps, gpt2_model, CORRUPTED)
    (answer,), (wrong,) = token_ids(ps, gpt2_model, " John", False), token_ids(ps, gpt2_model, " Mary", False)
    clean, corrupted = clean[1:], corrupted[1:]  # no <|endoftext|>: 50256 is outside a 32000 vocabulary
    out = {}
    print(f"{'model':<14} {'cells':>6} {'naive s':>9} {'fast s':>9} {'ratio':>7} {'useful GF/s':>12} "
          f"{'sgemm GF/s':>11} {'% peak':>7}")
    for name, (fam, opts) in FAMILIES.items():
        d = os.path.join(ROOT, "build", "bench", "families", name)
        if not os.path.exists(os.path.join(d, "config.json")):
            of.write_model(d, fam, seed=17, **opts)
        ids = lambda v: ",".join(map(str, v))  # noqa: E731
        r = json.loads(run([ps, "bench", "--model", d, "--clean-ids", ids(clean), "--corrupted-ids", ids(corrupted),
                            "--answer-id", str(answer), "--wrong-id", str(wrong), "--components", "resid_pre",
                            "--reps", "5", "--json"], threads_env(2)).stdout)
        c = r["components"][0]
        out[name] = {"family": fam, "shape": opts, "tokens": r["tokens"], **c,
                     "meets_30x": c["ratio"] >= 30, "meets_60_percent": c["percent_of_peak"] >= 60}
        print(f"{name:<14} {c['cells']:>6} {c['naive_seconds']:>9.3f} {c['fast_seconds']:>9.4f} "
              f"{c['ratio']:>6.1f}x {c['useful_gflops']:>12.1f} {c['sgemm_peak_gflops']:>11.1f} "
              f"{c['percent_of_peak']:>6.1f}%", flush=True)
    return out


def atp_bench(ps, model, cpu):
    """Section 8: tests/tools/bench_atp (built beside the binary, in
    BUILD/tests/) at 2 threads, 5 interleaved repetitions: AtP of the four
    grids from the pair's two runs, in forward passes, and the fast exact
    engine on the same grids in the same process."""
    print("\n== 8. attribution patching: resid_pre, attn_out, mlp_out, z; GPT-2-small-shaped, IOI-shaped pair, "
          "2 threads ==", flush=True)
    tool = os.path.join(os.path.dirname(ps), "tests", "bench_atp")
    r = json.loads(run([tool, model, "5", "2"], threads_env(2)).stdout)
    r["cpu_model"] = cpu
    r["meets_4_forward_passes"] = r["atp_forward_equivalents"] <= 4
    r["meets_20x"] = r["exact_over_atp"] >= 20
    print(f"{'cells':>6} {'forward s':>10} {'pair s':>8} {'AtP s':>8} {'exact s':>8} {'AtP in forwards':>16} "
          f"{'exact/AtP':>10} {'with pair':>10}")
    print(f"{r['cells']:>6} {r['forward_s']:>10.4f} {r['pair_s']:>8.4f} {r['atp_s']:>8.4f} {r['exact_fast_s']:>8.3f} "
          f"{r['atp_forward_equivalents']:>16.2f} {r['exact_over_atp']:>9.1f}x {r['exact_over_atp_with_pair']:>9.1f}x")
    print(f"CPU: {cpu}", flush=True)
    return r


ATP_STATS_COMPONENTS = "resid_pre,attn_out,mlp_out,z_all_pos,q_all_pos,k_all_pos,v_all_pos"
ATP_STATS_JOBS = {"gpt2 (jobs/ioi-tiny)": "ioi-tiny", "llama (jobs/ioi-tiny-llama)": "ioi-tiny-llama"}


def atp_stats(ps):
    """Section 9: estimate vs truth over the embedded models' IOI datasets.
    One `atp+exact` and one `atp*+exact` sweep per model (1 rank, 2
    threads; the values do not depend on either), read back with netCDF4:
    per component the rank correlations and missed counts of every prompt."""
    import numpy as np
    from netCDF4 import Dataset
    print("\n== 9. attribution patching vs exact over the IOI datasets (not timed): rank correlation per prompt, "
          "exact top-10 cells missed by the estimate's top 10 ==", flush=True)
    out = {"components": ATP_STATS_COMPONENTS.split(","), "top_k": 10}
    print(f"{'model':<28} {'method':<11} {'component':<16} {'cells':>5} {'prompts':>7} {'median rho':>10} "
          f"{'mean rho':>9} {'missed':>7} {'per prompt':>10} {'prompts w/ miss':>15}")
    with tempfile.TemporaryDirectory(prefix="bench-atp-stats-") as d:
        for label, name in ATP_STATS_JOBS.items():
            jd = os.path.join(ROOT, "jobs", name)
            for method in ("atp+exact", "atp*+exact"):
                nc = os.path.join(d, f"{name}-{method.replace('*', 'star').replace('+', '-')}.nc")
                job = os.path.join(d, "stats.ini")
                with open(job, "w") as f:
                    f.write(f"; make bench section 9 (tests/tools/bench_report.py)\n[model]\n"
                            f"dir = {os.path.join(jd, 'model')}\n[data]\ndataset = {os.path.join(jd, 'ioi.jsonl')}\n"
                            f"[patch]\ncomponents = {ATP_STATS_COMPONENTS}\nmethod = {method}\n[run]\n"
                            f"output = {nc}\nprogress_seconds = 1000\n")
                run([ps, "sweep", job, "--overwrite", "--threads", "2"], MPI_ENV)
                rows = {}
                with Dataset(nc) as f:
                    done = f["done"][:] == 1
                    for c in out["components"]:
                        rho = np.ma.filled(f[c + "_atp_rank_correlation"][:].astype(float), np.nan)[done]
                        miss = np.ma.filled(f[c + "_atp_missed"][:].astype(float), np.nan)[done]
                        ok = np.isfinite(rho)
                        # the grid's cells (position grids: at the longest prompt); under 10, all are
                        # the "top 10" and none can be missed
                        cells = int(np.prod(f[c].shape[1:]))
                        rows[c] = {"cells_max": cells, "prompts": int(done.sum()), "prompts_with_rank_correlation": int(ok.sum()),
                                   "median_rank_correlation": float(np.median(rho[ok])) if ok.any() else None,
                                   "mean_rank_correlation": float(rho[ok].mean()) if ok.any() else None,
                                   "missed_top10_total": int(miss.sum()),
                                   "missed_top10_per_prompt": float(miss.mean()),
                                   "prompts_with_a_miss": int((miss > 0).sum()),
                                   "file_median": float(f[c + "_atp_rank_correlation"].getncattr("median")),
                                   "file_total": int(f[c + "_atp_missed"].getncattr("total"))}
                        r = rows[c]
                        med = f"{r['median_rank_correlation']:.3f}" if ok.any() else "nan"
                        mean = f"{r['mean_rank_correlation']:.3f}" if ok.any() else "nan"
                        print(f"{label:<28} {method:<11} {c:<16} {cells:>5} {r['prompts']:>7} {med:>10} {mean:>9} "
                              f"{r['missed_top10_total']:>7} {r['missed_top10_per_prompt']:>10.2f} "
                              f"{r['prompts_with_a_miss']:>15}", flush=True)
                out.setdefault(label, {})[method] = rows
    return out


def bf16_bench(ps, model, embedded, cpu, rounds=3):
    """Section 10: --compute bf16 against f32 (README "BF16 arithmetic")."""
    flags = open("/proc/cpuinfo").read()
    have = [f for f in ("amx_bf16", "avx512_bf16") if re.search(r"\b" + f + r"\b", flags)]
    load = os.getloadavg()
    print(f"\n== 10. BF16 arithmetic (--compute bf16): CPU {cpu} ({', '.join(have) or 'no BF16 units'}), "
          f"load {load[0]:.1f} ==", flush=True)
    out = {"cpu_model": cpu, "cpu_bf16": have, "loadavg_start": load}
    if not have:
        print("skipped: this CPU has neither AMX-BF16 nor AVX512_BF16")
        out["skipped"] = True
        return out
    # raw kernels
    tool = os.path.join(os.path.dirname(ps), "tests", "bench_gemm_bf16")
    kern = [json.loads(line) for line in run([tool, "5", "2"]).stdout.splitlines() if line.startswith("{")]
    out["kernels"] = kern
    print(f"{'rows':>5} {'k x n':>11} {'f32 GF/s':>9} {'avx512bf16':>11} {'amx GF/s':>9} {'avx512 x':>9} "
          f"{'amx x':>7}")
    for k in kern:
        print(f"{k['rows']:>5} {str(k['k']) + 'x' + str(k['n']):>11} {k['f32_gflops']:>9.1f} "
              f"{k.get('avx512_bf16_gflops', float('nan')):>11.1f} {k.get('amx_bf16_gflops', float('nan')):>9.1f} "
              f"{k.get('avx512_bf16_speedup', float('nan')):>8.2f}x {k.get('amx_bf16_speedup', float('nan')):>6.2f}x",
              flush=True)
    # the IOI resid_pre grid, f32 / bf16 (the fastest kernel) / bf16 on
    # AVX512_BF16, interleaved, at 1 and 2 threads
    variants = {"f32": ([], {}), "bf16": (["--compute", "bf16"], {})}
    if "amx_bf16" in have and "avx512_bf16" in have:
        variants["bf16_avx512"] = (["--compute", "bf16"], {"PS_CPU_NO_AMX": "1"})
    out["ioi_resid_pre_grid"] = {}
    for threads in (1, 2):
        t = {v: [] for v in variants}
        for _ in range(rounds):
            for v, (extra, env) in variants.items():
                cmd = [ps, "bench", "--model", model, "--components", "resid_pre", "--fast-only", "--reps", "3",
                       "--json", *extra]
                r = json.loads(run(cmd, {**threads_env(threads), **env}).stdout)
                t[v].append(r["components"][0]["fast_seconds"])
        med = {v: statistics.median(x) for v, x in t.items()}
        grid = {"rounds": rounds, "seconds": t, "median_seconds": med,
                "speedup": med["f32"] / med["bf16"], "meets_1_5x": med["f32"] / med["bf16"] >= 1.5}
        if "bf16_avx512" in med:
            grid["speedup_avx512_bf16"] = med["f32"] / med["bf16_avx512"]
        out["ioi_resid_pre_grid"][f"{threads}_threads"] = grid
        print(f"IOI resid_pre grid, GPT-2-small-shaped, fast engine, {threads} thread(s), median of {rounds} "
              "interleaved rounds: " + ", ".join(f"{v} {x:.3f} s" for v, x in med.items())
              + f"; bf16 speed-up {grid['speedup']:.2f}x" +
              (f" (AVX512_BF16 kernel {grid['speedup_avx512_bf16']:.2f}x)" if "bf16_avx512" in med else ""),
              flush=True)
    # errors of the normalized grids
    import numpy as np
    import xarray as xr
    llama = os.path.join(ROOT, "jobs", "ioi-tiny-llama", "model")
    err = {}
    with tempfile.TemporaryDirectory() as d:
        for name, m in (("gpt2-small-random", model), ("embedded gpt2", embedded), ("embedded llama", llama)):
            files = {}
            for c in ("f32", "bf16"):
                files[c] = os.path.join(d, f"{c}.nc")
                run([ps, "patch", "--model", m, "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", " Mary",
                     "--wrong", " John", "--components", "resid_pre,attn_out,mlp_out", "--compute", c,
                     "-o", files[c]], threads_env(2))
            with xr.open_dataset(files["f32"]) as a, xr.open_dataset(files["bf16"]) as b:
                g = ("resid_pre", "attn_out", "mlp_out")
                nd = max(float(np.nanmax(np.abs(a[x + "_normalized"].values - b[x + "_normalized"].values)))
                         for x in g)
                rd = max(float(np.nanmax(np.abs(a[x].values - b[x].values))) for x in g)
                den = float(abs(a["clean_metric"].values[0] - a["corrupted_metric"].values[0]))
            err[name] = {"max_abs_diff_normalized": nd, "max_abs_diff_raw": rd, "clean_minus_corrupted": den,
                         "meets_1e-2": nd <= 1e-2}
            print(f"{name:<18} max |bf16 - f32|: normalized {nd:.2e}, raw logit_diff {rd:.2e} "
                  f"(|clean - corrupted| = {den:.3g})", flush=True)
    out["grid_error"] = err
    out["loadavg_end"] = os.getloadavg()
    print(f"load {out['loadavg_end'][0]:.1f} at the end", flush=True)
    return out


TIMING_RE = re.compile(r"sweep: timings (?:of the sweep )?\(rank 0, seconds\):(.*)")


def demo_sweep(ps, job, ranks):
    """One run of the demo job as `make demo` runs it, with one thread per
    rank and --timings: wall seconds of mpirun, the program's seconds from
    its start to its exit, rank 0's steps and phases (sweep --timings)."""
    cmd = ["mpirun", "--oversubscribe", "-np", str(ranks), ps, "sweep", job, "--overwrite", "--threads", "1",
           "--timings"]
    t0 = time.perf_counter()
    r = run(cmd, MPI_ENV)
    wall = time.perf_counter() - t0
    phases = {}
    for m in TIMING_RE.finditer(r.stderr):
        toks = m.group(1).split()
        phases.update({toks[i]: float(toks[i + 1]) for i in range(0, len(toks) - 1, 2)})
    prog = re.search(r"sweep: timings: process ([\d.]+) s from its start to exit", r.stderr)
    if not prog or "compute" not in phases:
        sys.exit(f"bench_report: {' '.join(cmd)} printed no timings:\n{r.stderr.strip()}")
    return {"wall": wall, "program": float(prog.group(1)), **phases}


def demo_scaling(ps, reps):
    """Section 11: the demo job at 1 and 2 ranks, interleaved (1, 2, 1, 2, ...)
    so that a change of the machine's load falls on both alike; medians."""
    print(f"== 11. 1 -> 2 rank efficiency: the demo job (jobs/ioi-tiny, 128 pairs), 1 thread per rank, "
          f"{reps} interleaved runs each ==", flush=True)
    load0 = os.getloadavg()
    runs = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="ps-bench-demo-") as d:
        src = os.path.join(ROOT, "jobs", "ioi-tiny")
        with open(os.path.join(src, "job.ini")) as f:
            text = f.read()
        text = re.sub(r"(?m)^dir = .*$", f"dir = {os.path.join(src, 'model')}", text)
        text = re.sub(r"(?m)^dataset = .*$", f"dataset = {os.path.join(src, 'ioi.jsonl')}", text)
        text = re.sub(r"(?m)^output = .*$", f"output = {os.path.join(d, 'ioi-tiny.nc')}", text)
        job = os.path.join(d, "job.ini")
        with open(job, "w") as f:
            f.write(text)
        demo_sweep(ps, job, 2)  # warm: the page cache, the hash cache
        for _ in range(reps):
            for n in (1, 2):
                runs[n].append(demo_sweep(ps, job, n))
    load1 = os.getloadavg()
    med = {n: {k: statistics.median(r[k] for r in runs[n]) for k in runs[n][0]} for n in runs}
    low = {n: {k: min(r[k] for r in runs[n]) for k in runs[n][0]} for n in runs}
    eff = {k: med[1][k] / (2 * med[2][k]) for k in ("wall", "program", "compute")}
    eff_min = {k: low[1][k] / (2 * low[2][k]) for k in ("wall", "program", "compute")}
    out = {"reps": reps, "load_average_before": load0, "load_average_after": load1,
           "median": {str(n): med[n] for n in med}, "minimum": {str(n): low[n] for n in low},
           "runs": {str(n): runs[n] for n in runs}, "efficiency": eff, "efficiency_of_minima": eff_min}
    print(f"   load average {load0[0]:.2f} before, {load1[0]:.2f} after; {os.cpu_count()} CPUs, {cpu_model()}")
    print("   (under load the minimum of the runs is the closest to a quiet machine)")
    print(f"{'':<26} {'1 rank':>9} {'2 ranks':>9} {'efficiency':>11} {'min 1':>8} {'min 2':>8} {'eff(min)':>9}")
    for k, what in (("wall", "wall (mpirun)"), ("program", "program (start to exit)"), ("compute", "chunks")):
        print(f"{what:<26} {med[1][k]:>8.3f}s {med[2][k]:>8.3f}s {100 * eff[k]:>10.1f}% {low[1][k]:>7.3f}s "
              f"{low[2][k]:>7.3f}s {100 * eff_min[k]:>8.1f}%")
    print("   rank 0's steps and phases (medians, s):")
    for k in med[1]:
        if k not in ("wall", "program"):
            print(f"     {k:<14} {med[1][k]:>7.3f} {med[2][k]:>7.3f}")
    return out


def finish(report, out, argv):
    """Provenance, then the report written atomically."""
    eng = report.get("engines", {}).get("2_threads", {})  # absent with --families-only
    report["provenance"] = {k: eng[k] for k in ("patchsweep_version", "model", "model_sha256") if k in eng}
    report["provenance"]["command_line"] = " ".join([os.path.basename(sys.argv[0])] + argv)
    report["provenance"]["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp = out + ".partial"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    return 0


# ---- the scaling model (README, "Scaling to thousands of ranks") ------------
# kv: key/value width (grouped-query attention), m: MLP width, gated: three
# MLP matrices (Llama) instead of two.
MODELS = {"gpt2-small": dict(L=12, H=12, d=768, kv=768, m=3072, gated=False, V=50257),
          "llama-3-8b": dict(L=32, H=32, d=4096, kv=1024, m=14336, gated=True, V=128256)}
N_PROMPTS, T_IOI, P0 = 100_000, 16, 10  # 1e5 IOI prompts of 16 tokens, first difference at token 10
NET_GBPS = 10.0                         # assumed root link for the gather (InfiniBand EDR ~ 12 GB/s)
RANKS = (1, 64, 512, 4096)
WINDOW = 1024                           # prompts of ncout's staged window: written after the last chunk


def mlp_flops(c):
    return 2 * (3 if c["gated"] else 2) * c["d"] * c["m"]


def block_flops(c, row0, T):
    """One block over rows [row0, T) (as src/bench.c): q, k, v, o and the MLP
    per row plus causal attention 4 d (i+1) for row i."""
    d, kv = c["d"], c["kv"]
    return (T - row0) * (2 * (2 * d * d + 2 * d * kv) + mlp_flops(c)) + sum(4 * d * (i + 1) for i in range(row0, T))


def prompt_flops(c, T=T_IOI, p0=P0):
    """Useful FLOPs of the demo's four grids for one prompt pair whose tokens
    first differ at p0 (as bench_cell_flops: skipped cells are free; the last
    block runs only the last row past K and V)."""
    L, H, d, kv = c["L"], c["H"], c["d"], c["kv"]

    def suffix(block0, row0, partial):
        f = partial
        for l in range(block0, L):
            f += (block_flops(c, row0, T) if l + 1 < L else
                  (T - row0) * 4 * d * kv + 4 * d * d + mlp_flops(c) + 4 * d * T)
        return f + 4 * d
    total = 0
    for layer in range(L):
        for p in range(p0, T):
            total += suffix(layer, p, 0)                       # resid_pre
            total += suffix(layer + 1, p, mlp_flops(c))        # attn_out: MLP of the changed row
            total += suffix(layer + 1, p, 0)                   # mlp_out
        total += H * suffix(layer + 1, p0, (T - p0) * (2 * d * d + mlp_flops(c)))  # z_all_pos
    return total


def model_efficiency(t_prompt, g, R, write_mbps, n=N_PROMPTS):
    """Efficiency N t / (R T(R)) of a by-prompt sweep on R one-core ranks, g
    bytes of results per prompt, for the three write paths:
      before:  T = C + N g / B + N g / W          (rank 0 wrote after the chunks)
      shared:  the same: rank 0's writer thread takes its CPU time from the
               rank's one core, so rank 0 ends N g / W late
      own:     T = max(C + N g / B, N g / W) + min(N, 1024) g / W
               (the writer thread on a core of its own: only the last
               staged window is written after the last chunk)
    with C = ceil(N / R) t (whole prompts per rank)."""
    compute = -(-n // R) * t_prompt
    gather, write = n * g / (NET_GBPS * 1e9), n * g / (write_mbps * 1e6)
    tail = min(n, WINDOW) * g / (write_mbps * 1e6)
    before = compute + gather + write
    own = max(compute + gather, write) + tail
    return {"before": n * t_prompt / (R * before), "shared": n * t_prompt / (R * before),
            "own": n * t_prompt / (R * own)}


def scaling_model(one_thread, two_threads, big_sweep):
    """Predicted efficiency of a by-prompt sweep of N_PROMPTS on R one-core
    ranks (model_efficiency).  t_prompt for GPT-2 small is measured (one
    core, demo components); for the 8B model it is scaled by the FLOP ratio
    (same GFLOP/s: conservative, wider matrices run faster)."""
    comps = {c["component"]: c for c in one_thread["components"]}
    sec_small = sum(c["fast_seconds"] for c in comps.values())
    measured_T = one_thread["tokens"]
    # rate in useful FLOP/s of one core on the measured prompt
    rate = sum(c["useful_gflop"] for c in comps.values()) * 1e9 / sec_small
    write_mbps = big_sweep["file_mb"] / max(big_sweep["write_seconds"], 1e-9) if "file_mb" in big_sweep else 200.0
    out = {"assumptions": {"prompts": N_PROMPTS, "tokens": T_IOI, "first_difference": P0, "net_GB_per_s": NET_GBPS,
                           "root_write_MB_per_s": write_mbps, "one_core_useful_gflops": rate / 1e9,
                           "measured_prompt_tokens": measured_T},
           "models": {}}
    print(f"\n== 5. scaling model: {N_PROMPTS} IOI prompts ({T_IOI} tokens), demo components, one core per rank ==")
    print(f"   one core: {rate / 1e9:.1f} useful GFLOP/s (measured); rank 0 writes {write_mbps:.0f} MB/s (measured); "
          f"gather link {NET_GBPS} GB/s (assumed)")
    print(f"{'model':<11} {'cells/prompt':>12} {'s/prompt':>9} {'gather B/prompt':>15} {'writer':>7}"
          + "".join(f" {'eff@' + str(r):>9}" for r in RANKS[1:]))
    for name, c in MODELS.items():
        L, H = c["L"], c["H"]
        cells = 3 * L * T_IOI + L * H
        t_prompt = prompt_flops(c) / rate
        g = (2 + cells) * 8
        effs = {R: model_efficiency(t_prompt, g, R, write_mbps) for R in RANKS}
        first = "rank 0's write of the results" if effs[4096]["own"] < 0.9 else "none below 4096 ranks"
        out["models"][name] = {"cells_per_prompt": cells, "seconds_per_prompt_one_core": t_prompt,
                               "gather_bytes_per_prompt": g,
                               "efficiency": {str(r): effs[r] for r in RANKS}, "first_bottleneck": first}
        for path in ("before", "own"):
            print(f"{name:<11} {cells:>12} {t_prompt:>9.3f} {g:>15} {path:>7}"
                  + "".join(f" {100 * effs[r][path]:>8.0f}%" for r in RANKS[1:]))
    return out


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
