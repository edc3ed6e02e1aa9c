"""Predictions (and embeddings) for many videos at once, on Ray Data: one table, one row per input.

    hicmae predict videos/ more.mp4 list.csv --model runs/demo/finetune/fold-1/model --out predictions.csv \\
        [--embeddings embeddings.parquet] [--workers 8] [--model-workers 1] [--batch-size 32] [--device auto]

    from pipeline.predict import predict_many
    rows = predict_many(["videos/"], "runs/demo/finetune/fold-1/model", out="predictions.csv")

Every input takes the path of single-video prediction (``pipeline.predict.video``), split in two as Ray Data's batch
inference intends: CPU actors (``ClipWindows``, one face detector each) decode, find faces, crop and compute the
log-mel (``load_clip_media``), go through the shard encoding (``as_shard_sample``) and cut the clip into its
evaluation windows (``clip_examples``: ``finetune_eval_examples``), one row per window; model actors
(``WindowModel``, each on a GPU when the cluster has them) run batches of windows through ``device_batch`` and the
model (``window_outputs``); the driver puts each clip's windows back together and averages them (``clip_mean``),
as ``predict`` does. The stream is bounded by Ray Data's backpressure, whatever the number of inputs.

A file that cannot be used (missing, undecodable, no audio stream, no face, too short) gets a row whose status
names the problem in one line, and never stops the others. The table (``pipeline.predict.table``) is
committed atomically as rows finish: a run killed at any moment loses no committed row and repeats none, and a
re-run with the same ``--out`` does only the inputs it has no row for. Ray starts on loopback, or joins the
cluster of ``RAY_ADDRESS`` (``scripts/ray_submit.sh predict ...``; the files must be where every node sees them).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocessing.clip import load_clip_media, timed
from preprocessing.datasets.clip_list import LIST_SUFFIXES
from preprocessing.decode import MediaError
from preprocessing.errors import InputError
from preprocessing.face_detect import FaceDetector, native_logs_hidden
from preprocessing.face_model import ensure_face_models
from preprocessing.fbank import FRAMES_PER_SECOND
from preprocessing.fileio import sha256_file
from preprocessing.ray_runtime import start_ray
from preprocessing.settings import PreprocessSettings
from preprocessing.shards import ClipSample

from ..config.training import WindowSettings
from ..data.video_batch import GEOMETRY, VIDEO
from ..train.export import locate_exported, output_names
from .inputs import VideoInput, collect_inputs
from .table import EMBEDDINGS, TABLE_SUFFIXES, PredictionTable, table_paths
from .video import (
    as_shard_sample,
    clip_examples,
    clip_mean,
    face_summary,
    load_model,
    named_output,
    names_option,
    predict_command,
    window_outputs,
    window_span,
)

WINDOW_ARRAYS = (VIDEO, GEOMETRY, "audio")  # what a window carries from the CPU actors to the model actors
EMBEDDING_PREFIX = "embedding_"
MAX_INPUT_BLOCKS = 4096
CPUS_PER_WORKER = 0.5


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def placeholder_sample(settings: PreprocessSettings) -> ClipSample:
    """A one-frame black clip: its windows have the shapes of every clip's, and stand in for a failed input's."""
    crops = np.zeros((1, settings.crop_size, settings.crop_size, 3), np.uint8)
    meta = {"clip_id": "", "key": "", "fps": settings.fps, "fbank_rate": FRAMES_PER_SECOND}
    return ClipSample(frames=crops, fbank=np.zeros((4, 128), np.float32), meta=meta)


class ClipWindows:
    """Ray Data actor (CPU): one face detector; an input -> a row per evaluation window of its clip (uint8 video with
    its geometry, the log-mel window; ``clip``: the JSON of everything else), or one row for a failed input."""

    def __init__(self, preprocess: dict, window: dict):
        self.settings = PreprocessSettings(**preprocess)
        self.window = WindowSettings(**window)
        with native_logs_hidden():
            self.detector = FaceDetector.from_settings(self.settings)
        atexit.register(self.detector.close)  # before the interpreter tears mediapipe down under it
        self.blank = clip_examples(placeholder_sample(self.settings), self.window)[1][0]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [row for index, text in zip(batch["index"], batch["input"], strict=True)
                for row in self.windows(int(index), VideoInput(**json.loads(text)))]
        return {name: np.stack([row[name] for row in rows]) for name in rows[0]}

    def windows(self, index: int, item: VideoInput) -> list[dict]:
        timings: dict[str, float] = {}
        try:
            path = Path(item.path)
            with native_logs_hidden():
                media = load_clip_media(path, path, item.start, item.end, self.settings, self.detector, timings)
            with timed(timings, "encode"):
                sample = as_shard_sample(media, self.settings, item.id)
            with timed(timings, "windows"):
                starts, examples = clip_examples(sample, self.window)
        except MediaError as err:
            return [self.row(index, 0, 0, {**item.to_dict(), "status": one_line(f"{err.reason}: {err.detail}")})]
        except Exception as err:  # noqa: BLE001 - one input's unexpected failure must not stop the others
            return [self.row(index, 0, 0, {**item.to_dict(), "status": one_line(f"error: {type(err).__name__}: "
                                                                               f"{err}")})]
        clip = {**item.to_dict(), "status": "ok", "fps": media.video.fps, "duration": round(media.video.duration, 3),
                "face": face_summary(media), "spans": [window_span(media, start, self.window.span) for start in starts],
                "seconds": {stage: round(seconds, 4) for stage, seconds in timings.items()}}
        return [self.row(index, w, len(examples), clip, example) for w, example in enumerate(examples)]

    def row(self, index: int, window: int, windows: int, clip: dict, example: dict | None = None) -> dict:
        example = example or self.blank  # a failed input's row still has every column, with the blank's arrays
        return {"index": index, "window": window, "windows": windows, "clip": json.dumps(clip),
                **{name: example[name] for name in WINDOW_ARRAYS}}


class WindowModel:
    """Ray Data actor: the model, on the actor's GPU when it has one; a batch of window rows -> each window's
    ``output`` (probabilities or values), its embeddings when asked, and its share of the batch's model time."""

    def __init__(self, model: str, options: dict, device: str, embeddings: bool, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.device, self.embeddings = device, embeddings
        self.net, card = load_model(model, device=device, **options)
        self.task = card["task"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        started = time.perf_counter()
        tensors = {name: torch.from_numpy(np.ascontiguousarray(batch[name])) for name in WINDOW_ARRAYS}
        values = window_outputs(self.net, tensors, self.task, self.device, self.embeddings)
        seconds = (time.perf_counter() - started) / len(batch["index"])
        return {"index": batch["index"], "window": batch["window"], "windows": batch["windows"],
                "clip": batch["clip"], "model_seconds": np.full(len(batch["index"]), seconds),
                **{(name if name == "output" else EMBEDDING_PREFIX + name): value for name, value in values.items()}}


class ClipAssembler:
    """Collects each clip's windows as they come back (in any order and batch); a clip's row and embeddings are
    ready once all its windows are."""

    def __init__(self, names: list[str], task: str):
        self.names, self.task = names, task
        self.pending: dict[int, dict[int, dict]] = {}

    def add(self, window: dict) -> tuple[dict, dict | None] | None:
        """One window row of the model actors -> (row, embeddings or None) when its clip is complete, else None."""
        clip = json.loads(window["clip"])
        if int(window["windows"]) == 0:  # a failed input: its one row is the blank window
            return {**clip, "windows": 0}, None
        parts = self.pending.setdefault(int(window["index"]), {})
        parts[int(window["window"])] = window
        if len(parts) < int(window["windows"]):
            return None
        del self.pending[int(window["index"])]
        ordered = [parts[w] for w in range(len(parts))]
        names = ["output", *(name for name in EMBEDDINGS if EMBEDDING_PREFIX + name in window)]
        stacked = {name: np.stack([part[name if name == "output" else EMBEDDING_PREFIX + name] for part in ordered])
                   for name in names}                                     # name -> (windows, C)
        mean = clip_mean(stacked)
        seconds = {**clip.pop("seconds"), "model": round(sum(float(part["model_seconds"]) for part in ordered), 4)}
        spans = clip.pop("spans")
        row = {**clip, "windows": len(ordered), "clip": named_output(mean.pop("output"), self.names, self.task),
               "window_outputs": [{**span, **named_output(values, self.names, self.task)}
                                  for span, values in zip(spans, stacked["output"], strict=True)],
               "seconds": seconds}
        return row, (mean if mean else None)


def quiet_ray() -> None:
    """Ray's Python loggers and Ray Data's console show errors only (the bar and the summary line say the rest);
    Ray Data's log file in the Ray session folder keeps everything."""
    import ray.data  # noqa: F401 - configures the ray.data logger and its handlers

    logging.getLogger("ray").setLevel(logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.ERROR)


def model_identity(model: str | Path, card: dict) -> str:
    """What tells one model's rows from another's: its weights' sha256 (of the card, or of the checkpoint file)."""
    return card.get("weights_sha256") or sha256_file(model)


def cpu_claims(cpus: int, workers: int, model_workers: int, gpus: int) -> tuple[float, float]:
    """The Ray CPUs each CPU actor and each model actor claim: ``CPUS_PER_WORKER`` and one (half without a GPU to
    feed), less where that many actors would claim more than the cluster's ``cpus`` (a claim that cannot be met
    would leave an actor waiting for ever)."""
    model_cpus = 1.0 if gpus else CPUS_PER_WORKER
    scale = min(1.0, cpus / (workers * CPUS_PER_WORKER + model_workers * model_cpus))
    return CPUS_PER_WORKER * scale, model_cpus * scale


def run_pipeline(todo: list[VideoInput], model: str, options: dict, card: dict, *, embeddings: bool, device: str,
                 workers: int | None, model_workers: int | None, batch_size: int):
    """Yield (index into ``todo``, row, embeddings or None) as clips finish, from the Ray Data pipeline."""
    import ray

    quiet_ray()
    started = start_ray()
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        gpus = int(ray.cluster_resources().get("GPU", 0)) if device != "cpu" else 0
        if device == "cuda" and not gpus:
            raise ValueError("device 'cuda' requested but the Ray cluster has no GPU")
        cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        workers = workers or max(1, min(len(todo), cpus))
        model_workers = model_workers or max(1, gpus)
        worker_cpus, model_cpus = cpu_claims(cpus, workers, model_workers, gpus)
        items = [{"index": index, "input": json.dumps(item.to_dict())} for index, item in enumerate(todo)]
        dataset = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_INPUT_BLOCKS))
        dataset = dataset.map_batches(
            ClipWindows, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=worker_cpus,
            fn_constructor_kwargs={"preprocess": card["preprocess"], "window": card["window"]})
        dataset = dataset.map_batches(
            WindowModel, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=model_workers),
            num_gpus=1 if gpus else 0, num_cpus=model_cpus,
            fn_constructor_kwargs={"model": str(model), "options": options, "device": "cuda" if gpus else "cpu",
                                   "embeddings": embeddings, "threads": 1})
        assembler = ClipAssembler(output_names(card), card["task"])
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["index"])):
                done = assembler.add({name: values[i] for name, values in batch.items()})
                if done is not None:
                    yield int(batch["index"][i]), *done
    finally:
        if started:
            ray.shutdown()


