#!/usr/bin/env bash
# Step time of data-parallel training on this machine (docs/DISTRIBUTED.md):
# `kd train` of resnet20 (or MODEL) on Fashion-MNIST, batch 64, cpu backend,
# for STEPS steps, as one process with 2 compute threads and as mpirun -np 2
# with 1 thread per rank (each rank bound to its core), ROUNDS times
# interleaved, with one process on 1 thread as a reference. Prints each run's training images/s (evaluation excluded) and
# the data-parallel log line (bytes all-reduced per step, share of the time
# waiting). Run it on a quiet machine: other work on the cores skews both.
#   bash tools/dist_step_time.sh [build/kd]
set -euo pipefail
KD=${1:-build/kd}
MODEL=${MODEL:-resnet20}
STEPS=${STEPS:-60}
ROUNDS=${ROUNDS:-2}
SYNC_BN=${SYNC_BN:-1}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
OUT=$(mktemp -d /tmp/kd_dist_bench.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
flags=(train --model "$MODEL" --data "$DATA" --epochs 1 --max-steps-per-epoch "$STEPS" --batch-size 64
       --backend cpu --workers 1 --progress 0 --log-every 0 --sync-bn "$SYNC_BN")
ips() { grep -o '"images_per_s": [0-9.]*' "$1/metrics.jsonl" | tail -1 | cut -d' ' -f2; }
echo "model $MODEL, batch 64 (global), $STEPS steps, sync_bn $SYNC_BN, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$ROUNDS"); do
  "$KD" "${flags[@]}" --threads 1 --out "$OUT/single_$r" 2>/dev/null >/dev/null
  echo "round $r  -np 1 x 1 thread:  $(ips "$OUT/single_$r") img/s (reference)"
  "$KD" "${flags[@]}" --threads 2 --out "$OUT/one_$r" 2>"$OUT/one_$r.log" >/dev/null
  echo "round $r  -np 1 x 2 threads: $(ips "$OUT/one_$r") img/s"
  mpirun -q --bind-to core -np 2 "$KD" "${flags[@]}" --threads 1 --out "$OUT/two_$r" 2>"$OUT/two_$r.log" >/dev/null
  echo "round $r  -np 2 x 1 thread:  $(ips "$OUT/two_$r") img/s"
  grep "data parallel" "$OUT/two_$r.log" | sed 's/^/          /'
done
