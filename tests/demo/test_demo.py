"""`linmu demo --quick` plumbing on a small untrained teacher (the accuracy numbers are not the point here: the
shipped teacher's are measured by the full demo and recorded in docs/DEMO.md)."""

import json

import pytest
import torch

import linmu
from linmu.cli import main
from linmu.demo.teacher import demo_teacher_config, demo_tokenizer


@pytest.fixture(scope="module")
def small_teacher_dir(tmp_path_factory):
    from transformers import Qwen2VLForConditionalGeneration

    d = tmp_path_factory.mktemp("teacher")
    tok = demo_tokenizer()
    torch.manual_seed(0)
    cfg = demo_teacher_config(tok, hidden=64, layers=2)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_quick_demo_writes_every_artifact(small_teacher_dir, tmp_path):
    from linmu.demo.pipeline import run_demo

    report = run_demo(tmp_path, quick=True, teacher_dir=small_teacher_dir, log=lambda m: None)
    for name in ("report.json", "report.md", "accuracy_per_task.png", "prefill_time_and_memory.png"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "report.json").read_text())["ablation"] == "none"
    assert [s["stage"] for s in report["stages"]] == [1, 2, 3]
    assert set(report["accuracy"]["student"]) == {"16", "128"}
    # both saved models load and are usable by `linmu eval --suite synthetic`
    assert type(linmu.load(tmp_path / "teacher")).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(linmu.load(tmp_path / "student")).__name__ == "LinMUQwen2VLForConditionalGeneration"
    for model in ("teacher", "student"):
        assert main(["eval", "--model", str(tmp_path / model), "--suite", "synthetic", "--seed", "3",
                     "--num-frames", "16", "--num-samples", "14", "--json"]) == 0
    # the student's cache does not grow with the clip; the teacher's does
    speed = report["speed"]
    assert speed[0]["student"]["cache_bytes"] == speed[-1]["student"]["cache_bytes"]
    assert speed[-1]["teacher"]["cache_bytes"] > speed[0]["teacher"]["cache_bytes"]


def test_unknown_ablation_is_refused(tmp_path):
    from linmu.demo.pipeline import run_demo

    with pytest.raises(ValueError, match="unknown ablation"):
        run_demo(tmp_path, ablation="nonsense")
