"""Exported models: fine-tuned weights as safetensors with a model card, and loading them back.

An exported model is a folder:

    model.safetensors   the HiCMAEClassifier state dict (float32 tensors, no pickled code)
    model_card.json     what is needed to rebuild and use it: the HiCMAEConfig, classes or targets, the task,
                        the window and preprocessing settings it was trained with, its test metrics, the hash of
                        the processed data, where it came from (the fold, or the checkpoint exported)
    README.md           the same as a short human-readable model card

All three are functions of the weights and their settings (no time stamp, host or absolute path), so the same
training gives the same folder; the MLflow run that made it records the time and the git commit.

The fine-tuning stage exports every fold's best-epoch weights to ``runs/<dataset>/finetune/fold-k/model/``;
``hicmae export`` does the same from any fine-tuning Ray checkpoint; ``hicmae predict --model DIR`` uses one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model import HiCMAEClassifier, HiCMAEConfig
from preprocessing.fileio import atomic_path, atomic_write_text, sha256_file, write_json
from preprocessing.manifest import DatasetInfo, read_manifest
from preprocessing.settings import PreprocessSettings

from ..config.params import load_dataset_config, load_params
from ..config.training import WindowSettings, finetune_settings_for, training_params
from ..layout import CHECKPOINT_STATE, TEST_METRICS_FILE, Layout, require

FORMAT = "hicmae-finetuned/1"
WEIGHTS_FILE, CARD_FILE, README_FILE = "model.safetensors", "model_card.json", "README.md"


def config_from_dict(config: dict | HiCMAEConfig) -> HiCMAEConfig:
    """A HiCMAEConfig from its ``to_dict()`` form (JSON turns tuples into lists)."""
    if isinstance(config, HiCMAEConfig):
        return config
    return HiCMAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})


def output_names(card: dict) -> list[str]:
    """The model's outputs in order: class names (classification) or target names (regression)."""
    return card["classes"] if card["task"] == "classification" else card["targets"]


def export_model(state_dict: dict[str, torch.Tensor], config: dict | HiCMAEConfig, info: DatasetInfo,
                 metrics: dict, data_hash: str | None, out_dir: str | Path, *, name: str | None = None,
                 window: WindowSettings | None = None, preprocess: PreprocessSettings | None = None,
                 source: str | None = None) -> Path:
    """Write ``model.safetensors``, ``model_card.json`` and ``README.md`` into ``out_dir``; returns ``out_dir``.

    The weights are checked by loading them strictly into a fresh HiCMAEClassifier of ``config`` with one
    output per class (or target) of ``info``. ``metrics``: any JSON-able dict (e.g. the test metrics of the
    exported epoch).
    """
    cfg = config_from_dict(config)
    card = {"format": FORMAT, "name": name or info.name, "dataset": info.name, "task": info.task,
            "classes": list(info.classes), "targets": list(info.targets), "config": cfg.to_dict()}
    net = HiCMAEClassifier(cfg, len(output_names(card)))
    net.load_state_dict(state_dict)  # strict: names and shapes must match the config exactly
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    with atomic_path(weights) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp),
                  metadata={"format": "pt"})
        tmp.chmod(0o644)  # safetensors creates the file readable by its owner only
    card |= {"parameters": sum(p.numel() for p in net.parameters()),
             "window": (window or WindowSettings()).model_dump(),
             "preprocess": (preprocess or PreprocessSettings()).output_fingerprint(),
             "metrics": metrics, "data_hash": data_hash, "source": source, "weights_sha256": sha256_file(weights)}
    write_json(out_dir / CARD_FILE, card)
    atomic_write_text(out_dir / README_FILE, model_card_markdown(card, out_dir))
    return out_dir


def export_checkpoint(checkpoint_dir: str | Path, info: DatasetInfo, out_dir: str | Path, *, data_hash: str | None,
                      source: str, name: str | None = None, window: WindowSettings | None = None,
                      preprocess: PreprocessSettings | None = None) -> Path:
    """Export the best-epoch weights of a fine-tuning Ray checkpoint folder (``state.pt``, and the test metrics
    of ``test_metrics.json`` when the fold finished); ``source`` says where they came from in the card."""
    folder = Path(checkpoint_dir)
    if not (folder / CHECKPOINT_STATE).is_file():
        raise FileNotFoundError(f"{folder}: no {CHECKPOINT_STATE}; not a fine-tuning checkpoint folder")
    state = torch.load(folder / CHECKPOINT_STATE, map_location="cpu", weights_only=False)  # our own file
    best = state.get("best") or {}
    if "config" not in state or best.get("model") is None:
        raise ValueError(f"{folder / CHECKPOINT_STATE}: no best-epoch weights and config; "
                         "is it a fine-tuning checkpoint?")
    metrics = {"epoch": best["epoch"], "validation_score": float(best["score"])}
    if (folder / TEST_METRICS_FILE).is_file():
        test = json.loads((folder / TEST_METRICS_FILE).read_text())
        metrics["test"] = test["best"]
    return export_model(best["model"], state["config"], info, metrics, data_hash, out_dir, name=name,
                        window=window, preprocess=preprocess, source=source)


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[HiCMAEClassifier, dict]:
    """An exported model (its folder, or its ``.safetensors`` file with ``model_card.json`` beside it) in eval
    mode, and its card."""
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    card_path = weights.parent / CARD_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such exported model file")
    if not card_path.is_file():
        raise FileNotFoundError(f"{card_path}: missing; an exported model needs its card next to {weights.name}")
    card = json.loads(card_path.read_text())
    if card.get("format") != FORMAT:
        raise ValueError(f"{card_path}: not a model card of this pipeline (format {card.get('format')!r})")
    if card.get("weights_sha256") and sha256_file(weights) != card["weights_sha256"]:
        raise ValueError(f"{weights}: does not match {card_path.name} (sha256 differs); a card of another model?")
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from err
    net = HiCMAEClassifier(config_from_dict(card["config"]), len(output_names(card)))
    net.load_state_dict(state)
    return net.to(device).eval(), card


