"""`linmu demo`: the embedded default, end to end on the real pipeline (LINMU.md §7).

teacher (shipped, or retrained) → convert → stage 1 → stage 2 → stage 3 → evaluate teacher and student on the test
split at the training clip length and at 8× → CPU speed sweep → ``report.json``, ``report.md``, plots.
The same ``run_stage`` / ``linmu.convert`` / ``LinMUCache`` code serves a real 7B teacher.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from ..config import MMateConfig
from ..denormals import flush_denormals
from .teacher import SHIPPED_TEACHER, TRAIN_FRAMES, load_demo_teacher, train_teacher

# ablation name -> what changes (LINMU.md's "default, ablate" choices and the paper's ablations)
ABLATIONS = {
    "none": "the default recipe",
    "no-stage3": "stages 1 and 2 only",
    "one-stage": "a single end-to-end stage (stage 3 losses, all M-MATE parameters and LoRA trainable) instead of three",
    "flex-only": "Flex-MA branch only (no Local-Swin)",
    "swin-only": "Local-Swin branch only (no Flex-MA)",
    "no-rms": "fixed (T,H,W) scan order instead of the Rotary Major-Scan",
    "swin-absent-stage1": "Local-Swin absent (not frozen) during stage 1",
    "fusion-head": "per-head fusion weights (LINMU.md's formula; the default before sweeps 6-8)",
    "fusion-channel": "per-channel fusion weights",
    "fusion-gate": "per-token sigmoid gate fusion (the demo's default since sweeps 6-8)",
    "mamba2-init": "standard Mamba2 init instead of the mimic init",
    "sinks": "4 attention sinks in Local-Swin (every query also sees the first 4 tokens)",
}


@dataclasses.dataclass
class DemoSettings:
    n_train: int = 1200  # distillation examples (train split)
    # clip lengths of the distillation set (frames), n_train split evenly over them, distinct seeds per length
    # (16 and 40 frames: a 40-frame clip is longer than Local-Swin's text window, so Flex-MA must learn to hold the
    # moments before the window, which is what carries to 8x longer clips; docs/DEMO.md, recipe sweeps 9-12)
    distill_frames: tuple[int, ...] = (TRAIN_FRAMES, 5 * TRAIN_FRAMES // 2)
    # task mix of the distillation set: "uniform" (every type equally) or "teacher" (the teacher's TASK_WEIGHTS, which
    # weight the cue and flash types up)
    distill_mix: str = "uniform"
    # task mix of stage 3's clips ("" = the distillation set above; else a mix name of MIXES: stage 3 gets its own
    # n_train clips of the train split in that mix)
    stage3_mix: str = ""
    n_test: int = 540  # test examples per clip length (60 per task type)
    # optimizer steps of stages 1, 2, 3 (500 in stages 1-2 keeps the 2-core CPU run under 20 minutes with the
    # 40-frame clips; sweeps 9-12)
    steps: tuple[int, int, int] = (500, 500, 300)
    batch_size: int = 8
    lengths: tuple[int, ...] = (16, 64, 128, 256, 512)  # frames in the speed sweep
    decode_tokens: int = 32
    # M-MATE at the synthetic scale (2x2 merged tokens per frame pair): a visual window covers two frame pairs;
    # text attends to the last `text_window` tokens: 64 covers a 16-frame clip and its question (~64 tokens), so at
    # the training length text reads the clip with the teacher's own softmax attention (Flex-MA's linear readout
    # alone missed 10-18 points of flash_order there), while 8x longer clips (~290 tokens) and the 40-frame
    # distillation clips reach past it and need Flex-MA's state (sweeps 9-12 of docs/DEMO.md)
    window: tuple[int, int, int] = (4, 2, 2)
    text_window: int = 64
    # MMateConfig.fusion ("head", "channel" or "gate"); the fusion ablations override it. The per-token gate is the
    # demo's default: ahead of per-head weights in every paired run of docs/DEMO.md (sweeps 6-8)
    fusion: str = "gate"
    n_sink: int = 0  # MMateConfig.n_sink; the "sinks" ablation sets 4
    # per-stage DistillConfig overrides, space-separated "STAGES.field=value" items, e.g.
    # "12.align_text_weight=4 3.hidden_layers=all" (STAGES: the digits of the stages it applies to)
    recipe: str = ""

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(n_train=64, n_test=28, steps=(4, 4, 4), batch_size=8, lengths=(16, 64), decode_tokens=8)

    def with_overrides(self, spec: str | None) -> "DemoSettings":
        """``"steps=100,100,100;text_window=32"`` -> a copy with those fields replaced (for experiments)."""
        if not spec:
            return self
        fields = {f.name: f for f in dataclasses.fields(self)}
        kw = {}
        for item in filter(None, (x.strip() for x in spec.split(";"))):
            name, _, value = item.partition("=")
            if name not in fields:
                raise ValueError(f"unknown demo setting {name!r}; known: {', '.join(fields)}")
            current = getattr(self, name)
            kw[name] = (tuple(int(v) for v in value.split(",")) if isinstance(current, tuple) else type(current)(value))
        return dataclasses.replace(self, **kw)


class SyntheticSet(torch.utils.data.Dataset):
    """Synthetic examples encoded by the teacher's processor (answer tokens labelled)."""

    def __init__(self, examples, processor):
        self.examples, self.processor = examples, processor

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        from ..synthetic import to_loaded_sample

        return self.processor.encode(to_loaded_sample(self.examples[i]))

    def collate(self, items):
        return dict(self.processor.pad(items))


