"""The schema of ``params.yaml`` and ``conf/``: pydantic models are the schema, the YAML files hold the values.

One schema in three modules, split by which stages read them, so that a stage's code deps (``dvc.yaml``) are only
the sections it reads:
- ``params``: reading the files, ``--set`` overrides, one-line errors, and the sections every stage reads (data,
  datasets, preprocessing, scaling, progress);
- ``training``: the training sections (model, window, optimiser, pre-training, fine-tuning), checked against the
  model library's sizes; the data stages never import it;
- ``augment``: the fine-tuning augmentation's knobs and RandAugment spec strings.
"""
