"""CPU speed sweep of the demo: time to first token, decode throughput and cache size, teacher vs student."""

from __future__ import annotations

import statistics
import time

import torch


def cache_bytes(cache) -> int:
    """Bytes held by a generate() cache: LinMUCache reports its own; transformers caches hold keys/values."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
    return total


class _Stamps:
    """A logits processor that only records when each new token's logits are ready (one generate call)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


@torch.no_grad()
def _measure(model, inputs, new_tokens: int, repeats: int):
    """Median TTFT (start of generate to the first token's logits, vision tower included) and decode tokens/s
    (between the first and the last token's logits), from per-token timestamps inside one generate call."""
    from transformers import LogitsProcessorList

    ttft, rate, nbytes = [], [], 0
    for i in range(repeats + 1):  # the first call warms up and is not counted
        stamps = _Stamps()
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1,
                             do_sample=False, return_dict_in_generate=True,
                             logits_processor=LogitsProcessorList([stamps]))
        if i == 0:
            continue
        ttft.append(stamps.times[0] - t0)
        rate.append(new_tokens / (stamps.times[-1] - stamps.times[0]))
        nbytes = cache_bytes(out.past_key_values)
    return {"ttft_s": statistics.median(ttft), "decode_tok_s": statistics.median(rate), "cache_bytes": nbytes}


def speed_sweep(teacher, student, processor, lengths, decode_tokens: int = 32, repeats: int = 2, log=print) -> list:
    """For each clip length (frames): TTFT (vision tower included), decode tokens/s and cache bytes of both."""
    from ..synthetic import make_split, to_loaded_sample

    rows = []
    for n in lengths:
        ex = make_split("test", 1, n)[0]
        inputs = dict(processor([to_loaded_sample(ex)], add_generation_prompt=True))
        inputs = {k: v for k, v in inputs.items() if torch.is_tensor(v) and k != "labels"}
        row = {"frames": n, "tokens": int(inputs["input_ids"].shape[1])}
        for name, model in (("teacher", teacher), ("student", student)):
            row[name] = _measure(model, inputs, decode_tokens, repeats)
        row["ttft_ratio"] = row["teacher"]["ttft_s"] / row["student"]["ttft_s"]
        row["decode_ratio"] = row["student"]["decode_tok_s"] / row["teacher"]["decode_tok_s"]
        rows.append(row)
        log(f"    {n:4d} frames ({row['tokens']} tokens): TTFT teacher {row['teacher']['ttft_s'] * 1e3:.0f} ms / "
            f"student {row['student']['ttft_s'] * 1e3:.0f} ms; decode {row['teacher']['decode_tok_s']:.0f} / "
            f"{row['student']['decode_tok_s']:.0f} tok/s; cache {row['teacher']['cache_bytes'] / 1024:.0f} / "
            f"{row['student']['cache_bytes'] / 1024:.0f} KiB")
    return rows
