"""Look at a generated dataset: a contact sheet (PNG) or an HTML page, stats and suspicious images.

``python -m pccfast.inspect DATASET [--out sheet.png|page.html] [--limit N]`` (the command is
:mod:`pccfast.cli.inspect`) reads a dataset in any layout: the VOC layout written by
``generate`` (``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``, optional
``SegmentationClassBlocky/<id>.png``, ``manifest.jsonl``, ``labelset.json``) file by file, and
WebDataset tars or Parquet files through :mod:`pccfast.data.readers` (their committed samples,
a batch at a time: see :mod:`pccfast.tools.packed`), and

- prints stats over all masks: each class's share of the mask pixels and of the images, the
  uncertain (255) share per image (distribution and the most uncertain images), missing files;
- lists suspicious images: a prompt class (from the manifest) absent from the mask, more than
  ``--uncertain-max`` (90%) uncertain, all background (or no class pixel at all), labels
  outside the label set, a missing image or mask;
- draws the first ``--limit`` images (or only the suspicious ones) as rows
  image | blocky mask overlay (when the dataset has blocky masks) | refined mask overlay, with
  a legend of the classes shown (PNG), or writes an HTML page whose table refers to the
  dataset's own files by relative path (only files that exist; a tar or parquet sample's
  images are embedded in the page as ``data:`` URIs of their stored bytes).
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from dataclasses import dataclass, field
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from pccfast.data.fileio import atomic_write_bytes, load_mask, read_jsonl
from pccfast.data.labelsets import get_label_set
from pccfast.data.layout import BLOCKY, IMAGE_EXTS, IMAGES, LABELSET, MANIFEST, MASKS, MEMBERS
from pccfast.data.readers import committed_records
from pccfast.core.labelset import LabelSet
from pccfast.tools.packed import location, open_packed, read_packed, stored_label_set

__all__ = [
    "Sample",
    "ImageStats",
    "DatasetStats",
    "find_samples",
    "sample_files",
    "image_stats",
    "suspicious_reasons",
    "dataset_stats",
    "overlay",
    "contact_sheet",
    "ContactSheet",
    "save_sheet",
    "write_html",
    "dataset_label_set",
]

_IMAGE_EXTS = IMAGE_EXTS


@dataclass
class Sample:
    """The files and manifest record of one image id (paths are None where the file is absent).

    A tar or parquet sample has its ``source`` and ``locator`` (:mod:`pccfast.data.readers`),
    and ``image``, ``mask`` and ``blocky`` say where it is stored
    (:func:`~pccfast.tools.packed.location`); a parquet sample's ``blocky`` is known once it is
    read, and so are the prompt and classes of a sample that no manifest records
    (``record_known`` False): they come from its stored record then."""

    id: str
    image: str | None
    mask: str | None
    blocky: str | None
    prompt: str = ""
    classes: tuple[str, ...] = ()  # prompt classes from the manifest
    source: object = field(default=None, repr=False, compare=False)  # readers.Source of a tar/parquet sample
    locator: object = field(default=None, repr=False, compare=False)  # readers.Locator of a tar/parquet sample
    record_known: bool = True  # False: a tar/parquet sample whose prompt and classes are read with its files


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _stems(d: str, exts) -> dict[str, str]:
    if not os.path.isdir(d):
        return {}
    out = {}
    for n in sorted(os.listdir(d)):
        stem, ext = os.path.splitext(n)
        if ext.lower() in exts and not n.startswith("."):
            out.setdefault(stem, os.path.join(d, n))
    return out


def _classes(record: dict) -> tuple[str, ...]:
    cls = record.get("classes") or ()
    return tuple(str(c) for c in cls) if isinstance(cls, list) else ()


def _packed_samples(source) -> list[Sample]:
    records = committed_records(source.path) or {}
    out = []
    for it in source.items:
        r = records.get(it.id)
        if source.layout == "webdataset":
            exts = {ext for ext, _, _ in it.where[1]}
            blocky = location(source, it, MEMBERS["blocky"]) if MEMBERS["blocky"] in exts else None
        else:
            blocky = None  # known once read
        out.append(Sample(it.id, location(source, it, MEMBERS["image"]), location(source, it, MEMBERS["mask"]), blocky,
                          str((r or {}).get("prompt", "")), _classes(r or {}), source=source, locator=it,
                          record_known=r is not None))
    return out


def find_samples(root: str) -> list[Sample]:
    """Every id of the dataset. VOC layout: manifest order first, then ids that only have files
    (natural order); WebDataset tars and Parquet files: their committed samples in file order."""
    source = open_packed(root)
    if source is not None:
        return _packed_samples(source)
    if not os.path.isdir(root):
        raise ValueError(f"{root}: not a folder")
    images = _stems(os.path.join(root, IMAGES), _IMAGE_EXTS)
    masks = _stems(os.path.join(root, MASKS), (".png",))
    blocky = _stems(os.path.join(root, BLOCKY), (".png",))
    records = {}
    for r in read_jsonl(os.path.join(root, MANIFEST)):
        if isinstance(r, dict) and "id" in r:
            records.setdefault(str(r["id"]), r)
    ids = list(records) + sorted((set(images) | set(masks)) - set(records), key=_natural)
    if not ids:
        raise ValueError(f"{root}: no {IMAGES}/, {MASKS}/ or manifest.jsonl entries found (not a dataset folder?)")
    out = []
    for i in ids:
        r = records.get(i, {})
        out.append(Sample(i, images.get(i), masks.get(i), blocky.get(i), str(r.get("prompt", "")), _classes(r)))
    return out


def sample_files(samples: list[Sample], kinds=("image", "mask", "blocky")):
    """Yield ``(sample, files)`` for each of ``samples`` in order: ``files`` maps each of ``kinds``
    the sample has to what ``PIL.Image.open`` and ``load_mask`` take: its path (VOC files) or a
    ``BytesIO`` of its stored bytes (tar and parquet samples, read a batch at a time)."""
    i = 0
    while i < len(samples):
        source = samples[i].source
        if source is None:
            s = samples[i]
            yield s, {k: getattr(s, k) for k in kinds if getattr(s, k)}
            i += 1
            continue
        j = i + 1
        while j < len(samples) and samples[j].source is source:
            j += 1
        run = samples[i:j]
        for s, enc in zip(run, read_packed(source, [x.locator for x in run], kinds=tuple(kinds))):
            if source.layout == "parquet" and "blocky" in kinds:
                s.blocky = location(source, s.locator, MEMBERS["blocky"]) if "blocky" in enc.files else None
            if not s.record_known:
                s.prompt, s.classes, s.record_known = str(enc.record.get("prompt", "")), _classes(enc.record), True
            yield s, {k: io.BytesIO(enc.files[k]) for k in kinds if k in enc.files}
        i = j


# ------------------------------------------------------------------------------------------
# stats
# ------------------------------------------------------------------------------------------
@dataclass
class ImageStats:
    """Label counts of one refined mask and why it looks wrong (if it does)."""

    id: str
    counts: np.ndarray | None  # (256,) pixels per label value; None without a mask
    uncertain: float  # share of ignore-index pixels (NaN without a mask)
    reasons: list = field(default_factory=list)  # empty = not suspicious


def suspicious_reasons(counts: np.ndarray, label_set: LabelSet, prompt_classes=(), uncertain_max: float = 0.9) -> list[str]:
    """Why a mask looks wrong. ``counts``: (256,) pixels per label value."""
    c, ignore = label_set.num_classes, label_set.ignore_index
    total = int(counts.sum())
    reasons = []
    objects = int(counts[1:c].sum())
    if total and counts[0] == total:
        reasons.append("all background")
    elif objects == 0:
        reasons.append("no class pixels (background and uncertain only)")
    unc = counts[ignore] / total if total else 0.0
    if unc > uncertain_max:
        reasons.append(f"{100 * unc:.0f}% uncertain")
    outside = [v for v in np.flatnonzero(counts) if v >= c and v != ignore]
    if outside:
        reasons.append(f"labels outside the label set: {[int(v) for v in outside[:5]]}")
    lookup = {n.lower(): i for i, n in enumerate(label_set.classes)}
    for name in dict.fromkeys(prompt_classes):
        i = lookup.get(name.lower())
        if i is None:
            reasons.append(f"prompt class {name!r} is not in label set {label_set.name!r}")
        elif counts[i] == 0:
            reasons.append(f"prompt class {name!r} absent from the mask")
    return reasons


def image_stats(sample: Sample, label_set: LabelSet, uncertain_max: float = 0.9, files: dict | None = None) -> ImageStats:
    """The label counts and reasons of one sample; ``files``: its :func:`sample_files` entry
    (default: read here)."""
    if files is None:
        _, files = next(sample_files([sample], ("mask",)))
    if "mask" not in files:
        return ImageStats(sample.id, None, math.nan, ["no mask file"] + ([] if sample.image else ["no image file"]))
    mask = load_mask(files["mask"])
    counts = np.bincount(mask.ravel(), minlength=256)  # (256,)
    reasons = suspicious_reasons(counts, label_set, sample.classes, uncertain_max)
    if sample.image is None:
        reasons.insert(0, "no image file")
    return ImageStats(sample.id, counts, float(counts[label_set.ignore_index] / max(mask.size, 1)), reasons)


@dataclass
class DatasetStats:
    """Stats over all masks of a dataset."""

    label_set: LabelSet
    images: list  # ImageStats per sample, in sample order
    class_share: np.ndarray  # (C,) share of all mask pixels per class
    image_share: np.ndarray  # (C,) share of masks containing the class
    uncertain_share: float  # share of all mask pixels that are uncertain

    @property
    def suspicious(self) -> list:
        return [s for s in self.images if s.reasons]

    def summary(self, root: str = "", top: int = 10) -> str:
        ls = self.label_set
        with_mask = [s for s in self.images if s.counts is not None]
        lines = [f"dataset {root}: label set {ls.name}, {len(self.images)} ids, {len(with_mask)} masks"]
        if with_mask:
            lines.append("class share of all mask pixels (share of masks containing it):")
            width = max(len(c) for c in ls.classes)
            for i, c in enumerate(ls.classes):
                lines.append(f"  {c:<{width}} {100 * self.class_share[i]:6.2f}%  ({100 * self.image_share[i]:5.1f}%)")
            lines.append(f"  {'uncertain':<{width}} {100 * self.uncertain_share:6.2f}%")
            unc = np.array([s.uncertain for s in with_mask])
            q = np.percentile(unc, [0, 25, 50, 75, 100]) * 100
            lines.append("uncertain share per image: min {:.1f}%, 25% {:.1f}%, median {:.1f}%, 75% {:.1f}%, max {:.1f}%"
                         .format(*q))
            worst = sorted(with_mask, key=lambda s: -s.uncertain)[:top]
            lines.append("most uncertain: " + ", ".join(f"{s.id} {100 * s.uncertain:.1f}%" for s in worst))
        sus = self.suspicious
        lines.append(f"suspicious images: {len(sus)}")
        lines += [f"  {s.id}: {'; '.join(s.reasons)}" for s in sus]
        return "\n".join(lines)

    def to_json(self) -> dict:
        ls = self.label_set
        return {
            "label_set": ls.name,
            "class_share": {c: float(v) for c, v in zip(ls.classes, self.class_share)},
            "image_share": {c: float(v) for c, v in zip(ls.classes, self.image_share)},
            "uncertain_share": float(self.uncertain_share),
            "images": [{"id": s.id, "uncertain": None if math.isnan(s.uncertain) else s.uncertain,
                        "reasons": s.reasons} for s in self.images],
        }


def dataset_stats(samples: list[Sample], label_set: LabelSet, uncertain_max: float = 0.9) -> DatasetStats:
    """Decode every mask once and gather :class:`DatasetStats`."""
    c = label_set.num_classes
    per = [image_stats(s, label_set, uncertain_max, f) for s, f in sample_files(samples, ("mask",))]
    counts = [s.counts for s in per if s.counts is not None]
    if counts:
        stack = np.stack(counts)  # (N, 256)
        total = stack.sum()
        class_share = stack[:, :c].sum(0) / total
        image_share = (stack[:, :c] > 0).mean(0)
        uncertain = float(stack[:, label_set.ignore_index].sum() / total)
    else:
        class_share, image_share, uncertain = np.zeros(c), np.zeros(c), math.nan
    return DatasetStats(label_set, per, class_share, image_share, uncertain)


# ------------------------------------------------------------------------------------------
# contact sheet
# ------------------------------------------------------------------------------------------
def overlay(image: np.ndarray, mask: np.ndarray, palette, alpha: float = 0.55) -> np.ndarray:
    """Tint the mask's non-background labels over the image.

    Args: image (H, W, 3) uint8; mask (h, w) uint8 labels (resized nearest to H x W);
        palette: 256 RGB triples. Label 0 stays untinted. Returns (H, W, 3) uint8.
    """
    h, w = image.shape[:2]
    if mask.shape != (h, w):
        # display resampling, deliberately PIL and not pccfast.core.resize: PIL's NEAREST samples
        # pixel centres as the PIL thumbnail does, and neither torch/kornia "nearest" nor
        # "nearest-exact" reproduces it (at 512 -> 160, 95% and 25% of the pixels differ)
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    colours = np.asarray(palette, dtype=np.float32)[mask]  # (H, W, 3)
    tint = (mask != 0)[..., None]  # (H, W, 1)
    out = np.where(tint, (1 - alpha) * image.astype(np.float32) + alpha * colours, image.astype(np.float32))
    return out.round().clip(0, 255).astype(np.uint8)


@dataclass
class ContactSheet:
    image: Image.Image
    legend_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the legend
    ids: list  # ids of the rows, top to bottom


def _font():
    return ImageFont.load_default()


def _fit(draw, text: str, font, width: float) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _thumb(path, size: int) -> Image.Image | None:
    """The image (a path or a file object) scaled to fit a size x size box."""
    if path is None:
        return None
    with Image.open(path) as im:
        im = im.convert("RGB")
    scale = size / max(im.size)
    # PIL, not pccfast.core.resize: PIL's BILINEAR antialiases when shrinking, kornia's bilinear
    # does not (and its antialias option is a Gaussian blur), so the thumbnails would change
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)


def contact_sheet(samples: list[Sample], label_set: LabelSet, *, size: int = 160, stats: dict | None = None,
                  blocky: bool | None = None, title: str = "") -> ContactSheet:
    """Rows image | blocky overlay (if ``blocky``) | refined overlay, a caption above each row,
    a legend of the classes shown at the bottom. ``stats``: id -> ImageStats (for captions)."""
    files = [f for _, f in sample_files(samples)]
    blocky = any("blocky" in f for f in files) if blocky is None else blocky
    heads = ["image"] + (["blocky mask"] if blocky else []) + ["refined mask"]
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = int(max(12, probe.textbbox((0, 0), "Ag|", font=font)[3] + 4))
    pad = 4
    width = pad + len(heads) * (size + pad)
    row_h = line + size + pad
    top = pad + 2 * line  # title + column heads
    present: set[int] = set()
    cells = []
    for f in files:
        img = _thumb(f.get("image"), size)
        row = [img]
        for path in ([f.get("blocky")] if blocky else []) + [f.get("mask")]:
            m = None
            if path is not None:
                m = load_mask(path)
                present.update(int(v) for v in np.unique(m))
            row.append(m)
        cells.append(row)
    labels = [v for v in sorted(present) if 0 < v < label_set.num_classes]
    if label_set.ignore_index in present:
        labels.append(label_set.ignore_index)
    names = {v: (label_set.classes[v] if v < label_set.num_classes else "uncertain") for v in labels}
    # legend layout: swatch + name entries flowing left to right
    entries, x, y = [], pad, 0
    for v in labels:
        w = 14 + int(probe.textlength(names[v], font=font)) + 12
        if x + w > width - pad and x > pad:
            x, y = pad, y + line
        entries.append((v, x, y))
        x += w
    legend_h = line + (y + line if labels else line)
    legend_y0 = top + len(samples) * row_h + pad
    sheet = Image.new("RGB", (width, legend_y0 + legend_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, pad), _fit(draw, title, font, width - 2 * pad), fill="black", font=font)
    for j, h in enumerate(heads):
        draw.text((pad + j * (size + pad), pad + line), h, fill=(90, 90, 90), font=font)
    for r, (s, row) in enumerate(zip(samples, cells)):
        y0 = top + r * row_h
        st = (stats or {}).get(s.id)
        cap = s.id
        if st is not None and not math.isnan(st.uncertain):
            cap += f"  {100 * st.uncertain:.0f}% unc."
        if st is not None and st.reasons:
            cap += "  !! " + "; ".join(st.reasons)
        elif s.prompt:
            cap += "  " + s.prompt
        draw.text((pad, y0), _fit(draw, cap, font, width - 2 * pad), fill=(170, 0, 0) if st and st.reasons else "black",
                  font=font)
        img = row[0]
        for j, cell in enumerate(row):
            x0, yc = pad + j * (size + pad), y0 + line
            if j == 0:
                tile = img
            elif cell is None:
                tile = None
            elif img is not None:
                tile = Image.fromarray(overlay(np.asarray(img), cell, label_set.palette))
            else:  # no image: the mask's colours alone
                tile = Image.fromarray(np.asarray(label_set.palette, np.uint8)[cell]).resize(
                    (size, size), Image.NEAREST)
            if tile is None:
                draw.rectangle([x0, yc, x0 + size - 1, yc + size - 1], fill=(200, 200, 200))
                draw.text((x0 + 4, yc + 4), "no file", fill="black", font=font)
            else:
                sheet.paste(tile, (x0, yc))
    draw.text((pad, legend_y0), "legend (tinted over the image; background untinted):", fill="black", font=font)
    for v, ex, ey in entries:
        yy = legend_y0 + line + ey
        draw.rectangle([ex, yy, ex + 11, yy + 11], fill=tuple(label_set.palette[v]))
        draw.text((ex + 14, yy), names[v], fill="black", font=font)
    box = (0, legend_y0, width, sheet.height)
    return ContactSheet(sheet, box, [s.id for s in samples])


def save_sheet(sheet: ContactSheet, path: str) -> None:
    """PNG with the legend box in a text chunk ``legend_box`` = "x0,y0,x1,y1"."""
    import io

    info = PngInfo()
    info.add_text("legend_box", ",".join(str(v) for v in sheet.legend_box))
    buf = io.BytesIO()
    sheet.image.save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------
def _href(path: str, base: str) -> str:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
    return quote(rel.replace(os.sep, "/"))


def _src(f, base: str) -> str:
    """An HTML ``src``: a file's path relative to the page, or the stored bytes as a data URI."""
    if isinstance(f, str):
        return _href(f, base)
    data = f.getvalue()
    kind = "png" if data.startswith(b"\x89PNG") else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _rgb(c) -> str:
    return "#%02x%02x%02x" % tuple(c)


