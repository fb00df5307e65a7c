"""Multi-label chip classification (``classify fit --multi-label``): the metrics against scikit-learn, the
one-vs-rest probe against scikit-learn's logistic regressions, the multi-label k-NN against a loop, label tables with
lists or joined classes, and fit / test / predict / map from the command line on real chips.

The chips are 16 x 16 cuts of ``tests/data/rgb_byte_crop.tif`` (real Landsat-7 RGB, CC0) with two labels their
pixels decide, alone, together or neither: ``bright`` (mean above the median) and ``textured`` (standard deviation
above the median).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from brightness_chips import SCENE, save_chip, scene_cuts, micro_export
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, average_precision_score, f1_score

from dinov3_eo.cli import main as cli_main
from dinov3_eo.tasks.chip_classification import (
    ChipClassifier,
    fit_chip_classifier,
    knn_scores,
    label_matrix,
    table_multilabels,
)
from dinov3_eo.tasks.multilabel_metrics import average_precision, multilabel_report


def test_metrics_equal_scikit_learns() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(3, 80))
        scores, positive = np.round(rng.random(n), 1), rng.random(n) < 0.3  # rounded: many tied scores
        if positive.any():
            assert average_precision(scores, positive) == pytest.approx(average_precision_score(positive, scores), abs=1e-12)
    assert np.isnan(average_precision(np.ones(4), np.zeros(4, bool)))
    scores, targets = rng.random((60, 5)), rng.random((60, 5)) < 0.35
    targets[:, 4] = False  # a class without positives: no AP, left out of the macro mean
    report = multilabel_report(scores, targets, list("abcde"), threshold=0.6)
    predicted = scores >= 0.6
    assert report["map_macro"] == pytest.approx(np.mean([average_precision_score(targets[:, k], scores[:, k]) for k in range(4)]))
    assert report["map_micro"] == pytest.approx(average_precision_score(targets.ravel(), scores.ravel()))
    assert report["f1_micro"] == pytest.approx(f1_score(targets, predicted, average="micro"))
    assert report["f1_samples"] == pytest.approx(f1_score(targets, predicted, average="samples", zero_division=1.0))
    assert report["exact_match"] == pytest.approx(accuracy_score(targets, predicted))
    per_class = f1_score(targets, predicted, average=None, zero_division=np.nan)
    for k, name in enumerate("abcde"):
        assert report["classes"][name]["f1"] == pytest.approx(per_class[k], nan_ok=True)
        assert report["classes"][name]["positives"] == targets[:, k].sum()
    assert np.isnan(report["classes"]["e"]["ap"]) and report["classes"]["e"]["predicted"] == predicted[:, 4].sum()


def multilabel_blobs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = rng.random((n, 3)) < [0.5, 0.3, 0.6]
    x = targets @ rng.normal(size=(3, 10)) * 2 + rng.normal(size=(n, 10))
    return x.astype(np.float32), targets


def test_one_vs_rest_probe_is_scikit_learns_and_c_is_the_held_out_best() -> None:
    x, targets = multilabel_blobs(150)
    vx, vt = multilabel_blobs(60, seed=1)
    grid = (0.001, 0.1, 10.0)
    probe = fit_chip_classifier(x, targets, ["a", "b", "c"], val=(vx, vt), c_grid=grid, threshold=0.4)
    map_of = {c: np.mean([average_precision_score(vt[:, k], LogisticRegression(C=c, max_iter=1000).fit(x, targets[:, k])
                                                  .predict_proba(vx)[:, 1]) for k in range(3)]) for c in grid}  # fmt: skip
    best = max(map_of.values())
    assert probe.c == min(c for c, v in map_of.items() if v >= best - 1e-12)
    reference = np.stack([LogisticRegression(C=probe.c, max_iter=1000).fit(x, targets[:, k]).predict_proba(vx)[:, 1]
                          for k in range(3)], axis=1)  # fmt: skip
    np.testing.assert_allclose(probe.scores(vx), reference, atol=1e-5)
    assert probe.multi_label and probe.threshold == 0.4

    balanced = fit_chip_classifier(x, targets, ["a", "b", "c"], balanced=True)
    expected = np.stack([LogisticRegression(class_weight="balanced", max_iter=1000).fit(x, targets[:, k]).predict_proba(vx)[:, 1]
                         for k in range(3)], axis=1)  # fmt: skip
    np.testing.assert_allclose(balanced.scores(vx), expected, atol=1e-5)

    one_sided = targets.copy()
    one_sided[:, 1], one_sided[:, 2] = True, False  # every chip has b, none has c
    scores = fit_chip_classifier(x, one_sided, ["a", "b", "c"]).scores(vx)
    assert (scores[:, 1] == 1.0).all() and (scores[:, 2] == 0.0).all()
    with pytest.raises(ValueError, match="must be \\[chips, classes\\]"):
        fit_chip_classifier(x, targets[:, :2], ["a", "b", "c"])


def test_multilabel_knn_is_a_loop_and_probes_round_trip(tmp_path: Path) -> None:
    x, targets = multilabel_blobs(40)
    q, _ = multilabel_blobs(6, seed=2)
    got = knn_scores(x, targets.astype(np.int64), q, 3, k=5, temperature=0.1)
    for i, row in enumerate(q):
        sims = np.array([row @ b / np.linalg.norm(row) / np.linalg.norm(b) for b in x])
        top = np.argsort(-sims)[:5]
        w = np.exp(sims[top] / 0.1)
        np.testing.assert_allclose(got[i], (w[:, None] * targets[top]).sum(0) / w.sum(), rtol=1e-5)
    for method in ("linear", "knn"):
        probe = fit_chip_classifier(x, targets, ["a", "b", "c"], method=method, k=5, threshold=0.3)
        back = ChipClassifier.load(probe.save(tmp_path / f"{method}.safetensors"))
        assert back.multi_label and back.threshold == 0.3 and back.method == method
        np.testing.assert_allclose(back.scores(q), probe.scores(q), atol=1e-6)


def test_label_tables_with_lists_or_joined_classes(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    pd.DataFrame({"image": ["a.png", "b.png", "c.png"], "labels": ["water;crop", " crop ", None]}).to_csv(tmp_path / "t.csv", index=False)
    paths, labels = table_multilabels(tmp_path / "t.csv")
    assert [Path(p).name for p in paths] == ["a.png", "b.png", "c.png"] and labels == [["crop", "water"], ["crop"], []]
    pd.DataFrame({"path": ["a.png", "b.png", "c.png"], "label": [["water", "crop"], ["crop"], []]}).to_parquet(tmp_path / "t.parquet")
    assert table_multilabels(tmp_path / "t.parquet")[1] == labels
    pd.DataFrame({"image": ["a.png"], "label": ["water|crop"]}).to_csv(tmp_path / "bar.csv", index=False)
    assert table_multilabels(tmp_path / "bar.csv", separator="|")[1] == [["crop", "water"]]
    assert label_matrix(labels, ["crop", "water", "tree"]).tolist() == [[True, True, False], [True, False, False],
                                                                        [False, False, False]]  # fmt: skip


@pytest.fixture(scope="module")
def labelled_chips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scene's 16-px PNG chips and ``labels.csv`` naming each chip's classes, ';'-joined."""
    root = tmp_path_factory.mktemp("multilabel")
    cuts = scene_cuts()
    mean_middle = np.median([cut.mean() for cut in cuts.values()])
    std_middle = np.median([cut.astype(float).std() for cut in cuts.values()])
    rows = []
    for (r, c), cut in cuts.items():
        save_chip(cut, root / "chips" / f"{r}_{c}.png")
        names = [n for n, on in (("bright", cut.mean() > mean_middle), ("textured", cut.astype(float).std() > std_middle)) if on]
        rows.append({"image": f"chips/{r}_{c}.png", "labels": ";".join(names)})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def test_multilabel_fit_test_predict_and_map_from_the_command_line(labelled_chips: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    table = labelled_chips / "labels.csv"
    _, labels = table_multilabels(table)
    assert {len(n) for n in labels} == {0, 1, 2}  # chips with neither, one and both labels
    pth = micro_export(tmp_path)
    probe = tmp_path / "probe.safetensors"
    assert cli_main(["classify", "fit", "--labels", str(table), "--multi-label", "--model", str(pth), "--size", "32",
                     "-o", str(probe), "--val-fraction", "0.3", "--out-dir", str(tmp_path / "fit"), "--quiet"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "multi-label linear probe on 50 chips of 2 classes" in out and "22 held-out chips" in out and "mAP" in out
    fitted = ChipClassifier.load(probe)
    assert fitted.multi_label and fitted.classes == ["bright", "textured"]
    held = json.loads((tmp_path / "fit" / "metrics.json").read_text())
    assert held["chips"] == 22 and fitted.held_out_accuracy == pytest.approx(held["map_macro"])
    assert held["classes"]["bright"]["ap"] >= 0.8  # brightness survives a random ViT's mean patch token
    assert (tmp_path / "fit" / "per_class.csv").exists()

    predictions = tmp_path / "p.csv"
    assert cli_main(["classify", "predict", str(labelled_chips / "chips"), "--probe", str(probe), "-o", str(predictions),
                     "--threshold", "0.4", "--quiet"]) == 0  # fmt: skip
    rows = list(csv.DictReader(predictions.open()))
    assert len(rows) == 72 and list(rows[0]) == ["path", "labels", "p_bright", "p_textured"]
    for row in rows:
        expected = [n for n in ("bright", "textured") if float(row[f"p_{n}"]) >= 0.4]
        assert row["labels"] == ";".join(expected)
    assert cli_main(["classify", "test", "--labels", str(table), "--probe", str(probe), "--out-dir", str(tmp_path / "t"),
                     "--quiet"]) == 0  # fmt: skip
    tested = json.loads((tmp_path / "t" / "metrics.json").read_text())
    by_path = {Path(r["path"]).name: r for r in rows}
    p = np.array([[float(by_path[Path(x).name][f"p_{n}"]) for n in ("bright", "textured")] for x in table_multilabels(table)[0]])
    assert tested["chips"] == 72 and tested["threshold"] == 0.5
    assert tested["map_macro"] == pytest.approx(np.mean([average_precision_score(label_matrix(labels, fitted.classes)[:, k],
                                                                                 p[:, k]) for k in range(2)]), abs=1e-5)  # fmt: skip

    # the multi-label probe over the scene: the tiles' labels
    assert cli_main(["classify", "map", str(SCENE), "--probe", str(probe), "-o", str(tmp_path / "map"), "--quiet"]) == 0
    tiles = gpd.read_file(tmp_path / "map" / "rgb_byte_crop_tiles.gpkg")
    assert "labels" in tiles.columns and len(tiles) == 104
    for tile in tiles.itertuples():
        assert tile.labels == ";".join(n for n in ("bright", "textured") if getattr(tile, f"p_{n}") >= 0.5)

    capsys.readouterr()
    assert cli_main(["classify", "fit", str(labelled_chips / "chips"), "--multi-label", "--model", str(pth), "-o",
                     str(tmp_path / "x.safetensors")]) == 2  # fmt: skip
    assert "Multi-label chips come from a label table" in capsys.readouterr().err
    assert cli_main(["classify", "fit", "--labels", str(table), "--multi-label", "--val", str(labelled_chips), "--model",
                     str(pth), "-o", str(tmp_path / "x.safetensors")]) == 2  # fmt: skip
    assert "come from a table (--val-labels), not --val folders" in capsys.readouterr().err
