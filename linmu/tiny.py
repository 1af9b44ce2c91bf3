"""Tiny random models and inputs built offline from configs (used by `linmu quickstart` and the tests)."""

from __future__ import annotations

import torch


def tiny_qwen2_vl(seed: int = 0, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                  vocab_size: int = 256, tokenizer=None):
    """A randomly initialised Qwen2-VL of a few hundred thousand parameters (no download).

    With a ``tokenizer`` (e.g. ``linmu.data.build_tokenizer()``) the vocabulary and the special token ids are the
    tokenizer's; otherwise the last ids of a ``vocab_size`` vocabulary are the special tokens.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    head_dim = hidden_size // heads
    # mrope_section splits head_dim / 2 rotary frequencies over (t, h, w)
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": section})
    vision = dict(depth=1, embed_dim=32, hidden_size=hidden_size, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=vocab_size - 6,
                           video_token_id=vocab_size - 5, vision_start_token_id=vocab_size - 4,
                           vision_end_token_id=vocab_size - 3)
    # special ids of the text config must lie inside the tiny vocabulary
    for c in (config, config.text_config):
        c.bos_token_id, c.eos_token_id, c.pad_token_id = vocab_size - 2, vocab_size - 2, vocab_size - 1
    if tokenizer is not None:
        tid = tokenizer.convert_tokens_to_ids
        config = Qwen2VLConfig(text_config=dict(text, vocab_size=len(tokenizer)), vision_config=vision,
                               image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
                               vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))
        for c in (config, config.text_config):
            c.bos_token_id = c.eos_token_id = tokenizer.eos_token_id
            c.pad_token_id = tokenizer.pad_token_id
    config._attn_implementation = "sdpa"
    return Qwen2VLForConditionalGeneration(config).eval()


def tiny_qwen2_vl_inputs(model, images=((1, 4, 4),), videos=((2, 4, 4),), text_len: int = 5, seed: int = 0):
    """One sequence: text, each image, text, each video, text; grids in patches (t, h, w) before merging."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    m = cfg.vision_config.spatial_merge_size
    patch_dim = 3 * cfg.vision_config.temporal_patch_size * cfg.vision_config.patch_size ** 2
    text = lambda n: torch.randint(0, cfg.vision_start_token_id - 10, (n,), generator=g)
    ids, types, pix, pix_v = [text(text_len)], [torch.zeros(text_len)], [], []
    for kind, grids, tok in (("image", images, cfg.image_token_id), ("video", videos, cfg.video_token_id)):
        for t, h, w in grids:
            n = t * h * w // (m * m)
            ids += [torch.tensor([cfg.vision_start_token_id]), torch.full((n,), tok),
                    torch.tensor([cfg.vision_end_token_id]), text(text_len)]
            types += [torch.zeros(1), torch.full((n,), 1 if kind == "image" else 2), torch.zeros(1 + text_len)]
            (pix if kind == "image" else pix_v).append(torch.randn(t * h * w, patch_dim, generator=g))
    input_ids = torch.cat(ids)[None].long()
    out = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
               mm_token_type_ids=torch.cat(types)[None].long())
    if images:
        out["pixel_values"] = torch.cat(pix)
        out["image_grid_thw"] = torch.tensor(images)
    if videos:
        out["pixel_values_videos"] = torch.cat(pix_v)
        out["video_grid_thw"] = torch.tensor(videos)
    return out


def tiny_qwen2_vl_batch(model, rows, text_len: int = 4, seed: int = 0):
    """A left-padded batch; ``rows`` is a list of dicts with optional ``images`` / ``videos`` grids (patches).

    Example: ``rows=[dict(videos=[(4, 4, 4)]), dict(images=[(1, 4, 4), (1, 2, 4)]), dict()]`` gives one sample with
    a video, one with two images and one text-only.
    """
    singles = [tiny_qwen2_vl_inputs(model, images=r.get("images", ()), videos=r.get("videos", ()),
                                    text_len=text_len + i, seed=seed + i) for i, r in enumerate(rows)]
    L = max(s["input_ids"].shape[1] for s in singles)
    pad_id = model.config.text_config.pad_token_id or 0

    def left_pad(t, value):
        return torch.cat([torch.full((1, L - t.shape[1]), value, dtype=t.dtype), t], 1)

    out = dict(
        input_ids=torch.cat([left_pad(s["input_ids"], pad_id) for s in singles]),
        attention_mask=torch.cat([left_pad(s["attention_mask"], 0) for s in singles]),
        mm_token_type_ids=torch.cat([left_pad(s["mm_token_type_ids"], 0) for s in singles]),
    )
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        parts = [s for s in singles if grid in s]
        if parts:
            out[pix] = torch.cat([s[pix] for s in parts])
            out[grid] = torch.cat([s[grid] for s in parts])
    return out


class TinyDistillSet(torch.utils.data.Dataset):
    """In-memory samples of equal length: text, an image, text, a video, text; the last 4 tokens are the answer."""

    def __init__(self, model, n: int = 8, seed: int = 100):
        self.items = []
        for i in range(n):
            s = tiny_qwen2_vl_inputs(model, images=((1, 4, 4),), videos=((2, 4, 4),), text_len=4, seed=seed + i)
            labels = torch.full_like(s["input_ids"], -100)
            labels[:, -4:] = s["input_ids"][:, -4:]
            s["labels"] = labels
            self.items.append(s)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def stack_collate(items):
    """Concatenate equal-length samples along the batch (and pixel rows along their first axis)."""
    return {k: torch.cat([it[k] for it in items]) for k in items[0]}
