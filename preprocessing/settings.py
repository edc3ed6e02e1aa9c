"""Preprocessing settings: what shapes the output (hashed for resuming) and how the run is executed."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Fields that only change how a run executes, not what it writes; left out of the work-unit hash.
EXECUTION_FIELDS = {"workers", "cpus_per_worker", "use_ray", "face_models", "progress"}


class PreprocessSettings(BaseModel):
    """Settings of ``preprocess``; invalid values fail at construction naming the field."""

    model_config = ConfigDict(extra="forbid")

    fps: float = Field(25.0, gt=0, description="output video frame rate")
    min_face_fraction: float = Field(0.5, ge=0, le=1, description="fewer frames with a face: no_face")
    min_duration: float = Field(0.3, gt=0, description="shorter clips fail as too_short (seconds)")
    shard_size: int = Field(64, ge=1, description="clips per work unit and shard")
    shard_seed: int = Field(0, description="seeds the pseudo-random order in which clips are put into shards")
    crop_size: int = Field(160, ge=16, description="side of the aligned face crops")
    jpeg_quality: int = Field(90, ge=1, le=100)
    detect_long_side: int = Field(1280, ge=64, description="frames with a longer side are downscaled for "
                                  "detection (the detector resamples to 128x128 itself)")
    detect_every: int = Field(1, ge=1, description="run the detector on every n-th frame, interpolate between")
    face_detection: Literal["short_then_full_range", "short_range"] = Field(
        "short_then_full_range", description="short range on the whole frame, then full range on tiles where "
        "it finds no face (small, distant faces); or short range only")
    max_short_side: int = Field(480, ge=64, description="decoded frames are downscaled to this")
    min_detection_confidence: float = Field(0.5, gt=0, lt=1)
    smooth_frames: int = Field(5, ge=1, description="moving-average window for face boxes and keypoints")
    face_models: str | None = Field(None, description="folder of the face detector .tflite files; None: "
                                    "$HICMAE_FACE_MODELS or the cache")
    workers: int | None = Field(None, ge=1, description="parallel worker processes; None: one per CPU of "
                                 "the Ray cluster")
    cpus_per_worker: float = Field(0.5, gt=0, description="Ray CPUs each worker claims")
    use_ray: bool = Field(True, description="False: process units in this process (debugging)")
    progress: bool = True

    def output_fingerprint(self) -> dict:
        """The settings that change the output, for the work-unit hash."""
        return self.model_dump(exclude=EXECUTION_FIELDS)
