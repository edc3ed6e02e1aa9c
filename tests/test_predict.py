"""Single-video prediction and model export, on real demo clips with a tiny fine-tuned model."""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from media import Portrait, scene, speech_wav, write_clip
from PIL import Image

from model import HiCMAEClassifier, get_config
from pipeline.config.training import WindowSettings
from pipeline.data.loaders import collate
from pipeline.data.video_batch import device_batch
from pipeline.data.windows import finetune_eval_examples
from pipeline.predict.preview import BOX_COLOURS
from pipeline.predict.video import load_model, names_option, predict
from pipeline.train.export import CARD_FILE, README_FILE, WEIGHTS_FILE, export_checkpoint, export_model, load_exported
from preprocessing.clip import process_clip
from preprocessing.datasets import demo
from preprocessing.decode import MediaError
from preprocessing.face_detect import FaceDetector
from preprocessing.manifest import ClipRecord, DatasetInfo
from preprocessing.settings import PreprocessSettings
from preprocessing.shards import decode_sample

FRAMES = round(demo.DURATION * demo.FPS)  # 70 frames of 256 x 256 per demo clip


@pytest.fixture(scope="module")
def demo_clips(tmp_path_factory) -> tuple[DatasetInfo, list[ClipRecord]]:
    """Two clips of the demo dataset (two speakers, two classes), rendered and encoded as the demo stage does."""
    root = tmp_path_factory.mktemp("demo")
    (root / demo.CLIP_DIR).mkdir()
    plans = demo.plan_clips(seed=0, speakers=5, clips_per_speaker=1)[:2]
    for plan in plans:
        demo.render_clip(plan, 0, root)
    info = DatasetInfo(name="demo", task="classification", classes=demo.CLASSES)
    clips = [ClipRecord(clip_id=p.clip, video=str(root / demo.CLIP_DIR / f"{p.clip}.mp4"),
                        label=demo.CLASSES.index(p.emotion)) for p in plans]
    return info, clips


