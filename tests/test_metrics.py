"""Metrics against small cases computed by hand."""

import numpy as np
import pytest

from pipeline.metrics import (
    aggregate_folds,
    classification_metrics,
    concordance_cc,
    regression_metrics,
    selection_metric,
)

CLASSES = ["ang", "hap", "neu"]


def one_hot(predictions, num_classes=3, confidence=0.8):
    """Probabilities that put ``confidence`` on each predicted class and share the rest."""
    probs = np.full((len(predictions), num_classes), (1 - confidence) / (num_classes - 1))
    probs[np.arange(len(predictions)), predictions] = confidence
    return probs


def test_perfect_predictions():
    y = [0, 1, 2, 2]
    m = classification_metrics(y, one_hot(y), CLASSES)
    assert m["uar"] == m["war"] == m["f1_macro"] == m["f1_weighted"] == m["auc"] == 1.0
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 0, 2]]
    assert m["num_samples"] == 4


def test_imbalanced_case_by_hand():
    # true:  0 0 0 0 1 1 2 2 ; predicted: 0 0 0 1 1 0 2 1
    y_true = [0, 0, 0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 0, 2, 1]
    m = classification_metrics(y_true, one_hot(y_pred), CLASSES)
    assert m["war"] == pytest.approx(5 / 8)
    assert m["uar"] == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)
    assert (m["recall/ang"], m["recall/hap"], m["recall/neu"]) == pytest.approx((0.75, 0.5, 0.5))
    # per-class F1: ang P=3/4 R=3/4 -> 3/4; hap P=1/3 R=1/2 -> 2/5; neu P=1 R=1/2 -> 2/3
    f1 = np.array([3 / 4, 2 / 5, 2 / 3])
    assert m["f1_macro"] == pytest.approx(f1.mean())
    assert m["f1_weighted"] == pytest.approx((f1 * [4, 2, 2]).sum() / 8)
    assert m["confusion_matrix"] == [[3, 1, 0], [1, 1, 0], [0, 1, 1]]


def test_class_absent_from_truth_is_left_out_of_uar_and_auc():
    # class 2 never occurs; a wrong prediction of it still costs recall of the true class.
    y_true = [0, 0, 1, 1]
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.1, 0.7], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1]])
    m = classification_metrics(y_true, probs, CLASSES)
    assert m["uar"] == pytest.approx((1 / 2 + 1) / 2)
    assert "recall/neu" not in m
    # AUC over classes 0 and 1 only. Class 0 scores: positives 0.9, 0.2 vs negatives 0.1, 0.3 -> 3/4.
    # Class 1 scores: positives 0.8, 0.6 vs negatives 0.05, 0.1 -> 1.
    assert m["auc"] == pytest.approx((3 / 4 + 1) / 2)
    assert m["confusion_matrix"] == [[1, 0, 1], [0, 2, 0], [0, 0, 0]]


def test_auc_is_omitted_with_a_single_true_class():
    m = classification_metrics([1, 1, 1], one_hot([1, 0, 1]), CLASSES)
    assert "auc" not in m
    assert m["uar"] == pytest.approx(2 / 3)
    assert all(value is not None and value == value for value in m.values())  # no None, no NaN


def test_chance_predictions():
    """A constant prediction on balanced classes: UAR = 1/C, AUC = 0.5."""
    y_true = np.repeat([0, 1, 2], 10)
    probs = np.tile([0.5, 0.3, 0.2], (30, 1))
    m = classification_metrics(y_true, probs, CLASSES)
    assert m["uar"] == pytest.approx(1 / 3)
    assert m["war"] == pytest.approx(1 / 3)
    assert m["auc"] == pytest.approx(0.5)


def test_bad_classification_inputs_fail():
    with pytest.raises(ValueError, match="probs must be"):
        classification_metrics([0, 1], np.ones((2, 2)), CLASSES)
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics([0, 3], one_hot([0, 1]), CLASSES)


def test_ccc_identical_and_shifted():
    x = np.array([0.1, 0.4, 0.35, 0.8, 0.6])
    m = regression_metrics(np.stack([x, x], 1), np.stack([x, x + 0.5], 1), ["valence", "arousal"])
    assert m["ccc/valence"] == pytest.approx(1.0)
    assert m["pcc/valence"] == pytest.approx(1.0)
    assert m["pcc/arousal"] == pytest.approx(1.0)
    assert m["ccc/arousal"] < m["pcc/arousal"]
    assert m["mse/arousal"] == pytest.approx(0.25)
    assert m["mae/arousal"] == pytest.approx(0.5)
    assert m["ccc_mean"] == pytest.approx((1 + m["ccc/arousal"]) / 2)
    assert m["mse_mean"] == pytest.approx(0.125)


def test_ccc_by_hand():
    # t = 0..4: mean 2, population var 2; p = t + 1: cov 2, mean difference 1 -> 2*2 / (2 + 2 + 1) = 0.8
    t = np.arange(5.0)
    assert concordance_cc(t, t + 1) == pytest.approx(0.8)
    # unbiased moments (the reference's np.cov): var 2.5, cov 2.5 -> 5 / 6
    assert concordance_cc(t, t + 1, ddof=1) == pytest.approx(5 / 6)
    assert concordance_cc(t - 2, 2 - t) == pytest.approx(-1.0)  # mirrored about a shared mean
    assert concordance_cc(t, -t) == pytest.approx(-4 / 20)  # cov -2; means 2 and -2 add 16


def test_constant_prediction_has_zero_correlation():
    m = regression_metrics(np.arange(4.0), np.full(4, 2.0), ["valence"])
    assert m["pcc/valence"] == 0.0
    assert m["ccc/valence"] == 0.0
    assert m["num_samples"] == 4


def test_aggregate_folds():
    folds = [
        {"uar": 0.5, "war": 0.6, "auc": 0.7, "confusion_matrix": [[1, 0], [0, 1]], "note": "a"},
        {"uar": 0.7, "war": 0.8, "confusion_matrix": [[2, 1], [0, 0]]},
    ]
    summary = aggregate_folds(folds)
    assert summary["uar_mean"] == pytest.approx(0.6)
    assert summary["uar_std"] == pytest.approx(0.1)  # population std over folds
    assert summary["war_mean"] == pytest.approx(0.7)
    assert "auc_mean" not in summary and "note_mean" not in summary
    assert summary["num_folds"] == 2
    assert summary["confusion_matrix"] == [[3, 1], [0, 1]]


def test_selection_metric():
    assert selection_metric("classification") == "uar"
    assert selection_metric("classification", "reference") == "war"
    assert selection_metric("regression", "reference") == "ccc_mean"
    with pytest.raises(ValueError):
        selection_metric("segmentation")
