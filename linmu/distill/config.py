"""DistillConfig: one flat dataclass per stage run, loaded from YAML/JSON and saved beside every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class DistillConfig:
    # --- what and where
    stage: int = 1  # 1: Flex-MA alone; 2: Flex-MA + Local-Swin + fusion; 3: LoRA end to end
    output_dir: str = "runs/stage1"  # checkpoints, logs and the final model (output_dir/final)
    teacher: str | None = None  # local directory of the teacher checkpoint (transformers format)
    init: str | None = None  # LinMU model to start from (stage N-1's output_dir/final); None: convert the teacher
    mmate: dict = field(default_factory=dict)  # MMateConfig fields used when converting (init is None)
    # --- data
    data: str | None = None  # LLaVA-style JSON/JSONL file (image/video paths relative to media_root)
    media_root: str | None = None  # folder the data's image/video paths are relative to (default: the file's)
    num_frames: int | None = 8  # frames sampled uniformly per video (or use fps)
    fps: float | None = None  # sample by rate instead, capped at max_frames
    max_frames: int | None = 64
    max_length: int | None = 4096  # longer samples are skipped and counted
    seqkd_file: str | None = None  # teacher answers from `linmu distill prepare-seqkd` (stage 3 sequence KD)
    # --- optimisation
    steps: int = 1000  # optimizer steps
    batch_size: int = 1  # per process
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    # learning-rate multiplier for the parameters the teacher does not have (Flex-MA's conv, W_dt, dt bias, A, D,
    # output gate and norm; the fusion weights): they start from an init, the others from the teacher's weights
    new_param_lr_scale: float = 1.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" | "constant"
    max_grad_norm: float | None = 1.0
    seed: int = 0
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" (accelerate)
    gradient_checkpointing: bool = False
    # flush subnormal floats to zero while the stage runs (CPU; Flex-MA's decays produce them, and they make CPU
    # steps ~1.5x slower; only values below 1.2e-38 change). See linmu/denormals.py
    flush_denormals: bool = True
    # --- losses (weights; a weight of 0 skips the term)
    w_align: float = 1.0  # stages 1-2: per-layer MSE of the M-MATE output to the teacher attention output
    align_text_weight: float = 1.0  # stages 1-2: weight of text positions relative to visual ones in that MSE
    w_kd: float = 0.0  # token-level KD, KL(teacher || student) with temperature
    w_hidden: float = 1.0  # stage 3: hidden-state alignment
    hidden_layers: str = "final"  # stage 3: "final" (last hidden state) or "all" (every layer, averaged)
    w_seqkd: float = 0.0  # stage 3: CE on teacher-generated answers
    w_ce: float = 0.0  # stage 3: CE on the ground-truth answers
    temperature: float = 2.0
    kd_tokens: str = "answer"  # KD counts "answer" tokens or every "nonpad" token
    stage1_swin: str = "frozen"  # stage 1: Local-Swin "frozen" (present, not trained) or "absent"
    # --- stage 3 LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: str = "mlp"  # "mlp" | "mlp+mmate"
    merge_lora: bool = True  # merge adapters into the saved final model
    stage3_mmate: bool = False  # stage 3 also trains every M-MATE parameter (one end-to-end stage, an ablation)
    # --- bookkeeping
    save_every: int = 100  # checkpoint every N optimizer steps (and at the end)
    keep_checkpoints: int = 2
    log_every: int = 1
    tensorboard: bool = True

    def __post_init__(self):
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")
        if self.kd_tokens not in ("answer", "nonpad"):
            raise ValueError(f"kd_tokens must be 'answer' or 'nonpad', got {self.kd_tokens!r}")
        if self.hidden_layers not in ("final", "all"):
            raise ValueError(f"hidden_layers must be 'final' or 'all', got {self.hidden_layers!r}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError(f"Adam betas must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        if not self.new_param_lr_scale > 0:
            raise ValueError(f"new_param_lr_scale must be > 0, got {self.new_param_lr_scale}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")

    @classmethod
    def from_file(cls, path, **overrides) -> "DistillConfig":
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raw = json.loads(text)
        raw.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"{path}: unknown distillation settings {sorted(unknown)}")
        return cls(**raw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
