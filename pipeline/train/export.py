"""Exported models: weights as safetensors with a model card, in the Hugging Face Hub's layout, and loading them.

An exported model is a folder (a Hub model repo as it is uploaded):

    model.safetensors   the state dict (float32 tensors, no pickled code): a fine-tuned HiCMAEClassifier, or the
                        whole pre-training model HiCMAEPretrain (encoders and decoders: pre-training can go on)
    model_card.json     what is needed to rebuild and use it: its format (fine-tuned or pre-trained), the
                        HiCMAEConfig, classes or targets, the task, the window and preprocessing settings it was
                        trained with, its metrics, the hash of the processed data, where it came from
    config.json         the Hub's config: architecture, HiCMAEConfig, outputs, and the input it expects
    README.md           the model card: the Hub's YAML metadata (library, tags, datasets, test metrics as a
                        model-index) and the same for people

All four are functions of the weights and their settings (no time stamp, host or absolute path), so the same
training gives the same folder; the MLflow run that made it records the time and the git commit.

The fine-tuning stage exports every fold's best-epoch weights to ``runs/<dataset>/finetune/fold-k/model/``;
``hicmae export`` does the same from any fine-tuning Ray checkpoint; ``hicmae predict --model DIR`` uses one.

Loading: ``load_exported(source, device)`` takes a folder, its ``.safetensors`` file, or a Hugging Face Hub repo id
(``org/name`` or ``org/name@revision``) and returns (the model in eval mode, its card); ``locate_exported(source)``
is the local folder alone (a repo id downloaded into, or found offline in, the Hub's cache).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model import HiCMAEClassifier, HiCMAEConfig, HiCMAEPretrain, load_weights_strictly, read_checkpoint
from model.checkpoint import extract_state_dict
from preprocessing.errors import InputError
from preprocessing.fileio import atomic_path, atomic_write_text, sha256_file, write_json
from preprocessing.manifest import DatasetInfo, read_manifest
from preprocessing.settings import PreprocessSettings

from ..config.params import load_dataset_config, load_params
from ..config.training import WindowSettings, finetune_settings_for, training_params
from ..layout import CHECKPOINT_STATE, TEST_METRICS_FILE, Layout, MissingInput, require
from .hub import PRETRAINING, front_matter, hub_config, hub_metadata, hub_repo, hub_snapshot

FORMAT = "hicmae-finetuned/1"             # a fine-tuned classifier (or regressor)
PRETRAINED_FORMAT = "hicmae-pretrained/1"  # the whole pre-training model
WEIGHTS_FILE, CARD_FILE, README_FILE, CONFIG_FILE = "model.safetensors", "model_card.json", "README.md", "config.json"
MODEL_FILES = [WEIGHTS_FILE, CARD_FILE, CONFIG_FILE, README_FILE]  # an exported folder; what a Hub repo serves


class ModelError(InputError, ValueError):
    """An exported model or weights file that cannot be used; the message names the file and the problem (a stage
    prints it as one line)."""


def config_from_dict(config: dict | HiCMAEConfig) -> HiCMAEConfig:
    """A HiCMAEConfig from its ``to_dict()`` form (JSON turns tuples into lists)."""
    if isinstance(config, HiCMAEConfig):
        return config
    return HiCMAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})


def output_names(card: dict) -> list[str]:
    """The model's outputs in order: class names (classification) or target names (regression)."""
    return card["classes"] if card["task"] == "classification" else card["targets"]


def network_for(card: dict) -> HiCMAEClassifier | HiCMAEPretrain:
    """A fresh model of the card's kind and config: the classifier with one output per class (or target), or the
    whole pre-training model."""
    cfg = config_from_dict(card["config"])
    if card["format"] == PRETRAINED_FORMAT:
        return HiCMAEPretrain(cfg)
    return HiCMAEClassifier(cfg, len(output_names(card)))


