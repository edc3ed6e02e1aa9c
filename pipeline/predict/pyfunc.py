"""An exported model as an MLflow pyfunc model: a table of videos in, the rows ``hicmae predict`` writes out.

    model = mlflow.pyfunc.load_model("models:/hicmae-demo@best")
    rows = model.predict(pandas.DataFrame({"path": ["a.mp4", "b.mp4"], "start": [None, 2.0], "end": [None, 5.5]}))
    rows[0].clip.label, rows[0].clip.probabilities      # PredictionRow: .model_dump() is the table's JSONL row

Each input row is a video file (``path``, and optionally a segment in seconds: ``start``, ``end``); each output row is
that input's row of ``pipeline.predict.many.predict_many`` (Ray Data: decoding, faces, the model's windows), a failed
input's row naming its problem in ``status``. The model signature comes from these type hints (``VideoClip`` in,
``PredictionRow`` out). The exported folder travels as the pyfunc's artifact (``registry.MODEL_ARTIFACT``).

``pipeline.registry`` logs this file as code (MLflow's models from code): it runs on its own when a model is logged
or loaded, hence the absolute imports; it needs this project installed where the model is loaded.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel
from pydantic import BaseModel

from pipeline.predict.inputs import file_input
from pipeline.predict.many import predict_many
from pipeline.registry import MODEL_ARTIFACT


class VideoClip(BaseModel):
    """An input row: a video file (absolute, or relative to the working folder), optionally a segment (seconds)."""

    path: str
    start: float | None = None
    end: float | None = None


class Output(BaseModel):
    """A clip's (or a window's) output: class probabilities and the label, or regression target values."""

    probabilities: dict[str, float] | None = None
    label: str | None = None
    values: dict[str, float] | None = None


class WindowOutput(Output):
    """One evaluation window: its time span (s), its frames [first, end) and its output."""

    start: float
    end: float
    frames: list[int]


class FaceSummary(BaseModel):
    """The clip's face detection in numbers (``pipeline.predict.video.face_summary``)."""

    frames: int
    detected: int
    fraction: float
    tracks: int
    cuts: int
    detector_frames: dict[str, int]


class PredictionRow(BaseModel):
    """An input's row of the predictions table (``pipeline.predict.many``): ``status`` "ok" with its outputs, or
    the failure (``no_face: ...``, ``unreadable: ...``) with none; ``model``: the weights' sha256."""

    id: str
    path: str
    start: float | None = None
    end: float | None = None
    status: str
    fps: float | None = None
    duration: float | None = None
    face: FaceSummary | None = None
    windows: int
    clip: Output | None = None
    window_outputs: list[WindowOutput] | None = None
    seconds: dict[str, float] | None = None
    model: str


class EmotionModel(PythonModel):
    """The pyfunc: ``predict_many`` with the exported folder it carries."""

    def load_context(self, context) -> None:
        self.folder = context.artifacts[MODEL_ARTIFACT]

    def predict(self, context, model_input: list[VideoClip], params=None) -> list[PredictionRow]:
        """The prediction rows of the input rows, in their order (on the GPUs where Ray finds any)."""
        inputs = [file_input(clip.path, clip.start, clip.end) for clip in model_input]
        rows = predict_many(inputs, self.folder, progress=False)
        return [PredictionRow.model_validate(row) for row in rows]


mlflow.models.set_model(EmotionModel())
