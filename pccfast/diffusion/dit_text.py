"""Class texts of SD3 and FLUX, encoded as each pipeline encodes its prompts' joint-attention tokens.

The class text and its renaming are :mod:`pccfast.diffusion.tokens`' (``class_text``: the
image's classes' label-set texts, "pottedplant" -> "pot plant"); every class text is encoded
unpadded, each class's text on its own and the pieces concatenated (the CLIP and T5
pre-tokenisers split at spaces, so this equals encoding the joined text).

* **SD3/SD3.5** (joint sequence = 77 CLIP tokens, then T5 tokens): the CLIP part is
  [SoT, class tokens, EoT] through both CLIP encoders (penultimate hidden states,
  concatenated on channels, zero-padded to ``joint_attention_dim``), then the T5 part
  [class tokens, ``</s>``] through ``text_encoder_3`` (left out when the pipeline has no T5,
  as SD3 then feeds zeros). Token classes: SoT -> background, class tokens -> their class,
  EoT and ``</s>`` dropped.
* **FLUX.1** (joint sequence = T5 tokens only; CLIP gives the pooled vector): [class tokens,
  ``</s>``] through ``text_encoder_2``. T5 has no start token, so ``</s>``, the one special
  token of the text, takes the start token's place as the background token.

Both are then passed through the transformer's ``context_embedder`` (what the blocks' text
side reads), so ``encode_dit_class_texts`` returns embeddings in the blocks' width.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pccfast.core.labelset import as_label_set
from pccfast.diffusion.joint_capture import dit_family
from pccfast.diffusion.tokens import DROP, ClassTokens, batch_class_tokens, class_text

__all__ = ["t5_class_tokens", "encode_dit_class_texts"]


def t5_class_tokens(tokenizer, class_names, label_set, end_class: int = DROP, max_length: int = 512):
    """T5 token ids and token classes of one image's class text: [pieces of class 1's text, ...,
    ``</s>``], classes: the class index per piece, ``end_class`` for ``</s>``; truncated
    (before ``</s>``) to ``max_length``."""
    ls = as_label_set(label_set)
    if isinstance(class_names, str):
        raise TypeError(f"`class_names` has to be a list of class names but is the string {class_names!r}")
    ids, classes = [], []
    for name in class_names:
        k = ls.index(name)
        piece = tokenizer(ls.texts[k], add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        classes.extend([k] * len(piece))
    keep = max(max_length - 1, 0)
    return ids[:keep] + [tokenizer.eos_token_id], classes[:keep] + [end_class]


def _pad_rows(rows: list, classes: list, device, dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image (T_i, C) rows and class lists -> embeds (B, T, C), mask (B, T), classes (B, T)."""
    t = max(r.shape[0] for r in rows)
    embeds = torch.zeros(len(rows), t, rows[0].shape[-1], device=device, dtype=dtype)  # (B, T, C)
    mask = torch.zeros(len(rows), t, dtype=torch.bool, device=device)  # (B, T)
    cls = torch.full((len(rows), t), DROP, dtype=torch.long, device=device)  # (B, T)
    for i, (r, c) in enumerate(zip(rows, classes)):
        embeds[i, : r.shape[0]] = r.to(dtype)
        mask[i, : r.shape[0]] = True
        cls[i, : len(c)] = torch.tensor(c, dtype=torch.long, device=device)
    return embeds, mask, cls


@torch.no_grad()
def encode_dit_class_texts(pipe, class_names: list, label_set) -> tuple[Tensor, Tensor, ClassTokens]:
    """Class-text embeddings of an SD3 or FLUX pipeline, after the transformer's ``context_embedder``.

    Args:
        pipe: a ``StableDiffusion3Pipeline`` or ``FluxPipeline``.
        class_names: one list of class names per image (B lists).
        label_set: name, dict or ``LabelSet``.

    Returns:
        embeds (B, T, C) in the transformer's dtype (C = its inner width), mask (B, T) bool, and
        ``ClassTokens`` whose ``classes`` (B, T) give each token's class (``DROP``: none).
    """
    ls = as_label_set(label_set)
    if not class_names:
        raise ValueError("`class_names` has to hold at least one image's classes but is empty")
    device = pipe._execution_device
    transformer = pipe.transformer
    family = dit_family(transformer)
    rows, classes, ids = [], [], []
    if family == "sd3":
        clip = batch_class_tokens(pipe.tokenizer, class_names, ls, device=device)
        width = transformer.config.joint_attention_dim
        for i in range(len(class_names)):
            n = int(clip.mask[i].sum())
            tok = clip.ids[i : i + 1, :n]  # (1, T_clip)
            parts = [enc(tok, output_hidden_states=True).hidden_states[-2][0] for enc in (pipe.text_encoder, pipe.text_encoder_2)]
            part = torch.cat([p.float() for p in parts], dim=-1)  # (T_clip, C1 + C2)
            part = torch.nn.functional.pad(part, (0, width - part.shape[-1]))  # (T_clip, joint width)
            cls = clip.classes[i, :n].tolist()
            row_ids = tok[0].tolist()
            if getattr(pipe, "text_encoder_3", None) is not None:
                t5_ids, t5_cls = t5_class_tokens(pipe.tokenizer_3, class_names[i], ls, DROP, pipe.tokenizer_3.model_max_length)
                t5 = pipe.text_encoder_3(torch.tensor([t5_ids], device=device))[0][0].float()  # (T_t5, joint width)
                part = torch.cat([part, t5], dim=0)
                cls, row_ids = cls + t5_cls, row_ids + t5_ids
            rows.append(part)
            classes.append(cls)
            ids.append(row_ids)
    elif family == "flux":
        for names in class_names:
            t5_ids, t5_cls = t5_class_tokens(pipe.tokenizer_2, names, ls, 0, pipe.tokenizer_2.model_max_length)
            rows.append(pipe.text_encoder_2(torch.tensor([t5_ids], device=device))[0][0].float())  # (T, joint width)
            classes.append(t5_cls)
            ids.append(t5_ids)
    dtype = transformer.dtype
    ctx = [transformer.context_embedder(r.to(dtype)) for r in rows]  # (T_i, inner) each
    embeds, mask, cls = _pad_rows(ctx, classes, device, dtype)
    id_t = torch.zeros(cls.shape, dtype=torch.long, device=device)
    for i, r in enumerate(ids):
        id_t[i, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
    texts = [class_text(names, ls) for names in class_names]
    return embeds, mask, ClassTokens(id_t, mask, cls, texts)
