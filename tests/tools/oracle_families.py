#!/usr/bin/python3
"""oracle_families: random checkpoints of the GPT-NeoX, Llama (Mistral) and
Qwen2 families in HuggingFace's exact on-disk layout, and a float64 PyTorch
reference forward of each written from HF's modeling code
(modeling_gpt_neox.py, modeling_llama.py, modeling_qwen2.py,
modeling_rope_utils.py), not from the C code.

Activations are keyed by TransformerLens hook names without the batch axis
(as oracle.py for GPT-2): hook_embed, blocks.L.hook_resid_pre,
ln1.hook_scale [T], ln1.hook_normalized (x / scale, before weight and bias),
attn.hook_q [T, H, dh], attn.hook_k / hook_v [T, H_kv, dh] (GQA: the kv
heads), attn.hook_rot_q / hook_rot_k, attn.hook_pattern [H, T, T],
attn.hook_z, hook_attn_out, hook_resid_mid (sequential residual only),
ln2.hook_scale, ln2.hook_normalized, mlp.hook_pre (gate for SiLU-gated),
mlp.hook_pre_linear (gated), mlp.hook_post, hook_mlp_out, hook_resid_post,
ln_final.hook_normalized, logits.

Writer: write_model(out, family, **options) -> config dict.  Tensors as
safetensors serializes (header "__metadata__" {"format": "pt"}, sorted by
name), dtype f32 / f16 / bf16, `shards` > 1 splits them over
model-0000i-of-0000N.safetensors with model.safetensors.index.json.
"""
import json
import math
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle  # noqa: E402  (read_safetensors)

ST = {"f32": "F32", "f16": "F16", "bf16": "BF16"}


def to_bf16_bits(x):
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return b.astype(np.uint16)


def encode(x, dtype):
    if dtype == "f32":
        return np.ascontiguousarray(x, dtype="<f4").tobytes()
    if dtype == "f16":
        return np.ascontiguousarray(x, dtype="<f2").tobytes()
    return to_bf16_bits(x).astype("<u2").tobytes()


