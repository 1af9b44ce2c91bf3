"""The M-MATE block: Flex-MA beside Local-Swin, fused by learnable weights (LINMU.md §3).

``MMate`` is a drop-in replacement for a transformers decoder layer's ``self_attn``: same call signature, returns
``(out, None)``. It reads the token layout from the ``linmu_layout`` keyword (computed once per forward by the
model); without one, the sequence is treated as text.

Example::

    block = MMate.from_attention(layer.self_attn, layer_idx=0, config=MMateConfig())
    out, _ = block(u, position_embeddings=(cos, sin), linmu_layout=layout)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MMateConfig
from ..layout import TokenLayout
from ..ops.alignment import alignment_mse
from .flexma import FlexMA, FlexMAState
from .localswin import LocalSwin, SwinState
from .source import attention_dims


@dataclass
class MMateState:
    flex: FlexMAState | None
    swin: SwinState | None


class MMate(nn.Module):
    def __init__(self, flex: FlexMA | None, swin: LocalSwin | None, config: MMateConfig, layer_idx: int,
                 num_heads: int, head_dim: int, hidden_size: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = num_heads, head_dim
        self.flex = flex
        self.swin = swin
        ref = (flex or swin).o_proj.weight
        fk = dict(dtype=ref.dtype, device=ref.device)
        if config.fusion == "head":
            self.w_flex = nn.Parameter(torch.full((num_heads,), config.fusion_init_flex, **fk))
            self.w_swin = nn.Parameter(torch.full((num_heads,), config.fusion_init_swin, **fk))
        elif config.fusion == "channel":
            self.w_flex = nn.Parameter(torch.full((hidden_size,), config.fusion_init_flex, **fk))
            self.w_swin = nn.Parameter(torch.full((hidden_size,), config.fusion_init_swin, **fk))
        else:
            # per-token, per-head gate g: g * flex + (1 - g) * swin, starting at g = w_flex / (w_flex + w_swin)
            self.gate = nn.Linear(hidden_size, num_heads, bias=True, **fk)
            share = config.fusion_init_flex / max(config.fusion_init_flex + config.fusion_init_swin, 1e-6)
            share = min(max(share, 1e-4), 1 - 1e-4)
            with torch.no_grad():
                self.gate.weight.zero_()
                self.gate.bias.fill_(math.log(share / (1 - share)))

    @classmethod
    def from_attention(cls, attn: nn.Module, layer_idx: int, config: MMateConfig | None = None) -> "MMate":
        """Build from a teacher attention module; both branches get their own copies of its weights."""
        config = config or MMateConfig()
        d = attention_dims(attn)
        flex = FlexMA.from_attention(attn, layer_idx, config) if config.use_flex else None
        swin = LocalSwin.from_attention(attn, layer_idx, config) if config.use_swin else None
        return cls(flex, swin, config, layer_idx, d.num_heads, d.head_dim, d.hidden_size)

    # ------------------------------------------------------------------ distillation hooks
    def attach_teacher(self, attn: nn.Module | None) -> None:
        """Teacher forcing (LINMU.md §5, stages 1-2): keep the frozen teacher attention this block replaces.

        While attached, ``forward`` runs both, stores the MSE between them in ``self.alignment_loss`` (over
        non-padding positions) and returns the *teacher's* output, so every layer sees the teacher's input. The
        teacher module is held outside the module tree (not a submodule): it stays the teacher's, is not saved with
        the student and is not touched by the student's optimizer or wrappers.
        """
        self.__dict__["_teacher_attn"] = attn
        self.alignment_loss = None

    @property
    def teacher_attn(self) -> nn.Module | None:
        return self.__dict__.get("_teacher_attn")

    # "flex_only": the block's output is Flex-MA alone, unweighted (stage 1 with Local-Swin absent); None: fused
    branch_override: str | None = None

    # ------------------------------------------------------------------ fusion
    def _fuse(self, u: torch.Tensor, core_f: torch.Tensor | None, core_s: torch.Tensor | None) -> torch.Tensor:
        """Combine the branches' pre-projection outputs (B, L, H*P) into the block output (B, L, hidden)."""
        if self.branch_override == "flex_only":
            return self.flex.o_proj(core_f)
        fusion = self.config.fusion
        if fusion == "gate":
            g = torch.sigmoid(self.gate(u)).unsqueeze(-1)  # (B, L, H, 1)
            weights = (g, 1 - g)
        elif fusion == "head":
            weights = (self.w_flex[:, None], self.w_swin[:, None])  # (H, 1)
        else:
            weights = (self.w_flex, self.w_swin)  # (hidden,)
        out = 0
        for core, weight, branch in ((core_f, weights[0], self.flex), (core_s, weights[1], self.swin)):
            if core is None:
                continue
            if fusion == "channel":
                out = out + weight * branch.o_proj(core)
            else:
                # per-head weights act on the head outputs before the branch's output projection; its bias (if
                # any) is scaled by the mean head weight, so equal weights w give exactly w * o_proj(core)
                heads = (core.unflatten(-1, (self.num_heads, self.head_dim)) * weight).flatten(-2)
                out = out + F.linear(heads, branch.o_proj.weight)
                if branch.o_proj.bias is not None:
                    out = out + weight.mean(-2) * branch.o_proj.bias
        return out

    def _check_len(self, L: int):
        limit = self.config.max_seq_len
        if limit is not None and L > limit:
            raise ValueError(f"sequence of {L} tokens is over the configured limit max_seq_len={limit}")

    # ------------------------------------------------------------------ transformers drop-in
    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, past_key_values=None,
                position_embeddings=None, linmu_layout: TokenLayout | None = None, **kwargs):
        if position_embeddings is None and self.swin is not None:
            raise ValueError("MMate needs position_embeddings=(cos, sin) from the decoder's rotary module")
        B, L, _ = hidden_states.shape
        cache = past_key_values.linmu_layer(self.layer_idx) if hasattr(past_key_values, "linmu_layer") else None
        if cache is not None and cache.seen > 0:
            return self._decode(hidden_states, cache, position_embeddings), None
        layout = linmu_layout if linmu_layout is not None else TokenLayout.text_only(B, L, device=hidden_states.device)
        if (layout.batch_size, layout.seq_len) != (B, L):
            raise ValueError(f"token layout is for shape {(layout.batch_size, layout.seq_len)}, input is {(B, L)}")
        self._check_len(L)
        if self.teacher_attn is not None:
            return self._teacher_forced(hidden_states, attention_mask, position_ids, position_embeddings, layout,
                                        kwargs)
        if cache is not None:
            out, state = self.prefill(hidden_states, layout, position_embeddings, state_capacity=cache.ring_capacity)
            cache.store(state)
            cache.seen = L
            return out, None
        core_f = self.flex(hidden_states, layout) if self.flex is not None else None
        core_s = self.swin(hidden_states, layout, position_embeddings) if self.swin is not None else None
        return self._fuse(hidden_states, core_f, core_s), None

    def _teacher_forced(self, hidden_states, attention_mask, position_ids, position_embeddings, layout, kwargs):
        with torch.no_grad():
            target, _ = self.teacher_attn(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                          position_embeddings=position_embeddings, **kwargs)
        if self.branch_override == "flex_only":
            core_s = None
        else:
            core_s = self.swin(hidden_states, layout, position_embeddings) if self.swin is not None else None
        core_f = self.flex(hidden_states, layout) if self.flex is not None else None
        student = self._fuse(hidden_states, core_f, core_s)
        self.alignment_loss = alignment_mse(student, target, layout.key_valid)
        return target, None

    def _decode(self, hidden_states, cache, position_embeddings):
        """New tokens after a prefill (all text): one recurrent step each, state updated in the cache in place."""
        L = hidden_states.shape[1]
        self._check_len(cache.seen + L)
        cos, sin = position_embeddings if position_embeddings is not None else (None, None)
        outs = []
        for t in range(L):
            pe = (cos[:, t:t + 1], sin[:, t:t + 1]) if cos is not None else None
            out, state = self.step(hidden_states[:, t:t + 1], cache.state, pe)
            cache.store(state)
            outs.append(out)
        cache.seen += L
        return outs[0] if L == 1 else torch.cat(outs, 1)

    # ------------------------------------------------------------------ inference
    def prefill(self, hidden_states, layout: TokenLayout, position_embeddings, state_capacity: int | None = None):
        """Full forward that also returns the fixed-size decode state."""
        self._check_len(hidden_states.shape[1])
        core_f = core_s = fs = ss = None
        if self.flex is not None:
            core_f, fs = self.flex(hidden_states, layout, return_state=True)
        if self.swin is not None:
            core_s, ss = self.swin(hidden_states, layout, position_embeddings, return_state=True,
                                   state_capacity=state_capacity)
        return self._fuse(hidden_states, core_f, core_s), MMateState(fs, ss)

    def step(self, hidden_states, state: MMateState, position_embeddings):
        """One new text token (B, 1, hidden) -> (B, 1, hidden), new state."""
        core_f = core_s = fs = ss = None
        if self.flex is not None:
            core_f, fs = self.flex.step(hidden_states, state.flex)
        if self.swin is not None:
            core_s, ss = self.swin.step(hidden_states, state.swin, position_embeddings)
        return self._fuse(hidden_states, core_f, core_s), MMateState(fs, ss)
