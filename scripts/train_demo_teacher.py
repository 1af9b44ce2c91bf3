"""Train the demo teacher (reproducible from its seed) and write it to --out.

    python scripts/train_demo_teacher.py --out linmu/demo/assets/teacher --time-budget 480 --workers 12

On a GPU this takes minutes; the result ships in linmu/demo/assets/teacher. `linmu demo --retrain-teacher` runs the
same function on whatever device is there.
"""

import argparse

from linmu.demo.teacher import train_teacher

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--steps", type=int, default=40000)
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--time-budget", type=float, default=None, help="seconds; calibrates the step count")
p.add_argument("--workers", type=int, default=8)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--eval-every", type=int, default=2000)
a = p.parse_args()
report = train_teacher(a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, time_budget_s=a.time_budget,
                       workers=a.workers, seed=a.seed, eval_every=a.eval_every, log=lambda m: print(m, flush=True))
print({k: v for k, v in report.items() if k != "history"})
print("final validation:", report["history"][-1])
