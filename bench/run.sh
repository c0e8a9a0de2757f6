#!/usr/bin/env bash
# bench/run.sh: kd against PyTorch, side by side in one run, on the same
# models, batch and FLOP convention. See docs/PERFORMANCE.md.
#
#   bash bench/run.sh                  full run (3 rounds; about an hour on a 2-core machine, the
#                                      Swin rows about 15 minutes more)
#   bash bench/run.sh --quick          1 round, fewer repeats: a rough look (10-25 minutes on 2 cores)
#   options: --rounds N   --rows resnet20,kd   (row names or model names, comma-separated)
#            --write-baseline          also rewrite bench/baseline.json (the CI guard's baseline)
#            --no-bf16                 skip the bf16 runs (default: measured wherever the CPU has
#                                      AVX-512-BF16 or AMX: kd bf16 and PyTorch bf16 autocast in
#                                      each layout, three more processes per row and round)
#   env:     KD_BENCH_BUILD=DIR        build directory (default build)
#            KD_BENCH_TORCH_BLAS=DIR   directory with the libblas.so.3 PyTorch should use
#                                      (default: Debian's OpenBLAS, openblas-pthread, where
#                                      installed; "system" keeps the system's libblas.so.3)
#
# What it does:
#   1. installs python3-torch if missing (KD_DEPS_EXTRA with tools/install-deps.sh,
#      Debian's PyTorch 1.13, run as /usr/bin/python3) and builds bench_train_step and
#      bench_peak (cmake, RelWithDebInfo as `make build`);
#   2. measures this machine's fp32 peak with bench_peak (AVX-512 FMA loop, 2 threads),
#      at the start and before every row; the table uses the highest figure;
#   3. for every row runs kd (build/bench/bench_train_step), PyTorch NCHW and PyTorch
#      channels_last (bench/torch_step.py) INTERLEAVED, round after round, each
#      measurement in its own process (so its peak RSS is its own), alternating which
#      framework goes first, so that machine noise hits both;
#      kd with --precision bf16 runs in the same rotation (bf16 convolutions, float32
#      master weights; its speed-up over kd fp32 and PyTorch fp32 is reported per row),
#      and so does PyTorch's bf16 autocast (torch_step.py --precision bf16) in NCHW and
#      channels_last, which kd bf16 is compared with; every kd and PyTorch line also
#      names the oneDNN implementations its convolutions ran ("impls");
#   4. prints the table (bench/report.py) and writes bench/results/latest.json and
#      latest.md; the raw lines go to bench/results/raw-<date>.jsonl.
# Rows: train and inference of resnet8x4, resnet32x4, wrn_16_2, wrn_40_2, resnet20,
# resnet56, the KD step resnet32x4 -> resnet8x4 and the CRD step (RepDistiller's CRD,
# 50000-row memory banks, 16384 negatives); batch 64 of 3x32x32 noise, 100
# classes, 2 threads, SGD momentum 0.9 weight decay 5e-4; the step definitions and
# the FLOP convention (2*MACs of convs and linears, training = 3x forward) are in the
# headers of bench/train_step.c and bench/torch_step.py. The Swin rows: torchvision's
# swin_t at 224x224 (batch 8, 1000 classes) and swin_cifar at 32x32 (batch 64, 100
# classes), PyTorch in NCHW only (channels_last only touches the patch conv) and no
# bf16 runs (kd's bf16 covers convolutions, not the Linear layers that dominate Swin).
# BLAS: Debian's PyTorch runs Linear layers and matmuls through the system
# libblas.so.3, which is netlib's reference BLAS unless OpenBLAS is installed (10x
# slower on Swin's Linear layers). PyTorch's processes therefore get OpenBLAS
# (LD_LIBRARY_PATH to its openblas-pthread directory, OPENBLAS_NUM_THREADS as the
# thread count, OPENBLAS_CORETYPE=SkylakeX on AVX-512 CPUs) where it is found; each
# line records the BLAS it mapped ("blas"). kd does not use BLAS (oneDNN).
# Threads and OpenMP: both sides use 2 threads. kd's binary re-executes itself with
# GOMP_SPINCOUNT=10000, as the kd program does (src/cli/main.c); PyTorch runs with its
# defaults. This script clears GOMP_SPINCOUNT, OMP_WAIT_POLICY, KD_OMP_TUNED and
# OMP_NUM_THREADS for every run so that each framework gets exactly its own default.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"
quick=0 rounds="" only="" write_baseline=0 bf16=1
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --rounds) rounds="$2"; shift ;;
    --rows) only="$2"; shift ;;
    --write-baseline) write_baseline=1 ;;
    --no-bf16) bf16=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see bash bench/run.sh --help)" >&2; exit 2 ;;
  esac
  shift
