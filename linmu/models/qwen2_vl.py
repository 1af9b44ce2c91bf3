"""Qwen2-VL family: token layout from the model's own inputs, and the converted model class.

Qwen2-VL lays out each image or video as one run of placeholder tokens (``image_token_id`` / ``video_token_id``),
``t * (h / m) * (w / m)`` long for a grid ``(t, h, w)`` in patches and spatial merge ``m``, row-major per frame.
"""

from __future__ import annotations

import torch
from transformers import Qwen2VLForConditionalGeneration

from ..config import MMateConfig
from ..layers.mmate import MMate
from ..inference.cache import LinMUCache
from ..layout import TokenLayout, VisualSpan


def qwen_layout(input_ids: torch.Tensor, image_token_id: int, video_token_id: int, spatial_merge_size: int,
                image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> TokenLayout:
    """Visual spans of a Qwen2-VL batch, matched in order to the rows of ``image_grid_thw`` / ``video_grid_thw``.

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
        is_img = ids[b] == image_token_id
        is_vid = ids[b] == video_token_id
        i = 0
        row = (is_img | is_vid).tolist()
        img = is_img.tolist()
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
    key_valid = attention_mask.bool() if attention_mask is not None and not bool(attention_mask.all()) else None
    return TokenLayout.from_spans(B, L, spans, key_valid=key_valid, device=input_ids.device)


class LinMUQwen2VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2-VL whose decoder self-attention layers are M-MATE blocks."""

    def layout_for(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None) -> TokenLayout:
        cfg = self.config
        return qwen_layout(input_ids, cfg.image_token_id, cfg.video_token_id, cfg.vision_config.spatial_merge_size,
                           image_grid_thw, video_grid_thw, attention_mask)

    def mmate_blocks(self) -> list[MMate]:
        return [layer.self_attn for layer in self.model.language_model.layers]

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        # a fixed-size LinMUCache instead of transformers' growing DynamicCache
        if model_kwargs.get("past_key_values") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode,
                                                         batch_size, max_cache_length)
        model_kwargs["past_key_values"] = LinMUCache(self.mmate_blocks(), batch_size, max_cache_length)

    def _prepare_multimodal_encoder_kwargs_for_generation(self, model_kwargs):
        # generate() pre-encodes images/videos and drops the grid tensors it fed the encoder; the token layout
        # still needs them, so they are put back (the text model ignores them once the embeddings exist)
        grids = {k: model_kwargs[k] for k in ("image_grid_thw", "video_grid_thw") if model_kwargs.get(k) is not None}
        model_kwargs = super()._prepare_multimodal_encoder_kwargs_for_generation(model_kwargs)
        model_kwargs.update(grids)
        return model_kwargs

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, pixel_values=None, pixel_values_videos=None,
                image_grid_thw=None, video_grid_thw=None, mm_token_type_ids=None, logits_to_keep=0,
                mm_encoder_outputs=None, linmu_layout: TokenLayout | None = None, **kwargs):
        # the parameters are spelled out because generate() checks model kwargs against this signature
        decoding = past_key_values is not None and past_key_values.get_seq_length() > 0
        if linmu_layout is None and not decoding:
            if input_ids is None:
                raise ValueError("LinMU models need input_ids (or linmu_layout) to locate the visual tokens")
            linmu_layout = self.layout_for(input_ids, attention_mask, image_grid_thw, video_grid_thw)
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
            pixel_values=pixel_values, pixel_values_videos=pixel_values_videos, image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw, mm_token_type_ids=mm_token_type_ids, logits_to_keep=logits_to_keep,
            mm_encoder_outputs=mm_encoder_outputs, linmu_layout=linmu_layout, **kwargs)


def convert_qwen2_vl(teacher: Qwen2VLForConditionalGeneration, config: MMateConfig) -> LinMUQwen2VLForConditionalGeneration:
    """A LinMU copy of ``teacher``: every decoder ``self_attn`` becomes an MMate seeded from it."""
    student = LinMUQwen2VLForConditionalGeneration(teacher.config)
    student.load_state_dict(teacher.state_dict())
    student.to(dtype=teacher.dtype, device=teacher.device)
    for i, layer in enumerate(student.model.language_model.layers):
        layer.self_attn = MMate.from_attention(layer.self_attn, i, config)
    student.linmu_config = config
    return student.eval() if not teacher.training else student
