"""Decode steps of the teacher and the LinMU student at a given context length and batch, eager or as a CUDA graph.

A `DecodeSession` holds one model's pre-allocated cache for ``batch`` sequences that have each seen ``context``
tokens, static input buffers (token ids ``(B, 1)`` and M-RoPE positions ``(3, B, 1)``) and one greedy decode step:
forward one token per sequence, take the argmax and write it back as the next input. With ``cuda_graph=True`` that
step is captured once and replayed, with no host work or host sync in between.

- teacher: transformers' ``StaticCache`` of ``context + max_steps`` positions per layer rounded up to 256 (keys and
  values at key/value heads), with its write position set to ``context``; each step writes one position and attends
  over the whole buffer under SDPA's mask (`linmu.bench.attention`: GQA folded, no KV repeat, split-KV on CUDA).
- student: `linmu.inference.cache.LinMUCache` (fixed size whatever ``context``) set to ``context`` seen tokens.

The caches are filled to their context length without running ``batch`` prefills (the contents of the buffers do
not change the cost of a step; a prefill of B x 128K tokens would take minutes): this times a decode step at context
``context``, which is what tokens/s at that context means.

Example::

    s = DecodeSession(model, "student", batch=64, context=131072, cuda_graph=True)
    s.prepare()
    ms = s.time_steps(16)
"""

from __future__ import annotations

import statistics
import time

import torch


# ------------------------------------------------------------------------------------------------ cache sizes

def teacher_cache_bytes_per_seq(text_config, context: int, dtype: torch.dtype) -> int:
    """Bytes of the teacher's KV cache for one sequence of ``context`` tokens: layers x 2 x kv_heads x head_dim."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    elem = torch.tensor([], dtype=dtype).element_size()
    return text_config.num_hidden_layers * 2 * text_config.num_key_value_heads * head_dim * elem * int(context)


def student_cache_bytes_per_seq(blocks, dtype: torch.dtype) -> int:
    """Bytes of LinMU's decode state for one sequence (any context length), from the M-MATE blocks' shapes.

    Per layer: the Flex-MA conv state (conv_channels x (d_conv - 1), model dtype) and SSM state (H x P x N, float32);
    the Local-Swin ring of keys and values ((n_sink + text_window) x kv_heads x head_dim each, model dtype) and its
    validity flags (one byte per slot). The write position (one int64 per layer) is shared by the batch.
    """
    elem = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for b in blocks:
        cfg = b.config
        if b.flex is not None:
            f = b.flex
            total += f.conv_channels * (cfg.d_conv - 1) * elem + f.num_heads * f.head_dim * f.head_dim * 4
        if b.swin is not None:
            s = b.swin
            slots = cfg.n_sink + cfg.text_window
            total += 2 * slots * s.num_kv_heads * s.head_dim * elem + slots
    return total


# ------------------------------------------------------------------------------------------------ sessions

class DecodeSession:
    """One model's cache and greedy decode step for ``batch`` sequences at ``context`` tokens (see module doc)."""

    def __init__(self, model, kind: str, batch: int, context: int, max_steps: int = 64, cuda_graph: bool = False):
        if kind not in ("teacher", "student"):
            raise ValueError(f"kind must be 'teacher' or 'student', got {kind!r}")
        if batch < 1 or context < 1:
            raise ValueError(f"batch and context must be positive, got batch={batch}, context={context}")
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if cuda_graph and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model, self.kind, self.batch, self.context = model, kind, batch, context
        self.max_steps, self.cuda_graph = max_steps, cuda_graph
        self.graph = None
        self._steps_since_reset = 0
        if kind == "teacher":
            from transformers import StaticCache

            tc = model.config.get_text_config(decoder=True)
            head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
            # whole 256-slot blocks, so that the decode attention can split the cache into equal chunks
            self.cache = StaticCache(config=tc, max_cache_len=-(-(context + max_steps) // 256) * 256)
            self.cache.early_initialization(batch, tc.num_key_value_heads, head_dim, self.dtype, self.device)
        else:
            from ..inference.cache import LinMUCache

            self.cache = LinMUCache(model.mmate_blocks(), batch)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        # text positions continue from the context (M-RoPE: the same id on all three axes)
        self.pos = torch.full((3, batch, 1), context, dtype=torch.long, device=self.device)
        self.reset()

    def reset(self) -> None:
        """Back to ``context`` tokens seen (device counters set in place: a captured graph sees the change)."""
        self._steps_since_reset = 0
        if self.kind == "teacher":
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(self.context)
            return
        for layer in self.cache.layers:
            layer.seen = self.context
            swin = layer.state.swin
            if swin is not None:
                swin.pos.fill_(self.context)
                # the sinks and the ring hold real tokens once the context has filled them
                swin.valid[:, :min(self.context, swin.valid.shape[1])] = True

    def cache_nbytes(self) -> int:
        if self.kind == "student":
            return self.cache.nbytes()
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))

    def _forward(self) -> None:
        out = self.model(input_ids=self.ids, position_ids=self.pos, past_key_values=self.cache, use_cache=True)
        self.ids.copy_(out.logits[:, -1:].argmax(-1))

    def prepare(self, warmup: int = 2) -> None:
        """Warm up (lazy kernels, cuBLAS handles) and, with ``cuda_graph``, capture one step."""
        with torch.inference_mode():
            if self.cuda_graph:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(warmup):
                        self._forward()
                torch.cuda.current_stream(self.device).wait_stream(side)
                self.reset()
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self._forward()
            else:
                for _ in range(warmup):
                    self._forward()
        self.reset()

    def step(self) -> None:
        if self._steps_since_reset >= self.max_steps:
            raise RuntimeError(f"more than max_steps={self.max_steps} steps since reset(): the teacher's static "
                               "cache would overflow")
        self._steps_since_reset += 1
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.inference_mode():
                self._forward()

    def time_steps(self, steps: int, repeats: int = 3) -> list[float]:
        """Milliseconds per decode step, one value per repeat of ``steps`` consecutive steps (from reset())."""
        if steps > self.max_steps:
            raise ValueError(f"steps={steps} exceeds max_steps={self.max_steps}")
        out = []
        for _ in range(repeats):
            self.reset()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(steps):
                    self.step()
                b.record()
                torch.cuda.synchronize(self.device)
                out.append(a.elapsed_time(b) / steps)
            else:
                t0 = time.perf_counter()
                for _ in range(steps):
                    self.step()
                out.append((time.perf_counter() - t0) * 1e3 / steps)
        return out

    def close(self) -> None:
        """Drop the graph and the cache (call before building the next session)."""
        self.graph = None
        self.cache = None


def decode_result(session: DecodeSession, ms: list[float]) -> dict:
    step = statistics.median(ms)
    return {"batch": session.batch, "step_ms": step, "tok_s": session.batch * 1e3 / step, "step_ms_runs": ms}
