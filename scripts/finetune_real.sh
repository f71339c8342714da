#!/usr/bin/env bash
# Real-photo fine-tune (issue 10) of the shipped members on FER2013 Training only, then the fusion head and the
# real-photo protocol against the shipped checkpoint. The candidate lands in $OUT/fusion/model.
#   DATA=../shared/data OUT=runs/real MINUTES=15 bash scripts/finetune_real.sh
# Each member: warm start from its shipped weights, --augment real (shift, contrast/brightness/gamma, blur,
# down-up sampling, JPEG, noise, random erasing) with wider rotation/zoom, a fresh cosine schedule from LR on a
# MINUTES budget, checkpoint chosen by (PublicTest + CK+48) / 2. CK+48 and JAFFE are never trained on.
# Every stage is resumable (--resume): rerun the same command after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data}"; OUT="${OUT:-runs/real}"; BASE="${BASE:-checkpoints}"
MINUTES="${MINUTES:-15}"; LR="${LR:-0.01}"
mkdir -p "$OUT/base"
python - "$BASE" "$OUT/base" <<'PY'
import sys
from pathlib import Path
import fer_models
fusion = fer_models.load_model(sys.argv[1])
for name, member in fusion.members.items():
    if not (Path(sys.argv[2]) / name / "model.safetensors").is_file():
        member.save_pretrained(Path(sys.argv[2]) / name)
PY
FT="--augment real --rotation 15 --scale 0.15 --select-on public+ckplus48 --lr $LR --warmup 0.05 --epochs 4"
FT="$FT --max-minutes $MINUTES --save-every-minutes 3 --skip-final-eval --resume ${EXTRA:-}"
for m in resnet18 vgg19 vgg19_cbam; do
  python -m fer_models.train --arch "$m" --data "$DATA" --init-from "$OUT/base/$m" --output "$OUT/$m" $FT
done
python -m fer_models.train --arch fusion --members "$OUT/vgg19/best,$OUT/resnet18/best,$OUT/vgg19_cbam/best" \
  --data "$DATA" --output "$OUT/fusion" --head-train-faces 8000 --resume ${FUSION_EXTRA:-}
python -m fer_models.protocol "$OUT/fusion/model" --data "$DATA" --baseline "$BASE" --out "$OUT/protocol.json"
