"""`linmu bench`: teacher, LinMU student and the no-attention floor, measured side by side in one run.

For every context length (``tokens``: a few text tokens, one video span of whole frames, text to the end, with the
video's grid metadata so the student sees a real visual span; or ``frames``: a real video through the vision tower)
and for each model, on the same device in the same dtype:

- **TTFT**: one prefill forward from the inputs to the first token (only the last position's logits, argmax
  included): vision tower (``frames`` mode, also timed alone), M-RoPE positions, the student's token layout, the
  decoder and the head. The teacher fills a DynamicCache under flash SDPA; the student its fixed-size LinMUCache.
- **decode**: ms per greedy decode step and tokens/s at batch 1 and at the largest batch that fits in memory for that
  model at that context (`find_batch`), from a pre-allocated cache (`linmu.bench.decode`); one step captured in a
  CUDA graph for both models or for neither.
- **peak memory** of the prefill and of the decode at the largest batch; **cache bytes per sequence** (analytic,
  checked against the allocated buffers).
- **floor**: the teacher with its attention core skipped (`linmu.bench.attention`): TTFT only.

Times are medians over repeats after warm-up (CUDA events on GPU; wall clock on CPU). `run_bench` returns a dict
(``config``, ``rows``, ``summary``); `format_table` and `summary_line` render it; the CLI prints and writes files.
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from .attention import FLOOR_ATTENTION, TEACHER_ATTENTION, set_text_attention
from .decode import DecodeSession, decode_result, student_cache_bytes_per_seq, teacher_cache_bytes_per_seq

DEFAULT_TOKENS = (8192, 16384, 32768, 65536, 131072, 262144)
# targets of the speed issue, evaluated from the measured rows (never assumed)
TARGET_TTFT_128K = 2.5  # teacher TTFT / student TTFT at 131072 tokens, at least
TARGET_FLOOR_128K = 1.15  # student TTFT / floor TTFT at 131072 tokens, at most
TARGET_TTFT_256K = 4.0  # teacher / student at 262144 tokens, at least
TARGET_DECODE_128K = 20.0  # student / teacher decode tokens/s at 131072 tokens, each at its largest batch, at least
TARGET_STATE_BYTES = 64 * 10**6  # student cache bytes per sequence, at most (64 MB)


class BenchError(ValueError):
    """A bad option or an impossible measurement; ``str(err)`` is one line naming the problem."""


@dataclass
class BenchOptions:
    """Everything `run_bench` needs; the CLI fills it from its flags."""

    preset: str | None = None  # a name of linmu.bench.presets.PRESETS (random weights) ...
    model: str | None = None  # ... or a checkpoint directory (a supported teacher or a LinMU model)
    layers: int | None = None  # presets only: time this many decoder layers
    tokens: tuple[int, ...] | None = None  # context lengths (tokens mode) ...
    frames: tuple[int, ...] | None = None  # ... or video frames through the vision tower (frames mode)
    resolution: tuple[int, int] = (448, 448)  # frames mode: frame height x width in pixels
    frame_tokens: tuple[int, int] | None = None  # tokens mode: visual tokens per frame (h, w); default the preset's
    device: str | None = None  # default: cuda when available
    dtype: str = "bfloat16"
    cuda_graphs: bool | None = None  # default: on for CUDA, off on CPU
    decode: bool = True
    decode_steps: int = 16  # timed consecutive steps per repeat
    repeats: int = 3
    warmup: int = 1
    max_seconds: float = 30.0  # stop repeating a measurement once its timed runs took this long (at least one run)
    max_batch: int | None = None  # cap of the batch search (default 4096 on CUDA, 4 on CPU)
    memory_gib: float | None = None  # memory budget for the batch search (default: the device's free memory)
    seed: int = 0
    mmate: dict = field(default_factory=dict)  # MMateConfig overrides for the conversion (default: none)


# ------------------------------------------------------------------------------------------------ options

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    """``"8192,16384"`` -> (8192, 16384); ``8K``/``128k`` mean 1024 times. Raises BenchError on bad entries."""
    out = []
    for part in str(text).split(","):
        s = part.strip().lower()
        if not s:
            continue
        mult = 1024 if s.endswith("k") else 1
        try:
            v = int(s[:-1] if s.endswith("k") else s) * mult
        except ValueError:
            raise BenchError(f"{what}: {part.strip()!r} is not an integer") from None
        if v <= 0:
            raise BenchError(f"{what}: values must be positive, got {v}")
        out.append(v)
    if not out:
        raise BenchError(f"{what}: give at least one value")
    return tuple(out)


def parse_resolution(text: str, what: str = "--resolution", example: str = "448x448") -> tuple[int, int]:
    """``"448x448"`` -> (448, 448). Raises BenchError otherwise."""
    s = str(text).lower().replace("*", "x")
    try:
        h, w = (int(p) for p in s.split("x"))
    except ValueError:
        raise BenchError(f"{what} must look like HxW (e.g. {example}), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise BenchError(f"{what} must be positive, got {text!r}")
    return h, w


def _check_options(o: BenchOptions) -> tuple[torch.device, torch.dtype, bool]:
    if (o.preset is None) == (o.model is None):
        raise BenchError("give exactly one of --preset NAME or --model DIR")
    if o.tokens is not None and o.frames is not None:
        raise BenchError("give either --tokens or --frames, not both")
    if o.layers is not None and o.model is not None:
        raise BenchError("--layers applies to presets only")
    if o.preset is not None:
        from .presets import PRESETS

        if o.preset not in PRESETS:
            raise BenchError(f"unknown preset {o.preset!r}; choose one of {', '.join(PRESETS)}")
    for name in ("decode_steps", "repeats"):
        if getattr(o, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(o, name)}")
    if o.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {o.warmup}")
    if o.max_batch is not None and o.max_batch < 1:
        raise BenchError(f"--max-batch must be >= 1, got {o.max_batch}")
    if o.dtype not in _DTYPES:
        raise BenchError(f"unknown dtype {o.dtype!r}; use one of bfloat16, float16, float32")
    device = torch.device(o.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda requested but no CUDA device is available")
    graphs = (device.type == "cuda") if o.cuda_graphs is None else o.cuda_graphs
    if graphs and device.type != "cuda":
        raise BenchError("--cuda-graphs needs a CUDA device (use --no-cuda-graphs on CPU)")
    return device, _DTYPES[o.dtype], graphs


# ------------------------------------------------------------------------------------------------ models

def _free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load_models(o: BenchOptions, device, dtype, log):
    """(teacher, student_factory, description). ``student_factory(teacher)`` returns the student."""
    import linmu
    from ..config import MMateConfig

    mmate = MMateConfig.from_dict(dict(MMateConfig().to_dict(), **o.mmate))

    def convert(teacher):
        set_text_attention(teacher, "sdpa")
        with torch.device(device):
            return linmu.convert(teacher, mmate).eval()

    if o.preset is not None:
        from .presets import build_preset

        try:
            teacher = build_preset(o.preset, dtype=dtype, device=device, layers=o.layers, seed=o.seed)
        except ValueError as e:
            raise BenchError(str(e)) from None
        return teacher, convert, f"preset {o.preset} (random weights)" + (
            f", {o.layers} decoder layers" if o.layers else "")

    from ..inference.generate import InputError, inspect_model_dir

    try:
        info = inspect_model_dir(o.model)
    except InputError as e:
        raise BenchError(str(e)) from None
    if info.family not in ("qwen2_vl", "qwen2_5_vl"):
        raise BenchError(f"linmu bench supports Qwen2-VL and Qwen2.5-VL checkpoints; {o.model} is "
                         f"{info.family or info.architecture}")
    if info.kind == "teacher":
        log(f"loading the teacher from {o.model}")
        teacher = linmu.load_teacher(o.model, dtype=dtype).to(device).eval()
        return teacher, convert, f"teacher checkpoint {o.model}; student converted with MMateConfig defaults"
    # a LinMU checkpoint: the teacher is its architecture with random weights (speed does not depend on them)
    log(f"loading the LinMU model config from {o.model}")
    from ..convert import student_class

    s_cls = student_class(info.config.get("linmu_family", ""))
    t_cls = next(c for c in s_cls.__mro__[1:] if c.__module__.startswith("transformers.") and
                 hasattr(c, "config_class") and "ForConditionalGeneration" in c.__name__)
    from transformers import AutoConfig

    cfg = copy.deepcopy(AutoConfig.from_pretrained(o.model))
    for k in ("linmu", "linmu_family"):
        if hasattr(cfg, k):
            delattr(cfg, k)
    cfg.architectures = [t_cls.__name__]
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(o.seed)
    with torch.device(device):
        teacher = t_cls._from_config(cfg, dtype=dtype).eval()

    def load_student(_teacher):
        return linmu.load(o.model, dtype=dtype, device=device).eval()

    return teacher, load_student, (f"LinMU checkpoint {o.model}; teacher: its {t_cls.__name__} architecture with "
                                   "random weights")


# ------------------------------------------------------------------------------------------------ inputs

_PREFIX, _SUFFIX = 16, 16  # text tokens around the video: 15 + <vision_start>, <vision_end> + 15 or more


def _text_ids(config, n: int, gen: torch.Generator) -> torch.Tensor:
    special = min(config.image_token_id, config.video_token_id, config.vision_start_token_id,
                  config.vision_end_token_id)
    return torch.randint(0, max(2, min(special, config.get_text_config().vocab_size)), (n,), generator=gen)


def video_inputs(config, grid_thw: tuple[int, int, int], n_tokens: int | None = None, seed: int = 0) -> dict:
    """input_ids (1, L), mm_token_type_ids and video_grid_thw for: 15 text tokens, <vision_start>, one video of
    grid ``grid_thw`` (patches, before the spatial merge), <vision_end>, text up to ``n_tokens`` (default 15 more)."""
    m = config.vision_config.spatial_merge_size
    t, h, w = grid_thw
    n_video = t * (h // m) * (w // m)
    total = n_tokens if n_tokens is not None else _PREFIX + n_video + _SUFFIX
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([_text_ids(config, _PREFIX - 1, gen), torch.tensor([config.vision_start_token_id]),
                     torch.full((n_video,), config.video_token_id), torch.tensor([config.vision_end_token_id]),
                     _text_ids(config, total - _PREFIX - n_video - 1, gen)])[None].long()
    types = torch.zeros_like(ids)
    types[ids == config.video_token_id] = 2
    return {"input_ids": ids, "mm_token_type_ids": types, "video_grid_thw": torch.tensor([list(grid_thw)])}


def token_inputs(config, n_tokens: int, frame_hw: tuple[int, int], seed: int = 0) -> dict:
    """``n_tokens`` tokens: text, a video span of as many whole frames of ``frame_hw`` merged tokens as fit, text."""
    m = config.vision_config.spatial_merge_size
    per_t = frame_hw[0] * frame_hw[1]
    t = (n_tokens - _PREFIX - _SUFFIX) // per_t
    if t < 1:
        raise BenchError(f"--tokens {n_tokens} is too short: it needs at least {_PREFIX + _SUFFIX + per_t} tokens "
                         f"(text around one frame of {frame_hw[0]}x{frame_hw[1]} visual tokens)")
    return video_inputs(config, (t, frame_hw[0] * m, frame_hw[1] * m), n_tokens, seed)


def frame_inputs(config, frames: int, resolution: tuple[int, int], dtype, seed: int = 0) -> dict:
    """A real video of ``frames`` frames at ``resolution`` pixels: random pixels in the model's patch layout."""
    v = config.vision_config
    tp, ps, m = v.temporal_patch_size, v.patch_size, v.spatial_merge_size
    if frames % tp:
        raise BenchError(f"--frames {frames}: the number of frames must be a multiple of the temporal patch size {tp}")
    unit = ps * m
    H, W = resolution
    if H % unit or W % unit:
        raise BenchError(f"--resolution {H}x{W}: height and width must be multiples of {unit} "
                         f"(patch {ps} x spatial merge {m})")
    grid = (frames // tp, H // ps, W // ps)
    out = video_inputs(config, grid, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    out["pixel_values_videos"] = torch.randn(grid[0] * grid[1] * grid[2], 3 * tp * ps * ps, generator=gen).to(dtype)
    return out


# ------------------------------------------------------------------------------------------------ timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn, device) -> float:
    """Milliseconds of one call of ``fn`` (CUDA events from an idle GPU, so host work inside counts too)."""
    if device.type == "cuda":
        _sync(device)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        _sync(device)
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _repeat(fn, device, warmup: int, repeats: int, max_seconds: float) -> list[float]:
    for _ in range(warmup):
        fn()
    times, spent = [], 0.0
    while len(times) < repeats and (not times or spent < max_seconds * 1e3):
        times.append(_time_once(fn, device))
        spent += times[-1]
    return times


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure_prefill(model, kind: str, inputs: dict, device, warmup: int, repeats: int, max_seconds: float) -> dict:
    """TTFT of ``model`` on ``inputs`` (batch 1): the prefill forward into the model's cache, last logits, argmax."""
    from ..inference.cache import LinMUCache

    def run():
        cache = LinMUCache(model.mmate_blocks(), 1) if kind == "student" else None
        with torch.inference_mode():
            out = model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
            out.logits[:, -1].argmax(-1)
        return out

    if device.type == "cuda":
        _sync(device)
    base = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    warm = [_time_once(run, device) for _ in range(warmup)]
    _reset_peak(device)
    times = _repeat(run, device, 0, repeats, max_seconds)
    return {"ttft_ms": statistics.median(times), "ttft_ms_runs": times, "warmup_ms": warm,
            "prefill_peak_gib": _peak_gib(device), "weights_gib": base}


def measure_vision(model, inputs: dict, device, warmup: int, repeats: int, max_seconds: float) -> float:
    """Milliseconds of the vision tower alone on the video of ``inputs`` (median)."""
    def run():
        with torch.inference_mode():
            model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])

    return statistics.median(_repeat(run, device, warmup, repeats, max_seconds))


