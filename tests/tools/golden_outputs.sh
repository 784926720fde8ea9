#!/usr/bin/env bash
# Every user-visible output of patchsweep on the embedded model, normalized so
# that two builds can be compared bit for bit (refactors must not change a
# result): NetCDF files as ncdump text without the attributes that record when,
# where and by which revision they were made; SVGs and printed tables as they
# are.  Usage: tests/tools/golden_outputs.sh BIN OUTDIR; then
# `diff -r OUTDIR_A OUTDIR_B` (or `sha256sum OUTDIR/*`).
set -euo pipefail
BIN=$(realpath "$1"); OUT=$(realpath -m "$2")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
rm -rf "$OUT"; mkdir -p "$OUT/raw"
M=jobs/ioi-tiny/model
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MPIRUN="mpirun --oversubscribe"
CLEAN="After John and Mary went to the store, Mary gave a bottle of milk to"
CORR="After John and Mary went to the store, John gave a bottle of milk to"
# Volatile provenance: when, who, where, which revision, timings, memory.
norm() {
    ncdump "$1" | grep -Ev ':(parts_)?(job_text|job_sha256|patchsweep_version|command_line|created|memory_per_rank|blas|blas_core|blas_threads|gemm_kernel|job_path|dataset_path|model_path|write_seconds|compute_seconds|elapsed_seconds)' \
        | sed -E 's/^netcdf [^ ]+ /netcdf X /'
}
run() { local name=$1; shift; "$@" > "$OUT/$name.txt" 2> "$OUT/raw/$name.err" || { echo "golden: $name failed" >&2; cat "$OUT/raw/$name.err" >&2; exit 1; }; }

run tokenize "$BIN" tokenize --model $M --json "$CLEAN"
run run "$BIN" run --model $M --prompt "$CLEAN" --top-k 7 --json
run lens "$BIN" lens --model $M --prompt "$CLEAN" --answer " Mary" --json
run lens_pos "$BIN" lens --model $M --prompt "$CLEAN" --position 5
run decompose "$BIN" decompose --model $M --prompt "$CLEAN" --layer 2 --subtract attn_out --attribution --answer " Mary"
run evaluate "$BIN" evaluate --model $M --dataset jobs/ioi-tiny/ioi.jsonl --json
run mkds_ioi "$BIN" make-dataset ioi --n 40 --seed 3 --ids --model $M
run mkds_cap "$BIN" make-dataset capitals --n 20 --seed 4 --model $M
run cache_txt "$BIN" cache --model $M --prompt "$CLEAN" -o "$OUT/raw/cache.nc"
norm "$OUT/raw/cache.nc" > "$OUT/cache.cdl"
for eng in fast naive; do
  for metric in logit_diff kl; do
    for dir in denoise noise; do
      n=patch_${eng}_${metric}_${dir}
      run $n "$BIN" patch --model $M --clean "$CLEAN" --corrupted "$CORR" --answer " Mary" --wrong " John" \
          --components resid_pre,resid_mid,attn_out,mlp_out,z,head_all_pos_every --metric $metric \
          --direction $dir --engine $eng -o "$OUT/raw/$n.nc"
      norm "$OUT/raw/$n.nc" > "$OUT/$n.cdl"
    done
  done
done
run patch_prob "$BIN" patch --model $M --clean "$CLEAN" --corrupted "$CORR" --answer " Mary" --wrong " John" --metric prob --json
run patch_logprob "$BIN" patch --model $M --clean "$CLEAN" --corrupted "$CORR" --answer " Mary" --wrong " John" --metric logprob --components z
run lens_ds "$BIN" lens --model $M --dataset jobs/ioi-tiny/capitals.jsonl --top-k 5 -o "$OUT/raw/lens_ds.nc"
norm "$OUT/raw/lens_ds.nc" > "$OUT/lens_ds.cdl"
# Sweeps: the two demo jobs on 2 ranks, and one sliced in two and merged.
# Job copies whose paths point into OUT (the jobs' own outputs go to results/).
for job in ioi-tiny capitals-tiny; do
  sed -e "s#^dir = .*#dir = $ROOT/$M#" -e "s#^dataset = \(\.\./ioi-tiny/\)\?#dataset = $ROOT/jobs/ioi-tiny/#" \
      -e "s#^output = .*/results/#output = $OUT/raw/#" jobs/$job/job.ini > "$OUT/raw/$job.ini"
  run sweep_$job $MPIRUN -np 2 "$BIN" sweep "$OUT/raw/$job.ini" --overwrite
  norm "$OUT/raw/$job.nc" > "$OUT/sweep_$job.cdl"
done
norm "$OUT/raw/capitals-tiny-lens.nc" > "$OUT/sweep_capitals-tiny-lens.cdl"
for k in 1 2; do
  run slice$k "$BIN" sweep "$OUT/raw/ioi-tiny.ini" --overwrite --slice $k/2 --output "$OUT/raw/slice$k.nc"
done
run merge "$BIN" merge "$OUT/raw/slice1.nc" "$OUT/raw/slice2.nc" -o "$OUT/raw/merged.nc"
norm "$OUT/raw/merged.nc" > "$OUT/merged.cdl"
# Figures.
run plot_all "$BIN" plot "$OUT/raw/ioi-tiny.nc" --var all --prompt 0 -o "$OUT/ioi-all.svg"
run plot_heads "$BIN" plot "$OUT/raw/ioi-tiny.nc" --var z_all_pos_normalized --mean -o "$OUT/ioi-heads.svg"
run plot_len "$BIN" plot "$OUT/raw/ioi-tiny.nc" --var resid_pre_normalized --mean --by-length -o "$OUT/ioi-len.svg"
run plot_lens "$BIN" plot "$OUT/raw/capitals-tiny-lens.nc" --mean -o "$OUT/lens.svg"
run plot_patch "$BIN" plot "$OUT/raw/patch_fast_kl_noise.nc" --var all -o "$OUT/patch.svg"
# The figures' and logs' provenance: when, which binary, which directory.
for f in "$OUT"/*.svg; do
  grep -Ev '<entry key="(source_)?(command_line|file|created|patchsweep_version|blas|blas_core|blas_threads|gemm_kernel)">' "$f" > "$f.n"; mv "$f.n" "$f"
done
sed -i -E -e "s#$OUT#OUT#g" -e "s#$BIN#BIN#g" -e "s#$ROOT#ROOT#g" \
    -e 's/cells in [0-9.]+ s; file ([0-9.]+ MB) written in [0-9.]+ s/cells in T s; file \1 written in T s/' -e 's/\([0-9.]+ s after the chunks\)/(T s after the chunks)/' "$OUT"/*.*
rm -rf "$OUT/raw"
echo "golden: $(ls "$OUT" | wc -l) outputs in $OUT" >&2
