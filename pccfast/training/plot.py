"""The run's PNG plot: training loss (left axis) and validation mIoU (right axis) over iterations,
drawn with PIL (no plotting library needed)."""
from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw

__all__ = ["plot_curves"]

_W, _H, _M = 900, 420, 60  # size and margin in pixels
_LOSS, _MIOU, _AXIS = (31, 119, 180), (214, 39, 40), (60, 60, 60)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def plot_curves(loss: list[tuple[int, float]], miou: list[tuple[int, float]], iters: int) -> bytes:
    """PNG bytes of the two curves. ``loss``/``miou``: (iteration, value) pairs; ``iters``: the
    x-axis' end. mIoU is drawn on a fixed 0-100 % scale, the loss from 0 to its maximum."""
    img = Image.new("RGB", (_W, _H), "white")
    d = ImageDraw.Draw(img)
    x0, x1, y0, y1 = _M, _W - _M, _H - _M, _M // 2
    d.rectangle([x0, y1, x1, y0], outline=_AXIS)
    lmax = max((v for _, v in loss if math.isfinite(v)), default=1.0) or 1.0

    def px(it: float) -> float:
        return x0 + (x1 - x0) * it / max(iters, 1)

    def py(frac: float) -> float:
        return y0 - (y0 - y1) * min(max(frac, 0.0), 1.0)

    for t in _ticks(0, iters):
        d.line([px(t), y0, px(t), y0 + 4], fill=_AXIS)
        d.text((px(t) - 12, y0 + 8), f"{int(t):,}", fill=_AXIS)
    for t in _ticks(0, lmax):
        d.text((4, py(t / lmax) - 6), f"{t:.3g}", fill=_LOSS)
    for t in _ticks(0, 100):
        d.text((x1 + 6, py(t / 100) - 6), f"{t:.0f}%", fill=_MIOU)
    d.text((x0, 4), "training loss", fill=_LOSS)
    d.text((x1 - 110, 4), "val mIoU", fill=_MIOU)
    d.text(((x0 + x1) // 2 - 24, _H - 20), "iteration", fill=_AXIS)
    pts = [(px(i), py(v / lmax)) for i, v in loss if math.isfinite(v)]
    if len(pts) > 1:
        d.line(pts, fill=_LOSS, width=2)
    mpts = [(px(i), py(v)) for i, v in miou if v is not None and math.isfinite(v)]
    if len(mpts) > 1:
        d.line(mpts, fill=_MIOU, width=2)
    for x, y in mpts:
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=_MIOU)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
