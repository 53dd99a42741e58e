"""Model adapters of the diffusion transformers: SD3/SD3.5 (``StableDiffusion3Pipeline``) and
FLUX.1 dev and schnell (``FluxPipeline``).

They fill in :class:`pccfast.diffusion.adapters.ModelAdapter` for a transformer denoiser:

* layers: the chosen blocks' joint attention (``<block>.attn.processor``) gives both the
  head-wise features and the class maps (``feature_blocks``; default: the later half of the
  joint or dual-stream blocks, :func:`pccfast.diffusion.joint_capture.default_feature_blocks`);
* class text: :func:`pccfast.diffusion.dit_text.encode_dit_class_texts` (the pipeline's own
  encoders, then the transformer's ``context_embedder``);
* sizes: latents 1/8 of the image, image tokens 2x2 latent patches, so the labelling grid is
  1/16 of the image side (a 1024x1024 image: 64x64), and sides are multiples of 16;
* guidance halves: SD3 has a [unconditional; conditional] batch when guidance > 1; FLUX.1
  never has one (dev embeds the guidance scale, schnell is guidance-distilled);
* the run: the joint attention needs its own capture (:mod:`pccfast.diffusion.joint_capture`:
  class keys through each block's text side, image tokens in the joint sequence), so
  ``generate`` runs :func:`pccfast.diffusion.dit_generation.generate_with_capture_dit`;
* run options: SD3 takes a negative prompt, FLUX.1 does not; both take ``compile``; neither
  Dataset Diffusion's labeller nor ``scheduler``. :func:`check_family_options` refuses what a
  family cannot run in one line, before any output where :func:`declared_family` and
  :func:`declared_blocks` tell the family and blocks from the name or files, else when the
  model has loaded.
"""
from __future__ import annotations

import json
import os
from typing import ClassVar, Optional

from pccfast.diffusion.adapters import ModelAdapter, register_adapter

__all__ = ["DiTAdapter", "SD3Adapter", "FluxAdapter", "DIT_PIPELINE_CLASSES", "DIT_FAMILIES", "declared_family",
           "declared_blocks", "check_family_options"]

DIT_FAMILIES = ("sd3", "flux")  # the families with the joint-attention capture


