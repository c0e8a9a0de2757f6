#!/usr/bin/env bash
# bench/guard.sh: the CI performance regression guard (ctest `bench_guard`,
# label "bench"). Runs in well under a minute and needs no PyTorch.
#
#   bash bench/guard.sh [BUILD_DIR]            compare with bench/baseline.json (exit 1 on a gross slowdown)
#   bash bench/guard.sh --measure [BUILD_DIR]  only print the raw JSON lines (bench/run.sh --write-baseline)
#   ctest --test-dir build -L bench            the same through ctest
#
# Design. CI machines differ in speed and are shared with other work, so an
# absolute images/s figure cannot be compared across runs, and PyTorch (the
# fair reference of bench/run.sh) is not installed in CI. The guard therefore
# normalises kd by the machine itself: bench_peak measures the fp32 FMA peak
# of this machine with 2 threads right before and after the kd runs (best of
# several short runs), and the guarded figure is
#
#     fraction_of_peak = kd training GFLOP/s / measured peak GFLOP/s
#
# for the training step (forward + backward + SGD, batch 16, 2 threads) of
# resnet8 and resnet20 (bench_train_step; FLOPs = 3 x forward 2*MACs of convs
# and linear layers). bench/baseline.json records each row's fraction (and,
# for reference, the kd images/s and the kd/PyTorch ratios of the full run that
# wrote it: bash bench/run.sh --write-baseline). A row fails only when its
# fraction falls below HALF the recorded one, i.e. kd became more than 2x
# slower relative to the machine: a gross regression, never noise. To stay
# clear of noise further, kd's figure is its best repeat, the peak is the best
# of its runs, and a failing row is measured once more before it counts.
#
# Skipped (exit 77, which ctest reports as skipped) for sanitizer or Debug
# builds (KD_BENCH_SANITIZE / KD_BENCH_BUILD_TYPE set by bench/CMakeLists.txt),
# without a baseline, and when bench_peak's vector ISA differs from the
# baseline's (a build without -march=native measures a different peak).
# kd's binary re-executes itself with GOMP_SPINCOUNT=10000 as the kd program
# does (see bench/train_step.c).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
measure_only=0
if [ "${1:-}" = "--measure" ]; then measure_only=1; shift; fi
build="${1:-$here/../build}"
bin="$build"
[ -x "$bin/bench_train_step" ] || bin="$build/bench"
baseline="${KD_BENCH_BASELINE:-$here/baseline.json}"
models=(resnet8 resnet20)
batch=16

for b in bench_train_step bench_peak; do
  if [ ! -x "$bin/$b" ]; then echo "bench_guard: $bin/$b not built (cmake --build $build)" >&2; exit 2; fi
done

if [ $measure_only -eq 0 ]; then
  case "${KD_BENCH_SANITIZE:-OFF}" in
    ON|on|1|TRUE|true) echo "bench_guard: skipped: sanitizer build"; exit 77 ;;
  esac
  if [ "${KD_BENCH_BUILD_TYPE:-}" = "Debug" ]; then echo "bench_guard: skipped: Debug build"; exit 77; fi
  if [ ! -f "$baseline" ]; then echo "bench_guard: skipped: no baseline $baseline"; exit 77; fi
fi

# jval JSON KEY: the number (or bare string) after "KEY": in a one-line JSON object.
jval() { sed -n "s/.*\"$2\": *\"\{0,1\}\([-+0-9.eE]*[a-z0-9-]*\).*/\1/p" <<<"$1" | head -n1; }
# fmax A B
fmax() { awk -v a="$1" -v b="$2" 'BEGIN { print (a + 0 > b + 0) ? a : b }'; }

peak_line() { "$bin/bench_peak" --threads 2 --ms 100 --repeats 5; }
step_line() {
  local steps=3
  "$bin/bench_train_step" --model "$1" --mode train --batch $batch --threads 2 --warmup 3 --repeats 5 --steps $steps
}

p1="$(peak_line)"
lines=()
for m in "${models[@]}"; do lines+=("$(step_line "$m")"); done
p2="$(peak_line)"
peak="$(fmax "$(jval "$p1" peak_gflops)" "$(jval "$p2" peak_gflops)")"
isa="$(jval "$p1" isa)"

if [ $measure_only -eq 1 ]; then
  printf '%s\n' "{\"kind\": \"peak\", ${p1#\{}" "{\"kind\": \"peak\", ${p2#\{}" "${lines[@]}"
  exit 0
fi

base_isa="$(sed -n 's/.*"peak_isa": *"\([a-z0-9-]*\)".*/\1/p' "$baseline" | head -n1)"
if [ -n "$base_isa" ] && [ "$base_isa" != "$isa" ]; then
  echo "bench_guard: skipped: peak measured with $isa here, $base_isa in the baseline"; exit 77
fi

passed=0 failed=0
for i in "${!models[@]}"; do
  m="${models[$i]}"
  row="$(grep -o "\"$m\": {[^}]*}" "$baseline" | head -n1 || true)"
  if [ -z "$row" ]; then echo "bench_guard: $m: no baseline row, not checked"; continue; fi
  ref="$(jval "$row" fraction_of_peak)"
  line="${lines[$i]}"
  for attempt in 1 2; do
    gf="$(jval "$line" gflops_max)"
    frac="$(awk -v g="$gf" -v p="$peak" 'BEGIN { printf "%.4f", g / p }')"
    ok="$(awk -v f="$frac" -v r="$ref" 'BEGIN { print (f >= 0.5 * r) ? 1 : 0 }')"
    [ "$ok" = 1 ] || [ $attempt = 2 ] && break
    echo "bench_guard: $m below the floor ($frac < 0.5 x $ref); measuring again"
    line="$(step_line "$m")"
    p3="$(peak_line)"
    peak="$(fmax "$peak" "$(jval "$p3" peak_gflops)")"
  done
  msg="$(printf '%s train b%d: %s img/s, %s GFLOP/s = %.1f%% of peak %s GFLOP/s (baseline %.1f%%, floor %.1f%%)' \
    "$m" "$batch" "$(jval "$line" img_s_max)" "$gf" "$(awk -v f="$frac" 'BEGIN{print 100*f}')" "$peak" \
    "$(awk -v r="$ref" 'BEGIN{print 100*r}')" "$(awk -v r="$ref" 'BEGIN{print 50*r}')")"
  if [ "$ok" = 1 ]; then
    echo "bench_guard: ok   $msg"; passed=$((passed + 1))
  else
    echo "bench_guard: FAIL $msg: kd is more than 2x slower than the baseline relative to this machine"
    failed=$((failed + 1))
  fi
done
echo "bench_guard: $passed passed, $failed failed"
[ $failed -eq 0 ]
