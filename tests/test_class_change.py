"""Land-cover transitions between two class maps (``dinov3-eo segment change``), against a naive pixel loop."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from dinov3_eo.cli import main as cli_main
from dinov3_eo.inference.writers import write_cog
from dinov3_eo.tasks.class_change import class_transitions, transition_report

NAMES = ["water", "crop", "tree", "built"]
ORIGIN = (600_000.0, 7_500_000.0)


def write_map(path: Path, labels: np.ndarray, *, res: float = 30.0, names: list[str] | None = NAMES,
              crs: str = "EPSG:32721") -> Path:  # fmt: skip
    options = {"class_names": names} if names is not None else {}
    return write_cog(path, labels.astype(np.uint8), crs=crs, transform=from_origin(*ORIGIN, res, res), nodata=255,
                     overviews=False, **options)  # fmt: skip


@pytest.fixture
def maps(tmp_path: Path) -> dict:
    rng = np.random.default_rng(0)
    before = rng.integers(0, 4, (5, 6)).repeat(12, axis=0).repeat(10, axis=1)  # 60 x 60 of blocks
    after = before.copy()
    after[10:30, 5:35] = 1  # a field cleared (whatever was there is crop now)
    after[rng.random(after.shape) < 0.03] = 3  # scattered new buildings
    before[50:55, 0:8] = 255  # nodata in one date only
    after[0:4, 40:60] = 255
    return {"before": before, "after": after,
            "before_path": write_map(tmp_path / "before.tif", before), "after_path": write_map(tmp_path / "after.tif", after)}  # fmt: skip


def naive_counts(before: np.ndarray, after: np.ndarray, k: int) -> np.ndarray:
    counts = np.zeros((k, k), dtype=np.int64)
    for b, a in zip(before.ravel(), after.ravel()):
        if b < k and a < k:
            counts[b, a] += 1
    return counts


def test_transitions_match_a_pixel_loop_and_write_their_files(maps: dict, tmp_path: Path) -> None:
    report = class_transitions(maps["before_path"], maps["after_path"], out_dir=tmp_path / "out", block=16)
    counts = naive_counts(maps["before"], maps["after"], 4)
    assert report["pixel_counts"] == counts.tolist() and report["unit"] == "ha"
    np.testing.assert_allclose(report["matrix"], counts * 0.09)  # 30 m pixels
    crop = report["classes"]["crop"]
    assert crop["after"] - crop["before"] == pytest.approx(crop["net"])
    assert crop["gross_gain"] == pytest.approx((counts[:, 1].sum() - counts[1, 1]) * 0.09)
    assert crop["gross_loss"] == pytest.approx((counts[1].sum() - counts[1, 1]) * 0.09)
    changed = counts.sum() - np.trace(counts)
    assert report["changed"] == pytest.approx(changed * 0.09) and report["changed_fraction"] == pytest.approx(changed / counts.sum())
    largest = report["transitions"][0]
    i, j = divmod(int(np.argmax(np.where(np.eye(4, dtype=bool), -1, counts))), 4)
    assert (largest["from"], largest["to"]) == (NAMES[i], NAMES[j])
    assert [t["area"] for t in report["transitions"]] == sorted((t["area"] for t in report["transitions"]), reverse=True)

    out = tmp_path / "out"
    assert json.loads((out / "transitions.json").read_text())["pixel_counts"] == counts.tolist()
    with open(out / "transitions.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == NAMES and float(rows[2][2]) == pytest.approx(counts[1, 1] * 0.09)
    with rasterio.open(out / "from_to.tif") as src:
        codes = src.read(1)
        names = json.loads(src.tags()["class_names"])
        assert src.colormap(1)[1 * 4 + 3][:3] != src.colormap(1)[1 * 4 + 1][:3]  # changed pixels take the new class's colour
    both = (maps["before"] < 4) & (maps["after"] < 4)
    np.testing.assert_array_equal(codes[both], maps["before"][both] * 4 + maps["after"][both])
    assert (codes[~both] == 255).all() and names[2 * 4 + 1] == "tree -> crop"
    assert (out / "transitions.png").stat().st_size > 5_000


def test_the_after_map_may_be_on_another_grid(maps: dict, tmp_path: Path) -> None:
    """The after map at 15 m (each 30 m cell split in four) is brought onto the 30 m grid by nearest resampling."""
    fine = write_map(tmp_path / "after_15m.tif", maps["after"].repeat(2, axis=0).repeat(2, axis=1), res=15.0)
    report = class_transitions(maps["before_path"], fine)
    assert report["pixel_counts"] == naive_counts(maps["before"], maps["after"], 4).tolist()


def test_bad_inputs_stop_with_one_sentence(maps: dict, tmp_path: Path) -> None:
    other = write_map(tmp_path / "other.tif", maps["after"], names=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="name different classes"):
        class_transitions(maps["before_path"], other)
    assert class_transitions(maps["before_path"], other, class_names=NAMES)["pixels"] > 0
    unnamed = write_map(tmp_path / "unnamed.tif", maps["after"], names=None)
    bare = write_map(tmp_path / "bare.tif", maps["before"], names=None)
    with pytest.raises(ValueError, match="names its classes"):
        class_transitions(bare, unnamed)
    wild = maps["after"].copy()
    wild[5, 5] = 7
    with pytest.raises(ValueError, match=r"Class ids \[7\] in .*wild.tif are outside 0..3"):
        class_transitions(maps["before_path"], write_map(tmp_path / "wild.tif", wild), out_dir=tmp_path / "w")
    assert not (tmp_path / "w" / "from_to.tif").exists()  # nothing half-written is left
    far = write_map(tmp_path / "far.tif", maps["after"], crs="EPSG:32633")
    with pytest.raises(ValueError, match="does not overlap"):
        class_transitions(maps["before_path"], far)


def test_report_of_a_known_matrix() -> None:
    report = transition_report(np.array([[8, 2], [0, 10]]), ["forest", "crop"], pixel_area=0.5)
    assert report["classes"]["forest"] == {"before": 5.0, "after": 4.0, "net": -1.0, "gross_loss": 1.0,
                                           "gross_gain": 0.0, "stable": 4.0}  # fmt: skip
    assert report["transitions"] == [{"from": "forest", "to": "crop", "area": 1.0}]
    assert report["changed"] == 1.0 and report["changed_fraction"] == 0.1


def test_segment_change_command(maps: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["segment", "change", str(maps["before_path"]), str(maps["after_path"]), "--out-dir", str(tmp_path / "o")]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "changed:" in printed and " -> crop: " in printed and "(ha)" in printed
    assert cli_main(args) == 2 and "already exists" in capsys.readouterr().err
    assert cli_main([*args, "--overwrite"]) == 0
    assert cli_main(["segment", "change", str(maps["before_path"]), str(tmp_path / "none.tif")]) == 2
