"""Model shapes for `linmu bench`: Qwen2.5-VL configs built from numbers alone (random weights, nothing downloaded).

The real presets carry the published shapes of Qwen2.5-VL-3B/7B/72B-Instruct (decoder and vision tower; special token
ids of the Qwen tokenizer). ``tiny`` is a few-hundred-thousand-parameter model for CPU tests. Speed does not depend on
the weights' values, so a preset built with random bf16 weights times exactly what the released checkpoint would.

Example::

    model = build_preset("qwen2.5-vl-7b", dtype=torch.bfloat16, device="cuda")   # built on the GPU directly
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Qwen2.5-VL's special token ids (the released tokenizer)
_QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                 vision_end_token_id=151653)
_QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)


@dataclass(frozen=True)
class Preset:
    """One model shape. ``frame_hw``: visual tokens per frame (after the 2x2 merge) in ``--tokens`` mode."""

    name: str
    text: dict
    vision: dict
    ids: dict
    tie_word_embeddings: bool
    frame_hw: tuple[int, int] = (16, 16)
    note: str = ""
    bos_eos: tuple[int, int] = field(default=(151643, 151645))

    @property
    def num_layers(self) -> int:
        return self.text["num_hidden_layers"]


def _text(hidden, inter, layers, heads, kv, vocab, theta=1e6, section=(16, 24, 24)):
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=1e-6, max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": list(section)})


PRESETS: dict[str, Preset] = {
    "qwen2.5-vl-3b": Preset("qwen2.5-vl-3b", _text(2048, 11008, 36, 16, 2, 151936),
                            dict(_QWEN_VISION, out_hidden_size=2048), _QWEN_IDS, tie_word_embeddings=True),
    "qwen2.5-vl-7b": Preset("qwen2.5-vl-7b", _text(3584, 18944, 28, 28, 4, 152064),
                            dict(_QWEN_VISION, out_hidden_size=3584), _QWEN_IDS, tie_word_embeddings=False),
    "qwen2.5-vl-72b": Preset("qwen2.5-vl-72b", _text(8192, 29568, 80, 64, 8, 152064),
                             dict(_QWEN_VISION, intermediate_size=3456, out_hidden_size=8192), _QWEN_IDS,
                             tie_word_embeddings=False,
                             note="146 GB of bf16 weights: more than one H200 holds; use --layers N to time N decoder "
                                  "layers"),
    # CPU tests: 2 layers, GQA 4:2, vocabulary 256 with the special ids at its end; 2x2 visual tokens per frame
    "tiny": Preset("tiny", _text(64, 128, 2, 4, 2, 256, theta=1e4, section=(2, 3, 3)),
                   dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0]),
                   dict(image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253),
                   tie_word_embeddings=False, frame_hw=(2, 2), bos_eos=(254, 254)),
}


def preset_config(name: str, layers: int | None = None):
    """The transformers ``Qwen2_5_VLConfig`` of preset ``name``; ``layers`` truncates the decoder to that many."""
    from transformers import Qwen2_5_VLConfig

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    text = dict(p.text)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        text["num_hidden_layers"] = layers
    bos, eos = p.bos_eos
    text.update(bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=p.tie_word_embeddings)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(p.vision), tie_word_embeddings=p.tie_word_embeddings,
                           bos_token_id=bos, eos_token_id=eos, **p.ids)
    cfg._attn_implementation = "sdpa"
    return cfg


def parameter_count(config) -> int:
    """Parameters of a Qwen2.5-VL config, counted from its shapes (decoder, head and vision tower)."""
    t, v = config.text_config, config.vision_config
    h, inter, L = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    hd = h // t.num_attention_heads
    kv = t.num_key_value_heads * hd
    attn = h * h + 2 * h * kv + h * h + h + 2 * kv  # q, k, v, o (+ q/k/v biases)
    layer = attn + 3 * h * inter + 2 * h
    embed = t.vocab_size * h
    head = 0 if getattr(config, "tie_word_embeddings", False) or getattr(t, "tie_word_embeddings", False) else embed
    vh, vi = v.hidden_size, v.intermediate_size
    patch = 3 * v.temporal_patch_size * v.patch_size ** 2 * vh
    vblock = 4 * vh * vh + 4 * vh + 3 * vh * vi + 2 * vi + vh + 2 * vh
    merged = vh * v.spatial_merge_size ** 2
    merger = vh + merged * merged + merged + merged * v.out_hidden_size + v.out_hidden_size
    return embed + head + L * layer + h + patch + v.depth * vblock + merger


def build_preset(name: str, dtype: torch.dtype = torch.bfloat16, device="cpu", layers: int | None = None,
                 seed: int = 0):
    """A randomly initialised Qwen2.5-VL of preset ``name``, built directly on ``device`` in ``dtype``.

    Raises ValueError (before allocating anything) when the weights alone would not fit in the device's memory.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = preset_config(name, layers)
    device = torch.device(device)
    if device.type == "cuda":
        need = parameter_count(cfg) * torch.tensor([], dtype=dtype).element_size()
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.9 * free:
            raise ValueError(f"preset {name} needs {need / 2**30:.0f} GiB of weights in {dtype} but the device has "
                             f"{free / 2**30:.0f} GiB free; time fewer decoder layers with --layers N")
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype)
    return model.eval()
