#!/usr/bin/env bash
# One device call for the foundation checks: the test suite on the GPU stack (incl. GPU-only tests), then the
# layer scaling benchmark. Needs the fla-core wheel in .whl/ (carried). Full logs go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import torch, triton, transformers, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'fla', fla.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.log" | tail -15
python3 -m linmu.bench.layer_scaling --device cuda --tokens ${TOKENS:-8192,16384,32768,65536,131072} \
    --json-out "$OUT/layer_scaling.json" 2>&1 | tee "$OUT/layer_scaling.log" | tail -12
