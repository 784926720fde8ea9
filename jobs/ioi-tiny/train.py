#!/usr/bin/python3
"""Train patchsweep's embedded model: a tiny GPT-2 that does IOI and capitals.

Runs with Debian's /usr/bin/python3 (PyTorch 1.13 + numpy), nothing else.
The model is written here in plain torch with Hugging Face's GPT-2 semantics
(learned wte/wpe, pre-LN blocks, LayerNorm eps 1e-5, Conv1D weights stored
[in, out], tanh gelu_new, causal attention scaled by 1/sqrt(d_head), final
ln_f, lm_head tied to wte) and the full 50257-token GPT-2 vocabulary, so the
output loads as GPT2LMHeadModel and in patchsweep's C runtime alike.

Data come from patchsweep's own generators through the CLI
(`patchsweep make-dataset ioi|capitals --n N --seed S --ids`), so the model
is trained on exactly the prompt distribution the C runtime evaluates.
Training and evaluation seeds are disjoint (see SEEDS below).

    /usr/bin/python3 jobs/ioi-tiny/train.py               # full run -> jobs/ioi-tiny/model/
    /usr/bin/python3 jobs/ioi-tiny/train.py --steps 20 --out /tmp/m   # smoke run
"""

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time

# OpenBLAS and OpenMP read these when torch loads them, so they must be set
# before the import: OpenBLAS's AVX-512 kernels instead of generic ones, and
# idle threads that sleep instead of spinning, which on a 2-core machine
# steals the cores from the thread doing the work.
# SkylakeX only where the CPU has AVX-512F: on other CPUs those kernels
# would stop the process with an illegal instruction.


def _cpu_has_avx512f():
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


if _cpu_has_avx512f():
    os.environ.setdefault("OPENBLAS_CORETYPE", "SkylakeX")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

VOCAB = 50257
EOT = 50256

# Generator seeds.  Training and evaluation never share a seed, so the
# evaluation prompts are fresh draws (new name/template/place/object and
# shot combinations), not replays of training prompts.
SEEDS = {
    "train_ioi": 1001,
    "train_capitals": 1002,
    "eval_ioi": 9001,
    "eval_capitals": 9002,
}
TORCH_SEED = 20240601

CONFIG = {
    "n_layer": 4,
    "n_head": 4,
    "n_embd": 128,
    # The longest training sequence (a three-shot capitals prompt with
    # <|endoftext|> and its answer) is 56 tokens; positions past what training
    # reaches would only hold untrained embeddings.
    "n_positions": 64,
}


# --------------------------------------------------------------------- model

class Block(torch.nn.Module):
    """One pre-LN GPT-2 block; weights in HF's Conv1D [in, out] layout."""

    def __init__(self, d, n_head, n_layer):
        super().__init__()
        self.n_head = n_head
        m = 4 * d
        std = 0.02
        # GPT-2's scaled init of the residual projections (1/sqrt(2 n_layer))
        # keeps the residual stream's variance flat across depth.
        proj_std = std / math.sqrt(2 * n_layer)
        P = torch.nn.Parameter
        self.ln_1_w, self.ln_1_b = P(torch.ones(d)), P(torch.zeros(d))
        self.c_attn_w, self.c_attn_b = P(torch.randn(d, 3 * d) * std), P(torch.zeros(3 * d))
        self.attn_proj_w, self.attn_proj_b = P(torch.randn(d, d) * proj_std), P(torch.zeros(d))
        self.ln_2_w, self.ln_2_b = P(torch.ones(d)), P(torch.zeros(d))
        self.c_fc_w, self.c_fc_b = P(torch.randn(d, m) * std), P(torch.zeros(m))
        self.mlp_proj_w, self.mlp_proj_b = P(torch.randn(m, d) * proj_std), P(torch.zeros(d))

    def forward(self, x, mask):
        B, T, d = x.shape
        H = self.n_head
        dh = d // H
        h = F.layer_norm(x, (d,), self.ln_1_w, self.ln_1_b, 1e-5)
        qkv = torch.addmm(self.c_attn_b, h.reshape(B * T, d), self.c_attn_w).view(B, T, 3, H, dh)
        q, k, v = qkv.unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, dh]
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(dh))
        att = att.masked_fill(mask[:T, :T], float("-inf")).softmax(-1)
        z = (att @ v).transpose(1, 2).reshape(B * T, d)
        x = x + torch.addmm(self.attn_proj_b, z, self.attn_proj_w).view(B, T, d)
        h = F.layer_norm(x, (d,), self.ln_2_w, self.ln_2_b, 1e-5)
        h = F.gelu(torch.addmm(self.c_fc_b, h.reshape(B * T, d), self.c_fc_w), approximate="tanh")
        return x + torch.addmm(self.mlp_proj_b, h, self.mlp_proj_w).view(B, T, d)


