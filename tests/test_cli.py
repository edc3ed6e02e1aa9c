"""The ``hicmae`` command as a user runs it: a bad parameter, an unknown dataset or a missing input is one line
on stderr (``hicmae: error: <file>: <key or what>: <problem>``) and exit status 1, never a traceback."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("args, message", [
    (["--set", "finetune.epochs=abc", "finetune", "--dataset", "demo"],
     r"params.yaml: finetune.epochs: Input should be a valid integer, unable to parse string as an integer"),
    (["--set", "preprocess.fps=0", "preprocess", "--dataset", "demo"],
     r"params.yaml: preprocess.fps: Input should be greater than 0"),
    (["--set", "pretrain.model.size=huge", "pretrain"],
     r"params.yaml: pretrain.model.size: Value error, unknown size 'huge'; known: hicmae_tiny"),
    (["finetune", "--dataset", "nope"], r"params.yaml: datasets: no dataset 'nope'; listed: demo"),
    (["--params", "missing.yaml", "report"], r"missing.yaml: no such configuration file"),
    (["preprocess", "--dataset", "demo"],
     r"data/demo/manifest.jsonl: missing; run `hicmae manifest --dataset demo` first"),
])
def test_user_errors_are_one_line_and_exit_1(hicmae, args, message):
    result = hicmae(*args)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hicmae: error: "), result.stderr
    assert message in lines[0], lines[0]
