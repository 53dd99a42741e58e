"""The built-in prompt bank (templates over a label set's classes and plausible pairs) and
captions turned into prompts (:func:`captions_to_prompts`).

:func:`builtin_prompts` never returns an empty list: ``n`` < 1, or a label set with no class
besides background, is a ValueError. :func:`prompt_bank` with ``per_class=0`` and
:func:`captions_to_prompts` of captions naming no class do return ``[]``; ``python -m
pccfast.prompts`` refuses both (:mod:`pccfast.cli.prompts`)."""
from __future__ import annotations

import functools
import json
import math
import random
import re
from collections import Counter

from pccfast.core.labelset import LabelSet
from pccfast.data.labelsets import get_label_set
from pccfast.data.prompt_words import (
    NOT_CLASSES, PAIR_TEMPLATES, RELATION_TEMPLATES, SINGLE_TEMPLATES, VOC_NOUNS, VOC_PAIRS, class_synonyms, is_voc,
)
from pccfast.data.prompts import PromptEntry

__all__ = ["DEFAULT_PER_CLASS", "prompt_bank", "builtin_prompts", "find_classes", "captions_to_prompts"]


DEFAULT_PER_CLASS = 20  # prompts per class of builtin_prompts(label_set) (400 for VOC)


def _noun(label_set: LabelSet, i: int) -> str:
    name = label_set.classes[i]
    if is_voc(label_set):
        return VOC_NOUNS.get(name, name)
    return label_set.texts[i]


def _article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


class _Deck:
    """Draws items in seeded random order, each once per round: counts never differ by more than one."""

    def __init__(self, items, rng: random.Random):
        self.items, self.rng, self.left = list(items), rng, []

    def draw(self):
        if not self.left:
            self.left = self.rng.sample(self.items, len(self.items))
        return self.left.pop()


def _pair_table(label_set: LabelSet) -> dict[str, list[tuple[str, str, str]]]:
    """class -> [(first, second, relation)] plausible pairs containing it ('' = no relation)."""
    table: dict[str, list] = {c: [] for c in label_set.classes[1:]}
    if is_voc(label_set):
        names = {c.lower(): c for c in label_set.classes}
        for a, b, rel in VOC_PAIRS:
            table[names[a]].append((names[a], names[b], rel))
            table[names[b]].append((names[a], names[b], rel))
    return table


def prompt_bank(label_set, per_class: int, *, seed: int = 0, pair_share: float = 0.4) -> list[dict]:
    """A deterministic prompt bank: ``per_class`` prompts anchored on each non-background class.

    About ``pair_share`` of each class's prompts name a second class: for VOC a plausible
    partner from :data:`VOC_PAIRS` (half of them with its relation, e.g. "a person riding a
    horse"), for other label sets a partner drawn by a generator seeded with ``seed``.
    Templates are dealt from shuffled decks, so each is used equally often (to within one
    per deck round) and none dominates. The list is ordered round-robin over the classes
    (every prefix is balanced).

    Returns: records ``{"id": int, "prompt": str, "classes": [names], "template": str}``.
    """
    label_set = get_label_set(label_set)
    if not isinstance(per_class, int) or per_class < 0:
        raise ValueError(f"`per_class` has to be an int >= 0 but is {per_class!r}")
    if not 0.0 <= pair_share <= 1.0:
        raise ValueError(f"`pair_share` has to be in [0, 1] but is {pair_share}")
    rng = random.Random(seed)
    names = list(label_set.classes[1:])
    if not names:
        raise ValueError(f"label set {label_set.name!r} has no class besides background")
    noun = {c: _noun(label_set, i) for i, c in enumerate(label_set.classes) if i > 0}
    pairs = _pair_table(label_set)
    singles, generic, relation = _Deck(SINGLE_TEMPLATES, rng), _Deck(PAIR_TEMPLATES, rng), _Deck(RELATION_TEMPLATES, rng)
    partners = {c: _Deck(range(len(pairs[c])), rng) if pairs[c] else None for c in names}
    out = []
    for j in range(per_class):  # round-robin, drawing in output order: a smaller bank is a prefix of a bigger one
        # pair iff the running pair count falls behind the share: exact shares in every prefix
        is_pair = len(names) > 1 and math.floor((j + 1) * pair_share) > math.floor(j * pair_share)
        for c in names:
            if not is_pair:
                t = singles.draw()
                text, cls = t.format(a=_article(noun[c])), [c]
            else:
                if partners[c] is not None:
                    a, b, rel = pairs[c][partners[c].draw()]
                else:
                    a, b, rel = c, rng.choice([x for x in names if x != c]), ""
                    if rng.random() < 0.5:
                        a, b = b, a
                if rel and rng.random() < 0.5:
                    t = relation.draw()
                    text = t.format(a=_article(noun[a]), b=_article(noun[b]), rel=rel)
                else:
                    t = generic.draw()
                    text = t.format(a=_article(noun[a]), b=_article(noun[b]))
                cls = [a, b]
            out.append({"id": len(out), "prompt": text, "classes": cls, "template": t})
    return out