def failure_reason(row: dict) -> str | None:
    """A row's failure (``unreadable``, ``no_face``, ...), None when it is ok."""
    return None if row["status"] == "ok" else row["status"].split(":")[0]


@dataclass
class RunSummary:
    """What one run did, for its closing line."""

    inputs: int
    before: int
    failed: Counter
    seconds: float
    files: list

    def line(self) -> str:
        """'predict: 12 inputs: 10 ok, 2 failed (no_audio_stream 1, unreadable 1); 0 done before, 12 now in 30.1 s
        (0.40 clips/s) -> predictions.csv, predictions.jsonl, embeddings.parquet'."""
        failed = sum(self.failed.values())
        reasons = f" ({', '.join(f'{reason} {n}' for reason, n in sorted(self.failed.items()))})" if failed else ""
        now = self.inputs - self.before
        return (f"predict: {self.inputs} inputs: {self.inputs - failed} ok, {failed} failed{reasons}; {self.before} "
                f"done before, {now} now in {self.seconds:.1f} s ({now / max(self.seconds, 1e-9):.2f} clips/s)"
                + (f" -> {', '.join(map(str, self.files))}" if self.files else ""))


def predict_into_table(inputs: list, model: str | Path, out: str | Path | None, embeddings: str | Path | None, *,
                       options: dict, device: str, workers: int | None, model_workers: int | None, batch_size: int,
                       progress: bool) -> tuple[PredictionTable, list[VideoInput], RunSummary]:
    """Predict the inputs ``out`` has no row for into its table; the table, the inputs and what the run did."""
    vetted = inputs and all(isinstance(item, VideoInput) for item in inputs)
    items = list(inputs) if vetted else collect_inputs(inputs)
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {device!r}: auto, cpu or cuda")
    model = locate_exported(model)  # a repo id or registered model fetched once: every actor loads the same files
    _, card = load_model(model, **options)  # a model that cannot be used fails here, before Ray starts
    table = PredictionTable.open(out, embeddings, names=output_names(card), model=model_identity(model, card))
    todo = [item for item in items if not table.done(item.key())]
    failed = Counter(table.failures[item.key()] for item in items if item.key() in table.failures)
    started = time.perf_counter()
    try:
        if todo:
            ensure_face_models(PreprocessSettings(**card["preprocess"]).face_models)
            with _progress(len(items), len(items) - len(todo), progress) as bar:
                bar.set_postfix(failed=sum(failed.values()))
                for _, row, embedding in run_pipeline(todo, model, options, card, embeddings=embeddings is not None,
                                                      device=device, workers=workers, model_workers=model_workers,
                                                      batch_size=batch_size):
                    table.add(row, embedding)
                    if failure_reason(row):
                        failed[failure_reason(row)] += 1
                    bar.update(1)
                    bar.set_postfix(failed=sum(failed.values()))
    finally:
        table.close()
    files = [*(table_paths(out) if out is not None else ()), *([embeddings] if embeddings is not None else [])]
    return table, items, RunSummary(len(items), len(items) - len(todo), failed, time.perf_counter() - started, files)


