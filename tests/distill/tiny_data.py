"""A tiny in-memory distillation data set (equal-length Qwen2-VL samples) and a run script for kill tests."""

import sys

import torch

from linmu.tiny import tiny_qwen2_vl, tiny_qwen2_vl_inputs

MMATE = dict(window=(2, 2, 2), text_window=8, chunk_size=16)


class TinySet(torch.utils.data.Dataset):
    """Samples of equal length: text, an image, text, a video, text; the last 4 tokens are the answer."""

    def __init__(self, model, n=8):
        self.items = []
        for i in range(n):
            s = tiny_qwen2_vl_inputs(model, images=((1, 4, 4),), videos=((2, 4, 4),), text_len=4, seed=100 + i)
            labels = torch.full_like(s["input_ids"], -100)
            labels[:, -4:] = s["input_ids"][:, -4:]
            s["labels"] = labels
            self.items.append(s)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(items):
    out = {}
    for k in items[0]:
        out[k] = torch.cat([it[k] for it in items])
    return out


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
