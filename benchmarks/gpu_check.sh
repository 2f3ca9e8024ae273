#!/usr/bin/env bash
# One prepared GPU check (issue 16): seconds per extraction of ResNet-50 and VGG-19 (random weights,
# 20 images at 224 px, 300 steps) against the paper's RTX 6000 figures (55 s, 90 s), and the
# throughput per task when 1, 4 and 16 tasks share a forward pass. About 6 minutes on one H100/H200.
#
# Without a CUDA GPU it falls back to a short CPU run of the same script (64 px, a few timed steps,
# the 300-step extraction projected, not run), so the script itself is tested on any machine:
#     bash benchmarks/gpu_check.sh            # from the repository root
#     PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#     MODELS="test_resnet:55" bash benchmarks/gpu_check.sh   # other models (spec:paper seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
DEVICE=$("$PYTHON" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
if [ "$DEVICE" = cuda ]; then
  "$PYTHON" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
  COMMON=(--device cuda --images 20 --image-size 224 --steps 300 --timed-steps 10 --tasks 1,4,16)
else
  echo "no CUDA GPU: CPU fallback (64 px, projected extraction; figures are not GPU figures)"
  COMMON=(--device cpu --images 4 --image-size 64 --steps 300 --timed-steps 2 --tasks 1,2 --project)
fi
for entry in ${MODELS:-resnet50:55 vgg19:90}; do
  echo "== ${entry%%:*} =="
  "$PYTHON" benchmarks/bench_extract.py --model "${entry%%:*}" --paper-seconds "${entry##*:}" "${COMMON[@]}"
done
