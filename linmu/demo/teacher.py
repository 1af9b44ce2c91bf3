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


def demo_teacher_config(tokenizer, hidden: int = 256, layers: int = 4, rope_theta: float = 1e4):
    """A Qwen2-VL of a few million parameters whose vocabulary and special ids are the tokenizer's.

    (A small ``rope_theta`` such as 8, tried to make one-cell steps visible to M-RoPE's height/width sections, left
    no low-frequency dimensions for content attention and training collapsed; the synthetic board's per-cell
    background shades carry the cell instead, see docs/SYNTHETIC.md.)
    """
    from transformers import Qwen2VLConfig

    tid = tokenizer.convert_tokens_to_ids
    heads = hidden // 32
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), max_position_embeddings=8192,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": [6, 5, 5]},
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


# training mix: the compositional tasks (selection by position or by the cue, ordering) are weighted up, the flash
# tasks (the slowest to learn: identify a white object by its shape, then count or order) most; the image tasks
# supply the colour and cell words they build on
TASK_WEIGHTS = {"flash_count": 3, "flash_order": 4, "colour_at_cue": 2, "relation_at_cue": 3, "position_at_cue": 2,
                "image_colour": 1, "image_where": 1, "image_position": 2, "image_count": 1}


class RopeIndex:
    """Qwen2-VL's M-RoPE position ids computed from the config alone, so DataLoader workers can precompute them.

    transformers computes them inside the forward with a per-sample Python loop (~40 ms for a batch of 128 short
    clips, on the training process's critical path); the same function run in the workers takes it off.
    """

    def __init__(self, config):
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

        self.config = config
        self._fn = Qwen2VLModel.get_rope_index
        self._vision = getattr(Qwen2VLModel, "get_vision_position_ids", None)

    def get_vision_position_ids(self, *args, **kwargs):
        return self._vision(self, *args, **kwargs)

    def __call__(self, batch: dict) -> torch.Tensor:
        pos, _ = self._fn(self, batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                          image_grid_thw=batch.get("image_grid_thw"), video_grid_thw=batch.get("video_grid_thw"),
                          attention_mask=batch["attention_mask"])
        return pos


class LazySplit(torch.utils.data.Dataset):
    """Example ``i`` of a split (seed ``first + i``, task ``tasks[i % len(tasks)]``), generated on demand and
    encoded by the processor (for DataLoader workers). A task named k times in ``tasks`` gets k times the examples."""

    def __init__(self, split: str, n: int, num_frames: int, processor, tasks=None, rope_index=None):
        from ..synthetic import TASKS
        from ..synthetic.suite import SPLIT_SEEDS

        lo, hi = SPLIT_SEEDS[split]
        if n > hi - lo:
            raise ValueError(f"the {split} split has {hi - lo} seeds, asked for {n}")
        self.lo, self.tasks = lo, list(tasks or TASKS)
        self.n, self.num_frames, self.processor, self.rope_index = n, num_frames, processor, rope_index

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        from ..synthetic import generate_example, to_loaded_sample

        ex = generate_example(self.lo + i, self.tasks[i % len(self.tasks)], self.num_frames)
        return self.processor.encode(to_loaded_sample(ex))

    def collate(self, items):
        batch = dict(self.processor.pad(items))
        if self.rope_index is not None:
            batch["position_ids"] = self.rope_index(batch)
        return batch


