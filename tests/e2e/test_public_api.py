"""The top-level API stays importable and the README's example runs as written (tiny model)."""
import contextlib
import io
import os
import re

import torch

import pccfast


def test_every_public_name_resolves():
    for name in pccfast.__all__:
        assert getattr(pccfast, name) is not None, name
    from pccfast.core.labeller import label_images
    from pccfast.diffusion.generation import generate_with_capture
    from pccfast.diffusion.pipeline import load_pipeline

    assert pccfast.label_images is label_images and pccfast.load_pipeline is load_pipeline
    assert pccfast.generate_with_capture is generate_with_capture


def test_readme_example_on_the_tiny_model():
    pipe = pccfast.load_pipeline("tiny", device="cpu", dtype=torch.float32)
    cap = pccfast.generate_with_capture(pipe, ["a cat on a sofa"], [["cat", "sofa"]], "voc", seeds=[2024],
                                        steps=2, height=64, width=64)
    res = pccfast.label_images(cap.features, cap.class_attention, cap.images, pccfast.PCCConfig())
    assert res.mask.shape == (1, 64, 64) and res.mask.dtype == torch.uint8
    assert res.blocky.shape == cap.features.shape[:1] + cap.features.shape[2:]
    assert set(res.mask.unique().tolist()) <= {0, pccfast.get_label_set("voc").index("cat"),
                                               pccfast.get_label_set("voc").index("sofa"), 255}


def test_readme_python_block_runs_as_written():
    """The README's Python block is executed exactly as printed there."""
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")
    with open(readme, encoding="utf-8") as f:
        blocks = re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)
    assert len(blocks) == 1, "the README has one Python block"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), {})
    assert out.getvalue().strip() == "torch.Size([1, 64, 64])"
