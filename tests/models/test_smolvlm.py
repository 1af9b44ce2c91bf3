"""SmolVLM / Idefics3: layout from the model's inputs, identity conversion, cached generate, save/load.

Prompts are built by hand exactly as the processors lay them out (processing_smolvlm.py / processing_idefics3.py):
a split image is ``rows x cols`` tiles ``<fake><row_i_col_j><image>*n`` with ``\\n`` after each row, then
``\\n<fake><global-img><image>*n<fake>``; a SmolVLM video is frames ``\\nFrame from mm:ss:<fake><global-img>
<image>*n<fake>``. Special tokens get made-up ids (no tokenizer offline).
"""

import pytest
import torch

import linmu
from linmu.models.smolvlm import LinMUIdefics3ForConditionalGeneration, smolvlm_layout

VOCAB = 128
IMAGE, PAD, FAKE, GLOBAL, NEWLINE = 127, 126, 125, 124, 123
ROW_COL = 100  # <row_i_col_j> = ROW_COL + 4 * (i - 1) + (j - 1)
TEXT_MAX = 90  # ordinary text ids are drawn from [0, TEXT_MAX)


def tiny_model(family: str, seed: int = 0):
    """A random SmolVLM / Idefics3: Llama decoder (hidden 64, 2 layers, 4 heads, 2 kv heads), a 1-layer SigLIP tower."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, SmolVLMConfig,
                              SmolVLMForConditionalGeneration)

    torch.manual_seed(seed)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD)
    # tiles of 7 px patches: SmolVLM 42 px -> 6x6 patches -> pixel shuffle 2 -> 3x3 tokens; Idefics3 28 px -> 2x2
    size = 42 if family == "smolvlm" else 28
    vision = dict(image_size=size, patch_size=7, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)
    cfg_cls, cls = ((SmolVLMConfig, SmolVLMForConditionalGeneration) if family == "smolvlm"
                    else (Idefics3Config, Idefics3ForConditionalGeneration))
    config = cfg_cls(text_config=text, vision_config=vision, scale_factor=2, image_token_id=IMAGE, pad_token_id=PAD)
    config._attn_implementation = "sdpa"
    return cls(config).eval()


def prompt(model, items, gen: torch.Generator, text_len: int = 4):
    """input_ids and tiles for text, then each item, then text. Items: ("image", rows, cols) (rows=cols=0: not
    split) or ("video", frames). Returns (ids (L,), tiles (n, 3, S, S), [start of every tile's image tokens])."""
    n = model.model.image_seq_len
    size = model.config.vision_config.image_size
    text = lambda k: torch.randint(0, TEXT_MAX, (k,), generator=gen).tolist()
    ids, starts = text(text_len), []

    def tile(*marker):
        ids.extend([FAKE, *marker])
        starts.append(len(ids))
        ids.extend([IMAGE] * n)

    for item in items:
        if item[0] == "image":
            rows, cols = item[1], item[2]
            for i in range(rows):
                for j in range(cols):
                    tile(ROW_COL + 4 * i + j)
                ids.append(NEWLINE)
            if rows:
                ids.append(NEWLINE)
            tile(GLOBAL)
            ids.append(FAKE)
        else:
            ids.extend(text(3))  # "You are provided the following series of ... frames"
            for _ in range(item[1]):
                ids.extend([NEWLINE, *text(3)])  # "\nFrame from 00:01:"
                tile(GLOBAL)
                ids.append(FAKE)
            ids.extend([NEWLINE, NEWLINE])
        ids.extend(text(text_len))
    tiles = torch.randn(len(starts), 3, size, size, generator=gen)
    return torch.tensor(ids), tiles, starts


def batch(model, rows, seed: int = 0):
    """Left-padded batch of prompts; pixel_values (B, max_tiles, 3, S, S) padded with all-zero tiles."""
    gen = torch.Generator().manual_seed(seed)
    made = [prompt(model, items, gen) for items in rows]
    L = max(len(ids) for ids, _, _ in made)
    T = max(len(t) for _, t, _ in made)
    size = model.config.vision_config.image_size
    input_ids = torch.full((len(rows), L), PAD)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    pixel_values = torch.zeros(len(rows), T, 3, size, size)
    for b, (ids, tiles, _) in enumerate(made):
        input_ids[b, L - len(ids):] = ids
        mask[b, L - len(ids):] = 1
        pixel_values[b, :len(tiles)] = tiles
    return dict(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values)


MIXED = [("image", 2, 2), ("video", 3)]  # a split image (4 tiles + global) and a 3-frame video
OTHER = [("image", 0, 0), ("image", 1, 2)]  # an unsplit image and a 1x2 split image, shorter than MIXED


def mixed(model, family):
    """Text, a split image and (SmolVLM only: Idefics3 has no video) a video, as one sequence."""
    return batch(model, [MIXED if family == "smolvlm" else MIXED[:1] + [("image", 1, 3)]])


def padded(model, family):
    return batch(model, [MIXED if family == "smolvlm" else MIXED[:1], OTHER], seed=1)


@pytest.fixture(scope="module", params=["smolvlm", "idefics3"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def teacher(family):
    return tiny_model(family, seed=3)


@pytest.fixture(scope="module")
def student_default(teacher):
    return linmu.convert(teacher, linmu.MMateConfig(window=(2, 2, 2), text_window=8))


# ---------------------------------------------------------------------------------------------- layout
def test_pixel_shuffle_gives_row_major_tile_grid(teacher):
    """The family's connector turns a tile's patch grid into a row-major g x g token grid (the span's (1, g, g))."""
    cfg = teacher.config
    p = cfg.vision_config.image_size // cfg.vision_config.patch_size
    s = cfg.scale_factor
    r, c = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    coords = torch.stack([r, c], -1).reshape(1, p * p, 2).float()  # patch features = their own (row, col)
    out = teacher.model.connector.pixel_shuffle(coords, s).reshape(p * p // s ** 2, s * s, 2)
    g = p // s
    assert g * g == teacher.model.image_seq_len
    for k in range(g * g):  # token k of the tile gathers exactly the patches of block (k // g, k % g)
        assert set(map(tuple, (out[k] // s).long().tolist())) == {(k // g, k % g)}


def test_layout_from_inputs(teacher, family):
    inputs = padded(teacher, family)
    student = linmu.convert(teacher, linmu.MMateConfig.identity())
    layout = student.linmu_layout(inputs)
    n = teacher.model.image_seq_len
    g = int(n ** 0.5)
    ids = inputs["input_ids"]
    # the visual positions are exactly the model's own image placeholders (what it scatters tile features into)
    assert torch.equal(layout.is_visual, ids == teacher.config.image_token_id)
    tiles0 = 5 + (3 if family == "smolvlm" else 0)
    tiles1 = 1 + 3
    assert [s.batch for s in layout.spans] == [0] * tiles0 + [1] * tiles1
    assert all(s.grid == (1, g, g) and s.kind == "image" for s in layout.spans)
    # span starts are the tile starts of the prompt builder (shifted by the left padding)
    gen = torch.Generator().manual_seed(1)
    for b, items in enumerate([MIXED if family == "smolvlm" else MIXED[:1], OTHER]):
        row_ids, _, starts = prompt(teacher, items, gen)
        pad = ids.shape[1] - len(row_ids)
        assert [s.start for s in layout.spans if s.batch == b] == [pad + x for x in starts]
    # row-major coordinates inside the first tile, by hand
    s0 = layout.spans[0]
    assert layout.thw[0, s0.start:s0.start + n].tolist() == [[0, k // g, k % g] for k in range(n)]
    # left padding is marked invalid
    assert torch.equal(layout.key_valid, inputs["attention_mask"].bool())


def test_layout_metadata_from_encoded_images(teacher, family):
    """generate() hands the pre-encoded images instead of pixel_values: the same tile metadata is read from them."""
    inputs = padded(teacher, family)
    student = linmu.convert(teacher, linmu.MMateConfig.identity())
    want = student.linmu_tile_metadata(inputs)
    assert want == (teacher.model.image_seq_len, 12 if family == "smolvlm" else 9)
    with torch.no_grad():
        enc = teacher.model.get_image_features(inputs["pixel_values"], return_dict=True)
    no_pix = {k: v for k, v in inputs.items() if k != "pixel_values"}
    assert student.linmu_tile_metadata(dict(no_pix, mm_encoder_outputs={"image": enc})) == want  # 5.2x generate
    feats = torch.cat(list(enc.pooler_output)) if isinstance(enc.pooler_output, (list, tuple)) else enc.pooler_output
    feats = feats.reshape(want[1], want[0], -1)
    assert student.linmu_tile_metadata(dict(no_pix, image_hidden_states=feats)) == want  # 5.17 image_hidden_states
    assert student.linmu_tile_metadata(no_pix) == (teacher.model.image_seq_len, None)  # config fallback


def test_wrong_grid_metadata_is_named(teacher, family):
    inputs = mixed(teacher, family)
    student = linmu.convert(teacher, linmu.MMateConfig.identity())
    n = teacher.model.image_seq_len
    ids = inputs["input_ids"]
    with pytest.raises(ValueError, match="grid metadata"):  # one tile fewer in pixel_values than in input_ids
        student.linmu_layout(dict(inputs, pixel_values=inputs["pixel_values"][:, 1:]))
    with pytest.raises(ValueError, match="grid metadata"):  # a tile token turned into text: a broken tile
        broken = ids.clone()
        broken[0, (ids[0] == IMAGE).nonzero()[1, 0]] = 0
        student.linmu_layout(dict(inputs, input_ids=broken))
    with pytest.raises(ValueError, match="grid metadata"):  # a tile size that is not a square grid
        smolvlm_layout(ids, IMAGE, 2)
    with pytest.raises(ValueError, match="grid metadata"):  # tiles of another size than the prompt's
        smolvlm_layout(ids, IMAGE, 4 * n)
    with pytest.raises(ValueError, match="grid metadata"):  # non-square pixel tiles cannot be pixel-shuffled
        pv = inputs["pixel_values"]
        student.linmu_layout(dict(inputs, pixel_values=pv[..., : pv.shape[-1] // 2]))


# ---------------------------------------------------------------------------------------------- conversion
def test_conversion_report_covers_every_teacher_tensor(teacher, student_default):
    rep = student_default.linmu_conversion
    assert set(rep.reused) == set(teacher.state_dict())
    assert rep.dropped == []
    assert rep.new and all(k.startswith("model.text_model.layers.") and ".self_attn." in k for k in rep.new)
    assert not any(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")) for k in rep.new)
    # every reused tensor was copied (incl. the SigLIP tower's self_attn.{q,k,v}_proj, whose names look like decoder
    # attention to the key table)
    t_state, s_state = teacher.state_dict(), student_default.state_dict()
    for tk, sks in rep.reused.items():
        for sk in sks:
            assert torch.equal(s_state[sk], t_state[tk]), (tk, sk)


def test_layout_reaches_the_decoder_layers(teacher, family, student_default):
    """With the default config the spans change visual tokens' outputs; text before the first image is unaffected."""
    from linmu.layout import TokenLayout

    inputs = padded(teacher, family)
    B, L = inputs["input_ids"].shape
    with torch.no_grad():
        x = student_default(**inputs).logits
        y = student_default(**inputs, linmu_layout=TokenLayout.text_only(
            B, L, key_valid=inputs["attention_mask"].bool())).logits
    vis = inputs["input_ids"] == IMAGE
    first = int(vis[0].nonzero()[0, 0])
    assert (x - y).abs()[vis].max() > 1e-3
    assert torch.equal(x[0, :first], y[0, :first])


def _max_diff(a, b, mask=None):
    d = (a - b).abs()
    if mask is not None:
        d = d[mask.bool()]
    return d.max().item()


def test_identity_conversion_reproduces_teacher_logits(teacher, family):
    student = linmu.convert(teacher, linmu.MMateConfig.identity())
    with torch.no_grad():
        inputs = mixed(teacher, family)
        diff = _max_diff(student(**inputs).logits, teacher(**inputs).logits)
        assert diff <= 1e-4, diff
        inputs = padded(teacher, family)
        assert not inputs["attention_mask"].all()
        diff = _max_diff(student(**inputs).logits, teacher(**inputs).logits, inputs["attention_mask"])
        assert diff <= 1e-4, diff


@pytest.mark.parametrize("padding", [False, True])
def test_cached_generate_equals_uncached(teacher, family, student_default, padding):
    inputs = padded(teacher, family) if padding else mixed(teacher, family)
    # the random tiny model may pick the image token, which neither it nor the teacher can take as text, or stop early
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=PAD, suppress_tokens=[IMAGE])
    with torch.no_grad():
        cached = student_default.generate(**inputs, use_cache=True, **kw)
        uncached = student_default.generate(**inputs, use_cache=False, **kw)
    assert cached.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 6)
    assert torch.equal(cached, uncached)


def test_save_load_round_trip(student_default, family, tmp_path):
    inputs = padded(student_default, family)
    student_default.save_pretrained(tmp_path)
    loaded = linmu.load(tmp_path)
    assert type(loaded) is type(student_default)
    assert loaded.config.linmu_family == family
    if family == "idefics3":
        assert isinstance(loaded, LinMUIdefics3ForConditionalGeneration)
    with torch.no_grad():
        a = student_default(**inputs).logits
        b = loaded(**inputs).logits
    assert torch.equal(a, b)
