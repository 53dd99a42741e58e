"""Diffusion settings of a generation run (and nothing else: batching is the run's, JPEG
quality the writer's)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["GenerationConfig", "DEFAULT_MODEL", "LATENT_FACTOR", "SMALLEST_LEVEL"]

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
LATENT_FACTOR = 8  # the VAE of SD 1.x/2.x: latents are 1/8 of the image size
SMALLEST_LEVEL = 32  # SD 1.x/2.x: the coarsest up-block attention level is 1/32 of the image side


@dataclass
class GenerationConfig:
    """Defaults = the reference: SD 2.1-base, 512x512, 80 steps, guidance 7.5, seed 2024 + i.

    Every size rule is checked here, once, when the settings are made (before any model
    loads): square images whose side is a multiple of 8.
    """

    model: str = DEFAULT_MODEL  # diffusers checkpoint: hub id, local folder, or "tiny"
    steps: int = 80  # denoising steps
    guidance: float = 7.5  # classifier-free guidance scale (> 1: the capture reads the unconditional half)
    height: int = 512  # image height (multiple of 8, equal to width)
    width: int = 512  # image width (multiple of 8, equal to height)
    seed: int = 2024  # prompt i (position in the prompt list) gets seed + i
    device: str = "cpu"  # torch device of the pipeline and the labeller
    dtype: str = "float32"  # float32, float16 or bfloat16 (half precision on CUDA)

    def __post_init__(self) -> None:
        f = LATENT_FACTOR
        if self.height % f or self.width % f or self.height < f or self.width < f:
            raise ValueError(
                f"`height` and `width` have to be positive multiples of {f} but are {self.height} and {self.width}"
            )
        if self.height != self.width:
            raise ValueError(
                f"`height` and `width` have to be equal (square images; the labeller's grid is square) "
                f"but are {self.height} and {self.width}"
            )
        if self.steps < 1:
            raise ValueError(f"`steps` has to be at least 1 but is {self.steps}")
        if not self.guidance > 1.0:
            raise ValueError(
                f"`guidance` has to be greater than 1 (the capture uses the unconditional half) but is {self.guidance}"
            )
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"`dtype` has to be float32, float16 or bfloat16 but is {self.dtype!r}")
        if self.dtype == "float16" and torch.device(self.device).type == "cpu":
            raise ValueError("`dtype` float16 needs a CUDA device (--device cuda); on the CPU use float32 or bfloat16")

    def check_labeller(self, pca_components: int) -> None:
        """The image has to be large enough to label: the coarsest attention level (1/32 of the
        side) has to hold at least ``pca_components`` pixels for the head-wise PCA."""
        side = SMALLEST_LEVEL * math.ceil(math.sqrt(pca_components))
        if self.height < side:
            raise ValueError(
                f"`height` and `width` have to be at least {side} (the coarsest attention level, 1/{SMALLEST_LEVEL} of "
                f"the side, has to hold at least pca_components = {pca_components} pixels) but are {self.height} "
                f"and {self.width}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)
