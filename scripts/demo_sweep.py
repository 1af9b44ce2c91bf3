"""Run several `linmu demo` recipes side by side (e.g. on a GPU machine) and print one table of the students.

    python scripts/demo_sweep.py --out /tmp/sweep --jobs 8 --timeout 540 \
        base="lengths=16" text4="lengths=16;recipe=12.align_text_weight=4" gate="lengths=16;ablation=fusion-gate"

Each NAME=SETTINGS runs `python -m linmu.cli demo --out OUT/NAME --settings SETTINGS` (an ``ablation=NAME`` item in
SETTINGS becomes ``--ablation NAME``; threads per process:
``--threads``) with a wall-clock limit; runs that did not finish are listed as such. Writes OUT/summary.json and prints
a markdown table (overall and per task type of the student at both clip lengths, Δ to the teacher, stage seconds).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ablation_table import SHORT  # the task abbreviations of the ablation table (scripts/ is on sys.path)
from linmu.synthetic import TASKS


def demo_args(spec: str) -> list[str]:
    """SETTINGS -> `linmu demo` arguments; an ``ablation=NAME`` item becomes ``--ablation NAME``."""
    items = [x.strip() for x in spec.split(";") if x.strip()]
    ablation = [x.partition("=")[2] for x in items if x.startswith("ablation=")]
    rest = ";".join(x for x in items if not x.startswith("ablation="))
    return ["--settings", rest] + (["--ablation", ablation[-1]] if ablation else [])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=540, help="seconds for the whole sweep")
    ap.add_argument("variants", nargs="+", help="NAME=SETTINGS")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [v.partition("=")[::2] for v in args.variants]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=os.getcwd())
    t0, running, done = time.time(), {}, {}
    while todo or running:
        while todo and len(running) < args.jobs:
            name, spec = todo.pop(0)
            log = open(out / f"{name}.log", "w")
            running[name] = subprocess.Popen([sys.executable, "-m", "linmu.cli", "demo", "--out", str(out / name),
                                              *demo_args(spec)], stdout=log, stderr=subprocess.STDOUT, env=env)
        time.sleep(2)
        for name, p in list(running.items()):
            if p.poll() is not None:
                done[name] = p.returncode
                del running[name]
                print(f"[{time.time() - t0:.0f}s] {name} exit {p.returncode}", flush=True)
        if time.time() - t0 > args.timeout:
            for name, p in running.items():
                p.kill()
                done[name] = "timeout"
            running, todo = {}, []
    rows = {}
    for name, rc in done.items():
        f = out / name / "report.json"
        rows[name] = json.loads(f.read_text()) if f.is_file() else {"exit": rc}
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    table(rows)


def table(rows):
    tasks = list(TASKS)
    head = ["run", "stage s"] + [f"{w} {n}" for n in ("16", "128") for w in ("S", "Δ")]
    head += [f"{SHORT[t]}{n}" for n in ("16", "128") for t in tasks]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, r in rows.items():
        if "accuracy" not in r:
            print(f"| {name} | {r.get('exit')} |")
            continue
        a = r["accuracy"]
        cells = [name, "+".join(f"{s['seconds']:.0f}" for s in r["stages"])]
        for n in ("16", "128"):
            cells += [f"{a['student'][n]['accuracy']:.3f}", f"{a['student'][n]['accuracy'] - a['teacher'][n]['accuracy']:+.3f}"]
        for n in ("16", "128"):
            cells += [f"{a['student'][n]['per_task'][t]:.2f}" for t in tasks]
        print("| " + " | ".join(cells) + " |")
    any_r = next((r for r in rows.values() if "accuracy" in r), None)
    if any_r:
        t = any_r["accuracy"]["teacher"]
        print("teacher: " + ", ".join(f"{n}: {t[n]['accuracy']:.3f} (" + " ".join(
            f"{SHORT[k]} {t[n]['per_task'][k]:.2f}" for k in tasks) + ")" for n in ("16", "128")))


if __name__ == "__main__":
    main()
