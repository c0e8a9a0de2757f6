#!/usr/bin/env bash
# The default job (`make run`): on Fashion-MNIST, train a teacher, then the same
# small student twice with the same budget and seed (alone, and with KD from
# the teacher), and print the three test accuracies.
#   tools/quickstart.sh [path/to/kd]
# Settings can be overridden from the environment (QS_TEACHER, QS_STUDENT,
# QS_TEACHER_EPOCHS, QS_STUDENT_EPOCHS, QS_SUBSET, QS_OUT, QS_SEED, QS_DATA).
set -euo pipefail
KD=${1:-build/kd}
DATA=${QS_DATA:-/usr/share/datasets/fashion-mnist}
OUT=${QS_OUT:-runs/quickstart}
TEACHER=${QS_TEACHER:-resnet20}
STUDENT=${QS_STUDENT:-resnet8}
TE=${QS_TEACHER_EPOCHS:-6}
SE=${QS_STUDENT_EPOCHS:-5}
SUBSET=${QS_SUBSET:-10000}
SEED=${QS_SEED:-1}
common=(--data "$DATA" --seed "$SEED" --batch-size 64 --schedule cosine --weight-decay 5e-4 --workers 1)

if [ -e "$OUT" ]; then
  echo "kd quickstart: moving the previous $OUT to $OUT.prev"
  rm -rf "$OUT.prev"
  mv "$OUT" "$OUT.prev"
fi
mkdir -p "$OUT"
start=$(date +%s)

echo "== 1/3 teacher: $TEACHER, $TE epochs on all training images"
"$KD" train "${common[@]}" --model "$TEACHER" --epochs "$TE" --lr 0.1 --out "$OUT/teacher"

echo "== 2/3 student alone: $STUDENT, $SE epochs on a class-balanced subset of $SUBSET training images"
"$KD" train "${common[@]}" --model "$STUDENT" --epochs "$SE" --lr 0.1 --train-subset "$SUBSET" \
  --out "$OUT/student-alone"

echo "== 3/3 student with KD from the teacher: $STUDENT, same budget, seed and subset"
"$KD" distill "${common[@]}" --model "$STUDENT" --epochs "$SE" --lr 0.1 --train-subset "$SUBSET" \
  --method kd --teacher-ckpt "$OUT/teacher/best.safetensors" --out "$OUT/student-kd"

wall=$(( $(date +%s) - start ))
val() { sed -n "s/^  \"$2\": \"\\{0,1\\}\\([^\",]*\\)\"\\{0,1\\},\\{0,1\\}$/\\1/p" "$OUT/$1/summary.json"; }
{
  echo
  printf '%-32s %-10s %8s %8s %8s %10s\n' "run" "model" "epochs" "top1 %" "top5 %" "img/s"
  for r in teacher student-alone student-kd; do
    printf '%-32s %-10s %8s %8.2f %8.2f %10.0f\n' "$OUT/$r" "$(val $r model)" "$(val $r epochs)" \
      "$(val $r top1)" "$(val $r top5)" "$(val $r images_per_s)"
  done
  echo
  echo "wall time: ${wall}s (Fashion-MNIST test set, last-epoch accuracy)"
} | tee "$OUT/table.txt"
t=$(val teacher top1); a=$(val student-alone top1); k=$(val student-kd top1)
awk -v t="$t" -v a="$a" -v k="$k" 'BEGIN {
  printf "teacher >= 92%%: %s; KD student beats the student alone: %s (%+.2f points)\n",
         (t >= 92 ? "yes" : "NO"), (k > a ? "yes" : "NO"), k - a }' | tee -a "$OUT/table.txt"
