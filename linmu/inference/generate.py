"""Generation from a prompt with images and a video: load a LinMU model or its teacher from a directory, turn the
prompt and media into model inputs, generate with streaming, and time it. `linmu generate` is a thin shell over this.

::

    from linmu.inference.generate import load_model, generate

    lm = load_model("runs/stage3/final", processor="ckpt/Qwen2-VL-2B-Instruct")   # or a teacher directory
    result = generate(lm, "What happens in the clip?", video="clip.mp4", fps=2, max_frames=64,
                      max_new_tokens=64, on_text=lambda s: print(s, end="", flush=True))
    print(result.ttft_s, result.decode_tokens_per_s)

* **Model directories.** `inspect_model_dir` tells a LinMU directory (``config.json`` has a ``linmu`` section; loaded
  with `linmu.load`) from a supported teacher (``architectures[0]`` in `linmu.convert.FAMILIES`; loaded with its
  transformers class). Anything else (no such directory, no or corrupt ``config.json``, another architecture,
  truncated weights) raises `InputError` with one line naming the problem.
* **Processor.** Qwen2-VL / Qwen2.5-VL only for now (`linmu.data.build.teacher_processor`: the tokenizer and
  ``preprocessor_config.json`` of the directory). A LinMU directory written by ``save_pretrained`` has no tokenizer:
  pass ``processor=`` (the teacher's directory) or copy the teacher's tokenizer files into it. Other families raise
  `InputError` ("... not supported yet for <family>").
* **Media.** Images with `linmu.data.load_image`; the video decoded with PyAV (`linmu.data.decode_video`): by default
  ``fps=DEFAULT_FPS`` frames per second, at most ``DEFAULT_MAX_FRAMES`` (uniform over the clip beyond that);
  ``num_frames=k`` takes ``k`` frames uniformly instead. Bad files raise `linmu.data.MediaError` (one line:
  ``"<path>: <problem>"``: missing, empty, corrupt, unsupported format, no video stream, no frames).
* **Prompt.** One user turn. ``<image>`` / ``<video>`` in the prompt mark where the media go; without them the
  media come first (images, then the video), as in `linmu.data.conversations`.
* **Timing.** ``ttft_s``: from the call to ``generate`` (inputs already built; vision encoding and prefill included)
  to the first new token; ``decode_tokens_per_s``: tokens after the first over the time after the first;
  ``tokens_per_s``: all new tokens over the whole call. Media decoding is timed separately (``media_s``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TextStreamer

DEFAULT_FPS = 2.0
DEFAULT_MAX_FRAMES = 128
PROCESSOR_FAMILIES = ("qwen2_vl", "qwen2_5_vl")  # model_type values the Qwen-VL processor handles
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class InputError(ValueError):
    """A model directory, prompt or option that cannot be used; ``str(err)`` is one line naming the problem."""

    def __init__(self, problem: str):
        super().__init__(" ".join(str(problem).split()))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def parse_dtype(dtype) -> torch.dtype | None:
    """``None``/``"auto"`` -> None (the checkpoint's own); a name (``"bfloat16"``, ``"bf16"``, ...) or a dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name in ("", "auto", "none"):
        return None
    if name not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, auto")
    return _DTYPES[name]


# ------------------------------------------------------------------------------------------------ model directories

@dataclass
class ModelDirInfo:
    """What a model directory holds: ``kind`` ``"linmu"`` or ``"teacher"``, ``family`` (the config's
    ``model_type``, e.g. ``qwen2_vl``), ``architecture`` (``architectures[0]``) and the raw config."""

    path: Path
    kind: str
    family: str
    architecture: str
    config: dict


def inspect_model_dir(path) -> ModelDirInfo:
    """Classify a model directory from its ``config.json`` alone (no weights read). Raises `InputError`."""
    from ..convert import FAMILIES

    p = Path(path)
    if not p.exists():
        raise InputError(f"model directory {p} does not exist")
    if not p.is_dir():
        raise InputError(f"{p} is not a model directory (it is a file)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise InputError(f"{p} is not a model directory: it has no config.json")
    try:
        raw = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{cfg} is not valid JSON ({_one_line(e)}): the checkpoint is corrupt") from None
    if not isinstance(raw, dict):
        raise InputError(f"{cfg} is not a model config (a JSON object)")
    arch = (raw.get("architectures") or [raw.get("model_type") or "unknown"])[0]
    family = str(raw.get("model_type") or "")
    if "linmu" in raw:
        return ModelDirInfo(p, "linmu", family or str(raw.get("linmu_family", "")), arch, raw)
    if arch in FAMILIES:
        return ModelDirInfo(p, "teacher", family, arch, raw)
    raise InputError(f"{p} holds a {arch} model, which is neither a LinMU model nor a supported teacher "
                     f"(supported teachers: {', '.join(sorted(FAMILIES))})")


def _check_family(info: ModelDirInfo, what: str = "generation and evaluation from prompts and media") -> None:
    if info.family not in PROCESSOR_FAMILIES:
        raise InputError(f"{what} is not supported yet for {info.family or info.architecture} "
                         f"({info.path}); supported: {', '.join(PROCESSOR_FAMILIES)}")


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in _TOKENIZER_FILES)


def load_processor(model_dir, config, processor=None):
    """The Qwen-VL processor for a model: from ``processor`` (a directory with the teacher's tokenizer and
    ``preprocessor_config.json``) when given, else from ``model_dir``. Raises `InputError`."""
    from ..data.build import teacher_processor

    src = Path(processor) if processor is not None else Path(model_dir)
    if not src.is_dir():
        raise InputError(f"processor directory {src} does not exist")
    if not _has_tokenizer(src):
        hint = ("pass the teacher's directory as the processor (--processor DIR / processor=DIR) or copy the "
                "teacher's tokenizer files and preprocessor_config.json into it") if processor is None else \
            "it must hold the teacher's tokenizer files"
        raise InputError(f"{src} has no tokenizer ({' / '.join(_TOKENIZER_FILES)}): {hint}")
    try:
        return teacher_processor(src, config)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        raise InputError(f"cannot build the processor from {src}: {_one_line(e)}") from None


@dataclass
class LoadedModel:
    """A model ready for `generate`: ``model`` (eval mode), its ``processor``, ``kind`` (``"linmu"`` /
    ``"teacher"``), ``family`` and the directory it came from."""

    model: Any
    processor: Any
    kind: str
    family: str
    path: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def load_model(path, *, teacher: bool | None = None, processor=None, dtype=None, device=None) -> LoadedModel:
    """Load a LinMU model (`linmu.load`) or a supported teacher (its transformers class) and its processor.

    ``teacher``: ``None`` detects the kind from ``config.json``; ``True`` / ``False`` insist on a teacher / a
    LinMU model. ``processor``: directory of the tokenizer and preprocessor settings (default: ``path``).
    Every problem with the directory raises `InputError` (one line); the checks that need no weights come first.
    """
    from ..io import _check_weights, load, load_teacher

    info = inspect_model_dir(path)
    if teacher is True and info.kind == "linmu":
        raise InputError(f"{info.path} is a LinMU model, not a teacher checkpoint")
    if teacher is False and info.kind == "teacher":
        raise InputError(f"{info.path} is a {info.architecture} teacher checkpoint, not a LinMU model "
                         "(convert it first with linmu.convert, or load it as a teacher)")
    _check_family(info)
    dtype = parse_dtype(dtype)
    # the processor before the weights: a missing tokenizer is found in milliseconds
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(info.path))
    except (ValueError, OSError, KeyError) as e:
        raise InputError(f"{info.path}/config.json cannot be read as a {info.family} config: {_one_line(e)}") \
            from None
    proc = load_processor(info.path, config, processor)
    try:
        if info.kind == "linmu":
            model = load(info.path, dtype=dtype, device=device)
        else:
            if any(info.path.glob("*.safetensors")):
                _check_weights(info.path)
            elif not any(info.path.glob("*.bin")):
                raise FileNotFoundError(f"{info.path} has no weights file (*.safetensors or *.bin)")
            model = load_teacher(info.path, dtype=dtype)
            if device is not None:
                model.to(device)
            model.eval()
    except (ValueError, FileNotFoundError, OSError, KeyError, RuntimeError) as e:
        raise InputError(_one_line(e)) from None
    return LoadedModel(model=model, processor=proc, kind=info.kind, family=info.family, path=str(info.path))


