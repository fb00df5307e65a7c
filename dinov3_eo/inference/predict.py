"""Stream a dense predictor over a raster of any size into a Cloud-Optimised GeoTIFF.

The raster is covered by overlapping windows (:class:`~dinov3_eo.inference.tiling.TileGrid`), visited
row by row. A background thread reads, normalises and batches the windows while the model runs; the
model's per-window outputs are multiplied by smooth blending weights and added into small cells
bounded by the window edges. A cell is final as soon as every window covering it has been added, at
which point it is normalised by its accumulated weight, encoded (class ids, scaled probabilities or
floats) and handed to a background writer. Memory therefore holds only the cells of the overlap band
below the current row of windows — it does not grow with the raster's height, and only by that thin
band with its width — and reading, computing and writing overlap in time.

Windows whose pixels are all invalid (nodata, NaN, or outside the raster) are never sent to the model.
Output pixels whose input was invalid are written as the output's nodata.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from torch import Tensor, nn

from dinov3_eo.allocator import trim_heap
from dinov3_eo.data.datasets import fused_affine, model_input
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.raster import read_window, require_georeferenced
from dinov3_eo.inference.prefetch import Prefetcher
from dinov3_eo.inference.tiling import Tile, TileGrid
from dinov3_eo.inference.tta import TTA, TTA_HELP, TTA_MODES, TestTimeAugmented, tta_views
from dinov3_eo.inference.writers import COGWriter, check_overwrite

log = logging.getLogger(__name__)

#: Help of the prediction commands' ``--bf16`` option (``amp=True``).
BF16_HELP = ("bf16 autocast on a CPU too (default: on CUDA only): ViT features ~1.85x faster on CPUs with bf16 instructions "
             "(AVX512-BF16/AMX), slower without them; outputs within bf16 rounding of float32")


def add_window_options(parser: Any) -> None:
    """Add the streaming options every prediction command shares to an ``argparse`` parser: ``--window``,
    ``--overlap``, ``--batch-size``, ``--device``, ``--bf16`` and ``--tta`` (those of :func:`predict_raster`)."""
    parser.add_argument("--window", type=int, default=512, help="window side in pixels (default 512)")
    parser.add_argument("--overlap", type=float, default=0.25, help="window overlap, a fraction of the window in [0, 1) "
                        "(default 0.25)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--bf16", action="store_true", help=BF16_HELP)
    parser.add_argument("--tta", choices=TTA_MODES, default=None, help=TTA_HELP)


def window_settings(args: Any) -> dict[str, Any]:
    """The options :func:`add_window_options` parsed, as :func:`predict_raster`'s keyword arguments: ``window``,
    ``overlap`` (pixels from 1 on, else a fraction of the window), ``batch_size``, ``device`` (``cuda`` when
    available unless one was given), ``amp`` (``True`` with ``--bf16``, else ``None``: bf16 on CUDA only) and ``tta``."""
    return {
        "window": args.window,
        "overlap": int(args.overlap) if args.overlap >= 1 else float(args.overlap),
        "batch_size": args.batch_size,
        "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        "amp": True if args.bf16 else None,
        "tta": args.tta,
    }

Output = Literal["argmax", "scores", "regression"]
Activation = Literal["softmax", "sigmoid", "none"]
_OUTPUTS = ("argmax", "scores", "regression")
_ACTIVATIONS = ("softmax", "sigmoid", "none")
#: Probabilities in [0, 1] are stored as round(p * 254) in uint8; 255 is nodata.
PROBABILITY_SCALE = 254
PROBABILITY_NODATA = 255


@dataclass(frozen=True)
class PredictionSummary:
    """What :func:`predict_raster` did: outputs written, windows seen and skipped, model calls, wall time."""

    outputs: tuple[Path, ...]
    windows: int
    windows_skipped: int
    model_calls: int
    seconds: float


@dataclass
class _Batch:
    tiles: list[Tile]
    images: Tensor | None  # [B, C, h, w] normalised, invalid pixels 0
    valid: np.ndarray | None  # [B, h, w] bool
    skipped: list[Tile]  # windows with no valid pixel, in grid order before ``tiles``


class _Cell:
    """Running blend of the windows covering one cell: sum(w * y), sum(w), any-valid, windows still to come."""

    __slots__ = ("acc", "weight", "valid", "remaining")

    def __init__(self, remaining: int) -> None:
        self.acc: np.ndarray | None = None  # [K, h, w] float32
        self.weight: np.ndarray | None = None  # [h, w] float32
        self.valid: np.ndarray | None = None  # [h, w] bool
        self.remaining = remaining


class _BlendAccumulator:
    """Adds weighted window outputs into cells and emits each cell once no later window can touch it."""

    def __init__(self, grid: TileGrid, channels: int, emit: Callable[[Window, _Cell], None]) -> None:
        self.rows, self.cols = grid.row_cells(), grid.col_cells()
        self.channels = channels
        self.weights = grid.blend_weights().numpy()  # [th, tw]
        self.emit = emit
        self.cells: dict[tuple[int, int], _Cell] = {}

    def add(self, tile: Tile, weighted: np.ndarray | None, valid: np.ndarray | None) -> None:
        """Add one window: ``weighted`` (K, th, tw) = weights * output and ``valid`` (th, tw), or None if skipped."""
        k_first, k_stop = self.rows.spans[tile.grid_row]
        l_first, l_stop = self.cols.spans[tile.grid_col]
        for k in range(k_first, k_stop):
            top, bottom = self.rows.cuts[k], self.rows.cuts[k + 1]
            rs = slice(top - tile.row_off, bottom - tile.row_off)
            for l in range(l_first, l_stop):  # noqa: E741 - cell column index
                left, right = self.cols.cuts[l], self.cols.cuts[l + 1]
                cell = self.cells.get((k, l))
                if cell is None:
                    cell = self.cells[(k, l)] = _Cell(self.rows.coverage[k] * self.cols.coverage[l])
                if weighted is not None and valid is not None:
                    cs = slice(left - tile.col_off, right - tile.col_off)
                    if cell.acc is None:
                        cell.acc = weighted[:, rs, cs].copy()
                        cell.weight = self.weights[rs, cs].copy()
                        cell.valid = valid[rs, cs].copy()
                    else:
                        cell.acc += weighted[:, rs, cs]
                        cell.weight += self.weights[rs, cs]
                        cell.valid |= valid[rs, cs]
                cell.remaining -= 1
                if cell.remaining == 0:
                    del self.cells[(k, l)]
                    self.emit(Window(left, top, right - left, bottom - top), cell)

    @property
    def pending(self) -> int:
        return len(self.cells)


def _blended(cell: _Cell, channels: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(mean (K, h, w), valid (h, w)) of a finished cell; a cell no window predicted is all invalid."""
    if cell.acc is None or cell.weight is None or cell.valid is None:
        return np.zeros((channels, *shape), np.float32), np.zeros(shape, bool)
    return cell.acc / cell.weight, cell.valid


