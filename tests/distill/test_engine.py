"""Stages on a tiny Qwen2-VL with an in-memory data set: trainable sets, loss decrease, exact resume."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import linmu
from linmu.distill.config import DistillConfig
from linmu.distill.engine import param_groups, run_stage, stage_losses, _prepare_student
from linmu.distill.stages import is_new_parameter, stage1_trainable, stage2_trainable, stage3_trainable
from linmu.tiny import tiny_qwen2_vl, tiny_qwen2_vl_inputs
from tests.distill.tiny_data import MMATE, TinySet, collate

@pytest.fixture(scope="module")
def teacher():
    return tiny_qwen2_vl(seed=11)


def test_trainable_sets_are_exactly_the_intended_parameters(teacher):
    student = linmu.convert(teacher, linmu.MMateConfig(**MMATE))
    names = lambda groups: {n for ps in groups.values() for n, _ in ps}
    s1 = names(stage1_trainable(student))
    assert s1 and all(".self_attn.flex." in n for n in s1)
    assert s1 == {n for n, _ in student.named_parameters() if ".self_attn.flex." in n}
    s2 = names(stage2_trainable(student))
    expected2 = {n for n, _ in student.named_parameters()
                 if ".self_attn.flex." in n or ".self_attn.swin." in n or n.endswith(("w_flex", "w_swin"))}
    assert s2 == expected2
    cfg = DistillConfig(stage=3, lora_r=2, lora_alpha=4)
    peft_model, counts = _prepare_student(cfg, teacher, linmu.convert(teacher, linmu.MMateConfig(**MMATE)))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == names(stage3_trainable(peft_model))
    assert all("lora_" in n or "norm" in n for n in trainable)
    assert all(".mlp." in n for n in trainable if "lora_" in n)  # MLPs by default
    assert not any("visual" in n for n in trainable)
    assert counts["lora"] > 0 and counts["norms"] > 0
    # the one-stage ablation: stage 3 also trains every M-MATE parameter
    cfg = DistillConfig(stage=3, lora_r=2, lora_alpha=4, stage3_mmate=True)
    peft_model, counts = _prepare_student(cfg, teacher, linmu.convert(teacher, linmu.MMateConfig(**MMATE)))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(counts) == {"lora", "norms", "flex", "swin", "fusion"}
    assert any(".self_attn.flex.A_log_fwd" in n for n in trainable) and any("w_swin" in n for n in trainable)


@pytest.mark.parametrize("fusion", ["head", "gate"])
def test_new_parameters_are_those_with_no_teacher_weight_and_get_their_own_lr(teacher, fusion):
    student = linmu.convert(teacher, linmu.MMateConfig(**MMATE, fusion=fusion))
    teacher_attn = {n.split(".self_attn.")[1] for n, _ in teacher.named_parameters() if ".self_attn." in n}
    for name, _ in student.named_parameters():
        if ".self_attn." not in name:
            assert not is_new_parameter(name), name
            continue
        rest = name.split(".self_attn.")[1]
        branch, _, inner = rest.partition(".")
        # a parameter is seeded exactly when the teacher attention has one of that name (q/k/v/o weights, biases)
        seeded = branch in ("flex", "swin") and inner in teacher_attn
        assert is_new_parameter(name) != seeded, name
    cfg = DistillConfig(stage=2, lr=2e-3, new_param_lr_scale=4.0, adam_beta2=0.95)
    student, _ = _prepare_student(cfg, teacher, student)
    groups = param_groups(student, cfg)
    assert [g["lr"] for g in groups] == [2e-3, 8e-3]
    new_ids = {id(p) for p in groups[1]["params"]}
    for name, p in student.named_parameters():
        if p.requires_grad:
            assert (id(p) in new_ids) == is_new_parameter(name), name
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in student.parameters())
    one = param_groups(student, DistillConfig(stage=2, lr=2e-3))  # scale 1: a single group, as before the option
    assert len(one) == 1 and len(one[0]["params"]) == sum(len(g["params"]) for g in groups)
    with pytest.raises(ValueError, match="betas"):
        DistillConfig(adam_beta2=1.0)
    with pytest.raises(ValueError, match="new_param_lr_scale"):
        DistillConfig(new_param_lr_scale=0)


@pytest.mark.parametrize("stage,extra", [(1, {}), (1, {"stage1_swin": "absent", "w_kd": 0.5}), (2, {}),
                                         (3, {"w_kd": 1.0, "w_ce": 0.1, "hidden_layers": "all"})])
def test_few_steps_reduce_the_loss_on_a_fixed_batch(teacher, stage, extra, tmp_path):
    torch.manual_seed(0)
    cfg = DistillConfig(stage=stage, mmate=MMATE, lr=3e-3 if stage < 3 else 1e-2, lora_r=4, lora_alpha=8, **extra)
    student, _ = _prepare_student(cfg, teacher, linmu.convert(teacher, linmu.MMateConfig(**MMATE)))
    batch = collate([TinySet(teacher, 2)[i] for i in range(2)])
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr)
    losses = []
    for _ in range(8):
        terms = stage_losses(cfg, student, teacher, batch)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
    assert losses[-1] < 0.85 * losses[0] and losses[-1] < min(losses[:4]), losses


def test_alignment_text_weight_weights_text_positions_and_survives_the_kd_pass(teacher):
    """Per layer, loss(w) = (S_vis + w S_text) / (N_vis + w N_text): predicted for w = 3 from the w = 0 and w = 1
    losses and the token counts; the stage-1 KD pass (a free run with the teachers detached) keeps the weight and
    the Local-Swin-absent override."""
    from linmu.distill.stages import alignment_losses, attach_teachers

    torch.manual_seed(2)
    student = linmu.convert(teacher, linmu.MMateConfig(**MMATE))
    batch = collate([TinySet(teacher, 2)[i] for i in range(2)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    layout = student.linmu_layout(inputs)
    valid = inputs["attention_mask"].bool()
    n_vis = float((layout.is_visual & valid).sum())
    n_text = float((~layout.is_visual & valid).sum())
    assert n_vis > 0 and n_text > 0

    def losses(w):
        attach_teachers(student, teacher, swin="absent", text_weight=w)
        with torch.no_grad():
            student(**inputs, use_cache=False)
        return torch.stack(alignment_losses(student)).double()

    l0, l1, l3 = losses(0.0), losses(1.0), losses(3.0)
    s_vis = l0 * n_vis
    s_text = l1 * (n_vis + n_text) - s_vis
    torch.testing.assert_close(l3, (s_vis + 3 * s_text) / (n_vis + 3 * n_text), rtol=1e-5, atol=0)
    assert not torch.allclose(l3, l1)
    cfg = DistillConfig(stage=1, mmate=MMATE, w_kd=0.5, stage1_swin="absent", align_text_weight=3.0)
    for _ in range(2):
        stage_losses(cfg, student, teacher, batch)
        assert all(b.branch_override == "flex_only" and b.align_text_weight == 3.0 for b in student.mmate_blocks())
    with pytest.raises(ValueError, match="text weight"):
        attach_teachers(student, teacher, text_weight=-1.0)


def _cfg(tmp_path, **kw):
    base = dict(stage=2, output_dir=str(tmp_path), mmate=MMATE, steps=6, batch_size=2, grad_accum=2, lr=2e-3,
                save_every=2, seed=3, warmup_steps=2, tensorboard=True)
    base.update(kw)
    return DistillConfig(**base)


def test_run_stage_writes_logs_checkpoints_and_a_loadable_model(teacher, tmp_path):
    final = run_stage(_cfg(tmp_path), teacher=teacher, dataset=TinySet(teacher, 6), collate_fn=collate)
    student = linmu.load(final)
    assert type(student).__name__ == "LinMUQwen2VLForConditionalGeneration"
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7)) and all("align" in r for r in log)
    ckpts = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert ckpts == ["checkpoint-4", "checkpoint-6"]  # keep_checkpoints=2
    saved = load_file(str(tmp_path / "checkpoint-6" / "model.safetensors"))
    assert saved and all(".self_attn." in k for k in saved)  # trainable tensors only
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 6
    assert list((tmp_path / "tensorboard").iterdir())
    assert torch.tensor([1e-40]).mul(1.0).item() != 0.0  # subnormals flushed only while the stage ran


def test_stage_n_plus_1_starts_from_stage_n(teacher, tmp_path):
    s1 = run_stage(_cfg(tmp_path / "s1", stage=1, steps=2), teacher=teacher, dataset=TinySet(teacher, 4),
                   collate_fn=collate)
    s2 = run_stage(_cfg(tmp_path / "s2", stage=2, steps=2, init=str(s1)), teacher=teacher,
                   dataset=TinySet(teacher, 4), collate_fn=collate)
    s3 = run_stage(_cfg(tmp_path / "s3", stage=3, steps=2, init=str(s2), w_kd=1.0, lora_r=2), teacher=teacher,
                   dataset=TinySet(teacher, 4), collate_fn=collate)
    a, b = linmu.load(s1), linmu.load(s3)
    inputs = tiny_qwen2_vl_inputs(teacher)
    with torch.no_grad():
        assert not torch.equal(a(**inputs).logits, b(**inputs).logits)
    # stage 1 trained only Flex-MA: Local-Swin still holds the teacher's projections
    t_q = teacher.model.language_model.layers[0].self_attn.q_proj.weight
    assert torch.equal(a.model.language_model.layers[0].self_attn.swin.q_proj.weight, t_q)
    assert not torch.equal(a.model.language_model.layers[0].self_attn.flex.dt_proj.weight,
                           torch.zeros_like(a.model.language_model.layers[0].self_attn.flex.dt_proj.weight))


def test_resume_after_interruption_is_exact(teacher, tmp_path):
    full = run_stage(_cfg(tmp_path / "full"), teacher=teacher, dataset=TinySet(teacher, 6), collate_fn=collate)
    part_cfg = _cfg(tmp_path / "part")
    run_stage(part_cfg, teacher=teacher, dataset=TinySet(teacher, 6), collate_fn=collate, max_steps_this_call=3)
    resumed = run_stage(part_cfg, teacher=teacher, dataset=TinySet(teacher, 6), collate_fn=collate, resume=True)
    a = load_file(str(full / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    la = [json.loads(l)["loss"] for l in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert lb[-1] == pytest.approx(la[-1], rel=1e-5)


def test_sigkill_at_a_random_step_then_resume_matches_uninterrupted(tmp_path):
    """A real SIGKILL mid-run (possibly mid-checkpoint), then --resume: same final weights and loss."""
    script = [sys.executable, "-m", "tests.distill.tiny_data"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run(script + [str(tmp_path / "full")], cwd=root, env=env, check=True, capture_output=True)
    kill_after = random.Random().randint(1, 6)
    proc = subprocess.Popen(script + [str(tmp_path / "killed")], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before it could be killed"
    subprocess.run(script + [str(tmp_path / "killed"), "--resume"], cwd=root, env=env, check=True,
                   capture_output=True)
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=f"{k} (killed after step {kill_after})")
    last = lambda d: json.loads((tmp_path / d / "log.jsonl").read_text().splitlines()[-1])
    assert last("killed")["step"] == last("full")["step"] == 8
    assert last("killed")["loss"] == pytest.approx(last("full")["loss"], rel=1e-5)
