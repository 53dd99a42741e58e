"""Label-set files (JSON, or YAML with pyyaml) and the one resolver every command uses.

The label set itself (classes, texts, palette, the built-in VOC and COCO sets, validation)
is pure data in :mod:`pccfast.core.labelset`; this module is its file edge.
"""
from __future__ import annotations

import json
import os

from pccfast.core.labelset import BUILTIN, LabelSet, as_label_set, label_set_from_dict

__all__ = ["get_label_set", "load_label_set", "check_label_set_file", "ensure_label_set_file"]


def get_label_set(name_or_path: "str | LabelSet | dict") -> LabelSet:
    """``voc``, ``coco``, a path to a JSON/YAML label-set file, a dict, or a LabelSet."""
    if isinstance(name_or_path, str) and name_or_path.lower() not in BUILTIN:
        if os.path.isfile(name_or_path):
            return load_label_set(name_or_path)
        raise ValueError(
            f"`label_set` has to be one of {', '.join(BUILTIN)} or an existing JSON/YAML file but is {name_or_path!r}"
        )
    return as_label_set(name_or_path)


def load_label_set(path: str) -> LabelSet:
    """Read a label-set file (JSON, or YAML with pyyaml installed); one-line ValueError if invalid."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"{path}: reading YAML label sets needs pyyaml: pip install 'pccfast[yaml]'") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    return label_set_from_dict(data, path)


def check_label_set_file(out: str, label_set: LabelSet) -> None:
    """Refuse (ValueError naming the file and both sets) a run with another label set than the
    dataset's ``labelset.json``; reads only."""
    from pccfast.data.layout import LABELSET

    path = os.path.join(out, LABELSET)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        try:
            have = json.load(f)
        except json.JSONDecodeError:
            return  # a torn file (killed writer) is written again
    if isinstance(have, dict) and have.get("classes") != list(label_set.classes):
        raise ValueError(
            f"{path}: the dataset was made with label set {have.get('name')!r} "
            f"({len(have.get('classes') or [])} classes), not {label_set.name!r}; use another --out"
        )


def ensure_label_set_file(out: str, label_set: LabelSet) -> None:
    """Check ``out/labelset.json`` (:func:`check_label_set_file`) and write it if it is not there:
    a dataset is made with one label set."""
    from pccfast.data.fileio import atomic_write_bytes
    from pccfast.data.layout import LABELSET

    check_label_set_file(out, label_set)
    path = os.path.join(out, LABELSET)
    if not os.path.isfile(path) or not _readable_json(path):
        atomic_write_bytes(path, (json.dumps(label_set.to_json(), indent=1) + "\n").encode())


def _readable_json(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
        return True
    except (OSError, json.JSONDecodeError):
        return False
