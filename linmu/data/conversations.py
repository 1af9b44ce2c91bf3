"""LLaVA-style conversation records (LLaVA-OneVision, LLaVA-Video-178K, ActivityNet-QA in LLaVA format).

A record::

    {"id": "v_001", "video": "clips/v_001.mp4",            # or "image": "a.jpg" | ["a.jpg", "b.jpg"]
     "conversations": [{"from": "human", "value": "<video>\\nHow many red circles appear?"},
                       {"from": "gpt", "value": "three"}]}

The file is a JSON list of such records, or JSONL (one record per line). Roles ``human``/``user`` become ``user``,
``gpt``/``assistant`` become ``assistant``, ``system`` stays. ``<image>`` / ``<video>`` mark where media go; after
loading, every sample has exactly one placeholder per medium:

* no placeholder at all: the placeholders are put at the start of the first user turn (images first, one per line);
* a video and ``<image>`` but no ``<video>`` and no image files (the LLaVA-Video convention): ``<image>`` is read as
  the video's placeholder.

Records that cannot be used are *kept* as `Sample` objects with ``error`` set (a reason: ``malformed``,
``media_mismatch``) and ``detail``, so the data set can skip and count them like any other bad sample.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Sample:
    """One conversation. ``images`` / ``video`` are resolved paths; ``source`` is ``"file:line"`` (line of the JSONL
    line, or the record's index + 1 in a JSON list). ``error`` is None for usable records, else the skip reason."""

    id: str
    turns: list[tuple[str, str]]
    images: list[str] = field(default_factory=list)
    video: str | None = None
    source: str = ""
    error: str | None = None
    detail: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def videos(self) -> list[str]:
        return [self.video] if self.video is not None else []

    def describe(self) -> str:
        return f"sample {self.id!r} ({self.source})" if self.source else f"sample {self.id!r}"


@dataclass
class LoadedSample:
    """A `Sample` with its media in memory: what `QwenVLProcessor` consumes.

    ``images``: ``PIL.Image`` or uint8 ``(H, W, 3)`` arrays; ``videos``: uint8 ``(T, H, W, 3)`` arrays;
    ``video_timestamps``: per video, seconds of each frame (or None); ``video_fps``: per video, the sampled frame
    rate (frames kept / clip duration; Qwen2.5-VL's ``second_per_grid_ts`` is ``temporal_patch_size / video_fps``)."""

    id: str
    turns: list[tuple[str, str]]
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    video_timestamps: list[Any] = field(default_factory=list)
    source: str = ""
    video_fps: list[Any] = field(default_factory=list)

    def describe(self) -> str:
        return f"sample {self.id!r} ({self.source})" if self.source else f"sample {self.id!r}"


def _resolve(p: str, root: Path) -> str:
    p = os.path.expanduser(str(p))
    return p if os.path.isabs(p) else str(root / p)


def _bad(sid, source, reason, detail, turns=None) -> Sample:
    return Sample(id=str(sid), turns=turns or [], source=source, error=reason, detail=detail)


def normalize_placeholders(turns: list[tuple[str, str]], n_images: int, n_videos: int):
    """Apply the placeholder rules of the module docstring; returns (turns, error detail or None)."""
    text = "".join(t for _, t in turns)
    n_img_ph, n_vid_ph = text.count(IMAGE_PLACEHOLDER), text.count(VIDEO_PLACEHOLDER)
    turns = list(turns)
    if n_videos and n_vid_ph == 0 and n_images == 0 and n_img_ph == n_videos:
        turns = [(r, t.replace(IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)) for r, t in turns]
        n_img_ph, n_vid_ph = 0, n_videos
    missing = ""
    if n_img_ph == 0 and n_images:
        missing += (IMAGE_PLACEHOLDER + "\n") * n_images
        n_img_ph = n_images
    if n_vid_ph == 0 and n_videos:
        missing += (VIDEO_PLACEHOLDER + "\n") * n_videos
        n_vid_ph = n_videos
    if missing:
        first_user = next((i for i, (r, _) in enumerate(turns) if r == "user"), None)
        if first_user is None:
            return turns, "media but no user turn to put them in"
        r, t = turns[first_user]
        turns[first_user] = (r, missing + t)
    if n_img_ph != n_images or n_vid_ph != n_videos:
        return turns, (f"{n_img_ph} {IMAGE_PLACEHOLDER} placeholder(s) for {n_images} image(s), "
                       f"{n_vid_ph} {VIDEO_PLACEHOLDER} for {n_videos} video(s)")
    return turns, None


def parse_record(record: Any, *, media_root: Path, source: str, default_id: str) -> Sample:
    """One JSON object -> `Sample` (with ``error`` set when it is unusable)."""
    if not isinstance(record, dict):
        return _bad(default_id, source, "malformed", f"record is a {type(record).__name__}, not an object")
    sid = record.get("id", default_id)
    sid = default_id if sid is None else str(sid)
    conv = record.get("conversations", record.get("conversation"))
    if not isinstance(conv, list):
        return _bad(sid, source, "malformed", "no 'conversations' list")
    turns = []
    for i, msg in enumerate(conv):
        if not isinstance(msg, dict):
            return _bad(sid, source, "malformed", f"turn {i} is not an object")
        role = msg.get("from", msg.get("role"))
        value = msg.get("value", msg.get("content"))
        if role not in ROLE_MAP:
            return _bad(sid, source, "malformed", f"turn {i} has unknown role {role!r}")
        if not isinstance(value, str):
            return _bad(sid, source, "malformed", f"turn {i} has no text 'value'")
        turns.append((ROLE_MAP[role], value))

    images = record.get("image", record.get("images"))
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        return _bad(sid, source, "malformed", "'image' must be a path or a list of paths", turns)
    video = record.get("video")
    if video is not None and not isinstance(video, str):
        return _bad(sid, source, "malformed", "'video' must be a path", turns)

    turns, problem = normalize_placeholders(turns, len(images), 1 if video else 0)
    meta = {k: v for k, v in record.items()
            if k not in ("id", "conversations", "conversation", "image", "images", "video")}
    s = Sample(id=sid, turns=turns, images=[_resolve(x, media_root) for x in images],
               video=_resolve(video, media_root) if video else None, source=source, meta=meta)
    if problem:
        s.error, s.detail = "media_mismatch", problem
    return s


def load_conversations(path, media_root=None) -> list[Sample]:
    """Read a LLaVA-style JSON list or JSONL file. Media paths are resolved against ``media_root`` (default: the
    file's folder). Never raises for bad records: they come back with ``error`` set. Raises ``FileNotFoundError``
    if ``path`` itself does not exist."""
    path = Path(path)
    root = Path(media_root) if media_root is not None else path.parent
    text = path.read_text(encoding="utf-8", errors="replace")
    name = path.name
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            # a broken JSON list: one bad entry for the whole file (nothing in it can be trusted)
            return [_bad(f"{name}:{e.lineno}", f"{name}:{e.lineno}", "malformed", f"invalid JSON list: {e.msg}")]
        return [parse_record(r, media_root=root, source=f"{name}:{i + 1}", default_id=f"{name}:{i + 1}")
                for i, r in enumerate(records)]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        src = f"{name}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            out.append(_bad(src, src, "malformed", f"invalid JSON: {e.msg} at column {e.colno}"))
            continue
        out.append(parse_record(record, media_root=root, source=src, default_id=src))
    return out


def validate_turns(turns, *, need_answer: bool = True) -> str | None:
    """Reason a conversation cannot be trained on (``no_answer``), or None."""
    if not turns:
        return "no_answer"
    if need_answer and not any(r == "assistant" and t.strip() for r, t in turns):
        return "no_answer"
    return None


__all__ = ["Sample", "LoadedSample", "load_conversations", "parse_record", "normalize_placeholders",
           "validate_turns", "IMAGE_PLACEHOLDER", "VIDEO_PLACEHOLDER", "ROLE_MAP"]
