"""`linmu.inference.generate` and `linmu generate`: loading LinMU / teacher directories, PyAV-decoded video and images,
streaming that matches the final answer, TTFT and tokens/s, and one-line errors (no traceback) for bad inputs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from linmu.cli import main
from linmu.data import MediaError
from linmu.inference.generate import (InputError, generate, inspect_model_dir, load_media, load_model,
                                      video_sampling)

from tests.helpers import write_tiny_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A teacher with its tokenizer, its LinMU model (identity and default settings, no tokenizer) and media."""
    root = tmp_path_factory.mktemp("generate")
    write_tiny_workspace(root, seed=3, students=("identity", "student"), media_seed=0)
    return root


def test_teacher_streams_the_answer_it_returns_with_timings(ws):
    lm = load_model(ws / "teacher")
    assert (lm.kind, lm.family) == ("teacher", "qwen2_vl")
    pieces = []
    r = generate(lm, "what color is the shape", images=[ws / "a.png"], video=ws / "clip.mp4", num_frames=4,
                 max_new_tokens=8, on_text=pieces.append)
    assert "".join(pieces) == r.text
    assert 1 <= r.new_tokens <= 8 and r.frames == 4
    assert r.ttft_s is not None and 0 < r.ttft_s <= r.total_s
    assert r.tokens_per_s > 0 and "TTFT" in r.summary() and "tokens/s" in r.summary()
    # the same tokens as a plain greedy generate on the processor's inputs
    media = load_media([ws / "a.png"], [ws / "clip.mp4"], num_frames=4)
    from linmu.inference.generate import build_inputs, to_model_inputs

    inputs = to_model_inputs(build_inputs(lm, "what color is the shape", media), lm.model)
    with torch.no_grad():
        ref = lm.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert ref[0, inputs["input_ids"].shape[1]:].tolist() == r.token_ids
    # one <image> and one <video> placeholder in the prompt, both media: 4 image tokens + 2x2x2 video tokens
    assert (inputs["mm_token_type_ids"] == 1).sum() == 4 and (inputs["mm_token_type_ids"] == 2).sum() == 8


def test_linmu_identity_generates_the_teachers_tokens(ws):
    t = load_model(ws / "teacher")
    s = load_model(ws / "identity", processor=ws / "teacher")
    assert s.kind == "linmu" and type(s.model).__name__ == "LinMUQwen2VLForConditionalGeneration"
    kw = dict(video=ws / "clip.mp4", fps=2.0, max_new_tokens=6)
    rt, rs = generate(t, "how many times did it blink", **kw), generate(s, "how many times did it blink", **kw)
    assert rs.token_ids == rt.token_ids and rs.frames == 4  # fps 2 over a 2 s clip at 4 fps: 4 frames
    pieces = []
    r = generate(load_model(ws / "student", processor=ws / "teacher"), "<video>\nwhat color", video=ws / "clip.mp4",
                 max_new_tokens=5, on_text=pieces.append)
    assert "".join(pieces) == r.text and r.new_tokens >= 1


