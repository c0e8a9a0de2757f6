#!/bin/bash
# The "Few labels" experiments of docs/RESULTS.md on Fashion-MNIST: the 60,000
# training images used without labels, 1% (600) or 10% (6,000) of the labels.
#
#   1. the small student (resnet8) trained on the labels alone;
#   2. SimCLR (and MoCo v2) pretraining of the small student, then linear evaluation and
#      kNN (k 20) with the label subset, and kNN (k 200) with the whole
#      training split as the bank (representation quality);
#   3. the SimCLRv2 pipeline: a bigger encoder (resnet20) pretrained with
#      SimCLR, fine-tuned on the label subset, distilled (method simclrv2, tau
#      1) into the small student on all 60,000 images;
#      (3a: with the optional labeled term, simclrv2.labeled_weight 1;
#      3b: fine-tuned from the projection head's first layer)
#   4. SEED from the bigger encoder into the small student, then linear
#      evaluation on the label subset;
#   5. SSLD: kd select keeps the SEL_PER_CLASS unlabeled images per class the
#      fine-tuned resnet20 is surest of, then symmetric-KL distillation into
#      the small student on those and the labeled ones, then a short
#      fine-tune on the labels (PaddleClas's last step);
#      Also with the SimCLRv2 distillation's budget (as many images seen as
#      D_EPOCHS epochs on the 60,000), and the same closing fine-tune;
#   6. DoGo: two resnet8 peers pretrained together (DOGO=1 only: the slowest
#      step), then linear evaluation of the student peer on the label subset.
#
# Usage: tools/few_labels.sh [OUT]      (default runs/few_labels)
# Environment: PT_EPOCHS (pretraining, 4), D_EPOCHS (distillation, 4),
# FT_EPOCHS (fine-tuning and training on the labels alone with 1% labels, 60),
# FT_EPOCHS_10 (the same with 10%, 30: the paper's 60 and 30), EVAL_EVERY (test
# evaluation every N epochs of the supervised runs, 10; the last epoch is always
# evaluated and training does not depend on it), SSLD_FT_EPOCHS (SSLD's closing
# fine-tune on the labels, lr 0.005, 10), SEEDS ("0 1 2",
# for the steps that use labels), FRACS ("1% 10%"), THREADS (2), SEL_PER_CLASS
# (1000), DOGO (0: skip DoGo; 1: run it, PT_EPOCHS epochs), EXTRA (more
# flags for every training run, e.g. "--max-steps-per-epoch 2" for a smoke test),
# TABLE_ONLY (1: run nothing, rebuild the table from the runs that exist).
set -euo pipefail
cd "$(dirname "$0")/.."
KD=${KD:-build/kd}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
OUT=${1:-runs/few_labels}
PT_EPOCHS=${PT_EPOCHS:-4}
D_EPOCHS=${D_EPOCHS:-4}
FT_EPOCHS=${FT_EPOCHS:-60}
FT_EPOCHS_10=${FT_EPOCHS_10:-30}
EVAL_EVERY=${EVAL_EVERY:-10}
SSLD_FT_EPOCHS=${SSLD_FT_EPOCHS:-10}
SEEDS=${SEEDS:-"0 1 2"}
FRACS=${FRACS:-"1% 10%"}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
COMMON=(--data "$DATA" --threads "$THREADS" --workers 1 --progress 0 ${EXTRA:-})
. tools/run_lib.sh
top1() { /usr/bin/python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d.get('$2', d.get('top1')))" "$1"; }

# Self-supervised pretraining: SimCLR, SGD momentum 0.9, lr 0.3 at batch 256, cosine, wd 1e-4.
PRE=(--epochs "$PT_EPOCHS" --batch-size 256 --lr 0.3 --weight-decay 1e-4 --schedule cosine)
run "$OUT/simclr-resnet20" "$KD" pretrain --method simclr --model resnet20 "${PRE[@]}" "${COMMON[@]}" \
    --out "$OUT/simclr-resnet20"
run "$OUT/simclr-resnet8" "$KD" pretrain --method simclr --model resnet8 "${PRE[@]}" "${COMMON[@]}" \
    --out "$OUT/simclr-resnet8"
# MoCo v2 with the CIFAR-10 demo's constants (configs/ssl/moco.yaml): queue 4096, m 0.99, tau 0.1, no blur.
run "$OUT/moco-resnet8" "$KD" pretrain --method moco --model resnet8 --set moco.K=4096 --set moco.m=0.99 \
    --set moco.tau=0.1 --set moco.blur_p=0 "${PRE[@]}" "${COMMON[@]}" --out "$OUT/moco-resnet8"
