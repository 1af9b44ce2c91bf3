"""One decoder attention layer, teacher (SDPA causal) vs M-MATE, swept over sequence length.

    python -m linmu.bench.layer_scaling --device cuda --tokens 8192,16384,32768,65536,131072
    python -m linmu.bench.layer_scaling --device cpu --ssd-only --tokens 8192,65536

Shapes default to a Qwen2.5-VL-7B decoder layer (hidden 3584, 28 query heads, 4 key/value heads, head_dim 128).
The sequence is a short text prefix, one video span of ``--frame-tokens`` tokens per frame (16 x 16 after merging),
and a text suffix. Both models run the same dtype on the same device, without CUDA graphs, forward only (prefill).
Times are medians over ``--repeats`` runs after warm-up, measured with CUDA events on GPU. The layout's derived
indices (scan permutations, window partitions) are built once per forward for all layers, so the M-MATE column is the
per-layer cost with them built and ``layout ms`` is their one-off cost. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch


def _timer(device: torch.device):
    if device.type == "cuda":
        def run(fn, repeats: int, warmup: int):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            return statistics.median(times)
    else:
        def run(fn, repeats: int, warmup: int):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
    return run


def video_layout(n_tokens: int, frame_hw: tuple[int, int], device):
    """16 text tokens, a video of as many whole frames as fit, text to the end."""
    from linmu.layout import TokenLayout, VisualSpan

    per_frame = frame_hw[0] * frame_hw[1]
    frames = max((n_tokens - 32) // per_frame, 1)
    return TokenLayout.from_spans(1, n_tokens, [VisualSpan(0, 16, (frames, *frame_hw), "video")], device=device)


def build_attention(hidden, heads, kv_heads, head_dim, dtype, device):
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding

    cfg = Qwen2Config(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      intermediate_size=4 * hidden, num_hidden_layers=2, vocab_size=128)
    cfg._attn_implementation = "sdpa"
    attn = Qwen2Attention(cfg, layer_idx=1).to(device=device, dtype=dtype).eval()
    return attn, Qwen2RotaryEmbedding(cfg).to(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", default="8192,16384,32768,65536,131072")
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--frame-hw", default="16,16")
    p.add_argument("--dtype", default=None, help="bfloat16 on cuda, float32 on cpu by default")
    p.add_argument("--ssd-impl", default="auto")
    p.add_argument("--attn-impl", default="auto")
    p.add_argument("--ssd-only", action="store_true", help="time only ssd_scan (the Flex-MA scan) per length")
    p.add_argument("--no-teacher", action="store_true", help="skip the SDPA teacher layer")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)

    from linmu.config import MMateConfig
    from linmu.layers.mmate import MMate
    from linmu.ops.ssd import ssd_scan

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    timer = _timer(device)
    frame_hw = tuple(int(v) for v in args.frame_hw.split(","))
    H, P = args.heads, args.head_dim
    rows = []
    torch.manual_seed(0)
    attn = rope = block = None
    if not args.ssd_only:
        attn, rope = build_attention(args.hidden, H, args.kv_heads, P, dtype, device)
        cfg = MMateConfig(ssd_impl=args.ssd_impl, attn_impl=args.attn_impl)
        block = MMate.from_attention(attn, 1, cfg).eval()
    for n in [int(v) for v in args.tokens.split(",")]:
        row = {"tokens": n}
        with torch.no_grad():
            # the Flex-MA scan alone, at the layer's shapes
            x = torch.randn(1, n, H, P, device=device, dtype=dtype)
            dt = torch.rand(1, n, H, device=device) * 0.1
            A = -torch.rand(H, device=device)
            Bm = torch.randn(1, n, H, P, device=device, dtype=dtype) / math.sqrt(P)
            Cm = torch.randn(1, n, H, P, device=device, dtype=dtype) / math.sqrt(P)
            row["ssd_ms"] = timer(lambda: ssd_scan(x, dt, A, Bm, Cm, impl=args.ssd_impl), args.repeats, args.warmup)
            del x, Bm, Cm
            if not args.ssd_only:
                u = torch.randn(1, n, args.hidden, device=device, dtype=dtype)
                pos = torch.arange(n, device=device)[None]
                pe = rope(u, pos)
                layout = video_layout(n, frame_hw, device)
                if not args.no_teacher:
                    row["sdpa_ms"] = timer(lambda: attn(u, attention_mask=None, position_embeddings=pe),
                                           args.repeats, args.warmup)
                cold = lambda: block(u, position_embeddings=pe, linmu_layout=video_layout(n, frame_hw, device))
                row["mmate_cold_ms"] = timer(cold, max(1, args.repeats // 2), 1)
                row["mmate_ms"] = timer(lambda: block(u, position_embeddings=pe, linmu_layout=layout),
                                        args.repeats, args.warmup)
                row["layout_ms"] = max(row["mmate_cold_ms"] - row["mmate_ms"], 0.0)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    block(u, position_embeddings=pe, linmu_layout=layout)
                    row["mmate_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                del u, pe, layout
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    base = rows[0]
    head = f"{'tokens':>8} {'ssd ms':>9} {'x base':>7}"
    if not args.ssd_only:
        head += f" {'mmate ms':>9} {'x base':>7} {'layout ms':>9}"
        if not args.no_teacher:
            head += f" {'sdpa ms':>9} {'x base':>7} {'sdpa/mmate':>10}"
    print(f"device={torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} dtype={dtype} "
          f"heads={H} kv_heads={args.kv_heads} head_dim={P} hidden={args.hidden} frame={frame_hw}")
    print(head)
    for r in rows:
        line = f"{r['tokens']:>8} {r['ssd_ms']:>9.2f} {r['ssd_ms'] / base['ssd_ms']:>7.2f}"
        if not args.ssd_only:
            line += f" {r['mmate_ms']:>9.2f} {r['mmate_ms'] / base['mmate_ms']:>7.2f} {r['layout_ms']:>9.2f}"
            if not args.no_teacher:
                line += (f" {r['sdpa_ms']:>9.2f} {r['sdpa_ms'] / base['sdpa_ms']:>7.2f}"
                         f" {r['sdpa_ms'] / r['mmate_ms']:>10.2f}")
        print(line)
    result = {"device": str(device), "dtype": str(dtype), "heads": H, "head_dim": P, "rows": rows}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
