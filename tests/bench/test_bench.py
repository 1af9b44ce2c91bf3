"""`linmu bench` on CPU with the tiny preset and tiny lengths: the whole harness end to end through the CLI, ratios
computed from the measured values, the floor really skipping attention, the teacher's benchmark attention equal to
stock SDPA, cache sizes, checkpoints given with --model, and one-line errors for bad arguments."""

import json

import pytest
import torch

import linmu
from linmu.bench.attention import (FLOOR_ATTENTION, TEACHER_ATTENTION, decode_splits, set_text_attention,
                                   split_decode_attention)
from linmu.bench.decode import DecodeSession, student_cache_bytes_per_seq, teacher_cache_bytes_per_seq
from linmu.bench.harness import (BenchError, BenchOptions, format_table, frame_inputs, parse_int_list, run_bench,
                                 summarize, summary_line, token_inputs)
from linmu.bench.presets import PRESETS, build_preset, parameter_count, preset_config
from linmu.cli import main
from linmu.inference.cache import LinMUCache


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One whole `linmu bench` run on CPU: tiny preset, two short lengths, decode at batch 1 and the largest batch."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["bench", "--preset", "tiny", "--tokens", "64,96", "--dtype", "float32", "--decode-steps", "3",
                   "--repeats", "2", "--max-batch", "3", "--out", str(out)])
    return rc, buf.getvalue(), out


def _close(a, b):
    return a == pytest.approx(b, rel=1e-12)


def test_cli_writes_table_json_plot_and_a_last_json_line(cli_run):
    rc, stdout, out = cli_run
    assert rc == 0
    result = json.loads(out.read_text())
    assert not out.with_suffix(".partial.json").exists()  # written while running, removed at the end
    assert out.with_suffix(".png").stat().st_size > 1000
    lines = stdout.strip().splitlines()
    last = json.loads(lines[-1])
    assert last == json.loads(json.dumps(summary_line(result)))
    assert "TTFT teacher ms" in stdout and "targets" in stdout
    c = result["config"]
    assert c["cuda_graphs"] is False and c["dtype"] == "float32" and c["mode"] == "tokens" and c["layers"] == 2
    assert [r["tokens"] for r in result["rows"]] == [64, 96]
    for r in result["rows"]:
        # one video span of whole 2x2 frames after 16 text tokens, text to the end (grid in patches, before merging)
        t, h, w = r["video_grid_thw"]
        assert (h, w) == (4, 4) and t == (r["tokens"] - 32) // 4
        for name in ("teacher", "student", "floor"):
            m = r[name]
            assert m["ttft_ms"] > 0 and len(m["ttft_ms_runs"]) == 2
            assert m["ttft_ms"] == pytest.approx(sorted(m["ttft_ms_runs"])[0] / 2 + sorted(m["ttft_ms_runs"])[1] / 2)
        assert "decode" not in r["floor"]
        for name in ("teacher", "student"):
            d = r[name]["decode"]
            assert d["batch1"]["batch"] == 1 and d["best"]["batch"] == 3  # capped by --max-batch
            for k in ("batch1", "best"):
                assert _close(d[k]["tok_s"], d[k]["batch"] * 1e3 / d[k]["step_ms"])
                assert len(d[k]["step_ms_runs"]) == 2


