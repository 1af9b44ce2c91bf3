"""What every LinMU family class shares: M-MATE layers built in ``__init__``, the fixed-size cache for ``generate``,
and conversion from a teacher as an explicit key table.

A family file defines ``class LinMU<Family>(LinMUMixin, <TeacherClass>)`` with

- ``linmu_family``: its key in :data:`linmu.convert.FAMILIES`;
- ``linmu_decoder_layers()``: the language decoder's layer list;
- ``forward`` with the teacher's explicit signature (``generate`` validates kwargs against it) that builds the
  :class:`~linmu.layout.TokenLayout` from the family's own inputs once per forward, passes it down as
  ``linmu_layout=...``, and skips it while decoding from a filled cache (new tokens are text).

The LinMU settings travel inside the transformers config (``config.linmu``: the MMateConfig as a dict,
``config.linmu_family``), so ``save_pretrained`` / ``from_pretrained`` round-trip the whole model.
"""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..config import MMateConfig
from ..inference.cache import LinMUCache
from ..layers.mmate import MMate
from ..layout import TokenLayout

# teacher attention tensors, relative to a decoder layer's `self_attn.`
_ATTN_KEY = re.compile(r"^(?P<prefix>.*\.)(?P<name>(q|k|v|o)_proj|q_norm|k_norm)\.(?P<p>\w+)$")


def token_runs(mask) -> list[tuple[int, int]]:
    """Maximal runs of True in a 1-D boolean mask, as ``(start, end)`` pairs (end exclusive)."""
    flags = [bool(v) for v in mask.tolist()]
    runs, i = [], 0
    while i < len(flags):
        if flags[i]:
            j = i
            while j < len(flags) and flags[j]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


class LinMUMixin:
    linmu_family: str = ""
    # inputs that generate() consumes while pre-encoding images/videos but the layout still needs
    linmu_layout_inputs: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # forward = the teacher class's forward plus `linmu_layout`, with the teacher's exact signature (generate()
        # validates model kwargs against it, and it differs between transformers versions)
        if not issubclass(cls, nn.Module):
            return  # an intermediate mixin: the concrete family class gets the forward
        parent = next(b.__dict__["forward"] for b in cls.__mro__[1:]
                      if "forward" in b.__dict__ and not issubclass(b, LinMUMixin))
        sig = inspect.signature(parent)
        params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        params.append(inspect.Parameter("linmu_layout", inspect.Parameter.KEYWORD_ONLY, default=None))
        params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))

        def forward(self, *args, **kwargs):
            bound = sig.bind(self, *args, **kwargs)
            inputs = {k: v for k, v in bound.arguments.items() if k not in ("self", "kwargs")}
            inputs.update(bound.arguments.get("kwargs", {}))
            if inputs.get("linmu_layout") is None and not self.linmu_decoding(inputs.get("past_key_values")):
                inputs["linmu_layout"] = self.linmu_layout(inputs)
            return parent(self, **inputs)

        forward.__signature__ = sig.replace(parameters=params)
        forward.__doc__ = parent.__doc__
        cls.forward = forward

    def linmu_layout(self, inputs: dict) -> TokenLayout:
        """The token layout of one forward, from the family's own inputs (input_ids, grids, attention_mask...)."""
        raise NotImplementedError

    def _prepare_multimodal_encoder_kwargs_for_generation(self, model_kwargs):
        keep = {k: model_kwargs[k] for k in self.linmu_layout_inputs if model_kwargs.get(k) is not None}
        model_kwargs = super()._prepare_multimodal_encoder_kwargs_for_generation(model_kwargs)
        model_kwargs.update(keep)
        return model_kwargs

    def __init__(self, config, *args, **kwargs):
        if getattr(config, "linmu", None) is None:
            raise ValueError(f"{type(self).__name__} needs config.linmu (the MMateConfig as a dict); "
                             "build it with linmu.convert(teacher) or load it with linmu.load(dir)")
        super().__init__(config, *args, **kwargs)
        cfg = self.linmu_config
        for i, layer in enumerate(self.linmu_decoder_layers()):
            layer.self_attn = MMate.from_attention(layer.self_attn, i, cfg)

    @property
    def linmu_config(self) -> MMateConfig:
        return MMateConfig.from_dict(dict(self.config.linmu))

    def linmu_decoder_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def mmate_blocks(self) -> list[MMate]:
        return [layer.self_attn for layer in self.linmu_decoder_layers()]

    @staticmethod
    def linmu_decoding(past_key_values) -> bool:
        return past_key_values is not None and past_key_values.get_seq_length() > 0

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        # a pre-allocated, fixed-size LinMUCache instead of transformers' growing DynamicCache
        if model_kwargs.get("past_key_values") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode,
                                                         batch_size, max_cache_length)
        model_kwargs["past_key_values"] = LinMUCache(self.mmate_blocks(), batch_size, max_cache_length)


