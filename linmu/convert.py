"""`linmu.convert`: turn a loaded transformers VLM into its LinMU model."""

from __future__ import annotations

import torch.nn as nn

from .config import MMateConfig


def _families():
    # one explicit table: teacher class name -> converter (imported lazily so a family's imports stay its own)
    from .models.qwen2_vl import convert_qwen2_vl

    return {"Qwen2VLForConditionalGeneration": convert_qwen2_vl}


def supported_families() -> list[str]:
    return sorted(_families())


def convert(teacher: nn.Module, config: MMateConfig | None = None) -> nn.Module:
    """Return the LinMU model of ``teacher``: every decoder self-attention replaced by an M-MATE block.

    The vision tower, projector, embeddings, MLPs, norms and head are the teacher's (copied). Example::

        student = linmu.convert(teacher)                         # defaults of LINMU.md
        same = linmu.convert(teacher, MMateConfig.identity())    # reproduces the teacher's logits
    """
    families = _families()
    name = type(teacher).__name__
    if name not in families:
        raise ValueError(f"unsupported model family {name!r}; supported: {', '.join(sorted(families))}")
    return families[name](teacher, config or MMateConfig())
