"""Training data: shards -> streams of model-ready windows for each training worker.

A clip in a shard holds all its face frames (at ``meta.fps``) and its whole log-mel fbank (``meta.fbank_rate``
frames per second). A training window is ``num_frames`` frames taken every ``sampling_rate`` frames (16 x 4 =
64 frames = 2.56 s at 25 fps) and the fbank frames of the same time span, padded or cut to 256 frames and
normalised as the reference does. Pre-training windows carry their masks, drawn here in the loader.

Each Ray Train worker streams its own share of the shards with webdataset (``ClipWindows``).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from model import HiCMAEConfig, random_mask, tube_mask
from preprocessing.fbank import fbank_to_model_input
from preprocessing.shards import META_FIELD, ClipSample, decode_sample, fbank_window

from .augment import AugmentConfig, eval_video_transform, train_video_transform
from .settings import WindowSettings

PRETRAIN_SCALES = (1.0, 0.875, 0.75, 0.66)


def window_starts(num_clip_frames: int, span: int, views: int) -> list[int]:
    """Deterministic start frames of ``views`` windows spread from the clip's start to its end."""
    last = max(num_clip_frames - span, 0)
    if views == 1:
        return [last // 2]
    return [round(i * last / (views - 1)) for i in range(views)]


def frame_indices(num_clip_frames: int, start: int, window: WindowSettings) -> np.ndarray:
    """(num_frames,) frame indices from ``start`` every ``sampling_rate``, held at the last frame at the end."""
    idx = start + np.arange(window.num_frames) * window.sampling_rate
    return np.minimum(idx, num_clip_frames - 1)


def audio_window(clip: ClipSample, start: int, window: WindowSettings) -> np.ndarray:
    """(1, audio_frames, 128) normalised fbank for the time span of the video window starting at ``start``."""
    first, last = fbank_window(start, start + window.span, clip.meta["fps"], clip.meta["fbank_rate"])
    return fbank_to_model_input(clip.fbank[first:last], window.audio_frames)


def sample_rng(key: str, epoch: int, seed: int) -> np.random.Generator:
    """A per-sample, per-epoch generator: reproducible windows, augmentations and masks in any worker."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}:{epoch}:{key}".encode()).digest()[:8],
                                                "little"))


def random_start(num_clip_frames: int, window: WindowSettings, rng: np.random.Generator) -> int:
    """A uniformly random first frame of a training window (0 when the clip is shorter than the window)."""
    return int(rng.integers(0, max(num_clip_frames - window.span, 0) + 1))


def pretrain_video_transform(frames: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Multi-scale crop (scales 1/.875/.75/.66, aspect distortion at most one step) + resize, as the reference.

    frames (T, H, W, 3) uint8 -> (3, T, H, W) ImageNet-normalised float32.
    """
    height, width = frames.shape[1:3]
    i = rng.integers(len(PRETRAIN_SCALES))
    j = min(max(i + rng.integers(-1, 2), 0), len(PRETRAIN_SCALES) - 1)
    crop_h, crop_w = int(height * PRETRAIN_SCALES[i]), int(width * PRETRAIN_SCALES[j])
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return eval_video_transform(frames[:, top:top + crop_h, left:left + crop_w])


def pretrain_examples(clip: ClipSample, epoch: int, *, window: WindowSettings, cfg: HiCMAEConfig,
                      seed: int) -> list[dict]:
    """One pre-training window of a clip with a random start, crop and masks."""
    rng = sample_rng(clip.key, epoch, seed)
    start = random_start(len(clip.frames), window, rng)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return [{
        "video": pretrain_video_transform(clip.frames[frame_indices(len(clip.frames), start, window)], rng).numpy(),
        "audio": audio_window(clip, start, window),
        "mask_video": tube_mask(1, cfg.video_grid, cfg.mask_ratio, generator)[0].numpy(),
        "mask_audio": random_mask(1, cfg.num_audio_tokens, cfg.audio_mask_ratio, generator)[0].numpy(),
    }]


def label_fields(meta: dict) -> dict:
    """Labels as fixed-type columns: ``label`` (int, -1 if none) and ``targets`` (float32 vector, maybe empty)."""
    return {"label": int(meta["label"]) if meta.get("label") is not None else -1,
            "targets": np.asarray(meta.get("targets") or [], dtype=np.float32)}


def finetune_train_examples(clip: ClipSample, epoch: int, *, window: WindowSettings, augment: AugmentConfig,
                            seed: int) -> list[dict]:
    """One augmented training window (random start) of a labelled clip."""
    rng = sample_rng(clip.key, epoch, seed)
    start = random_start(len(clip.frames), window, rng)
    frames = clip.frames[frame_indices(len(clip.frames), start, window)]
    return [{"video": train_video_transform(frames, rng, augment).numpy(), "audio": audio_window(clip, start, window),
             **label_fields(clip.meta)}]


def finetune_eval_examples(clip: ClipSample, epoch: int, *, window: WindowSettings, views: int) -> list[dict]:
    """``views`` deterministic windows spread over the clip, each tagged with the clip id and view index."""
    examples = []
    for view, start in enumerate(window_starts(len(clip.frames), window.span, views)):
        frames = clip.frames[frame_indices(len(clip.frames), start, window)]
        examples.append({"video": eval_video_transform(frames).numpy(), "audio": audio_window(clip, start, window),
                         "clip_id": clip.meta["clip_id"], "view": view, **label_fields(clip.meta)})
    return examples


class ClipWindows(torch.utils.data.IterableDataset):
    """Stream the clips of some shards and turn each into examples with ``make_examples(clip, epoch)``.

    A distributed run gives each rank its share: whole shards when there are at least as many shards as
    ranks x loader workers, else every (rank x workers)-th clip. ``clip_ids`` keeps only those clips (a fold's
    split). ``shuffle_buffer`` > 0 shuffles examples through a buffer of that size. Call ``set_epoch`` before
    iterating: random windows, augmentations and the shuffle change per epoch but are reproducible.
    """

    def __init__(self, paths: list[str], make_examples, clip_ids: set[str] | None = None, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 0, seed: int = 0):
        super().__init__()
        self.paths, self.make_examples, self.clip_ids = list(paths), make_examples, clip_ids
        self.rank, self.world_size, self.shuffle_buffer, self.seed = rank, world_size, shuffle_buffer, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_part(self) -> tuple[list[str], int, int, int]:
        """(shards to read, clip stride, clip offset, part index) of this rank and loader worker."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        parts, part = self.world_size * workers, self.rank * workers + worker
        if len(self.paths) >= parts:
            return self.paths[part::parts], 1, 0, part
        return self.paths, parts, part, part

    def _examples(self, paths: list[str], stride: int, offset: int):
        import webdataset as wds

        index = 0
        for raw in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
            if self.clip_ids is not None and json.loads(raw[META_FIELD])["clip_id"] not in self.clip_ids:
                continue
            if index % stride == offset:
                # frames stay packed: the examples decode only the frames their windows use
                yield from self.make_examples(decode_sample(raw, lazy_frames=True), self.epoch)
            index += 1

    def __iter__(self):
        paths, stride, offset, part = self._my_part()
        examples = self._examples(paths, stride, offset)
        if not self.shuffle_buffer:
            yield from examples
            return
        rng = np.random.default_rng([self.seed, self.epoch, part])
        buffer = []
        for example in examples:
            buffer.append(example)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(int(rng.integers(len(buffer))))
        rng.shuffle(buffer)
        yield from buffer


def collate(examples: list[dict]) -> dict:
    """Stack arrays into tensors; keep strings as lists."""
    batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        batch[key] = values if isinstance(values[0], str) else torch.as_tensor(np.stack(values))
    return batch


def make_loader(dataset: ClipWindows, batch_size: int, num_workers: int = 0,
                drop_last: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                                       drop_last=drop_last, pin_memory=torch.cuda.is_available())
