"""The emotion in one video file: the face track, per-window and clip-level predictions, and a preview.

    hicmae predict clip.mp4 --model runs/demo/finetune/fold-1/model --out result.json --preview preview.png
    hicmae predict clip.mp4 --model org/hicmae-crema-d[@revision]        # a Hugging Face Hub repo id
    hicmae predict clip.mp4 --model crema-d-fold1.pth --size hicmae_base --classes crema-d
    hicmae predict clip.mp4 --model ... --embeddings clip.parquet     # also the clip's embeddings

    from pipeline.predict import predict
    result = predict("clip.mp4", "runs/demo/finetune/fold-1/model", out="result.json", preview="preview.mp4")

(Many videos at once, batched on Ray Data into one table: ``pipeline.predict.many``.)

The video takes exactly the path of a training clip: ``load_clip_media`` (decode, face detection and tracking,
alignment and crop, log-mel, with the model's PreprocessSettings), the shard encoding (JPEG crops, float16
log-mel) and ``finetune_eval_examples`` (windows of 16 frames every 4th with their 256 log-mel frames, the
evaluation transform). The windows cover the whole clip, spread evenly from its first to its last frame
(overlapping when the clip is not a whole number of windows long); the clip-level prediction is their mean.

A model is an exported folder, its ``.safetensors`` file or a Hub repo id (``pipeline.train.export.load_exported``),
or a reference fine-tuned checkpoint (``.pth``: a dict with 'model' and usually 'args'), which needs the size and the
dataset's class (or target) order to be given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from model import HiCMAEClassifier, config_overrides_from_reference, get_config, load_reference_weights, read_checkpoint
from preprocessing.clip import ClipMedia, load_clip_media, timed
from preprocessing.decode import MediaError, open_media
from preprocessing.face import X0, X1, Y0, Y1
from preprocessing.face_detect import DETECTORS, FaceDetector, native_logs_hidden
from preprocessing.fbank import FRAMES_PER_SECOND
from preprocessing.fileio import atomic_write_text
from preprocessing.settings import PreprocessSettings
from preprocessing.shards import decode_sample, encode_sample

from ..config.training import WindowSettings
from ..data.loaders import collate
from ..data.video_batch import device_batch
from ..data.windows import finetune_eval_examples, window_starts
from ..train.evaluation import eval_forward, model_inputs
from ..train.export import load_exported, output_names
from .inputs import file_input
from .preview import PREVIEW_SUFFIXES, label_text, save_preview
from .table import write_embeddings

BATCH_SIZE = 8


# ---------------------------------------------------------------------------------------------------------------
# Models


def load_model(path: str | Path, size: str | None = None, classes: list[str] | None = None,
               targets: list[str] | None = None, device: str = "cpu") -> tuple[HiCMAEClassifier, dict]:
    """An exported model (folder, ``.safetensors`` file, Hub repo id ``org/name[@revision]`` or registered model
    ``models:/<name>@<alias>``: ``export.locate_exported``), or a reference ``.pth`` checkpoint, in eval mode on
    ``device``, with its model card (for a reference checkpoint, a card built from its args and the options)."""
    if Path(path).suffix in (".pth", ".pt"):
        return load_reference_model(Path(path), size, classes, targets, device)
    return load_exported(path, device)  # as given: a str may name a Hub repo


def load_reference_model(path: Path, size: str | None, classes: list[str] | None, targets: list[str] | None,
                         device: str = "cpu") -> tuple[HiCMAEClassifier, dict]:
    """A reference fine-tuned checkpoint; ``size`` (e.g. hicmae_base) and the class (or target) names in the
    dataset's label order must be given, every other setting comes from its pickled ``args``."""
    if not size or not (classes or targets):
        raise ValueError(f"{path}: a reference checkpoint needs --size and --classes (or --targets)")
    checkpoint = read_checkpoint(path)
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    try:
        cfg = get_config(size, **config_overrides_from_reference(args))
    except (KeyError, TypeError, ValueError) as err:  # unknown size, unsupported reference option
        raise ValueError(f"{path}: {err.args[0] if err.args else err}") from err
    task, names = ("classification", list(classes)) if classes else ("regression", list(targets))
    net = HiCMAEClassifier(cfg, len(names))
    report = load_reference_weights(net, checkpoint)
    if report.missing or report.shape_mismatch:
        problems = (report.shape_mismatch + report.missing)[:3]
        raise ValueError(f"{path}: does not fit a {size} model with {len(names)} outputs "
                         f"({len(report.shape_mismatch)} shape mismatches, {len(report.missing)} missing, e.g. "
                         f"{'; '.join(problems)})")
    window = WindowSettings(num_frames=cfg.num_frames, sampling_rate=int(args.get("sampling_rate") or 4),
                            audio_frames=cfg.audio_frames)
    card = {"format": "reference", "name": path.stem, "dataset": args.get("data_set"), "task": task,
            "classes": names if task == "classification" else [], "targets": names if task == "regression" else [],
            "config": cfg.to_dict(), "window": window.model_dump(),
            "preprocess": PreprocessSettings().output_fingerprint(), "metrics": {}, "data_hash": None,
            "source": str(path)}
    return net.to(device).eval(), card


