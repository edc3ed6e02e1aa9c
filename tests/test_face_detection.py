"""Face detection and tracking on real photographs in encoded clips: small faces, region hints, hard cuts."""

from pathlib import Path

import numpy as np
import pytest
from media import Portrait, Shot, cut_scene, scene, speech_wav, write_clip

from preprocessing.clip import load_clip_media, process_clip
from preprocessing.decode import MediaError, decode_video
from preprocessing.face import crop_transform
from preprocessing.face_detect import TILE_SIDE, FaceDetector, detect_frames, grid_tiles
from preprocessing.face_model import MODELS, ensure_face_models
from preprocessing.face_tracks import histogram_changes, link_tracks, main_track_geometry, shot_ids
from preprocessing.fileio import sha256_file
from preprocessing.manifest import ClipRecord, DatasetInfo
from preprocessing.settings import PreprocessSettings
from preprocessing.shards import decode_sample

SETTINGS = PreprocessSettings()
HD = (1280, 720)
DECODED = (854, 480)  # HD after decoding to max_short_side 480


@pytest.fixture(scope="module")
def detector():
    with FaceDetector.from_settings(SETTINGS) as face_detector:
        yield face_detector


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    return speech_wav(tmp_path_factory.mktemp("speech") / "speech.wav", "Where were you last night")


def crop_centres(geometry: np.ndarray) -> np.ndarray:
    """(T, 2): where each frame's crop centre lies in the frame (pixels)."""
    centres = []
    for row in geometry:
        to_frame = np.linalg.inv(np.vstack([crop_transform(row).astype(np.float64), [0, 0, 1]]))
        centres.append((to_frame @ [80, 80, 1])[:2])
    return np.array(centres)


def face_offsets(geometry: np.ndarray, portrait: Portrait, size: tuple[int, int], fps: float = 25) -> np.ndarray:
    """(T,) distance from each crop's centre to the portrait's face centre, in face widths."""
    scale = size[0] / HD[0] if size[0] < HD[0] else 1.0
    truth = np.array([portrait.face_centre(*size, t / fps) for t in range(len(geometry))])
    return np.linalg.norm(crop_centres(geometry) - truth, axis=1) / (portrait.face_px * scale)


def test_both_models_are_fetched_and_checked():
    paths = ensure_face_models()
    assert set(paths) == set(MODELS) == {"short_range", "full_range"}
    for name, path in paths.items():
        assert sha256_file(path) == MODELS[name].sha256


def test_grid_tiles_cover_the_frame_overlapping_by_half():
    tiles = grid_tiles((480, 854, 3))
    covered = np.zeros((480, 854), dtype=int)
    for x, y, side in tiles:
        assert side == TILE_SIDE and x + side <= 854 and y + side <= 480
        covered[y:y + side, x:x + side] += 1
    assert covered.min() >= 1
    assert grid_tiles((61, 97, 3)) == [(0, 0, 61), (30, 0, 61), (36, 0, 61)]  # smaller than a tile: short side


@pytest.mark.parametrize("face_px, x, y", [(24, 0.3, 0.45), (32, 0.75, 0.3)])
def test_small_face_in_hd_frame_is_found_and_the_crop_centred_on_it(tmp_path, speech, detector, face_px, x, y):
    portrait = Portrait("astronaut", face_px, x, y, drift=0.02)
    path = write_clip(tmp_path / "small.mp4", seconds=1.6, size=HD, speech=speech, frames=scene([portrait]))
    info = DatasetInfo(name="films", task="unlabelled")
    clip = ClipRecord(clip_id="small", video="small.mp4")
    sample = decode_sample(process_clip(tmp_path, info, clip, "small", SETTINGS, detector, {}))
    face = sample.meta["face"]
    assert face["fraction"] >= 0.9 and face["cuts"] == 0
    assert face["detector_frames"]["full_range_tiles"] >= 0.9 * face["frames"]
    assert set(face["detectors"]) <= {"t", "-"} and len(face["detectors"]) == sample.meta["num_frames"]
    assert face_px * 0.5 < face["side_px"]["median"] < face_px  # decoded at 480 lines: 2/3 of the HD size

    media = load_clip_media(path, path, None, None, SETTINGS, detector, {})
    offsets = face_offsets(media.geometry, portrait, DECODED)
    assert np.median(offsets) < 0.2 and offsets.max() < 0.4, offsets

    short_only = PreprocessSettings(face_detection="short_range")
    with FaceDetector.from_settings(short_only) as short_range, pytest.raises(MediaError, match="no_face"):
        load_clip_media(path, path, None, None, short_only, short_range, {})


