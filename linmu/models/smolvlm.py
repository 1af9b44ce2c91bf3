"""SmolVLM and Idefics3: token layout from the model's own inputs.

How the family lays out an image (``processing_smolvlm.py`` / ``processing_idefics3.py``, ``modeling_*.py``):

- An image is split into ``rows x cols`` tiles plus one downscaled *global* image (or only the global image when
  it is not split). Every tile is a square ``image_size x image_size`` crop, fed to the vision tower as one entry of
  ``pixel_values`` (shape ``(B, n_tiles_max, 3, S, S)``; all-zero entries are padding and skipped).
- The vision tower yields ``(S / patch)^2`` patch features per tile, row-major; the connector's pixel shuffle folds
  every ``scale_factor x scale_factor`` block of patches into one token, and its output is again row-major over a
  ``g x g`` grid with ``g = S / patch / scale_factor``. So a tile is ``image_seq_len = g^2`` tokens.
- In the prompt every tile is a run of ``image_seq_len`` ``<image>`` tokens (``config.image_token_id``) with text
  markers between tiles: ``<fake_token_around_image><row_i_col_j>`` before each tile, ``\\n`` after each row of
  tiles, ``\\n<fake_token_around_image><global-img>`` before the global image and ``<fake_token_around_image>``
  after it. The model fills the image tokens in reading order, the ``k``-th chunk of ``image_seq_len`` image tokens
  of the batch receiving the ``k``-th real tile (5.17 ``inputs_merger`` does exactly this chunking; 5.23's
  ``masked_scatter`` is equivalent).
- SmolVLM videos are lists of frames, each laid out like an unsplit image (``<fake><global-img><image>*n<fake>``)
  with a timestamp text (``\\nFrame from 00:03:``) between frames. The model has no video token and cannot tell
  frames from images.

Mapping onto LinMU spans: every tile (including the global image and every video frame) becomes one visual span
of grid ``(1, g, g)``, row-major. A span must be a contiguous run of tokens, and the tiles of one image (or the
frames of one video) are separated by marker/timestamp text, so they cannot share one ``(T, H, W)`` grid: Local-Swin
windows and the backward scans of Flex-MA stay inside a tile; the markers, ``\\n`` and timestamps are text. All
spans are of kind ``"image"`` (a video frame is indistinguishable from an image in the model's inputs).

Tile size ``g^2`` comes from the model's inputs when they carry it (the spatial size of ``pixel_values``; in
generate the pre-encoded ``mm_encoder_outputs`` of 5.23 or ``image_hidden_states`` of 5.17), else from the config
(``(image_size // patch_size)^2 / scale_factor^2``, the model's ``image_seq_len``). The number of tiles, when known
from those inputs, must equal the number of ``image_seq_len`` chunks in ``input_ids``; every run of image tokens
must be a whole number of tiles. Otherwise a ValueError says the grid metadata does not match. Positions are Llama's
1-D RoPE, computed by the teacher's own code.
"""

from __future__ import annotations

import math

import torch
from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

from ..config import MMateConfig
from ..layout import TokenLayout, VisualSpan
from .base import LinMUMixin, convert_family, token_runs


def smolvlm_layout(input_ids: torch.Tensor, image_token_id: int, image_seq_len: int, num_tiles: int | None = None,
                   attention_mask: torch.Tensor | None = None) -> TokenLayout:
    """Visual spans of a SmolVLM / Idefics3 batch: one ``(1, g, g)`` span per tile, ``g * g == image_seq_len``.

    ``num_tiles`` (the number of real tiles the vision tower encodes for this batch), when given, must match the
    number of tiles the image tokens describe. Raises ValueError when tokens and metadata disagree.
    """
    B, L = input_ids.shape
    n = int(image_seq_len)
    g = math.isqrt(n)
    if n < 1 or g * g != n:
        raise ValueError(f"image_seq_len={n} tokens per tile is not a square grid: grid metadata does not match")
    ids = input_ids.detach().cpu()
    spans = []
    for b in range(B):
        for i, j in token_runs(ids[b] == image_token_id):
            if (j - i) % n:
                raise ValueError(f"a run of {j - i} image tokens at position {i} of row {b} is not a whole number "
                                 f"of tiles of {n} tokens: grid metadata does not match input_ids")
            spans += [VisualSpan(b, s, (1, g, g), "image") for s in range(i, j, n)]
    if num_tiles is not None and int(num_tiles) != len(spans):
        raise ValueError(f"the vision inputs hold {int(num_tiles)} tiles but input_ids hold {len(spans)} tiles of "
                         f"{n} image tokens: grid metadata does not match input_ids")
    key_valid = TokenLayout.key_valid_from(attention_mask)
    return TokenLayout.from_spans(B, L, spans, key_valid=key_valid, device=input_ids.device)


