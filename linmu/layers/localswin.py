"""Local-Swin: the local window-attention branch of the M-MATE block (LINMU.md §3.2).

Its own copy of the teacher's q/k/v/o projections (biases, GQA and optional q/k norms included) and the teacher's
rotary positions unchanged (1-D RoPE or Qwen's 3-D M-RoPE arrive as precomputed ``cos, sin``). Visual tokens attend
bidirectionally inside 3-D windows of their span, shifted by half a window on odd layers; text tokens attend causally
to the previous ``text_window`` tokens; optional sinks. Cost O(L x window).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import MMateConfig
from ..layout import TokenLayout
from ..ops.rope import apply_rope
from ..ops.window_attention import build_window_partition, local_window_attention, window_decode_attention


@dataclass
class SwinState:
    """Fixed-size decode state: ``n_sink`` sink slots followed by a ring of the last ``ring`` keys/values."""

    k: torch.Tensor  # (B, n_sink + ring, Hkv, D), keys after RoPE
    v: torch.Tensor  # (B, n_sink + ring, Hkv, D)
    valid: torch.Tensor  # (B, n_sink + ring) bool: slot holds a real (non-padding) token
    pos: torch.Tensor  # () long: absolute position of the next token


class LocalSwin(nn.Module):
    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim, layer_idx, config: MMateConfig,
                 scaling=None, qkv_bias=True, o_bias=False, dtype=None, device=None):
        super().__init__()
        fk = dict(dtype=dtype, device=device)
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling = scaling if scaling is not None else head_dim**-0.5
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias, **fk)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias, **fk)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias, **fk)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias, **fk)
        # per-head q/k norms of families that have them (e.g. Qwen3), copied from the teacher
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None

    @classmethod
    def from_attention(cls, attn: nn.Module, layer_idx: int, config: MMateConfig) -> "LocalSwin":
        from .source import attention_dims

        d = attention_dims(attn)
        w = attn.q_proj.weight
        m = cls(d.hidden_size, d.num_heads, d.num_kv_heads, d.head_dim, layer_idx, config, scaling=d.scaling,
                qkv_bias=attn.q_proj.bias is not None, o_bias=attn.o_proj.bias is not None,
                dtype=w.dtype, device=w.device)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(m, name, copy.deepcopy(getattr(attn, name)))
        for name in ("q_norm", "k_norm"):
            if isinstance(getattr(attn, name, None), nn.Module):
                setattr(m, name, copy.deepcopy(getattr(attn, name)))
        return m

    @property
    def shifted(self) -> bool:
        return self.config.shift_windows and self.layer_idx % 2 == 1

    def _qkv(self, u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, L, _ = u.shape
        q = self.q_proj(u).view(B, L, self.num_heads, self.head_dim)
        k = self.k_proj(u).view(B, L, self.num_kv_heads, self.head_dim)
        v = self.v_proj(u).view(B, L, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _window_ids(self, layout: TokenLayout) -> tuple[torch.Tensor, object]:
        """Window id per token (-1 = text) and its partition, memoised on the layout for all layers alike."""
        cfg = self.config
        if cfg.visual_windows and layout.has_visual:
            key = (cfg.window, self.shifted)
            ids = layout.window_ids(cfg.window, self.shifted).ids
        else:
            key = "text"
            ids = layout.memo(("text_ids",), lambda: torch.full(
                (layout.batch_size, layout.seq_len), -1, dtype=torch.long, device=layout.device))
        part = layout.memo(("partition", key), lambda: build_window_partition(ids, layout.key_valid))
        return ids, part

    def forward(self, u: torch.Tensor, layout: TokenLayout, position_embeddings, return_state: bool = False,
                state_capacity: int | None = None):
        """u (B, L, hidden) -> core (B, L, H*D) before ``o_proj`` [, SwinState].

        ``state_capacity`` bounds the ring when ``text_window`` is larger than any sequence will be (the identity
        setting): it must cover the prompt plus every token to be generated.
        """
        cfg = self.config
        cos, sin = position_embeddings
        q, k, v = self._qkv(u, cos, sin)
        ids, part = self._window_ids(layout)
        out = local_window_attention(q, k, v, ids, text_window=cfg.text_window, n_sink=cfg.n_sink,
                                     key_valid=layout.key_valid, scale=self.scaling, impl=cfg.attn_impl,
                                     partition=part)
        core = out.flatten(-2)
        if not return_state:
            return core
        return core, self._prefill_state(lambda pos: (k[:, pos], v[:, pos]), k.shape, k.dtype, layout.key_valid,
                                         state_capacity)

    def _prefill_state(self, kv_at, shape, dtype, key_valid, capacity):
        """Decode state after a prompt of ``shape = (B, L, Hkv, D)``; ``kv_at(pos)`` gives the rotated keys and the
        values of the positions ``pos`` (1-D long), each (B, len(pos), Hkv, D)."""
        cfg = self.config
        B, L, G, D = shape
        dev = key_valid.device if key_valid is not None else self.k_proj.weight.device
        ring = min(cfg.text_window, capacity) if capacity is not None else cfg.text_window
        if ring < cfg.text_window and L > ring:
            raise ValueError(f"prompt of {L} tokens exceeds the decode state capacity {ring}")
        valid = key_valid if key_valid is not None else torch.ones(B, L, dtype=torch.bool, device=dev)
        S = cfg.n_sink + ring
        kc = torch.zeros(B, S, G, D, dtype=dtype, device=dev)
        vc = torch.zeros(B, S, G, D, dtype=dtype, device=dev)
        vv = torch.zeros(B, S, dtype=torch.bool, device=dev)
        ns = min(cfg.n_sink, L)
        if ns > 0:
            s = torch.arange(ns, device=dev)
            kc[:, :ns], vc[:, :ns] = kv_at(s)
            vv[:, :ns] = valid[:, :ns]
        # the last `ring` positions p go to slot n_sink + p % ring, as step() will continue to write them
        p = torch.arange(max(0, L - ring), L, device=dev)
        slot = cfg.n_sink + p % ring
        kc[:, slot], vc[:, slot] = kv_at(p)
        vv[:, slot] = valid[:, p]
        return SwinState(kc, vc, vv, torch.tensor(L, dtype=torch.long, device=dev))

    def step(self, u: torch.Tensor, state: SwinState, position_embeddings) -> tuple[torch.Tensor, SwinState]:
        """u (B, 1, hidden), a new text token at ``state.pos`` -> core (B, 1, H*D), new state. No host sync."""
        cfg = self.config
        cos, sin = position_embeddings
        q, k, v = self._qkv(u, cos, sin)
        ns = cfg.n_sink
        ring = state.k.shape[1] - ns
        slot = (ns + state.pos % ring).view(1)
        if getattr(state, "update_in_place", False):
            # a decode cache's ring (LinMUCache marks it): write the one new slot, copy nothing
            kc, vc = state.k.index_copy_(1, slot, k), state.v.index_copy_(1, slot, v)
            vv = state.valid.index_fill_(1, slot, True)
        else:
            kc = state.k.index_copy(1, slot, k)
            vc = state.v.index_copy(1, slot, v)
            vv = state.valid.index_fill(1, slot, True)
        # a sink counts only once it has left the local range, otherwise it is already among the ring's keys
        sink_pos = torch.arange(ns, device=u.device)
        sink_on = sink_pos <= state.pos - cfg.text_window
        mask = torch.cat([vv[:, :ns] & sink_on, vv[:, ns:]], dim=1)
        out = window_decode_attention(q, kc, vc, mask, scale=self.scaling)
        return out.flatten(-2), SwinState(kc, vc, vv, state.pos + 1)
