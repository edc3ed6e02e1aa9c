"""How a step runs on its device: ``scaling.compile`` (torch.compile of the training step and of evaluation, read
here and nowhere else), the precision (``autocast``) and the module inside DDP (``unwrap``). Training,
evaluation and prediction share these; prediction imports them without the training loop.

    forward = compiled(losses, "default")          # fullgraph=True: one graph, or an error naming the break
    update = optimizer_update(optimizer, mode)     # AdamW's step, compiled on a GPU
    skipped = update(torch.isfinite(loss))         # not applied when the loss or gradient norm is not finite

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

A step whose loss or gradient norm is not finite is skipped (``train.divergence``): the parameters and the
optimizer's state stay exactly as they were, decided on the device wherever the optimizer allows it:
- fused AdamW (eager on a GPU) takes the decision as GradScaler gives it, ``found_inf``: its kernel does nothing
  and the step count is put back;
- the compiled step keeps the parameters and state it updates and puts them back where the step is skipped
  (``torch.where`` in the same graph, a select that inductor can fuse into the update's own kernels);
  AdamW's lazy state is made first, as torch.compile makes it (``adam_state``);
- other optimizers (single-tensor and foreach AdamW: eager on a CPU) take no decision from the device: the update
  reads it on the host, once a step. On a CPU that costs nothing (no queue of work to wait for); on a GPU only the
  non-fused eager AdamW would wait (the stages never build it there).
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
                     clip_grad: float | None = None) -> Callable[..., torch.Tensor]:
    """A function doing one optimizer step (after clipping the gradient norm of ``parameters`` to ``clip_grad``),
    compiled as one graph on a GPU in ``mode``; eager otherwise (see the module docstring).

    The function takes ``loss_finite`` (a 0-d bool tensor: whether the step's loss is finite; None: not checked)
    and returns ``skip``, a 0-d bool tensor on the device: true when the step was not applied because the loss or
    the gradient norm of ``parameters`` (the optimizer's when none are given) is not finite."""
    on_gpu = any(p.is_cuda for group in optimizer.param_groups for p in group["params"])
    if mode == "none" or not on_gpu:
        return eager_update(optimizer, parameters, clip_grad)
    return compiled(graph_update(optimizer, parameters, clip_grad), mode)


def optimized(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def skip_step(parameters: list[torch.Tensor], clip_grad: float | None,
              loss_finite: torch.Tensor | None) -> torch.Tensor:
    """Clip the gradient norm of ``parameters`` to ``clip_grad`` (if set); whether the step is to be skipped: the
    norm, or the loss (``loss_finite`` false), is not finite. A 0-d bool tensor on the device."""
    if clip_grad:
        norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    skip = ~torch.isfinite(norm)
    return skip if loss_finite is None else skip | ~loss_finite


def eager_update(optimizer: torch.optim.Optimizer, parameters=(), clip_grad: float | None = None) -> Callable:
    """The optimizer step as eager code: clip the gradient norm of ``parameters`` (if ``clip_grad``), step unless
    the step is to be skipped (``optimizer_update``)."""
    parameters = list(parameters) or optimized(optimizer)

    def update(loss_finite: torch.Tensor | None = None) -> torch.Tensor:
        skip = skip_step(parameters, clip_grad, loss_finite)
        if all(group.get("fused") for group in optimizer.param_groups):  # decided by the kernel, on the device
            optimizer.found_inf = skip.float()
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        elif skip.is_meta or not skip.item():  # decided here (a meta tensor, which has no value, is applied)
            optimizer.step()
        return skip

    return update


def graph_update(optimizer: torch.optim.Optimizer, parameters=(), clip_grad: float | None = None) -> Callable:
    """The optimizer step as one graph to compile: the same as ``eager_update``, under ``no_grad``, calling the
    step itself rather than ``Optimizer.step``'s wrapper (which breaks the graph around its grad mode), with the
    parameters and state put back where the step is skipped. The optimizer must be AdamW with tensor learning rates
    (``optim.build_optimizer(compiled=True)``)."""
    parameters = list(parameters) or optimized(optimizer)
    step = inspect.unwrap(type(optimizer).step)

    def update(loss_finite: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            skip = skip_step(parameters, clip_grad, loss_finite)
            updated = adam_state(optimizer)
            kept = [tensor.clone() for tensor in updated]
            step(optimizer)
            for tensor, before in zip(updated, kept, strict=True):
                tensor.copy_(torch.where(skip, before, tensor))
        return skip

    return update


def adam_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors an Adam(W) step updates: every parameter with a gradient and its state (moments, step count),
    the state made first where there is none yet, as the step makes it: by the optimizer's own ``_init_group``, as
    its step gathers them (torch.compile runs that call ahead of the graph and maps the lists it fills to the
    optimizer's tensors; reading ``optimizer.state`` in the graph instead would not see the state it makes)."""
    updated = []
    for group in optimizer.param_groups:
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
        optimizer._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
        updated += [*params, *exp_avgs, *exp_avg_sqs, *max_exp_avg_sqs, *steps]
    return updated


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
