#!/usr/bin/python3
"""oracle: a float64 GPT-2 forward in PyTorch, the reference patchsweep's C
runtime is tested against (as llm.c tests against PyTorch).

Written from the GPT-2 math, not from the C code.  Activations are keyed by
TransformerLens hook names, without the batch axis:

    hook_embed, hook_pos_embed                      [T, d]
    blocks.{L}.hook_resid_pre                       [T, d]
    blocks.{L}.ln1.hook_normalized                  [T, d]  (x / scale, before weight and bias)
    blocks.{L}.attn.hook_q / hook_k / hook_v        [T, H, dh]
    blocks.{L}.attn.hook_pattern                    [H, Tq, Tk]
    blocks.{L}.attn.hook_z                          [T, H, dh]
    blocks.{L}.hook_attn_out, blocks.{L}.hook_resid_mid       [T, d]
    blocks.{L}.ln2.hook_normalized                  [T, d]
    blocks.{L}.mlp.hook_pre, blocks.{L}.mlp.hook_post         [T, m]
    blocks.{L}.hook_mlp_out, blocks.{L}.hook_resid_post       [T, d]
    ln_final.hook_normalized                        [T, d]  (x / scale, before weight and bias,
                                                             TransformerLens' meaning)
    logits                                          [T, V]

Hooks follow TransformerLens run_with_hooks semantics: run(ids, hooks={name:
fn}) calls fn(activation) when the forward reaches `name`; if fn returns a
tensor, that value replaces the activation for the rest of the forward (and in
the returned cache).  Activation patching, e.g. the clean resid_pre at layer L,
position p into a corrupted run:

    m = oracle.load("models/gpt2")
    clean = m.run(clean_ids)
    def patch(x):
        x = x.clone(); x[p] = clean[f"blocks.{L}.hook_resid_pre"][p]; return x
    logits = m.run(corrupt_ids, {f"blocks.{L}.hook_resid_pre": patch})["logits"]

CLI:  oracle.py MODEL_DIR ID [ID ...] [--npz OUT.npz]
"""
import json
import math
import os
import re
import struct
import sys

import numpy as np
import torch

