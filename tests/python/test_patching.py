"""Patching grids, the lens and the decomposition against the CLI's --json
output, and a custom metric against the built-in ones and the oracle."""
import numpy as np
import pytest

from conftest import CAPITALS, CLEAN, CORRUPTED, EMBEDDED, cli, close

ARGS = ["patch", "--model", EMBEDDED, "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", " John", "--wrong",
        " Mary", "--json"]
ALL = "resid_pre,resid_mid,attn_out,mlp_out,z,z_all_pos,q_all_pos,k_all_pos,v_all_pos,pattern_all_pos," \
      "q,k,v,pattern,pattern_dest_src"


@pytest.mark.parametrize("metric,direction,engine", [("logit_diff", "denoise", "fast"), ("kl", "noise", "fast"),
                                                     ("prob", "denoise", "naive")])
def test_grids_equal_cli(ps, model, metric, direction, engine):
    comps = ALL if engine == "fast" else "resid_pre,z_all_pos"
    ref = cli(*ARGS, "--components", comps, "--metric", metric, "--direction", direction, "--engine", engine)
    for comp, r in ref["components"].items():
        g = ps.patching.get_act_patch(model, comp, CORRUPTED, CLEAN, metric=metric, answer=" John", wrong=" Mary",
                                      direction=direction, engine=engine)
        assert list(g.dims) == r["dims"] and list(g.shape) == r["shape"]
        assert np.array_equal(g.values.ravel(), np.array(r["values"])), comp
        assert g.attrs["clean_metric"] == ref["clean_metric"]
        assert g.attrs["corrupted_metric"] == ref["corrupted_metric"]


def test_named_grids_and_labels(ps, model):
    clean_tokens = model.to_tokens(CLEAN)
    _, clean_cache = model.run_with_cache(clean_tokens, names_filter="hook_embed")
    g = ps.patching.get_act_patch_resid_pre(model, model.to_tokens(CORRUPTED), clean_cache, metric="logit_diff",
                                            answer=" John", wrong=" Mary", normalize=True)
    assert g.dims == ("layer", "position") and g.shape == (4, 17)
    assert g.label.values[10] == " Mary_10" and g.corrupted_token.values[10] == " John"
    assert abs(float(g.sel(layer=0, position=10)) - 1.0) < 1e-6
    every = ps.patching.get_act_patch_block_every(model, CORRUPTED, CLEAN, answer=" John", wrong=" Mary")
    assert every.dims == ("component", "layer", "position") and list(every.component.values) == [
        "resid_pre", "attn_out", "mlp_out"]
    heads = ps.patching.get_act_patch_attn_head_out_all_pos(model, CORRUPTED, CLEAN, answer=" John", wrong=" Mary")
    assert heads.dims == ("layer", "head") and heads.shape == (4, 4)
    z = ps.patching.get_act_patch_attn_head_out_by_pos(model, CORRUPTED, CLEAN, answer=" John", wrong=" Mary")
    assert z.dims == ("layer", "position", "head")
    by_pos = ps.patching.get_act_patch_attn_head_by_pos_every(model, CORRUPTED, CLEAN, answer=" John", wrong=" Mary")
    assert by_pos.dims == ("component", "layer", "position", "head") and list(by_pos.component.values) == [
        "z", "q", "k", "v", "pattern"]
    assert np.array_equal(by_pos.sel(component="z").values, z.values)
    ds = ps.patching.get_act_patch_attn_head_pattern_dest_src_pos(model, CORRUPTED, CLEAN, answer=" John",
                                                                   wrong=" Mary")
    assert ds.dims == ("layer", "position", "src_position", "head") and ds.shape == (4, 17, 17, 4)
    # TransformerLens' own layout of this grid is (layer, head, dest_pos, src_pos)
    assert ds.transpose("layer", "head", "position", "src_position").shape == (4, 4, 17, 17)


def test_custom_metric_naive(ps, model):
    j, m = model.to_single_token(" John"), model.to_single_token(" Mary")
    calls = []

    def logit_diff(logits):
        calls.append(logits.shape)
        return logits[0, -1, j] - logits[0, -1, m]

    g = ps.patching.get_act_patch_attn_head_out_all_pos(model, CORRUPTED, CLEAN, metric=logit_diff)
    ref = ps.patching.get_act_patch_attn_head_out_all_pos(model, CORRUPTED, CLEAN, answer=j, wrong=m)
    assert g.attrs["engine"] == "naive" and len(calls) == 16 + 2 and calls[0] == (1, 17, model.cfg.d_vocab)
    close(g.values, ref.values, rel=1e-5)
    close(g.attrs["clean_metric"], ref.attrs["clean_metric"], rel=1e-5)
    with pytest.raises(ps.PatchsweepError, match="naive engine"):
        ps.patching.get_act_patch_resid_pre(model, CORRUPTED, CLEAN, metric=logit_diff, engine="fast")


