"""``hicmae verify MODEL``: a fine-tuned model's test metrics computed again and compared with those in its card.

    hicmae verify runs/demo/finetune/fold-1/model
    hicmae verify models:/hicmae-demo@best --device cuda

MODEL is anything ``export.load_exported`` takes (an exported folder, its ``.safetensors`` file, a Hub repo id, a
registered model's ``models:/`` URI). Its card's ``evaluation`` (``finetune.how_tested``) names the test clips
and how they were scored; they are read from the processed shards of the current work folder (``layout``) and scored
by the fine-tuning stage's own test evaluation (``evaluation.evaluation_inputs``, ``clip_outputs``, ``merge_outputs``,
``score``): the same clips, views, batches and ranks' shares, with the weights the card's metrics are of (the best
epoch's, the exported ones).

The inputs come first: the shards' hash must be the card's ``data_hash`` and ``params.preprocess`` the card's
preprocessing, and every test clip must be in the shards. A difference is named as the cause and nothing is compared
(a model is not worse for being shown other data). Then the numbers: where the card's metrics were computed on a CPU
without compiling and this check runs on a CPU, every metric and the per-clip predictions (their sha256) must be
equal, exactly; otherwise (a GPU's bf16 autocast, compiled kernels) every metric must be within ``GPU_TOLERANCE``. A
table shows recorded against re-computed metrics; the exit status is 0 when the numbers hold, 1 when they do not or
when the inputs differ.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field

import torch

from preprocessing.errors import InputError
from preprocessing.manifest import DatasetInfo

from ..config.params import load_params
from ..config.training import WindowSettings
from ..data.loaders import clip_catalog, shards_hash, verified_shards
from ..layout import Layout, require
from ..metrics import is_scalar
from ..tracking import flatten
from .evaluation import clip_outputs, evaluation_inputs, merge_outputs, predictions_csv, score
from .export import load_exported

GPU_TOLERANCE = 0.02  # absolute, on every metric (UAR 0.02 = 2 points), where the numbers cannot be exact


@dataclass
class Verdict:
    """What ``verify`` found: the causes that stop a comparison (inputs that differ), else the metrics' table rows
    (metric, recorded, re-computed, holds) and whether the per-clip predictions are identical (None: not compared)."""

    causes: list[str] = field(default_factory=list)
    rows: list[tuple[str, float, float, bool]] = field(default_factory=list)
    predictions_identical: bool | None = None
    exact: bool = True

    @property
    def holds(self) -> bool:
        return not self.causes and all(row[3] for row in self.rows) and self.predictions_identical is not False


def scalar_leaves(metrics: dict) -> dict[str, float]:
    """The finite numbers of nested metrics under ``/``-joined names, as MLflow gets them (a confusion matrix left
    out: the per-clip predictions it comes from are compared as a whole)."""
    return {key: float(value) for key, value in flatten(metrics, sep="/").items() if is_scalar(value)}


def input_differences(card: dict, data_hash: str, preprocess: dict, catalog: dict) -> list[str]:
    """Why the card's metrics cannot be expected here, one line each: other processed data, other preprocessing
    settings, test clips missing from the shards; [] when the inputs are the model's."""
    causes = []
    if card.get("data_hash") != data_hash:
        causes.append(f"data: the processed shards here have hash {data_hash[:12]}..., the model was tested on "
                      f"{str(card.get('data_hash'))[:12]}...: other data, or data preprocessed otherwise; verify in "
                      "the work folder it was trained in, or preprocess its dataset as it was")
    changed = [f"{key} {card['preprocess'].get(key)!r} -> {preprocess.get(key)!r}"
               for key in sorted(set(card["preprocess"]) | set(preprocess))
               if card["preprocess"].get(key) != preprocess.get(key)]
    if changed:
        causes.append(f"preprocessing: params preprocess differs from the model's (model -> now): {', '.join(changed)}")
    missing = [clip for clip in card["evaluation"]["clips"] if clip not in catalog]
    if missing:
        causes.append(f"data: {len(missing)} of the model's {len(card['evaluation']['clips'])} test clips are not in "
                      f"the shards (e.g. {', '.join(missing[:3])})")
    return causes


def recompute(net: torch.nn.Module, card: dict, catalog: dict, device: torch.device, workers: int) -> dict:
    """The ``clip_outputs`` of the card's test clips, each rank's share as the stage's rank scored it, merged."""
    evaluation = card["evaluation"]
    window = WindowSettings(**card["window"])
    parts = [clip_outputs(net, device=device, task=card["task"],
                          **evaluation_inputs(evaluation["clips"], catalog, window, evaluation["views"],
                                              evaluation["batch_size"], workers, rank, evaluation["ranks"]))
             for rank in range(evaluation["ranks"])]
    return merge_outputs(parts)


