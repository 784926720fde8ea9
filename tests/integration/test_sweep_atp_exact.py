#!/usr/bin/python3
"""Estimate vs truth in sweeps (issue 20, item 5), on the embedded model and
12 IOI pairs of the demo's dataset:

1. [patch] method = atp*+exact on 1, 2 and 3 ranks (mpirun): every variable
   the same bit for bit; the exact grids C, C_normalized, the estimate C_atp,
   C_atp_normalized, C_atp_error = C_atp - C, per prompt
   C_atp_rank_correlation and C_atp_missed, method = atp*+exact.
2. Each prompt's values equal `patch --method atp*+exact --json` on its token
   ids: exact values, estimate, rank correlation, number missed.
3. The dataset summary (attributes mean, median, total, prompts) equals
   numpy's over the per-prompt values, and the sweep prints it.
4. A run killed after its second chunk (PS_FAULT=journal_sync:3:kill, the
   test build) and resumed equals the uninterrupted run; so does the merge
   of slices 1/2 and 2/2 (summary included).
5. method = atp*+verify, verify_top_k = 4 on 1 and 3 ranks: the same bits;
   C_atp equals atp*+exact's; C_verified holds 4 cells a prompt and grid,
   equal bit for bit to the exact sweep's C there, and the cells and values
   are `patch --method atp*+verify --verify-top-k 4`'s (--json and -o);
   --verify-top-k without +verify is refused.
6. [patch] graddrop = true with method = atp: method atp+graddrop, values
   equal `patch --method atp --graddrop` per prompt, and differ from atp's.
7. Refused with one line naming the job file: verify_threshold, verify_top_k
   without +verify, graddrop with exact, two metrics, an ablation source,
   distribute = cells.
Environment: PS_BIN, PS_BUILD, PS_ROOT (see run_integration.sh)."""
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
TMP = tempfile.mkdtemp(prefix="ps-sweep-atp-exact-")
BIN = private_binary(os.environ["PS_BIN"], TMP)
FAULT_BIN = private_binary(os.path.join(os.environ["PS_BUILD"], "tests", "patchsweep-faults"), TMP)
ENV = mpi_env()
MODEL = os.path.join(ROOT, "jobs/ioi-tiny/model")
COMPS = ["resid_pre", "z_all_pos", "q_all_pos", "k_all_pos"]
N = 12

data = os.path.join(TMP, "ioi.jsonl")
with open(os.path.join(ROOT, "jobs/ioi-tiny/ioi.jsonl")) as src, open(data, "w") as dst:
    dst.writelines(src.readlines()[:N])


def job(name, patch, run=""):
    path = os.path.join(TMP, name + ".ini")
    with open(path, "w") as f:
        f.write(f"[model]\ndir = {MODEL}\n[data]\ndataset = {data}\n[patch]\ncomponents = {','.join(COMPS)}\n"
                f"{patch}[run]\noutput = {name}.nc\nchunk_prompts = 5\n{run}")
    return path, os.path.join(TMP, name + ".nc")


def sweep(path, ranks=0, binary=None, env=None, extra=()):
    cmd = (["mpirun", "--oversubscribe", "-np", str(ranks)] if ranks else []) + [binary or BIN, "sweep", path,
                                                                                 *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or ENV, timeout=900, cwd=TMP)


def same_vars(a, b, skip=()):
    """Names of the data variables whose values differ (NaN equal to NaN)."""
    bad = [n for n in a.data_vars if n not in skip and
           (n not in b or not (np.array_equal(a[n].values, b[n].values, equal_nan=True)
                               if a[n].dtype.kind in "fc" else np.array_equal(a[n].values, b[n].values)))]
    return bad + [n for n in b.data_vars if n not in a and n not in skip]


def summary_atts(ds):
    return {n: {k: ds[n].attrs.get(k) for k in ("prompts", "mean", "median", "total")}
            for n in ds.data_vars if n.endswith("_atp_rank_correlation") or n.endswith("_atp_missed")}