def test_custom_metric_against_oracle(ps, model, oracle_gpt2):
    """One cell of the custom-metric grid = the oracle's own patching loop."""
    toks_c, toks_x = model.to_tokens(CLEAN)[0], model.to_tokens(CORRUPTED)[0]
    g = ps.patching.get_act_patch_resid_mid(model, toks_x, toks_c, metric=lambda lg: lg[0, -1].max())
    clean = oracle_gpt2.run(toks_c.astype(np.int64))
    name, p = "blocks.1.hook_resid_mid", 10

    def patch(x):
        x = x.clone()
        x[p] = clean[name][p]
        return x
    ref = oracle_gpt2.run(toks_x.astype(np.int64), {name: patch})["logits"][-1].max().item()
    close(float(g.sel(layer=1, position=p)), ref)


def test_lens_equals_cli(model):
    ref = cli("lens", "--model", EMBEDDED, "--prompt", CAPITALS, "--answer", " Warsaw", "--top-k", "5", "--json")
    ds = model.lens(CAPITALS, answer=" Warsaw", top_k=5)
    assert list(ds.layer.values) == [r["layer"] for r in ref["layers"]]
    for i, r in enumerate(ref["layers"]):
        close(ds.prob.values[i], r["answer_prob"], rel=1e-6)
        assert int(ds["rank"].values[i]) == r["answer_rank"]
        assert ds.topk_id.values[i].tolist() == [t["id"] for t in r["top"]]
        assert ds.topk_token.values[i].tolist() == [t["token"] for t in r["top"]]


def test_decompose_and_attribution_equal_cli(model):
    ref = cli("decompose", "--model", EMBEDDED, "--prompt", CAPITALS, "--answer", " Warsaw", "--layer", "0",
              "--subtract", "mlp_out", "--top-k", "3", "--json")
    ds = model.decompose(CAPITALS, layer=0, subtract="mlp_out", answer=" Warsaw", top_k=3)
    assert list(ds.layer.values) == ["as_is", "without_mlp_out"]
    for i, key in enumerate(("as_is", "subtracted")):
        close(ds.prob.values[i], ref[key]["answer_prob"], rel=1e-6)
        assert int(ds["rank"].values[i]) == ref[key]["answer_rank"]
        assert ds.topk_id.values[i].tolist() == [t["id"] for t in ref[key]["top"]]
    att = cli("decompose", "--model", EMBEDDED, "--prompt", CAPITALS, "--answer", " Warsaw", "--wrong", " Paris",
              "--attribution", "--json")["attribution"]
    a = model.attribution(CAPITALS, " Warsaw", " Paris")
    assert list(a.component.values) == [p["component"] for p in att["parts"]]
    close(a.values, [p["value"] for p in att["parts"]], rel=1e-6)
    close(a.attrs["scale"], att["scale"], rel=1e-6)


def test_llama_grids_equal_cli(ps, tmp_path):
    """A GQA Llama model (2 key/value heads for 6 query heads) from token ids:
    the library's grids, fast and naive, equal the CLI's bit for bit,
    k_all_pos per key/value head as TransformerLens lays it out."""
    import oracle_families
    d = str(tmp_path / "llama")
    oracle_families.write_model(d, "llama", kv=2, seed=5)
    m = ps.load(d)
    rng = np.random.default_rng(1)
    clean = rng.integers(0, m.cfg.d_vocab, 9)
    corrupted = clean.copy()
    corrupted[4] = (clean[4] + 1) % m.cfg.d_vocab
    answer, wrong = 3, 7
    ids = lambda a: ",".join(str(int(x)) for x in a)  # noqa: E731
    for engine in ("fast", "naive"):
        ref = cli("patch", "--model", d, "--clean-ids", ids(clean), "--corrupted-ids", ids(corrupted),
                  "--answer-id", str(answer), "--wrong-id", str(wrong), "--components",
                  "resid_pre,attn_out,z_all_pos,k_all_pos,k,v,pattern_dest_src", "--engine", engine, "--json")
        for comp, r in ref["components"].items():
            g = ps.patching.get_act_patch(m, comp, corrupted, clean, answer=answer, wrong=wrong, engine=engine)
            assert list(g.dims) == r["dims"] and list(g.shape) == r["shape"], comp
            assert np.array_equal(g.values.ravel(), np.array(r["values"])), (engine, comp)
        assert ref["components"]["k_all_pos"]["shape"][1] == 2 and ref["components"]["k"]["shape"][2] == 2
    # the custom-metric engine's slices (per key/value head for k, v; one
    # pattern entry) equal the built-in naive engine's
    for comp in ("k", "v", "pattern", "pattern_dest_src"):
        g = ps.patching.get_act_patch(m, comp, corrupted, clean, metric=lambda lg: lg[0, -1, answer] - lg[0, -1, wrong])
        ref = ps.patching.get_act_patch(m, comp, corrupted, clean, answer=answer, wrong=wrong, engine="naive")
        assert g.dims == ref.dims, comp
        close(g.values, ref.values, rel=1e-5)
