#!/usr/bin/env bash
# Real-photo fine-tune of the shipped members, then the fusion head and the real-photo protocol against the
# shipped checkpoint. The candidate lands in $OUT/fusion/model.
#   DATA=../shared/data OUT=runs/real MINUTES=15 bash scripts/finetune_real.sh
#   RECIPE=posed WISE=1 EPOCHS=3 DATA=../shared/data OUT=runs/posed MINUTES=40 bash scripts/finetune_real.sh
# Each member: warm start from its shipped weights, a fresh cosine schedule from LR over EPOCHS (cut at MINUTES),
# checkpoint chosen by (PublicTest + CK+48 held-out subjects) / 2.
#   RECIPE=real (default): FER2013 Training only, --augment real (shift, contrast/brightness/gamma, blur, down-up
#     sampling, JPEG, noise, random erasing) with wider rotation/zoom.
#   RECIPE=posed: FER2013 Training plus the training subjects of CK+48 and JAFFE (10% of each epoch's draws), the
#     shipped fusion's cached logits as soft targets for the FER2013 faces (computed once, shared by the members;
#     DISTILL=self: each member's own shipped weights as its teacher, learning without forgetting, so the members
#     stay as different from each other as before; DISTILL=none: hard labels only).
# WISE=1 fuses each member interpolated with its start (WiSE-FT, python -m fer_models.interpolate) instead;
#   ALPHAS=0,0.5,0.75,1 sets the grid of interpolation weights it scores. WISE=fusion chooses the members' weights
#   together, by the fused model's scores (python -m fer_models.interpolate_fusion; FUSION_DROP, default 0.003, is
#   the most fused PublicTest it may lose); its fusion and protocol land in $OUT/fusion_fwise, $OUT/protocol_fwise.json.
# UNTIL=members stops before the fusion head, UNTIL=fusion before the protocol.
# Every stage is resumable (--resume): rerun the same command after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data}"; OUT="${OUT:-runs/real}"; BASE="${BASE:-checkpoints}"
MINUTES="${MINUTES:-15}"; LR="${LR:-0.01}"; EPOCHS="${EPOCHS:-4}"; RECIPE="${RECIPE:-real}"
DISTILL="${DISTILL:-fusion}"; MEMBERS="${MEMBERS:-resnet18 vgg19 vgg19_cbam}"; WISE="${WISE:-0}"
case "$DISTILL" in fusion|self|none) ;; *) echo "DISTILL must be fusion, self or none, not $DISTILL" >&2; exit 2 ;; esac
case "$WISE" in 0|1|fusion) ;; *) echo "WISE must be 0, 1 or fusion, not $WISE" >&2; exit 2 ;; esac
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
case "$RECIPE" in
  real) FT="--augment real --rotation 15 --scale 0.15" ;;
  posed) FT="--posed ckplus48,jaffe --posed-share 0.1"
         if [ "$DISTILL" = fusion ]; then FT="$FT --distill-from $BASE"; fi ;;
  *) echo "RECIPE must be real or posed, not $RECIPE" >&2; exit 2 ;;
esac
FT="$FT --select-on public+ckplus48 --lr $LR --warmup 0.05 --epochs $EPOCHS"
FT="$FT --max-minutes $MINUTES --save-every-minutes 3 --skip-final-eval --resume ${EXTRA:-}"
CACHE=""   # the teacher's logits, computed by the first member and copied to the next
for m in $MEMBERS; do
  if [ -n "$CACHE" ] && [ ! -e "$OUT/$m/teacher_logits.safetensors" ]; then
    mkdir -p "$OUT/$m"; cp "$CACHE"/teacher_logits.safetensors "$CACHE"/teacher_logits.json "$OUT/$m/"
  fi
  SELF=""; if [ "$RECIPE" = posed ] && [ "$DISTILL" = self ]; then SELF="--distill-from $OUT/base/$m"; fi
  python -m fer_models.train --arch "$m" --data "$DATA" --init-from "$OUT/base/$m" --output "$OUT/$m" $FT $SELF
  if [ -z "$SELF" ] && [ -e "$OUT/$m/teacher_logits.safetensors" ]; then CACHE="$OUT/$m"; fi
done
if [ "${UNTIL:-}" = members ]; then exit 0; fi
ORDER="vgg19 resnet18 vgg19_cbam"   # the fusion's member order
M=""; F=""   # the fused members' directories, and the fusion's and protocol's suffix
case "$WISE" in
  0) for m in $ORDER; do M="$M,$OUT/$m/best"; done ;;
  1)  # each member's weights interpolated with its start (python -m fer_models.interpolate), one at a time
    for m in $MEMBERS; do
      if [ ! -f "$OUT/${m}_wise/best/model.safetensors" ]; then
        python -m fer_models.interpolate "$OUT/base/$m" "$OUT/$m/best" --data "$DATA" --output "$OUT/${m}_wise" ${ALPHAS:+--alphas "$ALPHAS"}
      fi
    done
    for m in $ORDER; do M="$M,$OUT/${m}_wise/best"; done ;;
  fusion)  # the members' weights chosen together by the fused model (python -m fer_models.interpolate_fusion)
    F=_fwise; S0=""; S1=""
    for m in $ORDER; do S0="$S0,$OUT/base/$m"; S1="$S1,$OUT/$m/best"; M="$M,$OUT/fusion_wise/$m/best"; done
    if [ ! -f "$OUT/fusion_wise/search.json" ]; then
      python -m fer_models.interpolate_fusion --start "${S0#,}" --finetuned "${S1#,}" --data "$DATA" \
        --output "$OUT/fusion_wise" ${ALPHAS:+--alphas "$ALPHAS"} --max-public-drop "${FUSION_DROP:-0.003}"
    fi ;;
esac
python -m fer_models.train --arch fusion --members "${M#,}" \
  --data "$DATA" --output "$OUT/fusion$F" --head-train-faces 8000 --resume ${FUSION_EXTRA:-}
if [ "${UNTIL:-}" = fusion ]; then exit 0; fi
python -m fer_models.protocol "$OUT/fusion$F/model" --data "$DATA" --baseline "$BASE" --out "$OUT/protocol$F.json"
