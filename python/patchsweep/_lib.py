"""ctypes declarations of libpatchsweep.so's C API (include/patchsweep/patchsweep.h).

The library is found, in order: $PATCHSWEEP_LIB (a file), beside an
installed package (PREFIX/lib, this file being in
PREFIX/lib/pythonX.Y/dist-packages/patchsweep), the build tree
(build/rel, this file being in python/patchsweep), then the system's
loader (libpatchsweep.so.0 on the library path).
"""
import ctypes
import os
from ctypes import (CFUNCTYPE, POINTER, Structure, c_char_p, c_double, c_float, c_int, c_int32, c_int64,
                    c_size_t, c_void_p)

SONAME = "libpatchsweep.so.0"
API_VERSION = 1


def _candidates():
    env = os.environ.get("PATCHSWEEP_LIB")
    if env:
        yield env
        return
    here = os.path.dirname(os.path.abspath(__file__))
    yield os.path.join(here, "..", "..", "..", SONAME)          # PREFIX/lib/pythonX.Y/dist-packages/patchsweep
    yield os.path.join(here, "..", "..", "build", "rel", SONAME)  # the build tree
    yield SONAME


def _load():
    tried = []
    for path in _candidates():
        if os.sep in path and not os.path.exists(path):
            tried.append(path)
            continue
        try:
            return ctypes.CDLL(path)
        except OSError as e:
            tried.append(f"{path} ({e})")
    raise ImportError("patchsweep: cannot load the shared library; tried " + ", ".join(tried) +
                      " (run `make`, or set PATCHSWEEP_LIB)")


lib = _load()


class Array(Structure):
    _fields_ = [("name", c_char_p), ("data", POINTER(c_float)), ("ndim", c_size_t),
                ("shape", c_size_t * 4), ("dims", c_char_p * 4)]


class ModelInfo(Structure):
    _fields_ = [("struct_size", c_size_t), ("n_layers", c_size_t), ("n_heads", c_size_t),
                ("n_key_value_heads", c_size_t), ("d_model", c_size_t), ("d_head", c_size_t),
                ("d_mlp", c_size_t), ("d_vocab", c_size_t), ("n_ctx", c_size_t), ("family", c_char_p),
                ("bos_token_id", c_int32), ("default_prepend_bos", c_int), ("dtype", c_char_p),
                ("n_params", c_size_t), ("has_tokenizer", c_int)]


HOOK_FN = CFUNCTYPE(c_int, c_void_p, c_char_p, POINTER(c_float), c_size_t, POINTER(c_size_t))
METRIC_FN = CFUNCTYPE(c_int, c_void_p, POINTER(c_float), c_size_t, c_size_t, POINTER(c_double))


class RunOpts(Structure):
    _fields_ = [("struct_size", c_size_t), ("cache", c_char_p), ("hooks", c_char_p), ("hook_fn", HOOK_FN),
                ("hook_user", c_void_p), ("logits", c_int)]


class LensOut(Structure):
    _fields_ = [("struct_size", c_size_t), ("k", c_size_t), ("logits", POINTER(c_float)),
                ("prob", POINTER(c_double)), ("logprob", POINTER(c_double)), ("rank", POINTER(c_int64)),
                ("top_id", POINTER(c_int32)), ("top_prob", POINTER(c_double))]


class PatchOpts(Structure):
    _fields_ = [("struct_size", c_size_t), ("metric", c_char_p), ("direction", c_char_p), ("engine", c_char_p),
                ("metric_fn", METRIC_FN), ("metric_user", c_void_p), ("method", c_char_p)]


class GradOpts(Structure):
    _fields_ = [("struct_size", c_size_t), ("grads", c_char_p), ("metric", c_char_p), ("answer", c_int32),
                ("wrong", c_int32), ("clean", POINTER(c_int32)), ("n_clean", c_size_t)]


def _fn(name, restype, *argtypes):
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


P = c_void_p
version = _fn("patchsweep_version", c_char_p)
api_version = _fn("patchsweep_api_version", c_int)
last_error = _fn("patchsweep_last_error", c_char_p)
status_name = _fn("patchsweep_status_name", c_char_p, c_int)
free = _fn("patchsweep_free", None, c_void_p)
set_threads = _fn("patchsweep_set_threads", None, c_size_t)
model_load = _fn("patchsweep_model_load", c_int, POINTER(P), c_char_p, c_char_p)
model_free = _fn("patchsweep_model_free", None, P)
model_get_info = _fn("patchsweep_model_get_info", c_int, P, POINTER(ModelInfo))
model_hook_count = _fn("patchsweep_model_hook_count", c_size_t, P)
model_hook_name = _fn("patchsweep_model_hook_name", c_int, P, c_size_t, c_char_p, c_size_t)
tokenize = _fn("patchsweep_tokenize", c_int, P, c_char_p, c_size_t, c_int, POINTER(POINTER(c_int32)),
               POINTER(c_size_t))
detokenize = _fn("patchsweep_detokenize", c_int, P, POINTER(c_int32), c_size_t, POINTER(c_void_p),
                 POINTER(c_size_t))
token_bytes = _fn("patchsweep_token_bytes", c_int, P, c_int32, POINTER(c_void_p), POINTER(c_size_t))
single_token = _fn("patchsweep_single_token", c_int, P, c_char_p, POINTER(c_int32))
model_run = _fn("patchsweep_model_run", c_int, P, POINTER(c_int32), c_size_t, POINTER(RunOpts), POINTER(P))
run_free = _fn("patchsweep_run_free", None, P)
run_n_tokens = _fn("patchsweep_run_n_tokens", c_size_t, P)
run_logits = _fn("patchsweep_run_logits", c_int, P, POINTER(Array))
run_n_cached = _fn("patchsweep_run_n_cached", c_size_t, P)
run_cached = _fn("patchsweep_run_cached", c_int, P, c_size_t, POINTER(Array))
model_run_grad = _fn("patchsweep_model_run_grad", c_int, P, POINTER(c_int32), c_size_t, POINTER(GradOpts),
                     POINTER(P), POINTER(c_double))
run_n_grads = _fn("patchsweep_run_n_grads", c_size_t, P)
run_grad = _fn("patchsweep_run_grad", c_int, P, c_size_t, POINTER(Array))
run_lens = _fn("patchsweep_run_lens", c_int, P, c_size_t, c_int32, POINTER(LensOut))
run_decompose = _fn("patchsweep_run_decompose", c_int, P, c_size_t, c_char_p, c_size_t, c_int32, POINTER(LensOut))
run_attribution = _fn("patchsweep_run_attribution", c_int, P, c_size_t, c_int32, c_int32, POINTER(c_double),
                      c_size_t, POINTER(c_double), POINTER(c_double))
attribution_label = _fn("patchsweep_attribution_label", c_int, P, c_size_t, c_char_p, c_size_t)
pair_init = _fn("patchsweep_pair_init", c_int, P, POINTER(c_int32), POINTER(c_int32), c_size_t, c_int32, c_int32,
                POINTER(P))
pair_free = _fn("patchsweep_pair_free", None, P)
pair_grid_shape = _fn("patchsweep_pair_grid_shape", c_int, P, c_char_p, POINTER(c_size_t), POINTER(c_size_t),
                      POINTER(c_char_p))
pair_patch = _fn("patchsweep_pair_patch", c_int, P, c_char_p, POINTER(PatchOpts), POINTER(c_double), c_size_t,
                 POINTER(c_double), POINTER(c_double))

if api_version() < API_VERSION:
    raise ImportError(f"patchsweep: the shared library serves API version {api_version()}, "
                      f"this package needs {API_VERSION}")
