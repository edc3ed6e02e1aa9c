"""Adapters fail early with one clear error on a wrong folder; the registry and CLI write manifests."""

from __future__ import annotations

from pathlib import Path

import pytest

from preprocessing.datasets import ADAPTERS, DatasetLayoutError, adapter, build_manifest
from preprocessing.datasets.__main__ import main
from preprocessing.datasets._layout import expected_layout
from preprocessing.fileio import sha256_file
from preprocessing.manifest import read_manifest


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_every_adapter_has_the_interface_and_rejects_an_empty_folder(name: str, tmp_path: Path) -> None:
    module = adapter(name)
    assert module.NAME == name
    layout = expected_layout(module.__doc__)
    assert "<root>" in layout, f"{name}: docstring has no 'Expected layout::' block"
    with pytest.raises(DatasetLayoutError) as err:
        module.build_manifest(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{name}: ") and "Expected layout:" in message and layout in message


def test_missing_folder_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        build_manifest("crema-d", tmp_path / "nowhere")


def test_crema_d_video_without_audio_names_the_file(tmp_path: Path) -> None:
    touch(tmp_path / "VideoFlash" / "1001_DFA_ANG_XX.flv")
    touch(tmp_path / "AudioWAV" / "1001_DFA_ANG_XX.wav")
    touch(tmp_path / "VideoFlash" / "1002_DFA_SAD_XX.flv")
    with pytest.raises(DatasetLayoutError, match=r"without their AudioWAV file \(1\)\n  VideoFlash/1002_DFA"):
        build_manifest("crema-d", tmp_path)


def test_error_lists_only_the_first_few_offending_paths(tmp_path: Path) -> None:
    for actor in range(1001, 1011):
        touch(tmp_path / "VideoFlash" / f"{actor}_DFA_ANG_XX.flv")
    (tmp_path / "AudioWAV").mkdir()
    with pytest.raises(DatasetLayoutError) as err:
        build_manifest("crema-d", tmp_path)
    assert "(10)" in str(err.value) and "... and 5 more" in str(err.value)
    assert "1006_DFA_ANG_XX" not in str(err.value)


def test_ravdess_unpaired_audio_is_an_error(tmp_path: Path) -> None:
    touch(tmp_path / "Actor_01" / "02-01-01-01-01-01-01.mp4")
    touch(tmp_path / "Actor_01" / "03-01-01-01-01-01-01.wav")
    touch(tmp_path / "Actor_02" / "03-01-05-02-01-01-02.wav")
    with pytest.raises(DatasetLayoutError, match="audio-only files without their video-only"):
        build_manifest("ravdess", tmp_path)


def test_mafw_malformed_split_line_is_an_error(tmp_path: Path) -> None:
    touch(tmp_path / "data" / "clips" / "00001.mp4")
    for fold in range(1, 6):
        folder = tmp_path / "Train & Test Set" / "single" / "no_caption" / f"set_{fold}"
        folder.mkdir(parents=True)
        (folder / "train.txt").write_text("")
        (folder / "test.txt").write_text("00001.mp4 anger\n" if fold == 1 else "")
    (tmp_path / "Train & Test Set/single/no_caption/set_2/test.txt").write_text("00002.mp4 anger_sadness\n")
    with pytest.raises(DatasetLayoutError, match=r"set_2/test.txt:1: '00002.mp4 anger_sadness'"):
        build_manifest("mafw", tmp_path)


def test_cli_writes_a_manifest_that_reads_back(tmp_path: Path) -> None:
    root = tmp_path / "ravdess"
    for actor in ("01", "05"):
        touch(root / f"Actor_{actor}" / f"02-01-03-01-01-01-{actor}.mp4")
        touch(root / f"Actor_{actor}" / f"03-01-03-01-01-01-{actor}.wav")
    out = tmp_path / "manifests" / "ravdess.jsonl"
    assert main(["ravdess", str(root), str(out)]) == 0
    info, clips = read_manifest(out)
    assert info.num_folds == 6 and "root" not in info.model_dump()  # a function of the content, not its place
    assert clips[0].video_sha256 == sha256_file(root / clips[0].video)
    assert clips[0].audio_sha256 == sha256_file(root / clips[0].audio)
    assert [(c.clip_id, c.label, c.fold, c.audio) for c in clips] == [
        ("02-01-03-01-01-01-01", 2, 1, "Actor_01/03-01-03-01-01-01-01.wav"),
        ("02-01-03-01-01-01-05", 2, 2, "Actor_05/03-01-03-01-01-01-05.wav"),
    ]


def test_cli_reports_a_layout_error_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["werewolf-xl", str(tmp_path), str(tmp_path / "out.jsonl")]) == 2
    assert "werewolf-xl: no CSV in the root" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