@pytest.fixture(scope="module")
def fine_tuned(demo_clips, face_models, tmp_path_factory):
    """The clips preprocessed as the preprocess stage does, a tiny model fine-tuned for two steps on a window of
    each, and that model exported: (model, shard samples, export folder)."""
    info, clips = demo_clips
    with FaceDetector(face_models) as detector:
        samples = [decode_sample(process_clip(Path("/"), info, clip, clip.clip_id, PreprocessSettings(), detector, {}))
                   for clip in clips]
    batch = device_batch(collate([x for s in samples for x in finetune_eval_examples(s, 0, window=WindowSettings(),
                                                                                     views=1)]), "cpu")
    torch.manual_seed(0)
    net = HiCMAEClassifier(get_config("hicmae_test"), len(info.classes))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(2):
        loss = F.cross_entropy(net(batch["video"], batch["audio"]), batch["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    folder = export_model(net.state_dict(), net.cfg, info, {"test": {"uar": 0.5, "war": 0.5}}, "ab" * 32,
                          tmp_path_factory.mktemp("export") / "model", source="test fixture")
    return net, samples, folder


@pytest.fixture(scope="module")
def prediction(demo_clips, fine_tuned, tmp_path_factory) -> tuple[dict, Path]:
    info, clips = demo_clips
    out = tmp_path_factory.mktemp("predict")
    result = predict(Path(clips[0].video), fine_tuned[2], out=out / "result.json",
                     preview=out / "preview.png")
    return result, out


def test_result_json_has_the_clip_and_window_probabilities(prediction):
    result, out = prediction
    assert json.loads((out / "result.json").read_text()) == result
    assert result["task"] == "classification" and result["classes"] == demo.CLASSES
    assert result["model"]["data_hash"] == "ab" * 32 and result["model"]["metrics"]["test"]["uar"] == 0.5
    windows = result["windows"]
    assert [w["frames"] for w in windows] == [[0, 64], [FRAMES - 64, FRAMES]]  # two windows cover 70 frames
    assert windows[0]["start"] == 0.0 and windows[-1]["end"] == result["duration"] == demo.DURATION
    for output in [*windows, result["clip"]]:
        probabilities = np.array(list(output["probabilities"].values()))
        assert list(output["probabilities"]) == demo.CLASSES
        assert probabilities.sum() == pytest.approx(1.0, abs=1e-5) and (probabilities >= 0).all()
        assert output["label"] == demo.CLASSES[int(np.argmax(probabilities))]
    mean = np.mean([list(w["probabilities"].values()) for w in windows], axis=0)
    np.testing.assert_allclose(list(result["clip"]["probabilities"].values()), mean, atol=2e-6)


def test_face_track_covers_every_frame_inside_the_image(prediction):
    result, _ = prediction
    face, (width, height) = result["face"], result["frame_size"]
    assert (width, height) == (256, 256) and result["fps"] == 25
    assert face["frames"] == len(face["track"]) == FRAMES and face["fraction"] > 0.9
    assert [row["time"] for row in face["track"]] == [round(t / 25, 3) for t in range(FRAMES)]
    for row in face["track"]:
        x, y, w, h = row["box"]
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
        assert 0.2 * width < w < width and 0.2 * height < h < height  # the demo face fills about half the frame
        assert row["detected"] == (row["score"] is not None)
        assert row["detector"] == ("short_range" if row["detected"] else None)
    assert face["detector_frames"] == {"short_range": face["detected"], "full_range_tiles": 0}


def test_preview_marks_the_detector_of_each_frame(fine_tuned, tmp_path):
    """A distant face (28 px in a 1280x720 frame) is found by full range on tiles: its box is drawn blue, and the
    preview names the detector."""
    speech = speech_wav(tmp_path / "speech.wav", "Look over there")
    video = write_clip(tmp_path / "distant.mp4", seconds=1.0, size=(1280, 720), speech=speech,
                       frames=scene([Portrait("astronaut", 28, 0.4, 0.5)]))
    result = predict(video, fine_tuned[2], preview=tmp_path / "preview.mp4")
    detectors = {row["detector"] for row in result["face"]["track"]}
    assert detectors <= {"full_range_tiles", None} and result["face"]["detector_frames"]["full_range_tiles"] > 20
    t = next(t for t, row in enumerate(result["face"]["track"]) if row["detected"])
    with av.open(str(tmp_path / "preview.mp4")) as container:
        frame = list(container.decode(video=0))[t].to_ndarray(format="rgb24").astype(int)
    x, y, w, h = (round(v * 854 / 1280) for v in result["face"]["track"][t]["box"])  # preview: decoded 854x480
    edge = frame[y, x + w // 4:x + 3 * w // 4]  # the box's top edge
    blue = np.array(BOX_COLOURS["full_range_tiles"])
    assert np.abs(edge - blue).sum(axis=1).min() < 60


def test_windows_see_what_fine_tuning_evaluation_sees(prediction, fine_tuned):
    """The same windows from the preprocess stage's shard sample give the same outputs: one path, not two."""
    net, samples, _ = fine_tuned
    batch = device_batch(collate(finetune_eval_examples(samples[0], 0, window=WindowSettings(), views=2)), "cpu")
    with torch.no_grad():
        expected = net(batch["video"], batch["audio"]).softmax(-1).numpy()
    got = [list(w["probabilities"].values()) for w in prediction[0]["windows"]]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_png_preview_is_an_image(prediction):
    _, out = prediction
    with Image.open(out / "preview.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 600  # two window panels and the bar chart side by side
    assert pixels.std() > 20


def test_export_round_trip_gives_identical_logits(fine_tuned, demo_clips, tmp_path):
    net, _, folder = fine_tuned
    video, audio = torch.randn(2, 3, 16, 160, 160), torch.randn(2, 1, 256, 128)
    with torch.no_grad():
        expected = net(video, audio)
        for path in (folder, folder / WEIGHTS_FILE):
            loaded, card = load_exported(path)
            assert torch.equal(loaded(video, audio), expected)
    assert card["classes"] == demo.CLASSES and card["task"] == "classification"
    assert card["config"] == json.loads(json.dumps(net.cfg.to_dict()))
    assert card["window"] == WindowSettings().model_dump() and card["preprocess"]["fps"] == 25
    readme = (folder / README_FILE).read_text()
    assert "neutral, happy, angry, sad" in readme and "hicmae predict" in readme and "| test/uar | 0.5 |" in readme

    other = shutil.copytree(folder, tmp_path / "other")
    export_model(HiCMAEClassifier(net.cfg, 4).state_dict(), net.cfg, demo_clips[0], {}, None, tmp_path / "x")
    shutil.copy(tmp_path / "x" / WEIGHTS_FILE, other / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="does not match"):
        load_exported(other)
    (other / CARD_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=CARD_FILE):
        load_exported(other)


def test_export_checkpoint_takes_the_best_epoch(fine_tuned, demo_clips, tmp_path):
    """What the fine-tuning stage does after each fold: the Ray checkpoint's best weights, exported."""
    net, _, _ = fine_tuned
    last = HiCMAEClassifier(net.cfg, 4).state_dict()
    torch.save({"model": last, "best": {"model": net.state_dict(), "epoch": 2, "score": 0.75},
                "config": net.cfg.to_dict(), "epoch": 4}, tmp_path / "state.pt")
    (tmp_path / "test_metrics.json").write_text(json.dumps({"best": {"uar": 0.6}, "last": {"uar": 0.4}}))
    folder = export_checkpoint(tmp_path, demo_clips[0], tmp_path / "model", data_hash="cd" * 32, name="demo-fold1",
                               source="demo fine-tuning, test fold 1", window=WindowSettings(sampling_rate=3))
    loaded, card = load_exported(folder)
    video, audio = torch.randn(1, 3, 16, 160, 160), torch.randn(1, 1, 256, 128)
    with torch.no_grad():
        assert torch.equal(loaded(video, audio), net(video, audio))
    assert card["metrics"] == {"epoch": 2, "validation_score": 0.75, "test": {"uar": 0.6}}
    assert card["name"] == "demo-fold1" and card["window"]["sampling_rate"] == 3 and card["data_hash"] == "cd" * 32
    again = export_checkpoint(tmp_path, demo_clips[0], tmp_path / "again" / "model", data_hash="cd" * 32,
                              name="demo-fold1", source="demo fine-tuning, test fold 1",
                              window=WindowSettings(sampling_rate=3))
    for name in ("model.safetensors", "model_card.json", "README.md"):  # no time stamp, host or absolute path
        assert (folder / name).read_bytes() == (again / name).read_bytes(), name


def test_regression_model_predicts_target_values(demo_clips, fine_tuned, tmp_path):
    info, clips = demo_clips
    net, _, _ = fine_tuned
    targets = ["valence", "arousal", "dominance"]
    regression = DatasetInfo(name="werewolf", task="regression", targets=targets)
    torch.manual_seed(1)
    folder = export_model(HiCMAEClassifier(net.cfg, 3).state_dict(), net.cfg, regression, {}, None, tmp_path / "m")
    result = predict(Path(clips[1].video), folder, preview=tmp_path / "preview.png")
    assert result["task"] == "regression" and result["targets"] == targets and "classes" not in result
    assert [list(w["values"]) for w in result["windows"]] == [targets] * 2 and "probabilities" not in result["clip"]
    mean = np.mean([list(w["values"].values()) for w in result["windows"]], axis=0)
    np.testing.assert_allclose(list(result["clip"]["values"].values()), mean, atol=2e-6)
    assert (tmp_path / "preview.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def reference_checkpoint(fine_tuned, tmp_path_factory) -> Path:
    """The tiny model saved as a reference fine-tuning checkpoint: state dict under 'model', args Namespace
    (whose architecture, that of hicmae_test, overrides the size given when loading it)."""
    net, _, _ = fine_tuned
    args = argparse.Namespace(model="avit_dim32_patch16_160_a256", data_set="DEMO", nb_classes=4, embed_dim=32,
                              num_heads=1, embed_dim_audio=32, num_heads_audio=1, fusion_num_heads=1, depth=3,
                              depth_audio=3, fusion_depth=1, return_intermediate_features=[0, 1, 2],
                              decoder_embed_dim=16, decoder_num_heads=1, decoder_embed_dim_audio=16,
                              decoder_num_heads_audio=1, num_frames=16, sampling_rate=4, drop_path=0.1)
    path = tmp_path_factory.mktemp("reference") / "checkpoint-best.pth"
    torch.save({"model": net.state_dict(), "epoch": 9, "args": args}, path)
    return path


def test_reference_checkpoint_loads_with_size_and_classes(fine_tuned, reference_checkpoint):
    net, _, _ = fine_tuned
    classes, targets = names_option("demo", None)
    assert classes == demo.CLASSES and targets is None
    assert names_option(None, "werewolf-xl") == (None, ["valence", "arousal", "dominance"])
    loaded, card = load_model(reference_checkpoint, "hicmae_tiny", classes)
    video, audio = torch.randn(1, 3, 16, 160, 160), torch.randn(1, 1, 256, 128)
    with torch.no_grad():
        assert torch.equal(loaded(video, audio), net(video, audio))
    assert card["classes"] == demo.CLASSES and card["window"] == WindowSettings().model_dump()
    with pytest.raises(ValueError, match="needs --size and --classes"):
        load_model(reference_checkpoint, None, classes)
    with pytest.raises(ValueError, match="does not fit a hicmae_tiny model with 6 outputs"):
        load_model(reference_checkpoint, "hicmae_tiny", ["a", "b", "c", "d", "e", "f"])


def test_unreadable_file_and_video_without_a_face_give_clear_errors(fine_tuned, tmp_path):
    notes = tmp_path / "notes.mp4"
    notes.write_text("not a video\n")
    with pytest.raises(MediaError, match="notes.mp4") as error:
        predict(notes, fine_tuned[2])
    assert error.value.reason == "unreadable"
    wall = write_clip(tmp_path / "wall.mp4", seconds=1.0, face=False, speech=speech_wav(tmp_path / "speech.wav"))
    with pytest.raises(MediaError, match="wall.mp4: no_face") as error:
        predict(wall, fine_tuned[2])
    assert error.value.reason == "no_face"


def _hicmae(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("hicmae")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_predicts_with_a_reference_checkpoint_and_writes_an_mp4(demo_clips, reference_checkpoint, prediction,
                                                                    tmp_path):
    info, clips = demo_clips
    video = Path(clips[0].video)
    done = _hicmae("predict", str(video), "--model", str(reference_checkpoint), "--size", "hicmae_tiny",
                   "--classes", "demo", "--out", "result.json", "--preview", "preview.mp4",
                   "--embeddings", "embeddings.parquet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    embeddings = pq.read_table(tmp_path / "embeddings.parquet").to_pylist()
    assert [(row["id"], len(row["video"]), len(row["fused"])) for row in embeddings] == [(str(video), 32, 128)]
    assert done.stdout.startswith(f"{video.name}: {result['clip']['label']} ")
    # the same weights as the exported model: the same prediction
    np.testing.assert_allclose(list(result["clip"]["probabilities"].values()),
                               list(prediction[0]["clip"]["probabilities"].values()), atol=1e-5)
    with av.open(str(tmp_path / "preview.mp4")) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == FRAMES and frames[0].shape == (256, 256, 3)


def test_cli_reports_an_unreadable_file_in_one_line(fine_tuned, tmp_path):
    (tmp_path / "notes.mp4").write_text("not a video\n")
    done = _hicmae("predict", "notes.mp4", "--model", str(fine_tuned[2]), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert "notes.mp4: unreadable" in done.stderr
