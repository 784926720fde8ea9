#!/usr/bin/env bash
# Run libFuzzer targets one after the other, each for SECONDS in a single
# process:  tests/fuzz/run_fuzz.sh SECONDS TARGET...
#
# Each target starts from the committed seeds (tests/fuzz/corpus/TARGET,
# read only) and what earlier runs found (build/fuzz/corpus/TARGET, where
# new inputs go).  A crash, a leak (LeakSanitizer is on: the targets never
# start MPI), a hang past FUZZ_TIMEOUT seconds on one input or memory past
# FUZZ_RSS_MB fails the target; libFuzzer leaves the input that did it in
# build/fuzz/artifacts/TARGET/ (replay: build/fuzz/fuzz_TARGET FILE).
# Per target: executions, executions per second, coverage (libFuzzer's
# cov: edges and ft: features) and corpus size; then the summary line
# "fuzz: N passed, N failed".  The full log is build/fuzz/logs/TARGET.log.
# Environment: FUZZ_NICE (default 10) runs the fuzzers under nice;
# FUZZ_SEEDS_ONLY=1 (make fuzz-smoke) starts from the committed seeds alone
# and keeps what it finds in build/fuzz/smoke/TARGET, emptied first: libFuzzer
# replays its whole corpus before the clock starts, and the corpus of long
# runs would make a smoke test take minutes.
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
seconds=${1:?usage: run_fuzz.sh SECONDS TARGET...}
shift
timeout_s=${FUZZ_TIMEOUT:-20}
rss_mb=${FUZZ_RSS_MB:-2048}
nice_n=${FUZZ_NICE:-10}
build=$root/build/fuzz
mkdir -p "$build/logs"
# AddressSanitizer's options are the targets' own (tests/fuzz/fuzz_common.h:
# leak checks on, allocations over 2 GiB return NULL); ASAN_OPTIONS may
# override them.
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
pass=0; fail=0; failed=()
for t in "$@"; do
    bin=$build/fuzz_$t
    seeds=$root/tests/fuzz/corpus/$t
    if [ "${FUZZ_SEEDS_ONLY:-0}" = 1 ]; then
        work=$build/smoke/$t
        rm -rf "$work"
    else
        work=$build/corpus/$t
    fi
    art=$build/artifacts/$t
    log=$build/logs/$t.log
    mkdir -p "$work" "$art"
    if [ ! -x "$bin" ] || [ ! -d "$seeds" ]; then
        fail=$((fail + 1)); failed+=("$t"); echo "FAIL fuzz_$t: no $bin or no seeds in $seeds"
        continue
    fi
    dict=()
    [ -f "$root/tests/fuzz/dict/$t.dict" ] && dict=(-dict="$root/tests/fuzz/dict/$t.dict")
    # slow-unit-* files (an input over 10 s, libFuzzer's report, not a
    # failure) are listed but do not fail the target; a hang is -timeout.
    before=$(ls -A "$art" | grep -vc '^slow-unit-')
    # -use_value_profile adds comparison operands to the coverage signal,
    # which helps with magic numbers and lengths in binary formats.
    nice -n "$nice_n" "$bin" -max_total_time="$seconds" -timeout="$timeout_s" -rss_limit_mb="$rss_mb" \
        -use_value_profile=1 -print_final_stats=1 -artifact_prefix="$art/" "${dict[@]}" "$work" "$seeds" >"$log" 2>&1
    rc=$?
    after=$(ls -A "$art" | grep -vc '^slow-unit-')
    slow=$(grep -c 'Test unit written to .*slow-unit-' "$log")
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    peak=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -n 1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    units=$(ls -A "$work" | wc -l)
    line="fuzz_$t: ${execs:-?} execs in ${seconds} s (${rate:-?}/s), cov ${cov:-?} edges, ft ${ft:-?}, corpus $units, peak RSS ${peak:-?} MB"
    [ "$slow" -gt 0 ] && line="$line, $slow input(s) over 10 s in $art"
    if [ $rc -eq 0 ] && [ "$after" -eq "$before" ]; then
        pass=$((pass + 1)); echo "PASS $line"
    else
        fail=$((fail + 1)); failed+=("$t")
        echo "FAIL $line (exit $rc; reproducers in $art)"
        grep -E 'ERROR|SUMMARY|fuzz: |Test unit written' "$log" | head -n 20 | sed 's/^/    /'
    fi
done
[ ${#failed[@]} -gt 0 ] && echo "failed: ${failed[*]}"
echo "fuzz: $pass passed, $fail failed"
[ $fail -eq 0 ]
