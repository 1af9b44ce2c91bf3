"""`linmu.convert`: turn a loaded transformers VLM into its LinMU model."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch.nn as nn

from .config import MMateConfig


# teacher class name -> (family module in linmu/models, converter function, LinMU class, linmu_family key).
# One explicit table; a family module is imported only when used, so its transformers imports stay its own.
FAMILIES = {
    "Qwen2VLForConditionalGeneration": (
        "qwen2_vl", "convert_qwen2_vl", "LinMUQwen2VLForConditionalGeneration", "qwen2_vl"),
    "Qwen2_5_VLForConditionalGeneration": (
        "qwen2_vl", "convert_qwen2_5_vl", "LinMUQwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
    "Qwen3VLForConditionalGeneration": ("qwen3_vl", "convert_qwen3_vl", "LinMUQwen3VLForConditionalGeneration", "qwen3_vl"),
    "Qwen3VLMoeForConditionalGeneration": ("qwen3_vl", "convert_qwen3_vl_moe", "LinMUQwen3VLMoeForConditionalGeneration", "qwen3_vl_moe"),
    "LlavaOnevisionForConditionalGeneration": ("llava_onevision", "convert_llava_onevision", "LinMULlavaOnevisionForConditionalGeneration", "llava_onevision"),
    "InternVLForConditionalGeneration": ("internvl", "convert_internvl", "LinMUInternVLForConditionalGeneration", "internvl"),
    "SmolVLMForConditionalGeneration": ("smolvlm", "convert_smolvlm", "LinMUSmolVLMForConditionalGeneration", "smolvlm"),
    "Idefics3ForConditionalGeneration": ("smolvlm", "convert_idefics3", "LinMUIdefics3ForConditionalGeneration", "idefics3"),
}


def _family_attr(teacher_class: str, index: int):
    module = importlib.import_module(f"linmu.models.{FAMILIES[teacher_class][0]}")
    return getattr(module, FAMILIES[teacher_class][index])


def student_class(linmu_family: str):
    """The LinMU class saved under ``config.linmu_family``."""
    for name, entry in FAMILIES.items():
        if entry[3] == linmu_family:
            return _family_attr(name, 2)
    raise ValueError(f"unknown LinMU family {linmu_family!r}; known: {sorted(e[3] for e in FAMILIES.values())}")


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def convert(teacher: nn.Module | str | Path, config: MMateConfig | None = None) -> nn.Module:
    """Return the LinMU model of ``teacher``: every decoder self-attention replaced by an M-MATE block.

    ``teacher`` is a loaded transformers model or a local checkpoint directory. The vision tower, projector,
    embeddings, MLPs, norms and head are the teacher's (copied); ``student.linmu_conversion`` lists where every
    teacher tensor went. Example::

        student = linmu.convert(teacher)                         # defaults of LINMU.md
        same = linmu.convert(teacher, MMateConfig.identity())    # reproduces the teacher's logits
    """
    if isinstance(teacher, (str, Path)):
        from .io import load_teacher

        teacher = load_teacher(teacher)
    name = type(teacher).__name__
    if name not in FAMILIES:
        raise ValueError(f"unsupported model family {name!r}; supported: {', '.join(sorted(FAMILIES))}")
    return _family_attr(name, 1)(teacher, config or MMateConfig())
