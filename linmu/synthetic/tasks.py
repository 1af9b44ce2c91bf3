"""Task types: scene construction for a requested answer, the question text, the answer read back from the scene,
and chance levels.

Every task is built *answer first*: the answer index comes from the seed (`answer_index`, a fresh permutation of the
choices for every block of ``len(choices)`` consecutive seeds, so answers are exactly balanced over aligned seed
ranges), then a scene is constructed that has that answer, and the answer is read back from the scene
(`TaskSpec.answer`) as a self-check. Two generators per example: ``rng_q`` (seed, task) picks what the question
names (colours, shapes, cells, the cue's shape), ``rng_t`` (seed, task, num_frames) the timing and layout, so one
seed asks the same question with the same answer at every clip length.

Kinds:

* ``global``: the answer depends on events spread uniformly over the whole clip (counting flashes, ordering two
  flashes, an object's colour at the moment a cue appears, the colour changing along the clip);
* ``local``: the spatial layout (which object is in which cell) at the one pair of frames where the cue appears;
  layouts change along the clip, and at least one other part of the clip gives a different answer;
* ``image``: one still frame.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .world import (CELLS, COLOUR_NAMES, HIDDEN, SHAPES, WHITE_ID, Scene, Track, cell_row_col, new_track,
                    non_adjacent, num_pairs, pair_frames, segments, set_pairs)

COUNT_WORDS = ("zero", "one", "two", "three", "four")
RELATIONS = ("left", "right", "above", "below")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "global" | "local" | "image"
    choices: tuple[str, ...]
    template: str  # the question with {fields}
    needs: str  # one line: what answering needs
    # questions are lower case: the offline tokenizer (linmu.data.build_tokenizer) makes whole-word tokens of
    # lower-case words only, so every question word is one token
    build: Callable  # (rng_q, rng_t, num_frames, answer_index) -> (Scene, query dict)
    question: Callable  # (query) -> str
    answer: Callable  # (Scene, query) -> str
    events: Callable  # (Scene, query) -> dict of event frames (JSON-able)

    @property
    def chance(self) -> float:
        """Answers are balanced over the choices, so always guessing (or guessing at random) scores this."""
        return 1.0 / len(self.choices)

    @property
    def is_video(self) -> bool:
        return self.kind != "image"


def task_salt(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def answer_index(task: str, seed: int, n: int) -> int:
    """The balanced answer of ``seed``: position ``seed % n`` of a permutation drawn per block ``seed // n``."""
    seed = int(seed)
    perm = np.random.default_rng([task_salt(task), seed // n, 0xA5]).permutation(n)
    return int(perm[seed % n])


# ------------------------------------------------------------------------------------------------- scene helpers

def _name(track: Track) -> str:
    base = track.base_colour()
    return f"{COLOUR_NAMES[base]} {track.shape}" if base is not None else track.shape


def _objects(rng_q, rng_t, num_frames: int, n: int) -> list[Track]:
    colours = rng_q.permutation(len(COLOUR_NAMES))[:n]
    shapes = rng_q.permutation(len(SHAPES))[:n]
    return [new_track(num_frames, SHAPES[int(s)], int(c), rng_t) for c, s in zip(colours, shapes)]


def _layout_random(rng, n_obj: int, n_visible: int) -> dict[int, int]:
    """A random layout {object: cell} showing ``n_visible`` of ``n_obj`` objects in distinct cells."""
    objs = rng.permutation(n_obj)[:n_visible]
    cells = rng.permutation(4)[:n_visible]
    return {int(o): int(c) for o, c in zip(objs, cells)}


def _apply_layouts(tracks: list[Track], segs, layouts, num_frames: int) -> None:
    for (a, b), lay in zip(segs, layouts):
        for i, tr in enumerate(tracks):
            set_pairs(tr.cell, a, b, lay.get(i, HIDDEN), num_frames)


def _hops(rng_t, tracks: list[Track], num_frames: int, min_segments: int = 1) -> list[tuple[int, int]]:
    """All objects visible, in distinct cells; the layout changes at every segment boundary."""
    segs = segments(rng_t, num_pairs(num_frames), min_count=min_segments)
    layouts, prev = [], None
    for _ in segs:
        while True:
            lay = _layout_random(rng_t, len(tracks), len(tracks))
            if lay != prev:
                break
        layouts.append(lay)
        prev = lay
    _apply_layouts(tracks, segs, layouts, num_frames)
    return segs


def _flash(track: Track, pairs) -> None:
    for p in pairs:
        track.colour[pair_frames(p)] = WHITE_ID


def _flash_starts(track: Track) -> list[int]:
    return [s for s, _ in track.white_runs()]


def _cue(rng_q_shape: str, rng_t, num_frames: int, pair: int, cell: int) -> Track:
    cue = new_track(num_frames, rng_q_shape, WHITE_ID, rng_t, role="cue")
    cue.cell[pair_frames(pair)] = cell
    return cue


def _relation(cell_a: int, cell_b: int) -> str | None:
    if cell_a < 0 or cell_b < 0:
        return None
    (ra, ca), (rb, cb) = cell_row_col(cell_a), cell_row_col(cell_b)
    if ra == rb and ca != cb:
        return "left" if ca < cb else "right"
    if ca == cb and ra != rb:
        return "above" if ra < rb else "below"
    return None


def _cue_time(scene: Scene) -> int:
    t = scene.cue_frame()
    if t is None:
        raise ValueError("the scene has no cue")
    return t


def _layout_at(segs, layouts, pair: int):
    for (a, b), lay in zip(segs, layouts):
        if a <= pair < b:
            return lay
    raise IndexError(pair)


def _cue_layouts(rng_t, segs, n_obj: int, cue_seg: int, cue_layout: dict[int, int], ok: Callable) -> list[dict]:
    """Random 3-of-4 layouts for every segment but ``cue_seg``, resampled (one random segment at a time) until
    ``ok(layouts)`` holds and consecutive layouts differ."""
    layouts = []
    for i in range(len(segs)):
        layouts.append(cue_layout if i == cue_seg else _layout_random(rng_t, n_obj, 3))
    others = [i for i in range(len(segs)) if i != cue_seg]

    def consecutive_differ():
        return all(layouts[i] != layouts[i + 1] for i in range(len(layouts) - 1))

    for _ in range(10_000):
        if ok(layouts) and consecutive_differ():
            return layouts
        j = others[int(rng_t.integers(len(others)))]
        layouts[j] = _layout_random(rng_t, n_obj, 3)
    raise RuntimeError("could not build a layout schedule")  # pragma: no cover


# -------------------------------------------------------------------------------------------------- flash_count

def _build_flash_count(rng_q, rng_t, T, a):
    n = int(rng_q.integers(2, 4))
    tracks = _objects(rng_q, rng_t, T, n)
    _hops(rng_t, tracks, T)
    P = num_pairs(T)
    target = non_adjacent(rng_t, a, list(range(P)))
    _flash(tracks[0], target)
    used = set(target)
    for tr in tracks[1:]:
        m = int(rng_t.integers(0, 3))
        while m > 0:
            pick = non_adjacent(rng_t, m, [p for p in range(P) if p not in used])
            if pick is not None:
                _flash(tr, pick)
                used |= set(pick)
                break
            m -= 1
    return Scene(T, tracks), {"target": 0}


def _q_flash_count(q):
    return f"how many times does the {q['target_name']} flash?"


def _a_flash_count(scene, q):
    return COUNT_WORDS[len(scene.tracks[q["target"]].white_runs())]


def _e_flash_count(scene, q):
    objs = scene.objects()
    return {"target_flashes": _flash_starts(objs[q["target"]]),
            "other_flashes": [_flash_starts(t) for i, t in enumerate(objs) if i != q["target"]]}


# -------------------------------------------------------------------------------------------------- flash_order

def _build_flash_order(rng_q, rng_t, T, a):
    n = int(rng_q.integers(2, 4))
    tracks = _objects(rng_q, rng_t, T, n)
    _hops(rng_t, tracks, T)
    P = num_pairs(T)
    p1, p2 = sorted(int(x) for x in rng_t.choice(P, size=2, replace=False))
    pa, pb = (p1, p2) if a == 0 else (p2, p1)  # 0 = "before"
    _flash(tracks[0], [pa])
    _flash(tracks[1], [pb])
    if n == 3:
        m = int(rng_t.integers(0, 3))
        while m > 0:
            pick = non_adjacent(rng_t, m, [p for p in range(P) if p not in (pa, pb)])
            if pick is not None:
                _flash(tracks[2], pick)
                break
            m -= 1
    return Scene(T, tracks), {"a": 0, "b": 1}


def _q_flash_order(q):
    return f"does the {q['a_name']} flash before or after the {q['b_name']}?"


def _a_flash_order(scene, q):
    fa, fb = _flash_starts(scene.tracks[q["a"]]), _flash_starts(scene.tracks[q["b"]])
    if len(fa) != 1 or len(fb) != 1 or fa[0] == fb[0]:
        raise ValueError("flash_order needs exactly one flash of each named object, at different times")
    return "before" if fa[0] < fb[0] else "after"


def _e_flash_order(scene, q):
    objs = scene.objects()
    return {"a_flash": _flash_starts(objs[q["a"]]), "b_flash": _flash_starts(objs[q["b"]]),
            "other_flashes": [_flash_starts(t) for t in objs[2:]]}


# -------------------------------------------------------------------------------------------------- colour_at_cue

def _build_colour_at_cue(rng_q, rng_t, T, a):
    shape, cue_shape = (SHAPES[int(i)] for i in rng_q.permutation(len(SHAPES))[:2])  # different words
    P = num_pairs(T)
    x = new_track(T, shape, 0, rng_t)
    segs = segments(rng_t, P, min_count=len(COLOUR_NAMES))
    k = len(COLOUR_NAMES)
    for _ in range(10_000):  # a no-repeat colour sequence that shows every colour
        seq = [int(rng_t.integers(k))]
        for _ in range(len(segs) - 1):
            seq.append(int((seq[-1] + rng_t.integers(1, k)) % k))
        if len(set(seq)) == k:
            break
    for (s, e), c in zip(segs, seq):
        set_pairs(x.colour, s, e, c, T)
    _hops(rng_t, [x], T)
    candidates = [p for p in range(P) if int(x.colour[2 * p]) == a]
    pair = candidates[int(rng_t.integers(len(candidates)))]
    here = int(x.cell[2 * pair])
    cell = [c for c in range(4) if c != here][int(rng_t.integers(3))]
    cue = _cue(cue_shape, rng_t, T, pair, cell)
    return Scene(T, [x, cue]), {"target": 0, "cue_shape": cue_shape}


def _q_colour_at_cue(q):
    return f"what colour is the {q['target_name']} when the white {q['cue_shape']} appears?"


def _a_colour_at_cue(scene, q):
    t = _cue_time(scene)
    return COLOUR_NAMES[int(scene.tracks[q["target"]].colour[t])]


def _e_cue(scene, q):
    return {"cue_frame": scene.cue_frame()}


# -------------------------------------------------------------------------------------------------- relation_at_cue

def _build_relation_at_cue(rng_q, rng_t, T, a):
    tracks = _objects(rng_q, rng_t, T, 4)
    cue_shape = SHAPES[int(rng_q.integers(len(SHAPES)))]
    rel = RELATIONS[a]
    segs = segments(rng_t, num_pairs(T), min_count=2)
    cue_seg = int(rng_t.integers(len(segs)))
    if rel in ("left", "right"):
        row = int(rng_t.integers(2))
        ca, cb = (2 * row, 2 * row + 1) if rel == "left" else (2 * row + 1, 2 * row)
    else:
        col = int(rng_t.integers(2))
        ca, cb = (col, 2 + col) if rel == "above" else (2 + col, col)
    free = [c for c in range(4) if c not in (ca, cb)]
    rng_t.shuffle(free)
    third = int(rng_t.integers(2, 4))
    cue_layout = {0: ca, 1: cb, third: free[0]}
    cue_cell = free[1]

    def ok(layouts):
        return any(_relation(lay.get(0, -1), lay.get(1, -1)) != rel for i, lay in enumerate(layouts) if i != cue_seg)

    layouts = _cue_layouts(rng_t, segs, 4, cue_seg, cue_layout, ok)
    _apply_layouts(tracks, segs, layouts, T)
    s, e = segs[cue_seg]
    pair = int(rng_t.integers(s, e))
    cue = _cue(cue_shape, rng_t, T, pair, cue_cell)
    return Scene(T, [*tracks, cue]), {"a": 0, "b": 1, "cue_shape": cue_shape}


def _q_relation_at_cue(q):
    return f"where is the {q['a_name']} relative to the {q['b_name']} when the white {q['cue_shape']} appears?"


def _a_relation_at_cue(scene, q):
    t = _cue_time(scene)
    rel = _relation(int(scene.tracks[q["a"]].cell[t]), int(scene.tracks[q["b"]].cell[t]))
    if rel is None:
        raise ValueError("the named objects are not side by side when the cue appears")
    return rel


# -------------------------------------------------------------------------------------------------- position_at_cue

def _build_position_at_cue(rng_q, rng_t, T, a):
    tracks = _objects(rng_q, rng_t, T, 4)
    cue_shape = SHAPES[int(rng_q.integers(len(SHAPES)))]
    cell = int(rng_q.integers(4))
    obj = next(i for i, tr in enumerate(tracks) if int(tr.colour[0]) == a)
    segs = segments(rng_t, num_pairs(T), min_count=2)
    cue_seg = int(rng_t.integers(len(segs)))
    free = [c for c in range(4) if c != cell]
    rng_t.shuffle(free)
    others = [i for i in range(4) if i != obj]
    rng_t.shuffle(others)
    cue_layout = {obj: cell, others[0]: free[0], others[1]: free[1]}
    cue_cell = free[2]
    hidden = others[2]

    def ok(layouts):
        rest = [lay for i, lay in enumerate(layouts) if i != cue_seg]
        differs = any(not any(o == obj and c == cell for o, c in lay.items()) for lay in rest)
        all_colours_seen = any(hidden in lay for lay in rest)
        return differs and all_colours_seen

    layouts = _cue_layouts(rng_t, segs, 4, cue_seg, cue_layout, ok)
    _apply_layouts(tracks, segs, layouts, T)
    s, e = segs[cue_seg]
    pair = int(rng_t.integers(s, e))
    cue = _cue(cue_shape, rng_t, T, pair, cue_cell)
    return Scene(T, [*tracks, cue]), {"cell": cell, "cue_shape": cue_shape}


def _q_position_at_cue(q):
    return f"what colour is the shape in the {CELLS[q['cell']]} when the white {q['cue_shape']} appears?"


def _a_position_at(scene, q, t):
    tr = scene.at_cell(q["cell"], t)
    if tr is None or int(tr.colour[t]) == WHITE_ID:
        raise ValueError("no coloured object in the asked cell")
    return COLOUR_NAMES[int(tr.colour[t])]


def _a_position_at_cue(scene, q):
    return _a_position_at(scene, q, _cue_time(scene))


# -------------------------------------------------------------------------------------------------- image tasks

def _still(rng, n: int, must_colour: int | None = None) -> list[Track]:
    colours = list(rng.permutation(len(COLOUR_NAMES))[:n])
    if must_colour is not None and must_colour not in colours:
        colours[int(rng.integers(n))] = must_colour
    shapes = rng.permutation(len(SHAPES))[:n]
    cells = rng.permutation(4)[:n]
    tracks = []
    for c, s, k in zip(colours, shapes, cells):
        tr = new_track(1, SHAPES[int(s)], int(c), rng)
        tr.cell[0] = int(k)
        tracks.append(tr)
    return tracks


def _build_image_position(rng_q, rng_t, T, a):
    n = int(rng_q.integers(3, 5))
    tracks = _still(rng_q, n, must_colour=a)
    cell = next(int(tr.cell[0]) for tr in tracks if tr.base_colour() == a)
    return Scene(1, tracks), {"cell": cell}


def _q_image_position(q):
    return f"what colour is the shape in the {CELLS[q['cell']]}?"


def _a_image_position(scene, q):
    return _a_position_at(scene, q, 0)


def _build_image_colour(rng_q, rng_t, T, a):
    tracks = _still(rng_q, 1, must_colour=a)
    return Scene(1, tracks), {"target": 0}


def _q_image_colour(q):
    return "what colour is the shape?"


def _a_image_colour(scene, q):
    return COLOUR_NAMES[int(scene.tracks[q["target"]].colour[0])]


def _build_image_where(rng_q, rng_t, T, a):
    tracks = _still(rng_q, 1)
    tracks[0].cell[0] = a
    return Scene(1, tracks), {"target": 0}


def _q_image_where(q):
    return "where is the shape?"


def _a_image_where(scene, q):
    return CELLS[int(scene.tracks[q["target"]].cell[0])]


def _build_image_count(rng_q, rng_t, T, a):
    return Scene(1, _still(rng_q, a + 1)), {}


def _q_image_count(q):
    return "how many shapes are there?"


def _a_image_count(scene, q):
    return COUNT_WORDS[sum(1 for tr in scene.objects() if tr.visible(0))]


def _e_none(scene, q):
    return {}


# -------------------------------------------------------------------------------------------------- registry

SPECS: dict[str, TaskSpec] = {s.name: s for s in [
    TaskSpec("flash_count", "global", COUNT_WORDS[:3], "how many times does the {colour} {shape} flash?",
             "count the named object's flashes (white for 2 frames), spread uniformly over the whole clip; other "
             "objects flash too",
             _build_flash_count, _q_flash_count, _a_flash_count, _e_flash_count),
    TaskSpec("flash_order", "global", ("before", "after"),
             "does the {colour} {shape} flash before or after the {colour} {shape}?",
             "find the single flash of each of two named objects anywhere in the clip and compare their times; a "
             "third object may flash as a distractor",
             _build_flash_order, _q_flash_order, _a_flash_order, _e_flash_order),
    TaskSpec("colour_at_cue", "global", COLOUR_NAMES, "what colour is the {shape} when the white {shape} appears?",
             "the object changes colour along the clip (every colour appears); find the one pair of frames with the "
             "white cue and read the object's colour there",
             _build_colour_at_cue, _q_colour_at_cue, _a_colour_at_cue, _e_cue),
    TaskSpec("relation_at_cue", "local", RELATIONS,
             "where is the {colour} {shape} relative to the {colour} {shape} when the white {shape} appears?",
             "the spatial relation of two named objects in the pair of frames with the white cue (objects hop "
             "between cells; elsewhere in the clip the relation differs)",
             _build_relation_at_cue, _q_relation_at_cue, _a_relation_at_cue, _e_cue),
    TaskSpec("position_at_cue", "local", COLOUR_NAMES,
             "what colour is the shape in the {cell} when the white {shape} appears?",
             "which object sits in the named cell in the pair of frames with the white cue (elsewhere in the clip "
             "that cell holds another object or none; every colour appears in the clip)",
             _build_position_at_cue, _q_position_at_cue, _a_position_at_cue, _e_cue),
    TaskSpec("image_colour", "image", COLOUR_NAMES, "what colour is the shape?",
             "name the colour of the only object in one image (binds colour words to what the vision tower sees)",
             _build_image_colour, _q_image_colour, _a_image_colour, _e_none),
    TaskSpec("image_where", "image", CELLS, "where is the shape?",
             "name the cell of the only object in one image (binds position words to token positions)",
             _build_image_where, _q_image_where, _a_image_where, _e_none),
    TaskSpec("image_position", "image", COLOUR_NAMES, "what colour is the shape in the {cell}?",
             "read the colour of the object in the named cell of one image (3 or 4 objects)",
             _build_image_position, _q_image_position, _a_image_position, _e_none),
    TaskSpec("image_count", "image", COUNT_WORDS[1:5], "how many shapes are there?",
             "count the objects (1 to 4) in one image",
             _build_image_count, _q_image_count, _a_image_count, _e_none),
]}

TASKS: list[str] = list(SPECS)
TASK_KINDS: dict[str, str] = {name: s.kind for name, s in SPECS.items()}


def get_spec(task: str) -> TaskSpec:
    try:
        return SPECS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}") from None


def answer_choices(task: str) -> list[str]:
    return list(get_spec(task).choices)


def chance_levels() -> dict[str, float]:
    return {name: s.chance for name, s in SPECS.items()}


def describe_query(scene: Scene, query: dict) -> dict:
    """The query with the objects' names filled in (what `TaskSpec.question` formats)."""
    q = dict(query)
    for key in ("target", "a", "b"):
        if key in q:
            q[f"{key}_name"] = _name(scene.tracks[q[key]])
    return q


_WORD = re.compile(r"[a-z]+")


def vocabulary() -> list[str]:
    """Every lower-case word that can appear in a question or an answer, sorted."""
    words = set()
    for s in SPECS.values():
        words.update(_WORD.findall(re.sub(r"\{[a-z_]+\}", " ", s.template).lower()))
        words.update(w for c in s.choices for w in _WORD.findall(c))
    for group in (COLOUR_NAMES, SHAPES, CELLS, ("white",)):
        words.update(w for x in group for w in _WORD.findall(x))
    return sorted(words)


__all__ = ["TaskSpec", "SPECS", "TASKS", "TASK_KINDS", "get_spec", "answer_choices", "chance_levels", "vocabulary",
           "answer_index", "task_salt", "describe_query", "COUNT_WORDS", "RELATIONS"]
