"""`linmu demo --quick` end to end on the shipped teacher (the accuracy numbers of a 4-step distillation are not the
point here: the full demo's are recorded in docs/DEMO.md)."""

import dataclasses
import json

import pytest
import torch

import linmu
from linmu.cli import main
from linmu.demo.pipeline import ABLATIONS
from linmu.demo.teacher import demo_teacher_config, demo_tokenizer


def test_shipped_teacher_is_the_documented_one():
    from linmu.demo.teacher import SHIPPED_TEACHER, load_demo_teacher

    model, processor = load_demo_teacher()
    ref = demo_teacher_config(demo_tokenizer())
    assert model.config.text_config.hidden_size == ref.text_config.hidden_size
    assert model.config.text_config.num_hidden_layers == ref.text_config.num_hidden_layers
    assert len(processor.tokenizer) == ref.text_config.vocab_size
    assert all(p.dtype == torch.bfloat16 for p in linmu.load(SHIPPED_TEACHER).parameters())
    report = json.loads((SHIPPED_TEACHER / "teacher_report.json").read_text())
    assert report["steps_done"] > 10000 and report["history"][-1]["val_accuracy"] > 0.7


def test_quick_demo_writes_every_artifact(tmp_path):
    from linmu.demo.pipeline import run_demo

    report = run_demo(tmp_path, quick=True, log=lambda m: None)  # the shipped teacher, end to end
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


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_every_ablation_stage_has_something_to_train(ablation):
    from linmu.demo.pipeline import DemoSettings, _mmate_config, _stages
    from linmu.distill.stages import stage1_trainable, stage2_trainable
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    teacher = Qwen2VLForConditionalGeneration(demo_teacher_config(demo_tokenizer(), hidden=64, layers=2))
    settings = DemoSettings()
    student = linmu.convert(teacher, _mmate_config(ablation, settings))
    if ablation == "sinks":
        assert all(b.config.n_sink == 4 for b in student.mmate_blocks())
    plan = _stages(ablation, settings)
    dropped = settings.steps[2] if ablation == "no-stage3" else 0  # the stage that ablation removes
    assert sum(st["steps"] for st in plan) == sum(settings.steps) - dropped
    for st in plan:
        if st["stage"] in (1, 2):
            groups = (stage1_trainable if st["stage"] == 1 else stage2_trainable)(student)
            assert sum(p.numel() for g in groups.values() for _, p in g) > 0, (ablation, st["stage"])


def test_distillation_set_mixes_clip_lengths_with_distinct_seeds():
    from linmu.demo.pipeline import DemoSettings, distillation_examples

    s = DemoSettings(n_train=21).with_overrides("distill_frames=8,16")
    assert s.distill_frames == (8, 16)
    ex = distillation_examples(s)
    assert len(ex) == 21
    assert [e.frames.shape[0] for e in ex[:4]] == [8, 16, 8, 16]
    assert len({(e.task, e.metadata["seed"]) for e in ex}) == 21  # no clip repeated at another length
    assert all(e.metadata["split"] == "train" for e in ex)
    assert [e.frames.shape[0] for e in distillation_examples(DemoSettings(n_train=5))] == [16, 40, 16, 40, 16]


def test_distillation_set_can_follow_the_teachers_task_mix():
    from collections import Counter

    from linmu.demo.pipeline import DemoSettings, distillation_examples
    from linmu.demo.teacher import TASK_WEIGHTS

    n = 2 * sum(TASK_WEIGHTS.values())
    got = Counter(e.task for e in distillation_examples(DemoSettings(n_train=n, distill_mix="teacher")))
    assert got == {t: 2 * w for t, w in TASK_WEIGHTS.items()}
    assert len(set(Counter(e.task for e in distillation_examples(DemoSettings(n_train=n))).values())) <= 2
    with pytest.raises(ValueError, match="distill_mix"):
        distillation_examples(DemoSettings(n_train=4, distill_mix="hard"))


def test_named_mixes_weight_the_task_types():
    from collections import Counter

    from linmu.demo.pipeline import MIXES, DemoSettings, distillation_examples

    weights = MIXES["flash"]
    n = 2 * sum(weights.values())  # two lengths, one full round of the mix each
    got = Counter(e.task for e in distillation_examples(DemoSettings(n_train=n), "flash"))
    assert got == {t: 2 * w for t, w in weights.items()}
    with pytest.raises(ValueError, match="stage3_mix"):
        distillation_examples(DemoSettings(n_train=4), "hard")


def test_stage3_gets_its_own_clips_only_in_another_mix():
    from collections import Counter

    from linmu.demo.pipeline import MIXES, DemoSettings, distillation_examples, stage3_examples
    from linmu.synthetic.suite import split_of

    n = 2 * sum(MIXES["flash"].values())
    settings = DemoSettings(n_train=n)
    train = distillation_examples(settings)
    assert stage3_examples(settings, train) is train
    assert stage3_examples(dataclasses.replace(settings, stage3_mix="uniform"), train) is train
    flash = stage3_examples(dataclasses.replace(settings, stage3_mix="flash"), train)
    assert Counter(e.task for e in flash) == {t: 2 * w for t, w in MIXES["flash"].items()}
    assert {split_of(e.metadata["seed"]) for e in flash} == {"train"}


def test_recipe_overrides_the_named_stages_with_typed_values():
    from linmu.demo.pipeline import DemoSettings, _stages

    s = DemoSettings().with_overrides("recipe=12.align_text_weight=4 3.hidden_layers=all 1.lr=0.01 "
                                      "3.stage3_mmate=true 2.fps=2.5 23.lora_r=4")
    one, two, three = _stages("none", s)
    assert (one["lr"], two["lr"], three["lr"]) == (0.01, 2e-3, 2e-3)
    assert one["align_text_weight"] == two["align_text_weight"] == 4.0 and "align_text_weight" not in three
    assert three["hidden_layers"] == "all" and three["stage3_mmate"] is True and three["lora_r"] == 4
    assert two["fps"] == 2.5 and "fps" not in one  # an optional number (None by default)
    for bad, match in (("3hidden_layers=all", "STAGES.field=value"), ("4.lr=1", "STAGES.field=value"),
                       ("3.nonsense=1", "not a distillation setting"), ("3.output_dir=/x", "not a distillation")):
        with pytest.raises(ValueError, match=match):
            _stages("none", DemoSettings(recipe=bad))
