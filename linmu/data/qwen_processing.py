"""Qwen2-VL / Qwen2.5-VL model inputs from conversations, without torchvision.

`QwenVLProcessor` reproduces what ``Qwen2VLProcessor`` (image processor + video processor + tokenizer + chat template)
produces, plus training labels:

* **Pixels** (images and videos, one code path): ``smart_resize`` to multiples of ``patch_size * merge_size`` within
  ``[min_pixels, max_pixels]``; bicubic antialiased resize of the uint8 frames with ``torch.nn.functional.interpolate``
  (the very call torchvision's ``resize`` makes for uint8 CPU tensors, so the result matches transformers' torchvision
  backends bit for bit; the PIL backend, which transformers uses when torchvision is missing, differs by at most one
  grey level); fused rescale+normalise as transformers does it; the frame count padded to a multiple of
  ``temporal_patch_size`` by repeating the last frame (an image is a one-frame video, as the image processor's
  broadcast does); patchified into rows of ``3 * temporal_patch_size * patch_size**2`` in transformers' order
  ``(t, h/merge, w/merge, merge_h, merge_w | C, t_patch, patch_h, patch_w)``.
* **Text**: the Qwen2-VL chat template (default system prompt unless the conversation has one; ``system_prompt=None``
  drops it), every ``<image>``/``<video>`` placeholder (and one newline after it) replaced by
  ``<|vision_start|>`` + ``t*h*w / merge**2`` pads + ``<|vision_end|>``.
* **Labels**: -100 everywhere except the tokens of assistant answers and the ``<|im_end|>`` closing each answer.
* **Batch**: left padding (``pad_token_id``; attention 0, labels -100, ``mm_token_type_ids`` 0 on pads);
  ``mm_token_type_ids`` 1 on image pads, 2 on video pads; ``pixel_values``/``pixel_values_videos`` concatenated in
  sample order then placeholder order, with their ``*_grid_thw``; Qwen2.5-VL also gets ``second_per_grid_ts``.

Bad samples raise `BadSampleError` (``reason``: ``media_mismatch``, ``no_answer``, ``too_long``, ``bad_image`` /
``bad_video`` for an aspect ratio over 200); a batch call with
``skip_bad=True`` drops them and lists them in ``output.rejected``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .conversations import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, validate_turns
from .tokenizer import DEFAULT_SYSTEM_PROMPT

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PLACEHOLDER_RE = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})\n?")


class BadSampleError(ValueError):
    """A sample that cannot be turned into model inputs; ``reason`` is a short key used for skip counting."""

    def __init__(self, reason: str, sample: str = "", detail: str = ""):
        self.reason, self.sample, self.detail = reason, sample, detail
        super().__init__(f"{sample}: {reason}" + (f" ({detail})" if detail else "") if sample else
                         reason + (f" ({detail})" if detail else ""))


class ProcessorOutput(dict):
    """The model inputs (a plain ``dict`` of tensors) plus ``rejected`` (list of `BadSampleError`) and ``sample_ids``
    as attributes, so ``model(**output)`` works unchanged."""

    rejected: list
    sample_ids: list

    def __init__(self, *args, rejected=None, sample_ids=None, **kw):
        super().__init__(*args, **kw)
        self.rejected = list(rejected or [])
        self.sample_ids = list(sample_ids or [])


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """transformers' Qwen2-VL ``smart_resize``: both sides multiples of ``factor``, area within the bounds, aspect
    ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _tensor(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _as_hwc_uint8(x) -> np.ndarray:
    if hasattr(x, "convert") and hasattr(x, "size"):  # PIL image
        return np.asarray(x.convert("RGB"))
    a = np.asarray(x)
    if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected a PIL image or a uint8 (H, W, 3) array, got {a.dtype} {a.shape}")
    return a


class QwenVLProcessor:
    """Batches conversations with loaded media into Qwen2-VL / Qwen2.5-VL inputs (see the module docstring).

    ``video_min_pixels`` / ``video_max_pixels`` default to the image bounds (what transformers does when a checkpoint
    has only ``preprocessor_config.json``, as the Qwen2-VL / Qwen2.5-VL releases do).
    """

    def __init__(self, tokenizer, *, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2,
                 min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280, video_min_pixels: int | None = None,
                 video_max_pixels: int | None = None, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                 rescale_factor: float = 1 / 255, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                 return_second_per_grid_ts: bool = False, default_video_fps: float = 24.0):
        self.tokenizer = tokenizer
        self.patch_size, self.temporal_patch_size, self.merge_size = int(patch_size), int(temporal_patch_size), \
            int(merge_size)
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.video_min_pixels = int(video_min_pixels if video_min_pixels is not None else min_pixels)
        self.video_max_pixels = int(video_max_pixels if video_max_pixels is not None else max_pixels)
        self.image_mean, self.image_std = tuple(float(v) for v in image_mean), tuple(float(v) for v in image_std)
        self.rescale_factor = float(rescale_factor)
        self.system_prompt = system_prompt
        self.return_second_per_grid_ts = bool(return_second_per_grid_ts)
        self.default_video_fps = float(default_video_fps)

        def tid(tok):
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is None or i == getattr(tokenizer, "unk_token_id", None):
                raise ValueError(f"the tokenizer has no {tok} token")
            return int(i)

        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        self.image_token_id, self.video_token_id = tid(self.image_token), tid(self.video_token)
        self.vision_start_token_id, self.vision_end_token_id = tid(self.vision_start_token), tid(self.vision_end_token)
        self.im_end_token_id = tid("<|im_end|>")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        self.pad_token_id = int(pad)
        # fused rescale + normalise, exactly as transformers' torchvision backend builds it
        self._mean = torch.tensor(self.image_mean, dtype=torch.float32) * (1.0 / self.rescale_factor)
        self._std = torch.tensor(self.image_std, dtype=torch.float32) * (1.0 / self.rescale_factor)

    # ------------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_model_config(cls, config, tokenizer, **kwargs) -> "QwenVLProcessor":
        """Patch / temporal patch / merge sizes from ``config.vision_config``; checks that the tokenizer's vision ids
        equal the config's; Qwen2.5-VL (``model_type`` ``qwen2_5_vl``) also returns ``second_per_grid_ts``."""
        v = config.vision_config
        kw = dict(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size,
                  return_second_per_grid_ts=getattr(config, "model_type", "") == "qwen2_5_vl")
        kw.update(kwargs)
        proc = cls(tokenizer, **kw)
        for name, ours in (("image_token_id", proc.image_token_id), ("video_token_id", proc.video_token_id),
                           ("vision_start_token_id", proc.vision_start_token_id),
                           ("vision_end_token_id", proc.vision_end_token_id)):
            theirs = getattr(config, name, None)
            if theirs is not None and int(theirs) != ours:
                raise ValueError(f"tokenizer and model disagree on {name}: tokenizer {ours}, model config {theirs}")
        vocab = getattr(config.get_text_config(), "vocab_size", None) if hasattr(config, "get_text_config") else None
        if vocab is not None and len(tokenizer) > vocab:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab}")
        return proc

    def to_dict(self) -> dict:
        """Image-processor settings in transformers' ``preprocessor_config.json`` format (loadable by
        ``Qwen2VLImageProcessor`` / ``Qwen2VLVideoProcessor``)."""
        return {
            "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "resample": 3, "do_rescale": True,
            "rescale_factor": self.rescale_factor, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "linmu": {"video_min_pixels": self.video_min_pixels, "video_max_pixels": self.video_max_pixels,
                      "system_prompt": self.system_prompt,
                      "return_second_per_grid_ts": self.return_second_per_grid_ts},
        }

    def save_pretrained(self, path) -> None:
        """Write ``preprocessor_config.json`` and ``video_preprocessor_config.json`` (transformers' format) and the
        tokenizer into ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = self.to_dict()
        (path / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))
        video = {k: v for k, v in cfg.items() if k not in ("image_processor_type", "min_pixels", "max_pixels")}
        video.update(video_processor_type="Qwen2VLVideoProcessor",
                     size={"shortest_edge": self.video_min_pixels, "longest_edge": self.video_max_pixels})
        (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
        self.tokenizer.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path, tokenizer=None, **kwargs) -> "QwenVLProcessor":
        """Read a local model/processor folder (``preprocessor_config.json``, optional
        ``video_preprocessor_config.json``, tokenizer files). No network."""
        path = Path(path)
        cfg = json.loads((path / "preprocessor_config.json").read_text())
        size = cfg.get("size") or {}
        kw = dict(patch_size=cfg.get("patch_size", 14), temporal_patch_size=cfg.get("temporal_patch_size", 2),
                  merge_size=cfg.get("merge_size", 2),
                  min_pixels=cfg.get("min_pixels", size.get("shortest_edge", 56 * 56)),
                  max_pixels=cfg.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280)),
                  image_mean=cfg.get("image_mean", OPENAI_CLIP_MEAN), image_std=cfg.get("image_std", OPENAI_CLIP_STD),
                  rescale_factor=cfg.get("rescale_factor", 1 / 255))
        vpath = path / "video_preprocessor_config.json"
        if vpath.exists():
            vcfg = json.loads(vpath.read_text())
            vsize = vcfg.get("size") or {}
            kw["video_min_pixels"] = vcfg.get("min_pixels", vsize.get("shortest_edge"))
            kw["video_max_pixels"] = vcfg.get("max_pixels", vsize.get("longest_edge"))
        extra = cfg.get("linmu") or {}
        for k in ("system_prompt", "return_second_per_grid_ts"):
            if k in extra:
                kw[k] = extra[k]
        cfgjson = path / "config.json"
        if "return_second_per_grid_ts" not in kw and cfgjson.exists():
            kw["return_second_per_grid_ts"] = json.loads(cfgjson.read_text()).get("model_type") == "qwen2_5_vl"
        kw.update(kwargs)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(tokenizer, **kw)

    # ------------------------------------------------------------------------------------------------ grids
    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    def image_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)

    def video_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.patch_size * self.merge_size, self.video_min_pixels,
                            self.video_max_pixels)

    def image_grid(self, height: int, width: int) -> tuple[int, int, int]:
        h, w = self.image_size(height, width)
        return 1, h // self.patch_size, w // self.patch_size

    def video_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        h, w = self.video_size(height, width)
        return -(-num_frames // self.temporal_patch_size), h // self.patch_size, w // self.patch_size

    def num_tokens(self, grid) -> int:
        t, h, w = grid
        return t * h * w // (self.merge_size ** 2)

    # ------------------------------------------------------------------------------------------------ pixels
    def _pixels(self, frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """uint8 (T, 3, H, W) -> rows (gt*gh*gw, patch_dim) float32."""
        if tuple(frames.shape[-2:]) != (height, width):
            # torchvision's resize for uint8 CPU tensors with BICUBIC calls exactly this (native uint8 AA kernel)
            frames = F.interpolate(frames.contiguous(), size=[height, width], mode="bicubic", align_corners=False,
                                   antialias=True)
        x = frames.to(torch.float32).contiguous()
        x = x.sub_(self._mean.view(-1, 1, 1)).div_(self._std.view(-1, 1, 1))
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -x.shape[0] % tp:
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)], 0)
        gt, c = x.shape[0] // tp, x.shape[1]
        gh, gw = height // p, width // p
        x = x.view(gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, c * tp * p * p)

    def process_image(self, image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One image (PIL or uint8 HWC) -> (pixel rows, grid (1, gh, gw))."""
        a = _as_hwc_uint8(image)
        h, w = self.image_size(a.shape[0], a.shape[1])
        frames = _tensor(a).permute(2, 0, 1)[None]
        return self._pixels(frames, h, w), (1, h // self.patch_size, w // self.patch_size)

    def process_video(self, frames) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One video (uint8 (T, H, W, 3) array / tensor, or a list of equally sized frames) -> (rows, grid)."""
        if isinstance(frames, (list, tuple)):
            frames = np.stack([_as_hwc_uint8(f) for f in frames])
        t = frames if torch.is_tensor(frames) else _tensor(np.asarray(frames))
        if t.ndim != 4 or t.shape[-1] != 3 or t.dtype != torch.uint8 or t.shape[0] == 0:
            raise ValueError(f"expected uint8 video frames (T, H, W, 3), got {t.dtype} {tuple(t.shape)}")
        h, w = self.video_size(t.shape[1], t.shape[2])
        rows = self._pixels(t.permute(0, 3, 1, 2), h, w)
        return rows, self.video_grid(t.shape[0], t.shape[1], t.shape[2])

    # ------------------------------------------------------------------------------------------------ text
    def _second_per_grid(self, frames, timestamps=None, sampled_fps=None) -> float:
        if sampled_fps:
            return self.temporal_patch_size / float(sampled_fps)
        if timestamps is not None and len(timestamps) > 1 and timestamps[-1] > timestamps[0]:
            return self.temporal_patch_size * float(timestamps[-1] - timestamps[0]) / (len(timestamps) - 1)
        return self.temporal_patch_size / self.default_video_fps

    def build_text(self, turns, image_grids=(), video_grids=(), add_generation_prompt: bool = False):
        """The prompt string with placeholders expanded, and the character spans ``[start, end)`` of the assistant
        answers (each including its ``<|im_end|>``). Raises `BadSampleError` on a placeholder/media count mismatch."""
        image_grids, video_grids = list(image_grids), list(video_grids)
        counts = {"image": 0, "video": 0}
        merge2 = self.merge_size ** 2

        def expand(match):
            kind = "image" if match.group(1) == IMAGE_PLACEHOLDER else "video"
            grids = image_grids if kind == "image" else video_grids
            i = counts[kind]
            counts[kind] += 1
            if i >= len(grids):
                return match.group(0)  # reported below
            t, h, w = grids[i]
            pad = self.image_token if kind == "image" else self.video_token
            return self.vision_start_token + pad * (t * h * w // merge2) + self.vision_end_token

        turns = list(turns)
        if add_generation_prompt:
            while turns and turns[-1][0] == "assistant":
                turns.pop()
        parts, spans, pos = [], [], 0

        def emit(s):
            nonlocal pos
            parts.append(s)
            pos += len(s)

        if self.system_prompt is not None and (not turns or turns[0][0] != "system"):
            emit(f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n")
        for role, text in turns:
            content = _PLACEHOLDER_RE.sub(expand, text)
            emit(f"<|im_start|>{role}\n")
            if role == "assistant":
                start = pos
                emit(content + "<|im_end|>")
                spans.append((start, pos))
                emit("\n")
            else:
                emit(content + "<|im_end|>\n")
        if add_generation_prompt:
            emit("<|im_start|>assistant\n")
        if counts["image"] != len(image_grids) or counts["video"] != len(video_grids):
            raise BadSampleError("media_mismatch", detail=f"{counts['image']} image / {counts['video']} video "
                                 f"placeholders for {len(image_grids)} images / {len(video_grids)} videos")
        return "".join(parts), spans

    # ------------------------------------------------------------------------------------------------ one sample
    def encode(self, sample, max_length: int | None = None, add_generation_prompt: bool = False) -> dict:
        """One sample with loaded media -> unbatched tensors (1-D ``input_ids``, ``attention_mask``, ``labels``,
        ``mm_token_type_ids``; pixel tensors and grids when it has media). Raises `BadSampleError`."""
        desc = sample.describe() if hasattr(sample, "describe") else repr(getattr(sample, "id", "?"))
        turns = list(sample.turns)
        images = list(getattr(sample, "images", None) or [])
        videos = list(getattr(sample, "videos", None) or [])
        if any(isinstance(x, (str, Path)) for x in images + videos):
            raise TypeError(f"{desc}: media must be loaded (PIL images / frame arrays), not paths; see "
                            "linmu.data.dataset.load_media")
        reason = validate_turns(turns, need_answer=not add_generation_prompt)
        if reason:
            raise BadSampleError(reason, desc, "no assistant answer" if reason == "no_answer" else "")

        # grids first (cheap), so over-long samples are rejected before any pixel work
        img_arrays = [_as_hwc_uint8(im) for im in images]
        try:
            image_grids = [self.image_grid(a.shape[0], a.shape[1]) for a in img_arrays]
        except ValueError as e:  # smart_resize: extreme aspect ratio
            raise BadSampleError("bad_image", desc, str(e)) from None
        vid_arrays = []
        for v in videos:
            if isinstance(v, (list, tuple)):
                v = np.stack([_as_hwc_uint8(f) for f in v])
            v = v.numpy() if torch.is_tensor(v) else np.asarray(v)
            if v.ndim != 4 or v.shape[-1] != 3 or v.dtype != np.uint8 or len(v) == 0:
                raise ValueError(f"{desc}: video frames must be uint8 (T, H, W, 3), got {v.dtype} {v.shape}")
            vid_arrays.append(v)
        try:
            video_grids = [self.video_grid(v.shape[0], v.shape[1], v.shape[2]) for v in vid_arrays]
        except ValueError as e:
            raise BadSampleError("bad_video", desc, str(e)) from None
        try:
            text, spans = self.build_text(turns, image_grids, video_grids, add_generation_prompt)
        except BadSampleError as e:
            raise BadSampleError(e.reason, desc, e.detail) from None

        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        if max_length is not None and len(ids) > max_length:
            raise BadSampleError("too_long", desc, f"{len(ids)} tokens > max_length {max_length}")
        labels = torch.full_like(ids, -100)
        if spans and not add_generation_prompt:
            offsets = enc["offset_mapping"]
            for k, (s, e) in enumerate(offsets):
                if e > s and any(s < b and e > a for a, b in spans):
                    labels[k] = ids[k]
        mm = torch.zeros_like(ids)
        mm[ids == self.image_token_id] = 1
        mm[ids == self.video_token_id] = 2
        labels[(mm > 0) | (ids == self.vision_start_token_id) | (ids == self.vision_end_token_id)] = -100
        n_img, n_vid = int((mm == 1).sum()), int((mm == 2).sum())
        want_img = sum(self.num_tokens(g) for g in image_grids)
        want_vid = sum(self.num_tokens(g) for g in video_grids)
        if n_img != want_img or n_vid != want_vid:
            raise BadSampleError("media_mismatch", desc, f"{n_img} image / {n_vid} video pad tokens in the text "
                                 f"(expected {want_img} / {want_vid}; literal pad tokens in the conversation?)")

        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "mm_token_type_ids": mm}
        if img_arrays:
            rows = [self.process_image(a)[0] for a in img_arrays]
            out["pixel_values"] = torch.cat(rows)
            out["image_grid_thw"] = torch.tensor(image_grids, dtype=torch.long)
        if vid_arrays:
            rows = [self.process_video(v)[0] for v in vid_arrays]
            out["pixel_values_videos"] = torch.cat(rows)
            out["video_grid_thw"] = torch.tensor(video_grids, dtype=torch.long)
            if self.return_second_per_grid_ts:
                stamps = list(getattr(sample, "video_timestamps", None) or [])
                fps = list(getattr(sample, "video_fps", None) or [])
                out["second_per_grid_ts"] = torch.tensor(
                    [self._second_per_grid(v, stamps[i] if i < len(stamps) else None, fps[i] if i < len(fps) else None)
                     for i, v in enumerate(vid_arrays)], dtype=torch.float32)
        return out

    # ------------------------------------------------------------------------------------------------ batches
    def pad(self, features: list[dict], sample_ids=None) -> ProcessorOutput:
        """Left-pad unbatched features (from `encode`) into one batch. ``pad(map(encode, s)) == self(s)``."""
        features = [f for f in features if f is not None]
        if not features:
            raise ValueError("no samples to batch")
        n = max(len(f["input_ids"]) for f in features)
        b = len(features)
        out = ProcessorOutput(sample_ids=sample_ids)
        for key, fill in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("labels", -100),
                          ("mm_token_type_ids", 0)):
            t = torch.full((b, n), fill, dtype=torch.long)
            for i, f in enumerate(features):
                v = f[key]
                t[i, n - len(v):] = v
            out[key] = t
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            parts = [f[key] for f in features if key in f]
            if parts:
                out[key] = torch.cat(parts)
        return out

    def __call__(self, samples, max_length: int | None = None, add_generation_prompt: bool = False,
                 skip_bad: bool = False) -> ProcessorOutput:
        """Batch ``samples`` (objects with ``turns``, ``images``, ``videos`` and optionally ``video_timestamps``,
        ``video_fps``, ``id``, ``source``; e.g. `LoadedSample`). Bad samples raise `BadSampleError`, or with
        ``skip_bad=True`` are left out and listed in ``output.rejected`` (raises if none is left)."""
        feats, ids, rejected = [], [], []
        for s in samples:
            try:
                feats.append(self.encode(s, max_length=max_length, add_generation_prompt=add_generation_prompt))
                ids.append(getattr(s, "id", None))
            except BadSampleError as e:
                if not skip_bad:
                    raise
                rejected.append(e)
        if not feats:
            raise BadSampleError("empty_batch", detail=f"all {len(rejected)} samples rejected")
        out = self.pad(feats, sample_ids=ids)
        out.rejected = rejected
        return out


__all__ = ["QwenVLProcessor", "BadSampleError", "ProcessorOutput", "smart_resize", "OPENAI_CLIP_MEAN",
           "OPENAI_CLIP_STD"]
