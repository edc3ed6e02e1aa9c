"""Fine-tuning augmentation of the reference (HiCMAE section 5.4), re-implemented with numpy, OpenCV, PIL, torch.

One concern per module:
- ``config``: ``AugmentConfig``, every knob (the defaults are the reference's recipe), and RandAugment spec strings;
- ``rand_augment``: the RandAugment op tables, drawing a clip's ops and applying them (equal to PIL's ops);
- ``enhance``: PIL's colour, contrast, brightness and sharpness enhancers on whole clips, value for value;
- ``transforms``: per-clip resize and RandAugment on uint8 frames in the loader, with the draws of the resized
  crop, flip and erasing that the training device applies after normalising (``train_video_fields``; the device
  half is ``pipeline.data.video_batch``), and the deterministic evaluation fields; ``train_video_transform`` and
  ``eval_video_transform`` run both halves on one clip;
- ``mixing``: batch-level Mixup / CutMix and their smoothed soft targets (``mixup_cutmix``).
The criteria that read the soft targets are in ``pipeline/losses.py``.

All randomness comes from the ``np.random.Generator`` passed in, so a seed reproduces a clip exactly. Do not call
``cv2.setNumThreads`` inside forked data-loader workers: after a fork, resizing OpenCV's thread pool can hang.
The reference's waveform ``roll_mag_aug`` is deliberately not reproduced.
"""

from ...config.augment import AugmentConfig
from .mixing import mixup_cutmix
from .transforms import eval_video_fields, eval_video_transform, train_video_fields, train_video_transform

__all__ = ["AugmentConfig", "train_video_fields", "eval_video_fields", "train_video_transform", "eval_video_transform",
           "mixup_cutmix"]