# task mixes of the distillation clips: None = every type equally; else integer weights per type
MIXES = {
    "uniform": None,
    "teacher": "TASK_WEIGHTS",  # the teacher's own training mix (linmu.demo.teacher.TASK_WEIGHTS)
    # the global types the student trails the teacher on (docs/DEMO.md) three times, relation_at_cue twice
    "flash": {"flash_count": 3, "flash_order": 3, "colour_at_cue": 1, "relation_at_cue": 2, "position_at_cue": 1,
              "image_colour": 1, "image_where": 1, "image_position": 1, "image_count": 1},
}


def distillation_examples(settings: DemoSettings, mix: str | None = None) -> list:
    """``settings.n_train`` train-split clips, split evenly over ``settings.distill_frames`` (lengths interleaved,
    distinct seeds per length), task types in the mix ``mix`` (default ``settings.distill_mix``; see MIXES)."""
    from ..synthetic import make_split

    from .teacher import TASK_WEIGHTS, weighted_tasks

    mix = settings.distill_mix if mix is None else mix
    if mix not in MIXES:
        raise ValueError(f"distill_mix / stage3_mix must be one of {', '.join(MIXES)}, not {mix!r}")
    weights = TASK_WEIGHTS if MIXES[mix] == "TASK_WEIGHTS" else MIXES[mix]
    tasks = weighted_tasks(weights) if weights is not None else None
    per = -(-settings.n_train // len(settings.distill_frames))
    parts = [make_split("train", per, f, tasks=tasks, start=i * per) for i, f in enumerate(settings.distill_frames)]
    return [ex for group in zip(*parts) for ex in group][:settings.n_train]


def stage3_examples(settings: DemoSettings, train: list) -> list:
    """Stage 3's clips: ``train`` (the distillation set) unless ``settings.stage3_mix`` names another mix."""
    if settings.stage3_mix in ("", settings.distill_mix):
        return train
    return distillation_examples(settings, settings.stage3_mix)


def _mmate_config(ablation: str, settings: DemoSettings) -> MMateConfig:
    kw = dict(window=settings.window, text_window=settings.text_window, fusion=settings.fusion, n_sink=settings.n_sink)
    kw.update({
        # one branch: a fixed-start per-head weight of 1 (a gate over one branch would only rescale it per token)
        "flex-only": dict(use_swin=False, fusion="head", fusion_init_flex=1.0),
        "swin-only": dict(use_flex=False, fusion="head", fusion_init_swin=1.0),
        "no-rms": dict(rotary_major_scan=False),
        "fusion-head": dict(fusion="head"),
        "fusion-channel": dict(fusion="channel"),
        "fusion-gate": dict(fusion="gate"),
        "mamba2-init": dict(init="mamba2"),
        "sinks": dict(n_sink=4),
    }.get(ablation, {}))
    return MMateConfig(**kw)


def _with_recipe(stage_kw: dict, recipe: str) -> dict:
    """``stage_kw`` with the ``DemoSettings.recipe`` items that name its stage applied (typed as the field)."""
    from ..distill.config import DistillConfig

    fields = {f.name: f for f in dataclasses.fields(DistillConfig)}
    out = dict(stage_kw)
    for item in recipe.split():
        where, _, rest = item.partition(".")
        name, eq, value = rest.partition("=")
        if not where.isdigit() or not set(where) <= set("123") or not eq:
            raise ValueError(f"recipe item {item!r} is not STAGES.field=value (e.g. 3.hidden_layers=all)")
        if name not in fields or name in ("stage", "output_dir"):
            raise ValueError(f"recipe item {item!r}: {name!r} is not a distillation setting")
        if str(stage_kw["stage"]) not in where:
            continue
        kind = type(getattr(DistillConfig(), name))
        if kind is bool:
            out[name] = value.lower() in ("1", "true", "yes")
        elif kind in (int, float):
            out[name] = kind(value)
        elif value == "none":
            out[name] = None
        elif kind is type(None):  # optional numbers (e.g. fps, max_length)
            out[name] = json.loads(value)
        else:
            out[name] = value
    return out


def _stages(ablation: str, settings: DemoSettings):
    s1, s2, s3 = settings.steps
    base = dict(batch_size=settings.batch_size, tensorboard=False, save_every=10**9, kd_tokens="answer",
                warmup_steps=5)
    # learning rates from the recipe sweeps of docs/DEMO.md (twice the first ones: +4-9 points at the same steps)
    # the parameters with no teacher counterpart (Flex-MA's conv, dt, A, D, gate z, norm; the fusion gate) learn at 10x
    # in stages 1-2 (sweeps 6-8: +1-2 points at 8x length, most of it with the fusion gate)
    stage1 = dict(base, stage=1, steps=s1, lr=6e-3, new_param_lr_scale=10.0,
                  stage1_swin="absent" if ablation == "swin-absent-stage1" else "frozen")
    stage2 = dict(base, stage=2, steps=s2, lr=2e-3, new_param_lr_scale=10.0)
    stage3 = dict(base, stage=3, steps=s3, lr=2e-3, w_hidden=1.0, w_kd=1.0, w_ce=0.2, lora_r=8, lora_alpha=16,
                  stage3_mmate=ablation == "one-stage")
    stage1, stage2, stage3 = (_with_recipe(kw, settings.recipe) for kw in (stage1, stage2, stage3))
    if ablation == "swin-only":
        # stage 1 trains Flex-MA alone, which this student does not have: its steps go to stage 2
        return [dict(stage2, steps=s1 + s2), stage3]
    if ablation == "no-stage3":
        return [stage1, stage2]
    if ablation == "one-stage":
        return [dict(stage3, steps=s1 + s2 + s3)]
    return [stage1, stage2, stage3]


@flush_denormals()  # a fresh block per call (a context manager used as a decorator)
def run_demo(out_dir, *, quick: bool = False, ablation: str = "none", retrain_teacher: bool = False,
             teacher_dir=None, settings: str | None = None, log=print) -> dict:
    """Run the whole default job into ``out_dir``; returns the report (also ``out_dir/report.json``).

    Subnormal floats are flushed to zero throughout (``linmu.denormals``): the trained student's decays produce them,
    and on a CPU they slow every distillation step and the speed sweep of both models alike.
    """
    from ..convert import convert
    from ..distill.config import DistillConfig
    from ..distill.engine import run_stage
    from ..io import load
    from ..synthetic import chance_levels, make_split
    from .evaluate import accuracy
    from .speed import speed_sweep
    from .vision_attention import vision_attention

    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}")
    settings = (DemoSettings.quick() if quick else DemoSettings()).with_overrides(settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    report = {"settings": dataclasses.asdict(settings), "ablation": ablation, "quick": quick,
              "train_frames": TRAIN_FRAMES, "long_frames": 8 * TRAIN_FRAMES, "chance": chance_levels()}

    # 1. teacher: shipped (trained once by `train_teacher`, reproducible from its seed) or retrained here
    src = Path(teacher_dir) if teacher_dir else SHIPPED_TEACHER
    if retrain_teacher or not (src / "config.json").is_file():
        log("[1/6] training the teacher from scratch (slow on a CPU; the shipped one skips this)")
        train_teacher(out / "teacher", log=log)
    elif src.resolve() != (out / "teacher").resolve():
        shutil.copytree(src, out / "teacher", dirs_exist_ok=True)
        log(f"[1/6] teacher: reusing the trained teacher from {src}")
    teacher, processor = load_demo_teacher(out / "teacher")

    # 2. data: the distillation set at the training length; test sets at 1x and 8x that length
    t0 = time.perf_counter()
    train = distillation_examples(settings)
    tests = {TRAIN_FRAMES: make_split("test", settings.n_test, TRAIN_FRAMES),
             8 * TRAIN_FRAMES: make_split("test", settings.n_test, 8 * TRAIN_FRAMES)}
    log(f"[2/6] data: {len(train)} distillation clips of {'/'.join(map(str, settings.distill_frames))} frames, "
        f"{settings.n_test} test clips at {TRAIN_FRAMES} and "
        f"{8 * TRAIN_FRAMES} frames ({time.perf_counter() - t0:.0f}s)")
    dataset = SyntheticSet(train, processor)
    s3 = stage3_examples(settings, train)
    stage3_set = dataset if s3 is train else SyntheticSet(s3, processor)

    # 3-4. convert, then the distillation stages, each starting from the previous stage's output
    student = convert(teacher, _mmate_config(ablation, settings))
    stages = []
    for i, kw in enumerate(_stages(ablation, settings), 1):
        t0 = time.perf_counter()
        cfg = DistillConfig(output_dir=str(out / "runs" / f"stage{kw['stage']}"), seed=i, **kw)
        log(f"[3/6] stage {cfg.stage}: {cfg.steps} steps")
        # the vision towers (frozen, the teacher's) attend per frame in one packed call (vision_attention.py)
        with vision_attention(teacher), vision_attention(student):
            data = stage3_set if cfg.stage == 3 else dataset
            final = run_stage(cfg, teacher=teacher, student=student, dataset=data, collate_fn=data.collate)
        student = load(final)
        losses = [json.loads(l)["loss"] for l in (Path(cfg.output_dir) / "log.jsonl").read_text().splitlines()]
        stages.append({"stage": cfg.stage, "steps": cfg.steps, "seconds": time.perf_counter() - t0,
                       "first_loss": losses[0], "last_loss": losses[-1]})
    if (out / "student").exists():
        shutil.rmtree(out / "student")
    student.to(next(teacher.parameters()).device)  # evaluated where the teacher is (a GPU when distilled on one)
    student.save_pretrained(out / "student")
    processor.tokenizer.save_pretrained(out / "student")
    report["stages"] = stages

    # 5. accuracy of both models at both clip lengths
    log("[4/6] evaluating teacher and student")
    acc = {}
    for name, model in (("teacher", teacher), ("student", student)):
        with vision_attention(model):
            acc[name] = {str(n): accuracy(model, processor, ex, batch_size=16) for n, ex in tests.items()}
        log(f"    {name}: " + ", ".join(f"{n} frames {a['accuracy']:.3f}" for n, a in acc[name].items()))
    report["accuracy"] = acc

    # 6. speed: prefill (TTFT) and decode, teacher vs student, over clip lengths
    log("[5/6] CPU speed sweep")
    # on the CPU even when distilled on a GPU: the sweep is the laptop measurement (GPU speed: linmu bench)
    teacher, student = teacher.cpu(), student.cpu()
    report["speed"] = speed_sweep(teacher, student, processor, settings.lengths, settings.decode_tokens, log=log)
    report["seconds"] = time.perf_counter() - t_all
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log("[6/6] writing report.md and plots")
    from .report import write_markdown, write_plots

    write_plots(report, out)
    write_markdown(report, out)
    log(f"done in {report['seconds'] / 60:.1f} min: {out / 'report.md'}")
    return report
