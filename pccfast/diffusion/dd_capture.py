"""Dataset Diffusion's capture, taken in the same denoising pass as PCC's (``core.dd`` labels from it).

Two running sums per batch of B images, allocated once, so memory does not grow with the steps:

* **affinity** (B, N2, N2) float32, N2 = h2 * w2 at the "half" grid (``DDConfig.grids`` of the
  labelling grid: 32x32 for SD at 512x512): the self-attention *probabilities*
  ``softmax(Q K^T * scale)`` of the conditional CFG half (the second half of the UNet batch;
  the only one without guidance) of every self-attention layer at that grid (down, mid and up
  blocks), averaged over heads, layers and the steps of ``DDConfig``'s window. The
  probabilities are formed a few heads at a time (at most ``chunk_elements`` of them at once),
  never for all heads of a batch;
* **class attention** (B, T, N4) float32 at the "quarter" grid (16x16 for SD at 512): the
  conditional half's queries of every cross-attention layer at that grid scored against the
  keys of a separate *class prompt*, softmax over all its T tokens (padding included),
  averaged over heads, layers and steps. :meth:`DDCapture.class_attention` turns it into one
  map per class of the label set (a class with several tokens takes their mean; zeros for
  classes without tokens and for the background).

The class prompt is the image's class names joined by spaces, compound VOC names as two words
(:func:`dd_class_names`: "dining table", "potted plant", "tv monitor"), encoded with the
pipeline's tokenizer padded to its maximum length (77) and its text encoder. It never enters
the image. :func:`append_classes` is Dataset Diffusion's image-prompt convention
("a black cat laying on the floor; cat").

How it hooks in: :class:`DDCapture` is a *listener* of the PCC
:class:`~pccfast.diffusion.capture.AttentionCapture`, which hands it every call of the layers
it captures (the up blocks' self-attention, the down and up blocks' cross-attention) and every
step end; on the other self-attention layers (down and mid blocks) ``DDCapture`` installs its
own processor, :class:`DDSelfAttentionProcessor`. The probabilities are computed once: on a
half-grid self-attention layer the conditional half's output is ``P @ V`` from the very
probabilities P that are summed into the affinity (``processors.attend_parts`` with a
``core``), the unconditional half's is diffusers' fused attention as before; on the up blocks
:class:`DDFeatureProcessor` does so in place of PCC's processor for every step but the last
(where PCC records its per-head outputs, and the listener path runs). The images are those of
diffusers' processors up to float rounding (1e-5). Use as ``with capture, dd_capture: pipe(...)``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pccfast.core.dd import DDConfig
from pccfast.core.labelset import as_label_set
from pccfast.diffusion.processors import HeadFeatureProcessor, attend_parts, class_token_probs
from pccfast.diffusion.tokens import DROP, class_tokens

__all__ = [
    "DD_COMPOUND_NAMES",
    "dd_class_names",
    "append_classes",
    "DDClassPrompt",
    "encode_dd_class_prompt",
    "DDCapture",
    "DDSelfAttentionProcessor",
    "DDFeatureProcessor",
    "dd_capture_for",
]

# VOC's compound class names, written as Dataset Diffusion's class prompts write them
DD_COMPOUND_NAMES = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}


def dd_class_names(label_set) -> tuple:
    """Per class of the label set, the words Dataset Diffusion writes for it: the class name,
    VOC's compound names split (``DD_COMPOUND_NAMES``), underscores as spaces."""
    ls = as_label_set(label_set)
    return tuple(DD_COMPOUND_NAMES.get(c, c.replace("_", " ")) for c in ls.classes)


def append_classes(prompt: str, class_names, label_set) -> str:
    """Dataset Diffusion's image prompt: ``prompt + "; " + the class names joined by spaces``
    (distinct names, in the order given): ``"a black cat laying on the floor; cat"``."""
    ls = as_label_set(label_set)
    words = dd_class_names(ls)
    seen = list(dict.fromkeys(class_names))
    if not seen:
        return prompt
    return f"{prompt}; {' '.join(words[ls.index(c)] for c in seen)}"


