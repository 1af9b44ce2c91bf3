"""`run_stage`: one distillation stage as a readable recipe on accelerate (LINMU.md §5).

1. Load the frozen teacher (eval, no grad) and the student (stage N-1's output, or the converted teacher).
2. Wire the stage: teacher forcing for stages 1-2, LoRA adapters for stage 3; freeze all but the stage's set.
3. Data in a seeded, resumable order; AdamW; warm-up + cosine schedule; accelerate for devices, DDP/FSDP, mixed
   precision and gradient accumulation.
4. Loop: losses of the stage, backward, clip, step; log (progress bar, JSONL, TensorBoard); checkpoint every
   ``save_every`` steps, atomically.
5. Save the stage's model to ``output_dir/final`` (loadable with ``linmu.load``), and a summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from ..config import MMateConfig
from ..denormals import flush_denormals
from ..io import load_teacher
from .checkpoint import (TrainerState, install_trainable_only_hooks, latest_checkpoint, load_checkpoint,
                         save_checkpoint)
from .config import DistillConfig
from .losses import alignment_mse, counted_tokens, token_ce, token_kd
from .stages import (TRAINABLE, add_lora, alignment_losses, attach_teachers, detach_teachers, is_new_parameter,
                     set_trainable)

logger = logging.getLogger(__name__)
_NOT_MODEL_INPUTS = ("labels", "seqkd", "sample_ids", "skipped")


class EpochSampler(Sampler):
    """A fresh seeded permutation every epoch: the order depends only on (seed, epoch), so a resumed run replays it."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


def _schedule(cfg: DistillConfig):
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}


def stage_losses(cfg: DistillConfig, student, teacher, batch: dict) -> dict[str, torch.Tensor]:
    """The stage's weighted loss and its terms for one batch. ``student`` may be wrapped (DDP/FSDP/peft)."""
    inputs = _model_inputs(batch)
    nonpad = inputs.get("attention_mask")
    terms: dict[str, torch.Tensor] = {}
    base = _linmu_model(student)
    if cfg.stage in (1, 2):
        out = student(**inputs, use_cache=False)
        layer_losses = alignment_losses(base)
        terms["align"] = torch.stack(layer_losses).mean()
        if cfg.w_kd:
            # teacher forcing makes this forward's logits the teacher's; the student's own come from a free run
            saved = [(b.teacher_attn, b.branch_override, b.align_text_weight) for b in base.mmate_blocks()]
            detach_teachers(base)
            try:
                s_logits = student(**inputs, use_cache=False).logits
            finally:
                for b, (t, override, text_weight) in zip(base.mmate_blocks(), saved):
                    b.attach_teacher(t)
                    b.branch_override, b.align_text_weight = override, text_weight
            mask = counted_tokens(batch.get("labels"), nonpad, cfg.kd_tokens)
            terms["kd"] = token_kd(s_logits, out.logits.detach(), mask, cfg.temperature)
        weights = {"align": cfg.w_align, "kd": cfg.w_kd}
    else:
        want_hidden = cfg.w_hidden > 0
        with torch.no_grad():
            t_out = teacher(**inputs, use_cache=False, output_hidden_states=want_hidden)
        s_out = student(**inputs, use_cache=False, output_hidden_states=want_hidden)
        if want_hidden:
            pairs = list(zip(s_out.hidden_states[1:], t_out.hidden_states[1:]))
            if cfg.hidden_layers == "final":
                pairs = pairs[-1:]
            terms["hidden"] = torch.stack([alignment_mse(s, t, nonpad) for s, t in pairs]).mean()
        if cfg.w_kd:
            mask = counted_tokens(batch.get("labels"), nonpad, cfg.kd_tokens)
            terms["kd"] = token_kd(s_out.logits, t_out.logits, mask, cfg.temperature)
        if cfg.w_ce:
            terms["ce"] = token_ce(s_out.logits, batch["labels"])
        if cfg.w_seqkd:
            if "seqkd" not in batch:
                raise ValueError("w_seqkd > 0 needs teacher answers: run `linmu distill prepare-seqkd` and set "
                                 "seqkd_file")
            seq = batch["seqkd"]
            terms["seqkd"] = token_ce(student(**_model_inputs(seq), use_cache=False).logits, seq["labels"])
        weights = {"hidden": cfg.w_hidden, "kd": cfg.w_kd, "ce": cfg.w_ce, "seqkd": cfg.w_seqkd}
    terms["loss"] = sum(weights[k] * v for k, v in terms.items() if weights.get(k))
    return terms


