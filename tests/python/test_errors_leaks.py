"""Errors from C as exceptions with the message; callbacks' exceptions
carried through; no leaks over 1,000 calls (RSS flat)."""
import gc
import os

import numpy as np
import pytest

from conftest import CLEAN, CORRUPTED


def test_errors_are_exceptions(ps, model, tmp_path):
    with pytest.raises(ps.PatchsweepError, match=r"nonexistent/config.json") as e:
        ps.load(str(tmp_path / "nonexistent"))
    assert e.value.status == "i/o error"
    with pytest.raises(ps.PatchsweepError, match="outside the vocabulary"):
        model([1, 2, 60000])
    with pytest.raises(ps.PatchsweepError, match="matches no hook point"):
        model.run_with_cache(CLEAN, names_filter="blocks.7.hook_resid_pre")
    with pytest.raises(ps.PatchsweepError, match="unknown component 'resid_pree'"):
        ps.patching.get_act_patch(model, "resid_pree", CORRUPTED, CLEAN, answer=" John", wrong=" Mary")
    with pytest.raises(ps.PatchsweepError, match="metric"):
        ps.patching.get_act_patch_resid_pre(model, CORRUPTED, CLEAN, metric="logit_dif", answer=" John",
                                            wrong=" Mary")
    with pytest.raises(ValueError, match="equal lengths"):
        ps.patching.get_act_patch_resid_pre(model, "a b c", CLEAN, answer=" John", wrong=" Mary")
    with pytest.raises(ps.PatchsweepError, match="is 3 tokens .* not one"):
        model.to_single_token(" Johnathan Smith")
    with pytest.raises(ps.PatchsweepError, match="layer 9"):
        model.decompose(CLEAN, layer=9)


def test_callback_exceptions_and_reentry(ps, model):
    class Boom(Exception):
        pass

    def bad(act, hook):
        raise Boom(hook.name)
    with pytest.raises(Boom, match="blocks.1.hook_mlp_out"):
        model.run_with_hooks(CLEAN, fwd_hooks=[("blocks.1.hook_mlp_out", bad)])
    kept = []

    def keep_then_fail(act, hook):
        kept.append(act)
        if hook.layer() == 2:
            raise Boom("stop")
    with pytest.raises(Boom):
        model.run_with_hooks(CLEAN, fwd_hooks=[("blocks.*.hook_resid_pre", keep_then_fail)])
    assert len(kept) == 3 and np.isfinite(kept[0]).all()   # still valid after the failed run

    def reenter(act, hook):
        model(CLEAN)                       # a computing call from inside a hook
    with pytest.raises(ps.PatchsweepError, match="called from a callback"):
        model.run_with_hooks(CLEAN, fwd_hooks=[("hook_embed", reenter)])
    seen = []
    model.run_with_hooks(CLEAN, fwd_hooks=[("hook_embed", lambda a, h: seen.append(model.to_str_tokens("Hi")))])
    assert seen == [["<|endoftext|>", "Hi"]]          # tokenizer calls are allowed there
    with pytest.raises(ZeroDivisionError):
        ps.patching.get_act_patch_resid_pre(model, CORRUPTED, CLEAN, metric=lambda lg: 1 / 0)
    with pytest.raises(ValueError, match="returned shape"):
        model.run_with_hooks(CLEAN, fwd_hooks=[("hook_embed", lambda a, h: np.zeros(3))])


def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def test_no_leaks_over_1000_calls(ps, model):
    toks = model.to_tokens("When Mary and John")

    def calls(n):
        for i in range(n):
            k = i % 5
            if k == 0:
                logits, cache = model.run_with_cache(toks, names_filter="blocks.1.*")
                del logits, cache
            elif k == 1:
                model.run_with_hooks(toks, fwd_hooks=[("blocks.0.hook_resid_post", lambda a, h: a * 1.0)])
            elif k == 2:
                model.to_str_tokens(model.to_string(toks))
            elif k == 3:
                ps.patching.get_act_patch_attn_head_out_all_pos(model, toks, toks, answer=" Mary", wrong=" John")
            else:
                model.lens(toks, answer=" Mary", top_k=3)
            try:
                model([0, 60000])
            except ps.PatchsweepError:
                pass
        gc.collect()
    calls(100)                              # warm-up: allocator pools, lazily made workers
    before = rss_kib()
    calls(1000)
    after = rss_kib()
    print(f"summary rss_kib before {before} after {after} growth {after - before}")
    assert after - before < 4096, (before, after)