@dataclasses.dataclass
class DDClassPrompt:
    """Encoded class prompts of a batch: ``embeds`` (B, T, C) in the UNet's dtype (T = the
    tokenizer's maximum length), ``token_classes`` (B, T) long (the class of each class-name
    token; ``tokens.DROP`` for the start, end and padding tokens), ``texts`` per image."""

    embeds: Tensor
    token_classes: Tensor
    texts: list


@torch.no_grad()
def encode_dd_class_prompt(pipe, class_names: list, label_set) -> DDClassPrompt:
    """The class prompts of a batch, encoded as Dataset Diffusion does (padded to max length).

    Args:
        pipe: a pipeline with ``tokenizer``, ``text_encoder``, ``unet`` and ``_execution_device``.
        class_names: per image, its class names (label-set names; distinct ones kept, in order).
        label_set: name, dict or ``LabelSet``.
    """
    ls = as_label_set(label_set)
    words = dd_class_names(ls)
    dd_ls = dataclasses.replace(ls, texts=words)  # the same classes, scored with DD's words
    tok = pipe.tokenizer
    t = getattr(tok, "model_max_length", 77)
    t = 77 if t is None or t > 10_000 else int(t)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = pipe._execution_device
    ids = torch.full((len(class_names), t), pad, dtype=torch.long)  # (B, T)
    classes = torch.full((len(class_names), t), DROP, dtype=torch.long)  # (B, T)
    texts = []
    for i, names in enumerate(class_names):
        names = list(dict.fromkeys(names))
        row, cls = class_tokens(tok, names, dd_ls)
        cls = [DROP] + cls[1:]  # the start token is no class (no background map)
        ids[i, : len(row)] = torch.tensor(row)
        classes[i, : len(cls)] = torch.tensor(cls)
        texts.append(" ".join(words[ls.index(c)] for c in names))
    embeds = pipe.text_encoder(ids.to(device))[0].to(pipe.unet.dtype)  # (B, T, C)
    return DDClassPrompt(embeds, classes.to(device), texts)


def _conditional(x: Tensor, batch: int, halves: int) -> Tensor:
    """The conditional half of a UNet batch: x (halves*B, ...) -> (B, ...)."""
    if x.shape[0] != halves * batch:
        raise RuntimeError(f"the Dataset Diffusion capture expects a UNet batch of {halves} * {batch} but got {x.shape[0]}")
    return x[batch:] if halves == 2 else x