def _scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested metrics as ``{"test/uar": 0.81, ...}`` (lists such as confusion matrices left out)."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat |= _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def shown_path(folder: Path) -> str:
    """``folder`` as a README shows it: relative to the work root when inside it (as the stages export), else by
    name (no absolute path in an output)."""
    folder, root = Path(folder).resolve(), Layout.current().root.resolve()
    return str(folder.relative_to(root)) if folder.is_relative_to(root) else folder.name


def model_card_markdown(card: dict, folder: Path) -> str:
    """The README of an exported model."""
    cfg = card["config"]
    names = output_names(card)
    window = card["window"]
    seconds = window["num_frames"] * window["sampling_rate"] / card["preprocess"]["fps"]
    lines = [
        f"# HiCMAE emotion model: {card['name']}",
        "",
        f"Audio-visual emotion recognition ({card['task']}), fine-tuned on **{card['dataset']}**.",
        "",
        "| | |",
        "|---|---|",
        f"| model | HiCMAE {cfg['modality']}: video {cfg['embed_dim']} wide x {cfg['depth']} blocks, audio "
        f"{cfg['audio_embed_dim']} x {cfg['audio_depth']}, fusion {cfg['fusion_depth']}; "
        f"{card['parameters'] / 1e6:.2f} M parameters |",
        f"| {'classes' if card['task'] == 'classification' else 'targets'} | {', '.join(names)} |",
        f"| input | {window['num_frames']} face crops ({cfg['img_size']} px) every {window['sampling_rate']} "
        f"frames at {card['preprocess']['fps']:g} fps ({seconds:.2f} s) + {window['audio_frames']} log-mel "
        "frames per window |",
        f"| data | processed shards sha256 `{card['data_hash']}` |",
        f"| source | {card['source']} |",
        f"| weights | `{WEIGHTS_FILE}` sha256 `{card['weights_sha256']}` |",
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {key} | {value:.4g} |" for key, value in _scalars(card["metrics"]).items()),
        "",
        "## Use",
        "",
        f"    hicmae predict video.mp4 --model {shown_path(folder)} --out result.json --preview preview.png",
        "",
        "or in Python: `pipeline.predict.predict(\"video.mp4\", model=...)`; "
        "`pipeline.train.export.load_exported(folder)` returns the model and this card.",
        "",
    ]
    return "\n".join(lines)


def newest_checkpoint(storage: Path, run_prefix: str) -> Path:
    """The newest checkpoint folder of the newest Ray Train run named ``<run_prefix>-<time stamp>-<pid>``."""
    runs = sorted(storage.glob(f"{run_prefix}-*"))  # the time stamp sorts the runs (and their checkpoints)
    checkpoints = sorted(p.parent for p in runs[-1].glob(f"checkpoint_*/{CHECKPOINT_STATE}")) if runs else []
    if not checkpoints:
        raise FileNotFoundError(f"{storage}: no checkpoint of a run {run_prefix}-*")
    return checkpoints[-1]


def export_fold(dataset: str, params, fold: int | None = None, checkpoint: str | Path | None = None,
                out_dir: str | Path | None = None) -> Path:
    """``hicmae export``: a fine-tuning checkpoint of ``dataset`` exported (by default the newest one of
    ``fold``'s runs, to ``runs/<dataset>/finetune/fold-<fold>/model``), e.g. from a run that did not finish."""
    from ..data.loaders import shards_hash, verified_shards

    if checkpoint is None and fold is None:
        raise ValueError("give --fold (its newest checkpoint) or --checkpoint")
    if out_dir is None and fold is None:
        raise ValueError("give --out (or --fold for the default runs/<dataset>/finetune/fold-<k>/model)")
    layout = Layout.current()
    data = layout.data(dataset)
    info, _ = read_manifest(require(data.manifest, f"run `hicmae manifest --dataset {dataset}` first"))
    if checkpoint is None:
        checkpoint = newest_checkpoint(layout.ray_results, f"finetune-{info.name}-fold{fold}")
    settings = finetune_settings_for(training_params(params), load_dataset_config(dataset))
    checkpoint = Path(checkpoint).resolve()
    source = str(checkpoint.relative_to(layout.root.resolve()) if checkpoint.is_relative_to(layout.root.resolve())
                 else checkpoint)
    return export_checkpoint(checkpoint, info, out_dir or layout.finetune(dataset).fold(fold).model, source=source,
                             data_hash=shards_hash(verified_shards(data.processed, "run `hicmae preprocess` again"))
                             if data.processed.is_dir() else None,
                             name=f"{info.name}-fold{fold}" if fold else info.name, window=settings.window,
                             preprocess=params.preprocess)


def export_command(args) -> int:
    """``hicmae export``: the path written, or one line on stderr."""
    try:
        params = load_params(args.params, args.overrides)
        print(f"exported -> {export_fold(args.dataset, params, args.fold, args.checkpoint, args.out)}")
    except (FileNotFoundError, ValueError) as err:
        print(f"hicmae export: error: {err}", file=sys.stderr)
        return 1
    return 0

