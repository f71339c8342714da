#!/usr/bin/env bash
# Train the three backbones and the fusion head, then evaluate and install the result in checkpoints/.
#   DATA=../shared/data OUT=runs bash scripts/train_all.sh            # the CPU recipe that made checkpoints/
#   PRESET=gpu DATA=... OUT=... bash scripts/train_all.sh              # full-width models, long schedules (GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data}"; OUT="${OUT:-runs}"; PRESET="${PRESET:-cpu}"
if [ "$PRESET" = gpu ]; then
  VGG="--width 1.0 --epochs 60 --batch-size 256 --lr 0.1"; CBAM="$VGG"; RES="--width 1.0 --epochs 60 --batch-size 256 --lr 0.1"
else  # what fits a 2-core CPU in one session (see README: measured numbers and what they cost)
  VGG="--width 0.375 --epochs 12 --max-minutes 30 --lr 0.05"
  CBAM="--width 0.25 --epochs 8 --max-minutes 25 --lr 0.05"
  RES="--width 0.25 --epochs 6 --max-minutes 25 --lr 0.05"
fi
python -m fer_models.train --arch vgg19 $VGG --dropout 0.2 --data "$DATA" --output "$OUT/vgg19" --skip-final-eval --resume
python -m fer_models.train --arch vgg19_cbam $CBAM --dropout 0.2 --data "$DATA" --output "$OUT/vgg19_cbam" --skip-final-eval --resume
python -m fer_models.train --arch resnet18 $RES --data "$DATA" --output "$OUT/resnet18" --skip-final-eval --resume
python -m fer_models.train --arch fusion --members "$OUT/vgg19/best,$OUT/resnet18/best,$OUT/vgg19_cbam/best" \
  --data "$DATA" --output "$OUT/fusion" --head-train-faces 8000
M="$OUT/fusion/model"
python -m fer_models.evaluate "$M" --data "$DATA/ckplus48" --update-card
python -m fer_models.evaluate "$M" --data "$DATA" --split PrivateTest --subset 500 --update-card
echo "candidate in $M: compare its PrivateTest ten-crop accuracy with checkpoints/results.json before replacing"