# ------------------------------------------------------------------------------------------------ inputs

@dataclass
class Media:
    """Decoded media of one prompt: ``images`` (PIL), ``videos`` (uint8 ``(T, H, W, 3)``), per video its frame
    timestamps (s) and sampled fps; ``seconds`` spent decoding."""

    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    video_timestamps: list = field(default_factory=list)
    video_fps: list = field(default_factory=list)
    seconds: float = 0.0


def video_sampling(num_frames=None, fps=None, max_frames=None) -> dict:
    """The frame-sampling arguments of `decode_video`: ``num_frames`` or ``fps`` (default `DEFAULT_FPS`) and
    ``max_frames`` (default `DEFAULT_MAX_FRAMES`). Raises `InputError` on bad values."""
    if num_frames is not None and fps is not None:
        raise InputError("--num-frames and --fps are mutually exclusive: give one")
    if num_frames is not None and int(num_frames) <= 0:
        raise InputError(f"the number of frames must be positive, got {num_frames}")
    if fps is not None and float(fps) <= 0:
        raise InputError(f"fps must be positive, got {fps}")
    if max_frames is not None and int(max_frames) <= 0:
        raise InputError(f"max frames must be positive, got {max_frames}")
    if num_frames is None and fps is None:
        fps = DEFAULT_FPS
    return {"num_frames": None if num_frames is None else int(num_frames), "fps": None if fps is None else float(fps),
            "max_frames": DEFAULT_MAX_FRAMES if max_frames is None else int(max_frames)}


