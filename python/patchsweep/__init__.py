"""patchsweep from Python: TransformerLens-shaped calls over libpatchsweep.so.

    import patchsweep
    model = patchsweep.load("jobs/ioi-tiny/model")
    tokens = model.to_tokens("After John and Mary went to the store, Mary gave a bottle of milk to")
    logits, cache = model.run_with_cache(tokens, names_filter="blocks.*.hook_resid_post")
    logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", lambda act, hook: act * 0)])
    value, grads = model.run_with_grads(tokens, metric="logit_diff", answer=" John", wrong=" Mary")
    grid = patchsweep.patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_tokens,
                                                       metric="logit_diff", answer=" John", wrong=" Mary")
    ds = patchsweep.open("results/ioi-tiny.nc")     # xarray.Dataset, helpers under ds.ps

Arrays: numpy float32 with TransformerLens' shapes and a batch axis of 1
([1, T, d_model], [1, T, H, d_head], [1, H, T, T], [1, T, d_vocab]).
The logits and cache arrays are views of the C run's memory (no copies);
the run is freed when the last of them goes.  Errors from the library
arrive as patchsweep.PatchsweepError with its message.
"""
import ctypes
import fnmatch
import types

import numpy as np

from . import _lib

__all__ = ["load", "open", "Model", "ActivationCache", "HookPoint", "PatchsweepError", "version",
           "get_act_name", "set_threads"]


class PatchsweepError(RuntimeError):
    """An error reported by libpatchsweep: .status (its name) and the message."""

    def __init__(self, status, message):
        self.status = status
        super().__init__(message)


def _check(st):
    if st != 0:
        msg = _lib.last_error().decode("utf-8", "replace")
        raise PatchsweepError(_lib.status_name(st).decode(), msg)


def version():
    """The library's version and git revision."""
    return _lib.version().decode()


def set_threads(n):
    """Worker threads of the matrix kernels (results do not depend on it)."""
    _lib.set_threads(int(n))


def load(path, tokenizer=None):
    """Load a model directory (HF layout; GPT-2, GPT-NeoX, Llama, Mistral, Qwen2)."""
    return Model(path, tokenizer)


def open(path, **kwargs):  # noqa: A001 (the netCDF/xarray verb)
    """A results file (patch -o, sweep, lens, cache) as an xarray.Dataset with
    the helpers of patchsweep.results under ds.ps."""
    from . import results
    return results.open(path, **kwargs)


_SHORT = {
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "q": "attn.hook_q", "k": "attn.hook_k",
    "v": "attn.hook_v", "z": "attn.hook_z", "pattern": "attn.hook_pattern", "rot_q": "attn.hook_rot_q",
    "rot_k": "attn.hook_rot_k", "pre": "mlp.hook_pre", "post": "mlp.hook_post",
    "pre_linear": "mlp.hook_pre_linear", "scale": None, "normalized": None,
}


def get_act_name(name, layer=None):
    """TransformerLens' utils.get_act_name: ("resid_pre", 3) -> "blocks.3.hook_resid_pre"."""
    if name in ("embed", "pos_embed"):
        return "hook_" + name
    if name in ("logits", "ln_final.hook_normalized"):
        return name
    if name not in _SHORT or _SHORT[name] is None or layer is None:
        return name
    return f"blocks.{int(layer)}.{_SHORT[name]}"


class HookPoint:
    """What a hook function gets as its second argument (TransformerLens' HookPoint)."""

    def __init__(self, name):
        self.name = name

    def layer(self):
        parts = self.name.split(".")
        return int(parts[1]) if parts[0] == "blocks" else None

    def __repr__(self):
        return f"HookPoint({self.name!r})"


class _View:
    """Exposes len floats at addr as an array that keeps `owner` alive."""

    def __init__(self, owner, addr, shape):
        self._owner = owner
        self.__array_interface__ = {"data": (addr, False), "shape": tuple(shape), "typestr": "<f4",
                                    "version": 3}


class _Run:
    """Owns one C run; freed when no array of it is left."""

    def __init__(self, model):
        self.model = model
        self.ptr = _lib.P()

    def __del__(self):
        if self.ptr:
            _lib.run_free(self.ptr)
            self.ptr = _lib.P()

    def array(self, a):
        shape = [a.shape[i] for i in range(a.ndim)]
        addr = ctypes.cast(a.data, ctypes.c_void_p).value
        return np.asarray(_View(self, addr, shape))[None]