def names_option(classes: str | None, targets: str | None) -> tuple[list[str] | None, list[str] | None]:
    """``--classes`` / ``--targets`` as (classes, targets): comma-separated names, or a dataset name (crema-d,
    werewolf-xl, ...) standing for its adapter's class (or target) list in label order."""
    from preprocessing.datasets import ADAPTERS, adapter

    def split(text: str | None, kind: str) -> list[str] | None:
        if text in ADAPTERS:
            return getattr(adapter(text), kind, None)
        return [name.strip() for name in text.split(",") if name.strip()] if text else None

    if classes in ADAPTERS and not hasattr(adapter(classes), "CLASSES"):
        return None, split(classes, "TARGETS")  # a regression dataset
    return split(classes, "CLASSES"), split(targets, "TARGETS")


def model_summary(card: dict) -> dict:
    """The card's identity for the result JSON (no config dump)."""
    keys = ("name", "format", "dataset", "task", "source", "data_hash", "weights_sha256")
    return {key: card.get(key) for key in keys} | {"metrics": card.get("metrics", {})}


# ---------------------------------------------------------------------------------------------------------------
# Prediction


def as_shard_sample(media: ClipMedia, settings: PreprocessSettings, name: str):
    """The clip exactly as a shard holds it (JPEG crops, float16 log-mel), decoded: a ClipSample."""
    meta = {"clip_id": name, "key": "predict", "fps": settings.fps, "fbank_rate": FRAMES_PER_SECOND}
    return decode_sample(encode_sample(media.crops, media.fbank, meta, settings.jpeg_quality))


def clip_examples(sample, window: WindowSettings) -> tuple[list[int], list[dict]]:
    """The evaluation windows that cover the whole clip: their start frames and their examples."""
    views = max(1, math.ceil(len(sample.frames) / window.span))
    return (window_starts(len(sample.frames), window.span, views),
            finetune_eval_examples(sample, 0, window=window, views=views))


@torch.no_grad()
def window_outputs(net: HiCMAEClassifier, batch: dict, task: str, device: str = "cpu",
                   embeddings: bool = False) -> dict[str, np.ndarray]:
    """A collated batch of B windows through the model as evaluation runs it (``evaluation.eval_forward``):
    ``output`` (B, outputs), probabilities or values; with ``embeddings`` also what the head sees: ``video`` and
    ``audio`` (B, C), each modality's hierarchical embedding, and ``fused`` (B, D), the head's input."""
    values = eval_forward(net, *model_inputs(net, device_batch(batch, device)), task == "classification")
    return {name.removeprefix("embedding/"): value.cpu().numpy() for name, value in values.items()
            if embeddings or not name.startswith("embedding/")}


