"""Training a segmenter on a (synthetic) dataset and scoring it on real images.

- :mod:`~pccfast.training.models`: DeepLabv3 (torchvision's, or the built-in copy with the same
  parameter names), weights loading;
- :mod:`~pccfast.training.recipe`: the recipe dataclass and its presets (syntagen, dd);
- :mod:`~pccfast.training.datasets`: image/mask pairs, augmentation by run position;
- :mod:`~pccfast.training.loop`: the run (DDP, AMP, EMA, checkpoints and resume, evaluation, log);
- :mod:`~pccfast.training.plot`: the PNG of loss and mIoU;
- :mod:`~pccfast.training.predict`: a checkpoint's masks for a folder of images (a run-engine step).
"""

__all__: list[str] = []
