"""Preprocess a manifest into WebDataset shards, a status table and a summary, on Ray Data.

    python -m preprocessing.run --manifest M.jsonl --root DATASET --out DIR [--fps 25 --min-face-fraction 0.5
                                --shard-size 64 --workers 2 --cpus-per-worker 0.5 --no-ray]

Writes ``DIR/shards/shard-XXXXXX.tar`` (one per work unit with at least one good clip), ``DIR/status.jsonl``
(one row per manifest clip: ``ok`` or a named failure with the file and the reason) and ``DIR/summary.json``: all
of it a function of the clips' content and the output settings (byte-identical when run again, anywhere). How
long each stage took is returned under ``run``, not written.
Ray starts locally on loopback unless ``RAY_ADDRESS`` names a cluster (then DIR and the dataset root must
be on a filesystem every node sees). Each worker process holds one face detector. Re-running with the same inputs
and settings redoes only the units that are missing (see units.py).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from preprocessing.clip import STAGES
from preprocessing.face_detect import DETECTORS, FaceDetector
from preprocessing.face_model import ensure_face_models
from preprocessing.fileio import atomic_write_text, write_json
from preprocessing.manifest import DatasetInfo, read_manifest
from preprocessing.ray_runtime import start_ray
from preprocessing.settings import PreprocessSettings
from preprocessing.shard_index import STATUS_FILE, SUMMARY_FILE
from preprocessing.units import WorkUnit, plan_units, process_unit, read_status, remove_leftovers, unit_done

_detectors: dict[str, FaceDetector] = {}  # a Ray worker process's face detector, by settings: loaded once


def process_unit_rows(batch: dict[str, np.ndarray], out_dir: str, root: str, info: str,
                      settings: str) -> dict[str, np.ndarray]:
    """A Ray Data task: the work units of ``batch`` (one per row, as JSON) processed with this worker process's
    face detector (loaded by its first task, closed before the interpreter exits); their ``unit_done_row``s.

    Tasks rather than an actor pool: a worker process keeps its detector between tasks all the same, and Ray
    Data's actors warn of their constructor arguments on every start (ray-project/ray#57733)."""
    config = PreprocessSettings.model_validate_json(settings)
    if settings not in _detectors:
        _detectors[settings] = FaceDetector.from_settings(config)
        atexit.register(_detectors[settings].close)  # before the interpreter tears mediapipe down under it
    dataset = DatasetInfo.model_validate_json(info)
    done = [process_unit(Path(out_dir), Path(root), dataset, WorkUnit.from_json(text), config, _detectors[settings])
            for text in batch["unit"]]
    return {"unit": np.array([json.dumps(unit_done_row(result)) for result in done])}


def unit_done_row(result) -> dict:
    """What the progress needs of a processed unit: its clips, how many failed, the seconds of each stage."""
    clips = result.status["clips"]
    return {"clips": len(clips), "failed": sum(row["status"] != "ok" for row in clips), "seconds": result.seconds}


