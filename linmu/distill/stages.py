"""What trains in each stage, as named functions (LINMU.md §5), and how a stage wires the model.

| stage | trainable (function)       | forward                                                   |
|-------|----------------------------|-----------------------------------------------------------|
| 1     | ``stage1_trainable``: Flex-MA | teacher-forced per layer (``attach_teachers``)          |
| 2     | ``stage2_trainable``: Flex-MA, Local-Swin, fusion weights | teacher-forced per layer    |
| 3     | ``stage3_trainable``: LoRA adapters (peft) + decoder norms | student end to end          |
"""

from __future__ import annotations

import re

import torch.nn as nn

FUSION_NAMES = ("w_flex", "w_swin", "gate")


def _decoder_prefix(model) -> str:
    """Module name of the language decoder's layer list (e.g. ``model.language_model.layers``)."""
    layers = model.linmu_decoder_layers()
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise RuntimeError("decoder layers not found in the model")


def _params(model, pattern: str) -> list[tuple[str, nn.Parameter]]:
    rx = re.compile(pattern)
    return [(n, p) for n, p in model.named_parameters() if rx.search(n)]


def stage1_trainable(model) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Stage 1: every Flex-MA parameter (its projections seeded from the teacher, conv, dt, A, D, gate, norm)."""
    return {"flex": _params(model, r"\.self_attn\.flex\.")}


def stage2_trainable(model) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Stage 2: Flex-MA, Local-Swin and the fusion weights, jointly."""
    fusion = "|".join(FUSION_NAMES)
    return {
        "flex": _params(model, r"\.self_attn\.flex\."),
        "swin": _params(model, r"\.self_attn\.swin\."),
        "fusion": _params(model, rf"\.self_attn\.({fusion})(\.|$)"),
    }


def stage3_trainable(model) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Stage 3 (after ``add_lora``): the LoRA adapters and the decoder's norms."""
    return {
        "lora": _params(model, r"\.lora_(A|B)\."),
        "norms": [(n, p) for n, p in _params(model, r"(layernorm|\.norm)\.weight$") if "visual" not in n
                  and "vision" not in n],
    }


TRAINABLE = {1: stage1_trainable, 2: stage2_trainable, 3: stage3_trainable}


# M-MATE parameters with no teacher counterpart (the rest of Flex-MA and all of Local-Swin are the teacher's q/k/v/o)
_NEW = re.compile(r"\.self_attn\.(flex\.(conv_|dt_|A_log_|D_|z_proj|norm_weight)|(w_flex|w_swin|gate)(\.|$))")


def is_new_parameter(name: str) -> bool:
    """Whether the named parameter was initialised by conversion rather than copied from the teacher."""
    return bool(_NEW.search(name))


def set_trainable(model, groups: dict[str, list[tuple[str, nn.Parameter]]]) -> dict[str, int]:
    """Freeze everything, then unfreeze the groups; returns the parameter count per group."""
    for p in model.parameters():
        p.requires_grad_(False)
    counts = {}
    for g, params in groups.items():
        for _, p in params:
            p.requires_grad_(True)
        counts[g] = sum(p.numel() for _, p in params)
    return counts


def attach_teachers(student, teacher, swin: str = "frozen", text_weight: float = 1.0) -> None:
    """Teacher forcing for stages 1-2: each M-MATE block keeps the teacher attention of its layer.

    ``swin``: "frozen" (Local-Swin present in the output but not trained) or "absent" (the block's output is
    Flex-MA alone in stage 1). Stage 2 passes "frozen" and trains it. ``text_weight``: weight of a text position
    relative to a visual one in the per-layer alignment loss.
    """
    if not text_weight >= 0:
        raise ValueError(f"the alignment's text weight must be >= 0, got {text_weight}")
    if swin not in ("frozen", "absent"):
        raise ValueError(f"stage-1 Local-Swin mode must be 'frozen' or 'absent', got {swin!r}")
    t_layers = _teacher_decoder_layers(teacher)
    s_blocks = student.mmate_blocks()
    if len(t_layers) != len(s_blocks):
        raise ValueError(f"teacher has {len(t_layers)} decoder layers, student {len(s_blocks)}")
    for block, layer in zip(s_blocks, t_layers):
        block.attach_teacher(layer.self_attn)
        block.branch_override = "flex_only" if swin == "absent" else None
        block.align_text_weight = float(text_weight)


def detach_teachers(student) -> None:
    for block in student.mmate_blocks():
        block.attach_teacher(None)
        block.branch_override = None
        block.align_text_weight = 1.0


def alignment_losses(student) -> list:
    """The per-layer alignment losses recorded by the last teacher-forced forward."""
    return [b.alignment_loss for b in student.mmate_blocks() if b.alignment_loss is not None]


def _teacher_decoder_layers(teacher) -> nn.ModuleList:
    # the teacher is the family's transformers class; the same attribute paths as its LinMU subclass
    for path in ("model.language_model.layers", "model.text_model.layers", "language_model.model.layers",
                 "model.layers"):
        obj = teacher
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(teacher).__name__}")


def lora_target_modules(model, targets: str = "mlp") -> list[str]:
    """Full module names for LoRA: the decoder MLP linears ("mlp"), plus the M-MATE linears ("mlp+mmate")."""
    prefix = _decoder_prefix(model)
    names = []
    for name, module in model.named_modules():
        if not name.startswith(prefix + ".") or not isinstance(module, nn.Linear):
            continue
        rest = name[len(prefix) + 1:]
        if re.fullmatch(r"\d+\.mlp\.\w+", rest):
            names.append(name)
        elif targets == "mlp+mmate" and re.fullmatch(r"\d+\.self_attn\.(flex|swin)\.\w+_proj", rest):
            names.append(name)
    if targets not in ("mlp", "mlp+mmate"):
        raise ValueError(f"lora targets must be 'mlp' or 'mlp+mmate', got {targets!r}")
    return names


def add_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.0, targets: str = "mlp"):
    """Wrap ``model`` with peft LoRA adapters on ``lora_target_modules``; returns the peft model."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_modules(model, targets))
    return get_peft_model(model, cfg)
