#!/usr/bin/python3
"""Write a random GPT-2 checkpoint in exactly HuggingFace's on-disk layout.

The output directory gets:
  config.json        as GPT2Config.to_json_string() writes it (indent 2,
                     sorted keys): architectures ["GPT2LMHeadModel"],
                     model_type gpt2, activation_function gelu_new, n_layer,
                     n_head, n_embd, n_positions, n_ctx, n_inner (null unless
                     --n-inner), vocab_size, layer_norm_epsilon 1e-05,
                     bos/eos_token_id 50256 (vocab_size-1 for a smaller vocab,
                     so the ids stay valid), torch_dtype, and GPT2Config's
                     other fields with their defaults.
  model.safetensors  as the safetensors library serializes: u64 LE header
                     length, compact JSON header with "__metadata__":
                     {"format": "pt"} first, tensors sorted by dtype
                     (descending, safetensors' Dtype order) then by name
                     (with one dtype that is plain name order), header padded
                     with spaces to a multiple of 8, then the data,
                     little-endian, in header order.
  vocab.json, merges.txt   only with --tokenizer DIR (copied from DIR's
                     encoder.json and vocab.bpe, OpenAI's / npm's names).

Tensor names are GPT2Model's (wte.weight, h.0.ln_1.weight, ...), or with
--prefix GPT2LMHeadModel's ("transformer." + name).  lm_head.weight (never
prefixed) is written only with --untied; without it the head is tied to wte
as in HF's files, and config.json says "tie_word_embeddings": false when it
is written.

Initialisation (GPT-2's, with non-trivial LayerNorms and biases so that tests
exercise them): weights N(0, std); the two residual projections
(attn.c_proj.weight, mlp.c_proj.weight) N(0, std / sqrt(2 * n_layer)) as in
HF's GPT-2 init; biases N(0, std); LayerNorm weights 1 + N(0, 0.1) and
LayerNorm biases N(0, std).

--mask-buffers adds what old HF files carry: h.N.attn.bias, the causal mask
[1, 1, n_pos, n_pos] (lower-triangular ones), and h.N.attn.masked_bias, a
scalar -1e4, both F32 whatever --dtype is (at n_pos 1024 that is 4 MB per
layer).

Needs only numpy (bf16 is rounded to nearest even from float32 by hand), so
it runs with /usr/bin/python3; the same --seed gives the same files.

Example:
  tests/tools/make_model.py --layers 2 --heads 4 --d-model 64 --vocab 50257 -o build/tiny
"""

import argparse
import json
import os
import shutil
import struct
import sys

import numpy as np

# safetensors' Dtype enum order (the serializer sorts by it, descending).
DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16",
               "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]
TORCH_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
ST_DTYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16"}


