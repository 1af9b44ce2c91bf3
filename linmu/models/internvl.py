"""InternVL (``InternVLForConditionalGeneration``: InternVL2.5 / InternVL3 "-hf" checkpoints): token layout from the
model's own inputs.

How InternVL lays out visual tokens (transformers ``models/internvl``):

- The model knows one placeholder id, ``config.image_token_id`` (``<IMG_CONTEXT>``); ``pixel_values`` is a flat
  stack of square *tiles* ``(n_tiles, 3, S, S)`` for the whole batch, in the order their placeholders appear.
- Each tile goes through the vision tower (``S/p × S/p`` patches, CLS dropped), then ``pixel_shuffle`` with
  ``downsample_ratio`` r folds every ``1/r × 1/r`` block of patches into one token: ``s × s`` tokens per tile with
  ``s = (S / p) · r`` (16 × 16 = 256 = ``image_seq_length`` for 448-pixel tiles, p = 14, r = 0.5). The tokens come
  out **row-major** over the tile's ``(h, w)`` grid (checked in the tests through the model's own
  ``pixel_shuffle``).
- Image (processor ``replace_image_token``): ``<img>`` + ``<IMG_CONTEXT>`` × (s² · num_patches) + ``</img>``. With
  dynamic tiling the image is cut into ``rows × cols`` crops (row-major) followed by a global thumbnail, all the same
  ``S × S`` size, so one image is **one contiguous run** of ``num_patches`` tiles, each ``s²`` tokens long.
- Video (``replace_video_token``): one tile per frame, each frame wrapped on its own,
  ``Frame1: <img>`` + s² × ``<IMG_CONTEXT>`` + ``</img>\\nFrame2: <img>`` ... so frames are separate runs with text
  (frame labels and ``<img>``/``</img>``) between them. Frames use the same placeholder id as images.
- ``<img>``, ``</img>`` and frame labels are ordinary text tokens to the model; positions are plain 1-D RoPE of the
  text model (Qwen2 / Llama / InternLM2-style decoders), which Local-Swin reuses unchanged.

Mapping onto LinMU spans (decided here): **every tile is its own span with grid (1, s, s)**. The tile is the only
geometry the model's inputs pin down: the processor's tile counts per image (``num_patches``), the crop grid
(``rows × cols``) and whether a thumbnail was appended are not passed to the model, and a crop grid could not be one
row-major span anyway (its tokens come tile by tile, not row by row of the whole image). So a run of ``k · s²``
placeholder tokens becomes ``k`` consecutive ``(1, s, s)`` spans: a crop, the next crop, ..., the thumbnail. Video
frames are single-tile runs and become ``(1, s, s)`` spans as well; since the model cannot tell a video frame from a
one-tile image (same placeholder id, no video metadata), every span has ``kind="image"`` and there is no temporal
axis (T = 1). Context across tiles and frames flows through the forward scan and the text window, as for text.

The layout is checked against the model's metadata: every run must be a whole number of tiles, and the number of
tiles in ``input_ids`` must equal the number of tiles in ``pixel_values`` (or in the pre-encoded
``mm_encoder_outputs["image"]`` that ``generate`` passes instead in transformers >= 5.23).
"""

from __future__ import annotations

import torch
from transformers import InternVLForConditionalGeneration

