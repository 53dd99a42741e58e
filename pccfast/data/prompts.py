"""Prompt files in, :class:`PromptEntry` lists out; a built-in prompt bank.

Three prompt-file formats are read (the format is told by the first non-blank character,
``.txt`` files are always text):

- the reference's JSON list ``[{"id": 0, "prompt_sd": "...", "classes": ["person", "car"]}, ...]``
  (``../shared/data/datadif_prompts_voc.json``);
- JSON Lines, one such object per line (``prompt`` is accepted for ``prompt_sd``);
- text lines ``prompt | class, class`` or ``id | prompt | class, class`` (so a prompt holds no
  ``|``; ``#`` starts a comment line; blank lines are skipped; without an id the id is the
  line number).

Seeds. The reference runs ``for num_prompt, p in enumerate(prompt_list)``, skips entries whose
``prompt_sd`` is empty and seeds each image with ``2024 + num_prompt``: the position counts
the skipped entries too. :attr:`PromptEntry.index` is that position (0-based, over the records
of the file: JSON elements, JSON lines, text prompt lines; comments and blank lines are not
records), so ``seed = base_seed + index`` reproduces the reference and does not move with
``--start``/``--limit`` or sharding. ``start``/``limit`` count the kept entries.

Where. JSON gives no line numbers, so the JSON-list reader walks the elements itself and
knows each element's exact character offset, hence its exact line; the reference file is a
single line, so its messages also name the element (``FILE:LINE: entry N: ...``).

Checks: class names against the label set (case-insensitive; an unknown name gets close
matches or the class its synonym stands for), at least one class, ``background`` not listed
(it is label 0 in every mask), ids that are plain file names (:func:`pccfast.fileio.check_id`),
no id twice (ids compare as file names: ``5`` and ``"5"`` clash). Every error is a
:class:`PromptError` with one line ``FILE:LINE: what was expected``. Repeated class names are
kept as given (the reference's class text joins them as they are).

The command line over it is :mod:`pccfast.cli.prompts` (``python -m pccfast.prompts --help``).
"""
from __future__ import annotations

import bisect
import difflib
import functools
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass

from pccfast.data.fileio import check_id
from pccfast.data.labelsets import get_label_set
from pccfast.core.labelset import VOC_CLASSES, LabelSet

__all__ = [
    "PromptEntry",
    "PromptError",
    "read_prompts",
    "builtin_prompts",
    "prompt_bank",
    "class_synonyms",
    "find_classes",
    "captions_to_prompts",
    "SINGLE_TEMPLATES",
    "PAIR_TEMPLATES",
    "RELATION_TEMPLATES",
    "VOC_PAIRS",
    "VOC_SYNONYMS",
    "DEFAULT_PER_CLASS",
]


@dataclass(frozen=True)
class PromptEntry:
    """One prompt to generate."""

    id: str  # image id (a plain file name): <id>.jpg, <id>.png, ...
    prompt: str  # the text given to Stable Diffusion
    classes: tuple[str, ...]  # label-set class names, as in the file (repeats kept), background excluded
    index: int  # 0-based position of the record in the file; the image's seed is base_seed + index
    source: str  # where it came from: "FILE:LINE" ("FILE:LINE: entry N" for a JSON list, "builtin:N")


class PromptError(ValueError):
    """A prompt file that cannot be used; the message is one line ``FILE:LINE: what was expected``."""


