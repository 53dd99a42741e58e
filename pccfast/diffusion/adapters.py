"""Model adapters: what the capture needs to know about one family of diffusers pipelines.

The capture (:mod:`pccfast.diffusion.capture`) and the generation loop
(:mod:`pccfast.diffusion.generation`) ask a :class:`ModelAdapter`, chosen from the pipeline
itself by :func:`adapter_for`, five things and nothing else:

* **layers**: ``feature_layers()`` (processor names whose self-attention per-head outputs give
  the head-wise PCA features, in feature order) and ``class_map_layers()`` (processor names
  whose queries give the open-vocabulary class maps), both keys of ``denoiser.attn_processors``;
  ``feature_processor``/``class_processor`` build the processors installed there;
* **class text**: ``encode_class_texts(class_names, label_set)`` -> (B, T, C) embeddings, in the
  space the class-map layers' ``to_k`` reads, with the (B, T) real-token mask and the tokens;
* **sizes**: ``size_factor`` (image sides are multiples of it), ``latent_hw(H, W)``,
  ``grid_hw(H, W)`` (the labelling grid: every size in the captures and the labeller follows
  it) and ``level_hw(n_tokens, latent_hw)`` (the (h, w) of a layer with that many queries);
* **guidance halves**: ``halves(guidance)``, 2 when the denoiser's batch is [unconditional (or
  negative prompt); conditional] (classifier-free guidance), 1 when it is the B images alone
  (guidance at or below 1, or a guidance-distilled model);
* **pipeline arguments**: ``call_kwargs(...)``, the family's extra keyword arguments of the
  pipeline call.

A family is a subclass that names its pipeline classes (``pipeline_classes``, the
``_class_name`` of ``model_index.json``) and overrides what differs; :func:`register_adapter`
adds it to the families :func:`adapter_for` and :func:`adapter_class` choose from. An
unsupported class is one line (:class:`UnsupportedPipelineError`) naming the class and the
supported families.
"""
from __future__ import annotations

import math
from typing import ClassVar, Optional

from pccfast.diffusion.layers import cross_attention_layers, layer_size, self_attention_layers

__all__ = [
    "ModelAdapter",
    "UNetAdapter",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "UnsupportedPipelineError",
    "adapter_for",
    "adapter_class",
    "check_family_size",
    "register_adapter",
    "supported_families",
]


class UnsupportedPipelineError(ValueError):
    """A pipeline class that no adapter handles; the message is one line naming the class and
    the supported families."""


