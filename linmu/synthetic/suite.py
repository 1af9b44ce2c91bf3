"""Public API of the synthetic long-video QA suite: examples, splits, conversion to conversations, scoring, files.

Seeds: an example is a pure function of ``(seed, task, num_frames, frame_size)``. The question and the answer depend
on ``(seed, task)`` only, so the same seed asks the same question at every clip length (a test set at 16 frames and
at 128 frames differ only in their clips). Splits draw seeds from disjoint ranges, `SPLIT_SEEDS`:

=========  ==========================
split      seeds
=========  ==========================
``train``  ``[0, 3_000_000)``
``val``    ``[3_000_000, 6_000_000)``
``test``   ``[6_000_000, 9_000_000)``
=========  ==========================

`make_split` interleaves the tasks round-robin: example ``i`` is task ``tasks[i % K]``, and the ``j``-th example of a
task has seed ``first + start + j`` (``i // K`` when every task is named once). Every range start is a multiple of
12 (a common multiple of all choice counts) and answers are balanced per block of ``len(choices)`` consecutive
seeds, so over a split each task's answers are balanced to within one example per answer.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .tasks import (SPECS, TASK_KINDS, TASKS, answer_choices, answer_index, chance_levels, describe_query, get_spec,
                    task_salt, vocabulary)
from .world import COLOUR_NAMES, MAX_FRAMES, MIN_FRAMES, Scene, check_frame_size, render

SPLIT_SEEDS: dict[str, tuple[int, int]] = {
    "train": (0, 3_000_000),
    "val": (3_000_000, 6_000_000),
    "test": (6_000_000, 9_000_000),
}
DEFAULT_FRAME_SIZE = 56
FPS = 8.0  # frame rate of written clips and of in-memory samples (only Qwen2.5-VL's time axis uses it)


@dataclass
class Example:
    """One question about one clip (``frames``: uint8 ``(T, H, W, 3)``) or one image (``image``: uint8
    ``(H, W, 3)``). ``metadata``: JSON-able facts (seed, choices, chance, event frames, objects...); ``scene``: the
    world state the pixels were rendered from (for tests and analysis)."""

    id: str
    task: str
    kind: str
    question: str
    answer: str
    frames: np.ndarray | None = None
    image: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    scene: Scene | None = field(default=None, repr=False, compare=False)

    @property
    def is_video(self) -> bool:
        return self.frames is not None

    @property
    def choices(self) -> list[str]:
        return answer_choices(self.task)

    @property
    def chance(self) -> float:
        return get_spec(self.task).chance


def split_of(seed: int) -> str | None:
    """The split whose seed range holds ``seed`` (None outside all of them)."""
    for name, (lo, hi) in SPLIT_SEEDS.items():
        if lo <= seed < hi:
            return name
    return None


def visual_tokens(num_frames: int, frame_size: int = DEFAULT_FRAME_SIZE, *, patch_size: int = 14,
                  merge_size: int = 2, temporal_patch_size: int = 2) -> int:
    """LLM-side visual tokens of one clip (``num_frames=1``: an image) under Qwen2-VL's default processing."""
    from linmu.data.qwen_processing import smart_resize

    f = patch_size * merge_size
    h, w = smart_resize(frame_size, frame_size, f, 56 * 56, 28 * 28 * 1280)
    return math.ceil(num_frames / temporal_patch_size) * (h // f) * (w // f)


def _check(seed, task, num_frames, frame_size):
    spec = get_spec(task)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    check_frame_size(frame_size)
    if spec.is_video and not (MIN_FRAMES <= int(num_frames) <= MAX_FRAMES):
        raise ValueError(f"num_frames must be in [{MIN_FRAMES}, {MAX_FRAMES}], got {num_frames}")
    return spec


def generate_example(seed: int, task: str, num_frames: int, frame_size: int = DEFAULT_FRAME_SIZE) -> Example:
    """The example of ``(seed, task, num_frames, frame_size)`` (``num_frames`` is ignored by image tasks)."""
    spec = _check(seed, task, num_frames, frame_size)
    seed = int(seed)
    n = len(spec.choices)
    a = answer_index(task, seed, n)
    T = int(num_frames) if spec.is_video else 1
    salt = task_salt(task)
    rng_q = np.random.default_rng([salt, seed, 1])
    rng_t = np.random.default_rng([salt, seed, 2, T])
    scene, query = spec.build(rng_q, rng_t, T, a)
    answer = spec.answer(scene, query)
    if answer != spec.choices[a]:  # the scene must say what it was built to say
        raise AssertionError(f"{task} seed {seed}: built for {spec.choices[a]!r}, scene says {answer!r}")
    question = spec.question(describe_query(scene, query))
    pixels = render(scene, frame_size)
    objects = [{"shape": tr.shape, "colour": None if tr.base_colour() is None else COLOUR_NAMES[tr.base_colour()]}
               for tr in scene.objects()]
    meta = {
        "seed": seed, "split": split_of(seed), "task": task, "kind": spec.kind,
        "num_frames": T if spec.is_video else None, "frame_size": int(frame_size),
        "choices": list(spec.choices), "chance": spec.chance, "answer_index": a,
        "query": {k: v for k, v in query.items()}, "objects": objects, "events": spec.events(scene, query),
        "visual_tokens": visual_tokens(T, frame_size),
    }
    eid = f"{task}-{seed}" if not spec.is_video else f"{task}-{seed}-{T}f"
    if int(frame_size) != DEFAULT_FRAME_SIZE:
        eid += f"-{int(frame_size)}px"
    return Example(id=eid, task=task, kind=spec.kind, question=question, answer=answer,
                   frames=pixels if spec.is_video else None, image=None if spec.is_video else pixels[0],
                   metadata=meta, scene=scene)


def split_seeds(split: str, n: int, tasks, start: int = 0) -> list[tuple[str, int]]:
    """``(task, seed)`` of the ``n`` examples of a split: ``tasks`` round-robin, the ``j``-th occurrence of a task
    taking seed ``first + start + j``."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLIT_SEEDS)}")
    lo, hi = SPLIT_SEEDS[split]
    tasks = list(tasks)
    seen: dict[str, int] = {}
    out = []
    for i in range(int(n)):
        task = tasks[i % len(tasks)]
        j = seen.get(task, 0)
        seen[task] = j + 1
        seed = lo + int(start) + j
        if not lo <= seed < hi:
            raise ValueError(f"split {split!r} has seeds [{lo}, {hi}); n={n}, start={start} leaves that range")
        out.append((task, seed))
    return out


def make_split(split: str, n: int, num_frames: int, *, tasks=None, frame_size: int = DEFAULT_FRAME_SIZE,
               start: int = 0) -> list[Example]:
    """``n`` examples of ``split``, tasks interleaved round-robin (see the module docstring). A task named several
    times in ``tasks`` gets that many times the examples (distinct seeds), e.g. for a curriculum. ``start`` skips
    the first ``start`` seeds of every task (to extend a split without repeating it)."""
    tasks = list(TASKS if tasks is None else tasks)
    if not tasks:
        raise ValueError("no tasks")
    for t in tasks:
        get_spec(t)
    return [generate_example(seed, task, num_frames, frame_size)
            for task, seed in split_seeds(split, n, tasks, start)]


def prompt_text(example: Example) -> str:
    """The user turn: the media placeholder, a newline, the question."""
    return ("<video>" if example.is_video else "<image>") + "\n" + example.question


def to_loaded_sample(example: Example, fps: float = FPS):
    """A `linmu.data.LoadedSample` (user: placeholder + question; assistant: the answer) for `QwenVLProcessor`."""
    from linmu.data.conversations import LoadedSample

    turns = [("user", prompt_text(example)), ("assistant", example.answer)]
    if example.is_video:
        T = len(example.frames)
        return LoadedSample(id=example.id, turns=turns, videos=[example.frames],
                            video_timestamps=[np.arange(T, dtype=np.float64) / fps], video_fps=[float(fps)],
                            source="linmu.synthetic")
    return LoadedSample(id=example.id, turns=turns, images=[example.image], source="linmu.synthetic")


_NUMBERS = {str(i): w for i, w in enumerate(("zero", "one", "two", "three", "four", "five"))}


def normalize_answer(text: str) -> str:
    """Lower case, punctuation to spaces, digits 0-5 to words, a leading article dropped, spaces collapsed."""
    words = re.sub(r"[^a-z0-9]+", " ", str(text).lower()).split()
    words = [_NUMBERS.get(w, w) for w in words]
    if len(words) > 1 and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def score(predicted: str, example: Example) -> bool:
    """Normalised exact match of ``predicted`` with the example's short answer."""
    return normalize_answer(predicted) == normalize_answer(example.answer)


def suite_info(num_frames: int | None = None, frame_size: int = DEFAULT_FRAME_SIZE, tasks=None) -> dict:
    """The suite's metadata: tasks with kind, choices, chance and what they need; split seed ranges; frame size;
    visual tokens per pair of frames (and per clip when ``num_frames`` is given)."""
    tasks = list(TASKS if tasks is None else tasks)
    info = {
        "tasks": {t: {"kind": SPECS[t].kind, "choices": list(SPECS[t].choices), "chance": SPECS[t].chance,
                      "question": SPECS[t].template, "needs": SPECS[t].needs} for t in tasks},
        "chance": {t: SPECS[t].chance for t in tasks},
        "split_seeds": {k: list(v) for k, v in SPLIT_SEEDS.items()},
        "frame_size": int(frame_size), "fps": FPS,
        "visual_tokens_per_frame_pair": visual_tokens(2, frame_size),
    }
    if num_frames is not None:
        info["num_frames"] = int(num_frames)
        info["visual_tokens_per_clip"] = visual_tokens(num_frames, frame_size)
    return info


def write_split(dir, split: str, n: int, num_frames: int, *, tasks=None, frame_size: int = DEFAULT_FRAME_SIZE,
                start: int = 0, fps: float = FPS, bit_rate: int | None = 1_000_000) -> Path:
    """Write ``n`` examples of ``split`` as LLaVA-style JSONL ``dir/<split>.jsonl`` with media under
    ``dir/<split>/`` (mp4 via `linmu.data.write_test_video`, png for images) and ``dir/<split>_info.json``
    (`suite_info`). Records carry ``task``, ``kind``, ``answer``, ``choices``, ``chance``, ``seed``, ``num_frames``,
    ``frame_size`` besides ``id`` / ``video`` | ``image`` / ``conversations``. Returns the JSONL path."""
    from PIL import Image

    from linmu.data.media import write_test_video

    root = Path(dir)
    media = root / split
    media.mkdir(parents=True, exist_ok=True)
    examples = make_split(split, n, num_frames, tasks=tasks, frame_size=frame_size, start=start)
    out = root / f"{split}.jsonl"
    tmp = out.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for ex in examples:
            rec: dict[str, Any] = {"id": ex.id}
            if ex.is_video:
                rel = f"{split}/{ex.id}.mp4"
                write_test_video(root / rel, ex.frames, fps=fps, bit_rate=bit_rate)
                rec["video"] = rel
            else:
                rel = f"{split}/{ex.id}.png"
                Image.fromarray(ex.image).save(root / rel)
                rec["image"] = rel
            rec["conversations"] = [{"from": "human", "value": prompt_text(ex)},
                                    {"from": "gpt", "value": ex.answer}]
            m = ex.metadata
            rec.update(task=ex.task, kind=ex.kind, answer=ex.answer, choices=m["choices"], chance=m["chance"],
                       seed=m["seed"], num_frames=m["num_frames"], frame_size=m["frame_size"], events=m["events"])
            fh.write(json.dumps(rec) + "\n")
    tmp.replace(out)
    info = suite_info(num_frames, frame_size, tasks)
    info.update(split=split, n=int(n), start=int(start))
    (root / f"{split}_info.json").write_text(json.dumps(info, indent=2))
    return out


__all__ = ["Example", "generate_example", "make_split", "to_loaded_sample", "score", "normalize_answer",
           "write_split", "suite_info", "visual_tokens", "split_of", "split_seeds", "prompt_text", "SPLIT_SEEDS",
           "DEFAULT_FRAME_SIZE", "FPS", "TASKS", "TASK_KINDS", "answer_choices", "chance_levels", "vocabulary"]