def predict_many(inputs: list, model: str | Path, out: str | Path | None = None, embeddings: str | Path | None = None,
                 *, size: str | None = None, classes: list[str] | None = None, targets: list[str] | None = None,
                 device: str = "auto", workers: int | None = None, model_workers: int | None = None,
                 batch_size: int = 16, progress: bool = True) -> list[dict]:
    """Predict on every input (video files, folders, clip lists: ``predict_inputs.collect_inputs``; or
    ``VideoInput``s) with ``model``; returns the inputs' rows in their order, as ``out`` (``.csv``, with the
    ``.jsonl`` beside it; None: no file) holds them, and writes each ok clip's embeddings to the Parquet file
    ``embeddings``.

    ``device``: ``auto`` (the cluster's GPUs when it has any), ``cpu`` or ``cuda``. ``workers``: CPU actors
    (default: one per CPU), ``model_workers``: model actors (default: one per GPU, else one); ``batch_size``:
    windows per model call. Inputs that already have a row in ``out`` are not predicted again.
    """
    table, items, summary = predict_into_table(
        inputs, model, out, embeddings, options={"size": size, "classes": classes, "targets": targets},
        device=device, workers=workers, model_workers=model_workers, batch_size=batch_size, progress=progress)
    if progress:
        print(summary.line(), file=sys.stderr)
    return table.rows(items)


