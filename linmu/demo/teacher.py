"""The embedded default's teacher: a small Qwen2-VL built from scratch and trained on the synthetic suite.

``train_teacher`` reproduces it from its seed (on a GPU in minutes, or on a CPU slowly); the trained weights ship in
``linmu/demo/assets/teacher`` (bf16 safetensors, a few MB) so the demo normally skips training.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
SHIPPED_TEACHER = Path(__file__).parent / "assets" / "teacher"
TRAIN_FRAMES = 16  # clip length the teacher is trained at; the demo also evaluates at 8x this


def demo_teacher_config(tokenizer, hidden: int = 256, layers: int = 4):
    """A Qwen2-VL of a few million parameters whose vocabulary and special ids are the tokenizer's."""
    from transformers import Qwen2VLConfig

    tid = tokenizer.convert_tokens_to_ids
    heads = hidden // 32
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), max_position_embeddings=8192,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [6, 5, 5]},
                tie_word_embeddings=True)
    vision = dict(depth=2, embed_dim=128, hidden_size=hidden, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=tid("<|image_pad|>"),
                        video_token_id=tid("<|video_pad|>"), vision_start_token_id=tid("<|vision_start|>"),
                        vision_end_token_id=tid("<|vision_end|>"), tie_word_embeddings=True)
    for c in (cfg, cfg.text_config):
        c.bos_token_id = c.eos_token_id = tokenizer.eos_token_id
        c.pad_token_id = tokenizer.pad_token_id
    cfg._attn_implementation = "sdpa"
    return cfg


def demo_tokenizer():
    from ..data.tokenizer import build_tokenizer
    from ..synthetic import vocabulary

    return build_tokenizer(texts=[" ".join(vocabulary())])


def demo_processor(model_config, tokenizer):
    from ..data.qwen_processing import QwenVLProcessor

    # synthetic frames are 56 x 56: keep them at that size (4 merged tokens per temporal pair of frames)
    return QwenVLProcessor.from_model_config(model_config, tokenizer, min_pixels=56 * 56, max_pixels=56 * 56)


class LazySplit(torch.utils.data.Dataset):
    """Example ``i`` of a split, generated on demand and encoded by the processor (for DataLoader workers)."""

    def __init__(self, split: str, n: int, num_frames: int, processor):
        from ..synthetic import TASKS
        from ..synthetic.suite import SPLIT_SEEDS

        self.lo, self.tasks = SPLIT_SEEDS[split][0], list(TASKS)
        self.n, self.num_frames, self.processor = n, num_frames, processor

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        from ..synthetic import generate_example, to_loaded_sample

        k = len(self.tasks)
        ex = generate_example(self.lo + i // k, self.tasks[i % k], self.num_frames)
        return self.processor.encode(to_loaded_sample(ex))

    def collate(self, items):
        return dict(self.processor.pad(items))


def train_teacher(out_dir, *, num_frames: int = TRAIN_FRAMES, steps: int = 20000, batch_size: int = 64,
                  lr: float = 2e-3, pool: int = 200_000, seed: int = 0, device=None, eval_every: int = 1000,
                  n_val: int = 280, time_budget_s: float | None = None, workers: int = 0, log=print) -> dict:
    """Train the demo teacher from scratch with supervised cross-entropy on the answers; save it to ``out_dir``.

    Data: the first ``pool`` examples of the synthetic train split, generated on the fly, in a seeded order.
    ``time_budget_s`` stops early (the cosine schedule is laid out for ``steps``). Returns the training report
    (also ``out_dir/teacher_report.json``).
    """
    from transformers import Qwen2VLForConditionalGeneration

    from ..synthetic import make_split
    from .evaluate import accuracy

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    tok = demo_tokenizer()
    model = Qwen2VLForConditionalGeneration(demo_teacher_config(tok)).to(device)
    proc = demo_processor(model.config, tok)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"teacher: Qwen2-VL from scratch, {n_params / 1e6:.2f} M parameters, training on {device}")
    data = LazySplit("train", pool, num_frames, proc)
    val = make_split("val", n_val, num_frames)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=data.collate,
                                         num_workers=workers, generator=torch.Generator().manual_seed(seed),
                                         drop_last=True, persistent_workers=workers > 0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    # with a time budget the step count is calibrated on the first 50 steps, so the cosine ends on time
    total = [steps]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / max(total[0] // 20, 1), 0.5 * (
        1 + math.cos(math.pi * min(s / total[0], 1.0)))))
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else torch.autocast("cpu", enabled=False))
    history, step = [], 0

    def evaluate():
        model.eval()
        acc = accuracy(model, proc, val, batch_size=128)
        model.train()
        history.append({"step": step, "loss": loss.item(), "val_accuracy": acc["accuracy"],
                        "val_per_task": acc["per_task"], "seconds": time.perf_counter() - t_start})
        log(f"step {step}: validation accuracy {acc['accuracy']:.3f} "
            + " ".join(f"{k}={v:.2f}" for k, v in acc["per_task"].items()))

    model.train()
    done = False
    while not done:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
            with amp:
                loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step == 10:
                t10 = time.perf_counter()
            if step == 60 and time_budget_s is not None:
                per_step = (time.perf_counter() - t10) / 50
                # leave ~8% of the budget for the evaluations and saving
                total[0] = min(steps, int((0.92 * time_budget_s - (time.perf_counter() - t_start)) / per_step) + 60)
                log(f"calibrated: {per_step * 1e3:.0f} ms/step -> {total[0]} steps in the time budget")
            if step % 100 == 0:
                log(f"step {step}/{total[0]} loss {loss.item():.4f} ({time.perf_counter() - t_start:.0f}s)")
            over_time = time_budget_s is not None and time.perf_counter() - t_start > time_budget_s
            if step % eval_every == 0 or step >= total[0] or over_time:
                evaluate()
            if step >= total[0] or over_time:
                done = True
                break
    model.eval()
    out_dir = Path(out_dir)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    report = {"seed": seed, "num_frames": num_frames, "steps_planned": total[0], "steps_done": step,
              "batch_size": batch_size, "lr": lr, "pool": pool, "parameters": n_params, "device": str(device),
              "seconds": time.perf_counter() - t_start, "history": history}
    (out_dir / "teacher_report.json").write_text(json.dumps(report, indent=2))
    return report


def load_demo_teacher(path=None, dtype=torch.float32):
    """(teacher, processor) from a trained teacher directory (default: the shipped one)."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    path = Path(path or SHIPPED_TEACHER)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no trained demo teacher in {path}: run `linmu demo --retrain-teacher`")
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(path), dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    return model, demo_processor(model.config, tok)
