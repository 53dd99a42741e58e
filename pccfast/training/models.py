"""DeepLabv3 segmenters: torchvision's where torchvision imports, else a compact built-in copy.

The built-in models have torchvision's module tree, so their ``state_dict`` keys and shapes
are torchvision's (``backbone.conv1.weight``, ``backbone.layer1.0.conv1.weight``,
``classifier.0.convs.0.0.weight``, ``aux_classifier.0.weight``, ...; for the MobileNetV3
backbone ``backbone.0.0.weight`` ... ``backbone.16.0.weight``), and torchvision's ImageNet
backbone files and DeepLabv3 checkpoints load into them by path (:func:`load_weights`).

- ``deeplabv3_resnet50`` / ``deeplabv3_resnet101``: ResNet with the strides of layer3 and
  layer4 replaced by dilation 2 and 4 (output stride 8), ASPP head (rates 12, 24, 36) on
  layer4 (2048 channels), FCN auxiliary head on layer3 (1024 channels).
- ``deeplabv3_mobilenet_v3_large``: MobileNetV3-Large with the last stage dilated (output
  stride 16), ASPP head on the last 1x1 conv (960 channels), auxiliary head on the stride-8
  stage (40 channels).

Every model maps ``x: (B, 3, H, W)`` (ImageNet-normalised) to ``{"out": (B, C, H, W),
"aux": (B, C, H, W)}`` logits, as torchvision's do.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARCHS", "DeepLabV3", "build_model", "builtin_model", "torchvision_model", "load_weights", "ModelInfo",
           "backbone_keys"]

ARCHS = ("deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large")


# ---- heads (torchvision's DeepLabHead, ASPP and FCNHead module trees) -------------------------------------------


def _conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=(k // 2) * dilation, dilation=dilation, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU()]


class _ASPPPooling(nn.Sequential):
    """Image-level branch: global average, 1x1 conv, BN, ReLU, broadcast back to (h, w)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return F.interpolate(super().forward(x), size=size, mode="bilinear", align_corners=False)


