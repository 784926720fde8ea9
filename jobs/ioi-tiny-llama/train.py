#!/usr/bin/python3
"""Train patchsweep's second embedded model: a tiny Llama that does IOI and capitals.

Runs with Debian's /usr/bin/python3 (PyTorch + numpy), nothing else.  The
model is written here in plain torch with Hugging Face's LlamaForCausalLM
semantics (modeling_llama.py): token embeddings, no position embeddings;
pre-norm blocks with RMSNorm (x * rsqrt(mean(x^2) + eps) * weight); rotary
position embeddings on q and k (rotate_half convention, inv_freq =
theta^(-2i/d_head)); grouped-query attention (4 query heads share 2 key/value
heads, HF's repeat_kv); SwiGLU MLP down(silu(gate(x)) * up(x)); no biases;
final RMSNorm; lm_head tied to the embeddings.  Its vocabulary is the 32000
SentencePiece tokens of the Llama 2 / Mistral tokenizer.json from
`make hf-tokenizers` (build/hf-tokenizers/llama2/), which is copied into the
model directory, so the output loads as LlamaForCausalLM with its tokenizer
and in patchsweep's C runtime alike.

Data come from patchsweep's own generators through the CLI, with the
model's tokenizer (`patchsweep make-dataset ioi|capitals --model OUT --n N
--seed S --ids`: names and capitals are one token where the model predicts
them), so the model is trained on exactly the prompts the C runtime
evaluates.  Training and evaluation seeds are disjoint (SEEDS below).

    make hf-tokenizers && make
    /usr/bin/python3 jobs/ioi-tiny-llama/train.py                      # -> jobs/ioi-tiny-llama/model/
    /usr/bin/python3 jobs/ioi-tiny-llama/train.py --steps 20 --out /tmp/m   # smoke run
"""

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time


def _cpu_has_avx512f():
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


# Read by OpenBLAS/OpenMP when torch loads them (see jobs/ioi-tiny/train.py):
# AVX-512 kernels where the CPU has them, idle threads that sleep.
if _cpu_has_avx512f():
    os.environ.setdefault("OPENBLAS_CORETYPE", "SkylakeX")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

VOCAB = 32000
BOS, EOS, PAD = 1, 2, 0   # <s>, </s>, <unk> (padding sits after the end: causal attention never sees it)

# Generator seeds.  The job files' held-out data (ioi.jsonl, capitals.jsonl)
# use 9101/9102 and the test 9201/9202, as for jobs/ioi-tiny.
SEEDS = {
    "train_ioi": 1011,
    "train_capitals": 1012,
    "eval_ioi": 9001,
    "eval_capitals": 9002,
}
TORCH_SEED = 20240611

CONFIG = {
    "n_layer": 4,
    "d_model": 128,
    "n_head": 4,
    "n_kv_head": 2,
    "d_mlp": 384,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    # The longest training sequence (a three-shot capitals prompt with <s>
    # and its answer) is under 64 tokens; rotary has no table, but positions
    # past what training reaches are untested, so the config says 64.
    "n_positions": 64,
}


# --------------------------------------------------------------------- model