def weighted_tasks(weights: dict[str, int] | None = None) -> list[str]:
    """The task list of a training mix: each task repeated by its integer weight, interleaved round-robin."""
    from ..synthetic import TASKS

    weights = dict(TASK_WEIGHTS if weights is None else weights)
    unknown = set(weights) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)} in the training mix; known: {TASKS}")
    out, left = [], {t: int(weights.get(t, 0)) for t in TASKS}
    while any(left.values()):
        for t in TASKS:
            if left[t] > 0:
                out.append(t)
                left[t] -= 1
    return out


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over 2% of the steps, constant, then a cosine decay over the last 40%."""
    warm = max(total // 50, 1)
    if step < warm:
        return (step + 1) / warm
    decay_from = int(0.6 * total)
    if step < decay_from:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min((step - decay_from) / max(total - decay_from, 1), 1.0)))


def train_teacher(out_dir, *, num_frames: int = TRAIN_FRAMES, steps: int = 20000, batch_size: int = 128,
                  lr: float = 2e-3, pool: int = 2_000_000, seed: int = 0, device=None, eval_every: int = 1000,
                  n_val: int = 540, time_budget_s: float | None = None, workers: int = 0, task_weights=None,
                  resume: str | None = None, calibrate: bool = False, plan_s: float | None = None,
                  extend_to: int | None = None, resume_lr: float | None = None, keep_best: bool = True,
                  log=print) -> dict:
    """Train the demo teacher from scratch with supervised cross-entropy on the answers; save it to ``out_dir``.

    Data: the first ``pool`` examples of the synthetic train split (mix ``task_weights``), generated on the fly, in
    an order drawn from ``seed``. The learning-rate schedule is laid out for ``steps``; ``time_budget_s`` stops
    early (``calibrate``: the step count is first fitted to ``plan_s`` or the budget, timed over steps 20-120), saving
    ``out_dir/train_state.pt`` (fp32 weights, optimizer, step, history) that ``resume`` continues
    from, so a long schedule can run as several shorter jobs (each resumed part reshuffles its data with
    ``seed + step``, so a given sequence of resume points reproduces the same weights); ``extend_to`` sets a new
    schedule length (longer or shorter, past the current step), ``resume_lr`` resets its peak learning rate and
    ``task_weights`` switches the mix when resuming. Returns the training report (also ``out_dir/teacher_report.json``); the model is saved in bf16
    whenever the run stops: with ``keep_best`` the weights of this run's best validation accuracy (model selection on
    the validation split; the test split stays unseen), else the last.
    """
    from transformers import Qwen2VLForConditionalGeneration

    from ..synthetic import make_split
    from .evaluate import accuracy
    from .vision_attention import vision_attention

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    tok = demo_tokenizer()
    model = Qwen2VLForConditionalGeneration(demo_teacher_config(tok)).to(device)
    proc = demo_processor(model.config, tok)
    n_params = sum(p.numel() for p in model.parameters())
    tasks = weighted_tasks(task_weights)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    step, history, seconds_before = 0, [], 0.0
    if resume:
        state = torch.load(resume, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, history, seconds_before = state["step"], state["history"], state["seconds"]
        steps = state["steps"]
        tasks = tasks if task_weights is not None else state["tasks"]
        if extend_to is not None and extend_to > step:
            steps = extend_to  # a new schedule length from here (the factor is recomputed for it)
        if resume_lr is not None:
            lr = resume_lr
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"] = resume_lr
        log(f"resumed from {resume} at step {step}/{steps}, peak lr {opt.param_groups[0]['initial_lr']:.1e}")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps), last_epoch=step - 1)
    log(f"teacher: Qwen2-VL from scratch, {n_params / 1e6:.2f} M parameters, training on {device}, "
        f"batch {batch_size}, {steps} steps, mix {tasks}")
    data = LazySplit("train", pool, num_frames, proc, tasks=tasks, rope_index=RopeIndex(model.config))
    val = make_split("val", n_val, num_frames)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=data.collate,
                                         num_workers=workers, generator=torch.Generator().manual_seed(seed + step),
                                         drop_last=True, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda")
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else torch.autocast("cpu", enabled=False))
    t_data = 0.0
    loss = torch.zeros(())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    best = {"acc": -1.0, "step": None, "weights": None}

    def evaluate():
        model.eval()
        with vision_attention(model):
            acc = accuracy(model, proc, val, batch_size=256)
        model.train()
        history.append({"step": step, "loss": loss.item(), "val_accuracy": acc["accuracy"],
                        "val_per_task": acc["per_task"], "seconds": seconds_before + time.perf_counter() - t_start})
        log(f"step {step}: validation accuracy {acc['accuracy']:.3f} "
            + " ".join(f"{k}={v:.2f}" for k, v in acc["per_task"].items()))
        if keep_best and acc["accuracy"] > best["acc"]:
            best.update(acc=acc["accuracy"], step=step,
                        weights={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})

    model.train()
    done = step >= steps
    t_last = time.perf_counter()
    with vision_attention(model):
        while not done:
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
                t_got = time.perf_counter()
                t_data += t_got - t_last
                with amp:
                    loss = model(**batch).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                if step == 20:
                    t20 = time.perf_counter()
                if step == 120 and calibrate and (plan_s or time_budget_s) and not resume:
                    # lay the schedule out so that it ends within plan_s seconds of training (default: the time
                    # budget; more when the run is to be resumed), ~6% kept for evaluation and saving
                    per_step = (time.perf_counter() - t20) / 100
                    fit = int((0.94 * (plan_s or time_budget_s) - (time.perf_counter() - t_start)) / per_step) + step
                    steps = min(steps, fit)
                    log(f"calibrated: {per_step * 1e3:.0f} ms/step -> {steps} steps in the time budget")
                if step % 100 == 0:
                    lv = loss.item()  # the only host sync of a step, every 100 steps
                    log(f"step {step}/{steps} loss {lv:.4f} lr {sched.get_last_lr()[0]:.2e} "
                        f"({time.perf_counter() - t_start:.0f}s; data wait {t_data:.0f}s)")
                t_last = time.perf_counter()
                over_time = time_budget_s is not None and t_last - t_start > time_budget_s
                if step % eval_every == 0 or step >= steps or over_time:
                    evaluate()
                    t_last = time.perf_counter()
                if step >= steps or over_time:
                    done = True
                    break
    seconds = seconds_before + time.perf_counter() - t_start
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "steps": steps,
                "tasks": tasks, "history": history, "seconds": seconds}, out_dir / "train_state.pt.tmp")
    (out_dir / "train_state.pt.tmp").replace(out_dir / "train_state.pt")
    model.eval()
    exported = step
    if best["weights"] is not None:
        model.load_state_dict(best["weights"])
        exported = best["step"]
        log(f"exporting the weights of step {exported} (best validation accuracy of this run, {best['acc']:.3f})")
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    report = {"seed": seed, "num_frames": num_frames, "steps_planned": steps, "steps_done": step,
              "exported_step": exported,
              "batch_size": batch_size, "lr": lr, "pool": pool, "tasks": tasks, "parameters": n_params,
              "device": str(device), "seconds": seconds, "history": history}
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
