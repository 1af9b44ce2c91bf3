"""Qwen2-VL and Qwen2.5-VL (the paper's teacher family): token layout from the model's own inputs.

Each image or video is one run of placeholder tokens (``image_token_id`` / ``video_token_id``),
``t * (h / m) * (w / m)`` long for a grid ``(t, h, w)`` in patches and spatial merge ``m``, row-major per frame
(t, then h, then w). Positions are Qwen's 3-D M-RoPE, computed by the teacher's own code; Local-Swin reuses them.
"""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from ..config import MMateConfig
from ..layout import TokenLayout, VisualSpan
from .base import LinMUMixin, convert_family


def qwen_layout(input_ids: torch.Tensor, image_token_id: int, video_token_id: int, spatial_merge_size: int,
                image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> TokenLayout:
    """Visual spans of a Qwen-VL batch, matched in order to the rows of ``image_grid_thw`` / ``video_grid_thw``.

    Raises ValueError when the placeholder tokens do not match the grid metadata.
    """
    B, L = input_ids.shape
    ids = input_ids.detach().cpu()
    grids = {
        "image": [tuple(int(v) for v in g) for g in (image_grid_thw.tolist() if image_grid_thw is not None else [])],
        "video": [tuple(int(v) for v in g) for g in (video_grid_thw.tolist() if video_grid_thw is not None else [])],
    }
    used = {"image": 0, "video": 0}
    m = spatial_merge_size
    spans = []
    for b in range(B):
        row = ((ids[b] == image_token_id) | (ids[b] == video_token_id)).tolist()
        img = (ids[b] == image_token_id).tolist()
        i = 0
        while i < L:
            if not row[i]:
                i += 1
                continue
            kind = "image" if img[i] else "video"
            if used[kind] >= len(grids[kind]):
                raise ValueError(f"found more {kind} placeholder runs than rows in {kind}_grid_thw "
                                 f"({len(grids[kind])}): grid metadata does not match input_ids")
            t, h, w = grids[kind][used[kind]]
            used[kind] += 1
            if h % m or w % m:
                raise ValueError(f"{kind}_grid_thw row {(t, h, w)} is not divisible by spatial_merge_size={m}")
            grid = (t, h // m, w // m)
            n = grid[0] * grid[1] * grid[2]
            tok = image_token_id if kind == "image" else video_token_id
            if i + n > L or not bool((ids[b, i:i + n] == tok).all()):
                raise ValueError(f"{kind} with grid_thw {(t, h, w)} needs {n} consecutive placeholder tokens at "
                                 f"position {i} of row {b}: grid metadata does not match input_ids")
            spans.append(VisualSpan(b, i, grid, kind))
            i += n
    for kind in ("image", "video"):
        if used[kind] != len(grids[kind]):
            raise ValueError(f"{kind}_grid_thw has {len(grids[kind])} rows but input_ids hold {used[kind]} "
                             f"{kind}s: grid metadata does not match input_ids")
    key_valid = TokenLayout.key_valid_from(attention_mask)
    return TokenLayout.from_spans(B, L, spans, key_valid=key_valid, device=input_ids.device)


class _QwenVLMixin(LinMUMixin):
    linmu_layout_inputs = ("image_grid_thw", "video_grid_thw")

    def linmu_decoder_layers(self):
        return self.model.language_model.layers

    def linmu_layout(self, inputs: dict) -> TokenLayout:
        if inputs.get("input_ids") is None:
            raise ValueError("LinMU Qwen-VL models need input_ids (or linmu_layout) to locate the visual tokens")
        cfg = self.config
        return qwen_layout(inputs["input_ids"], cfg.image_token_id, cfg.video_token_id,
                           cfg.vision_config.spatial_merge_size, inputs.get("image_grid_thw"),
                           inputs.get("video_grid_thw"), inputs.get("attention_mask"))


class LinMUQwen2VLForConditionalGeneration(_QwenVLMixin, Qwen2VLForConditionalGeneration):
    """Qwen2-VL whose decoder self-attention layers are M-MATE blocks."""

    linmu_family = "qwen2_vl"


class LinMUQwen2_5_VLForConditionalGeneration(_QwenVLMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose decoder self-attention layers are M-MATE blocks."""

    linmu_family = "qwen2_5_vl"


def convert_qwen2_vl(teacher, config: MMateConfig):
    return convert_family(teacher, LinMUQwen2VLForConditionalGeneration, config)


def convert_qwen2_5_vl(teacher, config: MMateConfig):
    return convert_family(teacher, LinMUQwen2_5_VLForConditionalGeneration, config)