def write_safetensors(path, tensors, dtype):
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        b = encode(tensors[name], dtype)
        header[name] = {"dtype": ST[dtype], "shape": list(tensors[name].shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def config_of(family, L=2, H=6, kv=None, d=48, m=96, V=97, npos=64, head_dim=None, rotary_pct=0.25,
              parallel=True, attention_bias=False, mlp_bias=False, tied=False, rope_scaling=None, theta=10000.0,
              mistral=False):
    if family == "neox":
        return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "num_hidden_layers": L,
                "num_attention_heads": H, "hidden_size": d, "intermediate_size": m, "vocab_size": V,
                "max_position_embeddings": npos, "rotary_pct": rotary_pct, "rotary_emb_base": theta,
                "use_parallel_residual": parallel, "layer_norm_eps": 1e-5, "hidden_act": "gelu",
                "tie_word_embeddings": False, "attention_bias": True, "bos_token_id": 0, "eos_token_id": 0,
                "torch_dtype": "float32", "use_cache": True, "initializer_range": 0.02}
    c = {"architectures": ["MistralForCausalLM" if mistral else
                           "Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"],
         "model_type": "mistral" if mistral else family, "num_hidden_layers": L, "num_attention_heads": H,
         "num_key_value_heads": kv or H, "hidden_size": d, "intermediate_size": m, "vocab_size": V,
         "max_position_embeddings": npos, "rms_norm_eps": 1e-6, "rope_theta": theta, "rope_scaling": rope_scaling,
         "hidden_act": "silu", "tie_word_embeddings": tied, "torch_dtype": "float32", "initializer_range": 0.02}
    if head_dim:
        c["head_dim"] = head_dim
    if family == "llama" and not mistral:
        c["attention_bias"] = attention_bias
        c["mlp_bias"] = mlp_bias
    if family == "qwen2":
        c["use_sliding_window"] = False
        c["sliding_window"] = 4096
    if mistral:
        c["sliding_window"] = None
    return c


def random_tensors(c, rng):
    fam = c["model_type"]
    L, H, d, m, V = c["num_hidden_layers"], c["num_attention_heads"], c["hidden_size"], c["intermediate_size"], \
        c["vocab_size"]
    dh = c.get("head_dim") or d // H
    kv = c.get("num_key_value_heads", H)
    s = 1.0 / math.sqrt(d)

    def n(*shape, scale=s):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def lnw():
        return (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)

    t = {}
    if fam == "gpt_neox":
        t["gpt_neox.embed_in.weight"] = n(V, d, scale=1.0)
        for i in range(L):
            p = f"gpt_neox.layers.{i}."
            t[p + "input_layernorm.weight"], t[p + "input_layernorm.bias"] = lnw(), n(d, scale=0.1)
            t[p + "post_attention_layernorm.weight"], t[p + "post_attention_layernorm.bias"] = lnw(), n(d, scale=0.1)
            t[p + "attention.query_key_value.weight"] = n(3 * H * dh, d, scale=2 * s)
            t[p + "attention.query_key_value.bias"] = n(3 * H * dh, scale=0.1)
            t[p + "attention.dense.weight"], t[p + "attention.dense.bias"] = n(d, H * dh), n(d, scale=0.1)
            t[p + "mlp.dense_h_to_4h.weight"], t[p + "mlp.dense_h_to_4h.bias"] = n(m, d), n(m, scale=0.1)
            t[p + "mlp.dense_4h_to_h.weight"] = n(d, m, scale=1 / math.sqrt(m))
            t[p + "mlp.dense_4h_to_h.bias"] = n(d, scale=0.1)
            # buffers HF's older files carry: ignored by the loader
            t[p + "attention.rotary_emb.inv_freq"] = np.ones(int(dh * c["rotary_pct"]) // 2, np.float32)
        t["gpt_neox.final_layer_norm.weight"], t["gpt_neox.final_layer_norm.bias"] = lnw(), n(d, scale=0.1)
        t["embed_out.weight"] = n(V, d)
        return t
    qwen = fam == "qwen2"
    ab, mb = c.get("attention_bias", False), c.get("mlp_bias", False)
    t["model.embed_tokens.weight"] = n(V, d, scale=1.0)
    for i in range(L):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"] = lnw(), lnw()
        for name, rows in (("q", H * dh), ("k", kv * dh), ("v", kv * dh)):
            t[p + f"self_attn.{name}_proj.weight"] = n(rows, d, scale=2 * s)
            if ab or qwen:
                t[p + f"self_attn.{name}_proj.bias"] = n(rows, scale=0.1)
        t[p + "self_attn.o_proj.weight"] = n(d, H * dh)
        if ab:
            t[p + "self_attn.o_proj.bias"] = n(d, scale=0.1)
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = n(m, d), n(m, d)
        t[p + "mlp.down_proj.weight"] = n(d, m, scale=1 / math.sqrt(m))
        if mb:
            t[p + "mlp.gate_proj.bias"], t[p + "mlp.up_proj.bias"] = n(m, scale=0.1), n(m, scale=0.1)
            t[p + "mlp.down_proj.bias"] = n(d, scale=0.1)
    t["model.norm.weight"] = lnw()
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = n(V, d)
    return t


def write_model(out, family, dtype="f32", shards=1, seed=0, **opts):
    os.makedirs(out, exist_ok=True)
    c = config_of(family, **opts)
    t = random_tensors(c, np.random.default_rng(seed))
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(json.dumps(c, indent=2, sort_keys=True) + "\n")
    if shards == 1:
        write_safetensors(os.path.join(out, "model.safetensors"), t, dtype)
        return c
    names = sorted(t)
    wm, total = {}, 0
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(os.path.join(out, fname), {k: t[k] for k in part}, dtype)
        for k in part:
            wm[k] = fname
            total += t[k].size * (4 if dtype == "f32" else 2)
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(wm.items()))}, f, indent=2)
    return c


# ---- the reference ---------------------------------------------------------

def load_weights(model_dir):
    idx = os.path.join(model_dir, "model.safetensors.index.json")
    files = [os.path.join(model_dir, "model.safetensors")]
    if not os.path.exists(files[0]):
        with open(idx) as f:
            files = [os.path.join(model_dir, x) for x in sorted(set(json.load(f)["weight_map"].values()))]
    w = {}
    for path in files:
        for k, a in oracle.read_safetensors(path).items():
            w[k] = torch.from_numpy(np.array(a, dtype=np.float64))
    return w


