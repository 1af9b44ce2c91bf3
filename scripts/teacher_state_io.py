"""Split / join a teacher train_state.pt into pieces under 16 MiB (the device machine returns files up to that size).

    python scripts/teacher_state_io.py split runs/teacher/train_state.pt OUTDIR   # -> OUTDIR/state_{0,1,2}.pt
    python scripts/teacher_state_io.py join OUTDIR runs/teacher/train_state.pt
"""

import sys
from pathlib import Path

import torch

cmd, src, dst = sys.argv[1:4]
if cmd == "split":
    s = torch.load(src, weights_only=False)
    opt = s.pop("optimizer")
    avg = {k: v["exp_avg"] for k, v in opt["state"].items()}
    sq = {k: v["exp_avg_sq"] for k, v in opt["state"].items()}
    rest = {k: {n: t for n, t in v.items() if n not in ("exp_avg", "exp_avg_sq")} for k, v in opt["state"].items()}
    Path(dst).mkdir(parents=True, exist_ok=True)
    torch.save(dict(s, opt_rest=rest, param_groups=opt["param_groups"]), Path(dst) / "state_0.pt")
    torch.save(avg, Path(dst) / "state_1.pt")
    torch.save(sq, Path(dst) / "state_2.pt")
elif cmd == "join":
    s = torch.load(Path(src) / "state_0.pt", map_location="cpu", weights_only=False)
    avg, sq = (torch.load(Path(src) / f"state_{i}.pt", map_location="cpu") for i in (1, 2))
    rest = s.pop("opt_rest")
    state = {k: dict(rest[k], exp_avg=avg[k], exp_avg_sq=sq[k]) for k in rest}
    s["optimizer"] = {"state": state, "param_groups": s.pop("param_groups")}
    torch.save(s, dst)
else:
    raise SystemExit(f"unknown command {cmd!r}: split or join")
