"""DFEW, IEMOCAP, MER2023, AVCAffe and VoxCeleb2 adapters on small stand-in trees in each layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from preprocessing.datasets import DatasetLayoutError, build_manifest, iemocap


def touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_dfew_official_folds_and_labels(tmp_path: Path) -> None:
    split = tmp_path / "EmoLabel_DataSplit"
    for fold in range(1, 6):
        tests = [(fold, fold), (10 + fold, (fold % 7) + 2)]  # (clip number, label 1-7)
        touch(split / "test(single-labeled)" / f"set_{fold}.csv",
              "video_name,label\n" + "".join(f"{n},{label}\n" for n, label in tests))
        touch(split / "train(single-labeled)" / f"set_{fold}.csv", "video_name,label\n")
        for number, _ in tests:
            touch(tmp_path / "Clip" / "original" / f"part_{1 + number // 10}" / f"{number:05d}.mp4")
    info, clips = build_manifest("dfew", tmp_path)
    assert info.classes[0] == "happy" and info.num_folds == 5 and len(clips) == 10
    first = clips[0]
    assert (first.clip_id, first.fold, first.label, first.video) == (
        "00001", 1, 0, "Clip/original/part_1/00001.mp4")
    assert {c.clip_id: c.fold for c in clips}["00013"] == 3
    assert info.classes[{c.clip_id: c.label for c in clips}["00013"]] == "surprise"  # file label 5


def test_dfew_label_out_of_range_is_an_error(tmp_path: Path) -> None:
    split = tmp_path / "EmoLabel_DataSplit"
    (tmp_path / "Clip" / "original").mkdir(parents=True)
    for fold in range(1, 6):
        touch(split / "test(single-labeled)" / f"set_{fold}.csv", "video_name,label\n1,8\n" if fold == 1 else
              "video_name,label\n")
        touch(split / "train(single-labeled)" / f"set_{fold}.csv", "video_name,label\n")
    with pytest.raises(DatasetLayoutError, match="label 1-7"):
        build_manifest("dfew", tmp_path)


EVALUATION = """% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]

[6.2901 - 8.2357]\tSes0{s}F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]
C-E2:\tNeutral;\t()
A-E3:\tval 3; act 2; dom  2;\t()

[10.0100 - 11.3925]\tSes0{s}F_impro01_M000\texc\t[3.5000, 3.0000, 3.0000]

[14.8872 - 18.0175]\tSes0{s}F_impro01_F001\tfru\t[2.0000, 3.5000, 3.5000]

