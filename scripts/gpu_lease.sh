#!/usr/bin/env bash
# The whole GPU job as one command, for a short lease on a borrowed GPU machine (no internet there, torch preinstalled):
#   DATA=.gpu/data PACK=$OUT bash scripts/gpu_lease.sh
# DATA holds fer2013/fer2013_jpeg.npz and ckplus48/ (a git-ignored copy carried along; np.savez_compressed of the
# shared npz is 45 MB instead of 57, the same JPEG bytes). Runs scripts/train_all.sh PRESET=gpu in /tmp, then packs
# what must come back into PACK as a few files under 16 MiB: the fusion model (split tar), logs and per-run metrics.
# Reassemble with: cat fusion_model.tar.part-* | tar -x
set -uo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-.gpu/data}"; PACK="${PACK:?set PACK to the folder that comes back}"; RUNS="${RUNS:-/tmp/runs}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FER_CACHE_DIR="${FER_CACHE_DIR:-/tmp/fer_cache}"
mkdir -p "$PACK" "$RUNS"
python -c "import os, sys, torch; ok = torch.cuda.is_available()
print('torch', torch.__version__, 'cuda', ok, torch.cuda.get_device_name() if ok else '')
sys.exit(0 if ok or os.environ.get('ALLOW_CPU') else 3)" || {
  echo "no CUDA device: refusing to spend the lease training on CPU (ALLOW_CPU=1 for a smoke run)"; exit 3; }
t0=$(date +%s)
DATA="$DATA" OUT="$RUNS" PRESET=gpu bash scripts/train_all.sh 2>&1 | tee "$RUNS/train_all.log"
rc=${PIPESTATUS[0]}
echo "train_all.sh exit $rc after $(( $(date +%s) - t0 )) s"
# Logs and metrics always come back (small); the fusion model if it was written, else the members' fp16 exports.
(cd "$RUNS" && tar -czf "$PACK/logs.tgz" --ignore-failed-read *.log */metrics.jsonl */train_config.json \
  */model/results.json */model/README.md */model/config.json fusion/model/confusion_matrix.png 2>/dev/null)
if [ -f "$RUNS/fusion/model/model.safetensors" ]; then
  (cd "$RUNS" && tar -cf - fusion/model) | split -b 15M - "$PACK/fusion_model.tar.part-"
else
  (cd "$RUNS" && tar -cf - --ignore-failed-read vgg19/model resnet18/model vgg19_cbam/model 2>/dev/null) \
    | split -b 15M - "$PACK/members_model.tar.part-"
fi
ls -la "$PACK"
exit "$rc"
