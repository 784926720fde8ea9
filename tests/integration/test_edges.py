#!/usr/bin/python3
"""Edge attribution patching (issue 20, item 4): `patch --method atp --edges`
equals a float64 reference on random models of every family.

1. For GPT-2, GPT-NeoX (parallel residual, partial rotary), GPT-NeoX
   (sequential residual), Llama (GQA; with bf16 weights; with head_dim *
   H != d) and Qwen2 (GQA) random models,
   logit_diff denoising and noising and kl denoising: every edge score
   sum_t (a_u^src - a_u^base) . g_v equals the reference's, max |C - ref| /
   max |ref| < 1e-4, and the edges that exist (non-null) are the
   reference's.  The reference uses hooks only, never the C code's
   formulas: a head's output delta is the change of hook_attn_out when
   hook_z's head alone takes the source's value; g_v is torch autograd of
   v's own reading (hook_q / hook_k / hook_v head, or ln2.hook_normalized)
   with respect to a private copy of the residual hook it reads (resid_pre,
   or resid_mid), contracted with the metric's gradient at that reading
   (oracle_families.gradients); the logits' g is the gradient at the last
   resid_post.  The edge exists when u is written before v reads (no head
   -> same-block MLP with a parallel residual).
2. Sums: for every downstream kind (q, k, v inputs, MLP inputs, logits) the
   sum of a node's incoming edges equals its input-node AtP, the
   reference's (x_v^src - x_v^base) . g_v summed over positions, and the
   C's downstream_atp; for every upstream kind (embedding, heads, MLPs) the
   sum of its outgoing edges equals its node AtP with the full gradient
   (a_u^src - a_u^base) . dM/da_u (reference and upstream_atp), which is
   also `patch --method atp`'s z_all_pos (a head) and mlp_out summed over
   positions (an MLP).
3. Labels: TransformerLens hook names with the head index.
4. `-o`: edge_atp(upstream, downstream), edge_atp_normalized (= edge_atp /
   (clean - corrupted)), upstream_atp, downstream_atp and the string
   coordinates, equal to --json; fill (NaN) where there is no edge.
5. Refused: --edges with --method exact, atp*, atp+exact, with
   --components, with --graddrop, with an ablation source; the same prompt
   twice gives 0 on every edge.  The console lists the top 20 edges by
   |score| with their labels.
Environment: PS_BIN, PS_ROOT (see run_integration.sh)."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import xarray as xr

ROOT = os.environ.get("PS_ROOT") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("PS_BIN") or os.path.join(ROOT, "build/rel/patchsweep")
sys.path.insert(0, os.path.join(ROOT, "tests/tools"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle  # noqa: E402
import oracle_families as of  # noqa: E402
from checks import check, finish  # noqa: E402

CLEAN = [3, 17, 0, 42, 96, 5, 11]
CORRUPTED = [3, 17, 9, 42, 96, 5, 11]
ANSWER, WRONG = 7, 8
GPT2 = ["--layers", "2", "--heads", "4", "--d-model", "32", "--vocab", "97", "--std", "0.3"]
CASES = [
    ("gpt2", "gpt2", GPT2),
    ("neox_parallel", "neox", dict(H=4, d=64, parallel=True)),
    ("neox_sequential", "neox", dict(H=4, d=64, parallel=False, L=3)),
    ("llama_gqa", "llama", dict(H=6, kv=2, L=2)),
    ("qwen2_gqa", "qwen2", dict(H=4, kv=2, L=2)),
    ("llama_bf16", "llama", dict(H=4, kv=2, L=2, dtype="bf16")),  # 2-byte weights (gemm_unpack widens them)
    ("llama_head_dim", "llama", dict(H=4, kv=2, L=2, d=48, head_dim=16)),  # H * dh = 64 != d
]
ids = lambda v: ",".join(map(str, v))  # noqa: E731


def make(tmp, name, fam, opts):
    mdir = os.path.join(tmp, name)
    if fam == "gpt2":
        subprocess.run([sys.executable, os.path.join(ROOT, "tests/tools/make_model.py"), *opts, "--n-positions", "32",
                        "--seed", "5", "-o", mdir], check=True)
        return mdir, oracle.load(mdir), False
    c = of.write_model(mdir, fam, seed=len(name) + 3, **opts)
    return mdir, of.Family(mdir), c.get("use_parallel_residual", False)


def edges(mdir, metric="logit_diff", direction="denoise", out=None, extra=(), clean=CLEAN, corrupted=CORRUPTED):
    args = [BIN, "patch", "--model", mdir, "--clean-ids", ids(clean), "--corrupted-ids", ids(corrupted),
            "--answer-id", str(ANSWER), "--wrong-id", str(WRONG), "--metric", metric, "--direction", direction,
            "--method", "atp", "--edges", "--json"] + (["-o", out] if out else []) + list(extra)
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        return None, r.stderr
    j = json.loads(r.stdout)
    arr = lambda x: np.array([[np.nan if v is None else v for v in row] for row in x])  # noqa: E731
    j["score"] = arr(j["edge_atp"])
    return j, r


def shapes(model):
    run = model.run(CLEAN)
    L = len([k for k in run if k.endswith("hook_resid_pre")])
    H, Hkv = run["blocks.0.attn.hook_q"].shape[1], run["blocks.0.attn.hook_k"].shape[1]
    return L, H, Hkv


def labels(L, H, Hkv):
    up = ["hook_embed"]
    down = []
    for l in range(L):
        up += [f"blocks.{l}.attn.hook_result[h={h}]" for h in range(H)] + [f"blocks.{l}.hook_mlp_out"]
        down += [f"blocks.{l}.hook_q_input[h={h}]" for h in range(H)]
        down += [f"blocks.{l}.hook_k_input[h={g}]" for g in range(Hkv)]
        down += [f"blocks.{l}.hook_v_input[h={g}]" for g in range(Hkv)]
        down += [f"blocks.{l}.hook_mlp_in"]
    return up, down + ["logits"]


def ref_edges(model, parallel, metric, direction):
    """float64 reference: scores [n_up, n_down] (NaN: no edge), the
    downstream nodes' input AtP and the upstream nodes' AtP, and the kinds."""
    L, H, Hkv = shapes(model)
    cc, rc = model.run(CLEAN), model.run(CORRUPTED)
    base_ids, base, src = (CORRUPTED, rc, cc) if direction == "denoise" else (CLEAN, cc, rc)
    grads = of.gradients(model, base_ids, ANSWER, WRONG, metric, CLEAN)
    np_ = lambda t: t.detach().numpy()  # noqa: E731
    # upstream: (delta a_u [T, d], write step, full gradient dM/da_u, kind)
    ups = []
    emb = np_(src["hook_embed"]) - np_(base["hook_embed"])
    if "hook_pos_embed" in base:
        emb = emb + np_(src["hook_pos_embed"]) - np_(base["hook_pos_embed"])
    ups.append((emb, 0, grads["hook_embed"], "embed"))
    for l in range(L):
        zname, aname = f"blocks.{l}.attn.hook_z", f"blocks.{l}.hook_attn_out"
        for h in range(H):
            def put(x, h=h, zname=zname):
                x = x.clone()
                x[:, h] = src[zname][:, h]
                return x
            delta = np_(model.run(base_ids, {zname: put})[aname]) - np_(base[aname])
            ups.append((delta, 2 * l + 1, grads[aname], "head"))
        mname = f"blocks.{l}.hook_mlp_out"
        ups.append((np_(src[mname]) - np_(base[mname]), 2 * l + 2, grads[mname], "mlp"))
    # downstream: (g_v [T, d], delta x_v [T, d], read step, kind)
    downs = []
    for l in range(L):
        rp = f"blocks.{l}.hook_resid_pre"
        x = base[rp].detach().clone().requires_grad_(True)
        out = model.run(base_ids, {rp: lambda _, x=x: x})
        for kind, hook in (("q", "attn.hook_q"), ("k", "attn.hook_k"), ("v", "attn.hook_v")):
            act, g = out[f"blocks.{l}.{hook}"], grads[f"blocks.{l}.{hook}"]
            for h in range(act.shape[1]):
                gv, = torch.autograd.grad(act[:, h], x, grad_outputs=torch.from_numpy(np.ascontiguousarray(g[:, h])),
                                          retain_graph=True)
                downs.append((gv.numpy(), np_(src[rp]) - np_(base[rp]), 2 * l + 1, kind))
        mi = rp if parallel else f"blocks.{l}.hook_resid_mid"
        x = base[mi].detach().clone().requires_grad_(True)
        out = model.run(base_ids, {mi: lambda _, x=x: x})
        nname = f"blocks.{l}.ln2.hook_normalized"
        gv, = torch.autograd.grad(out[nname], x, grad_outputs=torch.from_numpy(grads[nname]))
        downs.append((gv.numpy(), np_(src[mi]) - np_(base[mi]), 2 * l + (1 if parallel else 2), "mlp_in"))
    rp = f"blocks.{L - 1}.hook_resid_post"
    downs.append((grads[rp], np_(src[rp]) - np_(base[rp]), 2 * L + 1, "logits"))
    score = np.full((len(ups), len(downs)), np.nan)
    for i, (da, w, _, _) in enumerate(ups):
        for j, (g, _, r, _) in enumerate(downs):
            if w < r:
                score[i, j] = float((da * g).sum())
    down_atp = np.array([float((dx * g).sum()) for g, dx, _, _ in downs])
    up_atp = np.array([float((da * g).sum()) for da, _, g, _ in ups])
    return score, down_atp, up_atp, [u[3] for u in ups], [d[3] for d in downs]


def rel(a, b):
    return float(np.nanmax(np.abs(a - b))) / max(1e-30, float(np.nanmax(np.abs(b))))


with tempfile.TemporaryDirectory() as tmp:
    worst = {}
    for name, fam, opts in CASES:
        mdir, model, parallel = make(tmp, name, fam, opts)
        L, H, Hkv = shapes(model)
        for metric, direction in [("logit_diff", "denoise"), ("logit_diff", "noise"), ("kl", "denoise")]:
            tag = f"{name} {metric} {direction}"
            j, r = edges(mdir, metric, direction)
            if not check(f"{tag}: patch --method atp --edges", j is not None, r):
                continue
            want, down_atp, up_atp, ukind, dkind = ref_edges(model, parallel, metric, direction)
            got = j["score"]
            same_graph = got.shape == want.shape and np.array_equal(np.isnan(got), np.isnan(want))
            check(f"{tag}: the graph's edges ({int((~np.isnan(want)).sum())} of {want.size})", same_graph,
                  f"{got.shape} {want.shape}")
            if not same_graph:
                continue
            e = rel(got, want)
            worst[name] = max(worst.get(name, 0.0), e)
            check(f"{tag}: edge scores = reference ({e:.1e})", e < 1e-4, f"got {got[0, :4]} want {want[0, :4]}")
            # 2. sums over incoming edges, per downstream kind; over outgoing edges, per upstream kind
            cd, cu = np.array(j["downstream_atp"]), np.array(j["upstream_atp"])
            for kind in ("q", "k", "v", "mlp_in", "logits"):
                sel = np.array([k == kind for k in dkind])
                sums = np.nansum(got[:, sel], axis=0)
                scale = max(1e-30, float(np.abs(got[:, sel][~np.isnan(got[:, sel])]).max()))
                e1, e2 = float(np.abs(sums - down_atp[sel]).max()) / scale, \
                    float(np.abs(cd[sel] - down_atp[sel]).max()) / scale
                check(f"{tag}: {kind} inputs: sum of incoming edges = input-node AtP ({e1:.1e}), "
                      f"downstream_atp = reference ({e2:.1e})", e1 < 1e-4 and e2 < 1e-4,
                      f"{sums[:3]} {down_atp[sel][:3]} {cd[sel][:3]}")
            for kind in ("embed", "head", "mlp"):
                sel = np.array([k == kind for k in ukind])
                sums = np.nansum(got[sel], axis=1)
                scale = max(1e-30, float(np.abs(got[sel][~np.isnan(got[sel])]).max()))
                e1, e2 = float(np.abs(sums - up_atp[sel]).max()) / scale, \
                    float(np.abs(cu[sel] - up_atp[sel]).max()) / scale
                check(f"{tag}: {kind} outputs: sum of outgoing edges = node AtP ({e1:.1e}), upstream_atp = "
                      f"reference ({e2:.1e})", e1 < 1e-4 and e2 < 1e-4, f"{sums[:3]} {up_atp[sel][:3]} {cu[sel][:3]}")
        # 2b. the upstream nodes' AtP = the node AtP engine's (patch --method atp): z_all_pos per head,
        # mlp_out summed over positions (estimates minus the base metric)
        args = [BIN, "patch", "--model", mdir, "--clean-ids", ids(CLEAN), "--corrupted-ids", ids(CORRUPTED),
                "--answer-id", str(ANSWER), "--wrong-id", str(WRONG), "--method", "atp", "--components",
                "z_all_pos,mlp_out", "--json"]
        r = subprocess.run(args, capture_output=True, text=True)
        if check(f"{name}: patch --method atp --components z_all_pos,mlp_out", r.returncode == 0, r.stderr) and j:
            a = json.loads(r.stdout)
            base = a["corrupted_metric"]
            zap = np.array(a["components"]["z_all_pos"]["values"]).reshape(L, H) - base
            mlp = (np.array(a["components"]["mlp_out"]["values"]).reshape(L, -1) - base).sum(1)
            jd, _ = edges(mdir)
            ua = np.array(jd["upstream_atp"]).reshape(-1)[1:].reshape(L, H + 1)
            e = max(float(np.abs(ua[:, :H] - zap).max()), float(np.abs(ua[:, H] - mlp).max())) / \
                max(1e-30, float(np.abs(ua).max()))
            check(f"{name}: upstream_atp = AtP of z_all_pos (heads) and of mlp_out summed over positions ({e:.1e})",
                  e < 1e-5, f"{ua} {zap} {mlp}")
        # 3. labels
        up, down = labels(L, H, Hkv)
        check(f"{name}: labels ({len(up)} upstream, {len(down)} downstream)",
              j is not None and j["upstream"] == up and j["downstream"] == down,
              j and (j["upstream"][:3], j["downstream"][:3]))
        if parallel:
            i, k = up.index("blocks.0.attn.hook_result[h=0]"), down.index("blocks.0.hook_mlp_in")
            check(f"{name}: parallel residual: no edge head -> same block's MLP",
                  j is not None and j["edge_atp"][i][k] is None and j["edge_atp"][i][down.index("blocks.1.hook_mlp_in")]
                  is not None, "")

    # 4. the results file
    mdir = os.path.join(tmp, "llama_gqa")
    out = os.path.join(tmp, "edges.nc")
    j, r = edges(mdir, out=out)
    if check("-o with --edges", j is not None and os.path.exists(out), r):
        with xr.open_dataset(out) as ds:
            ea, en = ds["edge_atp"], ds["edge_atp_normalized"]
            check("results file: edge_atp(upstream, downstream), edge_atp_normalized, upstream_atp(upstream), "
                  "downstream_atp(downstream)",
                  ea.dims == ("upstream", "downstream") and en.dims == ea.dims
                  and ds["upstream_atp"].dims == ("upstream",) and ds["downstream_atp"].dims == ("downstream",),
                  f"{ea.dims} {list(ds)}")
            check("results file: upstream and downstream coordinates hold the labels",
                  list(ds["upstream"].values) == j["upstream"] and list(ds["downstream"].values) == j["downstream"],
                  list(ds["upstream"].values)[:3])
            s = j["score"]
            check("results file: edge_atp = --json (float32), NaN where no edge",
                  np.array_equal(np.isnan(ea.values), np.isnan(s)) and
                  np.allclose(ea.values[~np.isnan(s)], s[~np.isnan(s)], rtol=1e-6, atol=1e-7),
                  f"{ea.values[0, :3]} {s[0, :3]}")
            scale = j["clean_metric"] - j["corrupted_metric"]
            check("results file: edge_atp_normalized = edge_atp / (clean - corrupted)",
                  np.allclose(en.values[~np.isnan(s)], s[~np.isnan(s)] / scale, rtol=1e-5, atol=1e-7),
                  f"{en.values[0, :3]} {s[0, :3] / scale}")
            check("results file: method atp, the pair's metrics",
                  ds.attrs.get("method") == "atp" and abs(float(ds["clean_metric"].values[0]) - j["clean_metric"])
                  < 1e-9, ds.attrs.get("method"))
            sel = ea.sel(upstream="hook_embed", downstream="logits")
            check("results file: select an edge by its labels", np.isclose(float(sel), s[0, -1], rtol=1e-6), sel)

    # the console: the top 20 edges by |score|, with their labels, the largest first
    r = subprocess.run([BIN, "patch", "--model", mdir, "--clean-ids", ids(CLEAN), "--corrupted-ids", ids(CORRUPTED),
                        "--answer-id", str(ANSWER), "--wrong-id", str(WRONG), "--method", "atp", "--edges"],
                       capture_output=True, text=True)
    j, _ = edges(mdir)
    if check("console: patch --method atp --edges", r.returncode == 0 and j is not None, r.stderr):
        rows = [ln.split() for ln in r.stdout.splitlines() if ln.strip()[:1].isdigit() and "->" in ln]
        s = j["score"]
        order = np.argsort(-np.abs(np.nan_to_num(s, nan=0.0)), axis=None, kind="stable")[:20]
        want = [(j["upstream"][i // s.shape[1]], j["downstream"][i % s.shape[1]]) for i in order]
        got = [(x[3], x[5]) for x in rows]
        check("console: the top 20 edges by |score| with their labels, largest first",
              len(rows) == 20 and got == want and abs(float(rows[0][1]) - s.flat[order[0]]) < 1e-4,
              f"{got[:3]} {want[:3]}")

    # 5. bad input and the trivial pair
    base_args = [BIN, "patch", "--model", mdir, "--clean-ids", ids(CLEAN), "--corrupted-ids", ids(CORRUPTED),
                 "--answer-id", str(ANSWER), "--wrong-id", str(WRONG), "--edges"]
    for extra, want in [([], "--edges needs --method atp"), (["--method", "exact"], "--edges needs --method atp"),
                        (["--method", "atp*"], "--edges needs --method atp"),
                        (["--method", "atp+exact"], "--edges needs --method atp"),
                        (["--method", "atp", "--components", "z"], "--components does not apply"),
                        (["--method", "atp", "--graddrop"], "--graddrop does not apply"),
                        (["--method", "atp", "--source", "zero"], "does not take an ablation source")]:
        r = subprocess.run(base_args + extra, capture_output=True, text=True)
        check(f"refused: --edges {' '.join(extra)}", r.returncode == 2 and want in r.stderr
              and len(r.stderr.strip().splitlines()) <= 2, r.stderr)
    r = subprocess.run([BIN, "bench", "--model", mdir, "--clean-ids", ids(CLEAN), "--corrupted-ids", ids(CORRUPTED),
                        "--answer-id", str(ANSWER), "--wrong-id", str(WRONG), "--edges"], capture_output=True,
                       text=True)
    check("refused: bench --edges", r.returncode == 2 and "--edges does not apply" in r.stderr, r.stderr)
    j, r = edges(mdir, corrupted=CLEAN)
    check("the same prompt twice: every edge 0", j is not None and np.nanmax(np.abs(j["score"])) == 0.0, r)

finish("edges", "; max rel error vs reference: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