def load_media(images=(), videos=(), **sampling) -> Media:
    """Load images (paths or PIL images / uint8 arrays, kept as they are) and decode videos (paths, or uint8
    ``(T, H, W, 3)`` arrays kept as they are). ``sampling``: `video_sampling` arguments. Raises `MediaError`."""
    from ..data.media import decode_video, load_image

    t0 = time.perf_counter()
    out = Media()
    for im in images:
        out.images.append(load_image(im) if isinstance(im, (str, Path)) else im)
    kw = video_sampling(**sampling)
    for v in videos:
        if isinstance(v, (str, Path)):
            frames, stamps, info = decode_video(v, return_info=True, **kw)
            out.videos.append(frames)
            out.video_timestamps.append(stamps)
            out.video_fps.append(info["sampled_fps"])
        else:
            out.videos.append(v)
            out.video_timestamps.append(None)
            out.video_fps.append(None)
    out.seconds = time.perf_counter() - t0
    return out


def prompt_sample(prompt: str, media: Media, sid: str = "prompt"):
    """A one-turn `linmu.data.LoadedSample` with placeholders checked (``<image>`` / ``<video>`` added at the start
    when the prompt has none). Raises `InputError` when the placeholders and the media disagree."""
    from ..data.conversations import LoadedSample, normalize_placeholders

    turns, problem = normalize_placeholders([("user", prompt)], len(media.images), len(media.videos))
    if problem:
        raise InputError(f"the prompt and the media disagree: {problem}")
    return LoadedSample(id=sid, turns=turns, images=list(media.images), videos=list(media.videos),
                        video_timestamps=list(media.video_timestamps), video_fps=list(media.video_fps))


def to_model_inputs(batch, model) -> dict:
    """Processor output -> keyword arguments of ``model`` / ``model.generate`` on its device (labels dropped;
    pixels in the model's dtype)."""
    p = next(model.parameters())
    out = {}
    for k, v in batch.items():
        if k == "labels" or not torch.is_tensor(v):
            continue
        if k in ("pixel_values", "pixel_values_videos"):
            v = v.to(p.dtype)
        out[k] = v.to(p.device)
    return out


def build_inputs(lm: LoadedModel, prompt: str, media: Media, max_length: int | None = None):
    """Processor output (a batch of one, generation prompt appended) for ``prompt`` with ``media``."""
    from ..data.qwen_processing import BadSampleError

    sample = prompt_sample(prompt, media)
    try:
        return lm.processor([sample], add_generation_prompt=True, max_length=max_length)
    except BadSampleError as e:
        raise InputError(f"cannot build the model inputs: {e}") from None


