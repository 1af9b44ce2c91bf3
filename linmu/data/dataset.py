"""A map-style data set of conversations that loads media lazily, skips bad samples, and counts why.

``ds[i]`` returns the unbatched model inputs of sample ``i`` (`QwenVLProcessor.encode`), or ``None`` when the sample
is bad; ``ds.collate_fn`` drops the ``None`` items and left-pads the rest, giving exactly what processing those
samples together gives. A batch whose samples were all bad collates to ``None``: the training loop skips it.

Skip reasons (`SkipCounter` keys): ``malformed`` (unparsable record), ``media_mismatch`` (placeholders and media
disagree), ``missing_file``, ``bad_image``, ``bad_video`` (empty, corrupt, unsupported, no frames), ``no_answer``,
``too_long``, ``error`` (anything unexpected; logged with its traceback). Each skip logs one warning on the
``linmu.data`` logger naming the sample id, its ``file:line`` and the reason.

Determinism: ``ds[i]`` depends only on ``i`` (frame sampling is deterministic), so the order of a run is the
sampler's order. Use `SeededSampler` (or ``RandomSampler(generator=torch.Generator().manual_seed(seed))``); the
same seed and epoch give the same order, and ``SeededSampler(start=k)`` resumes at data position ``k``.

Workers: the counter is thread-safe and counts in the process that runs ``__getitem__``. With ``num_workers=0``
that is the main process and ``ds.report()`` is complete. With ``num_workers>0`` each worker holds its own copy of
the data set and counts (and logs) its own skips; the main process's ``ds.skips`` stays at zero. To get the totals
there, build the data set with ``return_skips=True`` and use ``Collator(processor, report_skips=True)``: each batch
then carries the skip events of its items in ``batch["skipped"]``; pop them and feed them to a main-process
counter with ``counter.add_events(...)``. Counters (or their ``state_dict()``, e.g. from other ranks) combine with
``SkipCounter.merge``; ``state_dict``/``load_state_dict`` let a resumed run keep its counts.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections import Counter
from collections.abc import Iterable, Mapping

import torch

from .conversations import LoadedSample, Sample, validate_turns
from .media import MediaError, decode_video, load_image
from .qwen_processing import BadSampleError, ProcessorOutput

logger = logging.getLogger("linmu.data")

SKIP_REASONS = ("malformed", "media_mismatch", "missing_file", "bad_image", "bad_video", "no_answer", "too_long",
                "error")


class SkipCounter:
    """Counts skipped samples per reason (thread-safe; picklable, the lock is recreated on unpickling).

    ``add`` also logs the warning. ``report()`` -> ``{reason: count}``; ``merge`` adds other counters (or their
    ``state_dict()``s / ``report()``s) into this one."""

    def __init__(self, log: logging.Logger | None = logger, max_examples: int = 5):
        self._counts: Counter = Counter()
        self._examples: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._log = log
        self.max_examples = max_examples

    def add(self, reason: str, sample: str = "", detail: str = "") -> None:
        with self._lock:
            self._counts[reason] += 1
            ex = self._examples.setdefault(reason, [])
            if len(ex) < self.max_examples:
                ex.append(f"{sample}: {detail}" if detail else sample)
        if self._log is not None:
            self._log.warning("skipping %s: %s%s", sample or "sample", reason, f" ({detail})" if detail else "")

    def add_events(self, events: Iterable) -> None:
        """Count ``(reason, sample, detail)`` events (e.g. ``batch["skipped"]``) without logging them again."""
        with self._lock:
            for reason, sample, detail in events:
                self._counts[reason] += 1
                ex = self._examples.setdefault(reason, [])
                if len(ex) < self.max_examples:
                    ex.append(f"{sample}: {detail}" if detail else sample)

    def report(self) -> dict[str, int]:
        with self._lock:
            return {k: self._counts[k] for k in sorted(self._counts) if self._counts[k]}

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def examples(self) -> dict[str, list[str]]:
        with self._lock:
            return {k: list(v) for k, v in self._examples.items()}

    def summary(self) -> str:
        r = self.report()
        if not r:
            return "no samples skipped"
        return f"skipped {sum(r.values())} samples: " + ", ".join(f"{k}={v}" for k, v in r.items())

    def merge(self, *others) -> "SkipCounter":
        """Add the counts of other `SkipCounter`s, ``state_dict()``s or ``{reason: count}`` maps. Returns self."""
        for o in others:
            if isinstance(o, SkipCounter):
                counts, examples = o.report(), o.examples()
            elif isinstance(o, Mapping) and "counts" in o:
                counts, examples = o["counts"], o.get("examples", {})
            elif isinstance(o, Mapping):
                counts, examples = o, {}
            else:
                raise TypeError(f"cannot merge {type(o).__name__} into a SkipCounter")
            with self._lock:
                for k, v in counts.items():
                    self._counts[k] += int(v)
                for k, v in examples.items():
                    ex = self._examples.setdefault(k, [])
                    ex.extend(v[: max(0, self.max_examples - len(ex))])
        return self

    def state_dict(self) -> dict:
        return {"counts": self.report(), "examples": self.examples()}

    def load_state_dict(self, state: Mapping) -> None:
        with self._lock:
            self._counts = Counter({k: int(v) for k, v in state.get("counts", {}).items()})
            self._examples = {k: list(v) for k, v in state.get("examples", {}).items()}

    def reset(self) -> None:
        self.load_state_dict({})

    def __getstate__(self):
        d = self.__dict__.copy()
        d.pop("_lock")
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def __repr__(self):
        return f"SkipCounter({self.report()})"


class Skipped:
    """What ``__getitem__`` hands to the collator for a bad sample when ``return_skips=True``."""

    __slots__ = ("reason", "sample", "detail")

    def __init__(self, reason, sample, detail=""):
        self.reason, self.sample, self.detail = reason, sample, detail

    def as_tuple(self):
        return self.reason, self.sample, self.detail


def load_media(sample: Sample, *, num_frames=None, fps=None, max_frames=None) -> LoadedSample:
    """Load a `Sample`'s images and decode its video. Raises `MediaError` (with ``.media`` = ``"image"`` or
    ``"video"``)."""
    try:
        images = [load_image(p) for p in sample.images]
    except MediaError as e:
        e.media = "image"
        raise
    videos, stamps, sfps = [], [], []
    for v in sample.videos:
        try:
            frames, times, info = decode_video(v, num_frames=num_frames, fps=fps, max_frames=max_frames,
                                               return_info=True)
        except MediaError as e:
            e.media = "video"
            raise
        videos.append(frames)
        stamps.append(times)
        sfps.append(info["sampled_fps"])
    return LoadedSample(id=sample.id, turns=list(sample.turns), images=images, videos=videos,
                        video_timestamps=stamps, video_fps=sfps, source=sample.source)


class Collator:
    """Collate function: drops bad items (``None`` / `Skipped`), left-pads the rest with ``processor.pad``; returns
    ``None`` when nothing is left. With ``report_skips=True`` the batch also carries ``batch["skipped"]``: the
    ``(reason, sample, detail)`` events of its bad items (pop it before ``model(**batch)``)."""

    def __init__(self, processor, report_skips: bool = False):
        self.processor = processor
        self.report_skips = report_skips

    def __call__(self, items):
        good = [x for x in items if x is not None and not isinstance(x, Skipped)]
        skipped = [x.as_tuple() for x in items if isinstance(x, Skipped)]
        if not good:
            if self.report_skips and skipped:
                return {"skipped": skipped}
            return None
        batch = self.processor.pad(good)
        if self.report_skips:
            batch["skipped"] = skipped
        return batch


class ConversationDataset(torch.utils.data.Dataset):
    """Samples -> processed model inputs, media loaded in ``__getitem__`` (see the module docstring).

    ``samples``: list of `Sample` (e.g. from `load_conversations`). ``num_frames`` / ``fps`` / ``max_frames``: video
    frame sampling (`decode_video`). ``max_length``: longer samples are skipped as ``too_long``.
    ``add_generation_prompt``: prompts for generation (answers dropped, no ``no_answer`` check, labels all -100).
    ``return_skips``: ``__getitem__`` returns a `Skipped` marker instead of ``None`` (use with
    ``Collator(report_skips=True)`` when workers count skips)."""

    def __init__(self, samples, processor, *, num_frames: int | None = None, fps: float | None = None,
                 max_frames: int | None = None, max_length: int | None = None, add_generation_prompt: bool = False,
                 skips: SkipCounter | None = None, return_skips: bool = False):
        if num_frames is not None and fps is not None:
            raise ValueError("num_frames and fps are mutually exclusive")
        self.samples = list(samples)
        self.processor = processor
        self.num_frames, self.fps, self.max_frames = num_frames, fps, max_frames
        self.max_length = max_length
        self.add_generation_prompt = add_generation_prompt
        self.skips = skips if skips is not None else SkipCounter()
        self.return_skips = return_skips

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> LoadedSample:
        """The sample with media loaded; raises `MediaError` / `BadSampleError` (no counting)."""
        s = self.samples[index]
        if s.error:
            raise BadSampleError(s.error, s.describe(), s.detail)
        reason = validate_turns(s.turns, need_answer=not self.add_generation_prompt)
        if reason:
            raise BadSampleError(reason, s.describe(), "no assistant answer")
        return load_media(s, num_frames=self.num_frames, fps=self.fps, max_frames=self.max_frames)

    def _skip(self, reason, sample, detail):
        self.skips.add(reason, sample, detail)
        return Skipped(reason, sample, detail) if self.return_skips else None

    def __getitem__(self, index: int):
        s = self.samples[index]
        desc = s.describe() if hasattr(s, "describe") else f"sample {index}"
        try:
            loaded = self.load(index)
            return self.processor.encode(loaded, max_length=self.max_length,
                                         add_generation_prompt=self.add_generation_prompt)
        except BadSampleError as e:
            return self._skip(e.reason, desc, e.detail)
        except MediaError as e:
            if e.kind == "missing":
                reason = "missing_file"
            else:
                reason = "bad_image" if getattr(e, "media", "video") == "image" else "bad_video"
            return self._skip(reason, desc, str(e))
        except Exception as e:  # never crash the run on one sample
            out = self._skip("error", desc, f"{type(e).__name__}: {e}")
            if self.skips.report().get("error", 0) <= 3:  # the first few with their traceback, to spot bugs
                logger.warning("traceback of the unexpected error on %s:\n%s", desc, traceback.format_exc())
            return out

    @property
    def collate_fn(self) -> Collator:
        return Collator(self.processor, report_skips=self.return_skips)

    def report(self) -> dict[str, int]:
        """Skip counts per reason (this process's)."""
        return self.skips.report()


class SeededSampler(torch.utils.data.Sampler):
    """Deterministic order: a permutation of ``range(length)`` from ``(seed, epoch)`` (identity if not ``shuffle``),
    starting at position ``start`` (to resume a run part-way through an epoch)."""

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True, epoch: int = 0, start: int = 0):
        self.length, self.seed, self.shuffle, self.epoch, self.start = int(length), int(seed), shuffle, int(epoch), \
            int(start)

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.length, generator=g).tolist()

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self):
        return iter(self.order()[self.start:])

    def __len__(self) -> int:
        return max(0, self.length - self.start)


__all__ = ["ConversationDataset", "SkipCounter", "Collator", "Skipped", "SeededSampler", "load_media",
           "SKIP_REASONS", "ProcessorOutput"]
