import numpy as np
import pytest

pytest.importorskip("av")

from linmu.data import MediaError, decode_video, load_image, write_test_video  # noqa: E402
from linmu.data.media import select_frame_indices  # noqa: E402


def gray_clip(n=16, h=48, w=64):
    """Frame k is a flat grey of level 12 + 14 k, so the decoded level tells which frame it was."""
    levels = 12 + 14 * np.arange(n)
    return np.broadcast_to(levels[:, None, None, None], (n, h, w, 3)).astype(np.uint8).copy()


def frame_ids(frames):
    return np.round((frames.reshape(len(frames), -1).mean(1) - 12) / 14).astype(int).tolist()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_test_video(tmp_path_factory.mktemp("v") / "clip.mp4", gray_clip(), fps=8)  # 2 s


def test_decode_all_frames_and_content(clip):
    frames, ts = decode_video(clip)
    assert frames.shape == (16, 48, 64, 3) and frames.dtype == np.uint8
    assert frame_ids(frames) == list(range(16))
    np.testing.assert_allclose(ts, np.arange(16) / 8)


def test_decode_by_count(clip):
    frames, ts, info = decode_video(clip, num_frames=4, return_info=True)
    assert frame_ids(frames) == [0, 5, 10, 15]  # uniform, both ends included
    np.testing.assert_allclose(ts, [0, 5 / 8, 10 / 8, 15 / 8])
    assert info["num_frames"] == 16 and info["fps"] == pytest.approx(8) and info["sampled_fps"] == pytest.approx(2)
    frames, _ = decode_video(clip, num_frames=1)
    assert frame_ids(frames) == [0]
    frames, _ = decode_video(clip, num_frames=20)  # more than the clip has: frames repeat, count is kept
    assert len(frames) == 20 and frame_ids(frames)[-1] == 15


def test_decode_by_fps_and_max_frames(clip):
    frames, ts = decode_video(clip, fps=2)
    assert frame_ids(frames) == [0, 4, 8, 12]
    np.testing.assert_allclose(ts, [0, 0.5, 1.0, 1.5])
    frames, ts = decode_video(clip, fps=4, max_frames=3)  # 8 frames by fps, capped uniformly to 3
    assert frame_ids(frames) == [0, 8, 15]
    frames, _ = decode_video(clip, fps=30)  # faster than the clip: every frame
    assert len(frames) == 16
    frames, _ = decode_video(clip, max_frames=5)
    assert frame_ids(frames) == [0, 4, 8, 11, 15]
    with pytest.raises(ValueError):
        decode_video(clip, num_frames=4, fps=2)


def test_select_frame_indices_deterministic():
    a = select_frame_indices(1000, 30.0, fps=1, max_frames=64)
    assert len(a) == 34 and a[0] == 0 and a[1] == 30
    b = select_frame_indices(1000, 30.0, fps=1, max_frames=16)
    assert len(b) == 16 and b[0] == 0 and b[-1] == 999
    np.testing.assert_array_equal(b, select_frame_indices(1000, 30.0, fps=1, max_frames=16))


def _err(path, **kw):
    with pytest.raises(MediaError) as e:
        decode_video(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return e.value


def test_media_errors(tmp_path, clip):
    assert _err(tmp_path / "missing.mp4").kind == "missing"
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert _err(tmp_path / "empty.mp4").kind == "empty"
    (tmp_path / "notes.mp4").write_text("this is a text file, not a video\n" * 10)  # .txt renamed .mp4
    e = _err(tmp_path / "notes.mp4")
    assert e.kind == "unsupported" and "unsupported" in str(e)
    data = clip.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # mp4 cut before its index: corrupt container
    e = _err(tmp_path / "cut.mp4")
    assert e.kind == "corrupt" and "corrupt" in str(e)
    # a valid container whose frame data are garbage: nothing decodes
    one = write_test_video(tmp_path / "one.mp4", gray_clip(1))
    b = bytearray(one.read_bytes())
    i = b.find(b"mdat")
    size = int.from_bytes(b[i - 4:i], "big")
    b[i + 4:i - 4 + size] = bytes(size - 8)
    (tmp_path / "zeroed.mp4").write_bytes(bytes(b))
    e = _err(tmp_path / "zeroed.mp4")
    assert e.kind == "no_frames" and "no decodable frames" in str(e)
    assert isinstance(e, ValueError)


def test_load_image(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((10, 12), 200, np.uint8)).save(tmp_path / "g.png")  # greyscale -> RGB
    img = load_image(tmp_path / "g.png")
    assert img.mode == "RGB" and img.size == (12, 10) and np.asarray(img)[0, 0].tolist() == [200, 200, 200]
    for name, content, kind in (("none.png", None, "missing"), ("e.png", b"", "empty"),
                                ("t.png", b"plain text", "unsupported")):
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(MediaError) as e:
            load_image(tmp_path / name)
        assert e.value.kind == kind and name in str(e.value)
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(tmp_path / "n.png")
    raw = (tmp_path / "n.png").read_bytes()
    for cut in (len(raw) // 2, 20):  # data truncated; header truncated
        (tmp_path / "cut.png").write_bytes(raw[:cut])
        with pytest.raises(MediaError) as e:
            load_image(tmp_path / "cut.png")
        assert e.value.kind == "corrupt", str(e.value)
