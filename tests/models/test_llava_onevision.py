"""LLaVA-OneVision family: layout from the model's own inputs, identity conversion, cached generate, save/load."""

import math

import pytest
import torch

import linmu
from linmu.models.llava_onevision import anyres_crop_grid, image_token_counts, llava_onevision_layout

V = 256
IMG, VID, PAD = V - 3, V - 2, V - 1
TILE = 56  # vision_config.image_size: 4 x 4 tokens per tile with patch 14
PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [56, 168]]


def tiny_llava_onevision(seed: int = 0):
    """A randomly initialised LLaVA-OneVision (Qwen2 decoder with GQA, SigLIP tower), built offline."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(model_type="qwen2", vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 1e4})
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=TILE, patch_size=14, vision_use_head=False)
    cfg = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=VID,
                               image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
                               vision_feature_select_strategy="full")
    cfg._attn_implementation = "sdpa"
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


def make_inputs(model, rows, frames: int = 3, seed: int = 0):
    """Batch from ``rows``: each a list of ("text", n) | ("image", (H, W)) | ("video", None), left padded.

    A row with one image gets anyres crops; a row with several images gets base tiles only (``batch_num_images``).
    """
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    per_row_images = [sum(k == "image" for k, _ in r) for r in rows]
    image_sizes = [v for r in rows for k, v in r if k == "image"]
    counts = image_token_counts(cfg, image_sizes, per_row_images) if image_sizes else []
    pooled = math.ceil(TILE // 14 / 2) ** 2
    seqs, n_img, n_vid = [], 0, 0
    for r in rows:
        ids = []
        for kind, v in r:
            if kind == "text":
                ids.append(torch.randint(0, V - 10, (v,), generator=g))
            elif kind == "image":
                ids.append(torch.full((counts[n_img],), IMG))
                n_img += 1
            else:
                ids.append(torch.full((frames * pooled + 1,), VID))
                n_vid += 1
        seqs.append(torch.cat(ids))
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(rows), L), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, L - len(s):] = s
        mask[b, L - len(s):] = 1
    out = dict(input_ids=input_ids, attention_mask=mask)
    if image_sizes:
        patched = [n == 1 for n in per_row_images for _ in range(n)]
        n_patch = [image_size_to_num_patches(sz, PINPOINTS, TILE) if p else 1 for sz, p in zip(image_sizes, patched)]
        out["pixel_values"] = torch.randn(len(image_sizes), max(n_patch), 3, TILE, TILE, generator=g)
        out["image_sizes"] = torch.tensor(image_sizes)
        out["batch_num_images"] = torch.tensor(per_row_images)
    if n_vid:
        out["pixel_values_videos"] = torch.randn(n_vid, frames, 3, TILE, TILE, generator=g)
    return out


MIXED = [("text", 5), ("image", (30, 100)), ("text", 4), ("video", None), ("text", 3)]
ROWS = [  # row 0: anyres image + video (left padded); row 1: two images without crops, no video
    [("text", 3), ("image", (50, 100)), ("text", 2), ("video", None), ("text", 4)],
    [("text", 6), ("image", (60, 40)), ("text", 3), ("image", (30, 100)), ("text", 2), ("image", (56, 56)),
     ("text", 20)],
]


@pytest.fixture(scope="module")
def teacher():
    return tiny_llava_onevision(seed=3)


@pytest.fixture(scope="module")
def identity_student(teacher):
    return linmu.convert(teacher, linmu.MMateConfig.identity())


@pytest.fixture(scope="module")
def default_student(teacher):
    return linmu.convert(teacher, linmu.MMateConfig(window=(2, 2, 2), text_window=8)).eval()


def _layout(model, inputs, **kw):
    pv = inputs.get("pixel_values_videos")
    return llava_onevision_layout(inputs["input_ids"], model.config, inputs.get("image_sizes"),
                                  inputs.get("batch_num_images"), None if pv is None else pv.shape[1],
                                  None if pv is None else pv.shape[0], inputs.get("attention_mask"), **kw)


# ---------------------------------------------------------------------------------------------------- layout
def test_layout_grids_by_hand(teacher):
    inputs = make_inputs(teacher, [MIXED])
    layout = _layout(teacher, inputs)
    # image 30x100 -> pinpoint 56x112 -> 1x2 tiles -> 4x8 map, unpadded to 2x8, + newline column -> (1, 2, 9)
    # video of 3 frames: 4x4 per frame pooled to 2x2 -> (3, 2, 2), then one newline (text)
    assert [(s.start, s.grid, s.kind) for s in layout.spans] == [
        (5, (1, 4, 4), "image"), (21, (1, 2, 9), "image"), (43, (3, 2, 2), "video")]
    ids = inputs["input_ids"][0]
    placeholders = (ids == IMG) | (ids == VID)
    assert int(placeholders.sum()) == 16 + 18 + 13
    # every visual position is a placeholder; the only placeholder left as text is the video's newline
    assert not (layout.is_visual[0] & ~placeholders).any()
    assert torch.nonzero(placeholders & ~layout.is_visual[0]).flatten().tolist() == [55]
    assert layout.key_valid is None


def test_newline_tokens_sit_where_the_layout_puts_them(teacher):
    """The family's own features: image_newline rows are exactly the last grid column (anyres) or the text tail."""
    inputs = make_inputs(teacher, ROWS)
    layout = _layout(teacher, inputs)
    m = teacher.model
    with torch.no_grad():
        img = m.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                   batch_num_images=inputs["batch_num_images"], return_dict=True).pooler_output
        vid = m.get_video_features(inputs["pixel_values_videos"], return_dict=True).pooler_output
        if vid.shape[1] == 3 * 4:  # transformers 5.17 appends the video's newline in forward, not here
            vid = torch.cat([vid, m.image_newline[None, None].expand(vid.shape[0], 1, -1)], 1)
        emb = m.get_input_embeddings()(inputs["input_ids"])
    feats = torch.cat([torch.cat(img), vid.flatten(0, 1)])
    emb[(inputs["input_ids"] == IMG)] = torch.cat(img)
    emb[(inputs["input_ids"] == VID)] = vid.flatten(0, 1)
    is_newline = (emb == m.image_newline).all(-1)
    assert int(is_newline.sum()) == 4 + 1 + 3 * 1  # anyres crop rows, video, 3 images without crops
    expect = torch.zeros_like(is_newline)
    starts = {(o.batch, o.start) for o in layout.spans}
    for sp in layout.spans:
        T, H, W = sp.grid
        if sp.kind == "image" and (H, W) != (4, 4):  # an anyres crop map: its last column
            expect[sp.batch, sp.start + W - 1:sp.start + sp.length:W] = True
        elif (sp.batch, sp.start + sp.length) not in starts:  # a tile or video not followed by its crops
            expect[sp.batch, sp.start + sp.length] = True
    assert torch.equal(is_newline, expect)
    assert feats.shape[0] == int(((inputs["input_ids"] == IMG) | (inputs["input_ids"] == VID)).sum())
    assert [(s.batch, s.grid) for s in layout.spans] == [
        (0, (1, 4, 4)), (0, (1, 4, 9)), (0, (3, 2, 2)), (1, (1, 4, 4)), (1, (1, 4, 4)), (1, (1, 4, 4))]
    assert torch.equal(layout.key_valid, inputs["attention_mask"].bool())


