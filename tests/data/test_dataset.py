import json
import logging
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("av")

from linmu.data import (ConversationDataset, QwenVLProcessor, SeededSampler, SkipCounter, build_tokenizer,  # noqa
                        load_conversations, load_media, write_test_video)
from linmu.data.dataset import Collator, Skipped  # noqa: E402

MIN_PIX, MAX_PIX = 28 * 28, 56 * 56


def clip(n=8, h=48, w=64, seed=0):
    levels = (np.random.default_rng(seed).random(n) * 200 + 20).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (n, h, w, 3)).copy()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A JSONL file with good samples and one of every bad kind, plus its media."""
    from PIL import Image

    d = tmp_path_factory.mktemp("world")
    (d / "media").mkdir()
    write_test_video(d / "media/a.mp4", clip(8, seed=1), fps=4)
    write_test_video(d / "media/b.mp4", clip(12, seed=2), fps=4)
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(d / "media/red.png")
    (d / "media/broken.mp4").write_text("not a video")
    (d / "media/empty.mp4").write_bytes(b"")
    (d / "media/text.png").write_text("not an image")

    def conv(q, a="two"):
        c = [{"from": "human", "value": q}]
        return c + ([{"from": "gpt", "value": a}] if a is not None else [])

    recs = [
        {"id": "good_video", "video": "media/a.mp4", "conversations": conv("<video>\nhow many?")},
        {"id": "good_image", "image": "media/red.png", "conversations": conv("<image>\nwhat color?", "red")},
        {"id": "missing", "video": "media/nope.mp4", "conversations": conv("<video>\nhow many?")},
        {"id": "undecodable", "video": "media/broken.mp4", "conversations": conv("<video>\nhow many?")},
        {"id": "empty_video", "video": "media/empty.mp4", "conversations": conv("<video>\nhow many?")},
        {"id": "no_answer", "video": "media/a.mp4", "conversations": conv("<video>\nhow many?", None)},
        {"id": "too_long", "video": "media/b.mp4", "conversations": conv("<video>\n" + "how many? " * 40)},
        "MALFORMED",
        {"id": "missing_image", "image": "media/none.png", "conversations": conv("<image>\nwhat?")},
        {"id": "good_text", "conversations": conv("which came first?", "red")},
        {"id": "good_video_b", "video": "media/b.mp4", "conversations": conv("how many?")},
        {"id": "bad_image", "image": "media/text.png", "conversations": conv("<image>\nwhat?")},
    ]
    lines = [r if isinstance(r, str) else json.dumps(r) for r in recs]
    lines[7] = '{"id": "malformed", "conversations": [{"from": "human"'
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    tok = build_tokenizer(["how many what color which came first red two"])
    proc = QwenVLProcessor(tok, min_pixels=MIN_PIX, max_pixels=MAX_PIX)
    return d, proc


def make_ds(world, **kw):
    d, proc = world
    return ConversationDataset(load_conversations(d / "train.jsonl"), proc, num_frames=4, max_length=96, **kw)


def test_bad_samples_are_skipped_and_counted(world, caplog):
    ds = make_ds(world)
    assert len(ds) == 12
    with caplog.at_level(logging.WARNING, logger="linmu.data"):
        items = [ds[i] for i in range(len(ds))]
    good = [ds.samples[i].id for i, x in enumerate(items) if x is not None]
    assert good == ["good_video", "good_image", "good_text", "good_video_b"]
    assert ds.report() == {"bad_image": 1, "bad_video": 2, "malformed": 1, "missing_file": 2, "no_answer": 1,
                           "too_long": 1}
    assert ds.skips.total == 8
    # one warning per skipped sample, naming id, file:line and reason
    msgs = [r.getMessage() for r in caplog.records if r.name == "linmu.data"]
    assert len(msgs) == 8
    assert any("'missing'" in m and "train.jsonl:3" in m and "missing_file" in m for m in msgs)
    assert any("'undecodable'" in m and "train.jsonl:4" in m and "bad_video" in m and "unsupported" in m for m in msgs)
    assert any("train.jsonl:8" in m and "malformed" in m for m in msgs)
    assert any("'too_long'" in m and "too_long" in m for m in msgs)
    assert any("'bad_image'" in m and "bad_image" in m and "text.png" in m for m in msgs)
    assert "skipped 8 samples" in ds.skips.summary()


def test_dataloader_iterates_past_bad_samples(world):
    ds = make_ds(world)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, collate_fn=ds.collate_fn)
    batches = list(loader)
    assert len(batches) == 3
    rows = sum(b["input_ids"].shape[0] for b in batches if b is not None)
    assert rows == 4
    assert sum(ds.report().values()) == 8


def test_collate_equals_processing_together(world):
    ds = make_ds(world)
    idx = [0, 1, 9, 10]
    batch = ds.collate_fn([ds[i] for i in idx])
    loaded = [load_media(ds.samples[i], num_frames=4) for i in idx]
    together = ds.processor(loaded)
    assert batch.keys() == together.keys()
    for k in batch:
        assert torch.equal(batch[k], together[k]), k
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4], [2, 4, 4]]  # 4 frames -> t=2; 48x64 -> 56x56
    assert ds.collate_fn([None, None]) is None


def test_deterministic_order_and_resume(world):
    ds = make_ds(world)

    def run(seed, start=0):
        sampler = SeededSampler(len(ds), seed=seed, start=start)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=ds.collate_fn)
        return [None if b is None else b["input_ids"] for b in loader], sampler.order()

    a, order_a = run(3)
    b, order_b = run(3)
    assert order_a == order_b and order_a != list(range(len(ds)))
    assert len(a) == len(b) and all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))
    assert SeededSampler(len(ds), seed=4).order() != order_a
    # resume at data position 4 == the tail of the full order
    c, _ = run(3, start=4)
    assert len(c) == len(a) - 2 and all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a[2:], c))
    s = SeededSampler(len(ds), seed=3)
    s.set_epoch(1)
    assert s.order() != order_a and sorted(s.order()) == list(range(len(ds)))


def test_skip_counter_merge_and_pickle():
    a, b = SkipCounter(log=None), SkipCounter(log=None)
    a.add("too_long", "sample 'x' (f:1)", "300 > 256")
    b.add("too_long", "sample 'y' (f:2)")
    b.add("missing_file", "sample 'z' (f:3)")
    c = pickle.loads(pickle.dumps(a))  # what a DataLoader worker gets
    c.add("bad_video", "sample 'w' (f:4)")
    a.merge(b, c.state_dict(), {"no_answer": 2})
    assert a.report() == {"bad_video": 1, "missing_file": 1, "no_answer": 2, "too_long": 3}
    assert a.examples()["too_long"][0].startswith("sample 'x'")
    fresh = SkipCounter(log=None)
    fresh.load_state_dict(a.state_dict())
    assert fresh.report() == a.report()


def test_workers_report_skips_through_batches(world):
    ds = make_ds(world, return_skips=True)
    main = SkipCounter(log=None)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=Collator(ds.processor, report_skips=True))
    rows = 0
    for batch in loader:
        main.add_events(batch.pop("skipped"))
        rows += batch["input_ids"].shape[0] if "input_ids" in batch else 0
    assert rows == 4 and main.report() == ds.report()
    assert isinstance(ds[2], Skipped) and ds[2].reason == "missing_file"


def test_generation_dataset_keeps_questions(world):
    ds = make_ds(world, add_generation_prompt=True)
    assert ds[5] is not None  # no answer is fine for prompts
    assert (ds[0]["labels"] == -100).all()


def test_unexpected_errors_are_counted_not_raised(world):
    d, proc = world

    class Boom:
        def encode(self, *a, **k):
            raise RuntimeError("boom")

    ds = ConversationDataset(load_conversations(d / "train.jsonl")[:1], proc)
    ds.processor = Boom()
    assert ds[0] is None and ds.report() == {"error": 1}
