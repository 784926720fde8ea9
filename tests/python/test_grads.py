"""Gradients (Model.run_with_grads over patchsweep_model_run_grad) against the
CLI's `cache --grad` NetCDF bit for bit and against the float64 autograd
reference; attribution-patching grids (method="atp") against the CLI's
`patch --method atp --json` bit for bit."""
import subprocess

import numpy as np
import pytest
import xarray as xr

from conftest import BIN, CLEAN, CORRUPTED, EMBEDDED, cli, close


def ids(a):
    return ",".join(str(int(x)) for x in np.asarray(a).ravel())


def cli_grads(model_dir, tokens, metric, answer, wrong, out, clean=None, hooks=None):
    args = [BIN, "cache", "--model", model_dir, "--ids", ids(tokens), "--grad", metric, "--answer-id", str(answer),
            "--wrong-id", str(wrong), "-o", str(out)]
    if clean is not None:
        args += ["--clean-ids", ids(clean)]
    if hooks:
        args += ["--hooks", hooks]
    subprocess.run(args, check=True, capture_output=True)
    return xr.open_dataset(out)


@pytest.mark.parametrize("metric", ["logit_diff", "prob", "logprob", "kl"])
def test_gpt2_grads_equal_cli(model, tmp_path, metric):
    toks = model.to_tokens(CLEAN)[0]
    clean = model.to_tokens(CORRUPTED)[0] if metric == "kl" else None
    j, m = model.to_single_token(" John"), model.to_single_token(" Mary")
    value, grads = model.run_with_grads(toks, metric=metric, answer=j, wrong=m, clean_tokens=clean)
    with cli_grads(EMBEDDED, toks, metric, j, m, tmp_path / "g.nc", clean) as ds:
        names = [v for v in ds.data_vars if v.startswith(("blocks.", "hook_", "ln_final", "logits"))]
        assert sorted(names) == sorted(grads.keys()) and len(names) == len(model.hook_names)
        for name in names:
            assert grads[name].shape == (1,) + ds[name].shape, name
            assert np.array_equal(grads[name][0], ds[name].values), (metric, name)
    assert np.isfinite(value)
    # the value is the metric of the run's own logits
    logits = model(toks)[0, -1].astype(np.float64)
    if metric == "logit_diff":
        close(value, logits[j] - logits[m], rel=1e-6)
    elif metric == "logprob":
        close(value, logits[j] - np.log(np.exp(logits - logits.max()).sum()) - logits.max(), rel=1e-5)


def test_gpt2_grads_selection_and_cache(ps, model, tmp_path):
    j, m = model.to_single_token(" John"), model.to_single_token(" Mary")
    value, grads, logits, cache = model.run_with_grads(CLEAN, answer=" John", wrong=" Mary",
                                                       names_filter=["blocks.*.hook_resid_pre",
                                                                     "blocks.1.attn.hook_z"], return_cache=True)
    assert sorted(grads.keys()) == sorted(cache.keys()) and len(grads) == 5
    assert grads["z", 1].shape == (1, 17, 4, 32) and grads.dims(("z", 1)) == ("batch", "position", "head", "d_head")
    assert not grads["resid_pre", 0].flags.owndata
    close(value, logits[0, -1, j] - logits[0, -1, m], rel=1e-6)
    _, ref = model.run_with_cache(CLEAN, names_filter="blocks.*.hook_resid_pre")
    assert np.array_equal(cache["resid_pre", 2], ref["resid_pre", 2])
    # logit_diff: the last row of the logits' gradient is e_answer - e_wrong
    _, g = model.run_with_grads(CLEAN, answer=j, wrong=m, names_filter="logits")
    last = np.zeros(model.cfg.d_vocab, np.float32)
    last[j], last[m] = 1, -1
    assert np.array_equal(g["logits"][0, -1], last) and not g["logits"][0, :-1].any()
    with cli_grads(EMBEDDED, model.to_tokens(CLEAN), "logit_diff", j, m, tmp_path / "g.nc") as ds:
        assert np.array_equal(grads["blocks.1.attn.hook_z"][0], ds["blocks.1.attn.hook_z"].values)
    with pytest.raises(ps.PatchsweepError, match="clean"):
        model.run_with_grads(CLEAN, metric="kl", answer=j)
    with pytest.raises(ps.PatchsweepError, match="no hook"):
        model.run_with_grads(CLEAN, answer=j, wrong=m, names_filter="blocks.9.hook_nothing")
    with pytest.raises(ps.PatchsweepError, match="metric"):
        model.run_with_grads(CLEAN, metric="accuracy", answer=j, wrong=m)


