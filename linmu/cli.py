"""Command line: `linmu <command>`. Only this module prints."""

from __future__ import annotations

import argparse
import sys
import time


def cmd_quickstart(args) -> int:
    """Build a tiny random Qwen2-VL, convert it, and generate from an input with an image and a video."""
    import torch

    import linmu
    from linmu.tiny import tiny_qwen2_vl, tiny_qwen2_vl_inputs

    teacher = tiny_qwen2_vl(seed=args.seed)
    inputs = tiny_qwen2_vl_inputs(teacher, seed=args.seed)
    print(f"teacher: tiny random Qwen2-VL, {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M parameters; "
          f"prompt of {inputs['input_ids'].shape[1]} tokens with one image and one video")
    for name, cfg in (("identity", linmu.MMateConfig.identity()), ("default", linmu.MMateConfig(window=(2, 2, 2)))):
        student = linmu.convert(teacher, cfg)
        with torch.no_grad():
            t_logits = teacher(**inputs).logits
            s_logits = student(**inputs).logits
            t0 = time.perf_counter()
            out = student.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                   return_dict_in_generate=True)
            dt = time.perf_counter() - t0
            ref = student.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=False)
        new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        same = "equal" if torch.equal(out.sequences, ref) else "DIFFERENT from"
        print(f"[{name} M-MATE] max |logit(student) - logit(teacher)| = {(s_logits - t_logits).abs().max():.2e}; "
              f"generated {len(new)} tokens in {dt:.2f}s with a {out.past_key_values.nbytes()}-byte fixed cache "
              f"({same} uncached greedy): {new}")
    return 0


def cmd_convert(args) -> int:
    """`linmu convert --teacher DIR --out DIR [--config mmate.json | --identity]`."""
    import json

    import torch

    import linmu

    if args.identity:
        cfg = linmu.MMateConfig.identity()
    elif args.config:
        with open(args.config) as f:
            cfg = linmu.MMateConfig.from_dict(json.load(f))
    else:
        cfg = linmu.MMateConfig()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[args.dtype]
    try:
        teacher = linmu.load_teacher(args.teacher, dtype=dtype)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    student = linmu.convert(teacher, cfg)
    student.save_pretrained(args.out)
    rep = student.linmu_conversion
    print(f"converted {type(teacher).__name__} -> {type(student).__name__}: {len(rep.reused)} teacher tensors "
          f"reused, {len(rep.dropped)} dropped, {len(rep.new)} new M-MATE tensors; saved to {args.out}")
    return 0


def cmd_distill(args) -> int:
    """`linmu distill --stage N --config FILE [--resume]` and `linmu distill prepare-seqkd ...`."""
    import json
    import logging

    from linmu.distill.config import DistillConfig

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = dict(stage=args.stage, output_dir=args.output_dir, teacher=args.teacher, init=args.init,
                     data=args.data, steps=args.steps)
    cfg = DistillConfig.from_file(args.config, **overrides) if args.config else DistillConfig(
        **{k: v for k, v in overrides.items() if v is not None})
    if args.action == "prepare-seqkd":
        from linmu.data.build import prepare_seqkd
        from linmu.io import load_teacher

        if not args.seqkd_out:
            print("error: prepare-seqkd needs --seqkd-out FILE", file=sys.stderr)
            return 2
        teacher = load_teacher(cfg.teacher)
        if args.device:
            teacher.to(args.device)
        report = prepare_seqkd(teacher, cfg, args.seqkd_out, max_new_tokens=args.max_new_tokens)
        print(json.dumps(report))
        return 0
    from linmu.distill.engine import run_stage

    final = run_stage(cfg, resume=args.resume)
    print(f"stage {cfg.stage} model: {final}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="linmu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("quickstart", help="convert a tiny random Qwen2-VL and generate (offline, seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.set_defaults(func=cmd_quickstart)
    p = sub.add_parser("convert", help="convert a local teacher checkpoint to LinMU and save it")
    p.add_argument("--teacher", required=True, help="local teacher checkpoint directory")
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="MMateConfig fields as JSON (default: LINMU.md defaults)")
    p.add_argument("--identity", action="store_true", help="the identity setting (reproduces the teacher)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"])
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("distill", help="run a distillation stage (or prepare-seqkd: cache teacher answers)")
    p.add_argument("action", nargs="?", default="run", choices=["run", "prepare-seqkd"])
    p.add_argument("--config", help="stage config (YAML or JSON, fields of linmu.distill.config.DistillConfig)")
    p.add_argument("--stage", type=int, choices=[1, 2, 3])
    p.add_argument("--output-dir")
    p.add_argument("--teacher", help="local teacher checkpoint directory")
    p.add_argument("--init", help="LinMU model to start from (the previous stage's OUTPUT/final)")
    p.add_argument("--data", help="LLaVA-style JSON/JSONL training data")
    p.add_argument("--steps", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--seqkd-out", help="prepare-seqkd: JSONL file of teacher answers to write (appends, resumable)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_distill)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
