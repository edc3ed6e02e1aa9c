"""Progress within an epoch reads the device's losses only when it shows a line or logs a point, and the console's
small pieces. (The stages' whole console, as a user sees it, is checked end to end in tests/test_pipeline.py.)
"""

from __future__ import annotations

import pytest

from pipeline.console import clock
from pipeline.progress import Counter, EpochProgress, log_interval


def test_progress_reads_the_losses_only_when_it_shows_or_logs(monkeypatch):
    import torch

    shown, logged = [], []

    class Recorder:
        def show(self, text):
            shown.append(text)

        def log(self, metrics, step):
            logged.append((step, metrics))

    reads = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self, original=torch.Tensor.tolist: reads.append(1)
                        or original(self))
    progress = EpochProgress("pretrain demo", epoch=1, epochs=3, steps=10, global_batch=8, loss_names=("loss",),
                             console=Recorder(), tracker=Recorder(), log_every=log_interval(10, 5),
                             show_every_s=3600)
    for index in range(10):
        progress.step(index, torch.tensor([float(index)]), lr=1e-3)
    assert len(reads) == 2 and [step for step, _ in logged] == [15, 20] and not shown
    assert logged[0][1]["train_step/loss"] == pytest.approx(2.0)  # the mean of the 5 steps since the last point
    assert log_interval(6822, None) == 341 and log_interval(10, None) == 1 and clock(52330) == "14:32:10"


def test_a_counter_speaks_every_few_seconds_and_once_at_the_end(monkeypatch):
    lines, now = [], [0.0]
    monkeypatch.setattr("pipeline.progress.time.perf_counter", lambda: now[0])
    console = type("Lines", (), {"show_every_s": 10.0, "show": lambda self, text: lines.append(text)})()
    with Counter(total=100, initial=20, unit="clip", desc="preprocess demo", console=console) as bar:
        for _ in range(8):  # 10 clips every 4 s: a line at 12 s and at 24 s, then the last at 32 s
            now[0] += 4.0
            bar.set_postfix_str("1 failed")
            bar.update(10)
    assert lines == ["preprocess demo: 50/100 clips  2.5 clips/s  1 failed  ETA 0:20",
                     "preprocess demo: 80/100 clips  2.5 clips/s  1 failed  ETA 0:08",
                     "preprocess demo: 100/100 clips  2.5 clips/s  1 failed"]


def test_the_compiling_step_is_said_once_and_kept_out_of_the_rate():
    import torch

    shown, logged = [], []
    console = type("Lines", (), {"show": lambda self, text: shown.append(text)})()
    tracker = type("Points", (), {"log": lambda self, metrics, step: logged.append((step, metrics))})()
    progress = EpochProgress("pretrain demo", epoch=0, epochs=1, steps=4, global_batch=8, loss_names=("loss",),
                             console=console, tracker=tracker, log_every=2, show_every_s=3600, compiling=True)
    for index in range(4):
        progress.step(index, torch.tensor([float(index)]), lr=1e-3)
    assert len(shown) == 1 and shown[0].startswith("pretrain demo: the step compiled and ran in ")
    assert [step for step, _ in logged] == [2, 4]
    assert logged[0][1]["train_step/loss"] == pytest.approx(0.5)  # the compiling step's loss counts, its time not
    assert all(metrics["train_step/samples_per_s"] > 0 for _, metrics in logged)


def test_a_stage_run_where_ray_was_imported_first_starts_its_local_ray():
    """A notebook or script that imported Ray before calling a stage's function: the stage's library settings
    (``quiet_libraries``) leave Ray's authentication as Ray read it, so the local Ray it starts lets it in."""
    import os
    import subprocess
    import sys

    from pipeline.layout import PROJECT_ROOT

    script = ("import ray\n"
              "from pipeline.console import quiet_libraries\n"
              "quiet_libraries()\n"
              "from preprocessing.ray_runtime import start_ray\n"
              "assert start_ray()\n"
              "print('answer', ray.get(ray.put(41)) + 1)\n"
              "ray.shutdown()\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "answer 42" in done.stdout, done.stderr[-3000:]
