"""Teacher-student agreement on a data file: KL, top-1 agreement and per-layer hidden-state error, per task.

Both models read the same inputs (the teacher's processor; LLaVA-style records with their answers, teacher-forced)
and are compared position by position:

* ``kl``: forward KL(teacher ‖ student) of the next-token distributions (`linmu.distill.losses.token_kd`, T = 1),
  averaged over the scored target tokens;
* ``top1``: fraction of scored target tokens where both models' argmax agree (`top1_agreement`);
* ``hidden_mse[l]``: mean squared error between the models' hidden states after decoder layer ``l + 1``
  (``output_hidden_states[1:]``; the last entry is the final, normed state), per non-padding position, averaged over
  channels (`alignment_mse`); ``hidden_rel[l]``: the same squared error relative to the teacher's mean square.

Scored tokens (``tokens``): ``"answer"`` (the assistant answers' tokens, `counted_tokens` mode ``answer``) or
``"nonpad"`` (every token). Records without an answer, and records whose media cannot be read, are skipped and
counted by reason (``skipped``), as in training.

Groups: by each record's ``task`` field when it has one, else ``"all"``; ``overall`` pools every record. Averages
are token-weighted (every scored token counts once, whichever sample it is in).

The report (a JSON-able dict)::

    {"teacher": T, "student": S, "data": SPEC, "tokens": "answer", "layers": L,
     "tasks": {"<task>": {"samples": n, "tokens": k, "positions": p, "kl": ..., "top1": ...,
                          "hidden_mse": [L floats], "hidden_rel": [L floats]}, ...},
     "overall": {... same fields ...}, "skipped": {"<reason>": count}, "seconds": s}
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import torch

from ..distill.losses import alignment_mse, counted_tokens, token_kd, top1_agreement

DEFAULT_GROUP = "all"


class _Acc:
    """Token-weighted sums of one group."""

    def __init__(self):
        self.samples = self.tokens = self.positions = 0
        self.kl = self.top1 = 0.0
        self.sq: list[float] = []
        self.ref: list[float] = []

    def add(self, kl, top1, n_tok, sq, ref, n_pos):
        self.samples += 1
        self.tokens += n_tok
        self.positions += n_pos
        self.kl += kl * n_tok
        self.top1 += top1 * n_tok
        if not self.sq:
            self.sq, self.ref = [0.0] * len(sq), [0.0] * len(sq)
        for i, (a, b) in enumerate(zip(sq, ref)):
            self.sq[i] += a
            self.ref[i] += b

    def result(self) -> dict:
        t, p = max(self.tokens, 1), max(self.positions, 1)
        return {"samples": self.samples, "tokens": self.tokens, "positions": self.positions,
                "kl": self.kl / t if self.tokens else None, "top1": self.top1 / t if self.tokens else None,
                "hidden_mse": [s / p for s in self.sq],
                "hidden_rel": [s / r if r > 0 else None for s, r in zip(self.sq, self.ref)]}


def _task_of(sample) -> str:
    task = (getattr(sample, "meta", None) or {}).get("task")
    return str(task) if task not in (None, "") else DEFAULT_GROUP


@torch.inference_mode()
def score_batch(teacher, student, batch: dict, tokens: str = "answer") -> list[dict]:
    """Per-sample agreement of one processed batch (left-padded; ``labels`` mark the answers): a list of
    ``{"kl", "top1", "tokens", "positions", "sq": [per layer], "ref": [per layer]}`` (sums, for pooling)."""
    from ..inference.generate import to_model_inputs

    t_out = teacher(**to_model_inputs(batch, teacher), use_cache=False, output_hidden_states=True)
    s_out = student(**to_model_inputs(batch, student), use_cache=False, output_hidden_states=True)
    nonpad = batch["attention_mask"].bool()
    mask = counted_tokens(batch.get("labels"), nonpad, tokens).to(t_out.logits.device)
    nonpad = nonpad.to(t_out.logits.device)
    t_hidden, s_hidden = t_out.hidden_states[1:], s_out.hidden_states[1:]
    if len(t_hidden) != len(s_hidden):
        raise ValueError(f"the teacher has {len(t_hidden)} decoder layers and the student {len(s_hidden)}")
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        m, pos = mask[i:i + 1], nonpad[i:i + 1]
        n_tok = int(m[:, 1:].sum())  # targets with a predicting position (the causal shift)
        n_pos = int(pos.sum())
        s_logits = s_out.logits[i:i + 1].to(t_out.logits.device)
        kl = float(token_kd(s_logits, t_out.logits[i:i + 1], m)) if n_tok else 0.0
        top1 = float(top1_agreement(s_logits, t_out.logits[i:i + 1], m)) if n_tok else 0.0
        sq, ref = [], []
        for th, sh in zip(t_hidden, s_hidden):
            th_i, sh_i = th[i:i + 1], sh[i:i + 1].to(th.device)
            sq.append(float(alignment_mse(sh_i, th_i, pos.to(th.device))) * n_pos)
            ref.append(float(alignment_mse(torch.zeros_like(th_i), th_i, pos.to(th.device))) * n_pos)
        rows.append({"kl": kl, "top1": top1, "tokens": n_tok, "positions": n_pos, "sq": sq, "ref": ref})
    return rows


def agreement(teacher, student, processor, samples, *, tokens: str = "answer", num_frames=None, fps=None,
              max_frames=None, max_length: int | None = None, batch_size: int = 1, progress=None) -> dict:
    """Agreement report (module docstring) of ``student`` against ``teacher`` on ``samples`` (`linmu.data.Sample`
    list, e.g. from `load_conversations`), batched ``batch_size`` at a time with ``processor`` (a `QwenVLProcessor`).
    ``progress``: optional callable ``(done, total)``."""
    from ..data.dataset import ConversationDataset
    from ..inference.generate import video_sampling

    if tokens not in ("answer", "nonpad"):
        raise ValueError(f"tokens must be 'answer' or 'nonpad', got {tokens!r}")
    sampling = video_sampling(num_frames, fps, max_frames)
    ds = ConversationDataset(samples, processor, max_length=max_length, **sampling)
    groups: "OrderedDict[str, _Acc]" = OrderedDict()
    overall = _Acc()
    t0 = time.perf_counter()
    n_layers = 0
    for start in range(0, len(ds), max(1, int(batch_size))):
        idx = list(range(start, min(start + max(1, int(batch_size)), len(ds))))
        feats = [(i, ds[i]) for i in idx]
        feats = [(i, f) for i, f in feats if f is not None]
        if feats:
            batch = processor.pad([f for _, f in feats])
            for (i, _), row in zip(feats, score_batch(teacher, student, batch, tokens)):
                n_layers = len(row["sq"])
                args = (row["kl"], row["top1"], row["tokens"], row["sq"], row["ref"], row["positions"])
                groups.setdefault(_task_of(ds.samples[i]), _Acc()).add(*args)
                overall.add(*args)
        if progress is not None:
            progress(idx[-1] + 1, len(ds))
    return {"tokens": tokens, "layers": n_layers, "tasks": {k: v.result() for k, v in groups.items()},
            "overall": overall.result(), "skipped": ds.report(), "seconds": time.perf_counter() - t0}


def run_agreement(teacher_dir, student_dir, data, *, tokens: str = "answer", processor=None, media_root=None,
                  num_frames=None, fps=None, max_frames=None, max_length=None, batch_size: int = 1,
                  limit: int | None = None, dtype=None, device=None, progress=None) -> dict:
    """`agreement` from directories and a data file: ``teacher_dir`` (a supported teacher), ``student_dir`` (a LinMU
    model), ``data`` (LLaVA-style JSON/JSONL; media relative to ``media_root``, default the file's folder).
    The processor is the teacher's (``processor`` overrides its directory). Raises
    `linmu.inference.generate.InputError` (one line) for unusable directories, files or options."""
    from ..data.conversations import load_conversations
    from ..inference.generate import InputError, load_model, video_sampling

    video_sampling(num_frames, fps, max_frames)
    data = Path(data)
    if not data.is_file():
        raise InputError(f"data file {data} does not exist" if not data.exists() else f"{data} is not a file")
    t = load_model(teacher_dir, teacher=True, processor=processor, dtype=dtype, device=device)
    s = load_model(student_dir, teacher=False, processor=processor or teacher_dir, dtype=dtype, device=device)
    tv, sv = t.model.config.get_text_config().vocab_size, s.model.config.get_text_config().vocab_size
    if tv != sv:
        raise InputError(f"teacher vocabulary {tv} and student vocabulary {sv} differ: not a teacher-student pair")
    samples = load_conversations(data, media_root)
    if limit is not None:
        samples = samples[: int(limit)]
    if not samples:
        raise InputError(f"{data} holds no records")
    report = agreement(t.model, s.model, t.processor, samples, tokens=tokens, num_frames=num_frames, fps=fps,
                       max_frames=max_frames, max_length=max_length, batch_size=batch_size, progress=progress)
    return {"teacher": str(teacher_dir), "student": str(student_dir), "data": str(data), **report}


def _fmt(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def format_report(report: dict) -> str:
    """The report as a text table: one line per task and one for all records, then the per-layer hidden error."""
    lines = [f"agreement of {report.get('student', 'student')} with teacher {report.get('teacher', 'teacher')}"
             f" on {report.get('data', 'data')} ({report['tokens']} tokens, {report['layers']} layers)"]
    head = f"{'task':<24} {'samples':>7} {'tokens':>7} {'KL':>9} {'top-1':>7}  hidden rel. error (first .. last layer)"
    lines += [head, "-" * len(head)]
    rows = list(report["tasks"].items()) + [("overall", report["overall"])]
    for name, r in rows:
        rel = r["hidden_rel"]
        span = f"{_fmt(rel[0], '.3e')} .. {_fmt(rel[-1], '.3e')}" if rel else "-"
        lines.append(f"{name:<24} {r['samples']:>7} {r['tokens']:>7} {_fmt(r['kl']):>9} {_fmt(r['top1'], '.3f'):>7}"
                     f"  {span}")
    ov = report["overall"]
    if ov["hidden_mse"]:
        lines.append("per-layer hidden MSE (overall): " + " ".join(_fmt(v, ".3e") for v in ov["hidden_mse"]))
    skipped = report.get("skipped") or {}
    lines.append("skipped: " + (", ".join(f"{k}={v}" for k, v in skipped.items()) if skipped else "none"))
    return "\n".join(lines)


__all__ = ["agreement", "run_agreement", "score_batch", "format_report", "DEFAULT_GROUP"]
