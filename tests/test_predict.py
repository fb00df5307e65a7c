"""Streaming tiled inference (dinov3_eo.inference.predict) on a real CC0 Landsat crop and small generated rasters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import torch
from rasterio.transform import from_origin
from torch import Tensor, nn

from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.raster import read_window
from dinov3_eo.inference.predict import PROBABILITY_SCALE, _BlendAccumulator, predict_raster
from dinov3_eo.inference.tiling import TileGrid

DATA = Path(__file__).parent / "data"
CROP = DATA / "rgb_byte_crop.tif"  # 250 x 230, nodata 0, ~55 % collar
NORM = Normalization.preset("sat493m")


class CountingModel(nn.Module):
    """A 1x1 conv (translation-equivariant per pixel) that counts calls and checks input sizes."""

    def __init__(self, in_chans: int = 3, out_chans: int = 4, multiple: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, 1)
        self.calls = 0
        self.windows = 0
        self.multiple = multiple

    def forward(self, x: Tensor) -> Tensor:
        assert x.dtype == torch.float32 and x.shape[2] % self.multiple == 0 and x.shape[3] % self.multiple == 0
        assert not self.training  # predict_raster sets eval mode
        self.calls += 1
        self.windows += x.shape[0]
        return self.conv(x)


def whole_image(model: nn.Module, path: Path, norm: Normalization | None = NORM) -> tuple[np.ndarray, np.ndarray]:
    """The independent reference: the model on the whole raster at once -> (K, H, W) output and (H, W) valid."""
    with rasterio.open(path) as src:
        pixels, valid = read_window(src, rasterio.windows.Window(0, 0, src.width, src.height))
    x = torch.from_numpy(pixels.astype(np.float32))
    x = norm(x) if norm is not None else x
    x = x.masked_fill(~torch.from_numpy(valid), 0.0)
    with torch.no_grad():
        return model.conv(x[None])[0].numpy(), valid


def run(model: Callable[[Tensor], Tensor], src: Path, dst: Path, **kwargs) -> object:
    kwargs.setdefault("out_channels", 4)
    kwargs.setdefault("normalization", NORM)
    kwargs.setdefault("progress", False)
    return predict_raster(model, src, dst, **kwargs)


def temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def model() -> CountingModel:
    return CountingModel()


class TestMosaicEqualsWholeImage:
    @pytest.mark.parametrize(("window", "overlap"), [(64, 0.25), (48, 20), (32, 0), (96, 0.5), (512, 0.25)])
    def test_regression(self, model: CountingModel, tmp_path: Path, window: int, overlap: float | int) -> None:
        dst = tmp_path / "out.tif"
        run(model, CROP, dst, output="regression", window=window, overlap=overlap, batch_size=3)
        expected, valid = whole_image(model, CROP)
        with rasterio.open(dst) as out:
            got = out.read()
            assert out.nodatavals == (float("nan"),) * 4 or all(np.isnan(v) for v in out.nodatavals)
        np.testing.assert_allclose(got[:, valid], expected[:, valid], rtol=1e-5, atol=1e-5)
        assert np.isnan(got[:, ~valid]).all()

    def test_argmax_and_probabilities(self, model: CountingModel, tmp_path: Path) -> None:
        dst, probs = tmp_path / "classes.tif", tmp_path / "probs.tif"
        names = ["water", "crop", "tree", "developed"]
        run(model, CROP, dst, window=64, overlap=16, probabilities=probs, class_names=names)
        logits, valid = whole_image(model, CROP)
        softmax = torch.from_numpy(logits).softmax(0).numpy()
        with rasterio.open(dst) as out:
            labels = out.read(1)
            assert out.dtypes == ("uint8",) and out.nodata == 255
            assert out.tags()["class_names"] == '["water", "crop", "tree", "developed"]'
        # blending softmaxes of a pointwise model is the same softmax everywhere: argmax must agree exactly
        np.testing.assert_array_equal(labels[valid], softmax.argmax(0)[valid])
        assert (labels[~valid] == 255).all()
        with rasterio.open(probs) as p:
            scaled = p.read()
            assert p.count == 4 and p.scales == (1 / PROBABILITY_SCALE,) * 4
            assert p.descriptions == tuple(names)
        expected = np.rint(softmax * PROBABILITY_SCALE)
        assert np.abs(scaled[:, valid].astype(int) - expected[:, valid]).max() <= 1
        assert (scaled[:, ~valid] == 255).all()

    @pytest.mark.parametrize(("height", "width"), [(5, 7), (17, 33), (100, 1), (130, 47)])
    def test_small_and_odd_sizes(self, tmp_path: Path, height: int, width: int) -> None:
        rng = np.random.default_rng(0)
        src_path = tmp_path / "small.tif"
        data = rng.uniform(-3, 3, size=(2, height, width)).astype(np.float32)
        data[:, 0, 0] = np.nan  # a NaN pixel is invalid
        profile = {"driver": "GTiff", "width": width, "height": height, "count": 2, "dtype": "float32",
                   "crs": "EPSG:32631", "transform": from_origin(500000, 4600000, 10, 10), "nodata": None}  # fmt: skip
        with rasterio.open(src_path, "w", **profile) as f:
            f.write(data)
        model = CountingModel(in_chans=2, out_chans=3)
        dst = tmp_path / "out.tif"
        run(model, src_path, dst, output="regression", out_channels=3, normalization=None, window=64, overlap=16)
        expected, valid = whole_image(model, src_path, norm=None)
        assert not valid[0, 0] and valid.sum() == height * width - 1
        with rasterio.open(dst) as out:
            got = out.read()
            assert (out.height, out.width) == (height, width)
        np.testing.assert_allclose(got[:, valid], expected[:, valid], rtol=1e-5, atol=1e-5)
        assert np.isnan(got[:, 0, 0]).all()


class TestGeoreferencing:
    def test_crs_transform_size_and_cog(self, model: CountingModel, tmp_path: Path) -> None:
        dst = tmp_path / "out.tif"
        run(model, CROP, dst, window=64)
        with rasterio.open(CROP) as src, rasterio.open(dst) as out:
            assert out.crs == src.crs
            assert out.transform == src.transform
            assert (out.width, out.height) == (src.width, src.height)
            assert out.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            assert out.colormap(1)[0][:3] != (0, 0, 0) or out.colormap(1)[1][:3] != (0, 0, 0)

    @pytest.mark.parametrize("drop", ["crs", "transform"])
    def test_an_input_that_is_not_georeferenced_is_refused(self, model: CountingModel, tmp_path: Path,
                                                            drop: str) -> None:
        """A raster without a CRS or geotransform would give an output nobody can place on a map: refused before
        any window is read, with the file named; nothing is written."""
        with rasterio.open(CROP) as src:
            profile, pixels = src.profile, src.read()
        profile |= {"crs": None} if drop == "crs" else {"transform": rasterio.Affine.identity()}
        plain = tmp_path / "plain.tif"
        with rasterio.Env(CPL_LOG="/dev/null"), rasterio.open(plain, "w", **profile) as dst:
            dst.write(pixels)
        out = tmp_path / "out"
        out.mkdir()
        with pytest.raises(ValueError, match=r"plain\.tif is not georeferenced \(no CRS or no geotransform\)"):
            run(model, plain, out / "o.tif", window=64)
        assert model.calls == 0 and list(out.iterdir()) == []

    def test_nodata_propagates(self, model: CountingModel, tmp_path: Path) -> None:
        dst = tmp_path / "out.tif"
        run(model, CROP, dst, window=64)
        with rasterio.open(CROP) as src, rasterio.open(dst) as out:
            input_invalid = np.any(src.read() == 0, axis=0)  # nodata in any band (the collar, plus a few dark pixels)
            output_nodata = out.read(1) == out.nodata
        assert 0.3 < input_invalid.mean() < 0.7
        np.testing.assert_array_equal(output_nodata, input_invalid)

    def test_nodata_override_and_bands(self, tmp_path: Path) -> None:
        model = CountingModel(in_chans=1, out_chans=2)
        dst = tmp_path / "out.tif"
        # band 2 only; treat its value 0 as nodata, like the file does, but through the override
        run(model, CROP, dst, out_channels=2, bands=[2], nodata=0, normalization=Normalization.zscore([80], [30]), window=64)
        with rasterio.open(CROP) as src, rasterio.open(dst) as out:
            np.testing.assert_array_equal(out.read(1) == 255, src.read(2) == 0)


class TestStreaming:
    def test_all_nodata_windows_are_skipped(self, model: CountingModel, tmp_path: Path) -> None:
        grid = TileGrid.build(230, 250, window=32, overlap=8)
        with rasterio.open(CROP) as src:
            valid = ~np.any(src.read() == 0, axis=0)
        with_data = sum(bool(valid[t.row_off : t.row_off + 32, t.col_off : t.col_off + 32].any()) for t in grid)
        assert 0 < with_data < len(grid)
        summary = run(model, CROP, tmp_path / "out.tif", window=32, overlap=8, batch_size=1)
        assert model.calls == model.windows == with_data
        assert summary.model_calls == with_data and summary.windows_skipped == len(grid) - with_data

    def test_a_raster_with_no_valid_pixel_is_said_so(self, model: CountingModel, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
        """A wrong --nodata or band choice that leaves nothing to predict is named, not a silent all-nodata map."""
        with caplog.at_level("WARNING", logger="dinov3_eo.inference.predict"):
            run(model, CROP, tmp_path / "some.tif", window=64)
            assert not [r for r in caplog.records if r.name == "dinov3_eo.inference.predict"]  # data: nothing to say
            with rasterio.open(CROP) as src:
                profile = src.profile
            blank = tmp_path / "blank.tif"
            with rasterio.open(blank, "w", **(profile | {"nodata": 0})) as dst:
                dst.write(np.zeros((profile["count"], profile["height"], profile["width"]), dtype=profile["dtype"]))
            calls = model.calls
            summary = run(model, blank, tmp_path / "none.tif", window=64)
        assert model.calls == calls and summary.windows_skipped == summary.windows
        ours = [r.getMessage() for r in caplog.records if r.name == "dinov3_eo.inference.predict"]
        assert len(ours) == 1 and "blank.tif has no valid pixel in bands [1, 2, 3] (nodata 0.0 everywhere)" in ours[0]
        with rasterio.open(tmp_path / "none.tif") as out:
            assert (out.read(1) == out.nodata).all()

    def test_batches_windows(self, model: CountingModel, tmp_path: Path) -> None:
        summary = run(model, CROP, tmp_path / "out.tif", window=32, overlap=8, batch_size=5)
        assert model.windows == summary.windows - summary.windows_skipped
        assert model.calls == summary.model_calls == -(-model.windows // 5)  # full batches, one partial

    def test_heap_is_trimmed_once_per_row_of_windows(self, model: CountingModel, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
        # every batch would hand back pages each later buffer faults in again; never would let RSS creep
        trims = []
        monkeypatch.setattr("dinov3_eo.inference.predict.trim_heap", lambda: trims.append(1))
        with rasterio.open(CROP) as src:
            grid = TileGrid.build(src.height, src.width, window=32, overlap=8)
        summary = run(model, CROP, tmp_path / "out.tif", window=32, overlap=8, batch_size=2)
        assert summary.model_calls > len(grid.row_starts)  # so once per batch would be more
        assert len(trims) == len(grid.row_starts)

    @pytest.mark.parametrize("height", [2_000, 8_000])
    def test_live_cells_do_not_grow_with_height(self, height: int) -> None:
        # only the bookkeeping (skipped windows allocate nothing): how many cells are alive at once
        grid = TileGrid.build(height, 1_000, window=64, overlap=16)
        emitted = []
        accumulator = _BlendAccumulator(grid, 1, lambda window, cell: emitted.append(window))
        peak = 0
        for tile in grid:
            accumulator.add(tile, None, None)
            peak = max(peak, accumulator.pending)
        cells = len(grid.row_cells()) * len(grid.col_cells())
        assert len(emitted) == cells and accumulator.pending == 0
        # the overlap band below one row of windows (two cells per window across) plus the current row
        assert peak <= 4 * len(grid.col_starts) + 4


class TestPrecision:
    """``amp``: bf16 autocast on CUDA by default, on a CPU only when asked, and float32 blending either way."""

    class AutocastSpy(CountingModel):
        def forward(self, x: Tensor) -> Tensor:
            self.autocast = torch.is_autocast_enabled("cpu")
            y = super().forward(x)
            self.out_dtype = y.dtype
            return y

    @pytest.mark.parametrize(("amp", "autocast"), [(None, False), (False, False), (True, True)])
    def test_cpu_autocast_only_when_asked(self, tmp_path: Path, amp: bool | None, autocast: bool) -> None:
        spy = self.AutocastSpy()
        run(spy, CROP, tmp_path / "out.tif", output="regression", window=64, overlap=16, amp=amp)
        assert spy.autocast is autocast
        assert spy.out_dtype == (torch.bfloat16 if autocast else torch.float32)

    def test_bf16_outputs_follow_float32(self, model: CountingModel, tmp_path: Path) -> None:
        """bf16 model outputs are blended in float32: the mosaic stays within bf16 rounding of the float32 one."""
        outs = {}
        for amp in (False, True):
            dst = tmp_path / f"{amp}.tif"
            run(model, CROP, dst, output="regression", window=64, overlap=16, amp=amp)
            with rasterio.open(dst) as out:
                outs[amp] = out.read()
        valid = ~np.isnan(outs[False][0])
        assert (np.isnan(outs[True][0]) == ~valid).all()
        assert outs[True].dtype == np.float32
        scale = np.abs(outs[False][:, valid]).max()
        np.testing.assert_allclose(outs[True][:, valid], outs[False][:, valid], rtol=0, atol=2e-2 * scale)
        assert not np.array_equal(outs[True][:, valid], outs[False][:, valid])  # bf16 did run


class TestAtomicity:
    def test_crash_in_model_leaves_nothing(self, tmp_path: Path) -> None:
        class Exploding(CountingModel):
            def forward(self, x: Tensor) -> Tensor:
                if self.calls == 3:
                    raise RuntimeError("simulated crash")
                return super().forward(x)

        dst = tmp_path / "out.tif"
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(Exploding(), CROP, dst, window=32, overlap=8, batch_size=2, probabilities=tmp_path / "p.tif")
        assert list(tmp_path.iterdir()) == []

    def test_crash_while_writing_keeps_old_output(self, model: CountingModel, tmp_path: Path, monkeypatch) -> None:
        dst = tmp_path / "out.tif"
        dst.write_bytes(b"previous result")

        def broken_copy(*args, **kwargs) -> None:
            Path(args[1]).write_bytes(b"half a COG")  # the conversion had started writing
            raise OSError("disk full (simulated)")

        monkeypatch.setattr(rasterio.shutil, "copy", broken_copy)
        with pytest.raises(OSError, match="disk full"):
            run(model, CROP, dst, window=64, overwrite=True)
        assert dst.read_bytes() == b"previous result"
        assert temporaries(tmp_path) == []

    def test_existing_output_needs_overwrite(self, model: CountingModel, tmp_path: Path) -> None:
        dst = tmp_path / "out.tif"
        dst.write_bytes(b"x")
        with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
            run(model, CROP, dst, window=64)
        assert model.calls == 0  # checked before any work
        run(model, CROP, dst, window=64, overwrite=True)
        with rasterio.open(dst) as out:
            assert out.count == 1


class TestErrors:
    def test_wrong_model_output(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"expected \(4, 4, 64, 64\)"):
            run(nn.Conv2d(3, 3, 1), CROP, tmp_path / "o.tif", window=64)
        assert temporaries(tmp_path) == []

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"output": "probs"}, ValueError, "output must be one of"),
            ({"activation": "relu"}, ValueError, "activation must be one of"),
            ({"bands": [4]}, ValueError, "bands must be 1-based"),
            ({"normalization": Normalization.zscore([0], [1])}, ValueError, "has 1 bands but 3 bands"),
            ({"class_names": ["a"]}, ValueError, "class_names has 1 names"),
            ({"output": "regression", "probabilities": "p.tif"}, ValueError, "probabilities= is an extra output"),
            ({"window": 100}, ValueError, "multiple of 16"),
        ],
    )
    def test_bad_arguments(self, model: CountingModel, tmp_path: Path, kwargs: dict, error: type, match: str) -> None:
        with pytest.raises(error, match=match):
            run(model, CROP, tmp_path / "o.tif", **kwargs)

    def test_normalization_as_dict_and_training_mode_restored(self, model: CountingModel, tmp_path: Path) -> None:
        model.train()
        run(model, CROP, tmp_path / "o.tif", window=64, normalization=NORM.to_dict(), output="scores")
        assert model.training
        with rasterio.open(tmp_path / "o.tif") as out:
            assert out.count == 4 and out.dtypes[0] == "uint8"
