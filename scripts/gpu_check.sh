#!/usr/bin/env bash
# Every GPU check in one run, for a GPU host lent for a few minutes: see scripts/gpu_check.py.
#   Here, once:  mkdir -p .whl && echo /.whl/ >> .git/info/exclude && pip download --no-deps -d .whl facenet-pytorch==2.5.3
#   There:       bash scripts/gpu_check.sh          (figures in $OUT/gpu_check.json)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu-check}
# The host's image has torch, OpenCV, pandas, pyarrow...; facenet-pytorch (pure Python) travels as a wheel.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 scripts/gpu_check.py --photos "${PHOTOS:-1000}" --device "${DEVICE:-cuda}" --out "$OUT"
