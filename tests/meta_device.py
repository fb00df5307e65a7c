"""Meta tensors as a stand-in for a GPU in CPU tests: they have shapes but no data, so any device-to-host read
(``.item()``, ``bool(t)``, a boolean index), which on a GPU would stall the queue, raises."""

from __future__ import annotations

import contextlib

import pytest
import torch

_AUTOCAST = torch.autocast


class _MetaSafeAutocast:
    """``torch.autocast`` that is a no-op for meta tensors (autocast has no meta backend)."""

    def __init__(self, device_type: str, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self.inner = contextlib.nullcontext() if device_type == "meta" else _AUTOCAST(device_type, *args, **kwargs)

    def __enter__(self) -> None:
        self.inner.__enter__()

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self.inner.__exit__(*exc)


def allow_meta_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the code under test enter ``torch.autocast(device_type="meta", ...)`` for the rest of the test."""
    monkeypatch.setattr(torch, "autocast", _MetaSafeAutocast)
