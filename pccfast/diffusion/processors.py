"""The attention math and the diffusers-style processors that capture it.

``attend`` computes a diffusers ``Attention`` layer exactly as ``AttnProcessor2_0`` does (same
operations in the same order, so the images do not change) and also returns the queries and
the per-head outputs. ``class_token_probs`` scores queries against the keys of a class text.

The two processors have diffusers' ``__call__(attn, hidden_states, encoder_hidden_states=None,
attention_mask=None, temb=None)``; they only hold the capture and their layer name, and hand
what they see to :class:`pccfast.diffusion.capture.AttentionCapture`, which installs them with
``unet.set_attn_processor``:

* ``ClassAttentionProcessor`` (``attn2``): the queries, for the class-text scores;
* ``HeadFeatureProcessor`` (``attn1``): the per-head outputs if it records (installed so for the
  last step only: no step counter is read inside the UNet, so a compiled UNet does not
  recompile every step).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from pccfast.diffusion.capture import AttentionCapture

__all__ = ["attend", "attend_parts", "class_token_probs", "ClassAttentionProcessor", "HeadFeatureProcessor"]


def attend(attn, hidden_states: Tensor, encoder_hidden_states=None, attention_mask=None, temb=None):
    """Attention of a diffusers ``Attention`` layer, computed as ``AttnProcessor2_0`` does.

    Args:
        attn: the ``Attention`` module.
        hidden_states: (N_b, L, C) or (N_b, C, h, w).
        encoder_hidden_states: (N_b, L_k, C_k) for cross-attention, None for self-attention.

    Returns:
        out: the layer output (same shape as ``hidden_states``);
        query: (N_b, heads, L, d) queries after ``to_q`` (and ``norm_q``);
        per_head: (N_b, heads, L, d) ``softmax(Q K^T * scale) V`` before merging heads.
    """
    out, query, _, per_head = attend_parts(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
    return out, query, per_head


def attend_parts(attn, hidden_states: Tensor, encoder_hidden_states=None, attention_mask=None, temb=None, core=None):
    """``attend`` that also returns the keys: (out, query, key, per_head), key (N_b, heads, L_k, d)
    after ``to_k`` (and ``norm_k``). ``core``, if given, replaces the attention itself:
    ``core(query, key, value, attention_mask) -> per_head`` (Dataset Diffusion's capture computes
    the conditional half's probabilities there once, for its affinity and for the output)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    four_d = hidden_states.ndim == 4
    if four_d:
        n_b, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(n_b, channels, height * width).transpose(1, 2)  # (N_b, L, C)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    n_b, ctx_len, _ = context.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, ctx_len, n_b)
        attention_mask = attention_mask.view(n_b, attn.heads, -1, attention_mask.shape[-1])  # (N_b, heads, L|1, L_k)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)  # (N_b, L, inner)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)  # (N_b, L_k, inner)
    value = attn.to_v(encoder_hidden_states)  # (N_b, L_k, inner)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(n_b, -1, attn.heads, head_dim).transpose(1, 2)  # (N_b, heads, L, d)
    key = key.view(n_b, -1, attn.heads, head_dim).transpose(1, 2)  # (N_b, heads, L_k, d)
    value = value.view(n_b, -1, attn.heads, head_dim).transpose(1, 2)  # (N_b, heads, L_k, d)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if core is not None:
        per_head = core(query, key, value, attention_mask)  # (N_b, heads, L, d)
    else:
        per_head = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )  # (N_b, heads, L, d)
    out = per_head.transpose(1, 2).reshape(n_b, -1, attn.heads * head_dim).to(query.dtype)  # (N_b, L, inner)
    out = attn.to_out[0](out)  # linear projection
    out = attn.to_out[1](out)  # dropout
    if four_d:
        out = out.transpose(-1, -2).reshape(n_b, channels, height, width)
    if attn.residual_connection:
        out = out + residual
    out = out / attn.rescale_output_factor
    return out, query, key, per_head


def class_token_probs(attn, query: Tensor, class_embeds: Tensor, class_mask: Tensor) -> Tensor:
    """Softmax over the class-text tokens of ``query``'s scores, summed over the heads.

    Args:
        attn: the cross-attention ``Attention`` module (its ``to_k``, norms and scale are used).
        query: (B, heads, N, d) queries (the unconditional CFG half, or the only half).
        class_embeds: (B, T, C) class-text embeddings, zero-padded.
        class_mask: (B, T) bool, True for real tokens (padding is masked before the softmax).

    Returns:
        (B, N, T) float32: per pixel, the heads' summed probabilities of each token.
    """
    q = query.float()  # (B, heads, N, d)
    b, heads, n, d = q.shape
    ctx = class_embeds.to(attn.to_k.weight.dtype)
    if attn.norm_cross:
        ctx = attn.norm_encoder_hidden_states(ctx)
    key = attn.to_k(ctx)  # (B, T, inner)
    key = key.view(b, -1, heads, d).transpose(1, 2)  # (B, heads, T, d)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    scores = (q @ key.float().transpose(-1, -2)) * attn.scale  # (B, heads, N, T)
    scores = scores.masked_fill(~class_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1).sum(dim=1)  # (B, N, T)


class ClassAttentionProcessor:
    """``attn2`` processor: normal output; the queries go to ``capture.add_class_scores``."""

    def __init__(self, capture: "AttentionCapture", name: str):
        self.capture, self.name = capture, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        out, query, key, per_head = attend_parts(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        self.capture.add_class_scores(self.name, attn, query)
        if self.capture.listeners:
            self.capture.notify(self.name, "cross", attn, query, key, per_head)
        return out


class HeadFeatureProcessor:
    """``attn1`` processor: normal output; if ``record`` (the capture installs such processors
    for the last step) the per-head outputs go to ``capture.add_head_features``."""

    def __init__(self, capture: "AttentionCapture", name: str, record: bool = False):
        self.capture, self.name, self.record = capture, name, bool(record)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        out, query, key, per_head = attend_parts(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if self.record:
            self.capture.add_head_features(self.name, per_head)
        if self.capture.listeners:
            self.capture.notify(self.name, "self", attn, query, key, per_head)
        return out
