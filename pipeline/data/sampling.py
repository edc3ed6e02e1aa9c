"""Which clips each rank and loader worker reads, and in which order: reproducible from (seed, epoch) alone, and
independent of the order in which a dataset's files sort.

Fine-tuning (small sets, read by index): ``GlobalBatchSampler``. Every epoch all training clips are put in a new
random permutation of (seed, epoch), as the reference's ``DistributedSampler`` does, and cut into global batches
of ``batch_size * world_size``; rank r takes slice r of each. The clips of global step s are therefore the same
for any number of ranks with the same global batch, every rank takes the same number of steps, and a run resumed
at epoch e reads exactly what the uninterrupted run would have. Evaluation: ``rank_share``, every
``world_size``-th clip, so each clip (with all its views) is scored on exactly one rank.

Pre-training (large sets, streamed): ``epoch_shards``. Every epoch all shards in a new permutation of
(seed, epoch), dealt to the ranks x loader workers, so each rank reads a different set of whole shards each
epoch, sequentially; ``data.ClipStream`` then mixes their clips through a buffer.

Micro-batches (``scaling.accum_steps``): a worker's micro-batch m reads what rank ``r * accum_steps + m`` of a run
with ``world_size * accum_steps`` ranks reads (``micro_batch_ranks``), so the clips of every global step are the
same for any split of the global batch into workers and micro-batches (for fine-tuning, for any global batch
split at all; for pre-training, whose shards are dealt to ranks, for the same ranks x micro-batches).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def epoch_permutation(count: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(count)`` that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(count)


class GlobalBatchSampler:
    """A ``batch_sampler`` for one rank's DataLoader: the indices of its slice of every global batch.

    ``len()`` is the number of whole global batches (a remainder of fewer than ``batch_size * world_size``
    clips sits the epoch out; the next epoch's permutation leaves out others). Call ``set_epoch`` first.
    """

    def __init__(self, *, num_clips: int, batch_size: int, rank: int, world_size: int, seed: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.num_clips, self.batch_size, self.rank, self.world_size, self.seed = (
            num_clips, batch_size, rank, world_size, seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_clips // (self.batch_size * self.world_size)

    def global_batches(self) -> Iterator[np.ndarray]:
        """Every global batch of the epoch: (batch_size * world_size,) clip indices each."""
        order = epoch_permutation(self.num_clips, self.seed, self.epoch)
        size = self.batch_size * self.world_size
        for step in range(len(self)):
            yield order[step * size:(step + 1) * size]

    def __iter__(self) -> Iterator[list[int]]:
        first = self.rank * self.batch_size
        for batch in self.global_batches():
            yield batch[first:first + self.batch_size].tolist()


def micro_batch_ranks(rank: int, accum_steps: int) -> list[int]:
    """The ranks, in a run of ``world_size * accum_steps`` ranks, whose data worker ``rank``'s micro-batches read:
    micro-batch m reads rank ``rank * accum_steps + m``'s."""
    return [rank * accum_steps + micro for micro in range(accum_steps)]


def rank_share(items: Sequence, rank: int, world_size: int) -> list:
    """Every ``world_size``-th item from ``rank``: disjoint shares that together hold every item once."""
    return list(items[rank::world_size])


def epoch_shards(paths: Sequence[str], *, seed: int, epoch: int, part: int, parts: int) -> tuple[list[str], int, int]:
    """(shards, clip stride, clip offset) that part ``part`` of ``parts`` (rank x loader worker) reads this epoch.

    With at least as many shards as parts, every part reads whole shards of the epoch's shard permutation,
    ``order[part::parts]`` (stride 1); with fewer, every part reads all shards in that order and keeps every
    ``parts``-th clip from ``part``.
    """
    order = [paths[i] for i in epoch_permutation(len(paths), seed, epoch)]
    if len(paths) >= parts:
        return order[part::parts], 1, 0
    return order, parts, part
