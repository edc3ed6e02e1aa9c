"""How a step runs on its device: ``scaling.compile`` (torch.compile of the training step and of evaluation, read
here and nowhere else), the precision (``autocast``) and the module inside DDP (``unwrap``). Training,
evaluation and prediction share these; prediction imports them without the training loop.

    forward = compiled(losses, "default")          # fullgraph=True: one graph, or an error naming the break
    update = optimizer_update(optimizer, mode)     # AdamW's step, compiled on a GPU

Modes are torch.compile's own: ``none`` (eager), ``default`` (inductor kernels), ``reduce-overhead`` (inductor
kernels replayed as CUDA graphs: a GPU only), ``max-autotune``; ``auto`` is ``none`` on a CPU and ``reduce-overhead``
on a GPU (benchmarks/README.md: on an H200, CUDA graphs doubled the eager step of HiCMAE-B at batch 40, which is
bound by kernel launches, not arithmetic).

What is compiled, and the guards that keep it one graph that never recompiles:
- the forward with every loss (``TrainingTask.losses``), whose backward AOTAutograd compiles with it. Its inputs
  have fixed shapes: training batches are whole (the samplers drop a short remainder), random draws made on the
  host reach it as tensors (Mixup/CutMix weights), and the model gathers visible tokens by index, never by mask;
- the optimizer step, on a GPU: AdamW without the graph breaks ``Optimizer.step`` puts around its grad mode
  (it runs under ``no_grad`` here), with the learning rate a tensor that the schedule fills in place
  (``optim.set_lr``), so a new learning rate is new data, not a new graph. On a CPU it stays eager: inductor takes
  minutes to compile AdamW over a few hundred parameter tensors there and runs it slower than eager (measured);
- evaluation, as a function of its own (its own graphs, no recompile of the training step's), on batches padded
  to the loader's full size (``evaluation.clip_outputs``).
Random ops (drop path) run as eager's (``fallback_random``), so a compiled step draws the same numbers as an eager
one and results stay comparable across modes. Module state is untouched: checkpoints, exported models and
``predict`` are the same whatever the mode.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

MODES = ("auto", "none", "default", "reduce-overhead", "max-autotune")
NEEDS_GPU = ("reduce-overhead",)


def resolve(mode: str, device: torch.device) -> str:
    """The torch.compile mode for ``device`` (``auto`` decided); a ValueError for CUDA graphs without a GPU."""
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" else "none"
    if mode in NEEDS_GPU and device.type != "cuda":
        raise ValueError(f"compile mode {mode!r} replays CUDA graphs and needs a GPU; this worker runs on {device}")
    return mode


def compiled(fn: Callable, mode: str) -> Callable:
    """``fn`` compiled as one graph (``fullgraph=True``) in ``mode``, or ``fn`` itself for ``none``."""
    if mode == "none":
        return fn
    import torch._inductor.config as inductor

    inductor.fallback_random = True  # drop path draws what eager draws
    return torch.compile(fn, mode=None if mode == "default" else mode, fullgraph=True)


def optimizer_update(optimizer: torch.optim.Optimizer, mode: str, parameters=(),
                     clip_grad: float | None = None) -> Callable[[], None]:
    """A function doing one optimizer step (after clipping the gradient norm of ``parameters`` to ``clip_grad``),
    compiled as one graph on a GPU in ``mode``; eager otherwise (see the module docstring)."""
    on_gpu = any(p.is_cuda for group in optimizer.param_groups for p in group["params"])
    if mode == "none" or not on_gpu:
        return eager_update(optimizer, parameters, clip_grad)
    return compiled(graph_update(optimizer, parameters, clip_grad), mode)


def eager_update(optimizer: torch.optim.Optimizer, parameters=(), clip_grad: float | None = None) -> Callable:
    """The optimizer step as eager code: clip the gradient norm of ``parameters`` (if ``clip_grad``), step."""
    parameters = list(parameters)

    def update() -> None:
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        optimizer.step()

    return update


def graph_update(optimizer: torch.optim.Optimizer, parameters=(), clip_grad: float | None = None) -> Callable:
    """The optimizer step as one graph to compile: the same as ``eager_update``, under ``no_grad``, calling the
    step itself rather than ``Optimizer.step``'s wrapper (which breaks the graph around its grad mode). The
    optimizer must have tensor learning rates (``optim.build_optimizer(compiled=True)``)."""
    parameters = list(parameters)
    step = inspect.unwrap(type(optimizer).step)

    def update() -> None:
        with torch.no_grad():
            if clip_grad:
                torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
            step(optimizer)

    return update


def compile_counters() -> dict[str, int]:
    """dynamo's counts in this process so far: graphs compiled (one per compiled function, and one more for every
    recompilation) and graph breaks."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": sum(counters["graph_break"].values())}


def autocast(device: torch.device, precision: str | None = None):
    """``precision`` "bf16" (autocast) or "fp32"; None: bf16 on GPU, float32 on CPU (bf16 matmuls are slow on
    most CPUs)."""
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel, if wrapped."""
    return net.module if hasattr(net, "module") else net