run "$OUT/knn-simclr-resnet8" "$KD" eval --knn --ckpt "$OUT/simclr-resnet8/encoder.safetensors" --k 200 \
    --data "$DATA" --threads "$THREADS" --out "$OUT/knn-simclr-resnet8"
run "$OUT/knn-simclr-resnet20" "$KD" eval --knn --ckpt "$OUT/simclr-resnet20/encoder.safetensors" --k 200 \
    --data "$DATA" --threads "$THREADS" --out "$OUT/knn-simclr-resnet20"
# SEED: the resnet20 encoder (with its head) teaches resnet8 on all images; queue 4096 (MoCo's CIFAR size).
run "$OUT/seed-resnet8" "$KD" distill --method seed --teacher-ckpt "$OUT/simclr-resnet20/encoder.safetensors" \
    --model resnet8 --set seed.K=4096 --epochs "$D_EPOCHS" --batch-size 256 --lr 0.3 --weight-decay 1e-4 \
    --schedule cosine "${COMMON[@]}" --out "$OUT/seed-resnet8"

if [ "${DOGO:-0}" = 1 ]; then
    run "$OUT/dogo-resnet8" "$KD" pretrain --method dogo --model resnet8 "${PRE[@]}" "${COMMON[@]}" \
        --out "$OUT/dogo-resnet8"
