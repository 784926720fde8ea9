"""Guards against wrong conclusions (issue 19 item 6), each a warning line
on stderr and a record in the file (guard(prompt) bit flags with
flag_masks/flag_meanings, global attribute guards):
  - identical clean and corrupted prompts;
  - |clean - corrupted| small against the metric's spread;
  - an answer without its leading space (with the spaced token suggested);
  - an answer the clean run does not rank in its top 10 next tokens (its
    flag against `patchsweep run --top-k 10` of every prompt; the spaced
    token suggested, with its rank, when the clean run ranks it there);
  - none on a clean IOI dataset;
  - the summary ranks cells by the move in the job's direction (noise: 1 -
    normalized, so cells with no effect are not "strongest")."""
import json
import os
import re
import subprocess
import tempfile

import xarray as xr

from checks import check, finish

ROOT = os.environ["PS_ROOT"]
BIN = os.environ["PS_BIN"]
TMP = tempfile.mkdtemp(prefix="ps-guards-")
MODEL = os.path.join(ROOT, "jobs", "ioi-tiny", "model")


def run(args):
    return subprocess.run([BIN] + args, capture_output=True, text=True, cwd=TMP, timeout=600)


def job(name, dataset, direction="denoise"):
    path = os.path.join(TMP, name + ".ini")
    with open(path, "w") as f:
        f.write(f"[model]\ndir = {MODEL}\n[data]\ndataset = {dataset}\n[patch]\ncomponents = resid_pre\n"
                f"direction = {direction}\n[run]\noutput = {name}.nc\n")
    return path


run(["make-dataset", "ioi", "--n", "12", "--seed", "21", "-o", "ioi.jsonl"])
items = [json.loads(x) for x in open(os.path.join(TMP, "ioi.jsonl"))]

r = run(["sweep", job("clean", "ioi.jsonl")])
ds = xr.open_dataset(os.path.join(TMP, "clean.nc"))
check("a sound dataset: no guard line, guard all 0, guards = ''",
      r.returncode == 0 and "guard:" not in r.stderr and int(ds["guard"].values.sum()) == 0 and ds.attrs["guards"] == "",
      r.stderr)
check("guard has flag_masks and flag_meanings", list(ds["guard"].attrs["flag_masks"]) == [1, 2, 4, 8] and
      ds["guard"].attrs["flag_meanings"].split() == ["identical_prompts", "small_metric_gap",
                                                     "answer_without_leading_space", "answer_not_in_clean_top_k"])


def top10(prompt):
    """The clean run's 10 most likely next tokens (ids), from `patchsweep run`."""
    out = run(["run", "--model", MODEL, "--prompt", prompt, "--top-k", "10", "--json"])
    return [t["id"] for t in json.loads(out.stdout)["top"]]


def tok1(text):
    ids = json.loads(run(["tokenize", "--model", MODEL, "--json", "--no-bos", text]).stdout)["ids"]
    return ids[0] if len(ids) == 1 else None

# identical prompts (item 2) and an unspaced answer (item 5)
bad = [dict(x) for x in items]
bad[2]["corrupted"] = bad[2]["clean"]
# an answer whose unspaced form is one token too (the guard), else the refusal
one = [i for i, x in enumerate(items) if i != 2 and
       len(json.loads(run(["tokenize", "--model", MODEL, "--json", "--no-bos", x["answer"].lstrip()]).stdout)["ids"]) == 1]
U = one[0] if one else 5
bad[U]["answer"] = bad[U]["answer"].lstrip()
if not one:
    bad[U]["answer"] = items[U]["answer"]
two = [i for i, x in enumerate(items) if i not in (2, U) and
       len(json.loads(run(["tokenize", "--model", MODEL, "--json", "--no-bos", x["answer"].lstrip()]).stdout)["ids"]) > 1]
if two:
    refused = [dict(x) for x in items]
    refused[two[0]]["answer"] = refused[two[0]]["answer"].lstrip()
    with open(os.path.join(TMP, "refused.jsonl"), "w") as f:
        for x in refused:
            f.write(json.dumps(x) + "\n")
    r = run(["sweep", job("refused", "refused.jsonl")])
    check("a multi-token unspaced answer: refused, the spaced one-token form suggested",
          r.returncode == 1 and f"did you mean '{items[two[0]]['answer']}', one token" in r.stderr, r.stderr)
