"""A diverging run (``pipeline.train.divergence``): a step whose loss or gradient norm is not finite is not applied
(the weights and AdamW's state, moments and step count, stay exactly as they were), it is counted, the next finite
step is the one a run that never saw the bad batch takes, a run that keeps diverging stops with one line naming the
epoch and step, and no checkpoint holds a non-finite value.

Every way an update is applied is covered on the CPU: eager AdamW (the decision read on the host), fused AdamW (the
decision given to its kernel, ``found_inf``, as on a GPU) and the compiled update of a GPU (``graph_update``,
compiled here in torch.compile's ``default`` mode), each behind the training loop's own ``TrainStep``, with its
forward eager or compiled.
"""

from __future__ import annotations

import copy
import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from pipeline.config.training import OptimSettings
from pipeline.train import loop
from pipeline.train.compiled import compiled, graph_update
from pipeline.train.divergence import NonFiniteCheckpoint, SkippedSteps, TrainingDiverged
from pipeline.train.loop import TrainingTask, TrainStep, step_module, train_one_epoch
from pipeline.train.optim import LrSchedule, build_optimizer, set_lr

LR = 1e-2
pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


class ScaleGrad(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by ``scale``: a finite loss with an inf gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad * scale, None


class TinyModel(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        self.cfg = SimpleNamespace(depth=1, audio_depth=1, fusion_depth=1)  # what optim.param_groups reads


class TinyTask(TrainingTask):
    """A regression on ``video`` (B, 6) -> ``target`` (B, 2); ``grad_scale`` scales the gradient of the output."""

    def __init__(self, mode: str, max_skipped_steps: int = 20, clip_grad: float | None = None):
        super().__init__({"compile": mode})
        self.compile_mode = mode
        self.settings = SimpleNamespace(optim=OptimSettings(lr=LR, betas=(0.9, 0.95), clip_grad=clip_grad,
                                                            max_skipped_steps=max_skipped_steps))

    def losses(self, net: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        output = ScaleGrad.apply(net(batch["video"]), batch["grad_scale"])
        loss = (output - batch["target"]).square().mean()
        return loss, loss.detach()[None]


def batch(seed: int, bad: str | None = None) -> dict:
    """A batch of 4; ``bad``: "loss" (an inf input: the loss is not finite) or "grad" (a finite loss whose gradient
    is inf)."""
    generator = torch.Generator().manual_seed(seed)
    video = torch.randn(4, 6, generator=generator)
    if bad == "loss":
        video[0, 0] = float("inf")
    return {"video": video, "target": torch.randn(4, 2, generator=generator),
            "grad_scale": torch.tensor(float("inf") if bad == "grad" else 1.0)}


def make_step(mode: str, update: str, **task_options) -> tuple[TinyModel, torch.optim.Optimizer, TrainStep]:
    """A seeded model, its AdamW and the loop's TrainStep; ``update``: "eager" (AdamW for the CPU), "fused" (the
    fused kernel) or "graph" (the compiled update a GPU runs, with its capturable AdamW)."""
    torch.manual_seed(0)
    model, task = TinyModel(), TinyTask(mode, **task_options)
    optimizer = build_optimizer(model, task.settings.optim, fused=update == "fused", compiled=update == "graph")
    step = TrainStep(task, step_module(task, model, mode), optimizer, mode)
    if update == "graph":  # what compiled.optimizer_update gives on a GPU
        step.update = compiled(graph_update(optimizer, model.parameters(), task.settings.optim.clip_grad), "default")
    set_lr(optimizer, LR)
    return model, optimizer, step


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()["state"]})


def assert_same(state: dict, expected: dict) -> None:
    """Exactly equal, tensor for tensor (the step counts included)."""
    assert state.keys() == expected.keys()
    for key, value in state.items():
        if isinstance(value, dict):
            assert_same(value, expected[key])
        else:
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(expected[key])), key


@pytest.mark.parametrize("mode, update", [("none", "eager"), ("default", "eager"), ("none", "fused"),
                                          ("default", "graph")])
@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_a_non_finite_step_is_skipped_as_if_its_batch_never_came(mode, update, bad):
    rng = None  # the tiny task draws nothing on the host
    model, optimizer, step = make_step(mode, update, clip_grad=1.0 if bad == "grad" else None)
    step([(batch(0, bad), rng)])  # the very first step, before AdamW has any state
    assert bool(step.skipped.last)
    step([(batch(1), rng)])
    before = snapshot(model, optimizer)
    losses = step([(batch(2, bad), rng)])
    assert bool(step.skipped.last) and int(step.skipped.run) == 1
    assert not torch.isfinite(losses).all() if bad == "loss" else torch.isfinite(losses).all()
    assert_same(snapshot(model, optimizer), before)  # weights, moments and step counts untouched
    step([(batch(3), rng)])
    assert not bool(step.skipped.last) and int(step.skipped.run) == 0

    reference_model, reference_optimizer, reference = make_step(mode, update,
                                                                clip_grad=1.0 if bad == "grad" else None)
    reference([(batch(1), rng)])
    reference([(batch(3), rng)])
    assert_same(snapshot(model, optimizer), snapshot(reference_model, reference_optimizer))
    assert [float(group_state["step"]) for group_state in optimizer.state_dict()["state"].values()] == [2.0] * 6
    if update == "graph":  # the update stays one graph, whatever it decides
        assert sum(counters["graph_break"].values()) == 0


class Console:
    def __init__(self):
        self.lines = []

    def show(self, line: str) -> None:
        self.lines.append(line)