def test_ratios_and_targets_are_computed_from_the_measured_rows(cli_run):
    result = json.loads(cli_run[2].read_text())
    s = result["summary"]
    assert s == json.loads(json.dumps(summarize(result)))
    for r in result["rows"]:
        k = str(r["tokens"])
        t, st, f = r["teacher"], r["student"], r["floor"]
        assert _close(s["ttft_teacher_over_student"][k], t["ttft_ms"] / st["ttft_ms"])
        assert _close(s["ttft_student_over_floor"][k], st["ttft_ms"] / f["ttft_ms"])
        assert _close(s["decode_tok_s_ratio_best_batch"][k],
                      st["decode"]["best"]["tok_s"] / t["decode"]["best"]["tok_s"])
        assert _close(s["decode_tok_s_ratio_batch1"][k],
                      st["decode"]["batch1"]["tok_s"] / t["decode"]["batch1"]["tok_s"])
        assert s["cache_bytes_per_seq"]["teacher"][k] == t["cache_bytes_per_seq"]
    # no 128K/256K rows: those targets are reported as not measured, never invented
    for name in ("ttft_speedup_128k", "ttft_student_over_floor_128k", "ttft_speedup_256k",
                 "decode_best_batch_speedup_128k"):
        assert s["targets"][name]["value"] is None and s["targets"][name]["met"] is None
    assert s["targets"]["state_bytes_per_seq"]["value"] == s["cache_bytes_per_seq"]["student"]

    # the same summary over edited measurements follows them (targets met and missed)
    rows = [json.loads(json.dumps(result["rows"][0])) for _ in range(2)]
    rows[0]["tokens"], rows[1]["tokens"] = 131072, 262144
    rows[0]["teacher"]["ttft_ms"], rows[0]["student"]["ttft_ms"], rows[0]["floor"]["ttft_ms"] = 300.0, 100.0, 90.0
    rows[1]["teacher"]["ttft_ms"], rows[1]["student"]["ttft_ms"] = 350.0, 100.0
    rows[0]["teacher"]["decode"]["best"]["tok_s"], rows[0]["student"]["decode"]["best"]["tok_s"] = 10.0, 150.0
    edited = summarize({"config": result["config"], "rows": rows})["targets"]
    assert edited["ttft_speedup_128k"]["met"] is True and _close(edited["ttft_speedup_128k"]["value"], 3.0)
    assert edited["ttft_student_over_floor_128k"]["met"] is True
    assert edited["ttft_speedup_256k"]["met"] is False and _close(edited["ttft_speedup_256k"]["value"], 3.5)
    assert edited["decode_best_batch_speedup_128k"]["met"] is False
    table = format_table({"config": result["config"], "rows": rows,
                          "summary": summarize({"config": result["config"], "rows": rows})})
    assert "NOT MET" in table and "MET" in table


def _tiny_teacher():
    return build_preset("tiny", dtype=torch.float32, seed=1)


def _no_attention_forward(model, input_ids):
    """The decoder by hand with each attention replaced by o_proj(v_proj(x)) at every query head."""
    lm = model.model.language_model
    x = lm.embed_tokens(input_ids)
    for layer in lm.layers:
        a = layer.self_attn
        u = layer.input_layernorm(x)
        v = a.v_proj(u).unflatten(-1, (a.config.num_key_value_heads, a.head_dim))
        v = v.repeat_interleave(a.num_key_value_groups, dim=2).flatten(-2)
        x = x + a.o_proj(v)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(lm.norm(x))


def test_floor_skips_the_attention_core():
    model = _tiny_teacher()
    x = token_inputs(model.config, 60, PRESETS["tiny"].frame_hw)
    with torch.no_grad():
        teacher = model(**x).logits
        set_text_attention(model, FLOOR_ATTENTION)
        floor = model(**x).logits
        by_hand = _no_attention_forward(model, x["input_ids"])
        # the floor ignores queries and keys: scrambling them changes nothing
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.normal_()
            layer.self_attn.k_proj.bias.normal_()
        scrambled = model(**x).logits
    assert (floor - teacher).abs().max() > 1e-2
    torch.testing.assert_close(floor, by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scrambled, floor, rtol=0, atol=0)
    # the vision tower keeps its own attention
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_teacher_bench_attention_equals_stock_sdpa_in_prefill_and_static_decode():
    from transformers import DynamicCache, StaticCache

    model = _tiny_teacher()
    x = token_inputs(model.config, 60, PRESETS["tiny"].frame_hw)
    with torch.no_grad():
        ref = model(**x, past_key_values=DynamicCache(config=model.config), use_cache=True)
        nxt = ref.logits[:, -1:].argmax(-1)
        ref_next = model(input_ids=nxt, past_key_values=ref.past_key_values, use_cache=True).logits[:, -1]
        set_text_attention(model, TEACHER_ATTENTION)
        assert model.model.language_model.layers[0].self_attn.config._attn_implementation == TEACHER_ATTENTION
        out = model(**x).logits
        # the static cache's decode step: a mask over all 70 slots, GQA folded into the query axis
        cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=70)
        model(**x, past_key_values=cache, use_cache=True)
        step = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(out, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, ref_next, rtol=1e-5, atol=1e-5)
    assert (step - ref.logits[:, -1]).abs().max() > 1e-3  # a real step, not the prefill's last logits again


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_split_kv_decode_attention_equals_sdpa_over_the_whole_cache(device):
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    B, Hkv, G, S, D = 2, 3, 4, 1024, 64
    q = torch.randn(B, Hkv, G, D, device=device, dtype=dtype)
    k, v = (torch.randn(B, Hkv, S, D, device=device, dtype=dtype) for _ in range(2))
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool, device=device)
    mask[..., :700] = True  # the static cache's written slots; the last two of four chunks are partly / fully empty
    mask[1, ..., 5] = False
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.1)
    for n in (2, 4, 16):
        out = split_decode_attention(q, k, v, mask, 0.1, n)
        tol = 1e-5 if device == "cpu" else 2e-2
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert decode_splits(4, 131328, torch.device("cpu")) == 1


