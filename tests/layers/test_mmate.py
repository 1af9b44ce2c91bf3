import pytest
import torch

from linmu.config import MMateConfig
from linmu.layers.mmate import MMate
from linmu.layout import TokenLayout, VisualSpan
from tests.helpers import extend_with_text, llama_config, mixed_layout, qwen2vl_text_config, random_rope


def qwen2vl_attention_and_rope(batch, L):
    """A Qwen2-VL attention layer and 3-D M-RoPE cos/sin for a sequence with an image and a video."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLAttention, Qwen2VLRotaryEmbedding

    cfg = qwen2vl_text_config()
    torch.manual_seed(0)
    attn = Qwen2VLAttention(cfg, layer_idx=0).eval()
    rope = Qwen2VLRotaryEmbedding(cfg)
    # 3-D positions: text advances all three ids together; visual tokens take (t, h, w) offsets
    pos = torch.arange(L).expand(3, batch, L).clone()
    pos[1, :, 3:9] = 3 + torch.tensor([0, 0, 0, 1, 1, 1])
    pos[2, :, 3:9] = 3 + torch.tensor([0, 1, 2, 0, 1, 2])
    x = torch.randn(batch, L, cfg.hidden_size)
    cos, sin = rope(x, pos)
    return attn, (cos, sin), x


def llama_attention_and_rope(batch, L):
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    cfg = llama_config()
    torch.manual_seed(0)
    attn = LlamaAttention(cfg, layer_idx=0).eval()
    x = torch.randn(batch, L, cfg.hidden_size)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, torch.arange(L).expand(batch, L))
    return attn, (cos, sin), x


@pytest.mark.parametrize("family", ["qwen2vl", "llama"])
@pytest.mark.parametrize("fusion", ["head", "channel"])
def test_identity_setting_equals_teacher_attention(family, fusion):
    layout, L = mixed_layout(batch_size=2)
    attn, pe, x = (qwen2vl_attention_and_rope if family == "qwen2vl" else llama_attention_and_rope)(2, L)
    block = MMate.from_attention(attn, 0, MMateConfig.identity(fusion=fusion))
    with torch.no_grad():
        teacher, _ = attn(x, attention_mask=None, position_embeddings=pe)
        ours, _ = block(x, position_embeddings=pe, linmu_layout=layout)
    torch.testing.assert_close(ours, teacher, atol=1e-5, rtol=0)
    # the teacher's tensors are copied, not shared: training the student leaves the teacher untouched
    assert block.swin.q_proj.weight.data_ptr() != attn.q_proj.weight.data_ptr()


@pytest.mark.parametrize("fusion", ["head", "channel", "gate"])
@pytest.mark.parametrize("n_sink", [0, 2])
def test_block_prefill_then_step_equals_full_forward(fusion, n_sink):
    layout, L = mixed_layout(batch_size=2)
    n = 6
    attn, _, _ = llama_attention_and_rope(2, L)
    cfg = MMateConfig(fusion=fusion, window=(2, 2, 2), text_window=5, n_sink=n_sink, chunk_size=8,
                      init="mamba2", ssd_impl="torch")
    block = MMate.from_attention(attn, 1, cfg)
    x = torch.randn(2, L + n, 48)
    pe = random_rope(2, L + n, 8)
    with torch.no_grad():
        full, _ = block(x, position_embeddings=pe, linmu_layout=extend_with_text(layout, n))
        out, state = block.prefill(x[:, :L], layout, (pe[0][:, :L], pe[1][:, :L]))
        torch.testing.assert_close(out, full[:, :L], atol=1e-5, rtol=1e-5)
        for t in range(n):
            s = slice(L + t, L + t + 1)
            out, state = block.step(x[:, s], state, (pe[0][:, s], pe[1][:, s]))
            torch.testing.assert_close(out, full[:, s], atol=1e-5, rtol=1e-5)


def test_identity_block_decodes_with_bounded_ring():
    layout, L = mixed_layout()
    attn, _, _ = llama_attention_and_rope(1, L)
    block = MMate.from_attention(attn, 0, MMateConfig.identity())
    n = 4
    x = torch.randn(1, L + n, 48)
    pe = random_rope(1, L + n, 8)
    with torch.no_grad():
        full, _ = block(x, position_embeddings=pe, linmu_layout=extend_with_text(layout, n))
        _, state = block.prefill(x[:, :L], layout, (pe[0][:, :L], pe[1][:, :L]), state_capacity=L + n)
        for t in range(n):
            s = slice(L + t, L + t + 1)
            out, state = block.step(x[:, s], state, (pe[0][:, s], pe[1][:, s]))
            torch.testing.assert_close(out, full[:, s], atol=1e-5, rtol=1e-5)


def test_sequence_over_limit_is_refused():
    layout, L = mixed_layout()
    attn, pe, x = llama_attention_and_rope(1, L)
    block = MMate.from_attention(attn, 0, MMateConfig(max_seq_len=10))
    with pytest.raises(ValueError, match="over the configured limit"):
        block(x, position_embeddings=pe, linmu_layout=layout)


def test_layout_shape_mismatch_is_refused():
    attn, pe, x = llama_attention_and_rope(1, 26)
    block = MMate.from_attention(attn, 0)
    bad = TokenLayout.from_spans(1, 30, [VisualSpan(0, 2, (1, 2, 2))])
    with pytest.raises(ValueError, match="token layout"):
        block(x, position_embeddings=pe, linmu_layout=bad)


def test_gradients_reach_both_branches():
    layout, L = mixed_layout()
    attn, pe, x = llama_attention_and_rope(1, L)
    block = MMate.from_attention(attn, 2, MMateConfig(window=(2, 2, 2), text_window=4))
    out, _ = block(x, position_embeddings=pe, linmu_layout=layout)
    out.square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