def _real_tiles(pixel_values: torch.Tensor) -> int:
    """Tiles the model encodes: entries of ``pixel_values`` that are not all zero (as ``get_image_features``)."""
    flat = pixel_values.reshape(-1, *pixel_values.shape[-3:])
    real = int((flat != 0).flatten(1).any(1).sum())
    return real


class _SmolVLMMixin(LinMUMixin):
    # generate() (5.23) pops pixel_values into mm_encoder_outputs; the layout reads the tile metadata from there
    linmu_layout_inputs = ()

    def linmu_decoder_layers(self):
        return self.model.text_model.layers

    def linmu_tile_metadata(self, inputs: dict) -> tuple[int, int | None]:
        """``(tokens per tile, number of real tiles or None)`` from this forward's vision inputs, else the config."""
        cfg = self.config
        s = cfg.scale_factor
        patch = cfg.vision_config.patch_size
        pv = inputs.get("pixel_values")
        if pv is not None:
            h, w = pv.shape[-2] // patch, pv.shape[-1] // patch
            if h != w or h % s:
                raise ValueError(f"pixel_values tiles of {pv.shape[-2]}x{pv.shape[-1]} pixels give a {h}x{w} patch "
                                 f"grid, not a square divisible by scale_factor={s}: grid metadata does not match")
            return (h // s) ** 2, _real_tiles(pv)
        enc = inputs.get("mm_encoder_outputs")  # transformers >= 5.2x: {"image": BaseModelOutputWithPooling}
        if isinstance(enc, dict):
            enc = enc.get("image")
            last = getattr(enc, "last_hidden_state", None) if enc is not None else None
            if last is not None and last.dim() == 3:
                return last.shape[1] // (s * s), last.shape[0]
        feats = enc if isinstance(enc, torch.Tensor) else inputs.get("image_hidden_states")  # 5.17, or deprecated
        if isinstance(feats, torch.Tensor) and feats.dim() == 3:
            return feats.shape[1], feats.shape[0]
        return self.model.image_seq_len, None

    def linmu_layout(self, inputs: dict) -> TokenLayout:
        if inputs.get("input_ids") is None:
            raise ValueError("LinMU SmolVLM/Idefics3 models need input_ids (or linmu_layout) to locate the image tiles")
        seq_len, num_tiles = self.linmu_tile_metadata(inputs)
        return smolvlm_layout(inputs["input_ids"], self.config.image_token_id, seq_len, num_tiles,
                              inputs.get("attention_mask"))


class LinMUSmolVLMForConditionalGeneration(_SmolVLMMixin, SmolVLMForConditionalGeneration):
    """SmolVLM whose decoder self-attention layers are M-MATE blocks."""

    linmu_family = "smolvlm"


class LinMUIdefics3ForConditionalGeneration(_SmolVLMMixin, Idefics3ForConditionalGeneration):
    """Idefics3 whose decoder self-attention layers are M-MATE blocks."""

    linmu_family = "idefics3"


def convert_smolvlm(teacher, config: MMateConfig):
    return convert_family(teacher, LinMUSmolVLMForConditionalGeneration, config)


def convert_idefics3(teacher, config: MMateConfig):
    return convert_family(teacher, LinMUIdefics3ForConditionalGeneration, config)