def test_cache_bytes_per_sequence_match_the_allocated_buffers():
    teacher = _tiny_teacher()
    tc = teacher.config.get_text_config(decoder=True)
    s = DecodeSession(teacher, "teacher", batch=2, context=250, max_steps=8)
    # context + steps rounded up to whole 256-slot blocks
    assert s.cache_nbytes() == 2 * teacher_cache_bytes_per_seq(tc, 512, torch.float32)
    # 2 layers x (k + v) x 2 kv heads x head_dim 16 x 4 bytes per token
    assert teacher_cache_bytes_per_seq(tc, 1, torch.float32) == 2 * 2 * 2 * 16 * 4
    student = linmu.convert(teacher)
    blocks = student.mmate_blocks()
    per_seq = student_cache_bytes_per_seq(blocks, torch.float32)
    assert per_seq == LinMUCache(blocks, 3).nbytes() - LinMUCache(blocks, 2).nbytes()
    assert DecodeSession(student, "student", batch=1, context=10**6).cache_nbytes() == LinMUCache(blocks, 1).nbytes()


def test_decode_sessions_run_from_the_context_and_guard_the_static_cache():
    teacher = _tiny_teacher()
    s = DecodeSession(teacher, "teacher", batch=2, context=40, max_steps=3)
    s.prepare(warmup=1)
    assert int(s.cache.layers[0].cumulative_length) == 40
    ms = s.time_steps(3, repeats=2)
    assert len(ms) == 2 and all(m > 0 for m in ms)
    assert int(s.cache.layers[0].cumulative_length) == 43
    with pytest.raises(RuntimeError, match="max_steps"):
        s.step()
    student = linmu.convert(teacher)
    s = DecodeSession(student, "student", batch=2, context=40)
    s.prepare(warmup=1)
    s.time_steps(4, repeats=1)
    layer = s.cache.layers[1]
    assert layer.seen == 44 and int(layer.state.swin.pos) == 44
    assert layer.state.flex.ssm.abs().sum() > 0  # the steps really updated the recurrent state
    with pytest.raises(ValueError, match="CUDA"):
        DecodeSession(student, "student", batch=1, context=4, cuda_graph=True)


