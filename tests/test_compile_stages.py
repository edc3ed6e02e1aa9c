"""``scaling.compile: default`` through the real stages, as a cluster runs them: 2 Ray Train workers (DDP on gloo),
2 epochs with a learning-rate schedule, evaluation after every epoch with a short last batch, the test views at the
end; the compiled pre-training has a worker killed and resumes. The compiled runs are one graph per function that
never recompiles (dynamo's counters, logged to MLflow, and ``TORCH_LOGS=recompiles``) and end where the eager runs
end, within tests/test_compile.py's tolerance scaled to two epochs (``RTOL``). The eager runs are the end-to-end run
that tests/test_pipeline.py checks (``conftest.demo_run``): the same params, data and workers, so they run once.

Except for one thing, which is the reference's and not the compiler's: the audio reconstruction target of a patch
of silence. The reference normalises each log-mel patch by its own standard deviation plus 1e-6; a silent patch is
constant (log of the filterbank's floor), so its target is float32 rounding of (x - mean) times 1e6: noise of order
one, a different noise for any other order of the same additions. The demo's clips begin and end in silence, so the
audio loss (and the total) of compiled and eager runs differ by ~2 % (``AUDIO_RTOL``), and the weights by ~1e-4,
while the video and contrastive losses agree to 1e-6. (tests/test_compile.py, on random log-mel, has no silence.)
Fine-tuning is compared from the same pre-trained weights.

The per-rank batch and the model are those of tests/test_compile.py, so the kernels compiled there are reused.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from pipeline import cli

pytestmark = pytest.mark.system

RTOL, AUDIO_RTOL, WEIGHT_ATOL = 1e-3, 5e-2, 5e-4
# On the shared demo (15 clips, tests/demo_run.py's params): pre-training 3 steps of 2 x 2 clips an epoch;
# fine-tuning fold 1 2 steps, and evaluation with a short last batch (3 validation clips over 2 ranks).


def run_stages(work: Path, server, mode: str, *stages: list[str], experiment: str = "compile") -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HICMAE_WORKDIR", str(work))
        patch.setenv("MLFLOW_TRACKING_URI", server.url)
        for stage in stages:
            args = ["--params", str(work / "params.yaml"), "--set", f"scaling.compile={mode}",
                    "--set", f"experiment={experiment}", *stage]
            assert cli.main(args) == 0, stage


def history(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as handle:
        return [{key: float(value) for key, value in row.items() if value} for row in csv.DictReader(handle)]


def probabilities(fold: Path) -> np.ndarray:
    with open(fold / "predictions_best.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    return np.array([[float(value) for value in row[3:]] for row in rows[1:]])


def metric_history(server, experiment: str, run_name: str, key: str) -> list[float]:
    found = server.get("experiments/get-by-name", experiment_name=experiment)["experiment"]
    [run] = server.post("runs/search", {"experiment_ids": [found["experiment_id"]],
                                        "filter": f"attributes.run_name = '{run_name}'"})["runs"]
    values = server.get("metrics/get-history", run_id=run["info"]["run_id"], metric_key=key)["metrics"]
    return [point["value"] for point in sorted(values, key=lambda point: point["step"])]


def test_compiled_stages_end_where_eager_ones_do(demo_run, tmp_path, mlflow_server, monkeypatch, capfd,
                                                 kill_worker_after_checkpoint):
    import ray

    ray.shutdown()  # a Ray of its own, whose workers log recompilations
    monkeypatch.setenv("TORCH_LOGS", "recompiles")
    eager, graph = demo_run.work, tmp_path / "graph"  # eager: 2 workers, both folds, from the same shards
    graph.mkdir()
    (graph / "data").symlink_to(eager / "data")
    (graph / "params.yaml").write_text((eager / "params.yaml").read_text())
    stages = (["pretrain"], ["--set", "finetune.folds=[1]", "finetune", "--dataset", "demo"])
    ours = psutil.Process()  # a local Ray: its processes descend from this one
    with kill_worker_after_checkpoint(lambda: ours.children(recursive=True), graph / "ray_results") as killer:
        run_stages(graph, mlflow_server, "default", stages[0], experiment="compile-default")
    assert killer.killed is not None, "no Ray Train worker was running after the first checkpoint"
    same_init = ["--set", f"finetune.init={eager / 'runs/pretrain/checkpoint.pt'}"]
    run_stages(graph, mlflow_server, "default", [*same_init, *stages[1]], experiment="compile-default")
    output = "".join(capfd.readouterr())
    ray.shutdown()

    assert "Recompiling function" not in output
    for run_name, graphs in (("pretrain-demo", 1), ("demo-fold1", 2)):  # + evaluation's, in fine-tuning
        assert set(metric_history(mlflow_server, "compile-default", run_name, "compile/graph_breaks")) == {0}
        assert set(metric_history(mlflow_server, "compile-default", run_name, "compile/graphs")) == {graphs}
    assert metric_history(mlflow_server, "compile-default", "pretrain-demo", "resumed_from_epoch")

    # pre-training, killed and resumed: the same losses every epoch, and the same weights
    for ours_row, eager_row in zip(history(graph / "runs/pretrain/history.csv"),
                                   history(eager / "runs/pretrain/history.csv"), strict=True):
        for key, rtol in (("train/loss_video", RTOL), ("train/loss_contrastive", RTOL),
                          ("train/loss_audio", AUDIO_RTOL), ("train/loss", AUDIO_RTOL)):
            assert ours_row[key] == pytest.approx(eager_row[key], rel=rtol), key
    weights = torch.load(graph / "runs/pretrain/checkpoint.pt")["model"]
    reference = torch.load(eager / "runs/pretrain/checkpoint.pt")["model"]
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, reference[name], rtol=RTOL, atol=WEIGHT_ATOL, msg=name)
    fold, eager_fold = graph / "runs/demo/finetune/fold-1", eager / "runs/demo/finetune/fold-1"
    for ours_row, eager_row in zip(history(fold / "history.csv"), history(eager_fold / "history.csv"), strict=True):
        assert ours_row["train/loss"] == pytest.approx(eager_row["train/loss"], rel=RTOL)
    np.testing.assert_allclose(probabilities(fold), probabilities(eager_fold), rtol=RTOL, atol=1e-5)
    assert json.loads((fold / "test_metrics.json").read_text())["best_epoch"] == \
        json.loads((eager_fold / "test_metrics.json").read_text())["best_epoch"]
