"""Scene classification of chips on frozen features (``dinov3-eo classify``): the k-NN against a loop, the linear
probe against scikit-learn, the safetensors probe round trip, and fit + predict from the command line on real chips.

The command-line chips are 16 x 16 cuts of ``tests/data/rgb_byte_crop.tif`` (real Landsat-7 RGB, CC0), saved as PNG
in one folder per class: ``dark`` and ``bright`` by their mean brightness, a class their pixels decide.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from brightness_chips import brightness_folders, micro_export
from PIL import Image
from sklearn.linear_model import LogisticRegression

from dinov3_eo.cli import main as cli_main
from dinov3_eo.tasks.chip_classification import (
    ChipClassifier,
    chip_features,
    fit_chip_classifier,
    folder_labels,
    knn_scores,
    stratified_split,
)
from dinov3_eo.tasks.chip_embeddings import ChipEmbeddings



def blobs(n: int, k: int, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 2
    y = rng.integers(0, k, n)
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_knn_scores_match_a_loop() -> None:
    bank, labels = blobs(60, 3)
    x, _ = blobs(7, 3, seed=1)
    got = knn_scores(bank, labels, x, 3, k=5, temperature=0.1)
    for i, row in enumerate(x):
        sims = [float(row @ b / np.linalg.norm(row) / np.linalg.norm(b)) for b in bank]
        votes = np.zeros(3)
        for j in sorted(range(len(bank)), key=lambda j: -sims[j])[:5]:
            votes[labels[j]] += np.exp(sims[j] / 0.1)
        np.testing.assert_allclose(got[i], votes / votes.sum(), rtol=1e-5)
    assert knn_scores(bank[:3], labels[:3], x, 3, k=20).shape == (7, 3)  # k larger than the bank


@pytest.mark.parametrize("k", [2, 4])
def test_linear_probe_is_scikit_learns_and_c_is_chosen_held_out(k: int) -> None:
    x, y = blobs(200, k)
    vx, vy = blobs(80, k, seed=3)
    probe = fit_chip_classifier(x, y, [f"c{i}" for i in range(k)], val=(vx, vy), c_grid=(0.001, 0.1, 10.0))
    accuracy = {c: (LogisticRegression(C=c, max_iter=1000).fit(x, y).predict(vx) == vy).mean() for c in (0.001, 0.1, 10.0)}
    best = max(accuracy.values())
    assert probe.c == min(c for c, a in accuracy.items() if a == best)
    reference = LogisticRegression(C=probe.c, max_iter=1000).fit(x, y)
    np.testing.assert_allclose(probe.scores(vx), reference.predict_proba(vx), atol=1e-5)
    assert fit_chip_classifier(x, y, [f"c{i}" for i in range(k)]).c == 1.0
    with pytest.raises(ValueError, match="at least two classes"):
        fit_chip_classifier(x[y == 0], y[y == 0], ["a", "b"])


def test_balanced_probe_is_scikit_learns_balanced_and_c_is_chosen_by_mean_recall() -> None:
    x, y = blobs(300, 3)
    keep = (y != 2) | (np.arange(300) % 10 == 0)  # class 2 rare: a tenth of its chips
    x, y = x[keep], y[keep]
    vx, vy = blobs(120, 3, seed=4)
    grid = (0.001, 0.01, 1.0)
    probe = fit_chip_classifier(x, y, ["a", "b", "c"], val=(vx, vy), c_grid=grid, balanced=True)
    recall = {}
    for c in grid:
        predicted = LogisticRegression(C=c, class_weight="balanced", max_iter=1000).fit(x, y).predict(vx)
        recall[c] = np.mean([(predicted[vy == k] == k).mean() for k in range(3)])
    assert probe.c == min(c for c, r in recall.items() if r == max(recall.values())) and probe.balanced
    reference = LogisticRegression(C=probe.c, class_weight="balanced", max_iter=1000).fit(x, y)
    np.testing.assert_allclose(probe.scores(vx), reference.predict_proba(vx), atol=1e-5)
    with pytest.raises(ValueError, match="for the linear probe"):
        fit_chip_classifier(x, y, ["a", "b", "c"], method="knn", balanced=True)


def test_a_class_without_training_chips_is_never_predicted() -> None:
    x, y = blobs(100, 3)
    probe = fit_chip_classifier(x[y != 1], y[y != 1], ["a", "b", "c"])
    scores = probe.scores(x)
    assert scores.shape == (100, 3) and scores[:, 1].max() < 1e-6 and np.allclose(scores.sum(1), 1)


def test_probes_round_trip_and_bad_files_are_named(tmp_path: Path) -> None:
    x, y = blobs(50, 3)
    for method in ("linear", "knn"):
        probe = fit_chip_classifier(x, y, ["a", "b", "c"], method=method, features="cls", k=7)
        probe.embedding, probe.held_out_accuracy = {"backbone_source": "/m.pth", "size": 64}, 0.5
        back = ChipClassifier.load(probe.save(tmp_path / f"{method}.safetensors"))
        assert (back.method, back.classes, back.features, back.k, back.embedding, back.held_out_accuracy) == (
            method, ["a", "b", "c"], "cls", 7, probe.embedding, 0.5)  # fmt: skip
        np.testing.assert_allclose(back.scores(x), probe.scores(x), atol=1e-6)
        with pytest.raises(FileExistsError):
            probe.save(tmp_path / f"{method}.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="junk.safetensors' is not a safetensors file"):
        ChipClassifier.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a chip classifier"):
        ChipClassifier.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        ChipClassifier.load(tmp_path / "missing.safetensors")


def test_embedding_rows_are_taken_in_the_order_asked() -> None:
    emb = ChipEmbeddings(paths=["/c/a.png", "/c/b.png"], cls=np.array([[1.0], [2.0]], np.float32),
                         patch_mean=np.array([[3.0], [4.0]], np.float32), sizes=np.array([[8, 8], [16, 16]]))  # fmt: skip
    back = emb.take(["/c/b.png", "/c/a.png", "/c/b.png"])
    assert back.paths == ["/c/b.png", "/c/a.png", "/c/b.png"] and back.cls[:, 0].tolist() == [2, 1, 2]
    assert back.patch_mean[:, 0].tolist() == [4, 3, 4] and back.sizes[:, 0].tolist() == [16, 8, 16]
    with pytest.raises(KeyError, match="has no embedding"):
        emb.take(["/c/z.png"])


def test_features_splits_and_folder_labels() -> None:
    emb = ChipEmbeddings(paths=["a/x.png", "b/y.png"], cls=np.array([[3.0, 4.0], [1.0, 0.0]], np.float32),
                         patch_mean=np.array([[0.0, 2.0], [np.nan, np.nan]], np.float32), sizes=np.zeros((2, 2)))  # fmt: skip
    np.testing.assert_allclose(chip_features(emb, "cls"), [[0.6, 0.8], [1, 0]])
    np.testing.assert_allclose(chip_features(emb, "cls+patch_mean"), [[0.6, 0.8, 0, 1], [1, 0, 0, 0]])
    with pytest.raises(ValueError, match="features must be one of"):
        chip_features(emb, "mean")
    assert folder_labels(["/d/EuroSAT/Forest/Forest_1.jpg", "River/r.png"]) == ["Forest", "River"]
    labels = ["a"] * 10 + ["b"] * 5 + ["c"] * 2 + ["d"]
    train, held = stratified_split(labels, 0.2, seed=1)
    assert sorted([*train, *held]) == list(range(18)) and not set(train) & set(held)
    assert [np.sum(np.asarray(labels)[held] == c) for c in "abcd"] == [2, 1, 1, 0]  # a lone chip stays in training
    assert np.array_equal(stratified_split(labels, 0.2, seed=1)[1], held)


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``dark/`` and ``bright/`` 16-px PNG chips of the real scene (chips touching the nodata collar left out), fed at
    32 px."""
    return brightness_folders(tmp_path_factory.mktemp("scenes"))