class DDCapture:
    """Running sums of Dataset Diffusion's affinity and class attention over one batch.

    Args:
        unet: the denoiser (``attn_processors``, ``set_attn_processor``).
        class_prompt: the batch's ``DDClassPrompt``.
        num_classes: K of the label set.
        num_steps: denoiser calls of the run (the steps window is taken of these).
        grid_hw: (h, w) labelling grid; the half and quarter grids are ``cfg.grids(grid_hw)``.
        cfg: ``DDConfig`` (scales and steps window).
        halves: 2 with classifier-free guidance (conditional half second), 1 without.
        listened_layers: processor names whose calls reach this capture as a listener of the
            PCC capture; every other self-attention (``attn1``) layer gets a
            ``DDSelfAttentionProcessor``.
        chunk_elements: most self-attention probabilities formed at once: ``max(1,
            chunk_elements // (N2 * N2))`` (image, head) matrices per product. Default: 2^20 on
            the CPU (one 1024 x 1024 matrix: it stays in cache, 2.5x faster than ten at once),
            2^26 elsewhere.
    """

    def __init__(self, unet, class_prompt: DDClassPrompt, num_classes: int, num_steps: int, grid_hw,
                 cfg: Optional[DDConfig] = None, *, halves: int = 2, listened_layers=(),
                 chunk_elements: Optional[int] = None):
        self.cfg = cfg or DDConfig()
        if class_prompt.embeds.ndim != 3 or class_prompt.token_classes.shape != class_prompt.embeds.shape[:2]:
            raise ValueError(f"`class_prompt` embeds (B, T, C) and token_classes (B, T) have to agree but have shapes "
                             f"{tuple(class_prompt.embeds.shape)} and {tuple(class_prompt.token_classes.shape)}")
        if halves not in (1, 2):
            raise ValueError(f"`halves` has to be 1 or 2 but is {halves}")
        if chunk_elements is not None and chunk_elements < 1:
            raise ValueError(f"`chunk_elements` has to be at least 1 but is {chunk_elements}")
        self.unet = unet
        self.prompt = class_prompt
        self.batch = class_prompt.embeds.shape[0]
        self.num_classes = int(num_classes)
        self.halves = int(halves)
        self.chunk_elements = None if chunk_elements is None else int(chunk_elements)
        self.half_hw, self.quarter_hw = self.cfg.grids(grid_hw)
        self.n2 = self.half_hw[0] * self.half_hw[1]
        self.n4 = self.quarter_hw[0] * self.quarter_hw[1]
        self.first, self.stop = self.cfg.step_window(num_steps)
        self.active = self.first == 0  # the next denoiser call counts (set between calls only)
        self.listened_layers = [n for n in unet.attn_processors if n in set(listened_layers)]
        self.own_layers = [n for n in unet.attn_processors if ".attn1." in n and n not in set(listened_layers)]
        self.affinity_sum: Optional[Tensor] = None  # (B, N2, N2) float32
        self.affinity_count: Optional[Tensor] = None  # (1,) float32: layer calls added
        self.class_sum: Optional[Tensor] = None  # (B, T, N4) float32
        self.class_count: Optional[Tensor] = None  # (1,) float32
        self._saved = None

    # --- installation
    def _wrap(self, procs: dict) -> dict:
        """PCC's non-recording feature processors (this capture their only listener) wrapped in
        ``DDFeatureProcessor``; recording ones (the last step) and foreign ones left as they are."""
        changes = {}
        for n in self.listened_layers:
            p = procs[n]
            if (isinstance(p, HeadFeatureProcessor) and not p.record and tuple(p.capture.listeners) == (self,)):
                changes[n] = DDFeatureProcessor(self, n, p)
        return changes

    def __enter__(self) -> "DDCapture":
        procs = dict(self.unet.attn_processors)
        self._saved = {n: procs[n] for n in self.own_layers}
        changes = {n: DDSelfAttentionProcessor(self, n) for n in self.own_layers}
        changes.update(self._wrap(procs))
        if changes:
            self.unet.set_attn_processor({**procs, **changes})
        return self

    def __exit__(self, *exc) -> None:
        procs = dict(self.unet.attn_processors)
        back = {n: p.inner for n, p in procs.items() if isinstance(p, DDFeatureProcessor) and p.capture is self}
        back.update(self._saved or {})
        if back:
            self.unet.set_attn_processor({**procs, **back})
        self._saved = None

    # --- the listener interface of AttentionCapture
    def on_step_end(self, capture, step: int) -> None:
        """``step`` denoiser calls are done: the next one counts if it is in the window. PCC's
        capture may have installed new feature processors (its recording ones, for the last
        step): the non-recording ones are wrapped again."""
        self.active = self.first <= step < self.stop
        if self._saved is not None:
            procs = dict(self.unet.attn_processors)
            changes = self._wrap(procs)
            if changes:
                self.unet.set_attn_processor({**procs, **changes})

    def on_attention(self, capture, name: str, kind: str, attn, query: Tensor, key: Tensor, per_head: Tensor) -> None:
        if not self.active:
            return
        if kind == "self":
            self.add_affinity(attn, query, key)
        elif kind == "cross":
            self.add_class_scores(attn, query)

    # --- accumulation
    def _buffer(self, b: int, device) -> Tensor:
        if self.affinity_sum is None:
            self.affinity_sum = torch.zeros(b, self.n2, self.n2, device=device, dtype=torch.float32)
            self.affinity_count = torch.zeros(1, device=device, dtype=torch.float32)
        return self.affinity_sum

    def _probabilities(self, q: Tensor, k: Tensor, scale: float, v: Optional[Tensor] = None) -> Optional[Tensor]:
        """Adds the mean over heads of ``softmax(q k^T * scale)`` into the affinity; with ``v``,
        also returns ``P @ v``. q, k, v: (B, heads, N2, d) of the conditional half.

        The (image, head) matrices are taken ``chunk`` at a time into one reused float32
        buffer (product, softmax in place, add, ``P @ v``): (chunk, N2, N2) at most."""
        b, heads, n, d = q.shape
        acc = self._buffer(b, q.device).view(b, n * n)  # (B, N2*N2)
        budget = self.chunk_elements or (1 << 20 if q.device.type == "cpu" else 1 << 26)
        chunk = max(1, min(b * heads, budget // (n * n)))
        q2 = q.reshape(b * heads, n, d).float() * scale  # (B*heads, N2, d)
        k2 = k.reshape(b * heads, n, d).float().transpose(1, 2)  # (B*heads, d, N2)
        v2 = None if v is None else v.reshape(b * heads, n, d).float()  # (B*heads, N2, d)
        out = None if v is None else torch.empty(b * heads, n, d, device=q.device, dtype=torch.float32)
        image = torch.arange(b, device=q.device).repeat_interleave(heads)  # (B*heads,) image of each matrix
        buf = torch.empty(chunk, n, n, device=q.device, dtype=torch.float32)  # (chunk, N2, N2)
        for r0 in range(0, b * heads, chunk):
            r1 = min(b * heads, r0 + chunk)
            p = torch.bmm(q2[r0:r1], k2[r0:r1], out=buf[: r1 - r0])  # (c, N2, N2) scores
            torch.softmax(p, dim=-1, out=p)  # probabilities, in place
            acc.index_add_(0, image[r0:r1], p.view(r1 - r0, n * n), alpha=1.0 / heads)
            if v2 is not None:
                torch.bmm(p, v2[r0:r1], out=out[r0:r1])
        self.affinity_count += 1
        return None if out is None else out.view(b, heads, n, d)

    def core(self, query: Tensor, key: Tensor, value: Tensor, attention_mask=None) -> Tensor:
        """The attention of a half-grid self-attention layer (``attend_parts``' ``core``):
        query, key, value (halves*B, heads, N2, d) -> per_head (halves*B, heads, N2, d). The
        unconditional half by diffusers' fused attention; the conditional half as ``P @ V``
        from its probabilities P, which are also added into the affinity."""
        if attention_mask is not None or self.halves != 2:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
            self.add_affinity(None, query, key)
            return out
        b = self.batch
        _conditional(query, b, self.halves)  # batch check
        uncond = F.scaled_dot_product_attention(query[:b], key[:b], value[:b])  # (B, heads, N2, d)
        scale = query.shape[-1] ** -0.5  # scaled_dot_product_attention's default, as diffusers calls it
        cond = self._probabilities(query[b:], key[b:], scale, value[b:])  # (B, heads, N2, d)
        return torch.cat([uncond, cond.to(uncond.dtype)])  # (2B, heads, N2, d)

    def add_affinity(self, attn, query: Tensor, key: Tensor) -> None:
        """query, key: (halves*B, heads, N, d) of a self-attention layer; added if N = N2."""
        if query.shape[2] != self.n2 or key.shape[2] != self.n2:
            return
        q = _conditional(query, self.batch, self.halves)  # (B, heads, N2, d)
        k = _conditional(key, self.batch, self.halves)  # (B, heads, N2, d)
        self._probabilities(q, k, q.shape[-1] ** -0.5 if attn is None else attn.scale)

    def add_class_scores(self, attn, query: Tensor) -> None:
        """query: (halves*B, heads, N, d) of a cross-attention layer; its class-prompt scores are
        added if N = N4."""
        if query.shape[2] != self.n4:
            return
        q = _conditional(query, self.batch, self.halves)  # (B, heads, N4, d)
        heads = q.shape[1]
        every = torch.ones(self.prompt.token_classes.shape, dtype=torch.bool, device=q.device)  # padding included
        probs = class_token_probs(attn, q, self.prompt.embeds, every)  # (B, N4, T), summed over heads
        if self.class_sum is None:
            self.class_sum = torch.zeros(probs.shape[0], probs.shape[2], self.n4, device=q.device, dtype=torch.float32)
            self.class_count = torch.zeros(1, device=q.device, dtype=torch.float32)
        self.class_sum.add_(probs.transpose(1, 2), alpha=1.0 / heads)
        self.class_count += 1

    # --- results
    def affinity(self) -> Tensor:
        """(B, N2, N2) float32: the mean self-attention probabilities at the half grid."""
        if self.affinity_sum is None:
            raise RuntimeError(f"no self-attention layer at the half grid {self.half_hw[0]}x{self.half_hw[1]} was "
                               "captured (Dataset Diffusion's affinity)")
        return self.affinity_sum / self.affinity_count

    def token_maps(self) -> Tensor:
        """(B, T, h4, w4) float32: per class-prompt token, the mean probability map."""
        if self.class_sum is None:
            raise RuntimeError(f"no cross-attention layer at the quarter grid {self.quarter_hw[0]}x{self.quarter_hw[1]} "
                               "was captured (Dataset Diffusion's class attention)")
        b, t, _ = self.class_sum.shape
        return (self.class_sum / self.class_count).reshape(b, t, *self.quarter_hw)

    def class_attention(self) -> Tensor:
        """(B, K, h4, w4) float32: per class, the mean over its tokens of ``token_maps``; zeros
        for the background and for classes without tokens."""
        maps = self.token_maps()  # (B, T, h4, w4)
        b, t = maps.shape[:2]
        k = self.num_classes
        cls = self.prompt.token_classes.to(maps.device)  # (B, T)
        idx = torch.where(cls < 0, k, cls)  # (B, T): dropped tokens -> an extra row
        flat = maps.reshape(b, t, -1)  # (B, T, N4)
        sums = flat.new_zeros(b, k + 1, flat.shape[-1]).scatter_add_(1, idx[:, :, None].expand_as(flat), flat)
        counts = flat.new_zeros(b, k + 1).scatter_add_(1, idx, torch.ones_like(idx, dtype=flat.dtype))  # (B, K+1)
        mean = sums / counts.clamp_min(1)[:, :, None]  # (B, K+1, N4)
        return mean[:, :k].reshape(b, k, *self.quarter_hw)


def _half_grid(capture: DDCapture, hidden_states: Tensor) -> bool:
    """Whether a self-attention call (its input (N_b, L, C) or (N_b, C, h, w)) is at the half grid."""
    n = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[-2] * hidden_states.shape[-1]
    return n == capture.n2


class DDSelfAttentionProcessor:
    """Processor of a self-attention layer that the PCC capture does not hook: diffusers'
    ``AttnProcessor2_0`` output (``processors.attend_parts``); at the half grid, while the steps
    window is open, with ``capture.core`` (the conditional half's probabilities computed once,
    for the affinity and the output)."""

    def __init__(self, capture: DDCapture, name: str):
        self.capture, self.name = capture, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        core = self.capture.core if self.capture.active and _half_grid(self.capture, hidden_states) else None
        out, _, _, _ = attend_parts(attn, hidden_states, encoder_hidden_states, attention_mask, temb, core=core)
        return out


class DDFeatureProcessor:
    """In place of PCC's non-recording ``HeadFeatureProcessor`` ``inner`` (whose only listener
    is ``capture``): at the half grid, while the steps window is open, the output with
    ``capture.core``; otherwise ``inner`` itself. Such a call owes PCC nothing (it records at
    the last step only, where ``inner`` is not wrapped)."""

    def __init__(self, capture: DDCapture, name: str, inner: HeadFeatureProcessor):
        self.capture, self.name, self.inner = capture, name, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if self.capture.active and _half_grid(self.capture, hidden_states):
            out, _, _, _ = attend_parts(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                        core=self.capture.core)
            return out
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def dd_capture_for(adapter, class_names: list, label_set, num_steps: int, grid_hw, cfg: Optional[DDConfig],
                   halves: int) -> DDCapture:
    """The ``DDCapture`` of one generation batch: the class prompts encoded with the adapter's
    pipeline, the layers the adapter's PCC capture hooks listened to, own processors elsewhere.

    Raises:
        ValueError: the model is not Stable Diffusion 1.x/2.x (SDXL's two text encoders, SD3's
            and FLUX's joint attention are not covered).
    """
    from pccfast.diffusion.adapters import StableDiffusionAdapter

    if not isinstance(adapter, StableDiffusionAdapter):  # one CLIP text encoder: the class prompt's keys
        raise ValueError(f"the Dataset Diffusion labeller (`--labeler dd` or `fused`) needs a Stable Diffusion "
                         f"1.x/2.x model but the model is of family {adapter.family!r}")
    ls = as_label_set(label_set)
    prompt = encode_dd_class_prompt(adapter.pipe, class_names, ls)
    return DDCapture(adapter.denoiser, prompt, ls.num_classes, num_steps, grid_hw, cfg, halves=halves,
                     listened_layers=list(adapter.feature_layers()))
