#!/usr/bin/python3
"""Model families (issue 17): activation patching, the lens and the
decomposition, and token ids as input, on random GPT-NeoX, Llama, Mistral and
Qwen2 checkpoints (tests/tools/oracle_families.py writes them in HF's layout).

- `patch --clean-ids ... --engine naive|fast` against the float64 reference's
  naive loop (oracle_families.patch_grid: one run of the base prompt per cell
  with the source's activation written over the cell, TransformerLens'
  get_act_patch_*): every component the family has (resid_mid only without a
  parallel residual; k_all_pos / v_all_pos per key/value head with GQA),
  metrics logit_diff and kl, both directions; fast = naive.
- `lens --ids` and `decompose --ids` (--subtract, --attribution) against the
  reference through the family's final norm (RMSNorm: no centring, no bias).
- a 2-rank `sweep` of a Llama-shaped model with a dataset of token ids equals
  `patch`; `evaluate` and `lens --dataset` read the same ids.
- refusals: resid_mid with a parallel residual, a dataset item without ids.

Takes about a minute on 2 cores (PS_QUICK=1: one metric and direction per
model).  Environment: PS_BIN, PS_ROOT (see run_integration.sh)."""
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
QUICK = os.environ.get("PS_QUICK") == "1"
sys.path.insert(0, os.path.join(ROOT, "tests/tools"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle_families as of  # noqa: E402
from checks import check, finish  # noqa: E402

CLEAN = [3, 17, 0, 42, 96, 5, 11]
CORRUPTED = [3, 17, 9, 42, 96, 5, 11]
ANSWER, WRONG = 7, 8
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
CASES = [
    ("llama_gqa", "llama", dict(H=6, kv=2, L=2)),
    ("llama_bias_tied_llama3", "llama", dict(H=4, kv=4, attention_bias=True, mlp_bias=True, tied=True,
                                             rope_scaling=LLAMA3)),
    ("mistral_headdim", "llama", dict(H=4, kv=2, head_dim=16, mistral=True)),
    ("qwen2_gqa_bf16", "qwen2", dict(H=6, kv=2, tied=True, dtype="bf16", shards=2)),
    ("neox_parallel", "neox", dict(H=4, d=64, parallel=True)),
    ("neox_sequential", "neox", dict(H=4, d=64, parallel=False, rotary_pct=0.5)),
]
COMPONENTS = ["resid_pre", "resid_mid", "attn_out", "mlp_out", "z", "z_all_pos", "q_all_pos", "k_all_pos",
              "v_all_pos", "pattern_all_pos"]
# The by-position head grids (issue 19) on the grouped-query Llama (k, v per
# key/value head; hook_q / hook_k before the rotary embedding) and the NeoX
# model with partial rotary; pattern_dest_src (L x T x T x H cells, the
# reference's loop ~5 ms a cell) with logit_diff denoising only.
BY_POS = {"llama_gqa": ["q", "k", "v", "pattern", "pattern_dest_src"],
          "neox_sequential": ["q", "k", "v", "pattern"]}
# TransformerLens' layouts (the reference's) to ours, where the head is last
TO_OURS = {"pattern": (0, 2, 1), "pattern_dest_src": (0, 2, 3, 1)}
ids = lambda v: ",".join(map(str, v))  # noqa: E731


def run(args, ranks=0):
    cmd = (["mpirun", "--oversubscribe", "-np", str(ranks)] if ranks else []) + [BIN] + args
    return subprocess.run(cmd, capture_output=True, text=True)


def patch_json(mdir, comps, metric, direction, engine):
    r = run(["patch", "--model", mdir, "--clean-ids", ids(CLEAN), "--corrupted-ids", ids(CORRUPTED), "--answer-id",
             str(ANSWER), "--wrong-id", str(WRONG), "--components", ",".join(comps), "--metric", metric,
             "--direction", direction, "--engine", engine, "--json"])
    if r.returncode != 0:
        return None, r.stderr
    j = json.loads(r.stdout)
    return {c: np.array(v["values"]).reshape(v["shape"]) for c, v in j["components"].items()}, j


worst_oracle, worst_engines = {}, {}
with tempfile.TemporaryDirectory() as tmp:
    for name, fam, opts in CASES:
        mdir = os.path.join(tmp, name)
        of.write_model(mdir, fam, seed=len(name) + 1, **opts)
        ref = of.Family(mdir)
        par = fam == "neox" and opts.get("parallel", True)
        combos = [("logit_diff", "denoise"), ("kl", "noise")] if QUICK else \
            [(m, d) for m in ("logit_diff", "kl") for d in ("denoise", "noise")]
        for metric, direction in combos:
            comps = [c for c in COMPONENTS if not (par and c == "resid_mid")] + [
                c for c in BY_POS.get(name, []) if c != "pattern_dest_src" or (metric, direction) == combos[0]]
            grids = {e: patch_json(mdir, comps, metric, direction, e) for e in ("naive", "fast")}
            if not check(f"{name}: patch --clean-ids ({metric}, {direction})",
                         all(g[0] is not None for g in grids.values()), [g[1] for g in grids.values()]):
                continue
            naive, fast = grids["naive"][0], grids["fast"][0]
            scale = max(1.0, abs(grids["naive"][1]["clean_metric"]), abs(grids["naive"][1]["corrupted_metric"]))
            for c in comps:
                want = of.patch_grid(ref, CLEAN, CORRUPTED, ANSWER, WRONG, c, metric, direction)
                if c in TO_OURS:
                    want = want.transpose(TO_OURS[c])
                e_or = float(np.abs(naive[c] - want).max()) / scale if naive[c].shape == want.shape else np.inf
                e_en = float(np.abs(naive[c] - fast[c]).max()) / scale if naive[c].shape == fast[c].shape else np.inf
                worst_oracle[name] = max(worst_oracle.get(name, 0.0), e_or)
                worst_engines[name] = max(worst_engines.get(name, 0.0), e_en)
                check(f"{name} {c} {metric} {direction}: naive = reference ({e_or:.1e}), fast = naive ({e_en:.1e}),"
                      f" shape {list(want.shape)}", e_or < 1e-4 and e_en < 1e-5,
                      f"naive {naive[c].ravel()[:4]} ref {want.ravel()[:4]} fast {fast[c].ravel()[:4]}")

        # lens and decompose through the family's final norm
        cache = ref.run(CLEAN)
        c = ref.c
        neox = c["model_type"] == "gpt_neox"
        pre = "gpt_neox." if neox else "model."
        w = ref.w[pre + ("final_layer_norm.weight" if neox else "norm.weight")]
        b = ref.w.get(pre + "final_layer_norm.bias") if neox else None
        head = ref.w["embed_out.weight"] if neox else ref.w.get("lm_head.weight", ref.w[pre + "embed_tokens.weight"])
        eps = c["layer_norm_eps"] if neox else c["rms_norm_eps"]

        def ln_f(x):
            xc = x - x.mean(-1, keepdim=True) if neox else x
            y = xc / torch.sqrt((xc ** 2).mean(-1, keepdim=True) + eps) * w
            return y + b if b is not None else y

        L = c["num_hidden_layers"]
        rows = [cache["blocks.0.hook_resid_pre"][-1]] + [cache[f"blocks.{l}.hook_resid_post"][-1] for l in range(L)]
        lp = [torch.log_softmax(ln_f(r) @ head.T, -1) for r in rows]
        r = run(["lens", "--model", mdir, "--ids", ids(CLEAN), "--answer-id", str(ANSWER), "--json"])
        if check(f"{name}: lens --ids", r.returncode == 0, r.stderr):
            got = [row["answer_logprob"] for row in json.loads(r.stdout)["layers"]]
            want = [float(x[ANSWER]) for x in lp]
            e = max(abs(a - b_) for a, b_ in zip(got, want))
            check(f"{name}: lens answer log-probabilities = reference ({e:.1e})", len(got) == L + 1 and e < 1e-4)
        r = run(["decompose", "--model", mdir, "--ids", ids(CLEAN), "--layer", str(L - 1), "--subtract", "mlp_out",
                 "--answer-id", str(ANSWER), "--json"])
        if check(f"{name}: decompose --ids --subtract", r.returncode == 0, r.stderr):
            j = json.loads(r.stdout)
            x = cache[f"blocks.{L - 1}.hook_resid_post"][-1] - cache[f"blocks.{L - 1}.hook_mlp_out"][-1]
            want = float(torch.log_softmax(ln_f(x) @ head.T, -1)[ANSWER])
            check(f"{name}: decompose without mlp_out = reference",
                  abs(j["subtracted"]["answer_logprob"] - want) < 1e-4, (j["subtracted"], want))
        r = run(["decompose", "--model", mdir, "--ids", ids(CLEAN), "--attribution", "--answer-id", str(ANSWER),
                 "--wrong-id", str(WRONG), "--json"])
        if check(f"{name}: decompose --ids --attribution", r.returncode == 0, r.stderr):
            a = json.loads(r.stdout)["attribution"]
            # TransformerLens: decompose_resid + apply_ln_to_stack (ln_final scale of the full residual)
            u = head[ANSWER] - head[WRONG]
            full = cache[f"blocks.{L - 1}.hook_resid_post"][-1]
            fc = full - full.mean() if neox else full
            scale = torch.sqrt((fc ** 2).mean() + eps)
            parts = [cache["hook_embed"][-1], torch.zeros_like(full)]
            for l in range(L):
                parts += [cache[f"blocks.{l}.hook_attn_out"][-1], cache[f"blocks.{l}.hook_mlp_out"][-1]]
            want = [float(((p - p.mean()) if neox else p) / scale @ (w * u)) for p in parts]
            want.append(float(b @ u) if b is not None else 0.0)
            got = [p["value"] for p in a["parts"]]
            e = max(abs(x - y) for x, y in zip(got, want)) if len(got) == len(want) else np.inf
            check(f"{name}: attribution parts = TransformerLens' logit_attrs ({e:.1e}), sum = total",
                  e < 1e-4 and abs(a["sum"] - a["total"]) < 1e-3, (got, want))

    # refusals
    m = os.path.join(tmp, "neox_parallel")
    r = run(["patch", "--model", m, "--clean-ids", ids(CLEAN), "--corrupted-ids", ids(CORRUPTED), "--answer-id", "7",
             "--wrong-id", "8", "--components", "resid_mid"])
    check("refused: resid_mid with a parallel residual", r.returncode == 1 and "parallel residual" in r.stderr,
          r.stderr)

    # sweep (2 ranks), evaluate and lens --dataset on an ids dataset of a Llama-shaped model
    mdir = os.path.join(tmp, "llama_gqa")
    rng = np.random.default_rng(5)
    data = os.path.join(tmp, "ids.jsonl")
    items = []
    with open(data, "w") as f:
        for i in range(6):
            T = int(rng.integers(4, 9))
            cl = [int(x) for x in rng.integers(0, 97, T)]
            co = list(cl)
            co[T // 2] = (co[T // 2] + 1) % 97
            it = {"clean_ids": cl, "corrupted_ids": co, "answer_id": int(rng.integers(0, 97)), "wrong_id": 0}
            it["wrong_id"] = (it["answer_id"] + 1) % 97
            items.append(it)
            f.write(json.dumps(it) + "\n")
    bad = os.path.join(tmp, "bad.jsonl")
    with open(bad, "w") as f:
        f.write(json.dumps({"clean": "a", "corrupted": "b", "answer": " c", "wrong": " d"}) + "\n")
    comps = "resid_pre,attn_out,z,k_all_pos,v_all_pos,q,k,pattern,pattern_dest_src"
    job = os.path.join(tmp, "job.ini")
    with open(job, "w") as f:
        f.write(f"[model]\ndir = llama_gqa\n[data]\ndataset = ids.jsonl\n[patch]\ncomponents = {comps}\n"
                f"[run]\noutput = sweep.nc\nchunk_prompts = 2\n")
    r = run(["sweep", job, "--output", os.path.join(tmp, "sweep.nc")], ranks=2)
    r1 = run(["sweep", job, "--output", os.path.join(tmp, "sweep1.nc")])
    if check("sweep (2 ranks, and 1) of a Llama-shaped model on an ids dataset", r.returncode == 0 and
             r1.returncode == 0, r.stderr + r1.stderr):
        with xr.open_dataset(os.path.join(tmp, "sweep.nc")) as d2, xr.open_dataset(os.path.join(tmp, "sweep1.nc")) as d1:
            check("sweep: 2 ranks = 1 rank bit for bit, the by-position head grids included",
                  all(np.array_equal(d2[c].values, d1[c].values, equal_nan=True) for c in comps.split(",")))
            check("sweep: k per key/value head, pattern_dest_src (prompt, layer, position, src_position, head)",
                  d2["k"].dims == ("prompt", "layer", "position", "kv_head") and
                  d2["pattern_dest_src"].dims == ("prompt", "layer", "position", "src_position", "head") and
                  d2.sizes["src_position"] == d2.sizes["position"], (d2["k"].dims, d2["pattern_dest_src"].dims))
        # two slices merged = the whole sweep (the parts' position and
        # src_position lengths are their own longest prompts')
        parts = [os.path.join(tmp, f"part{k}.nc") for k in (1, 2)]
        rs = [run(["sweep", job, "--slice", f"{k}/2", "--output", parts[k - 1]]) for k in (1, 2)]
        rm = run(["merge", *parts, "-o", os.path.join(tmp, "merged.nc")])
        if check("sweep --slice 1/2, 2/2 and merge", all(x.returncode == 0 for x in rs + [rm]),
                 "".join(x.stderr for x in rs + [rm])):
            with xr.open_dataset(os.path.join(tmp, "merged.nc")) as dm, \
                    xr.open_dataset(os.path.join(tmp, "sweep1.nc")) as d1, xr.open_dataset(parts[0]) as p1:
                check("merge of the slices = the whole sweep, pattern_dest_src padded on both position axes",
                      all(np.array_equal(dm[c].values, d1[c].values, equal_nan=True) for c in comps.split(","))
                      and dm.sizes["src_position"] == d1.sizes["src_position"], (dict(dm.sizes), dict(p1.sizes)))
        with xr.open_dataset(os.path.join(tmp, "sweep.nc")) as ds:
            check("sweep: k_all_pos per key/value head", ds["k_all_pos"].dims[-1] == "kv_head" and
                  ds.sizes["kv_head"] == 2, ds["k_all_pos"].dims)
            ok = True
            for i, it in enumerate(items):
                res = run(["patch", "--model", mdir, "--clean-ids", ids(it["clean_ids"]), "--corrupted-ids",
                           ids(it["corrupted_ids"]), "--answer-id", str(it["answer_id"]), "--wrong-id",
                           str(it["wrong_id"]), "--components", comps, "--json"])
                pj = json.loads(res.stdout)
                T = len(it["clean_ids"])
                ok = ok and list(ds["clean_token_id"].values[i][:T]) == it["clean_ids"]
                for comp, v in pj["components"].items():
                    grid = np.array(v["values"]).reshape(v["shape"])
                    mine = ds[comp].values[i]
                    mine = mine[:, :T, :T] if comp == "pattern_dest_src" else \
                        mine[:, :T] if comp in ("resid_pre", "attn_out", "z", "q", "k", "pattern") else mine
                    ok = ok and np.allclose(grid, mine, rtol=1e-6, atol=1e-6)
            check("sweep = patch --clean-ids for every item", ok)
    r = run(["evaluate", "--model", mdir, "--dataset", data, "--json"])
    check("evaluate on an ids dataset", r.returncode == 0 and '"n": 6' in r.stdout.replace("\n", " "),
          r.stdout + r.stderr)
    r = run(["lens", "--model", mdir, "--dataset", data, "-o", os.path.join(tmp, "lens.nc")])
    check("lens --dataset on an ids dataset", r.returncode == 0, r.stderr)
    r = run(["evaluate", "--model", mdir, "--dataset", bad])
    check("refused: a text item for a tokenizer-less family", r.returncode == 1 and "clean_ids" in r.stderr, r.stderr)

print("worst |naive - reference| / scale per model: " + ", ".join(f"{k} {v:.1e}" for k, v in worst_oracle.items()))
print("worst |fast - naive| / scale per model: " + ", ".join(f"{k} {v:.1e}" for k, v in worst_engines.items()))
finish("test_families_patch")
