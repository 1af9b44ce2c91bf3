"""lmms-eval model plugin: ``lmms-eval --model linmu --model_args pretrained=DIR[,k=v...] --tasks ...``.

One class, `LinMULmms`, serves LinMU models and their teachers: the kind is read from ``DIR/config.json``
(``teacher=auto``, the default), or forced with ``teacher=true`` / ``teacher=false``. It is a "simple" lmms-eval model
(``is_simple = True``) implementing ``generate_until`` and ``loglikelihood`` over images (PIL images or image files)
and videos (video files, decoded with PyAV; or uint8 frame arrays).

lmms-eval finds it through the entry point ``linmu = "linmu.eval.lmms_plugin:MANIFEST"`` of the group
``lmms_eval.models`` (declared in linmu's ``pyproject.toml``; active once linmu is installed), so lmms-eval itself is
not edited. Install with ``pip install -e ".[eval]"`` or, lighter, ``pip install --no-deps lmms-eval==0.7.3`` plus
``loguru pytz evaluate tenacity sacrebleu pytablewriter`` (docs/EVAL.md).

``model_args`` (all optional but ``pretrained``):

=================  ==========================================================================================
pretrained         LinMU model directory or supported teacher checkpoint directory
teacher            ``auto`` (default: from config.json), ``true`` (must be a teacher), ``false`` (must be LinMU)
processor          directory with the tokenizer and ``preprocessor_config.json`` (default: ``pretrained``; a
                   LinMU directory from ``save_pretrained`` has no tokenizer: pass the teacher's directory)
device             ``cuda`` / ``cuda:N`` / ``cpu`` (default: ``cuda:$LOCAL_RANK`` when CUDA is available)
dtype              ``bfloat16`` / ``float16`` / ``float32`` / ``auto`` (default: the checkpoint's)
batch_size         requests per ``generate`` call (left-padded); ``loglikelihood`` runs one request at a time
num_frames | fps   video frame sampling (default ``fps=2``); ``max_frames`` caps it (default 128)
max_pixels, min_pixels, video_max_pixels, video_min_pixels   processor resolution bounds
max_new_tokens     default when a task's ``generation_kwargs`` has none (128)
max_length         prompts longer than this many tokens are treated as failed requests
system_prompt      replaces the processor's system prompt (``none`` drops it)
ll_convention      ``nll`` (default) or ``logprob``: the sign of ``loglikelihood`` scores (see below)
strict             ``false`` (default): an unreadable image/video is logged and answered with "" (generate) or
                   the worst score (loglikelihood), and counted in ``failed_requests``; ``true``: it raises
=================  ==========================================================================================

Prompt: one user turn, the request's visuals first (in ``doc_to_visual`` order; ``<image>`` / ``<video>`` tags in
the context are dropped), then the context, then the assistant prompt; generation is greedy unless the task asks
for ``temperature > 0`` / ``do_sample``; the answer is cut at the first ``until`` string.
``loglikelihood`` scores the continuation's tokens (leading whitespace dropped, tokenized alone, appended to the
assistant prompt) and says whether greedy decoding would produce exactly them; the prompt of consecutive requests on
the same document (the choices of a ``multiple_choice`` task) is built once. The score follows lmms-eval 0.7.3's
convention, not lm-eval's: its ``multiple_choice`` scorer takes the *argmin* ("we return the actual loss"), so the
default ``ll_convention=nll`` returns the summed negative log-likelihood ``-log p(continuation | prompt)`` (lower is
better); ``ll_convention=logprob`` returns ``log p`` (higher is better) for harnesses that take the argmax.
lmms-eval 0.7.3 stringifies loglikelihood results before scoring (every ``multiple_choice`` task fails with
``too many values to unpack``); instantiating this class wraps that step so ``(float, bool)`` results pass through.
``output_type: loglikelihood`` tasks stay broken in 0.7.3 (``process_results`` unpacks the list of results).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from loguru import logger as eval_logger
from tqdm import tqdm

from ..data.media import MediaError
from ..inference.generate import (InputError, Media, load_media, load_model, prompt_sample, to_model_inputs,
                                  video_sampling)

MANIFEST = ModelManifest(model_id="linmu", simple_class_path="linmu.eval.lmms_plugin.LinMULmms")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_FALSE, _TRUE = {"0", "false", "no", "off", "n"}, {"1", "true", "yes", "on", "y"}


def _as_bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"model_args {name}={value!r}: expected true or false")


def _teacher_arg(value):
    if value is None or str(value).strip().lower() in ("", "auto", "none"):
        return None
    return _as_bool(value, "teacher")


def _opt(value, cast):
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return cast(value)


def _flatten(visuals) -> list:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        out = []
        for v in visuals:
            out.extend(_flatten(v))
        return out
    return [visuals]


def split_visuals(visuals) -> tuple[list, list]:
    """``doc_to_visual`` output -> (images, videos): PIL images, image files and (H, W, 3) arrays are images;
    other files and (T, H, W, 3) arrays are videos."""
    images, videos = [], []
    for v in _flatten(visuals):
        if hasattr(v, "convert") and hasattr(v, "size"):  # PIL image
            images.append(v.convert("RGB"))
        elif isinstance(v, (str, Path)):
            (images if str(v).lower().endswith(IMAGE_SUFFIXES) else videos).append(str(v))
        elif isinstance(v, (np.ndarray, torch.Tensor)):
            a = v.numpy() if torch.is_tensor(v) else v
            if a.ndim == 3:
                images.append(a.astype(np.uint8))
            elif a.ndim == 4:
                videos.append(a.astype(np.uint8))
            else:
                raise ValueError(f"unsupported visual array of shape {a.shape}")
        else:
            raise ValueError(f"unsupported visual of type {type(v).__name__} (images, image/video files or frame "
                             "arrays only)")
    return images, videos


def clean_context(context: str) -> str:
    return context.replace("<image>", "").replace("<video>", "").strip()


def _keep_loglikelihood_tuples() -> None:
    """Work around lmms-eval 0.7.3: its evaluator passes every model output through ``unwrap_generation_output``,
    which turns a loglikelihood ``(float, bool)`` into its ``str()``, so ``multiple_choice`` scoring fails for every
    model (``too many values to unpack``). Wrap it so that such tuples pass unchanged; a no-op once fixed upstream."""
    import lmms_eval.evaluator as ev

    orig = getattr(ev, "unwrap_generation_output", None)
    if orig is None or getattr(orig, "_linmu_keeps_tuples", False) or not isinstance(orig((0.0, False))[0], str):
        return

    def unwrap_generation_output(output):
        if (isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], float)
                and isinstance(output[1], bool)):
            return output, None
        return orig(output)

    unwrap_generation_output._linmu_keeps_tuples = True
    ev.unwrap_generation_output = unwrap_generation_output


class LinMULmms(lmms):
    """lmms-eval model over a LinMU model or its teacher (module docstring lists the ``model_args``)."""

    is_simple = True

    def __init__(self, pretrained: str, teacher=None, processor: str | None = None, device: str | None = None,
                 dtype: str | None = None, batch_size=1, max_batch_size=None, num_frames=None, fps=None,
                 max_frames=None, max_pixels=None, min_pixels=None, video_max_pixels=None, video_min_pixels=None,
                 max_new_tokens=128, max_length=None, system_prompt: str | None = "", ll_convention: str = "nll",
                 strict=False, **kwargs):
        super().__init__()
        _keep_loglikelihood_tuples()
        if kwargs:
            raise ValueError(f"unknown model_args for --model linmu: {', '.join(sorted(kwargs))}")
        if ll_convention not in ("nll", "logprob"):
            raise ValueError(f"model_args ll_convention={ll_convention!r}: expected nll or logprob")
        self.ll_convention = ll_convention
        if device in (None, "", "auto"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.sampling = dict(num_frames=_opt(num_frames, int), fps=_opt(fps, float), max_frames=_opt(max_frames, int))
        video_sampling(**self.sampling)  # option errors before the weights are read
        self.lm = load_model(pretrained, teacher=_teacher_arg(teacher), processor=_opt(processor, str), dtype=dtype,
                             device=self._device)
        self.processor = self.lm.processor
        for name, value in (("max_pixels", max_pixels), ("min_pixels", min_pixels),
                            ("video_max_pixels", video_max_pixels), ("video_min_pixels", video_min_pixels)):
            if _opt(value, int) is not None:
                setattr(self.processor, name, int(value))
        if system_prompt not in ("", None):
            self.processor.system_prompt = None if str(system_prompt).lower() == "none" else str(system_prompt)
        bs = str(batch_size).strip()
        self.batch_size_per_gpu = max(1, int(bs)) if bs.isdigit() else 1  # "auto" / None: one at a time
        self.max_new_tokens = int(max_new_tokens)
        self.max_length = _opt(max_length, int)
        self.strict = _as_bool(strict, "strict")
        self.failed_requests = 0
        self._last_features = None
        eval_logger.info(f"linmu: loaded {self.lm.kind} {self.lm.family} model from {pretrained} on {self._device}")

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def model(self):
        return self.lm.model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def kind(self) -> str:
        return self.lm.kind

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    # ------------------------------------------------------------------------------------------------ inputs
    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _media(self, doc_to_visual, task, split, doc_id) -> Media:
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else None
        images, videos = split_visuals(visuals)
        return load_media(images, videos, **self.sampling)

    def _fail(self, what: str, e: Exception):
        if self.strict:
            raise e
        self.failed_requests += 1
        eval_logger.warning(f"linmu: {what} failed ({type(e).__name__}: {e}); scored as a wrong answer")

    def _features(self, context, doc_to_visual, task, split, doc_id):
        key = (task, split, doc_id, context)
        if self._last_features is not None and self._last_features[0] == key:  # multiple choice: same prompt
            return self._last_features[1]
        media = self._media(doc_to_visual, task, split, doc_id)
        sample = prompt_sample(clean_context(context), media, sid=f"{task}/{split}/{doc_id}")
        features = self.processor.encode(sample, max_length=self.max_length, add_generation_prompt=True)
        self._last_features = (key, features)
        return features

    # ------------------------------------------------------------------------------------------------ generation
    def _generation_kwargs(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        gk = dict(gen_kwargs or {})
        until = gk.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        temperature = float(gk.get("temperature") or 0.0)
        do_sample = bool(gk.get("do_sample", False)) or temperature > 0
        out = dict(max_new_tokens=int(gk.get("max_new_tokens") or self.max_new_tokens), do_sample=do_sample,
                   pad_token_id=self.processor.pad_token_id)
        if do_sample:
            out["temperature"] = temperature if temperature > 0 else 1.0
            if gk.get("top_p") is not None:
                out["top_p"] = float(gk["top_p"])
        if int(gk.get("num_beams") or 1) > 1:
            out["num_beams"] = int(gk["num_beams"])
        return out, [u for u in until if u]

    @staticmethod
    def _cut(text: str, until: list[str]) -> str:
        stop = len(text)
        for u in until:
            i = text.find(u)
            if i >= 0:
                stop = min(stop, i)
        return text[:stop].strip()

    @torch.inference_mode()
    def generate_until(self, requests) -> list[str]:
        args = [r.args for r in requests]
        res: list[str | None] = [None] * len(args)
        pbar = tqdm(total=len(args), disable=(self.rank != 0), desc="linmu generate_until")
        i = 0
        while i < len(args):
            # a chunk: up to batch_size consecutive requests with the same generation kwargs
            key = repr(sorted((args[i][1] or {}).items()))
            chunk = [i]
            while (len(chunk) < self.batch_size and i + len(chunk) < len(args)
                   and repr(sorted((args[i + len(chunk)][1] or {}).items())) == key):
                chunk.append(i + len(chunk))
            i += len(chunk)
            feats, keep = [], []
            for j in chunk:
                context, _, doc_to_visual, doc_id, task, split = args[j]
                try:
                    feats.append(self._features(context, doc_to_visual, task, split, doc_id))
                    keep.append(j)
                except (MediaError, InputError, ValueError) as e:
                    self._fail(f"request {task}/{doc_id}", e)
                    res[j] = ""
            if feats:
                gen, until = self._generation_kwargs(args[chunk[0]][1])
                batch = self.processor.pad(feats)
                inputs = to_model_inputs(batch, self.model)
                out = self.model.generate(**inputs, **gen)
                new = out[:, inputs["input_ids"].shape[1]:]
                for j, ids in zip(keep, new):
                    text = self._cut(self.tokenizer.decode(ids, skip_special_tokens=True), until)
                    res[j] = text
                    self.cache_hook.add_partial("generate_until", (args[j][0], args[j][1]), text)
            pbar.update(len(chunk))
        pbar.close()
        if self.failed_requests:
            eval_logger.warning(f"linmu: {self.failed_requests} request(s) failed so far (strict=false)")
        return [r if r is not None else "" for r in res]

    @torch.inference_mode()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        res = []
        pbar = tqdm(total=len(requests), disable=(self.rank != 0), desc="linmu loglikelihood")
        for context, doc_to_target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            continuation = doc_to_target if isinstance(doc_to_target, str) else \
                doc_to_target(self._doc(task, split, doc_id))
            try:
                f = self._features(context, doc_to_visual, task, split, doc_id)
            except (MediaError, InputError, ValueError) as e:
                self._fail(f"request {task}/{doc_id}", e)
                res.append((float("inf") if self.ll_convention == "nll" else float("-inf"), False))
                pbar.update(1)
                continue
            res.append(self._score(f, str(continuation)))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), res[-1])
            pbar.update(1)
        pbar.close()
        return res

    def _score(self, features: dict, continuation: str) -> tuple[float, bool]:
        # the answer opens the assistant turn: lm-eval's target delimiter (a leading space) is dropped
        cont = self.tokenizer(continuation.lstrip(), add_special_tokens=False)["input_ids"]
        if not cont:
            return 0.0, True
        cont = torch.tensor(cont, dtype=torch.long)
        n = len(features["input_ids"])
        feats = dict(features)
        feats["input_ids"] = torch.cat([features["input_ids"], cont])
        feats["attention_mask"] = torch.ones_like(feats["input_ids"])
        feats["mm_token_type_ids"] = torch.cat([features["mm_token_type_ids"], torch.zeros_like(cont)])
        feats["labels"] = torch.full_like(feats["input_ids"], -100)
        inputs = to_model_inputs(self.processor.pad([feats]), self.model)
        logits = self.model(**inputs, use_cache=False).logits[0, n - 1:-1].float()
        logp = torch.log_softmax(logits, -1)
        target = cont.to(logp.device)
        total = float(logp.gather(-1, target[:, None]).sum())
        greedy = bool((logp.argmax(-1) == target).all())
        return (-total if self.ll_convention == "nll" else total), greedy

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("multi-round generation is not implemented for --model linmu")


__all__ = ["LinMULmms", "MANIFEST", "split_visuals", "clean_context"]
