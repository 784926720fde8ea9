"""The embedded model (jobs/ioi-tiny/model), measured by patchsweep itself:
  - IOI on 500 held-out prompt pairs: accuracy (logit[answer] > logit[wrong])
    >= 95%, mean clean logit difference >= 3.0, mean corrupted <= -1.0;
  - capitals on held-out prompts: the answer is top-1 after "A:" in >= 90%;
  - the C runtime agrees with the float64 PyTorch oracle on it;
  - fast == naive patching on 20 IOI prompts, every component;
  - the training script still trains (a few steps into a temporary directory).
Held-out seeds: the model was trained on seeds 1001/1002 (train.py); these
sets use seeds 9201/9202, never seen in training."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import xarray as xr

from checks import check, finish

ROOT = os.environ["PS_ROOT"]
BIN = os.environ["PS_BIN"]
MODEL = os.path.join(ROOT, "jobs", "ioi-tiny", "model")
TMP = tempfile.mkdtemp(prefix="ps-embedded-")
sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
import oracle  # noqa: E402

# PS_QUICK (the sanitizer pass: memory errors, not numbers): fewer prompts
# and no retraining; the release pass measures everything above.
QUICK = os.environ.get("PS_QUICK") == "1"
N_IOI, N_CAPS, N_PATCH = (100, 50, 5) if QUICK else (500, 200, 20)


def ps(*args):
    r = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"patchsweep {' '.join(args)}: {r.stderr}")
    return r.stdout


ioi = os.path.join(TMP, "ioi.jsonl")
caps = os.path.join(TMP, "capitals.jsonl")
ps("make-dataset", "ioi", "--n", str(N_IOI), "--seed", "9201", "-o", ioi)
ps("make-dataset", "capitals", "--n", str(N_CAPS), "--seed", "9202", "-o", caps)

m = json.loads(ps("evaluate", "--model", MODEL, "--dataset", ioi, "--json"))
print(f"IOI ({N_IOI} held-out):", json.dumps(m))
check(f"IOI accuracy {m['accuracy']:.3f} >= 0.95", m["accuracy"] >= 0.95)
check(f"IOI mean clean logit diff {m['mean_clean_logit_diff']:.3f} >= 3.0", m["mean_clean_logit_diff"] >= 3.0)
check(f"IOI mean corrupted logit diff {m['mean_corrupted_logit_diff']:.3f} <= -1.0",
      m["mean_corrupted_logit_diff"] <= -1.0)
c = json.loads(ps("evaluate", "--model", MODEL, "--dataset", caps, "--json"))
print(f"capitals ({N_CAPS} held-out):", json.dumps(c))
check(f"capitals answer top-1 {c['answer_top1']:.3f} >= 0.90", c["answer_top1"] >= 0.90)

# oracle agreement: every hook of one IOI and one capitals prompt
orc = oracle.load(MODEL)
for i, path in enumerate((ioi, caps)):
    prompt = json.loads(open(path).readline())["clean"]
    out = os.path.join(TMP, f"cache{i}.nc")
    ps("cache", "--model", MODEL, "--prompt", prompt, "-o", out)
    with xr.open_dataset(out) as ds:
        ref = orc.run([int(t) for t in ds["token_id"].values])
        worst = 0.0
        for name in ds.data_vars:
            if name in ("token_id", "token") or name not in ref:
                continue
            r = ref[name].numpy()
            err = float(np.abs(ds[name].values - r).max() / max(1.0, float(np.abs(r).max())))
            worst = max(worst, err)
        check(f"C runtime == oracle on prompt {i} (worst {worst:.2e} <= 1e-4)", worst <= 1e-4)

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
    ps("sweep", job)
    outs[engine] = xr.open_dataset(os.path.join(TMP, f"{engine}.nc"))
worst = 0.0
for var in ("resid_pre", "resid_mid", "attn_out", "mlp_out", "z", "z_all_pos", "q_all_pos", "k_all_pos", "v_all_pos",
            "pattern_all_pos"):
    a, b = outs["fast"][var].values, outs["naive"][var].values
    ok = np.array_equal(np.isnan(a), np.isnan(b))
    err = np.nanmax(np.abs(a - b) / np.maximum(1.0, np.abs(b)))
    worst = max(worst, float(err))
    check(f"fast == naive on {N_PATCH} IOI prompts: {var} (max err {err:.2e})", ok and err <= 1e-4)
for ds in outs.values():
    ds.close()

# the training script still works: a few steps into a temporary directory
TRAIN = ["/usr/bin/python3", os.path.join(ROOT, "jobs", "ioi-tiny", "train.py"), "--steps", "3", "--n-eval", "20",
         "--out", os.path.join(TMP, "retrained"), "--cli", BIN]
r = None if QUICK else subprocess.run(TRAIN, capture_output=True, text=True, timeout=600)
if r is not None:
    check("train.py --steps 3 writes a loadable model", r.returncode == 0
          and "layers" in ps("info", "--model", os.path.join(TMP, "retrained")), r.stderr[-800:])

finish("embedded model")