# ------------------------------------------------------------------------------------------------ streaming

class TimingStreamer(TextStreamer):
    """A streamer for ``model.generate(streamer=...)``: transformers' `TextStreamer` (whole words, prompt skipped,
    special tokens hidden) that hands each text piece to ``on_text`` instead of printing it, and records the arrival
    time (``time.perf_counter``) of every new token in ``token_times``."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None = None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text
        self.token_times: list[float] = []
        self.pieces: list[str] = []

    def put(self, value):
        if not self.next_tokens_are_prompt:
            now = time.perf_counter()
            self.token_times.extend([now] * int(value.numel()))
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self.pieces.append(text)
            if self.on_text is not None:
                self.on_text(text)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    ttft_s: float | None
    total_s: float
    tokens_per_s: float
    decode_tokens_per_s: float | None
    media_s: float = 0.0
    frames: int = 0

    def summary(self) -> str:
        ttft = f"{self.ttft_s * 1000:.1f} ms" if self.ttft_s is not None else "n/a"
        dec = f"{self.decode_tokens_per_s:.1f}" if self.decode_tokens_per_s is not None else "n/a"
        return (f"prompt {self.prompt_tokens} tokens ({self.frames} video frames, media decoded in "
                f"{self.media_s:.2f} s); {self.new_tokens} new tokens in {self.total_s:.2f} s; TTFT {ttft}; "
                f"{dec} tokens/s after the first ({self.tokens_per_s:.1f} tokens/s overall)")


@torch.inference_mode()
def generate(lm: LoadedModel, prompt: str, *, images=(), video=None, num_frames=None, fps=None, max_frames=None,
             media: Media | None = None, max_new_tokens: int = 128, on_text: Callable[[str], None] | None = None,
             do_sample: bool = False, max_length: int | None = None, **generate_kwargs) -> GenerationResult:
    """Generate an answer to ``prompt`` with ``images`` (paths / PIL) and an optional ``video`` (path or uint8
    frames), or with ``media`` already loaded by `load_media`. ``on_text`` receives the answer piece by piece as it
    is generated (streaming). Greedy unless ``do_sample``. Raises `InputError` / `linmu.data.MediaError` for bad
    inputs."""
    if max_new_tokens is None or int(max_new_tokens) <= 0:
        raise InputError(f"max new tokens must be positive, got {max_new_tokens}")
    if media is None:
        media = load_media(list(images), [video] if video is not None else [], num_frames=num_frames, fps=fps,
                           max_frames=max_frames)
    elif images or video is not None:
        raise InputError("give either media= or images= / video=, not both")
    batch = build_inputs(lm, prompt, media, max_length=max_length)
    inputs = to_model_inputs(batch, lm.model)
    tok = lm.processor.tokenizer
    streamer = TimingStreamer(tok, on_text)
    gen = dict(max_new_tokens=int(max_new_tokens), do_sample=do_sample, pad_token_id=lm.processor.pad_token_id)
    gen.update(generate_kwargs)
    t0 = time.perf_counter()
    out = lm.model.generate(**inputs, streamer=streamer, **gen)
    total = time.perf_counter() - t0
    n_prompt = inputs["input_ids"].shape[1]
    new = out[0, n_prompt:].tolist()
    times = streamer.token_times
    ttft = times[0] - t0 if times else None
    decode_rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
    return GenerationResult(
        text=tok.decode(new, skip_special_tokens=True), token_ids=new, prompt_tokens=int(n_prompt),
        new_tokens=len(new), ttft_s=ttft, total_s=total, tokens_per_s=len(new) / total if total > 0 else 0.0,
        decode_tokens_per_s=decode_rate, media_s=media.seconds, frames=sum(len(v) for v in media.videos))


__all__ = ["InputError", "ModelDirInfo", "LoadedModel", "Media", "GenerationResult", "inspect_model_dir",
           "load_model", "load_processor", "load_media", "video_sampling", "prompt_sample", "build_inputs",
           "to_model_inputs", "generate", "TimingStreamer", "parse_dtype", "DEFAULT_FPS", "DEFAULT_MAX_FRAMES"]
