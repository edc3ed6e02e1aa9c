"""The five adapters with published reference folds reproduce them exactly, clip by clip.

Each test builds a stand-in raw tree from the reference TSV (real file names, real label-file formats,
empty media files) plus the files the reference left out, runs the adapter and compares every clip's
fold and label with the TSV.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from preprocessing.datasets import build_manifest, crema_d, mafw, msp_improv


@pytest.fixture
def reference_rows(reference_file):
    """The rows of a dataset's reference split TSV (``../shared/fixtures/reference-splits/<name>.tsv``)."""

    def rows(name: str) -> list[dict[str, str]]:
        with reference_file(f"reference-splits/{name}.tsv").open(newline="") as handle:
            return list(csv.DictReader(handle, delimiter="\t"))

    return rows


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def assert_matches_reference(name: str, root: Path, rows: list[dict[str, str]]) -> None:
    """Every clip's fold and label (or targets) equal the reference row, and the clip sets are equal."""
    info, clips = build_manifest(name, root)
    assert [c.clip_id for c in clips] == sorted(c.clip_id for c in clips)
    got = {c.clip_id: c for c in clips}
    expected = {row["clip_id"]: row for row in rows}
    assert sorted(got) == sorted(expected)
    wrong = []
    for clip_id, row in expected.items():
        clip = got[clip_id]
        labels = clip.targets if info.task == "regression" else [clip.label]
        if clip.fold != int(row["test_fold"]) or labels != [float(v) for v in row["labels"].split()]:
            wrong.append((clip_id, clip.fold, labels, row["test_fold"], row["labels"]))
        if Path(clip.audio or clip.video).stem != row["audio_id"]:
            wrong.append((clip_id, "audio", clip.audio, row["audio_id"]))
    assert not wrong, f"{len(wrong)} clips differ from the reference, e.g. {wrong[:3]}"


def test_crema_d_reproduces_reference_folds(reference_rows, tmp_path: Path) -> None:
    rows = reference_rows("crema-d")
    for row in rows:
        touch(tmp_path / "VideoFlash" / f"{row['clip_id']}.flv")
        touch(tmp_path / "AudioWAV" / f"{row['clip_id']}.wav")
    for clip_id in ["1076_MTI_NEU_XX", "1076_MTI_SAD_XX", "1064_TIE_SAD_XX", "1064_IEO_DIS_MD"]:
        touch(tmp_path / "VideoFlash" / f"{clip_id}.flv")
        touch(tmp_path / "AudioWAV" / f"{clip_id}.wav")
    touch(tmp_path / "VideoFlash" / "1040_ITH_SAD_XX.flv")
    touch(tmp_path / "AudioWAV" / "1040_ITH_SAD_X.wav")  # the distribution's irregular name
    assert len(list((tmp_path / "VideoFlash").iterdir())) == 7442
    assert_matches_reference("crema-d", tmp_path, rows)


def test_crema_d_five_left_out_clips_are_the_documented_ones() -> None:
    assert sorted(crema_d.EXCLUDED) == sorted(["1076_MTI_NEU_XX", "1076_MTI_SAD_XX", "1064_TIE_SAD_XX",
                                               "1064_IEO_DIS_MD", "1040_ITH_SAD_XX"])
    assert [crema_d.fold_of_actor(a) for a in (1001, 1018, 1019, 1072, 1073, 1091)] == [1, 1, 2, 4, 5, 5]


def test_ravdess_reproduces_reference_folds(reference_rows, tmp_path: Path) -> None:
    rows = reference_rows("ravdess")
    for row in rows:
        actor_dir = tmp_path / f"Actor_{row['clip_id'][-2:]}"
        touch(actor_dir / f"{row['clip_id']}.mp4")
        touch(actor_dir / f"01{row['clip_id'][2:]}.mp4")  # the audio-visual file, not used
        touch(actor_dir / f"{row['audio_id']}.wav")
    touch(tmp_path / "Actor_01" / "02-02-03-01-01-01-01.mp4")  # song files are ignored
    touch(tmp_path / "Actor_01" / "03-02-03-01-01-01-01.wav")
    assert_matches_reference("ravdess", tmp_path, rows)


