"""Evaluation metrics for emotion recognition: classification, dimensional regression, fold aggregation.

Every metric is a plain Python number in natural units: accuracies, recalls, F1 and AUC are fractions in
[0, 1] (reports multiply by 100); correlations lie in [-1, 1]. Per-class and per-dimension values use
``<metric>/<name>`` keys, so a metrics dict can be logged to MLflow as is.

Classification keys: ``uar``, ``war``, ``f1_macro``, ``f1_weighted``, ``auc`` (only when defined),
``recall/<class>`` (classes present in ``y_true``), ``confusion_matrix``, ``num_samples``.
Regression keys: ``pcc/<target>``, ``ccc/<target>``, ``mse/<target>``, ``mae/<target>``, their means over
targets ``pcc_mean``, ``ccc_mean``, ``mse_mean``, ``mae_mean``, and ``num_samples``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# scipy.stats and sklearn.metrics (~1 s to import) are imported by the functions that use them: what imports this
# module for the rest (MLflow tracking, the fold summary, pre-training) does without them.


def classification_metrics(y_true, probs, class_names: Sequence[str]) -> dict:
    """Metrics of class probabilities ``probs`` (N, C) against integer labels ``y_true`` (N,).

    The prediction is the argmax of ``probs``. UAR is the mean recall over the classes present in ``y_true``
    (balanced accuracy); WAR is the accuracy. F1 follows scikit-learn's defaults as the reference does: macro
    over the classes seen in ``y_true`` or the predictions, weighted by true support. AUC is the one-vs-rest
    macro mean over the classes present in ``y_true``; the key is left out when fewer than two are present.
    The confusion matrix is a C x C list of lists over all classes, rows = true class, columns = predicted.
    """
    from sklearn.metrics import f1_score

    y_true = np.asarray(y_true).astype(int).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    _check_classification_inputs(y_true, probs, class_names)
    y_pred = probs.argmax(axis=1)
    num_classes = len(class_names)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)

    present = np.flatnonzero(cm.sum(axis=1))
    recalls = cm[present, present] / cm[present].sum(axis=1)
    metrics = {
        "uar": float(recalls.mean()),
        "war": float(np.trace(cm) / len(y_true)),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "f1_weighted": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
    }
    auc = one_vs_rest_auc(y_true, probs, present)
    if auc is not None:
        metrics["auc"] = auc
    metrics.update({f"recall/{class_names[c]}": float(r) for c, r in zip(present, recalls, strict=True)})
    metrics["confusion_matrix"] = cm.tolist()
    metrics["num_samples"] = len(y_true)
    return metrics


def _check_classification_inputs(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> None:
    if probs.ndim != 2 or probs.shape != (len(y_true), len(class_names)):
        raise ValueError(f"probs must be (N, C) = ({len(y_true)}, {len(class_names)}), got {probs.shape}")
    if len(y_true) == 0:
        raise ValueError("no samples to evaluate")
    if y_true.min() < 0 or y_true.max() >= len(class_names):
        raise ValueError(f"labels must lie in [0, {len(class_names)}), got {y_true.min()}..{y_true.max()}")


def one_vs_rest_auc(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[int]) -> float | None:
    """Macro mean of the binary ROC AUCs 'class c vs the rest' over ``classes``; None with fewer than two."""
    if len(classes) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(np.mean([roc_auc_score(y_true == c, probs[:, c]) for c in classes]))


def pearson_cc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays; 0.0 where it is undefined (fewer than two samples, a constant)."""
    if len(y_true) < 2 or np.ptp(y_true) == 0 or np.ptp(y_pred) == 0:
        return 0.0
    from scipy.stats import pearsonr

    return float(pearsonr(y_true, y_pred)[0])