# ------------------------------------------------------------------------------------------
# class names and synonyms
# ------------------------------------------------------------------------------------------
# Words in captions that stand for a VOC class (the class's own name and text are added
# automatically). Plurals ending in -s/-es are matched by the finder; irregular ones are listed.
VOC_SYNONYMS: dict[str, tuple[str, ...]] = {
    "aeroplane": ("airplane", "aeroplane", "plane", "airliner", "aircraft", "jet", "jetliner", "seaplane"),
    "bicycle": ("bicycle", "bike", "push bike", "mountain bike"),
    "bird": ("bird", "parrot", "duck", "seagull", "gull", "eagle", "owl", "pigeon", "swan", "goose", "geese",
             "sparrow", "hen", "rooster", "penguin", "flamingo", "hummingbird"),
    "boat": ("boat", "ship", "sailboat", "yacht", "canoe", "kayak", "ferry", "rowboat", "speedboat"),
    "bottle": ("bottle", "wine bottle", "water bottle", "beer bottle"),
    "bus": ("bus", "busses", "double decker", "double-decker"),
    "car": ("car", "taxi", "cab", "suv", "sedan", "jeep", "van", "hatchback", "convertible"),
    "cat": ("cat", "kitten", "kitty", "tabby"),
    "chair": ("chair", "armchair", "stool", "deck chair", "rocking chair", "office chair"),
    "cow": ("cow", "cattle", "calf", "calves", "bull", "ox", "oxen", "heifer"),
    "diningtable": ("dining table", "diningtable", "table", "kitchen table", "coffee table"),
    "dog": ("dog", "puppy", "puppies", "pup", "doggy"),
    "horse": ("horse", "pony", "ponies", "foal", "stallion", "mare"),
    "motorbike": ("motorbike", "motorcycle", "motor bike", "motor cycle", "scooter", "moped", "dirt bike"),
    "person": ("person", "persons", "people", "man", "men", "woman", "women", "child", "children", "kid",
               "boy", "girl", "baby", "babies", "guy", "lady", "ladies", "player", "toddler", "teenager",
               "family", "crowd", "skier", "surfer", "rider", "cyclist", "gentleman", "gentlemen", "officer", "policeman", "policemen"),
    "pottedplant": ("potted plant", "pot plant", "pottedplant", "plant", "houseplant", "house plant", "flower pot",
                    "flowerpot", "bonsai", "succulent", "potted flower", "cactus", "cacti"),
    "sheep": ("sheep", "lamb", "ewe"),
    "sofa": ("sofa", "couch", "settee", "loveseat", "futon"),
    "train": ("train", "locomotive", "tram", "streetcar", "subway", "railcar", "train car"),
    "tvmonitor": ("tv", "tvs", "television", "monitor", "tv monitor", "tvmonitor", "computer monitor",
                  "flat screen", "flatscreen"),
}
# Phrases that contain a class word but do not show that class; matched (and dropped) first.
_NOT_CLASSES = ("hot dog", "corn dog", "bird's eye", "birds eye", "table tennis", "time table", "power plant",
                "man made", "man-made", "horse power", "train of thought", "cat walk", "jet ski")

# Plausible VOC pairs for the prompt bank: (class, class, relation from the first to the second).
VOC_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("person", "horse", "riding"), ("person", "bicycle", "riding"), ("person", "motorbike", "riding"),
    ("person", "dog", "walking"), ("person", "boat", "rowing"), ("person", "sofa", "sitting on"),
    ("person", "chair", "sitting on"), ("person", "car", "standing next to"), ("person", "bus", "getting on"),
    ("person", "train", "waiting for"), ("person", "tvmonitor", "watching"), ("person", "bottle", "holding"),
    ("person", "diningtable", "sitting at"), ("person", "cat", "holding"), ("person", "sheep", "herding"),
    ("person", "cow", "feeding"), ("person", "aeroplane", "boarding"), ("person", "pottedplant", "watering"),
    ("dog", "sofa", "lying on"), ("cat", "sofa", "sleeping on"), ("cat", "chair", "sitting on"),
    ("bottle", "diningtable", "standing on"), ("pottedplant", "diningtable", "standing on"),
    ("tvmonitor", "sofa", "in front of"), ("chair", "diningtable", "pushed under"), ("sheep", "cow", "grazing with"),
    ("bus", "car", "driving behind"), ("bird", "boat", "perched on"), ("dog", "car", "looking out of"),
    ("horse", "cow", "standing in a field with"), ("cat", "tvmonitor", "sitting in front of"),
    ("bird", "pottedplant", "perched on"), ("train", "car", "passing"), ("aeroplane", "bird", "flying above"),
    ("dog", "cat", "playing with"), ("motorbike", "car", "parked next to"), ("bicycle", "car", "leaning against"),
    ("sheep", "dog", "guarded by"),
)
# Natural nouns for the VOC classes whose names are run together.
_VOC_NOUNS = {"aeroplane": "airplane", "diningtable": "dining table", "pottedplant": "potted plant",
              "tvmonitor": "tv monitor"}