# ------------------------------------------------------------------------------------------------ decode batch

def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _session(model, kind, batch, context, o: BenchOptions, graphs: bool) -> DecodeSession:
    s = DecodeSession(model, kind, batch, context, max_steps=o.decode_steps + 8, cuda_graph=graphs)
    s.prepare(warmup=2)
    return s


def _budget_bytes(o: BenchOptions, device) -> int:
    if o.memory_gib is not None:
        return int(o.memory_gib * 2**30)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free - max(2**30, 0.03 * total))
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration, ValueError):
        avail = 4 * 2**30
    return int(avail * 0.5)


def find_batch(model, kind: str, context: int, per_seq_bytes: int, o: BenchOptions, graphs: bool, device,
               log) -> tuple[DecodeSession, dict]:
    """The largest decode batch of ``model`` at ``context`` that fits, as a prepared session, and how it was found.

    Bytes per sequence = the cache's (analytic) + the step's activations (on CUDA: the slope of the peak memory of a
    captured step between batch 1 and a probe batch); fixed bytes = the rest of the step's peak at batch 1. The
    largest batch under the budget (free memory less a reserve), capped by ``max_batch``, is then built and run; on
    out-of-memory it shrinks by 15% and tries again.
    """
    cap = o.max_batch or (4096 if device.type == "cuda" else 4)
    _free()  # cached blocks of earlier sessions count as free memory
    budget = _budget_bytes(o, device)
    info = {"cache_bytes_per_seq": per_seq_bytes, "budget_bytes": budget, "cap": cap}
    if device.type == "cuda":
        peaks = {}
        probe = int(max(2, min(8, 0.25 * budget // max(per_seq_bytes, 1))))
        for b in (1, probe):
            _free()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            s = None
            try:
                s = _session(model, kind, b, context, o, graphs)
                s.step()
                _sync(device)
                peaks[b] = torch.cuda.max_memory_allocated(device) - base
            except Exception as e:  # noqa: BLE001 - only out-of-memory is expected here
                if not _is_oom(e):
                    raise
                if b == 1:
                    raise BenchError(f"{kind}: one sequence of {context} tokens does not fit in memory") from None
            finally:
                if s is not None:
                    s.close()
                del s
        if len(peaks) == 2:
            slope = (peaks[probe] - peaks[1]) / (probe - 1)
        else:
            slope = float(peaks[1])
        slope = max(slope, float(per_seq_bytes))
        fixed = max(peaks[1] - slope, 0.0)
        info.update(measured_bytes_per_seq=slope, fixed_bytes=fixed, probe_batch=probe)
        batch = int((budget - fixed) // slope)
    else:
        batch = int(budget // max(per_seq_bytes, 1))
    batch = max(1, min(batch, cap))
    info["planned_batch"] = batch
    for _ in range(8):
        _free()
        _reset_peak(device)
        s = None
        try:
            s = _session(model, kind, batch, context, o, graphs)
            info["batch"] = batch
            return s, info
        except Exception as e:  # noqa: BLE001
            if s is not None:
                s.close()
            del s
            if not _is_oom(e) or batch == 1:
                raise
            log(f"    {kind}: batch {batch} ran out of memory; trying {max(1, int(batch * 0.85))}")
            batch = max(1, int(batch * 0.85))
    raise BenchError(f"{kind}: no decode batch fits at {context} tokens")


def measure_decode(model, kind: str, context: int, per_seq_bytes: int, o: BenchOptions, graphs: bool, device,
                   log) -> dict:
    """Decode at batch 1 and at the largest batch that fits (see `find_batch`)."""
    out = {}
    _free()
    s = _session(model, kind, 1, context, o, graphs)
    out["batch1"] = decode_result(s, s.time_steps(o.decode_steps, o.repeats))
    nbytes = s.cache_nbytes()
    s.close()
    del s
    best, search = find_batch(model, kind, context, per_seq_bytes, o, graphs, device, log)
    res = decode_result(best, best.time_steps(o.decode_steps, o.repeats))
    res["peak_gib"] = _peak_gib(device)
    res["search"] = search
    out["best"] = res
    out["cache_nbytes_batch1"] = nbytes
    best.close()
    del best
    _free()
    return out


# ------------------------------------------------------------------------------------------------ the run

def _log_prefill(log, name, row):
    m = row[name]
    peak = f", peak {m['prefill_peak_gib']:.1f} GiB" if m.get("prefill_peak_gib") is not None else ""
    warm = f", warm-up {' '.join(f'{w / 1e3:.1f}' for w in m['warmup_ms'])} s" if m["warmup_ms"] else ""
    log(f"  {name:7s} {row['tokens']:>7} tokens: TTFT {m['ttft_ms']:.1f} ms ({len(m['ttft_ms_runs'])} runs{warm})"
        f"{peak}")


def _log_decode(log, name, row):
    d = row[name]["decode"]
    log(f"  {name:7s} {row['tokens']:>7} tokens: decode batch 1 {d['batch1']['step_ms']:.2f} ms/step; largest batch "
        f"{d['best']['batch']}: {d['best']['step_ms']:.2f} ms/step = {d['best']['tok_s']:.0f} tokens/s")


def _warm(prev_ms: float | None, o: BenchOptions) -> int:
    # kernels without per-length tuning are warm after the first length; a slow model is not warmed up again
    return o.warmup if prev_ms is None or prev_ms < 2000 else 0


def run_bench(o: BenchOptions, log=lambda msg: None, partial=None) -> dict:
    """Measure teacher, floor and student (see the module doc). Returns ``{"config", "rows", "summary"}``.

    ``partial``, if given, is called with ``{"source", "rows"}`` after every measurement, so that a run cut short
    (a time limit) still leaves what it measured.
    """
    save = (lambda: partial({"source": source, "rows": rows})) if partial is not None else (lambda: None)
    device, dtype, graphs = _check_options(o)
    from .presets import PRESETS

    frames_mode = o.frames is not None
    teacher, make_student, source = _load_models(o, device, dtype, log)
    cfg = teacher.config
    frame_hw = o.frame_tokens or (PRESETS[o.preset].frame_hw if o.preset is not None else (16, 16))
    points = o.frames if frames_mode else (o.tokens or DEFAULT_TOKENS)
    # build every input first: a bad length fails before any timing
    inputs = []
    for n in points:
        x = frame_inputs(cfg, n, o.resolution, dtype, o.seed) if frames_mode else token_inputs(cfg, n, frame_hw,
                                                                                              o.seed)
        inputs.append({k: v.to(device) for k, v in x.items()})
    tc = cfg.get_text_config(decoder=True)
    rows = [{"tokens": int(x["input_ids"].shape[1]), "frames": n if frames_mode else None,
             "video_grid_thw": x["video_grid_thw"][0].tolist()} for n, x in zip(points, inputs)]
    log(f"{source}; {tc.num_hidden_layers} decoder layers, hidden {tc.hidden_size}; {dtype} on {device}; "
        f"CUDA graphs for decode: {'on (both models)' if graphs else 'off (both models)'}")

    # ---- teacher (flash SDPA prefill, static-cache decode), then the floor, on the same weights
    set_text_attention(teacher, TEACHER_ATTENTION)
    prev = None
    for row, x in zip(rows, inputs):
        if frames_mode:
            row["vision_ms"] = measure_vision(teacher, x, device, o.warmup, o.repeats, o.max_seconds)
        row["teacher"] = measure_prefill(teacher, "teacher", x, device, _warm(prev, o), o.repeats, o.max_seconds)
        prev = row["teacher"]["ttft_ms"]
        row["teacher"]["cache_bytes_per_seq"] = teacher_cache_bytes_per_seq(tc, row["tokens"], dtype)
        _log_prefill(log, "teacher", row)
        save()
        if o.decode:
            row["teacher"]["decode"] = measure_decode(teacher, "teacher", row["tokens"],
                                                      row["teacher"]["cache_bytes_per_seq"], o, graphs, device, log)
            _log_decode(log, "teacher", row)
            save()
    set_text_attention(teacher, FLOOR_ATTENTION)
    prev = None
    for row, x in zip(rows, inputs):
        row["floor"] = measure_prefill(teacher, "floor", x, device, _warm(prev, o), o.repeats, o.max_seconds)
        prev = row["floor"]["ttft_ms"]
        _log_prefill(log, "floor", row)
        save()
    set_text_attention(teacher, "sdpa")

    # ---- student: converted from this teacher, which is then freed
    t0 = time.perf_counter()
    student = make_student(teacher)
    del teacher
    _free()
    log(f"  student: converted from the teacher in {time.perf_counter() - t0:.1f} s")
    blocks = student.mmate_blocks()
    s_bytes = student_cache_bytes_per_seq(blocks, dtype)
    prev = None
    for row, x in zip(rows, inputs):
        row["student"] = measure_prefill(student, "student", x, device, _warm(prev, o), o.repeats, o.max_seconds)
        prev = row["student"]["ttft_ms"]
        row["student"]["cache_bytes_per_seq"] = s_bytes
        _log_prefill(log, "student", row)
        save()
        if o.decode:
            row["student"]["decode"] = measure_decode(student, "student", row["tokens"], s_bytes, o, graphs,
                                                      device, log)
            _log_decode(log, "student", row)
            save()
    mmate = student.linmu_config.to_dict()
    del student
    _free()

    import transformers

    config = {
        "source": source, "preset": o.preset, "model": o.model, "layers": tc.num_hidden_layers,
        "hidden_size": tc.hidden_size, "heads": tc.num_attention_heads, "kv_heads": tc.num_key_value_heads,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "cuda_graphs": graphs, "mode": "frames" if frames_mode else "tokens",
        "frame_tokens_hw": None if frames_mode else list(frame_hw),
        "resolution": list(o.resolution) if frames_mode else None, "decode_steps": o.decode_steps,
        "repeats": o.repeats, "warmup": o.warmup, "teacher_attention": "torch SDPA: flash prefill (causal, GQA), "
        "decode over a static KV cache with GQA folded into the query axis",
        "floor_attention": "attention core skipped (v passed through; projections, RoPE, MLPs run)",
        "decode_cache": "teacher: StaticCache set to the context length; student: LinMUCache; no per-sequence "
                        "prefills before decode",
        "student_ssd_step": _ssd_step_kind(device),
        "mmate": mmate, "torch": torch.__version__, "transformers": transformers.__version__,
    }
    result = {"config": config, "rows": rows}
    result["summary"] = summarize(result)
    return result


def _ssd_step_kind(device) -> str:
    """Which SSD step the student's decode ran: the fused Triton kernel or the torch ops."""
    from ..ops.ssd_decode import _kernel, fused_step_enabled

    fused = device.type == "cuda" and fused_step_enabled() and _kernel() is not None
    return "fused Triton (in place)" if fused else "torch ops (in place)"


# ------------------------------------------------------------------------------------------------ reports

def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def summarize(result: dict) -> dict:
    """Ratios per context length and the targets, computed from the measured rows only."""
    rows = result["rows"]
    key = lambda r: str(r["tokens"])
    s = {
        "metric": "linmu_bench", "device": result["config"]["device_name"],
        "cuda_graphs": result["config"]["cuda_graphs"], "dtype": result["config"]["dtype"],
        "tokens": [r["tokens"] for r in rows],
        "ttft_teacher_over_student": {key(r): _ratio(r["teacher"]["ttft_ms"], r["student"]["ttft_ms"]) for r in rows},
        "ttft_student_over_floor": {key(r): _ratio(r["student"]["ttft_ms"], r["floor"]["ttft_ms"]) for r in rows},
        "cache_bytes_per_seq": {"teacher": {key(r): r["teacher"]["cache_bytes_per_seq"] for r in rows},
                                "student": rows[0]["student"]["cache_bytes_per_seq"] if rows else None},
    }
    has_decode = bool(rows) and "decode" in rows[0]["teacher"]
    if has_decode:
        s["decode_tok_s_ratio_best_batch"] = {
            key(r): _ratio(r["student"]["decode"]["best"]["tok_s"], r["teacher"]["decode"]["best"]["tok_s"])
            for r in rows}
        s["decode_tok_s_ratio_batch1"] = {
            key(r): _ratio(r["student"]["decode"]["batch1"]["tok_s"], r["teacher"]["decode"]["batch1"]["tok_s"])
            for r in rows}
        s["best_batch"] = {key(r): {"teacher": r["teacher"]["decode"]["best"]["batch"],
                                    "student": r["student"]["decode"]["best"]["batch"]} for r in rows}

    def target(value, op, bound, where):
        if value is None:
            return {"value": None, "target": f"{op} {bound}", "met": None, "note": f"not measured ({where})"}
        met = value >= bound if op == ">=" else value <= bound
        return {"value": value, "target": f"{op} {bound}", "met": met}

    s["targets"] = {
        "ttft_speedup_128k": target(s["ttft_teacher_over_student"].get("131072"), ">=", TARGET_TTFT_128K,
                                    "no 131072-token row"),
        "ttft_student_over_floor_128k": target(s["ttft_student_over_floor"].get("131072"), "<=", TARGET_FLOOR_128K,
                                               "no 131072-token row"),
        "ttft_speedup_256k": target(s["ttft_teacher_over_student"].get("262144"), ">=", TARGET_TTFT_256K,
                                    "no 262144-token row"),
        "decode_best_batch_speedup_128k": target(s.get("decode_tok_s_ratio_best_batch", {}).get("131072"), ">=",
                                                 TARGET_DECODE_128K, "no 131072-token row with decode"),
        "state_bytes_per_seq": target(s["cache_bytes_per_seq"]["student"], "<=", TARGET_STATE_BYTES, "no rows"),
    }
    return s


def _fmt(v, spec=".1f", none="-"):
    return none if v is None else format(v, spec)


def format_table(result: dict) -> str:
    """A plain-text table of every row, then the targets."""
    c = result["config"]
    rows = result["rows"]
    lines = [f"linmu bench: {c['source']} | {c['device_name']} | {c['dtype']} | CUDA graphs "
             f"{'on (teacher and student decode)' if c['cuda_graphs'] else 'off (both)'}",
             f"decoder: {c['layers']} layers, hidden {c['hidden_size']}, {c['heads']} heads / {c['kv_heads']} kv heads; "
             f"teacher attention: {c['teacher_attention']}; student SSD decode step: {c['student_ssd_step']}"]
    frames = c["mode"] == "frames"
    head = (["frames", "tokens", "vision ms"] if frames else ["tokens"]) + [
        "TTFT teacher ms", "student ms", "floor ms", "T/S", "S/floor"]
    has_decode = bool(rows) and "decode" in rows[0]["teacher"]
    if has_decode:
        head += ["dec b1 T tok/s", "S tok/s", "T best (B) tok/s", "S best (B) tok/s", "S/T best"]
    head += ["cache/seq T MB", "S MB", "peak T GiB", "peak S GiB"]
    table = [head]
    for r in rows:
        t, s, f = r["teacher"], r["student"], r["floor"]
        cells = ([str(r["frames"]), str(r["tokens"]), _fmt(r.get("vision_ms"))] if frames else [str(r["tokens"])])
        cells += [_fmt(t["ttft_ms"]), _fmt(s["ttft_ms"]), _fmt(f["ttft_ms"]),
                  _fmt(_ratio(t["ttft_ms"], s["ttft_ms"]), ".2f"), _fmt(_ratio(s["ttft_ms"], f["ttft_ms"]), ".2f")]
        if has_decode:
            td, sd = t["decode"], s["decode"]
            cells += [_fmt(td["batch1"]["tok_s"]), _fmt(sd["batch1"]["tok_s"]),
                      f"{_fmt(td['best']['tok_s'], '.0f')} ({td['best']['batch']})",
                      f"{_fmt(sd['best']['tok_s'], '.0f')} ({sd['best']['batch']})",
                      _fmt(_ratio(sd["best"]["tok_s"], td["best"]["tok_s"]), ".1f")]
        peak_t = max([v for v in (t.get("prefill_peak_gib"), (t.get("decode") or {}).get("best", {}).get("peak_gib"))
                      if v is not None], default=None)
        peak_s = max([v for v in (s.get("prefill_peak_gib"), (s.get("decode") or {}).get("best", {}).get("peak_gib"))
                      if v is not None], default=None)
        cells += [_fmt(t["cache_bytes_per_seq"] / 1e6), _fmt(s["cache_bytes_per_seq"] / 1e6), _fmt(peak_t),
                  _fmt(peak_s)]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    lines.append("targets (computed from the rows above):")
    for name, t in result["summary"]["targets"].items():
        state = "n/a" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        val = t.get("note") if t["value"] is None else f"{t['value']:.4g}"
        lines.append(f"  {name}: {val} (target {t['target']}) {state}")
    return "\n".join(lines)


def summary_line(result: dict) -> dict:
    """The one-line JSON summary: the ratios, cache bytes and targets (``summarize``), rounded."""
    def rnd(v):
        if isinstance(v, float):
            return float(f"{v:.4g}") if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: rnd(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rnd(x) for x in v]
        return v

    return rnd(result["summary"])
