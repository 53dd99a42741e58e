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
  ``generate`` runs :func:`pccfast.diffusion.dit_generation.generate_with_capture_dit`.
"""
from __future__ import annotations

from typing import ClassVar

from pccfast.diffusion.adapters import ModelAdapter, register_adapter

__all__ = ["DiTAdapter", "SD3Adapter", "FluxAdapter", "DIT_PIPELINE_CLASSES"]


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
                 generator_device=None, progress=False, **unused):
        """One batch through :func:`dit_generation.generate_with_capture_dit` with this
        adapter's blocks. Options of the UNet path that have no DiT meaning (``compile``,
        ``dd``, ``scheduler``, ``negative_prompt``) have to be left at their defaults."""
        from pccfast.diffusion.dit_generation import generate_with_capture_dit

        given = sorted(k for k, v in unused.items() if v not in (None, False))
        if given:
            raise ValueError(f"`{given[0]}` is not supported for a {self.family} model (joint-attention capture) "
                             f"but is {unused[given[0]]!r}")
        return generate_with_capture_dit(self.pipe, prompts, class_names, label_set, seeds, steps=steps,
                                         guidance=guidance, height=height, width=width, cfg=cfg,
                                         feature_blocks=self.feature_blocks, generator_device=generator_device,
                                         progress=progress)


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
