"""One decoder attention layer, teacher (SDPA causal) vs M-MATE, swept over sequence length.

    python -m linmu.bench.layer_scaling --device cuda --tokens 8192,16384,32768,65536,131072
    python -m linmu.bench.layer_scaling --device cuda --tokens 131072 --reference --fused-gemms --profile
    python -m linmu.bench.layer_scaling --device cpu --ssd-only --tokens 8192,65536

Shapes default to a Qwen2.5-VL-7B decoder layer (hidden 3584, 28 query heads, 4 key/value heads, head_dim 128).
The sequence is a short text prefix, one video span of ``--frame-tokens`` tokens per frame (16 x 16 after merging),
and a text suffix. Both models run the same dtype on the same device, without CUDA graphs, forward only (prefill).
Times are medians over ``--repeats`` runs after warm-up, measured with CUDA events on GPU. The layout's derived
indices (scan permutations, window partitions) are built once per forward for all layers, so the M-MATE column is the
per-layer cost with them built and ``layout ms`` is their one-off cost. The M-MATE column is the block's default
prefill (the fused path on CUDA with fla-core and Triton); ``--reference`` adds the unfused reference path
(``MMate.fused = "never"``) and ``--fused-gemms`` a fused run with one GEMM for all input and one for both output projections
(``MMate.fuse_gemms``). ``--profile`` prints a
CUDA profile of one fused forward at the largest length: kernel time by category (GEMMs, fla scans, window
attention, fused elementwise kernels, the rest) and the top kernels, against the GEMM floor of the projections.
Prints a table, then one JSON line.
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


def _category(name: str) -> str:
    n = name.lower()
    # attention first: cuDNN's flash kernel names also carry "sm90_"
    if any(t in n for t in ("flash", "fmha", "attention", "_attn", "sdpa")):
        return "window attention"
    if any(t in n for t in ("gemm", "nvjet", "xmma", "cutlass", "cublas")):
        return "gemm"
    if n.startswith("chunk_") or "chunk_fwd" in n or "chunk_local" in n or "simple_gla" in n:
        return "fla scans"
    if any(t in n for t in ("conv_kernel", "combine_kernel", "rope_kernel")):
        return "fused elementwise"
    return "other (gathers, small elementwise)"


def profile_block(fn, flops_gemm: float, path: str | None = None) -> dict:
    """Kernel time of one call of ``fn`` by category and the top kernels (CUDA profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [(e.key, e.self_device_time_total / 1e3, e.count) for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    kernels.sort(key=lambda r: -r[1])
    cats: dict[str, float] = {}
    for name, ms, _ in kernels:
        cats[_category(name)] = cats.get(_category(name), 0.0) + ms
    total = sum(cats.values())
    if path:
        with open(path, "w") as f:
            f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=90))
    return {"total_kernel_ms": total, "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "gemm_tflops": flops_gemm / max(cats.get("gemm", 0.0), 1e-9) / 1e9,
            "top": [(name[:90], round(ms, 3), n) for name, ms, n in kernels[:20]]}


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
    p.add_argument("--fusion", default="head", choices=["head", "channel", "gate"], help="MMateConfig.fusion")
    p.add_argument("--n-sink", type=int, default=0, help="MMateConfig.n_sink (Local-Swin attention sinks)")
    p.add_argument("--ssd-only", action="store_true", help="time only ssd_scan (the Flex-MA scan) per length")
    p.add_argument("--no-teacher", action="store_true", help="skip the SDPA teacher layer")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reference", action="store_true", help="also time the unfused reference path of the block")
    p.add_argument("--fused-gemms", action="store_true",
                   help="also time the fused path with one GEMM for all input / both output projections")
    p.add_argument("--profile", action="store_true", help="CUDA profile of the fused block at the largest length")
    p.add_argument("--profile-out", default=None, help="write the profiler's full table to this file")
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
        cfg = MMateConfig(ssd_impl=args.ssd_impl, attn_impl=args.attn_impl, fusion=args.fusion, n_sink=args.n_sink)
        block = MMate.from_attention(attn, 1, cfg).eval()
    lengths = [int(v) for v in args.tokens.split(",")]
    max_n = max(lengths)
    for n in lengths:
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
                run_block = lambda: block(u, position_embeddings=pe, linmu_layout=layout)
                row["mmate_ms"] = timer(run_block, args.repeats, args.warmup)
                row["layout_ms"] = max(row["mmate_cold_ms"] - row["mmate_ms"], 0.0)
                row["fused"] = block._use_fused(u)
                if args.fused_gemms:
                    block.fuse_gemms = True
                    row["mmate_fused_gemm_ms"] = timer(run_block, args.repeats, args.warmup)
                    block.fuse_gemms = False
                if args.reference:
                    block.fused = "never"
                    row["mmate_ref_ms"] = timer(run_block, max(1, args.repeats // 2), 1)
                    block.fused = "auto"
                if args.profile and device.type == "cuda" and n == max_n:
                    d = block.flex.conv_channels + block.flex.z_proj.out_features + block.flex.dt_proj.out_features \
                        + H * P + 2 * args.kv_heads * P  # Flex-MA x/B/C, z, dt; Local-Swin q, k, v
                    flops = 2.0 * n * args.hidden * d + 2.0 * n * (2 * H * P) * args.hidden
                    row["profile"] = profile_block(run_block, flops, args.profile_out)
                    row["gemm_floor_ms_at_790tflops"] = flops / 790e12 * 1e3
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
        if args.reference:
            head += f" {'ref ms':>9}"
        if args.fused_gemms:
            head += f" {'1GEMM ms':>9}"
        if not args.no_teacher:
            head += f" {'sdpa ms':>9} {'x base':>7} {'sdpa/mmate':>10}"
    print(f"device={torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} dtype={dtype} "
          f"heads={H} kv_heads={args.kv_heads} head_dim={P} hidden={args.hidden} frame={frame_hw}")
    print(head)
    for r in rows:
        line = f"{r['tokens']:>8} {r['ssd_ms']:>9.2f} {r['ssd_ms'] / base['ssd_ms']:>7.2f}"
        if not args.ssd_only:
            line += f" {r['mmate_ms']:>9.2f} {r['mmate_ms'] / base['mmate_ms']:>7.2f} {r['layout_ms']:>9.2f}"
            if args.reference:
                line += f" {r['mmate_ref_ms']:>9.2f}"
            if args.fused_gemms:
                line += f" {r['mmate_fused_gemm_ms']:>9.2f}"
            if not args.no_teacher:
                line += (f" {r['sdpa_ms']:>9.2f} {r['sdpa_ms'] / base['sdpa_ms']:>7.2f}"
                         f" {r['sdpa_ms'] / r['mmate_ms']:>10.2f}")
        print(line)
    for r in rows:
        if "profile" in r:
            prof = r["profile"]
            print(f"profile at {r['tokens']} tokens: {prof['total_kernel_ms']:.2f} ms of kernels; GEMM floor "
                  f"{r['gemm_floor_ms_at_790tflops']:.2f} ms at 790 TFLOP/s, GEMMs ran at {prof['gemm_tflops']:.0f}")
            for cat, ms in prof["categories"].items():
                print(f"  {cat:<36} {ms:>8.2f} ms")
            for name, ms, cnt in prof["top"][:12]:
                print(f"    {ms:>8.3f} ms x{cnt:<3} {name}")
    result = {"device": str(device), "dtype": str(dtype), "heads": H, "head_dim": P, "fusion": args.fusion,
              "n_sink": args.n_sink, "rows": rows}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
