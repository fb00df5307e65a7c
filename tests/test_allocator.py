"""retain_freed_memory / trim_heap: freed large tensors stay mapped, until trimmed (checked on resident memory)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dinov3_eo import allocator

GLIBC = allocator._glibc() is not None

# A 256 MB float32 tensor is written (so its pages are resident) and freed; the child prints its resident memory
# in MiB before, with and after the tensor, and after trim_heap.
_CHILD = textwrap.dedent("""
    import os, sys
    import torch
    if sys.argv[1] == "1":
        from dinov3_eo.allocator import retain_freed_memory
        assert retain_freed_memory()
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page / 2**20
    before = rss()
    x = torch.ones(64 * 2**20)
    during = rss()
    del x
    after = rss()
    from dinov3_eo.allocator import trim_heap
    trim_heap()
    print(before, during, after, rss())
""")


def _rss_around_a_freed_tensor(retain: bool) -> tuple[float, float, float, float]:
    out = subprocess.run([sys.executable, "-c", _CHILD, "1" if retain else "0"], capture_output=True, text=True,
                         check=True)
    before, during, after, trimmed = map(float, out.stdout.split())
    return before, during, after, trimmed


@pytest.mark.skipif(not GLIBC or not sys.platform.startswith("linux"), reason="glibc malloc on Linux only")
def test_freed_tensor_stays_resident_only_when_retained() -> None:
    before, during, after, _ = _rss_around_a_freed_tensor(retain=False)
    assert during - before > 200  # the tensor's 256 MB were resident
    assert after - before < 50  # the default: its mapping went back to the kernel
    before, during, after, trimmed = _rss_around_a_freed_tensor(retain=True)
    assert during - before > 200
    assert after - before > 200  # kept mapped for the next tensor of that size
    assert trimmed - before < 50  # until trim_heap hands it back


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_returns_true_on_glibc() -> None:
    # the defaults are what the CLI applies to every command; applying them twice is harmless
    assert allocator.retain_freed_memory() is True
    assert allocator.retain_freed_memory() is True


def test_other_c_libraries_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.retain_freed_memory() is False
    assert allocator.trim_heap() is False


def test_environment_switch_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setenv(allocator.ENV_SWITCH, "0")
    assert allocator.retain_freed_memory_unless_disabled() is False
    assert calls == []
    monkeypatch.setenv(allocator.ENV_SWITCH, "1")
    assert allocator.retain_freed_memory_unless_disabled() is True
    assert calls == [1]


@pytest.mark.parametrize("kwargs", [{"mmap_threshold": -1}, {"trim_threshold": 2**31}])
def test_out_of_range_thresholds_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="must be in \\[0, 2\\*\\*31 - 1\\] bytes"):
        allocator.retain_freed_memory(**kwargs)