class ActivationCache:
    """The hook points a run kept: cache[name] or cache["resid_pre", layer]
    (TransformerLens' ActivationCache), each [1, ...] float32, a view of the
    run's memory."""

    def __init__(self, arrays, dims, model, tokens):
        self._a, self._dims, self.model, self.tokens = arrays, dims, model, tokens

    def _key(self, key):
        if isinstance(key, tuple):
            return get_act_name(*key)
        return key

    def __getitem__(self, key):
        k = self._key(key)
        if k not in self._a:
            raise KeyError(f"{k!r} is not in the cache (cached: {', '.join(self._a) or 'nothing'})")
        return self._a[k]

    def __contains__(self, key):
        return self._key(key) in self._a

    def __iter__(self):
        return iter(self._a)

    def __len__(self):
        return len(self._a)

    def keys(self):
        return self._a.keys()

    def items(self):
        return self._a.items()

    def values(self):
        return self._a.values()

    def dims(self, key):
        """The array's dimension names (with "batch" first)."""
        return ("batch",) + self._dims[self._key(key)]

    def to_xarray(self, key):
        import xarray as xr
        k = self._key(key)
        return xr.DataArray(self._a[k][0], dims=self._dims[k], name=k)


def _as_str(x):
    return x.encode() if isinstance(x, str) else x