def inv_freq(dim, theta, scaling):
    """HF: 1 / theta^(arange(0, dim, 2) / dim), rescaled by rope_scaling
    (modeling_rope_utils _compute_linear_scaling / _compute_llama3_parameters)."""
    f = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if not scaling:
        return f
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return f / scaling["factor"]
    assert kind == "llama3"
    factor, lo, hi, old = (scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"],
                           scaling["original_max_position_embeddings"])
    low_wl, high_wl = old / lo, old / hi
    wl = 2 * math.pi / f
    f_l = torch.where(wl > low_wl, f / factor, f)
    smooth = (old / wl - lo) / (hi - lo)
    smoothed = (1 - smooth) * f_l / factor + smooth * f_l
    medium = ~(wl < high_wl) * ~(wl > low_wl)
    return torch.where(medium, smoothed, f_l)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Family:
    def __init__(self, model_dir):
        with open(os.path.join(model_dir, "config.json")) as f:
            self.c = json.load(f)
        self.w = load_weights(model_dir)

    def run(self, ids, overrides=None):
        """Every hook of a run on ids; overrides {hook name: fn(activation) ->
        activation} replaces a hook's value before the rest of the pass reads
        it (TransformerLens' run_with_hooks)."""
        c, W = self.c, self.w
        overrides = overrides or {}
        neox = c["model_type"] == "gpt_neox"
        T = len(ids)
        L, H, d = c["num_hidden_layers"], c["num_attention_heads"], c["hidden_size"]
        dh = c.get("head_dim") or d // H
        kv = H if neox else c.get("num_key_value_heads") or H
        rot = int(dh * c["rotary_pct"]) if neox else dh
        theta = c["rotary_emb_base"] if neox else c["rope_theta"]
        f = inv_freq(rot, theta, None if neox else c.get("rope_scaling"))
        ang = torch.arange(T, dtype=torch.float64)[:, None] * f[None, :]
        emb = torch.cat((ang, ang), dim=-1)                # [T, rot]
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
        eps = c["layer_norm_eps"] if neox else c["rms_norm_eps"]
        pre = "gpt_neox." if neox else "model."
        cache = {}

        def hk(name, x):
            if name in overrides:
                x = overrides[name](x.clone())
            cache[name] = x
            return x

        def norm(name, x, wname, bname):
            if neox:
                xc = x - x.mean(-1, keepdim=True)
                scale = torch.sqrt((xc ** 2).mean(-1, keepdim=True) + eps)
            else:
                xc = x
                scale = torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps)
            hk(name + ".hook_scale", scale[:, 0])
            y = hk(name + ".hook_normalized", xc / scale) * W[wname]
            return y + W[bname] if bname else y

        def lin(x, name, bias=True):
            y = x @ W[name + ".weight"].T
            return y + W[name + ".bias"] if bias and name + ".bias" in W else y

        def rope(x):
            xr, xp = x[..., :rot], x[..., rot:]
            return torch.cat((xr * cos + rotate_half(xr) * sin, xp), dim=-1)

        causal = torch.ones(T, T, dtype=torch.bool).tril()
        ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        resid = hk("hook_embed", W[pre + ("embed_in.weight" if neox else "embed_tokens.weight")][ids_t])
        for l in range(L):
            n = f"blocks.{l}."
            p = pre + f"layers.{l}."
            resid = hk(n + "hook_resid_pre", resid)
            x = norm(n + "ln1", resid, p + "input_layernorm.weight", p + "input_layernorm.bias" if neox else None)
            if neox:
                qkv = lin(x, p + "attention.query_key_value").reshape(T, H, 3 * dh)   # HF: view [.., H, 3*dh]
                q, k, v = qkv[..., :dh], qkv[..., dh:2 * dh], qkv[..., 2 * dh:]
            else:
                q = lin(x, p + "self_attn.q_proj").reshape(T, H, dh)
                k = lin(x, p + "self_attn.k_proj").reshape(T, kv, dh)
                v = lin(x, p + "self_attn.v_proj").reshape(T, kv, dh)
            q, k, v = hk(n + "attn.hook_q", q), hk(n + "attn.hook_k", k), hk(n + "attn.hook_v", v)
            q, k = hk(n + "attn.hook_rot_q", rope(q)), hk(n + "attn.hook_rot_k", rope(k))
            g = H // kv
            kr, vr = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)   # HF repeat_kv
            scores = torch.einsum("qhd,khd->hqk", q, kr) / math.sqrt(dh)
            scores = scores.masked_fill(~causal, float("-inf"))
            pattern = hk(n + "attn.hook_pattern", torch.softmax(scores, dim=-1))
            z = hk(n + "attn.hook_z", torch.einsum("hqk,khd->qhd", pattern, vr))
            attn_out = hk(n + "hook_attn_out",
                          lin(z.reshape(T, H * dh), p + ("attention.dense" if neox else "self_attn.o_proj")))
            par = neox and c.get("use_parallel_residual", True)
            if par:
                mlp_in = resid
            else:
                mlp_in = hk(n + "hook_resid_mid", resid + attn_out)
            x = norm(n + "ln2", mlp_in, p + "post_attention_layernorm.weight",
                     p + "post_attention_layernorm.bias" if neox else None)
            if neox:
                pre_act = hk(n + "mlp.hook_pre", lin(x, p + "mlp.dense_h_to_4h"))
                post = hk(n + "mlp.hook_post", 0.5 * pre_act * (1 + torch.erf(pre_act / math.sqrt(2))))
                mlp_out = hk(n + "hook_mlp_out", lin(post, p + "mlp.dense_4h_to_h"))
            else:
                gate = hk(n + "mlp.hook_pre", lin(x, p + "mlp.gate_proj"))
                up = hk(n + "mlp.hook_pre_linear", lin(x, p + "mlp.up_proj"))
                post = hk(n + "mlp.hook_post", torch.nn.functional.silu(gate) * up)
                mlp_out = hk(n + "hook_mlp_out", lin(post, p + "mlp.down_proj"))
            resid = hk(n + "hook_resid_post", mlp_out + attn_out + resid if par else mlp_in + mlp_out)
        x = norm("ln_final", resid, pre + ("final_layer_norm.weight" if neox else "norm.weight"),
                 pre + "final_layer_norm.bias" if neox else None)
        cache.pop("ln_final.hook_scale")
        head = W["embed_out.weight"] if neox else W.get("lm_head.weight", W[pre + "embed_tokens.weight"])
        hk("logits", x @ head.T)
        return cache


