"""The custom dataset: a clip list (CSV or JSONL, named columns) checked as a whole, folds made or taken, and its
clips through preprocessing like any dataset's (real media from tests/media.py)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from media import speech_wav, write_clip

from pipeline.config.params import CUSTOM_ADAPTER, PROJECT_ROOT, ConfigError, load_dataset_config
from preprocessing.datasets import DatasetLayoutError, build_manifest, custom
from preprocessing.datasets.clip_list import SHOWN_PROBLEMS
from preprocessing.manifest import write_manifest
from preprocessing.run import preprocess
from preprocessing.settings import PreprocessSettings


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def write_list(path: Path, header: str, *rows: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def problems(err: pytest.ExceptionInfo) -> list[str]:
    return str(err.value).splitlines()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """A dataset folder of real clips: one in a folder with a space in its name, one without an audio stream."""
    root = tmp_path_factory.mktemp("mine")
    speech = speech_wav(root / "speech.wav", "I did not expect to see you here")
    write_clip(root / "my clips" / "first take.mp4", seconds=1.2, speech=speech)
    write_clip(root / "clips" / "second.mp4", seconds=1.2, speech=speech)
    write_clip(root / "clips" / "third.mp4", seconds=1.2, speech=speech)
    write_clip(root / "clips" / "silent.mp4", seconds=1.2, speech=None)
    return root


def test_a_list_is_checked_as_a_whole_and_its_clips_become_status_rows(media, tmp_path):
    """Spaces in a path, a path relative to the list's folder and a file without sound are fine for the manifest; a
    missing file, an unknown label and a clip listed twice are the errors, one line each with the list's line."""
    listed = write_list(media / "lists" / "all.csv", "path,label,speaker",
                        '"../my clips/first take.mp4",happy,anna',   # line 2: spaces, relative to lists/
                        "../clips/second.mp4,sad,ben",                # line 3
                        f"{media}/clips/silent.mp4,sad,anna",          # line 4: absolute, no audio stream
                        "../clips/missing.mp4,happy,ben",             # line 5
                        "../clips/third.mp4,hapy,ben",                # line 6
                        "./../clips/./second.mp4,sad,ben")            # line 7: the same file as line 3
    with pytest.raises(DatasetLayoutError) as err:
        build_manifest(CUSTOM_ADAPTER, media, list_file="lists/all.csv", dataset="mine", classes=["happy", "sad"],
                       folds=2)
    assert problems(err) == [f"{listed}:5: no such file: '../clips/missing.mp4'",
                             f"{listed}:6: unknown label 'hapy' (classes: happy, sad)",
                             f"{listed}:7: duplicate of line 3: './../clips/./second.mp4'"]

    write_list(listed, "path,label,speaker", *listed.read_text().splitlines()[1:4])
    info, clips = build_manifest(CUSTOM_ADAPTER, media, list_file="lists/all.csv", dataset="mine",
                                 classes=["happy", "sad"], folds=2)
    assert info.name == "mine" and info.classes == ["happy", "sad"] and info.num_folds == 2
    assert [(c.clip_id, c.video, c.label, c.speaker) for c in clips] == [
        ("clips/second.mp4", "clips/second.mp4", 1, "ben"), ("clips/silent.mp4", "clips/silent.mp4", 1, "anna"),
        ("my clips/first take.mp4", "my clips/first take.mp4", 0, "anna")]
    assert {c.fold for c in clips if c.speaker == "anna"} != {c.fold for c in clips if c.speaker == "ben"}

    manifest = write_manifest(tmp_path / "manifest.jsonl", info, clips)
    summary = preprocess(manifest, tmp_path / "processed", media, PreprocessSettings(use_ray=False, progress=False))
    rows = {row["clip_id"]: row for row in map(json.loads, (tmp_path / "processed/status.jsonl").open())}
    assert {clip: row["status"] for clip, row in rows.items()} == {
        "my clips/first take.mp4": "ok", "clips/second.mp4": "ok", "clips/silent.mp4": "no_audio_stream"}
    assert rows["clips/silent.mp4"]["file"] == "clips/silent.mp4"
    assert summary["ok"] == 2 and summary["failed"] == {"no_audio_stream": 1}


