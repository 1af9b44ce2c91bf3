"""Training data of a distillation run from its config: conversations + media through the teacher's processor.

Files are LLaVA-style JSON/JSONL (``linmu.data.conversations``); the Qwen2-VL / Qwen2.5-VL processor is
``QwenVLProcessor`` (the teacher's preprocessor settings and tokenizer, no torchvision needed). With a
``seqkd_file`` (teacher answers from :func:`prepare_seqkd`) every item also carries the sample re-encoded with the
teacher's answer in place of the ground truth, as ``batch["seqkd"]``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from .conversations import load_conversations
from .dataset import Collator, ConversationDataset, Skipped
from .qwen_processing import BadSampleError, QwenVLProcessor

logger = logging.getLogger(__name__)
QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl")


def teacher_processor(teacher_dir, teacher_config) -> QwenVLProcessor:
    """The teacher's processor, read from its local directory (tokenizer + preprocessor settings)."""
    from transformers import AutoTokenizer

    if teacher_config.model_type not in QWEN_TYPES:
        raise ValueError(f"training from data files supports Qwen2-VL / Qwen2.5-VL teachers, not "
                         f"{teacher_config.model_type!r}; for other families pass dataset= to run_stage")
    if teacher_dir is None:
        raise ValueError("reading data files needs the teacher's directory (for its tokenizer): set `teacher`")
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    if (Path(teacher_dir) / "preprocessor_config.json").is_file():
        return QwenVLProcessor.from_pretrained(teacher_dir, tokenizer=tokenizer)
    return QwenVLProcessor.from_model_config(teacher_config, tokenizer)


class SeqKDDataset(torch.utils.data.Dataset):
    """Each item: the ground-truth features and the same sample with the teacher's answer (sequence-level KD)."""

    def __init__(self, base: ConversationDataset, answers: dict[str, str]):
        self.base, self.answers = base, answers

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        gt = self.base[i]
        if gt is None or isinstance(gt, Skipped):
            return gt
        sample = self.base.samples[i]
        if str(sample.id) not in self.answers:
            return self.base._skip("no_teacher_answer", sample.describe(), "not in seqkd_file")
        loaded = self.base.load(i)
        turns = list(loaded.turns)
        last = max(j for j, (role, _) in enumerate(turns) if role == "assistant")
        turns[last] = ("assistant", self.answers[str(sample.id)])
        try:
            seq = self.base.processor.encode(dataclasses.replace(loaded, turns=turns), max_length=self.base.max_length)
        except BadSampleError as e:
            return self.base._skip(e.reason, sample.describe(), e.detail)
        return {"gt": gt, "seqkd": seq}


class SeqKDCollator:
    def __init__(self, processor):
        self.inner = Collator(processor, report_skips=True)

    def __call__(self, items):
        good = [x for x in items if isinstance(x, dict)]
        bad = [x for x in items if not isinstance(x, dict)]
        batch = self.inner([x["gt"] for x in good] + bad)
        if batch is None or not good:
            return batch
        seq = self.inner([x["seqkd"] for x in good])
        seq.pop("skipped", None)
        batch["seqkd"] = seq
        return batch


def build_training_data(cfg, teacher):
    """(dataset, collate_fn) for ``run_stage`` from a DistillConfig's data settings."""
    if not cfg.data:
        raise ValueError("no training data: set `data` to a LLaVA-style JSON/JSONL file")
    processor = teacher_processor(cfg.teacher, teacher.config)
    samples = load_conversations(cfg.data, cfg.media_root)
    ds = ConversationDataset(samples, processor, num_frames=cfg.num_frames if cfg.fps is None else None,
                             fps=cfg.fps, max_frames=cfg.max_frames, max_length=cfg.max_length, return_skips=True)
    logger.info("training data: %d samples from %s", len(ds), cfg.data)
    if cfg.seqkd_file:
        answers = {}
        for line in Path(cfg.seqkd_file).read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                answers[str(rec["id"])] = rec["answer"]
        return SeqKDDataset(ds, answers), SeqKDCollator(processor)
    return ds, Collator(processor, report_skips=True)


@torch.no_grad()
def prepare_seqkd(teacher, cfg, out_file, max_new_tokens: int = 128, batch_size: int = 4) -> dict:
    """Generate the teacher's (greedy) answer for every sample and append ``{"id", "answer"}`` lines to ``out_file``.

    Samples already in ``out_file`` are skipped, so an interrupted run continues where it stopped.
    """
    processor = teacher_processor(cfg.teacher, teacher.config)
    samples = load_conversations(cfg.data, cfg.media_root)
    out_file = Path(out_file)
    done = set()
    if out_file.exists():
        done = {str(json.loads(l)["id"]) for l in out_file.read_text().splitlines() if l.strip()}
    todo = [s for s in samples if str(s.id) not in done]
    ds = ConversationDataset(todo, processor, num_frames=cfg.num_frames if cfg.fps is None else None, fps=cfg.fps,
                             max_frames=cfg.max_frames, max_length=cfg.max_length, add_generation_prompt=True)
    device = next(teacher.parameters()).device
    teacher.eval()
    written = 0
    with open(out_file, "a") as fh:
        for start in range(0, len(ds), batch_size):
            idx = list(range(start, min(start + batch_size, len(ds))))
            feats = [ds[i] for i in idx]
            keep = [(i, f) for i, f in zip(idx, feats) if f is not None]
            if not keep:
                continue
            batch = processor.pad([f for _, f in keep])
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels" and torch.is_tensor(v)}
            out = teacher.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1]:]
            for (i, _), ids in zip(keep, new):
                text = processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
                fh.write(json.dumps({"id": todo[i].id, "answer": text}) + "\n")
                written += 1
            fh.flush()
    return {"written": written, "already_done": len(done), "skipped": ds.report()}
