"""Which clips the training loaders read, and in which order, on a dataset whose manifest sorts by label.

The dataset is written the way preprocessing writes one (``plan_units`` decides which clips share a shard, then
``write_shard``), with tiny synthetic clips whose fbank holds the clip's number, so every example says which
clip it came from. The loaders are the training stages' own (``FinetuneTask.train_data``,
``PretrainTask.train_data``), with the configs the stages build.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config.params import ScalingSettings
from pipeline.config.training import FinetuneSettings, PretrainSettings
from pipeline.data.loaders import clip_catalog, verified_shards
from pipeline.data.sampling import GlobalBatchSampler, epoch_shards, micro_batch_ranks
from pipeline.train.finetune import fold_config
from pipeline.train.finetune_fold import FinetuneTask
from pipeline.train.loop import batches, run_options
from pipeline.train.pretrain import PretrainTask, pretrain_config
from preprocessing.fbank import NORM_MEAN, NORM_STD
from preprocessing.manifest import ClipRecord, DatasetInfo
from preprocessing.settings import PreprocessSettings
from preprocessing.shard_index import shard_file, write_shard
from preprocessing.shards import META_FIELD, encode_sample
from preprocessing.units import plan_units

CLASSES, PER_CLASS, FOLDS = 8, 20, 5
BATCH = 8


def sorted_dataset(folder, shard_size: int) -> tuple[DatasetInfo, list[ClipRecord], list]:
    """CLASSES x PER_CLASS clips whose ids (and so the manifest) sort by label, preprocessed into shards."""
    clips = [ClipRecord(clip_id=f"{label}-{i:03d}", video=f"{label}-{i:03d}.mp4", label=label, speaker=f"s{i % 10}",
                        fold=1 + i % FOLDS) for label in range(CLASSES) for i in range(PER_CLASS)]
    info = DatasetInfo(name="sorted", task="classification",
                       classes=[f"c{k}" for k in range(CLASSES)], num_folds=FOLDS)
    number = {clip.clip_id: n for n, clip in enumerate(clips)}
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    for unit in plan_units(info, clips, PreprocessSettings(shard_size=shard_size)):
        samples = []
        for clip in unit.clips:
            meta = {"key": f"k{number[clip.clip_id]:04d}", "clip_id": clip.clip_id, "label": clip.label, "fps": 25,
                    "fbank_rate": 100}
            fbank = np.full((80, 128), number[clip.clip_id], np.float32)  # every window says which clip it is
            samples.append({**encode_sample(frames, fbank, meta), META_FIELD: json.dumps(meta).encode()})
        write_shard(shard_file(folder, unit.index), samples)
    return info, clips, verified_shards(folder, "rebuild the test dataset")


def clip_numbers(batch: dict) -> list[int]:
    """The clip numbers of a batch, read back from its audio windows (a clip's fbank is its number)."""
    return np.rint(batch["audio"][:, 0, 0, 0].numpy() * 2 * NORM_STD + NORM_MEAN).astype(int).tolist()


def finetune_loader(info, clips, shards, *, rank: int, world_size: int, batch: int, loader_workers: int = 0):
    settings = FinetuneSettings(batch_size=batch, protocol="reference", augment={"rand_augment": False})
    split = {"train": [c.clip_id for c in clips if c.fold != 1], "val": [], "test": []}
    task = FinetuneTask(fold_config(settings, info, 1, split, clip_catalog(shards), None,
                                    run_options(ScalingSettings(loader_workers=loader_workers))))
    return task.train_data(rank, world_size)


def pretrain_loader(shards, *, rank: int, world_size: int, loader_workers: int = 0):
    settings = PretrainSettings(batch_size=BATCH, model={"size": "hicmae_test"})
    task = PretrainTask(pretrain_config(settings, shards, run_options(ScalingSettings(loader_workers=loader_workers))))
    return task.train_data(rank, world_size)


def epoch_batches(data, epoch: int) -> list[list[int]]:
    data.set_epoch(epoch)
    return [clip_numbers(batch) for batch in data.loader]


def top_class_share(batches: list[list[int]], labels: np.ndarray) -> float:
    """The mean share of a batch held by its most frequent class."""
    return float(np.mean([np.bincount(labels[batch]).max() / len(batch) for batch in batches]))


def uniform_top_class_share(labels: np.ndarray, batch: int, trials: int = 4000) -> float:
    """``top_class_share`` of batches drawn uniformly at random without replacement."""
    rng = np.random.default_rng(1)
    batches = [list(rng.permutation(len(labels))[:batch]) for _ in range(trials)]
    return top_class_share(batches, labels)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return sorted_dataset(tmp_path_factory.mktemp("sorted"), shard_size=16)


def test_shards_are_random_samples_whatever_the_manifest_order(dataset):
    info, clips, shards = dataset
    labels = [len({clip_id.split("-")[0] for clip_id in shard.clip_ids}) for shard in shards]
    assert len(shards) == CLASSES * PER_CLASS // 16 and min(labels) >= 4  # manifest order would give 1 or 2


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_batches_of_a_label_sorted_dataset_mix_like_uniform_sampling(dataset, stage):
    info, clips, shards = dataset
    labels = np.array([clip.label for clip in clips])
    if stage == "finetune":
        data = finetune_loader(info, clips, shards, rank=0, world_size=1, batch=BATCH)
        population = np.array([clip.label for clip in clips if clip.fold != 1])
    else:
        data = pretrain_loader(shards, rank=0, world_size=1)
        population = labels
    epochs = [epoch_batches(data, epoch) for epoch in range(6)]
    share = top_class_share([batch for epoch in epochs for batch in epoch], labels)
    uniform = uniform_top_class_share(population, BATCH)
    assert abs(share - uniform) < 0.05, (share, uniform)  # a sorted read would be 1.0
    assert epochs[0] != epochs[1]                          # a new order every epoch
    assert epoch_batches(data, 1) == epochs[1]             # and the same order again for the same epoch
    fresh = finetune_loader(info, clips, shards, rank=0, world_size=1, batch=BATCH) if stage == "finetune" \
        else pretrain_loader(shards, rank=0, world_size=1)
    assert epoch_batches(fresh, 3) == epochs[3]           # whoever builds the loader (a resumed run)


@pytest.mark.parametrize("shard_size", [8, 64], ids=["more shards than parts", "fewer shards than parts"])
def test_finetune_epoch_reads_every_training_clip_once_across_2_ranks_x_2_workers(tmp_path, shard_size):
    info, clips, shards = sorted_dataset(tmp_path, shard_size)
    assert (len(shards) > 4) == (shard_size == 8)
    train = {n for n, clip in enumerate(clips) if clip.fold != 1}
    single = finetune_loader(info, clips, shards, rank=0, world_size=1, batch=2 * 4)
    ranks = [finetune_loader(info, clips, shards, rank=r, world_size=2, batch=4, loader_workers=2) for r in (0, 1)]
    for epoch in (0, 1):
        per_rank = [epoch_batches(data, epoch) for data in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(train) // 8  # the same number of steps on every rank
        read = [n for batches in per_rank for batch in batches for n in batch]
        assert sorted(read) == sorted(train)  # 128 training clips, 16 global batches of 8: each clip once
        global_batches = [sorted(a + b) for a, b in zip(*per_rank, strict=True)]
        assert global_batches == [sorted(batch) for batch in epoch_batches(single, epoch)]  # 1 rank or 2


def test_global_batches_do_not_depend_on_the_number_of_ranks():
    samplers = {world: [GlobalBatchSampler(num_clips=50, batch_size=12 // world, rank=r, world_size=world, seed=3)
                        for r in range(world)] for world in (1, 2, 3)}
    for epoch in (0, 1):
        for world, ranks in samplers.items():
            for sampler in ranks:
                sampler.set_epoch(epoch)
            steps = [sum(batches, []) for batches in zip(*[list(sampler) for sampler in ranks], strict=True)]
            assert steps == [list(batch) for batch in samplers[1][0].global_batches()], world
            assert len(steps) == 50 // 12 and len(set(sum(steps, []))) == 48  # 2 of 50 sit this epoch out
    sampler = samplers[1][0]
    orders = [(sampler.set_epoch(epoch), list(sampler))[1] for epoch in (0, 1, 0)]
    assert orders[0] != orders[1] and orders[0] == orders[2]


def global_steps(make_loader, workers: int, accum: int, epoch: int) -> list[list[list[int]]]:
    """Every step of an epoch as the loops read it with ``workers`` x ``accum`` micro-batches: per step, the clips of
    each micro-batch in the order worker 0's, then worker 1's, ... (``loop.fit``: ``micro_batch_ranks``)."""
    streams = [make_loader(rank=virtual, world_size=workers * accum)
               for rank in range(workers) for virtual in micro_batch_ranks(rank, accum)]
    for data in streams:
        data.set_epoch(epoch)
    read = [[clip_numbers(batch) for batch in batches(data.loader, data.steps_per_epoch)] for data in streams]
    return [list(micro) for micro in zip(*read, strict=True)]


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_the_clips_of_every_global_step_do_not_depend_on_its_split_into_workers_and_micro_batches(dataset, stage):
    """Global batch 16 of a label-sorted dataset: 4 workers x 1 micro-batch, 2 x 2 and 1 x 4 read the same clips in
    every step, micro-batch m of worker r those of rank 2r + m (of r + m, 4r + m) of 4 ranks; fine-tuning's are also
    those of 1 x 1 with a batch of 16."""
    info, clips, shards = dataset
    if stage == "finetune":
        def make(rank, world_size):
            return finetune_loader(info, clips, shards, rank=rank, world_size=world_size, batch=16 // world_size)
    else:
        def make(rank, world_size):  # pre-training's batch is BATCH: 4 ranks' micro-batches of 8, global 32
            return pretrain_loader(shards, rank=rank, world_size=world_size)
    for epoch in (0, 1):
        splits = {(workers, accum): global_steps(make, workers, accum, epoch)
                  for workers, accum in ((4, 1), (2, 2), (1, 4))}
        reference = splits[4, 1]
        assert len(reference) >= 4 and all(len(step) == 4 for step in reference)
        for split, steps in splits.items():
            assert steps == reference, split  # the same micro-batches, the same clips in the same order
        if stage == "finetune":  # (pre-training: a rank dealt fewer shards reads some again to keep in step)
            read = [n for step in reference for micro in step for n in micro]
            assert len(read) == len(set(read))  # no clip twice in an epoch
            whole = global_steps(lambda rank, world_size: finetune_loader(info, clips, shards, rank=rank,
                                                                          world_size=world_size, batch=16), 1, 1, epoch)
            assert [sorted(sum(step, [])) for step in reference] == [sorted(step[0]) for step in whole]


def test_pretraining_ranks_read_disjoint_shards_that_change_every_epoch():
    paths = [f"shard-{i:02d}.tar" for i in range(10)]
    seen = {}
    for epoch in (0, 1):
        parts = [epoch_shards(paths, seed=0, epoch=epoch, part=p, parts=4) for p in range(4)]
        assert all(stride == 1 for _, stride, _ in parts)
        assert sorted(path for chosen, _, _ in parts for path in chosen) == paths  # each shard once per epoch
        seen[epoch] = parts[0][0]
    assert seen[0] != seen[1]
    chosen, stride, offset = epoch_shards(paths[:3], seed=0, epoch=0, part=2, parts=4)
    assert sorted(chosen) == paths[:3] and (stride, offset) == (4, 2)  # fewer shards than parts: every 4th clip
