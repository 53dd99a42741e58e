"""Loading SD3 and FLUX pipelines (tiny names, local folders) and choosing their adapters."""
import json

import pytest
import torch

from pccfast.diffusion.adapters import adapter_class, adapter_for, supported_families
from pccfast.diffusion.dit_adapters import FluxAdapter, SD3Adapter
from pccfast.diffusion.pipeline import ModelLoadError, load_pipeline


@pytest.mark.parametrize("name, cls, adapter", [("tiny-sd3", "StableDiffusion3Pipeline", SD3Adapter),
                                                ("tiny-flux", "FluxPipeline", FluxAdapter),
                                                ("tiny-flux-schnell", "FluxPipeline", FluxAdapter)])
def test_tiny_names_load_and_choose_their_adapter(name, cls, adapter):
    pipe = load_pipeline(name)
    assert type(pipe).__name__ == cls
    a = adapter_for(pipe)
    assert type(a) is adapter and a.denoiser is pipe.transformer
    assert a.grid_hw(256, 256) == (16, 16) and a.size_factor == 16
    assert a.feature_layers() == a.class_map_layers()
    assert all(n in pipe.transformer.attn_processors for n in a.feature_layers())
    a.check_size(128, 256)  # non-square: a 8x16 image-token grid
    assert a.grid_hw(128, 256) == (8, 16)
    with pytest.raises(ValueError, match="multiples of 16"):
        a.check_size(120, 120)


def test_local_folder_loads_as_its_own_pipeline_class(tmp_path):
    pipe = load_pipeline("tiny-flux")
    pipe.save_pretrained(tmp_path / "flux")
    assert json.loads((tmp_path / "flux" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    again = load_pipeline(str(tmp_path / "flux"))
    assert type(again).__name__ == "FluxPipeline"
    w0, w1 = (p.transformer.single_transformer_blocks[0].attn.to_k.weight for p in (pipe, again))
    assert torch.equal(w0, w1)
    assert again.tokenizer_2("a cat")["input_ids"] == pipe.tokenizer_2("a cat")["input_ids"]


def test_families_listed_and_unknown_class_one_line():
    assert adapter_class("StableDiffusion3Pipeline") is SD3Adapter and adapter_class("FluxPipeline") is FluxAdapter
    text = supported_families()
    assert "sd3 (StableDiffusion3Pipeline" in text and "flux (FluxPipeline" in text


def test_missing_dit_folder_is_one_line(tmp_path):
    folder = tmp_path / "sd3"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ModelLoadError) as exc:
        load_pipeline(str(folder))
    assert len(str(exc.value).splitlines()) == 1 and "could not be loaded" in str(exc.value)


def test_generate_with_capture_routes_by_family(tiny_pipe):
    """SD3/FLUX pipelines take the joint-attention path through generate_with_capture (same
    result as generate_with_capture_dit); UNet pipelines refuse feature_blocks; the DiT path
    refuses UNet-only options by name."""
    from pccfast.diffusion.dit_generation import generate_with_capture_dit
    from pccfast.diffusion.generation import generate_with_capture

    flux = load_pipeline("tiny-flux-schnell")
    args = (["a cat"], [["cat"]], "voc", [3])
    kw = dict(steps=1, guidance=0.0, height=64, width=64)
    a = generate_with_capture(flux, *args, feature_blocks="all", **kw)
    b = generate_with_capture_dit(flux, *args, feature_blocks="all", **kw)
    assert torch.equal(a.images, b.images) and torch.equal(a.features, b.features)
    assert torch.equal(a.class_attention, b.class_attention) and a.halves == 1
    with pytest.raises(ValueError, match="`scheduler` rebuilds a UNet model's sampler .* but is 'ddim' for a flux model"):
        generate_with_capture(flux, *args, scheduler="ddim", **kw)
    with pytest.raises(ValueError, match="`negative_prompt` is the text of the unconditional half, which flux models"):
        generate_with_capture(flux, *args, negative_prompt="blurry", **kw)
    with pytest.raises(ValueError, match="`labeler` 'dd' needs Dataset Diffusion's UNet self-attention .* family 'flux'"):
        from pccfast.core.dd import DDConfig

        generate_with_capture(flux, *args, dd=DDConfig(), **kw)
    with pytest.raises(ValueError, match="`feature_blocks` chooses blocks of a diffusion transformer .* for a sd model"):
        generate_with_capture(tiny_pipe, *args, feature_blocks="all", steps=1, guidance=7.5, height=64, width=64)
