"""Conformal prediction sets of the classification probes (``classify fit --coverage``): the threshold against the
finite-sample rank, the guarantee over repeated draws for an over-confident model, and the probe file round trip."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from dinov3_eo.tasks.chip_classification import ChipClassifier, calibrate_sets
from dinov3_eo.tasks.conformal import class_set_threshold, prediction_sets, set_metrics


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def test_the_set_threshold_is_one_minus_the_conformal_rank_of_the_true_class_scores() -> None:
    rng = np.random.default_rng(0)
    scores = rng.dirichlet(np.ones(4), size=19)
    targets = rng.integers(0, 4, 19)
    wrongness = np.sort(1 - scores[np.arange(19), targets])
    assert class_set_threshold(scores, targets, 0.9) == pytest.approx(1 - wrongness[17])  # ceil(20 * 0.9) = 18th
    assert class_set_threshold(scores[:8], targets[:8], 0.9) == -np.inf  # too few: every class, always
    sets = prediction_sets(scores, 0.3)
    np.testing.assert_array_equal(sets, scores >= 0.3)
    got = set_metrics(np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 1]], bool), np.array([0, 1, 2, 2]), 0.9)
    assert got == {"coverage": 0.9, "covered": 0.75, "mean_size": 1.25, "singletons": 0.25, "empty": 0.25, "n": 4}
    with pytest.raises(ValueError, match="must lie in 0..3"):
        class_set_threshold(scores, targets + 4, 0.9)


def test_sets_hold_the_true_class_as_promised_even_for_an_over_confident_model() -> None:
    """Labels drawn from softmax(x W); the "model" says softmax(3 x W), far too sure of itself (its top class holds
    the label less often than its probability claims). Sets calibrated on 49 examples hold the label of 90-92 % of
    new ones on average over 300 draws (the guarantee: 0.90 to 0.90 + 1/50), and are larger where it is unsure."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 5))
    covered, top_right, claimed, sizes_by_margin = [], [], [], []
    for _ in range(300):
        x = rng.normal(size=(249, 3))
        truth = softmax(x @ w)
        labels = np.array([rng.choice(5, p=p) for p in truth])
        model = softmax(3 * (x @ w))
        threshold = class_set_threshold(model[:49], labels[:49], 0.9)
        sets = prediction_sets(model[49:], threshold)
        covered.append(sets[np.arange(200), labels[49:]].mean())
        top_right.append((model[49:].argmax(1) == labels[49:]).mean())
        claimed.append(model[49:].max(1).mean())
        sizes_by_margin.append((sets.sum(1)[model[49:].max(1) < 0.6].mean(), sets.sum(1)[model[49:].max(1) > 0.9].mean()))
    assert 0.895 <= np.mean(covered) <= 0.92, np.mean(covered)
    assert np.mean(claimed) > np.mean(top_right) + 0.05  # over-confident: its probabilities promise too much
    unsure, sure = np.nanmean(np.array(sizes_by_margin), axis=0)
    assert unsure > 1.5 * sure


def test_a_probes_sets_round_trip_and_what_has_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(2)
    probe = ChipClassifier(method="linear", classes=["a", "b", "c"], features="cls", weight=rng.normal(size=(3, 4)).astype(np.float32),
                           bias=np.zeros(3, np.float32))  # fmt: skip
    x = rng.normal(size=(30, 4))
    scores = probe.scores(x)
    targets = scores.argmax(1)
    calibrate_sets(probe, scores, targets, 0.8)
    assert probe.sets["n"] == 30 and probe.sets["threshold"] == pytest.approx(class_set_threshold(scores, targets, 0.8))
    back = ChipClassifier.load(probe.save(tmp_path / "probe.safetensors"))
    assert back.sets == probe.sets
    np.testing.assert_array_equal(back.prediction_sets(scores), scores >= probe.sets["threshold"])
    with caplog.at_level(logging.WARNING, logger="dinov3_eo.tasks.chip_classification"):
        calibrate_sets(probe, scores[:5], targets[:5], 0.9)
    assert probe.sets is None and "5 held-out examples cannot calibrate 90 % prediction sets (9 are needed)" in caplog.text
    with pytest.raises(ValueError, match="has no prediction sets"):
        probe.prediction_sets(scores)
    probe.multi_label = True
    assert calibrate_sets(probe, scores, targets).sets is None  # a label set per chip: no conformal sets here
