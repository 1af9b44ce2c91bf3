"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, a Qwen2 decoder with plain 1-D RoPE).

How the family lays out its visual tokens (read from ``modeling_llava_onevision.py``, the same in transformers 5.17
and 5.23). Every visual token, newlines included, is a placeholder ``config.image_token_id`` (images) or
``config.video_token_id`` (videos) in ``input_ids``; the features are scattered into them in order over the
flattened batch. With ``s = vision_config.image_size // vision_config.patch_size`` tokens per tile side:

* **Image with anyres crops** (the default; ``get_image_features`` patches an image when ``batch_num_images`` is None
  or its sample has exactly one image): ``s*s`` tokens of the base (thumbnail) tile, row-major, then the crops. The
  crops form one feature map of ``(nh*s, nw*s)`` (``nh, nw`` from ``select_best_resolution`` over
  ``config.image_grid_pinpoints`` and ``image_sizes``), cropped back to the image's aspect ratio (``unpad_image``),
  bilinearly shrunk when it holds more than ``max_num_patches`` tiles' worth (``vision_aspect_ratio =
  "anyres_max_<N>"``, ratio > 1.1), then an ``image_newline`` token is appended to every row and the map is
  flattened row-major. Mapped to two adjacent spans: the base ``(1, s, s)`` and the crop map ``(1, H', W' + 1)``,
  whose last column is the newlines (LINMU's convention for newline columns: the grid includes them).
* **Image without crops** (a sample with several images): ``s*s`` base tokens, then one ``image_newline``. Mapped
  to a span ``(1, s, s)``; the trailing newline has no grid position and stays text.
* **Video** (``pixel_values_videos`` of shape ``(num_videos, F, 3, H, W)``): every frame's ``s x s`` map is
  bilinearly pooled to ``ceil(s/2) x ceil(s/2)``, frames are concatenated, then **one** ``image_newline`` per video.
  Mapped to a span ``(F, ceil(s/2), ceil(s/2))``; the trailing newline stays text.

Images and videos are matched in order of appearance to the rows of ``image_sizes`` and to the videos. The number of
frames comes from ``pixel_values_videos`` or, when ``generate`` pre-encoded the videos (transformers >= 5.23), from
``mm_encoder_outputs["video"]``. Positions are the teacher's 1-D RoPE, computed by the teacher's own code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

from ..config import MMateConfig
from ..layout import TokenLayout, VisualSpan
from .base import LinMUMixin, convert_family

# one piece of a visual item: (grid, kind) for a span, or (None, n) for n tokens left as text
_Piece = tuple


def anyres_crop_grid(image_size_hw: Sequence[int], config, vision_aspect_ratio: str | None = None) -> tuple[int, int]:
    """``(H', W')`` of an image's crop feature map after unpadding and the anyres_max downscale (no newline column).

    Uses the family's own ``get_anyres_image_grid_shape`` and ``unpad_image`` (on an empty feature tensor), then the
    same downscale rule as ``LlavaOnevisionModel.pack_image_features``.
    """
    vc = config.vision_config
    s = vc.image_size // vc.patch_size
    size = [int(v) for v in image_size_hw]
    nh, nw = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, vc.image_size)
    h, w = unpad_image(torch.empty(0, nh * s, nw * s), size).shape[1:]
    ratio_name = vision_aspect_ratio or config.vision_aspect_ratio
    max_num_patches = int(ratio_name.strip("anyres_max_"))
    ratio = math.sqrt(h * w / (max_num_patches * s**2))
    if ratio > 1.1:
        h, w = int(h // ratio), int(w // ratio)
    return int(h), int(w)


def _image_pieces(image_size_hw, patched: bool, config, vision_aspect_ratio) -> list[_Piece]:
    vc = config.vision_config
    s = vc.image_size // vc.patch_size
    if not patched:
        return [((1, s, s), "image"), (None, 1)]
    h, w = anyres_crop_grid(image_size_hw, config, vision_aspect_ratio)
    return [((1, s, s), "image"), ((1, h, w + 1), "image")]


def _video_pieces(frames: int, config) -> list[_Piece]:
    vc = config.vision_config
    p = math.ceil(vc.image_size // vc.patch_size / 2)
    return [((frames, p, p), "video"), (None, 1)]


def _length(pieces: list[_Piece]) -> int:
    return sum(g[0] * g[1] * g[2] if g is not None else n for g, n in pieces)


def _all_image_pieces(config, image_sizes, batch_num_images, vision_aspect_ratio) -> list[list[_Piece]]:
    sizes = [] if image_sizes is None else [[int(v) for v in r] for r in torch.as_tensor(image_sizes).reshape(-1, 2)]
    if batch_num_images is None:
        patched = [True] * len(sizes)  # the model's default: every image gets anyres crops
    else:
        counts = [int(n) for n in torch.as_tensor(batch_num_images).reshape(-1)]
        if sum(counts) != len(sizes):
            raise ValueError(f"batch_num_images {counts} counts {sum(counts)} images but image_sizes has "
                             f"{len(sizes)} rows: grid metadata does not match")
        patched = [n == 1 for n in counts for _ in range(n)]
    return [_image_pieces(sz, pt, config, vision_aspect_ratio) for sz, pt in zip(sizes, patched)]


def image_token_counts(config, image_sizes, batch_num_images=None, vision_aspect_ratio=None) -> list[int]:
    """Placeholder tokens of every image (what the processor inserts and ``get_image_features`` returns)."""
    return [_length(p) for p in _all_image_pieces(config, image_sizes, batch_num_images, vision_aspect_ratio)]


def llava_onevision_layout(input_ids: torch.Tensor, config, image_sizes=None, batch_num_images=None,
                           video_frames: int | Sequence[int] | None = None, num_videos: int | None = None,
                           attention_mask: torch.Tensor | None = None,
                           vision_aspect_ratio: str | None = None) -> TokenLayout:
    """Visual spans of a LLaVA-OneVision batch (see the module docstring for the layout).

    ``image_sizes``: ``(num_images, 2)`` (height, width) per image, as the processor returns it; ``batch_num_images``:
    images per sample (None: every image gets anyres crops, as in the model); ``video_frames``: frames per video,
    one int for all ``num_videos`` videos (the model's 5-D ``pixel_values_videos``) or one per video.
    Raises ValueError when the placeholder tokens do not match this metadata.
    """
    B, L = input_ids.shape
    ids = input_ids.detach().cpu()
    img_id, vid_id = config.image_token_id, config.video_token_id
    items = {"image": _all_image_pieces(config, image_sizes, batch_num_images, vision_aspect_ratio)}
    if video_frames is None:
        frames = []
    elif isinstance(video_frames, int):
        frames = [video_frames] * (num_videos if num_videos is not None else 0)
    else:
        frames = [int(f) for f in video_frames]
    items["video"] = [_video_pieces(f, config) for f in frames]

    used = {"image": 0, "video": 0}
    spans = []
    for b in range(B):
        row = ids[b]
        i = 0
        while i < L:
            tok = int(row[i])
            if tok not in (img_id, vid_id):
                i += 1
                continue
            kind = "image" if tok == img_id else "video"
            meta = "image_sizes" if kind == "image" else "video frames (pixel_values_videos)"
            if used[kind] >= len(items[kind]):
                raise ValueError(f"found more {kind}s in input_ids than the {len(items[kind])} described by {meta}: "
                                 "grid metadata does not match input_ids")
            pieces = items[kind][used[kind]]
            used[kind] += 1
            n = _length(pieces)
            if i + n > L or not bool((row[i:i + n] == tok).all()):
                run = int((row[i:] == tok).int().cumprod(0).sum())
                raise ValueError(f"{kind} {used[kind] - 1} needs {n} consecutive placeholder tokens at position {i} "
                                 f"of row {b}, found {run}: grid metadata does not match input_ids")
            j = i
            for grid, k in pieces:
                if grid is None:
                    j += k
                    continue
                spans.append(VisualSpan(b, j, grid, k))
                j += grid[0] * grid[1] * grid[2]
            i += n
    for kind, meta in (("image", "image_sizes"), ("video", "the videos")):
        if used[kind] != len(items[kind]):
            raise ValueError(f"{meta} describe {len(items[kind])} {kind}s but input_ids hold {used[kind]}: "
                             "grid metadata does not match input_ids")
    key_valid = TokenLayout.key_valid_from(attention_mask)
    return TokenLayout.from_spans(B, L, spans, key_valid=key_valid, device=input_ids.device)


def _pooled_output(mm_encoder_outputs, modality):
    if not mm_encoder_outputs:
        return None
    out = mm_encoder_outputs.get(modality)
    return getattr(out, "pooler_output", None) if out is not None else None


class LinMULlavaOnevisionForConditionalGeneration(LinMUMixin, LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision whose decoder self-attention layers are M-MATE blocks."""

    linmu_family = "llava_onevision"
    # generate() (transformers >= 5.23) pops these while pre-encoding the images; the image grids need them
    linmu_layout_inputs = ("image_sizes", "batch_num_images", "vision_aspect_ratio")

    def linmu_decoder_layers(self):
        return self.model.language_model.layers

    def linmu_layout(self, inputs: dict) -> TokenLayout:
        if inputs.get("input_ids") is None:
            raise ValueError("LinMU LLaVA-OneVision models need input_ids (or linmu_layout) to locate visual tokens")
        cfg = self.config
        mm = inputs.get("mm_encoder_outputs")
        image_out, video_out = _pooled_output(mm, "image"), _pooled_output(mm, "video")
        # the model's forward encodes images with config.vision_aspect_ratio (it does not pass its argument on);
        # only images pre-encoded by generate() used the caller's value
        ratio = (inputs.get("vision_aspect_ratio") if image_out is not None else None) or cfg.vision_aspect_ratio
        frames = num_videos = None
        pv = inputs.get("pixel_values_videos")
        if pv is not None:
            num_videos, frames = int(pv.shape[0]), int(pv.shape[1])
        elif video_out is not None:
            per_frame = math.ceil(cfg.vision_config.image_size // cfg.vision_config.patch_size / 2) ** 2
            n = int(video_out.shape[1]) - 1
            if n % per_frame:
                raise ValueError(f"pre-encoded video features of {n + 1} tokens are not frames of {per_frame} tokens "
                                 "plus a newline: grid metadata does not match")
            num_videos, frames = int(video_out.shape[0]), n // per_frame
        layout = llava_onevision_layout(inputs["input_ids"], cfg, inputs.get("image_sizes"),
                                        inputs.get("batch_num_images"), frames, num_videos,
                                        inputs.get("attention_mask"), ratio)
        if image_out is not None:
            # pre-encoded image features: their lengths are the ground truth for every image's token count
            got = [int(t.shape[0]) for t in image_out]
            want = image_token_counts(cfg, inputs.get("image_sizes"), inputs.get("batch_num_images"), ratio)
            if got != want:
                raise ValueError(f"pre-encoded images hold {got} tokens each, image_sizes imply {want}: "
                                 "grid metadata does not match")
        return layout


def convert_llava_onevision(teacher, config: MMateConfig):
    return convert_family(teacher, LinMULlavaOnevisionForConditionalGeneration, config)
