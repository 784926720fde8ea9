"""The embedded Llama-family model (jobs/ioi-tiny-llama/model: Llama
architecture, the Llama 2 / Mistral 32k SentencePiece tokenizer.json),
measured by patchsweep itself:
  - make-dataset with its tokenizer: every answer and wrong id is the one
    token the prompt is continued with (encode(prompt + answer) is
    encode(prompt) + [answer_id]), though " Name" alone is two tokens there;
  - IOI on 500 held-out prompt pairs: accuracy (logit[answer] > logit[wrong])
    >= 95%, mean clean logit difference >= 3.0, mean corrupted <= -1.0;
  - capitals on 200 held-out prompts: the answer is top-1 after "A:" in >= 90%;
  - the C runtime agrees with the float64 PyTorch reference of HF's Llama
    (tests/tools/oracle_families.py) on every hook of two prompts;
  - the shipped held-out sets are what make-dataset makes (seeds 9101/9102);
  - the model directory is at most 16 MB;
  - fast == naive patching on 20 IOI prompts (skipped while activation
    patching refuses the llama family);
  - the training script still trains (a few steps into a temporary directory).
Held-out seeds: the model was trained on seeds 1011/1012 (train.py); these
sets use seeds 9201/9202, never seen in training."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import xarray as xr

from checks import check, finish, skip

ROOT = os.environ["PS_ROOT"]
BIN = os.environ["PS_BIN"]
JOB = os.path.join(ROOT, "jobs", "ioi-tiny-llama")
MODEL = os.path.join(JOB, "model")
TMP = tempfile.mkdtemp(prefix="ps-embedded-llama-")
sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
import oracle_families  # noqa: E402

QUICK = os.environ.get("PS_QUICK") == "1"
N_IOI, N_CAPS, N_PATCH = (100, 50, 5) if QUICK else (500, 200, 20)


def run(*args):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=900)


def ps(*args):
    r = run(*args)
    if r.returncode != 0:
        raise RuntimeError(f"patchsweep {' '.join(args)}: {r.stderr}")
    return r.stdout


size = sum(os.path.getsize(os.path.join(MODEL, f)) for f in os.listdir(MODEL))
check(f"model directory is {size / 1e6:.1f} MB <= 16 MB", size <= 16e6)

ioi = os.path.join(TMP, "ioi.jsonl")
caps = os.path.join(TMP, "capitals.jsonl")
ps("make-dataset", "ioi", "--model", MODEL, "--n", str(N_IOI), "--seed", "9201", "--ids", "-o", ioi)
ps("make-dataset", "capitals", "--model", MODEL, "--n", str(N_CAPS), "--seed", "9202", "--ids", "-o", caps)

# The answer is the token the model predicts after the prompt.
for name, path in (("ioi", ioi), ("capitals", caps)):
    recs = [json.loads(line) for line in open(path)][:10]
    bad = []
    for r in recs:
        for field in ("answer", "wrong"):
            ids = json.loads(ps("tokenize", "--model", MODEL, "--json", r["clean"] + r[field]))["ids"]
            if ids != r["clean_ids"] + [r[field + "_id"]]:
                bad.append((r["clean"], field, ids[-3:], r[field + "_id"]))
    check(f"{name}: answer/wrong ids are the prompt's one-token continuations", not bad, str(bad[:3]))
alone = json.loads(ps("tokenize", "--model", MODEL, "--no-bos", "--json", " Paris"))["ids"]
check(f"the trap is real: ' Paris' alone is {len(alone)} tokens under this tokenizer", len(alone) == 2)

m = json.loads(ps("evaluate", "--model", MODEL, "--dataset", ioi, "--json"))
print(f"IOI ({N_IOI} held-out):", json.dumps(m))
check(f"IOI accuracy {m['accuracy']:.3f} >= 0.95", m["accuracy"] >= 0.95)
check(f"IOI mean clean logit diff {m['mean_clean_logit_diff']:.3f} >= 3.0", m["mean_clean_logit_diff"] >= 3.0)
check(f"IOI mean corrupted logit diff {m['mean_corrupted_logit_diff']:.3f} <= -1.0",
      m["mean_corrupted_logit_diff"] <= -1.0)
c = json.loads(ps("evaluate", "--model", MODEL, "--dataset", caps, "--json"))
print(f"capitals ({N_CAPS} held-out):", json.dumps(c))
check(f"capitals answer top-1 {c['answer_top1']:.3f} >= 0.90", c["answer_top1"] >= 0.90)

# reference agreement: every hook of one IOI and one capitals prompt
ref_model = oracle_families.Family(MODEL)
for i, path in enumerate((ioi, caps)):
    ids = json.loads(open(path).readline())["clean_ids"]
    out = os.path.join(TMP, f"cache{i}.nc")
    ps("cache", "--model", MODEL, "--ids", ",".join(map(str, ids)), "-o", out)
    ref = ref_model.run(ids)
    with xr.open_dataset(out) as ds:
        worst, n = 0.0, 0
        for name in ds.data_vars:
            if name in ("token_id", "token") or name not in ref:
                continue
            r = ref[name].numpy()
            worst = max(worst, float(np.abs(ds[name].values - r).max() / max(1.0, float(np.abs(r).max()))))
            n += 1
        check(f"C runtime == float64 HF Llama reference on prompt {i}: {n} hooks (worst {worst:.2e} <= 1e-4)",
              n > 0 and "logits" in ref and worst <= 1e-4)

# the held-out sets the jobs use are make-dataset's, with this tokenizer
for task, seed, n in (("ioi", 9101, 128), ("capitals", 9102, 64)):
    out = os.path.join(TMP, f"shipped-{task}.jsonl")
    ps("make-dataset", task, "--model", MODEL, "--n", str(n), "--seed", str(seed), "-o", out)
    with open(out, "rb") as f, open(os.path.join(JOB, f"{task}.jsonl"), "rb") as g:
        check(f"jobs/ioi-tiny-llama/{task}.jsonl is make-dataset {task} --seed {seed} --n {n}", f.read() == g.read())

# fast == naive on 20 IOI prompts, every component, through the sweep
small = os.path.join(TMP, "ioi20.jsonl")
with open(ioi) as f, open(small, "w") as g:
    g.writelines(f.readlines()[:N_PATCH])
outs = {}
for engine in ("fast", "naive"):
    job = os.path.join(TMP, f"{engine}.ini")
    with open(job, "w") as f:
        f.write(f"[model]\ndir = {MODEL}\n[data]\ndataset = ioi20.jsonl\n[patch]\n"
                f"components = resid_pre,resid_mid,attn_out,mlp_out,z,head_all_pos_every\nengine = {engine}\n"
                f"[run]\noutput = {engine}.nc\n")
    r = run("sweep", job)
    if r.returncode != 0 and "does not support the llama family" in r.stderr:
        skip("fast == naive patching on the Llama model", r.stderr.strip().splitlines()[-1])
        break
    check(f"sweep ({engine}) on the Llama model", r.returncode == 0, r.stderr)
    if r.returncode == 0:
        outs[engine] = xr.open_dataset(os.path.join(TMP, f"{engine}.nc"))
if len(outs) == 2:
    for var in ("resid_pre", "resid_mid", "attn_out", "mlp_out", "z", "z_all_pos", "q_all_pos", "k_all_pos",
                "v_all_pos", "pattern_all_pos"):
        a, b = outs["fast"][var].values, outs["naive"][var].values
        ok = np.array_equal(np.isnan(a), np.isnan(b))
        err = np.nanmax(np.abs(a - b) / np.maximum(1.0, np.abs(b)))
        check(f"fast == naive on {N_PATCH} IOI prompts: {var} (max err {err:.2e})", ok and err <= 1e-4)
for ds in outs.values():
    ds.close()

# the training script still works: a few steps into a temporary directory
TRAIN = ["/usr/bin/python3", os.path.join(JOB, "train.py"), "--steps", "3", "--n-eval", "20",
         "--out", os.path.join(TMP, "retrained"), "--cli", BIN,
         "--tokenizer", MODEL]
r = None if QUICK else subprocess.run(TRAIN, capture_output=True, text=True, timeout=600)
if r is not None:
    check("train.py --steps 3 writes a loadable model that agrees with the C runtime", r.returncode == 0
          and "layers" in ps("info", "--model", os.path.join(TMP, "retrained")), r.stderr[-800:] + r.stdout[-800:])

finish("embedded Llama model")