done
build="${KD_BENCH_BUILD:-build}"
py=/usr/bin/python3

# 1. PyTorch and the build.
if ! $py -c "import torch" 2>/dev/null; then
  KD_DEPS_EXTRA="python3-torch python3-numpy" bash tools/install-deps.sh
fi
$py -c "import torch" || { echo "run.sh: PyTorch (python3-torch) is not importable by $py" >&2; exit 1; }
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j "$(nproc)" --target bench_train_step bench_peak >/dev/null
bin="$build/bench"
if [ $bf16 -eq 1 ] && ! grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo; then
  echo "run.sh: this CPU has no AVX-512-BF16/AMX: skipping the bf16 runs" >&2
  bf16=0
fi

# Row table: name, mode, model, teacher, steps per timed repeat (full run),
# then optional KEY=VALUE fields: method (--method) and n_train (--n-train),
# batch (default 64), size (image side, default 32), classes (default 100),
# layouts (PyTorch layouts, default nchw,channels_last), bf16 (0: no bf16 runs, kd or PyTorch).
# Steps are sized so a repeat lasts a few seconds on a 2-core machine.
swin_opts="layouts=nchw bf16=0"
rows=(
  "resnet8x4/train train resnet8x4 - 2"
  "resnet8x4/infer infer resnet8x4 - 6"
  "resnet32x4/train train resnet32x4 - 1"
  "resnet32x4/infer infer resnet32x4 - 2"
  "wrn_16_2/train train wrn_16_2 - 3"
  "wrn_16_2/infer infer wrn_16_2 - 8"
  "wrn_40_2/train train wrn_40_2 - 1"
  "wrn_40_2/infer infer wrn_40_2 - 3"
  "resnet20/train train resnet20 - 6"
  "resnet20/infer infer resnet20 - 16"
  "resnet56/train train resnet56 - 2"
  "resnet56/infer infer resnet56 - 6"
  "kd:resnet32x4->resnet8x4 kd resnet8x4 resnet32x4 1"
  "crd:resnet32x4->resnet8x4 kd resnet8x4 resnet32x4 1 method=crd n_train=50000"
  "swin_cifar/train train swin_cifar - 1 $swin_opts"
  "swin_cifar/infer infer swin_cifar - 3 $swin_opts"
  "swin_t/train train swin_t - 1 batch=8 size=224 classes=1000 $swin_opts"
  "swin_t/infer infer swin_t - 1 batch=8 size=224 classes=1000 $swin_opts"
)
if [ $quick -eq 1 ]; then warmup=1 repeats=3 rounds="${rounds:-1}"; else warmup=2 repeats=5 rounds="${rounds:-3}"; fi

mkdir -p bench/results
stamp="$(date +%Y%m%d-%H%M%S)"
raw="bench/results/raw-$stamp.jsonl"
: >"$raw"
clean_env=(env -u GOMP_SPINCOUNT -u OMP_WAIT_POLICY -u KD_OMP_TUNED -u OMP_NUM_THREADS)
# PyTorch's BLAS (see the header): OpenBLAS where found, 2 threads like everything else.
torch_blas="${KD_BENCH_TORCH_BLAS:-/usr/lib/x86_64-linux-gnu/openblas-pthread}"
torch_env=(env -u OPENBLAS_CORETYPE -u OPENBLAS_NUM_THREADS)
if [ "$torch_blas" != system ] && [ -e "$torch_blas/libblas.so.3" ]; then
  torch_env+=("LD_LIBRARY_PATH=$torch_blas${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" OPENBLAS_NUM_THREADS=2)
  if grep -qw avx512f /proc/cpuinfo; then torch_env+=(OPENBLAS_CORETYPE=SkylakeX); fi
else
  echo "run.sh: PyTorch uses the system libblas.so.3 ($torch_blas has no OpenBLAS; apt-get install libopenblas0-pthread or set KD_BENCH_TORCH_BLAS)" >&2
fi

# tag ROW ROUND: prefix each JSON line of stdin with the row and round.
tag() { sed -n "s|^{|{\"row\": \"$1\", \"round\": $2, |p"; }
peak() { "${clean_env[@]}" "$bin/bench_peak" --threads 2 --ms 100 --repeats 5 | sed 's/^{/{"kind": "peak", /' >>"$raw"; }

