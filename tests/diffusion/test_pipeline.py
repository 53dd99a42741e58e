"""load_pipeline and its one error class, ModelLoadError."""
import json

import huggingface_hub.constants
import pytest
import torch

import pccfast.diffusion
from pccfast.diffusion.layers import self_attention_layers
from pccfast.diffusion.pipeline import ModelLoadError, load_pipeline

HINT = "pass --model PATH to a local diffusers Stable Diffusion folder, or --model tiny for the offline test model"


def _load_error(name: str) -> str:
    """The message of the ModelLoadError that loading ``name`` raises, checked to be one line."""
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(name)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"model {name!r} could not be loaded (") and msg.endswith(f"): {HINT}"), msg
    return msg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny pipeline and a diffusers folder it was saved to."""
    tiny = load_pipeline("tiny")
    folder = tmp_path_factory.mktemp("model") / "sd"
    tiny.save_pretrained(folder)
    return tiny, folder


def test_error_class():
    assert issubclass(ModelLoadError, RuntimeError) and issubclass(ModelLoadError, OSError)  # old callers of both
    assert pccfast.diffusion.ModelLoadError is ModelLoadError
    assert str(ModelLoadError("model 'x' could not be loaded")) == "model 'x' could not be loaded"


def test_nonexistent_local_folder(tmp_path):
    missing = str(tmp_path / "no" / "such" / "model")
    assert _load_error(missing) == f"model {missing!r} could not be loaded (no such folder): {HINT}"
    with pytest.raises(OSError):  # callers that catch OSError keep working
        load_pipeline(missing)
    with pytest.raises(RuntimeError):
        load_pipeline(missing)


def test_file_and_folder_without_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"0")
    assert "(not a folder)" in _load_error(str(tmp_path / "weights.bin"))
    assert "model_index.json" in _load_error(str(tmp_path))  # a folder, but no diffusers model in it


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: patch the value too
    msg = _load_error("pccfast-tests/no-such-model")
    assert "not in the Hugging Face cache while HF_HUB_OFFLINE is set" in msg


def test_wrong_pipeline_class(saved, tmp_path):
    """Regression: a folder of another pipeline class loaded into StableDiffusionPipeline without
    an error (the failure came later, inside the UNet)."""
    _, folder = saved
    index = json.loads((folder / "model_index.json").read_text())
    other = tmp_path / "sdxl"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyV22Pipeline"}))
    msg = _load_error(str(other))
    assert "(pipeline class KandinskyV22Pipeline is not supported; supported families: sd (StableDiffusionPipeline" in msg
    assert "sdxl (StableDiffusionXLPipeline: SDXL, SDXL-Turbo)" in msg


def test_argument_check():
    with pytest.raises(ValueError, match="`name_or_path` has to be a non-empty string but is ''"):
        load_pipeline("")


def test_tiny_and_local_folder(saved):
    tiny, folder = saved
    assert type(tiny.unet.attn_processors[self_attention_layers(tiny.unet)[0]]).__name__ == "AttnProcessor2_0"
    again = load_pipeline(str(folder))
    a, b = tiny.unet.state_dict(), again.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.tokenizer("a pot plant")["input_ids"] == tiny.tokenizer("a pot plant")["input_ids"]
    assert type(again.unet.attn_processors[self_attention_layers(again.unet)[0]]).__name__ == "AttnProcessor2_0"


def test_tiny_sdxl_folder_loads_as_sdxl(tmp_path):
    """A saved SDXL folder loads as StableDiffusionXLPipeline (chosen from model_index.json),
    with the same weights and both tokenizers."""
    tiny = load_pipeline("tiny-sdxl")
    assert type(tiny).__name__ == "StableDiffusionXLPipeline"
    tiny.save_pretrained(tmp_path / "sdxl")
    again = load_pipeline(str(tmp_path / "sdxl"))
    assert type(again).__name__ == "StableDiffusionXLPipeline"
    a, b = tiny.unet.state_dict(), again.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.tokenizer_2("a pot plant")["input_ids"] == tiny.tokenizer_2("a pot plant")["input_ids"]
    assert type(again.unet.attn_processors[self_attention_layers(again.unet)[0]]).__name__ == "AttnProcessor2_0"


@pytest.mark.parametrize("name, scheduler", [("tiny-turbo", "EulerDiscreteScheduler"), ("tiny-lcm", "LCMScheduler")])
def test_tiny_variants(name, scheduler):
    pipe = load_pipeline(name)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe.scheduler).__name__ == scheduler
    if name == "tiny-turbo":  # the tiny model's weights, SD-Turbo's trailing Euler
        assert pipe.scheduler.config.timestep_spacing == "trailing"
        a, b = pipe.unet.state_dict(), load_pipeline("tiny").unet.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:  # a guidance embedding: guidance-distilled
        assert pipe.unet.config.time_cond_proj_dim is not None