SINGLE_TEMPLATES: tuple[str, ...] = (
    "a photo of {a}",
    "a close-up photo of {a}",
    "a high quality photo of {a}",
    "{a} in natural light",
    "a realistic picture of {a}",
    "a wide shot of {a}",
    "a snapshot of {a}",
    "{a}, seen from the side",
    "an old photo of {a}",
    "a colour photograph of {a}, sharp focus",
    "{a} in a typical setting",
    "a photo of {a} on a cloudy day",
)
PAIR_TEMPLATES: tuple[str, ...] = (
    "a photo of {a} and {b}",
    "{a} next to {b}",
    "{a} and {b} in the same scene",
    "a picture of {a} near {b}",
    "{a} beside {b}, natural light",
    "a realistic photo with {a} and {b}",
    "{a} in front of {b}",
    "a wide shot of {a} and {b}",
)
RELATION_TEMPLATES: tuple[str, ...] = (
    "{a} {rel} {b}",
    "a photo of {a} {rel} {b}",
    "{a} {rel} {b}, realistic photo",
    "a candid shot of {a} {rel} {b}",
)


def _is_voc(label_set: LabelSet) -> bool:
    return tuple(c.lower() for c in label_set.classes) == VOC_CLASSES


def class_synonyms(label_set: LabelSet) -> dict[str, str]:
    """Lower-case word or phrase -> class name, for every non-background class: its name, its
    text, the VOC table (for the VOC classes) and ``label_set.synonyms`` (``{class: [words]}``
    or ``{class: "word"}``). ValueError if ``synonyms`` names a class that is not in the set."""
    table: dict[str, str] = {}
    voc = _is_voc(label_set)
    for name, text in zip(label_set.classes[1:], label_set.texts[1:]):
        words = [name, text, name.replace("_", " ")]
        if voc:
            words += [_VOC_NOUNS.get(name, name), *VOC_SYNONYMS.get(name, ())]
        for w in words:
            table.setdefault(w.strip().lower(), name)
    lookup = {c.lower(): c for c in label_set.classes[1:]}
    for cls, words in (label_set.synonyms or {}).items():
        if str(cls).lower() not in lookup:
            raise ValueError(f"label set {label_set.name!r}: 'synonyms' names {cls!r}, which is not one of its classes")
        for w in [words] if isinstance(words, str) else list(words):
            if not isinstance(w, str) or not w.strip():
                raise ValueError(f"label set {label_set.name!r}: the synonyms of {cls!r} have to be non-empty strings but hold {w!r}")
            table[w.strip().lower()] = lookup[str(cls).lower()]
    return table


class _Classes:
    """Case-insensitive class lookup with helpful messages."""

    def __init__(self, label_set: LabelSet):
        self.label_set = label_set
        self.names = {c.lower(): c for c in label_set.classes}
        self.background = label_set.classes[0].lower()
        self._synonyms = None

    def suggestion(self, key: str) -> str:
        if self._synonyms is None:
            self._synonyms = class_synonyms(self.label_set)
        if key in self._synonyms:
            return f"; did you mean {self._synonyms[key]!r}?"
        close = difflib.get_close_matches(key, list(self.names) + list(self._synonyms), n=6, cutoff=0.6)
        found = list(dict.fromkeys(self.names.get(c) or self._synonyms[c] for c in close))[:3]
        if found:
            return "; did you mean " + " or ".join(repr(c) for c in found) + "?"
        if len(self.label_set.classes) <= 30:
            return f" (classes: {', '.join(self.label_set.classes[1:])})"
        return ""

    def check(self, raw, where: str) -> tuple[str, ...]:
        """Class names of one entry (a list of strings) as the label set spells them."""
        if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
            raise PromptError(f"{where}: 'classes' has to be a list of class names but is {_short(raw)}")
        out = []
        for c in raw:
            key = c.strip().lower()
            if key == self.background:
                raise PromptError(f"{where}: {c!r} is label 0 of every mask; list only the objects' classes")
            if key not in self.names:
                raise PromptError(
                    f"{where}: class {c!r} is not in label set {self.label_set.name!r}{self.suggestion(key)}"
                )
            out.append(self.names[key])
        if not out:
            raise PromptError(f"{where}: 'classes' has to name at least one class of label set {self.label_set.name!r}")
        return tuple(out)


