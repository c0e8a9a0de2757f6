#!/bin/bash
# The "Few labels" experiments of docs/RESULTS.md on Fashion-MNIST: the 60,000
# training images used without labels, 1% (600) or 10% (6,000) of the labels.
#
#   1. the small student (resnet8) trained on the labels alone;
#   2. SimCLR pretraining of the small student, then linear evaluation on the
#      label subset and kNN (k 200) with the whole training split as the bank;
#   3. the SimCLRv2 pipeline: a bigger encoder (resnet20) pretrained with
#      SimCLR, fine-tuned on the label subset, distilled (method simclrv2, tau
#      1) into the small student on all 60,000 images;
#   4. SEED from the bigger encoder into the small student, then linear
#      evaluation on the label subset.
#
# Usage: tools/few_labels.sh [OUT]      (default runs/few_labels)
# Environment: PT_EPOCHS (pretraining, 4), D_EPOCHS (distillation, 4),
# FT_EPOCHS (fine-tuning and training on the labels alone, 60), SEEDS ("0 1 2",
# for the steps that use labels), FRACS ("1% 10%"), THREADS (2), EXTRA (more
# flags for every training run, e.g. "--max-steps-per-epoch 2" for a smoke test).
set -euo pipefail
cd "$(dirname "$0")/.."
KD=${KD:-build/kd}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
OUT=${1:-runs/few_labels}
PT_EPOCHS=${PT_EPOCHS:-4}
D_EPOCHS=${D_EPOCHS:-4}
FT_EPOCHS=${FT_EPOCHS:-60}
SEEDS=${SEEDS:-"0 1 2"}
FRACS=${FRACS:-"1% 10%"}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
COMMON=(--data "$DATA" --threads "$THREADS" --workers 1 --progress 0 ${EXTRA:-})
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }
run() { # run DIR CMD...: skips a finished run (summary.json present)
    local dir=$1
    shift
    if [ -f "$dir/summary.json" ]; then return 0; fi
    rm -rf "$dir"
    log "$*"
    "$@" >>"$OUT/log.txt" 2>&1
}
top1() { /usr/bin/python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d.get('$2', d.get('top1')))" "$1"; }

# Self-supervised pretraining: SimCLR, SGD momentum 0.9, lr 0.3 at batch 256, cosine, wd 1e-4.
PRE=(--epochs "$PT_EPOCHS" --batch-size 256 --lr 0.3 --weight-decay 1e-4 --schedule cosine)
run "$OUT/simclr-resnet20" "$KD" pretrain --method simclr --model resnet20 "${PRE[@]}" "${COMMON[@]}" \
    --out "$OUT/simclr-resnet20"
run "$OUT/simclr-resnet8" "$KD" pretrain --method simclr --model resnet8 "${PRE[@]}" "${COMMON[@]}" \
    --out "$OUT/simclr-resnet8"
run "$OUT/knn-simclr-resnet8" "$KD" eval --knn --ckpt "$OUT/simclr-resnet8/encoder.safetensors" --k 200 \
    --data "$DATA" --threads "$THREADS" --out "$OUT/knn-simclr-resnet8"
run "$OUT/knn-simclr-resnet20" "$KD" eval --knn --ckpt "$OUT/simclr-resnet20/encoder.safetensors" --k 200 \
    --data "$DATA" --threads "$THREADS" --out "$OUT/knn-simclr-resnet20"
# SEED: the resnet20 encoder (with its head) teaches resnet8 on all images; queue 4096 (MoCo's CIFAR size).
run "$OUT/seed-resnet8" "$KD" distill --method seed --teacher-ckpt "$OUT/simclr-resnet20/encoder.safetensors" \
    --model resnet8 --set seed.K=4096 --epochs "$D_EPOCHS" --batch-size 256 --lr 0.3 --weight-decay 1e-4 \
    --schedule cosine "${COMMON[@]}" --out "$OUT/seed-resnet8"