@dataclass
class ConversionReport:
    """Where every teacher tensor went (LINMU.md: conversion is a visible mapping)."""

    reused: dict[str, list[str]] = field(default_factory=dict)  # teacher key -> student keys
    dropped: list[str] = field(default_factory=list)  # teacher keys with no student counterpart
    new: list[str] = field(default_factory=list)  # student keys initialised fresh (M-MATE's own parameters)


def student_key_table(teacher_keys, student_keys, mmate_prefixes) -> ConversionReport:
    """Map teacher tensor names to student ones.

    The attention tensors of a replaced layer (``<prefix>q_proj.weight`` for a ``<prefix>`` in ``mmate_prefixes``,
    e.g. ``model.language_model.layers.3.self_attn.``) go to both branches (``<prefix>flex.q_proj.weight`` and
    ``<prefix>swin.q_proj.weight``); every other tensor (vision tower attention included) keeps its name.
    """
    student_keys = set(student_keys)
    prefixes = tuple(mmate_prefixes)
    rep = ConversionReport()
    for k in teacher_keys:
        m = _ATTN_KEY.match(k)
        if m and m["prefix"] in prefixes:
            targets = [f"{m['prefix']}{branch}.{m['name']}.{m['p']}" for branch in ("flex", "swin")]
        else:
            targets = [k]
        targets = [t for t in targets if t in student_keys]
        if targets:
            rep.reused[k] = targets
        else:
            rep.dropped.append(k)
    covered = {t for ts in rep.reused.values() for t in ts}
    rep.new = sorted(student_keys - covered)
    return rep


def convert_family(teacher: nn.Module, student_cls: type, config: MMateConfig):
    """Build ``student_cls`` from the teacher's config and copy every teacher tensor through the key table."""
    cfg = copy.deepcopy(teacher.config)
    cfg.linmu = config.to_dict()
    cfg.linmu_family = student_cls.linmu_family
    cfg.architectures = [student_cls.__name__]
    ref = next(teacher.parameters())
    student = student_cls._from_config(cfg, dtype=ref.dtype).to(ref.device)
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    prefixes = {name + "." for name, m in student.named_modules() if isinstance(m, MMate)}
    rep = student_key_table(t_state.keys(), s_state.keys(), prefixes)
    with torch.no_grad():
        for tk, sks in rep.reused.items():
            for sk in sks:
                if s_state[sk].shape != t_state[tk].shape:
                    raise ValueError(f"shape mismatch converting {tk} -> {sk}: {tuple(t_state[tk].shape)} vs "
                                     f"{tuple(s_state[sk].shape)}")
                s_state[sk].copy_(t_state[tk])
    # anything new must be an M-MATE parameter; a new tensor elsewhere would mean a mapping bug
    stray = [k for k in rep.new if not k.startswith(tuple(prefixes))]
    if stray:
        raise RuntimeError(f"student tensors with no teacher source outside the M-MATE blocks: {stray[:5]}")
    # eos/pad/suppressed tokens and sampling defaults belong to the model, not to its attention
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    student.linmu_conversion = rep
    student.train(teacher.training)
    return student
