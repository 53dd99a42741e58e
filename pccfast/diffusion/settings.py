"""Diffusion settings of a generation run (and nothing else: batching is the run's, JPEG
quality the writer's)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from pccfast.diffusion.schedulers import check_scheduler

__all__ = ["GenerationConfig", "DEFAULT_MODEL", "LATENT_FACTOR", "SMALLEST_LEVEL"]

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
LATENT_FACTOR = 8  # the VAE of SD 1.x/2.x: latents are 1/8 of the image size
SMALLEST_LEVEL = 32  # SD 1.x/2.x and SDXL: the coarsest up-block attention level is 1/32 of the image side


@dataclass
class GenerationConfig:
    """Defaults = the reference: SD 2.1-base, 512x512, 80 steps, guidance 7.5, seed 2024 + i.

    Every size rule is checked here, once, when the settings are made (before any model
    loads): sides that are multiples of 8 (a model family with a coarser labelling grid, SDXL,
    checks its own factor when the batch runs), not necessarily equal.
    """

    model: str = DEFAULT_MODEL  # diffusers checkpoint: hub id, local folder, "tiny", "tiny-sdxl" or "tiny-turbo"
    steps: int = 80  # denoising steps
    guidance: float = 7.5  # classifier-free guidance scale (> 1: two halves, the class maps read the unconditional one; <= 1: no guidance, one half)
    height: int = 512  # image height (multiple of 8)
    width: int = 512  # image width (multiple of 8)
    seed: int = 2024  # prompt i (position in the prompt list) gets seed + i
    device: str = "cpu"  # torch device of the pipeline and the labeller
    dtype: str = "float32"  # float32, float16 or bfloat16 (half precision on CUDA)
    scheduler: Optional[str] = None  # a schedulers.SCHEDULERS name built from the checkpoint's config; None: its own
    negative_prompt: Optional[str] = None  # text of the unconditional half (with guidance); None: the empty prompt
    feature_blocks: Optional[str] = None  # SD3/FLUX: blocks giving features and class maps (joint_capture.parse_feature_blocks); None: the family's default

    def __post_init__(self) -> None:
        f = LATENT_FACTOR
        if self.height % f or self.width % f or self.height < f or self.width < f:
            raise ValueError(
                f"`height` and `width` have to be positive multiples of {f} but are {self.height} and {self.width}"
            )
        if self.steps < 1:
            raise ValueError(f"`steps` has to be at least 1 but is {self.steps}")
        if not self.guidance >= 0.0:
            raise ValueError(f"`guidance` has to be at least 0 (at most 1: no guidance) but is {self.guidance}")
        check_scheduler(self.scheduler)
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise TypeError(f"`negative_prompt` has to be a text or None but is {type(self.negative_prompt).__name__}")
        if self.feature_blocks is not None:
            from pccfast.diffusion.joint_capture import check_feature_blocks

            check_feature_blocks(self.feature_blocks)
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"`dtype` has to be float32, float16 or bfloat16 but is {self.dtype!r}")
        if self.dtype == "float16" and torch.device(self.device).type == "cpu":
            raise ValueError("`dtype` float16 needs a CUDA device (--device cuda); on the CPU use float32 or bfloat16")

    def check_labeller(self, pca_components: int) -> None:
        """The image has to be large enough to label: the coarsest attention level (1/32 of
        each side, rounded up) has to hold at least ``pca_components`` pixels for the head-wise PCA."""
        level = math.ceil(self.height / SMALLEST_LEVEL) * math.ceil(self.width / SMALLEST_LEVEL)
        if level < pca_components:
            side = SMALLEST_LEVEL * math.ceil(math.sqrt(pca_components))
            raise ValueError(
                f"`height` and `width` have to be large enough for the coarsest attention level (1/{SMALLEST_LEVEL} of "
                f"each side) to hold at least pca_components = {pca_components} pixels (e.g. both at least {side}) "
                f"but are {self.height} and {self.width}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)
