"""Image loading and video decoding (PyAV), with one clear error type for every way a media file can be bad.

`decode_video` samples frames in presentation order:

* ``num_frames=k``: ``k`` frames spread uniformly over the whole clip (``linspace(0, n - 1, k)`` rounded, so the first
  and the last frame are included, as in LLaVA-Video and qwen-vl-utils); ``k > n`` repeats frames so the result
  always has ``k`` frames;
* ``fps=f``: one frame every ``1 / f`` seconds starting at the first frame (every frame if ``f`` is at least the
  clip's own rate);
* neither: every frame;
* ``max_frames=m`` then caps the count: if more than ``m`` frames were selected, ``m`` frames are taken uniformly over
  the whole clip instead.

Selection is a pure function of the clip's frame count and rate, so the same file always gives the same frames.
Timestamps are seconds from the first frame of the clip (from each frame's pts; ``index / rate`` when a frame has
none).

The whole stream is decoded sequentially (no seeking); only the selected frames are converted to RGB.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# Leading bytes of container formats we know. A file whose header FFmpeg cannot read is reported as *corrupt* when it
# starts like one of these, and as *unsupported* otherwise (a text file renamed .mp4, random bytes, ...).
_KNOWN_SIGNATURES = (
    (4, b"ftyp"), (4, b"moov"), (4, b"mdat"), (4, b"free"), (4, b"wide"), (4, b"skip"),  # mp4 / mov / 3gp
    (0, b"\x1a\x45\xdf\xa3"),  # matroska / webm
    (0, b"RIFF"),  # avi
    (0, b"FLV"),
    (0, b"OggS"),
    (0, b"\x00\x00\x01\xba"), (0, b"\x00\x00\x01\xb3"),  # mpeg program stream / elementary stream
    (0, b"\x30\x26\xb2\x75"),  # asf / wmv
)


_IMAGE_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


class MediaError(ValueError):
    """A media file that cannot be used. ``kind`` is one of ``missing``, ``empty``, ``corrupt``, ``unsupported``,
    ``no_video_stream``, ``no_frames``; ``str(err)`` is one line: ``"<path>: <problem>"``."""

    def __init__(self, path, kind: str, problem: str):
        self.path = str(path)
        self.kind = kind
        self.problem = " ".join(str(problem).split())  # one line
        super().__init__(f"{self.path}: {self.problem}")


def _check_file(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise MediaError(p, "missing", "file not found")
    if not p.is_file():
        raise MediaError(p, "unsupported", "not a regular file")
    if p.stat().st_size == 0:
        raise MediaError(p, "empty", "empty file (0 bytes)")
    return p


def _looks_like_video_container(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(189)
    if len(head) == 189 and head[0] == 0x47 and head[188] == 0x47:  # MPEG-TS: sync byte every 188 bytes
        return True
    return any(head[off:off + len(sig)] == sig for off, sig in _KNOWN_SIGNATURES)


# ---------------------------------------------------------------------------------------------------------- images

def load_image(path):
    """Open an image file as an RGB ``PIL.Image`` (fully loaded). Raises `MediaError` for a missing, empty,
    unreadable or corrupt file."""
    from PIL import Image, UnidentifiedImageError

    p = _check_file(path)
    try:
        with Image.open(p) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        with open(p, "rb") as f:
            head = f.read(12)
        if head.startswith(_IMAGE_SIGNATURES) or head[8:12] == b"WEBP":
            raise MediaError(p, "corrupt", "corrupt or truncated image header") from None
        raise MediaError(p, "unsupported", "not an image format PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated / broken data
        raise MediaError(p, "corrupt", f"cannot decode image ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------------------- videos

def _uniform(n: int, k: int) -> np.ndarray:
    if k <= 0:
        raise ValueError(f"the number of frames to sample must be positive, got {k}")
    if k == 1:
        return np.zeros(1, dtype=np.int64)
    return np.round(np.linspace(0, n - 1, k)).astype(np.int64)


def select_frame_indices(n: int, video_fps: float | None, *, num_frames: int | None = None, fps: float | None = None,
                         max_frames: int | None = None) -> np.ndarray:
    """Indices (presentation order) of the frames `decode_video` keeps from a clip of ``n`` frames at ``video_fps``."""
    if num_frames is not None and fps is not None:
        raise ValueError("num_frames and fps are mutually exclusive")
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if num_frames is not None:
        idx = _uniform(n, int(num_frames))
    elif fps is not None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if not video_fps or video_fps <= fps:
            idx = np.arange(n, dtype=np.int64)
        else:
            step = video_fps / fps
            count = int(math.floor((n - 1) / step + 1e-9)) + 1
            idx = np.minimum(np.round(np.arange(count) * step).astype(np.int64), n - 1)
    else:
        idx = np.arange(n, dtype=np.int64)
    if max_frames is not None and len(idx) > max_frames:
        idx = _uniform(n, int(max_frames))
    return idx


def _open_container(p: Path):
    import av

    try:
        container = av.open(str(p), mode="r")
    except av.error.FFmpegError as e:
        msg = getattr(e, "strerror", None) or str(e)
        if _looks_like_video_container(p):
            raise MediaError(p, "corrupt", f"corrupt or truncated video container ({msg})") from None
        raise MediaError(p, "unsupported", f"unsupported format: not a video container FFmpeg recognises ({msg})") \
            from None
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise MediaError(p, "no_video_stream", f"no video stream (streams: {', '.join(kinds)})")
    return container


def _count_frames(p: Path, stream_index: int) -> int:
    """Frame count by demuxing only (no decoding), for containers that do not store it."""
    container = _open_container(p)
    try:
        stream = container.streams.video[stream_index]
        return sum(1 for pkt in container.demux(stream) if pkt.size)
    finally:
        container.close()


def _decode_selected(p: Path, wanted: np.ndarray):
    """Decode the first video stream; return ({index: (rgb, time)}, decoded_count, failed_packets, rate)."""
    import av

    want = set(int(i) for i in wanted)
    last_wanted = max(want) if want else -1
    kept, n, failed = {}, 0, 0
    container = _open_container(p)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        t0 = None

        def take(frames):
            nonlocal n, t0
            for frame in frames:
                t = frame.time
                if t0 is None:
                    t0 = t if t is not None else 0.0
                if n in want:
                    ts = (t - t0) if t is not None else (n / rate if rate else float(n))
                    kept[n] = (frame.to_ndarray(format="rgb24"), ts)
                n += 1

        for packet in container.demux(stream):
            try:
                take(packet.decode())  # the flush packet (size 0) drains the decoder
            except av.error.FFmpegError:
                failed += 1
            if n > last_wanted and last_wanted >= 0 and packet.size:
                break
    except av.error.FFmpegError as e:  # demuxing itself failed part-way
        failed += 1
        if not kept and n == 0:
            raise MediaError(p, "corrupt", f"cannot read video data ({e})") from None
    finally:
        container.close()
    return kept, n, failed, rate


def decode_video(path, *, num_frames: int | None = None, fps: float | None = None, max_frames: int | None = None,
                 min_valid_fraction: float = 0.5, return_info: bool = False):
    """Decode a video file with PyAV and sample frames (see the module docstring for the sampling rules).

    Returns ``(frames, timestamps)``: ``uint8`` RGB array ``(T, H, W, 3)`` and ``float64`` seconds ``(T,)``; with
    ``return_info=True`` also a dict ``{"num_frames": decodable frames in the clip, "fps": the clip's frame rate or
    None, "sampled_fps": T / clip duration (what Qwen2.5-VL's processor calls the sampled fps) or None}``.
    Raises `MediaError` for a missing, empty, unsupported or corrupt file, a file without a video stream, one
    without any decodable frame, or one where fewer than ``min_valid_fraction`` of the frames the container declares
    can be decoded.
    """
    p = _check_file(path)
    container = _open_container(p)
    try:
        stream = container.streams.video[0]
        declared = int(stream.frames or 0)
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
    finally:
        container.close()
    n = declared or _count_frames(p, 0)
    if n == 0:
        raise MediaError(p, "no_frames", "video stream has no frames")

    idx = select_frame_indices(n, rate, num_frames=num_frames, fps=fps, max_frames=max_frames)
    kept, decoded, failed, rate2 = _decode_selected(p, idx)
    clip_frames = n
    if decoded == 0 and not kept:
        raise MediaError(p, "no_frames", f"no decodable frames ({failed} of {n} packets failed)")
    if decoded < n and max(idx) >= decoded:
        # the container promised more frames than could be decoded: check how many really decode, then resample
        _, total, failed, _ = _decode_selected(p, np.zeros(0, dtype=np.int64))
        if total == 0:
            raise MediaError(p, "no_frames", f"no decodable frames ({failed} of {n} packets failed)")
        if total < min_valid_fraction * n:
            raise MediaError(p, "corrupt", f"only {total} of {n} frames decodable ({failed} packets failed)")
        clip_frames = total
        idx = select_frame_indices(total, rate2 or rate, num_frames=num_frames, fps=fps, max_frames=max_frames)
        kept, decoded, failed, _ = _decode_selected(p, idx)
    frames = np.stack([kept[int(i)][0] for i in idx])
    times = np.array([kept[int(i)][1] for i in idx], dtype=np.float64)
    if not return_info:
        return frames, times
    fps_clip = rate2 or rate
    info = {"num_frames": int(clip_frames), "fps": fps_clip,
            "sampled_fps": (len(idx) * fps_clip / clip_frames) if fps_clip else None}
    return frames, times, info


def write_test_video(path, frames, fps: float = 8, codec: str = "mpeg4", bit_rate: int | None = None) -> Path:
    """Write ``frames`` (uint8 ``(T, H, W, 3)``, even H and W) as an mp4 (mpeg4 video, yuv420p). Returns the path."""
    import av
    from fractions import Fraction

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if len(frames) == 0:
        raise ValueError("cannot write a video without frames")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        if bit_rate:
            stream.bit_rate = int(bit_rate)
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


__all__ = ["MediaError", "load_image", "decode_video", "select_frame_indices", "write_test_video"]
