"""The on-disk edge: dataset layouts, manifests, writers, readers. ``load_dataset`` (from
:mod:`pccfast.data.readers`) loads on first use."""
from __future__ import annotations

__all__ = ["load_dataset"]


def __getattr__(name: str):
    if name == "load_dataset":
        from pccfast.data.readers import load_dataset

        return load_dataset
    raise AttributeError(f"module 'pccfast.data' has no attribute {name!r}")
