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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="linmu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("quickstart", help="convert a tiny random Qwen2-VL and generate (offline, seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.set_defaults(func=cmd_quickstart)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
