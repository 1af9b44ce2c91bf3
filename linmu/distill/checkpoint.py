"""Checkpoints of a distillation run: atomic, resumable, trainable weights only.

A checkpoint directory ``checkpoint-<step>`` holds what accelerate's ``save_state`` writes (optimizer, RNG states of
every process; the model file reduced to the *trainable* tensors, as safetensors) plus ``trainer_state.json`` (step,
epoch, position in the epoch, skip counts). It is written under a temporary name and renamed when complete, so a run
killed at any moment leaves either the previous checkpoint or the new one, never a partial one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path


STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    tokens: int = 0  # non-padding tokens seen
    skipped: dict = field(default_factory=dict)  # bad samples per reason

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = [p for p in checkpoints(output_dir) if (p / STATE_FILE).is_file()]
    return found[-1] if found else None


def install_trainable_only_hooks(accelerator, model) -> None:
    """Make accelerate's save_state/load_state store only the trainable tensors of ``model``.

    Frozen tensors (the teacher-seeded bulk of a 7B model) are rebuilt from the stage's starting point on resume,
    so checkpoints stay small. Not used under FSDP, whose sharded state accelerate saves itself.
    """
    from safetensors.torch import load_file

    def trainable_names():
        return {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}

    def save_hook(models, weights, output_dir):
        keep = trainable_names()
        for i, w in enumerate(weights):
            weights[i] = {k: v for k, v in w.items() if k in keep}

    def load_hook(models, input_dir):
        path = Path(input_dir) / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {input_dir} has no model.safetensors")
        state = load_file(str(path))
        target = accelerator.unwrap_model(model)
        missing = trainable_names() - set(state)
        if missing:
            raise ValueError(f"checkpoint {input_dir} lacks trainable tensors {sorted(missing)[:5]}: "
                             "it was written by a different stage or model")
        target.load_state_dict(state, strict=False)
        models.clear()  # loaded here; accelerate must not load the (partial) file again

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir: Path, state: TrainerState, config: dict, keep: int) -> Path:
    """Write ``checkpoint-<step>`` atomically (temporary directory, then rename) and prune old ones."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{state.step}"
    tmp = output_dir / f".tmp-checkpoint-{state.step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(state.to_json())
        (tmp / "distill_config.json").write_text(json.dumps(config, indent=2))
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> TrainerState:
    accelerator.load_state(str(path))
    raw = json.loads((Path(path) / STATE_FILE).read_text())
    return TrainerState(**raw)
