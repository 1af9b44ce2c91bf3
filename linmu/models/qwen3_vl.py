"""Qwen3-VL and Qwen3-VL-MoE: token layout from the model's own inputs.

How Qwen3-VL lays out its visual tokens (``transformers`` ``models/qwen3_vl``, 5.17 and 5.23 alike):

- **Images.** One image with ``image_grid_thw`` row ``(t, h, w)`` (in patches, ``t == 1`` for images) becomes one
  run of ``t * (h / m) * (w / m)`` ``image_token_id`` placeholders (``m = spatial_merge_size``), wrapped by the
  processor as ``<|vision_start|> <|image_pad|>... <|vision_end|>``. The vision tower's merger emits the merged tokens
  row-major (t, then h, then w), and ``Qwen3VLModel.get_rope_index`` gives them M-RoPE ids
  ``(start + t, start + i, start + j)`` in that order.
- **Videos are laid out per frame.** ``Qwen3VLProcessor.replace_video_token`` writes, for each temporal patch
  (``video_grid_thw[:, 0]`` of them; one temporal patch = ``temporal_patch_size`` frames),
  ``<X.X seconds> <|vision_start|> <|video_pad|> * (h/m)(w/m) <|vision_end|>``: timestamp text between frames.
  ``get_rope_index`` matches this by splitting every ``video_grid_thw`` row ``(T, h, w)`` into ``T`` rows
  ``(1, h, w)`` and consuming one per run of video tokens (a run = one group of equal ``mm_token_type_ids``), each
  with its own row-major (i, j) grid starting at the current text position; the temporal M-RoPE id of a frame is
  the running text position, so the timestamp tokens separate frames in position too.
- **DeepStack** adds visual features from intermediate vision layers to the hidden states at the visual positions
  after the first few decoder layers. It touches only the residual stream, not attention, so it needs nothing here.
- **Text attention** has per-head ``q_norm`` / ``k_norm`` (RMSNorm over head_dim before RoPE), which Local-Swin
  copies, and interleaved M-RoPE (``mrope_section`` frequencies of t/h/w interleaved), which the teacher's rotary
  module computes into ``(cos, sin)`` and Local-Swin applies unchanged.

Mapping onto :class:`~linmu.layout.VisualSpan` (a span must be contiguous): every image is one span of grid
``(t, h/m, w/m)``; every *frame* (temporal patch) of a video is its own span of grid ``(1, h/m, w/m)`` with kind
``"video"``, because the timestamp and ``vision_start/end`` tokens between frames are text and a span cannot hold
them. Consequently, for Qwen3-VL videos the Local-Swin windows and the Flex-MA backward scan stay inside one frame
(no temporal extent); the forward scan still runs over the whole sequence. A run of placeholder tokens must be
exactly one image or exactly one frame (as the teacher's ``get_rope_index`` requires); anything else raises
ValueError.
"""

from __future__ import annotations

import torch
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

