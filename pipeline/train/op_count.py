"""Counting the aten ops that code dispatches: a proxy for GPU kernel launches that needs no GPU.

Eager PyTorch launches about one kernel per dispatched op that is not a view, so fewer ops per training step
means less time with the GPU waiting on the CPU (benchmarks/train_step.py ``--count-ops``; the batched device
transforms, tests/test_video_batch.py). Counted on a CPU, host-to-device copies do not show (they are no-ops
there): one op each on a GPU.
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as counter: ...``, then ``counter.ops``: every aten op dispatched inside, views,
    in-place and factory ops included, in the forward and in the backward (the autograd engine dispatches
    through it too)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))
