"""Whole-model behaviour of a converted Qwen2-VL: cache, generate, save/load, dependency contract."""

import json

import pytest
import torch

import linmu
from linmu.inference.cache import LinMUCache
from linmu.tiny import tiny_qwen2_vl, tiny_qwen2_vl_batch, tiny_qwen2_vl_inputs

CFG = dict(window=(2, 2, 2), text_window=8, n_sink=2, chunk_size=16, init="mamba2")
MIXED = [dict(videos=[(4, 4, 4)]), dict(images=[(1, 4, 4), (1, 2, 4)]), dict()]


@pytest.fixture(scope="module")
def teacher():
    return tiny_qwen2_vl(seed=5)


@pytest.fixture(scope="module")
def student(teacher):
    torch.manual_seed(0)
    return linmu.convert(teacher, linmu.MMateConfig(**CFG))


def test_cached_greedy_equals_uncached_on_padded_mixed_batch(student):
    batch = tiny_qwen2_vl_batch(student, MIXED)
    with torch.no_grad():
        a = student.generate(**batch, max_new_tokens=10, do_sample=False, use_cache=False)
        b = student.generate(**batch, max_new_tokens=10, do_sample=False, use_cache=True)
    assert torch.equal(a, b)


def test_cached_sampling_equals_uncached_with_same_seed(student):
    batch = tiny_qwen2_vl_batch(student, MIXED)
    with torch.no_grad():
        torch.manual_seed(7)
        a = student.generate(**batch, max_new_tokens=8, do_sample=True, top_k=20, use_cache=False)
        torch.manual_seed(7)
        b = student.generate(**batch, max_new_tokens=8, do_sample=True, top_k=20, use_cache=True)
    assert torch.equal(a, b)


def test_prefill_then_steps_logits_equal_full_forward(student):
    batch = tiny_qwen2_vl_batch(student, MIXED)
    n = 6
    ids = torch.randint(0, 200, (3, n))
    full_ids = torch.cat([batch["input_ids"], ids], 1)
    full_mask = torch.cat([batch["attention_mask"], torch.ones(3, n, dtype=torch.long)], 1)
    full_types = torch.cat([batch["mm_token_type_ids"], torch.zeros(3, n, dtype=torch.long)], 1)
    with torch.no_grad():
        full = student(**dict(batch, input_ids=full_ids, attention_mask=full_mask, mm_token_type_ids=full_types)).logits
        cache = LinMUCache(student.mmate_blocks(), batch_size=3)
        # positions as generate computes them: the prompt's 3-D ids, then text positions after rope_deltas
        out = student(**batch, past_key_values=cache, use_cache=True)
        torch.testing.assert_close(out.logits, full[:, :-n], atol=1e-4, rtol=0)
        L = batch["input_ids"].shape[1]
        for t in range(n):
            mask = full_mask[:, :L + t + 1]
            pos = student.model.rope_deltas + (mask.long().cumsum(-1)[:, -1:] - 1)
            out = student(input_ids=ids[:, t:t + 1], attention_mask=mask, past_key_values=cache, use_cache=True,
                          position_ids=pos.unsqueeze(0).expand(3, -1, -1))
            torch.testing.assert_close(out.logits[:, 0], full[:, L + t], atol=1e-4, rtol=0)


def test_cache_bytes_do_not_depend_on_prompt_length(teacher):
    student = linmu.convert(teacher, linmu.MMateConfig(window=(2, 2, 2), text_window=16))
    sizes = []
    for text_len in (100, 2000):
        inputs = tiny_qwen2_vl_inputs(student, images=(), videos=(), text_len=text_len)
        with torch.no_grad():
            out = student.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        assert isinstance(out.past_key_values, LinMUCache)
        sizes.append(out.past_key_values.nbytes())
    assert sizes[0] == sizes[1] > 0


def test_save_load_round_trip_and_errors(student, teacher, tmp_path):
    inputs = tiny_qwen2_vl_inputs(student)
    student.save_pretrained(tmp_path / "s")
    loaded = linmu.load(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "config.json").read_text())["linmu"]["text_window"] == 8
    with torch.no_grad():
        assert torch.equal(student(**inputs).logits, loaded(**inputs).logits)
    # a teacher of a supported family loads as itself; a checkpoint of another architecture is refused
    teacher.save_pretrained(tmp_path / "t")
    assert type(linmu.load(tmp_path / "t")) is type(teacher)
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="another architecture: neither a LinMU model"):
        linmu.load(tmp_path / "llama")
    # a truncated weights file
    w = tmp_path / "s" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        linmu.load(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        linmu.load(tmp_path)


def test_dependency_contract_through_the_model(student):
    """Perturb a later visual token of a span: earlier tokens of that span move; perturb later text: nothing earlier."""
    inputs = tiny_qwen2_vl_inputs(student, images=(), videos=((4, 4, 4),), text_len=5)
    ids = inputs["input_ids"]
    layout = student.linmu_layout(dict(inputs))
    span = layout.spans[0]
    emb = student.get_input_embeddings()(ids).detach() + torch.randn(1, ids.shape[1], student.config.text_config.hidden_size)

    def logits(e):
        with torch.no_grad():
            return student(input_ids=ids, inputs_embeds=e, video_grid_thw=inputs["video_grid_thw"],
                           mm_token_type_ids=inputs["mm_token_type_ids"]).logits[0]

    base = logits(emb)
    later_visual = span.start + span.length - 2
    e = emb.clone()
    e[0, later_visual] += 1.0
    moved = (logits(e) - base).abs().amax(-1)
    assert moved[span.start] > 1e-6  # the span's first token sees its own span's later tokens
    assert moved[:span.start].max() == 0  # tokens before the span do not
    later_text = ids.shape[1] - 2
    e = emb.clone()
    e[0, later_text] += 1.0
    moved = (logits(e) - base).abs().amax(-1)
    assert moved[:later_text].max() == 0 and moved[later_text] > 0


def test_convert_from_directory_and_cli(teacher, tmp_path):
    from linmu.cli import main

    teacher.save_pretrained(tmp_path / "teacher")
    student = linmu.convert(tmp_path / "teacher", linmu.MMateConfig.identity())
    inputs = tiny_qwen2_vl_inputs(teacher)
    with torch.no_grad():
        assert (student(**inputs).logits - teacher(**inputs).logits).abs().max() <= 1e-4
    assert main(["convert", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "s"), "--identity"]) == 0
    with torch.no_grad():
        assert (linmu.load(tmp_path / "s")(**inputs).logits - teacher(**inputs).logits).abs().max() <= 1e-4
    assert main(["convert", "--teacher", str(tmp_path / "s"), "--out", str(tmp_path / "x")]) == 2  # not a teacher