def export_model(state_dict: dict[str, torch.Tensor], config: dict | HiCMAEConfig, info: DatasetInfo,
                 metrics: dict, data_hash: str | None, out_dir: str | Path, *, name: str | None = None,
                 window: WindowSettings | None = None, preprocess: PreprocessSettings | None = None,
                 source: str | None = None, evaluation: dict | None = None) -> Path:
    """Write a fine-tuned model's folder (``MODEL_FILES``) into ``out_dir``; returns ``out_dir``.

    The weights are checked by loading them strictly into a fresh HiCMAEClassifier of ``config`` with one
    output per class (or target) of ``info``. ``metrics``: any JSON-able dict (e.g. the test metrics of the
    exported epoch); ``evaluation``: how its test metrics were computed (its test clips, views, batch size, ranks,
    weights, device: ``finetune.how_tested``), what ``hicmae verify`` computes them again from.
    """
    cfg = config_from_dict(config)
    card = {"format": FORMAT, "name": name or info.name, "dataset": info.name, "task": info.task,
            "classes": list(info.classes), "targets": list(info.targets), "config": cfg.to_dict()}
    card |= {"window": (window or WindowSettings()).model_dump(),
             "preprocess": (preprocess or PreprocessSettings()).output_fingerprint(),
             "metrics": metrics, "evaluation": evaluation, "data_hash": data_hash, "source": source}
    return write_exported(state_dict, card, out_dir)


def export_pretrained(state_dict: dict[str, torch.Tensor], config: dict | HiCMAEConfig, dataset: str,
                      metrics: dict, data_hash: str | None, out_dir: str | Path, *,
                      window: WindowSettings | None = None, preprocess: PreprocessSettings | None = None,
                      source: str | None = None) -> Path:
    """Write the folder of a whole pre-training model (HiCMAEPretrain: encoders and decoders) into ``out_dir``:
    what ``finetune.init`` starts fine-tuning from and ``pretrain.init`` continues pre-training from. ``metrics``:
    e.g. the last epoch's losses. Returns ``out_dir``."""
    cfg = config_from_dict(config)
    card = {"format": PRETRAINED_FORMAT, "name": f"hicmae-pretrained-{dataset}", "dataset": dataset,
            "task": PRETRAINING, "classes": [], "targets": [], "config": cfg.to_dict(),
            "window": (window or WindowSettings()).model_dump(),
            "preprocess": (preprocess or PreprocessSettings()).output_fingerprint(),
            "metrics": metrics, "data_hash": data_hash, "source": source}
    return write_exported(state_dict, card, out_dir)


def write_exported(state_dict: dict[str, torch.Tensor], card: dict, out_dir: str | Path) -> Path:
    """An exported folder from the weights and their card (which gets ``parameters`` and ``weights_sha256`` here).
    The weights are checked by loading them strictly into ``network_for(card)``, then every file is written
    atomically (``MODEL_FILES``). Returns ``out_dir``."""
    out_dir = Path(out_dir)
    net = network_for(card)
    load_strictly(net, state_dict, f"the weights to export to {out_dir.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    with atomic_path(weights) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp),
                  metadata={"format": "pt"})
        tmp.chmod(0o644)  # safetensors creates the file readable by its owner only
    card = card | {"parameters": sum(p.numel() for p in net.parameters()), "weights_sha256": sha256_file(weights)}
    write_json(out_dir / CARD_FILE, card)
    write_json(out_dir / CONFIG_FILE, hub_config(card, output_names(card)))
    atomic_write_text(out_dir / README_FILE, model_card_markdown(card, out_dir))
    return out_dir


def export_checkpoint(checkpoint_dir: str | Path, info: DatasetInfo, out_dir: str | Path, *, data_hash: str | None,
                      source: str, name: str | None = None, window: WindowSettings | None = None,
                      preprocess: PreprocessSettings | None = None, evaluation: dict | None = None) -> Path:
    """Export the best-epoch weights of a fine-tuning Ray checkpoint folder (``state.pt``, and the test metrics
    of ``test_metrics.json`` when the fold finished); ``source`` says where they came from in the card,
    ``evaluation`` how the test metrics were computed (``export_model``)."""
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
                        window=window, preprocess=preprocess, source=source, evaluation=evaluation)