# ---- activation patching: the naive loop (TransformerLens' get_act_patch_*) ----

# component -> (hook suffix, grid axes); k/v index the key/value heads.
# pattern and pattern_dest_src in TransformerLens' own layouts,
# get_act_patch_attn_head_pattern_by_pos (layer, head, dest_pos) and
# get_act_patch_attn_head_pattern_dest_src_pos (layer, head, dest_pos,
# src_pos): the one row or entry overwritten, the row not renormalised.
PATCH_HOOKS = {
    "q": ("attn.hook_q", "pos_head"), "k": ("attn.hook_k", "pos_head"), "v": ("attn.hook_v", "pos_head"),
    "pattern": ("attn.hook_pattern", "head_dest"), "pattern_dest_src": ("attn.hook_pattern", "head_dest_src"),
    "resid_pre": ("hook_resid_pre", "pos"), "resid_mid": ("hook_resid_mid", "pos"),
    "attn_out": ("hook_attn_out", "pos"), "mlp_out": ("hook_mlp_out", "pos"),
    "z": ("attn.hook_z", "pos_head"), "z_all_pos": ("attn.hook_z", "head"),
    "q_all_pos": ("attn.hook_q", "head"), "k_all_pos": ("attn.hook_k", "head"),
    "v_all_pos": ("attn.hook_v", "head"), "pattern_all_pos": ("attn.hook_pattern", "pattern"),
}