def _encode_classes(mean: np.ndarray, valid: np.ndarray, dtype: np.dtype, nodata: int) -> np.ndarray:
    labels = mean.argmax(axis=0).astype(dtype)  # [K, h, w] -> [h, w]
    labels[~valid] = nodata
    return labels


def _encode_probabilities(mean: np.ndarray, valid: np.ndarray) -> np.ndarray:
    scaled = np.rint(np.clip(mean, 0.0, 1.0) * PROBABILITY_SCALE).astype(np.uint8)
    scaled[:, ~valid] = PROBABILITY_NODATA
    return scaled


def _encode_float(mean: np.ndarray, valid: np.ndarray) -> np.ndarray:
    out = mean.astype(np.float32, copy=True)
    out[:, ~valid] = np.nan
    return out


class _BackgroundWorker:
    """Runs ``handle(item)`` on queued items in a background thread; the first error is re-raised to the producer."""

    def __init__(self, handle: Callable[[Any], None], *, capacity: int, name: str) -> None:
        self._handle = handle
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, capacity))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:  # after a failure, only drain the queue so the producer never blocks
                try:
                    self._handle(item)
                except BaseException as e:
                    self._error = e

    def put(self, item: Any) -> None:
        self._raise_if_failed()
        self._queue.put(item)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"Blending or writing the prediction failed: {self._error}") from self._error

    def close(self) -> None:
        """Wait until every queued item is handled; re-raise the first error."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()


def _model_device(model: Callable[[Tensor], Tensor]) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _cache_bytes(width: int, window: int, in_bytes_per_px: int, out_bytes_per_px: int, floor_mb: int) -> int:
    # room for a band of input windows (re-read by overlapping neighbours) and ~3 rows of 512-px output tiles
    needed = 2 * window * width * in_bytes_per_px + 3 * 512 * width * out_bytes_per_px
    return max(floor_mb * 2**20, needed)


def predict_raster(
    model: Callable[[Tensor], Tensor],
    src: str | os.PathLike[str] | Any,
    dst: str | os.PathLike[str],
    *,
    out_channels: int,
    window: int = 512,
    overlap: float | int = 0.25,
    batch_size: int = 4,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    normalization: Normalization | dict[str, Any] | None = None,
    output: Output = "argmax",
    activation: Activation | None = None,
    probabilities: str | os.PathLike[str] | None = None,
    scores_dtype: Literal["uint8", "float32"] | None = None,
    class_names: Sequence[str] | None = None,
    colormap: dict[int, Sequence[int]] | None = None,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    tta: TTA | None = None,
    multiple: int = 16,
    prefetch: int = 2,
    progress: bool = True,
    overwrite: bool = False,
    compress: str = "deflate",
    overviews: bool = True,
    gdal_cache_mb: int = 64,
    tags: dict[str, Any] | None = None,
    require_georeference: bool = True,
) -> PredictionSummary:
    """Run ``model`` over every window of ``src`` and write the blended prediction to ``dst`` as a COG.

    Args:
        model: any callable mapping a normalised float32 batch (B, C, h, w) to (B, out_channels, h, w)
            — logits, scores or regressed values at the input's spatial size. An ``nn.Module`` is put in
            eval mode for the run (and restored after).
        src: a GeoTIFF path or an open rasterio dataset (used only by the reader thread during the run).
        dst: destination ``.tif``; it gets the input's CRS, transform and size.
        out_channels: K, the number of model output channels.
        window: window size in pixels (a multiple of ``multiple``); smaller rasters get one padded window.
        overlap: overlap between neighbouring windows: a fraction of ``window`` (float) or pixels (int).
        batch_size: windows per model call.
        bands: 1-based input band indexes fed to the model (default: all bands, in file order).
        nodata: input nodata value overriding the file's (a pixel equal to it in any band is invalid).
        normalization: applied to raw pixel values before the model (a :class:`Normalization` or its
            ``to_dict()``); ``None`` feeds raw values as float32. Invalid pixels are set to 0 after it.
        output: ``"argmax"``: one band of class ids (uint8, nodata 255; uint16 / 65535 past 255 classes);
            ``"scores"``: K bands of blended scores; ``"regression"``: K float32 bands, nodata NaN.
        activation: applied to each window's output before blending: ``softmax`` (default for
            argmax/scores), ``sigmoid`` or ``none`` (default for regression).
        probabilities: with ``output="argmax"``, also write the K blended probabilities here as uint8
            bands (``round(p * 254)``, nodata 255, the file's band scale set to 1/254).
        scores_dtype: storage of ``"scores"``: ``uint8`` (scaled like ``probabilities``; default when the
            activation is softmax/sigmoid) or ``float32`` (nodata NaN; default otherwise).
        class_names: names of the K classes (tags, band descriptions, colour-table legend).
        colormap: class id -> RGB(A) of the embedded colour table (default: a fixed palette).
        device: where the model runs (default: the device of the model's parameters, else CPU).
        amp: bf16 autocast for the model: ``None`` (default) on CUDA only; ``True`` on a CPU too (worth it where the
            CPU has bf16 instructions, AVX512-BF16/AMX: ViT-S features 1.85x faster, ``scripts/bench_cpu_bf16.py``);
            ``False`` never. Outputs are blended in float32 either way.
        tta: test-time augmentation (:mod:`~dinov3_eo.inference.tta`): ``"flips"`` averages each window's
            prediction over 4 flipped views, ``"d4"`` over 8 flipped and quarter-turned views (each turned back, and
            activated before the average, so probabilities are averaged); one model call per view. ``None``: off.
        multiple: the model's patch size; window sizes are kept multiples of it.
        prefetch: batches read ahead by the background reader.
        progress: show a progress bar.
        overwrite: replace existing outputs (otherwise they raise :class:`FileExistsError` up front).
        compress, overviews: COG compression and internal overviews.
        gdal_cache_mb: lower bound of GDAL's block cache during the run (raised as needed for wide rasters).
        require_georeference: refuse an input without a CRS or geotransform (default); ``False`` predicts image
            chips on their own pixel grid, and the output then has no georeference either.
        tags: extra dataset tags for the outputs.

    Returns:
        A :class:`PredictionSummary` (windows seen/skipped, model calls, wall time).

    Raises:
        FileExistsError: if an output exists and ``overwrite`` is false.
        ValueError: for an unknown ``output``/``activation``, an input without a CRS or geotransform, bad band
            indexes, a normalisation whose band count differs from the input's, or a model output of the wrong shape.
    """
    started = time.perf_counter()
    if output not in _OUTPUTS:
        raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}.")
    activation = activation or ("none" if output == "regression" else "softmax")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}.")
    if out_channels < 1:
        raise ValueError(f"out_channels must be >= 1, got {out_channels}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if probabilities is not None and output != "argmax":
        raise ValueError(f"probabilities= is an extra output of output='argmax', not of output={output!r}.")
    if class_names is not None and len(class_names) != out_channels and output != "regression":
        raise ValueError(f"class_names has {len(class_names)} names for out_channels={out_channels}.")
    if scores_dtype is None:
        scores_dtype = "float32" if activation == "none" else "uint8"
    if scores_dtype not in ("uint8", "float32"):
        raise ValueError(f"scores_dtype must be 'uint8' or 'float32', got {scores_dtype!r}.")
    if tta is not None:
        tta_views(tta)  # an unknown mode stops before any output is checked or opened
    if isinstance(normalization, dict):
        normalization = Normalization.from_dict(normalization)
    own_src = not hasattr(src, "read")
    source = [src if own_src else getattr(src, "name", None)]
    outputs = [check_overwrite(dst, overwrite, inputs=source)]
    if probabilities is not None:
        outputs.append(check_overwrite(probabilities, overwrite, inputs=source))
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise ValueError(f"dst and probabilities must be different files, got {str(outputs[0])!r} twice.")

    dataset = rasterio.open(src) if own_src else src
    try:
        if require_georeference:
            require_georeferenced(dataset)
        band_indexes = list(bands) if bands is not None else list(range(1, dataset.count + 1))
        bad = [b for b in band_indexes if not 1 <= b <= dataset.count]
        if bad or not band_indexes:
            raise ValueError(f"bands must be 1-based indexes in 1..{dataset.count} of {dataset.name!r}, got {bands}.")
        if normalization is not None and normalization.num_bands != len(band_indexes):
            raise ValueError(
                f"Normalization {normalization.name!r} has {normalization.num_bands} bands but "
                f"{len(band_indexes)} bands are read from {dataset.name!r}."
            )
        grid = TileGrid.build(dataset.height, dataset.width, window=window, overlap=overlap, multiple=multiple)
        in_bytes = len(band_indexes) * np.dtype(dataset.dtypes[band_indexes[0] - 1]).itemsize
        run_device = torch.device(device) if device is not None else _model_device(model)

        sinks, encoders = [], []
        common: dict[str, Any] = {
            "crs": dataset.crs, "transform": dataset.transform, "width": dataset.width, "height": dataset.height,
            "overwrite": overwrite, "compress": compress, "overviews": overviews,
            "tags": {"dinov3_eo_output": output, "window": window, "overlap": grid.overlap, "tta": tta or "none",
                     **(tags or {})},
        }  # fmt: skip
        names = list(class_names) if class_names is not None else None
        if output == "argmax":
            dtype, fill = (np.dtype(np.uint8), 255) if out_channels <= 255 else (np.dtype(np.uint16), 65535)
            sinks.append(COGWriter(dst, count=1, dtype=dtype, nodata=fill, class_names=names or
                                   [f"class {i}" for i in range(out_channels)], colormap=colormap, **common))  # fmt: skip
            encoders.append(lambda m, v, dtype=dtype, fill=fill: _encode_classes(m, v, dtype, fill))
        if probabilities is not None or (output == "scores" and scores_dtype == "uint8"):
            target = probabilities if probabilities is not None else dst
            sinks.append(COGWriter(target, count=out_channels, dtype="uint8", nodata=PROBABILITY_NODATA,
                                   band_descriptions=names, scales=[1 / PROBABILITY_SCALE] * out_channels, **common))  # fmt: skip
            encoders.append(_encode_probabilities)
        if output == "regression" or (output == "scores" and scores_dtype == "float32"):
            sinks.append(COGWriter(dst, count=out_channels, dtype="float32", nodata=float("nan"),
                                   band_descriptions=names, **common))  # fmt: skip
            encoders.append(_encode_float)
        out_bytes = sum(s.shape[0] * s.dtype.itemsize for s in sinks)

        if tta is not None:  # the views' outputs come back activated and averaged
            model, activation = TestTimeAugmented(model, tta, activation), "none"
        with rasterio.Env(GDAL_CACHEMAX=_cache_bytes(dataset.width, window, in_bytes, out_bytes, gdal_cache_mb)):
            counts = _stream(
                model, dataset, grid, sinks, encoders,
                channels=out_channels, band_indexes=band_indexes, nodata=nodata, normalization=normalization,
                activation=activation, batch_size=batch_size, device=run_device, amp=amp, prefetch=prefetch,
                progress=progress,
            )  # fmt: skip
        if counts[0] == len(grid):
            declared = nodata if nodata is not None else dataset.nodata
            log.warning("%s has no valid pixel in bands %s (nodata %s everywhere): every output pixel is nodata; check "
                        "the nodata value and the bands.", dataset.name, band_indexes, declared)
    finally:
        if own_src:
            dataset.close()
    return PredictionSummary(
        outputs=tuple(s.dst for s in sinks),
        windows=len(grid),
        windows_skipped=counts[0],
        model_calls=counts[1],
        seconds=time.perf_counter() - started,
    )


def _stream(
    model: Callable[[Tensor], Tensor],
    dataset: Any,
    grid: TileGrid,
    sinks: list[COGWriter],
    encoders: list[Callable[[np.ndarray, np.ndarray], np.ndarray]],
    *,
    channels: int,
    band_indexes: list[int],
    nodata: float | None,
    normalization: Normalization | None,
    activation: str,
    batch_size: int,
    device: torch.device,
    amp: bool | None,
    prefetch: int,
    progress: bool,
) -> tuple[int, int]:
    """The pipeline; returns (windows skipped, model calls).

    Three threads: the reader (read, normalise, batch), the caller's (the model), and a blender
    (blend, encode, write). On an accelerator the activation and the weighting run there; on a CPU they
    run in the blender so that the model's thread only runs the model.
    """
    from tqdm.auto import tqdm

    pin = device.type == "cuda"
    post_on_device = device.type != "cpu"
    use_amp = bool(amp) if amp is not None else pin

    # normalisation folded into one multiply-add (and a clip) per pixel: the reader shares a core with the blender
    affine = fused_affine(normalization, None, None, len(band_indexes))

    def read(tile: Tile) -> tuple[Tensor, np.ndarray]:
        pixels, valid = read_window(
            dataset, Window(tile.col_off, tile.row_off, tile.width, tile.height), bands=band_indexes, nodata=nodata
        )
        return torch.from_numpy(model_input(pixels, valid, affine)), valid  # [C, h, w] float32, 0 where invalid

    def batches() -> Iterator[_Batch]:
        tiles, images, valids, skipped = [], [], [], []
        for tile in grid:
            image, valid = read(tile)
            if not valid.any():
                skipped.append(tile)
                continue
            tiles.append(tile)
            images.append(image)
            valids.append(valid)
            if len(tiles) == batch_size:
                stacked = torch.stack(images)  # B x [C, h, w] -> [B, C, h, w]
                yield _Batch(tiles, stacked.pin_memory() if pin else stacked, np.stack(valids), skipped)
                tiles, images, valids, skipped = [], [], [], []
        if tiles or skipped:
            stacked = torch.stack(images) if images else None
            yield _Batch(tiles, stacked, np.stack(valids) if valids else None, skipped)

    buffers: dict[torch.device, Tensor] = {}

    def activate_and_weight(y: Tensor, weights: Tensor) -> Tensor:
        """(B, K, h, w) model output -> weights * activation(output), in a buffer reused across batches.

        Reusing one buffer (and working in place in it) instead of allocating three window-sized
        temporaries per batch keeps the allocator from fragmenting memory over a long run.
        """
        buffer = buffers.get(y.device)
        if buffer is None or buffer.shape[0] < y.shape[0] or buffer.shape[1:] != y.shape[1:]:
            buffer = buffers[y.device] = torch.empty(y.shape, dtype=torch.float32, device=y.device)
        out = buffer[: y.shape[0]]
        if activation == "softmax":
            torch.sub(y, y.amax(dim=1, keepdim=True), out=out)  # stable softmax over K
            out.exp_()
            out.div_(out.sum(dim=1, keepdim=True))
        elif activation == "sigmoid":
            torch.sigmoid(y, out=out)
        else:
            out.copy_(y)
        return out.mul_(weights)

    def write(window: Window, cell: _Cell) -> None:
        mean, valid = _blended(cell, channels, (int(window.height), int(window.width)))
        for sink, encode in zip(sinks, encoders):
            sink.write(encode(mean, valid), window)

    accumulator = _BlendAccumulator(grid, channels, write)
    cpu_weights = grid.blend_weights()  # [th, tw]
    device_weights = cpu_weights.to(device)

    # Three threads allocating and freeing window-sized arrays leave freed memory in per-thread arenas, so RSS would
    # creep up by hundreds of MB on long runs although the live data stays small. Trimmed once per row of windows,
    # not per batch: trimming returns the pages every later buffer then faults in again
    # (with the dinov3-eo command's retained memory a 10k x 10k prediction took 28.6 s trimming every batch, 14.7 s
    # every row; README, "Measured")
    windows_per_row = len(grid.col_starts)
    blended_windows = trimmed_rows = 0

    def blend(item: tuple[_Batch, Tensor | None]) -> None:
        nonlocal blended_windows, trimmed_rows
        batch, y = item
        blended_windows += len(batch.tiles) + len(batch.skipped)
        if blended_windows // windows_per_row > trimmed_rows:
            trimmed_rows = blended_windows // windows_per_row
            trim_heap()
        for tile in batch.skipped:
            accumulator.add(tile, None, None)
        if y is not None and batch.valid is not None:
            if not post_on_device:
                with torch.inference_mode():
                    y = activate_and_weight(y, cpu_weights)
            weighted = y.numpy()  # [B, K, th, tw]
            for b, tile in enumerate(batch.tiles):
                accumulator.add(tile, weighted[b], batch.valid[b])

    was_training = model.training if isinstance(model, nn.Module) else None
    if isinstance(model, nn.Module):
        model.eval()
    skipped_count = calls = 0
    entered: list[COGWriter] = []
    reader = Prefetcher(batches, prefetch=prefetch, failure="Reading windows failed")
    blender: _BackgroundWorker | None = None
    bar = tqdm(total=len(grid), unit="win", disable=not progress, desc=Path(str(dataset.name)).name)
    try:
        for sink in sinks:
            entered.append(sink.__enter__())
        blender = _BackgroundWorker(blend, capacity=prefetch, name="dinov3_eo-blender")
        with torch.inference_mode():
            for batch in reader:
                y = None
                if batch.images is not None:
                    x = batch.images.to(device, non_blocking=pin)
                    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                        y = model(x)
                    calls += 1
                    expected = (x.shape[0], channels, x.shape[2], x.shape[3])
                    if not isinstance(y, Tensor) or tuple(y.shape) != expected:
                        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
                        raise ValueError(f"The model returned {got} for input {tuple(x.shape)}; expected {expected}.")
                    y = y.float()  # bf16 under autocast: activated and blended in float32 (a no-op for float32)
                    # to the blender: finished weighted scores from an accelerator, raw outputs on a CPU
                    y = activate_and_weight(y, device_weights).cpu() if post_on_device else y
                blender.put((batch, y))
                skipped_count += len(batch.skipped)
                bar.update(len(batch.tiles) + len(batch.skipped))
        blender.close()
        blender = None
        if accumulator.pending:
            raise RuntimeError(f"{accumulator.pending} output cells were never completed; the window grid is inconsistent.")
        for sink in reversed(entered):
            sink.__exit__(None, None, None)
        entered.clear()
    except BaseException as e:
        reader.close()
        if blender is not None:
            try:
                blender.close()
            except RuntimeError:
                pass  # the original error is the one to report
        for sink in reversed(entered):
            sink.__exit__(type(e), e, e.__traceback__)
        raise
    finally:
        reader.close()
        bar.close()
        if isinstance(model, nn.Module) and was_training is not None:
            model.train(was_training)
    return skipped_count, calls
