#!/usr/bin/env bash
# Everything a lent GPU runs, as one prepared command (issue 17's check, then issue 14's walk at
# the GPU budget). The device machines have their own torch and timm but neither Ray nor MLflow:
# pydantic comes as wheels, Fashion-MNIST as its four IDX files, both carried in .gpu/:
#   mkdir -p .gpu/wheels .gpu/fashion-mnist; echo /.gpu/ >> .git/info/exclude
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .gpu/wheels pydantic
#   cp /usr/share/datasets/fashion-mnist/*.gz .gpu/fashion-mnist/
# then, on the device (carry .gpu), with $OUT the folder that comes back:
#   bash benchmarks/gpu_session.sh "$OUT"
# Logs go to files, never through a pipe: a run killed at its time limit still returns them.
set -u
PY=${PYTHON:-python3}
OUT=${1:?usage: gpu_session.sh OUT_DIR [WHEELS_DIR] [FASHION_MNIST_DIR]}
WHEELS=${2:-.gpu/wheels}
FMNIST=$(cd "${3:-.gpu/fashion-mnist}" && pwd)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/pylib:$PWD"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/pylib "$WHEELS"/*.whl > "$OUT/setup.log" 2>&1
fi
"$PY" -c "import torch, timm, lejepa.trainer; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())" || exit 3

timeout 330 "$PY" benchmarks/gpu_check.py --out "$OUT" > "$OUT/gpu_check.log" 2>&1
echo "gpu_check exit $?"
cat "$OUT/gpu_check.md" 2>/dev/null || tail -n 60 "$OUT/gpu_check.log"

timeout 270 "$PY" benchmarks/stability_direct.py --workers 12 --deadline 200 \
    --set "data.root=$FMNIST" data.train_size=10000 optim.batch_size=256 train.epochs=5 train.device=cuda \
    train.compile=eager --title "LeJEPA stability walk on a GPU (195 steps of batch 256)" \
    --out "$OUT/walk" > "$OUT/walk.log" 2>&1
echo "walk exit $?"
sed -n '1,/## Per architecture/p' "$OUT/walk/stability.md" 2>/dev/null || tail -n 30 "$OUT/walk.log"