class DiTAdapter(ModelAdapter):
    """The joint-attention transformer families (see the module docstring).

    Args:
        pipe: the loaded pipeline; denoiser: the transformer, when not ``pipe.transformer``;
        feature_blocks: ``--feature-blocks`` (None: the family's default).
    """

    has_own_capture: ClassVar[bool] = True  # generate_with_capture hands the run to ``generate``

    def __init__(self, pipe, denoiser=None, feature_blocks=None):
        super().__init__(pipe, denoiser)
        self.feature_blocks = feature_blocks

    @property
    def denoiser(self):
        return self._denoiser if self._denoiser is not None else self.pipe.transformer

    def blocks(self) -> list:
        from pccfast.diffusion.joint_capture import parse_feature_blocks

        return parse_feature_blocks(self.feature_blocks, self.denoiser)

    def feature_layers(self) -> list:
        return [f"{b}.attn.processor" for b in self.blocks()]

    def class_map_layers(self) -> list:
        return self.feature_layers()

    def encode_class_texts(self, class_names: list, label_set):
        from pccfast.diffusion.dit_text import encode_dit_class_texts

        return encode_dit_class_texts(self.pipe, class_names, label_set)

    @property
    def grid_factor(self) -> int:
        return 2  # 2x2 latent patches per image token

    def level_hw(self, n_tokens: int, latent_hw) -> tuple:
        h, w = -(-int(latent_hw[0]) // 2), -(-int(latent_hw[1]) // 2)
        if h * w != n_tokens:
            raise RuntimeError(f"a block has {n_tokens} image tokens, not the {h}x{w} of a {latent_hw[0]}x{latent_hw[1]} latent")
        return h, w

    def halves(self, guidance: float) -> int:
        from pccfast.diffusion.dit_generation import dit_halves

        return dit_halves(self.pipe, guidance)

    def generate(self, prompts, class_names, label_set, seeds, *, steps, guidance, height, width, cfg=None,
                 generator_device=None, progress=False, negative_prompt=None, compile=False, **unused):
        """One batch through :func:`dit_generation.generate_with_capture_dit` with this
        adapter's blocks. ``negative_prompt``: SD3 only (:func:`check_family_options`);
        ``compile``: a compiled transformer. Options of the UNet path that have no DiT meaning
        (``dd``, ``scheduler``) have to be left at their defaults."""
        from pccfast.diffusion.dit_generation import generate_with_capture_dit

        check_family_options(self.family, needs_dd=unused.get("dd") is not None, scheduler=unused.get("scheduler"),
                             negative_prompt=negative_prompt is not None)
        given = sorted(k for k, v in unused.items() if v not in (None, False))
        if given:
            raise ValueError(f"`{given[0]}` is not supported for a {self.family} model (joint-attention capture) "
                             f"but is {unused[given[0]]!r}")
        return generate_with_capture_dit(self.pipe, prompts, class_names, label_set, seeds, steps=steps,
                                         guidance=guidance, height=height, width=width, cfg=cfg,
                                         feature_blocks=self.feature_blocks, generator_device=generator_device,
                                         progress=progress, negative_prompt=negative_prompt, compile=compile)


@register_adapter
class SD3Adapter(DiTAdapter):
    """Stable Diffusion 3 and 3.5 (MM-DiT joint blocks; features and class maps from the later half)."""

    family = "sd3"
    description = "Stable Diffusion 3/3.5"
    pipeline_classes = ("StableDiffusion3Pipeline",)


@register_adapter
class FluxAdapter(DiTAdapter):
    """FLUX.1 dev and schnell (features and class maps from the later half of the dual-stream blocks)."""

    family = "flux"
    description = "FLUX.1 dev and schnell"
    pipeline_classes = ("FluxPipeline",)


DIT_PIPELINE_CLASSES = SD3Adapter.pipeline_classes + FluxAdapter.pipeline_classes


def declared_family(model: str) -> Optional[str]:
    """The family ("sd", "sdxl", "sd3", "flux") of ``model`` where it is known without loading
    it: the built-in tiny names, and a local folder's or an already cached hub model's
    ``model_index.json``; None otherwise (a hub model not cached yet, an unsupported class:
    loading it says why)."""
    from pccfast.diffusion.tiny_dit import TINY_DIT_MODELS
    from pccfast.diffusion.tiny_variants import TINY_MODELS

    if model in TINY_DIT_MODELS:
        return "flux" if model.startswith("tiny-flux") else "sd3"
    if model in TINY_MODELS:
        return "sdxl" if model == "tiny-sdxl" else "sd"
    from pccfast.diffusion.adapters import UnsupportedPipelineError, adapter_class
    from pccfast.diffusion.pipeline import _declared_class

    path = os.path.expanduser(model)
    local = os.path.isdir(path)
    declared = _declared_class(path if local else model, local)
    if declared is None:
        return None
    try:
        return adapter_class(declared).family
    except UnsupportedPipelineError:
        return None


def declared_blocks(model: str, family: Optional[str]) -> Optional[list]:
    """The joint-attention block names (``joint_capture.dit_blocks`` order) of a DiT ``model``
    of ``family`` where they are known without loading it: the tiny models' configurations,
    and a local folder's or a cached hub model's ``transformer/config.json``; None otherwise."""
    from pccfast.diffusion.joint_capture import block_names

    if family not in DIT_FAMILIES:
        return None
    from pccfast.diffusion import tiny_dit

    if model in tiny_dit.TINY_DIT_MODELS:
        config = tiny_dit.TINY_SD3_TRANSFORMER if family == "sd3" else tiny_dit.TINY_FLUX_TRANSFORMER
    else:
        path = os.path.join(os.path.expanduser(model), "transformer", "config.json")
        try:
            if not os.path.isfile(path):
                from huggingface_hub import try_to_load_from_cache

                path = try_to_load_from_cache(model, "transformer/config.json")  # no network
            if not isinstance(path, str) or not os.path.isfile(path):
                return None
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except Exception:  # an invalid hub id, a broken file: loading the model says why
            return None
    try:
        return block_names(int(config["num_layers"]), int(config.get("num_single_layers", 0) if family == "flux" else 0))
    except (KeyError, TypeError, ValueError):
        return None


def check_family_options(family: str, *, feature_blocks=None, needs_dd: bool = False, labeler: str = "dd",
                         save_all: bool = False,
                         scheduler: Optional[str] = None, negative_prompt: bool = False, transformer=None,
                         blocks: Optional[list] = None) -> None:
    """Refuse, in one line naming the option, its value and what is valid, the run options that
    a model family cannot run; ``generate`` checks them before the first batch.

    Args:
        family: the adapter's family ("sd", "sdxl", "sd3", "flux").
        feature_blocks: ``--feature-blocks`` (DiT families only; with ``transformer`` its
            indexes are checked against the loaded model's blocks).
        needs_dd, labeler, save_all: whether the labeller needs Dataset Diffusion's UNet
            capture, the labeller's name (``dd`` or ``fused``) and ``--save-all-labelers``.
        scheduler: ``--scheduler`` (UNet families only: the DiTs run their own flow-matching sampler).
        negative_prompt: whether a negative prompt is given (SD3: the unconditional half's
            text; FLUX.1 has no unconditional half).
        transformer: the loaded DiT's transformer, or None before loading.
        blocks: before loading, the DiT's block names where known (``declared_blocks``).

    Raises:
        ValueError: one line.
    """
    if family not in DIT_FAMILIES:
        if feature_blocks not in (None, "default"):
            raise ValueError(f"`feature_blocks` chooses blocks of a diffusion transformer ({', '.join(DIT_FAMILIES)} "
                             f"models) but is {feature_blocks!r} for a {family} model")
        return
    if needs_dd:
        what = f"`labeler` {labeler!r}" if labeler != "pcc" or not save_all else "`save_all_labelers` (PCC and DD masks)"
        raise ValueError(f"{what} needs Dataset Diffusion's UNet self-attention (sd and sdxl models) "
                         f"but the model is of family {family!r} (joint attention): use labeler 'pcc'")
    if scheduler is not None:
        raise ValueError(f"`scheduler` rebuilds a UNet model's sampler (sd and sdxl models) but is {scheduler!r} for "
                         f"a {family} model (it runs its own flow-matching sampler): leave it unset")
    if negative_prompt and family == "flux":
        raise ValueError("`negative_prompt` is the text of the unconditional half, which flux models (FLUX.1 dev and "
                         "schnell) do not have (dev embeds the guidance scale, schnell is guidance-distilled) but one "
                         "is given: remove it (sd, sdxl and sd3 models take one)")
    if feature_blocks is not None and transformer is not None:
        from pccfast.diffusion.joint_capture import parse_feature_blocks

        parse_feature_blocks(feature_blocks, transformer)
    elif feature_blocks is not None and blocks:
        from pccfast.diffusion.joint_capture import choose_blocks

        choose_blocks(feature_blocks, blocks, family)