def patch_json(ds, p, *args):
    T = int(ds["length"].values[p])
    ids = lambda v: ",".join(str(int(x)) for x in ds[v].values[p][:T])  # noqa: E731
    r = subprocess.run([BIN, "patch", "--model", MODEL, "--clean-ids", ids("clean_token_id"), "--corrupted-ids",
                        ids("corrupted_token_id"), "--answer-id", str(int(ds["answer_id"].values[p])), "--wrong-id",
                        str(int(ds["wrong_id"].values[p])), "--components", ",".join(COMPS), "--json", *args],
                       capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else r.stderr


def grid(ds, name, p, shape):
    return ds[name].values[p][tuple(slice(0, n) for n in shape)]


# 1. atp*+exact on 1, 2, 3 ranks
files, stdout = {}, {}
for ranks in (0, 2, 3):
    path, out = job(f"both{ranks}", "method = atp*+exact\n")
    r = sweep(path, ranks)
    if check(f"sweep method = atp*+exact on {max(ranks, 1)} rank(s)", r.returncode == 0, r.stderr):
        files[ranks], stdout[ranks] = out, r.stdout
if 0 in files:
    a = xr.open_dataset(files[0])
    names = [c + s for c in COMPS for s in ("", "_normalized", "_atp", "_atp_normalized", "_atp_error",
                                            "_atp_rank_correlation", "_atp_missed")]
    check("C, C_normalized, C_atp, C_atp_normalized, C_atp_error, C_atp_rank_correlation, C_atp_missed; "
          "method = atp*+exact", all(n in a for n in names) and a.attrs.get("method") == "atp*+exact",
          f"{[n for n in names if n not in a]} {a.attrs.get('method')}")
    check("every prompt done", int(a["done"].values.sum()) == N, a["done"].values)
    for ranks in (2, 3):
        if ranks in files:
            with xr.open_dataset(files[ranks]) as b:
                bad = same_vars(a, b)
                check(f"1 and {ranks} ranks: every variable the same bit for bit", not bad, bad)
                check(f"1 and {ranks} ranks: the same summary attributes", summary_atts(a) == summary_atts(b),
                      f"{summary_atts(a)} {summary_atts(b)}")
    err = max(float(np.nanmax(np.abs(a[c + "_atp_error"].values - (a[c + "_atp"].values - a[c].values))))
              for c in COMPS)
    check(f"C_atp_error = C_atp - C (float32 storage: {err:.1e})", err < 1e-5, err)

    # 2. against patch --method atp*+exact
    for p in (0, 7):
        ref = patch_json(a, p, "--method", "atp*+exact")
        if not check(f"prompt {p}: patch --method atp*+exact", isinstance(ref, dict), ref):
            continue
        for c in COMPS:
            rc = ref["components"][c]
            shape = rc["shape"]
            exact = np.array(rc["values"]).reshape(shape)
            est = exact + np.array(rc["atp"]["error"]).reshape(shape)
            e1 = float(np.abs(grid(a, c, p, shape) - exact).max()) / max(1.0, float(np.abs(exact).max()))
            e2 = float(np.abs(grid(a, c + "_atp", p, shape) - est).max()) / max(1.0, float(np.abs(est).max()))
            check(f"prompt {p} {c}: C and C_atp = patch's exact values and estimate ({e1:.1e}, {e2:.1e})",
                  e1 < 1e-6 and e2 < 1e-6, f"{e1} {e2}")
            rho = rc["atp"]["rank_correlation"]
            got = float(a[c + "_atp_rank_correlation"].values[p])
            check(f"prompt {p} {c}: rank correlation {got:.4f} = patch's, missed "
                  f"{int(a[c + '_atp_missed'].values[p])} = {len(rc['atp']['missed_top_k'])}",
                  (rho is None and np.isnan(got)) or (rho is not None and abs(got - rho) < 1e-12)
                  and int(a[c + "_atp_missed"].values[p]) == len(rc["atp"]["missed_top_k"]), f"{got} {rho}")

    # 3. the dataset summary
    ok = True
    for c in COMPS:
        rho = a[c + "_atp_rank_correlation"].values
        rho = rho[np.isfinite(rho)]
        at = a[c + "_atp_rank_correlation"].attrs
        ms = a[c + "_atp_missed"]
        ok = ok and at["prompts"] == len(rho) and abs(at["mean"] - rho.mean()) < 1e-12 and \
            abs(at["median"] - np.median(rho)) < 1e-12 and ms.attrs["total"] == int(ms.values.sum()) and \
            ms.attrs["prompts"] == N
    check("summary: prompts, mean and median of C_atp_rank_correlation, total of C_atp_missed = numpy's", ok,
          summary_atts(a))
    lines = [f"{c:<16} AtP* vs exact: rank correlation median {a[c + '_atp_rank_correlation'].attrs['median']:.3f}, "
             f"mean {a[c + '_atp_rank_correlation'].attrs['mean']:.3f} ({N} prompts); "
             f"{a[c + '_atp_missed'].attrs['total']} of the exact top-10 cells missed" for c in COMPS]
    check("the sweep prints the summary, one line per component", all(ln in stdout[0] for ln in lines),
          f"{lines[0]!r} in {stdout[0]!r}")

    # 4. resume after a kill, and the merge of two slices
    path, out = job("resumed", "method = atp*+exact\n")
    r = sweep(path, binary=FAULT_BIN, env=dict(ENV, PS_FAULT="journal_sync:3:kill"))
    check("the test build killed after the second chunk's journal sync", r.returncode != 0 and not
          os.path.exists(out), f"rc {r.returncode} {r.stderr[-300:]}")
    r = sweep(path)
    if check("resumed run", r.returncode == 0 and "resum" in r.stderr.lower(), r.stderr[-600:]):
        with xr.open_dataset(out) as b:
            bad = same_vars(a, b)
            check("resumed = uninterrupted, every variable and the summary", not bad and
                  summary_atts(a) == summary_atts(b), bad)
    path, _ = job("sliced", "method = atp*+exact\n")
    parts = []
    for k in (1, 2):
        part = os.path.join(TMP, f"part{k}.nc")
        r = sweep(path, extra=("--slice", f"{k}/2", "--output", part))
        if check(f"slice {k}/2", r.returncode == 0, r.stderr[-400:]):
            parts.append(part)
    if len(parts) == 2:
        merged = os.path.join(TMP, "merged.nc")
        r = subprocess.run([BIN, "merge", *parts, "-o", merged], capture_output=True, text=True)
        if check("merge of the two slices", r.returncode == 0, r.stderr):
            with xr.open_dataset(merged) as b, xr.open_dataset(parts[0]) as p1:
                bad = same_vars(a, b)
                check("merged = the whole run, every variable", not bad, bad)
                check("merged summary = the whole run's (not a slice's)", summary_atts(a) == summary_atts(b)
                      and summary_atts(p1) != summary_atts(a), f"{summary_atts(b)} {summary_atts(a)}")

    # 5. atp*+verify
    vfiles = {}
    for ranks in (0, 3):
        path, out = job(f"verify{ranks}", "method = atp*+verify\nverify_top_k = 4\n")
        r = sweep(path, ranks)
        if check(f"sweep method = atp*+verify on {max(ranks, 1)} rank(s)", r.returncode == 0, r.stderr[-400:]):
            vfiles[ranks] = out
    if 0 in vfiles:
        v = xr.open_dataset(vfiles[0])
        check("C_atp, C_verified, C_verified_normalized; no exact C; method, verify_top_k",
              all(c + s in v for c in COMPS for s in ("_atp", "_atp_normalized", "_verified",
                                                     "_verified_normalized"))
              and not any(c in v for c in COMPS) and v.attrs.get("method") == "atp*+verify"
              and v.attrs.get("verify_top_k") == "4", f"{list(v.data_vars)[:20]} {v.attrs.get('method')}")
        if 3 in vfiles:
            with xr.open_dataset(vfiles[3]) as b:
                bad = same_vars(v, b)
                check("atp*+verify: 1 and 3 ranks the same bit for bit", not bad, bad)
        check("atp*+verify's C_atp = atp*+exact's C_atp bit for bit",
              all(np.array_equal(v[c + "_atp"].values, a[c + "_atp"].values, equal_nan=True) for c in COMPS))
        for c in COMPS:
            ver = v[c + "_verified"].values
            mask = np.isfinite(ver)
            per = mask.reshape(N, -1).sum(axis=1)
            check(f"{c}: 4 cells verified per prompt, equal bit for bit to the exact sweep's C there",
                  (per == 4).all() and np.array_equal(ver[mask], a[c].values[mask]), per)
        for p in (0, 7):
            ref = patch_json(v, p, "--method", "atp*+verify", "--verify-top-k", "4")
            if not check(f"prompt {p}: patch --method atp*+verify --verify-top-k 4", isinstance(ref, dict), ref):
                continue
            for c in COMPS:
                shape = ref["components"][c]["shape"]
                want = np.array([np.nan if x is None else x for x in ref["components"][c]["verified"]]).reshape(shape)
                got = grid(v, c + "_verified", p, shape)
                same_cells = np.array_equal(np.isfinite(got), np.isfinite(want))
                e = float(np.nanmax(np.abs(got - want))) / max(1.0, float(np.nanmax(np.abs(want))))
                check(f"prompt {p} {c}: the same verified cells as patch, values ({e:.1e})",
                      same_cells and e < 1e-6, f"{np.argwhere(np.isfinite(got)).tolist()} "
                      f"{np.argwhere(np.isfinite(want)).tolist()}")

        # patch -o: the same variables for one pair; --verify-top-k needs +verify
        T = int(v["length"].values[0])
        ids = lambda name: ",".join(str(int(x)) for x in v[name].values[0][:T])  # noqa: E731
        pair = ["--model", MODEL, "--clean-ids", ids("clean_token_id"), "--corrupted-ids", ids("corrupted_token_id"),
                "--answer-id", str(int(v["answer_id"].values[0])), "--wrong-id", str(int(v["wrong_id"].values[0])),
                "--components", ",".join(COMPS)]
        one = os.path.join(TMP, "one-verify.nc")
        r = subprocess.run([BIN, "patch", *pair, "--method", "atp*+verify", "--verify-top-k", "4", "-o", one],
                           capture_output=True, text=True)
        if check("patch --method atp*+verify --verify-top-k 4 -o", r.returncode == 0, r.stderr):
            with xr.open_dataset(one) as o:
                same = all(np.array_equal(o[c + s].values[0], v[c + s].values[0][tuple(slice(0, n) for n in
                                                                                     o[c + s].values[0].shape)],
                                          equal_nan=True) for c in COMPS for s in ("_verified", "_atp"))
                check("patch -o: C_atp, C_verified = the sweep's prompt 0; method, verify_top_k",
                      same and o.attrs.get("method") == "atp*+verify" and o.attrs.get("verify_top_k") == "4",
                      f"{o.attrs.get('method')} {o.attrs.get('verify_top_k')}")
        r = subprocess.run([BIN, "patch", *pair, "--method", "atp", "--verify-top-k", "4"], capture_output=True,
                           text=True)
        check("patch --verify-top-k without +verify: refused in one line", r.returncode == 2 and
              len(r.stderr.strip().splitlines()) == 1 and "--verify-top-k applies to --method atp+verify" in r.stderr,
              r.stderr)
        v.close()

    # 6. GradDrop
    path, out = job("graddrop", "method = atp\ngraddrop = true\n")
    r = sweep(path, 2)
    path0, out0 = job("plain", "method = atp\n")
    r0 = sweep(path0)
    if check("sweep method = atp, graddrop = true (2 ranks)", r.returncode == 0 and r0.returncode == 0,
             r.stderr[-400:] + r0.stderr[-400:]):
        with xr.open_dataset(out) as g, xr.open_dataset(out0) as g0:
            check("method attribute atp+graddrop", g.attrs.get("method") == "atp+graddrop", g.attrs.get("method"))
            check("GradDrop changes the estimates", not all(np.array_equal(g[c + "_atp"].values, g0[c + "_atp"].values,
                                                                           equal_nan=True) for c in COMPS))
            for p in (0, 7):
                ref = patch_json(g, p, "--method", "atp", "--graddrop")
                if not check(f"prompt {p}: patch --method atp --graddrop", isinstance(ref, dict), ref):
                    continue
                for c in COMPS:
                    rv = np.array(ref["components"][c]["values"]).reshape(ref["components"][c]["shape"])
                    s = grid(g, c + "_atp", p, rv.shape)
                    e = float(np.abs(s - rv).max()) / max(1.0, float(np.abs(rv).max()))
                    check(f"prompt {p} {c}: sweep with graddrop = patch --graddrop ({e:.1e})", e < 1e-6, e)
    a.close()

# 7. refused
for name, patch, run, frag in [
        ("threshold", "method = atp+verify\nverify_threshold = 0.2\n", "",
         "verify_threshold is not implemented"),
        ("topk", "method = atp+exact\nverify_top_k = 3\n", "",
         "verify_top_k applies to method = atp+verify or atp*+verify only"),
        ("gd", "graddrop = true\n", "", "graddrop = true needs an attribution method"),
        ("metrics", "method = atp+exact\nmetric = logit_diff, prob\n", "", "method = atp+exact takes one metric"),
        ("ablation", "method = atp*+verify\nsource = zero\n", "",
         "method = atp*+verify takes source = clean or corrupted, not zero"),
        ("cells", "method = atp+exact\n", "distribute = cells\n", "distribute = cells needs [patch] method = exact")]:
    path, out = job(name, patch, run)
    r = sweep(path)
    lines = r.stderr.strip().splitlines()
    check(f"{patch.strip().replace(chr(10), '; ')} {run.strip()}: refused in one line naming the job",
          r.returncode != 0 and len(lines) == 1 and frag in lines[0] and name + ".ini" in lines[0]
          and not os.path.exists(out), r.stderr)

finish("sweep_atp_exact")