def locate_exported(source: str | Path) -> Path:
    """Where an exported model lies on this machine: a local folder or file as it is; for a Hub repo id
    (``hub.hub_repo``: ``org/name[@revision]``, a str that is no existing path) its snapshot in the Hub's cache,
    downloaded or, offline, as cached; for a registered model (``models:/<name>@<alias>``, ``models:/<name>/<version>``)
    the exported folder it carries, downloaded from MLflow (``registry.local_model``). A ``pathlib.Path`` is always a
    local path."""
    if isinstance(source, str) and source.startswith("models:/"):  # MLflow's Model Registry: ``pipeline.registry``
        from ..registry import local_model  # MLflow is imported for a registered model only

        return local_model(source)
    repo = hub_repo(source) if isinstance(source, str) else None
    return hub_snapshot(*repo, MODEL_FILES) if repo else Path(source)


def weights_file(path: Path) -> Path:
    """The weights of an exported folder (``model.safetensors``), or ``path`` itself when it is not a folder."""
    return path / WEIGHTS_FILE if path.is_dir() else path


def read_exported(source: str | Path) -> tuple[HiCMAEClassifier | HiCMAEPretrain, dict]:
    """The model of an exported folder, its ``.safetensors`` file (``model_card.json`` beside it) or a Hub repo id,
    on the CPU in training mode, and its card. Every tensor must fit the card's model by name and shape: a missing,
    unexpected (renamed) or reshaped tensor is a ValueError naming the tensors and the file."""
    path = locate_exported(source)
    if not path.exists():
        raise MissingInput(f"{path}: no such folder or file (a Hub model is named org/name[@revision])")
    weights = weights_file(path)
    card_path = weights.parent / CARD_FILE
    if not weights.is_file():
        raise MissingInput(f"{weights}: no such exported model file")
    if not card_path.is_file():
        raise MissingInput(f"{card_path}: missing; an exported model needs its card next to {weights.name}")
    card = json.loads(card_path.read_text())
    if card.get("format") not in (FORMAT, PRETRAINED_FORMAT):
        raise ModelError(f"{card_path}: not a model card of this pipeline (format {card.get('format')!r})")
    if card.get("weights_sha256") and sha256_file(weights) != card["weights_sha256"]:
        raise ModelError(f"{weights}: does not match {card_path.name} (sha256 differs); a card of another model?")
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ModelError(f"{weights}: not a readable safetensors file ({err})") from err
    net = network_for(card)
    load_strictly(net, state, weights)
    return net, card


def load_exported(source: str | Path, device: str | torch.device = "cpu") -> tuple[HiCMAEClassifier, dict]:
    """A fine-tuned exported model (``read_exported``'s sources: a folder, its ``.safetensors`` file, a Hub repo id)
    in eval mode on ``device``, and its card."""
    net, card = read_exported(source)
    if card["format"] != FORMAT:
        raise ModelError(f"{source}: a pre-trained model, without an emotion head: fine-tune it first "
                         "(finetune.init) to predict with it")
    return net.to(device).eval(), card


def resolve_init(setting: str, pretrain_checkpoint: Path | None = None) -> Path | None:
    """The weights file a training run starts from, by its ``init`` setting: None for 'none'; for 'pretrain' the
    pre-training checkpoint (when given); for an exported folder or Hub repo id (fetched into the Hub's cache) its
    ``model.safetensors``; else the path as it is (a checkpoint ``.pt``/``.pth``, or a ``.safetensors`` with its
    card beside it). Absolute: Ray Train's workers run in folders of their own. The caller checks that it exists."""
    if setting == "none":
        return None
    if setting == "pretrain" and pretrain_checkpoint is not None:
        return pretrain_checkpoint.absolute()
    return weights_file(locate_exported(setting)).absolute()


def load_strictly(model: torch.nn.Module, state_or_path: dict[str, torch.Tensor] | str | Path,
                  source: str | Path | None = None) -> None:
    """Load a state dict, or the weights of a file (``init_weights``: going on from them), into ``model``, every
    tensor by name and shape; a ModelError naming the file (``source``) and the tensors otherwise."""
    try:
        state = state_or_path if isinstance(state_or_path, dict) else init_weights(state_or_path)
        load_weights_strictly(model, state, str(source or state_or_path))
    except InputError:
        raise
    except ValueError as err:  # model.load_weights_strictly
        raise ModelError(str(err)) from err