class Model:
    """A loaded model.  cfg: n_layers, n_heads, n_key_value_heads, d_model,
    d_head, d_mlp, d_vocab, n_ctx, family, dtype, n_params."""

    def __init__(self, path, tokenizer=None):
        self._ptr = _lib.P()
        _check(_lib.model_load(ctypes.byref(self._ptr), _as_str(str(path)),
                               _as_str(str(tokenizer)) if tokenizer else None))
        info = _lib.ModelInfo(struct_size=ctypes.sizeof(_lib.ModelInfo))
        _check(_lib.model_get_info(self._ptr, ctypes.byref(info)))
        self.cfg = types.SimpleNamespace(
            n_layers=info.n_layers, n_heads=info.n_heads, n_key_value_heads=info.n_key_value_heads,
            d_model=info.d_model, d_head=info.d_head, d_mlp=info.d_mlp, d_vocab=info.d_vocab, n_ctx=info.n_ctx,
            family=info.family.decode(), dtype=info.dtype.decode(), n_params=info.n_params)
        self.bos_token_id = info.bos_token_id if info.bos_token_id >= 0 else None
        self.default_prepend_bos = bool(info.default_prepend_bos)
        self.has_tokenizer = bool(info.has_tokenizer)
        self.path = str(path)
        buf = ctypes.create_string_buffer(64)
        self.hook_names = []
        for i in range(_lib.model_hook_count(self._ptr)):
            _check(_lib.model_hook_name(self._ptr, i, buf, 64))
            self.hook_names.append(buf.value.decode())

    def __del__(self):
        if getattr(self, "_ptr", None):
            _lib.model_free(self._ptr)
            self._ptr = _lib.P()

    def __repr__(self):
        c = self.cfg
        return (f"patchsweep.Model({self.path!r}: {c.family}, {c.n_layers} layers, {c.n_heads} heads, "
                f"d_model {c.d_model}, vocab {c.d_vocab})")

    # ---- tokens -------------------------------------------------------------

    def to_tokens(self, text, prepend_bos=None):
        """Token ids [1, T] (int32); BOS first by the tokenizer's default (GPT-2: yes)."""
        b = text.encode("utf-8")
        ids, n = ctypes.POINTER(ctypes.c_int32)(), ctypes.c_size_t()
        bos = -1 if prepend_bos is None else int(bool(prepend_bos))
        _check(_lib.tokenize(self._ptr, b, len(b), bos, ctypes.byref(ids), ctypes.byref(n)))
        try:
            out = np.ctypeslib.as_array(ids, (n.value,)).copy() if n.value else np.zeros(0, np.int32)
        finally:
            _lib.free(ids)
        return out[None]

    def _tokens(self, tokens):
        """Any accepted token input -> contiguous int32 [T]."""
        if isinstance(tokens, str):
            return self.to_tokens(tokens)[0]
        if isinstance(tokens, ActivationCache):
            return tokens.tokens
        t = np.asarray(tokens)
        if t.ndim == 2:
            if t.shape[0] != 1:
                raise ValueError(f"tokens of shape {t.shape}: one prompt at a time (batch 1)")
            t = t[0]
        if t.ndim != 1:
            raise ValueError(f"tokens of shape {t.shape}: expected [T] or [1, T]")
        return np.ascontiguousarray(t, dtype=np.int32)

    def to_string(self, tokens):
        """Decode token ids to text."""
        t = self._tokens(tokens)
        text, n = ctypes.c_void_p(), ctypes.c_size_t()
        _check(_lib.detokenize(self._ptr, t.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), len(t),
                               ctypes.byref(text), ctypes.byref(n)))
        try:
            return ctypes.string_at(text, n.value).decode("utf-8", "replace")
        finally:
            _lib.free(text)

    def token_bytes(self, token_id):
        b, n = ctypes.c_void_p(), ctypes.c_size_t()
        _check(_lib.token_bytes(self._ptr, int(token_id), ctypes.byref(b), ctypes.byref(n)))
        return ctypes.string_at(b, n.value)

    def to_str_tokens(self, tokens, prepend_bos=None):
        """Each token as text (a text is tokenized first)."""
        if isinstance(tokens, str):
            tokens = self.to_tokens(tokens, prepend_bos)
        return [self.token_bytes(i).decode("utf-8", "replace") for i in self._tokens(tokens)]

    def to_single_token(self, text):
        i = ctypes.c_int32()
        _check(_lib.single_token(self._ptr, _as_str(text), ctypes.byref(i)))
        return i.value

    def _token_id(self, t):
        if t is None:
            return -1
        if isinstance(t, str):
            return self.to_single_token(t)
        return int(t)

    # ---- runs ---------------------------------------------------------------

    def _select(self, names):
        """A names filter (None, a name/glob, a list of them, or a callable) -> glob list."""
        if names is None:
            return None
        if callable(names):
            chosen = [n for n in self.hook_names if names(n)]
            return ",".join(chosen) if chosen else None
        if isinstance(names, str):
            names = [names]
        return ",".join(names)

    def _run(self, tokens, cache=None, fwd_hooks=(), last_only=False):
        t = self._tokens(tokens)
        run = _Run(self)
        opts = _lib.RunOpts(struct_size=ctypes.sizeof(_lib.RunOpts), logits=2 if last_only else 1)
        if cache:
            opts.cache = cache.encode()
        errors, keep = [], None
        if fwd_hooks:
            table = {}
            for sel, fn in fwd_hooks:
                if callable(sel):
                    names = [n for n in self.hook_names if sel(n)]
                else:
                    names = [n for n in self.hook_names if fnmatch.fnmatchcase(n, sel)]
                    if not names:
                        raise ValueError(f"hook {sel!r}: the model has no such hook point")
                for n in names:
                    table.setdefault(n, []).append(fn)

            def call(user, name, act, ndim, shape):
                try:
                    nm = name.decode()
                    arr = np.asarray(_View(run, ctypes.cast(act, ctypes.c_void_p).value,
                                           [shape[i] for i in range(ndim)]))[None]
                    hp = HookPoint(nm)
                    for fn in table.get(nm, ()):
                        r = fn(arr, hp)
                        if r is not None and r is not arr:
                            r = np.asarray(r, dtype=np.float32)
                            if r.shape != arr.shape and r.shape == arr.shape[1:]:
                                r = r[None]
                            if r.shape != arr.shape:
                                raise ValueError(f"hook {nm}: returned shape {r.shape}, the activation is {arr.shape}")
                            arr[...] = r
                    return 0
                except BaseException as e:  # noqa: BLE001 (carried over the C frames)
                    errors.append(e)
                    return 1

            keep = _lib.HOOK_FN(call)
            opts.hooks = ",".join(table).encode()
            opts.hook_fn = keep
        st = _lib.model_run(self._ptr, t.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), len(t),
                            ctypes.byref(opts), ctypes.byref(run.ptr))
        if errors:
            raise errors[0]
        _check(st)
        return run, t

    def _logits(self, run):
        a = _lib.Array()
        _check(_lib.run_logits(run.ptr, ctypes.byref(a)))
        return run.array(a)

    def __call__(self, tokens, return_type="logits"):
        """The logits [1, T, d_vocab] (TransformerLens' model(tokens))."""
        run, _ = self._run(tokens)
        return self._logits(run)

    forward = __call__

    def run_with_cache(self, tokens, names_filter=None, names=None):
        """(logits [1, T, V], ActivationCache) of the hook points selected by
        names_filter (a name or glob, a list of them, or a callable on names;
        None: every hook point)."""
        sel = names_filter if names_filter is not None else names
        globs = self._select(sel) if sel is not None else "*"
        run, t = self._run(tokens, cache=globs)
        arrays, dims = {}, {}
        a = _lib.Array()
        for i in range(_lib.run_n_cached(run.ptr)):
            _check(_lib.run_cached(run.ptr, i, ctypes.byref(a)))
            name = a.name.decode()
            arrays[name] = run.array(a)
            dims[name] = tuple(a.dims[k].decode() for k in range(a.ndim))
        return self._logits(run), ActivationCache(arrays, dims, self, t)

    def run_with_hooks(self, tokens, fwd_hooks=(), return_type="logits"):
        """The logits after running with fwd_hooks = [(name or glob or
        callable, fn)], fn(act, hook) called with the activation [1, ...]
        (a view: change it in place, or return a new array to replace it)."""
        run, _ = self._run(tokens, fwd_hooks=list(fwd_hooks))
        return self._logits(run)

    def run_with_grads(self, tokens, metric="logit_diff", answer=None, wrong=None, names_filter=None,
                       clean_tokens=None, return_cache=False):
        """(metric value, GradientCache): the gradient of a built-in metric of
        the next-token prediction at the last position ("logit_diff":
        logit[answer] - logit[wrong], "prob", "logprob", "kl" against the run
        of clean_tokens) with respect to the hook points of names_filter (as
        run_with_cache's; None: every hook point), one forward and one
        backward pass.  Gradients have the activations' shapes [1, ...] and
        are views of the run's memory (an ActivationCache: grads["resid_pre",
        3]).  Each is the total derivative through the rest of the pass (as
        TransformerLens' hook_fn backward hooks see it).  return_cache=True
        adds the run's logits and ActivationCache of the same hooks:
        (value, grads, logits, cache)."""
        t = self._tokens(tokens)
        sel = self._select(names_filter) if names_filter is not None else None
        a, w = self._token_id(answer), self._token_id(wrong)
        if a < 0:
            raise ValueError("run_with_grads: answer (a token or token id) is required")
        opts = _lib.GradOpts(struct_size=ctypes.sizeof(_lib.GradOpts), metric=metric.encode(), answer=a, wrong=w)
        if sel:
            opts.grads = sel.encode()
        if clean_tokens is not None:
            clean = self._tokens(clean_tokens)
            opts.clean = clean.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
            opts.n_clean = len(clean)
        run = _Run(self)
        value = ctypes.c_double()
        _check(_lib.model_run_grad(self._ptr, t.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), len(t),
                                   ctypes.byref(opts), ctypes.byref(run.ptr), ctypes.byref(value)))
        grads, acts, dims = {}, {}, {}
        arr = _lib.Array()
        for i in range(_lib.run_n_grads(run.ptr)):
            _check(_lib.run_grad(run.ptr, i, ctypes.byref(arr)))
            name = arr.name.decode()
            grads[name] = run.array(arr)
            dims[name] = tuple(arr.dims[k].decode() for k in range(arr.ndim))
            if return_cache:
                _check(_lib.run_cached(run.ptr, i, ctypes.byref(arr)))
                acts[name] = run.array(arr)
        g = ActivationCache(grads, dims, self, t)
        if return_cache:
            return value.value, g, self._logits(run), ActivationCache(acts, dict(dims), self, t)
        return value.value, g

    # ---- lens and decomposition --------------------------------------------

    def _lens_out(self, rows, k, answer):
        V = self.cfg.d_vocab
        o = {"logits": np.empty((rows, V), np.float32), "prob": np.full(rows, np.nan),
             "logprob": np.full(rows, np.nan), "rank": np.full(rows, -1, np.int64),
             "top_id": np.empty((rows, k), np.int32), "top_prob": np.empty((rows, k))}
        s = _lib.LensOut(struct_size=ctypes.sizeof(_lib.LensOut), k=k)
        for f, ct in (("logits", ctypes.c_float), ("prob", ctypes.c_double), ("logprob", ctypes.c_double),
                      ("rank", ctypes.c_int64), ("top_id", ctypes.c_int32), ("top_prob", ctypes.c_double)):
            if f in ("prob", "logprob", "rank") and answer < 0:
                continue
            setattr(s, f, o[f].ctypes.data_as(ctypes.POINTER(ct)))
        return o, s

    def _lens_dataset(self, o, labels, answer, k, position, t):
        import xarray as xr
        tops = [[self.token_bytes(i).decode("utf-8", "replace") for i in row] for row in o["top_id"]]
        ds = xr.Dataset(
            {"logits": (("layer", "vocab"), o["logits"]),
             "topk_id": (("layer", "topk"), o["top_id"]), "topk_prob": (("layer", "topk"), o["top_prob"]),
             "topk_token": (("layer", "topk"), np.array(tops, dtype=object))},
            coords={"layer": labels},
            attrs={"position": position, "token": self.token_bytes(t[position]).decode("utf-8", "replace")})
        if answer >= 0:
            ds["prob"] = ("layer", o["prob"])
            ds["logprob"] = ("layer", o["logprob"])
            ds["rank"] = ("layer", o["rank"])
            ds["reciprocal_rank"] = ("layer", 1.0 / (o["rank"] + 1))
            ds.attrs["answer_id"] = answer
        return ds

    def lens(self, tokens, answer=None, position=-1, top_k=10, _run=None):
        """The logit lens (patchsweep lens) as an xarray.Dataset over layer
        ("embed", "0", ...): logits, top-k ids/probabilities/tokens, and with
        an answer its prob, logprob, rank and reciprocal rank."""
        run, t = _run if _run else self._run(tokens, last_only=True)
        pos = position % len(t)
        a = self._token_id(answer)
        rows = self.cfg.n_layers + 1
        o, s = self._lens_out(rows, top_k, a)
        _check(_lib.run_lens(run.ptr, pos, a, ctypes.byref(s)))
        return self._lens_dataset(o, ["embed"] + [str(i) for i in range(self.cfg.n_layers)], a, top_k, pos, t)

    def decompose(self, tokens, layer, subtract="mlp_out", answer=None, position=-1, top_k=10):
        """Block `layer`'s output decoded as is and without `subtract`'s update
        (patchsweep decompose), over layer = ["as_is", "without_" + subtract]."""
        run, t = self._run(tokens, last_only=True)
        pos = position % len(t)
        a = self._token_id(answer)
        o, s = self._lens_out(2, top_k, a)
        _check(_lib.run_decompose(run.ptr, int(layer), subtract.encode(), pos, a, ctypes.byref(s)))
        return self._lens_dataset(o, ["as_is", "without_" + subtract], a, top_k, pos, t)

    def attribution(self, tokens, answer, wrong=None, position=-1):
        """Direct logit attribution (patchsweep decompose --attribution) as an
        xarray.DataArray over component, with attrs scale and total."""
        import xarray as xr
        run, t = self._run(tokens, last_only=True)
        pos = position % len(t)
        n = 3 + 2 * self.cfg.n_layers
        v = np.empty(n)
        scale, total = ctypes.c_double(), ctypes.c_double()
        _check(_lib.run_attribution(run.ptr, pos, self._token_id(answer), self._token_id(wrong),
                                    v.ctypes.data_as(ctypes.POINTER(ctypes.c_double)), n, ctypes.byref(scale),
                                    ctypes.byref(total)))
        buf = ctypes.create_string_buffer(64)
        labels = []
        for i in range(n):
            _check(_lib.attribution_label(self._ptr, i, buf, 64))
            labels.append(buf.value.decode())
        return xr.DataArray(v, dims=("component",), coords={"component": labels}, name="attribution",
                            attrs={"scale": scale.value, "total": total.value, "position": pos})


from . import patching  # noqa: E402,F401  (patchsweep.patching.get_act_patch_*)