def _progress(total: int, done: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="clips", desc="predict", disable=not enabled, file=sys.stderr,
                smoothing=0.1, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, "
                                         "{rate_noinv_fmt}{postfix}]")


def is_batch(args) -> bool:
    """Whether ``hicmae predict`` makes a table (several inputs, a folder, a list, or ``--out`` a table) rather
    than one video's result JSON."""
    first = Path(args.inputs[0])
    return (len(args.inputs) > 1 or first.is_dir() or first.suffix.lower() in LIST_SUFFIXES
            or (args.out is not None and Path(args.out).suffix.lower() in TABLE_SUFFIXES))


def _stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: the rows finished so far are committed


def predict_many_command(args) -> int:
    """``hicmae predict``: one video as ``pipeline.predict.video.predict_command``; several, folders or lists into a
    table, with a progress bar and a summary line on stderr. A bad argument is one line on stderr."""
    if not is_batch(args):
        return predict_command(args)
    try:
        if args.preview:
            raise InputError("--preview draws one video: give one video file (and no table --out)")
        if args.out is None:
            raise InputError("several videos make a table: give --out predictions.csv (a .jsonl is written beside it)")
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
        classes, targets = names_option(args.classes, args.targets)
        _, _, summary = predict_into_table(
            args.inputs, args.model, args.out, args.embeddings,
            options={"size": args.size, "classes": classes, "targets": targets}, device=args.device or "auto",
            workers=args.workers, model_workers=args.model_workers, batch_size=args.batch_size, progress=True)
    except (InputError, FileNotFoundError, ValueError) as err:
        print(f"hicmae predict: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hicmae predict: interrupted; the finished rows are in {args.out}: run the same command again to "
              "do the rest", file=sys.stderr)
        return 130
    print(summary.line(), file=sys.stderr)
    return 0