SUP=(--batch-size 64 --lr 0.05 --weight-decay 5e-4 --schedule cosine --epochs "$FT_EPOCHS")
for frac in $FRACS; do
    f=${frac%\%}
    for seed in $SEEDS; do
        s="p$f-s$seed"
        # 1. the small student on the labels alone
        run "$OUT/sup-resnet8-$s" "$KD" train --model resnet8 --labels "$frac" --seed "$seed" "${SUP[@]}" \
            "${COMMON[@]}" --out "$OUT/sup-resnet8-$s"
        # 2./4. linear evaluation of the self-supervised small students on the subset
        run "$OUT/lin-simclr-resnet8-$s" "$KD" eval --linear --ckpt "$OUT/simclr-resnet8/encoder.safetensors" \
            --labels "$frac" --seed "$seed" --data "$DATA" --threads "$THREADS" --out "$OUT/lin-simclr-resnet8-$s"
        run "$OUT/lin-seed-resnet8-$s" "$KD" eval --linear --ckpt "$OUT/seed-resnet8/encoder.safetensors" \
            --labels "$frac" --seed "$seed" --data "$DATA" --threads "$THREADS" --out "$OUT/lin-seed-resnet8-$s"
        # 3. SimCLRv2: fine-tune the pretrained resnet20 on the subset (whole network, wd 0), then distil
        run "$OUT/ft-resnet20-$s" "$KD" train --model resnet20 --init-ckpt "$OUT/simclr-resnet20/encoder.safetensors" \
            --labels "$frac" --seed "$seed" --batch-size 64 --lr 0.05 --weight-decay 0 --schedule cosine \
            --epochs "$FT_EPOCHS" "${COMMON[@]}" --out "$OUT/ft-resnet20-$s"
        run "$OUT/distill-resnet8-$s" "$KD" distill --method simclrv2 --model resnet8 \
            --teacher-ckpt "$OUT/ft-resnet20-$s/last.safetensors" --labels "$frac" --seed "$seed" \
            --epochs "$D_EPOCHS" --batch-size 128 --lr 0.05 --weight-decay 5e-4 --schedule cosine "${COMMON[@]}" \
            --out "$OUT/distill-resnet8-$s"
    done
done

# The table: last-epoch test top-1, mean +- std over seeds.
/usr/bin/python3 - "$OUT" "$FRACS" "$SEEDS" <<'EOF'
import json, os, statistics, sys
out, fracs, seeds = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
def top1(d):
    p = os.path.join(out, d, "summary.json")
    if not os.path.exists(p):
        return None
    s = json.load(open(p))
    for k in ("top1", "test_top1", "linear_top1"):
        if k in s:
            return float(s[k])
    for k, v in s.items():
        if "top1" in k and isinstance(v, (int, float)):
            return float(v)
    return None
def cell(prefix, frac):
    vals = [top1(f"{prefix}-p{frac.rstrip('%')}-s{s}") for s in seeds]
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return "%.2f (1 seed)" % vals[0]
    return "%.2f +- %.2f" % (statistics.mean(vals), statistics.stdev(vals))
rows = [("resnet8 on the labels alone", "sup-resnet8"),
        ("SimCLR resnet8, linear on the labels", "lin-simclr-resnet8"),
        ("SimCLRv2: resnet20 pretrained + fine-tuned (teacher)", "ft-resnet20"),
        ("SimCLRv2: distilled into resnet8 (60k unlabeled)", "distill-resnet8"),
        ("SEED resnet20 -> resnet8, linear on the labels", "lin-seed-resnet8")]
print("| model | " + " | ".join(f"{f} labels" for f in fracs) + " |")
print("|---|" + "---|" * len(fracs))
for name, prefix in rows:
    print(f"| {name} | " + " | ".join(cell(prefix, f) for f in fracs) + " |")
for d in ("knn-simclr-resnet8", "knn-simclr-resnet20"):
    p = os.path.join(out, d, "summary.json")
    if os.path.exists(p):
        print(f"\n{d}: {json.dumps(json.load(open(p)))[:400]}")
EOF
