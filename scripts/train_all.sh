#!/usr/bin/env bash
# Train the three backbones and the fusion head, then evaluate; the candidate lands in $OUT/fusion/model.
#   PRESET=gpu DATA=... OUT=... bash scripts/train_all.sh              # one GPU: what made checkpoints/ (H200)
#   DATA=../shared/data OUT=runs bash scripts/train_all.sh            # the CPU recipe of the previous checkpoint
#     (WIDTH, EPOCHS, MINUTES override; EXTRA/FUSION_EXTRA add flags, e.g. EXTRA="--limit 512" for a smoke run)
# Every stage is resumable (--resume): rerun the same command after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data}"; OUT="${OUT:-runs}"; PRESET="${PRESET:-cpu}"
train() { python -m fer_models.train --data "$DATA" --skip-final-eval --resume "$@"; }
if [ "$PRESET" = gpu ]; then
  # One GPU, the three members trained at once: these small models leave a GPU idle while one process launches
  # kernels, so three processes keep it busy. Each runs on a fixed time budget (the cosine schedule follows time),
  # so it ends fully annealed whatever the card's speed. Width 0.75: the fp16 fusion is 58 MB (full width: 103 MB).
  GPU="--width ${WIDTH:-0.75} --epochs ${EPOCHS:-300} --batch-size 256 --lr 0.1 --max-minutes ${MINUTES:-6}"
  GPU="$GPU --save-every-minutes 2 --num-threads 4 ${EXTRA:-}"
  mkdir -p "$OUT"
  python -c "import sys; from fer_models.training.data import load_dataset; load_dataset(sys.argv[1])" "$DATA"  # decode once
  train --arch vgg19 $GPU --dropout 0.2 --output "$OUT/vgg19" >"$OUT/vgg19.log" 2>&1 & P1=$!
  train --arch vgg19_cbam $GPU --dropout 0.2 --output "$OUT/vgg19_cbam" >"$OUT/vgg19_cbam.log" 2>&1 & P2=$!
  train --arch resnet18 $GPU --output "$OUT/resnet18" >"$OUT/resnet18.log" 2>&1 & P3=$!
  wait $P1 && wait $P2 && wait $P3 || { tail -n 20 "$OUT"/*.log; exit 1; }
  tail -n 3 "$OUT"/*.log
  VGG="$OUT/vgg19"; RES="$OUT/resnet18"; CBAM="$OUT/vgg19_cbam"
else
  # The previous, CPU-trained checkpoint (fusion 69.6% ten-crop). What fits a 2-core CPU (no AMX) across two
  # sessions: a first run per member (session 1), then a warm start
  # from its PublicTest-best weights with a fresh SGD cosine schedule from lr 0.02 over a time budget (session 2).
  train --arch vgg19 --width 0.375 --dropout 0.2 --epochs 12 --max-minutes 30 --lr 0.05 --output "$OUT/vgg19"
  train --arch vgg19_cbam --width 0.25 --dropout 0.2 --epochs 8 --max-minutes 25 --lr 0.05 --output "$OUT/vgg19_cbam"
  train --arch resnet18 --width 0.25 --epochs 10 --max-minutes 17 --lr 0.05 --output "$OUT/resnet18"
  S2="--epochs 40 --lr 0.02 --warmup 0.03"
  train --arch vgg19_cbam --width 0.25 $S2 --max-minutes 32 --init-from "$OUT/vgg19_cbam/best" --output "$OUT/vgg19_cbam_s2"
  train --arch resnet18 --width 0.25 $S2 --max-minutes 34 --init-from "$OUT/resnet18/best" --output "$OUT/resnet18_s2"
  train --arch vgg19 --width 0.375 $S2 --max-minutes 36 --init-from "$OUT/vgg19/best" --output "$OUT/vgg19_s2"
  # resnet18 was the one member still below 67% ten-crop: a third, short warm start (kept: fusion PublicTest 67.48% vs
  # 67.01% with resnet18_s2; chosen on PublicTest only)
  train --arch resnet18 --width 0.25 --epochs 40 --lr 0.01 --warmup 0.03 --seed 1 --max-minutes 14 \
    --init-from "$OUT/resnet18_s2/best" --output "$OUT/resnet18_s3"
  VGG="$OUT/vgg19_s2"; RES="$OUT/resnet18_s3"; CBAM="$OUT/vgg19_cbam_s2"
fi
python -m fer_models.train --arch fusion --members "$VGG/best,$RES/best,$CBAM/best" \
  --data "$DATA" --output "$OUT/fusion" --head-train-faces 8000 --resume ${FUSION_EXTRA:-}
M="$OUT/fusion/model"
python -m fer_models.evaluate "$M" --data "$DATA/ckplus48" --update-card
python -m fer_models.evaluate "$M" --data "$DATA" --split PrivateTest --subset 500 --update-card
echo "candidate in $M: compare its PrivateTest ten-crop accuracy with checkpoints/results.json before replacing"