def compare(recorded: dict, computed: dict, exact: bool) -> list[tuple[str, float, float, bool]]:
    """Table rows (metric, recorded, re-computed, holds) for every scalar metric of either: equal when ``exact``,
    else within ``GPU_TOLERANCE``; a metric only one side has does not hold."""
    before, after = scalar_leaves(recorded), scalar_leaves(computed)
    rows = []
    for name in [*before, *(key for key in after if key not in before)]:
        old, new = before.get(name, float("nan")), after.get(name, float("nan"))
        holds = old == new if exact else abs(old - new) <= GPU_TOLERANCE
        rows.append((name, old, new, holds))
    return rows


def verify(model: str, params, device: str = "cpu") -> tuple[Verdict, dict]:
    """Check ``model`` against its card in the current work folder with ``params`` (its ``preprocess``, and the loader
    processes of ``scaling``); the verdict and the card. Raises ``InputError``/``FileNotFoundError``/``ValueError``
    for a model or data that cannot be used at all."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    torch_device = torch.device(device)
    net, card = load_exported(model, torch_device)
    evaluation, recorded = card.get("evaluation"), (card.get("metrics") or {}).get("test")
    if not evaluation or not recorded:
        raise ValueError(f"{model}: its card names no test evaluation and metrics to check (exported from an "
                         "unfinished run, or by an older version of the pipeline)")
    processed = Layout.current().data(card["dataset"]).processed
    shards = verified_shards(require(processed, f"run `hicmae preprocess --dataset {card['dataset']}` first"),
                             f"run `hicmae preprocess --dataset {card['dataset']}` again")
    catalog = clip_catalog(shards)
    verdict = Verdict(causes=input_differences(card, shards_hash(shards), params.preprocess.output_fingerprint(),
                                               catalog))
    if verdict.causes:
        return verdict, card
    outputs = recompute(net, card, catalog, torch_device, params.scaling.loader_workers)
    info = DatasetInfo(name=card["dataset"], task=card["task"], classes=card["classes"], targets=card["targets"])
    verdict.exact = evaluation["device"] == "cpu" and evaluation["compile"] == "none" and torch_device.type == "cpu"
    computed = json.loads(json.dumps(score(outputs, info), default=float))  # as the card holds them
    verdict.rows = compare(recorded, computed, verdict.exact)
    if verdict.exact and evaluation.get("predictions_sha256"):
        digest = hashlib.sha256(predictions_csv(outputs, info)).hexdigest()
        verdict.predictions_identical = digest == evaluation["predictions_sha256"]
    return verdict, card


def report_lines(model: str, card: dict, verdict: Verdict) -> list[str]:
    """What ``hicmae verify`` prints: the causes, or the table and the conclusion."""
    evaluation = card.get("evaluation") or {}
    head = (f"{model}: {card['name']}, {len(evaluation.get('clips', []))} test clips of {card['dataset']}, "
            f"{evaluation.get('views')} views, the {evaluation.get('weights')} epoch's weights")
    if verdict.causes:
        return [head, "cannot be checked here: its inputs differ (not a worse model):",
                *(f"  {cause}" for cause in verdict.causes)]
    width = max(len(row[0]) for row in verdict.rows) + 2
    lines = [head, f"{'metric':<{width}}{'recorded':>12}{'re-computed':>14}", *(
        f"{name:<{width}}{old:>12.6f}{new:>14.6f}  {'' if holds else 'DIFFERS'}".rstrip()
        for name, old, new, holds in verdict.rows)]
    if verdict.predictions_identical is not None:
        lines.append(f"per-clip predictions: {'identical' if verdict.predictions_identical else 'DIFFER'}")
    rule = "exactly (a CPU, as recorded)" if verdict.exact else f"within {GPU_TOLERANCE} (recorded or checked on a GPU)"
    if verdict.holds:
        lines.append(f"verified: the card's test metrics hold {rule}")
    else:
        lines.append(f"NOT verified: the numbers do not hold {rule}; the data and preprocessing are the model's, so "
                     "its weights or the evaluation code differ from those that recorded them")
    return lines


def verify_command(args) -> int:
    """``hicmae verify MODEL``: the table on stdout; 0 when the card's numbers hold, else 1 (a model or data that
    cannot be used: one line on stderr)."""
    try:
        params = load_params(args.params, args.overrides)
        verdict, card = verify(args.model, params, args.device or "cpu")
    except (InputError, FileNotFoundError, ValueError) as err:
        print(f"hicmae verify: error: {err}", file=sys.stderr)
        return 1
    print("\n".join(report_lines(args.model, card, verdict)))
    return 0 if verdict.holds else 1
