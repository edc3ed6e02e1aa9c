"""Evaluating a fine-tuned model on labelled clips: per-clip outputs over views, scores, and the test files.

``evaluation_inputs`` makes the loader of a rank's share of a split (its batches, views and padding);
``clip_outputs`` runs a model over it (one or more temporal views per clip) and averages each clip's outputs;
``merge_outputs`` puts the ranks' shares together; ``score`` turns them into the dataset's metrics; ``test_files``
evaluates a fold's test clips with the last and the best weights and returns the files a fold keeps
(``layout.FOLD_RESULT_FILES``). ``pipeline.train.verify`` scores an exported model again through the same functions.

The forward of a batch is ``eval_forward``, or a compiled version of it (``compiled.compiled``): then every batch
is padded to the loader's full size (its last one is short), so that one graph serves them all.
"""

from __future__ import annotations

import csv
import io
import json
from functools import partial

import numpy as np
import torch

from preprocessing.manifest import DatasetInfo

from ..data.loaders import ClipDataset, evaluation_loader
from ..data.sampling import rank_share
from ..data.video_batch import device_batch
from ..data.windows import finetune_eval_examples
from ..layout import EMBEDDINGS_FILE, TEST_METRICS_FILE, predictions_file
from ..metrics import classification_metrics, regression_metrics
from .compiled import autocast, unwrap


