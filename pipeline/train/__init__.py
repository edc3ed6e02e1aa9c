"""Training: the loop both stages share, the two training stages and what they are made of.

- ``loop``: the epoch loop, the training step, checkpoints and history (``fit``);
- ``compiled``: ``scaling.compile``, precision (``autocast``) and ``unwrap``, shared with evaluation and prediction;
- ``optim``, ``losses``: AdamW with layer decay and the schedule; the fine-tuning criteria;
- ``raytrain``, ``rendezvous``: Ray Train runs and checkpoints; the loopback rendezvous;
- ``evaluation``: per-clip outputs over views, the test files (also prediction's forward);
- ``verify``: ``hicmae verify``, a model's test metrics computed again and compared with its card;
- ``export``: exported models (the Hub's layout), loading them by folder or repo id, and ``hicmae export``;
- ``hub``: Hugging Face Hub repo ids, the Hub's cache, and what the Hub reads of a model (config, metadata);
- ``pretrain``: the pre-training stage and task; ``finetune``: the fine-tuning stage over a dataset's folds;
  ``finetune_fold``: one fold's task;
- ``op_count``: aten ops a step dispatches (a proxy for GPU kernel launches).

Imports the shared base and ``pipeline.data``; never ``pipeline.predict``.
"""