def test_classify_fit_and_predict_from_the_command_line(class_folders: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    pth = micro_export(tmp_path)
    probe = tmp_path / "probe.safetensors"
    common = ["--model", str(pth), "--size", "32", "--quiet"]
    assert cli_main(["classify", "fit", str(class_folders), "-o", str(probe), "--out-dir", str(tmp_path / "report"),
                     "--val-fraction", "0.3", *common]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "linear probe on" in out and "held-out chips" in out and "overall accuracy" in out
    fitted = ChipClassifier.load(probe)
    assert fitted.classes == ["bright", "dark"] and fitted.embedding["size"] == 32
    assert fitted.held_out_accuracy >= 0.8  # brightness survives a random ViT's mean patch token
    assert (tmp_path / "report" / "confusion.png").exists() and (tmp_path / "report" / "metrics.json").exists()

    chips = sorted(class_folders.rglob("*.png"))
    predictions = tmp_path / "predictions.csv"
    assert cli_main(["classify", "predict", str(class_folders), "--probe", str(probe), "-o", str(predictions), "--quiet"]) == 0
    rows = list(csv.DictReader(predictions.open()))
    assert [r["path"] for r in rows] == [str(p) for p in chips]
    # the held-out chips calibrated 90 % prediction sets: each chip's classes of probability >= the set threshold
    assert fitted.sets["coverage"] == 0.9 and fitted.sets["n"] >= 9 and "90 % prediction sets" in out
    assert list(rows[0]) == ["path", "class", "score", "set", "set_size", "p_bright", "p_dark"]
    for r in rows:
        assert r["class"] == max(("bright", "dark"), key=lambda c: float(r[f"p_{c}"]))
        assert abs(float(r["p_bright"]) + float(r["p_dark"]) - 1) < 1e-5
        members = [c for c in ("bright", "dark") if float(r[f"p_{c}"]) >= fitted.sets["threshold"] - 1e-6]
        assert (r["set"].split(";") if r["set"] else []) == members and int(r["set_size"]) == len(members)
    right = np.mean([r["class"] == Path(r["path"]).parent.name for r in rows])
    assert right >= 0.8
    # classify test on the same chips: its accuracy is the predictions' share of right classes
    assert cli_main(["classify", "test", str(class_folders), "--probe", str(probe), "--out-dir", str(tmp_path / "test"),
                     "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "test chips:" in printed and f"of the {len(rows)} chips hold their class" in printed
    tested = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert tested["pixels"] == len(rows) and tested["overall_accuracy"] == pytest.approx(right)
    held = [Path(r["path"]).parent.name in r["set"].split(";") for r in rows]
    assert tested["prediction_sets"]["covered"] == pytest.approx(np.mean(held))
    assert tested["prediction_sets"]["mean_size"] == pytest.approx(np.mean([int(r["set_size"]) for r in rows]))
    assert cli_main(["classify", "test", str(class_folders), "--probe", str(probe), "--out-dir", str(tmp_path / "test")]) == 2
    assert "already exists" in capsys.readouterr().err
    odd = tmp_path / "odd" / "cloud"
    odd.mkdir(parents=True)
    Image.open(chips[0]).save(odd / "c.png")
    assert cli_main(["classify", "test", str(tmp_path / "odd"), "--probe", str(probe)]) == 2
    assert "classes ['cloud'] (folder names, or labels) are not classes of the probe" in capsys.readouterr().err

    # a k-NN probe, with explicit held-out chips; then what cannot be done, in one sentence each
    assert cli_main(["classify", "fit", str(class_folders), "--val", str(class_folders / "dark"), "--method", "knn",
                     "-k", "3", "-o", str(tmp_path / "knn.safetensors"), *common]) == 0  # fmt: skip
    assert ChipClassifier.load(tmp_path / "knn.safetensors").method == "knn"
    capsys.readouterr()
    assert cli_main(["classify", "fit", str(class_folders / "dark"), "-o", str(tmp_path / "one.safetensors"), *common]) == 2
    assert "a classifier needs at least two (one folder, or one label, per class)" in capsys.readouterr().err
    assert cli_main(["classify", "fit", str(class_folders), "-o", str(tmp_path / "p.pt"), *common]) == 2
    assert "written as .safetensors" in capsys.readouterr().err
    assert cli_main(["classify", "predict", str(class_folders), "--probe", str(tmp_path / "none.safetensors"),
                     "-o", str(tmp_path / "x.csv")]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["classify", "predict", str(class_folders), "--probe", str(probe), "-o", str(predictions)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_fit_from_an_embedding_table_is_the_fit_from_the_chips(class_folders: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """``classify fit --embeddings`` reads the chips' rows of an ``embed --chips`` table (its backbone, size and bands)
    instead of embedding them: the same probe as embedding them with ``--model``."""
    pth = micro_export(tmp_path)
    table = tmp_path / "embeddings.parquet"
    assert cli_main(["embed", str(class_folders), "--chips", "--model", str(pth), "-o", str(table), "--size", "32", "--quiet"]) == 0
    args = [str(class_folders), "--val-fraction", "0.3", "--quiet"]
    assert cli_main(["classify", "fit", *args, "--model", str(pth), "--size", "32", "-o", str(tmp_path / "a.safetensors")]) == 0
    assert cli_main(["classify", "fit", *args, "--embeddings", str(table), "-o", str(tmp_path / "b.safetensors")]) == 0
    embedded, read = ChipClassifier.load(tmp_path / "a.safetensors"), ChipClassifier.load(tmp_path / "b.safetensors")
    assert read.c == embedded.c and read.embedding == embedded.embedding  # the table records what --model and --size say
    np.testing.assert_allclose(read.weight, embedded.weight, atol=1e-5)
    capsys.readouterr()
    extra = tmp_path / "more" / "bright"
    extra.mkdir(parents=True)
    Image.open(next(class_folders.rglob("*.png"))).save(extra / "new.png")
    assert cli_main(["classify", "fit", str(class_folders), str(tmp_path / "more"), "--embeddings", str(table), "-o",
                     str(tmp_path / "c.safetensors")]) == 2  # fmt: skip
    assert "new.png is not in the embedding table" in capsys.readouterr().err
    assert cli_main(["classify", "fit", str(class_folders), "-o", str(tmp_path / "d.safetensors")]) == 2
    assert "Give the backbone that embeds the chips (--model), or a table of their embeddings" in capsys.readouterr().err


def test_tta_is_the_mean_over_chips_turned_and_mirrored_beforehand(class_folders: Path, tmp_path: Path) -> None:
    """``classify predict --tta d4`` on three chips gives the mean of the plain predictions of their 8 turned and
    mirrored copies, saved as files first (an independent path to the same views)."""
    from dinov3_eo.inference.tta import dihedral

    pth = micro_export(tmp_path)
    probe = tmp_path / "probe.safetensors"
    assert cli_main(["classify", "fit", str(class_folders), "-o", str(probe), "--model", str(pth), "--size", "32",
                     "--quiet"]) == 0  # fmt: skip
    chips = sorted(class_folders.rglob("*.png"))[:3]
    (tmp_path / "views").mkdir()
    for chip in chips:
        pixels = torch.from_numpy(np.asarray(Image.open(chip)).transpose(2, 0, 1).copy())
        for k in range(8):
            view = dihedral(pixels, k).numpy().transpose(1, 2, 0).copy()
            Image.fromarray(view).save(tmp_path / "views" / f"{chip.stem}_{k}.png")
    for name, args in (("tta", ["--tta", "d4"]), ("plain", [])):
        sources = [str(c) for c in chips] if name == "tta" else [str(tmp_path / "views")]
        assert cli_main(["classify", "predict", *sources, "--probe", str(probe), "-o", str(tmp_path / f"{name}.csv"),
                         "--quiet", *args]) == 0  # fmt: skip
    tta = {Path(r["path"]).stem: float(r["p_bright"]) for r in csv.DictReader((tmp_path / "tta.csv").open())}
    views = [(Path(r["path"]).stem, float(r["p_bright"])) for r in csv.DictReader((tmp_path / "plain.csv").open())]
    for chip in chips:
        mean = np.mean([p for stem, p in views if stem.rsplit("_", 1)[0] == chip.stem])
        assert tta[chip.stem] == pytest.approx(mean, abs=1e-5)
    assert len({round(p, 4) for stem, p in views}) > 3  # the views do differ: the average is not trivially the same


def test_label_tables(class_folders: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A CSV or Parquet of ``image``/``label`` rows (relative to the table) lists the same chips and classes as the
    folders do; ``classify fit`` and ``test`` take it with ``--labels``; a bad table is one sentence."""
    import pandas as pd

    from dinov3_eo.tasks.chip_classification import labelled_chips, table_labels

    paths, labels = labelled_chips([str(class_folders)], None)
    frame = pd.DataFrame({"image": [str(Path(p).relative_to(class_folders)) for p in paths], "label": labels})
    frame.to_csv(class_folders / "labels.csv", index=False)
    frame.rename(columns={"image": "path", "label": "class"}).to_parquet(class_folders / "labels.parquet")
    assert table_labels(class_folders / "labels.csv") == (paths, labels)
    pd.DataFrame({"path": [str(Path(p).resolve()) for p in paths], "class": labels}).to_parquet(tmp_path / "abs.parquet")
    assert table_labels(tmp_path / "abs.parquet") == (paths, labels)
    with pytest.raises(ValueError, match="one of the two"):
        labelled_chips([str(class_folders)], str(class_folders / "labels.csv"))
    pd.DataFrame({"image": ["a.png"], "kind": ["x"]}).to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(ValueError, match="needs columns 'image' \\(or 'path'\\) and 'label'"):
        table_labels(tmp_path / "cols.csv")
    pd.DataFrame({"image": ["missing.png"], "label": ["x"]}).to_csv(tmp_path / "gone.csv", index=False)
    with pytest.raises(FileNotFoundError, match="row 0 names .*missing.png"):
        table_labels(tmp_path / "gone.csv")
    pd.DataFrame({"image": [paths[0]], "label": [None]}).to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(ValueError, match="row 0 has no label"):
        table_labels(tmp_path / "empty.csv")

    pth = micro_export(tmp_path)
    probe = tmp_path / "probe.safetensors"
    assert cli_main(["classify", "fit", "--labels", str(class_folders / "labels.csv"), "-o", str(probe), "--model",
                     str(pth), "--size", "32", "--quiet"]) == 0  # fmt: skip
    assert ChipClassifier.load(probe).classes == ["bright", "dark"]
    assert cli_main(["classify", "test", "--labels", str(class_folders / "labels.parquet"), "--probe", str(probe), "--quiet"]) == 0
    assert "test chips:" in capsys.readouterr().out
    # a table in its own order (benchmarks shuffle their splits): each chip keeps its label, though chips are embedded
    # in sorted order
    frame.sample(frac=1.0, random_state=3).to_csv(class_folders / "shuffled.csv", index=False)
    scores = {}
    for name in ("labels.csv", "shuffled.csv"):
        assert cli_main(["classify", "test", "--labels", str(class_folders / name), "--probe", str(probe), "--quiet",
                         "--out-dir", str(tmp_path / name)]) == 0  # fmt: skip
        scores[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert scores["shuffled.csv"]["confusion"] == scores["labels.csv"]["confusion"]
    assert scores["labels.csv"]["overall_accuracy"] >= 0.8
    assert cli_main(["classify", "fit", "-o", str(tmp_path / "none.safetensors"), "--model", str(pth)]) == 2
    assert "either as class folders (CHIPS) or as a label table (--labels)" in capsys.readouterr().err
