import numpy as np
import pytest
import torch
import torch.nn.functional as F

from linmu.data import BadSampleError, LoadedSample, QwenVLProcessor, build_tokenizer
from linmu.data.qwen_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

TEXTS = ["what color is the circle", "how many squares", "red", "two", "and then", "which came first"]
MIN_PIX, MAX_PIX = 28 * 28, 112 * 112


def rand_img(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def rand_video(t, h, w, seed=0):
    return (np.random.default_rng(seed).random((t, h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TEXTS)


@pytest.fixture(scope="module")
def proc(tok):
    return QwenVLProcessor(tok, min_pixels=MIN_PIX, max_pixels=MAX_PIX)


def sample_img(sid="img"):
    return LoadedSample(id=sid, turns=[("user", "<image>\nwhat color is the circle?"), ("assistant", "red"),
                                       ("user", "and then <image>?"), ("assistant", "two")],
                        images=[rand_img(56, 84, 1), rand_img(30, 40, 2)])


def sample_vid(sid="vid", t=5):
    return LoadedSample(id=sid, turns=[("user", "<video>\nhow many squares?"), ("assistant", "two")],
                        videos=[rand_video(t, 50, 60, 3)])


def sample_text(sid="txt"):
    return LoadedSample(id=sid, turns=[("user", "which came first?"), ("assistant", "red")])


# ------------------------------------------------------------------------------------------- token layout and labels

def test_token_counts_grids_and_mm_types(proc):
    out = proc([sample_img(), sample_vid()])
    ig, vg = out["image_grid_thw"].tolist(), out["video_grid_thw"].tolist()
    assert ig == [[1, 4, 6], [1, 2, 2]]  # 56x84 stays; 30x40 -> 28x28 (min_pixels)
    assert vg == [[3, 4, 4]]  # 5 frames -> padded to 6 -> t=3; 50x60 -> 56x56
    assert out["pixel_values"].shape == (24 + 4, 3 * 2 * 14 * 14)
    assert out["pixel_values_videos"].shape == (3 * 16, 1176)
    ids, mm = out["input_ids"], out["mm_token_type_ids"]
    assert (ids[0] == proc.image_token_id).sum() == 24 // 4 + 4 // 4
    assert (ids[1] == proc.video_token_id).sum() == 3 * 16 // 4
    assert torch.equal(mm == 1, ids == proc.image_token_id) and torch.equal(mm == 2, ids == proc.video_token_id)
    # each image is one run of pads between vision_start and vision_end
    row = ids[0][out["attention_mask"][0].bool()].tolist()
    s = [i for i, x in enumerate(row) if x == proc.vision_start_token_id]
    e = [i for i, x in enumerate(row) if x == proc.vision_end_token_id]
    assert [b - a - 1 for a, b in zip(s, e)] == [6, 1]
    assert all(x == proc.image_token_id for a, b in zip(s, e) for x in row[a + 1:b])


def test_labels_are_exactly_the_answers(proc, tok):
    out = proc([sample_img()])
    ids, labels = out["input_ids"][0], out["labels"][0]
    on = labels != -100
    assert torch.equal(labels[on], ids[on])
    assert tok.decode(ids[on]) == "red<|im_end|>two<|im_end|>"
    # the labelled runs start right after "<|im_start|>assistant\n"
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    starts = [i for i in range(1, len(on)) if on[i] and not on[i - 1]]
    assert len(starts) == 2
    for i in starts:
        assert ids[i - len(header):i].tolist() == header


def test_text_matches_chat_template(proc, tok):
    s = sample_img()
    out = proc([s])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle?"}]},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": [{"type": "text", "text": "and then "}, {"type": "image"},
                                         {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "two"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    pads = iter([6, 1])
    text = text.replace("<|image_pad|>", "<|placeholder|>")
    while "<|placeholder|>" in text:
        text = text.replace("<|placeholder|>", "<|image_pad|>" * next(pads), 1)
    assert out["input_ids"][0].tolist() == tok(text, add_special_tokens=False)["input_ids"]


def test_left_padding_and_batch_equals_singles(proc, tok):
    samples = [sample_img(), sample_text(), sample_vid()]
    out = proc(samples)
    lens = [len(proc.encode(s)["input_ids"]) for s in samples]
    L = max(lens)
    assert out["input_ids"].shape == (3, L)
    for i, s in enumerate(samples):
        one = proc([s])
        n = lens[i]
        assert out["attention_mask"][i].tolist() == [0] * (L - n) + [1] * n
        assert (out["input_ids"][i, :L - n] == tok.pad_token_id).all()
        assert (out["labels"][i, :L - n] == -100).all() and (out["mm_token_type_ids"][i, :L - n] == 0).all()
        for k in ("input_ids", "labels", "mm_token_type_ids"):
            assert torch.equal(out[k][i, L - n:], one[k][0])
    assert torch.equal(out["pixel_values"], proc([samples[0]])["pixel_values"])
    assert torch.equal(out["pixel_values_videos"], proc([samples[2]])["pixel_values_videos"])
    assert out.sample_ids == ["img", "txt", "vid"]


def test_bad_samples(proc):
    long = sample_vid(t=8)
    n = len(proc.encode(long)["input_ids"])
    assert len(proc.encode(long, max_length=n)["input_ids"]) == n
    with pytest.raises(BadSampleError) as e:
        proc([long], max_length=n - 1)
    assert e.value.reason == "too_long" and "vid" in str(e.value)
    no_answer = LoadedSample(id="q", turns=[("user", "which came first?")])
    with pytest.raises(BadSampleError) as e:
        proc.encode(no_answer)
    assert e.value.reason == "no_answer"
    mismatch = LoadedSample(id="m", turns=[("user", "<image> <image>"), ("assistant", "red")],
                            images=[rand_img(28, 28)])
    with pytest.raises(BadSampleError) as e:
        proc.encode(mismatch)
    assert e.value.reason == "media_mismatch"
    thin = LoadedSample(id="t", turns=[("user", "<image>"), ("assistant", "red")], images=[rand_img(4, 1000)])
    with pytest.raises(BadSampleError) as e:
        proc.encode(thin)
    assert e.value.reason == "bad_image"
    out = proc([long, no_answer, sample_text()], max_length=n - 1, skip_bad=True)
    assert out["input_ids"].shape[0] == 1 and [r.reason for r in out.rejected] == ["too_long", "no_answer"]
    with pytest.raises(TypeError):
        proc.encode(LoadedSample(id="p", turns=[("user", "<image>"), ("assistant", "x")], images=["a.png"]))


def test_generation_prompt(proc, tok):
    s = sample_vid()
    out = proc([s], add_generation_prompt=True)
    text = tok.decode(out["input_ids"][0])
    assert text.endswith("how many squares?<|im_end|>\n<|im_start|>assistant\n") and "two" not in text
    assert (out["labels"] == -100).all()
    q = LoadedSample(id="q", turns=[("user", "which came first?")])
    assert proc([q], add_generation_prompt=True)["input_ids"].shape[0] == 1


def test_system_prompt_option(tok):
    p = QwenVLProcessor(tok, system_prompt=None)
    assert tok.decode(p.encode(sample_text())["input_ids"]).startswith("<|im_start|>user\n")
    s = LoadedSample(id="s", turns=[("system", "be brief"), ("user", "two?"), ("assistant", "two")])
    assert tok.decode(QwenVLProcessor(tok).encode(s)["input_ids"]).startswith("<|im_start|>system\nbe brief<|im_end|>")


# ------------------------------------------------------------------------------------------- pixels

def test_images_match_transformers_pil_processor(proc):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ref = Qwen2VLImageProcessorPil(min_pixels=MIN_PIX, max_pixels=MAX_PIX)
    one_level = 1.0 / (255 * min(OPENAI_CLIP_STD)) + 1e-4
    for (h, w), tol in (((56, 84), 1e-5), ((50, 70), one_level), ((200, 300), one_level)):
        img = rand_img(h, w, h)
        r = ref(images=[Image.fromarray(img)], return_tensors="pt")
        rows, grid = proc.process_image(img)
        assert list(grid) == r["image_grid_thw"][0].tolist()
        # same size: identical; resized: PIL's bicubic vs torch's antialiased bicubic differ by <= 1 grey level
        assert (rows - r["pixel_values"]).abs().max().item() <= tol


def test_video_of_identical_pairs_equals_image_processor_per_pair(proc):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ref = Qwen2VLImageProcessorPil(min_pixels=MIN_PIX, max_pixels=MAX_PIX)
    base = rand_video(3, 56, 84, 7)
    video = np.repeat(base, 2, axis=0)  # frames (0,0,1,1,2,2)
    rows, grid = proc.process_video(video)
    assert grid == (3, 4, 6)
    per_pair = [ref(images=[f], return_tensors="pt")["pixel_values"] for f in base]
    assert torch.allclose(rows, torch.cat(per_pair), atol=1e-5, rtol=0)
    # with a resize the pairing still holds exactly against our own image path
    video = np.repeat(rand_video(2, 50, 70, 8), 2, axis=0)
    rows, _ = proc.process_video(video)
    assert torch.equal(rows, torch.cat([proc.process_image(f)[0] for f in video[::2]]))


def reference_video_rows(frames, *, patch=14, tp=2, merge=2, min_pixels=MIN_PIX, max_pixels=MAX_PIX):
    """Straightforward re-implementation from transformers' Qwen2VLVideoProcessor (resize, fused normalise, pad the
    frame count by repeating the last frame, one row per patch in (t, h-block, w-block, h-in-block, w-in-block)
    order, each row laid out as (channel, frame-in-patch, y, x))."""
    from linmu.data.qwen_processing import smart_resize

    t, h, w, _ = frames.shape
    rh, rw = smart_resize(h, w, patch * merge, min_pixels, max_pixels)
    x = torch.from_numpy(frames.copy()).permute(0, 3, 1, 2)
    if (rh, rw) != (h, w):
        x = F.interpolate(x, size=[rh, rw], mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(OPENAI_CLIP_MEAN) * 255
    std = torch.tensor(OPENAI_CLIP_STD) * 255
    x = (x.float() - mean[:, None, None]) / std[:, None, None]
    while x.shape[0] % tp:
        x = torch.cat([x, x[-1:]])
    gt, gh, gw = x.shape[0] // tp, rh // patch, rw // patch
    rows = []
    for ti in range(gt):
        for bh in range(gh // merge):
            for bw in range(gw // merge):
                for mh in range(merge):
                    for mw in range(merge):
                        y0, x0 = (bh * merge + mh) * patch, (bw * merge + mw) * patch
                        block = x[ti * tp:(ti + 1) * tp, :, y0:y0 + patch, x0:x0 + patch]  # (tp, C, p, p)
                        rows.append(block.permute(1, 0, 2, 3).reshape(-1))
    return torch.stack(rows), (gt, gh, gw)


@pytest.mark.parametrize("shape", [(4, 56, 56), (5, 50, 70), (3, 120, 90), (1, 28, 56)])
def test_video_matches_reference_reimplementation(proc, shape):
    frames = rand_video(*shape, seed=sum(shape))
    rows, grid = proc.process_video(frames)
    ref, ref_grid = reference_video_rows(frames)
    assert grid == ref_grid
    assert torch.allclose(rows, ref, atol=1e-5, rtol=0)


def test_video_and_image_match_transformers_torchvision_processors(proc):
    pytest.importorskip("torchvision")
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    kw = {"cap_pixels_per_frame": False} if hasattr(Qwen2VLVideoProcessor, "cap_pixels_per_frame") else {}
    vp = Qwen2VLVideoProcessor(min_pixels=MIN_PIX, max_pixels=MAX_PIX, **kw)
    ip = Qwen2VLImageProcessor(min_pixels=MIN_PIX, max_pixels=MAX_PIX)
    for shape in [(4, 56, 56), (5, 50, 70), (3, 120, 90), (2, 200, 300)]:
        frames = rand_video(*shape, seed=sum(shape))
        r = vp(videos=[frames], return_tensors="pt", do_sample_frames=False)
        rows, grid = proc.process_video(frames)
        assert list(grid) == r["video_grid_thw"][0].tolist()
        assert torch.allclose(rows, r["pixel_values_videos"], atol=1e-5, rtol=0), shape
        from PIL import Image

        ri = ip(images=[Image.fromarray(frames[0])], return_tensors="pt")
        rows, grid = proc.process_image(frames[0])
        assert list(grid) == ri["image_grid_thw"][0].tolist()
        assert torch.allclose(rows, ri["pixel_values"], atol=1e-5, rtol=0), shape


# ------------------------------------------------------------------------------------------- models

def tiny_config(tok, kind="qwen2_vl"):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
                bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
               video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
               vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    if kind == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    else:
        vision = dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    for c in (cfg, cfg.text_config):
        c.pad_token_id, c.eos_token_id, c.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.eos_token_id
    cfg._attn_implementation = "sdpa"
    return cfg


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_batch_runs_through_tiny_model(tok, kind):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = tiny_config(tok, kind)
    cls = Qwen2VLForConditionalGeneration if kind == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    model = cls(cfg).eval()
    proc = QwenVLProcessor.from_model_config(cfg, tok, min_pixels=MIN_PIX, max_pixels=MAX_PIX)
    vid = sample_vid()
    vid.video_fps = [4.0]
    batch = proc([sample_img(), sample_text(), vid])
    if kind == "qwen2_5_vl":
        assert batch["second_per_grid_ts"].tolist() == [0.5]
    else:
        assert "second_per_grid_ts" not in batch
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, len(tok))
    assert torch.isfinite(out.loss)
    # a left-padded row gives the same answer logits as that sample alone
    with torch.no_grad():
        alone = model(**proc([sample_text()]))
    n = alone.logits.shape[1]
    assert torch.allclose(out.logits[1, -n:], alone.logits[0], atol=1e-4)


def test_from_model_config_checks_ids(tok):
    cfg = tiny_config(tok)
    cfg.image_token_id = 3
    with pytest.raises(ValueError, match="image_token_id"):
        QwenVLProcessor.from_model_config(cfg, tok)


def test_save_and_load_processor(proc, tmp_path):
    proc.save_pretrained(tmp_path)
    back = QwenVLProcessor.from_pretrained(tmp_path)
    s = [sample_img(), sample_vid()]
    a, b = proc(s), back(s)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ref = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)  # transformers reads our preprocessor_config.json
    assert ref.size["shortest_edge"] == MIN_PIX and ref.size["longest_edge"] == MAX_PIX and ref.merge_size == 2