def evaluation_header(clip_id: str, code: str) -> str:
    """One utterance block of MSP-IMPROV's Evaluation.txt: the consensus line and two rater lines."""
    name = clip_id.replace("MSP-IMPROV-", "UTD-IMPROV-")
    return (f"{name}.avi; {code}; A:2.800000; V:3.000000; D:2.600000 ; N:3.200000;\n"
            f"rater-01; Neutral; ; A:3.000000; V:3.000000; D:3.000000; N:3.000000;\n"
            f"rater-02; Other; Concerned; A:2.000000; V:3.000000; D:2.000000; N:3.000000;\n\n")


def test_msp_improv_reproduces_reference_folds(reference_rows, tmp_path: Path) -> None:
    rows = reference_rows("msp-improv")
    extra = {"MSP-IMPROV-S01A-F01-P-FM99": "O", "MSP-IMPROV-S02H-M03-S-MF99": "X"}  # left out
    blocks = []
    coded = [(r["clip_id"], msp_improv.CODES[int(r["labels"])]) for r in rows] + list(extra.items())
    for clip_id, code in coded:
        _, _, scenario, speaker, kind, _ = clip_id.split("-", 5)
        folder = tmp_path / f"session{int(speaker[1:])}" / scenario / kind
        touch(folder / f"{clip_id}.avi")
        touch(folder / f"{clip_id}.wav")
        blocks.append(evaluation_header(clip_id, code))
    (tmp_path / "Evaluation.txt").write_text("".join(blocks))
    assert_matches_reference("msp-improv", tmp_path, rows)


def test_mafw_reproduces_reference_folds(reference_rows, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = reference_rows("mafw")
    unused = sorted({f"{n:05d}" for n in range(1, 10046)} - {row["clip_id"] for row in rows})
    silent = {unused[0]: ("1", "anger"), unused[1]: ("4", "fear")}  # in the splits, but without audio
    monkeypatch.setattr(mafw, "has_audio_stream", lambda path: path.stem not in silent)
    tests: dict[str, list[str]] = {str(k): [] for k in range(1, 6)}
    for row in rows:
        tests[row["test_fold"]].append(f"{row['clip_id']}.mp4 {mafw.CLASSES[int(row['labels'])]}")
    for clip_id, (fold, label) in silent.items():
        tests[fold].append(f"{clip_id}.mp4 {label}")
    for clip_id in [r["clip_id"] for r in rows] + unused[:3]:  # unused[2]: a multi-label clip
        touch(tmp_path / "data" / "clips" / f"{clip_id}.mp4")
    for fold, lines in tests.items():
        folder = tmp_path / "Train & Test Set" / "single" / "no_caption" / f"set_{fold}"
        folder.mkdir(parents=True)
        (folder / "test.txt").write_text("\n".join(lines) + "\n")
        train = [line for other, other_lines in tests.items() if other != fold for line in other_lines]
        (folder / "train.txt").write_text("\n".join(train) + "\n")
    assert_matches_reference("mafw", tmp_path, rows)


def test_werewolf_xl_reproduces_reference_folds(reference_rows, tmp_path: Path) -> None:
    rows = reference_rows("werewolf-xl")
    lines = ["Session,VideoName,Pleasure,Arousal,Dominance,Category"]
    for row in rows:
        session = row["clip_id"][:2]
        touch(tmp_path / "Werewolf-XL_Speaker_Video" / f"Session{session}" / f"{row['clip_id']}.mp4")
        pleasure, arousal, dominance = row["labels"].split()
        lines.append(f"{int(session)},{row['clip_id']}.mp4,{pleasure},{arousal},{dominance},Neutral")
    (tmp_path / "Werewolf-XL_PAD_labels.csv").write_text("\n".join(lines) + "\n")
    assert_matches_reference("werewolf-xl", tmp_path, rows)
