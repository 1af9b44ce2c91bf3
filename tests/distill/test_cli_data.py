"""`linmu distill` from files: LLaVA JSON with real images/videos, bad samples skipped and counted, seq-KD."""

import json

import pytest

import linmu
from linmu.cli import main

from tests.helpers import WORDS, write_tiny_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_files")
    write_tiny_workspace(root, seed=2, media_seed=0, video_frames=6)
    (root / "clip.mp4").rename(root / "v.mp4")
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    good = [
        {"id": "img", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape"}, {"from": "gpt", "value": "red"}]},
        {"id": "vid", "video": "v.mp4", "conversations": [
            {"from": "human", "value": "<video>\nhow many times did it blink"}, {"from": "gpt", "value": "two"}]},
    ]
    bad = [
        {"id": "missing", "image": "nope.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat"}, {"from": "gpt", "value": "red"}]},
        {"id": "corrupt", "video": "broken.mp4", "conversations": [
            {"from": "human", "value": "<video>\nwhat"}, {"from": "gpt", "value": "red"}]},
        {"id": "empty", "conversations": []},
        {"id": "long", "conversations": [{"from": "human", "value": " ".join(WORDS * 40)},
                                         {"from": "gpt", "value": "one"}]},
    ]
    (root / "data.json").write_text(json.dumps(good * 3 + bad))
    return root


def _args(ws, stage, out, *extra, steps=3):
    return ["distill", "--stage", str(stage), "--teacher", str(ws / "teacher"), "--data", str(ws / "data.json"),
            "--output-dir", str(out), "--steps", str(steps), *extra]


def test_three_stages_from_files_with_bad_samples_counted(workspace, tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("mmate: {window: [2, 2, 2], text_window: 8}\nbatch_size: 2\nmax_length: 200\nnum_frames: 4\n"
                   "save_every: 2\nlr: 0.002\ntensorboard: false\n")
    assert main(_args(workspace, 1, tmp_path / "s1", "--config", str(cfg), steps=6)) == 0
    summary = json.loads((tmp_path / "s1" / "summary.json").read_text())
    # 6 good and 4 bad samples per epoch in batches of 2: at most 5 steps per epoch, so 6 steps see all of epoch 0
    assert summary["skipped_samples"].keys() == {"missing_file", "bad_video", "no_answer", "too_long"}, summary
    assert main(_args(workspace, 2, tmp_path / "s2", "--config", str(cfg), "--init", str(tmp_path / "s1" / "final"))) == 0
    seq = tmp_path / "answers.jsonl"
    assert main(["distill", "prepare-seqkd", "--teacher", str(workspace / "teacher"), "--data",
                 str(workspace / "data.json"), "--config", str(cfg), "--seqkd-out", str(seq),
                 "--max-new-tokens", "3"]) == 0
    answers = [json.loads(l) for l in seq.read_text().splitlines()]
    assert {a["id"] for a in answers} == {"img", "vid"}
    cfg3 = tmp_path / "s3.yaml"
    cfg3.write_text(cfg.read_text() + f"w_seqkd: 1.0\nw_kd: 1.0\nw_ce: 0.5\nseqkd_file: {seq}\nlora_r: 2\n")
    assert main(_args(workspace, 3, tmp_path / "s3", "--config", str(cfg3), "--init", str(tmp_path / "s2" / "final"))) == 0
    student = linmu.load(tmp_path / "s3" / "final")
    log = [json.loads(l) for l in (tmp_path / "s3" / "log.jsonl").read_text().splitlines()]
    assert all({"seqkd", "kd", "ce", "hidden"} <= r.keys() for r in log)
    assert type(student).__name__ == "LinMUQwen2VLForConditionalGeneration"
