"""Prompt files in, :class:`PromptEntry` lists out (the built-in bank is :mod:`pccfast.data.prompt_bank`).

Three prompt-file formats are read (the format is told by the first non-blank character,
``.txt`` files are always text):

- the reference's JSON list ``[{"id": 0, "prompt_sd": "...", "classes": ["person", "car"]}, ...]``
  (``../shared/data/datadif_prompts_voc.json``);
- JSON Lines, one such object per line (``prompt`` is accepted for ``prompt_sd``); in both JSON
  formats an optional ``negative_prompt`` string is the prompt's negative prompt (the
  unconditional half of classifier-free guidance);
- text lines ``prompt | class, class`` or ``id | prompt | class, class`` (so a prompt holds no
  ``|``; ``#`` starts a comment line; blank lines are skipped; without an id the id is the
  line number).

Seeds. The reference runs ``for num_prompt, p in enumerate(prompt_list)``, skips entries whose
``prompt_sd`` is empty and seeds each image with ``2024 + num_prompt``: the position counts
the skipped entries too. :attr:`PromptEntry.index` is that position (0-based, over the records
of the file: JSON elements, JSON lines, text prompt lines; comments and blank lines are not
records), so ``seed = base_seed + index`` reproduces the reference and does not move with
``--start``/``--limit`` or sharding. ``start``/``limit`` count the kept entries.

Empty prompts. An entry whose prompt is empty (or only spaces) is skipped, as the reference
does, but not silently: ``read_prompts(..., warn=callback)`` calls ``callback`` once per
skipped entry, in file order, with the line ``FILE:LINE: empty prompt, skipped (its position
still counts for the seeds)`` (``FILE:LINE: entry N: ...`` for a JSON list), after the whole
file has been checked (a file that raises warns about nothing). Input that yields no prompt
is an error, never an empty list: ``FILE: holds no prompts`` (no records: an empty file,
``[]``, only comments and blank lines), ``FILE: all N prompts are empty`` (``FILE: its only
prompt is empty``), and ``FILE: `--start` S is beyond its K prompts`` (``start`` at or past
the kept entries).

Where. JSON gives no line numbers, so the JSON-list reader walks the elements itself and
knows each element's exact character offset, hence its exact line; the reference file is a
single line, so its messages also name the element (``FILE:LINE: entry N: ...``).

Checks: class names against the label set (case-insensitive; an unknown name gets close
matches or the class its synonym stands for), at least one class, ``background`` not listed
(it is label 0 in every mask), ids that are plain file names (:func:`pccfast.fileio.check_id`),
no id twice (ids compare as file names: ``5`` and ``"5"`` clash). Every error is a
:class:`PromptError` with one line ``FILE:LINE: what was expected`` (``FILE: ...`` for the
empty-input errors above). Repeated class names are kept as given (the reference's class
text joins them as they are).

The command line over it is :mod:`pccfast.cli.prompts` (``python -m pccfast.prompts --help``).
"""
from __future__ import annotations

import bisect
import difflib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from pccfast.data.fileio import check_id
from pccfast.data.labelsets import get_label_set
from pccfast.core.labelset import LabelSet
from pccfast.data.prompt_words import class_synonyms

__all__ = ["EMPTY_PROMPT", "PromptEntry", "PromptError", "read_prompts"]


@dataclass(frozen=True)
class PromptEntry:
    """One prompt to generate."""

    id: str  # image id (a plain file name): <id>.jpg, <id>.png, ...
    prompt: str  # the text given to Stable Diffusion
    classes: tuple[str, ...]  # label-set class names, as in the file (repeats kept), background excluded
    index: int  # 0-based position of the record in the file; the image's seed is base_seed + index
    source: str  # where it came from: "FILE:LINE" ("FILE:LINE: entry N" for a JSON list, "builtin:N")
    negative_prompt: "str | None" = None  # JSON/JSONL field ``negative_prompt``: the text of the unconditional half


class PromptError(ValueError):
    """A prompt file that cannot be used; the message is one line ``FILE:LINE: what was expected``
    (``FILE: ...`` when the whole file is at fault, e.g. ``FILE: holds no prompts``)."""


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


EMPTY_PROMPT = "empty prompt, skipped (its position still counts for the seeds)"  # warn's text after "FILE:LINE: "


def read_prompts(path: str, label_set, *, start: int = 0, limit: int | None = None, format: str = "auto",
                 warn: Callable[[str], None] | None = None) -> list[PromptEntry]:
    """Prompts of a JSON-list, JSON Lines or text file (see the module docstring).

    Args:
        path: the prompt file.
        label_set: a :class:`LabelSet` or anything :func:`get_label_set` takes.
        start: skip this many kept entries (entries with an empty prompt are not counted);
            has to be below the number of kept entries.
        limit: return at most this many entries, >= 1 (None: all).
        format: "auto" (by content; ``.txt`` is text), "json", "jsonl" or "text".
        warn: called as ``warn(line)`` once per skipped empty prompt, in file order, with
            ``"FILE:LINE: empty prompt, skipped (its position still counts for the seeds)"``
            (``"FILE:LINE: entry N: empty prompt, ..."`` for a JSON list); only when the file
            is read without error. None: skipped silently.

    Returns: the kept entries in file order (never empty); ``index`` is the record's position
    in the file.
    Raises: PromptError (one line ``FILE:LINE: ...`` or ``FILE: ...``) on any defect, anywhere
    in the file (the whole file is checked whatever ``start``/``limit``), and when nothing is
    left: ``FILE: holds no prompts``, ``FILE: all N prompts are empty``, ``FILE: `--start` S is
    beyond its K prompts``; ValueError for bad arguments, TypeError for a ``warn`` that is not
    callable.
    """
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"`start` has to be an int >= 0 but is {start!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`limit` has to be None or an int >= 1 but is {limit!r}")
    if format not in ("auto", "json", "jsonl", "text"):
        raise ValueError(f"`format` has to be 'auto', 'json', 'jsonl' or 'text' but is {format!r}")
    if warn is not None and not callable(warn):
        raise TypeError(f"`warn` has to be None or a callable taking one line but is {type(warn).__name__}")
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
    empty: list[str] = []  # where each skipped empty prompt is
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
            empty.append(where)  # the reference skips empty prompts; the position still counts for the seed
            continue
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
        negative = rec.get("negative_prompt")
        if negative is not None and not isinstance(negative, str):
            raise PromptError(f"{where}: 'negative_prompt' has to be a string or null but is {_short(negative)}")
        out.append(PromptEntry(sid, prompt, classes.check(rec["classes"], where), index, where, negative))
    if not out and not empty:
        raise PromptError(f"{path}: holds no prompts")
    if not out:
        raise PromptError(f"{path}: all {len(empty)} prompts are empty" if len(empty) > 1 else f"{path}: its only prompt is empty")
    if start >= len(out):
        skipped = f" ({_plural(len(empty), 'empty prompt')} not counted)" if empty else ""
        raise PromptError(f"{path}: `--start` {start} is beyond its {_plural(len(out), 'prompt')}{skipped}")
    if warn is not None:
        for where in empty:
            warn(f"{where}: {EMPTY_PROMPT}")
    return out[start:] if limit is None else out[start : start + limit]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
