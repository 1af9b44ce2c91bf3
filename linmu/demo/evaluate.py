"""Accuracy of any Qwen-VL-family model (teacher or LinMU) on freshly generated synthetic examples."""

from __future__ import annotations

import time
from collections import defaultdict

import torch


@torch.no_grad()
def answer(model, processor, examples, batch_size: int = 16, max_new_tokens: int = 4) -> list[str]:
    """Greedy short answers for synthetic examples (prompt = question, no answer)."""
    from ..synthetic import to_loaded_sample

    device = next(model.parameters()).device
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        batch = processor([to_loaded_sample(e) for e in chunk], add_generation_prompt=True)
        inputs = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v) and k != "labels"}
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
        new = gen[:, inputs["input_ids"].shape[1]:]
        out += [processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]
    return out


def accuracy(model, processor, examples, batch_size: int = 16) -> dict:
    """``{"accuracy": overall, "per_task": {task: acc}, "n": ..., "seconds": ...}``."""
    from ..synthetic import score

    t0 = time.perf_counter()
    preds = answer(model, processor, examples, batch_size)
    hits, counts = defaultdict(int), defaultdict(int)
    for p, e in zip(preds, examples):
        counts[e.task] += 1
        hits[e.task] += int(score(p, e))
    per_task = {t: hits[t] / counts[t] for t in counts}
    return {"accuracy": sum(hits.values()) / max(sum(counts.values()), 1), "per_task": per_task,
            "n": len(examples), "seconds": time.perf_counter() - t0}
