"""What the integration tests share: pass/fail bookkeeping, and the set-up
of the tests that start MPI ranks.

Each test prints one line per check (`ok   NAME`, `FAIL NAME: detail` or
`skip NAME: why` for a check that could not run, counted apart: never a
pass) and ends with the runner's summary line `LABEL: N passed, N failed,
N skipped`, exiting 1 when a check failed.  (This file is imported, not run: the
runner only runs test_*.)
"""
import os
import shutil
import sys

# What Open MPI needs to run as root, and with more ranks than cores.
MPI_VARS = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMPI_MCA_rmaps_base_oversubscribe": "1"}

counts = {"passed": 0, "failed": 0, "skipped": 0}


def check(name, ok, detail="", tail=2000):
    """Count one check; on failure print the last `tail` characters of detail."""
    counts["passed" if ok else "failed"] += 1
    print(("ok   " if ok else "FAIL ") + name + ("" if ok else ": " + str(detail)[-tail:]), flush=True)
    return bool(ok)


def skip(name, why):
    """A check that could not run (say, no GPU, or the state it needs was
    never reached where that is not an error): counted as skipped."""
    counts["skipped"] += 1
    print(f"skip {name}: {why}", flush=True)


def failed():
    return counts["failed"]


def finish(label, extra=""):
    """Print the summary line and exit with the tests' status."""
    print(f"{label}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped{extra}",
          flush=True)
    sys.exit(1 if counts["failed"] else 0)


def mpi_env(base=None):
    """base (default os.environ) plus MPI_VARS, as a new dict."""
    return dict(os.environ if base is None else base, **MPI_VARS)


def private_binary(binary, tmp):
    """A copy of binary in tmp/bin, its path: a rebuild while mpirun or a job
    starts ranks must not bite.  Laid out as `make install` does, with
    tmp/share/patchsweep/gpt2 linking to the tokenizer (PS_TOKENIZER), which
    the copy finds beside itself as an installed binary would."""
    os.makedirs(os.path.join(tmp, "bin"), exist_ok=True)
    path = os.path.join(tmp, "bin", os.path.basename(binary))
    shutil.copy(binary, path)
    tok = os.environ.get("PS_TOKENIZER")
    share = os.path.join(tmp, "share", "patchsweep")
    if tok and not os.path.exists(os.path.join(share, "gpt2")):
        os.makedirs(share, exist_ok=True)
        os.symlink(os.path.abspath(tok), os.path.join(share, "gpt2"))
    return path