class ModelAdapter:
    """The interface of a model family (see the module docstring); subclasses fill it in.

    Args:
        pipe: the loaded diffusers pipeline.
        denoiser: the module whose processors are replaced, when not the pipeline's own (e.g.
            the eager UNet behind a compiled one, or a bare UNet without a pipeline).
    """

    family: ClassVar[str] = ""  # short name shown to users ("sd", "sdxl", ...)
    description: ClassVar[str] = ""  # which models, for the supported-family line
    pipeline_classes: ClassVar[tuple] = ()  # diffusers pipeline class names (model_index.json `_class_name`)
    size_multiple: ClassVar[Optional[int]] = None  # image sides' multiple known before loading (None: checked once loaded)

    def __init__(self, pipe, denoiser=None):
        self.pipe = pipe
        self._denoiser = denoiser

    # --- the module whose attention processors the capture replaces
    @property
    def denoiser(self):
        """The UNet (or transformer) with ``attn_processors`` and ``set_attn_processor``."""
        raise NotImplementedError

    # --- layers
    def feature_layers(self) -> list:
        """Processor names of the head-wise feature layers, in feature order."""
        raise NotImplementedError

    def class_map_layers(self) -> list:
        """Processor names of the class-map layers, in layer order."""
        raise NotImplementedError

    def feature_processor(self, capture, name: str, record: bool):
        """The processor installed on feature layer ``name`` (``record``: the last step)."""
        from pccfast.diffusion.processors import HeadFeatureProcessor

        return HeadFeatureProcessor(capture, name, record=record)

    def class_processor(self, capture, name: str):
        """The processor installed on class-map layer ``name``."""
        from pccfast.diffusion.processors import ClassAttentionProcessor

        return ClassAttentionProcessor(capture, name)

    # --- class text
    def encode_class_texts(self, class_names: list, label_set):
        """(embeds (B, T, C), mask (B, T) bool, ``tokens.ClassTokens``) of the images' class texts."""
        raise NotImplementedError

    # --- sizes
    @property
    def latent_factor(self) -> int:
        """Image side / latent side (the VAE's downsampling)."""
        return int(getattr(self.pipe, "vae_scale_factor", 8))

    @property
    def grid_factor(self) -> int:
        """Latent side / labelling-grid side."""
        return 1

    @property
    def size_factor(self) -> int:
        """Image sides have to be multiples of this (so the grid divides the image)."""
        return self.latent_factor * self.grid_factor

    def check_size(self, height: int, width: int) -> None:
        f = self.size_factor
        if height % f or width % f or height < f or width < f:
            raise ValueError(
                f"`height` and `width` have to be positive multiples of {f} for a {self.family} model "
                f"but are {height} and {width}"
            )

    def latent_hw(self, height: int, width: int) -> tuple:
        """(h, w) of the latents of an (height, width) image."""
        f = self.latent_factor
        return height // f, width // f

    def grid_hw(self, height: int, width: int) -> tuple:
        """(h, w) of the labelling grid of an (height, width) image."""
        h, w = self.latent_hw(height, width)
        g = self.grid_factor
        return math.ceil(h / g), math.ceil(w / g)

    def level_hw(self, n_tokens: int, latent_hw) -> tuple:
        """(h, w) of a layer with ``n_tokens`` queries for latents of size ``latent_hw``."""
        return layer_size(n_tokens, latent_hw)

    # --- guidance
    def halves(self, guidance: float) -> int:
        """2 when the denoiser batch is [unconditional; conditional] (classifier-free guidance), else 1."""
        raise NotImplementedError

    def call_kwargs(self, height: int, width: int) -> dict:
        """Extra keyword arguments of the pipeline call for this family (none by default)."""
        return {}


class UNetAdapter(ModelAdapter):
    """diffusers ``UNet2DConditionModel`` pipelines: features from the up blocks' ``attn1``,
    class maps from the down and up blocks' ``attn2`` (:mod:`pccfast.diffusion.layers`), the
    grid at the finest UNet level that has attention, classifier-free guidance as the pipeline
    decides it (``guidance > 1`` and no guidance embedding, ``time_cond_proj_dim``)."""

    @property
    def denoiser(self):
        return self._denoiser if self._denoiser is not None else self.pipe.unet

    def feature_layers(self) -> list:
        return self_attention_layers(self.denoiser)

    def class_map_layers(self) -> list:
        return cross_attention_layers(self.denoiser)

    @property
    def grid_factor(self) -> int:
        """2^i for the first down block i with attention (SD 1/2: 1, SDXL: 2)."""
        types = list(getattr(self.denoiser.config, "down_block_types", ()) or ())
        for i, t in enumerate(types):
            if "Attn" in t:
                return 2 ** i
        return 1

    def halves(self, guidance: float) -> int:
        distilled = getattr(self.denoiser.config, "time_cond_proj_dim", None) is not None
        return 2 if guidance > 1 and not distilled else 1


class StableDiffusionAdapter(UNetAdapter):
    """Stable Diffusion 1.x and 2.x (and SD-Turbo, which has SD 2.1's UNet): one CLIP text
    encoder; class texts encoded by :func:`pccfast.diffusion.tokens.encode_class_texts`."""

    family = "sd"
    description = "Stable Diffusion 1.x/2.x, SD-Turbo"
    pipeline_classes = ("StableDiffusionPipeline",)
    size_multiple = 8

    def encode_class_texts(self, class_names: list, label_set):
        from pccfast.diffusion.tokens import encode_class_texts

        return encode_class_texts(self.pipe, class_names, label_set)


