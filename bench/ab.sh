#!/usr/bin/env bash
# A/B speed of two builds of bench_train_step on the same machine, interleaved:
# each round runs every row with binary A then binary B (each in its own
# process), and the table gives per row the median over rounds of each
# binary's median img/s, its range, and B/A.
#
#   bash bench/ab.sh OLD/bench_train_step NEW/bench_train_step [ROUNDS] [ROWS...]
#
# A row is MODEL/MODE (train, infer) or kd:TEACHER->STUDENT. Defaults: 3
# rounds, the rows of bench/run.sh. Both binaries take the same flags
# (batch 64, 2 threads, 100 classes, 3x32x32; 2 warm-up steps, 3 timed runs
# of 5 steps per process). AB_FLAGS adds flags to both (e.g.
# AB_FLAGS="--precision bf16").
set -euo pipefail
A=$1; B=$2; ROUNDS=${3:-3}; shift 3 || shift $#
ROWS=("$@")
[ ${#ROWS[@]} -gt 0 ] || ROWS=(resnet8x4/train resnet32x4/train wrn_16_2/train wrn_40_2/train resnet20/train
                              resnet56/train resnet8x4/infer "kd:resnet32x4->resnet8x4")
out=$(mktemp -d)
run() { # binary row -> img/s median
  local bin=$1 row=$2 args
  if [[ $row == kd:* ]]; then local p=${row#kd:}; args=(--model "${p#*->}" --teacher "${p%->*}" --mode kd)
  else args=(--model "${row%/*}" --mode "${row#*/}"); fi
  # shellcheck disable=SC2086 # AB_FLAGS is a list of flags
  "$bin" "${args[@]}" --threads 2 --warmup 2 --repeats 3 --steps 5 ${AB_FLAGS:-} | sed -n 's/.*"img_s_median": \([0-9.]*\).*/\1/p'
}
for ((r = 0; r < ROUNDS; r++)); do
  for row in "${ROWS[@]}"; do
    key=$(echo "$row" | tr '/:>' '___')
    run "$A" "$row" >> "$out/$key.A"
    run "$B" "$row" >> "$out/$key.B"
  done
done
echo "| row | A img/s med [min-max] | B img/s med [min-max] | B/A |"
echo "|---|---|---|---|"
for row in "${ROWS[@]}"; do
  key=$(echo "$row" | tr '/:>' '___')
  python3 - "$row" "$out/$key.A" "$out/$key.B" <<'PY'
import statistics, sys
row, fa, fb = sys.argv[1:]
a = [float(x) for x in open(fa)]; b = [float(x) for x in open(fb)]
ma, mb = statistics.median(a), statistics.median(b)
print(f"| {row} | {ma:.1f} [{min(a):.1f}-{max(a):.1f}] | {mb:.1f} [{min(b):.1f}-{max(b):.1f}] | {mb/ma:.3f} |")
PY
done
rm -rf "$out"