fi
SEL_PER_CLASS=${SEL_PER_CLASS:-1000}
for frac in $FRACS; do
    f=${frac%\%}
    ft=$FT_EPOCHS
    [ "$f" = 10 ] && ft=$FT_EPOCHS_10
    SUP=(--batch-size 64 --lr 0.05 --weight-decay 5e-4 --schedule cosine --epochs "$ft" --eval-every "$EVAL_EVERY")
    for seed in $SEEDS; do
        s="p$f-s$seed"
        # 1. the small student on the labels alone
        run "$OUT/sup-resnet8-$s" "$KD" train --model resnet8 --labels "$frac" --seed "$seed" "${SUP[@]}" \
            "${COMMON[@]}" --out "$OUT/sup-resnet8-$s"
        # 2./4. linear evaluation of the self-supervised small students on the subset
        run "$OUT/lin-simclr-resnet8-$s" "$KD" eval --linear --ckpt "$OUT/simclr-resnet8/encoder.safetensors" \
            --labels "$frac" --seed "$seed" --data "$DATA" --threads "$THREADS" --out "$OUT/lin-simclr-resnet8-$s"
        run "$OUT/knn20-simclr-resnet8-$s" "$KD" eval --knn --k 20 --ckpt "$OUT/simclr-resnet8/encoder.safetensors" \
            --labels "$frac" --seed "$seed" --data "$DATA" --threads "$THREADS" --out "$OUT/knn20-simclr-resnet8-$s"
        run "$OUT/lin-moco-resnet8-$s" "$KD" eval --linear --ckpt "$OUT/moco-resnet8/encoder.safetensors" \
            --labels "$frac" --seed "$seed" --data "$DATA" --threads "$THREADS" --out "$OUT/lin-moco-resnet8-$s"
        run "$OUT/lin-seed-resnet8-$s" "$KD" eval --linear --ckpt "$OUT/seed-resnet8/encoder.safetensors" \
            --labels "$frac" --seed "$seed" --data "$DATA" --threads "$THREADS" --out "$OUT/lin-seed-resnet8-$s"
        # 3. SimCLRv2: fine-tune the pretrained resnet20 on the subset (whole network, wd 0), then distil
        run "$OUT/ft-resnet20-$s" "$KD" train --model resnet20 --init-ckpt "$OUT/simclr-resnet20/encoder.safetensors" \
            --labels "$frac" --seed "$seed" --batch-size 64 --lr 0.05 --weight-decay 0 --schedule cosine \
            --epochs "$ft" --eval-every "$EVAL_EVERY" "${COMMON[@]}" --out "$OUT/ft-resnet20-$s"
        run "$OUT/distill-resnet8-$s" "$KD" distill --method simclrv2 --model resnet8 \
            --teacher-ckpt "$OUT/ft-resnet20-$s/last.safetensors" --labels "$frac" --seed "$seed" \
            --epochs "$D_EPOCHS" --batch-size 128 --lr 0.05 --weight-decay 5e-4 --schedule cosine "${COMMON[@]}" \
            --out "$OUT/distill-resnet8-$s"
        # 3a. the same with the paper's optional labeled term (simclrv2.labeled_weight 1: CE on the labeled images)
        run "$OUT/distilllab-resnet8-$s" "$KD" distill --method simclrv2 --model resnet8 \
            --teacher-ckpt "$OUT/ft-resnet20-$s/last.safetensors" --labels "$frac" --seed "$seed" \
            --set simclrv2.labeled_weight=1 --epochs "$D_EPOCHS" --batch-size 128 --lr 0.05 --weight-decay 5e-4 \
            --schedule cosine "${COMMON[@]}" --out "$OUT/distilllab-resnet8-$s"
        # 3b. the same from the projection head's first layer (ft_proj_selector 1: the paper's 1% setting)
        run "$OUT/ft1-resnet20-$s" "$KD" train --model resnet20 --init-ckpt "$OUT/simclr-resnet20/encoder.safetensors" \
            --ft-proj-selector 1 --labels "$frac" --seed "$seed" --batch-size 64 --lr 0.05 --weight-decay 0 \
            --schedule cosine --epochs "$ft" --eval-every "$EVAL_EVERY" "${COMMON[@]}" --out "$OUT/ft1-resnet20-$s"
        run "$OUT/distill1-resnet8-$s" "$KD" distill --method simclrv2 --model resnet8 \
            --teacher-ckpt "$OUT/ft1-resnet20-$s/last.safetensors" --labels "$frac" --seed "$seed" \
            --epochs "$D_EPOCHS" --batch-size 128 --lr 0.05 --weight-decay 5e-4 --schedule cosine "${COMMON[@]}" \
            --out "$OUT/distill1-resnet8-$s"
        # 5. SSLD on the labeled images and those the fine-tuned teacher selects
        if [ ! -f "$OUT/select-$s.txt" ] && [ "${TABLE_ONLY:-0}" != 1 ]; then
            log "$KD select --teacher-ckpt $OUT/ft-resnet20-$s/last.safetensors --labels $frac --seed $seed"
            "$KD" select --teacher-ckpt "$OUT/ft-resnet20-$s/last.safetensors" --labels "$frac" --seed "$seed" \
                --per-class "$SEL_PER_CLASS" --data "$DATA" --threads "$THREADS" --out "$OUT/select-$s.txt" \
                >>"$OUT/log.txt" 2>&1
        fi
        run "$OUT/ssld-resnet8-$s" "$KD" distill --method ssld --model resnet8 \
            --teacher-ckpt "$OUT/ft-resnet20-$s/last.safetensors" --labels "$frac" --seed "$seed" \
            --train-indices "$OUT/select-$s.txt" --epochs "$D_EPOCHS" --batch-size 128 --lr 0.05 \
            --weight-decay 5e-4 --schedule cosine "${COMMON[@]}" --out "$OUT/ssld-resnet8-$s"
        # 5b. SSLD's last step (PaddleClas): a short fine-tune on the labels with a small learning rate
        run "$OUT/ssldft-resnet8-$s" "$KD" train --model resnet8 --init-ckpt "$OUT/ssld-resnet8-$s/last.safetensors" \
            --labels "$frac" --seed "$seed" --batch-size 64 --lr 0.005 --weight-decay 5e-4 --schedule cosine \
            --epochs "$SSLD_FT_EPOCHS" --eval-every "$EVAL_EVERY" "${COMMON[@]}" --out "$OUT/ssldft-resnet8-$s"
        # 5c. SSLD with the SimCLRv2 distillation's budget: as many images seen as D_EPOCHS epochs on the
        # 60000 (the selection is several times smaller), then the same closing fine-tune
        if [ -f "$OUT/select-$s.txt" ]; then
            nsel=$(grep -vc '^#' "$OUT/select-$s.txt")
            eq=$(( (D_EPOCHS * 60000 + nsel - 1) / nsel ))
            run "$OUT/ssldeq-resnet8-$s" "$KD" distill --method ssld --model resnet8 \
                --teacher-ckpt "$OUT/ft-resnet20-$s/last.safetensors" --labels "$frac" --seed "$seed" \
                --train-indices "$OUT/select-$s.txt" --epochs "$eq" --batch-size 128 --lr 0.05 \
                --weight-decay 5e-4 --schedule cosine --eval-every "$EVAL_EVERY" "${COMMON[@]}" \
                --out "$OUT/ssldeq-resnet8-$s"
            run "$OUT/ssldeqft-resnet8-$s" "$KD" train --model resnet8 \
                --init-ckpt "$OUT/ssldeq-resnet8-$s/last.safetensors" --labels "$frac" --seed "$seed" \
                --batch-size 64 --lr 0.005 --weight-decay 5e-4 --schedule cosine --epochs "$SSLD_FT_EPOCHS" \
                --eval-every "$EVAL_EVERY" "${COMMON[@]}" --out "$OUT/ssldeqft-resnet8-$s"
        fi
        if [ -f "$OUT/dogo-resnet8/encoder.safetensors" ]; then
            run "$OUT/lin-dogo-resnet8-$s" "$KD" eval --linear --ckpt "$OUT/dogo-resnet8/encoder.safetensors" \
                --labels "$frac" --seed "$seed" --data "$DATA" --threads "$THREADS" --out "$OUT/lin-dogo-resnet8-$s"
        fi
    done
