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


def cmd_generate(args) -> int:
    """`linmu generate --model DIR [--video F] [--image F ...] --prompt "..." [--stream]`: answer, TTFT, tokens/s."""
    from transformers.utils import logging as hf_logging

    from linmu.data.media import MediaError
    from linmu.inference.generate import InputError, generate, inspect_model_dir, load_media, load_model

    def emit(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    hf_logging.disable_progress_bar()
    try:
        # cheap checks first: the directory's config and the media, then the weights
        inspect_model_dir(args.model)
        media = load_media(args.image or [], [args.video] if args.video else [], num_frames=args.num_frames,
                           fps=args.fps, max_frames=args.max_frames)
        lm = load_model(args.model, teacher=True if args.teacher else None, processor=args.processor,
                        dtype=args.dtype, device=args.device)
        result = generate(lm, args.prompt, media=media, max_new_tokens=args.max_new_tokens,
                          on_text=emit if args.stream else None)
    except (InputError, MediaError) as e:
        print(f"linmu generate: error: {e}", file=sys.stderr)
        return 2
    if args.stream:
        emit("\n")
    else:
        print(result.text)
    print(f"[{lm.kind} {lm.family}] {result.summary()}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    """`linmu eval --agreement --teacher T --model S --data SPEC [--json]` (each mode of `linmu eval` is a flag)."""
    if args.agreement:
        return _eval_agreement(args)
    if args.suite:
        return _eval_suite(args)
    print("linmu eval: error: choose what to evaluate: --agreement or --suite synthetic", file=sys.stderr)
    return 2


def _eval_suite(args) -> int:
    """`linmu eval --model DIR --suite synthetic --seed S --num-frames F --num-samples N [--json]`."""
    import json

    from linmu.demo.evaluate import accuracy
    from linmu.demo.teacher import load_demo_teacher
    from linmu.synthetic import chance_levels, make_split

    if not args.model:
        print("linmu eval --suite: error: needs --model DIR", file=sys.stderr)
        return 2
    try:
        model, processor = load_demo_teacher(args.model) if not _is_linmu(args.model) else _load_student(args.model)
    except (OSError, ValueError) as e:
        print(f"linmu eval --suite: error: {e}", file=sys.stderr)
        return 2
    frames = args.num_frames or 16
    examples = make_split("test", args.num_samples, frames, start=args.seed)
    res = accuracy(model, processor, examples, batch_size=args.batch_size if args.batch_size > 1 else 16)
    chance = chance_levels()
    print(f"{args.model}: {len(examples)} synthetic test clips of {frames} frames (seed {args.seed})")
    for task, acc in res["per_task"].items():
        print(f"  {task:20s} {acc:6.3f}   (chance {chance[task]:.3f})")
    print(f"  {'overall':20s} {res['accuracy']:6.3f}")
    if args.json:
        print(json.dumps({"accuracy": res["accuracy"], "per_task": res["per_task"], "n": res["n"],
                          "num_frames": frames, "seed": args.seed}))
    return 0


def _is_linmu(path) -> bool:
    from linmu.io import is_linmu_dir

    return is_linmu_dir(path)


def _load_student(path):
    from transformers import AutoTokenizer

    import linmu
    from linmu.demo.teacher import demo_processor

    model = linmu.load(path)
    return model, demo_processor(model.config, AutoTokenizer.from_pretrained(str(path)))


def cmd_demo(args) -> int:
    """`linmu demo --out DIR [--quick] [--ablation NAME] [--retrain-teacher]`."""
    import logging

    from linmu.demo.pipeline import run_demo

    logging.basicConfig(level=logging.WARNING)
    report = run_demo(args.out, quick=args.quick, ablation=args.ablation, retrain_teacher=args.retrain_teacher,
                      settings=args.settings, log=lambda m: print(m, flush=True))
    acc = report["accuracy"]
    for n in acc["teacher"]:
        print(f"{n} frames: teacher {acc['teacher'][n]['accuracy']:.3f}, student {acc['student'][n]['accuracy']:.3f}")
    return 0


def _eval_agreement(args) -> int:
    import json

    from transformers.utils import logging as hf_logging

    from linmu.data.media import MediaError
    from linmu.eval.agreement import format_report, run_agreement
    from linmu.inference.generate import InputError

    hf_logging.disable_progress_bar()
    missing = [f"--{n}" for n in ("teacher", "model", "data") if not getattr(args, n)]
    if missing:
        print(f"linmu eval --agreement: error: needs {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        report = run_agreement(args.teacher, args.model, args.data, tokens=args.tokens, processor=args.processor,
                               media_root=args.media_root, num_frames=args.num_frames, fps=args.fps,
                               max_frames=args.max_frames, max_length=args.max_length, batch_size=args.batch_size,
                               limit=args.limit, dtype=args.dtype, device=args.device)
    except (InputError, MediaError) as e:
        print(f"linmu eval: error: {e}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate from a prompt with images / a video (streaming, TTFT, tokens/s)")
    p.add_argument("--model", required=True, help="LinMU model directory, or a supported teacher checkpoint")
    p.add_argument("--prompt", required=True, help="the question; <image> / <video> mark where media go")
    p.add_argument("--video", help="video file (decoded with PyAV)")
    p.add_argument("--image", nargs="+", action="extend", help="image file(s)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    frames = p.add_mutually_exclusive_group()
    frames.add_argument("--num-frames", type=int, help="frames taken uniformly over the video")
    frames.add_argument("--fps", type=float, help="frames per second to sample (default 2)")
    p.add_argument("--max-frames", type=int, help="cap on the sampled frames (default 128)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--processor", help="directory with the tokenizer / preprocessor (default: --model)")
    p.add_argument("--teacher", action="store_true", help="insist that --model is a teacher checkpoint")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_generate)


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model (--agreement: teacher-student KL, top-1, hidden error)")
    p.add_argument("--agreement", action="store_true",
                   help="teacher-student KL, top-1 agreement and per-layer hidden-state error on --data")
    p.add_argument("--teacher", help="--agreement: teacher checkpoint directory")
    p.add_argument("--model", help="--agreement: LinMU model directory (the student)")
    p.add_argument("--data", help="--agreement: LLaVA-style JSON/JSONL file (grouped by each record's 'task')")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--output", help="also write the JSON report to this file")
    p.add_argument("--tokens", choices=["answer", "nonpad"], default="answer",
                   help="--agreement: positions scored (answer tokens, or every token)")
    p.add_argument("--processor", help="--agreement: tokenizer / preprocessor directory (default: --teacher)")
    p.add_argument("--media-root", help="--agreement: folder media paths are relative to (default: the data's)")
    p.add_argument("--num-frames", type=int)
    p.add_argument("--fps", type=float)
    p.add_argument("--max-frames", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--limit", type=int, help="--agreement: only the first N records")
    p.add_argument("--suite", choices=["synthetic"], help="accuracy of --model on a fresh synthetic test set")
    p.add_argument("--seed", type=int, default=0, help="--suite: offset into the test split's seeds")
    p.add_argument("--num-samples", type=int, default=140, help="--suite: number of clips (tasks round-robin)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_eval)


def cmd_bench(args) -> int:
    """`linmu bench --preset NAME | --model DIR [--tokens LIST | --frames LIST --resolution HxW] --out FILE`."""
    import json
    from pathlib import Path

    from transformers.utils import logging as hf_logging

    from linmu.bench.harness import (BenchError, BenchOptions, format_table, parse_int_list, parse_resolution,
                                     run_bench, summary_line)

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        opts = BenchOptions(
            preset=args.preset, model=args.model, layers=args.layers,
            tokens=parse_int_list(args.tokens, "--tokens") if args.tokens else None,
            frames=parse_int_list(args.frames, "--frames") if args.frames else None,
            resolution=parse_resolution(args.resolution),
            frame_tokens=parse_resolution(args.frame_tokens, "--frame-tokens", "16x16") if args.frame_tokens else None,
            device=args.device, dtype=args.dtype,
            cuda_graphs=args.cuda_graphs, decode=args.decode, decode_steps=args.decode_steps, repeats=args.repeats,
            warmup=args.warmup, max_seconds=args.max_seconds, max_batch=args.max_batch, memory_gib=args.memory_gib,
            seed=args.seed)
        t0 = time.perf_counter()
        partial_path = Path(args.out).with_suffix(".partial.json") if args.out else None

        def save_partial(res):
            partial_path.parent.mkdir(parents=True, exist_ok=True)
            partial_path.write_text(json.dumps(res, indent=2))

        result = run_bench(opts, log=lambda m: print(f"[{time.perf_counter() - t0:6.1f} s] {m}", file=sys.stderr,
                                                     flush=True), partial=save_partial if args.out else None)
    except BenchError as e:
        print(f"linmu bench: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        partial_path.unlink(missing_ok=True)
        print(f"wrote {out}")
        png = Path(args.plot) if args.plot else out.with_suffix(".png")
        try:
            from linmu.bench.plot import plot_result

            print(f"wrote {plot_result(result, png)}")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install -e '.[demo]')", file=sys.stderr)
    print(json.dumps(summary_line(result)))
    return 0


def _add_bench_parser(sub) -> None:
    import argparse

    from linmu.bench.presets import PRESETS

    p = sub.add_parser("bench", help="teacher vs LinMU vs no-attention floor: TTFT, decode tokens/s, memory, cache",
                       description="Measure the teacher, its LinMU student and the floor (teacher with attention "
                                   "skipped) side by side on one device in one dtype; print a table, write JSON and a "
                                   "plot, and print one JSON line of ratios last. docs/BENCHMARKS.md.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=list(PRESETS), help="model shape built with random weights on the device")
    src.add_argument("--model", help="teacher checkpoint or LinMU model directory (Qwen2-VL / Qwen2.5-VL)")
    p.add_argument("--layers", type=int, help="presets: time only this many decoder layers (e.g. for 72B)")
    lengths = p.add_mutually_exclusive_group()
    lengths.add_argument("--tokens", help="context lengths, e.g. 8192,16384 or 8K,128K (default 8K..256K): text, "
                                          "one video span, text")
    lengths.add_argument("--frames", help="video frames through the vision tower, e.g. 64,256 (see --resolution)")
    p.add_argument("--resolution", default="448x448", help="--frames: frame size HxW in pixels (default 448x448)")
    p.add_argument("--frame-tokens", help="--tokens: visual tokens per frame HxW after merging (default: the "
                                          "preset's, 16x16 for real shapes)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32; same for all models")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture one decode step of both models in a CUDA graph (default: on with CUDA)")
    p.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True, help="measure decode (default on)")
    p.add_argument("--decode-steps", type=int, default=16, help="timed consecutive decode steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each prefill measurement")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="stop repeating a prefill measurement once its runs took this long (at least one run)")
    p.add_argument("--max-batch", type=int, help="cap of the largest-batch search (default 4096 on CUDA, 4 on CPU)")
    p.add_argument("--memory-gib", type=float, help="memory budget of the batch search (default: free memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the full result as JSON here (and the plot beside it, .png)")
    p.add_argument("--plot", help="PNG path of the plot (default: --out with .png)")
    p.set_defaults(func=cmd_bench)


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
    _add_generate_parser(sub)
    _add_eval_parser(sub)
    _add_bench_parser(sub)
    from linmu.demo.pipeline import ABLATIONS

    p = sub.add_parser("demo", help="the embedded default: synthetic world, tiny teacher, 3 stages, eval, speed")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="a minutes-long version (CI)")
    p.add_argument("--ablation", default="none", choices=list(ABLATIONS))
    p.add_argument("--retrain-teacher", action="store_true", help="train the teacher here instead of the shipped one")
    p.add_argument("--settings", default=None,
                   help='override demo settings, e.g. "steps=100,100,100;text_window=32;lengths=16,64"; '
                        '"recipe=12.align_text_weight=4 3.lora_r=16" overrides distillation settings per stage')
    p.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