@pytest.mark.parametrize("metric", ["logit_diff", "prob", "kl"])
def test_llama_grads_equal_cli_and_autograd(ps, tmp_path, metric):
    import oracle_families
    d = str(tmp_path / "llama")
    oracle_families.write_model(d, "llama", kv=2, seed=7)
    m = ps.load(d)
    rng = np.random.default_rng(2)
    toks = rng.integers(0, m.cfg.d_vocab, 10)
    clean = rng.integers(0, m.cfg.d_vocab, 10) if metric == "kl" else None
    answer, wrong = 5, 11
    value, grads = m.run_with_grads(toks, metric=metric, answer=answer, wrong=wrong, clean_tokens=clean)
    with cli_grads(d, toks, metric, answer, wrong, tmp_path / "g.nc", clean) as ds:
        for name in grads.keys():
            assert np.array_equal(grads[name][0], ds[name].values), (metric, name)
    ref = oracle_families.gradients(oracle_families.Family(d), toks.tolist(), answer, wrong, metric,
                                    None if clean is None else clean.tolist())
    assert sorted(ref) == sorted(grads.keys())
    for name, r in ref.items():
        close(grads[name][0], r, rel=1e-4)
    assert grads["blocks.0.attn.hook_k"].shape == (1, 10, 2, m.cfg.d_head)


ATP_ARGS = ["patch", "--model", EMBEDDED, "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", " John", "--wrong",
            " Mary", "--method", "atp", "--json"]


@pytest.mark.parametrize("metric,direction", [("logit_diff", "denoise"), ("prob", "noise"), ("kl", "denoise")])
def test_atp_grids_equal_cli(ps, model, metric, direction):
    comps = "resid_pre,attn_out,mlp_out,z,z_all_pos,k_all_pos,pattern_all_pos"
    ref = cli(*ATP_ARGS, "--components", comps, "--metric", metric, "--direction", direction)
    assert ref["method"] == "atp"
    for comp, r in ref["components"].items():
        g = ps.patching.get_act_patch(model, comp, CORRUPTED, CLEAN, metric=metric, answer=" John", wrong=" Mary",
                                      direction=direction, method="atp")
        assert list(g.dims) == r["dims"] and list(g.shape) == r["shape"]
        assert np.array_equal(g.values.ravel(), np.array(r["values"])), (metric, comp)
        assert g.attrs["method"] == "atp" and g.attrs["corrupted_metric"] == ref["corrupted_metric"]
    every = ps.patching.get_act_patch_block_every(model, CORRUPTED, CLEAN, metric=metric, answer=" John",
                                                  wrong=" Mary", direction=direction, method="atp")
    assert every.attrs["method"] == "atp"
    assert np.array_equal(every.sel(component="attn_out").values.ravel(), ref["components"]["attn_out"]["values"])


