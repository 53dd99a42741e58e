"""Label sets: class names, the text each class is scored with, palette, ignore index.

Built-in sets are ``voc`` (21 classes, the VOC palette) and ``coco`` (background + the 80
COCO thing classes); a custom set is a dict in the label-set file format (files are read by
:mod:`pccfast.data.labelsets`)::

    {"name": "mine", "classes": ["background", "red apple", "pear"],
     "texts": {"red apple": "apple"}, "palette": [[0, 0, 0], [200, 0, 0], [0, 200, 0]],
     "ignore_index": 255}

``classes[0]`` must be ``background`` (it takes the start token's map).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

__all__ = ["LabelSet", "VOC_CLASSES", "COCO_CLASSES", "BUILTIN", "voc_palette", "as_label_set", "label_set_from_dict"]

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
# The reference renames these before encoding the class text (section 1).
VOC_TEXTS = {"diningtable": "table", "tvmonitor": "monitor", "pottedplant": "pot plant", "aeroplane": "airplane"}

COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv",
    "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


def voc_palette(n: int = 256) -> list[tuple[int, int, int]]:
    """The standard VOC colour map: entry i from the bits of i (r, g, b take bits 0, 1, 2 of
    each 3-bit group, shifted into bits 7, 6, ...)."""
    pal = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal.append((r, g, b))
    return pal


@dataclass(frozen=True)
class LabelSet:
    """A label set: ``classes[i]`` is label i; ``texts[i]`` is what the class is scored with."""

    name: str
    classes: tuple[str, ...]  # class names, index = label value; classes[0] == "background"
    texts: tuple[str, ...]  # text per class used in the OVAM class text (may hold several words)
    palette: tuple[tuple[int, int, int], ...]  # 256 RGB entries (index 255 = ignore colour)
    ignore_index: int = 255  # label of uncertain pixels
    synonyms: dict = field(default_factory=dict, compare=False, hash=False)  # extra words per class

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, name: str) -> int:
        """Label value of a class name (case-insensitive); ValueError naming the set otherwise."""
        key = name.strip().lower()
        for i, c in enumerate(self.classes):
            if c.lower() == key:
                return i
        raise ValueError(f"class {name!r} is not in label set {self.name!r} (classes: {', '.join(self.classes[1:])})")

    def text_of(self, name: str) -> str:
        return self.texts[self.index(name)]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "classes": list(self.classes),
            "texts": {c: t for c, t in zip(self.classes, self.texts) if c != t},
            "palette": [list(p) for p in self.palette[: len(self.classes)]],
            "ignore_index": self.ignore_index,
            **({"synonyms": dict(self.synonyms)} if self.synonyms else {}),
        }

    def flat_palette(self) -> list[int]:
        """768 ints for PIL's ``putpalette``."""
        return [v for rgb in self.palette for v in rgb]


def _full_palette(given: list | None, n_classes: int, ignore_index: int) -> tuple[tuple[int, int, int], ...]:
    pal = list(voc_palette(256))
    if given is not None:
        for i, rgb in enumerate(given):
            pal[i] = tuple(int(v) for v in rgb)
    pal[ignore_index] = (224, 224, 192)
    return tuple(pal)


def _voc() -> LabelSet:
    texts = tuple(VOC_TEXTS.get(c, c) for c in VOC_CLASSES)
    return LabelSet("voc", VOC_CLASSES, texts, _full_palette(None, 21, 255))


def _coco() -> LabelSet:
    return LabelSet("coco", COCO_CLASSES, COCO_CLASSES, _full_palette(None, 81, 255))


BUILTIN = {"voc": _voc, "coco": _coco}


def as_label_set(value: "str | LabelSet | dict") -> LabelSet:
    """A built-in set by name (``voc``, ``coco``), a dict in the label-set file format, or a
    LabelSet as it is. Label-set *files* are read at the edge: :func:`pccfast.data.labelsets.get_label_set`."""
    if isinstance(value, LabelSet):
        return value
    if isinstance(value, dict):
        return label_set_from_dict(value, "label set")
    if not isinstance(value, str):
        raise TypeError(f"`label_set` has to be a name, a path or a LabelSet but is {type(value).__name__}")
    if value.lower() in BUILTIN:
        return BUILTIN[value.lower()]()
    raise ValueError(
        f"`label_set` has to be one of {', '.join(BUILTIN)}, a dict or a LabelSet but is {value!r} "
        "(label-set files are read by pccfast.get_label_set)"
    )


def label_set_from_dict(data, where: str) -> LabelSet:
    if not isinstance(data, dict) or "classes" not in data:
        raise ValueError(f"{where}: a label set has to be an object with a 'classes' list")
    classes = data["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) and c.strip() for c in classes):
        raise ValueError(f"{where}: 'classes' has to be a list of non-empty strings")
    classes = [c.strip() for c in classes]
    if not classes or classes[0].lower() != "background":
        raise ValueError(f"{where}: 'classes' has to start with 'background' but starts with {classes[:1]}")
    seen = set()
    for c in classes:
        if c.lower() in seen:
            raise ValueError(f"{where}: class {c!r} is listed twice")
        seen.add(c.lower())
    ignore = data.get("ignore_index", 255)
    if not isinstance(ignore, int) or not 0 <= ignore <= 255:
        raise ValueError(f"{where}: 'ignore_index' has to be an int in [0, 255] but is {ignore!r}")
    if len(classes) > 255 or ignore < len(classes):
        raise ValueError(
            f"{where}: a label set holds at most 255 classes below its ignore index {ignore} but has {len(classes)}"
        )
    texts_in = data.get("texts", {}) or {}
    if not isinstance(texts_in, dict):
        raise ValueError(f"{where}: 'texts' has to map class names to strings")
    for k, v in texts_in.items():
        if k not in classes:
            raise ValueError(f"{where}: 'texts' names {k!r}, which is not in 'classes'")
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"{where}: the text of {k!r} has to be a non-empty string but is {v!r}")
    palette = data.get("palette")
    if palette is not None:
        if not isinstance(palette, list) or len(palette) != len(classes):
            got = len(palette) if isinstance(palette, list) else type(palette).__name__
            raise ValueError(f"{where}: 'palette' has to hold one [r, g, b] per class ({len(classes)}) but holds {got}")
        for i, rgb in enumerate(palette):
            if (not isinstance(rgb, (list, tuple)) or len(rgb) != 3
                    or not all(isinstance(v, int) and 0 <= v <= 255 for v in rgb)):
                raise ValueError(f"{where}: palette entry {i} ({classes[i]!r}) has to be [r, g, b] ints in 0..255 but is {rgb!r}")
    synonyms = data.get("synonyms", {}) or {}
    if not isinstance(synonyms, dict):
        raise ValueError(f"{where}: 'synonyms' has to map class names to words but is {type(synonyms).__name__}")
    for k, v in synonyms.items():
        if str(k).lower() not in seen:
            raise ValueError(f"{where}: 'synonyms' names {k!r}, which is not in 'classes'")
        words = [v] if isinstance(v, str) else v
        if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
            raise ValueError(f"{where}: the synonyms of {k!r} have to be a string or a list of non-empty strings but are {v!r}")
    name = str(data.get("name") or os.path.splitext(os.path.basename(where))[0] or "custom")
    texts = tuple(texts_in.get(c, c) for c in classes)
    return LabelSet(name, tuple(classes), texts, _full_palette(palette, len(classes), ignore), ignore, dict(synonyms))
