"""A small offline tokenizer with the Qwen-VL special tokens and the Qwen2-VL chat template.

Model: the `tokenizers` WordPiece model with an empty continuation prefix, used as a *whole-word-or-characters*
tokenizer. Text is pre-split into pieces ``" ?[a-z]+"`` (a lower-case word with its leading space), ``" ?[0-9]"``
(one digit with its leading space) and single other characters (punctuation, upper case, newlines, extra spaces).
A piece in the vocabulary is one token; any other piece is spelled with single-character tokens (greedy longest
match), so every printable-ASCII text round-trips exactly (``decode(encode(x)) == x``; the decoder concatenates).
Characters outside printable ASCII map to ``<|unk|>``.

Vocabulary order (deterministic, so ids are reproducible from the same inputs): the special tokens (fixed ids
0..7), the printable ASCII characters, ``" 0"``..``" 9"``, the template words, then the given ``vocab`` words and the
words of ``texts`` (each with and without a leading space), in first-seen order.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<|unk|>"]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL-Instruct's chat template (content may be a string or a list of {"type": "image"|"video"|"text"}).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_PIECE = r" ?[a-z]+| ?[0-9]|[^a-z0-9]"
_WORD = re.compile(r"[a-z]+")
_TEMPLATE_WORDS = ["system", "user", "assistant", "you", "are", "a", "helpful", "picture", "video", "image"]


def _words(texts: Iterable[str]):
    for t in texts:
        yield from _WORD.findall(t)


def build_tokenizer(texts: Iterable[str] | None = None, vocab: Iterable[str] | None = None,
                    model_max_length: int = 1 << 20):
    """Build a `transformers.PreTrainedTokenizerFast` offline (see the module docstring).

    ``texts``: strings whose lower-case words become single tokens; ``vocab``: extra words (lower-case ``[a-z]+``).
    Special tokens: ``<|endoftext|>`` (pad and eos), ``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``,
    ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``, ``<|unk|>``; the tokenizer also exposes
    ``image_token``/``video_token``/``vision_start_token``/``vision_end_token`` (and ``*_id``) like Qwen's.
    Padding side is left. Save with ``save_pretrained`` and load with ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table: dict[str, int] = {}

    def add(tok: str):
        if tok not in table:
            table[tok] = len(table)

    for t in SPECIAL_TOKENS:
        add(t)
    for c in sorted(set(string.printable)):
        add(c)
    for d in string.digits:
        add(" " + d)
    extra = list(vocab or [])
    bad = [w for w in extra if not _WORD.fullmatch(w)]
    if bad:
        raise ValueError(f"vocab words must be lower-case [a-z]+, got {bad[:5]}")
    for w in [*_TEMPLATE_WORDS, *extra, *_words(texts or [])]:
        add(w)
        add(" " + w)

    model = models.WordPiece(vocab=table, unk_token="<|unk|>", continuing_subword_prefix="",
                             max_input_chars_per_word=1000)
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|unk|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
        clean_up_tokenization_spaces=False, padding_side="left", model_max_length=model_max_length,
    )
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tok


__all__ = ["build_tokenizer", "SPECIAL_TOKENS", "QWEN2_VL_CHAT_TEMPLATE", "DEFAULT_SYSTEM_PROMPT"]