class GPT2(torch.nn.Module):
    def __init__(self, n_layer, n_head, n_embd, n_positions):
        super().__init__()
        d = n_embd
        self.wte = torch.nn.Parameter(torch.randn(VOCAB, d) * 0.02)
        self.wpe = torch.nn.Parameter(torch.randn(n_positions, d) * 0.01)
        self.blocks = torch.nn.ModuleList(Block(d, n_head, n_layer) for _ in range(n_layer))
        self.ln_f_w = torch.nn.Parameter(torch.ones(d))
        self.ln_f_b = torch.nn.Parameter(torch.zeros(d))
        self.register_buffer(
            "mask", torch.triu(torch.ones(n_positions, n_positions, dtype=torch.bool), 1), persistent=False)

    def hidden(self, ids):
        """ln_f(residual stream) at every position: [B, T, d]."""
        T = ids.shape[1]
        x = self.wte[ids] + self.wpe[:T]
        for b in self.blocks:
            x = b(x, self.mask)
        return F.layer_norm(x, (x.shape[-1],), self.ln_f_w, self.ln_f_b, 1e-5)

    def logits(self, h):
        return h @ self.wte.t()  # tied lm_head

    def hf_state_dict(self):
        """Tensors under GPT2LMHeadModel's names (lm_head omitted: tied)."""
        sd = {"transformer.wte.weight": self.wte, "transformer.wpe.weight": self.wpe,
              "transformer.ln_f.weight": self.ln_f_w, "transformer.ln_f.bias": self.ln_f_b}
        for i, b in enumerate(self.blocks):
            p = f"transformer.h.{i}."
            sd.update({
                p + "ln_1.weight": b.ln_1_w, p + "ln_1.bias": b.ln_1_b,
                p + "attn.c_attn.weight": b.c_attn_w, p + "attn.c_attn.bias": b.c_attn_b,
                p + "attn.c_proj.weight": b.attn_proj_w, p + "attn.c_proj.bias": b.attn_proj_b,
                p + "ln_2.weight": b.ln_2_w, p + "ln_2.bias": b.ln_2_b,
                p + "mlp.c_fc.weight": b.c_fc_w, p + "mlp.c_fc.bias": b.c_fc_b,
                p + "mlp.c_proj.weight": b.mlp_proj_w, p + "mlp.c_proj.bias": b.mlp_proj_b,
            })
        return {k: v.detach() for k, v in sd.items()}


# ---------------------------------------------------------------------- data

def make_dataset(cli, task, n, seed, workdir):
    """Records of `patchsweep make-dataset TASK --ids` (ids include <|endoftext|>)."""
    out = os.path.join(workdir, f"{task}-{seed}-{n}.jsonl")
    cmd = [cli, "make-dataset", task, "--n", str(n), "--seed", str(seed), "--ids", "-o", out]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"train.py: {' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    with open(out, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    if len(recs) != n:
        sys.exit(f"train.py: {out}: expected {n} records, got {len(recs)}")
    return recs


def training_sequences(recs):
    """<|endoftext|> + clean prompt + answer, as lists of ids."""
    seqs = []
    for r in recs:
        ids = list(r["clean_ids"])
        if ids[0] != EOT:
            sys.exit("train.py: clean_ids do not start with <|endoftext|>: is --ids computed with bos?")
        seqs.append(ids + [r["answer_id"]])
    return seqs


