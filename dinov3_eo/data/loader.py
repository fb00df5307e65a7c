"""A batch loader that reads with threads of the training process instead of worker processes.

Why: a ``DataLoader`` worker process builds a batch quickly, but handing a float32 batch to the main
process costs a shared-memory allocation per batch (fallocate, page faults, unmapping: ~8 ms for 12 MiB),
which caps the throughput of two workers well below what the reads allow (``scripts/bench_data.py``).
GDAL releases the GIL while it reads and decodes, and numpy releases it in the normalisation loops, so
threads of one process read in parallel and the batch buffer is plain memory that never crosses a
process boundary.

:class:`ThreadedTileLoader` is our datamodules' default loader (``worker_type="thread"``; beside a training
thread that holds the GIL it was measured to slow that thread no more than worker processes do) and a drop-in
for their ``DataLoader`` (``worker_type="process"``): it yields the same batches in the same order for the same
sampler, and exposes ``sampler``, ``batch_size`` and ``len()`` so that Lightning sets the sampler's epoch (it
looks up ``loader.sampler`` on any loader) and the SSL stage can skip what an interrupted epoch consumed.
"""

from __future__ import annotations

import itertools
import math
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from dinov3_eo.data.datasets import collate_samples


class ThreadedTileLoader:
    """Batches of ``dataset[keys]`` read by a pool of threads, yielded in sampler order.

    Args:
        dataset: a map-style dataset; its ``__getitems__`` (e.g. :meth:`TileDataset.__getitems__
            <dinov3_eo.data.datasets.TileDataset.__getitems__>`, which reads a batch into one buffer) is used
            when it has one, else one ``dataset[key]`` per key, as a ``DataLoader`` does.
        sampler: the keys, in order; consecutive runs of ``batch_size`` keys form the batches.
        batch_size: keys per batch (the last batch may be shorter unless ``drop_last``).
        num_threads: reading threads; each batch is read whole by one thread.
        prefetch: batches in flight per thread ahead of the consumer (memory: ``num_threads * prefetch`` batches).
        collate_fn: turns a list of samples into a batch (run in the reading thread).
        pin_memory: copy each batch's tensors to page-locked memory (in the reading thread; only when CUDA is available).
        drop_last: drop a last incomplete batch.

    Raises:
        ValueError: for a non-positive ``batch_size``, ``num_threads`` or ``prefetch``.

    An exception raised while reading a batch is raised again by the consumer when it reaches that batch,
    unchanged (same type and message). The threads persist across epochs (like ``persistent_workers``) and
    end on :meth:`close`, when the loader is garbage-collected, or at interpreter exit.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        sampler: Iterable[Any],
        batch_size: int,
        num_threads: int = 2,
        prefetch: int = 2,
        collate_fn: Callable[[list[Any]], Any] = collate_samples,
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("num_threads", num_threads), ("prefetch", prefetch)):
            if int(value) < 1:
                raise ValueError(f"ThreadedTileLoader: {name} must be >= 1, got {value}.")
        self.dataset, self.sampler, self.batch_size = dataset, sampler, int(batch_size)
        self.num_threads, self.prefetch, self.collate_fn = int(num_threads), int(prefetch), collate_fn
        self.pin_memory, self.drop_last = bool(pin_memory), bool(drop_last)
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.num_threads, thread_name_prefix="ThreadedTileLoader")
                # Shut the threads down when the loader is collected; ThreadPoolExecutor itself joins idle
                # threads at interpreter exit, and at most num_threads * prefetch batches are ever queued.
                weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)
            return self._executor

    def close(self) -> None:
        """Stop the reading threads (waiting for the batches they are reading); a later iteration starts new ones."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def _batches(self) -> Iterator[list[Any]]:
        # The sampler is iterated here, in the consumer's thread, so its order and any pending skip_next
        # apply exactly as under a DataLoader.
        keys = iter(self.sampler)
        while batch := list(itertools.islice(keys, self.batch_size)):
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield batch

    def _load(self, keys: Sequence[Any]) -> Any:
        getitems = getattr(self.dataset, "__getitems__", None)
        samples = getitems(keys) if getitems is not None else [self.dataset[k] for k in keys]
        batch = self.collate_fn(samples)
        return _pinned(batch) if self.pin_memory and torch.cuda.is_available() else batch

    def __iter__(self) -> Iterator[Any]:
        pool, pending = self._pool(), deque[Future]()
        batches = self._batches()
        try:
            for keys in itertools.islice(batches, self.num_threads * self.prefetch):
                pending.append(pool.submit(self._load, keys))
            while pending:
                batch = pending.popleft().result()  # re-raises a reader's exception as it was raised
                for keys in itertools.islice(batches, 1):  # keep the pipeline full
                    pending.append(pool.submit(self._load, keys))
                yield batch
        finally:
            # Abandoned early (break, exception, generator closed): drop what is queued, let running reads finish.
            for future in pending:
                future.cancel()


def _pinned(batch: Any) -> Any:
    """``batch`` with every tensor (in nested dicts, lists and tuples) copied to page-locked memory."""
    if isinstance(batch, Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: _pinned(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_pinned(v) for v in batch)
    return batch
