"""``scaling.compile``: the compiled training step and evaluation are one graph each, never recompile, and give what
eager gives within a stated tolerance (on a CPU, the ``hicmae_test`` size, torch.compile's ``default`` mode).

Tolerance: compiled kernels fuse and reorder float32 arithmetic, so results differ from eager's by rounding. Over
five AdamW steps the losses agree within ``LOSS_RTOL`` and the gradients within ``GRAD_ATOL`` (measured: about a
tenth of both); random ops draw as eager's (drop path, ``compiled.compiled``), so nothing else differs.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from model import get_config, random_mask, tube_mask
from pipeline.config.params import ConfigError, load_params
from pipeline.config.training import FinetuneSettings, ModelSettings, PretrainSettings
from pipeline.data.loaders import collate
from pipeline.data.video_batch import device_batch, video_fields
from pipeline.data.windows import multi_scale_crop
from pipeline.train.compiled import compiled, eager_update, graph_update, resolve
from pipeline.train.evaluation import clip_outputs, eval_forward
from pipeline.train.finetune_fold import FinetuneTask
from pipeline.train.loop import TrainStep, step_module
from pipeline.train.optim import build_optimizer, set_lr
from pipeline.train.pretrain import PretrainTask
from preprocessing.manifest import DatasetInfo

STEPS, BATCH = 5, 2  # the per-rank batch of test_compile_stages.py: the same kernels, compiled once
LOSS_RTOL, GRAD_ATOL = 1e-4, 1e-5
pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py

INFO = DatasetInfo(name="synthetic", task="classification", classes=["a", "b", "c"])
CPU = torch.device("cpu")


def pretrain_task(mode: str) -> PretrainTask:
    settings = PretrainSettings(model=ModelSettings(size="hicmae_test"), batch_size=BATCH)
    task = PretrainTask({"settings": settings.model_dump(mode="json"), "compile": mode})
    task.compile_mode = mode
    return task


def finetune_task(mode: str) -> FinetuneTask:
    settings = FinetuneSettings(model=ModelSettings(size="hicmae_test"), batch_size=BATCH,
                                augment={"rand_augment": False})  # Mixup/CutMix on, drop path 0.1: host draws
    task = FinetuneTask({"settings": settings.model_dump(mode="json"), "info": INFO.model_dump(mode="json"),
                         "split": {}, "clips": {}, "compile": mode})
    task.compile_mode = mode
    return task


def loader_batches(stage: str, count: int) -> list[dict]:
    """``count`` batches as the loader delivers them (uint8 video with its geometry), on the CPU."""
    cfg = get_config("hicmae_test")
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(count):
        examples = []
        for _ in range(BATCH):
            frames = rng.integers(0, 256, (cfg.num_frames, cfg.img_size, cfg.img_size, 3), dtype=np.uint8)
            example = {"audio": rng.standard_normal((1, cfg.audio_frames, cfg.audio_mel_bins), dtype=np.float32),
                       **video_fields(frames, crop=multi_scale_crop(cfg.img_size, cfg.img_size, rng))}
            if stage == "pretrain":
                generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
                example["mask_video"] = tube_mask(1, cfg.video_grid, cfg.mask_ratio, generator)[0]
                example["mask_audio"] = random_mask(1, cfg.num_audio_tokens, cfg.audio_mask_ratio, generator)[0]
            else:
                example |= {"label": int(rng.integers(len(INFO.classes))), "targets": np.zeros(0, np.float32)}
            examples.append(example)
        batches.append(collate(examples))
    return batches


def run_steps(task, batches: list[dict], accum: int = 1) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """The task's TrainStep over ``batches`` from a seeded init, ``accum`` of them a step (its micro-batches): each
    step's loss and gradients."""
    torch.manual_seed(0)
    task.accum_steps = accum
    net = task.build_model(0)
    optimizer = build_optimizer(net, task.settings.optim)
    step = TrainStep(task, step_module(task, net, task.compile_mode), optimizer, task.compile_mode)
    rng = np.random.default_rng(1)
    losses, grads = [], []
    for index in range(len(batches) // accum):
        set_lr(optimizer, 1e-3 * (index + 1) / len(batches))  # a schedule: a new lr every step
        micro = batches[index * accum:(index + 1) * accum]
        losses.append(float(step((device_batch(batch, CPU), rng) for batch in micro)[0]))
        grads.append({name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None})
    return losses, grads


@pytest.mark.parametrize("accum", [1, 2], ids=["one batch a step", "2 micro-batches a step"])
@pytest.mark.parametrize("make_task, stage", [(pretrain_task, "pretrain"), (finetune_task, "finetune")])
def test_compiled_step_equals_eager_and_is_one_graph(make_task, stage, accum):
    batches = loader_batches(stage, STEPS * accum)
    eager_losses, eager_grads = run_steps(make_task("none"), batches, accum)
    losses, grads = run_steps(make_task("default"), batches, accum)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1  # the forward with every loss (its backward comes with it)
    assert len(losses) == STEPS  # each micro-batch through the same graph: no recompile
    np.testing.assert_allclose(losses, eager_losses, rtol=LOSS_RTOL)
    for step_grads, eager in zip(grads, eager_grads, strict=True):
        assert step_grads.keys() == eager.keys()
        for name, grad in step_grads.items():
            torch.testing.assert_close(grad, eager[name], rtol=0, atol=GRAD_ATOL, msg=name)


def test_compiled_optimizer_takes_a_new_learning_rate_without_recompiling():
    """The optimizer step as one graph (compiled on a GPU; here forced on a small model): tensor learning rates
    that the schedule fills in place, AdamW's state, no graph break, no recompile, eager's updates."""
    torch.manual_seed(0)
    layers = [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    for layer in layers:
        layer.cfg = SimpleNamespace(depth=1, audio_depth=1, fusion_depth=1)  # what param_groups reads
    settings = PretrainSettings().optim
    optimizers = [build_optimizer(layer, settings, compiled=kind == "graph") for kind, layer in
                  zip(("eager", "graph"), layers, strict=True)]
    updates = [eager_update(optimizers[0]), compiled(graph_update(optimizers[1]), "default")]
    for step in range(4):
        for layer, optimizer, update in zip(layers, optimizers, updates, strict=True):
            set_lr(optimizer, 1e-2 / (step + 1))
            optimizer.zero_grad()
            layer(torch.full((2, 8), float(step + 1))).square().sum().backward()
            update()
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 1
    for eager, graph in zip(layers[0].parameters(), layers[1].parameters(), strict=True):
        torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-7)


def test_compiled_evaluation_pads_the_short_batch_and_equals_eager():
    """Evaluation batches padded to the full size: a short last batch is the same graph, and the clips' outputs
    are eager's."""
    task = finetune_task("default")
    torch.manual_seed(0)
    net = task.build_model(0).eval()
    batches = []
    for rows in (BATCH, BATCH, 1):  # two full batches and a short one
        batch = loader_batches("finetune", 1)[0]
        batch = {key: value[:rows] for key, value in batch.items()}
        batch["clip_id"] = [f"clip{len(batches)}-{i}" for i in range(rows)]
        batches.append(batch)
    eager = clip_outputs(net, batches, CPU, "classification", embeddings=True)
    graph = clip_outputs(net, batches, CPU, "classification", embeddings=True,
                         forward=compiled(eval_forward, "default"), batch_rows=BATCH)
    assert counters["stats"]["unique_graphs"] == 1 and sum(counters["graph_break"].values()) == 0
    assert list(graph["clip_id"]) == list(eager["clip_id"]) and len(eager["clip_id"]) == 2 * BATCH + 1
    for name in ("output", "embedding/fused", "embedding/video", "embedding/audio"):
        np.testing.assert_allclose(graph[name], eager[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_cuda_graphs_are_refused_without_a_gpu(tmp_path):
    assert resolve("auto", CPU) == "none" and resolve("auto", torch.device("cuda")) == "reduce-overhead"
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve("reduce-overhead", CPU)
    params = tmp_path / "params.yaml"
    params.write_text("scaling: {compile: reduce-overhead}\n")
    with pytest.raises(ConfigError, match=r"params.yaml: scaling: .*reduce-overhead replays CUDA graphs"):
        load_params(params)