def to_bf16_bits(x):
    """float32 array -> uint16 bfloat16 bits, round to nearest even (as torch)."""
    u = np.ascontiguousarray(x, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(x)
    out = rounded.astype(np.uint16)
    out[nan] = 0x7FC0
    return out


def encode(x, st_dtype):
    """Little-endian bytes of float32 array `x` stored as `st_dtype`."""
    if st_dtype == "F32":
        return np.ascontiguousarray(x, dtype="<f4").tobytes()
    if st_dtype == "F16":
        return np.ascontiguousarray(x.astype("<f2")).tobytes()
    if st_dtype == "BF16":
        return to_bf16_bits(x).astype("<u2").tobytes()
    raise ValueError(st_dtype)


def make_tensors(a, rng):
    """{name without prefix: (float32 array, safetensors dtype)}."""
    d, m, L = a.d_model, a.n_inner or 4 * a.d_model, a.layers
    wd = ST_DTYPE[a.dtype]
    std = a.std
    proj_std = std / np.sqrt(2 * L)

    def normal(shape, s):
        return rng.normal(0.0, s, size=shape).astype(np.float32)

    def ln_weight():
        return (1.0 + rng.normal(0.0, 0.1, size=(d,))).astype(np.float32)

    t = {}
    t["wte.weight"] = (normal((a.vocab, d), std), wd)
    t["wpe.weight"] = (normal((a.n_positions, d), std), wd)
    for l in range(L):
        h = f"h.{l}."
        t[h + "ln_1.weight"] = (ln_weight(), wd)
        t[h + "ln_1.bias"] = (normal((d,), std), wd)
        t[h + "attn.c_attn.weight"] = (normal((d, 3 * d), std), wd)
        t[h + "attn.c_attn.bias"] = (normal((3 * d,), std), wd)
        t[h + "attn.c_proj.weight"] = (normal((d, d), proj_std), wd)
        t[h + "attn.c_proj.bias"] = (normal((d,), std), wd)
        t[h + "ln_2.weight"] = (ln_weight(), wd)
        t[h + "ln_2.bias"] = (normal((d,), std), wd)
        t[h + "mlp.c_fc.weight"] = (normal((d, m), std), wd)
        t[h + "mlp.c_fc.bias"] = (normal((m,), std), wd)
        t[h + "mlp.c_proj.weight"] = (normal((m, d), proj_std), wd)
        t[h + "mlp.c_proj.bias"] = (normal((d,), std), wd)
        if a.mask_buffers:
            p = a.n_positions
            mask = np.tril(np.ones((p, p), dtype=np.float32)).reshape(1, 1, p, p)
            t[h + "attn.bias"] = (mask, "F32")
            t[h + "attn.masked_bias"] = (np.array(-1e4, dtype=np.float32), "F32")
    t["ln_f.weight"] = (ln_weight(), wd)
    t["ln_f.bias"] = (normal((d,), std), wd)
    if a.untied:
        t["lm_head.weight"] = (normal((a.vocab, d), std), wd)
    return t


def write_safetensors(path, tensors, prefix):
    """Serialize like safetensors.serialize_file(..., metadata={"format": "pt"})."""
    items = []
    for name, (arr, dt) in tensors.items():
        full = name if (not prefix or name == "lm_head.weight") else "transformer." + name
        items.append((full, arr, dt))
    items.sort(key=lambda it: (-DTYPE_ORDER.index(it[2]), it[0]))

    header = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for full, arr, dt in items:
        blob = encode(arr, dt)
        header[full] = {"dtype": dt, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    hdr = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hdr += b" " * ((8 - len(hdr) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)))
        f.write(hdr)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def config_dict(a):
    special = min(50256, a.vocab - 1)
    cfg = {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": special,
        "embd_pdrop": 0.1,
        "eos_token_id": special,
        "initializer_range": a.std,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": a.n_positions,
        "n_embd": a.d_model,
        "n_head": a.heads,
        "n_inner": a.n_inner,
        "n_layer": a.layers,
        "n_positions": a.n_positions,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.1,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "torch_dtype": TORCH_DTYPE[a.dtype],
        "use_cache": True,
        "vocab_size": a.vocab,
    }
    if a.untied:
        cfg["tie_word_embeddings"] = False
    return cfg


def positive(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out", required=True, metavar="DIR",
                   help="output directory (created if missing)")
    p.add_argument("--layers", type=positive, default=2, help="n_layer (default 2)")
    p.add_argument("--heads", type=positive, default=2, help="n_head (default 2)")
    p.add_argument("--d-model", type=positive, default=64, help="n_embd (default 64)")
    p.add_argument("--vocab", type=positive, default=50257, help="vocab_size (default 50257)")
    p.add_argument("--n-positions", type=positive, default=1024,
                   help="n_positions = n_ctx (default 1024)")
    p.add_argument("--n-inner", type=positive, default=None,
                   help="MLP width (default: null in config.json, i.e. 4 * d-model)")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32",
                   help="weight dtype (default f32)")
    p.add_argument("--prefix", action="store_true",
                   help='name tensors "transformer.*" (GPT2LMHeadModel) instead of GPT2Model names')
    p.add_argument("--mask-buffers", action="store_true",
                   help="add h.N.attn.bias and h.N.attn.masked_bias as old HF files have")
    p.add_argument("--untied", action="store_true",
                   help="write lm_head.weight (untied head) instead of tying it to wte")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--std", type=float, default=0.02,
                   help="init scale: weights N(0, std) (default 0.02, GPT-2's initializer_range)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="copy DIR/encoder.json -> vocab.json and DIR/vocab.bpe -> merges.txt")
    a = p.parse_args(argv)

    if a.d_model % a.heads != 0:
        p.error(f"--d-model {a.d_model} is not divisible by --heads {a.heads}")
    if not (a.std > 0 and np.isfinite(a.std)):
        p.error(f"--std must be a positive number, got {a.std}")
    if a.tokenizer:
        for f in ("encoder.json", "vocab.bpe"):
            if not os.path.isfile(os.path.join(a.tokenizer, f)):
                p.error(f"--tokenizer {a.tokenizer}: {f} not found")

    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    tensors = make_tensors(a, rng)
    write_safetensors(os.path.join(a.out, "model.safetensors"), tensors, a.prefix)
    with open(os.path.join(a.out, "config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(config_dict(a), indent=2, sort_keys=True) + "\n")
    if a.tokenizer:
        shutil.copyfile(os.path.join(a.tokenizer, "encoder.json"), os.path.join(a.out, "vocab.json"))
        shutil.copyfile(os.path.join(a.tokenizer, "vocab.bpe"), os.path.join(a.out, "merges.txt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