class _ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, one 3x3 branch per rate, the pooling branch,
    concatenated and projected to ``cout`` channels (with dropout 0.5)."""

    def __init__(self, cin: int, rates: tuple[int, ...] = (12, 24, 36), cout: int = 256):
        super().__init__()
        branches = [nn.Sequential(*_conv_bn_relu(cin, cout, 1))]
        branches += [nn.Sequential(*_conv_bn_relu(cin, cout, 3, r)) for r in rates]
        branches.append(_ASPPPooling(cin, cout))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(*_conv_bn_relu(len(branches) * cout, cout, 1), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.convs], dim=1))  # (B, 5 * 256, h, w) -> (B, 256, h, w)


def _deeplab_head(cin: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(_ASPP(cin), *_conv_bn_relu(256, 256, 3), nn.Conv2d(256, num_classes, 1))


def _fcn_head(cin: int, num_classes: int) -> nn.Sequential:
    mid = cin // 4
    return nn.Sequential(*_conv_bn_relu(cin, mid, 3), nn.Dropout(0.1), nn.Conv2d(mid, num_classes, 1))


# ---- ResNet backbone (torchvision's Bottleneck / ResNet module names) --------------------------------------------


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class _ResNetBackbone(nn.Module):
    """Stem and layer1..4 of a ResNet; layer3 and layer4 dilated instead of strided (output stride 8).
    ``forward(x: (B, 3, H, W))`` -> ``{"out": (B, 2048, H/8, W/8), "aux": (B, 1024, H/8, W/8)}``."""

    def __init__(self, blocks: tuple[int, int, int, int]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._cin, self._dilation = 64, 1
        self.layer1 = self._layer(64, blocks[0], 1, False)
        self.layer2 = self._layer(128, blocks[1], 2, False)
        self.layer3 = self._layer(256, blocks[2], 2, True)
        self.layer4 = self._layer(512, blocks[3], 2, True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _layer(self, planes: int, n: int, stride: int, dilate: bool) -> nn.Sequential:
        first_dilation = self._dilation
        if dilate:  # the stride becomes dilation from the second block on (torchvision's rule)
            self._dilation *= stride
            stride = 1
        down = None
        if stride != 1 or self._cin != planes * 4:
            down = nn.Sequential(nn.Conv2d(self._cin, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4))
        layers = [_Bottleneck(self._cin, planes, stride, first_dilation, down)]
        self._cin = planes * 4
        layers += [_Bottleneck(self._cin, planes, 1, self._dilation) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        x = self.layer2(self.layer1(x))  # (B, 512, H/8, W/8)
        aux = self.layer3(x)  # (B, 1024, H/8, W/8)
        return {"out": self.layer4(aux), "aux": aux}  # out: (B, 2048, H/8, W/8)


# ---- MobileNetV3-Large backbone (torchvision's ``features`` indices) ---------------------------------------------


def _divisible(v: float, d: int = 8) -> int:
    """Round a channel count to a multiple of ``d``, never more than 10% down (torchvision's rule)."""
    out = max(d, int(v + d / 2) // d * d)
    return out + d if out < 0.9 * v else out


def _conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, dilation: int = 1,
                 act: type[nn.Module] | None = nn.Hardswish) -> nn.Sequential:
    bn = nn.BatchNorm2d(cout, eps=0.001, momentum=0.01)
    conv = nn.Conv2d(cin, cout, k, stride, (k - 1) // 2 * dilation, dilation=dilation, groups=groups, bias=False)
    return nn.Sequential(conv, bn, *([act(inplace=True)] if act is not None else []))


class _SqueezeExcitation(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        squeeze = _divisible(channels // 4)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))  # (B, C, 1, 1)
        return x * s


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, k: int, mid: int, cout: int, se: bool, hs: bool, stride: int, dilation: int):
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        layers: list[nn.Module] = []
        if mid != cin:
            layers.append(_conv_bn_act(cin, mid, 1, act=act))
        layers.append(_conv_bn_act(mid, mid, k, 1 if dilation > 1 else stride, groups=mid, dilation=dilation, act=act))
        if se:
            layers.append(_SqueezeExcitation(mid))
        layers.append(_conv_bn_act(mid, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + x if self.residual else y


# (input, kernel, expanded, output, squeeze-excite, hardswish, stride, dilation): MobileNetV3-Large, dilated tail
_MOBILENET_V3_LARGE = [
    (16, 3, 16, 16, False, False, 1, 1), (16, 3, 64, 24, False, False, 2, 1), (24, 3, 72, 24, False, False, 1, 1),
    (24, 5, 72, 40, True, False, 2, 1), (40, 5, 120, 40, True, False, 1, 1), (40, 5, 120, 40, True, False, 1, 1),
    (40, 3, 240, 80, False, True, 2, 1), (80, 3, 200, 80, False, True, 1, 1), (80, 3, 184, 80, False, True, 1, 1),
    (80, 3, 184, 80, False, True, 1, 1), (80, 3, 480, 112, True, True, 1, 1), (112, 3, 672, 112, True, True, 1, 1),
    (112, 5, 672, 160, True, True, 2, 2), (160, 5, 960, 160, True, True, 1, 2), (160, 5, 960, 160, True, True, 1, 2),
]
_MOBILENET_AUX = 4  # index of the stride-8 stage (40 channels), the auxiliary head's input


class _MobileNetV3Backbone(nn.Sequential):
    """``features[0..16]`` of MobileNetV3-Large. ``forward(x: (B, 3, H, W))`` ->
    ``{"out": (B, 960, H/16, W/16), "aux": (B, 40, H/8, W/8)}``."""

    def __init__(self):
        layers = [_conv_bn_act(3, 16, 3, stride=2)]
        layers += [_InvertedResidual(*cfg) for cfg in _MOBILENET_V3_LARGE]
        layers.append(_conv_bn_act(160, 960, 1))
        super().__init__(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        aux = None
        for i, layer in enumerate(self):
            x = layer(x)
            if i == _MOBILENET_AUX:
                aux = x
        return {"out": x, "aux": aux}


class DeepLabV3(nn.Module):
    """``backbone`` (-> ``{"out", "aux"}`` features), ``classifier`` (ASPP head) and
    ``aux_classifier`` (FCN head); logits upsampled (bilinear) to the input size."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module, aux_classifier: nn.Module | None):
        super().__init__()
        self.backbone, self.classifier, self.aux_classifier = backbone, classifier, aux_classifier

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        feats = self.backbone(x)
        out = {"out": F.interpolate(self.classifier(feats["out"]), size=size, mode="bilinear", align_corners=False)}
        if self.aux_classifier is not None:
            out["aux"] = F.interpolate(self.aux_classifier(feats["aux"]), size=size, mode="bilinear", align_corners=False)
        return out  # each (B, C, H, W)


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"`arch` has to be one of {', '.join(ARCHS)} but is {arch!r}")


def builtin_model(arch: str, num_classes: int, aux: bool = True) -> DeepLabV3:
    """The built-in DeepLabv3 ``arch`` with ``num_classes`` outputs, randomly initialised."""
    _check_arch(arch)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`num_classes` has to be an int of at least 2 but is {num_classes!r}")
    if arch == "deeplabv3_mobilenet_v3_large":
        backbone, cout, caux = _MobileNetV3Backbone(), 960, 40
    else:
        backbone = _ResNetBackbone((3, 4, 6, 3) if arch == "deeplabv3_resnet50" else (3, 4, 23, 3))
        cout, caux = 2048, 1024
    return DeepLabV3(backbone, _deeplab_head(cout, num_classes), _fcn_head(caux, num_classes) if aux else None)


def torchvision_model(arch: str, num_classes: int, aux: bool = True, imagenet_backbone: bool = False) -> nn.Module | None:
    """torchvision's DeepLabv3 ``arch``, or None where torchvision is not installed or does not
    import (e.g. a wheel built for another torch). ``imagenet_backbone`` downloads torchvision's
    ImageNet backbone weights (network needed)."""
    _check_arch(arch)
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        seg = importlib.import_module("torchvision.models.segmentation")
        models = importlib.import_module("torchvision.models")
    except Exception:  # noqa: BLE001 - a torchvision that cannot load (operator torchvision::nms does not exist)
        return None
    weights = None
    if imagenet_backbone:
        name = {"deeplabv3_resnet50": "ResNet50_Weights", "deeplabv3_resnet101": "ResNet101_Weights",
                "deeplabv3_mobilenet_v3_large": "MobileNet_V3_Large_Weights"}[arch]
        weights = getattr(models, name).IMAGENET1K_V1
    return getattr(seg, arch)(weights=None, weights_backbone=weights, num_classes=num_classes, aux_loss=aux)


@dataclass
class ModelInfo:
    """Which implementation was built and what was loaded into it (for the log)."""

    arch: str
    implementation: str  # "torchvision" or "built-in"
    weights: str  # where the backbone (or whole model) weights came from


def backbone_keys(state: dict) -> dict:
    """A weights file's tensors under the model's key names: DeepLabv3 checkpoints as they are;
    torchvision ImageNet classifiers (``features.*`` of MobileNetV3, ResNet's ``conv1.*`` ...)
    moved under ``backbone.``, their classifier layers (``fc.*``, ``classifier.*``) dropped."""
    if any(k.startswith("backbone.") for k in state):
        return dict(state)
    out = {}
    for k, v in state.items():
        if k.startswith("features."):
            out["backbone." + k[len("features."):]] = v
        elif not k.startswith(("fc.", "classifier.")):
            out["backbone." + k] = v
    return out


def load_weights(model: nn.Module, path: str) -> str:
    """Load a torchvision weights file (ImageNet backbone or DeepLabv3 checkpoint) or a pccfast
    training checkpoint into ``model`` by key name.

    Every backbone tensor of ``model`` has to be in the file with its shape (else ValueError
    naming the first missing or mismatched key); head tensors are loaded where names and shapes
    match (a checkpoint with another class count keeps this model's last layers). Returns a
    short description for the log."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"`--backbone-weights` {path!r}: no such file") from None
    except Exception as e:  # noqa: BLE001 - not a torch file, a pickle that weights_only refuses, ...
        raise ValueError(f"`--backbone-weights` {path!r} is not a readable torch weights file: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a pccfast checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"`--backbone-weights` {path!r} holds no state_dict (a dict of tensors)")
    state = backbone_keys(state)
    own = model.state_dict()
    take, skipped = {}, []
    for k, v in own.items():
        src = state.get(k)
        if src is not None and tuple(src.shape) == tuple(v.shape):
            take[k] = src
        elif k.startswith("backbone.") and not k.endswith("num_batches_tracked"):
            what = "is missing" if src is None else f"has shape {tuple(src.shape)}, not {tuple(v.shape)}"
            raise ValueError(f"`--backbone-weights` {path!r} does not fit this architecture: {k} {what}")
        elif src is not None:
            skipped.append(k)
    model.load_state_dict(take, strict=False)
    heads = sum(1 for k in take if not k.startswith("backbone."))
    note = f", {len(skipped)} head tensors of another shape kept" if skipped else ""
    return f"{path} ({len(take)} tensors: backbone{' and heads' if heads else ''}{note})"


def build_model(arch: str, num_classes: int, backbone_weights: str = "auto", *, aux: bool = True,
                implementation: str = "auto") -> tuple[nn.Module, ModelInfo]:
    """The segmenter and what it is.

    Args:
        arch: one of :data:`ARCHS`.
        num_classes: output classes (background included).
        backbone_weights: ``"auto"`` (torchvision's ImageNet download; needs torchvision and a
            network), ``"none"`` (from scratch) or the path of a weights file (:func:`load_weights`).
        implementation: ``"auto"`` (torchvision's when it imports, else the built-in one),
            ``"torchvision"`` or ``"builtin"``.
    Raises: ValueError (one line) when the weights cannot be had or do not fit.
    """
    if implementation not in ("auto", "torchvision", "builtin"):
        raise ValueError(f"`implementation` has to be auto, torchvision or builtin but is {implementation!r}")
    model = None
    if implementation != "builtin":
        model = torchvision_model(arch, num_classes, aux, imagenet_backbone=False)
        if model is None and implementation == "torchvision":
            raise ValueError("torchvision is not importable here: pip install torchvision (built for this torch)")
    impl = "torchvision" if model is not None else "built-in"
    if backbone_weights == "auto":
        if model is None:
            raise ValueError("no backbone weights: torchvision is not importable here, so its ImageNet weights cannot be "
                             "downloaded; pass --backbone-weights PATH (a torchvision ImageNet or DeepLabv3 .pth file) or "
                             "--backbone-weights none (from scratch: much worse)")
        try:
            model = torchvision_model(arch, num_classes, aux, imagenet_backbone=True)
        except Exception as e:  # noqa: BLE001 - no network, a proxy, a full cache folder
            raise ValueError(f"torchvision's ImageNet backbone weights could not be downloaded ({type(e).__name__}); pass "
                             "--backbone-weights PATH or --backbone-weights none (from scratch: much worse)") from None
        return model, ModelInfo(arch, impl, "torchvision ImageNet download")
    if model is None:
        model = builtin_model(arch, num_classes, aux)
    if backbone_weights in (None, "none"):
        return model, ModelInfo(arch, impl, "none (from scratch)")
    return model, ModelInfo(arch, impl, load_weights(model, backbone_weights))
