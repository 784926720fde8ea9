#!/usr/bin/python3
"""make bench-large's checkpoint writer (tests/tools/make_llama_checkpoint.py)
on a tiny shape: HF's sharded layout (several shards, an index that lists
every tensor once), a config patchsweep loads as a grouped-query Llama, and
a forward (`cache --ids`, the BF16 matrices packed in 2 bytes) equal to the
float64 reference of HF's modeling code (oracle_families) within 1e-4.

Environment: PS_BIN, PS_ROOT (see run_integration.sh)."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import xarray as xr

ROOT = os.environ.get("PS_ROOT") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("PS_BIN") or os.path.join(ROOT, "build/rel/patchsweep")
sys.path.insert(0, os.path.join(ROOT, "tests/tools"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle_families as of  # noqa: E402
from checks import check, finish  # noqa: E402

IDS = [128000, 17, 0, 42, 96, 5, 17, 8, 61]
with tempfile.TemporaryDirectory(prefix="ps-llama-writer-") as tmp:
    m = os.path.join(tmp, "m")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests/tools/make_llama_checkpoint.py"), "-o", m,
                        "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--intermediate", "96",
                        "--vocab", "128256", "--positions", "64", "--shard-gb", "0.01"], capture_output=True, text=True)
    check("writer runs", r.returncode == 0, r.stderr)
    idx = json.load(open(os.path.join(m, "model.safetensors.index.json")))
    files = sorted(set(idx["weight_map"].values()))
    check("sharded like HF: several model-0000i-of-0000N files, 1 + 9 L + 2 tensors",
          len(files) >= 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
          and len(idx["weight_map"]) == 1 + 9 * 2 + 2, files)
    check("metadata.total_size = the shards' tensor bytes", idx["metadata"]["total_size"] ==
          sum(2 * int(np.prod(t.shape)) for t in of.load_weights(m).values()))
    r = subprocess.run([BIN, "info", "--model", m], capture_output=True, text=True)
    check("patchsweep loads it as a grouped-query Llama", r.returncode == 0 and "llama" in r.stdout
          and "4 query / 2 key-value heads" in r.stdout, r.stdout + r.stderr)
    out = os.path.join(tmp, "c.nc")
    r = subprocess.run([BIN, "cache", "--model", m, "--ids", ",".join(map(str, IDS)), "-o", out],
                       capture_output=True, text=True)
    if check("cache --ids", r.returncode == 0, r.stderr):
        ref = of.Family(m).run(IDS)
        with xr.open_dataset(out) as ds:
            got = ds["logits"].values
        want = ref["logits"].numpy()
        err = float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))
        check(f"logits equal HF's float64 reference within 1e-4 (worst {err:.1e})", err < 1e-4)
finish("test_llama_writer")
