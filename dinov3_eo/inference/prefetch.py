"""Producing batches in a background thread while the model runs on the previous one.

Reading windows (GDAL decodes outside the GIL) and preparing them (numpy / torch ops that release it too) overlap
with the forward pass instead of waiting for it, which keeps an accelerator fed; on a CPU the two share the cores.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any


class Prefetcher:
    """Runs ``produce()`` in a background thread, at most ``prefetch`` items ahead of the consumer.

    Iterate over it to get the items; an exception in the producer is raised in the consumer (wrapped in a
    ``RuntimeError`` that starts with ``failure`` where one is given, else as it is). Call :meth:`close` (in a
    ``finally``) to stop the producer early.
    """

    def __init__(self, produce: Callable[[], Iterator[Any]], *, prefetch: int, failure: str | None = None,
                 name: str = "dinov3_eo-reader") -> None:  # fmt: skip
        self._produce = produce
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._done = object()
        self._failure = failure

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._produce():
                if not self._put(item):
                    return
            self._put(self._done)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(_Failed(e))

    def __iter__(self) -> Iterator[Any]:
        self._thread.start()
        while True:
            item = self._queue.get()
            if item is self._done:
                return
            if isinstance(item, _Failed):
                if self._failure is not None:
                    raise RuntimeError(f"{self._failure}: {item.error}") from item.error
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class _Failed:
    """An exception of the producer, in the queue (an item could itself be an exception object)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


__all__ = ["Prefetcher"]