def test_anyres_max_downscale_matches_the_model(teacher):
    sizes = torch.tensor([[50, 100], [30, 100], [100, 30]])
    with torch.no_grad():
        out = teacher.model.get_image_features(torch.randn(3, 3, 3, TILE, TILE), sizes,
                                               vision_aspect_ratio="anyres_max_1", return_dict=True).pooler_output
    assert [t.shape[0] for t in out] == image_token_counts(teacher.config, sizes, None, "anyres_max_1")
    assert anyres_crop_grid((50, 100), teacher.config, "anyres_max_1") == (2, 5)  # 4x8 shrunk by sqrt(2)
    assert anyres_crop_grid((50, 100), teacher.config) == (4, 8)
    assert anyres_crop_grid((100, 30), teacher.config) == (8, 2)  # 2x1 tiles, unpadded columns


def test_bad_metadata_raises(teacher):
    inputs = make_inputs(teacher, [MIXED])
    ids, cfg = inputs["input_ids"], teacher.config
    with pytest.raises(ValueError, match="grid metadata"):  # other image size: other token count
        llava_onevision_layout(ids, cfg, torch.tensor([[50, 100]]), None, 3, 1)
    with pytest.raises(ValueError, match="grid metadata"):  # no image metadata
        llava_onevision_layout(ids, cfg, None, None, 3, 1)
    with pytest.raises(ValueError, match="grid metadata"):  # wrong frame count
        llava_onevision_layout(ids, cfg, inputs["image_sizes"], None, 2, 1)
    with pytest.raises(ValueError, match="grid metadata"):  # a video too many
        llava_onevision_layout(ids, cfg, inputs["image_sizes"], None, 3, 2)
    with pytest.raises(ValueError, match="grid metadata"):  # batch_num_images disagrees with image_sizes
        llava_onevision_layout(ids, cfg, inputs["image_sizes"], torch.tensor([2]), 3, 1)
    with pytest.raises(ValueError, match="grid metadata"):  # images without crops (17 tokens each): 3 do not fit
        llava_onevision_layout(ids, cfg, torch.tensor([[30, 100]] * 3), torch.tensor([3]), 3, 1)


# ---------------------------------------------------------------------------------------------------- models
def test_conversion_report(teacher, identity_student):
    rep = identity_student.linmu_conversion
    assert set(rep.reused) == set(teacher.state_dict())
    assert rep.dropped == []
    assert rep.new and all(".self_attn." in k for k in rep.new)
    assert type(identity_student).__name__ == "LinMULlavaOnevisionForConditionalGeneration"


def test_identity_reproduces_teacher_logits(teacher, identity_student):
    inputs = make_inputs(teacher, [MIXED])
    with torch.no_grad():
        diff = (identity_student(**inputs).logits - teacher(**inputs).logits).abs().max().item()
    assert diff <= 1e-4


def test_identity_batch_left_padding(teacher, identity_student):
    inputs = make_inputs(teacher, ROWS)
    assert not bool(inputs["attention_mask"].all())
    with torch.no_grad():
        s, t = identity_student(**inputs).logits, teacher(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert (s - t).abs()[valid].max().item() <= 1e-4


def _generate(model, inputs, use_cache):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=PAD,
                              suppress_tokens=[IMG, VID])  # a generated placeholder would need pixels


@pytest.mark.parametrize("rows", [[MIXED], ROWS], ids=["single", "batch_left_padded"])
def test_cached_generate_equals_uncached(teacher, default_student, rows):
    inputs = make_inputs(teacher, rows)
    cached = _generate(default_student, inputs, True)
    uncached = _generate(default_student, inputs, False)
    assert cached.shape == (len(rows), inputs["input_ids"].shape[1] + 6)
    assert torch.equal(cached, uncached)


def test_save_load_roundtrip(teacher, default_student, tmp_path):
    inputs = make_inputs(teacher, ROWS)
    default_student.save_pretrained(tmp_path)
    loaded = linmu.load(tmp_path)
    assert type(loaded) is type(default_student)
    with torch.no_grad():
        a, b = default_student(**inputs).logits, loaded(**inputs).logits
    assert torch.equal(a, b)
