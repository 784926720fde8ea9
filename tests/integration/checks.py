"""Pass/fail bookkeeping shared by the integration tests.

Each test prints one line per check (`ok   NAME` or `FAIL NAME: detail`)
and ends with the runner's summary line `LABEL: N passed, N failed`,
exiting 1 when a check failed.  (This file is imported, not run: the
runner only runs test_*.)
"""
import sys

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
