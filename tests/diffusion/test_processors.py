"""The attention math and the capture processors on a single diffusers Attention layer."""
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from pccfast.core.pca import headwise_features
from pccfast.diffusion.capture import AttentionCapture, cfg_heads
from pccfast.diffusion.processors import ClassAttentionProcessor, HeadFeatureProcessor, attend, class_token_probs


class _NoLayers:
    attn_processors = {}


def test_attend_equals_attn_processor_2_0():
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
        hidden = torch.randn(4, 16, 16, generator=generator)  # (N_b, L, C)
        context = torch.randn(4, 5, 8, generator=generator)  # (N_b, L_k, C_k)
        out, query, per_head = attend(attn, hidden, context)
        assert torch.equal(out, AttnProcessor2_0()(attn, hidden, context))
        q = attn.to_q(hidden).view(4, 16, 2, 8).transpose(1, 2)  # (N_b, heads, L, d)
        k, v = (m(context).view(4, 5, 2, 8).transpose(1, 2) for m in (attn.to_k, attn.to_v))  # (N_b, heads, L_k, d)
        assert torch.equal(query, q)
        torch.testing.assert_close(per_head, torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1) @ v)


def test_class_token_probs_value():
    """Two tokens with equal keys share each head's probability; a masked token gets none."""
    with torch.no_grad():
        attn = Attention(query_dim=4, cross_attention_dim=3, heads=2, dim_head=2)
        query = torch.randn(1, 2, 5, 2, generator=torch.Generator().manual_seed(4))  # (B, heads, N, d)
        embeds = torch.tensor([[[1.0, 0.0, 2.0], [1.0, 0.0, 2.0], [9.0, 9.0, 9.0]]])  # (B, T, C)
        probs = class_token_probs(attn, query, embeds, torch.tensor([[True, True, False]]))
    assert probs.shape == (1, 5, 3) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.tensor([1.0, 1.0, 0.0]).expand(1, 5, 3))


def test_class_processor_masks_padding_and_accumulates():
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
        hidden = torch.randn(4, 16, 16, generator=generator)  # 2B = 4 (B = 2), 4x4 pixels
        prompt = torch.randn(4, 5, 8, generator=generator)
        emb = torch.randn(2, 6, 8, generator=generator)
        emb[0, 3:] = 100.0  # padding of image 0: must not matter
        mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 6])
        cap = AttentionCapture(_NoLayers(), emb, mask, num_steps=2, latent_hw=(4, 4))
        proc = ClassAttentionProcessor(cap, "layer")
        out = proc(attn, hidden, prompt)
        assert torch.equal(out, AttnProcessor2_0()(attn, hidden, prompt))
        maps = cap.class_maps["layer"].clone()  # (B, T, 4, 4)
        assert maps.shape == (2, 6, 4, 4)
        torch.testing.assert_close(maps.sum(1), torch.full((2, 4, 4), 2.0))  # softmax per head sums to 1; 2 heads
        assert torch.equal(maps[0, 3:], torch.zeros(3, 4, 4))
        alone = AttentionCapture(_NoLayers(), emb[:1, :3], mask[:1, :3], num_steps=2, latent_hw=(4, 4))
        ClassAttentionProcessor(alone, "layer")(attn, hidden[[0, 2]], prompt[[0, 2]])
        torch.testing.assert_close(alone.class_maps["layer"][0], maps[0, :3], rtol=1e-5, atol=1e-6)
        proc(attn, hidden, prompt)  # a second step adds up
        torch.testing.assert_close(cap.class_maps["layer"], 2 * maps)
        with pytest.raises(RuntimeError, match="UNet batch of 2 \\* 2"):
            proc(attn, hidden[:2], prompt[:2])


def test_head_processor_last_step_only():
    """A non-recording attn1 processor only attends; a recording one (installed for the last
    step) hands the per-head outputs over, reduced after the last step's callback."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        attn = Attention(query_dim=16, heads=2, dim_head=8)
        hidden = torch.randn(4, 64, 16, generator=generator)  # 2B = 4, 8x8 pixels
        cap = AttentionCapture(_NoLayers(), torch.zeros(2, 3, 8), torch.ones(2, 3, dtype=torch.bool),
                               num_steps=2, latent_hw=(16, 16))
        out = HeadFeatureProcessor(cap, "layer")(attn, hidden)
        assert torch.equal(out, AttnProcessor2_0()(attn, hidden))
        assert cap.head_inputs == {} and cap.head_features == {}
        cap.on_step_end(None, 0, None, {})
        out = HeadFeatureProcessor(cap, "layer", record=True)(attn, hidden)
        assert torch.equal(out, AttnProcessor2_0()(attn, hidden))
        assert cap.head_features == {} and cap.head_inputs["layer"].shape == (4, 2, 64, 8)
        cap.on_step_end(None, 1, None, {})  # after the last step: reduced
        got = cap.head_features["layer"]
        assert cap.head_inputs == {}
        q, k, v = (m(hidden).view(4, 64, 2, 8).transpose(1, 2) for m in (attn.to_q, attn.to_k, attn.to_v))
        per_head = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1) @ v  # (2B, heads, N, d)
        x = torch.stack([torch.cat([per_head[i], per_head[2 + i]]) for i in range(2)])  # (B, 2*heads, N, d)
        torch.testing.assert_close(got, headwise_features(x, 16), rtol=1e-4, atol=1e-4)
        assert got.shape == (2, 12, 16, 16)
        with pytest.raises(RuntimeError, match="UNet batch of 2 \\* 2"):
            HeadFeatureProcessor(cap, "layer", record=True)(attn, hidden[:2])


def test_cfg_heads_value():
    per_head = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 3, 1)  # (2B, heads, N, d): batch index
    x = cfg_heads(per_head, 2)  # (B, 2*heads, N, d)
    assert x[:, :, 0, 0].tolist() == [[0, 0, 2, 2], [1, 1, 3, 3]]  # unconditional heads first
    with pytest.raises(RuntimeError, match="UNet batch of 2 \\* 3"):
        cfg_heads(per_head, 3)


def test_capture_exceptions():
    with pytest.raises(ValueError, match="`class_embeds` \\(B, T, C\\) and `class_mask` \\(B, T\\) have to agree"):
        AttentionCapture(_NoLayers(), torch.zeros(2, 3, 8), torch.ones(2, 4, dtype=torch.bool), 2, (4, 4))
    with pytest.raises(ValueError, match="`num_steps` has to be at least 1 but is 0"):
        AttentionCapture(_NoLayers(), torch.zeros(2, 3, 8), torch.ones(2, 3, dtype=torch.bool), 0, (4, 4))