from ..config import MMateConfig
from ..layout import TokenLayout, VisualSpan
from .base import LinMUMixin, convert_family


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of every maximal run of True in a 1-D bool tensor."""
    d = torch.diff(mask.to(torch.int8), prepend=mask.new_zeros(1, dtype=torch.int8),
                   append=mask.new_zeros(1, dtype=torch.int8))
    starts = torch.nonzero(d == 1).flatten().tolist()
    ends = torch.nonzero(d == -1).flatten().tolist()
    return list(zip(starts, ends))


def _grid_rows(grid_thw: torch.Tensor | None, name: str) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    if grid_thw.ndim != 2 or grid_thw.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (n, 3), got {tuple(grid_thw.shape)}")
    return [tuple(int(v) for v in g) for g in grid_thw.tolist()]


def qwen3_vl_layout(input_ids: torch.Tensor, image_token_id: int, video_token_id: int, spatial_merge_size: int,
                    image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> TokenLayout:
    """Visual spans of a Qwen3-VL batch: one per image, one per video frame (see the module docstring).

    Placeholder runs are matched in batch-row-major order to the rows of ``image_grid_thw`` and to the frames of
    ``video_grid_thw`` (each row ``(T, h, w)`` contributes ``T`` frames of ``(h/m) * (w/m)`` tokens), the order in
    which the teacher scatters visual features and assigns M-RoPE ids. Raises ValueError when tokens and grid
    metadata disagree.
    """
    B, L = input_ids.shape
    ids = input_ids.detach().cpu()
    m = spatial_merge_size
    images = _grid_rows(image_grid_thw, "image_grid_thw")
    # one entry per frame: (video index, frame index, frames in video, merged h, merged w)
    frames = []
    for v, (t, h, w) in enumerate(_grid_rows(video_grid_thw, "video_grid_thw")):
        if t < 1 or h % m or w % m:
            raise ValueError(f"video_grid_thw row {v} {(t, h, w)} is not a valid grid for spatial_merge_size={m}")
        frames += [(v, f, t, h // m, w // m) for f in range(t)]
    for n, (t, h, w) in enumerate(images):
        if t < 1 or h % m or w % m:
            raise ValueError(f"image_grid_thw row {n} {(t, h, w)} is not a valid grid for spatial_merge_size={m}")
    n_img = n_frame = 0
    video_row: dict[int, int] = {}
    spans = []
    for b in range(B):
        runs = [(s, e, "image") for s, e in _runs(ids[b] == image_token_id)]
        runs += [(s, e, "video") for s, e in _runs(ids[b] == video_token_id)]
        for s, e, kind in sorted(runs):
            if kind == "image":
                if n_img >= len(images):
                    raise ValueError(f"input_ids hold more image placeholder runs than the {len(images)} rows of "
                                     "image_grid_thw: grid metadata does not match input_ids")
                t, h, w = images[n_img]
                grid = (t, h // m, w // m)
                what = f"image {n_img} with image_grid_thw {(t, h, w)}"
                n_img += 1
            else:
                if n_frame >= len(frames):
                    raise ValueError(f"input_ids hold more video frame runs than the {len(frames)} frames of "
                                     "video_grid_thw: grid metadata does not match input_ids")
                v, f, t, hm, wm = frames[n_frame]
                if video_row.setdefault(v, b) != b:
                    raise ValueError(f"video {v} has frames in batch rows {video_row[v]} and {b}: "
                                     "grid metadata does not match input_ids")
                grid = (1, hm, wm)
                what = f"frame {f} of video {v} with video_grid_thw {(t, hm * m, wm * m)}"
                n_frame += 1
            n = grid[0] * grid[1] * grid[2]
            if e - s != n:
                raise ValueError(f"{what} needs a run of {n} placeholder tokens, but row {b} has a run of {e - s} at "
                                 f"position {s} (Qwen3-VL puts timestamp text between video frames): grid metadata "
                                 "does not match input_ids")
            spans.append(VisualSpan(b, s, grid, kind))
    if n_img != len(images):
        raise ValueError(f"image_grid_thw has {len(images)} rows but input_ids hold {n_img} images: grid metadata "
                         "does not match input_ids")
    if n_frame != len(frames):
        raise ValueError(f"video_grid_thw describes {len(frames)} frames but input_ids hold {n_frame} frame runs: "
                         "grid metadata does not match input_ids")
    key_valid = TokenLayout.key_valid_from(attention_mask)
    return TokenLayout.from_spans(B, L, spans, key_valid=key_valid, device=input_ids.device)


class _Qwen3VLMixin(LinMUMixin):
    # generate() (transformers >= 5.2x) pops the grids while pre-encoding the pixels; the layout needs them
    linmu_layout_inputs = ("image_grid_thw", "video_grid_thw")

    def linmu_decoder_layers(self):
        return self.model.language_model.layers

    def linmu_layout(self, inputs: dict) -> TokenLayout:
        if inputs.get("input_ids") is None:
            raise ValueError("LinMU Qwen3-VL models need input_ids (or linmu_layout) to locate the visual tokens")
        cfg = self.config
        return qwen3_vl_layout(inputs["input_ids"], cfg.image_token_id, cfg.video_token_id,
                               cfg.vision_config.spatial_merge_size, inputs.get("image_grid_thw"),
                               inputs.get("video_grid_thw"), inputs.get("attention_mask"))


class LinMUQwen3VLForConditionalGeneration(_Qwen3VLMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL whose decoder self-attention layers are M-MATE blocks."""

    linmu_family = "qwen3_vl"


class LinMUQwen3VLMoeForConditionalGeneration(_Qwen3VLMixin, Qwen3VLMoeForConditionalGeneration):
    """Qwen3-VL-MoE whose decoder self-attention layers are M-MATE blocks (the experts are the teacher's)."""

    linmu_family = "qwen3_vl_moe"


def convert_qwen3_vl(teacher, config: MMateConfig):
    return convert_family(teacher, LinMUQwen3VLForConditionalGeneration, config)


def convert_qwen3_vl_moe(teacher, config: MMateConfig):
    return convert_family(teacher, LinMUQwen3VLMoeForConditionalGeneration, config)