def write_html(path: str, samples: list[Sample], stats: DatasetStats, *, size: int = 192, title: str = "") -> None:
    """An HTML page: stats, legend, suspicious list and a table of the samples whose images and
    masks are the dataset's own files, referred to relative to the page (only files that exist)."""
    ls = stats.label_set
    base = os.path.dirname(os.path.abspath(path))
    by_id = {s.id: s for s in stats.images}
    shown = {s.id for s in samples}
    e = html.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>body{{font-family:sans-serif;font-size:13px}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px;vertical-align:top}"
        ".ov{position:relative;display:inline-block}.ov img.m{position:absolute;left:0;top:0;opacity:.55;"
        "width:100%;height:100%;image-rendering:pixelated}.sw{display:inline-block;width:12px;height:12px;border:1px solid #000;"
        "margin:0 4px 0 10px;vertical-align:middle}.bad{color:#a00}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<pre>{e(stats.summary())}</pre>",
        "<h2>Legend</h2><p>" + "".join(
            f"<span class='sw' style='background:{_rgb(ls.palette[i])}'></span>{e(c)}" for i, c in enumerate(ls.classes))
        + f"<span class='sw' style='background:{_rgb(ls.palette[ls.ignore_index])}'></span>uncertain</p>",
        "<h2>Class share</h2><table><tr><th>class</th><th>pixels</th><th>masks</th></tr>",
    ]
    for i, c in enumerate(ls.classes):
        out.append(f"<tr><td><span class='sw' style='background:{_rgb(ls.palette[i])}'></span>{e(c)}</td>"
                   f"<td>{100 * stats.class_share[i]:.2f}%</td><td>{100 * stats.image_share[i]:.1f}%</td></tr>")
    out.append("</table>")
    sus = stats.suspicious
    out.append(f"<h2>Suspicious images ({len(sus)})</h2><ul>")
    for s in sus:
        name = f"<a href='#{quote(s.id)}'>{e(s.id)}</a>" if s.id in shown else e(s.id)
        out.append(f"<li>{name}: {e('; '.join(s.reasons))}</li>")
    out.append("</ul>")
    files = [f for _, f in sample_files(samples)]
    has_blocky = any("blocky" in f for f in files)
    out.append("<h2>Images</h2><table><tr><th>id</th><th>prompt / classes</th><th>uncertain</th><th>image</th>"
               + ("<th>blocky mask</th>" if has_blocky else "") + "<th>refined mask</th></tr>")
    for s, f in zip(samples, files):
        st = by_id.get(s.id)
        image = f.get("image")
        if image is None:
            img = "no image"
        elif isinstance(image, str):
            img = f"<a href='{_src(image, base)}'><img src='{_src(image, base)}' width='{size}'></a>"
        else:  # stored bytes: no link (browsers do not open data URIs as pages)
            img = f"<img src='{_src(image, base)}' width='{size}'>"

        def masked(p):
            if p is None:
                return "<td>no file</td>"
            m = f"<img class='m' src='{_src(p, base)}'>"
            if image is None:
                return f"<td><img src='{_src(p, base)}' width='{size}'></td>"
            return f"<td><div class='ov'><img src='{_src(image, base)}' width='{size}'>{m}</div></td>"

        unc = "-" if st is None or math.isnan(st.uncertain) else f"{100 * st.uncertain:.1f}%"
        reasons = f"<div class='bad'>{e('; '.join(st.reasons))}</div>" if st and st.reasons else ""
        out.append(f"<tr id='{e(s.id)}'><td>{e(s.id)}</td><td>{e(s.prompt)}<br><i>{e(', '.join(s.classes))}</i>"
                   f"{reasons}</td><td>{unc}</td><td>{img}</td>" + (masked(f.get("blocky")) if has_blocky else "")
                   + masked(f.get("mask")) + "</tr>")
    out.append("</table></body></html>\n")
    atomic_write_bytes(path, "\n".join(out).encode("utf-8"))


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------


def dataset_label_set(dataset: str, name: str | None = None) -> LabelSet:
    """``name`` (a label set name or file), else the dataset's own labelset.json, else the one
    its parquet files record, else voc."""
    own = os.path.join(dataset, LABELSET)
    return get_label_set(name or (own if os.path.isfile(own) else stored_label_set(dataset) or "voc"))
