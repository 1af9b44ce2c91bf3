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
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MMateConfig
from ..layout import TokenLayout
from ..ops.alignment import alignment_mse
from ..ops.ssd import ssd_available_impls, ssd_scan
from ..ops.window_attention import window_attention_sorted
from . import fused as fk
from .flexma import FlexMA, FlexMAState
from .localswin import LocalSwin, SwinState
from .source import attention_dims


# Set when the fused prefill failed on this machine under fused="auto" (see MMate._try_fused).
_FUSED_FAILED: str | None = None


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

    # weight of a text position relative to a visual one in the alignment loss (``DistillConfig.align_text_weight``)
    align_text_weight: float = 1.0

    @property
    def teacher_attn(self) -> nn.Module | None:
        return self.__dict__.get("_teacher_attn")

    # "flex_only": the block's output is Flex-MA alone, unweighted (stage 1 with Local-Swin absent); None: fused
    branch_override: str | None = None

    # Fused prefill (see _fused_forward): "auto" uses it for CUDA inference when fla-core and Triton are there,
    # "always" whenever the block's settings allow it (on CPU through the kernels' PyTorch references and the torch
    # scan; for tests), "never" keeps the reference path. LINMU_FUSED_PREFILL=never|always|auto sets the default.
    fused: str = os.environ.get("LINMU_FUSED_PREFILL", "auto")
    # Within the fused prefill: one GEMM for all input projections of both branches and one for both output
    # projections (False: one GEMM per projection). Off until `layer_scaling --fused-gemms` shows it is faster.
    fuse_gemms: bool = False

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
        if self._use_fused(hidden_states):
            fused = self._try_fused(hidden_states, layout, position_embeddings)
            if fused is not None:
                return fused[0], None
        core_f = self.flex(hidden_states, layout) if self.flex is not None else None
        core_s = self.swin(hidden_states, layout, position_embeddings) if self.swin is not None else None
        return self._fuse(hidden_states, core_f, core_s), None

    # ------------------------------------------------------------------ fused prefill
    def _use_fused(self, u: torch.Tensor) -> bool:
        """Whether forward/prefill take the fused path (same math as the reference path, no autograd)."""
        if self.fused not in ("auto", "always", "never"):
            raise ValueError(f"MMate.fused must be 'auto', 'always' or 'never', got {self.fused!r}")
        cfg = self.config
        if self.fused == "never" or self.teacher_attn is not None or self.branch_override is not None:
            return False
        if cfg.attn_impl == "reference":
            return False
        if self.head_dim & (self.head_dim - 1) or self.head_dim < 2:
            return False  # the kernels tile a head in powers of two
        if torch.is_grad_enabled() and (u.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        if self.fused == "always":
            return True
        return (_FUSED_FAILED is None and u.is_cuda and u.dtype in (torch.bfloat16, torch.float16, torch.float32)
                and fk.triton_available() and (self.flex is None or (cfg.ssd_impl != "torch" and "fla" in ssd_available_impls(u.device))))

    def _try_fused(self, *args):
        """The fused prefill; under ``fused="auto"`` a failure of its kernels on this machine (e.g. a Triton build
        error on an unsupported GPU) is reported once and the reference path is used from then on."""
        global _FUSED_FAILED
        try:
            return self._fused_forward(*args)
        except Exception as exc:
            if self.fused == "always" or isinstance(exc, torch.OutOfMemoryError):
                raise
            _FUSED_FAILED = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"M-MATE fused prefill failed ({_FUSED_FAILED}); using the reference path from now on",
                          RuntimeWarning, stacklevel=3)
            return None

    def _input_projections(self, u2: torch.Tensor) -> dict[str, torch.Tensor]:
        """All input projections of both branches, as column views of one GEMM output (or separate GEMMs)."""
        lins: list[tuple[str, nn.Linear]] = []
        if self.flex is not None:
            f = self.flex
            lins += [("f_x", f.v_proj), ("f_b", f.k_proj), ("f_c", f.q_proj)]
        if self.swin is not None:
            s = self.swin
            lins += [("s_q", s.q_proj), ("s_k", s.k_proj), ("s_v", s.v_proj)]
        if self.flex is not None:
            lins += [("f_z", self.flex.z_proj), ("f_dt", self.flex.dt_proj)]
        if not self.fuse_gemms:
            return {name: F.linear(u2, lin.weight, lin.bias) for name, lin in lins}
        weights = [lin.weight for _, lin in lins]
        biases = [lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for _, lin in lins]
        width = sum(w.shape[0] for w in weights)
        pad = (-width) % 8  # keep the output's row stride 16-byte aligned for the GEMM
        if pad:
            weights.append(weights[0].new_zeros(pad, u2.shape[1]))
            biases.append(biases[0].new_zeros(pad))
        proj = F.linear(u2, torch.cat(weights), torch.cat(biases))
        out, col = {}, 0
        for name, lin in lins:
            out[name] = proj[:, col:col + lin.out_features]
            col += lin.out_features
        if self.flex is not None:  # x, B, C are adjacent columns: the conv input needs no copy
            out["f_xbc"] = proj[:, :self.flex.conv_channels]
        return out

    def _output_weights(self) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The branches' output projection weights with the fusion weights folded in (head: per input column
        block, channel: per output row; gate: unscaled, the caller scales the cores per token), in the order of
        [core_flex | core_swin], and the combined bias (the gate's per-token bias is the caller's too)."""
        ws, bias = [], None
        for branch, name in ((self.flex, "w_flex"), (self.swin, "w_swin")):
            if branch is None:
                continue
            W = branch.o_proj.weight
            if self.config.fusion == "gate":  # per-token: applied to the cores by the caller
                ws.append(W)
                continue
            w = getattr(self, name)
            if self.config.fusion == "head":
                ws.append(W * w.repeat_interleave(self.head_dim).to(W.dtype)[None, :])
                b = None if branch.o_proj.bias is None else w.mean() * branch.o_proj.bias
            else:
                ws.append(W * w.to(W.dtype)[:, None])
                b = None if branch.o_proj.bias is None else w * branch.o_proj.bias
            if b is not None:
                bias = b if bias is None else bias + b
        return ws, bias

    def _scan(self, q, k, v, g, x, dt, A, cu_seqlens=None, cu_seqlens_cpu=None, want_state=False):
        """One simple-GLA scan (q = C, k = B, v = dt x, g = dt A, scale 1): fla on CUDA, else the torch SSD.

        q/k/v (Bn, T, H, P), g and dt (Bn, T, H), x (Bn, T, G, P) at key/value width. Returns (y, state or None)
        with y (Bn, T, H, P) and state (Bn or segments, H, P, N) float32.
        """
        if q.is_cuda and self.config.ssd_impl != "torch" and "fla" in ssd_available_impls(q.device):
            from fla.ops.simple_gla import chunk_simple_gla

            o, ht = chunk_simple_gla(q, k, v, g=g, scale=1.0, output_final_state=want_state, cu_seqlens=cu_seqlens,
                                     cu_seqlens_cpu=cu_seqlens_cpu)
            return o, (None if ht is None else ht.transpose(-1, -2))
        xh = x.repeat_interleave(q.shape[2] // x.shape[2], dim=2)
        y, state = ssd_scan(xh, dt, A, k, q, None, return_final_state=True, cu_seqlens=cu_seqlens,
                            chunk_size=self.config.chunk_size, impl="torch")
        return y.to(q.dtype), (state if want_state else None)

    @torch.no_grad()
    def _fused_forward(self, u: torch.Tensor, layout: TokenLayout, position_embeddings, return_state: bool = False,
                       state_capacity: int | None = None):
        """The block's prefill in a few large kernels; the same function as the reference path.

        Input projections (one GEMM for both branches with ``fuse_gemms``); Flex-MA's conv, SiLU, scan order and GQA repeat in
        one pass per scan direction (:func:`fused.conv_scan_inputs`), fla's simple-GLA scans, both directions +
        gated RMSNorm in one pass written beside Local-Swin's output (:func:`fused.combine_gated_norm`); Local-Swin's
        RoPE fused with the gather into window order (:func:`fused.rope_gather`), window attention on those rows
        (:func:`window_attention_sorted`); the output projections with the fusion weights folded into their weights
        (one GEMM of the concatenated cores with ``fuse_gemms``, else two accumulating GEMMs).
        """
        cfg = self.config
        B, L, hidden = u.shape
        N = B * L
        H, P = self.num_heads, self.head_dim
        flex, swin = self.flex, self.swin
        proj = self._input_projections(u.reshape(N, hidden))
        widths = [H * P if br is not None else 0 for br in (flex, swin)]
        cores = u.new_empty(N, sum(widths))
        valid = layout.key_valid.reshape(-1) if layout.key_valid is not None else None
        fs = ss = None

        if flex is not None:
            G = flex.num_kv_heads
            K = cfg.d_conv
            plan = layout.flex_scan_plan(self.layer_idx, cfg.rotary_major_scan)
            xbc = proj["f_xbc"] if "f_xbc" in proj else torch.cat([proj["f_x"], proj["f_b"], proj["f_c"]], 1)
            dt_raw = proj["f_dt"]
            dt = F.softplus(dt_raw.index_select(0, plan.fwd_src).float() + flex.dt_bias_fwd.float())
            if valid is not None:
                dt = dt * valid.index_select(0, plan.fwd_src)[:, None]
            A = -torch.exp(flex.A_log_fwd.float())
            q, k, v, x_f, _ = fk.conv_scan_inputs(xbc, plan.fwd_src, plan.fwd_segpos, flex.conv_fwd,
                                                  flex.conv_fwd_bias, valid, dt, G, P)
            o_f, state = self._scan(q.view(B, L, H, P), k.view(B, L, H, P), v.view(B, L, H, P),
                                    (dt * A).view(B, L, H), x_f.view(B, L, G, P), dt.view(B, L, H), A,
                                    want_state=return_state)
            del q, k, v
            bwd = (None,) * 5
            if cfg.bidirectional and layout.has_visual:
                dt_b = F.softplus(dt_raw.index_select(0, plan.bwd_src).float() + flex.dt_bias_bwd.float())
                A_b = -torch.exp(flex.A_log_bwd.float())
                q, k, v, x_b, diag = fk.conv_scan_inputs(xbc, plan.bwd_src, plan.bwd_segpos, flex.conv_bwd,
                                                         flex.conv_bwd_bias, valid, dt_b, G, P, want_diag=True)
                o_b, _ = self._scan(q[None], k[None], v[None], (dt_b * A_b)[None], x_b[None], dt_b[None], A_b,
                                    cu_seqlens=plan.cu_seqlens, cu_seqlens_cpu=plan.cu_seqlens_cpu)
                del q, k, v
                bwd = (o_b[0], x_b, diag, flex.D_bwd, plan.bwd_row)
            fk.combine_gated_norm(cores[:, :widths[0]], proj["f_z"], o_f.reshape(N, H, P), x_f, flex.D_fwd,
                                  plan.fwd_row, *bwd, flex.norm_weight, cfg.norm_eps)
            if return_state:
                # raw (masked) inputs of the last K-1 scan rows of every batch row continue the conv in step()
                keep = min(K - 1, L)
                rows = plan.fwd_src.view(B, L)[:, L - keep:].reshape(-1)
                tail = xbc.index_select(0, rows)
                if valid is not None:
                    tail = tail * valid.index_select(0, rows)[:, None].to(tail.dtype)
                conv = F.pad(tail.view(B, keep, -1).transpose(1, 2), (K - 1 - keep, 0))
                fs = FlexMAState(conv=conv.contiguous(), ssm=state)

        if swin is not None:
            Hkv, D = swin.num_kv_heads, swin.head_dim
            cos, sin = position_embeddings
            cos = cos.expand(B, L, D).reshape(N, D)
            sin = sin.expand(B, L, D).reshape(N, D)
            q = proj["s_q"].view(N, H, D) if proj["s_q"].stride(1) == 1 else proj["s_q"].reshape(N, H, D)
            k = proj["s_k"].view(N, Hkv, D) if proj["s_k"].stride(1) == 1 else proj["s_k"].reshape(N, Hkv, D)
            v = proj["s_v"].view(N, Hkv, D) if proj["s_v"].stride(1) == 1 else proj["s_v"].reshape(N, Hkv, D)
            if swin.q_norm is not None:
                q = swin.q_norm(q)
            if swin.k_norm is not None:
                k = swin.k_norm(k)
            ids, part = swin._window_ids(layout)
            order = part.token_order
            qs = fk.rope_gather(q, order, cos, sin)
            ks = fk.rope_gather(k, order, cos, sin)
            vs = fk.rope_gather(v, order, None, None)
            window_attention_sorted(qs, ks, vs, ids, part, text_window=cfg.text_window, n_sink=cfg.n_sink,
                                    key_valid=layout.key_valid, scale=swin.scaling,
                                    out=cores[:, widths[0]:].view(N, H, D))
            if return_state:
                row = part.token_row.view(B, L)

                def kv_at(pos):
                    r = row[:, pos].reshape(-1)
                    return ks.index_select(0, r).view(B, -1, Hkv, D), vs.index_select(0, r).view(B, -1, Hkv, D)

                ss = swin._prefill_state(kv_at, (B, L, Hkv, D), u.dtype, layout.key_valid, state_capacity)
            del qs, ks, vs

        ws, bias = self._output_weights()
        token_bias = None  # the gate's per-token bias, added after the GEMMs
        if cfg.fusion == "gate":
            # per-token weights cannot be folded into the projection: scale the cores (g, 1 - g per head) in place
            g = torch.sigmoid(self.gate(u.reshape(N, hidden)))  # (N, H), in u's dtype as in _fuse
            for i, (branch, w) in enumerate(((flex, g), (swin, 1 - g))):
                if branch is None:
                    continue
                lo = widths[0] if i else 0
                cores[:, lo:lo + widths[i]].view(N, H, P).mul_(w[..., None].to(cores.dtype))
                if branch.o_proj.bias is not None:
                    b = w.mean(-1, keepdim=True) * branch.o_proj.bias
                    token_bias = b if token_bias is None else token_bias + b
        if self.fuse_gemms or len(ws) == 1:
            out = F.linear(cores, torch.cat(ws, dim=1), bias)
        else:
            out = F.linear(cores[:, :widths[0]], ws[0], bias)
            out.addmm_(cores[:, widths[0]:], ws[1].t())
        if token_bias is not None:
            out = out + token_bias.to(out.dtype)
        out = out.view(B, L, -1)
        return out, (MMateState(fs, ss) if return_state else None)

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
        weight = layout.key_valid
        if self.align_text_weight != 1.0:
            text = (~layout.is_visual).to(student.dtype)
            weight = (1.0 + (self.align_text_weight - 1.0) * text) * (1.0 if weight is None else weight.to(text.dtype))
        self.alignment_loss = alignment_mse(student, target, weight)
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
        if self._use_fused(hidden_states):
            fused = self._try_fused(hidden_states, layout, position_embeddings, True, state_capacity)
            if fused is not None:
                return fused
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