def rms_norm(x, w, eps):
    # HF LlamaRMSNorm: in float32, x * rsqrt(mean(x^2) + eps), then * weight
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Block(torch.nn.Module):
    """One pre-norm Llama block; projections as HF nn.Linear weights [out, in]."""

    def __init__(self, c):
        super().__init__()
        d, H, KV, m = c["d_model"], c["n_head"], c["n_kv_head"], c["d_mlp"]
        dh = d // H
        self.H, self.KV, self.dh, self.eps = H, KV, dh, c["rms_norm_eps"]
        std = 0.02
        # GPT-2's scaled init of the residual projections keeps the residual
        # stream's variance flat across depth.
        proj_std = std / math.sqrt(2 * c["n_layer"])
        P = torch.nn.Parameter
        self.ln1 = P(torch.ones(d))
        self.q = P(torch.randn(H * dh, d) * std)
        self.k = P(torch.randn(KV * dh, d) * std)
        self.v = P(torch.randn(KV * dh, d) * std)
        self.o = P(torch.randn(d, H * dh) * proj_std)
        self.ln2 = P(torch.ones(d))
        self.gate = P(torch.randn(m, d) * std)
        self.up = P(torch.randn(m, d) * std)
        self.down = P(torch.randn(d, m) * proj_std)

    def forward(self, x, cos, sin, mask):
        B, T, d = x.shape
        H, KV, dh = self.H, self.KV, self.dh
        h = rms_norm(x, self.ln1, self.eps)
        q = (h @ self.q.t()).view(B, T, H, dh).transpose(1, 2)     # [B, H, T, dh]
        k = (h @ self.k.t()).view(B, T, KV, dh).transpose(1, 2)    # [B, KV, T, dh]
        v = (h @ self.v.t()).view(B, T, KV, dh).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        g = H // KV
        k = k.repeat_interleave(g, dim=1)                           # HF repeat_kv
        v = v.repeat_interleave(g, dim=1)
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(dh))
        att = att.masked_fill(mask[:T, :T], float("-inf")).softmax(-1)
        z = (att @ v).transpose(1, 2).reshape(B, T, H * dh)
        x = x + z @ self.o.t()
        h = rms_norm(x, self.ln2, self.eps)
        return x + (F.silu(h @ self.gate.t()) * (h @ self.up.t())) @ self.down.t()


class Llama(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        d, H = c["d_model"], c["n_head"]
        dh = d // H
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, d) * 0.02)
        self.blocks = torch.nn.ModuleList(Block(c) for _ in range(c["n_layer"]))
        self.norm = torch.nn.Parameter(torch.ones(d))
        T = c["n_positions"]
        inv = 1.0 / c["rope_theta"] ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
        emb = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)
        self.register_buffer("mask", torch.triu(torch.ones(T, T, dtype=torch.bool), 1), persistent=False)

    def hidden(self, ids):
        """norm(residual stream) at every position: [B, T, d]."""
        T = ids.shape[1]
        x = self.embed[ids]
        cos, sin = self.cos[:T], self.sin[:T]
        for b in self.blocks:
            x = b(x, cos, sin, self.mask)
        return rms_norm(x, self.norm, self.c["rms_norm_eps"])

    def logits(self, h):
        return h @ self.embed.t()  # tied lm_head

    def hf_state_dict(self):
        """Tensors under LlamaForCausalLM's names (lm_head omitted: tied)."""
        sd = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        for i, b in enumerate(self.blocks):
            p = f"model.layers.{i}."
            sd.update({
                p + "input_layernorm.weight": b.ln1,
                p + "self_attn.q_proj.weight": b.q, p + "self_attn.k_proj.weight": b.k,
                p + "self_attn.v_proj.weight": b.v, p + "self_attn.o_proj.weight": b.o,
                p + "post_attention_layernorm.weight": b.ln2,
                p + "mlp.gate_proj.weight": b.gate, p + "mlp.up_proj.weight": b.up,
                p + "mlp.down_proj.weight": b.down,
            })
        return {k: v.detach() for k, v in sd.items()}


# ---------------------------------------------------------------------- data

def make_dataset(cli, model_dir, task, n, seed, workdir):
    """Records of `patchsweep make-dataset TASK --model DIR --ids` (ids include <s>)."""
    out = os.path.join(workdir, f"{task}-{seed}-{n}.jsonl")
    cmd = [cli, "make-dataset", task, "--model", model_dir, "--n", str(n), "--seed", str(seed), "--ids", "-o", out]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"train.py: {' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    with open(out, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    if len(recs) != n:
        sys.exit(f"train.py: {out}: expected {n} records, got {len(recs)}")
    return recs


