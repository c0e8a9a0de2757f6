#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan) in build-fuzz and runs
# each in turn. Used by `make fuzz` and `make fuzz-ci`.
#   fuzz/run.sh [ci] [TARGET...]
#   FUZZ_SECONDS=60   seconds per target (default 60)
#   FUZZ_JOBS=2       build parallelism
#   FUZZ_NICE=19      niceness of the fuzzers (shared machines)
# Without "ci", each target grows a working corpus in build-fuzz/corpus/<t>
# (seeded from fuzz/corpus/<t>, which stays untouched). With "ci", it runs
# from the committed corpus only, keeping nothing. A crash, leak, sanitizer
# report or OOM stops the run with the reproducer under build-fuzz/findings/.
set -euo pipefail
cd "$(dirname "$0")/.."
ci=0
if [ "${1:-}" = ci ]; then ci=1; shift; fi
all=(idx cifar stl10 safetensors png jpeg folder list config cli)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
secs=${FUZZ_SECONDS:-60}
KD_DEPS_EXTRA="clang libclang-rt-14-dev libomp-14-dev" bash tools/install-deps.sh
CC=clang cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKD_FUZZ=ON \
  -DKD_BUILD_TESTS=OFF -DKD_WITH_DNNL=OFF >/dev/null
cmake --build build-fuzz -j "${FUZZ_JOBS:-2}" --target $(printf 'fuzz_%s ' "${targets[@]}") >/dev/null
mkdir -p build-fuzz/findings
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
for t in "${targets[@]}"; do
  seeds=fuzz/corpus/$t
  args=(-max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=2048 -max_len=65536
        -timeout=20 -print_final_stats=1 -artifact_prefix="build-fuzz/findings/$t-")
  [ "$t" = cli ] && args+=(-close_fd_mask=3)
  if [ $ci -eq 1 ]; then
    work=$(mktemp -d /tmp/kdfuzz-ci.XXXXXX)
    dirs=("$work" "$seeds")
  else
    mkdir -p "build-fuzz/corpus/$t"
    dirs=("build-fuzz/corpus/$t" "$seeds")
  fi
  echo "== fuzz_$t: ${secs}s"
  log=build-fuzz/findings/$t.log
  rc=0
  nice -n "${FUZZ_NICE:-19}" build-fuzz/fuzz/fuzz_$t "${args[@]}" "${dirs[@]}" >"$log" 2>&1 || rc=$?
  [ $ci -eq 1 ] && rm -rf "$work"
  grep -E "^stat::number_of_executed_units|^stat::average_exec_per_sec|^stat::peak_rss_mb" "$log" |
    tr '\n' ' '
  echo
  if [ $rc -ne 0 ]; then
    echo "fuzz_$t FAILED (exit $rc); log: $log"
    grep -E "ERROR|SUMMARY|runtime error|Test unit written" "$log" | head -20
    exit 1
  fi
done
echo "fuzz: all ${#targets[@]} targets ran ${secs}s each without a finding"