done

# The table: last-epoch test top-1, mean +- std over seeds, written into
# DOC (docs/RESULTS.md) between the "few-labels" markers (tools/results.sh
# keeps that section) and printed.
DOC=${DOC:-docs/RESULTS.md}
/usr/bin/python3 - "$OUT" "$FRACS" "$SEEDS" "$DOC" "$PT_EPOCHS" "$D_EPOCHS" "$FT_EPOCHS" "$FT_EPOCHS_10" \
    "$EVAL_EVERY" "$SSLD_FT_EPOCHS" "$("$KD" --version)" <<'EOF'
import json, os, platform, statistics, sys, time
out, fracs, seeds, doc, pt, de, ft, ft10, ev, sft, version = sys.argv[1:]
fracs, seeds = fracs.split(), seeds.split()
def summ(d):
    p = os.path.join(out, d, "summary.json")
    return json.load(open(p)) if os.path.exists(p) else None
def top1(d):
    s = summ(d)
    return None if s is None else float(s["top1"])
def wall(d):
    s = summ(d)
    return None if s is None else float(s.get("wall_s", 0))
def vals(prefix, frac):
    v = [top1(f"{prefix}-p{frac.rstrip('%')}-s{s}") for s in seeds]
    return [x for x in v if x is not None]
def cell(prefix, frac):
    v = vals(prefix, frac)
    if not v:
        return "-"
    if len(v) == 1:
        return "%.2f (1 seed)" % v[0]
    return "%.2f +- %.2f (%d seeds)" % (statistics.mean(v), statistics.stdev(v), len(v))
def wcell(prefix, frac):
    w = [wall(f"{prefix}-p{frac.rstrip('%')}-s{s}") for s in seeds]
    w = [x for x in w if x is not None]
    return "%.0f" % statistics.mean(w) if w else "-"
rows = [("resnet8 trained on the labels alone", "sup-resnet8"),
        ("SimCLR resnet8, linear probe on the labels", "lin-simclr-resnet8"),
        ("SimCLR resnet8, kNN (k 20) with the labeled images as the bank", "knn20-simclr-resnet8"),
        ("MoCo v2 resnet8, linear probe on the labels", "lin-moco-resnet8"),
        ("SimCLRv2 step 2: resnet20 pretrained, fine-tuned on the labels (the teacher)", "ft-resnet20"),
        ("SimCLRv2 step 3: distilled into resnet8 on all 60000 images", "distill-resnet8"),
        ("SimCLRv2 step 3 with the labeled term (simclrv2.labeled_weight 1)", "distilllab-resnet8"),
        ("SimCLRv2 step 2 from the head's first layer (ft_proj_selector 1, the paper's 1% setting)", "ft1-resnet20"),
        ("SimCLRv2 step 3 from that teacher: distilled into resnet8 on all 60000 images", "distill1-resnet8"),
        ("SEED resnet20 -> resnet8, linear probe on the labels", "lin-seed-resnet8"),
        ("SSLD: fine-tuned resnet20 -> resnet8 on labeled + selected images", "ssld-resnet8"),
        ("SSLD, then a short fine-tune on the labels (lr 0.005, %s epochs)" % sft, "ssldft-resnet8"),
        ("SSLD with the SimCLRv2 distillation's budget (as many images seen as %s epochs on 60000)" % de,
         "ssldeq-resnet8"),
        ("SSLD with that budget, then the short fine-tune on the labels", "ssldeqft-resnet8"),
        ("DoGo: resnet8 with a resnet8 peer, linear probe on the labels", "lin-dogo-resnet8")]
