"""Shared builders for tests: layouts mixing text, images and videos; tiny teacher attention modules."""

from __future__ import annotations

import torch

from linmu.layout import TokenLayout, VisualSpan


def mixed_layout(batch_size: int = 1, device="cpu") -> tuple[TokenLayout, int]:
    """3 text, an image (1,2,3), 2 text, a video (3,2,2), 3 text: 26 tokens per row (same in every row)."""
    spans = []
    for b in range(batch_size):
        spans += [VisualSpan(b, 3, (1, 2, 3), "image"), VisualSpan(b, 11, (3, 2, 2), "video")]
    return TokenLayout.from_spans(batch_size, 26, spans, device=device), 26


def extend_with_text(layout: TokenLayout, n: int) -> TokenLayout:
    """The same spans on a sequence longer by ``n`` trailing text tokens."""
    kv = layout.key_valid
    if kv is not None:
        kv = torch.cat([kv, torch.ones(kv.shape[0], n, dtype=torch.bool, device=kv.device)], 1)
    return TokenLayout.from_spans(layout.batch_size, layout.seq_len + n, layout.spans, key_valid=kv,
                                  device=layout.device)


def span_end_of(layout: TokenLayout, b: int, i: int) -> int | None:
    """End (exclusive) of the visual span holding position i of row b, or None for text."""
    for s in layout.spans:
        if s.batch == b and s.start <= i < s.start + s.length:
            return s.start + s.length
    return None


def qwen2vl_text_config(**kw):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig

    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                       "mrope_section": [2, 3, 3]})
    cfg.update(kw)
    c = Qwen2VLTextConfig(**cfg)
    c._attn_implementation = "sdpa"
    return c


def llama_config(**kw):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, attention_bias=True)
    cfg.update(kw)
    c = LlamaConfig(**cfg)
    c._attn_implementation = "sdpa"
    return c


def random_rope(batch: int, seq_len: int, head_dim: int, dtype=torch.float32, offset: int = 0):
    """Plain 1-D RoPE cos/sin (B, L, D) for positions offset..offset+L-1 (enough to test position handling)."""
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    pos = torch.arange(offset, offset + seq_len, dtype=torch.float64)
    f = torch.outer(pos, inv)
    emb = torch.cat([f, f], -1)
    return emb.cos().to(dtype).expand(batch, -1, -1), emb.sin().to(dtype).expand(batch, -1, -1)


WORDS = "what color is the shape how many times did it blink red green blue square circle one two three".split()


def write_tiny_workspace(root, seed: int, students: tuple[str, ...] = (), media_seed: int = 0,
                         video_frames: int | None = 8):
    """A tiny Qwen2-VL teacher with an offline tokenizer in ``root/teacher``, its LinMU conversions
    (``"identity"`` and/or ``"student"`` = default M-MATE with small windows, no tokenizer), ``a.png`` and
    ``clip.mp4`` (56x56 frames at 4 fps) under ``root``. Returns the tokenizer."""
    import numpy as np
    from PIL import Image

    import linmu
    from linmu.data import build_tokenizer, write_test_video
    from linmu.tiny import tiny_qwen2_vl

    tok = build_tokenizer(texts=[" ".join(WORDS)])
    teacher = tiny_qwen2_vl(seed=seed, tokenizer=tok)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    configs = {"identity": linmu.MMateConfig.identity(),
               "student": linmu.MMateConfig(window=(2, 2, 2), text_window=8)}
    for name in students:
        linmu.convert(teacher, configs[name]).save_pretrained(root / name)
    rng = np.random.default_rng(media_seed)
    Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(root / "a.png")
    if video_frames:
        write_test_video(root / "clip.mp4", rng.integers(0, 255, (video_frames, 56, 56, 3), dtype=np.uint8), fps=4)
    return tok
