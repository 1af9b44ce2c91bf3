"""The synthetic long-video QA suite: determinism, splits, frame counts, balance, chance, global-ness, rendering,
processor round trip, files."""

from collections import Counter

import numpy as np
import pytest

from linmu.synthetic import (SPLIT_SEEDS, TASK_KINDS, TASKS, answer_choices, chance_levels, generate_example,
                             make_split, score, split_of, suite_info, to_loaded_sample, visual_tokens, vocabulary,
                             write_split)
from linmu.synthetic.tasks import SPECS
from linmu.synthetic.world import CELL_BACKGROUNDS, PALETTE, WHITE_ID, object_box, pair_frames, render

VIDEO_TASKS = [t for t in TASKS if TASK_KINDS[t] != "image"]


# ----------------------------------------------------------------------------------------------- API and determinism

def test_task_list_and_kinds():
    assert len(TASKS) == len(set(TASKS)) >= 6
    assert set(TASK_KINDS) == set(TASKS)
    kinds = Counter(TASK_KINDS.values())
    assert kinds["global"] >= 3 and kinds["local"] >= 2 and kinds["image"] >= 1
    assert set(kinds) == {"global", "local", "image"}


def test_same_seed_same_example_and_seeds_differ():
    for task in TASKS:
        a, b = generate_example(11, task, 24), generate_example(11, task, 24)
        assert (a.id, a.question, a.answer, a.metadata) == (b.id, b.question, b.answer, b.metadata)
        pa, pb = (a.frames, b.frames) if a.is_video else (a.image, b.image)
        assert pa.dtype == np.uint8 and np.array_equal(pa, pb)
        c = generate_example(12, task, 24)
        pc = c.frames if c.is_video else c.image
        assert not np.array_equal(pa, pc)


def test_question_and_answer_do_not_depend_on_clip_length():
    for task in VIDEO_TASKS:
        short, long = generate_example(5, task, 16), generate_example(5, task, 128)
        assert (short.question, short.answer) == (long.question, long.answer)
        assert long.frames.shape == (128, 56, 56, 3)


def test_frame_size_is_configurable():
    ex = generate_example(3, "position_at_cue", 16, frame_size=112)
    assert ex.frames.shape == (16, 112, 112, 3) and ex.id.endswith("-112px")
    assert ex.answer == generate_example(3, "position_at_cue", 16).answer
    assert visual_tokens(2, 56) == 4 and visual_tokens(2, 112) == 16 and visual_tokens(1, 56) == 4
    with pytest.raises(ValueError):
        generate_example(0, "flash_count", 16, frame_size=55)


@pytest.mark.parametrize("task,num_frames", [("flash_count", 8), ("flash_order", 9), ("relation_at_cue", 64),
                                             ("colour_at_cue", 512)])
def test_frame_counts_8_to_512(task, num_frames):
    ex = generate_example(7, task, num_frames)
    assert ex.frames.shape == (num_frames, 56, 56, 3)
    assert ex.metadata["visual_tokens"] == 4 * -(-num_frames // 2)
    assert ex.answer in answer_choices(task)


def test_every_task_at_16_frames():
    for task in TASKS:
        for seed in range(20):
            ex = generate_example(seed, task, 16)
            assert ex.task == task and ex.kind == TASK_KINDS[task]
            assert ex.answer in answer_choices(task)
            if ex.is_video:
                assert ex.frames.shape == (16, 56, 56, 3) and ex.image is None
            else:
                assert ex.image.shape == (56, 56, 3) and ex.frames is None


def test_out_of_range_arguments():
    with pytest.raises(ValueError):
        generate_example(0, "flash_count", 7)
    with pytest.raises(ValueError):
        generate_example(0, "flash_count", 513)
    with pytest.raises(ValueError):
        generate_example(0, "no_such_task", 16)
    with pytest.raises(ValueError):
        generate_example(-1, "flash_count", 16)


# ----------------------------------------------------------------------------------------------- splits and balance

def test_splits_use_disjoint_seed_ranges():
    ranges = sorted(SPLIT_SEEDS.values())
    assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(ranges, ranges[1:]))
    assert all(lo % 12 == 0 for lo, _ in ranges)  # balanced blocks of every choice count start at each split
    seeds = {}
    for split in SPLIT_SEEDS:
        ex = make_split(split, 14, 8)
        seeds[split] = {e.metadata["seed"] for e in ex}
        assert all(split_of(s) == split and e.metadata["split"] == split for e in ex for s in [e.metadata["seed"]])
    assert not (seeds["train"] & seeds["val"]) and not (seeds["train"] & seeds["test"]) \
        and not (seeds["val"] & seeds["test"])
    with pytest.raises(ValueError):
        make_split("train", 10, 16, start=SPLIT_SEEDS["train"][1])
    with pytest.raises(ValueError):
        make_split("dev", 10, 16)


