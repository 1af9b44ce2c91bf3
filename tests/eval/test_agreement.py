"""`linmu eval --agreement`: teacher-student KL, top-1 agreement and per-layer hidden error, per task and overall."""

import json

import pytest

from linmu.cli import main
from linmu.data import load_conversations
from linmu.eval.agreement import agreement, run_agreement
from linmu.inference.generate import InputError, load_model

from tests.helpers import write_tiny_workspace


def _conv(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("agreement")
    write_tiny_workspace(root, seed=5, students=("identity", "student"), media_seed=1)
    records = [
        {"id": "i1", "task": "textvqa", "image": "a.png", "conversations": _conv("<image>\nwhat color", "red square")},
        {"id": "v1", "task": "videomme", "video": "clip.mp4", "conversations": _conv("<video>\nhow many", "two")},
        {"id": "v2", "task": "videomme", "video": "clip.mp4",
         "conversations": _conv("what color is the circle", "blue circle one")},
        {"id": "gone", "task": "videomme", "video": "missing.mp4", "conversations": _conv("<video>\nwhat", "one")},
        {"id": "noans", "task": "textvqa", "conversations": [{"from": "human", "value": "what"}]},
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    untagged = [{k: v for k, v in r.items() if k != "task"} for r in records[:2]]
    (root / "untagged.json").write_text(json.dumps(untagged))
    return root


def _check_fields(r, layers):
    assert set(r) == {"samples", "tokens", "positions", "kl", "top1", "hidden_mse", "hidden_rel"}
    assert len(r["hidden_mse"]) == len(r["hidden_rel"]) == layers


def test_identity_student_agrees_exactly(ws):
    rep = run_agreement(ws / "teacher", ws / "identity", ws / "data.jsonl", num_frames=4)
    assert rep["layers"] == 2 and list(rep["tasks"]) == ["textvqa", "videomme"]
    assert rep["skipped"] == {"missing_file": 1, "no_answer": 1}
    assert rep["tasks"]["textvqa"]["samples"] == 1 and rep["tasks"]["videomme"]["samples"] == 2
    ov = rep["overall"]
    _check_fields(ov, 2)
    assert ov["samples"] == 3 and ov["top1"] == 1.0 and abs(ov["kl"]) < 1e-6
    assert max(ov["hidden_mse"]) < 1e-9 and max(ov["hidden_rel"]) < 1e-7


def test_converted_student_per_task_and_pooled(ws):
    rep = run_agreement(ws / "teacher", ws / "student", ws / "data.jsonl", num_frames=4)
    tasks, ov = rep["tasks"], rep["overall"]
    for r in tasks.values():
        _check_fields(r, 2)
        assert r["kl"] > 0 and 0 <= r["top1"] <= 1 and all(v > 0 for v in r["hidden_mse"])
    # answer tokens (and <|im_end|>) only: "red square" -> 2 + 1; token-weighted pooling over tasks
    assert tasks["textvqa"]["tokens"] == 3
    assert ov["tokens"] == sum(r["tokens"] for r in tasks.values())
    for key in ("kl", "top1"):
        pooled = sum(r[key] * r["tokens"] for r in tasks.values()) / ov["tokens"]
        assert ov[key] == pytest.approx(pooled, rel=1e-6)
    # hidden errors: per position, pooled over positions; the first layer sees the same input embeddings
    for l in range(2):
        pooled = sum(r["hidden_mse"][l] * r["positions"] for r in tasks.values()) / ov["positions"]
        assert ov["hidden_mse"][l] == pytest.approx(pooled, rel=1e-6)
    # every token scored instead of the answers only: more tokens, same samples
    every = run_agreement(ws / "teacher", ws / "student", ws / "data.jsonl", num_frames=4, tokens="nonpad")
    assert every["overall"]["tokens"] > ov["tokens"] and every["overall"]["samples"] == 3


def test_batches_left_padded_equal_one_by_one(ws):
    t = load_model(ws / "teacher")
    s = load_model(ws / "student", processor=ws / "teacher")
    samples = load_conversations(ws / "data.jsonl")
    one = agreement(t.model, s.model, t.processor, samples, num_frames=4, batch_size=1)
    three = agreement(t.model, s.model, t.processor, samples, num_frames=4, batch_size=3)
    for name in one["tasks"]:
        a, b = one["tasks"][name], three["tasks"][name]
        assert (a["samples"], a["tokens"], a["positions"]) == (b["samples"], b["tokens"], b["positions"])
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-3, abs=1e-6)
        assert b["top1"] == a["top1"]
        assert b["hidden_mse"] == pytest.approx(a["hidden_mse"], rel=1e-3)


def test_cli_json_table_and_errors(ws, tmp_path, capsys):
    args = ["eval", "--agreement", "--teacher", str(ws / "teacher"), "--model", str(ws / "student"), "--data"]
    assert main(args + [str(ws / "data.jsonl"), "--json", "--num-frames", "4", "--output", str(tmp_path / "r.json")]) \
        == 0
    out = capsys.readouterr().out
    rep = json.loads(out)
    assert rep == json.loads((tmp_path / "r.json").read_text())
    assert set(rep) >= {"teacher", "student", "data", "tokens", "layers", "tasks", "overall", "skipped"}
    assert list(rep["tasks"]) == ["textvqa", "videomme"]
    # no task field: one group "all"; the text table names every group and the overall line
    assert main(args + [str(ws / "untagged.json"), "--num-frames", "4"]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in table.splitlines()[3:5]}
    assert set(rows) == {"all", "overall"} and rows["all"][1:3] == rows["overall"][1:3] == ["2", rows["all"][2]]
    assert "KL" in table and "top-1" in table and "per-layer hidden MSE" in table
    # problems: one line on stderr, status 2
    for argv, needle in (
            (["eval", "--agreement", "--teacher", str(ws / "teacher")], "needs --model, --data"),
            (args + [str(tmp_path / "none.json")], "does not exist"),
            (["eval", "--agreement", "--teacher", str(ws / "student"), "--model", str(ws / "teacher"), "--data",
              str(ws / "data.jsonl")], "not a teacher"),
            (["eval"], "choose what to evaluate")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


def test_library_rejects_bad_token_mode(ws):
    with pytest.raises(ValueError, match="tokens must be"):
        agreement(None, None, None, [], tokens="all")
    with pytest.raises(InputError, match="mutually exclusive"):
        run_agreement(ws / "teacher", ws / "student", ws / "data.jsonl", num_frames=4, fps=1.0)