def init_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors a training run starts from (``resolve_init``'s file, or an exported folder): an exported
    model's, checked strictly against its card, or a checkpoint's state dict (``model.read_checkpoint``: ours or
    the reference's)."""
    path = weights_file(Path(path))
    if path.suffix == ".safetensors":
        return read_exported(path)[0].state_dict()
    try:
        return extract_state_dict(read_checkpoint(path), str(path))
    except ValueError as err:  # not a PyTorch checkpoint, or no tensors in it
        raise ModelError(str(err)) from err


def _scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested metrics as ``{"test/uar": 0.81, ...}`` (lists such as confusion matrices left out)."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat |= _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def test_metrics(card: dict) -> dict[str, float]:
    """The card's test metrics as numbers, e.g. ``{"uar": 0.81, "recall/anger": 0.9}`` (sample counts left out)."""
    return {key: value for key, value in _scalars(card["metrics"].get("test") or {}).items() if key != "num_samples"}


def shown_path(folder: Path) -> str:
    """``folder`` as a README shows it: relative to the work root when inside it (as the stages export), else by
    name (no absolute path in an output)."""
    folder, root = Path(folder).resolve(), Layout.current().root.resolve()
    return str(folder.relative_to(root)) if folder.is_relative_to(root) else folder.name


def model_card_markdown(card: dict, folder: Path) -> str:
    """The README of an exported model: the Hub's YAML metadata (``hub.hub_metadata``), then the card for people."""
    cfg = card["config"]
    names = output_names(card)
    window = card["window"]
    seconds = window["num_frames"] * window["sampling_rate"] / card["preprocess"]["fps"]
    pretrained = card["format"] == PRETRAINED_FORMAT
    lines = [
        front_matter(hub_metadata(card, test_metrics(card))),
        *((f"# HiCMAE pre-trained model: {card['name']}", "",
           f"HiCMAE pre-trained (masked audio-visual autoencoding, contrastive) on **{card['dataset']}**: encoders "
           "and decoders, to fine-tune or to go on pre-training.") if pretrained else
          (f"# HiCMAE emotion model: {card['name']}", "",
           f"Audio-visual emotion recognition ({card['task']}), fine-tuned on **{card['dataset']}**.")),
        "",
        "| | |",
        "|---|---|",
        f"| model | HiCMAE {cfg['modality']}: video {cfg['embed_dim']} wide x {cfg['depth']} blocks, audio "
        f"{cfg['audio_embed_dim']} x {cfg['audio_depth']}, fusion {cfg['fusion_depth']}; "
        f"{card['parameters'] / 1e6:.2f} M parameters |",
        *(() if pretrained else
          (f"| {'classes' if card['task'] == 'classification' else 'targets'} | {', '.join(names)} |",)),
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
        *(use_pretrained(shown_path(folder)) if pretrained else use_finetuned(shown_path(folder))),
        "",
        "Uploaded to the Hugging Face Hub (`hf upload <org/name> <folder>`), its repo id `<org/name>` (or "
        "`<org/name>@<revision>`) works wherever the folder does.",
        "",
    ]
    return "\n".join(lines)


def use_finetuned(folder: str) -> list[str]:
    """The README's lines on predicting with a fine-tuned model."""
    return [f"    hicmae predict video.mp4 --model {folder} --out result.json --preview preview.png", "",
            "or in Python: `pipeline.predict.predict(\"video.mp4\", model=...)`; "
            "`pipeline.train.export.load_exported(folder)` returns the model and this card."]


def use_pretrained(folder: str) -> list[str]:
    """The README's lines on fine-tuning, or pre-training further, from a pre-trained model."""
    return [f"    hicmae finetune --dataset <dataset> --set finetune.init={folder}",
            f"    hicmae pretrain --set pretrain.init={folder}", "",
            "or in Python: `pipeline.train.export.read_exported(folder)` returns the model (HiCMAEPretrain) and "
            "this card."]


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

