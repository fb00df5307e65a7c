"""Meta tensors as a stand-in for a GPU in CPU tests: they have shapes but no data, so any device-to-host read
(``.item()``, ``bool(t)``, a boolean index), which on a GPU would stall the queue, raises."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


class HostToDeviceCopies(TorchDispatchMode):
    """Records every copy from a CPU tensor into a meta tensor as ``(non_blocking, shape)``: on a GPU a blocking
    one waits for every queued kernel first, so a step should make only non-blocking ones."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[bool, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN202
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in ("_to_copy", "copy_"):
            source, target = (args[1], args[0]) if name == "copy_" else (args[0], out)
            if source.device.type == "cpu" and target.device.type == "meta":
                non_blocking = args[2] if name == "copy_" and len(args) > 2 else kwargs.get("non_blocking", False)
                self.copies.append((bool(non_blocking), tuple(source.shape)))
        return out

    @property
    def blocking(self) -> list[tuple[int, ...]]:
        """Shapes of the blocking copies."""
        return [shape for non_blocking, shape in self.copies if not non_blocking]


class UntracedTensors(TorchDispatchMode):
    """Records every op that reads a meta tensor which neither the caller passed in (``inputs``) nor an earlier op
    made: one torch made from host data below the dispatcher, as for a Python list used as an index, which on a GPU
    is a blocking host-to-device copy that the recorded copies (:class:`HostToDeviceCopies`) never see."""

    def __init__(self, inputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.known = {id(t) for t in inputs}
        self.ops: list[str] = []
        self._made: list[list[torch.Tensor]] = []  # keeps each output alive, so that its id is not reused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN202
        read = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "meta" and id(t) not in self.known for t in read):
            self.ops.append(str(func))
        out = func(*args, **(kwargs or {}))
        made = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.known |= {id(t) for t in made}
        self._made.append(made)
        return out