def pad_batch(seqs):
    """[B, T] ids padded with <|endoftext|> (after the end: causal attention
    never lets padding reach a real position) and each sequence's length."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), EOT, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in seqs])


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def final_logits(model, seqs, batch=250):
    """Logits at the last position of each prompt: [N, V]."""
    out = []
    for i in range(0, len(seqs), batch):
        ids, lens = pad_batch(seqs[i:i + batch])
        h = model.hidden(ids)
        out.append(model.logits(h[torch.arange(len(lens)), lens - 1]))
    return torch.cat(out)


@torch.no_grad()
def evaluate(model, ioi, capitals):
    a = torch.tensor([r["answer_id"] for r in ioi])
    w = torch.tensor([r["wrong_id"] for r in ioi])
    n = torch.arange(len(ioi))
    lc = final_logits(model, [r["clean_ids"] for r in ioi])
    lk = final_logits(model, [r["corrupted_ids"] for r in ioi])
    clean_diff = lc[n, a] - lc[n, w]
    corr_diff = lk[n, a] - lk[n, w]
    ca = torch.tensor([r["answer_id"] for r in capitals])
    cw = torch.tensor([r["wrong_id"] for r in capitals])
    m = torch.arange(len(capitals))
    lcap = final_logits(model, [r["clean_ids"] for r in capitals])
    lcap_k = final_logits(model, [r["corrupted_ids"] for r in capitals])
    return {
        "ioi_n": len(ioi),
        "ioi_accuracy": (clean_diff > 0).float().mean().item(),
        "ioi_clean_logit_diff": clean_diff.mean().item(),
        "ioi_corrupted_logit_diff": corr_diff.mean().item(),
        "ioi_answer_top1": (lc.argmax(-1) == a).float().mean().item(),
        "capitals_n": len(capitals),
        "capitals_top1": (lcap.argmax(-1) == ca).float().mean().item(),
        "capitals_clean_logit_diff": (lcap[m, ca] - lcap[m, cw]).mean().item(),
        "capitals_corrupted_logit_diff": (lcap_k[m, ca] - lcap_k[m, cw]).mean().item(),
    }


def format_metrics(m):
    return (f"IOI (n={m['ioi_n']}): accuracy {m['ioi_accuracy']:.4f}, "
            f"clean logit diff {m['ioi_clean_logit_diff']:.3f}, "
            f"corrupted (s2) logit diff {m['ioi_corrupted_logit_diff']:.3f}, "
            f"answer top-1 {m['ioi_answer_top1']:.4f}; "
            f"capitals (n={m['capitals_n']}): top-1 {m['capitals_top1']:.4f}, "
            f"clean logit diff {m['capitals_clean_logit_diff']:.3f}, "
            f"corrupted logit diff {m['capitals_corrupted_logit_diff']:.3f}")


# ------------------------------------------------------------------- output

def write_safetensors(path, tensors, dtype):
    """safetensors by hand: u64 LE header length, JSON header (names sorted,
    data_offsets relative to the data section, padded with spaces to a
    multiple of 8 so every tensor stays aligned), then the raw LE data."""
    names = sorted(tensors)
    st_dtype = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}[dtype]
    header = {"__metadata__": {"format": "pt"}}
    blobs, off = [], 0
    for name in names:
        t = tensors[name].to(dtype).contiguous()
        raw = t.view(torch.int16).numpy().astype("<i2").tobytes() if t.element_size() == 2 \
            else t.numpy().astype("<f4").tobytes()
        header[name] = {"dtype": st_dtype, "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    hjson = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
    hjson += b" " * (-len(hjson) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def hf_config(cfg, dtype_name):
    return {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.0,
        "bos_token_id": EOT,
        "embd_pdrop": 0.0,
        "eos_token_id": EOT,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": cfg["n_positions"],
        "n_embd": cfg["n_embd"],
        "n_head": cfg["n_head"],
        "n_inner": None,
        "n_layer": cfg["n_layer"],
        "n_positions": cfg["n_positions"],
        "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.0,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "tie_word_embeddings": True,
        "torch_dtype": dtype_name,
        "use_cache": True,
        "vocab_size": VOCAB,
    }


# --------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps (default: the full run)")
    ap.add_argument("--out", default=os.path.join(HERE, "model"), help="output model directory")
    ap.add_argument("--cli", default=os.path.join(REPO, "build", "patchsweep"), help="patchsweep binary")
    ap.add_argument("--batch", type=int, default=64, help="sequences per step")
    ap.add_argument("--capitals-frac", type=float, default=0.2, help="share of capitals sequences per batch")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--extra-positions", type=int, default=1,
                    help="LM-loss positions per sequence besides the answer")
    ap.add_argument("--n-eval", type=int, default=500, help="held-out prompts per task")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps (0: end only)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    t0 = time.time()
    torch.set_num_threads(args.threads)
    # Without this, the embedding's backward (index_put_ with accumulate)
    # sums in a thread-dependent order and two runs differ in the last bits,
    # which the 1500 steps amplify; with it, a run is bit-for-bit repeatable
    # for a given thread count and torch/OpenBLAS build.
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(TORCH_SEED)
    rng = np.random.default_rng(TORCH_SEED)
    if not os.access(args.cli, os.X_OK):
        sys.exit(f"train.py: {args.cli} is missing: run `make` first")

    n_cap = max(1, round(args.batch * args.capitals_frac))
    n_ioi = args.batch - n_cap
    with tempfile.TemporaryDirectory(prefix="ioi-tiny-") as work:
        # Every training sequence is used once: fresh prompts each step keep
        # the model from memorizing particular name pairs.
        train_ioi = training_sequences(make_dataset(args.cli, "ioi", n_ioi * args.steps,
                                                    SEEDS["train_ioi"], work))
        train_cap = training_sequences(make_dataset(args.cli, "capitals", n_cap * args.steps,
                                                    SEEDS["train_capitals"], work))
        eval_ioi = make_dataset(args.cli, "ioi", args.n_eval, SEEDS["eval_ioi"], work)
        eval_cap = make_dataset(args.cli, "capitals", args.n_eval, SEEDS["eval_capitals"], work)
    longest = max(len(s) for s in train_ioi + train_cap)
    if longest > CONFIG["n_positions"]:
        sys.exit(f"train.py: a training sequence has {longest} tokens, over n_positions")
    print(f"data: {len(train_ioi)} IOI + {len(train_cap)} capitals sequences (longest {longest} tokens), "
          f"{time.time() - t0:.1f}s", flush=True)

    model = GPT2(**CONFIG)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters, config {CONFIG}", flush=True)
    # No weight decay on gains, biases or embeddings: decaying wte would also
    # shrink the (tied) unembedding of the few tokens the task uses.
    decay = [p for n, p in model.named_parameters() if n.endswith("_w") and p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if not (n.endswith("_w") and p.dim() == 2)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    order_ioi = rng.permutation(len(train_ioi))
    order_cap = rng.permutation(len(train_cap))
    t_train = time.time()
    ema = None
    for step in range(args.steps):
        # IOI and capitals prompts go through the model as two batches, each
        # padded to its own longest prompt: capitals prompts are up to three
        # times longer, and one shared padding would triple the IOI work.
        groups = [[train_ioi[j] for j in order_ioi[step * n_ioi:(step + 1) * n_ioi]],
                  [train_cap[j] for j in order_cap[step * n_cap:(step + 1) * n_cap]]]
        hs, tgts, ans = [], [], []
        for seqs in groups:
            ids, lens = pad_batch(seqs)
            inp, tgt = ids[:, :-1], ids[:, 1:]
            B = len(seqs)
            # The 50257 x 128 unembedding (forward, backward and its weight
            # gradient) costs ~25x a block's work per position, so the loss is
            # taken only where it pays: the answer position of every sequence
            # (the task), plus a few random earlier positions so the model
            # also learns the prompts' language (names, shot capitals),
            # which gives the task circuits something to build on.
            rows = [torch.arange(B)]
            cols = [lens - 2]
            for _ in range(args.extra_positions):
                rows.append(torch.arange(B))
                cols.append((torch.rand(B) * (lens - 2).float()).long())
            rows, cols = torch.cat(rows), torch.cat(cols)
            hs.append(model.hidden(inp)[rows, cols])
            tgts.append(tgt[rows, cols])
            ans.append(torch.arange(len(rows)) < B)
        loss_all = F.cross_entropy(model.logits(torch.cat(hs)), torch.cat(tgts), reduction="none")
        is_ans = torch.cat(ans)
        # Answers weigh half, the other positions share the other half.
        n_ans = int(is_ans.sum())
        w = torch.full_like(loss_all, 0.5 / max(1, len(loss_all) - n_ans))
        w[is_ans] = 0.5 / n_ans if args.extra_positions else 1.0 / n_ans
        loss = (loss_all * w).sum()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ans_loss = loss_all[is_ans].mean().item()
        ema = ans_loss if ema is None else 0.95 * ema + 0.05 * ans_loss
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            el = time.time() - t_train
            print(f"step {step + 1}/{args.steps}: answer loss {ema:.4f} (IOI {loss_all[:n_ioi].mean():.3f}, "
                  f"capitals {loss_all[is_ans][n_ioi:].mean():.3f}), lr {lr_at(step):.2e}, "
                  f"{el:.0f}s, {el / (step + 1):.3f}s/step", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            print(f"  eval @ {step + 1}: {format_metrics(evaluate(model, eval_ioi, eval_cap))}", flush=True)

    # Evaluate what is saved: weights rounded to the checkpoint's dtype.
    dtype = getattr(torch, args.dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    metrics = evaluate(model, eval_ioi, eval_cap)
    wall = time.time() - t0
    print(f"held-out ({args.dtype} weights): {format_metrics(metrics)}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    write_safetensors(os.path.join(args.out, "model.safetensors"), model.hf_state_dict(), dtype)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(hf_config(CONFIG, args.dtype), f, indent=2)
        f.write("\n")
    summary = {"metrics": metrics, "steps": args.steps, "batch": args.batch, "lr": args.lr,
               "capitals_frac": args.capitals_frac, "extra_positions": args.extra_positions,
               "seeds": SEEDS, "torch_seed": TORCH_SEED, "wall_seconds": round(wall, 1),
               "torch": torch.__version__, "threads": args.threads}
    print("summary: " + json.dumps(summary), flush=True)
    print(f"wrote {args.out}/model.safetensors ({os.path.getsize(os.path.join(args.out, 'model.safetensors'))} bytes) "
          f"and config.json; wall time {wall:.0f}s", flush=True)


if __name__ == "__main__":
    main()