def test_cli_streams_and_reports(ws, capsys):
    rc = main(["generate", "--model", str(ws / "student"), "--processor", str(ws / "teacher"), "--video",
               str(ws / "clip.mp4"), "--image", str(ws / "a.png"), "--prompt", "what color is the shape", "--stream",
               "--num-frames", "4", "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    ref = generate(load_model(ws / "student", processor=ws / "teacher"), "what color is the shape",
                   images=[ws / "a.png"], video=ws / "clip.mp4", num_frames=4, max_new_tokens=6)
    assert out == ref.text + "\n"
    assert "TTFT" in err and "tokens/s" in err and "[linmu qwen2_vl]" in err and "4 video frames" in err


def _bad_inputs(ws, tmp):
    """(case, extra CLI args, substring the one-line error must contain)."""
    tmp.mkdir(exist_ok=True)
    (tmp / "empty.mp4").write_bytes(b"")
    (tmp / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(300))
    (tmp / "notes.mp4").write_text("this is text, not a video\n" * 20)
    data = (ws / "clip.mp4").read_bytes()
    (tmp / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (tmp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    for name, cfg in (("llama", {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}),
                      ("smol", {"architectures": ["SmolVLMForConditionalGeneration"], "model_type": "smolvlm"})):
        (tmp / name).mkdir(exist_ok=True)
        (tmp / name / "config.json").write_text(json.dumps(cfg))
    (tmp / "noconfig").mkdir(exist_ok=True)
    (tmp / "badjson").mkdir(exist_ok=True)
    (tmp / "badjson" / "config.json").write_text("{not json")
    trunc = tmp / "truncated_model"
    trunc.mkdir(exist_ok=True)
    for f in (ws / "teacher").iterdir():
        (trunc / f.name).write_bytes(f.read_bytes())
    w = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(w[: len(w) // 2])
    teacher, vid = str(ws / "teacher"), ["--video", str(ws / "clip.mp4")]
    return [
        ("missing video", ["--model", teacher, "--video", str(tmp / "nope.mp4")], "file not found"),
        ("empty video", ["--model", teacher, "--video", str(tmp / "empty.mp4")], "empty file"),
        ("corrupt video", ["--model", teacher, "--video", str(tmp / "corrupt.mp4")], "corrupt"),
        ("truncated video", ["--model", teacher, "--video", str(tmp / "truncated.mp4")], "truncated.mp4"),
        ("unsupported format", ["--model", teacher, "--video", str(tmp / "notes.mp4")], "unsupported format"),
        ("missing image", ["--model", teacher, "--image", str(tmp / "nope.png")], "file not found"),
        ("corrupt image", ["--model", teacher, "--image", str(tmp / "broken.png")], "corrupt"),
        ("no model dir", ["--model", str(tmp / "nowhere"), *vid], "does not exist"),
        ("no config", ["--model", str(tmp / "noconfig"), *vid], "no config.json"),
        ("corrupt config", ["--model", str(tmp / "badjson"), *vid], "not valid JSON"),
        ("other architecture", ["--model", str(tmp / "llama"), *vid], "neither a LinMU model nor a supported teacher"),
        ("family without processor", ["--model", str(tmp / "smol"), *vid], "not supported yet for smolvlm"),
        ("linmu without tokenizer", ["--model", str(ws / "student"), *vid], "has no tokenizer"),
        ("truncated weights", ["--model", str(trunc), *vid], "truncated or corrupt"),
        ("frames and fps", ["--model", teacher, *vid, "--num-frames", "4", "--fps", "2"], "not allowed with"),
        ("placeholders", ["--model", teacher, "--image", str(ws / "a.png"), "--prompt", "<image><image> what"],
         "disagree"),
    ]


def test_cli_errors_are_one_line(ws, tmp_path, capsys):
    for case, args, needle in _bad_inputs(ws, tmp_path / "bad"):
        argv = ["generate", *args] + ([] if "--prompt" in args else ["--prompt", "what color"])
        try:
            rc = main(argv + ["--max-new-tokens", "2"])
        except SystemExit as e:  # argparse's own usage errors (mutually exclusive options)
            rc = e.code
        out, err = capsys.readouterr()
        lines = [l for l in err.splitlines() if l.strip()]
        assert rc != 0, case
        assert len(lines) == 1 or case == "frames and fps", (case, err)
        assert needle in err, (case, err)
        assert "Traceback" not in err and out == "", (case, out, err)


def test_console_error_has_no_traceback(ws, tmp_path):
    """The real entry point (a fresh interpreter): a corrupt file gives one line on stderr and exit status 2."""
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(300))
    proc = subprocess.run([sys.executable, "-m", "linmu.cli", "generate", "--model", str(ws / "teacher"), "--video",
                           str(bad), "--prompt", "what"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"linmu generate: error: {bad}: corrupt or truncated video"), lines


def test_library_errors(ws):
    with pytest.raises(InputError, match="is a LinMU model, not a teacher"):
        load_model(ws / "student", teacher=True, processor=ws / "teacher")
    with pytest.raises(InputError, match="teacher checkpoint, not a LinMU model"):
        load_model(ws / "teacher", teacher=False)
    with pytest.raises(InputError, match="mutually exclusive"):
        video_sampling(num_frames=4, fps=2.0)
    with pytest.raises(MediaError, match="file not found"):
        load_media([], [ws / "nope.mp4"])
    assert inspect_model_dir(ws / "student").kind == "linmu"
    assert video_sampling() == {"num_frames": None, "fps": 2.0, "max_frames": 128}
