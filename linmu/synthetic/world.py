"""The procedural world: coloured shapes in a 2x2 grid of cells, their motion and events, rendered with numpy.

A *scene* is a list of `Track`s (one per object) over ``num_frames`` frames. Each track has a shape and, per frame,
a colour index (`COLOUR_NAMES`, or `WHITE_ID` while it flashes) and a cell (0..3 = `CELLS`, -1 while hidden). The
frame is split into 2x2 cells of ``frame_size / 2`` pixels: at the default 56x56 frame a cell is 28x28 px, i.e.
exactly one Qwen2-VL visual token (patch 14, spatial merge 2), so "which object is where" is visible per token.

Motion: inside its cell an object wobbles smoothly (a sinusoid per axis, a few pixels, never crossing the cell's
border); objects *hop* between cells at segment boundaries. Events (flashes, the white cue shape, colour changes,
hops) are aligned to temporal pairs of frames ``(2p, 2p+1)`` and last whole pairs, so each survives Qwen2-VL's
temporal patching (temporal_patch_size=2). Segment and event statistics are per frame, not per clip, so a clip 8x
longer looks locally the same, it just has more of everything except the events a question is about.

Rendering depends only on the scene and ``frame_size``; everything is deterministic.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

# Saturated, far apart in RGB and in YUV 4:2:0 (they survive mp4 encoding at 56x56).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 80, 245),
    "yellow": (240, 220, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
WHITE = (255, 255, 255)
WHITE_ID = len(COLOUR_NAMES)  # colour index of a flashing object / the cue
# The board: each cell has its own dark grey background, so a visual token shows which cell it is by its content.
# (A from-scratch tiny Qwen2-VL cannot tell cells apart by position: its ViT has only relative 2-D rotary
# positions, and M-RoPE gives the height/width sections the lowest frequencies, so one cell's step rotates them by
# at most ~1e-2 rad. Measured without the board: image_position / position_at_cue stayed at chance for 3.3k steps.)
CELL_BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (40, 40, 40), (80, 80, 80), (120, 120, 120))
BACKGROUND = CELL_BACKGROUNDS[0]
PALETTE = np.array([*COLOURS.values(), WHITE], dtype=np.uint8)

SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
CELLS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")  # cell = 2 * row + col
HIDDEN = -1

SHAPE_FRACTION = 0.64  # shape side / cell side (18 px in a 28 px cell)
HOP_MEAN_PAIRS = 3.0  # mean segment length between hops, in pairs of frames
MIN_FRAMES, MAX_FRAMES = 8, 512


def cell_row_col(cell: int) -> tuple[int, int]:
    return int(cell) // 2, int(cell) % 2


def num_pairs(num_frames: int) -> int:
    """Complete temporal pairs (an odd last frame is not part of any event)."""
    return int(num_frames) // 2


def pair_frames(p: int) -> slice:
    return slice(2 * p, 2 * p + 2)


@dataclass
class Track:
    """One object. ``colour[t]``: index into `PALETTE` (`WHITE_ID` = white); ``cell[t]``: 0..3 or `HIDDEN`.
    ``wobble``: (amplitude fraction x, y, period x, y in frames, phase x, y) of the in-cell motion."""

    shape: str
    colour: np.ndarray
    cell: np.ndarray
    wobble: tuple[float, float, float, float, float, float] = (0.0, 0.0, 16.0, 16.0, 0.0, 0.0)
    role: str = "object"  # "object" or "cue"

    def visible(self, t: int) -> bool:
        return int(self.cell[t]) >= 0

    def base_colour(self) -> int | None:
        """The colour the object has while visible and not flashing, if it is constant (else None)."""
        vals = {int(c) for c, k in zip(self.colour, self.cell) if k >= 0 and c != WHITE_ID}
        return vals.pop() if len(vals) == 1 else None

    def white_runs(self) -> list[tuple[int, int]]:
        """Maximal runs ``(start, end)`` (end exclusive) of visible white frames: the flashes (or the cue)."""
        return _runs((self.colour == WHITE_ID) & (self.cell >= 0))

    def visible_runs(self) -> list[tuple[int, int]]:
        return _runs(self.cell >= 0)


def _runs(on) -> list[tuple[int, int]]:
    """Maximal runs of True in a 1-D boolean array, as ``(start, end)`` pairs (end exclusive)."""
    runs, t, n = [], 0, len(on)
    while t < n:
        if on[t]:
            s = t
            while t < n and on[t]:
                t += 1
            runs.append((s, t))
        else:
            t += 1
    return runs


@dataclass
class Scene:
    num_frames: int
    tracks: list[Track] = field(default_factory=list)

    def copy(self) -> "Scene":
        return copy.deepcopy(self)

    def objects(self) -> list[Track]:
        return [t for t in self.tracks if t.role == "object"]

    def cue(self) -> Track | None:
        return next((t for t in self.tracks if t.role == "cue"), None)

    def cue_frame(self) -> int | None:
        c = self.cue()
        if c is None:
            return None
        runs = c.visible_runs()
        return runs[0][0] if runs else None

    def at_cell(self, cell: int, t: int) -> Track | None:
        for tr in self.objects():
            if int(tr.cell[t]) == cell:
                return tr
        return None


# --------------------------------------------------------------------------------------------- scheduling helpers

def segments(rng: np.random.Generator, pairs: int, mean: float = HOP_MEAN_PAIRS, min_count: int = 1) \
        -> list[tuple[int, int]]:
    """Split ``range(pairs)`` into contiguous segments ``(first pair, end pair)``: about ``pairs / mean`` of them (at
    least ``min_count``, at most ``pairs``), cut at uniformly random pair boundaries."""
    k = int(min(pairs, max(min_count, round(pairs / mean))))
    cuts = sorted(rng.choice(np.arange(1, pairs), size=k - 1, replace=False).tolist()) if k > 1 else []
    bounds = [0, *cuts, pairs]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


def non_adjacent(rng: np.random.Generator, k: int, available: list[int], tries: int = 200) -> list[int] | None:
    """``k`` distinct pairs from ``available``, no two adjacent, uniformly (rejection sampling); None if none found."""
    if k == 0:
        return []
    avail = np.array(sorted(available))
    if len(avail) < k:
        return None
    for _ in range(tries):
        pick = np.sort(rng.choice(avail, size=k, replace=False))
        if k == 1 or np.all(np.diff(pick) >= 2):
            return pick.tolist()
    return None


def random_wobble(rng: np.random.Generator, moving: bool = True) -> tuple[float, float, float, float, float, float]:
    if not moving:
        return (0.0, 0.0, 16.0, 16.0, 0.0, 0.0)
    return (float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.5, 1.0)), float(rng.uniform(10, 36)),
            float(rng.uniform(10, 36)), float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi)))


def new_track(num_frames: int, shape: str, colour: int, rng: np.random.Generator, role: str = "object") -> Track:
    return Track(shape=shape, colour=np.full(num_frames, colour, dtype=np.int8),
                 cell=np.full(num_frames, HIDDEN, dtype=np.int8), wobble=random_wobble(rng), role=role)


def set_pairs(arr: np.ndarray, first_pair: int, end_pair: int, value: int, num_frames: int) -> None:
    """Set frames of pairs ``[first_pair, end_pair)``; the segment reaching the last complete pair also covers an odd
    trailing frame (so an object never vanishes on it)."""
    a, b = 2 * first_pair, 2 * end_pair
    if b >= num_frames - 1:
        b = num_frames
    arr[a:b] = value


# ------------------------------------------------------------------------------------------------------ rendering

_MASKS: dict[tuple[str, int], np.ndarray] = {}


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``(size, size)`` mask of a shape."""
    key = (shape, size)
    if key in _MASKS:
        return _MASKS[key]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    c = size / 2.0
    if shape == "square":
        m = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        m = (xx - c) ** 2 + (yy - c) ** 2 <= c ** 2 + 0.5
    elif shape == "triangle":  # apex up, base along the bottom
        m = np.abs(xx - c) <= yy / 2.0 + 0.25
    elif shape == "cross":  # plus sign, arms a third of the side wide
        w = size / 3.0
        m = (np.abs(xx - c) <= w / 2.0) | (np.abs(yy - c) <= w / 2.0)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    _MASKS[key] = m
    return m