from ..config import MMateConfig
from ..layout import TokenLayout, VisualSpan
from .base import LinMUMixin, convert_family, token_runs


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def internvl_tile_side(config, pixel_values: torch.Tensor | None = None) -> int:
    """Tokens per side of one tile after pixel shuffle: ``(tile pixels / patch) · downsample_ratio``.

    From ``pixel_values``' own height/width when given (the model reshapes features to the square this implies),
    else from ``config.vision_config.image_size``.
    """
    ph, pw = _pair(config.vision_config.patch_size)
    if pixel_values is not None:
        if pixel_values.dim() != 4:
            raise ValueError(f"InternVL pixel_values must be (n_tiles, channels, height, width), got shape "
                             f"{tuple(pixel_values.shape)}")
        H, W = int(pixel_values.shape[-2]), int(pixel_values.shape[-1])
    else:
        H, W = _pair(config.vision_config.image_size)
    if H // ph != W // pw:
        raise ValueError(f"InternVL tiles must be square in patches, got {H}x{W} pixels with patch {ph}x{pw}")
    side = (H // ph) * config.downsample_ratio
    if side != int(side) or side < 1:
        raise ValueError(f"{H // ph} patches per tile side is not divisible by 1/downsample_ratio="
                         f"{1 / config.downsample_ratio:g}")
    return int(side)


def internvl_layout(input_ids: torch.Tensor, image_token_id: int, tile_side: int, num_tiles: int | None = None,
                    attention_mask: torch.Tensor | None = None) -> TokenLayout:
    """Visual spans of an InternVL batch: one ``(1, tile_side, tile_side)`` span per tile (module docstring).

    ``num_tiles``: the number of tiles the model received (``pixel_values.shape[0]``), checked against the
    placeholders when given. Raises ValueError when the placeholder tokens do not match the tile metadata.
    """
    B, L = input_ids.shape
    ids = input_ids.detach().cpu()
    n = tile_side * tile_side
    spans = []
    for b in range(B):
        for i, j in token_runs(ids[b] == image_token_id):
            if (j - i) % n:
                raise ValueError(f"a run of {j - i} image tokens at position {i} of row {b} is not a whole number "
                                 f"of {tile_side}x{tile_side} tiles ({n} tokens each): grid metadata does not "
                                 "match input_ids")
            spans += [VisualSpan(b, start, (1, tile_side, tile_side), "image") for start in range(i, j, n)]
    if num_tiles is not None and num_tiles != len(spans):
        raise ValueError(f"the model received {num_tiles} image tiles but input_ids hold {len(spans)} tiles of "
                         f"{n} image tokens: grid metadata does not match input_ids")
    key_valid = TokenLayout.key_valid_from(attention_mask)
    return TokenLayout.from_spans(B, L, spans, key_valid=key_valid, device=input_ids.device)


class LinMUInternVLForConditionalGeneration(LinMUMixin, InternVLForConditionalGeneration):
    """InternVL whose language-decoder self-attention layers are M-MATE blocks."""

    linmu_family = "internvl"
    # the layout needs only input_ids; the tile count it checks comes from pixel_values or, once generate() has
    # pre-encoded them (transformers >= 5.23), from mm_encoder_outputs, which generate() keeps passing
    linmu_layout_inputs = ()

    def linmu_decoder_layers(self):
        return self.model.language_model.layers

    def linmu_layout(self, inputs: dict) -> TokenLayout:
        if inputs.get("input_ids") is None:
            raise ValueError("LinMU InternVL models need input_ids (or linmu_layout) to locate the image tokens")
        cfg = self.config
        pixel_values = inputs.get("pixel_values")
        num_tiles, side = None, None
        if pixel_values is not None:
            num_tiles, side = int(pixel_values.shape[0]), internvl_tile_side(cfg, pixel_values)
        else:
            encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
            feats = getattr(encoded, "pooler_output", None)
            if feats is not None:  # (n_tiles, s*s, hidden) after pixel shuffle and projector
                num_tiles, side = int(feats.shape[0]), int(round(feats.shape[1] ** 0.5))
                if side * side != feats.shape[1]:
                    raise ValueError(f"pre-encoded image features hold {feats.shape[1]} tokens per tile, not a "
                                     "square grid: grid metadata does not match")
        if side is None:
            side = internvl_tile_side(cfg)
        return internvl_layout(inputs["input_ids"], cfg.image_token_id, side, num_tiles, inputs.get("attention_mask"))


def convert_internvl(teacher, config: MMateConfig):
    return convert_family(teacher, LinMUInternVLForConditionalGeneration, config)
