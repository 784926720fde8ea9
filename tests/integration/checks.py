"""What the integration tests share: pass/fail bookkeeping, and the set-up
of the tests that start MPI ranks.

Each test prints one line per check (`ok   NAME` or `FAIL NAME: detail`)
and ends with the runner's summary line `LABEL: N passed, N failed`,
exiting 1 when a check failed.  (This file is imported, not run: the
runner only runs test_*.)
"""
import os
import shutil
import sys

# What Open MPI needs to run as root, and with more ranks than cores.
MPI_VARS = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMPI_MCA_rmaps_base_oversubscribe": "1"}

counts = {"passed": 0, "failed": 0}


def check(name, ok, detail="", tail=2000):
    """Count one check; on failure print the last `tail` characters of detail."""
    counts["passed" if ok else "failed"] += 1
    print(("ok   " if ok else "FAIL ") + name + ("" if ok else ": " + str(detail)[-tail:]), flush=True)
    return bool(ok)


def failed():
    return counts["failed"]


def finish(label, extra=""):
    """Print the summary line and exit with the tests' status."""
    print(f"{label}: {counts['passed']} passed, {counts['failed']} failed{extra}", flush=True)
    sys.exit(1 if counts["failed"] else 0)


def mpi_env(base=None):
    """base (default os.environ) plus MPI_VARS, as a new dict."""
    return dict(os.environ if base is None else base, **MPI_VARS)


def private_binary(binary, tmp):
    """A copy of binary in tmp, its path: a rebuild while mpirun or a job
    starts ranks must not bite."""
    path = os.path.join(tmp, os.path.basename(binary))
    shutil.copy(binary, path)
    return path
