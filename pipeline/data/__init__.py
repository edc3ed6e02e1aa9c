"""The training data path: a clip in the shards -> a model-ready batch on the training device.

- ``loaders``: which clips each rank and loader worker reads (fine-tuning by index, pre-training streamed), the
  datasets, loaders and the shard checks;
- ``sampling``: global batches that are the same for any number of ranks, shard order per epoch;
- ``windows``: a clip's 16-frame windows, masks and the loader half of the transforms;
- ``video_batch``: the device half, the whole batch in a fixed number of ops;
- ``augment``: the reference's fine-tuning augmentation.

Imports the shared base (``pipeline.config``, ``pipeline.layout``) and nothing else of ``pipeline``.
"""
