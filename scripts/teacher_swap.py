"""Where does a demo student lose accuracy? Put the teacher's attention back, one layer and one kind of position at
a time, and score the hybrid on test clips.

    python scripts/teacher_swap.py RUN_DIR [--student DIR] [--frames 16] [--n 540] [--tasks flash_order,flash_count]

RUN_DIR is a `linmu demo --out` directory (its ``teacher/`` and, unless ``--student`` names another checkpoint, e.g.
``RUN_DIR/runs/stage2/final``, its ``student/``). For every decoder layer ``l`` and for all layers at once, the M-MATE
block's output is replaced by the teacher attention's output on the same layer input (the rest of the student
unchanged) at every position, at text positions only, or at visual positions only. Accuracy is teacher-forced:
a clip counts when the model's argmax matches every answer token (for the demo's one-word answers this equals the
greedy answer of `linmu eval`). Prints one table: accuracy per task type of each hybrid.

A swap that recovers the teacher's accuracy names the layer and the positions whose student output is missing what
the answer needs (docs/DEMO.md, "Why the flash tasks trailed").
"""

import argparse
from collections import defaultdict

import torch

from linmu.demo.pipeline import SyntheticSet
from linmu.demo.teacher import load_demo_teacher
from linmu.demo.vision_attention import vision_attention
from linmu.denormals import flush_denormals
from linmu.distill.stages import _teacher_decoder_layers
from linmu.inference.generate import to_model_inputs
from linmu.io import load
from linmu.synthetic import TASKS, make_split


def install_swaps(student, teacher, where: dict):
    """Wrap every M-MATE block so that ``where[layer]`` ("all", "text" or "visual") takes the teacher's output there."""
    for i, (block, layer) in enumerate(zip(student.mmate_blocks(), _teacher_decoder_layers(teacher))):
        original = block.forward

        def forward(hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                    position_embeddings=None, linmu_layout=None, _orig=original, _attn=layer.self_attn, _i=i, **kw):
            out, _ = _orig(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=past_key_values, position_embeddings=position_embeddings,
                           linmu_layout=linmu_layout, **kw)
            mode = where.get(_i)
            if mode is None:
                return out, None
            ref, _ = _attn(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                           position_embeddings=position_embeddings, **kw)
            visual = linmu_layout.is_visual[..., None]
            take = {"all": torch.ones_like(visual), "text": ~visual, "visual": visual}[mode]
            return torch.where(take, ref, out), None

        block.forward = forward


@torch.no_grad()
def accuracy(model, batches, tasks) -> dict:
    hits, counts, k = defaultdict(int), defaultdict(int), 0
    for batch in batches:
        logits = model(**to_model_inputs(batch, model), use_cache=False).logits
        target = batch["labels"][:, 1:]
        ok = ((logits[:, :-1].argmax(-1) == target) | (target == -100)).all(-1)
        for hit in ok.tolist():
            counts[tasks[k]] += 1
            hits[tasks[k]] += int(hit)
            k += 1
    out = {t: hits[t] / counts[t] for t in counts}
    out["overall"] = sum(hits.values()) / max(sum(counts.values()), 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--student", help="student checkpoint (default RUN_DIR/student)")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--n", type=int, default=540, help="test clips (round-robin over the task types)")
    ap.add_argument("--tasks", default="", help="comma-separated task types to keep (default: all)")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    teacher, processor = load_demo_teacher(f"{args.run_dir}/teacher")
    student = load(args.student or f"{args.run_dir}/student").eval()
    examples = make_split("test", args.n, args.frames)
    if args.tasks:
        keep = set(args.tasks.split(","))
        if keep - set(TASKS):
            raise SystemExit(f"unknown task types {sorted(keep - set(TASKS))}; known: {', '.join(TASKS)}")
        examples = [e for e in examples if e.task in keep]
    data = SyntheticSet(examples, processor)
    batches = [processor.pad([data[j] for j in range(i, min(i + args.batch_size, len(data)))])
               for i in range(0, len(data), args.batch_size)]
    tasks = [e.task for e in examples]
    where: dict = {}
    install_swaps(student, teacher, where)
    n_layers = len(student.mmate_blocks())
    rows = []
    with flush_denormals(), vision_attention(teacher), vision_attention(student):
        rows.append(("teacher", accuracy(teacher, batches, tasks)))
        rows.append(("student", accuracy(student, batches, tasks)))
        for layers, name in [([l], str(l)) for l in range(n_layers)] + [(list(range(n_layers)), "all")]:
            for mode in ("all", "text", "visual"):
                where.clear()
                where.update({l: mode for l in layers})
                rows.append((f"teacher at layer {name}, {mode} positions", accuracy(student, batches, tasks)))
                print(f"{rows[-1][0]}: {rows[-1][1]['overall']:.3f}", flush=True)
    cols = [t for t in TASKS if t in rows[0][1]] + ["overall"]
    print("| model | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, acc in rows:
        print(f"| {name} | " + " | ".join(f"{acc[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