def param_groups(model, cfg: DistillConfig) -> list[dict]:
    """The trainable parameters as optimizer groups: those seeded from the teacher at ``cfg.lr``, the new ones
    (``stages.is_new_parameter``) at ``cfg.lr * cfg.new_param_lr_scale``; empty groups are left out. With a scale of
    1 it is one group, as before the option existed (so older checkpoints' optimizer states still resume)."""
    seeded, new = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (new if is_new_parameter(name) else seeded).append(p)
    if cfg.new_param_lr_scale == 1:
        return [{"params": seeded + new, "lr": cfg.lr}]
    groups = [{"params": seeded, "lr": cfg.lr}, {"params": new, "lr": cfg.lr * cfg.new_param_lr_scale}]
    return [g for g in groups if g["params"]]


def _linmu_model(model):
    """The LinMU model inside accelerate/DDP (``.module``) and peft (``get_base_model()``) wrappers."""
    for _ in range(4):
        if type(model).__name__.startswith("LinMU"):
            return model
        model = model.module if hasattr(model, "module") else model.get_base_model()
    raise TypeError(f"no LinMU model inside {type(model).__name__}")


def _prepare_student(cfg: DistillConfig, teacher, student):
    if student is None:
        if cfg.init:
            from ..io import load

            student = load(cfg.init)
        else:
            from ..convert import convert

            student = convert(teacher, MMateConfig.from_dict(cfg.mmate))
    if cfg.stage in (1, 2):
        attach_teachers(student, teacher, swin=cfg.stage1_swin if cfg.stage == 1 else "frozen",
                        text_weight=cfg.align_text_weight)
    else:
        detach_teachers(student)
        student = add_lora(student, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_targets)
    groups = TRAINABLE[cfg.stage](student)
    if cfg.stage == 3 and cfg.stage3_mmate:
        groups.update(TRAINABLE[2](student))
    counts = set_trainable(student, groups)
    return student, counts


