#!/usr/bin/env bash
# The Python package (python/patchsweep over libpatchsweep.so): its pytest
# suite tests/python with PYTHONPATH=python and the build's shared library
# (PS_BUILD: build/rel).  pytest's summary line is printed as "summary ..."
# (tests/run_integration.sh shows it).  Under SANITIZE=1 (build/san) the
# suite is skipped: an ASan-instrumented .so cannot be loaded into an
# uninstrumented python3 without LD_PRELOAD of the runtime; the release
# pass runs it, and the C it calls runs under the sanitizers in the unit
# and integration tests.
set -u
root=${PS_ROOT:?}
build=${PS_BUILD:-$root/build/rel}
py=${PS_PYTHON:-/usr/bin/python3}
if [ "$(basename "$build")" = san ]; then
    echo "skip test_python: the sanitizer build's .so does not load into python3"
    echo "python: 0 passed, 0 failed, 1 skipped"
    exit 0
fi
if ! "$py" -c 'import pytest' 2>/dev/null; then
    echo "skip test_python: python3-pytest is not installed (make deps)"
    exit 0
fi
out=$(mktemp /tmp/ps-pytest-XXXXXX)
trap 'rm -f "$out"' EXIT
cd "$root" && PYTHONPATH=$root/python PATCHSWEEP_LIB=$build/libpatchsweep.so.0 PS_BUILD=$build \
    "$py" -m pytest -q -p no:cacheprovider tests/python 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
echo "summary pytest: $(grep -E '(passed|failed|error)' "$out" | tail -1 | tr -d '=' | sed 's/^ *//')"
exit "$rc"