[19.2900 - 20.7875]\tSes0{s}F_impro01_M001\tang\t[1.5000, 4.0000, 4.0000]
"""


def test_iemocap_time_spans_speakers_and_merged_classes(tmp_path: Path) -> None:
    for s in range(1, 6):
        dialog = tmp_path / f"Session{s}" / "dialog"
        touch(dialog / "EmoEvaluation" / f"Ses0{s}F_impro01.txt", EVALUATION.format(s=s))
        touch(dialog / "EmoEvaluation" / f"._Ses0{s}F_impro01.txt", "macOS metadata")
        touch(dialog / "avi" / "DivX" / f"Ses0{s}F_impro01.avi")
    info, clips = build_manifest("iemocap", tmp_path)
    assert len(clips) == 15  # the frustrated utterance of each session is left out
    by_id = {c.clip_id: c for c in clips}
    excited = by_id["Ses03F_impro01_M000"]
    assert info.classes[excited.label] == "happy"
    assert (excited.start, excited.end, excited.speaker, excited.fold) == (10.01, 11.3925, "Ses03M", 3)
    assert excited.video == "Session3/dialog/avi/DivX/Ses03F_impro01.avi"
    assert info.classes[by_id["Ses05F_impro01_M001"].label] == "angry"
    # Ses0kF dialogues: the female actor wears the markers and sits on the left, the male actor on the right.
    assert by_id["Ses03F_impro01_F000"].face_region == (0.0, 0.0, 0.5, 1.0)
    assert excited.face_region == (0.5, 0.0, 1.0, 1.0)
    assert iemocap.speaker_region("Ses02M_script01_1", "Ses02M_script01_1_M010") == (0.0, 0.0, 0.5, 1.0)
    assert iemocap.speaker_region("Ses02M_script01_1", "Ses02M_script01_1_F011") == (0.5, 0.0, 1.0, 1.0)


def test_iemocap_missing_dialogue_video_is_an_error(tmp_path: Path) -> None:
    for s in range(1, 6):
        (tmp_path / f"Session{s}" / "dialog" / "avi" / "DivX").mkdir(parents=True)
        touch(tmp_path / f"Session{s}" / "dialog" / "EmoEvaluation" / f"Ses0{s}F_impro01.txt",
              EVALUATION.format(s=s))
    with pytest.raises(DatasetLayoutError, match="Session1/dialog/avi/DivX/Ses01F_impro01.avi"):
        build_manifest("iemocap", tmp_path)


def test_mer2023_train_and_test_folds(tmp_path: Path) -> None:
    touch(tmp_path / "mer2023train" / "train-label.csv",
          "name,discrete,valence\nsample_00000001,happy,2.0\nsample_00000002,worried,-1.5\n")
    touch(tmp_path / "mer2023test" / "test1-label.csv", "name,discrete,valence\nsample_00003001,sad,-2.0\n")
    for name in ("sample_00000001", "sample_00000002"):
        touch(tmp_path / "mer2023train" / "video" / f"{name}.avi")
    touch(tmp_path / "mer2023test" / "test1" / "sample_00003001.mp4")
    info, clips = build_manifest("mer2023", tmp_path)
    assert info.num_folds == 2
    assert [(c.clip_id, info.classes[c.label], c.fold) for c in clips] == [
        ("sample_00000001", "happy", 2), ("sample_00000002", "worried", 2), ("sample_00003001", "sad", 1)]
    assert clips[2].video == "mer2023test/test1/sample_00003001.mp4"


def test_avcaffe_clips_inherit_task_scores_and_participant_folds(tmp_path: Path) -> None:
    touch(tmp_path / "labels.csv", "participant,task,arousal,valence\naiim001,task_1,3,2\naiim002,task_1,1,4\n")
    touch(tmp_path / "splits" / "train.txt", "aiim001\n")
    touch(tmp_path / "splits" / "test.txt", "aiim002\n")
    for participant in ("aiim001", "aiim002"):
        for clip in ("000", "001"):
            touch(tmp_path / "videos" / participant / "task_1" / f"{clip}.mp4")
    info, clips = build_manifest("avcaffe", tmp_path)
    assert info.task == "regression" and info.targets == ["arousal", "valence"]
    assert [(c.clip_id, c.targets, c.speaker, c.fold) for c in clips] == [
        ("aiim001/task_1/000", [3.0, 2.0], "aiim001", 2), ("aiim001/task_1/001", [3.0, 2.0], "aiim001", 2),
        ("aiim002/task_1/000", [1.0, 4.0], "aiim002", 1), ("aiim002/task_1/001", [1.0, 4.0], "aiim002", 1)]


def test_avcaffe_participant_in_no_split_is_an_error(tmp_path: Path) -> None:
    touch(tmp_path / "labels.csv", "participant,task,arousal,valence\naiim001,task_1,3,2\n")
    touch(tmp_path / "splits" / "train.txt", "")
    touch(tmp_path / "splits" / "test.txt", "")
    touch(tmp_path / "videos" / "aiim001" / "task_1" / "000.mp4")
    with pytest.raises(DatasetLayoutError, match="neither split list"):
        build_manifest("avcaffe", tmp_path)


def test_voxceleb2_unlabelled_clips_with_optional_aac(tmp_path: Path) -> None:
    touch(tmp_path / "dev" / "mp4" / "id00012" / "21Uxsk56VDQ" / "00001.mp4")
    touch(tmp_path / "dev" / "mp4" / "id00012" / "21Uxsk56VDQ" / "00002.mp4")
    touch(tmp_path / "dev" / "mp4" / "id00015" / "0fijmz4vTVU" / "00001.mp4")
    touch(tmp_path / "dev" / "aac" / "id00012" / "21Uxsk56VDQ" / "00001.m4a")
    info, clips = build_manifest("voxceleb2", tmp_path)
    assert info.task == "unlabelled" and info.num_folds == 0
    assert [(c.clip_id, c.audio, c.speaker, c.label, c.fold) for c in clips] == [
        ("id00012/21Uxsk56VDQ/00001", "dev/aac/id00012/21Uxsk56VDQ/00001.m4a", "id00012", None, None),
        ("id00012/21Uxsk56VDQ/00002", None, "id00012", None, None),
        ("id00015/0fijmz4vTVU/00001", None, "id00015", None, None)]