echo "run.sh: $( [ $quick -eq 1 ] && echo quick || echo full ) run, $rounds round(s), raw lines in $raw" >&2
echo "run.sh: kd $(git -C "$root" describe --always --dirty 2>/dev/null || echo '?'), $($py -c 'import torch; print("torch", torch.__version__)')" >&2
peak
n=0
for spec in "${rows[@]}"; do
  read -r name mode model teacher steps opts <<<"$spec"
  if [ -n "$only" ] && ! tr ',' '\n' <<<"$only" | grep -qxF -e "$name" -e "$model" -e "$mode"; then continue; fi
  n=$((n + 1))
  method="" ntrain="" batch=64 size=32 classes=100 layouts=nchw,channels_last row_bf16=$bf16
  for kv in $opts; do
    case "$kv" in
      method=*) method="${kv#*=}" ;;  n_train=*) ntrain="${kv#*=}" ;;  batch=*) batch="${kv#*=}" ;;
      size=*) size="${kv#*=}" ;;  classes=*) classes="${kv#*=}" ;;  layouts=*) layouts="${kv#*=}" ;;
      bf16=*) [ "${kv#*=}" = 1 ] || row_bf16=0 ;;
      *) echo "run.sh: row $name: unknown field $kv" >&2; exit 2 ;;
    esac
  done
  if [ $quick -eq 1 ]; then steps=$(( (steps + 2) / 3 )); fi
  args=(--model "$model" --mode "$mode" --batch "$batch" --threads 2 --classes "$classes"
        --warmup "$warmup" --repeats "$repeats" --steps "$steps")
  [ "$size" = 32 ] || args+=(--size "$size")
  [ "$teacher" = "-" ] || args+=(--teacher "$teacher")
  [ -z "$method" ] || args+=(--method "$method" --n-train "$ntrain")
  peak
  for ((r = 1; r <= rounds; r++)); do
    runs=(kd)
    for l in ${layouts//,/ }; do runs+=("pytorch:$l"); done
    if [ $row_bf16 -eq 1 ]; then
      runs+=(kd:bf16)
      for l in ${layouts//,/ }; do runs+=("pytorch-bf16:$l"); done
    fi
    if [ $((r % 2)) -eq 0 ]; then runs=($(printf '%s\n' "${runs[@]}" | tac)); fi
    for fw in "${runs[@]}"; do
      if [ "$fw" = kd ]; then
        cmd=("${clean_env[@]}" "$bin/bench_train_step" "${args[@]}")
      elif [ "$fw" = kd:bf16 ]; then
        cmd=("${clean_env[@]}" "$bin/bench_train_step" "${args[@]}" --precision bf16)
      elif [ "${fw%%:*}" = pytorch-bf16 ]; then
        cmd=("${clean_env[@]}" "${torch_env[@]}" "$py" bench/torch_step.py "${args[@]}" --layout "${fw#*:}"
             --precision bf16)
      else
        cmd=("${clean_env[@]}" "${torch_env[@]}" "$py" bench/torch_step.py "${args[@]}" --layout "${fw#pytorch:}")
      fi
      if out="$("${cmd[@]}")"; then
        tag "$name" "$r" <<<"$out" >>"$raw"
        echo "  [$name round $r/$rounds] $fw: $(sed -n 's/.*"img_s_median": \([0-9.]*\).*/\1/p' <<<"$out") img/s" >&2
      else
        echo "  [$name round $r/$rounds] $fw: FAILED: ${cmd[*]}" >&2
      fi
    done
  done
done
peak
[ $n -gt 0 ] || { echo "run.sh: no row matches --rows $only" >&2; exit 2; }

report_args=("$raw" bench/results/latest.json --markdown bench/results/latest.md)
if [ $write_baseline -eq 1 ]; then
  guard="bench/results/guard-$stamp.jsonl"
  "${clean_env[@]}" bash bench/guard.sh --measure "$build" >"$guard"
  report_args+=(--baseline bench/baseline.json --guard "$guard"
                --source "bash bench/run.sh$( [ $quick -eq 1 ] && echo ' --quick') --write-baseline")
fi
$py bench/report.py "${report_args[@]}"
echo "run.sh: wrote bench/results/latest.json, bench/results/latest.md$( [ $write_baseline -eq 1 ] && echo ', bench/baseline.json')" >&2
