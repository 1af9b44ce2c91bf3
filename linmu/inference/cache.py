"""LinMUCache: the fixed-size decode state of a LinMU model, as a transformers ``Cache``.

Per M-MATE layer (LINMU.md §4): the forward-direction SSM state (float32), the short-conv state, and the Local-Swin
ring of the last ``text_window`` keys (after RoPE) and values at key/value heads plus sink slots. Every buffer is
allocated when the cache is created, from the batch size and the model's shapes; prefill and each decode step copy
into them in place, so the size never depends on the context length and the buffers' addresses never change (what a
CUDA graph capture needs).

``model.generate(...)`` builds one automatically; ``cache.nbytes()`` is its size in bytes.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..layers.flexma import FlexMAState
from ..layers.localswin import SwinState
from ..layers.mmate import MMate, MMateState


class LinMULayerCache:
    """Pre-allocated state buffers of one M-MATE layer."""

    is_sliding = False
    is_compileable = False
    is_initialized = True

    def __init__(self, block: MMate, batch_size: int, max_cache_len: int | None, dtype, device):
        cfg = block.config
        self.seen = 0  # tokens consumed so far (prompt including padding, then generated ones)
        self.ring_capacity = None
        flex = swin = None
        if block.flex is not None:
            f = block.flex
            conv = torch.zeros(batch_size, f.conv_channels, cfg.d_conv - 1, dtype=dtype, device=device)
            ssm = torch.zeros(batch_size, f.num_heads, f.head_dim, f.head_dim, dtype=torch.float32, device=device)
            flex = FlexMAState(conv, ssm)
            # FlexMA.step writes the new SSM state straight into this buffer (store() then has nothing to copy)
            flex.update_in_place = True
        if block.swin is not None:
            s = block.swin
            ring = cfg.text_window if max_cache_len is None else min(cfg.text_window, max_cache_len)
            self.ring_capacity = ring
            S = cfg.n_sink + ring
            k = torch.zeros(batch_size, S, s.num_kv_heads, s.head_dim, dtype=dtype, device=device)
            swin = SwinState(k, torch.zeros_like(k), torch.zeros(batch_size, S, dtype=torch.bool, device=device),
                             torch.zeros((), dtype=torch.long, device=device))
            # LocalSwin.step writes the new key/value slot straight into this ring
            swin.update_in_place = True
        self.state = MMateState(flex, swin)

    def store(self, new: MMateState) -> None:
        """Copy a prefill or step result into the buffers in place."""
        for old, upd in ((self.state.flex, new.flex), (self.state.swin, new.swin)):
            if old is None:
                continue
            for name in old.__dataclass_fields__:
                getattr(old, name).copy_(getattr(upd, name))

    def tensors(self):
        for part in (self.state.flex, self.state.swin):
            if part is not None:
                yield from (getattr(part, n) for n in part.__dataclass_fields__)

    def reorder(self, index: torch.Tensor) -> None:
        for t in self.tensors():
            if t.dim() > 0:
                t.copy_(t.index_select(0, index.to(t.device)))


class LinMUCache(Cache):
    """Fixed-size cache for all M-MATE layers of a LinMU model."""

    def __init__(self, blocks: list[MMate], batch_size: int, max_cache_len: int | None = None,
                 dtype: torch.dtype | None = None, device=None):
        layers = []
        for b in blocks:
            ref = (b.flex or b.swin).o_proj.weight
            layers.append(LinMULayerCache(b, batch_size, max_cache_len, dtype or ref.dtype, device or ref.device))
        super().__init__(layers=layers)
        self._batch_size = batch_size
        self._max_cache_len = max_cache_len

    # -------------------------------------------------------------- what layers use
    def linmu_layer(self, layer_idx: int) -> LinMULayerCache:
        return self.layers[layer_idx]

    def nbytes(self) -> int:
        """Bytes held by the cache (all layers, all sequences of the batch)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    # -------------------------------------------------------------- what transformers asks
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        # M-MATE ignores the 4-D mask (padding comes with the token layout); keep the one transformers builds small
        return query_length + self.get_seq_length(layer_idx), 0

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.get_seq_length(layer_idx or 0) > 0

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for layer in self.layers:
            layer.reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        raise NotImplementedError("LinMUCache is pre-allocated for a fixed batch size")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a recurrent state cannot be rolled back: LinMUCache does not support crop()")

    def reset(self):
        for layer in self.layers:
            layer.seen = 0
            for t in layer.tensors():
                t.zero_()

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def max_cache_len(self) -> int:
        return -1 if self._max_cache_len is None else self._max_cache_len

    @property
    def max_batch_size(self) -> int:
        return self._batch_size