# a spaced answer the model does not predict (one token, not the wrong one)
W = next(i for i in reversed(range(len(items))) if i not in (2, U))
bad[W]["answer"] = " table" if bad[W]["wrong"] != " table" else " chair"
with open(os.path.join(TMP, "bad.jsonl"), "w") as f:
    for x in bad:
        f.write(json.dumps(x) + "\n")
r = run(["sweep", job("bad", "bad.jsonl")])
lines = [x for x in r.stderr.splitlines() if x.startswith("guard:")]
check("exit 0 with guard lines", r.returncode == 0 and len(lines) >= 1 + bool(one), r.stderr)
check("identical prompts named with their index", any("same tokens" in x and "index 2" in x for x in lines), lines)
spaced = " " + bad[U]["answer"].lstrip()
if one:
    check("unspaced answer: the spaced token suggested",
          any("leading space" in x and f'did you mean "{spaced}"' in x and f"index {U}" in x for x in lines), lines)
ds = xr.open_dataset(os.path.join(TMP, "bad.nc"))
g = [int(x) for x in ds["guard"].values]
check("guard flags in the file", g[2] & 1 and (not one or g[U] & 4) and g[0] == 0, g)
check("guards attribute holds the lines", ds.attrs["guards"].strip().splitlines() == lines)
# the top-k guard against the clean run's top 10, prompt by prompt
tops = [top10(x["clean"]) for x in bad]
answer_ids = [int(x) for x in ds["answer_id"].values]
want8 = [int(a not in t) for a, t in zip(answer_ids, tops)]
check("answer_not_in_clean_top_k exactly where `run --top-k 10` leaves the answer out",
      [x >> 3 & 1 for x in g] == want8 and want8[W] == 1 and sum(want8) >= 1, (g, want8))
flagged = [i for i, w in enumerate(want8) if w]
top_lines = [x for x in lines if "most likely next tokens" in x]
check("top-k guard line names the count and the first prompts",
      len(top_lines) == 1 and f"{len(flagged)} of {len(bad)} prompts" in top_lines[0]
      and f"index {flagged[0]}" in top_lines[0], (top_lines, flagged))
f0 = bad[flagged[0]]
sp = tok1(" " + f0["answer"]) if not f0["answer"].startswith(" ") else None
if sp is not None and sp in tops[flagged[0]]:
    check("top-k guard: the spaced token suggested with its clean rank",
          f'did you mean " {f0["answer"]}", token {sp}, ranked {tops[flagged[0]].index(sp) + 1} in the clean run'
          in top_lines[0], top_lines)
else:
    check("top-k guard: no suggestion when the spaced token is not in the top 10", "did you mean" not in top_lines[0],
          top_lines)

# a small gap against the spread: answer and wrong swapped to near-equal tokens
small = [dict(x) for x in items]
small[3]["wrong"] = small[3]["answer"]
small[3]["answer"] = small[3]["answer"]  # same token: refused by validation; use a near-equal corrupted instead
small[3] = dict(items[3])
small[3]["corrupted"] = small[3]["clean"][:-3] + " at"  # last token changed only
with open(os.path.join(TMP, "small.jsonl"), "w") as f:
    for x in small:
        f.write(json.dumps(x) + "\n")
r = run(["sweep", job("small", "small.jsonl")])
ds = xr.open_dataset(os.path.join(TMP, "small.nc"))
gap = abs(ds["clean_metric"] - ds["corrupted_metric"]).values
metrics = list(ds["clean_metric"].values) + list(ds["corrupted_metric"].values)
import numpy as np
spread = float(np.std(metrics))
want = [int(x < 0.1 * spread) for x in gap]
got = [int(x) >> 1 & 1 for x in ds["guard"].values]
check("small_metric_gap exactly where |clean - corrupted| < 0.1 x pooled std", got == want, (got, want, gap, spread))
if any(want):
    check("small gap warned", any("0.1 x the metric's spread" in x for x in r.stderr.splitlines()), r.stderr)

# noise direction: strongest = furthest from 1 (the clean run)
r = run(["sweep", job("noise", "ioi.jsonl", "noise")])
m = re.search(r"resid_pre\s+strongest \(mean normalized; ranked by 1 - it[^)]*\):(.*)", r.stdout)
vals = [float(x) for x in re.findall(r" (-?\d+\.\d+)", m.group(1))] if m else []
check("noise summary ranked by 1 - normalized (smallest normalized first)",
      r.returncode == 0 and vals and vals == sorted(vals) and vals[0] < 0.9, r.stdout)

finish("guards")
