#!/usr/bin/env bash
# The full `linmu bench` sweep in one device call (about 8 minutes on one H200): Qwen2.5-VL-7B shapes with random bf16
# weights built on the GPU, 8K..256K tokens (text, one video span, text), teacher (flash SDPA) vs LinMU vs the
# no-attention floor; TTFT, decode at batch 1 and at the largest batch that fits, CUDA graphs on both decoders.
# Needs the fla-core wheel in .whl/ (carried). Writes bench_<preset>.{json,png,log} and checks.log under $OUT.
#   PRESET=qwen2.5-vl-3b TOKENS=8192,32768 bash scripts/bench_gpu.sh --repeats 2     # a smaller check
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PRESET=${PRESET:-qwen2.5-vl-7b}
TOKENS=${TOKENS:-8192,16384,32768,65536,131072,262144}
python3 -c "import torch, transformers, fla; print('torch', torch.__version__, 'transformers', transformers.__version__, 'fla', fla.__version__, torch.cuda.get_device_name())"
# the decode kernels the numbers rest on: split-KV teacher attention, graph == eager decode, the fused SSD step; a
# failing fused step is switched off (the student then decodes with torch ops, and the output says so)
timeout 45 python3 -m pytest -q -rA -p no:cacheprovider -m gpu tests/inference/test_decode_state.py tests/bench \
    -k "split or graph or fused" 2>&1 | tee "$OUT/checks.log" | grep -E "^(PASSED|FAILED|ERROR)|passed|failed"
if ! grep -q "^PASSED.*test_fused" "$OUT/checks.log" || grep -qE "^(FAILED|ERROR).*test_fused" "$OUT/checks.log"; then
    export LINMU_FUSED_SSD_STEP=0
    echo "the fused SSD decode step did not pass its GPU test: LINMU_FUSED_SSD_STEP=0 (torch step)"
fi
# the whole sweep stays inside one 10-minute device command
timeout "${LIMIT:-530}" python3 -m linmu.cli bench --preset "$PRESET" --tokens "$TOKENS" --decode-steps 8 \
    --out "$OUT/bench_${PRESET}.json" "$@" 2>&1 | tee "$OUT/bench_${PRESET}.log"
