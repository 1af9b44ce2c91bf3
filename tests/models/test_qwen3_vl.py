"""Qwen3-VL and Qwen3-VL-MoE families: layout from the model's own inputs, identity conversion, cached generate,
save/load. Tiny random teachers built offline from configs; inputs laid out as ``Qwen3VLProcessor`` does (videos per
frame, with timestamp text between frames)."""

import pytest
import torch
from transformers import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,
                          Qwen3VLMoeForConditionalGeneration)

import linmu
from linmu.models.qwen3_vl import qwen3_vl_layout

VOCAB = 256
PAD = VOCAB - 1
TS_LEN = 3  # timestamp text tokens before each frame, e.g. "<0.5 seconds>"


def tiny_qwen3_vl(moe: bool = False, seed: int = 0):
    """hidden 64, 2 layers, 4 query / 2 kv heads, head_dim 16, interleaved M-RoPE, deepstack into both layers."""
    torch.manual_seed(seed)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, pad_token_id=PAD,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True})
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    cfg_cls, model_cls = (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe else (
        Qwen3VLConfig, Qwen3VLForConditionalGeneration)
    config = cfg_cls(text_config=text, vision_config=vision, image_token_id=VOCAB - 6, video_token_id=VOCAB - 5,
                     vision_start_token_id=VOCAB - 4, vision_end_token_id=VOCAB - 3)
    config._attn_implementation = "sdpa"
    model = model_cls(config).eval()
    with torch.no_grad():
        # RMSNorm weights start at 1; randomise them (q_norm / k_norm above all) so that the identity test would
        # notice a norm that is not carried over
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model


def make_batch(model, rows, seed=0):
    """Rows of items ("text", n), ("image", (h, w)), ("video", (T, h, w)); grids in patches. Left-padded.

    An image is <vision_start> tokens <vision_end>; a video is, per temporal patch, TS_LEN timestamp tokens,
    <vision_start>, (h/2)(w/2) video tokens, <vision_end>, as Qwen3VLProcessor.replace_video_token writes it.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    vc = cfg.vision_config
    m = vc.spatial_merge_size
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    text = lambda n: torch.randint(0, VOCAB - 10, (n,), generator=g)
    out_ids, out_types = [], []
    pix, pix_v, grids, grids_v = [], [], [], []
    for row in rows:
        ids, types = [], []

        def add(t, ty):
            ids.append(t)
            types.append(torch.full((len(t),), ty))

        for kind, arg in row:
            if kind == "text":
                add(text(arg), 0)
            elif kind == "image":
                h, w = arg
                add(torch.tensor([cfg.vision_start_token_id]), 0)
                add(torch.full((h * w // m ** 2,), cfg.image_token_id), 1)
                add(torch.tensor([cfg.vision_end_token_id]), 0)
                pix.append(torch.randn(h * w, patch_dim, generator=g))
                grids.append((1, h, w))
            else:
                T, h, w = arg
                for _ in range(T):
                    add(text(TS_LEN), 0)
                    add(torch.tensor([cfg.vision_start_token_id]), 0)
                    add(torch.full((h * w // m ** 2,), cfg.video_token_id), 2)
                    add(torch.tensor([cfg.vision_end_token_id]), 0)
                pix_v.append(torch.randn(T * h * w, patch_dim, generator=g))
                grids_v.append((T, h, w))
        out_ids.append(torch.cat(ids))
        out_types.append(torch.cat(types))
    L = max(len(r) for r in out_ids)
    B = len(rows)
    input_ids = torch.full((B, L), PAD, dtype=torch.long)
    types = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, (r, t) in enumerate(zip(out_ids, out_types)):
        input_ids[b, L - len(r):] = r
        types[b, L - len(r):] = t
        mask[b, L - len(r):] = 1
    batch = dict(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=types)
    if pix:
        batch.update(pixel_values=torch.cat(pix), image_grid_thw=torch.tensor(grids))
    if pix_v:
        batch.update(pixel_values_videos=torch.cat(pix_v), video_grid_thw=torch.tensor(grids_v))
    return batch


MIXED = [[("text", 4), ("image", (4, 6)), ("text", 3), ("image", (2, 4)), ("text", 2), ("video", (3, 4, 4)),
          ("text", 4)]]
# two rows of different content and length; the second is left-padded
PADDED = [[("text", 3), ("video", (2, 4, 4)), ("text", 2), ("image", (4, 4)), ("text", 3)],
          [("text", 2), ("image", (2, 4)), ("text", 3), ("video", (2, 2, 4)), ("text", 2)]]
DEFAULT = dict(window=(2, 2, 2), text_window=8)


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_vl_moe"])
def teacher(request):
    return tiny_qwen3_vl(moe=request.param == "qwen3_vl_moe", seed=3)


@pytest.fixture(scope="module")
def identity_student(teacher):
    return linmu.convert(teacher, linmu.MMateConfig.identity())


@pytest.fixture(scope="module")
def student(teacher):
    torch.manual_seed(0)
    return linmu.convert(teacher, linmu.MMateConfig(**DEFAULT))


def _layout(model, batch):
    cfg = model.config
    return qwen3_vl_layout(batch["input_ids"], cfg.image_token_id, cfg.video_token_id,
                           cfg.vision_config.spatial_merge_size, batch.get("image_grid_thw"),
                           batch.get("video_grid_thw"), batch.get("attention_mask"))


# ---------------------------------------------------------------------------------------------------- layout
def test_layout_matches_the_teachers_placeholders_and_mrope(teacher):
    batch = make_batch(teacher, MIXED + PADDED[1:])
    layout = _layout(teacher, batch)
    # an image is one span; a video is one (1, h/2, w/2) span per frame, timestamp text in between
    assert [(s.batch, s.grid, s.kind) for s in layout.spans] == [
        (0, (1, 2, 3), "image"), (0, (1, 1, 2), "image"),
        (0, (1, 2, 2), "video"), (0, (1, 2, 2), "video"), (0, (1, 2, 2), "video"),
        (1, (1, 1, 2), "image"), (1, (1, 1, 2), "video"), (1, (1, 1, 2), "video")]
    frames = [s for s in layout.spans if s.batch == 0 and s.kind == "video"]
    assert [b.start - a.start for a, b in zip(frames, frames[1:])] == [4 + TS_LEN + 2] * 2
    # visual positions are exactly the teacher's own placeholder masks, and its mm_token_type_ids groups
    inputs_embeds = teacher.get_input_embeddings()(batch["input_ids"])
    img, vid = teacher.model.get_placeholder_mask(batch["input_ids"], inputs_embeds=inputs_embeds)
    assert torch.equal(layout.is_visual, img[..., 0] | vid[..., 0])
    assert torch.equal(layout.is_visual, batch["mm_token_type_ids"] > 0)
    assert layout.key_valid is not None and torch.equal(layout.key_valid, batch["attention_mask"].bool())
    # (t, h, w) inside each span follow the teacher's M-RoPE ids: rows/cols offset by the span's start position
    pos, _ = teacher.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                          batch["video_grid_thw"], batch["attention_mask"])
    for s in layout.spans:
        sl = slice(s.start, s.start + s.length)
        p = pos[:, s.batch, sl]
        rel = p - p[:, :1]
        assert torch.equal(rel.T, layout.thw[s.batch, sl]), s
    # by hand: the first image (4 x 6 patches, merge 2) is a 2 x 3 grid, row-major
    s = layout.spans[0]
    assert layout.thw[0, s.start:s.start + 6].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2],
                                                           [0, 1, 0], [0, 1, 1], [0, 1, 2]]


def test_bad_grid_metadata_raises(teacher, student):
    batch = make_batch(teacher, MIXED)
    cases = [
        dict(image_grid_thw=torch.tensor([[1, 4, 8], [1, 2, 4]])),  # wrong image size
        dict(image_grid_thw=torch.tensor([[1, 4, 6]])),  # an image without a row
        dict(image_grid_thw=None),
        dict(video_grid_thw=torch.tensor([[2, 4, 4]])),  # fewer frames than frame runs
        dict(video_grid_thw=torch.tensor([[4, 4, 4]])),  # more frames than frame runs
        dict(video_grid_thw=torch.tensor([[3, 4, 8]])),  # frame size does not match the runs
    ]
    for bad in cases:
        with pytest.raises(ValueError, match="grid metadata does not match"):
            _layout(teacher, dict(batch, **bad))
    with pytest.raises(ValueError, match="spatial_merge_size"):
        _layout(teacher, dict(batch, image_grid_thw=torch.tensor([[1, 3, 6], [1, 2, 4]])))
    # video frames laid out contiguously (Qwen2-VL style, no timestamps): not Qwen3-VL's layout
    ids = batch["input_ids"].clone()
    vid = teacher.config.video_token_id
    frames = [s for s in _layout(teacher, batch).spans if s.kind == "video"]
    ids[0, frames[0].start + frames[0].length:frames[1].start] = vid
    with pytest.raises(ValueError, match="grid metadata does not match"):
        _layout(teacher, dict(batch, input_ids=ids))
    # the converted model checks its inputs before running
    with pytest.raises(ValueError, match="grid metadata does not match"):
        student(**dict(batch, video_grid_thw=torch.tensor([[2, 4, 4]])))


# ---------------------------------------------------------------------------------------------------- identity
def test_conversion_report_covers_every_teacher_tensor(teacher, identity_student):
    rep = identity_student.linmu_conversion
    assert set(rep.reused) == set(teacher.state_dict())
    assert rep.dropped == []
    assert rep.new and all(".self_attn." in k for k in rep.new)
    # q_norm / k_norm go to Local-Swin (Flex-MA has no q/k norm)
    for i in range(teacher.config.text_config.num_hidden_layers):
        for n in ("q_norm", "k_norm"):
            k = f"model.language_model.layers.{i}.self_attn.{n}.weight"
            assert rep.reused[k] == [f"model.language_model.layers.{i}.self_attn.swin.{n}.weight"]
    sd = identity_student.state_dict()
    for k, targets in rep.reused.items():
        for t in targets:
            assert torch.equal(sd[t], teacher.state_dict()[k]), k


def _max_diff(a, b, mask=None):
    d = (a - b).abs().amax(-1)
    return (d[mask.bool()] if mask is not None else d).max().item()


def test_identity_reproduces_teacher_logits(teacher, identity_student):
    batch = make_batch(teacher, MIXED)
    with torch.no_grad():
        diff = _max_diff(identity_student(**batch).logits, teacher(**batch).logits)
    assert diff <= 1e-4, diff


def test_identity_on_left_padded_batch(teacher, identity_student):
    batch = make_batch(teacher, PADDED, seed=1)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        diff = _max_diff(identity_student(**batch).logits, teacher(**batch).logits, batch["attention_mask"])
    assert diff <= 1e-4, diff


def test_identity_test_notices_q_norm(teacher, identity_student):
    """The identity check above is sensitive to the q_norm / k_norm copies (their weights are random)."""
    batch = make_batch(teacher, MIXED)
    attn = identity_student.model.language_model.layers[0].self_attn
    with torch.no_grad():
        ref = identity_student(**batch).logits
        for n in ("q_norm", "k_norm"):
            w = getattr(attn.swin, n).weight
            saved = w.clone()
            w.fill_(1.0)
            diff = _max_diff(identity_student(**batch).logits, ref)
            w.copy_(saved)
            assert diff > 1e-3, n


# ---------------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("rows", [MIXED, PADDED], ids=["mixed", "padded_batch"])
def test_cached_greedy_equals_uncached(student, rows):
    batch = make_batch(student, rows, seed=2)
    # a random model may emit special / placeholder ids; a trained one does not, and the teacher could not take them
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None,
               suppress_tokens=list(range(VOCAB - 6, VOCAB)))
    with torch.no_grad():
        a = student.generate(**batch, use_cache=True, **gen)
        b = student.generate(**batch, use_cache=False, **gen)
    assert a.shape == (len(rows), batch["input_ids"].shape[1] + 6)
    assert torch.equal(a, b)


def test_save_load_round_trip(student, tmp_path):
    batch = make_batch(student, PADDED, seed=4)
    student.save_pretrained(tmp_path)
    loaded = linmu.load(tmp_path)
    assert type(loaded) is type(student)
    with torch.no_grad():
        assert torch.equal(student(**batch).logits, loaded(**batch).logits)
