"""Provenance: ``OUT/run.json`` records what defines the samples of a dataset, and a run that
would make other samples into it is refused.

``run.json`` holds ``defining`` (model, dtype, size, steps, guidance, scheduler, seed rule,
label set, labeller settings, JPEG quality, prompt-file digest: anything that changes a
sample's files), ``versions`` (pccfast, diffusers, torch: informative, not compared) and when
it was written. Settings that do not change samples (batch size, workers, progress, which
extra files are saved) are not in it and may differ between runs into one dataset.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from importlib import metadata

from pccfast.data.fileio import atomic_write_bytes
from pccfast.data.layout import RUN_FILE

__all__ = ["file_digest", "versions", "check_run_file", "write_run_file", "first_difference", "OVERWRITE_HINT"]

OVERWRITE_HINT = "use another --out, or --overwrite to redo the samples whose records differ"


def file_digest(path: str) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def versions() -> dict:
    """Installed versions of pccfast, diffusers, transformers and torch (None if absent)."""
    out = {}
    for name in ("pccfast", "diffusers", "transformers", "torch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def first_difference(have: dict, want: dict, keys=None) -> tuple[str, object, object] | None:
    """The first key (in ``want``'s order, or ``keys``) whose value differs between two records
    that both have it: ``(key, have's value, want's value)``, or None."""
    for key in keys if keys is not None else want:
        if key in have and key in want and _norm(have[key]) != _norm(want[key]):
            return key, have[key], want[key]
    return None


def _norm(value):
    return json.loads(json.dumps(value))  # tuples and lists compare alike, as they read back


def _read(out: str) -> dict | None:
    path = os.path.join(out, RUN_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); it records how the dataset was made") from None
    if not isinstance(data, dict) or not isinstance(data.get("defining"), dict):
        raise ValueError(f"{path}: has to be an object with a 'defining' object")
    return data


def check_run_file(out: str, defining: dict, *, overwrite: bool = False) -> None:
    """Refuse (ValueError, one line naming the setting and both values) a run whose defining
    settings differ from the dataset's ``run.json``; reads only. With ``overwrite`` a
    difference is allowed: the samples whose records differ are redone."""
    have = _read(out)
    if have is None or overwrite:
        return
    diff = first_difference(have["defining"], defining)
    if diff is not None:
        key, old, new = diff
        raise ValueError(f"{os.path.join(out, RUN_FILE)}: the dataset was made with {key} {old!r} but this run has "
                         f"{new!r}: {OVERWRITE_HINT}")


def write_run_file(out: str, defining: dict) -> None:
    """Write ``run.json`` unless it already records these defining settings."""
    have = _read(out)
    if have is not None and first_difference(have["defining"], defining) is None and \
            set(defining) <= set(have["defining"]):
        return
    data = {"defining": defining, "versions": versions(), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_bytes(os.path.join(out, RUN_FILE), (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode())
