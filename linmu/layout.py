"""Token layout: which positions are visual, their span and their (t, h, w) grid coordinates.

Computed once per forward (LINMU.md §2) and handed to every M-MATE layer. Everything a layer derives from it
(Rotary Major-Scan permutations, per-span segment boundaries for the backward scan, 3-D window ids and window
partitions) is memoised on the object, so 28 layers share one computation per distinct scan order / shift.

A *visual span* is a contiguous run of tokens of one image or one video with grid ``(T, H, W)`` after the family's
spatial merge, laid out row-major (t outermost, then h, then w) as Qwen does. Everything else is text, including
special tokens and padding. Families whose visual tokens are not plainly row-major (e.g. a newline column after each
row) describe them as a grid that includes those tokens.

Example::

    layout = TokenLayout.from_spans(batch_size=1, seq_len=20,
                                    spans=[VisualSpan(batch=0, start=3, grid=(2, 2, 3), kind="video")])
    layout.is_visual[0, 3:15].all()  # True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Scan orders of the Rotary Major-Scan, outermost axis first, as indices into (t, h, w) (LINMU.md §3.1).
SCAN_ORDERS: tuple[tuple[int, int, int], ...] = ((0, 1, 2), (0, 2, 1), (1, 2, 0), (2, 1, 0))


@dataclass(frozen=True)
class VisualSpan:
    """One image or video inside one sequence of the batch."""

    batch: int  # row of the batch
    start: int  # position of the span's first token
    grid: tuple[int, int, int]  # (T, H, W) after the family's spatial merge
    kind: str = "image"  # "image" or "video"

    @property
    def length(self) -> int:
        t, h, w = self.grid
        return t * h * w


def scan_order_for_layer(layer_idx: int, grid_t: int, rotate: bool = True) -> tuple[int, int, int]:
    """The Rotary Major-Scan order used by layer ``layer_idx`` for a span with ``grid_t`` frames.

    Videos cycle through the four orders; images (T == 1) through the first two, since the last two reduce to the
    first when the t axis has length one.
    """
    if not rotate:
        return SCAN_ORDERS[0]
    return SCAN_ORDERS[layer_idx % 4] if grid_t > 1 else SCAN_ORDERS[layer_idx % 2]


@dataclass
class SpanSegments:
    """Visual tokens of every span, gathered into one packed sequence.

    ``index`` holds flat positions ``b * L + i`` into the (B*L) token axis; ``cu_seqlens`` marks span boundaries in
    that packed order (int64, starts at 0, ends at ``index.numel()``).
    """

    index: torch.Tensor  # (n_visual,) long
    cu_seqlens: torch.Tensor  # (n_spans + 1,) long
    to_end: torch.Tensor  # (n_visual,) long, tokens left in the span after this one


@dataclass
class FlexScanPlan:
    """Row orders of Flex-MA's two scans for one scan order, as flat token indices ``b * L + pos`` (N = B * L).

    Forward scan: row ``b * L + t`` holds token ``fwd_src`` (the layer's scan order, each batch row on its own).
    Backward scan: the visual tokens packed span after span, each span in *reversed* scan order, so a causal scan
    over ``cu_seqlens`` segments is the per-span backward scan.
    """

    fwd_src: torch.Tensor  # (N,) token at each forward-scan row
    fwd_segpos: torch.Tensor  # (N,) position of the row inside its batch row (the conv restarts at 0)
    fwd_row: torch.Tensor  # (N,) forward-scan row of each token
    bwd_src: torch.Tensor  # (Nv,) token at each backward-scan row
    bwd_segpos: torch.Tensor  # (Nv,) position of the row inside its reversed span
    bwd_row: torch.Tensor  # (N,) backward-scan row of each token, -1 for text
    cu_seqlens: torch.Tensor  # (n_spans + 1,) long, span borders of the backward rows
    cu_seqlens_cpu: torch.Tensor  # the same on the host (from the span lengths, no device sync)


@dataclass
class WindowIds:
    """3-D window membership: ``ids[b, i]`` is -1 for text, else a window id unique within the batch."""

    ids: torch.Tensor  # (B, L) long
    num_windows: int


@dataclass
class TokenLayout:
    """Per-forward description of where visual tokens are. Build with :meth:`from_spans` or :meth:`text_only`."""

    batch_size: int
    seq_len: int
    spans: list[VisualSpan]
    is_visual: torch.Tensor  # (B, L) bool
    span_index: torch.Tensor  # (B, L) long, -1 for text, else index into ``spans``
    thw: torch.Tensor  # (B, L, 3) long, (t, h, w) inside the span, 0 for text
    grid: torch.Tensor  # (B, L, 3) long, (T, H, W) of the token's span, 1 for text
    span_start: torch.Tensor  # (B, L) long, first position of the token's span, own position for text
    key_valid: torch.Tensor | None = None  # (B, L) bool, False at padding; None = no padding
    _memo: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_spans(
        cls,
        batch_size: int,
        seq_len: int,
        spans: list[VisualSpan],
        key_valid: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> "TokenLayout":
        """Build a layout from explicit spans. Raises ValueError on spans that overlap or leave the sequence."""
        device = torch.device(device) if device is not None else (key_valid.device if key_valid is not None else None)
        spans = sorted(spans, key=lambda s: (s.batch, s.start))
        is_visual = torch.zeros(batch_size, seq_len, dtype=torch.bool)
        span_index = torch.full((batch_size, seq_len), -1, dtype=torch.long)
        thw = torch.zeros(batch_size, seq_len, 3, dtype=torch.long)
        grid = torch.ones(batch_size, seq_len, 3, dtype=torch.long)
        span_start = torch.arange(seq_len).expand(batch_size, seq_len).clone()
        for n, s in enumerate(spans):
            T, H, W = s.grid
            if min(T, H, W) < 1:
                raise ValueError(f"visual span {n} has an empty grid {s.grid}")
            if not 0 <= s.batch < batch_size:
                raise ValueError(f"visual span {n} is in batch row {s.batch}, but the batch has {batch_size} rows")
            end = s.start + s.length
            if s.start < 0 or end > seq_len:
                raise ValueError(
                    f"visual span {n} with grid {s.grid} covers positions [{s.start}, {end}) outside a sequence "
                    f"of length {seq_len}: grid metadata does not match the tokens"
                )
            if is_visual[s.batch, s.start:end].any():
                raise ValueError(f"visual span {n} overlaps another span in batch row {s.batch}")
            is_visual[s.batch, s.start:end] = True
            span_index[s.batch, s.start:end] = n
            k = torch.arange(s.length)
            thw[s.batch, s.start:end] = torch.stack([k // (H * W), (k // W) % H, k % W], dim=-1)
            grid[s.batch, s.start:end] = torch.tensor(s.grid)
            span_start[s.batch, s.start:end] = s.start
        layout = cls(batch_size, seq_len, spans, is_visual, span_index, thw, grid, span_start, key_valid)
        return layout.to(device) if device is not None else layout

    @staticmethod
    def key_valid_from(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """A transformers 2-D attention mask (1 = token, 0 = padding) as ``key_valid``; None when nothing is padded."""
        if attention_mask is None or bool(attention_mask.all()):
            return None
        return attention_mask.bool()

    @classmethod
    def text_only(cls, batch_size: int, seq_len: int, key_valid=None, device=None) -> "TokenLayout":
        return cls.from_spans(batch_size, seq_len, [], key_valid=key_valid, device=device)

    def to(self, device) -> "TokenLayout":
        kv = self.key_valid.to(device) if self.key_valid is not None else None
        return TokenLayout(
            self.batch_size, self.seq_len, self.spans, self.is_visual.to(device), self.span_index.to(device),
            self.thw.to(device), self.grid.to(device), self.span_start.to(device), kv,
        )

    @property
    def device(self) -> torch.device:
        return self.is_visual.device

    @property
    def has_visual(self) -> bool:
        return len(self.spans) > 0

    # ------------------------------------------------------------------ Rotary Major-Scan
    def _orders(self, layer_idx: int, rotate: bool) -> tuple[tuple[int, int, int], ...]:
        return tuple(scan_order_for_layer(layer_idx, s.grid[0], rotate) for s in self.spans)

    def scan_permutation(self, layer_idx: int, rotate: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Gather indices that reorder each span's tokens into the layer's scan order.

        Returns ``(perm, inv)``, both (B, L) long, with ``x_scan = x.gather(1, perm)`` and
        ``x = x_scan.gather(1, inv)``; text positions map to themselves. None when the order is the identity for
        every span (no visual tokens, or all spans already row-major).
        """
        orders = self._orders(layer_idx, rotate)
        if all(o == SCAN_ORDERS[0] for o in orders):
            return None
        key = ("perm", orders)
        if key not in self._memo:
            # Rank of every visual token in its span under its span's order: with the order's axes (a1, a2, a3)
            # outermost first, rank = c[a1] * (d[a2] * d[a3]) + c[a2] * d[a3] + c[a3].
            order_of_span = torch.tensor(orders, dtype=torch.long, device=self.device).reshape(-1, 3)
            span = self.span_index.clamp(min=0)
            order = order_of_span[span] if len(orders) else torch.zeros(self.batch_size, self.seq_len, 3, dtype=torch.long)
            c = self.thw.gather(-1, order)  # coordinates in scan-axis order
            d = self.grid.gather(-1, order)
            rank = c[..., 0] * d[..., 1] * d[..., 2] + c[..., 1] * d[..., 2] + c[..., 2]
            pos = torch.arange(self.seq_len, device=self.device).expand(self.batch_size, -1)
            # new position of every token: span start + rank for visual tokens, unchanged for text
            new_pos = torch.where(self.is_visual, self.span_start + rank, pos)
            perm = torch.empty_like(new_pos).scatter_(1, new_pos, pos)  # perm[new] = old
            self._memo[key] = (perm, new_pos)  # inv[old] = new
        return self._memo[key]

    # ------------------------------------------------------------------ backward-scan segments
    def span_segments(self) -> SpanSegments:
        """Visual tokens packed span by span, with ``cu_seqlens`` at span borders.

        A Rotary Major-Scan permutation only moves tokens inside their span, so in scan order every span still
        occupies its own contiguous positions and this packing is the same for every layer.
        """
        if "segments" not in self._memo:
            flat = torch.nonzero(self.is_visual.reshape(-1), as_tuple=False).squeeze(1)
            lengths = torch.tensor([s.length for s in self.spans], dtype=torch.long, device=self.device)
            cu = torch.zeros(len(self.spans) + 1, dtype=torch.long, device=self.device)
            cu[1:] = torch.cumsum(lengths, 0)
            # distance of every packed token to the end of its span (used by the per-span backward conv)
            seg = torch.repeat_interleave(torch.arange(len(self.spans), device=self.device), lengths)
            to_end = cu[1:][seg] - torch.arange(flat.numel(), device=self.device) - 1
            self._memo["segments"] = SpanSegments(flat, cu, to_end)
        return self._memo["segments"]

    def flex_scan_plan(self, layer_idx: int, rotate: bool = True) -> FlexScanPlan:
        """Row orders of the forward and per-span backward scans of layer ``layer_idx`` (see
        :class:`FlexScanPlan`), memoised per distinct scan order; no host sync."""
        key = ("flex_plan", self._orders(layer_idx, rotate))
        if key not in self._memo:
            B, L, dev = self.batch_size, self.seq_len, self.device
            N = B * L
            perm = self.scan_permutation(layer_idx, rotate)
            base = (torch.arange(B, device=dev) * L)[:, None]
            if perm is None:
                fwd_src = fwd_row = torch.arange(N, device=dev)
            else:
                fwd_src = (base + perm[0]).reshape(-1)
                fwd_row = (base + perm[1]).reshape(-1)
            fwd_segpos = torch.arange(L, device=dev).repeat(B)
            seg = self.span_segments()
            nv = seg.index.numel()
            lengths = [s.length for s in self.spans]
            span_of = torch.repeat_interleave(torch.arange(len(lengths), device=dev),
                                              torch.tensor(lengths, dtype=torch.long, device=dev))
            r = torch.arange(nv, device=dev)
            rev = seg.cu_seqlens[span_of] + seg.cu_seqlens[span_of + 1] - 1 - r  # its own inverse
            bwd_scanpos = seg.index[rev]  # forward-scan row of each backward row
            bwd_src = fwd_src[bwd_scanpos]
            bwd_segpos = r - seg.cu_seqlens[span_of]
            at_scanpos = torch.full((N,), -1, dtype=torch.long, device=dev)
            at_scanpos[bwd_scanpos] = r
            bwd_row = at_scanpos[fwd_row]
            cu_cpu = torch.zeros(len(lengths) + 1, dtype=torch.long)
            cu_cpu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0)
            self._memo[key] = FlexScanPlan(fwd_src, fwd_segpos, fwd_row, bwd_src, bwd_segpos, bwd_row,
                                           seg.cu_seqlens, cu_cpu)
        return self._memo[key]

    # ------------------------------------------------------------------ Local-Swin windows
    def window_ids(self, window: tuple[int, int, int], shift: bool) -> WindowIds:
        """3-D window of every visual token (LINMU.md §3.2); -1 for text.

        Windows tile each span's grid with size ``window`` (the t size clipped to T, so images use (1, h, w)),
        offset by half a window when ``shift`` (Swin's shifted layers). Windows are clipped at grid borders, not
        wrapped around, so border windows are smaller.
        """
        key = ("win", tuple(window), bool(shift))
        if key not in self._memo:
            win = torch.tensor(window, dtype=torch.long, device=self.device)
            win = torch.minimum(win, self.grid)  # (B, L, 3): clip each axis to the span's extent
            off = win // 2 if shift else torch.zeros_like(win)
            cell = (self.thw + off) // win  # window coordinates
            ncell = (self.grid - 1 + off) // win + 1  # windows per axis
            local = (cell[..., 0] * ncell[..., 1] + cell[..., 1]) * ncell[..., 2] + cell[..., 2]
            # make ids unique over spans: offset by the number of windows of all earlier spans
            n_per_span = []
            for s in self.spans:
                w = [min(a, g) for a, g in zip(window, s.grid)]
                o = [a // 2 if shift else 0 for a in w]
                n_per_span.append(
                    ((s.grid[0] - 1 + o[0]) // w[0] + 1) * ((s.grid[1] - 1 + o[1]) // w[1] + 1)
                    * ((s.grid[2] - 1 + o[2]) // w[2] + 1)
                )
            base = torch.zeros(len(self.spans) + 1, dtype=torch.long, device=self.device)
            if self.spans:
                base[1:] = torch.cumsum(torch.tensor(n_per_span, device=self.device), 0)
            ids = torch.where(self.is_visual, base[self.span_index.clamp(min=0)] + local, -1)
            self._memo[key] = WindowIds(ids, int(base[-1]))
        return self._memo[key]

    def memo(self, key, build):
        """Memoise an arbitrary derived object (e.g. a window partition) on this layout."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]