def _run_on_ray(out_dir: Path, root: Path, info: DatasetInfo, units: list[WorkUnit],
                settings: PreprocessSettings) -> Iterator[dict]:
    """Process units on Ray Data; yields the ``unit_done_row`` of each finished unit."""
    import ray

    started = start_ray()
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the stage counts clips itself (``preprocess``'s ``bar``)
        cpus = int(ray.cluster_resources().get("CPU", 1))  # the cluster's, not this machine's
        workers = min(settings.workers or cpus, len(units))
        dataset = ray.data.from_items([{"unit": unit.to_json()} for unit in units],
                                      override_num_blocks=len(units))
        job = {"out_dir": str(out_dir.resolve()), "root": str(Path(root).resolve()), "info": info.model_dump_json(),
               "settings": settings.model_dump_json()}
        dataset = dataset.map_batches(process_unit_rows, batch_size=1, concurrency=workers,
                                      num_cpus=settings.cpus_per_worker, fn_kwargs=job)
        for row in dataset.iter_rows():
            yield json.loads(row["unit"])
    finally:
        if started:
            ray.shutdown()


def _run_here(out_dir: Path, root: Path, info: DatasetInfo, units: list[WorkUnit],
              settings: PreprocessSettings) -> Iterator[dict]:
    """Process units one after another in this process (no Ray)."""
    with FaceDetector.from_settings(settings) as detector:
        for unit in units:
            yield unit_done_row(process_unit(out_dir, root, info, unit, settings, detector))


def face_summary(rows: list[dict]) -> dict:
    """Face detection over the good clips: shares of output frames detected and filled, share of detected frames
    each detector pass found, and the main face's box side in decoded-frame pixels (median and 5th percentile
    over the clips of each clip's median)."""
    faces = [row["face"] for row in rows if row.get("face")]
    frames = sum(face["frames"] for face in faces)
    detected = sum(face["detected"] for face in faces)
    by_detector = {name: sum(face["detector_frames"].get(name, 0) for face in faces) for name in DETECTORS}
    sides = [face["side_px"] for face in faces]
    return {"clips": len(faces), "frames": frames,
            "detected": round(detected / frames, 4) if frames else 0.0,
            "filled": round(1 - detected / frames, 4) if frames else 0.0,
            "detectors": {name: round(count / detected, 4) if detected else 0.0 for name, count in by_detector.items()},
            "side_px": {"median": round(float(np.median(sides)), 1) if sides else None,
                        "p5": round(float(np.percentile(sides, 5)), 1) if sides else None}}


def summarise(statuses: list[dict]) -> dict:
    """Clip counts by outcome, the shards and face detection (``face_summary``) of the whole output."""
    rows = [row for status in statuses for row in status["clips"]]
    outcomes = Counter(row["status"] for row in rows)
    return {"clips": len(rows), "ok": outcomes.pop("ok", 0), "failed": dict(sorted(outcomes.items())),
            "shards": sorted({status["shard"] for status in statuses if status["shard"]}),
            "face": face_summary(rows), "units": len(statuses)}


def _write_status_table(out_dir: Path, statuses: list[dict]) -> None:
    lines = [json.dumps(row, ensure_ascii=False) for status in statuses for row in status["clips"]]
    atomic_write_text(out_dir / STATUS_FILE, "".join(line + "\n" for line in lines))


def preprocess(manifest: str | os.PathLike, out_dir: str | os.PathLike, root: str | os.PathLike,
               settings: PreprocessSettings | None = None, bar=None) -> dict:
    """Preprocess every clip of ``manifest`` (its media under the dataset folder ``root``) into ``out_dir``; ``bar``:
    the progress (tqdm, or a class with its interface), counting clips and failures.

    Returns the summary written to summary.json, plus under ``run`` what this run did and how long it took (units
    processed now, seconds per stage summed over them, wall seconds): figures of the run, not of the output."""
    settings = settings or PreprocessSettings()
    out_dir, root = Path(out_dir), Path(root)
    start = time.perf_counter()
    info, clips = read_manifest(manifest)
    units = plan_units(info, clips, settings)
    remove_leftovers(out_dir, units)
    todo = [unit for unit in units if not unit_done(out_dir, unit)]
    seconds = dict.fromkeys(STAGES, 0.0)
    if todo:
        ensure_face_models(settings.face_models)  # fetched once here, before any worker needs them
        run = _run_on_ray if settings.use_ray else _run_here
        todo_indices = {unit.index for unit in todo}
        done_clips = sum(len(unit.clips) for unit in units if unit.index not in todo_indices)
        failed = 0
        with (bar or _tqdm)(total=len(clips), initial=done_clips, unit="clip", desc=f"preprocess {info.name}",
                            disable=not settings.progress) as progress:
            for done in run(out_dir, root, info, todo, settings):
                failed += done["failed"]
                progress.set_postfix_str(f"{failed} failed")
                progress.update(done["clips"])
                for stage, value in done["seconds"].items():
                    seconds[stage] += value
        # A task lost with its node mid-write leaves its temporary file (Ray Data ran the unit again elsewhere): the
        # output must hold only what a run on one machine holds.
        remove_leftovers(out_dir, units)
    statuses = [read_status(out_dir, unit.index) for unit in units]
    missing = [unit.index for unit, status in zip(units, statuses, strict=True) if status is None]
    if missing:
        raise RuntimeError(f"{out_dir}: units {missing} did not finish; run again to complete them")
    _write_status_table(out_dir, statuses)
    summary = summarise(statuses)
    write_json(out_dir / SUMMARY_FILE, summary)
    run = {"units_processed": len(todo), "stage_seconds": {k: round(v, 3) for k, v in seconds.items()},
           "wall_seconds": round(time.perf_counter() - start, 3)}
    return {**summary, "run": run}


def _tqdm(**options):
    from tqdm import tqdm

    return tqdm(**options, file=sys.stderr)


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, PreprocessSettings]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="manifest .jsonl (its .info.json beside it)")
    parser.add_argument("--root", required=True, help="the dataset folder the manifest's media paths are in")
    parser.add_argument("--out", required=True, help="output folder")
    for name, field in PreprocessSettings.model_fields.items():
        if field.annotation is bool:
            continue
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=field.description)
    parser.add_argument("--no-ray", action="store_true", help="process in this process, without Ray")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    values = {name: getattr(args, name) for name in PreprocessSettings.model_fields
              if getattr(args, name, None) is not None}
    settings = PreprocessSettings(**values, use_ray=not args.no_ray, progress=not args.no_progress)
    return args, settings


def main(argv: list[str] | None = None) -> None:
    args, settings = _parse_args(argv)
    summary = preprocess(args.manifest, args.out, args.root, settings)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
