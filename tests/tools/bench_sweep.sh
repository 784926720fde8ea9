#!/usr/bin/env bash
# Sweep scaling on this machine, side by side in one run: the demo's job
# setup (embedded model; resid_pre, attn_out, mlp_out, z_all_pos) over 512
# held-out IOI pairs, as 1 rank x 2 BLAS threads and as 2 ranks x 1 thread
# (equal total threads), each REPS times interleaved; prints the median
# seconds, the parallel efficiency and every rank's peak RSS.
# Usage: tests/tools/bench_sweep.sh PATCHSWEEP_BINARY [REPS]
set -euo pipefail
ps=$1
reps=${2:-3}
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=$root/build/bench/sweep
mkdir -p "$dir"
[ -f "$dir/ioi.jsonl" ] || "$ps" make-dataset ioi --n 512 --seed 9301 -o "$dir/ioi.jsonl" 2>/dev/null
cat > "$dir/job.ini" <<JOB
; make bench: sweep scaling (tests/tools/bench_sweep.sh)
[model]
dir = $root/jobs/ioi-tiny/model
[data]
dataset = ioi.jsonl
[patch]
components = resid_pre,attn_out,mlp_out,z_all_pos
[run]
output = out.nc
progress_seconds = 1000
JOB
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
declare -A secs rss
for r in $(seq "$reps"); do
    for ranks in 1 2; do
        threads=$((2 / ranks))
        start=$(date +%s.%N)
        mpirun --oversubscribe -np "$ranks" "$ps" sweep "$dir/job.ini" --overwrite --threads "$threads" \
            >"$dir/log-$ranks.txt" 2>&1
        end=$(date +%s.%N)
        secs[$ranks]+="$(awk "BEGIN {print $end - $start}") "
        rss[$ranks]=$(sed -n 's/.*peak RSS per rank (MiB): //p' "$dir/log-$ranks.txt")
    done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
t1=$(echo "${secs[1]}" | median)
t2=$(echo "${secs[2]}" | median)
cells=$(sed -n 's/.*prompts done; \([0-9]*\) cells.*/\1/p' "$dir/log-1.txt")
printf 'sweep scaling: %s cells (512 IOI pairs, embedded model), median of %s runs, wall time incl. start-up\n' "$cells" "$reps"
printf '%-22s %9s %11s %12s %s\n' "ranks x threads" "seconds" "cells/s" "efficiency" "peak RSS per rank (MiB)"
printf '%-22s %9.2f %11.0f %12s %s\n' "1 x 2" "$t1" "$(awk "BEGIN {print $cells / $t1}")" "-" "${rss[1]}"
printf '%-22s %9.2f %11.0f %11.0f%% %s\n' "2 x 1" "$t2" "$(awk "BEGIN {print $cells / $t2}")" "$(awk "BEGIN {print 100 * $t1 / $t2}")" "${rss[2]}"