def run_stage(cfg: DistillConfig, *, teacher=None, student=None, dataset=None, collate_fn=None,
              resume: bool = False, max_steps_this_call: int | None = None) -> Path:
    """Run one stage and return ``output_dir/final``. ``teacher``/``student``/``dataset`` override the config's paths.

    ``resume=True`` continues from the newest complete checkpoint in ``output_dir`` (model state, optimizer,
    scheduler position, RNG states, data position), exactly as if the run had not stopped.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out_dir = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "distill_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    teacher = teacher if teacher is not None else load_teacher(cfg.teacher)
    teacher.eval().requires_grad_(False).to(accelerator.device)
    student, counts = _prepare_student(cfg, teacher, student)
    logger.info("stage %d trainable parameters: %s (total %s)", cfg.stage,
                ", ".join(f"{g}={n:,}" for g, n in counts.items()), f"{sum(counts.values()):,}")
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()

    if dataset is None:
        from ..data.build import build_training_data

        dataset, collate_fn = build_training_data(cfg, teacher)
    sampler = EpochSampler(len(dataset), cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate_fn)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"stage {cfg.stage} has nothing to train in this student (trainable groups: {counts}); "
                         "e.g. stage 1 trains Flex-MA, which a use_flex=False student does not have")
    optimizer = torch.optim.AdamW(param_groups(student, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    if accelerator.distributed_type.name == "FSDP":
        # shard per decoder layer of whatever family this is (the config file need not name the class)
        layer_cls = type(_linmu_model(student).linmu_decoder_layers()[0]).__name__
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = [layer_cls]
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)
    if accelerator.distributed_type.name != "FSDP":
        install_trainable_only_hooks(accelerator, student)

    state = TrainerState()
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            logger.warning("--resume: no complete checkpoint in %s, starting from step 0", out_dir)
        else:
            state = load_checkpoint(accelerator, ckpt)
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, state.step, state.epoch,
                        state.batch_in_epoch)

    with flush_denormals(cfg.flush_denormals):
        state = _train(cfg, accelerator, student, teacher, loader, optimizer, scheduler, params, state, out_dir,
                       max_steps_this_call)
    if state.step < cfg.steps:
        return out_dir  # stopped early on request (max_steps_this_call); resume to finish
    return _finish(cfg, accelerator, student, teacher, state, counts, out_dir)


def _train(cfg, accelerator, student, teacher, loader, optimizer, scheduler, params, state, out_dir: Path,
           max_steps_this_call: int | None):
    """The training loop of ``run_stage``; returns the trainer state where it stopped."""
    log = _RunLog(out_dir, cfg, accelerator.is_main_process, state.step)
    stop_at = cfg.steps if max_steps_this_call is None else min(cfg.steps, state.step + max_steps_this_call)
    t_start, tokens_at_start = time.perf_counter(), state.tokens
    # gradient accumulation by hand: a step is exactly `grad_accum` good micro-batches, wherever epochs end, so a
    # checkpoint (always at a step boundary) plus the data position determines the rest of the run
    micro, sums = 0, {}
    while state.step < stop_at:
        loader.set_epoch(state.epoch)  # accelerate passes its epoch counter on to EpochSampler
        epoch_loader = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch \
            else loader
        for batch in epoch_loader:
            state.batch_in_epoch += 1
            # bad samples were dropped by the collator (each one warned about, naming it); count them here so
            # the counts survive a resume and reach the summary
            for reason, *_ in (batch or {}).pop("skipped", []):
                state.skipped[reason] = state.skipped.get(reason, 0) + 1
            if not batch:  # every sample of this micro-batch was bad
                continue
            micro += 1
            sync = micro == cfg.grad_accum
            with contextlib.nullcontext() if sync else accelerator.no_sync(student):
                terms = stage_losses(cfg, student, teacher, batch)
                accelerator.backward(terms["loss"] / cfg.grad_accum)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            mask = batch.get("attention_mask")
            state.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            if not sync:
                continue
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            state.step += 1
            rate = (state.tokens - tokens_at_start) / max(time.perf_counter() - t_start, 1e-9)
            log.step(state, sums, scheduler.get_last_lr()[0], rate)
            micro, sums = 0, {}
            if state.step % cfg.save_every == 0 or state.step == cfg.steps:
                save_checkpoint(accelerator, out_dir, state, cfg.to_dict(), cfg.keep_checkpoints)
            if state.step >= stop_at:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    log.close()
    return state


def _finish(cfg, accelerator, student, teacher, state, counts, out_dir: Path) -> Path:
    """Save the stage's model as a plain LinMU checkpoint (LoRA merged) in ``output_dir/final``."""
    accelerator.wait_for_everyone()
    final = out_dir / "final"
    # the full state dict, gathered from all shards under FSDP (every process must take part)
    state_dict = accelerator.get_state_dict(student)
    if accelerator.is_main_process:
        if accelerator.distributed_type.name == "FSDP":
            # sharded parameters cannot be merged in place: rebuild the stage's structure unsharded and fill it
            model, _ = _prepare_student(cfg, teacher, None)
            model.load_state_dict(state_dict)
        else:
            model = accelerator.unwrap_model(student)
        if cfg.stage == 3:
            if not cfg.merge_lora:
                model.save_pretrained(str(out_dir / "adapter"))
            model = model.merge_and_unload() if cfg.merge_lora else model.get_base_model()
            state_dict = None
        detach_teachers(model)
        model.save_pretrained(str(final), **({"state_dict": state_dict} if state_dict is not None else {}))
        summary = {"stage": cfg.stage, "steps": state.step, "tokens": state.tokens, "trainable": counts,
                   "skipped_samples": state.skipped, "final_model": str(final)}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.info("stage %d done: %s", cfg.stage, json.dumps(summary))
    accelerator.wait_for_everyone()
    return final


class _RunLog:
    """Progress bar (loss, tokens/s), JSONL log and TensorBoard, on the main process only."""

    def __init__(self, out_dir: Path, cfg: DistillConfig, main: bool, start_step: int):
        self.main, self.cfg = main, cfg
        self.bar = self.tb = self.jsonl = None
        if not main:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=cfg.steps, initial=start_step, desc=f"stage {cfg.stage}", dynamic_ncols=True)
        self.jsonl = open(out_dir / "log.jsonl", "a")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                logger.warning("tensorboard is not installed: logging to log.jsonl only")

    def step(self, state: TrainerState, terms: dict, lr: float, tok_per_s: float):
        if not self.main:
            return
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{terms['loss']:.4g}", tok_s=f"{tok_per_s:.0f}")
        if state.step % self.cfg.log_every == 0:
            rec = {"step": state.step, "epoch": state.epoch, "lr": lr, "tokens": state.tokens,
                   "tokens_per_s": tok_per_s, **terms}
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()
            if self.tb is not None:
                for k, v in terms.items():
                    self.tb.add_scalar(f"loss/{k}", v, state.step)
                self.tb.add_scalar("lr", lr, state.step)
                self.tb.add_scalar("tokens_per_s", tok_per_s, state.step)

    def close(self):
        if self.main:
            self.bar.close()
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