def builtin_prompts(label_set, n: int | None = None) -> list[PromptEntry]:
    """The built-in prompt bank of a label set (what generate uses without ``--prompts``).

    ``n=None``: :data:`DEFAULT_PER_CLASS` prompts per class; else the first ``n`` prompts of a
    bank just big enough (round-robin over the classes, so any prefix is balanced). Seed 0.

    Returns: a non-empty list. Raises ValueError for ``n`` < 1 (an empty bank is never
    returned) and for a label set with no class besides background.
    """
    label_set = get_label_set(label_set)
    k = label_set.num_classes - 1
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"`n` has to be None or an int >= 1 but is {n!r}")
    if k < 1:
        raise ValueError(f"`label_set` {label_set.name!r} has no class besides background (classes: "
                         f"{list(label_set.classes)}), so there is nothing to prompt for")
    per_class = DEFAULT_PER_CLASS if n is None else max(1, math.ceil(n / k))
    recs = prompt_bank(label_set, per_class, seed=0)
    recs = recs if n is None else recs[:n]
    return [PromptEntry(str(r["id"]), r["prompt"], tuple(r["classes"]), i, f"builtin:{i}") for i, r in enumerate(recs)]


# ------------------------------------------------------------------------------------------
# captions -> prompts
# ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _finder(label_set: LabelSet, synonyms_key: str):
    """(pattern, term -> class or None); ``synonyms_key`` keys the cache on the synonyms too
    (LabelSet's equality ignores them)."""
    table = class_synonyms(label_set)
    terms = dict(table)
    if is_voc(label_set):
        for phrase in NOT_CLASSES:
            terms[phrase] = None
    words = sorted(terms, key=len, reverse=True)  # longest first: "dining table" before "table"
    pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(w) for w in words) + r")(?:s|es)?(?!\w)", re.IGNORECASE)
    return pattern, {w.lower(): c for w, c in terms.items()}


def find_classes(text: str, label_set) -> list[str]:
    """Class names found in ``text`` (names, texts and synonyms, -s/-es plurals), in order of
    first appearance, each once. "a man riding a horse" -> ["person", "horse"] for VOC."""
    label_set = get_label_set(label_set)
    pattern, terms = _finder(label_set, json.dumps(label_set.synonyms, sort_keys=True, default=str))
    found = []
    for m in pattern.finditer(text):
        c = terms.get(m.group(1).lower())
        if c is not None and c not in found:
            found.append(c)
    return found


def captions_to_prompts(lines, label_set, *, per_class: int | None = None) -> list[dict]:
    """Caption lines -> prompt records ``{"id", "prompt", "classes"}``; captions naming no class
    are dropped. With ``per_class``, a caption is kept only while one of its classes has fewer
    than ``per_class`` kept captions (file order). Returns ``[]`` when no caption names a class
    (the caller decides whether that is an error; the prompts command says it is)."""
    label_set = get_label_set(label_set)
    counts: Counter = Counter()
    out = []
    for line in lines:
        caption = " ".join(line.split())
        if not caption or caption.startswith("#"):
            continue
        found = find_classes(caption, label_set)
        if not found:
            continue
        if per_class is not None and all(counts[c] >= per_class for c in found):
            continue
        counts.update(found)
        out.append({"id": len(out), "prompt": caption, "classes": found})
    return out