def test_round_robin_and_answer_balance():
    n_per = 48
    ex = make_split("train", n_per * len(TASKS), 16)
    assert [e.task for e in ex[:2 * len(TASKS)]] == TASKS * 2
    for task in TASKS:
        counts = Counter(e.answer for e in ex if e.task == task)
        k = len(answer_choices(task))
        assert set(counts) == set(answer_choices(task))
        assert all(c == n_per // k for c in counts.values()), (task, counts)
    # a range not aligned to the blocks: still within one or two per answer
    ex = make_split("val", 60 * len(VIDEO_TASKS), 8, tasks=VIDEO_TASKS, start=5)
    for task in VIDEO_TASKS:
        counts = Counter(e.answer for e in ex if e.task == task)
        k = len(answer_choices(task))
        assert max(counts.values()) - min(counts.values()) <= 2 and len(counts) == k, (task, counts)


def test_repeated_tasks_weight_the_mix_without_repeating_seeds():
    ex = make_split("train", 9, 8, tasks=["image_colour", "image_colour", "flash_count"])
    assert [e.task for e in ex] == ["image_colour", "image_colour", "flash_count"] * 3
    assert [e.metadata["seed"] for e in ex if e.task == "image_colour"] == list(range(6))
    assert [e.metadata["seed"] for e in ex if e.task == "flash_count"] == [0, 1, 2]
    assert len({e.id for e in ex}) == 9


def test_chance_levels_match_choices():
    chance = chance_levels()
    assert set(chance) == set(TASKS)
    for task in TASKS:
        choices = answer_choices(task)
        assert len(set(choices)) == len(choices) >= 2
        assert chance[task] == pytest.approx(1 / len(choices))
    info = suite_info(32)
    assert info["chance"] == chance and info["visual_tokens_per_clip"] == 64
    assert generate_example(0, "flash_order", 16).metadata["chance"] == 0.5


def test_vocabulary_covers_every_question_and_answer():
    vocab = set(vocabulary())
    assert all(w.isalpha() and w.islower() for w in vocab)
    for task in TASKS:
        for seed in range(40):
            ex = generate_example(seed, task, 8)
            words = ex.question.lower().replace("?", " ").split() + ex.answer.split()
            assert set(words) <= vocab, (task, set(words) - vocab)


def test_score_normalises():
    ex = generate_example(0, "flash_count", 16)
    assert score(ex.answer, ex) and score(f"  {ex.answer.upper()}.", ex)
    digit = str(answer_choices("flash_count").index(ex.answer))
    assert score(digit, ex)
    assert not score("three", ex) and not score("", ex)
    other = generate_example(0, "colour_at_cue", 16)
    assert score(f"The {other.answer}!", other) and not score(f"{other.answer} square", other)


# ----------------------------------------------------------------------------------------------- global tasks need the clip

def _quarters_equal(a, b):
    q = len(a) // 4
    return np.array_equal(a[:q], b[:q]) and np.array_equal(a[-q:], b[-q:])


def _find(task, T, pred, limit=400):
    for seed in range(limit):
        ex = generate_example(seed, task, T)
        if pred(ex):
            return ex
    raise AssertionError(f"no {task} example found")


def test_count_answer_is_not_a_function_of_first_and_last_quarters():
    T = 32
    mid = range(T // 4, T - T // 4 - 1)
    ex = _find("flash_count", T, lambda e: any(f in mid for f in e.metadata["events"]["target_flashes"]))
    scene = ex.scene.copy()
    target = scene.tracks[ex.metadata["query"]["target"]]
    base = next(int(c) for c in target.colour if c != WHITE_ID)
    for f in ex.metadata["events"]["target_flashes"]:
        if f in mid:
            target.colour[f:f + 2] = base  # remove the flashes in the middle half
    frames = render(scene, 56)
    assert _quarters_equal(frames, ex.frames) and not np.array_equal(frames, ex.frames)
    assert SPECS["flash_count"].answer(scene, ex.metadata["query"]) != ex.answer


def test_order_answer_is_not_a_function_of_first_and_last_quarters():
    T = 32
    lo, hi = T // 4, T - T // 4

    def both_mid(e):
        ev = e.metadata["events"]
        return all(lo <= ev[k][0] < hi - 1 for k in ("a_flash", "b_flash")) and not any(
            lo - 2 <= f < hi for o in ev["other_flashes"] for f in o)

    ex = _find("flash_order", T, both_mid)
    scene = ex.scene.copy()
    q = ex.metadata["query"]
    ta, tb = scene.tracks[q["a"]], scene.tracks[q["b"]]
    fa, fb = ex.metadata["events"]["a_flash"][0], ex.metadata["events"]["b_flash"][0]
    ca, cb = ta.colour[fa - 1 if fa else fa + 2], tb.colour[fb - 1 if fb else fb + 2]
    ta.colour[fa:fa + 2], tb.colour[fb:fb + 2] = ca, cb  # swap the times of the two flashes
    ta.colour[fb:fb + 2], tb.colour[fa:fa + 2] = WHITE_ID, WHITE_ID
    frames = render(scene, 56)
    assert _quarters_equal(frames, ex.frames)
    assert SPECS["flash_order"].answer(scene, q) != ex.answer


def test_colour_at_cue_answer_changes_when_the_cue_moves_inside_the_middle():
    T = 32
    ex = _find("colour_at_cue", T, lambda e: T // 4 <= e.metadata["events"]["cue_frame"] < 3 * T // 4)
    scene = ex.scene.copy()
    x, cue = scene.tracks[0], scene.cue()
    old = ex.metadata["events"]["cue_frame"]
    new = next(2 * p for p in range(T // 8, 3 * T // 8)
               if x.colour[2 * p] != x.colour[old] and x.cell[2 * p] != cue.cell[old])
    cue.cell[new:new + 2], cue.cell[old:old + 2] = cue.cell[old], -1
    frames = render(scene, 56)
    assert _quarters_equal(frames, ex.frames)
    assert SPECS["colour_at_cue"].answer(scene, ex.metadata["query"]) != ex.answer


def test_events_spread_over_the_whole_clip_and_middle_only_examples_stay_balanced():
    T = 32
    quarters = Counter()
    middle_answers = {t: Counter() for t in ("flash_count", "flash_order", "colour_at_cue")}
    for seed in range(240):
        for task in middle_answers:
            ex = generate_example(seed, task, T)
            ev = ex.metadata["events"]
            key = {"flash_count": "target_flashes", "flash_order": "a_flash"}.get(task)
            frames = ev[key] if key else [ev["cue_frame"]]
            if task == "flash_order":
                frames = frames + ev["b_flash"]
            for f in frames:
                quarters[4 * f // T] += 1
            if all(T // 4 <= f < 3 * T // 4 for f in frames):
                middle_answers[task][ex.answer] += 1
    total = sum(quarters.values())
    assert all(abs(quarters[q] / total - 0.25) < 0.06 for q in range(4)), quarters
    for task, counts in middle_answers.items():
        # with every relevant event in the middle half the first/last quarters are uninformative; all answers occur
        assert set(counts) == set(answer_choices(task)), (task, counts)


def test_local_tasks_need_the_cue_frame():
    # elsewhere in the clip the asked relation / cell content is different at least once
    for task in ("relation_at_cue", "position_at_cue"):
        spec = SPECS[task]
        for seed in range(30):
            ex = generate_example(seed, task, 16)
            scene, q = ex.scene, ex.metadata["query"]
            cue = scene.cue()
            t0 = ex.metadata["events"]["cue_frame"]
            answers = set()
            for t in range(0, 16, 2):
                if t == t0:
                    continue
                moved = scene.copy()
                moved.cue().cell[:] = -1
                moved.cue().cell[t:t + 2] = 0  # only the time matters to the answer functions
                try:
                    answers.add(spec.answer(moved, q))
                except ValueError:
                    answers.add(None)
            assert answers - {ex.answer}, (task, seed)
            assert int(cue.cell[t0]) >= 0 and scene.at_cell(int(cue.cell[t0]), t0) is None


# ----------------------------------------------------------------------------------------------- rendering

def test_rendering_shows_every_object_in_its_colour():
    for task in TASKS:
        ex = generate_example(2, task, 16)
        frames = ex.frames if ex.is_video else ex.image[None]
        for t in range(len(frames)):
            want = set(CELL_BACKGROUNDS)  # every cell shows its own shade around its object
            for tr in ex.scene.tracks:
                box = object_box(tr, t, 56)
                if box is None:
                    continue
                top, left, size = box
                colour = tuple(PALETTE[int(tr.colour[t])])
                assert tuple(frames[t, top + size // 2, left + size // 2]) == colour
                assert 0 <= top and top + size <= 56 and 0 <= left and left + size <= 56
                want.add(colour)
            got = {tuple(c) for c in frames[t].reshape(-1, 3)}
            assert got == want


def test_flashes_and_cues_last_one_aligned_pair_of_frames():
    for seed in range(20):
        ex = generate_example(seed, "flash_count", 32)
        target = ex.scene.tracks[ex.metadata["query"]["target"]]
        for f in ex.metadata["events"]["target_flashes"]:
            assert f % 2 == 0
            for t in range(max(0, f - 1), min(32, f + 3)):
                top, left, size = object_box(target, t, 56)
                white = tuple(ex.frames[t, top + size // 2, left + size // 2]) == (255, 255, 255)
                assert white == (t in (f, f + 1)), (seed, f, t)
        cue_ex = generate_example(seed, "relation_at_cue", 32)
        t0 = cue_ex.metadata["events"]["cue_frame"]
        runs = cue_ex.scene.cue().visible_runs()
        assert runs == [(t0, t0 + 2)] and t0 % 2 == 0
        assert pair_frames(t0 // 2) == slice(t0, t0 + 2)


# ----------------------------------------------------------------------------------------------- processor and files

@pytest.fixture(scope="module")
def processor():
    from linmu.data import QwenVLProcessor, build_tokenizer

    return QwenVLProcessor(build_tokenizer(vocabulary()))


def test_to_loaded_sample_through_the_processor(processor):
    tok = processor.tokenizer
    for task in TASKS:
        ex = generate_example(4, task, 16)
        out = processor([to_loaded_sample(ex)])
        ids, labels = out["input_ids"][0], out["labels"][0]
        answer = tok.decode(ids[labels != -100])
        assert answer == ex.answer + "<|im_end|>"
        if ex.is_video:
            assert out["video_grid_thw"].tolist() == [[8, 4, 4]]
            assert int((ids == processor.video_token_id).sum()) == 32
        else:
            assert out["image_grid_thw"].tolist() == [[1, 4, 4]]
            assert int((ids == processor.image_token_id).sum()) == 4
        # every word of the question is one token
        pieces = tok.convert_ids_to_tokens(tok(ex.question)["input_ids"])
        assert [p.strip() for p in pieces if p.strip().isalpha()] == ex.question.rstrip("?").split(), pieces


def test_write_split_loads_and_decodes(tmp_path, processor):
    from linmu.data import load_conversations
    from linmu.data.dataset import load_media

    path = write_split(tmp_path, "val", len(TASKS), 16)
    samples = load_conversations(path)
    examples = make_split("val", len(TASKS), 16)
    assert [s.id for s in samples] == [e.id for e in examples]
    assert (tmp_path / "val_info.json").is_file()
    for s, ex in zip(samples, examples):
        assert s.error is None and s.meta["task"] == ex.task and s.meta["answer"] == ex.answer
        assert s.turns == [("user", ("<video>" if ex.is_video else "<image>") + "\n" + ex.question),
                           ("assistant", ex.answer)]
        loaded = load_media(s)
        if ex.is_video:
            frames = loaded.videos[0]
            assert frames.shape == ex.frames.shape
            assert np.abs(frames.astype(int) - ex.frames.astype(int)).mean() < 6
            # at each object's centre the decoded colour is nearest to its own palette colour
            for t in range(0, 16, 3):
                for tr in ex.scene.tracks:
                    box = object_box(tr, t, 56)
                    if box is None:
                        continue
                    top, left, size = box
                    px = frames[t, top + size // 2, left + size // 2].astype(int)
                    options = [*PALETTE.astype(int), *np.array(CELL_BACKGROUNDS)]
                    assert int(np.argmin([np.abs(px - c).sum() for c in options])) == int(tr.colour[t])
        else:
            assert np.array_equal(np.asarray(loaded.images[0]), ex.image)
        feats = processor.encode(loaded)
        assert processor.tokenizer.decode(feats["input_ids"][feats["labels"] != -100]) == ex.answer + "<|im_end|>"
