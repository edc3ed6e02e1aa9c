"""Models on the Hugging Face Hub: which model sources are Hub repo ids, their local snapshot, the README's metadata.

A model source is a Hub repo id when it is ``org/name`` or ``org/name@revision`` (a branch, tag or commit) and
nothing on disk: exactly one ``/`` before any ``@``, each part letters, digits, ``-``, ``_`` and ``.`` (not leading),
not ending in a weights suffix (``.safetensors``, ``.pt``, ``.pth``), and not an existing path. Anything else is a
local path: an existing file or folder, ``./org/name``, an absolute path, ``runs/x/model`` (two slashes).

A repo is fetched with ``huggingface_hub.snapshot_download`` into the Hub's own cache (``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``, read when called) and works offline once cached: with
``HF_HUB_OFFLINE=1``, or when the Hub cannot be reached, the cached snapshot is used. Only the files of an exported
model are fetched (``MODEL_FILES``). Uploading is the Hub's own CLI: ``hf upload <org/name> <folder>``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import yaml

from ..layout import MissingInput

REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9_][\w-]*(?:\.[\w-]+)*/[A-Za-z0-9_][\w-]*(?:\.[\w-]+)*)"
                     r"(?:@(?P<revision>[\w./-]+))?")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
LIBRARY_NAME = "hicmae"
TRUE = {"1", "on", "yes", "true"}


def hub_repo(source: str | os.PathLike) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when ``source`` names a Hub repo (the rule above), else None (a local path)."""
    text = os.fspath(source)
    match = REPO_ID.fullmatch(text)
    if not match or Path(text).exists() or match["repo"].lower().endswith(WEIGHT_SUFFIXES):
        return None
    return match["repo"], match["revision"]


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or the older ``TRANSFORMERS_OFFLINE``) asks for the cache alone, as now set."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in TRUE


def hub_cache() -> Path:
    """The Hub's cache folder as the Hub's own tools find it now: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``."""
    folder = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not folder:
        home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
        folder = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(folder)))


def hub_snapshot(repo: str, revision: str | None, files: list[str]) -> Path:
    """The local folder of ``repo``'s ``files`` at ``revision`` (default: main): downloaded into the Hub's cache, or
    the cached snapshot when offline or the Hub cannot be reached. A ``MissingInput`` in one line when neither."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = f"{repo}@{revision}" if revision else repo
    offline = hub_offline()
    try:
        folder = snapshot_download(repo, revision=revision, cache_dir=hub_cache(), allow_patterns=files,
                                   local_files_only=offline, library_name=LIBRARY_NAME)
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
        raise MissingInput(f"{name}: no such local folder, and no Hub model repo (or revision) of that name "
                                f"that this machine may read ({type(err).__name__})") from err
    except LocalEntryNotFoundError as err:
        why = "HF_HUB_OFFLINE=1" if offline else "the Hub cannot be reached"
        raise MissingInput(f"{name}: no such local folder, and not in the Hub cache {hub_cache()} ({why}); "
                                "download it once with the Hub reachable") from err
    except (HfHubHTTPError, OSError) as err:
        raise MissingInput(f"{name}: the Hub model could not be fetched: {str(err).splitlines()[0]}") from err
    return Path(folder)


def front_matter(metadata: dict) -> str:
    """The Hub's YAML metadata block that opens a model's README.md (``---`` lines around it), keys in order."""
    return f"---\n{yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)}---\n"


# ---------------------------------------------------------------------------------------------------------------
# What the Hub reads of an exported model (its card: ``pipeline.train.export``)

PRETRAINING = "pretraining"  # the task of a pre-trained model's card
TAGS = ["hicmae", "audio-visual", "emotion-recognition", "video", "audio", "safetensors"]
TASK_TAGS = {PRETRAINING: ["self-supervised", "masked-autoencoder"], "classification": ["video-classification"],
             "regression": ["regression"]}
TASK_TYPES = {"classification": ("video-classification", "Audio-visual emotion recognition"),
              "regression": ("video-classification", "Audio-visual emotion regression")}


def architecture(card: dict) -> str:
    """The model class an exported card's weights are the state dict of."""
    return "HiCMAEPretrain" if card["task"] == PRETRAINING else "HiCMAEClassifier"


def hub_config(card: dict, outputs: list[str]) -> dict:
    """``config.json``: the architecture and its HiCMAEConfig, the task and the ``outputs`` in order (the Hub's
    ``id2label`` too for a classifier), and the input the model expects: window frames, every how many frames,
    log-mel frames and bins, image size, frame rate, and the preprocessing fingerprint."""
    cfg, window = card["config"], card["window"]
    config = {"model_type": LIBRARY_NAME, "architectures": [architecture(card)], "format": card["format"],
              "task": card["task"], "classes": card["classes"], "targets": card["targets"],
              "num_outputs": len(outputs)}
    if card["task"] == "classification":
        config |= {"id2label": {str(i): name for i, name in enumerate(outputs)},
                   "label2id": {name: i for i, name in enumerate(outputs)}}
    return config | {
        "input": {"num_frames": window["num_frames"], "sampling_rate": window["sampling_rate"],
                  "audio_frames": window["audio_frames"], "audio_mel_bins": cfg["audio_mel_bins"],
                  "img_size": cfg["img_size"], "fps": card["preprocess"]["fps"]},
        "preprocess": card["preprocess"], "hicmae_config": cfg}


def hub_metadata(card: dict, test_metrics: dict[str, float]) -> dict:
    """The README's YAML metadata: library, tags, the dataset, and the test metrics as the Hub's ``model-index``
    (``name``, ``results: [{task, dataset, metrics: [{type, value, name}]}]``), when the card has any (finite ones:
    the Hub takes no NaN)."""
    test_metrics = {key: float(value) for key, value in test_metrics.items() if math.isfinite(value)}
    metadata = {"library_name": LIBRARY_NAME, "tags": TAGS + TASK_TAGS[card["task"]], "datasets": [card["dataset"]]}
    if card["task"] == "classification":
        metadata["pipeline_tag"] = "video-classification"
    if test_metrics:
        task_type, task_name = TASK_TYPES[card["task"]]
        metadata |= {"metrics": list(test_metrics), "model-index": [{"name": card["name"], "results": [{
            "task": {"type": task_type, "name": task_name},
            "dataset": {"name": card["dataset"], "type": card["dataset"]},
            "metrics": [{"type": key, "value": value, "name": f"test {key}"} for key, value in test_metrics.items()],
        }]}]}
    return metadata
