"""MMateConfig: every knob of the M-MATE block (LINMU.md §3), flat, saved beside every converted model."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

FUSION_KINDS = ("head", "channel", "gate")
INIT_KINDS = ("mimic", "mamba2")
SSD_IMPLS = ("auto", "torch", "fla")
ATTN_IMPLS = ("auto", "sdpa", "reference")


@dataclass
class MMateConfig:
    # --- Local-Swin (LINMU.md §3.2)
    window: tuple[int, int, int] = (2, 8, 8)  # 3-D window (t, h, w) over each span's grid; t clipped to T
    shift_windows: bool = True  # shift windows by half a window on odd layers (Swin)
    visual_windows: bool = True  # False: visual tokens attend like text (the identity setting)
    text_window: int = 128  # text tokens attend causally to this many previous tokens (itself included)
    n_sink: int = 0  # every query also sees the first n_sink tokens of its sequence
    # --- Flex-MA (LINMU.md §3.1)
    bidirectional: bool = True  # backward scan over each visual span, added at visual positions
    rotary_major_scan: bool = True  # rotate the in-span scan order with the layer index; False: always (T,H,W)
    d_conv: int = 4  # width of the depthwise causal conv over the x/B/C channels
    init: str = "mimic"  # "mimic": identity conv tap, zero W_dt (starts as decayed linear attention); "mamba2"
    dt_min: float = 1e-3  # dt_bias init: softplus^-1 of log-uniform samples in [dt_min, dt_max]
    dt_max: float = 1e-1
    A_init_range: tuple[float, float] = (1.0, 16.0)  # "mamba2" init: A = -U[lo, hi]; "mimic" uses A = -1
    norm_eps: float = 1e-6  # gated RMSNorm epsilon
    chunk_size: int = 64  # SSD chunk length
    # --- fusion (LINMU.md §3): out = w_flex * FlexMA(u) + w_swin * LocalSwin(u)
    use_flex: bool = True  # False: Local-Swin only (ablation)
    use_swin: bool = True  # False: Flex-MA only (ablation)
    fusion: str = "head"  # "head": a weight per attention head and branch; "channel": per hidden channel;
    #                       "gate": per-token sigmoid gate g*flex + (1-g)*swin
    fusion_init_flex: float = 0.5
    fusion_init_swin: float = 0.5
    # --- kernels and limits
    ssd_impl: str = "auto"  # "auto" | "torch" | "fla"
    attn_impl: str = "auto"  # "auto" | "sdpa" | "reference"
    max_seq_len: int | None = None  # refuse longer sequences with a clear error; None: no limit

    def __post_init__(self):
        self.window = tuple(int(w) for w in self.window)
        self.A_init_range = tuple(float(a) for a in self.A_init_range)
        if len(self.window) != 3 or min(self.window) < 1:
            raise ValueError(f"window must be three positive sizes (t, h, w), got {self.window}")
        if self.text_window < 1:
            raise ValueError(f"text_window must be >= 1, got {self.text_window}")
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
        if self.d_conv < 1:
            raise ValueError(f"d_conv must be >= 1, got {self.d_conv}")
        for name, value, allowed in [
            ("fusion", self.fusion, FUSION_KINDS), ("init", self.init, INIT_KINDS),
            ("ssd_impl", self.ssd_impl, SSD_IMPLS), ("attn_impl", self.attn_impl, ATTN_IMPLS),
        ]:
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")
        if not (self.use_flex or self.use_swin):
            raise ValueError("at least one of use_flex / use_swin must be True")

    @classmethod
    def identity(cls, **overrides) -> "MMateConfig":
        """The identity setting (LINMU.md §3.3): the block computes exactly the teacher's causal attention."""
        kw = dict(fusion_init_flex=0.0, fusion_init_swin=1.0, visual_windows=False, text_window=2**31 - 1)
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MMateConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown MMateConfig fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
