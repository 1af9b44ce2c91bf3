"""InternVL family: tile layout from the model's own inputs, identity conversion, cached generate, save/load.

The tiny model has 64-pixel tiles, 8-pixel patches and downsample_ratio 0.5: 8x8 patches per tile, pixel-shuffled
to 4x4 = 16 image tokens per tile. Inputs are laid out as InternVL's processor writes them: an image is
``<img>`` + 16 * num_tiles placeholders + ``</img>`` (crops then thumbnail), a video is ``FrameN: <img>`` + 16
placeholders + ``</img>`` per frame, with text in between.
"""

import re

import pytest
import torch

import linmu
from linmu.models.internvl import LinMUInternVLForConditionalGeneration, internvl_layout, internvl_tile_side

VOCAB = 256
IMG, IMG_START, IMG_END, NL = VOCAB - 6, VOCAB - 5, VOCAB - 4, VOCAB - 3  # <IMG_CONTEXT>, <img>, </img>, "\n"
EOS, PAD = VOCAB - 2, VOCAB - 1
TILE_PX, SIDE = 64, 4  # tile pixels, tokens per tile side after pixel shuffle
DEFAULT = dict(window=(2, 2, 2), text_window=8)


def tiny_internvl(seed: int = 0):
    """A random InternVL (Qwen2 decoder, 64 hidden, 2 layers, GQA 4/2 heads) built from configs, no download."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  image_size=TILE_PX, patch_size=8)
    config = InternVLConfig(text_config=text, vision_config=vision, image_token_id=IMG, image_seq_length=SIDE ** 2,
                            downsample_ratio=0.5)
    for c in (config, config.text_config):  # special ids inside the tiny vocabulary
        c.bos_token_id, c.eos_token_id, c.pad_token_id = EOS, EOS, PAD
    config._attn_implementation = "sdpa"
    return InternVLForConditionalGeneration(config).eval()


def internvl_row(items, text_len: int, g: torch.Generator):
    """Token ids of one sample and its tile count. items: ("image", n_tiles) or ("video", n_frames)."""
    text = lambda n: torch.randint(0, VOCAB - 10, (n,), generator=g)
    ids, tiles = [text(text_len)], 0
    for kind, n in items:
        if kind == "image":  # crops + thumbnail in one run
            ids += [torch.tensor([IMG_START]), torch.full((n * SIDE ** 2,), IMG), torch.tensor([IMG_END])]
        else:  # "Frame{i}: <img> ... </img>\n" per frame
            for f in range(n):
                ids += [text(2), torch.tensor([IMG_START]), torch.full((SIDE ** 2,), IMG), torch.tensor([IMG_END]),
                        torch.tensor([NL])]
        ids.append(text(text_len))
        tiles += n
    return torch.cat(ids).long(), tiles


def internvl_batch(rows, text_len: int = 4, seed: int = 0):
    """A left-padded batch (rows of different content); pixel_values stacks all tiles in row order."""
    g = torch.Generator().manual_seed(seed)
    built = [internvl_row(items, text_len + i, g) for i, items in enumerate(rows)]
    L = max(ids.numel() for ids, _ in built)
    input_ids = torch.full((len(rows), L), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, (ids, _) in enumerate(built):
        input_ids[b, L - ids.numel():] = ids
        mask[b, L - ids.numel():] = 1
    n_tiles = sum(t for _, t in built)
    pixel_values = torch.randn(n_tiles, 3, TILE_PX, TILE_PX, generator=g)
    return dict(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values)


MIXED = [("image", 3), ("video", 3)]  # an image of 2 crops + thumbnail, and a 3-frame video
BATCH = [[("video", 2), ("image", 1)], [("image", 3)]]  # rows of different content and length


@pytest.fixture(scope="module")
def teacher():
    return tiny_internvl(seed=3)


@pytest.fixture(scope="module")
def identity(teacher):
    return linmu.convert(teacher, linmu.MMateConfig.identity())


@pytest.fixture(scope="module")
def student(teacher):
    torch.manual_seed(0)
    return linmu.convert(teacher, linmu.MMateConfig(**DEFAULT))


# ---------------------------------------------------------------------------------------------------- layout
def test_pixel_shuffle_tokens_are_row_major_per_tile(teacher):
    """The model's own pixel_shuffle emits a tile's tokens row-major over its (s, s) grid, as the spans assume."""
    P = TILE_PX // 8  # patches per side
    coords = torch.stack(torch.meshgrid(torch.arange(P), torch.arange(P), indexing="ij"), -1).float()  # (h, w)
    out = teacher.model.pixel_shuffle(coords[None], scale_factor=0.5).reshape(SIDE * SIDE, -1, 2)
    layout = internvl_layout(torch.full((1, SIDE * SIDE), IMG), IMG, SIDE)
    thw = layout.thw[0]
    # every patch folded into token k lies in the 2x2 block (2h, 2w) of token k's (h, w)
    assert torch.equal(out[:, :, 0].min(1).values.long() // 2, thw[:, 1])
    assert torch.equal(out[:, :, 1].min(1).values.long() // 2, thw[:, 2])
    assert torch.equal((out.max(1).values - out.min(1).values), torch.ones(SIDE * SIDE, 2))


def test_layout_from_inputs(teacher, student):
    inputs = internvl_batch([MIXED])
    ids = inputs["input_ids"]
    layout = student.linmu_layout(dict(inputs))
    assert internvl_tile_side(teacher.config, inputs["pixel_values"]) == SIDE == internvl_tile_side(teacher.config)
    # one (1, 4, 4) span per tile: 3 tiles of the image, then one per video frame
    assert [(s.grid, s.kind) for s in layout.spans] == [((1, SIDE, SIDE), "image")] * 6
    first = 4 + 1  # text, <img>
    assert [s.start for s in layout.spans[:3]] == [first, first + 16, first + 32]
    # frames: after </img>, 4 text, then per frame 2 label tokens + <img> before the placeholders
    f0 = first + 48 + 1 + 4 + 3
    assert [s.start for s in layout.spans[3:]] == [f0, f0 + 16 + 5, f0 + 2 * (16 + 5)]
    # visual positions are exactly the model's own placeholder mask
    emb = teacher.get_input_embeddings()(ids)
    mask = teacher.model.get_placeholder_mask(ids, emb, torch.zeros(6, SIDE * SIDE, emb.shape[-1]))
    assert torch.equal(layout.is_visual, mask[..., 0])
    # grid coordinates of the second tile, by hand: row-major 4x4
    s = layout.spans[1]
    assert layout.thw[0, s.start + 6].tolist() == [0, 1, 2] and layout.thw[0, s.start + 15].tolist() == [0, 3, 3]
    assert layout.key_valid is None
    # the pre-encoded features generate() passes instead of pixel_values give the same layout
    feats = teacher.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
    enc = student.linmu_layout(dict(input_ids=ids, mm_encoder_outputs={"image": feats}))
    assert enc.spans == layout.spans


def test_layout_padded_batch(student):
    inputs = internvl_batch(BATCH)
    layout = student.linmu_layout(dict(inputs))
    assert [s.batch for s in layout.spans] == [0, 0, 0, 1, 1, 1]
    assert torch.equal(layout.key_valid, inputs["attention_mask"].bool())
    assert torch.equal(layout.is_visual, inputs["input_ids"] == IMG)


def test_bad_metadata_raises(student, teacher):
    inputs = internvl_batch([MIXED])
    ids = inputs["input_ids"]
    # one placeholder of the image turned into text: the run is no longer whole tiles
    broken = ids.clone()
    broken[0, 5 + 20] = 7
    with pytest.raises(ValueError, match="grid metadata does not match"):
        student.linmu_layout(dict(inputs, input_ids=broken))
    # fewer tiles in pixel_values than in input_ids
    with pytest.raises(ValueError, match="grid metadata does not match"):
        student.linmu_layout(dict(inputs, pixel_values=inputs["pixel_values"][:-1]))
    with pytest.raises(ValueError, match="grid metadata does not match"):
        internvl_layout(ids, IMG, SIDE, num_tiles=7)
    # tiles of another size: 16-token runs are not whole 8x8 tiles
    with pytest.raises(ValueError, match="grid metadata does not match"):
        student.linmu_layout(dict(inputs, pixel_values=torch.zeros(6, 3, 2 * TILE_PX, 2 * TILE_PX)))
    with pytest.raises(ValueError, match="square"):
        internvl_tile_side(teacher.config, torch.zeros(1, 3, TILE_PX, 2 * TILE_PX))
    with pytest.raises(ValueError, match="need input_ids"):
        student.linmu_layout(dict(inputs_embeds=torch.zeros(1, 3, 64)))


# ---------------------------------------------------------------------------------------------------- conversion
def test_registered_family(identity):
    assert isinstance(identity, LinMUInternVLForConditionalGeneration)
    assert identity.config.linmu_family == "internvl"
    assert "InternVLForConditionalGeneration" in linmu.supported_families()


def test_conversion_report_accounts_for_every_teacher_tensor(teacher, identity):
    rep = identity.linmu_conversion
    assert set(rep.reused) == set(teacher.state_dict())
    assert rep.dropped == []
    assert rep.new and all(".self_attn." in k for k in rep.new)
    # the teacher's attention projections are never "new": both branches get copies
    assert not [k for k in rep.new if re.search(r"\.(flex|swin)\.[qkvo]_proj\.", k)]
    assert rep.reused["model.language_model.layers.0.self_attn.q_proj.weight"] == [
        "model.language_model.layers.0.self_attn.flex.q_proj.weight",
        "model.language_model.layers.0.self_attn.swin.q_proj.weight"]


def test_identity_reproduces_teacher_logits(teacher, identity):
    inputs = internvl_batch([MIXED])
    with torch.no_grad():
        diff = (identity(**inputs).logits - teacher(**inputs).logits).abs().max().item()
    assert diff <= 1e-4


def test_identity_reproduces_teacher_logits_padded_batch(teacher, identity):
    inputs = internvl_batch(BATCH)
    assert not inputs["attention_mask"].all() and inputs["attention_mask"][:, -1].all()
    with torch.no_grad():
        s, t = identity(**inputs).logits, teacher(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert (s - t).abs()[valid].max().item() <= 1e-4


def test_tiles_are_separate_spans_in_the_model(student):
    """Dependency contract through the whole model: perturb a token of the image's second tile after the embedding;
    that tile's earlier tokens move (bidirectional inside the tile), the first tile and the text before do not."""
    inputs = internvl_batch([MIXED])
    tile = student.linmu_layout(dict(inputs)).spans[1]
    pos = tile.start + 10
    layer0 = student.model.language_model.layers[0]

    def run(delta):
        def hook(module, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            h[0, pos] += delta
            return ((h,) + tuple(args[1:]), kwargs) if args else (args, dict(kwargs, hidden_states=h))

        handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                return student(**inputs).logits[0]
        finally:
            handle.remove()

    moved = (run(1.0) - run(0.0)).abs().amax(-1)
    assert moved[tile.start] > 1e-6 and moved[pos - 1] > 1e-6
    assert moved[:tile.start].max() == 0
    assert moved[pos:].min() > 0


# ---------------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("rows", [[MIXED], BATCH], ids=["mixed", "padded_batch"])
def test_cached_greedy_equals_uncached(student, rows):
    inputs = internvl_batch(rows)
    kw = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        a = student.generate(**inputs, use_cache=False, **kw)
        b = student.generate(**inputs, use_cache=True, **kw)
    assert a.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(a, b)


def test_save_load_round_trip(student, tmp_path):
    inputs = internvl_batch(BATCH)
    student.save_pretrained(tmp_path)
    loaded = linmu.load(tmp_path)
    assert isinstance(loaded, LinMUInternVLForConditionalGeneration)
    with torch.no_grad():
        assert torch.equal(student(**inputs).logits, loaded(**inputs).logits)