class StableDiffusionXLAdapter(UNetAdapter):
    """SDXL (and SDXL-Turbo): class texts encoded as the pipeline encodes prompts for
    cross-attention, both text encoders' penultimate hidden states concatenated
    (:func:`pccfast.diffusion.tokens.encode_class_texts_sdxl`); features from the up blocks'
    self-attention, class maps from the down and up blocks' cross-attention (the UNet's layer
    names are SD's); its first level has no attention, so the grid is half the latent side
    (64x64 for 1024x1024) and image sides are multiples of 16."""

    family = "sdxl"
    description = "SDXL, SDXL-Turbo"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    size_multiple = 16

    def encode_class_texts(self, class_names: list, label_set):
        from pccfast.diffusion.tokens import encode_class_texts_sdxl

        return encode_class_texts_sdxl(self.pipe, class_names, label_set)


_ADAPTERS: list = [StableDiffusionXLAdapter, StableDiffusionAdapter]


def register_adapter(cls: type) -> type:
    """Adds a ``ModelAdapter`` subclass to the supported families (usable as a decorator).
    Families registered later are tried first, so a subclass of a pipeline class can get its own."""
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)) or not cls.pipeline_classes or not cls.family:
        raise TypeError(f"`cls` has to be a ModelAdapter subclass with a family and pipeline_classes but is {cls!r}")
    if cls not in _ADAPTERS:
        _ADAPTERS.insert(0, cls)
    return cls


def _load_families() -> None:
    """Registers the families defined in other modules of this package (imported in a function:
    they import this module): SD3 and FLUX (:mod:`pccfast.diffusion.dit_adapters`)."""
    import pccfast.diffusion.dit_adapters  # noqa: F401


def check_family_size(family: str, height: int, width: int) -> None:
    """The size rule of ``family`` (a registered adapter's ``family``) before its model loads:
    ValueError unless ``height`` and ``width`` are multiples of its ``size_multiple`` (SD 8,
    SDXL 16); no check for a family that states none (the loaded adapter checks its own)."""
    _load_families()
    for cls in _ADAPTERS:
        if cls.family == family and cls.size_multiple:
            f = cls.size_multiple
            if height % f or width % f or height < f or width < f:
                raise ValueError(f"`height` and `width` have to be positive multiples of {f} for a {family} model "
                                 f"but are {height} and {width}")
            return


def supported_families() -> str:
    """'sd (StableDiffusionPipeline: Stable Diffusion 1.x/2.x, SD-Turbo), ...' for messages."""
    _load_families()
    return ", ".join(f"{a.family} ({' or '.join(a.pipeline_classes)}: {a.description})" for a in reversed(_ADAPTERS))


def _unsupported(class_name: str) -> UnsupportedPipelineError:
    return UnsupportedPipelineError(
        f"pipeline class {class_name} is not supported; supported families: {supported_families()}"
    )


def adapter_class(class_name: str, *, strict: bool = True) -> Optional[type]:
    """The adapter class of a pipeline class name (``model_index.json``'s ``_class_name``).

    Raises ``UnsupportedPipelineError`` for an unknown name (or returns None if not ``strict``).
    """
    _load_families()
    for cls in _ADAPTERS:
        if class_name in cls.pipeline_classes:
            return cls
    if strict:
        raise _unsupported(class_name)
    return None


def adapter_for(pipe) -> ModelAdapter:
    """The adapter of a loaded pipeline, chosen from its class (or the nearest base class that a
    family names, so a subclass of ``StableDiffusionPipeline`` is handled as one)."""
    if isinstance(pipe, ModelAdapter):
        return pipe
    for klass in type(pipe).__mro__:
        cls = adapter_class(klass.__name__, strict=False)
        if cls is not None:
            return cls(pipe)
    raise _unsupported(type(pipe).__name__)

