"""The report stage on tiny fold results written by the fine-tuning code's own writers.

A tiny real model evaluates tiny test folds with ``test_files`` (the predictions, metrics and embeddings a fold
writes); histories go through ``history.history_csv`` and summaries through ``aggregate_folds``, as in the
stages; crema-d's processed data is real: clips of a real face photo with speech, preprocessed. Then
``stage_report`` runs against a real ``mlflow server`` and ``dvc plots show`` renders the result.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from matplotlib.image import imread
from media import speech_wav, write_clip

import model
from pipeline import face_report, layout, report
from pipeline.config.params import DatasetEntry
from pipeline.config.training import Params
from pipeline.data.loaders import collate
from pipeline.data.video_batch import device_batch, video_fields
from pipeline.history import history_csv, read_history
from pipeline.metrics import aggregate_folds
from pipeline.plots import embedding_maps_figure
from pipeline.train import evaluation
from pipeline.train import finetune as folds
from pipeline.train.evaluation import clip_outputs
from preprocessing.fileio import write_json
from preprocessing.manifest import ClipRecord, DatasetInfo, write_manifest
from preprocessing.run import preprocess
from preprocessing.settings import PreprocessSettings

ROOT = Path(__file__).resolve().parents[1]
SMALL_INPUTS = dict(img_size=32, num_frames=4, audio_frames=32, audio_mel_bins=32)  # the shapes of eval_batches
FOLDS = (1, 2)
CLIPS_PER_FOLD, VIEWS, BATCH = 6, 2, 4
PROCESSED_CLIPS = 10  # preprocessed crema-d clips: more than a contact sheet shows
DATASETS = {
    "crema-d": DatasetInfo(name="crema-d", task="classification",
                           classes=["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"], num_folds=5),
    "werewolf-xl": DatasetInfo(name="werewolf-xl", task="regression",
                               targets=["valence", "arousal", "dominance"], num_folds=5),
}


def tiny_net(info: DatasetInfo, seed: int) -> model.HiCMAEClassifier:
    torch.manual_seed(seed)
    outputs = len(info.classes) if info.task == "classification" else len(info.targets)
    return model.create_finetune_model("hicmae_test", outputs, **SMALL_INPUTS).eval()


def eval_batches(info: DatasetInfo, fold: int) -> list[dict]:
    """CLIPS_PER_FOLD clips, VIEWS views each, in batches of BATCH: what the evaluation loader yields (uint8 frames
    with their geometry, ``video_batch.video_fields``)."""
    rng = np.random.default_rng(fold)
    views = [(f"f{fold}-clip{c}", c) for c in range(CLIPS_PER_FOLD) for _ in range(VIEWS)]
    batches = []
    for start in range(0, len(views), BATCH):
        examples = []
        for clip_id, c in views[start:start + BATCH]:
            example = {**video_fields(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)),
                       "audio": rng.standard_normal((1, 32, 32), dtype=np.float32), "clip_id": clip_id}
            if info.task == "classification":
                example["label"] = c % len(info.classes)
            else:
                example["targets"] = np.array([c / 5, 1 - c / 5, 0.5], dtype=np.float32)
            examples.append(example)
        batches.append(collate(examples))
    return batches


def epoch_history(info: DatasetInfo, fold: int, epochs: int = 4) -> list[dict]:
    """Per-epoch metrics shaped as the fine-tuning loop reports them."""
    val = ["uar", "war", "f1_weighted"] if info.task == "classification" else ["ccc_mean", "pcc_mean"]
    return [{"epoch": e, "train/loss": 2.0 / (e + fold), "lr": 1e-3 * (epochs - e) / epochs, "samples_per_s": 8.0,
             **{f"val/{name}": 0.2 + 0.1 * e for name in val}} for e in range(epochs)]


def write_dataset_results(runs: Path, info: DatasetInfo) -> dict:
    """runs/<dataset>/: the fold files as fine-tuning writes them, metrics.json and finetune/info.json."""
    out = runs / info.name / "finetune"
    per_fold = {}
    for fold in FOLDS:
        net = tiny_net(info, seed=fold)
        best = {"epoch": 2, "model": tiny_net(info, seed=10 + fold).state_dict()}
        files = evaluation.test_files(net, best, eval_batches(info, fold), torch.device("cpu"), info)
        files[layout.HISTORY_FILE] = history_csv(epoch_history(info, fold))
        (out / f"fold-{fold}").mkdir(parents=True)
        for name, payload in files.items():
            (out / f"fold-{fold}" / name).write_bytes(payload)
        per_fold[fold] = json.loads(files["test_metrics.json"])
    summary = {"folds": list(FOLDS), "last": aggregate_folds([per_fold[f]["last"] for f in FOLDS]),
               "best": aggregate_folds([per_fold[f]["best"] for f in FOLDS])}
    write_json(runs / info.name / "metrics.json", summary)
    write_json(out / layout.INFO_FILE, folds.describe_dataset(info, "clean"))
    return summary


def preprocess_clips(media: Path, processed: Path) -> dict:
    """PROCESSED_CLIPS short clips of the astronaut photo with speech, preprocessed; returns the summary."""
    speech = speech_wav(media / "speech.wav", "It is eleven o'clock")
    clips = [ClipRecord(clip_id=f"clip{i:02d}", video=write_clip(media / f"clip{i:02d}.mp4", seconds=0.5,
                                                                 size=(192, 144), speech=speech).name)
             for i in range(PROCESSED_CLIPS)]
    manifest = write_manifest(media / "manifest.jsonl", DatasetInfo(name="crema-d", task="unlabelled"), clips)
    return preprocess(manifest, processed, media, PreprocessSettings(use_ray=False, progress=False))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-work")
    summaries = {name: write_dataset_results(root / "runs", info) for name, info in DATASETS.items()}
    preprocess_clips(tmp_path_factory.mktemp("crema-d-media"), root / "data" / "crema-d" / "processed")
    pretrain = [{"train/loss": 1 / (e + 1), "train/loss_video": 0.6 / (e + 1), "train/loss_audio": 0.4 / (e + 1),
                 "train/loss_contrastive": 0.01, "epoch": e, "lr": 1e-3, "samples_per_s": 5.0} for e in range(3)]
    (root / "runs" / "pretrain").mkdir(parents=True)
    (root / "runs" / "pretrain" / layout.HISTORY_FILE).write_bytes(history_csv(pretrain))
    return root, summaries


@pytest.fixture(scope="module")
def reported(workspace, mlflow_server):
    """``stage_report`` run once on the workspace, tracked in the test server; its returned Markdown."""
    root, summaries = workspace
    params = Params(datasets={name: DatasetEntry(root=f"/data/{name}") for name in DATASETS},
                    experiment="report-test")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        patch.setenv("HICMAE_WORKDIR", str(root))
        markdown = report.stage_report(params)
    return root, summaries, markdown


def test_clip_outputs_collect_view_averaged_embeddings_in_the_one_forward_per_batch():
    info = DATASETS["crema-d"]
    net, loader = tiny_net(info, seed=0), eval_batches(info, fold=1)
    calls = []
    original = net.forward_features
    net.forward_features = lambda *inputs: calls.append(1) or original(*inputs)
    predictions = clip_outputs(net, loader, torch.device("cpu"), info.task, embeddings=True)
    assert len(calls) == len(loader)  # one forward per batch, embeddings included

    net.forward_features = original
    assert list(predictions["clip_id"]) == [f"f1-clip{c}" for c in range(CLIPS_PER_FOLD)]
    with torch.no_grad():  # clip 0's two views are the first two rows of the first batch
        first = device_batch(loader[0], "cpu")
        features = net.forward_features(first["video"][:2], first["audio"][:2])
        probs = net.head_output(features).softmax(-1)
    np.testing.assert_allclose(predictions["output"][0], probs.mean(0).numpy(), atol=1e-6)
    for name, expected in (("video", features.weighted["video"]), ("audio", features.weighted["audio"]),
                           ("fused", features.embedding)):
        assert predictions[f"embedding/{name}"].shape == (CLIPS_PER_FOLD, expected.shape[1])
        np.testing.assert_allclose(predictions[f"embedding/{name}"][0], expected.mean(0).numpy(), atol=1e-6)
    assert "embedding/video" not in clip_outputs(net, loader, torch.device("cpu"), info.task)


def test_fold_files_hold_embeddings_and_history(workspace):
    root, _ = workspace
    fold = root / "runs" / "werewolf-xl" / "finetune" / "fold-1"
    embeddings = report.read_embeddings([fold / layout.EMBEDDINGS_FILE])
    assert sorted(embeddings) == ["audio", "clip_id", "fused", "truth", "video"]
    assert embeddings["fused"].shape == (CLIPS_PER_FOLD, 4 * 32) and embeddings["fused"].dtype == np.float32
    assert embeddings["truth"].shape == (CLIPS_PER_FOLD, 3)
    history = read_history(fold / layout.HISTORY_FILE)
    assert [row["epoch"] for row in history] == [0, 1, 2, 3] and history[0]["val/ccc_mean"] == pytest.approx(0.2)


def test_tsne_of_the_tiny_embeddings(workspace):
    root, _ = workspace
    folder = root / "runs" / "crema-d" / "finetune"
    embeddings = report.read_embeddings([folder / f"fold-{f}" / layout.EMBEDDINGS_FILE for f in FOLDS])
    figure = embedding_maps_figure({name: embeddings[name] for name in ("video", "audio", "fused")},
                                   embeddings["truth"], DATASETS["crema-d"].classes)
    count = len(FOLDS) * CLIPS_PER_FOLD
    assert [ax.get_title() for ax in figure.axes] == [f"{name} (t-SNE, {count} clips)"
                                                      for name in ("video", "audio", "fused")]
    points = np.concatenate([collection.get_offsets() for collection in figure.axes[2].collections])
    assert points.shape == (count, 2) and np.isfinite(points).all()


def test_results_tables_hold_ours_the_paper_and_avf_mae(reported):
    root, summaries, markdown = reported
    assert (root / "reports" / "results.md").read_text() == markdown
    crema = summaries["crema-d"]
    uar = f"{100 * crema['best']['uar_mean']:.2f} ± {100 * crema['best']['uar_std']:.2f}"
    last_uar = f"{100 * crema['last']['uar_mean']:.2f} ± {100 * crema['last']['uar_std']:.2f}"
    assert f"| crema-d | uar | 2 | {uar} | {last_uar} | 84.91 | 86.02 |" in markdown
    assert "| HiCMAE-B (paper) | AVF-MAE++ (CVPR 2025) |" in markdown
    assert "| werewolf-xl | pcc/valence | 2 |" in markdown and "| 69.23 | — |" in markdown

    results = json.loads((root / "reports" / "results.json").read_text())
    assert results["crema-d"]["war"] == {
        "folds": 2, "best_mean": pytest.approx(100 * crema["best"]["war_mean"]),
        "best_std": pytest.approx(100 * crema["best"]["war_std"]),
        "last_mean": pytest.approx(100 * crema["last"]["war_mean"]),
        "last_std": pytest.approx(100 * crema["last"]["war_std"]), "hicmae_b": 84.89, "avf_mae_pp": 85.95}
    werewolf = results["werewolf-xl"]
    assert werewolf["ccc/dominance"]["hicmae_b"] == 37.54 and werewolf["ccc/dominance"]["avf_mae_pp"] is None
    assert werewolf["ccc_mean"]["best_mean"] == pytest.approx(100 * summaries["werewolf-xl"]["best"]["ccc_mean_mean"])
    assert "uar" not in werewolf


def test_every_plot_exists_and_decodes(reported):
    root, _, markdown = reported
    plots = root / "reports" / "plots"
    expected = {"crema-d/confusion.png", "crema-d/embeddings.png", "crema-d/curves.png", "crema-d/faces.png",
                "werewolf-xl/embeddings.png", "werewolf-xl/curves.png", "pretrain/curves.png"}
    assert {p.relative_to(plots).as_posix() for p in plots.rglob("*.png")} == expected
    for name in expected:
        image = imread(plots / name)
        assert image.ndim == 3 and min(image.shape[:2]) >= 300 and image[..., :3].std() > 0.05
        assert f"(plots/{name})" in markdown
    assert imread(plots / "crema-d/embeddings.png").shape[:2] == (500, 1800)  # video, audio, fused panels

    with open(root / "reports" / "curves" / "finetune" / "crema-d" / "fold-2.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "train/loss", "val/score"] and len(rows) == 4
    assert float(rows[3]["val/score"]) == pytest.approx(0.5)  # the selection metric, validation UAR
    assert (root / "reports" / "curves" / "pretrain.csv").read_bytes() == \
        (root / "runs" / "pretrain" / layout.HISTORY_FILE).read_bytes()


def test_report_run_in_mlflow_has_the_artifacts(reported, mlflow_server):
    experiment = mlflow_server.get("experiments/get-by-name", experiment_name="report-test")["experiment"]
    runs = mlflow_server.post("runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    (run,) = [r for r in runs if r["info"]["run_name"] == "report"]
    run_id = run["info"]["run_id"]

    def listed(path: str = "") -> set[str]:
        return {f["path"] for f in mlflow_server.get("artifacts/list", run_id=run_id, path=path).get("files", [])}

    assert {"results.md", "results.json", "results.csv", "plots", "curves"} <= listed()
    assert listed("plots/crema-d") == {f"plots/crema-d/{n}.png"
                                       for n in ("confusion", "embeddings", "curves", "faces")}
    assert listed("plots/werewolf-xl") == {"plots/werewolf-xl/embeddings.png", "plots/werewolf-xl/curves.png"}
    assert "curves/pretrain.csv" in listed("curves")
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["crema-d/uar"] == pytest.approx(json.loads(
        (reported[0] / "reports" / "results.json").read_text())["crema-d"]["uar"]["best_mean"])


def test_dvc_plots_show_renders_the_declared_plots(reported, tmp_path):
    root, _, _ = reported
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"plots": declared}))
    shutil.copytree(root / "reports", tmp_path / "reports")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)
    shown = subprocess.run([*dvc, "plots", "show", "--json"], cwd=tmp_path, env=env, check=True,
                           capture_output=True, text=True)
    rendered = json.loads(shown.stdout)["data"]  # plot id -> [{"type": "image" | "vega", ...}]
    kinds = {name: entries[0]["type"] for name, entries in rendered.items()}
    pngs = {p.relative_to(tmp_path).as_posix() for p in (tmp_path / "reports" / "plots").rglob("*.png")}
    assert len(pngs) == 7 and all(kinds[name] == "image" for name in pngs)
    fold_curve = "reports/curves/finetune/werewolf-xl/fold-1.csv"
    assert kinds[fold_curve] == kinds["reports/curves/pretrain.csv"] == "vega"
    values = rendered[fold_curve][0]["content"]["data"]["values"]
    assert {row["field"] for row in values} == {"train/loss", "val/score"}
    assert "could not find provided field" not in shown.stderr


def test_face_statistics_and_contact_sheet_of_the_preprocessed_clips(reported, tmp_path):
    root, _, markdown = reported
    processed = root / "data" / "crema-d" / "processed"
    face = json.loads((processed / "summary.json").read_text())["face"]
    assert face["clips"] == PROCESSED_CLIPS and face["detected"] == 1.0 and face["detectors"]["short_range"] == 1.0
    assert f"| crema-d | {PROCESSED_CLIPS} | {face['frames']} | 100.0 % | 0.0 % | 100.0 % | 0.0 % |" in markdown
    assert "| werewolf-xl |" not in markdown.split("## Face detection")[1].split("##")[0]  # not preprocessed here

    sheet = imread(root / "reports" / "plots" / "crema-d" / "faces.png")[..., :3]
    rows_with_crops = (sheet.std(axis=(1, 2)) > 0.1).reshape(-1)
    assert sheet.shape[0] == round(100 * (0.4 + 1.25 * face_report.FACE_SHEET_CLIPS)) and rows_with_crops.any()
    again = face_report.face_sheet("crema-d", processed, tmp_path / "same")
    other = face_report.face_sheet("crema-d", processed, tmp_path / "other", seed=1)
    assert again.read_bytes() == (root / "reports" / "plots" / "crema-d" / "faces.png").read_bytes()
    assert other.read_bytes() != again.read_bytes()  # another draw of 8 of the 10 clips


def test_missing_results_name_the_file_and_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"runs/crema-d/metrics.json: missing; run `hicmae finetune"):
        report.write_report(["crema-d"], layout.Layout(tmp_path))
