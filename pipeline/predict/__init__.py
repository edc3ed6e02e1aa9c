"""Prediction: any video -> emotions, with a model exported by training.

- ``video``: one video (its face track, windows, clip prediction) and the model loading both paths share;
- ``many``: many videos on Ray Data into one resumable table (``hicmae predict``);
- ``inputs``: files, folders and clip lists as inputs; ``table``: the prediction table and embeddings;
- ``preview``: the preview picture or video;
- ``pyfunc``: an exported model as an MLflow pyfunc model (what ``pipeline.registry`` logs and registers).

Imports the shared base, ``pipeline.data`` and, of ``pipeline.train``, only ``evaluation``, ``export`` and
``compiled`` (never the training loop, Ray Train or the optimiser).
"""

from .many import predict_many
from .video import predict

__all__ = ["predict", "predict_many"]
