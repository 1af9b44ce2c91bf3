"""Train the demo teacher (reproducible from its seed) and write it to --out.

    python scripts/train_demo_teacher.py --out runs/teacher --steps 12000 --time-budget 540 --workers 14
    python scripts/train_demo_teacher.py --out runs/teacher --resume runs/teacher/train_state.pt --time-budget 540

A long schedule can run as several time-budgeted jobs (--resume continues the schedule from train_state.pt). The
result ships in linmu/demo/assets/teacher (bf16 safetensors + tokenizer + teacher_report.json). `linmu demo
--retrain-teacher` runs the same function on whatever device is there.
"""

import argparse
import json

from linmu.demo.teacher import TASK_WEIGHTS, train_teacher

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--steps", type=int, default=12000)
p.add_argument("--batch-size", type=int, default=128)
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--time-budget", type=float, default=None, help="seconds; stop early and save a resumable state")
p.add_argument("--workers", type=int, default=8)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--eval-every", type=int, default=1000)
p.add_argument("--n-val", type=int, default=540)
p.add_argument("--resume", default=None)
p.add_argument("--extend-to", type=int, default=None, help="with --resume: set the schedule length to this many steps")
p.add_argument("--resume-lr", type=float, default=None, help="with --resume: new peak learning rate")
p.add_argument("--calibrate", action="store_true", help="fit the step count to --plan-seconds (or --time-budget)")
p.add_argument("--plan-seconds", type=float, default=None, help="training time the schedule is laid out for")
p.add_argument("--weights", default=None,
               help='training mix as JSON {"task": weight}, or "default" for TASK_WEIGHTS; without it a resumed run '
                    'keeps its saved mix')
p.add_argument("--last", action="store_true", help="export the last weights instead of the best on validation")
a = p.parse_args()
report = train_teacher(a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, time_budget_s=a.time_budget,
                       workers=a.workers, seed=a.seed, eval_every=a.eval_every, n_val=a.n_val, resume=a.resume, extend_to=a.extend_to, resume_lr=a.resume_lr, calibrate=a.calibrate, plan_s=a.plan_seconds,
                       task_weights=(TASK_WEIGHTS if a.weights == "default" else json.loads(a.weights)) if a.weights else None, keep_best=not a.last,
                       log=lambda m: print(m, flush=True))
print(json.dumps({k: v for k, v in report.items() if k != "history"}))
print("final validation:", json.dumps(report["history"][-1]))
