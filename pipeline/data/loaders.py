"""Training data: which clips each Ray Train worker reads from the shards, and how they are batched.

Fine-tuning reads its fold's clips by index (``ClipDataset``: the members' byte ranges in the shard indexes):
only the split's clips are read, in the order of ``sampling.GlobalBatchSampler`` for training and of
``sampling.rank_share`` for evaluation. Pre-training streams whole shards (``ClipStream``): this epoch's shards
of this rank and loader worker (``sampling.epoch_shards``), each read front to back through its index, their clips
mixed through a buffer while still packed (JPEG bytes), then decoded into examples (``pipeline.data.windows``).

Shards are checked against their indexes (size and sha256) before training starts (``verified_shards``): a
damaged shard stops the stage at once with one line naming it, rather than failing inside every retried worker.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from preprocessing.shard_index import (
    DamagedShard,
    ShardIndex,
    check_shard,
    list_shards,
    map_shard,
    read_index,
    sample_views,
)
from preprocessing.shards import decode_sample

from .sampling import GlobalBatchSampler, epoch_shards

Examples = Callable[..., list[dict]]  # (clip, epoch) -> examples: a partial of an ``examples`` maker


def verified_shards(processed_dir, hint: str) -> list[ShardIndex]:
    """The indexes of a processed folder's shards, each shard checked against its recorded size and sha256;
    a DamagedShard naming the first bad one and what to do (``hint``) otherwise."""
    indexes = []
    for path in list_shards(processed_dir):
        try:
            index = read_index(path)
            check_shard(index)
        except DamagedShard as err:
            raise DamagedShard(f"{err}; {hint}") from None
        indexes.append(index)
    return indexes


def shards_hash(indexes: Iterable[ShardIndex]) -> str:
    """One SHA-256 of the shards' names, sizes and sha256s: what data a run was trained on (MLflow, model cards)."""
    lines = [f"{os.path.basename(index.path)} {index.size} {index.sha256}\n" for index in indexes]
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def clip_catalog(indexes: Iterable[ShardIndex]) -> dict[str, tuple[str, dict]]:
    """clip id -> (shard path, the clip's entry in the shard index)."""
    return {sample["clip_id"]: (index.path, sample) for index in indexes for sample in index.samples}


class ClipDataset(torch.utils.data.Dataset):
    """Clips read by index: item i is ``make_examples(clip, epoch)`` of ``entries[i]`` (shard path, index entry).

    Each process maps the shards it needs into memory once, lazily. Call ``set_epoch`` before making a loader's
    iterator.
    """

    def __init__(self, entries: list[tuple[str, dict]], make_examples: Examples):
        self.entries, self.make_examples = entries, make_examples
        self.epoch = 0
        self._shards: dict[str, memoryview] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, item: int) -> list[dict]:
        path, sample = self.entries[item]
        if path not in self._shards:
            self._shards[path] = map_shard(path)
        raw = sample_views(self._shards[path], sample, path)
        return self.make_examples(decode_sample(raw, lazy=True), self.epoch)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": {}}


class ClipStream(torch.utils.data.IterableDataset):
    """This rank's (and loader worker's) shards of the epoch, read sequentially; their clips shuffled through a
    buffer of ``shuffle_buffer`` clips, still packed, then decoded into examples. Call ``set_epoch`` first."""

    def __init__(self, paths: list[str], make_examples: Examples, *, rank: int, world_size: int,
                 shuffle_buffer: int, seed: int):
        super().__init__()
        self.paths, self.make_examples = list(paths), make_examples
        self.rank, self.world_size, self.shuffle_buffer, self.seed = rank, world_size, shuffle_buffer, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        part, parts = self.rank * workers + worker, self.world_size * workers
        paths, stride, offset = epoch_shards(self.paths, seed=self.seed, epoch=self.epoch, part=part, parts=parts)
        clips = read_shards(paths, stride, offset)
        rng = np.random.default_rng([self.seed, self.epoch, part])
        for raw in shuffled(clips, self.shuffle_buffer, rng):
            yield from self.make_examples(decode_sample(raw, lazy=True), self.epoch)


def read_shards(paths: list[str], stride: int = 1, offset: int = 0) -> Iterator[dict]:
    """The raw samples (field -> bytes-like) of ``paths`` in order, every ``stride``-th from ``offset`` counted over
    all of them: each shard mapped into memory and cut at its index's offsets, so that only the bytes a caller
    touches are read (a window's 16 JPEGs of a clip's 200) and other parts' clips not at all."""
    position = 0
    for path in paths:
        index, shard = read_index(path), map_shard(path)
        for sample in index.samples:
            if position % stride == offset:
                yield sample_views(shard, sample, path)
            position += 1


def shuffled(items: Iterable, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """``items`` through a shuffle buffer of ``buffer_size``: each output is a random one of the buffered items."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) > buffer_size:
            yield buffer.pop(int(rng.integers(len(buffer))))
    rng.shuffle(buffer)
    yield from buffer


def collate(examples: list[dict]) -> dict:
    """Stack arrays and numbers into tensors; keep strings as lists. torch's ``default_collate`` does this, and in a
    loader worker it stacks straight into shared memory, saving a copy of every batch on its way to the trainer."""
    return torch.utils.data.default_collate(examples)


def collate_clips(clips: list[list[dict]]) -> dict:
    """A batch of clips, each a list of examples (views), as one batch of examples."""
    return collate([example for clip in clips for example in clip])


def _loader(dataset, workers: int, **options) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, num_workers=workers, pin_memory=torch.cuda.is_available(), **options)


def training_loader(dataset: ClipDataset, sampler: GlobalBatchSampler, workers: int) -> torch.utils.data.DataLoader:
    """Batches of this rank's slice of every global batch, in order (any number of loader workers)."""
    return _loader(dataset, workers, batch_sampler=sampler, collate_fn=collate_clips)


def evaluation_loader(dataset: ClipDataset, clips_per_batch: int, workers: int) -> torch.utils.data.DataLoader:
    """Every clip once, in order, all its views in the same batch."""
    return _loader(dataset, workers, batch_size=clips_per_batch, shuffle=False, collate_fn=collate_clips)


def stream_loader(dataset: ClipStream, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    return _loader(dataset, workers, batch_size=batch_size, drop_last=True, collate_fn=collate)
