"""benchmarks/gpu_check.py --dry-run runs on the CPU, so the GPU acceptance script cannot rot."""
import importlib.util
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_dry_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu.json"
    assert module.main(["--dry-run", "--device", "cpu", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["sections"]) == {"CUDA tests", "labeller", "host syncs", "UNet step", "generate"}
    assert not any("error" in v for v in data["sections"].values()), data["sections"]
    assert data["sections"]["generate"]["2 steps failed"] == 0 and data["sections"]["generate"]["2 steps img/s"] > 0
    assert "| UNet step |" in capsys.readouterr().out


def test_sd21_configs_have_the_real_sizes():
    """The random full-size model has SD 2.1-base's parameter counts (built on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pccfast.diffusion.sd21_random import SD21_TEXT_CONFIG, SD21_UNET_CONFIG, SD21_VAE_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET_CONFIG)
        vae = AutoencoderKL(**SD21_VAE_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**SD21_TEXT_CONFIG))
    millions = [round(sum(p.numel() for p in m.parameters()) / 1e6) for m in (unet, vae, text)]
    assert millions == [866, 84, 340], millions