def test_missing_columns_empty_lists_and_bad_cells_name_their_line(tmp_path):
    for name in "abcde":
        touch(tmp_path / f"{name}.mp4")
    write_list(tmp_path / "list.csv", "path,label")
    with pytest.raises(DatasetLayoutError) as err:
        build_manifest(CUSTOM_ADAPTER, tmp_path)
    assert problems(err) == [f"{tmp_path / 'list.csv'}: the list has no clips"]
    write_list(tmp_path / "list.csv", "Path, Emotion", *(f"{name}.mp4,happy" for name in "abcde"))
    with pytest.raises(DatasetLayoutError) as err:
        build_manifest(CUSTOM_ADAPTER, tmp_path)
    assert problems(err) == [f"{tmp_path / 'list.csv'}:1: no column 'label' (columns: path, emotion)"]
    write_list(tmp_path / "list.csv", "path,label,start,end,fold", "a.mp4,happy,2,1,1", "a.mp4,,x,,0", ",happy,,,1",
               "a.mp4,happy,1")
    with pytest.raises(DatasetLayoutError) as err:
        build_manifest(CUSTOM_ADAPTER, tmp_path)
    assert [line.split(":", 1)[1] for line in problems(err)] == [
        "2: end 1 is not after start 2", "3: start 'x' is not a number of seconds >= 0", "4: empty path",
        "5: 3 fields, the header has 5"]
    with pytest.raises(DatasetLayoutError, match="missing required files"):
        build_manifest(CUSTOM_ADAPTER, tmp_path, list_file="nope.jsonl")


def test_many_problems_show_the_first_few_dozen(tmp_path):
    write_list(tmp_path / "list.csv", "path,label", *(f"clip{i}.mp4,happy" for i in range(50)))
    with pytest.raises(DatasetLayoutError) as err:
        build_manifest(CUSTOM_ADAPTER, tmp_path, classes=["happy", "sad"])
    lines = problems(err)
    assert len(lines) == SHOWN_PROBLEMS + 1 and lines[-1] == f"... and {50 - SHOWN_PROBLEMS} more"
    assert lines[0] == f"{tmp_path / 'list.csv'}:2: no such file: 'clip0.mp4'"


def test_folds_are_speaker_disjoint_balanced_and_independent_of_the_list_order(tmp_path):
    rows = [f"clips/{s}_{k}.mp4,{'happy' if k % 2 else 'sad'},{s}" for s in "abcdefg" for k in range(s.count("a") + 3)]
    for row in rows:
        touch(tmp_path / row.split(",")[0])
    write_list(tmp_path / "list.csv", "path,label,speaker", *rows)
    write_list(tmp_path / "reversed.csv", "path,label,speaker", *reversed(rows))
    info, clips = build_manifest(CUSTOM_ADAPTER, tmp_path, folds=3)
    _, again = build_manifest(CUSTOM_ADAPTER, tmp_path, list_file="reversed.csv", folds=3)
    assert [(c.clip_id, c.fold) for c in clips] == [(c.clip_id, c.fold) for c in again]
    assert info.classes == ["happy", "sad"] and info.num_folds == 3 and "speaker-disjoint" in info.protocol
    assert all(len({c.fold for c in clips if c.speaker == s}) == 1 for s in "abcdefg")
    sizes = Counter(c.fold for c in clips)
    assert set(sizes) == {1, 2, 3} and max(sizes.values()) - min(sizes.values()) <= 4  # 7 speakers, 3-4 clips each
    with pytest.raises(DatasetLayoutError, match="7 speakers cannot make 8 folds: set folds: 7 or fewer"):
        build_manifest(CUSTOM_ADAPTER, tmp_path, folds=8)

    write_list(tmp_path / "nospeaker.csv", "path,label", *(",".join(row.split(",")[:2]) for row in rows))
    info, clips = build_manifest(CUSTOM_ADAPTER, tmp_path, list_file="nospeaker.csv")
    assert info.num_folds == custom.DEFAULT_FOLDS and "single clips" in info.protocol
    assert sorted(Counter(c.fold for c in clips).values()) == [4, 4, 4, 5, 5]


def test_a_fold_column_is_used_as_it_is(tmp_path):
    for name in "abc":
        touch(tmp_path / f"{name}.mp4")
    write_list(tmp_path / "list.csv", "path,label,fold,speaker", "a.mp4,x,2,s1", "b.mp4,y,1,s1", "c.mp4,x,2,s2")
    info, clips = build_manifest(CUSTOM_ADAPTER, tmp_path)
    assert [(c.clip_id, c.fold) for c in clips] == [("a.mp4", 2), ("b.mp4", 1), ("c.mp4", 2)]
    assert info.num_folds == 2 and info.protocol == "2 folds as given in the list's fold column"
    with pytest.raises(DatasetLayoutError) as err:
        build_manifest(CUSTOM_ADAPTER, tmp_path, folds=4)
    assert problems(err) == [f"{tmp_path / 'list.csv'}: no clip in fold(s) 3, 4 of 1..4"]
    write_list(tmp_path / "list.csv", "path,label,fold", "a.mp4,x,2", "b.mp4,y,one", "c.mp4,x,3")
    with pytest.raises(DatasetLayoutError) as err:
        build_manifest(CUSTOM_ADAPTER, tmp_path, folds=2)
    assert [line.split(":", 1)[1] for line in problems(err)] == ["3: fold 'one' is not a whole number >= 1",
                                                                 "4: fold 3 is above folds: 2"]


