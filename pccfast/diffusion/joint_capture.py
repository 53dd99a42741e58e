"""Attention capture in diffusion transformers with joint (MM-DiT) attention: SD3/SD3.5, FLUX.1.

The processors compute a block's attention exactly as diffusers' defaults do
(``JointAttnProcessor2_0`` for SD3: image tokens first, then the text tokens;
``FluxAttnProcessor`` for FLUX: text tokens first, RoPE, and in the single-stream blocks one
sequence of text then image tokens), return the same outputs, and hand two things of the
**image tokens** of the chosen blocks to :class:`JointAttentionCapture`:

* **head-wise features** (last denoising call only): the per-head attention output of the
  image tokens, ``softmax(Q K^T / sqrt(d)) V`` over the whole joint sequence, before the heads
  are merged, (N_b, heads, N, d); reduced block by block, as each block runs, by the batched
  head-wise PCA (``core.pca.grouped_headwise_features``, 3 components per head, all images
  and heads of the block at once) on the image-token grid, both guidance halves
  (unconditional heads first) where the batch has them. Only one block's per-head outputs
  are alive at a time (a 1024x1024 image: tens of MB, not the chosen blocks' GBs);
* **open-vocabulary class maps** (every call), option (a) of the design, the direct analogue
  of OVAM in a UNet: the class text (:mod:`pccfast.diffusion.dit_text`) is embedded by the
  pipeline's own text encoders and the transformer's ``context_embedder``, giving ``E``
  (B, T, C); in every chosen block it is passed through that block's **text-side** path up to
  the keys, with the block's own modulation at this step, as if it were the block's text
  stream: SD3 ``norm_added_k(add_k_proj(norm1_context(E, temb)))``, FLUX dual-stream
  ``rope0(norm_added_k(add_k_proj(norm1_context(E, temb))))``, FLUX single-stream
  ``rope0(norm_k(to_k(norm(E, temb))))`` (rope0: FLUX's rotation of text position 0, whose
  ids are all zero). The image queries Q (after ``norm_q`` and RoPE, the unconditional half
  under classifier-free guidance) score those keys: ``softmax_T(Q K_cls^T / sqrt(d))``,
  summed over heads, added into one (B, T, h, w) buffer per block, so memory does not grow
  with the steps. Only the (N x T) class scores are formed, never the joint attention matrix.

Why (a) and not (b), ConceptAttention's concept stream: (a) needs no extra pass through the
blocks (a (T x C) norm and key projection per block and call, and an (N x T) score matrix),
it leaves the images untouched by construction (nothing enters the joint sequence), and it is
the same definition as the UNet families' class maps, so the labeller's thresholds mean the
same. (b) carries the class tokens through every block's text-side attention, MLP and
modulation for every call (the whole text-stream cost again, per block) and needs the outputs
of every block up to the chosen ones; it is not shipped.

Steps: ``on_step_end`` is the pipeline's ``callback_on_step_end``. The step counter is never
read inside the transformer (a ``torch.compile``-d one would recompile every step on it): the
processors that record the per-head outputs are installed by the callback before the last
call. Eager, each chosen block's outputs are reduced as the block runs; with
``reduce_after_step`` (the compiled path: the PCA's host syncs stay out of the graph) they are
kept and reduced by the callback after the last call. The block's ``temb`` (the adaptive
norms' conditioning) is read by a forward pre-hook on the transformer's first block (a
documented ``nn.Module`` hook, removed on exit; ``forward`` is not replaced).
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pccfast.core.config import PCCConfig
from pccfast.core.pca import grouped_headwise_features
from pccfast.diffusion.capture import check_capture_args

__all__ = [
    "JointAttentionCapture",
    "JointCaptureProcessor",
    "dit_family",
    "dit_blocks",
    "default_feature_blocks",
    "parse_feature_blocks",
    "choose_blocks",
    "block_names",
    "check_feature_blocks",
    "class_keys",
    "class_scores",
]


def dit_family(transformer) -> str:
    """"sd3" for an ``SD3Transformer2DModel``, "flux" for a ``FluxTransformer2DModel``."""
    names = [k.__name__ for k in type(transformer).__mro__]
    if "SD3Transformer2DModel" in names:
        return "sd3"
    if "FluxTransformer2DModel" in names:
        return "flux"
    raise ValueError(f"`transformer` has to be an SD3 or FLUX transformer but is a {type(transformer).__name__}")


def dit_blocks(transformer) -> list[str]:
    """The blocks with joint attention, in forward order: ``transformer_blocks.i`` (SD3's joint
    blocks, FLUX's dual-stream ones), then FLUX's ``single_transformer_blocks.j``."""
    names = [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
    names += [f"single_transformer_blocks.{j}" for j in range(len(getattr(transformer, "single_transformer_blocks", ())))]
    return names


def default_feature_blocks(transformer) -> list[str]:
    """The documented default: the later half of the joint (SD3) or dual-stream (FLUX) blocks
    (SD 3.5 large: blocks 19-37 of 38; FLUX.1: 9-18 of 19)."""
    return _later_half(dit_blocks(transformer))


def _later_half(blocks: list) -> list[str]:
    """The later half of the joint (dual-stream) blocks among ``blocks`` (``dit_blocks`` order)."""
    n = sum(1 for b in blocks if b.startswith("transformer_blocks."))
    return [f"transformer_blocks.{i}" for i in range(n // 2, n)]


_BLOCK_NAME = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.\d+$")
_BLOCK_RANGE = re.compile(r"^\d+(-\d+)?$")


def check_feature_blocks(spec) -> None:
    """The form of a ``--feature-blocks`` value, before any model is loaded (whether its indexes
    exist is checked against the transformer by ``parse_feature_blocks``)."""
    if spec is None or spec.strip() in ("default", "all"):
        return
    for p in spec.split(","):
        p = p.strip()
        if not (_BLOCK_NAME.match(p) or _BLOCK_RANGE.match(p)):
            raise ValueError(f"`feature_blocks` has to be 'default', 'all' or commas of block indexes, ranges a-b and "
                             f"block names (transformer_blocks.I, single_transformer_blocks.J) but holds {p!r}")
        lo, _, hi = p.partition("-")
        if hi and lo.isdigit() and int(hi) < int(lo):
            raise ValueError(f"`feature_blocks` has to hold ranges a-b with a <= b but holds {p!r}")


def parse_feature_blocks(spec, transformer) -> list[str]:
    """Chosen blocks from ``--feature-blocks``: None or "default" (``default_feature_blocks``),
    "all", or commas of block names, indexes and ranges ``a-b`` (inclusive) into
    ``dit_blocks`` (FLUX: dual-stream blocks first, so 19-37 are FLUX.1's single-stream ones).
    Returned in forward order, without repeats."""
    return choose_blocks(spec, dit_blocks(transformer), dit_family(transformer))


def block_names(num_joint: int, num_single: int = 0) -> list[str]:
    """``dit_blocks`` of a transformer with ``num_joint`` joint (dual-stream) and ``num_single``
    single-stream blocks (from its config, without building it)."""
    return [f"transformer_blocks.{i}" for i in range(num_joint)] + \
        [f"single_transformer_blocks.{j}" for j in range(num_single)]


def choose_blocks(spec, blocks: list, family: str) -> list[str]:
    """``parse_feature_blocks`` against the block names ``blocks`` (``dit_blocks`` order) of a
    ``family`` ("sd3", "flux") transformer."""
    if spec is None or (isinstance(spec, str) and spec.strip() == "default"):
        return _later_half(blocks)
    if isinstance(spec, str) and spec.strip() == "all":
        return list(blocks)
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p) for p in spec]
    chosen = set()
    for p in parts:
        if p in blocks:
            chosen.add(p)
            continue
        lo, _, hi = p.partition("-")
        if not (lo.isdigit() and (not hi or hi.isdigit())) or int(hi or lo) < int(lo) or int(hi or lo) >= len(blocks):
            raise ValueError(
                f"`feature_blocks` has to name blocks ({blocks[0]}, ...), indexes or ranges a-b in "
                f"[0, {len(blocks) - 1}] of this {family} transformer but holds {p!r}"
            )
        chosen.update(blocks[int(lo): int(hi or lo) + 1])
    if not chosen:
        raise ValueError(f"`feature_blocks` has to choose at least one block but is {spec!r}")
    return [b for b in blocks if b in chosen]


def _rope0(x: Tensor, rotary) -> Tensor:
    """FLUX's rotation of text position 0 on x (B, T, heads, d): the rotation of the call's
    first (text) token. FLUX pipelines' text ids are zeros, so it is the identity there; it is
    applied so the keys stay those of the text stream if a pipeline sets other text ids."""
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = rotary
    t = x.shape[1]
    return apply_rotary_emb(x, (cos[:1].expand(t, -1), sin[:1].expand(t, -1)), sequence_dim=1)


def class_keys(kind: str, block, attn, embeds: Tensor, temb: Tensor, rotary=None) -> Tensor:
    """Class-token keys of one block through its text-side path (the module docstring).

    Args:
        kind: "sd3", "flux" (dual-stream) or "flux-single".
        block: the transformer block (its context norm), attn: its attention module.
        embeds: (B, T, C) class embeddings after ``context_embedder``.
        temb: (B, C) the block's conditioning for these B images.
        rotary: FLUX's (cos, sin) rotary tables of the call (row 0 = text position 0).

    Returns:
        (B, heads, T, d) keys in the block's dtype.
    """
    e = embeds.to(attn.to_k.weight.dtype)
    if kind == "sd3":
        ctx = block.norm1_context(e, temb) if block.context_pre_only else block.norm1_context(e, emb=temb)[0]
        key = attn.add_k_proj(ctx)  # (B, T, inner)
        b, t, inner = key.shape
        key = key.view(b, t, attn.heads, inner // attn.heads).transpose(1, 2)  # (B, heads, T, d)
        return attn.norm_added_k(key) if attn.norm_added_k is not None else key
    if kind == "flux":
        key = attn.add_k_proj(block.norm1_context(e, emb=temb)[0]).unflatten(-1, (-1, attn.head_dim))  # (B, T, heads, d)
        key = attn.norm_added_k(key)
    elif kind == "flux-single":
        key = attn.to_k(block.norm(e, emb=temb)[0]).unflatten(-1, (-1, attn.head_dim))  # (B, T, heads, d)
        key = attn.norm_k(key)
    else:
        raise ValueError(f"`kind` has to be 'sd3', 'flux' or 'flux-single' but is {kind!r}")
    if rotary is not None:
        key = _rope0(key, rotary)
    return key.transpose(1, 2)  # (B, heads, T, d)


def class_scores(query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the class tokens of the image queries' scores, summed over heads.

    Args:
        query: (B, heads, N, d) image queries; keys: (B, heads, T, d); mask: (B, T) bool real tokens.

    Returns:
        (B, N, T) float32.
    """
    q, k = query.float(), keys.float()
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, heads, N, T)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1).sum(dim=1)  # (B, N, T)


