"""Activation patching grids, TransformerLens' patching module by name:

    get_act_patch_resid_pre(model, corrupted_tokens, clean_cache_or_tokens, metric="logit_diff",
                            answer=" John", wrong=" Mary")

Every function returns an xarray.DataArray of the patched metric per cell
(raw, as TransformerLens returns it; normalize=True gives (patched -
corrupted) / (clean - corrupted)), dims ("layer", "position"), ("layer",
"position", "head"), ("layer", "position", "src_position", "head") or
("layer", "head") ("kv_head" for k and v of grouped-query models),
coordinates layer, position, head and per position the clean and corrupted
tokens and the worksheet's labels "token_i" (clean tokens); attrs
component, metric, direction, engine, method, clean_metric,
corrupted_metric.  TransformerLens returns pattern_by_pos and
pattern_dest_src_pos head first, (layer, head, dest_pos[, src_pos]); here
the head is the last axis, as in its get_act_patch_attn_head_by_pos_every:
grid.transpose("layer", "head", ...) gives its order.

metric: "logit_diff" (logit[answer] - logit[wrong] at the last position),
"prob", "logprob" or "kl": the library's metrics, with the fast engine by
default.  A Python callable metric(logits [1, T, d_vocab]) -> float runs
with the naive engine (one forward per cell; the logits it gets are its
own copy).  direction "denoise" (run corrupted, patch in clean; the
default) or "noise".

method "exact" (default: every cell patched and run) or "atp": attribution
patching, every cell estimated as metric(base) + (a_source - a_base) .
dmetric/da from one forward and one backward pass of the base run (built-in
metrics only; same units and shapes; the engine is not used), or "atp*":
the same with AtP*'s QK fix (q, k, q_all_pos and k_all_pos through the exact
softmax; every other grid as "atp"); "atp+graddrop", "atp*+graddrop": with
GradDrop (`patch --method atp --graddrop`: L more backward passes, against
cancelling paths).  Known failure modes: saturated attention (what atp*
fixes), cancelling paths (what GradDrop addresses), kl with noising.
"""
import ctypes

import numpy as np

from . import _lib, _check, ActivationCache

COMPONENTS = ("resid_pre", "resid_mid", "attn_out", "mlp_out", "z", "z_all_pos", "q_all_pos", "k_all_pos",
              "v_all_pos", "pattern_all_pos", "q", "k", "v", "pattern", "pattern_dest_src")


class _Pair:
    def __init__(self, model, clean, corrupted, answer, wrong):
        self.model, self.ptr = model, _lib.P()
        if len(clean) != len(corrupted):
            raise ValueError(f"the clean prompt has {len(clean)} tokens, the corrupted one {len(corrupted)}: "
                             "patching needs equal lengths")
        P32 = ctypes.POINTER(ctypes.c_int32)
        _check(_lib.pair_init(model._ptr, clean.ctypes.data_as(P32), corrupted.ctypes.data_as(P32), len(clean),
                              answer, wrong, ctypes.byref(self.ptr)))

    def __del__(self):
        if self.ptr:
            _lib.pair_free(self.ptr)
            self.ptr = _lib.P()


def _pair(model, corrupted_tokens, clean_cache_or_tokens, answer, wrong):
    clean = model._tokens(clean_cache_or_tokens)
    corrupted = model._tokens(corrupted_tokens)
    a = model._token_id(answer)
    w = model._token_id(wrong)
    # the library needs token ids for answer and wrong even when the
    # metric does not read them (prob, custom): any valid id stands in
    return _Pair(model, clean, corrupted, a if a >= 0 else 0, w if w >= 0 else 0), clean, corrupted


