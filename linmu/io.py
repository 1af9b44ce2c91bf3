"""`linmu.load`: rebuild a saved LinMU model from its directory alone (no teacher checkpoint needed).

``model.save_pretrained(dir)`` is transformers' own: safetensors weights and a ``config.json`` that carries the
teacher family's config plus ``linmu`` (the MMateConfig) and ``linmu_family``. Loading checks that the directory is
what it claims before trusting it, and names the problem otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory holding a saved model")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a saved model directory")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e}): the checkpoint is corrupt") from e


def is_linmu_dir(path) -> bool:
    try:
        return "linmu" in _read_config(Path(path))
    except (FileNotFoundError, ValueError):
        return False


def _check_weights(path: Path) -> None:
    """Open every safetensors file's header and check the data size, so truncation is caught up front."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights file")
    for f in files:
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if n <= 0 or 8 + n > size:
                    raise ValueError("header length beyond end of file")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end != size:
                raise ValueError(f"file holds {size} bytes, its header describes {8 + n + end}")
        except (ValueError, KeyError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"weights file {f} is truncated or corrupt: {e}") from e


def load(path, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """Load a LinMU model saved with ``save_pretrained`` (or a supported teacher checkpoint, as its transformers
    class). Example::

        student = linmu.load("runs/stage3/final", dtype=torch.bfloat16, device="cuda")
    """
    from .convert import student_class

    path = Path(path)
    raw = _read_config(path)
    if "linmu" not in raw:
        from .convert import FAMILIES

        arch = (raw.get("architectures") or [raw.get("model_type", "unknown")])[0]
        if arch in FAMILIES:
            # a teacher of a supported family: load it as the transformers model it is (for eval / comparison)
            model = load_teacher(path, dtype=dtype)
            return (model.to(device) if device is not None else model).eval()
        raise ValueError(f"{path} holds a {arch} checkpoint of another architecture: neither a LinMU model (no "
                         f"'linmu' section in config.json) nor a supported teacher ({', '.join(sorted(FAMILIES))})")
    cls = student_class(raw.get("linmu_family", ""))
    _check_weights(path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model, info = cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
    missing, unexpected = info.get("missing_keys", []), info.get("unexpected_keys", [])
    mismatched = info.get("mismatched_keys", [])
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path} does not match the {cls.__name__} architecture its config describes: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}, mismatched {list(mismatched)[:5]}"
        )
    if device is not None:
        model.to(device)
    return model.eval()


def load_teacher(path, dtype: torch.dtype | None = None):
    """Load a teacher checkpoint directory with the transformers class its config names (a supported family)."""
    import transformers

    from .convert import FAMILIES

    raw = _read_config(Path(path))
    if "linmu" in raw:
        raise ValueError(f"{path} is a LinMU model, not a teacher checkpoint: load it with linmu.load")
    arch = (raw.get("architectures") or [None])[0]
    if arch not in FAMILIES:
        raise ValueError(f"{path} holds a {arch} checkpoint: unsupported model family; supported: "
                         f"{', '.join(sorted(FAMILIES))}")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return getattr(transformers, arch).from_pretrained(str(path), **kwargs)
