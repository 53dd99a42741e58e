"""The SD-1/2 layer selection."""
import pytest

from pccfast.diffusion.layers import cross_attention_layers, layer_size, self_attention_layers


class _FakeUNet:
    names = [
        "up_blocks.10.attentions.0.transformer_blocks.0.attn1.processor",
        "up_blocks.2.attentions.1.transformer_blocks.0.attn1.processor",
        "up_blocks.2.attentions.0.transformer_blocks.0.attn2.processor",
        "mid_block.attentions.0.transformer_blocks.0.attn1.processor",
        "mid_block.attentions.0.transformer_blocks.0.attn2.processor",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor",
    ]
    attn_processors = dict.fromkeys(names)


def test_selection_and_numeric_order():
    assert self_attention_layers(_FakeUNet()) == [_FakeUNet.names[1], _FakeUNet.names[0]]  # 2 before 10
    assert cross_attention_layers(_FakeUNet()) == [_FakeUNet.names[6], _FakeUNet.names[2]]  # down, then up; not mid


def test_layer_size_value():
    assert layer_size(64 * 64, (64, 64)) == (64, 64)
    assert layer_size(8 * 8, (64, 64)) == (8, 8)
    assert layer_size(4 * 3, (13, 9)) == (4, 3)  # ceil(13/4), ceil(9/4)
    with pytest.raises(RuntimeError, match="an attention layer has 10 tokens, which is no level of a 64x64 latent"):
        layer_size(10, (64, 64))