def model_inputs(net: torch.nn.Module, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(video, audio) for the model's modalities; None for a modality the model does not use."""
    modalities = unwrap(net).modalities
    return (batch["video"] if "video" in modalities else None, batch["audio"] if "audio" in modalities else None)


def eval_forward(model: torch.nn.Module, video: torch.Tensor | None, audio: torch.Tensor | None,
                 classification: bool) -> dict[str, torch.Tensor]:
    """One evaluation batch through the model (not DDP-wrapped): ``output`` (softmax probabilities, or the raw
    outputs of a regression model) and the clip embeddings ``embedding/video``, ``embedding/audio`` (each modality's
    hierarchical embedding) and ``embedding/fused`` (the head's input), all float32."""
    with autocast(video.device if video is not None else audio.device):
        features = model.forward_features(video, audio)
        out = model.head_output(features).float()
    values = {"output": out.softmax(-1) if classification else out, "embedding/fused": features.embedding}
    values |= {f"embedding/{m}": e for m, e in features.weighted.items()}
    return {name: value.float() for name, value in values.items()}


def evaluation_inputs(clips: list[str], catalog: dict, window, views: int, batch_size: int, workers: int,
                      rank: int = 0, world_size: int = 1) -> dict:
    """What ``clip_outputs`` needs to evaluate rank ``rank``'s share of ``clips`` (ids of ``catalog``:
    ``data.clip_catalog``), ``views`` deterministic windows of ``window`` each: the loader (``batch_size // views``
    clips a batch, all views of a clip in one) and ``batch_rows``, the rows every batch is padded to
    (``batch_size``, at least ``views``), so that one compiled graph serves validation and test alike."""
    examples = partial(finetune_eval_examples, window=window, views=views)
    ids = rank_share(clips, rank, world_size)
    loader = evaluation_loader(ClipDataset([catalog[c] for c in ids], examples), max(batch_size // views, 1), workers)
    return {"loader": loader, "batch_rows": max(batch_size, views)}


def padded(tensor: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """``tensor`` with its last row repeated up to ``rows`` rows."""
    if tensor is None or len(tensor) == rows:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(rows - len(tensor), *tensor.shape[1:])])


@torch.no_grad()
def clip_outputs(net: torch.nn.Module, loader, device: torch.device, task: str, embeddings: bool = False,
                 forward=None, batch_rows: int | None = None) -> dict[str, np.ndarray]:
    """Per-clip outputs averaged over views: softmax probabilities (classification) or raw outputs.

    Returns ``clip_id`` (sorted), ``truth`` (labels or target vectors) and ``output`` (N, K); with
    ``embeddings``, also the clip embeddings of the same forward pass, averaged over views, under
    ``embedding/<name>``: ``video`` and ``audio`` (each modality's hierarchical clip embedding) and ``fused``
    (the head's input). ``forward``: ``eval_forward`` or a compiled version of it, which gets batches padded to
    ``batch_rows`` examples.
    """
    net.eval()
    model = unwrap(net)  # no DDP hooks: each rank scores its own clips
    forward = forward or eval_forward
    sums: dict[str, dict[str, np.ndarray]] = {}
    counts: dict[str, int] = {}
    truth: dict[str, object] = {}
    for batch in loader:
        tensors = device_batch(batch, device)
        rows = len(batch["clip_id"])
        video, audio = (padded(x, batch_rows or rows) for x in model_inputs(net, tensors))
        values = forward(model, video, audio, task == "classification")
        values = {name: v[:rows].cpu().numpy() for name, v in values.items()
                  if embeddings or not name.startswith("embedding/")}  # name -> (B, ...)
        for i, clip_id in enumerate(batch["clip_id"]):
            clip = sums.setdefault(clip_id, dict.fromkeys(values, 0))
            for name, value in values.items():
                clip[name] = clip[name] + value[i]
            counts[clip_id] = counts.get(clip_id, 0) + 1
            truth[clip_id] = batch["label"][i].item() if task == "classification" else batch["targets"][i].numpy()
    if not sums:
        return {}  # a rank whose share of a small split is empty
    ids = sorted(sums)
    result = {"clip_id": np.array(ids), "truth": np.array([truth[c] for c in ids])}
    for name in sums[ids[0]]:
        result[name] = np.stack([sums[c][name] / counts[c] for c in ids])
    return result


def gather_outputs(outputs: dict) -> dict:
    """Every rank's ``clip_outputs`` merged by clip id, on every rank (evaluation is split across the ranks of a
    distributed run); ``outputs`` itself in a single process."""
    import torch.distributed as dist

    parts = [outputs]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, outputs)
    return merge_outputs(parts)


def merge_outputs(parts: list[dict]) -> dict:
    """The ``clip_outputs`` of several ranks' shares as one, by clip id."""
    parts = [part for part in parts if part]
    if not parts:
        raise ValueError("the evaluation produced no clip")
    merged = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    order = np.argsort(merged["clip_id"], kind="stable")
    return {name: values[order] for name, values in merged.items()}


def score(outputs: dict, info: DatasetInfo) -> dict:
    """The dataset's metrics of ``clip_outputs``."""
    if info.task == "classification":
        return classification_metrics(outputs["truth"], outputs["output"], info.classes)
    return regression_metrics(outputs["truth"], outputs["output"], info.targets)


def embeddings_npz(outputs: dict) -> bytes:
    """The clip embeddings of ``clip_outputs(..., embeddings=True)`` as an .npz: ``clip_id``, ``truth`` (labels or
    targets) and one (N, C) float32 array per embedding (``video``, ``audio``, ``fused``)."""
    arrays = {name.removeprefix("embedding/"): value.astype(np.float32) for name, value in outputs.items()
              if name.startswith("embedding/")}
    buffer = io.BytesIO()
    np.savez(buffer, clip_id=outputs["clip_id"], truth=outputs["truth"], **arrays)
    return buffer.getvalue()


def predictions_csv(outputs: dict, info: DatasetInfo) -> bytes:
    """One row per clip: id, truth, prediction, and the per-class probabilities (or per-target outputs)."""
    names = info.classes if info.task == "classification" else info.targets
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["clip_id", "truth", "prediction", *names])
    for clip_id, truth, output in zip(outputs["clip_id"], outputs["truth"], outputs["output"], strict=True):
        if info.task == "classification":
            writer.writerow([clip_id, int(truth), names[int(np.argmax(output))], *np.round(output, 6)])
        else:
            writer.writerow([clip_id, " ".join(f"{t:g}" for t in truth), " ".join(f"{o:.6g}" for o in output),
                             *np.round(output, 6)])
    return buffer.getvalue().encode()


def test_files(net: torch.nn.Module, best: dict, loader, device: torch.device, info: DatasetInfo, forward=None,
               batch_rows: int | None = None) -> dict[str, bytes]:
    """Evaluate the test clips with the last and the ``best`` weights (``best["model"]``, ``best["epoch"]``):
    predictions CSVs, a metrics JSON and the best weights' clip embeddings. The net keeps its last weights.
    ``forward``, ``batch_rows``: as ``clip_outputs`` takes them.

    In a distributed run every rank calls this with its share of the clips (the outputs are gathered)."""
    model = unwrap(net)
    files, results = {}, {}
    last_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, weights in (("last", last_weights), ("best", best["model"])):
        model.load_state_dict(weights)
        outputs = gather_outputs(clip_outputs(net, loader, device, info.task, embeddings=name == "best",
                                              forward=forward, batch_rows=batch_rows))
        results[name] = score(outputs, info)
        files[predictions_file(name)] = predictions_csv(outputs, info)
    files[EMBEDDINGS_FILE] = embeddings_npz(outputs)
    model.load_state_dict(last_weights)
    results["best_epoch"] = best["epoch"]
    files[TEST_METRICS_FILE] = json.dumps(results, indent=2, default=float).encode()
    return files
