"""The joint-attention capture under torch.compile on the tiny SD3 and FLUX pipelines.

The processors never read the step counter (a compiled transformer would recompile every step
on it): the recording processors are installed by the callback before the last call, and with
a compiled transformer the per-head outputs are reduced after it. So a compiled transformer
compiles three graphs (the first call, the calls that add into the class maps, the recording
last call) whatever the number of steps, and the images, features and class maps are the eager
run's (to the bit with the "eager" backend)."""
import pytest
import torch

from pccfast.diffusion.dit_generation import generate_with_capture_dit
from pccfast.diffusion.generation import compiled_unet
from pccfast.diffusion.tiny_dit import build_tiny_dit_pipeline

PROMPTS = ["a cat on a sofa", "a dog and a dog"]
CLASSES = [["cat", "sofa"], ["dog", "dog"]]
SEEDS = [5, 6]
FIELDS = ("images", "features", "class_attention")
SIZE = 64  # image-token grid 4x4
GUIDANCE = {"tiny-sd3": 4.0, "tiny-flux-schnell": 0.0}


def _run(pipe, name, steps, **kw):
    return generate_with_capture_dit(pipe, PROMPTS, CLASSES, "voc", SEEDS, steps=steps, guidance=GUIDANCE[name],
                                     height=SIZE, width=SIZE, feature_blocks="all", **kw)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux-schnell"])
def test_compiled_dit_capture_compiles_once_per_kind_of_call(name):
    from torch._dynamo.utils import counters

    pipe = build_tiny_dit_pipeline(name)
    graphs = {}
    for steps in (3, 5):
        torch._dynamo.reset()
        counters.clear()
        eager = _run(pipe, name, steps)
        compiled = _run(pipe, name, steps, compile="eager")
        graphs[steps] = counters["stats"]["unique_graphs"]
        assert not counters["graph_break"], dict(counters["graph_break"])
        for f in FIELDS:
            assert torch.equal(getattr(compiled, f), getattr(eager, f)), f
        assert not isinstance(pipe.transformer, torch._dynamo.eval_frame.OptimizedModule)  # the pipeline as it was
    assert graphs == {3: 3, 5: 3}
    again = _run(pipe, name, 5, compile="eager")  # a later batch of the same shapes: nothing new
    assert counters["stats"]["unique_graphs"] == 3 and torch.equal(again.features, compiled.features)
    assert compiled_unet(pipe.transformer, "eager") is compiled_unet(pipe.transformer, "eager")


def test_one_step_compiled_run_equals_eager():
    """One call: the first call is the recording one."""
    pipe = build_tiny_dit_pipeline("tiny-flux-schnell")
    eager, compiled = _run(pipe, "tiny-flux-schnell", 1), _run(pipe, "tiny-flux-schnell", 1, compile="eager")
    for f in FIELDS:
        assert torch.equal(getattr(compiled, f), getattr(eager, f)), f


def test_compile_type_checked():
    pipe = build_tiny_dit_pipeline("tiny-flux-schnell")
    with pytest.raises(TypeError, match="`compile` has to be a bool or a torch.compile backend name but is int"):
        _run(pipe, "tiny-flux-schnell", 1, compile=1)
