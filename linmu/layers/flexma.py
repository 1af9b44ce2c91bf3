"""Flex-MA: the bidirectional, masked Mamba2 (SSD) branch of the M-MATE block (LINMU.md §3.1).

Projections are seeded from the teacher attention: C <- W_Q, B <- W_K, x <- W_V (biases included), and the output
projection <- W_O. One SSM head per attention head with P = N = head_dim; under GQA x and B keep the key/value width
through the short conv and are repeated across the query group afterwards.

A forward scan runs over the whole sequence. A backward scan runs over each visual span alone (state reset at span
borders, text contributes nothing) and is added at visual positions only, so a text token stays exactly causal and a
visual token of span S sees everything before S and all of S. Inside each span the tokens are visited in a scan
order that rotates with the layer index (Rotary Major-Scan).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MMateConfig
from ..layout import TokenLayout
from ..ops.ssd import ssd_scan, ssd_step


@dataclass
class FlexMAState:
    """Decode state of the forward direction: fixed size whatever the context length."""

    conv: torch.Tensor  # (B, conv_channels, d_conv - 1) raw x/B/C inputs of the last d_conv - 1 tokens
    ssm: torch.Tensor  # (B, H, P, N) float32


def _inv_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class FlexMA(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_idx: int,
        config: MMateConfig,
        qkv_bias: bool = True,
        o_bias: bool = False,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        H, G, P = num_heads, num_kv_heads, head_dim
        fk = dict(dtype=dtype, device=device)
        self.q_proj = nn.Linear(hidden_size, H * P, bias=qkv_bias, **fk)  # -> C
        self.k_proj = nn.Linear(hidden_size, G * P, bias=qkv_bias, **fk)  # -> B
        self.v_proj = nn.Linear(hidden_size, G * P, bias=qkv_bias, **fk)  # -> x
        self.o_proj = nn.Linear(H * P, hidden_size, bias=o_bias, **fk)
        # channels of the short conv: x (G*P), B (G*N), C (H*N) with N = P
        self.conv_channels = 2 * G * P + H * P
        K = config.d_conv
        self.conv_fwd = nn.Parameter(torch.empty(self.conv_channels, K, **fk))
        self.conv_fwd_bias = nn.Parameter(torch.empty(self.conv_channels, **fk))
        self.dt_proj = nn.Linear(hidden_size, H, bias=False, **fk)  # W_dt, shared by both directions
        self.dt_bias_fwd = nn.Parameter(torch.empty(H, **fk))
        self.A_log_fwd = nn.Parameter(torch.empty(H, **fk))
        self.D_fwd = nn.Parameter(torch.empty(H, **fk))
        if config.bidirectional:
            self.conv_bwd = nn.Parameter(torch.empty(self.conv_channels, K, **fk))
            self.conv_bwd_bias = nn.Parameter(torch.empty(self.conv_channels, **fk))
            self.dt_bias_bwd = nn.Parameter(torch.empty(H, **fk))
            self.A_log_bwd = nn.Parameter(torch.empty(H, **fk))
            self.D_bwd = nn.Parameter(torch.empty(H, **fk))
        self.z_proj = nn.Linear(hidden_size, H * P, bias=True, **fk)  # output gate
        self.norm_weight = nn.Parameter(torch.ones(H * P, **fk))  # gated RMSNorm, per head groups
        self.reset_ssm_parameters()

    @classmethod
    def from_attention(cls, attn: nn.Module, layer_idx: int, config: MMateConfig) -> "FlexMA":
        """Seed from a transformers attention module (q/k/v/o_proj, biases, GQA)."""
        from .source import attention_dims

        dims = attention_dims(attn)
        w = attn.q_proj.weight
        m = cls(dims.hidden_size, dims.num_heads, dims.num_kv_heads, dims.head_dim, layer_idx, config,
                qkv_bias=attn.q_proj.bias is not None, o_bias=attn.o_proj.bias is not None,
                dtype=w.dtype, device=w.device)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(m, name, copy.deepcopy(getattr(attn, name)))
        return m

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """Initialise the parameters that the teacher does not have (LINMU.md §3.1)."""
        cfg, H = self.config, self.num_heads
        dev = self.dt_bias_fwd.device
        dirs = ["fwd", "bwd"] if cfg.bidirectional else ["fwd"]
        for d in dirs:
            conv, conv_b = getattr(self, f"conv_{d}"), getattr(self, f"conv_{d}_bias")
            dt = torch.exp(torch.rand(H, device=dev) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
            getattr(self, f"dt_bias_{d}").copy_(_inv_softplus(dt.clamp(min=1e-4)))
            if cfg.init == "mimic":
                # identity tap on the current token: the conv passes x/B/C through, so with zero W_dt the branch
                # starts as linear attention with a slow per-head decay (A = -1, dt ~ 1e-2)
                conv.zero_()
                conv[:, -1] = 1.0
                conv_b.zero_()
                getattr(self, f"A_log_{d}").zero_()
                getattr(self, f"D_{d}").zero_()
            else:
                bound = 1 / math.sqrt(conv.shape[1])
                conv.uniform_(-bound, bound)
                conv_b.uniform_(-bound, bound)
                lo, hi = cfg.A_init_range
                getattr(self, f"A_log_{d}").copy_(torch.log(torch.empty(H, device=dev).uniform_(lo, hi)))
                getattr(self, f"D_{d}").fill_(1.0)
        if cfg.init == "mimic":
            self.dt_proj.weight.zero_()
            # constant gate silu(1) so the normalised linear-attention output passes unchanged at the start
            self.z_proj.weight.zero_()
            self.z_proj.bias.fill_(1.0)
        else:
            nn.init.kaiming_uniform_(self.dt_proj.weight, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.z_proj.weight, a=math.sqrt(5))
            self.z_proj.bias.zero_()
        self.norm_weight.fill_(1.0)

    # ------------------------------------------------------------------ pieces shared by forward and step
    def _split_xbc(self, xbc: torch.Tensor):
        """(..., conv_channels) -> x, B at query heads (repeated over the GQA group) and C: each (..., H, P)."""
        G, H, P = self.num_kv_heads, self.num_heads, self.head_dim
        x, b, c = xbc.split([G * P, G * P, H * P], dim=-1)
        rep = H // G
        x = x.unflatten(-1, (G, P)).repeat_interleave(rep, dim=-2)
        b = b.unflatten(-1, (G, P)).repeat_interleave(rep, dim=-2)
        return x, b, c.unflatten(-1, (H, P))

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Mamba2's gated RMSNorm, one group per head: norm(y * silu(z)) * weight. y, z (..., H, P)."""
        dtype = y.dtype
        y = y.float() * F.silu(z.float())
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.config.norm_eps)
        return (y.flatten(-2) * self.norm_weight.float()).to(dtype)

    def _ssd_impl(self) -> str:
        return self.config.ssd_impl

    # ------------------------------------------------------------------ full sequence
    def forward(self, u: torch.Tensor, layout: TokenLayout, return_state: bool = False):
        """u (B, L, hidden) normed layer input -> core output (B, L, H*P) before ``o_proj`` [, FlexMAState]."""
        cfg = self.config
        Bsz, L, _ = u.shape
        H, P, K = self.num_heads, self.head_dim, cfg.d_conv
        perm = layout.scan_permutation(self.layer_idx, cfg.rotary_major_scan) if layout.has_visual else None
        if perm is not None:
            u = u.gather(1, perm[0].unsqueeze(-1).expand_as(u))
        xbc = torch.cat([self.v_proj(u), self.k_proj(u), self.q_proj(u)], dim=-1)  # (B, L, conv_channels)
        dt_raw = self.dt_proj(u)  # (B, L, H)
        z = self.z_proj(u).unflatten(-1, (H, P))
        valid = layout.key_valid  # padding is text, so the permutation leaves it in place
        if valid is not None:
            # padded tokens feed nothing into the conv or the state (dt = 0 keeps the state unchanged)
            xbc = xbc * valid.unsqueeze(-1).to(xbc.dtype)

        # forward direction: causal depthwise conv over the whole sequence, then the scan
        conv_in = xbc.transpose(1, 2)  # (B, C, L)
        xbc_f = F.conv1d(F.pad(conv_in, (K - 1, 0)), self.conv_fwd.unsqueeze(1), self.conv_fwd_bias,
                         groups=self.conv_channels).transpose(1, 2)
        x, b, c = self._split_xbc(F.silu(xbc_f))
        dt = F.softplus(dt_raw.float() + self.dt_bias_fwd.float())
        if valid is not None:
            dt = dt * valid.unsqueeze(-1)
        A = -torch.exp(self.A_log_fwd.float())
        scan = ssd_scan(x, dt, A, b, c, self.D_fwd, return_final_state=return_state,
                        chunk_size=cfg.chunk_size, impl=self._ssd_impl())
        y, state = scan if return_state else (scan, None)

        if cfg.bidirectional and layout.has_visual:
            y = y + self._backward_spans(xbc, dt_raw, layout)

        core = self._gated_norm(y, z)
        if perm is not None:
            core = core.gather(1, perm[1].unsqueeze(-1).expand_as(core))
        if not return_state:
            return core
        # the raw inputs of the last K-1 tokens (zeros where the sequence is shorter) continue the conv in step()
        conv_state = F.pad(conv_in, (K - 1, 0))[..., conv_in.shape[-1]:]
        return core, FlexMAState(conv=conv_state.contiguous(), ssm=state)

    def _backward_spans(self, xbc: torch.Tensor, dt_raw: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Backward scan over each visual span alone, scattered back to visual positions (zeros elsewhere).

        xbc (B, L, C) raw (pre-conv) inputs in scan order; returns (B, L, H, P).
        """
        cfg = self.config
        Bsz, L, C = xbc.shape
        H, P, K = self.num_heads, self.head_dim, cfg.d_conv
        seg = layout.span_segments()
        raw = xbc.reshape(Bsz * L, C)[seg.index]  # (Nv, C) packed spans in scan order
        # anti-causal depthwise conv inside each span: tap K-1 is the token itself, tap K-1-j the token j steps
        # later in scan order, dropped where that token lies beyond the span's end
        out = raw * self.conv_bwd[:, K - 1] + self.conv_bwd_bias
        for j in range(1, K):
            shifted = F.pad(raw[j:], (0, 0, 0, j))
            keep = (seg.to_end >= j).unsqueeze(-1).to(raw.dtype)
            out = out + shifted * keep * self.conv_bwd[:, K - 1 - j]
        x, b, c = self._split_xbc(F.silu(out))  # (Nv, H, P)
        dt = F.softplus(dt_raw.reshape(Bsz * L, H)[seg.index].float() + self.dt_bias_bwd.float())
        A = -torch.exp(self.A_log_bwd.float())
        y = ssd_scan(x[None], dt[None], A, b[None], c[None], None, cu_seqlens=seg.cu_seqlens, reverse=True,
                     chunk_size=cfg.chunk_size, impl=self._ssd_impl())[0]
        # the inclusive backward scan counts the token itself, which the forward scan already did: remove that
        # diagonal term dt * (C.B) * x, then add the backward skip D_bwd * x
        diag = dt * (c.float() * b.float()).sum(-1)  # (Nv, H)
        y = (y.float() - diag.unsqueeze(-1) * x.float() + self.D_bwd.float()[:, None] * x.float()).to(y.dtype)
        full = torch.zeros(Bsz * L, H, P, dtype=y.dtype, device=y.device)
        return full.index_add(0, seg.index, y).view(Bsz, L, H, P)

    # ------------------------------------------------------------------ one token
    def step(self, u: torch.Tensor, state: FlexMAState) -> tuple[torch.Tensor, FlexMAState]:
        """u (B, 1, hidden), a new text token -> core (B, 1, H*P), new state. O(1) in the context length."""
        H, P = self.num_heads, self.head_dim
        u1 = u[:, 0]
        xbc = torch.cat([self.v_proj(u1), self.k_proj(u1), self.q_proj(u1)], dim=-1)  # (B, C)
        window = torch.cat([state.conv, xbc.unsqueeze(-1)], dim=-1)  # (B, C, K)
        xbc_f = (window * self.conv_fwd).sum(-1) + self.conv_fwd_bias
        x, b, c = self._split_xbc(F.silu(xbc_f))
        dt = F.softplus(self.dt_proj(u1).float() + self.dt_bias_fwd.float())
        A = -torch.exp(self.A_log_fwd.float())
        # a decode cache's state (LinMUCache marks it) is updated in place: no state-sized temporaries or copies
        y, ssm = ssd_step(state.ssm, x, dt, A, b, c, self.D_fwd,
                          out=state.ssm if getattr(state, "update_in_place", False) else None)
        z = self.z_proj(u1).unflatten(-1, (H, P))
        core = self._gated_norm(y, z).unsqueeze(1)
        return core, FlexMAState(conv=window[..., 1:], ssm=ssm)