def _sd3_attention(attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor]):
    """``JointAttnProcessor2_0``'s computation; also returns the image queries and per-head
    image outputs, each (N_b, heads, N, d)."""
    n_b, n = hidden_states.shape[:2]
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(n_b, -1, attn.heads, head_dim).transpose(1, 2)  # (N_b, heads, N, d)
    key = key.view(n_b, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(n_b, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    image_query = query
    if encoder_hidden_states is not None:
        cq = attn.add_q_proj(encoder_hidden_states).view(n_b, -1, attn.heads, head_dim).transpose(1, 2)
        ck = attn.add_k_proj(encoder_hidden_states).view(n_b, -1, attn.heads, head_dim).transpose(1, 2)
        cv = attn.add_v_proj(encoder_hidden_states).view(n_b, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        query = torch.cat([query, cq], dim=2)  # (N_b, heads, N + L, d): image first
        key = torch.cat([key, ck], dim=2)
        value = torch.cat([value, cv], dim=2)
    per_head = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)  # (N_b, heads, N+L, d)
    out = per_head.transpose(1, 2).reshape(n_b, -1, attn.heads * head_dim).to(query.dtype)  # (N_b, N+L, inner)
    context = None
    if encoder_hidden_states is not None:
        out, context = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
    out = attn.to_out[1](attn.to_out[0](out))
    return (out if context is None else (out, context)), image_query, per_head[:, :, :n]


def _flux_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, n_image, backend):
    """``FluxAttnProcessor``'s computation (unfused projections); also returns the image
    queries and per-head image outputs, each (N_b, heads, N, d) (the last ``n_image`` tokens)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb

    if getattr(attn, "fused_projections", False):
        raise RuntimeError("the FLUX capture needs unfused q/k/v projections (call transformer.unfuse_qkv_projections())")
    query = attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim))  # (N_b, S, heads, d)
    key = attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim))
    value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
    query, key = attn.norm_q(query), attn.norm_k(key)
    dual = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
    if dual:
        cq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
        ck = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
        cv = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
        query = torch.cat([cq, query], dim=1)  # (N_b, L + N, heads, d): text first
        key = torch.cat([ck, key], dim=1)
        value = torch.cat([cv, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    per_head = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=backend)  # (N_b, S, heads, d)
    out = per_head.flatten(2, 3).to(query.dtype)  # (N_b, S, inner)
    image_query = query[:, -n_image:].transpose(1, 2)  # (N_b, heads, N, d)
    image_heads = per_head[:, -n_image:].transpose(1, 2)  # (N_b, heads, N, d)
    if dual:
        context, out = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return (out, attn.to_add_out(context.contiguous())), image_query, image_heads
    return out, image_query, image_heads


class JointCaptureProcessor:
    """Processor of one chosen block's joint attention: the default output, and the image
    queries (and at the last call the per-head image outputs) to ``capture.observe``.

    ``kind``: "sd3", "flux" or "flux-single"; ``backend``: the replaced FLUX processor's
    attention backend (diffusers' dispatch), kept so the output stays the default's;
    ``record``: hand over the per-head outputs too (installed so for the last call).
    """

    def __init__(self, capture: "JointAttentionCapture", name: str, kind: str, backend=None, record: bool = False):
        self.capture, self.name, self.kind, self._attention_backend = capture, name, kind, backend
        self.record = bool(record)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 *args, **kwargs):
        if self.kind == "sd3":
            out, query, per_head = _sd3_attention(attn, hidden_states, encoder_hidden_states)
        else:
            out, query, per_head = _flux_attention(attn, hidden_states, encoder_hidden_states, attention_mask,
                                                   image_rotary_emb, self.capture.n_image, self._attention_backend)
        self.capture.observe(self.name, attn, query, per_head, image_rotary_emb, self.record)
        return out


class JointAttentionCapture:
    """Buffers and processors of one capture run over B images in an SD3 or FLUX transformer.

    Args:
        transformer: the pipeline's ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``.
        class_embeds: (B, T, C) class-text embeddings after ``context_embedder``, zero-padded.
        class_mask: (B, T) bool, True for real tokens.
        num_steps: transformer calls of the run (flow-matching Euler: one per step); the last is captured.
        grid_hw: (h, w) image-token grid (image side / 16 for SD3 and FLUX).
        halves: 2 when the transformer batch is [unconditional; conditional] (SD3 with
            guidance > 1), 1 when it is the B images alone (FLUX, or no guidance).
        blocks: chosen block names (``parse_feature_blocks``).
        cfg: PCA settings.
        reduce_after_step: keep the last call's per-head outputs of every chosen block and
            reduce them after the call (a compiled transformer), instead of each block's as it runs.

    Use as ``with capture: pipe(..., callback_on_step_end=capture.on_step_end)``.
    """

    def __init__(self, transformer, class_embeds: Tensor, class_mask: Tensor, num_steps: int, grid_hw, halves: int,
                 blocks: list, cfg: Optional[PCCConfig] = None, reduce_after_step: bool = False):
        check_capture_args(class_embeds, class_mask, num_steps, halves)
        self.transformer, self.family = transformer, dit_family(transformer)
        self.class_embeds, self.class_mask = class_embeds, class_mask.bool()
        self.batch, self.halves = class_embeds.shape[0], int(halves)
        self.num_steps, self.step = int(num_steps), 0
        self.grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        self.n_image = self.grid_hw[0] * self.grid_hw[1]
        self.cfg = cfg or PCCConfig()
        known = dit_blocks(transformer)
        bad = [b for b in blocks if b not in known]
        if bad or not blocks:
            raise ValueError(f"`blocks` have to be blocks of the transformer ({known[0]}, ...) but are {list(blocks)!r}")
        self.blocks = list(blocks)
        self.temb: Optional[Tensor] = None  # (N_b, C) of the current call, from the pre-hook
        self.class_maps: dict[str, Tensor] = {}  # block -> (B, T, h, w), summed over calls and heads
        self.head_features: dict[str, Tensor] = {}  # block -> (B, halves*heads*c, h, w), last call
        self.reduce_after_step = bool(reduce_after_step)
        self.head_inputs: dict[str, Tensor] = {}  # block -> (N_b, heads, N, d), last call, until reduced (reduce_after_step)
        self._saved, self._hook = None, None

    @property
    def is_last_step(self) -> bool:
        return self.step == self.num_steps - 1

    def on_step_end(self, pipe, i: int, t, callback_kwargs: dict) -> dict:
        """``callback_on_step_end``: call i is done, the next one is i + 1. Before the last call
        it installs the recording processors; after it, it reduces what they kept (``reduce_after_step``)."""
        self.step = i + 1
        if self.is_last_step and self._saved is not None:
            self.transformer.set_attn_processor(self.processors(record=True))
        elif self.step == self.num_steps and self.head_inputs:
            for name in self.blocks:
                if name in self.head_inputs:
                    self.reduce_block(name, self.head_inputs.pop(name))
        return callback_kwargs

    # --- installation
    def _module(self, name: str):
        group, idx = name.split(".")
        return getattr(self.transformer, group)[int(idx)]

    def _kind(self, name: str) -> str:
        if self.family == "sd3":
            return "sd3"
        return "flux-single" if name.startswith("single_") else "flux"

    def processors(self, record: bool = False) -> dict:
        """Every processor of the transformer, the chosen blocks' joint attention replaced
        (recording the per-head outputs if ``record``)."""
        procs = dict(self.transformer.attn_processors if self._saved is None else self._saved)
        for name in self.blocks:
            key = f"{name}.attn.processor"
            backend = getattr(procs[key], "_attention_backend", None)
            procs[key] = JointCaptureProcessor(self, name, self._kind(name), backend, record=record)
        return procs

    def _read_temb(self, module, args, kwargs):
        self.temb = kwargs.get("temb", args[2] if len(args) > 2 else None)

    def __enter__(self) -> "JointAttentionCapture":
        self._saved = dict(self.transformer.attn_processors)
        self.transformer.set_attn_processor(self.processors(record=self.is_last_step))
        self._hook = self.transformer.transformer_blocks[0].register_forward_pre_hook(self._read_temb, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.transformer.set_attn_processor(dict(self._saved))
        self._hook.remove()
        self._saved, self._hook = None, None

    # --- what the processors hand over
    def _first_half(self, x: Tensor) -> Tensor:
        """The unconditional half (or the only one) of a transformer batch: (N_b, ...) -> (B, ...)."""
        if x.shape[0] != self.halves * self.batch:
            raise RuntimeError(
                f"the capture expects a transformer batch of {self.halves} * {self.batch} but got {x.shape[0]}"
            )
        return x[: self.batch]

    def observe(self, name: str, attn, query: Tensor, per_head: Tensor, rotary=None, record: bool = False) -> None:
        """query, per_head: (N_b, heads, N, d) of the image tokens of block ``name``.

        Adds the class-token probabilities, summed over heads, to ``class_maps[name]``
        (B, T, h, w); if ``record`` (the last call) reduces ``per_head`` (``reduce_block``),
        or keeps it for the callback with ``reduce_after_step``."""
        q = self._first_half(query)  # (B, heads, N, d)
        if self.temb is None:
            raise RuntimeError("the block conditioning (temb) was not seen before the attention")
        keys = class_keys(self._kind(name), self._module(name), attn, self.class_embeds, self._first_half(self.temb), rotary)
        b, _, n, _ = q.shape
        maps = class_scores(q, keys, self.class_mask).transpose(1, 2).reshape(b, -1, *self.grid_hw)  # (B, T, h, w)
        if name in self.class_maps:
            self.class_maps[name] += maps
        else:
            self.class_maps[name] = maps
        if record and self.reduce_after_step:
            self.head_inputs[name] = per_head
        elif record:
            self.reduce_block(name, per_head)

    def _halves_side_by_side(self, per_head: Tensor) -> Tensor:
        """(N_b, heads, N, d) -> (B, halves*heads, N, d), unconditional heads first."""
        _, heads, n, d = per_head.shape
        x = per_head.view(self.halves, self.batch, heads, n, d).transpose(0, 1)  # (B, halves, heads, N, d)
        return x.reshape(self.batch, self.halves * heads, n, d)

    def reduce_block(self, name: str, per_head: Tensor) -> None:
        """per_head (N_b, heads, N, d) of block ``name`` at the last call -> ``head_features[name]``
        (B, halves*heads*c, h, w): one batched PCA over the block's images and heads (per item
        a generator seeded with ``cfg.pca_seed``, so an image's features do not depend on its batch)."""
        x = self._halves_side_by_side(per_head)  # (B, halves*heads, N, d)
        self.head_features[name] = grouped_headwise_features([x], self.grid_hw, self.cfg, sizes=[self.grid_hw])[0]

    # --- after the loop
    def features(self) -> Tensor:
        """(B, D, h, w): the chosen blocks' features in forward order, D = 3 * halves * sum(heads)."""
        missing = [n for n in self.blocks if n not in self.head_features]
        if missing:
            raise RuntimeError(f"no last-step features were captured for {len(missing)} blocks (e.g. {missing[0]}); "
                               f"the run made {self.step} of {self.num_steps} steps")
        return torch.cat([self.head_features[n] for n in self.blocks], dim=1)

    def token_maps(self) -> list[Tensor]:
        """Per-block class-token maps (B, T, h, w), summed over calls and heads, block order."""
        missing = [n for n in self.blocks if n not in self.class_maps]
        if missing:
            raise RuntimeError(f"no class scores were captured for {len(missing)} blocks (e.g. {missing[0]})")
        return [self.class_maps[n] for n in self.blocks]
