"""Preprocess a manifest into WebDataset shards, a status table and a summary, on Ray Data.

    python -m preprocessing.run --manifest M.jsonl --root DATASET --out DIR [--fps 25 --min-face-fraction 0.5
                                --shard-size 64 --workers 2 --cpus-per-worker 0.5 --no-ray]

Writes ``DIR/shards/shard-XXXXXX.tar`` (one per work unit with at least one good clip), ``DIR/status.jsonl``
(one row per manifest clip: ``ok`` or a named failure with the file and the reason) and ``DIR/summary.json``: all
of it a function of the clips' content and the output settings (byte-identical when run again, anywhere). How
long each stage took is returned under ``run``, not written.
Ray starts locally on loopback unless ``RAY_ADDRESS`` names a cluster (then DIR and the dataset root must
be on a filesystem every node sees). Each worker process holds one face
detector. Re-running with the same inputs and settings redoes only the units that are missing (see units.py).
"""

from __future__ import annotations

import argparse
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


class UnitWorker:
    """A Ray Data callable class: one face detector per worker process, one unit per batch row."""

    def __init__(self, out_dir: str, root: str, info_json: str, settings_json: str):
        self.out_dir, self.root = Path(out_dir), Path(root)
        self.info = DatasetInfo.model_validate_json(info_json)
        self.settings = PreprocessSettings.model_validate_json(settings_json)
        self.detector = FaceDetector.from_settings(self.settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = [process_unit(self.out_dir, self.root, self.info, WorkUnit.from_json(text), self.settings,
                             self.detector) for text in batch["unit"]]
        return {"unit": np.array([json.dumps({"clips": len(result.status["clips"]), "seconds": result.seconds})
                                  for result in done])}


def _run_on_ray(out_dir: Path, root: Path, info: DatasetInfo, units: list[WorkUnit],
                settings: PreprocessSettings) -> Iterator[dict]:
    """Process units on Ray Data; yields ``{"clips": n, "seconds": {stage: s}}`` of each finished unit."""
    import ray

    started = start_ray()
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        cpus = int(ray.cluster_resources().get("CPU", 1))  # the cluster's, not this machine's
        workers = min(settings.workers or cpus, len(units))
        dataset = ray.data.from_items([{"unit": unit.to_json()} for unit in units],
                                      override_num_blocks=len(units))
        dataset = dataset.map_batches(
            UnitWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=settings.cpus_per_worker,
            fn_constructor_kwargs={"out_dir": str(out_dir.resolve()), "root": str(Path(root).resolve()),
                                   "info_json": info.model_dump_json(), "settings_json": settings.model_dump_json()})
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
            result = process_unit(out_dir, root, info, unit, settings, detector)
            yield {"clips": len(result.status["clips"]), "seconds": result.seconds}


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
               settings: PreprocessSettings | None = None) -> dict:
    """Preprocess every clip of ``manifest`` (its media under the dataset folder ``root``) into ``out_dir``.

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
        with _progress(settings, len(clips), done_clips) as bar:
            for done in run(out_dir, root, info, todo, settings):
                bar.update(done["clips"])
                for stage, value in done["seconds"].items():
                    seconds[stage] += value
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


def _progress(settings: PreprocessSettings, total: int, done: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="clip", desc="preprocess", disable=not settings.progress,
                file=sys.stderr)


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
