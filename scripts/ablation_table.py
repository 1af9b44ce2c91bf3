"""Markdown table of `linmu demo --ablation NAME` runs: one row per run directory (its report.json).

    for a in none flex-only swin-only; do linmu demo --ablation $a --out runs/abl/$a --settings "..."; done
    python scripts/ablation_table.py runs/abl/*
"""

import json
import sys
from pathlib import Path

from linmu.synthetic import TASKS

SHORT = {"flash_count": "fc", "flash_order": "fo", "colour_at_cue": "cc", "relation_at_cue": "rc",
         "position_at_cue": "pc", "image_colour": "ic", "image_where": "iw", "image_position": "ip", "image_count": "in"}


def main():
    rows = []
    for d in sys.argv[1:]:
        f = Path(d) / "report.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())
        rows.append(r)
    if not rows:
        raise SystemExit("no report.json in the given directories")
    lengths = list(rows[0]["accuracy"]["student"])
    head = ["ablation", "steps", "text window", "min"] + [f"{who} {n}" for n in lengths for who in ("teacher", "student", "Δ")]
    head += [f"{SHORT[t]} {n}" for n in lengths for t in TASKS]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        acc = r["accuracy"]
        st = r["settings"]
        cells = [r["ablation"], ",".join(map(str, st["steps"])), str(st.get("text_window", 64)), f"{r['seconds'] / 60:.1f}"]
        for n in lengths:
            t, s = acc["teacher"][n]["accuracy"], acc["student"][n]["accuracy"]
            cells += [f"{t:.3f}", f"{s:.3f}", f"{s - t:+.3f}"]
        for n in lengths:
            cells += [f"{acc['student'][n]['per_task'].get(t, float('nan')):.2f}" for t in TASKS]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
