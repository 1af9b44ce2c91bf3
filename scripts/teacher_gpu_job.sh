#!/usr/bin/env bash
# One device job of the demo teacher's training: from scratch (STEPS set: a STEPS-step schedule at peak LR) or resumed
# from the split state in .teacher_state/ (carried), train for TIME_BUDGET seconds, evaluate the exported
# (best-on-validation) weights on the test split, and write to $OUT:
# train.log, test.json, teacher.tar (the bf16 teacher directory) and state/state_{0,1,2}.pt (the resumable state).
#   STEPS=17000 LR=1.5e-3 TIME_BUDGET=470 bash scripts/teacher_gpu_job.sh                 # fresh
#   EXTEND_TO=32000 LR=1e-3 TIME_BUDGET=470 WEIGHTS=default bash scripts/teacher_gpu_job.sh  # resumed
set -euo pipefail
export PYTHONPATH=$PWD
: "${EXTEND_TO:=32000}" "${LR:=1e-3}" "${TIME_BUDGET:=470}" "${WEIGHTS:=default}" "${WORKERS:=15}"
nvidia-smi --query-gpu=name --format=csv,noheader
if [ -n "${STEPS:-}" ]; then
    ARGS=(--steps "$STEPS" --lr "$LR")
else
    python scripts/teacher_state_io.py join .teacher_state /tmp/state.pt
    ARGS=(--resume /tmp/state.pt --extend-to "$EXTEND_TO" --resume-lr "$LR" --weights "$WEIGHTS")
fi
python scripts/train_demo_teacher.py --out /tmp/teacher "${ARGS[@]}" --batch-size 128 --time-budget "$TIME_BUDGET" \
    --workers "$WORKERS" --eval-every 1000 2>&1 | grep --line-buffered -v "Loading weights\|Writing model" \
    | tee "$OUT/train.log" | grep "validation\|exporting\|resumed\|mix"
python - <<'PY' | tee "$OUT/test.json"
import json
from linmu.demo.teacher import load_demo_teacher
from linmu.demo.evaluate import accuracy
from linmu.demo.vision_attention import vision_attention
from linmu.synthetic import make_split
m, proc = load_demo_teacher("/tmp/teacher")
m = m.cuda()
with vision_attention(m):
    acc = accuracy(m, proc, make_split("test", 540, 16), batch_size=256)
print(json.dumps({"test_16": acc["accuracy"], "per_task": acc["per_task"]}))
PY
python scripts/teacher_state_io.py split /tmp/teacher/train_state.pt "$OUT/state"
rm /tmp/teacher/train_state.pt
tar -C /tmp -cf "$OUT/teacher.tar" teacher
