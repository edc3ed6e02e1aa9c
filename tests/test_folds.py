"""Fine-tuning folds side by side: two folds trained at once give what each gives alone, and a fold whose Ray
Train worker is killed resumes from its checkpoint while the other fold goes on.

The real stage runs through the CLI on a real Ray (loopback) and a real ``mlflow server``, on tiny demo data.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
import torch
from demo_data import demo_workspace
from safetensors.torch import load_file

from pipeline import cli
from pipeline.train import raytrain
from pipeline.train.loop import progress_line

pytestmark = pytest.mark.system

FOLDS, EPOCHS = (1, 2), 3


PARAMS = {
    "finetune": {"model": {"size": "hicmae_test"}, "init": "none", "epochs": EPOCHS, "batch_size": 4,
                 "folds": list(FOLDS), "optim": {"warmup_epochs": 0}},
    "scaling": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 1},
}


def run_cli(work: Path, server, *args: str, params: Path | None = None) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HICMAE_WORKDIR", str(work))
        patch.setenv("MLFLOW_TRACKING_URI", server.url)
        assert cli.main(["--params", str(params or work / "params.yaml"), *args]) == 0


def finetune(demo: Path, work: Path, server, *overrides: str) -> Path:
    """The fine-tuning stage in its own work folder, on the shared demo's shards; returns its folds' folder."""
    demo_workspace(demo, work, **PARAMS)
    run_cli(work, server, *overrides, "finetune", "--dataset", "demo")
    return work / "runs/demo/finetune"


def run_span(server, run: dict) -> tuple[int, int]:
    """When a fold's run logged its first step and its last epoch (ms since 1970): when it trained."""
    stamps = [point["timestamp"] for key in ("train_step/loss", "train/loss")
              for point in server.metric_history(run, key)]
    return min(stamps), max(stamps)


def progress(output: str, fold: int, epoch: int) -> list[str]:
    """The console lines of ``fold``'s progress at ``epoch`` (1-based)."""
    return [line for line in output.splitlines() if f"demo fold {fold}: epoch {epoch}/{EPOCHS} " in line]


def test_an_epoch_line_names_the_run_and_the_epoch_from_one():
    line = progress_line("crema-d fold 3", 3, 50, {"train/loss": 1.21, "val/uar": 0.52, "samples_per_s": 97.0})
    assert line == "crema-d fold 3: epoch 4/50  train/loss 1.21  val/uar 0.52  samples_per_s 97"


def test_a_failing_run_does_not_stop_the_others(tmp_path):
    """run_concurrently, as the stage drives its folds: one call fails, the others finish, the failure is named."""
    def driver(item: int) -> None:  # defined here, so Ray ships it by value
        if item == 2:
            raise ValueError("fold 2 broke")
        (tmp_path / f"{item}.done").write_text("ok")

    _, failed = raytrain.run_concurrently(driver, [1, 2, 3], limit=2)
    assert failed == {2: "ValueError: fold 2 broke"}
    assert sorted(path.name for path in tmp_path.glob("*.done")) == ["1.done", "3.done"]


def test_folds_side_by_side_equal_one_at_a_time_and_a_killed_fold_resumes(demo_shards, mlflow_server, tmp_path,
                                                                         kill_worker_after_checkpoint, capsys):
    alone = finetune(demo_shards, tmp_path / "alone", mlflow_server, "--set", "scaling.concurrent_folds=1",
                     "--set", "experiment=folds-alone")
    output = "".join(capsys.readouterr())  # the workers' lines: stdout and stderr
    assert "folds 1, 2 of 5, 1 at a time" in output
    for fold in FOLDS:  # every epoch's progress line once, not twice
        assert [len(progress(output, fold, epoch)) for epoch in range(1, EPOCHS + 1)] == [1] * EPOCHS, output

    together_work = tmp_path / "together"
    ours = psutil.Process()  # a local Ray: its processes descend from this one
    with kill_worker_after_checkpoint(lambda: ours.children(recursive=True), together_work / "ray_results",
                                      runs=2) as killer:
        together = finetune(demo_shards, together_work, mlflow_server, "--set", "experiment=folds-together")
    output = "".join(capsys.readouterr())
    assert "folds 1, 2 of 5, 2 at a time" in output
    for fold in FOLDS:  # both folds' progress shows (the killed fold may redo the epochs after its checkpoint)
        assert len(progress(output, fold, 1)) == 1 and progress(output, fold, EPOCHS), output
    assert killer.killed is not None, "no Ray Train worker was running once both folds had a checkpoint"
    for fold in FOLDS:  # the same results and models, side by side or alone, killed or not
        a, b = alone / f"fold-{fold}", together / f"fold-{fold}"
        assert json.loads(a.joinpath("test_metrics.json").read_text()) == \
            json.loads(b.joinpath("test_metrics.json").read_text()), fold
        assert a.joinpath("predictions_best.csv").read_text() == b.joinpath("predictions_best.csv").read_text()
        weights_a, weights_b = load_file(a / "model/model.safetensors"), load_file(b / "model/model.safetensors")
        assert weights_a.keys() == weights_b.keys()
        assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a), fold

    by_name = mlflow_server.runs_by_name("folds-together")
    resumed = []
    for fold in FOLDS:
        run = by_name[f"demo-fold{fold}"]
        assert run["info"]["status"] == "FINISHED"
        keys = {m["key"] for m in run["data"].get("metrics", [])}
        assert "test/war" in keys
        resumed += [fold] if "resumed_from_epoch" in keys else []
    assert len(resumed) == 1  # the killed fold resumed; the other went on untouched
    # The two folds trained side by side: the second began training sooner after the first than one at a time, where
    # it waits for the whole first fold. (Their steps need not interleave: on a busy machine one fold's few seconds of
    # training can end while the other's Ray Train workers still start.)
    (start1, _), (start2, _) = (run_span(mlflow_server, by_name[f"demo-fold{fold}"]) for fold in FOLDS)
    by_name_alone = mlflow_server.runs_by_name("folds-alone")
    (alone_start1, alone_end1), (alone_start2, _) = (run_span(mlflow_server, by_name_alone[f"demo-fold{fold}"])
                                                     for fold in FOLDS)
    assert alone_end1 < alone_start2  # one at a time, indeed
    assert abs(start2 - start1) < alone_start2 - alone_start1, (start1, start2, alone_start1, alone_start2)
    assert not list((together_work / "ray_results").glob("finetune-*/*"))  # done: no run left to continue
    assert by_name["finetune-demo"]["info"]["status"] == "FINISHED"
