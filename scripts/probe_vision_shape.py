"""Linear probe: how well does a demo teacher's vision tower encode shape? (docs/SYNTHETIC.md, learnability notes)

    python scripts/probe_vision_shape.py --teacher linmu/demo/assets/teacher [--n 1200]

For `image_position` images (3-4 objects of distinct colours and shapes), take the vision tower's merged token of the
asked cell, fit a logistic regression of that object's shape (the object whose colour is the answer) on the first
75% and print its accuracy on the rest (chance about 0.25), for the trained tower and for the same architecture at
random initialisation.
"""

import argparse

import torch
import torch.nn.functional as F
from transformers import Qwen2VLForConditionalGeneration

from linmu.demo.teacher import demo_teacher_config, demo_tokenizer, load_demo_teacher
from linmu.synthetic import generate_example, to_loaded_sample
from linmu.synthetic.world import SHAPES

p = argparse.ArgumentParser()
p.add_argument("--teacher", required=True)
p.add_argument("--n", type=int, default=1200)
p.add_argument("--seed", type=int, default=3_000_000)
a = p.parse_args()
torch.manual_seed(0)
trained, proc = load_demo_teacher(a.teacher)
random_init = Qwen2VLForConditionalGeneration(demo_teacher_config(demo_tokenizer())).eval()
examples = [generate_example(a.seed + i, "image_position", 1) for i in range(a.n)]


def features(model):
    xs, ys = [], []
    for e in examples:
        b = proc.encode(to_loaded_sample(e))
        with torch.no_grad():
            out = model.model.visual(b["pixel_values"].float(), grid_thw=b["image_grid_thw"])
        f = out.pooler_output if getattr(out, "pooler_output", None) is not None else out
        f = f[0] if isinstance(f, (tuple, list)) else f
        xs.append(f.reshape(-1, f.shape[-1])[e.metadata["query"]["cell"]].float())
        shape = next(o["shape"] for o in e.metadata["objects"] if o["colour"] == e.answer)
        ys.append(SHAPES.index(shape))
    return torch.stack(xs), torch.tensor(ys)


cut = int(0.75 * a.n)
for name, model in (("trained", trained), ("random init", random_init)):
    X, Y = features(model)
    X = (X - X[:cut].mean(0)) / (X[:cut].std(0) + 1e-6)
    W = torch.zeros(X.shape[1], len(SHAPES), requires_grad=True)
    b0 = torch.zeros(len(SHAPES), requires_grad=True)
    opt = torch.optim.Adam([W, b0], lr=1e-2)
    for _ in range(500):
        loss = F.cross_entropy(X[:cut] @ W + b0, Y[:cut]) + 1e-3 * W.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = ((X[cut:] @ W + b0).argmax(1) == Y[cut:]).float().mean().item()
    print(f"{name}: linear probe of shape on held-out images {acc:.3f} (chance {1 / len(SHAPES):.2f})", flush=True)
