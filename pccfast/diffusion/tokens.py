"""Class texts and the token -> class map of the open-vocabulary class attention.

An image's class text is its classes' label-set texts joined by spaces, in the order given
(duplicates kept), e.g. ["person", "pottedplant"] -> "person pot plant". It is encoded
unpadded with the start (SoT) and end (EoT) tokens. Token classes: SoT -> 0 (background),
every token of a class's text -> that class (so "pot" and "plant", and each piece of a word
that the tokenizer splits, map to pottedplant), EoT and padding -> -1 (dropped).

The alignment does not depend on word offsets: each class text is encoded on its own and
the pieces are concatenated between SoT and EoT. CLIP's pre-tokeniser splits at spaces
before byte-pair encoding, so this equals encoding the joined text (checked in the tests),
for the fast and the slow CLIPTokenizer alike.

``encode_class_texts`` encodes the class texts with the pipeline's own tokenizer and text
encoder (any pipeline with ``tokenizer``, ``text_encoder`` and ``unet``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pccfast.core.labelset import LabelSet, as_label_set

__all__ = [
    "ClassTokens",
    "class_text",
    "class_tokens",
    "batch_class_tokens",
    "encode_class_texts",
    "encode_class_texts_sdxl",
    "tokens_to_classes",
    "DROP",
]

DROP = -1  # token class of EoT and padding


@dataclass
class ClassTokens:
    """Encoded class texts of a batch, right-padded to the longest.

    ``ids`` (B, T) long, ``mask`` (B, T) bool (True = real token, SoT and EoT included),
    ``classes`` (B, T) long (class index per token; ``DROP`` for EoT and padding),
    ``texts``: the class text of each image.
    """

    ids: Tensor
    mask: Tensor
    classes: Tensor
    texts: list


def class_text(class_names, label_set) -> str:
    """The class text of one image: its classes' texts joined by spaces (order and repeats kept)."""
    ls = as_label_set(label_set)
    return " ".join(ls.text_of(c) for c in class_names)


def _max_length(tokenizer) -> int:
    n = getattr(tokenizer, "model_max_length", 77)
    return 77 if n is None or n > 10_000 else int(n)  # "infinite" sentinel of unconfigured tokenizers


def class_tokens(tokenizer, class_names, label_set) -> tuple[list[int], list[int]]:
    """Token ids and token classes of one image's class text.

    Args:
        tokenizer: a CLIP tokenizer (fast or slow) with ``bos_token_id``/``eos_token_id``.
        class_names: the image's class names (label-set names; order and repeats kept).
        label_set: name, dict or ``LabelSet``.

    Returns:
        ids: [SoT, tokens of class 1's text, tokens of class 2's text, ..., EoT], truncated
        (before EoT) to the tokenizer's ``model_max_length``; classes: same length, 0 for SoT,
        the class index for every text token, ``DROP`` for EoT.
    """
    ls: LabelSet = as_label_set(label_set)
    if isinstance(class_names, str):
        raise TypeError(f"`class_names` has to be a list of class names but is the string {class_names!r}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError("`tokenizer` has to define start and end tokens (bos_token_id, eos_token_id)")
    ids, classes = [bos], [0]
    for name in class_names:
        k = ls.index(name)
        piece = tokenizer(ls.texts[k], add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        classes.extend([k] * len(piece))
    keep = _max_length(tokenizer) - 1  # room for EoT
    return ids[:keep] + [eos], classes[:keep] + [DROP]


def batch_class_tokens(tokenizer, class_names: list, label_set, device="cpu") -> ClassTokens:
    """``class_tokens`` for every image, right-padded (pad id, mask False, class ``DROP``).

    Args:
        class_names: one list of class names per image.

    Returns:
        ``ClassTokens`` with (B, T) tensors on ``device``, T = the longest encoded text.
    """
    ls = as_label_set(label_set)
    encoded = [class_tokens(tokenizer, names, ls) for names in class_names]
    if not encoded:
        raise ValueError("`class_names` has to hold at least one image's classes but is empty")
    t = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(encoded), t), pad, dtype=torch.long)  # (B, T)
    classes = torch.full((len(encoded), t), DROP, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(encoded), t), dtype=torch.bool)  # (B, T)
    for i, (row, cls) in enumerate(encoded):
        ids[i, : len(row)] = torch.tensor(row)
        classes[i, : len(cls)] = torch.tensor(cls)
        mask[i, : len(row)] = True
    texts = [class_text(names, ls) for names in class_names]
    return ClassTokens(ids.to(device), mask.to(device), classes.to(device), texts)


