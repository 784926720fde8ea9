"""Tokenizer, run, run_with_cache and run_with_hooks against the CLI and the
float64 references (oracle.py for GPT-2, oracle_families.py for Llama)."""
import os
import subprocess

import numpy as np
import pytest
import torch
import xarray as xr

from conftest import CAPITALS, CLEAN, EMBEDDED, BIN, cli, close


def test_version(ps):
    assert ps.version().startswith("0.")


def test_tokens_equal_cli(model):
    for text in (CLEAN, CAPITALS, "naïve café ☕ 123"):
        ref = cli("tokenize", "--model", EMBEDDED, "--json", text)
        t = model.to_tokens(text)
        assert t.shape == (1, len(ref["ids"])) and t.dtype == np.int32
        assert t[0].tolist() == ref["ids"]
        assert model.to_str_tokens(text) == ref["tokens"]
        assert model.to_string(t[:, 1:]) == text
    assert model.to_tokens("Hi", prepend_bos=False)[0].tolist() == [17250]
    assert model.to_single_token(" John") == 1757


def test_info(model):
    c = model.cfg
    assert (c.family, c.n_layers, c.n_heads, c.d_model, c.d_vocab) == ("gpt2", 4, 4, 128, 50257)
    assert len(model.hook_names) == 2 + 4 * 12 + 2 and model.hook_names[-1] == "logits"


def test_cache_equals_cli_cache(model, tmp_path):
    out = tmp_path / "cache.nc"
    subprocess.run([BIN, "cache", "--model", EMBEDDED, "--prompt", CLEAN, "--hooks",
                    "blocks.*.hook_resid_pre,blocks.2.attn.hook_pattern,blocks.*.mlp.hook_post,logits", "-o",
                    str(out)], check=True, capture_output=True)
    logits, cache = model.run_with_cache(CLEAN, names_filter=["blocks.*.hook_resid_pre", "blocks.2.attn.hook_pattern",
                                                              "blocks.*.mlp.hook_post"])
    with xr.open_dataset(out) as ds:
        assert ds["token_id"].values.tolist() == cache.tokens.tolist()
        names = [v for v in ds.data_vars if v.startswith("blocks.")]
        assert sorted(names) == sorted(cache.keys())
        for name in names:
            close(cache[name][0], ds[name].values, rel=1e-6)
        close(logits[0], ds["logits"].values, rel=1e-6)
    assert cache.dims("blocks.2.attn.hook_pattern") == ("batch", "head", "query_position", "key_position")


def test_cache_is_a_view(model):
    logits, cache = model.run_with_cache(CLEAN, names_filter=lambda n: n.endswith("hook_resid_post"))
    a = cache["resid_post", 3]
    assert not a.flags.owndata and a.base is not None and len(cache) == 4
    del cache
    assert np.isfinite(a).all()          # the run lives on while a view does
    assert not logits.flags.owndata


def test_cache_equals_oracle(model, oracle_gpt2):
    logits, cache = model.run_with_cache(CLEAN)
    ref = oracle_gpt2.run(cache.tokens.astype(np.int64))
    assert set(cache.keys()) <= set(ref) | {"logits"}
    for name in cache.keys():
        close(cache[name][0], ref[name].numpy())
    close(logits[0], ref["logits"].numpy())


def test_steering_hook_equals_oracle(model, oracle_gpt2):
    rng = np.random.default_rng(1)
    v = rng.standard_normal(model.cfg.d_model).astype(np.float32) * 3
    toks = model.to_tokens(CLEAN)

    def steer(act, hook):
        assert hook.name == "blocks.2.hook_resid_pre" and hook.layer() == 2 and act.shape == (1, 17, 128)
        return act + v                       # a new array replaces the activation

    logits = model.run_with_hooks(toks, fwd_hooks=[("blocks.2.hook_resid_pre", steer)])
    ref = oracle_gpt2.run(toks[0].astype(np.int64),
                          {"blocks.2.hook_resid_pre": lambda x: x + torch.as_tensor(v, dtype=torch.float64)})
    close(logits[0], ref["logits"].numpy())
    plain = model(toks)
    assert float(np.abs(logits - plain).max()) > 0.1

    def ablate(act, hook):                    # in place, returning nothing
        act[:, :, 1] = 0.0
    logits = model.run_with_hooks(toks, fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), ablate)])

    def zero_head(x):
        x = x.clone()
        x[:, 1] = 0
        return x
    ref = oracle_gpt2.run(toks[0].astype(np.int64), {f"blocks.{L}.attn.hook_z": zero_head for L in range(4)})
    close(logits[0], ref["logits"].numpy())


def test_llama_forward_cache_hooks(ps, tmp_path):
    import oracle_families
    d = str(tmp_path / "llama")
    oracle_families.write_model(d, "llama", kv=2, seed=3)
    m = ps.load(d)
    assert m.cfg.family == "llama" and m.cfg.n_key_value_heads == 2
    with pytest.raises(ps.PatchsweepError, match="tokenizer.json"):
        m.to_tokens("hello")
    ids = np.random.default_rng(0).integers(0, m.cfg.d_vocab, 11)
    logits, cache = m.run_with_cache(ids)
    ref = oracle_families.Family(d).run(ids.tolist())
    for name in cache.keys():
        close(cache[name][0], ref[name].numpy())
    assert cache["blocks.0.attn.hook_k"].shape == (1, 11, 2, m.cfg.d_head)
    close(logits[0], ref["logits"].numpy())
    # a hook on a rotary model: scaling the residual stream at block 1
    def half(act, hook):
        act *= 0.5
    got = m.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_pre", half)])
    assert float(np.abs(got - logits).max()) > 1e-3
