#!/usr/bin/python3
"""bench_torch: the worksheet's activation-patching loop as a researcher runs
it with TransformerLens on a CPU, the baseline `make bench` compares
patchsweep with.

One full forward of the corrupted prompt per (layer, position) cell, with a
hook that overwrites blocks.{L}.hook_resid_pre[0, p] by the clean run's value,
then the logit difference at the last position from the full [1, T, V]
logits: what `patching.get_act_patch_resid_pre` does.  float32, batch 1,
torch.inference_mode(), PyTorch's own kernels (MKL-DNN/OpenBLAS sgemm,
fused layer_norm); the model is the GPT-2 of tests/tools/oracle.py (same
weights file), written with the ops TransformerLens uses.

Usage: bench_torch.py MODEL_DIR --clean-ids 1,2,.. --corrupted-ids .. \
           --answer ID --wrong ID [--threads N] [--reps R] [--json]
Prints seconds per resid_pre grid (best of R) and the grid's values.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle  # noqa: E402  (reads safetensors and config the same way)


class TorchGPT2:
    def __init__(self, model_dir):
        self.cfg = oracle.load_config(model_dir)
        raw = oracle.load_weights(model_dir, self.cfg)
        self.w = {k: v.to(torch.float32).contiguous() for k, v in raw.items()}

    @torch.inference_mode()
    def run(self, ids, hook=None):
        """logits [T, V] of one prompt; hook(L, resid) may return a replacement
        for blocks.{L}.hook_resid_pre ([1, T, d])."""
        c, W = self.cfg, self.w
        T, H, d, dh = len(ids), c["n_head"], c["d_model"], c["d_head"]
        ids = torch.as_tensor(ids, dtype=torch.long)
        resid = (W["wte.weight"][ids] + W["wpe.weight"][:T]).unsqueeze(0)
        mask = torch.full((T, T), float("-inf")).triu(1)
        for L in range(c["n_layer"]):
            p = f"h.{L}."
            if hook is not None:
                resid = hook(L, resid)
            x = torch.nn.functional.layer_norm(resid, (d,), W[p + "ln_1.weight"], W[p + "ln_1.bias"], c["eps"])
            qkv = torch.addmm(W[p + "attn.c_attn.bias"], x[0], W[p + "attn.c_attn.weight"])
            q, k, v = (t.reshape(T, H, dh).transpose(0, 1) for t in qkv.split(d, dim=-1))
            scores = q @ k.transpose(1, 2) / math.sqrt(dh) + mask
            z = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(T, d)
            resid = resid + torch.addmm(W[p + "attn.c_proj.bias"], z, W[p + "attn.c_proj.weight"])
            x = torch.nn.functional.layer_norm(resid, (d,), W[p + "ln_2.weight"], W[p + "ln_2.bias"], c["eps"])
            pre = torch.addmm(W[p + "mlp.c_fc.bias"], x[0], W[p + "mlp.c_fc.weight"])
            post = 0.5 * pre * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (pre + 0.044715 * pre ** 3)))
            resid = resid + torch.addmm(W[p + "mlp.c_proj.bias"], post, W[p + "mlp.c_proj.weight"])
        x = torch.nn.functional.layer_norm(resid, (d,), W["ln_f.weight"], W["ln_f.bias"], c["eps"])
        return x[0] @ W["lm_head.weight"].T

    @torch.inference_mode()
    def resid_pre_cache(self, ids):
        cache = {}

        def keep(L, resid):
            cache[L] = resid.clone()
            return resid
        self.run(ids, keep)
        return cache


def patch_grid(model, clean, corrupted, answer, wrong):
    """[layer, position] logit differences of the corrupted run with the clean
    resid_pre patched in, one forward per cell (the worksheet's loop)."""
    clean_cache = model.resid_pre_cache(clean)
    L, T = model.cfg["n_layer"], len(clean)
    grid = np.zeros((L, T))
    for layer in range(L):
        for pos in range(T):
            def hook(l, resid, layer=layer, pos=pos):
                if l != layer:
                    return resid
                resid = resid.clone()
                resid[0, pos] = clean_cache[l][0, pos]
                return resid
            logits = model.run(corrupted, hook)
            grid[layer, pos] = float(logits[-1, answer] - logits[-1, wrong])
    return grid


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--clean-ids", required=True)
    ap.add_argument("--corrupted-ids", required=True)
    ap.add_argument("--answer", type=int, required=True)
    ap.add_argument("--wrong", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    clean = [int(t) for t in a.clean_ids.split(",")]
    corrupted = [int(t) for t in a.corrupted_ids.split(",")]
    if len(clean) != len(corrupted):
        sys.exit(f"bench_torch: clean and corrupted prompts differ in length ({len(clean)} vs {len(corrupted)})")
    model = TorchGPT2(a.model_dir)
    model.run(clean)  # warm-up: thread pool, allocator
    best, grid = math.inf, None
    for _ in range(a.reps):
        t0 = time.perf_counter()
        grid = patch_grid(model, clean, corrupted, a.answer, a.wrong)
        best = min(best, time.perf_counter() - t0)
    out = {"threads": a.threads, "torch_version": torch.__version__, "seconds": best,
           "cells": int(grid.size), "grid": grid.tolist()}
    if a.json:
        print(json.dumps(out))
    else:
        print(f"torch {torch.__version__}, {a.threads} thread(s): resid_pre grid of {grid.size} cells "
              f"in {best:.3f} s ({grid.size / best:.1f} cells/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