def test_a_jsonl_list_of_segments_with_regression_targets(tmp_path):
    touch(tmp_path / "long talk.mkv")
    touch(tmp_path.parent / f"{tmp_path.name}-outside" / "other.mp4")
    outside = tmp_path.parent / f"{tmp_path.name}-outside" / "other.mp4"
    lines = [{"path": "long talk.mkv", "start": 0, "end": 2.5, "valence": 0.5, "arousal": -1},
             {"path": "long talk.mkv", "start": 2.5, "valence": "0.25", "arousal": 0},
             {"path": str(outside), "valence": 1, "arousal": "high"}]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(DatasetLayoutError) as err:
        build_manifest(CUSTOM_ADAPTER, tmp_path, list_file="list.jsonl", targets=["valence", "arousal", "dominance"],
                       folds=3)
    assert [line.split(":", 1)[1] for line in problems(err)] == [
        "1: no 'dominance'", "2: no 'dominance'", "3: no 'dominance'", "3: arousal 'high' is not a number"]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines[:2]) + "\n"
                                         + json.dumps({**lines[2], "arousal": -0.5}) + "\n")
    info, clips = build_manifest(CUSTOM_ADAPTER, tmp_path, list_file="list.jsonl", targets=["valence", "arousal"],
                                 folds=3)
    assert info.task == "regression" and info.targets == ["valence", "arousal"] and not info.classes
    assert [(c.clip_id, c.video, c.start, c.end, c.targets) for c in clips] == [
        (outside.as_posix(), outside.as_posix(), None, None, [1.0, -0.5]),
        ("long talk.mkv@0-2.5", "long talk.mkv", 0.0, 2.5, [0.5, -1.0]),
        ("long talk.mkv@2.5-end", "long talk.mkv", 2.5, None, [0.25, 0.0])]


def test_the_dataset_config_takes_the_adapter_options_and_names_a_bad_key(tmp_path):
    conf = tmp_path / "mine.yaml"
    conf.write_text("adapter: custom\nlist: lists/train.csv\nclasses: [calm, angry]\nfolds: 3\n"
                    "finetune: {epochs: 2}\n")
    config = load_dataset_config("mine", tmp_path)
    assert config.adapter_options("mine") == {"dataset": "mine", "list_file": "lists/train.csv",
                                              "classes": ["calm", "angry"], "folds": 3}
    assert load_dataset_config("demo").adapter_options("demo") == {}
    for text, message in (("adapter: custom\nclasses: [a, b]\ntargets: [v]\n", "targets: .*not both"),
                          ("adapter: custom\nclasses: [a, a]\n", "classes: .*more than once"),
                          ("adapter: demo\nlist: x.csv\n", "list: .*adapter custom only"),
                          ("adapter: custom\nfolds: 1\n", "folds: Input should be greater than or equal to 2"),
                          ("adapter: custom\nlists: x.csv\n", "lists: Extra inputs are not permitted")):
        conf.write_text(text)
        with pytest.raises(ConfigError, match=f"^{conf}: {message}"):
            load_dataset_config("mine", tmp_path)
    assert CUSTOM_ADAPTER == custom.NAME


def test_the_documented_example_is_a_dataset(tmp_path):
    """docs/datasets.md's copy-paste example: its conf file validates and its list reads (its files created here)."""
    text = (PROJECT_ROOT / "docs" / "datasets.md").read_text().split("## Your own videos")[1].split("\n## ")[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", text, re.S)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf/mine.yaml").write_text(next(body for kind, body in blocks if "adapter: custom" in body))
    config = load_dataset_config("mine", tmp_path / "conf")
    root = tmp_path / "data" / "mine"
    listed = next(body for kind, body in blocks if kind == "csv").replace("/archive", str(tmp_path / "archive"))
    write_list(root / config.list_file, *listed.strip().splitlines())
    for line in listed.strip().splitlines()[1:]:
        path = line.split(",")[0]
        touch(Path(path) if path.startswith("/") else root / path)
    info, clips = build_manifest(config.adapter, root, **{**config.adapter_options("mine"), "folds": 2})
    assert info.classes == config.classes and len(clips) == 4 and info.num_folds == 2
