"""A training stage stopped as a scheduler preempts a job (SIGTERM to the command's process group, mid-epoch) saves a
checkpoint at its next step and exits with one line; the same command then continues it and ends with exactly the
outputs of the end-to-end run that was never stopped (``conftest.demo_run``: the same params, 2 Ray Train workers).
Inputs changed between the two start the stage afresh, saying what changed. The continued fine-tuning runs with
``--verbose``, which shows what a stage keeps to its log otherwise: the details and the libraries' own lines.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from demo_data import demo_params
from demo_run import PARAMS, PROJECT

pytestmark = pytest.mark.system

EXIT_PREEMPTED = 75
TIMEOUT_S = 600


def start(work: Path, server, *args: str) -> tuple[subprocess.Popen, Path]:
    """The real command in a process group (and session) of its own, as a scheduler starts a job; its output
    (stdout and stderr) goes to a file."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(HICMAE_WORKDIR=str(work), MLFLOW_TRACKING_URI=server.url)
    log = work / f"console-{time.monotonic_ns()}.txt"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "--params", str(work / "params.yaml"),
                                    *args], cwd=PROJECT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return process, log


def finish(process: subprocess.Popen, log: Path) -> tuple[int, str]:
    process.wait(timeout=TIMEOUT_S)
    return process.returncode, log.read_text()


def preempt_when(process: subprocess.Popen, log: Path, pattern: str) -> float:
    """SIGTERM to the process group of ``process`` once its output matches ``pattern``; the time it was sent."""
    deadline = time.monotonic() + TIMEOUT_S
    while not re.search(pattern, log.read_text()):
        assert process.poll() is None, f"ended before /{pattern}/:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    return time.monotonic()


def run(work: Path, server, *args: str) -> tuple[int, str]:
    return finish(*start(work, server, *args))


def stopped(work: Path, server, stage: list[str], during: str) -> tuple[str, float]:
    """Preempt ``stage`` while it trains (once its output matched ``during``): what it printed, and the seconds from
    the signal to its end."""
    process, log = start(work, server, *stage)
    sent = preempt_when(process, log, during)
    code, output = finish(process, log)
    assert code == EXIT_PREEMPTED, output[-3000:]
    return output, time.monotonic() - sent


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_preempted_stages_continue_to_the_uninterrupted_result(demo_run, mlflow_server, tmp_path):
    """Pre-training stopped within its first epoch; run with another epoch count (it starts afresh, saying why,
    and leaves the stopped run); run with the first inputs again: it continues the stopped run to the weights of
    the run never stopped. Then fine-tuning, both folds at once, stopped and continued the same way."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "raw").symlink_to(demo_run.work / "raw")
    shutil.copytree(demo_run.work / "data", work / "data")
    demo_params(work / "params.yaml", work, **{**PARAMS, "experiment": "preempted"})

    # signalled after epoch 1's first step; on a busy machine a few more steps pass before the stop reaches rank 0
    output, took = stopped(work, mlflow_server, ["pretrain"], r"epoch 1/\d+  step 1/")
    assert "SIGTERM received" not in output and "Traceback" not in output, output[-3000:]  # no crash, no dump
    saved = re.search(r"pretrain demo: stop requested: checkpoint saved after step (\d+) of epoch (\d+)", output)
    assert saved, output[-3000:]
    step, epoch = saved.groups()
    said = [line for line in output.splitlines() if line.startswith("hicmae: ")]
    assert len(said) == 1 and re.fullmatch(
        rf"hicmae: pretrain demo: stopped on request \(SIGTERM\) at epoch {epoch}, step {step} of \d+, its checkpoint "
        r"saved in \S+: run the same command \(or `dvc repro`\) to continue from there", said[0]), said
    assert took < 20, f"{took:.1f} s from SIGTERM to exit (grace 20 s)"
    assert not (work / "runs/pretrain/checkpoint.pt").exists()  # no output from a stopped run

    code, output = run(work, mlflow_server, "--set", "pretrain.epochs=1", "pretrain")
    assert code == 0, output[-3000:]
    assert re.search(r"pretrain demo: starts afresh, as params settings.epochs 2 -> 1 changed since the interrupted "
                     r"run in \S+ \(kept: its inputs again continue it", output), output
    assert "resumes from its checkpoint" not in output

    code, output = run(work, mlflow_server, "pretrain")
    assert code == 0, output[-3000:]
    assert "continues the interrupted run of the same data, params and code" in output
    assert f"resumes from its checkpoint after step {step} of epoch {epoch} (the epoch's first {step} batches" in output
    reference, resumed = (torch.load(root / "runs/pretrain/checkpoint.pt", weights_only=False)
                          for root in (demo_run.work, work))
    assert same_tensors(reference["model"], resumed["model"])  # bit for bit: the same draws, the same steps
    for name in ("history.csv", "metrics.json"):
        assert (work / "runs/pretrain" / name).read_bytes() == (demo_run.work / "runs/pretrain" / name).read_bytes()
    assert not (work / "ray_results/pretrain-demo").exists(), "finished runs' folders are left"

    finetune = ["finetune", "--dataset", "demo"]
    output, took = stopped(work, mlflow_server, finetune, r"demo fold \d: epoch 1/\d+  step 1/")
    assert re.search(r"hicmae: finetune demo: stopped on request \(SIGTERM\): folds? [\d, ]+ stopped with a "
                     r"checkpoint.*run the same command", output), output[-3000:]
    assert took < 20
    code, output = run(work, mlflow_server, "--verbose", *finetune)  # the details and the libraries' lines too
    assert code == 0, output[-3000:]
    assert output.count("continues the interrupted run of the same data, params and code") >= 1, output
    assert "missing" in output and "unexpected" in output  # the init checkpoint's names, loaded before resuming
    assert "Checkpoint successfully created" in output      # Ray Train's own lines
    reference_folds, resumed_folds = (root / "runs/demo/finetune" for root in (demo_run.work, work))
    for fold in (1, 2):
        for name in ("test_metrics.json", "history.csv", "predictions_best.csv"):
            assert (resumed_folds / f"fold-{fold}" / name).read_bytes() == \
                   (reference_folds / f"fold-{fold}" / name).read_bytes(), (fold, name)
    assert (work / "runs/demo/metrics.json").read_bytes() == (demo_run.work / "runs/demo/metrics.json").read_bytes()
    assert not list((work / "ray_results").glob("finetune-*/*"))