def training_sequences(recs):
    """<s> + clean prompt + answer, as lists of ids."""
    seqs = []
    for r in recs:
        ids = list(r["clean_ids"])
        if ids[0] != BOS:
            sys.exit("train.py: clean_ids do not start with <s>: is the tokenizer's add_bos_token lost?")
        seqs.append(ids + [r["answer_id"]])
    return seqs


def pad_batch(seqs):
    """[B, T] ids padded after the end, and each sequence's length."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
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


@torch.no_grad()
def check_c_runtime(model, cli, model_dir, recs, top_k=20):
    """The C forward pass (`patchsweep run --ids --json`) against this torch
    model (weights already rounded to the checkpoint's dtype): the logits of
    the C top-k tokens, worst |c - torch| / max(1, max |torch|)."""
    worst = 0.0
    for r in recs:
        ids = r["clean_ids"]
        cmd = [cli, "run", "--model", model_dir, "--ids", ",".join(map(str, ids)), "--top-k", str(top_k), "--json"]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            sys.exit(f"train.py: {' '.join(cmd[:4])} ... failed: {p.stderr.strip()}")
        top = json.loads(p.stdout)["top"]
        ref = final_logits(model, [ids])[0].double()
        got = torch.tensor([t["logit"] for t in top], dtype=torch.float64)
        want = ref[torch.tensor([t["id"] for t in top])]
        worst = max(worst, ((got - want).abs().max() / max(1.0, ref.abs().max().item())).item())
        if top[0]["id"] != int(ref.argmax()):
            sys.exit(f"train.py: C runtime's top-1 {top[0]['id']} != torch's {int(ref.argmax())}")
    return worst


# ------------------------------------------------------------------- output

def write_safetensors(path, tensors, dtype):
    """safetensors by hand: u64 LE header length, JSON header (names sorted,
    data_offsets relative to the data section, padded with spaces to a
    multiple of 8), then the raw LE data."""
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


def hf_config(c, dtype_name):
    """LlamaConfig's keys (transformers 4.4x), as LlamaForCausalLM writes them."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "head_dim": c["d_model"] // c["n_head"],
        "hidden_act": "silu",
        "hidden_size": c["d_model"],
        "initializer_range": 0.02,
        "intermediate_size": c["d_mlp"],
        "max_position_embeddings": c["n_positions"],
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": c["n_head"],
        "num_hidden_layers": c["n_layer"],
        "num_key_value_heads": c["n_kv_head"],
        "pretraining_tp": 1,
        "rms_norm_eps": c["rms_norm_eps"],
        "rope_scaling": None,
        "rope_theta": c["rope_theta"],
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
    ap.add_argument("--tokenizer", default=os.path.join(REPO, "build", "hf-tokenizers", "llama2"),
                    help="directory with the Llama 2 tokenizer.json + tokenizer_config.json (make hf-tokenizers)")
    ap.add_argument("--batch", type=int, default=64, help="sequences per step")
    ap.add_argument("--capitals-frac", type=float, default=0.25, help="share of capitals sequences per batch")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--extra-positions", type=int, default=1,
                    help="LM-loss positions per sequence besides the answer")
    ap.add_argument("--n-eval", type=int, default=500, help="held-out prompts per task")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps (0: end only)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    t0 = time.time()
    torch.set_num_threads(args.threads)
    # Bit-for-bit repeatable for a given thread count and torch/OpenBLAS
    # build (the embedding's backward otherwise sums in a thread-dependent
    # order).
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(TORCH_SEED)
    rng = np.random.default_rng(TORCH_SEED)
    if not os.access(args.cli, os.X_OK):
        sys.exit(f"train.py: {args.cli} is missing: run `make` first")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if not os.path.isfile(os.path.join(args.tokenizer, f)):
            sys.exit(f"train.py: {args.tokenizer}/{f} is missing: run `make hf-tokenizers` first")

    # The tokenizer goes into the model directory first: make-dataset reads
    # it from there, as every command will.
    os.makedirs(args.out, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        src, dst = os.path.join(args.tokenizer, f), os.path.join(args.out, f)
        if os.path.abspath(src) != os.path.abspath(dst):
            shutil.copyfile(src, dst)

    n_cap = max(1, round(args.batch * args.capitals_frac))
    n_ioi = args.batch - n_cap
    with tempfile.TemporaryDirectory(prefix="ioi-tiny-llama-") as work:
        # Every training sequence is used once: fresh prompts each step keep
        # the model from memorizing particular name pairs.
        train_ioi = training_sequences(make_dataset(args.cli, args.out, "ioi", n_ioi * args.steps,
                                                    SEEDS["train_ioi"], work))
        train_cap = training_sequences(make_dataset(args.cli, args.out, "capitals", n_cap * args.steps,
                                                    SEEDS["train_capitals"], work))
        eval_ioi = make_dataset(args.cli, args.out, "ioi", args.n_eval, SEEDS["eval_ioi"], work)
        eval_cap = make_dataset(args.cli, args.out, "capitals", args.n_eval, SEEDS["eval_capitals"], work)
    longest = max(len(s) for s in train_ioi + train_cap)
    if longest > CONFIG["n_positions"]:
        sys.exit(f"train.py: a training sequence has {longest} tokens, over n_positions")
    print(f"data: {len(train_ioi)} IOI + {len(train_cap)} capitals sequences (longest {longest} tokens), "
          f"{time.time() - t0:.1f}s", flush=True)

    model = Llama(CONFIG)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters, config {CONFIG}", flush=True)
    # No weight decay on norm gains or the (tied) embeddings.
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and n != "embed"]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and n != "embed")]
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
        # IOI and capitals prompts as two batches, each padded to its own
        # longest prompt (capitals prompts are up to three times longer).
        groups = [[train_ioi[j] for j in order_ioi[step * n_ioi:(step + 1) * n_ioi]],
                  [train_cap[j] for j in order_cap[step * n_cap:(step + 1) * n_cap]]]
        hs, tgts, ans = [], [], []
        for seqs in groups:
            ids, lens = pad_batch(seqs)
            inp, tgt = ids[:, :-1], ids[:, 1:]
            B = len(seqs)
            # The loss is taken at the answer position of every sequence (the
            # task) plus a few random earlier positions, so the model also
            # learns the prompts' language (names, shot capitals).
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
    print(f"held-out ({args.dtype} weights): {format_metrics(metrics)}", flush=True)

    write_safetensors(os.path.join(args.out, "model.safetensors"), model.hf_state_dict(), dtype)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(hf_config(CONFIG, args.dtype), f, indent=2)
        f.write("\n")
    worst = check_c_runtime(model, args.cli, args.out, eval_ioi[:3] + eval_cap[:3])
    print(f"C runtime vs torch: logits of the top 20 after 6 held-out prompts, worst relative error {worst:.2e}",
          flush=True)
    if worst > 1e-4:
        sys.exit("train.py: the C runtime disagrees with the torch model")
    wall = time.time() - t0
    summary = {"metrics": metrics, "steps": args.steps, "batch": args.batch, "lr": args.lr,
               "capitals_frac": args.capitals_frac, "extra_positions": args.extra_positions,
               "seeds": SEEDS, "torch_seed": TORCH_SEED, "parameters": n_params, "wall_seconds": round(wall, 1),
               "c_runtime_worst_rel_err": worst, "torch": torch.__version__, "threads": args.threads}
    print("summary: " + json.dumps(summary), flush=True)
    print(f"wrote {args.out}/model.safetensors ({os.path.getsize(os.path.join(args.out, 'model.safetensors'))} bytes), "
          f"config.json, tokenizer.json, tokenizer_config.json; wall time {wall:.0f}s", flush=True)


if __name__ == "__main__":
    main()
