"""COG, quick-look and polygon writers (dinov3_eo.inference.writers)."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.shutil
from PIL import Image
from rasterio.features import rasterize
from rasterio.transform import from_origin
from rasterio.windows import Window

from dinov3_eo.inference.writers import (
    _cog_options,
    COGWriter,
    atomic_output,
    check_overwrite,
    default_colormap,
    vectorize_classes,
    write_cog,
    write_quicklook,
)

CROP = Path(__file__).parent / "data" / "rgb_byte_crop.tif"
CRS = "EPSG:32618"
TRANSFORM = from_origin(101985.0, 2826915.0, 300.0, 300.0)


def temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("."))


def class_map(height: int = 60, width: int = 70) -> np.ndarray:
    """Blocky classes 0..3 with a nodata (255) corner and a few single-pixel specks."""
    labels = np.zeros((height, width), dtype=np.uint8)
    labels[: height // 2, width // 2 :] = 1
    labels[height // 2 :, : width // 3] = 2
    labels[height // 2 :, width // 3 :] = 3
    labels[5, 5] = labels[40, 60] = 1  # specks of one pixel
    labels[:4, -4:] = 255
    return labels


class TestCOGWriter:
    def test_blocks_in_any_order_round_trip(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(0)
        data = rng.integers(0, 200, size=(2, 1100, 1030), dtype=np.uint8)
        dst = tmp_path / "out.tif"
        blocks = [(r, c) for r in range(0, 1100, 300) for c in range(0, 1030, 250)]
        rng.shuffle(blocks)
        with COGWriter(dst, crs=CRS, transform=TRANSFORM, width=1030, height=1100, count=2, dtype="uint8",
                       nodata=255, compress="lzw", band_descriptions=["a", "b"]) as out:  # fmt: skip
            for r, c in blocks:
                h, w = min(300, 1100 - r), min(250, 1030 - c)
                out.write(data[:, r : r + h, c : c + w], Window(c, r, w, h))
        with rasterio.open(dst) as cog:
            np.testing.assert_array_equal(cog.read(), data)
            assert cog.crs.to_epsg() == 32618 and cog.transform == TRANSFORM
            assert cog.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            assert cog.compression.name == "lzw"
            assert cog.block_shapes[0] == (512, 512)
            assert cog.overviews(1) == [2, 4]  # down to one 512-px tile
            assert cog.descriptions == ("a", "b") and cog.nodata == 255
        assert temporaries(tmp_path) == []

    def test_predictor_only_for_continuous_bands(self, tmp_path: Path) -> None:
        """Class ids are categories: no horizontal differencing; continuous uint8 bands keep predictor 2."""
        labels = class_map()
        kinds = {"classes": dict(class_names=["a", "b", "c", "d"]), "scores": dict(band_descriptions=["p"])}
        for name, extra in kinds.items():
            with COGWriter(tmp_path / f"{name}.tif", crs=CRS, transform=TRANSFORM, width=70, height=60, count=1,
                           dtype="uint8", nodata=255, **extra) as out:  # fmt: skip
                out.write(labels, Window(0, 0, 70, 60))
            with rasterio.open(tmp_path / f"{name}.tif") as cog:
                np.testing.assert_array_equal(cog.read(1), labels)
                predictor = cog.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR", "1")
                assert predictor == ("1" if name == "classes" else "2"), name
        # and class maps trade a little size for a faster conversion (DEFLATE level 5 instead of GDAL's 6)
        assert _cog_options(compress="deflate", float_data=False, overviews=True, categorical=True)["level"] == 5
        assert "level" not in _cog_options(compress="deflate", float_data=False, overviews=True)
        assert "level" not in _cog_options(compress="lzw", float_data=False, overviews=True, categorical=True)

    def test_class_map_metadata(self, tmp_path: Path) -> None:
        names = ["water", "crop", "tree", "developed"]
        dst = write_cog(tmp_path / "c.tif", class_map(), crs=CRS, transform=TRANSFORM, nodata=255, class_names=names)
        with rasterio.open(dst) as cog:
            assert json.loads(cog.tags()["class_names"]) == names
            assert cog.tags(1)["CLASS_2"] == "tree"
            colours = cog.colormap(1)
            assert all(colours[i] == default_colormap(4)[i] for i in range(4))
            assert cog.dtypes == ("uint8",)

    def test_class_map_overviews_hold_class_ids(self, tmp_path: Path) -> None:
        labels = np.kron(class_map(), np.ones((20, 20), np.uint8))  # 1200 x 1400: two overview levels
        dst = write_cog(tmp_path / "c.tif", labels, crs=CRS, transform=TRANSFORM, nodata=255, class_names=list("abcd"))
        with rasterio.open(dst) as cog:
            assert cog.overviews(1) == [2, 4]
            coarse = cog.read(1, out_shape=(300, 350))  # served from the 4x overview
        assert set(np.unique(coarse)) <= {0, 1, 2, 3, 255}  # nearest, never an average of class ids

    def test_float_with_nan_nodata_and_scales(self, tmp_path: Path) -> None:
        data = np.linspace(0, 50, 40 * 30, dtype=np.float32).reshape(1, 40, 30)
        data[0, :3] = np.nan
        dst = write_cog(tmp_path / "h.tif", data, crs=CRS, transform=TRANSFORM, nodata=float("nan"), scales=[0.5])
        with rasterio.open(dst) as cog:
            got = cog.read(1)
            assert np.isnan(cog.nodata) and cog.scales == (0.5,)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(data[0]))
        np.testing.assert_array_equal(got[3:], data[0, 3:])

    def test_existing_output(self, tmp_path: Path) -> None:
        dst = tmp_path / "c.tif"
        dst.write_bytes(b"keep me")
        with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
            write_cog(dst, class_map(), crs=CRS, transform=TRANSFORM, nodata=255)
        assert dst.read_bytes() == b"keep me"
        write_cog(dst, class_map(), crs=CRS, transform=TRANSFORM, nodata=255, overwrite=True)
        with rasterio.open(dst) as cog:
            np.testing.assert_array_equal(cog.read(1), class_map())

    def test_error_inside_block_leaves_nothing(self, tmp_path: Path) -> None:
        dst = tmp_path / "c.tif"
        with pytest.raises(KeyboardInterrupt):
            with COGWriter(dst, crs=CRS, transform=TRANSFORM, width=70, height=60, count=1, dtype="uint8", nodata=255) as out:
                out.write(class_map()[:30], Window(0, 0, 70, 30))
                raise KeyboardInterrupt  # the user pressed Ctrl-C half-way
        assert list(tmp_path.iterdir()) == []

    def test_crash_during_conversion(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        dst = tmp_path / "c.tif"
        write_cog(dst, class_map(), crs=CRS, transform=TRANSFORM, nodata=255)
        before = dst.read_bytes()

        def broken_copy(src: object, target: object, **kwargs: object) -> None:
            Path(str(target)).write_bytes(b"partial")
            raise OSError("simulated crash")

        monkeypatch.setattr(rasterio.shutil, "copy", broken_copy)
        with pytest.raises(OSError, match="simulated crash"):
            write_cog(dst, np.zeros((60, 70), np.uint8), crs=CRS, transform=TRANSFORM, nodata=255, overwrite=True)
        assert dst.read_bytes() == before
        assert temporaries(tmp_path) == []

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"compress": "jpeg2000"}, "compress must be one of"),
            ({"count": 2, "class_names": ["a"]}, "needs one uint8/uint16 band"),
            ({"dtype": "float32", "class_names": ["a"]}, "needs one uint8/uint16 band"),
            ({"band_descriptions": ["a", "b"]}, "band_descriptions has 2 entries"),
        ],
    )
    def test_bad_options(self, tmp_path: Path, kwargs: dict, match: str) -> None:
        args = {"crs": CRS, "transform": TRANSFORM, "width": 8, "height": 8, "count": 1, "dtype": "uint8", "nodata": 0}
        with pytest.raises(ValueError, match=match):
            COGWriter(tmp_path / "x.tif", **(args | kwargs))

    def test_only_a_tif_path(self, tmp_path: Path) -> None:
        args = {"crs": CRS, "transform": TRANSFORM, "width": 8, "height": 8, "count": 1, "dtype": "uint8", "nodata": 0}
        with pytest.raises(ValueError, match=r"written to a \.tif or \.tiff path, not '.*map\.txt'"):
            COGWriter(tmp_path / "map.txt", **args)
        with COGWriter(tmp_path / "MAP.TIFF", **args) as out:
            out.write(np.ones((8, 8), np.uint8), Window(0, 0, 8, 8))
        assert (tmp_path / "MAP.TIFF").is_file() and not (tmp_path / "map.txt").exists()

    def test_block_checks(self, tmp_path: Path) -> None:
        writer = COGWriter(tmp_path / "x.tif", crs=CRS, transform=TRANSFORM, width=8, height=8, count=1, dtype="uint8", nodata=0)
        with pytest.raises(RuntimeError, match="not open"):
            writer.write(np.zeros((8, 8), np.uint8), Window(0, 0, 8, 8))
        with writer as out:
            with pytest.raises(ValueError, match="does not fit window"):
                out.write(np.zeros((4, 8), np.uint8), Window(0, 0, 8, 8))
            out.write(np.ones((8, 8), np.uint8), Window(0, 0, 8, 8))


class TestAtomicOutput:
    def test_success_and_failure(self, tmp_path: Path) -> None:
        dst = tmp_path / "a.txt"
        with atomic_output(dst) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".txt" and tmp.name.startswith(".")
            tmp.write_text("done")
            assert not dst.exists()
        assert dst.read_text() == "done"
        with pytest.raises(ZeroDivisionError):
            with atomic_output(dst, overwrite=True) as tmp:
                tmp.write_text("half")
                _ = 1 / 0
        assert dst.read_text() == "done" and temporaries(tmp_path) == []

    def test_missing_folder(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            with atomic_output(tmp_path / "nope" / "a.txt"):
                pass


class TestInputsAreNeverOverwritten:
    def test_the_same_file_under_any_name_is_refused_even_with_overwrite(self, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
        scene = tmp_path / "scene.tif"
        scene.write_bytes(b"pixels")
        (tmp_path / "link.tif").symlink_to(scene)
        monkeypatch.chdir(tmp_path)
        for name in (scene, "scene.tif", "./sub/../scene.tif", tmp_path / "link.tif"):
            with pytest.raises(ValueError, match=r"is the input .*scene\.tif.*inputs are never overwritten"):
                check_overwrite(name, True, inputs=[None, scene])
        assert scene.read_bytes() == b"pixels"
        assert check_overwrite(tmp_path / "out.tif", True, inputs=[scene, None]) == tmp_path / "out.tif"

    def test_predict_and_the_cli_refuse_to_write_over_their_input(self, tmp_path: Path) -> None:
        from dinov3_eo.cli import main as cli_main
        from dinov3_eo.inference.predict import predict_raster

        scene = tmp_path / "scene.tif"
        scene.write_bytes(CROP.read_bytes())
        with pytest.raises(ValueError, match="inputs are never overwritten"):
            predict_raster(lambda x: x, scene, scene, out_channels=3, overwrite=True, progress=False)
        assert cli_main(["embed", str(scene), "--model", "vitmicro16", "--normalization", "none", "-o", str(scene),
                         "--overwrite", "--quiet"]) == 2
        assert scene.read_bytes() == CROP.read_bytes()


class TestVectorize:
    @pytest.fixture
    def classes(self, tmp_path: Path) -> Path:
        names = ["water", "crop", "tree", "developed"]
        return write_cog(tmp_path / "c.tif", class_map(), crs=CRS, transform=TRANSFORM, nodata=255, class_names=names)

    def test_rasterised_polygons_equal_the_raster(self, classes: Path, tmp_path: Path) -> None:
        frame = vectorize_classes(classes, tmp_path / "p.gpkg")
        back = gpd.read_file(tmp_path / "p.gpkg", layer="classes")
        assert back.crs.to_epsg() == 32618 and len(back) == len(frame)
        assert set(back.columns) >= {"class_id", "class_name", "area", "geometry"}
        assert dict(zip(back.class_id, back.class_name)) == {0: "water", 1: "crop", 2: "tree", 3: "developed"}
        burned = rasterize(zip(back.geometry, back.class_id), out_shape=(60, 70), transform=TRANSFORM, fill=255, dtype="uint8")
        np.testing.assert_array_equal(burned, class_map())
        np.testing.assert_allclose(back.area, back.geometry.area)

    def test_min_area_drops_small_regions(self, classes: Path, tmp_path: Path) -> None:
        pixel_area = 300.0 * 300.0
        everything = vectorize_classes(classes, tmp_path / "all.gpkg")
        frame = vectorize_classes(classes, tmp_path / "big.gpkg", min_area=2 * pixel_area)
        assert (frame.area >= 2 * pixel_area).all()
        assert len(everything) - len(frame) == 2  # exactly the two one-pixel specks
        assert (everything.area < 2 * pixel_area).sum() == 2

    def test_connectivity_and_errors(self, classes: Path, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
            vectorize_classes(classes, tmp_path / "p.gpkg", connectivity=6)
        with pytest.raises(ValueError, match="min_area must be >= 0"):
            vectorize_classes(classes, tmp_path / "p.gpkg", min_area=-1)
        (tmp_path / "p.gpkg").write_bytes(b"")
        with pytest.raises(FileExistsError, match="already exists"):
            vectorize_classes(classes, tmp_path / "p.gpkg")

    def test_simplify_keeps_one_coverage(self, tmp_path: Path) -> None:
        """A disk and a diagonal band (staircase edges): simplified together, the polygons lose most vertices, stay
        valid, never overlap or leave gaps (areas sum to the raster's), and still burn back to ~the same map; each
        polygon simplified alone (shapely.simplify) would overlap its neighbours."""
        import shapely

        yy, xx = np.mgrid[:80, :80]
        labels = np.zeros((80, 80), np.uint8)
        labels[(yy - 40) ** 2 + (xx - 35) ** 2 < 20**2] = 1
        labels[(yy + xx > 100) & (yy + xx < 120)] = 2
        path = write_cog(tmp_path / "round.tif", labels, crs=CRS, transform=TRANSFORM, nodata=255, class_names=["a", "b", "c"])
        pixel = 300.0
        plain = vectorize_classes(path, tmp_path / "plain.gpkg")
        smooth = vectorize_classes(path, tmp_path / "smooth.gpkg", simplify=pixel)
        count = lambda frame: int(shapely.get_num_coordinates(frame.geometry.values).sum())  # noqa: E731
        assert count(smooth) * 3 < count(plain)
        assert smooth.geometry.is_valid.all() and list(smooth.class_id) == list(plain.class_id)
        total = 80 * 80 * pixel**2
        assert smooth.area.sum() == pytest.approx(total, rel=1e-9)  # no overlap ...
        assert shapely.union_all(smooth.geometry.values).area == pytest.approx(total, rel=1e-9)  # ... and no gap
        np.testing.assert_allclose(smooth["area"], smooth.geometry.area)
        burned = rasterize(zip(smooth.geometry, smooth.class_id), out_shape=labels.shape, transform=TRANSFORM, fill=255,
                           dtype="uint8")  # fmt: skip
        assert (burned == labels).mean() > 0.97
        alone = shapely.simplify(plain.geometry.values, pixel)
        assert abs(shapely.area(alone).sum() - shapely.union_all(alone).area) > pixel**2  # what the coverage avoids
        with pytest.raises(ValueError, match="simplify must be >= 0"):
            vectorize_classes(path, tmp_path / "x.gpkg", simplify=-1.0)

    def test_nothing_left(self, classes: Path, tmp_path: Path) -> None:
        frame = vectorize_classes(classes, tmp_path / "p.gpkg", min_area=1e12)
        assert frame.empty
        assert gpd.read_file(tmp_path / "p.gpkg").empty


class TestQuicklook:
    def test_over_real_imagery(self, tmp_path: Path) -> None:
        with rasterio.open(CROP) as src:
            labels = (src.read(1) // 64).astype(np.uint8)  # 4 brightness classes
            labels[src.read(1) == 0] = 255
            crs, transform = src.crs, src.transform
        classes = write_cog(tmp_path / "c.tif", labels, crs=crs, transform=transform, nodata=255,
                            class_names=["dark", "dim", "bright", "white"])  # fmt: skip
        png = write_quicklook(tmp_path / "q.png", classes=classes, image=CROP, max_size=128, title="test")
        with Image.open(png) as picture:
            assert picture.format == "PNG" and picture.width > 128 // 2  # picture plus a legend
            pixels = np.asarray(picture.convert("RGB"))
        assert pixels.std() > 10  # not a blank canvas
        assert temporaries(tmp_path) == []
        with pytest.raises(FileExistsError, match="already exists"):
            write_quicklook(png, classes=classes)

    def test_undeclared_nodata_shows_white_not_black(self, tmp_path: Path) -> None:
        with rasterio.open(CROP) as src:
            image, profile = src.read(), {**src.profile, "nodata": None}
        image[:, :, : image.shape[2] // 2] = 0  # a collar of 0 the file does not declare (as Landsat L1 products)
        scene = tmp_path / "scene.tif"
        with rasterio.open(scene, "w", **profile) as dst:
            dst.write(image)
        labels = np.where((image == 0).all(axis=0), 255, 1).astype(np.uint8)
        classes = write_cog(tmp_path / "c.tif", labels, crs=profile["crs"], transform=profile["transform"], nodata=255)
        black = {}
        for nodata in (None, 0):
            png = write_quicklook(tmp_path / f"q{nodata}.png", classes=classes, image=scene, nodata=nodata)
            with Image.open(png) as picture:
                black[nodata] = int((np.asarray(picture.convert("RGB")).max(axis=2) < 30).sum())
        assert black[None] > 50 * black[0] and black[None] > 0.3 * labels.size * 0.5

    def test_grid_mismatch(self, tmp_path: Path) -> None:
        classes = write_cog(tmp_path / "c.tif", class_map(), crs=CRS, transform=TRANSFORM, nodata=255)
        with pytest.raises(ValueError, match="is not on the grid"):
            write_quicklook(tmp_path / "q.png", classes=classes, image=CROP)
        assert not (tmp_path / "q.png").exists()


class TestStripwiseVectorize:
    """Polygonising strip by strip and joining the pieces gives the regions of a whole-raster polygonisation."""

    @staticmethod
    def regions(frame: gpd.GeoDataFrame) -> list[tuple[int, float, tuple[float, float]]]:
        return sorted((int(c), round(a, 3), (round(g.centroid.x, 3), round(g.centroid.y, 3)))
                      for c, a, g in zip(frame.class_id, frame.area, frame.geometry))  # fmt: skip

    def test_strips_join_into_the_whole_rasters_regions(self, tmp_path: Path) -> None:
        import shapely

        rng = np.random.default_rng(3)
        yy, xx = np.mgrid[:90, :75]
        labels = (rng.random((9, 8)) * 4).astype(np.uint8).repeat(10, axis=0).repeat(10, axis=1)[:90, :75]
        labels[(np.hypot(yy - 45, xx - 37) > 20) & (np.hypot(yy - 45, xx - 37) < 27)] = 5  # a ring across many strips
        labels[rng.random(labels.shape) < 0.05] = 6  # specks, some on the strip boundaries
        labels[80:84, 5:25] = 255  # nodata
        rotated = TRANSFORM @ rasterio.Affine.rotation(7)  # a rotated grid: the transform is applied at the end
        for transform in (TRANSFORM, rotated):
            path = write_cog(tmp_path / "m.tif", labels, crs=CRS, transform=transform, nodata=255, overwrite=True)
            whole = vectorize_classes(path, tmp_path / "whole.gpkg", strip_rows=1000, overwrite=True)
            for rows in (1, 7, 32):
                strips = vectorize_classes(path, tmp_path / "strips.gpkg", strip_rows=rows, overwrite=True)
                assert len(strips) == len(whole) and self.regions(strips) == self.regions(whole)
                assert strips.geometry.is_valid.all() and (strips.geometry.geom_type == "Polygon").all()
                for cls in np.unique(whole.class_id):
                    a = shapely.union_all(whole.geometry[whole.class_id == cls].values)
                    b = shapely.union_all(strips.geometry[strips.class_id == cls].values)
                    assert a.symmetric_difference(b).area < 1e-6 * a.area
        (ring,) = strips[strips.class_id == 5].geometry
        (ring_whole,) = whole[whole.class_id == 5].geometry
        assert len(ring.interiors) == len(ring_whole.interiors) > 1  # the inner disk's hole (and specks') survived
        largest = max(shapely.Polygon(h).area for h in ring.interiors)
        assert largest > 0.9 * np.pi * 20**2 * 300.0**2

    def test_eight_connectivity_reads_whole(self, tmp_path: Path) -> None:
        labels = np.zeros((6, 6), np.uint8)
        labels[np.arange(6), np.arange(6)] = 1  # one diagonal region for 8-connectivity
        path = write_cog(tmp_path / "d.tif", labels, crs=CRS, transform=TRANSFORM, nodata=255)
        frame = vectorize_classes(path, tmp_path / "d.gpkg", connectivity=8, strip_rows=2, keep=[1])
        assert len(frame) == 1 and frame.area.iloc[0] == pytest.approx(6 * 300.0**2)
