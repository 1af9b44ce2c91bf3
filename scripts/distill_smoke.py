"""A few distillation steps on a small random Qwen2-VL, for checking an accelerate setup (single, DDP, FSDP2).

    accelerate launch --config_file configs/accelerate/fsdp2.yaml scripts/distill_smoke.py --stage 3 --out /tmp/s3

Builds the teacher from a config (seeded, identical on every process; nothing is downloaded), runs the stage on an
in-memory data set, then on the main process loads ``OUT/final`` with ``linmu.load`` and prints the loss per step.
"""

import argparse
import json
import logging
from pathlib import Path

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import linmu
    from linmu.distill.config import DistillConfig
    from linmu.distill.engine import run_stage
    from linmu.tiny import TinyDistillSet, stack_collate, tiny_qwen2_vl, tiny_qwen2_vl_inputs

    teacher = tiny_qwen2_vl(seed=0, hidden_size=args.hidden, layers=args.layers, heads=8, kv_heads=2)
    cfg = DistillConfig(stage=args.stage, output_dir=args.out, mmate=dict(window=(2, 2, 2), text_window=8),
                        steps=args.steps, batch_size=2, lr=5e-3, save_every=4, w_kd=1.0, w_hidden=1.0,
                        lora_r=8, lora_alpha=16, tensorboard=False, warmup_steps=0, schedule="constant")
    final = run_stage(cfg, teacher=teacher, dataset=TinyDistillSet(teacher, 16), collate_fn=stack_collate)
    from accelerate import PartialState

    if PartialState().is_main_process:
        losses = [round(json.loads(l)["loss"], 5) for l in (Path(args.out) / "log.jsonl").read_text().splitlines()]
        student = linmu.load(final)
        inputs = tiny_qwen2_vl_inputs(student)
        with torch.no_grad():
            logits = student(**inputs).logits
        print(json.dumps({"stage": args.stage, "losses": losses, "decreased": losses[-1] < losses[0],
                          "final": str(final), "loaded": type(student).__name__,
                          "logits_finite": bool(torch.isfinite(logits).all()),
                          "checkpoints": sorted(p.name for p in Path(args.out).glob("checkpoint-*"))}))


if __name__ == "__main__":
    main()
