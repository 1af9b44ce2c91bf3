import pytest

from linmu.data import build_tokenizer
from linmu.data.tokenizer import SPECIAL_TOKENS

SUITE_TEXTS = [
    "how many red circles appear in the video?",
    "which shape appears first: the blue square or the green triangle?",
    "3",
    "the red circle is left of the blue square.",
    "answer with one word, please! (yes/no)",
    "frame 12 shows 4 shapes; frame 130 shows 0.",
]


def test_round_trip_and_word_tokens():
    tok = build_tokenizer(SUITE_TEXTS)
    for t in SUITE_TEXTS + ["unseen zebra words 987 & symbols ~ {x}", "Upper Case\tand\nnew lines  double"]:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == t
        assert tok.unk_token_id not in ids
    # known words are single tokens (with their leading space), digits one token each
    assert tok.tokenize("how many red circles") == ["how", " many", " red", " circles"]
    assert tok.tokenize("frame 130") == ["frame", " 1", "3", "0"]
    assert len(tok.tokenize("zebra")) == 5  # unseen word: spelled in characters


def test_special_tokens_and_template():
    tok = build_tokenizer(SUITE_TEXTS)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.padding_side == "left"
    assert tok.image_token == "<|image_pad|>" and tok.video_token == "<|video_pad|>"
    assert tok.image_token_id == 5 and tok.video_token_id == 6
    s = "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>hi<|im_end|>\n"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(5) == 2 and tok.decode(ids) == s
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]},
            {"role": "assistant", "content": "a circle"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>what is it?<|im_end|>\n"
                    "<|im_start|>assistant\na circle<|im_end|>\n")
    gen = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("<|im_start|>assistant\n")


def test_deterministic_ids_and_vocab_argument():
    a, b = build_tokenizer(SUITE_TEXTS), build_tokenizer(SUITE_TEXTS)
    assert a.get_vocab() == b.get_vocab()
    c = build_tokenizer(vocab=["circle", "square"])
    assert c.tokenize("circle square") == ["circle", " square"]
    with pytest.raises(ValueError):
        build_tokenizer(vocab=["Not-A-Word"])


def test_save_and_load(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer(SUITE_TEXTS)
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert len(back) == len(tok) and back.get_vocab() == tok.get_vocab()
    for t in SUITE_TEXTS:
        assert back(t)["input_ids"] == tok(t)["input_ids"]
        assert back.decode(back(t)["input_ids"]) == t
    assert back.pad_token_id == tok.pad_token_id and back.eos_token_id == tok.eos_token_id
    assert back.image_token_id == tok.image_token_id and back.padding_side == "left"
    msgs = [{"role": "user", "content": "hi"}]
    assert back.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)