L = ["<!-- few-labels -->", "## Few labels (Fashion-MNIST, the 60000 training images without labels)", "",
     "Generated by `tools/few_labels.sh` on %s with %s (%s; %d CPUs). Edit the script, not this section." % (
         time.strftime("%Y-%m-%d %H:%M"), version, platform.machine(), os.cpu_count()), "",
     "Test top-1 (%%) on the 10000 test images, last epoch, mean +- sample std over seeds %s (the seed draws "
     "the label subset, the initialisation and the data order; the self-supervised pretraining runs once, "
     "seed 0). Pretraining %s epochs, distillation %s epochs, fine-tuning and training on the labels %s "
     "epochs with 1%% labels, %s with 10%% (the paper's 60 and 30). Wall times are one run's on the 2-core machine (runs that shared it with other jobs took longer). "
     "SSLD trains the same epochs on the labeled images plus at most 1000 selected per class (about 10,600 "
     "images with 1%% labels), so it takes several times fewer steps than the SimCLRv2 distillation on 60,000; "
     "the rows 'with the SimCLRv2 distillation's budget' train it for as many images seen (ceil(%s x 60000 / "
     "selection) epochs)." % (", ".join(seeds), pt, de, ft, ft10, de), "",
     "| model | " + " | ".join(f"{f} labels" for f in fracs) + " | wall s / run (%s) |" % " / ".join(fracs),
     "|---|" + "---|" * len(fracs) + "---|"]
for name, prefix in rows:
    if all(not vals(prefix, f) for f in fracs):
        continue
    L.append(f"| {name} | " + " | ".join(cell(prefix, f) for f in fracs) + " | " +
             " / ".join(wcell(prefix, f) for f in fracs) + " |")
L.append("")
for d, what in (("knn-simclr-resnet8", "SimCLR resnet8"), ("knn-simclr-resnet20", "SimCLR resnet20")):
    s = summ(d)
    if s:
        L.append("- %s encoder, kNN (k 200, T 0.07) with all 60000 training labels as the bank (representation "
                 "quality, not a few-label number): %.2f%%." % (what, s["top1"]))
for d, what in (("simclr-resnet20", "SimCLR resnet20"), ("simclr-resnet8", "SimCLR resnet8"),
                ("moco-resnet8", "MoCo v2 resnet8"), ("seed-resnet8", "SEED"), ("dogo-resnet8", "DoGo")):
    s = summ(d)
    if s:
        L.append("- %s pretraining: %.0f s (%.0f img/s)." % (what, s.get("wall_s", 0), s.get("images_per_s", 0)))
for f, dname in [(f, d) for f in fracs for d in ("distill-resnet8", "distill1-resnet8")]:
    a, b = vals(dname, f), vals("sup-resnet8", f)
    if len(a) > 1 and len(b) > 1:
        gap = statistics.mean(a) - statistics.mean(b)
        sd = max(statistics.stdev(a), statistics.stdev(b))
        sel = "ft_proj_selector 1" if dname.startswith("distill1") else "ft_proj_selector 0"
        L.append("- %s labels: the distilled resnet8 (%s) is %+.2f points from resnet8 on the labels alone (%s one "
                 "std of %.2f)." % (f, sel, gap, "beyond" if abs(gap) > sd else "within", sd))
for f in fracs:
    a, b = vals("ft-resnet20", f), vals("sup-resnet8", f)
    if len(a) > 1 and len(b) > 1:
        L.append("- %s labels: the fine-tuned resnet20 teacher is %+.2f points from resnet8 on the labels alone; "
                 "a student distilled without labels can at best approach its teacher." % (
                     f, statistics.mean(a) - statistics.mean(b)))
L += ["", "Commands: `PT_EPOCHS=%s D_EPOCHS=%s FT_EPOCHS=%s FT_EPOCHS_10=%s EVAL_EVERY=%s SSLD_FT_EPOCHS=%s SEEDS=\"%s\" "
      "FRACS=\"%s\" bash tools/few_labels.sh` (each step's command line is in runs/few_labels/log.txt; README "
      "\"Few labels\" lists them)." % (pt, de, ft, ft10, ev, sft, " ".join(seeds), " ".join(fracs)),
      "<!-- /few-labels -->"]
section = "\n".join(L) + "\n"
print(section)
sys.path.insert(0, "tools")
from doc_section import replace_section  # noqa: E402
replace_section(doc, "few-labels", section)
EOF
