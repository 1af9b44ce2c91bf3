"""Flush subnormal floats to zero on the CPU for a block of work.

Flex-MA's decays are exponentials of large negative numbers (``exp(dt * A)`` accumulated over a chunk), and once a
model has trained for a while many of them land in float32's subnormal range (below 1.2e-38). x86 CPUs compute on
subnormals through a slow microcode path: a stage-2 step of the synthetic demo on a trained student takes 0.97 s with
them and 0.65 s flushed (``docs/DEMO.md``). Flushing changes only values below 1.2e-38, to zero.

Example::

    with flush_denormals():
        train()
"""

from __future__ import annotations

import contextlib

import torch


_depth = 0  # open flush_denormals blocks that turned flushing on (nested blocks: the outermost turns it off)


@contextlib.contextmanager
def flush_denormals(enabled: bool = True):
    """Within the block, subnormal float32/float64 values are treated and produced as zero (x86 FTZ/DAZ; a no-op
    where the CPU does not support it). Yields whether flushing is on. Blocks nest: flushing goes back to the default
    (off) when the outermost block that turned it on exits."""
    global _depth
    on = bool(enabled) and torch.set_flush_denormal(True)
    _depth += on
    try:
        yield on
    finally:
        _depth -= on
        if on and _depth == 0:
            torch.set_flush_denormal(False)