def _short(value, n: int = 60) -> str:
    s = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return s if len(s) <= n else s[: n - 3] + "..."


# ------------------------------------------------------------------------------------------
# reading prompt files
# ------------------------------------------------------------------------------------------
_WS = re.compile(r"[ \t\n\r]*")


def _json_elements(text: str, path: str):
    """Yield (element, char offset) of a JSON list, parsing each element once."""
    dec = json.JSONDecoder()
    newlines = None

    def where(pos):
        nonlocal newlines
        if newlines is None:
            newlines = [m.start() for m in re.finditer("\n", text)]
        return f"{path}:{bisect.bisect_left(newlines, pos) + 1}"

    pos = _WS.match(text, 0).end()
    if text.startswith("\ufeff", pos):
        pos = _WS.match(text, pos + 1).end()
    if not text.startswith("[", pos):
        raise PromptError(f"{where(pos)}: expected a JSON list '[...]' of prompt objects")
    pos = _WS.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return
    while True:
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise PromptError(f"{where(e.pos)}: not valid JSON: {e.msg}") from None
        yield obj, pos
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            rest = _WS.match(text, pos + 1).end()
            if rest != len(text):
                raise PromptError(f"{where(rest)}: expected the end of the file after the JSON list")
            return
        else:
            raise PromptError(f"{where(pos)}: not valid JSON: expected ',' or ']' after a list element")


def _records_json(text: str, path: str):
    """(record, index, source) of the reference's JSON list."""
    line, last = 1, 0
    for i, (obj, pos) in enumerate(_json_elements(text, path)):
        line += text.count("\n", last, pos)  # offsets increase, so counting stays linear
        last = pos
        yield obj, i, f"{path}:{line}: entry {i}", i


def _records_jsonl(text: str, path: str):
    index = 0
    for n, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if not s:
            continue
        if n == 1 and s.startswith("\ufeff"):
            s = s[1:]
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}:{n}: not valid JSON: {e.msg} (JSON Lines: one object per line)") from None
        yield obj, index, f"{path}:{n}", n
        index += 1


def _records_text(text: str, path: str):
    index = 0
    for n, raw in enumerate(text.splitlines(), 1):
        s = raw.strip().lstrip("\ufeff") if n == 1 else raw.strip()
        if not s or s.startswith("#"):
            continue
        fields = [f.strip() for f in s.split("|")]
        if len(fields) == 2:
            rec = {"prompt": fields[0], "classes": fields[1]}
        elif len(fields) == 3:
            rec = {"id": fields[0], "prompt": fields[1], "classes": fields[2]}
            if not fields[0]:
                raise PromptError(f"{path}:{n}: expected 'id | prompt | class, class' but the id is empty")
        else:
            raise PromptError(
                f"{path}:{n}: expected 'prompt | class, class' or 'id | prompt | class, class' but found "
                f"{len(fields) - 1} '|' in {_short(s)}"
            )
        rec["classes"] = [c for c in (x.strip() for x in rec["classes"].split(",")) if c]
        yield rec, index, f"{path}:{n}", n
        index += 1


