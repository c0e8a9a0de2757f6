#!/usr/bin/env bash
# bf16 accuracy check (issue 4): trains the same model twice on Fashion-MNIST
# with the same seed, data order and budget, once with float32 convolutions
# and once with --precision bf16, and prints both test accuracies and their
# difference. Defaults: the quickstart teacher recipe (resnet20, 6 epochs,
# SGD lr 0.1 cosine, batch 64, seed 1), and the quickstart KD student (resnet8,
# 5 epochs on a 10k subset, distilled from the float32 teacher).
#   tools/bf16_check.sh [path/to/kd]      (BF_OUT, BF_MODEL, BF_EPOCHS, BF_DATA override)
set -euo pipefail
KD=${1:-build/kd}
DATA=${BF_DATA:-/usr/share/datasets/fashion-mnist}
OUT=${BF_OUT:-runs/bf16-check}
MODEL=${BF_MODEL:-resnet20}
EPOCHS=${BF_EPOCHS:-6}
common=(--data "$DATA" --seed 1 --batch-size 64 --schedule cosine --weight-decay 5e-4 --workers 1
        --lr 0.1 --progress 0 --log-every 0)
rm -rf "$OUT"
mkdir -p "$OUT"
for p in f32 bf16; do
  "$KD" train "${common[@]}" --model "$MODEL" --epochs "$EPOCHS" --precision "$p" --out "$OUT/$MODEL-$p"
done
for p in f32 bf16; do
  "$KD" distill "${common[@]}" --model resnet8 --epochs 5 --train-subset 10000 --method kd \
    --teacher-ckpt "$OUT/$MODEL-f32/best.safetensors" --precision "$p" --out "$OUT/resnet8-kd-$p"
done
/usr/bin/env python3 - "$OUT" "$MODEL" <<'PY'
import json, sys
out, model = sys.argv[1], sys.argv[2]
rows = []
for name in (model, "resnet8-kd"):
    r = {p: json.load(open(f"{out}/{name}-{p}/summary.json")) for p in ("f32", "bf16")}
    d = r["bf16"]["top1"] - r["f32"]["top1"]
    rows.append(f"| {name} | {r['f32']['epochs']} | {r['f32']['top1']:.2f} | {r['bf16']['top1']:.2f} | {d:+.2f} | "
                f"{r['f32']['images_per_s']:.0f} | {r['bf16']['images_per_s']:.0f} |")
table = ["| run | epochs | top-1 f32 % | top-1 bf16 % | bf16 - f32 | img/s f32 | img/s bf16 |",
         "|---|---|---|---|---|---|---|"] + rows
open(f"{out}/table.md", "w").write("\n".join(table) + "\n")
print("\n".join(table))
PY