@torch.no_grad()
def encode_class_texts(pipe, class_names: list, label_set) -> tuple[Tensor, Tensor, ClassTokens]:
    """Class-text embeddings with the pipeline's own tokenizer and text encoder.

    Each text is encoded on its own, unpadded (as the reference does), then zero-padded to the
    longest text of the batch.

    Args:
        pipe: a pipeline with ``tokenizer``, ``text_encoder``, ``unet`` and ``_execution_device``.
        class_names: one list of class names per image (B lists).
        label_set: name, dict or ``LabelSet``.

    Returns:
        embeds (B, T, C) in the UNet's dtype, mask (B, T) bool, the ``ClassTokens``.
    """
    device = pipe._execution_device
    tok = batch_class_tokens(pipe.tokenizer, class_names, label_set, device=device)
    lengths = tok.mask.sum(dim=1).tolist()
    rows = [pipe.text_encoder(tok.ids[i : i + 1, : lengths[i]])[0][0] for i in range(len(lengths))]  # (T_i, C) each
    embeds = torch.zeros(len(rows), tok.ids.shape[1], rows[0].shape[-1], device=device, dtype=pipe.unet.dtype)  # (B, T, C)
    for i, r in enumerate(rows):
        embeds[i, : r.shape[0]] = r.to(embeds.dtype)
    return embeds, tok.mask, tok


@torch.no_grad()
def encode_class_texts_sdxl(pipe, class_names: list, label_set) -> tuple[Tensor, Tensor, ClassTokens]:
    """Class-text embeddings as SDXL encodes prompts for cross-attention: each text encoder's
    penultimate hidden states (``hidden_states[-2]``), concatenated over the encoders (SDXL:
    768 + 1280 = 2048 channels); each text unpadded with its start and end tokens.

    Args:
        pipe: a pipeline with ``tokenizer``/``text_encoder`` and ``tokenizer_2``/``text_encoder_2``
            (either pair may be None, as in the SDXL refiner), ``unet`` and ``_execution_device``.
        class_names, label_set: as for ``encode_class_texts``.

    Returns:
        embeds (B, T, C_1 + C_2) in the UNet's dtype, mask (B, T) bool, the first tokenizer's
        ``ClassTokens`` (both tokenizers have to give the same token count per text).
    """
    device = pipe._execution_device
    pairs = [(t, e) for t, e in ((getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
                                 (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None)))
             if t is not None and e is not None]
    if not pairs:
        raise ValueError("`pipe` has to have a tokenizer and text encoder (tokenizer/text_encoder or tokenizer_2/text_encoder_2)")
    toks = [batch_class_tokens(t, class_names, label_set, device=device) for t, _ in pairs]
    tok = toks[0]
    for other in toks[1:]:
        if not torch.equal(other.mask, tok.mask):
            raise ValueError("the two tokenizers split the class texts into different numbers of tokens "
                             f"({tok.mask.sum(1).tolist()} and {other.mask.sum(1).tolist()})")
    lengths = tok.mask.sum(dim=1).tolist()
    rows = []
    for i, n in enumerate(lengths):
        parts = [enc(t.ids[i : i + 1, :n], output_hidden_states=True).hidden_states[-2][0]  # (T_i, C_j)
                 for t, (_, enc) in zip(toks, pairs)]
        rows.append(torch.cat([p.to(parts[0].dtype) for p in parts], dim=-1))  # (T_i, C_1 + C_2)
    embeds = torch.zeros(len(rows), tok.ids.shape[1], rows[0].shape[-1], device=device, dtype=pipe.unet.dtype)  # (B, T, C)
    for i, r in enumerate(rows):
        embeds[i, : r.shape[0]] = r.to(embeds.dtype)
    return embeds, tok.mask, tok


def tokens_to_classes(maps: Tensor, token_classes: Tensor, num_classes: int) -> Tensor:
    """Per-class maps from per-token maps: a class takes the element-wise max over its tokens.

    Args:
        maps: (B, T, h, w) per-token maps.
        token_classes: (B, T) long, class index per token or ``DROP`` (EoT, padding).
        num_classes: K, the label set's number of classes.

    Returns:
        (B, K, h, w) in ``maps``' dtype; classes without tokens are all zero.
    """
    if maps.ndim != 4 or token_classes.shape != maps.shape[:2]:
        raise ValueError(
            f"`maps` (B, T, h, w) and `token_classes` (B, T) have to agree but have shapes "
            f"{tuple(maps.shape)} and {tuple(token_classes.shape)}"
        )
    if token_classes.numel() and int(token_classes.max()) >= num_classes:
        raise ValueError(f"`token_classes` have to lie below `num_classes` ({num_classes}) but reach {int(token_classes.max())}")
    b, t, h, w = maps.shape
    idx = torch.where(token_classes < 0, num_classes, token_classes).to(maps.device)  # (B, T), dropped -> extra row
    idx = idx[:, :, None].expand(b, t, h * w)  # (B, T, h*w)
    out = maps.new_zeros(b, num_classes + 1, h * w)  # (B, K+1, h*w)
    out.scatter_reduce_(1, idx, maps.reshape(b, t, h * w), reduce="amax", include_self=False)
    return out[:, :num_classes].reshape(b, num_classes, h, w)  # (B, K, h, w)