# safetensors dtype -> numpy dtype (little-endian); BF16 is decoded by hand.
NP_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
             "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def read_safetensors(path):
    """{name: numpy array} of a .safetensors file.  F32/F16/F64 keep their
    numpy dtype; BF16 becomes float32 exactly (the bf16 bits are the high half)."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    (n,) = struct.unpack("<Q", raw[:8].tobytes())
    header = json.loads(raw[8:8 + n].tobytes())
    header.pop("__metadata__", None)
    base = 8 + n
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        buf = raw[base + begin:base + end]
        if info["dtype"] == "BF16":
            arr = (buf.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = buf.view(NP_DTYPES[info["dtype"]])
        out[name] = arr.reshape(info["shape"])
    return out


def load_config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        c = json.load(f)
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{model_dir}: activation_function {act!r} is not GPT-2's gelu_new")
    d = c["n_embd"]
    return {"n_layer": c["n_layer"], "n_head": c["n_head"], "d_model": d,
            "d_head": d // c["n_head"], "d_mlp": c["n_inner"] if c.get("n_inner") is not None else 4 * d,
            "n_ctx": c["n_positions"], "d_vocab": c["vocab_size"],
            "eps": c.get("layer_norm_epsilon", 1e-5)}


def expected_shapes(cfg):
    d, m, V = cfg["d_model"], cfg["d_mlp"], cfg["d_vocab"]
    shapes = {"wte.weight": (V, d), "wpe.weight": (cfg["n_ctx"], d),
              "ln_f.weight": (d,), "ln_f.bias": (d,), "lm_head.weight": (V, d)}
    for L in range(cfg["n_layer"]):
        for k, s in {"ln_1.weight": (d,), "ln_1.bias": (d,),
                     "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
                     "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
                     "ln_2.weight": (d,), "ln_2.bias": (d,),
                     "mlp.c_fc.weight": (d, m), "mlp.c_fc.bias": (m,),
                     "mlp.c_proj.weight": (m, d), "mlp.c_proj.bias": (d,)}.items():
            shapes[f"h.{L}.{k}"] = s
    return shapes


def load_weights(model_dir, cfg):
    """HF GPT2LMHeadModel tensors as float64 torch tensors, keyed without the
    "transformer." prefix; attn.bias / attn.masked_bias buffers dropped;
    lm_head.weight tied to wte.weight when absent."""
    w = {}
    for name, arr in read_safetensors(os.path.join(model_dir, "model.safetensors")).items():
        key = name[len("transformer."):] if name.startswith("transformer.") else name
        if re.fullmatch(r"h\.\d+\.attn\.(masked_)?bias", key):
            continue
        if key in w:
            raise ValueError(f"{model_dir}: tensor {key} appears twice")
        w[key] = torch.from_numpy(np.array(arr, dtype=np.float64))
    w.setdefault("lm_head.weight", w.get("wte.weight"))
    shapes = expected_shapes(cfg)
    for key, shape in shapes.items():
        if w.get(key) is None or tuple(w[key].shape) != shape:
            got = None if w.get(key) is None else tuple(w[key].shape)
            raise ValueError(f"{model_dir}: tensor {key} has shape {got}, expected {shape}")
    extra = sorted(set(w) - set(shapes))
    if extra:
        raise ValueError(f"{model_dir}: unexpected tensors {extra}")
    return w


def standardize(x, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)       # biased variance
    return (x - mu) / torch.sqrt(var + eps)


def layer_norm(x, w, b, eps):
    return standardize(x, eps) * w + b


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class GPT2:
    def __init__(self, model_dir):
        self.dir = model_dir
        self.cfg = load_config(model_dir)
        self.w = load_weights(model_dir, self.cfg)

    def run(self, ids, hooks=None):
        """Forward over one prompt `ids` (ints); returns {hook name: float64
        tensor} for every hook point.  hooks: {name: fn(tensor) -> tensor or None}."""
        c, W, hooks = self.cfg, self.w, dict(hooks or {})
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        T, H, d, dh = len(ids), c["n_head"], c["d_model"], c["d_head"]
        if not 1 <= T <= c["n_ctx"]:
            raise ValueError(f"{T} tokens: the model takes 1..{c['n_ctx']}")
        if int(ids.min()) < 0 or int(ids.max()) >= c["d_vocab"]:
            raise ValueError(f"token id out of range 0..{c['d_vocab'] - 1}")
        cache = {}

        def hook(name, x):
            fn = hooks.pop(name, None)
            if fn is not None:
                y = fn(x)
                if y is not None:
                    y = torch.as_tensor(y, dtype=torch.float64)
                    if y.shape != x.shape:
                        raise ValueError(f"hook {name} returned shape {tuple(y.shape)}, expected {tuple(x.shape)}")
                    x = y
            cache[name] = x
            return x

        def ln(name, x, prefix):
            # hook_normalized is x / scale; the weight and bias come after it
            return hook(name, standardize(x, c["eps"])) * W[prefix + ".weight"] + W[prefix + ".bias"]

        causal = torch.ones(T, T, dtype=torch.bool).tril()
        resid = hook("hook_embed", W["wte.weight"][ids]) + hook("hook_pos_embed", W["wpe.weight"][:T])
        for L in range(c["n_layer"]):
            p, n = f"h.{L}.", f"blocks.{L}."
            resid = hook(n + "hook_resid_pre", resid)
            x = ln(n + "ln1.hook_normalized", resid, p + "ln_1")
            qkv = x @ W[p + "attn.c_attn.weight"] + W[p + "attn.c_attn.bias"]
            q, k, v = [hook(n + "attn.hook_" + s, t.reshape(T, H, dh))
                       for s, t in zip("qkv", qkv.split(d, dim=-1))]
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(dh)
            scores = scores.masked_fill(~causal, float("-inf"))
            pattern = hook(n + "attn.hook_pattern", torch.softmax(scores, dim=-1))
            z = hook(n + "attn.hook_z", torch.einsum("hqk,khd->qhd", pattern, v))
            attn_out = hook(n + "hook_attn_out",
                            z.reshape(T, d) @ W[p + "attn.c_proj.weight"] + W[p + "attn.c_proj.bias"])
            resid = hook(n + "hook_resid_mid", resid + attn_out)
            x = ln(n + "ln2.hook_normalized", resid, p + "ln_2")
            pre = hook(n + "mlp.hook_pre", x @ W[p + "mlp.c_fc.weight"] + W[p + "mlp.c_fc.bias"])
            post = hook(n + "mlp.hook_post", gelu_new(pre))
            mlp_out = hook(n + "hook_mlp_out", post @ W[p + "mlp.c_proj.weight"] + W[p + "mlp.c_proj.bias"])
            resid = hook(n + "hook_resid_post", resid + mlp_out)
        x = ln("ln_final.hook_normalized", resid, "ln_f")
        hook("logits", x @ W["lm_head.weight"].T)
        if hooks:
            raise KeyError(f"no such hook point: {sorted(hooks)}")
        return cache


def load(model_dir):
    return GPT2(model_dir)


def main(argv):
    import argparse
    ap = argparse.ArgumentParser(description="float64 reference GPT-2 forward")
    ap.add_argument("model_dir")
    ap.add_argument("ids", nargs="+", type=int, help="token ids")
    ap.add_argument("--npz", help="write every activation to this .npz")
    a = ap.parse_args(argv)
    cache = load(a.model_dir).run(a.ids)
    for name, t in cache.items():
        print(f"{name:34s} {str(tuple(t.shape)):18s} max|x| {t.abs().max().item():.6g}")
    top = torch.topk(cache["logits"][-1], min(5, cache["logits"].shape[-1]))
    print("top next tokens:", ", ".join(f"{i} ({v:.4f})" for v, i in zip(top.values.tolist(), top.indices.tolist())))
    if a.npz:
        np.savez(a.npz, **{k: v.numpy() for k, v in cache.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
