import pytest
import torch

import linmu
from linmu.models.qwen2_vl import qwen_layout
from linmu.tiny import tiny_qwen2_vl, tiny_qwen2_vl_inputs


@pytest.fixture(scope="module")
def teacher():
    return tiny_qwen2_vl(seed=3)


def test_layout_from_inputs(teacher):
    inputs = tiny_qwen2_vl_inputs(teacher, images=((1, 4, 6),), videos=((4, 4, 4),))
    cfg = teacher.config
    layout = qwen_layout(inputs["input_ids"], cfg.image_token_id, cfg.video_token_id, 2,
                         inputs["image_grid_thw"], inputs["video_grid_thw"])
    assert [(s.grid, s.kind) for s in layout.spans] == [((1, 2, 3), "image"), ((4, 2, 2), "video")]
    ids = inputs["input_ids"][0]
    assert torch.equal(layout.is_visual[0], (ids == cfg.image_token_id) | (ids == cfg.video_token_id))


def test_wrong_grid_metadata_is_named(teacher):
    inputs = tiny_qwen2_vl_inputs(teacher)
    cfg = teacher.config
    with pytest.raises(ValueError, match="grid metadata"):
        qwen_layout(inputs["input_ids"], cfg.image_token_id, cfg.video_token_id, 2,
                    torch.tensor([[1, 4, 8]]), inputs["video_grid_thw"])
    with pytest.raises(ValueError, match="grid metadata"):
        qwen_layout(inputs["input_ids"], cfg.image_token_id, cfg.video_token_id, 2, None, inputs["video_grid_thw"])


def test_identity_conversion_reproduces_teacher_logits(teacher):
    inputs = tiny_qwen2_vl_inputs(teacher, images=((1, 4, 4), (1, 2, 4)), videos=((4, 4, 4),))
    student = linmu.convert(teacher, linmu.MMateConfig.identity())
    with torch.no_grad():
        diff = (student(**inputs).logits - teacher(**inputs).logits).abs().max().item()
    assert diff <= 1e-4


def test_default_conversion_generates(teacher):
    inputs = tiny_qwen2_vl_inputs(teacher)
    student = linmu.convert(teacher, linmu.MMateConfig(window=(2, 2, 2)))
    with torch.no_grad():
        out = student.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
        # greedy generate equals argmax of a full forward at each step
        ids = inputs["input_ids"]
        for step in range(3):
            kw = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids),
                      mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"],
                                                   torch.zeros(1, ids.shape[1] - inputs["input_ids"].shape[1],
                                                               dtype=torch.long)], 1))
            nxt = student(**kw).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert torch.equal(out, ids)


def test_unsupported_family_is_named():
    with pytest.raises(ValueError, match="unsupported model family 'Linear'.*Qwen2VLForConditionalGeneration"):
        linmu.convert(torch.nn.Linear(2, 2))