def geometry(frame_size: int) -> tuple[int, int, int]:
    """(cell side, shape side, wobble amplitude) in pixels for a frame size."""
    cell = frame_size // 2
    size = max(3, int(round(SHAPE_FRACTION * cell)))
    amp = max(0, (cell - size) // 2 - 1)
    return cell, size, amp


def check_frame_size(frame_size: int) -> int:
    fs = int(frame_size)
    if fs < 28 or fs % 2:
        raise ValueError(f"frame_size must be an even number >= 28, got {frame_size}")
    return fs


def object_box(track: Track, t: int, frame_size: int) -> tuple[int, int, int] | None:
    """(top, left, side) of the object's box at frame ``t``, or None if hidden."""
    cell = int(track.cell[t])
    if cell < 0:
        return None
    cs, size, amp = geometry(frame_size)
    r, c = cell_row_col(cell)
    fx, fy, px, py, phx, phy = track.wobble
    dx = int(round(amp * fx * np.sin(2 * np.pi * t / px + phx)))
    dy = int(round(amp * fy * np.sin(2 * np.pi * t / py + phy)))
    top = r * cs + (cs - size) // 2 + dy
    left = c * cs + (cs - size) // 2 + dx
    return top, left, size


def render(scene: Scene, frame_size: int = 56, frames: range | None = None) -> np.ndarray:
    """uint8 ``(T, frame_size, frame_size, 3)`` (``frames``: which frame indices, default all)."""
    fs = check_frame_size(frame_size)
    idx = list(range(scene.num_frames)) if frames is None else list(frames)
    out = np.empty((len(idx), fs, fs, 3), dtype=np.uint8)
    cs = fs // 2
    for cell, shade in enumerate(CELL_BACKGROUNDS):
        r, c = cell_row_col(cell)
        out[:, r * cs:(r + 1) * cs, c * cs:(c + 1) * cs] = np.array(shade, dtype=np.uint8)
    for i, t in enumerate(idx):
        for tr in scene.tracks:  # later tracks draw on top (cells are exclusive, so nothing overlaps)
            box = object_box(tr, t, fs)
            if box is None:
                continue
            top, left, size = box
            m = shape_mask(tr.shape, size)
            out[i, top:top + size, left:left + size][m] = PALETTE[int(tr.colour[t])]
    return out


__all__ = ["COLOURS", "COLOUR_NAMES", "WHITE", "WHITE_ID", "BACKGROUND", "CELL_BACKGROUNDS", "PALETTE", "SHAPES", "CELLS", "HIDDEN",
           "Track", "Scene", "segments", "non_adjacent", "new_track", "set_pairs", "render", "shape_mask",
           "geometry", "object_box", "cell_row_col", "num_pairs", "pair_frames", "check_frame_size",
           "MIN_FRAMES", "MAX_FRAMES", "HOP_MEAN_PAIRS"]
