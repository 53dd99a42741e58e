"""``generate`` end to end on every tiny UNet family (SD at a non-square size, tiny-sdxl
non-square, tiny-turbo guidance-free in one step, tiny-lcm guidance-distilled, a negative
prompt), each listed scheduler on tiny, and inspect on a non-square dataset."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pccfast.cli.generate import main
from pccfast.cli.inspect import main as inspect_main
from pccfast.data.captures import read_capture
from pccfast.data.labelsets import get_label_set
from pccfast.diffusion.generation import generate_with_capture
from pccfast.diffusion.pipeline import load_pipeline
from pccfast.diffusion.schedulers import SCHEDULERS, make_scheduler, unet_calls

VOC = get_label_set("voc")
BASE = ["--limit", "2", "--batch", "2", "--no-progress", "--save-captures", "--save-blocky"]

# id -> (argv, (height, width), capture grid (h, w), guidance halves)
RUNS = {
    "tiny-64x96": (["--model", "tiny", "--steps", "2", "--height", "64", "--width", "96"], (64, 96), (8, 12), 2),
    "tiny-sdxl-64x96": (["--model", "tiny-sdxl", "--steps", "2", "--height", "64", "--width", "96"], (64, 96), (4, 6), 2),
    "tiny-turbo-guidance-0": (["--model", "tiny-turbo", "--steps", "1", "--guidance", "0", "--height", "64", "--width",
                               "64"], (64, 64), (8, 8), 1),
    "tiny-lcm": (["--model", "tiny-lcm", "--steps", "2", "--height", "64", "--width", "64"], (64, 64), (8, 8), 1),
    "tiny-negative-ddim": (["--model", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--negative-prompt",
                            "blurry", "--scheduler", "ddim"], (64, 64), (8, 8), 2),
}


def _valid_voc(out, hw):
    ids = (out / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(ids) == 2
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(ids)
    for i in ids:
        with Image.open(out / "JPEGImages" / f"{i}.jpg") as im:
            assert im.size == (hw[1], hw[0])  # (width, height)
        for folder in ("SegmentationClass", "SegmentationClassBlocky"):
            with Image.open(out / folder / f"{i}.png") as m:
                assert m.mode == "P" and m.size == (hw[1], hw[0])
                assert set(np.unique(np.asarray(m)).tolist()) <= set(range(21)) | {255}
    return ids, records


@pytest.mark.parametrize("run", list(RUNS))
def test_generate_end_to_end(run, tmp_path):
    argv, hw, grid, halves = RUNS[run]
    out = tmp_path / "out"
    assert main([*argv, *BASE, "--out", str(out)]) == 0
    ids, records = _valid_voc(out, hw)
    for i in ids:
        cap = read_capture(str(out / "captures" / f"{i}.safetensors"), "voc")
        assert cap.grid == grid and cap.metadata["grid"] == grid and cap.metadata["halves"] == halves
        assert cap.image.shape == (3, *hw)
    defining = json.loads((out / "run.json").read_text())["defining"]
    assert (defining["height"], defining["width"]) == hw
    text = json.dumps(defining)
    if "--scheduler" in argv:
        assert '"scheduler": "ddim"' in text and all(r["scheduler"] == "ddim" for r in records)
        assert '"negative_prompt": "blurry"' in text and all(r["negative_prompt"] == "blurry" for r in records)
    else:
        assert "the model's own" in text and all("scheduler" not in r for r in records)
    if run == "tiny-sdxl-64x96":  # relabel from non-square SDXL captures gives generate's masks bit for bit
        from pccfast.cli.relabel import main as relabel_main

        assert relabel_main(["--captures", str(out / "captures"), "--out", str(tmp_path / "rl"), "--no-progress"]) == 0
        for i in ids:
            assert np.array_equal(np.asarray(Image.open(out / "SegmentationClass" / f"{i}.png")),
                                  np.asarray(Image.open(tmp_path / "rl" / "SegmentationClass" / f"{i}.png")))
    if run == "tiny-64x96":  # inspect reads a non-square dataset
        assert inspect_main([str(out), "--out", str(tmp_path / "sheet.png")]) == 0
        with Image.open(tmp_path / "sheet.png") as sheet:
            assert sheet.size[0] > 0


@pytest.fixture(scope="module")
def tiny():
    pipe = load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_each_scheduler_on_tiny(name, tiny):
    """Each scheduler is built from the checkpoint's config; the capture counts the UNet calls
    from it (PNDM one more than steps, Heun two per step but the last), captures the last one,
    and the images are the pipeline's own with that scheduler."""
    steps = 2
    sched = make_scheduler(name, tiny.scheduler)
    assert sched.config.beta_schedule == tiny.scheduler.config.beta_schedule == "scaled_linear"
    calls = unet_calls(sched, steps)
    assert calls == {"pndm": steps + 1, "heun": 2 * steps - 1}.get(name, steps)
    cap = generate_with_capture(tiny, ["a cat on a sofa"], [["cat", "sofa"]], VOC, [3], steps=steps, height=64,
                                width=64, scheduler=name)
    own = tiny.scheduler
    tiny.scheduler = sched
    try:
        plain = tiny(["a cat on a sofa"], height=64, width=64, num_inference_steps=steps, guidance_scale=7.5,
                     generator=[torch.Generator().manual_seed(3)], output_type="pt").images
    finally:
        tiny.scheduler = own
    assert type(tiny.scheduler).__name__ == "PNDMScheduler"  # the pipeline keeps its own
    assert torch.equal(cap.images, (plain * 255).round().clamp(0, 255).to(torch.uint8))
    assert cap.features.shape == (1, 630, 8, 8) and bool(torch.isfinite(cap.features).all())
    assert float(cap.class_attention[0, 8].max()) > 0  # cat


def test_negative_prompt_is_the_unconditional_half(tiny):
    kw = dict(steps=2, height=64, width=64)
    with_neg = generate_with_capture(tiny, ["a cat"], [["cat"]], VOC, [5], negative_prompt="a dog", **kw)
    without = generate_with_capture(tiny, ["a cat"], [["cat"]], VOC, [5], **kw)
    plain = tiny(["a cat"], negative_prompt=["a dog"], height=64, width=64, num_inference_steps=2,
                 generator=[torch.Generator().manual_seed(5)], output_type="pt").images
    assert torch.equal(with_neg.images, (plain * 255).round().clamp(0, 255).to(torch.uint8))
    assert not torch.equal(with_neg.images, without.images)
    assert not torch.equal(with_neg.class_attention, without.class_attention)  # its queries give the class maps


def test_sdxl_size_rule_before_any_output(tmp_path, capsys):
    """SDXL's sides are multiples of 16 (its grid is half the latent): refused in one line
    before anything is written when the family is known without loading (here: tiny-sdxl)."""
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny-sdxl", "--steps", "1", "--height", "64", "--width", "72", "--limit", "1",
              "--no-progress", "--out", str(out)])
    assert exc.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: `height` and `width` have to be positive multiples of 16 for a sdxl model but are 64 and 72"