def concordance_cc(y_true: np.ndarray, y_pred: np.ndarray, ddof: int = 0) -> float:
    """Lin's concordance correlation 2 cov / (var_t + var_p + (mean_t - mean_p)^2) of two 1-D arrays.

    ``ddof=0`` (default) uses population moments, Lin's (1989) definition: the CCC of a vector with itself is
    1 and any shift or scale of it lowers the value. ``ddof=1`` uses unbiased moments as the reference's
    ``np.cov`` does; the two differ by O(1/N). Two equal constant vectors score 1.0.
    """
    mean_t, mean_p = y_true.mean(), y_pred.mean()
    cov = np.cov(y_true, y_pred, ddof=ddof) if len(y_true) > ddof else np.zeros((2, 2))
    denominator = cov[0, 0] + cov[1, 1] + (mean_t - mean_p) ** 2
    if denominator == 0:
        return 1.0
    return float(2.0 * cov[0, 1] / denominator)


def regression_metrics(y_true, y_pred, target_names: Sequence[str], ddof: int = 0) -> dict:
    """Per-target PCC, CCC (see ``concordance_cc`` for ``ddof``), MSE and MAE of (N, D) arrays, and their means.

    1-D inputs are treated as a single target.
    """
    y_true = _as_2d(y_true)
    y_pred = _as_2d(y_pred)
    if y_true.shape != y_pred.shape or y_true.shape[1] != len(target_names):
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must both be (N, {len(target_names)})")
    if len(y_true) == 0:
        raise ValueError("no samples to evaluate")
    per_metric = {
        "pcc": [pearson_cc(y_true[:, d], y_pred[:, d]) for d in range(y_true.shape[1])],
        "ccc": [concordance_cc(y_true[:, d], y_pred[:, d], ddof) for d in range(y_true.shape[1])],
        "mse": np.mean((y_true - y_pred) ** 2, axis=0).tolist(),
        "mae": np.mean(np.abs(y_true - y_pred), axis=0).tolist(),
    }
    metrics = {}
    for name, values in per_metric.items():
        metrics.update({f"{name}/{target}": float(v) for target, v in zip(target_names, values, strict=True)})
        metrics[f"{name}_mean"] = float(np.mean(values))
    metrics["num_samples"] = len(y_true)
    return metrics


def _as_2d(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values.reshape(-1, 1) if values.ndim == 1 else values


def is_scalar(value) -> bool:
    """True for a finite int or float (bools excluded): a value that can be logged and averaged."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return False
    return math.isfinite(value)


def aggregate_folds(per_fold: Sequence[dict]) -> dict:
    """Fold mean and standard deviation of every scalar metric present in all folds.

    Returns ``<name>_mean`` and ``<name>_std`` per metric, ``num_folds``, and ``confusion_matrix`` (the sum over
    folds) when every fold has one of the same shape. The std is the population std (ddof=0) over the folds:
    the folds are the whole partition of the dataset, not a sample of them. Papers report the fold mean.
    """
    if not per_fold:
        raise ValueError("no folds to aggregate")
    names = [name for name, value in per_fold[0].items() if is_scalar(value)]
    names = [name for name in names if all(is_scalar(fold.get(name)) for fold in per_fold)]
    summary = {}
    for name in names:
        values = np.array([fold[name] for fold in per_fold], dtype=np.float64)
        summary[f"{name}_mean"] = float(values.mean())
        summary[f"{name}_std"] = float(values.std(ddof=0))
    summary["num_folds"] = len(per_fold)
    matrices = [np.asarray(fold.get("confusion_matrix", [])) for fold in per_fold]
    if matrices[0].ndim == 2 and all(m.shape == matrices[0].shape for m in matrices):
        summary["confusion_matrix"] = np.sum(matrices, axis=0).tolist()
    return summary


def selection_metric(task: str, protocol: str = "clean") -> str:
    """The metric (higher is better) that picks the best checkpoint; ``task`` as in the dataset manifest.

    Classification: UAR under the clean protocol, because emotion datasets are imbalanced; WAR (the
    reference's ``acc1``) under ``protocol: reference``. Regression: the mean CCC over targets, as the reference.
    """
    if protocol not in ("clean", "reference"):
        raise ValueError(f"unknown protocol {protocol!r}; expected 'clean' or 'reference'")
    if task == "classification":
        return "war" if protocol == "reference" else "uar"
    if task == "regression":
        return "ccc_mean"
    raise ValueError(f"unknown task {task!r}; expected 'classification' or 'regression'")
