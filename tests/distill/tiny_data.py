"""A tiny in-memory distillation data set (equal-length Qwen2-VL samples) and a run script for kill tests."""

import sys


from linmu.tiny import TinyDistillSet as TinySet
from linmu.tiny import stack_collate as collate
from linmu.tiny import tiny_qwen2_vl

MMATE = dict(window=(2, 2, 2), text_window=8, chunk_size=16)


def main(output_dir: str, resume: bool) -> None:
    """Run the stage-2 recipe used by the SIGKILL test (called in a subprocess)."""
    from linmu.distill.config import DistillConfig
    from linmu.distill.engine import run_stage

    teacher = tiny_qwen2_vl(seed=11)
    cfg = DistillConfig(stage=2, output_dir=output_dir, mmate=MMATE, steps=8, batch_size=2, grad_accum=2, lr=2e-3,
                        save_every=1, seed=3, warmup_steps=2, tensorboard=False)
    run_stage(cfg, teacher=teacher, dataset=TinySet(teacher, 6), collate_fn=collate, resume=resume)


if __name__ == "__main__":
    main(sys.argv[1], resume=len(sys.argv) > 2 and sys.argv[2] == "--resume")
