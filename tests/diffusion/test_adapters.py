"""Model adapters: chosen from the pipeline's class, their sizes and guidance halves, and the
one-line refusal of an unsupported class."""
import pytest

from pccfast.diffusion.adapters import (
    ModelAdapter, StableDiffusionAdapter, UnsupportedPipelineError, adapter_class, adapter_for, register_adapter,
    supported_families,
)
from pccfast.diffusion.layers import cross_attention_layers, self_attention_layers


def test_tiny_is_stable_diffusion(tiny_pipe):
    a = adapter_for(tiny_pipe)
    assert isinstance(a, StableDiffusionAdapter) and a.family == "sd" and a.denoiser is tiny_pipe.unet
    assert a.feature_layers() == self_attention_layers(tiny_pipe.unet)
    assert a.class_map_layers() == cross_attention_layers(tiny_pipe.unet)
    assert a.size_factor == 8 and a.grid_factor == 1  # down_blocks.0 has attention: grid = latent
    assert a.latent_hw(64, 96) == (8, 12) and a.grid_hw(64, 96) == (8, 12)
    assert a.halves(7.5) == 2 and a.halves(1.0) == 1 and a.halves(0.0) == 1


def test_subclass_of_a_supported_pipeline(tiny_pipe):
    """A pipeline subclass (a community variant) is handled as its base family."""
    sub = type("MyStableDiffusionPipeline", (type(tiny_pipe),), {})
    fake = sub.__new__(sub)
    assert isinstance(adapter_for(fake), StableDiffusionAdapter)


def test_unsupported_class_one_line():
    class KandinskyPipeline:
        pass

    with pytest.raises(UnsupportedPipelineError) as info:
        adapter_for(KandinskyPipeline())
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("pipeline class KandinskyPipeline is not supported; supported families: ")
    assert "sd (StableDiffusionPipeline" in msg and supported_families() in msg
    assert adapter_class("StableDiffusionPipeline") is StableDiffusionAdapter
    assert adapter_class("KandinskyPipeline", strict=False) is None


def test_register_adapter_exception():
    with pytest.raises(TypeError, match="has to be a ModelAdapter subclass"):
        register_adapter(dict)
    with pytest.raises(TypeError, match="has to be a ModelAdapter subclass with a family"):
        register_adapter(type("NoClasses", (ModelAdapter,), {}))