def get_act_patch(model, component, corrupted_tokens, clean_cache_or_tokens, metric="logit_diff", answer=None,
                  wrong=None, direction="denoise", engine=None, normalize=False, method="exact", _pair_cache=None):
    """The grid of any component (see COMPONENTS)."""
    import xarray as xr
    if _pair_cache is not None:
        pair, clean, corrupted = _pair_cache
    else:
        pair, clean, corrupted = _pair(model, corrupted_tokens, clean_cache_or_tokens, answer, wrong)
    ndim = ctypes.c_size_t()
    shape = (ctypes.c_size_t * 4)()
    dims = (ctypes.c_char_p * 4)()
    _check(_lib.pair_grid_shape(pair.ptr, component.encode(), ctypes.byref(ndim), shape, dims))
    shp = tuple(shape[i] for i in range(ndim.value))
    dn = tuple(dims[i].decode() for i in range(ndim.value))
    values = np.empty(shp, np.float64)
    opts = _lib.PatchOpts(struct_size=ctypes.sizeof(_lib.PatchOpts), direction=direction.encode(),
                          method=(method or "exact").encode())
    errors, keep = [], None
    if callable(metric):
        engine = engine or "naive"

        def call(user, logits, T, V, out):
            try:
                arr = np.ctypeslib.as_array(logits, (T, V)).copy()[None]
                out[0] = float(metric(arr))
                return 0
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return 1
        keep = _lib.METRIC_FN(call)
        opts.metric_fn = keep
        metric_name = getattr(metric, "__name__", "custom")
    else:
        opts.metric = metric.encode()
        metric_name = metric
    engine = engine or "fast"
    opts.engine = engine.encode()
    cm, xm = ctypes.c_double(), ctypes.c_double()
    st = _lib.pair_patch(pair.ptr, component.encode(), ctypes.byref(opts),
                         values.ctypes.data_as(ctypes.POINTER(ctypes.c_double)), values.size, ctypes.byref(cm),
                         ctypes.byref(xm))
    if errors:
        raise errors[0]
    _check(st)
    if normalize:
        values = (values - xm.value) / (cm.value - xm.value)
    coords = {"layer": np.arange(model.cfg.n_layers)}
    if "position" in dn:
        # a model without a tokenizer (token ids only) is labelled by id
        strs = model.to_str_tokens if model.has_tokenizer else (lambda t: [str(int(i)) for i in t])
        ct, rt = strs(clean), strs(corrupted)
        coords["position"] = np.arange(len(clean))
        coords["clean_token"] = ("position", ct)
        coords["corrupted_token"] = ("position", rt)
        coords["label"] = ("position", [f"{s}_{i}" for i, s in enumerate(ct)])
    if "src_position" in dn:
        coords["src_position"] = np.arange(len(clean))
    for h in ("head", "kv_head"):
        if h in dn:
            coords[h] = np.arange(shp[dn.index(h)])
    return xr.DataArray(values, dims=dn, coords=coords, name=component + ("_normalized" if normalize else ""),
                        attrs={"component": component, "metric": metric_name, "direction": direction,
                               "engine": engine, "method": method or "exact", "clean_metric": cm.value,
                               "corrupted_metric": xm.value,
                               "normalized": int(bool(normalize))})


def normalize(grid):
    """(patched - corrupted) / (clean - corrupted) of a raw grid."""
    if grid.attrs.get("normalized"):
        return grid
    out = (grid - grid.attrs["corrupted_metric"]) / (grid.attrs["clean_metric"] - grid.attrs["corrupted_metric"])
    out.attrs = dict(grid.attrs, normalized=1)
    out.name = f"{grid.name}_normalized"
    return out


def _one(component):
    def f(model, corrupted_tokens, clean_cache_or_tokens, metric="logit_diff", answer=None, wrong=None,
          direction="denoise", engine=None, normalize=False, method="exact"):
        return get_act_patch(model, component, corrupted_tokens, clean_cache_or_tokens, metric, answer, wrong,
                             direction, engine, normalize, method)
    f.__name__ = f"get_act_patch_{component}"
    f.__doc__ = f"The {component} grid (see the module's documentation)."
    return f


def _every(components, name):
    def f(model, corrupted_tokens, clean_cache_or_tokens, metric="logit_diff", answer=None, wrong=None,
          direction="denoise", engine=None, normalize=False, method="exact"):
        import xarray as xr
        pc = _pair(model, corrupted_tokens, clean_cache_or_tokens, answer, wrong)
        grids = [get_act_patch(model, c, None, None, metric, answer, wrong, direction, engine, normalize, method,
                               _pair_cache=pc) for c in components]
        out = xr.concat(grids, dim="component", coords="minimal", compat="override", combine_attrs="drop_conflicts")
        out = out.assign_coords(component=list(components))
        out.name = name
        return out
    f.__name__ = f"get_act_patch_{name}"
    f.__doc__ = f"The grids of {', '.join(components)} stacked over a 'component' dimension."
    return f


get_act_patch_resid_pre = _one("resid_pre")
get_act_patch_resid_mid = _one("resid_mid")
get_act_patch_attn_out = _one("attn_out")
get_act_patch_mlp_out = _one("mlp_out")
get_act_patch_attn_head_out_by_pos = _one("z")
get_act_patch_attn_head_out_all_pos = _one("z_all_pos")
get_act_patch_attn_head_q_all_pos = _one("q_all_pos")
get_act_patch_attn_head_k_all_pos = _one("k_all_pos")
get_act_patch_attn_head_v_all_pos = _one("v_all_pos")
get_act_patch_attn_head_pattern_all_pos = _one("pattern_all_pos")
get_act_patch_attn_head_q_by_pos = _one("q")
get_act_patch_attn_head_k_by_pos = _one("k")
get_act_patch_attn_head_v_by_pos = _one("v")
get_act_patch_attn_head_pattern_by_pos = _one("pattern")
get_act_patch_attn_head_pattern_dest_src_pos = _one("pattern_dest_src")
get_act_patch_block_every = _every(("resid_pre", "attn_out", "mlp_out"), "block_every")
get_act_patch_attn_head_all_pos_every = _every(("z_all_pos", "q_all_pos", "k_all_pos", "v_all_pos",
                                                "pattern_all_pos"), "attn_head_all_pos_every")
get_act_patch_attn_head_by_pos_every = _every(("z", "q", "k", "v", "pattern"), "attn_head_by_pos_every")

__all__ = ["COMPONENTS", "get_act_patch", "normalize", "ActivationCache"] + [
    n for n in dir() if n.startswith("get_act_patch_")]