def test_atp_estimates_and_errors(ps, model):
    exact = ps.patching.get_act_patch_attn_head_out_all_pos(model, CORRUPTED, CLEAN, answer=" John", wrong=" Mary")
    atp = ps.patching.get_act_patch_attn_head_out_all_pos(model, CORRUPTED, CLEAN, answer=" John", wrong=" Mary",
                                                          method="atp")
    assert exact.attrs["method"] == "exact" and atp.attrs["method"] == "atp"
    # an estimate, not the exact grid, but of the same effects (ranked alike)
    e, a = exact.values.ravel(), atp.values.ravel()
    assert not np.array_equal(e, a)
    assert np.corrcoef(np.argsort(np.argsort(e)), np.argsort(np.argsort(a)))[0, 1] > 0.5
    with pytest.raises(ps.PatchsweepError, match="custom metric"):
        ps.patching.get_act_patch_resid_pre(model, CORRUPTED, CLEAN, metric=lambda lg: lg[0, -1, 0], method="atp")
    with pytest.raises(ps.PatchsweepError, match="method"):
        ps.patching.get_act_patch_resid_pre(model, CORRUPTED, CLEAN, answer=" John", wrong=" Mary",
                                            method="atp+exact")


def test_patch_opts_without_method_is_exact(ps, model):
    """A caller built before `method` (its struct_size ends before it) gets exact grids."""
    import ctypes
    from patchsweep import _lib, patching
    pair, clean, corrupted = patching._pair(model, CORRUPTED, CLEAN, " John", " Mary")
    old = _lib.PatchOpts.method.offset
    opts = _lib.PatchOpts(struct_size=old, method=b"atp")     # beyond struct_size: not read
    v = np.empty((4, 17))
    ps._check(_lib.pair_patch(pair.ptr, b"resid_pre", ctypes.byref(opts),
                              v.ctypes.data_as(ctypes.POINTER(ctypes.c_double)), v.size, None, None))
    exact = patching.get_act_patch_resid_pre(model, CORRUPTED, CLEAN, answer=" John", wrong=" Mary")
    assert np.array_equal(v, exact.values)


def test_atp_star_equals_cli(ps, model):
    """method="atp*" (AtP*'s QK fix) = `patch --method atp*` bit for bit, and
    differs from atp on the q/k grids only."""
    args = [a if a != "atp" else "atp*" for a in ATP_ARGS]
    ref = cli(*args, "--components", "q_all_pos,k_all_pos,z_all_pos")
    assert ref["method"] == "atp*"
    for comp, r in ref["components"].items():
        g = ps.patching.get_act_patch(model, comp, CORRUPTED, CLEAN, answer=" John", wrong=" Mary", method="atp*")
        assert np.array_equal(g.values.ravel(), np.array(r["values"])), comp
        plain = ps.patching.get_act_patch(model, comp, CORRUPTED, CLEAN, answer=" John", wrong=" Mary",
                                          method="atp")
        assert np.array_equal(plain.values, g.values) == (comp == "z_all_pos"), comp


@pytest.mark.parametrize("method", ["atp+graddrop", "atp*+graddrop"])
def test_graddrop_equals_cli(ps, model, method):
    """method="atp+graddrop" ("atp*+graddrop") = `patch --method atp --graddrop`
    (`atp*`) bit for bit, and differs from the estimate without GradDrop."""
    base = method.split("+")[0]
    args = [a if a != "atp" else base for a in ATP_ARGS]
    ref = cli(*args, "--graddrop", "--components", "resid_pre,z_all_pos,q_all_pos")
    assert ref["method"] == base and ref["graddrop"] is True
    for comp, r in ref["components"].items():
        g = ps.patching.get_act_patch(model, comp, CORRUPTED, CLEAN, answer=" John", wrong=" Mary", method=method)
        assert g.attrs["method"] == method
        assert np.array_equal(g.values.ravel(), np.array(r["values"])), comp
        plain = ps.patching.get_act_patch(model, comp, CORRUPTED, CLEAN, answer=" John", wrong=" Mary", method=base)
        assert not np.array_equal(plain.values, g.values), comp


@pytest.mark.parametrize("method", ["exact+graddrop", "atp+exact+graddrop", "atp+verify", "atp+graddrop+graddrop"])
def test_method_refused(ps, model, method):
    with pytest.raises(ps.PatchsweepError, match="unknown method"):
        ps.patching.get_act_patch_resid_pre(model, CORRUPTED, CLEAN, answer=" John", wrong=" Mary", method=method)