def test_frames_mode_runs_the_vision_tower_and_reports_it_apart():
    snaps = []
    r = run_bench(BenchOptions(preset="tiny", frames=(4, 8), resolution=(56, 84), dtype="float32", decode=False,
                               repeats=1, warmup=0), partial=lambda p: snaps.append(json.loads(json.dumps(p))))
    # what was measured so far, after every measurement (2 lengths x teacher, floor, student)
    assert len(snaps) == 6 and "teacher" in snaps[0]["rows"][0] and "floor" not in snaps[0]["rows"][0]
    assert snaps[-1]["rows"] == json.loads(json.dumps(r["rows"]))
    assert r["config"]["mode"] == "frames"
    for row, frames in zip(r["rows"], (4, 8)):
        # grid (frames / 2, 4, 6) patches -> 2 x 3 merged tokens per temporal patch, plus 32 text tokens
        assert row["frames"] == frames and row["video_grid_thw"] == [frames // 2, 4, 6]
        assert row["tokens"] == 32 + frames // 2 * 6
        assert row["vision_ms"] > 0 and "decode" not in row["teacher"]
    assert "decode_tok_s_ratio_best_batch" not in r["summary"]
    assert "vision ms" in format_table(r)


def test_model_directories_teacher_and_linmu(tmp_path):
    teacher = _tiny_teacher()
    teacher.save_pretrained(tmp_path / "teacher")
    linmu.convert(teacher).save_pretrained(tmp_path / "student")
    for d, word in (("teacher", "teacher checkpoint"), ("student", "LinMU checkpoint")):
        r = run_bench(BenchOptions(model=str(tmp_path / d), tokens=(48,), frame_tokens=(2, 2), dtype="float32",
                                   decode=False, repeats=1, warmup=0))
        assert word in r["config"]["source"] and r["rows"][0]["tokens"] == 48
        assert r["rows"][0]["student"]["cache_bytes_per_seq"] == r["summary"]["cache_bytes_per_seq"]["student"]


def test_presets_match_the_published_shapes_and_build_small():
    # parameter counts of the released Qwen2.5-VL models, from the configs alone
    assert round(parameter_count(preset_config("qwen2.5-vl-7b")) / 1e9, 2) == 8.29
    assert round(parameter_count(preset_config("qwen2.5-vl-3b")) / 1e9, 2) == 3.75
    assert round(parameter_count(preset_config("qwen2.5-vl-72b")) / 1e9, 1) == 73.4
    assert preset_config("qwen2.5-vl-72b", layers=2).text_config.num_hidden_layers == 2
    m = build_preset("tiny", dtype=torch.bfloat16)
    assert sum(p.numel() for p in m.parameters()) == parameter_count(m.config)
    assert next(m.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "64,abc"], "'abc' is not an integer"),
    (["--tokens", "20"], "too short"),
    (["--tokens", "0"], "must be positive"),
    (["--frames", "3"], "multiple of the temporal patch size"),
    (["--frames", "4", "--resolution", "50x56"], "multiples of 28"),
    (["--frames", "4", "--resolution", "big"], "HxW"),
    (["--tokens", "64", "--frame-tokens", "2"], "--frame-tokens must look like HxW"),
    (["--tokens", "64", "--cuda-graphs", "--device", "cpu"], "needs a CUDA device"),
    (["--tokens", "64", "--repeats", "0"], "--repeats must be >= 1"),
    (["--tokens", "64", "--dtype", "int8"], "unknown dtype"),
])
def test_bad_arguments_give_one_line_errors(argv, message, capsys):
    assert main(["bench", "--preset", "tiny", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("linmu bench: error:") and message in err[-1]


def test_bad_sources_give_clear_errors(tmp_path, capsys):
    assert main(["bench", "--model", str(tmp_path / "missing"), "--tokens", "64"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", "--model", str(tmp_path), "--layers", "2"]) == 2
    assert "--layers applies to presets only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "tiny", "--model", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "qwen9"])
    with pytest.raises(BenchError, match="exactly one"):
        run_bench(BenchOptions(tokens=(64,)))
    assert parse_int_list("8K, 128k,5", "--tokens") == (8192, 131072, 5)
    with pytest.raises(BenchError, match="multiple of the temporal"):
        frame_inputs(preset_config("tiny"), 5, (56, 56), torch.float32)


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager_decode_for_both_models():
    teacher = build_preset("tiny", dtype=torch.bfloat16, device="cuda", seed=2)
    set_text_attention(teacher, TEACHER_ATTENTION)
    student = linmu.convert(teacher)
    for model, kind in ((teacher, "teacher"), (student, "student")):
        seqs = []
        for graph in (False, True):
            torch.manual_seed(0)
            s = DecodeSession(model, kind, batch=3, context=300, max_steps=8, cuda_graph=graph)
            s.prepare(warmup=2)
            s.ids.copy_(torch.tensor([[5], [6], [7]], device="cuda"))
            ids = []
            for _ in range(6):
                s.step()
                ids.append(s.ids[:, 0].tolist())
            seqs.append(ids)
            assert (s.graph is not None) == graph
        assert seqs[0] == seqs[1], kind


@pytest.mark.gpu
def test_whole_bench_runs_on_cuda():
    r = run_bench(BenchOptions(preset="tiny", tokens=(256, 512), decode_steps=4, repeats=2, max_batch=16))
    assert r["config"]["cuda_graphs"] is True and r["config"]["dtype"] == "bfloat16"
    for row in r["rows"]:
        for name in ("teacher", "student"):
            d = row[name]["decode"]
            assert d["best"]["batch"] == 16 and d["best"]["peak_gib"] > 0
            assert d["best"]["search"]["measured_bytes_per_seq"] >= row[name]["cache_bytes_per_seq"]
