"""What the benchmarks share to measure a case in a fresh process of its own: its peak memory, and the run itself.

A benchmark script calls :func:`child_entry` first thing in ``main``: run as ``script.py --child ARGS...`` it prints
the JSON of ``run(*ARGS)`` and says so; the parent starts such a child per case with :func:`run_child`.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def peak_rss_mib(pid: int | str = "self") -> float:
    """A process's peak resident set in MiB (``VmHWM``). ``ru_maxrss`` is not used: Linux carries it over from the
    parent across fork/exec, so a child would report the parent's peak at the fork."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_entry(run: Callable[..., dict[str, Any]]) -> bool:
    """In a ``--child`` process: print ``run(*args)`` as JSON and return ``True``; else ``False``."""
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(run(*sys.argv[2:])))
        return True
    return False


def run_child(script: str | Path, *args: Any) -> dict[str, Any]:
    """Run ``script --child args...`` in a fresh interpreter and return what its ``run`` returned."""
    done = subprocess.run([sys.executable, str(script), "--child", *map(str, args)], capture_output=True, text=True,
                          check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_against_baseline(results: dict[str, dict[str, Any]], baseline: str, detail: Callable[[dict], str]) -> None:
    """One line per case: its seconds and its peak RSS above the imports (``evaluation_mib``), each also as a ratio
    to the ``baseline`` case's, its imports' RSS, then ``detail(result)`` (what it computed, to show the cases
    agree)."""
    base = results[baseline]
    for name, r in results.items():
        print(f"  {name:8s}: {r['seconds']:.1f} s ({r['seconds'] / base['seconds']:.2f}x {baseline}), peak RSS above "
              f"the imports {r['evaluation_mib']:,.0f} MiB ({r['evaluation_mib'] / base['evaluation_mib']:.2f}x; "
              f"imports {r['imports_mib']:,.0f} MiB), {detail(r)}")


def compare_on_written_inputs(script: str | Path, *, description: str, default_size: int,
                              make_inputs: Callable[[Path, int], Sequence[Path]], cases: Sequence[str], title: str,
                              detail: Callable[[dict], str]) -> None:
    """The ``main`` of a benchmark that writes its inputs once (``make_inputs(folder, --size)``), runs each case of
    ``cases`` in a child process of its own on them (``script --child CASE INPUTS...``) and prints
    :func:`print_against_baseline` against the first case, under ``title`` (formatted with ``size``)."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=default_size)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_inputs(Path(tmp), args.size)
        results = {case: run_child(script, case, *inputs) for case in cases}
    print(title.format(size=args.size))
    print_against_baseline(results, cases[0], detail)
