"""`generate` end to end on the tiny diffusion transformers (SD3 and FLUX): VOC, COCO and a custom
label set with a multi-token class name; a guidance-distilled (schnell-style) run without a
guidance batch; --feature-blocks."""
import json

import numpy as np
import pytest
from PIL import Image

from pccfast.cli.generate import main as generate_main
from pccfast.cli.relabel import main as relabel_main
from pccfast.data.captures import read_capture
from pccfast.data.labelsets import get_label_set

SIZE = 128  # image-token grid 8x8


def _args(model, out, prompts, *extra, guidance="3.5", steps="2"):
    return ["--model", model, "--steps", steps, "--height", str(SIZE), "--width", str(SIZE), "--guidance", guidance,
            "--no-progress", "--batch", "2", "--prompts", str(prompts), "--out", str(out), "--save-captures", *extra]


def _check_dataset(out, n, num_classes):
    ids = (out / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(ids) == n
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(ids)
    for i in ids:
        img = Image.open(out / "JPEGImages" / f"{i}.jpg")
        mask = np.asarray(Image.open(out / "SegmentationClass" / f"{i}.png"))
        assert img.size == (SIZE, SIZE) and mask.shape == (SIZE, SIZE)
        assert set(np.unique(mask).tolist()) <= set(range(num_classes)) | {255}
    return ids


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_voc_end_to_end(tmp_path, model):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat on a sofa | cat, sofa\nan airplane over a boat | aeroplane, boat\na dog | dog\n")
    out = tmp_path / "o"
    assert generate_main(_args(model, out, prompts)) == 0
    ids = _check_dataset(out, 3, 21)
    cap = read_capture(str(out / "captures" / f"{ids[0]}.safetensors"), label_set=get_label_set("voc"))
    assert cap.class_attention.shape == (21, SIZE // 16, SIZE // 16)
    assert cap.features.shape[-2:] == (SIZE // 16, SIZE // 16)
    voc = get_label_set("voc")
    nonzero = {k for k in range(21) if cap.class_attention[k].abs().sum() > 0}
    assert nonzero == {0, voc.index("cat"), voc.index("sofa")}
    assert json.loads((out / "run.json").read_text())["defining"]["model"] == model


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_coco_and_custom_multi_token_label_sets(tmp_path, model):
    coco = get_label_set("coco")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a giraffe next to a traffic light | giraffe, traffic light\n")
    out = tmp_path / "coco"
    assert generate_main(_args(model, out, prompts, "--label-set", "coco")) == 0
    ids = _check_dataset(out, 1, 81)
    cap = read_capture(str(out / "captures" / f"{ids[0]}.safetensors"), label_set=coco)
    nonzero = {k for k in range(81) if cap.class_attention[k].abs().sum() > 0}
    assert nonzero == {0, coco.index("giraffe"), coco.index("traffic light")}

    ls_file = tmp_path / "garden.json"
    ls_file.write_text(json.dumps({"name": "garden", "classes": ["background", "zucchini", "traffic cone", "dog"]}))
    prompts.write_text("a zucchini next to a traffic cone | zucchini, traffic cone\na dog | dog\n")
    out = tmp_path / "garden"
    assert generate_main(_args(model, out, prompts, "--label-set", str(ls_file))) == 0
    ids = _check_dataset(out, 2, 4)
    cap = read_capture(str(out / "captures" / "1.safetensors"), label_set=get_label_set(str(ls_file)))
    ca = cap.class_attention
    assert ca[0].abs().sum() > 0 and ca[1].abs().sum() > 0 and ca[2].abs().sum() > 0  # "traffic cone": 2+ tokens
    assert not ca[3].any()


def test_guidance_distilled_schnell_end_to_end(tmp_path):
    """FLUX.1-schnell style: one step, guidance 0, no guidance batch: features from the only half."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat on a sofa | cat, sofa\na person riding a horse | person, horse\n")
    out = tmp_path / "o"
    assert generate_main(_args("tiny-flux-schnell", out, prompts, guidance="0", steps="1")) == 0
    ids = _check_dataset(out, 2, 21)
    cap = read_capture(str(out / "captures" / f"{ids[0]}.safetensors"), label_set=get_label_set("voc"))
    heads, default_blocks = 4, 1  # tiny FLUX: 4 heads, 2 dual-stream blocks -> the later one
    assert cap.features.shape[0] == 3 * heads * default_blocks  # one half only
    # relabelling the captures gives generate's masks bit for bit
    rel = tmp_path / "rel"
    assert relabel_main(["--captures", str(out / "captures"), "--out", str(rel), "--no-progress"]) == 0
    for i in ids:
        a, b = (np.asarray(Image.open(d / "SegmentationClass" / f"{i}.png")) for d in (out, rel))
        assert np.array_equal(a, b)


def test_feature_blocks_option(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat on a sofa | cat, sofa\n")
    out = tmp_path / "o"
    assert generate_main(_args("tiny-sd3", out, prompts, "--feature-blocks", "0-3")) == 0
    ids = _check_dataset(out, 1, 21)
    cap = read_capture(str(out / "captures" / f"{ids[0]}.safetensors"), label_set=get_label_set("voc"))
    assert cap.features.shape[0] == 3 * 2 * 4 * 4  # 3 components x 2 halves x 4 heads x 4 blocks
    assert json.loads((out / "run.json").read_text())["defining"]["feature_blocks"] == "0-3"
    with pytest.raises(SystemExit) as exc:  # another block choice is another dataset
        generate_main(_args("tiny-sd3", out, prompts, "--feature-blocks", "all"))
    assert exc.value.code == 2


@pytest.mark.parametrize("spec", ["9-1B", "3-1", "blocks.2"])
def test_bad_feature_blocks_is_one_line_before_loading(tmp_path, capsys, spec):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat | cat\n")
    with pytest.raises(SystemExit) as exc:
        generate_main(_args("tiny-flux", tmp_path / "o", prompts, "--feature-blocks", spec))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`feature_blocks` has to" in err[0] and repr(spec) in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_non_square_end_to_end(tmp_path, model):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat on a sofa | cat, sofa\n")
    out = tmp_path / "o"
    args = _args(model, out, prompts)
    args[args.index("--width") + 1] = "192"
    assert generate_main(args) == 0
    ids = (out / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    mask = np.asarray(Image.open(out / "SegmentationClass" / f"{ids[0]}.png"))
    assert mask.shape == (SIZE, 192)
    cap = read_capture(str(out / "captures" / f"{ids[0]}.safetensors"), label_set=get_label_set("voc"))
    assert cap.class_attention.shape == (21, SIZE // 16, 192 // 16) and cap.features.shape[-2:] == (8, 12)


# --- options a family cannot run: one line before the first batch ------------------------------


def _one_error(capsys, exc):
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("model, extra, words", [
    ("tiny-sd3", ["--labeler", "dd"], ["`labeler` 'dd'", "family 'sd3'", "sd and sdxl models"]),
    ("tiny-flux", ["--labeler", "fused"], ["`labeler` 'fused'", "family 'flux'", "sd and sdxl models"]),
    ("tiny-flux-schnell", ["--save-all-labelers"], ["`save_all_labelers`", "family 'flux'"]),
    ("tiny-flux", ["--negative-prompt", "blurry"], ["`negative_prompt`", "flux models", "sd3 models take one"]),
    ("tiny-sd3", ["--scheduler", "ddim"], ["`scheduler`", "'ddim'", "sd3 model"]),
    ("tiny", ["--feature-blocks", "0-1"], ["`feature_blocks`", "'0-1'", "for a sd model", "sd3, flux"]),
])
def test_unsupported_option_is_one_line_before_any_output(tmp_path, capsys, model, extra, words):
    """Known from the model name: refused before the output folder is made (the run.json of a
    refused run would make the corrected run a different dataset)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat | cat\n")
    with pytest.raises(SystemExit) as exc:
        generate_main(_args(model, tmp_path / "o", prompts, *extra))
    line = _one_error(capsys, exc)
    for w in words:
        assert w in line, (w, line)
    assert not (tmp_path / "o").exists()


def test_prompt_file_negative_prompt_on_flux_is_one_line(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat", "classes": ["cat"], "negative_prompt": "blurry"}) + "\n")
    with pytest.raises(SystemExit) as exc:
        generate_main(_args("tiny-flux", tmp_path / "o", prompts))
    assert "`negative_prompt`" in _one_error(capsys, exc) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("model, spec, last", [("tiny-sd3", "99", "[0, 3] of this sd3"),  # 4 joint blocks
                                               ("tiny-flux", "2-9", "[0, 3] of this flux")])  # 2 dual + 2 single
def test_feature_blocks_out_of_range_is_one_line_before_any_output(tmp_path, capsys, model, spec, last):
    """The indexes are checked against the transformer's configuration (here the tiny models'),
    before the output folder is made."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat | cat\na dog | dog\n")
    with pytest.raises(SystemExit) as exc:
        generate_main(_args(model, tmp_path / "o", prompts, "--feature-blocks", spec))
    line = _one_error(capsys, exc)
    assert "`feature_blocks` has to name blocks" in line and repr(spec) in line and last in line, line
    assert not (tmp_path / "o").exists()


def test_local_folder_checked_from_its_files_before_loading(tmp_path, capsys):
    """A local folder's model_index.json and transformer/config.json tell the family and the
    blocks without loading (here a folder holding those two files only)."""
    folder = tmp_path / "flux"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"num_layers": 19, "num_single_layers": 38}))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat | cat\n")
    for extra, words in ((["--feature-blocks", "50-57"], ["'50-57'", "[0, 56] of this flux"]),
                         (["--labeler", "dd"], ["`labeler` 'dd'", "family 'flux'"])):
        with pytest.raises(SystemExit) as exc:
            generate_main(_args(str(folder), tmp_path / "o", prompts, *extra))
        line = _one_error(capsys, exc)
        assert all(w in line for w in words), line
        assert not (tmp_path / "o").exists()


def test_feature_blocks_out_of_range_checked_against_the_loaded_transformer(tmp_path):
    """Where only the loaded model tells its blocks (a hub model not cached yet, a pipeline
    handed over): a RunError line when the run starts, before the first batch."""
    from pccfast.core.config import PCCConfig
    from pccfast.data.prompts import PromptEntry
    from pccfast.diffusion.settings import GenerationConfig
    from pccfast.diffusion.tiny_dit import build_tiny_dit_pipeline
    from pccfast.runs.engine import RunError
    from pccfast.runs.generate import run_generation

    pipe = build_tiny_dit_pipeline("tiny-flux-schnell")
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    settings = GenerationConfig(model="tiny-flux-schnell", steps=1, height=SIZE, width=SIZE, guidance=0.0,
                                feature_blocks="1,4")
    entries = [PromptEntry(id="0", prompt="a cat", classes=("cat",), index=0, source="test")]
    with pytest.raises(RunError, match=r"`feature_blocks` has to name blocks .* in \[0, 3\] of this flux transformer "
                                       r"but holds '4'"):
        run_generation(entries, settings, PCCConfig(), get_label_set("voc"), str(tmp_path / "o"), pipe=pipe,
                       progress=False)
    assert calls == []


def test_run_with_a_given_pipeline_refuses_dd_before_the_first_batch(tmp_path):
    """The family checks also run where only the loaded pipeline tells the family (a hub model
    not yet cached, a pipeline handed over): a RunError line, no batch made."""
    from pccfast.core.config import PCCConfig
    from pccfast.core.dd import LabelerChoice
    from pccfast.data.prompts import PromptEntry
    from pccfast.diffusion.settings import GenerationConfig
    from pccfast.diffusion.tiny_dit import build_tiny_dit_pipeline
    from pccfast.runs.engine import RunError
    from pccfast.runs.generate import run_generation

    pipe = build_tiny_dit_pipeline("tiny-sd3")
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    settings = GenerationConfig(model="tiny-sd3", steps=1, height=SIZE, width=SIZE, guidance=3.0)
    entries = [PromptEntry(id="0", prompt="a cat", classes=("cat",), index=0, source="test")]
    with pytest.raises(RunError, match="`labeler` 'dd' needs .* family 'sd3'"):
        run_generation(entries, settings, PCCConfig(), get_label_set("voc"), str(tmp_path / "o"), pipe=pipe,
                       progress=False, labeling=LabelerChoice(labeler="dd"))
    assert calls == []


def test_declared_family_without_loading(tmp_path):
    from pccfast.diffusion.dit_adapters import declared_family

    assert [declared_family(n) for n in ("tiny-sd3", "tiny-flux", "tiny-flux-schnell", "tiny", "tiny-sdxl")] == \
        ["sd3", "flux", "flux", "sd", "sdxl"]
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert declared_family(str(folder)) == "flux"
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    assert declared_family(str(folder)) is None
    assert declared_family(str(tmp_path / "missing")) is None
    from pccfast.diffusion.dit_adapters import declared_blocks
    from pccfast.diffusion.joint_capture import dit_blocks
    from pccfast.diffusion.tiny_dit import build_tiny_dit_pipeline

    for name in ("tiny-sd3", "tiny-flux"):
        assert declared_blocks(name, declared_family(name)) == dit_blocks(build_tiny_dit_pipeline(name).transformer)
    assert declared_blocks(str(folder), "flux") is None  # no transformer/config.json
    assert declared_blocks("tiny", "sd") is None


def test_sd3_negative_prompt_end_to_end(tmp_path):
    """--negative-prompt on SD3 (guidance > 1): recorded per sample and in run.json; it is the
    unconditional half, so the class maps (read from that half) differ from the empty prompt's."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat on a sofa | cat, sofa\na dog | dog\n")
    with_neg, without = tmp_path / "neg", tmp_path / "plain"
    assert generate_main(_args("tiny-sd3", with_neg, prompts, "--negative-prompt", "blurry", guidance="4")) == 0
    assert generate_main(_args("tiny-sd3", without, prompts, guidance="4")) == 0
    ids = _check_dataset(with_neg, 2, 21)
    records = [json.loads(line) for line in (with_neg / "manifest.jsonl").read_text().splitlines()]
    assert [r["negative_prompt"] for r in records] == ["blurry", "blurry"]
    assert json.loads((with_neg / "run.json").read_text())["defining"]["negative_prompt"] == "blurry"
    a, b = (read_capture(str(d / "captures" / f"{ids[0]}.safetensors"), label_set=get_label_set("voc"))
            for d in (with_neg, without))
    assert not np.allclose(a.class_attention.numpy(), b.class_attention.numpy(), atol=1e-4)


def test_compile_end_to_end_equals_eager(tmp_path):
    """--compile eager on a DiT: the same masks and captures as the eager run."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat on a sofa | cat, sofa\na dog | dog\n")
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert generate_main(_args("tiny-sd3", eager, prompts, guidance="4")) == 0
    assert generate_main(_args("tiny-sd3", compiled, prompts, "--compile", "eager", guidance="4")) == 0
    ids = _check_dataset(compiled, 2, 21)
    for i in ids:
        a, b = (np.asarray(Image.open(d / "SegmentationClass" / f"{i}.png")) for d in (eager, compiled))
        assert np.array_equal(a, b)
        ca, cb = (read_capture(str(d / "captures" / f"{i}.safetensors"), label_set=get_label_set("voc"))
                  for d in (eager, compiled))
        assert np.array_equal(ca.features.numpy(), cb.features.numpy())