def _sniff(text: str, path: str) -> str:
    if path.lower().endswith(".txt"):
        return "text"
    head = text.lstrip("\ufeff \t\r\n")[:1]
    return {"[": "json", "{": "jsonl"}.get(head, "text")


def read_prompts(path: str, label_set, *, start: int = 0, limit: int | None = None,
                 format: str = "auto") -> list[PromptEntry]:
    """Prompts of a JSON-list, JSON Lines or text file (see the module docstring).

    Args:
        path: the prompt file.
        label_set: a :class:`LabelSet` or anything :func:`get_label_set` takes.
        start: skip this many kept entries (entries with an empty prompt are not counted).
        limit: return at most this many entries (None: all).
        format: "auto" (by content; ``.txt`` is text), "json", "jsonl" or "text".

    Returns: the kept entries in file order; ``index`` is the record's position in the file.
    Raises: PromptError (``FILE:LINE: ...``) on any defect, anywhere in the file (the whole
    file is checked whatever ``start``/``limit``); ValueError for bad arguments.
    """
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"`start` has to be an int >= 0 but is {start!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"`limit` has to be None or an int >= 0 but is {limit!r}")
    if format not in ("auto", "json", "jsonl", "text"):
        raise ValueError(f"`format` has to be 'auto', 'json', 'jsonl' or 'text' but is {format!r}")
    label_set = get_label_set(label_set)
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise PromptError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise PromptError(f"{path}: cannot be read: {e.strerror or e}") from None
    fmt = _sniff(text, path) if format == "auto" else format
    records = {"json": _records_json, "jsonl": _records_jsonl, "text": _records_text}[fmt](text, path)
    classes = _Classes(label_set)
    seen: dict[str, str] = {}
    out: list[PromptEntry] = []
    for rec, index, where, default_id in records:
        if not isinstance(rec, dict):
            raise PromptError(f"{where}: expected an object with 'id', 'prompt_sd' and 'classes' but found {_short(rec)}")
        key = "prompt_sd" if "prompt_sd" in rec else "prompt"
        if key not in rec:
            raise PromptError(f"{where}: expected a 'prompt_sd' (or 'prompt') field; the object has {sorted(rec)}")
        prompt = rec[key]
        if not isinstance(prompt, str):
            raise PromptError(f"{where}: '{key}' has to be a string but is {_short(prompt)}")
        if not prompt.strip():
            continue  # the reference skips empty prompts; the position still counts for the seed
        raw_id = rec.get("id", default_id)
        if isinstance(raw_id, bool) or not isinstance(raw_id, (int, str)):
            raise PromptError(f"{where}: 'id' has to be an int or a string but is {_short(raw_id)}")
        try:
            sid = check_id(raw_id)
        except ValueError as e:
            raise PromptError(f"{where}: {e}") from None
        if sid in seen:
            raise PromptError(f"{where}: duplicate id {sid!r} (first at {seen[sid]}); ids name the output files")
        seen[sid] = where
        if "classes" not in rec:
            raise PromptError(f"{where}: expected a 'classes' list of class names")
        out.append(PromptEntry(sid, prompt, classes.check(rec["classes"], where), index, where))
    return out[start:] if limit is None else out[start : start + limit]


# ------------------------------------------------------------------------------------------
# the prompt bank
# ------------------------------------------------------------------------------------------
DEFAULT_PER_CLASS = 20  # prompts per class of builtin_prompts(label_set) (400 for VOC)


def _noun(label_set: LabelSet, i: int) -> str:
    name = label_set.classes[i]
    if _is_voc(label_set):
        return _VOC_NOUNS.get(name, name)
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
    if _is_voc(label_set):
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
    """
    label_set = get_label_set(label_set)
    k = label_set.num_classes - 1
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ValueError(f"`n` has to be None or an int >= 0 but is {n!r}")
    per_class = DEFAULT_PER_CLASS if n is None else max(1, math.ceil(n / max(k, 1)))
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
    if _is_voc(label_set):
        for phrase in _NOT_CLASSES:
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
    than ``per_class`` kept captions (file order)."""
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