def metric_of(logits, answer, wrong, metric, clean_logprobs):
    lp = torch.log_softmax(logits, dim=-1)
    if metric == "logit_diff":
        return float(logits[answer] - logits[wrong])
    if metric == "prob":
        return float(lp[answer].exp())
    if metric == "logprob":
        return float(lp[answer])
    return float((clean_logprobs.exp() * (clean_logprobs - lp)).sum())   # kl(clean || patched)


def patch_grid(fam, clean, corrupted, answer, wrong, comp, metric="logit_diff", direction="denoise"):
    """The grid of one component: one float64 run of the base prompt per cell
    with the source's activation written over the cell's slice."""
    cc, rc = fam.run(clean), fam.run(corrupted)
    clean_lp = torch.log_softmax(cc["logits"][-1], dim=-1)
    base, src = (corrupted, cc) if direction == "denoise" else (clean, rc)
    suffix, axes = PATCH_HOOKS[comp]
    L, T = fam.c["num_hidden_layers"], len(clean)
    probe = src[f"blocks.0.{suffix}"]
    heads = probe.shape[0] if axes.startswith(("pattern", "head_dest")) else (probe.shape[1] if probe.dim() == 3 else 0)
    shape = {"pos": (L, T), "pos_head": (L, T, heads), "head": (L, heads), "pattern": (L, heads),
             "head_dest": (L, heads, T), "head_dest_src": (L, heads, T, T)}[axes]
    out = np.zeros(shape)
    for idx in np.ndindex(*shape):
        name = f"blocks.{idx[0]}.{suffix}"
        s = src[name]

        def setter(x, idx=idx, s=s):
            if axes == "pos":
                x[idx[1]] = s[idx[1]]
            elif axes == "pos_head":
                x[idx[1], idx[2]] = s[idx[1], idx[2]]
            elif axes == "head":
                x[:, idx[1]] = s[:, idx[1]]
            elif axes == "head_dest":
                x[idx[1], idx[2]] = s[idx[1], idx[2]]
            elif axes == "head_dest_src":
                x[idx[1], idx[2], idx[3]] = s[idx[1], idx[2], idx[3]]
            else:
                x[idx[1]] = s[idx[1]]
            return x
        out[idx] = metric_of(fam.run(base, {name: setter})["logits"][-1], answer, wrong, metric, clean_lp)
    return out


# ---- gradients (torch autograd), for the C backward pass and AtP ------------

def metric_tensor(logits, answer, wrong, metric, clean_logprobs=None):
    """A metric of the last row's logits as a differentiable tensor."""
    lp = torch.log_softmax(logits, dim=-1)
    if metric == "logit_diff":
        return logits[answer] - logits[wrong]
    if metric == "prob":
        return lp[answer].exp()
    if metric == "logprob":
        return lp[answer]
    return (clean_logprobs.exp() * (clean_logprobs - lp)).sum()


def gradients(model, ids, answer, wrong, metric="logit_diff", clean_ids=None):
    """{hook name: d metric / d hook} (float64 numpy) of one run, with autograd:
    each hook's value becomes its own node of the graph (TransformerLens' hook
    modules), so its gradient is the total derivative through everything the
    rest of the pass computes from it; a hook the pass does not read (a
    norm's hook_scale) gets zeros.  model: a Family or an oracle.GPT2 (both
    take {name: fn(x) -> x} as run's second argument); the metric is
    metric_of's, kl against the run of clean_ids."""
    names = list(model.run(ids).keys())
    clean_lp = None
    if metric == "kl":
        clean_lp = torch.log_softmax(model.run(clean_ids)["logits"][-1], dim=-1).detach()
    nodes = {}

    def make(name):
        def fn(x):
            y = x.clone()
            if y.requires_grad:
                y.retain_grad()
            else:
                y.requires_grad_(True)
            nodes[name] = y
            return y
        return fn
    with torch.enable_grad():
        out = model.run(ids, {n: make(n) for n in names})
        metric_tensor(out["logits"][-1], answer, wrong, metric, clean_lp).backward()
    return {n: (y.grad.numpy() if y.grad is not None else np.zeros(tuple(y.shape))) for n, y in nodes.items()}


if __name__ == "__main__":
    ref = Family(sys.argv[1]).run([int(x) for x in sys.argv[2].split(",")])
    for k, v in ref.items():
        print(k, tuple(v.shape))
