"""The capture under torch.compile and its host syncs, on the tiny pipeline.

Regressions: the attn1 processors read the capture's Python step counter inside the UNet, so
a compiled UNet recompiled every step (a guard on the counter), hit dynamo's recompile limit
at step 8 and fell back to eager; and the last step's head-wise PCA waited on the device twice
per image and layer (a nonzero and eigh's error check: 144 syncs for 8 images and 9 layers)."""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pccfast.core.config import PCCConfig
from pccfast.diffusion.capture import AttentionCapture
from pccfast.diffusion.generation import compiled_unet, generate_with_capture
from pccfast.diffusion.processors import HeadFeatureProcessor
from pccfast.diffusion.tokens import encode_class_texts
from pccfast.core.labelset import as_label_set

PROMPTS = ["a cat on a sofa", "a dog and a dog"]
CLASSES = [["cat", "sofa"], ["dog", "dog"]]
SEEDS = [5, 6]
FIELDS = ("images", "features", "class_attention")


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


def _run(pipe, steps, **kw):
    return generate_with_capture(pipe, PROMPTS, CLASSES, "voc", SEEDS, steps=steps, height=64, width=64, **kw)


def test_compiled_capture_compiles_once_per_kind_of_step(pipe):
    """With the capture a compiled UNet compiles three graphs (the first step, the steps that add
    into the class maps, the recording last step), whatever the number of steps, with no graph
    break, and a second batch reuses them; the outputs are the eager run's, to the bit."""
    from torch._dynamo.utils import counters

    graphs = {}
    for steps in (2, 5):  # PNDM: 3 and 6 UNet calls
        torch._dynamo.reset()
        counters.clear()
        eager = _run(pipe, steps)
        compiled = _run(pipe, steps, compile="eager")
        graphs[steps] = counters["stats"]["unique_graphs"]
        assert not counters["graph_break"], dict(counters["graph_break"])
        for f in FIELDS:
            assert torch.equal(getattr(compiled, f), getattr(eager, f)), f
        assert not isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule)  # the pipeline as it was
    assert graphs == {2: 3, 5: 3}
    again = _run(pipe, 5, compile="eager")  # a later batch of the same shapes: nothing new
    assert counters["stats"]["unique_graphs"] == 3 and torch.equal(again.features, compiled.features)
    assert compiled_unet(pipe.unet, "eager") is compiled_unet(pipe.unet, "eager")


def test_compile_exception(pipe):
    with pytest.raises(TypeError, match="`compile` has to be a bool or a torch.compile backend name but is int"):
        _run(pipe, 1, compile=1)


_SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
          torch.ops.aten.bincount.default, torch.ops.aten.masked_select.default, torch.ops.aten.equal.default,
          torch.ops.aten.is_nonzero.default, torch.ops.aten._linalg_eigh.default}


class _SyncCounter(TorchDispatchMode):
    """Ops that make the host wait for the device, per phase. ``_linalg_eigh`` counts: on a GPU it
    waits for its error check, which runs below the dispatcher, unseen on the CPU."""

    def __init__(self):
        super().__init__()
        self.phase, self.counts = "pipeline", {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        hit = func in _SYNCS or name.startswith(("unique", "_unique"))
        if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default):
            hit = hit or any(i is not None and i.dtype == torch.bool for i in args[1])
        if hit:
            self.counts.setdefault(self.phase, Counter())[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["lowrank", "eigh"])
def test_capture_syncs(pipe, method):
    """No sync in any UNet call nor after the steps before the last; after the last one the
    reduction's finiteness check and one eigh per eigenproblem size (64x64: the Ritz matrices are
    4x4 at the 2x2 level and 6x6 elsewhere; the covariances all 8x8). Before: 54 syncs here
    (27 nonzero + 27 eigh, 3 images x 9 layers) in the last UNet call."""
    ls = as_label_set("voc")
    emb, mask, _ = encode_class_texts(pipe, CLASSES, ls)
    steps = 3
    cap = AttentionCapture(pipe.unet, emb, mask, steps + 1, (8, 8), PCCConfig(pca_method=method))
    counter = _SyncCounter()
    calls = []

    def pre(module, args):
        counter.phase = f"unet{len(calls)}"
        calls.append(1)

    def post(module, args, out):
        counter.phase = "pipeline"

    def on_step_end(p, i, t, kw):
        counter.phase = f"callback{i}"
        out = cap.on_step_end(p, i, t, kw)
        counter.phase = "pipeline"
        return out

    hooks = [pipe.unet.register_forward_pre_hook(pre), pipe.unet.register_forward_hook(post)]
    try:
        with cap, counter:
            recording = [p.record for p in pipe.unet.attn_processors.values() if isinstance(p, HeadFeatureProcessor)]
            pipe(PROMPTS, height=64, width=64, num_inference_steps=steps, guidance_scale=7.5, output_type="pt",
                 generator=[torch.Generator().manual_seed(s) for s in SEEDS], callback_on_step_end=on_step_end)
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == steps + 1 and len(cap.head_features) == 9 and recording == [False] * 9
    capture_phases = {k: v for k, v in counter.counts.items() if k != "pipeline"}  # the scheduler's are diffusers'
    eighs = 2 if method == "lowrank" else 1
    assert capture_phases == {f"callback{steps}": Counter({"_local_scalar_dense": 1, "_linalg_eigh": eighs})}
