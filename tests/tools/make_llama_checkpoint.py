#!/usr/bin/python3
"""make_llama_checkpoint: a random Llama-shaped BF16 checkpoint in HF's
sharded on-disk layout, written tensor by tensor in bounded memory (an 8B
model is 16 GB: never held whole).

Default shape: Llama-3-8B (32 layers, hidden 4096, 32 query / 8 key-value
heads, head_dim 128, intermediate 14336, vocabulary 128256, untied
lm_head, rope_theta 500000, 8192 positions).  Files: config.json,
model-0000i-of-0000N.safetensors (tensors in HF's order, a new shard when
the next tensor would pass --shard-gb, like HF's save_pretrained with
max_shard_size), model.safetensors.index.json (metadata.total_size,
weight_map), and tokenizer.json / tokenizer_config.json copied from
--tokenizer (make hf-tokenizers: build/hf-tokenizers/llama3).

Values: matrices and embeddings are random BF16 bit patterns of magnitude
2^-10 .. 2^-5 with random signs (about the scale of a trained model's
weights; finite by construction), norm weights 1.0.  Deterministic for a
given --seed.  Usage:
  make_llama_checkpoint.py -o DIR [--layers N --hidden D --heads H --kv-heads K
                            --intermediate M --vocab V --shard-gb G --seed S]
"""
import argparse
import json
import os
import shutil
import struct
import sys

import numpy as np

CHUNK = 1 << 24  # elements generated at a time (32 MiB of BF16)


def tensors_of(a):
    """(name, shape) in HF's order: embed, then per layer, then norm, lm_head."""
    d, m, dh = a.hidden, a.intermediate, a.hidden // a.heads
    out = [("model.embed_tokens.weight", (a.vocab, d))]
    for l in range(a.layers):
        p = f"model.layers.{l}."
        out += [(p + "input_layernorm.weight", (d,)),
                (p + "self_attn.q_proj.weight", (a.heads * dh, d)),
                (p + "self_attn.k_proj.weight", (a.kv_heads * dh, d)),
                (p + "self_attn.v_proj.weight", (a.kv_heads * dh, d)),
                (p + "self_attn.o_proj.weight", (d, a.heads * dh)),
                (p + "post_attention_layernorm.weight", (d,)),
                (p + "mlp.gate_proj.weight", (m, d)),
                (p + "mlp.up_proj.weight", (m, d)),
                (p + "mlp.down_proj.weight", (d, m))]
    out += [("model.norm.weight", (d,)), ("lm_head.weight", (a.vocab, d))]
    return out


def write_tensor(f, name, n, rng):
    if name.endswith("norm.weight"):
        np.full(n, 0x3F80, dtype="<u2").tofile(f)  # 1.0
        return
    left = n
    while left:
        k = min(left, CHUNK)
        r = rng.integers(0, 1 << 16, size=k, dtype=np.uint16)
        # sign and mantissa from r, exponent 117..122 (2^-10 .. 2^-5)
        e = (117 + (r >> 8) % 6).astype(np.uint16)
        ((r & 0x807F) | (e << 7)).astype("<u2").tofile(f)
        left -= k


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--positions", type=int, default=8192)
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (and tokenizer_config.json)")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    ts = tensors_of(a)
    # shards: HF's greedy split by max_shard_size
    limit = int(a.shard_gb * 1e9)
    shards, cur, size = [], [], 0
    for name, shape in ts:
        nb = 2 * int(np.prod(shape))
        if cur and size + nb > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nb
    shards.append(cur)
    n = len(shards)
    rng = np.random.default_rng(a.seed)
    weight_map, total = {}, 0
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in part:
            nb = 2 * int(np.prod(shape))
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
            weight_map[name] = fname
        total += off
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * ((8 - len(h) % 8) % 8)
        tmp = os.path.join(a.out, fname + ".partial")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(h)))
            f.write(h)
            for name, shape in part:
                write_tensor(f, name, int(np.prod(shape)), rng)
        os.replace(tmp, os.path.join(a.out, fname))
        print(f"{fname}: {len(part)} tensors, {off / 1e9:.2f} GB", file=sys.stderr, flush=True)
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.hidden,
              "intermediate_size": a.intermediate, "num_attention_heads": a.heads,
              "num_key_value_heads": a.kv_heads, "num_hidden_layers": a.layers, "vocab_size": a.vocab,
              "max_position_embeddings": a.positions, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
              "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if a.tokenizer:
        for t in ("tokenizer.json", "tokenizer_config.json"):
            if os.path.exists(os.path.join(a.tokenizer, t)):
                shutil.copy(os.path.join(a.tokenizer, t), os.path.join(a.out, t))
    print(f"{a.out}: {n} shards, {total / 1e9:.2f} GB of BF16 weights", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
