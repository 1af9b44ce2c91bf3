"""The demo teacher's training helpers: packed vision attention, precomputed M-RoPE ids, the mix, the schedule,
and a time-budgeted run resumed to its planned step count."""

import json

import pytest
import torch
import torch.nn.functional as F

from linmu.demo.teacher import (LazySplit, RopeIndex, TASK_WEIGHTS, _lr_factor, demo_processor, demo_teacher_config,
                                demo_tokenizer, train_teacher, weighted_tasks)
from linmu.demo.vision_attention import NAME, packed_attention, vision_attention
from linmu.synthetic import TASKS


def _loop_reference(q, k, v, cu, scale):
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        outs.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=scale))
    return torch.cat(outs, 2).transpose(1, 2)


@pytest.mark.parametrize("lengths", [[16, 16, 16], [16, 5, 1, 9], [7]])
def test_packed_attention_equals_the_per_sequence_loop(lengths):
    g = torch.Generator().manual_seed(len(lengths))
    S = sum(lengths)
    q, k, v = (torch.randn(1, 3, S, 8, generator=g, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out, _ = packed_attention(None, q, k, v, scaling=0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    torch.testing.assert_close(out, _loop_reference(q, k, v, cu, 0.3), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        packed_attention(None, q, k, v)


@pytest.fixture(scope="module")
def tiny():
    tok = demo_tokenizer()
    cfg = demo_teacher_config(tok, hidden=64, layers=2)
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    return model, demo_processor(model.config, tok)


def test_packed_vision_and_precomputed_positions_give_the_same_loss(tiny):
    model, proc = tiny
    data = LazySplit("train", 100, 8, proc, tasks=weighted_tasks(), rope_index=RopeIndex(model.config))
    batch = data.collate([data[i] for i in range(11)])
    batch = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    plain = {k: v for k, v in batch.items() if k != "position_ids"}
    ref = model(**plain).loss
    before = model.config.vision_config._attn_implementation
    with vision_attention(model):
        assert model.config.vision_config._attn_implementation == NAME
        fast = model(**batch).loss
    assert model.config.vision_config._attn_implementation == before
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    pos, _ = model.model.get_rope_index(plain["input_ids"], mm_token_type_ids=plain["mm_token_type_ids"],
                                        image_grid_thw=plain.get("image_grid_thw"),
                                        video_grid_thw=plain.get("video_grid_thw"),
                                        attention_mask=plain["attention_mask"])
    assert torch.equal(batch["position_ids"], pos)


def test_training_mix_and_schedule():
    mix = weighted_tasks()
    assert {t: mix.count(t) for t in TASKS} == TASK_WEIGHTS
    assert weighted_tasks({"image_count": 2}) == ["image_count", "image_count"]
    with pytest.raises(ValueError, match="unknown tasks"):
        weighted_tasks({"juggling": 1})
    f = [_lr_factor(s, 1000) for s in range(1000)]
    assert f[0] < f[19] == 1.0 and f[599] == 1.0 and f[-1] < 1e-3
    assert all(a >= b for a, b in zip(f[600:], f[601:]))
    with pytest.raises(ValueError, match="split has"):
        LazySplit("train", 10**8, 8, None)


def test_time_budgeted_run_resumes_to_its_planned_steps(tmp_path):
    logs = []
    first = train_teacher(tmp_path, num_frames=8, steps=4, batch_size=3, time_budget_s=0.0, eval_every=100,
                          n_val=9, device="cpu", log=logs.append)
    assert first["steps_done"] == 1 and first["steps_planned"] == 4  # over budget after the first step
    assert (tmp_path / "train_state.pt").is_file() and (tmp_path / "config.json").is_file()
    second = train_teacher(tmp_path, num_frames=8, batch_size=3, eval_every=100, n_val=9, device="cpu",
                           resume=str(tmp_path / "train_state.pt"), log=logs.append)
    assert second["steps_done"] == 4 and [h["step"] for h in second["history"]] == [1, 4]
    assert any("resumed" in m for m in logs)
    saved = json.loads((tmp_path / "teacher_report.json").read_text())
    assert saved["steps_done"] == 4


def test_export_is_the_best_validation_step_and_resume_can_switch_the_mix(tmp_path, monkeypatch):
    import linmu.demo.evaluate as ev
    from linmu.demo.teacher import load_demo_teacher

    scripted = iter([0.5, 0.9, 0.2])  # validation accuracy at steps 1, 2, 3: the best is step 2
    monkeypatch.setattr(ev, "accuracy", lambda *a, **k: {"accuracy": next(scripted), "per_task": {}})
    report = train_teacher(tmp_path, num_frames=8, steps=3, batch_size=3, eval_every=1, n_val=9, device="cpu",
                           log=lambda m: None)
    assert report["steps_done"] == 3 and report["exported_step"] == 2
    last = torch.load(tmp_path / "train_state.pt", weights_only=False)["model"]
    saved = load_demo_teacher(tmp_path)[0].state_dict()
    assert set(saved) == set(last)
    # the export holds step 2's weights, not the last step's
    assert any(not torch.equal(saved[k], last[k].to(torch.bfloat16).float()) for k in saved)

    monkeypatch.setattr(ev, "accuracy", lambda *a, **k: {"accuracy": 0.1, "per_task": {}})
    resumed = train_teacher(tmp_path / "b", num_frames=8, batch_size=3, eval_every=100, n_val=9, device="cpu",
                            resume=str(tmp_path / "train_state.pt"), extend_to=4,
                            task_weights={"image_count": 1, "flash_order": 1}, log=lambda m: None)
    assert resumed["steps_done"] == 4 and sorted(resumed["tasks"]) == ["flash_order", "image_count"]