def test_region_hint_picks_the_hinted_of_two_faces(tmp_path, speech, detector):
    astronaut = Portrait("astronaut", 80, 0.27, 0.5)
    hopper = Portrait("grace_hopper", 60, 0.73, 0.5)
    path = write_clip(tmp_path / "two.mp4", seconds=1.2, size=(640, 360), speech=speech,
                      frames=scene([astronaut, hopper]))
    largest = load_clip_media(path, path, None, None, SETTINGS, detector, {})
    hinted = load_clip_media(path, path, None, None, SETTINGS, detector, {}, region=(0.5, 0.0, 1.0, 1.0))
    assert largest.face.tracks == 2 and hinted.face.tracks == 1
    assert face_offsets(largest.geometry, astronaut, (640, 360)).max() < 0.3  # without a hint: the larger face
    assert face_offsets(hinted.geometry, hopper, (640, 360)).max() < 0.3
    with pytest.raises(MediaError, match=r"no face detected inside the region hint \[0.0, 0.0, 0.1, 0.1\]"):
        load_clip_media(path, path, None, None, SETTINGS, detector, {}, region=(0.0, 0.0, 0.1, 0.1))


@pytest.mark.parametrize("backgrounds", [(0, 1), (0, 0)], ids=["new background", "same background"])
def test_a_hard_cut_to_another_face_ends_the_track(tmp_path, speech, detector, backgrounds):
    astronaut = Portrait("astronaut", 90, 0.5, 0.5)
    hopper = Portrait("grace_hopper", 90, 0.5, 0.5)  # same place and size: box overlap alone would link them
    first, second = backgrounds
    path = write_clip(tmp_path / "cut.mp4", seconds=2.0, size=(640, 360), speech=speech,
                      frames=cut_scene([Shot(1.2, (astronaut,), first), Shot(2.0, (hopper,), second)]))
    video, _ = decode_video(path)
    shots = shot_ids(video.frames)
    assert shots.tolist() == [0] * 30 + [1] * 20
    detections = detect_frames(detector, video.frames)
    assert len(link_tracks(detections)) == 1  # without the cut, one track would jump to the other person

    geometry, stats = main_track_geometry(detections, shots=shots)
    assert stats.cuts == 1 and stats.tracks == 2
    assert stats.detected == 30 and stats.frames == 50 and stats.fraction == 0.6  # the rest counts as missing
    assert np.isfinite(stats.scores[:30]).all() and np.isnan(stats.scores[30:]).all()
    assert face_offsets(geometry[:30], astronaut, (640, 360)).max() < 0.3

    strict = PreprocessSettings(min_face_fraction=0.7)
    with pytest.raises(MediaError, match="a face in 30 of 50 frames"):
        load_clip_media(path, path, None, None, strict, detector, {})


def test_head_motion_and_a_flash_are_no_cuts(tmp_path):
    """The demo's fastest head motion (shaking, zooming a large face) and one over-exposed frame: one shot."""
    from preprocessing.datasets import demo

    (tmp_path / demo.CLIP_DIR).mkdir()
    one_per_motion = {plan.emotion: plan for plan in demo.plan_clips(seed=0, speakers=5, clips_per_speaker=2)}
    for plan in one_per_motion.values():
        demo.render_clip(plan, 0, tmp_path)
        video, _ = decode_video(tmp_path / demo.CLIP_DIR / f"{plan.clip}.mp4")
        assert (shot_ids(video.frames) == 0).all(), plan
    flashed = video.frames.copy()
    flashed[30] = np.clip(flashed[30].astype(int) + 120, 0, 255)
    assert histogram_changes(flashed)[29] > 0.3 and (shot_ids(flashed) == 0).all()


def test_region_hint_must_be_a_box_inside_the_frame():
    assert ClipRecord(clip_id="a", video="a.mp4", face_region=(0.5, 0, 1, 1)).face_region == (0.5, 0, 1, 1)
    with pytest.raises(ValueError, match="clip b: face_region"):
        ClipRecord(clip_id="b", video="b.mp4", face_region=(0.6, 0, 0.5, 1))


def test_region_hint_travels_with_the_work_unit():
    from preprocessing.units import WorkUnit

    unit = WorkUnit(0, "digest", [ClipRecord(clip_id="a", video="a.mp4", face_region=(0.5, 0.0, 1.0, 1.0))])
    assert WorkUnit.from_json(unit.to_json()).clips == unit.clips


def test_manifest_without_hints_is_written_as_before(tmp_path):
    from preprocessing.manifest import write_manifest

    info = DatasetInfo(name="x", task="unlabelled")
    path = write_manifest(tmp_path / "m.jsonl", info, [ClipRecord(clip_id="a", video="a.mp4")])
    assert Path(path).read_text() == '{"clip_id":"a","video":"a.mp4"}\n'
