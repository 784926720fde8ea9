"""Shared fixtures of the Python package's tests (tests/integration/test_python.sh
runs them with PYTHONPATH=python and PS_BIN/PS_BUILD set)."""
import json
import os
import subprocess
import sys

import pytest


ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
BIN = os.environ.get("PS_BIN", os.path.join(ROOT, "build", "rel", "patchsweep"))
EMBEDDED = os.path.join(ROOT, "jobs", "ioi-tiny", "model")
CLEAN = "After John and Mary went to the store, Mary gave a bottle of milk to"
CORRUPTED = "After John and Mary went to the store, John gave a bottle of milk to"
CAPITALS = "Q: What is the capital of France?\nA: Paris\nQ: What is the capital of Poland?\nA:"


def cli(*args, json_out=True):
    """Run the patchsweep binary; its --json output parsed."""
    out = subprocess.run([BIN, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out) if json_out else out


def close(got, ref, rel=1e-4):
    """The oracle tests' rule: |got - ref| <= rel * max(1, max|ref|)."""
    import numpy as np
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err = float(np.abs(got - ref).max()) if got.size else 0.0
    tol = rel * max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


@pytest.fixture(scope="session")
def ps():
    import patchsweep
    return patchsweep


@pytest.fixture(scope="session")
def model(ps):
    return ps.load(EMBEDDED)


@pytest.fixture(scope="session")
def oracle_gpt2():
    import oracle
    return oracle.load(EMBEDDED)


def pytest_configure(config):
    # netCDF4 built against another numpy minor: harmless, and not ours
    config.addinivalue_line("filterwarnings", "ignore:numpy.ndarray size changed")