def clip_mean(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A clip's outputs and embeddings: the mean over its windows of each of ``window_outputs``."""
    return {name: values.mean(axis=0) for name, values in outputs.items()}


def predict_windows(net: HiCMAEClassifier, sample, window: WindowSettings, task: str, device: str = "cpu",
                    embeddings: bool = False) -> tuple[list[int], dict[str, np.ndarray]]:
    """Evaluate windows covering the whole clip: (start frames, ``window_outputs`` of all the windows)."""
    starts, examples = clip_examples(sample, window)
    parts = [window_outputs(net, collate(examples[first:first + BATCH_SIZE]), task, device, embeddings)
             for first in range(0, len(examples), BATCH_SIZE)]
    return starts, {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def named_output(values: np.ndarray, names: list[str], task: str) -> dict:
    """One window's (or the clip's) output as JSON: probabilities and label, or target values."""
    rounded = {name: round(float(v), 6) for name, v in zip(names, values, strict=True)}
    if task == "classification":
        return {"probabilities": rounded, "label": names[int(np.argmax(values))]}
    return {"values": rounded}


def window_span(media: ClipMedia, start: int, span: int) -> dict:
    """Where a window lies: its time span (s) and its frames [first, end)."""
    end = min(start + span, len(media.crops))
    fps = media.video.fps
    return {"start": round(media.origin + start / fps, 3), "end": round(media.origin + end / fps, 3),
            "frames": [start, end]}


def window_entry(media: ClipMedia, start: int, span: int, values: np.ndarray, names: list[str], task: str) -> dict:
    """One window of the result: its time span (s), its frames [first, end) and its output."""
    return {**window_span(media, start, span), **named_output(values, names, task)}


def stored_size(path: Path) -> tuple[int, int]:
    """(width, height) of the file's first video stream as stored; MediaError when it cannot be read."""
    with open_media(path) as container:
        if not container.streams.video:
            raise MediaError("no_video_stream", path, "the file has no video stream")
        context = container.streams.video[0].codec_context
        return context.width, context.height


def face_summary(media: ClipMedia) -> dict:
    """The clip's face detection in numbers: frames, frames with the face detected (and their share), face tracks,
    hard cuts, and the frames each detector pass found it in."""
    stats = media.face
    return {"frames": len(media.crops), "detected": stats.detected, "fraction": round(stats.fraction, 4),
            "tracks": stats.tracks, "cuts": stats.cuts, "detector_frames": stats.detector_counts()}


def face_track(media: ClipMedia, source_size: tuple[int, int]) -> list[dict]:
    """Per frame: time (s), the main face's box [x, y, w, h] in source pixels (inside the image), the detector
    score, whether the face was detected in that frame (else filled in from its neighbours) and by which
    detector pass (``preprocessing.face_detect.DETECTORS``, None where filled in)."""
    height, width = media.video.frames.shape[1:3]
    scale = np.array([source_size[0] / width, source_size[1] / height] * 2)
    boxes = np.clip(media.geometry[:, [X0, Y0, X1, Y1]], 0, [width, height, width, height]) * scale  # (T, 4)
    scores, detectors = media.face.scores, media.face.detectors
    track = []
    for t, (x0, y0, x1, y1) in enumerate(boxes):
        detected = bool(np.isfinite(scores[t]))
        track.append({"time": round(media.origin + t / media.video.fps, 3),
                      "box": [round(float(v), 1) for v in (x0, y0, x1 - x0, y1 - y0)],
                      "score": round(float(scores[t]), 4) if detected else None, "detected": detected,
                      "detector": DETECTORS[detectors[t]] if detected else None})
    return track


def predict(video: str | Path, model: str | Path, out: str | Path | None = None,
            preview: str | Path | None = None, *, embeddings: str | Path | None = None, size: str | None = None,
            classes: list[str] | None = None, targets: list[str] | None = None, device: str = "cpu") -> dict:
    """Predict the emotion in ``video`` with ``model``; writes the result JSON to ``out``, a preview (``.png`` grid
    of window frames, or ``.mp4`` with the box and label drawn) to ``preview``, and the clip's embeddings (the
    windows' mean, as ``pipeline.predict.many`` writes them) to the Parquet file ``embeddings``, when given.

    Raises ``MediaError`` (unreadable, no_audio_stream, too_short, no_face, ...) naming the file, and
    ``FileNotFoundError``/``ValueError`` for a model that cannot be used.
    """
    video = Path(video)
    if preview is not None and Path(preview).suffix.lower() not in PREVIEW_SUFFIXES:
        raise ValueError(f"{preview}: a preview is written as .png or .mp4")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    width, height = stored_size(video)  # an unreadable file fails here, before the model loads
    timings: dict[str, float] = {}
    with timed(timings, "load_model"):
        net, card = load_model(model, size, classes, targets, device)
    settings = PreprocessSettings(**card["preprocess"])
    with native_logs_hidden(), FaceDetector.from_settings(settings) as detector:
        media = load_clip_media(video, video, None, None, settings, detector, timings)
    task, names, window = card["task"], output_names(card), WindowSettings(**card["window"])
    with timed(timings, "model"):
        starts, outputs = predict_windows(net, as_shard_sample(media, settings, video.name), window, task, device,
                                          embeddings=embeddings is not None)
    clip = clip_mean(outputs)
    source_size = (height, width) if media.video.rotation % 180 else (width, height)  # upright, as displayed
    result = {
        "input": str(video), "model": model_summary(card), "task": task,
        ("classes" if task == "classification" else "targets"): names,
        "fps": media.video.fps, "duration": round(media.video.duration, 3), "frame_size": list(source_size),
        "face": {**face_summary(media), "track": face_track(media, source_size)},
        "windows": [window_entry(media, start, window.span, values, names, task)
                    for start, values in zip(starts, outputs["output"], strict=True)],
        "clip": named_output(clip.pop("output"), names, task),
        "timings": {stage: round(seconds, 3) for stage, seconds in timings.items()},
    }
    if out is not None:
        atomic_write_text(Path(out), json.dumps(result, indent=1) + "\n")
    if preview is not None:
        save_preview(preview, media, result)
    if embeddings is not None:
        write_embeddings(embeddings, [file_input(video)], [clip])
    return result


def summary_text(result: dict) -> str:
    """A few lines for people: the clip's prediction, then one line per window."""
    face = result["face"]
    lines = [f"{Path(result['input']).name}: {label_text(result['clip'])} "
             f"({result['duration']:.1f} s, {len(result['windows'])} windows, face detected in "
             f"{face['fraction']:.0%} of {face['frames']} frames)"]
    lines += [f"  {w['start']:6.2f}-{w['end']:6.2f} s  {label_text(w)}" for w in result["windows"]]
    return "\n".join(lines)


def predict_command(args) -> int:
    """``hicmae predict VIDEO``: a short summary on stdout, the JSON in a file; a bad input is one line on stderr."""
    video = args.inputs[0]
    out = args.out or f"{Path(video).name}.prediction.json"
    try:
        classes, targets = names_option(args.classes, args.targets)
        result = predict(video, args.model, out, args.preview, embeddings=args.embeddings, size=args.size,
                         classes=classes, targets=targets, device=args.device or "cpu")
    except (MediaError, FileNotFoundError, ValueError) as err:
        print(f"hicmae predict: error: {err}", file=sys.stderr)
        return 1
    print(summary_text(result))
    print(f"wrote {', '.join(str(path) for path in (out, args.preview, args.embeddings) if path)}")
    return 0