def epoch_of(step: TrainStep, optimizer, batches: list[dict], epoch: int, console: Console, monkeypatch) -> dict:
    """``train_one_epoch`` over ``batches`` (already on the device) at a constant learning rate."""
    monkeypatch.setattr(loop, "device_batch", lambda batch, device: batch)
    schedule = LrSchedule(len(batches), 10 * len(batches), 0, LR, LR)
    progress = SimpleNamespace(step=lambda *args: None, console=console, label="tiny", epochs=10)
    return train_one_epoch(step.net, optimizer, [batches], step=step, epoch=epoch,
                           schedule=schedule, loss_names=("loss",), device=torch.device("cpu"), global_batch=4,
                           progress=progress)


def test_skipped_steps_are_counted_and_a_run_that_keeps_diverging_stops(monkeypatch):
    model, optimizer, step = make_step("none", "eager", max_skipped_steps=3)
    console = Console()
    first = [batch(0), batch(1, "loss"), batch(2), batch(3, "grad")]
    metrics = epoch_of(step, optimizer, first, 0, console, monkeypatch)
    assert metrics["train/skipped_steps"] == 2 and math.isfinite(metrics["train/loss"])  # over the steps applied
    assert console.lines == ["tiny: epoch 1/10: 2 of 4 steps skipped (a non-finite loss or gradient norm)"]

    assert SkippedSteps.of(optimizer) is step.skipped
    second = [batch(4, "loss"), batch(5, "grad"), batch(6), batch(7)]  # with the last of epoch 1: 3 in a row
    with pytest.raises(TrainingDiverged) as raised:
        epoch_of(step, optimizer, second, 1, console, monkeypatch)
    message = str(raised.value)
    assert "\n" not in message
    assert re.match(r"training diverged at epoch 2, step 2: 3 steps in a row had a non-finite loss or gradient "
                    r"norm and were skipped \(optim.max_skipped_steps\)", message), message


def test_the_epoch_loss_is_the_mean_over_the_steps_applied(monkeypatch):
    model, optimizer, step = make_step("none", "eager")
    reference_model, reference_optimizer, reference = make_step("none", "eager")
    clean = epoch_of(reference, reference_optimizer, [batch(0), batch(2)], 0, Console(), monkeypatch)
    metrics = epoch_of(step, optimizer, [batch(0), batch(1, "loss"), batch(2)], 0, Console(), monkeypatch)
    assert metrics["train/skipped_steps"] == 1 and clean["train/skipped_steps"] == 0
    assert metrics["train/loss"] == pytest.approx(clean["train/loss"], rel=1e-6)
    assert_same(snapshot(model, optimizer), snapshot(reference_model, reference_optimizer))


def test_a_checkpoint_with_a_non_finite_value_is_refused(monkeypatch):
    import ray.train

    from pipeline.train import raytrain

    reported = []
    monkeypatch.setattr(ray.train, "report", lambda *args, **kwargs: reported.append(args))
    model = TinyModel()
    state = {"model": model.state_dict(), "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}}, "epoch": 3}
    raytrain.report_epoch({"epoch": 3, "train/loss": 1.0}, state)
    assert len(reported) == 1  # finite: saved

    state["model"]["2.bias"] = torch.tensor([0.0, float("nan")])
    state["optimizer"]["state"][0]["exp_avg"] = torch.tensor([float("inf"), 0.0, 0.0])
    with pytest.raises(NonFiniteCheckpoint, match=r"^the checkpoint of epoch 4 is not saved: model\.2\.bias, "
                                                  r"optimizer\.state\.0\.exp_avg hold non-finite values"):
        raytrain.report_epoch({"epoch": 3, "train/loss": 1.0}, state)
    assert len(reported) == 1


@pytest.mark.system
def test_a_diverging_pretraining_stops_with_one_line_and_finite_checkpoints(demo_shards, tmp_path, hicmae):
    """The real ``hicmae pretrain`` at a learning rate of 1e30: its first step throws the weights to ~1e28 (still
    finite), every later loss is not finite; 10 skipped steps in a row end it in its second epoch (7 steps an
    epoch), after the first epoch's checkpoint, which is finite."""
    from demo_data import demo_workspace

    work = demo_workspace(demo_shards, tmp_path, pretrain={
        "dataset": "demo", "model": {"size": "hicmae_test"}, "epochs": 3, "batch_size": 2,
        "optim": {"lr": 1e30, "warmup_epochs": 0, "max_skipped_steps": 10}},
        scaling={"num_workers": 1, "max_failures": 0})
    result = hicmae("--params", str(work / "params.yaml"), "pretrain", timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "training diverged at epoch 2, step 4: 10 steps in a row had a non-finite loss" in result.stderr, \
        result.stderr[-3000:]
    assert "pretrain demo: epoch 1/3: 6 of 7 steps skipped (a non-finite loss or gradient norm)" in result.stdout
    states = sorted(work.rglob("state.pt"))  # Ray Train's checkpoints, under ray_results/
    assert states, "the first epoch's checkpoint"
    for path in states:
        state = torch.load(path, map_location="cpu", weights_only=False)
        assert state["epoch"] == 0
        for name, tensor in state["model"].items():
            assert torch.isfinite(tensor).all(), (path, name)
    assert not (work / "runs/pretrain/checkpoint.pt").exists()
    assert "Traceback" not in result.stderr, result.stderr[-3000:]  # the worker's error reaches the command as is
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hicmae: error: training diverged at epoch 2, step 4: "), result.stderr[-3000:]
