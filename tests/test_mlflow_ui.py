"""The MLflow UI as a researcher opens it: headless Chromium on a real ``mlflow server`` holding two variants of a
tiny fine-tuning run (fold 1 each), logged by the pipeline's own tracking calls in the order the stage makes them.

The assertions read the pages as rendered once their scripts ran (``chromium --dump-dom``), not the REST API: the
experiment opens on its training runs, the runs table shows each run's dataset and variant, and the compare view
of the two fold runs shows the param that separates them and their test metrics. Chromium is Debian's
``chromium`` (.ci/run installs it); without it these tests skip, and fail under CI.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest

from pipeline import tracking
from pipeline.config.training import FinetuneSettings
from preprocessing.shard_index import ShardIndex

pytestmark = [pytest.mark.system, pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")]

EXPERIMENT = "ui-ablations"
DATASET = "demo"
# variant -> (model overrides, fold 1's test WAR): the baseline and the paper's last-layer ablation
VARIANTS = {"baseline": ({}, 0.5), "last_layer": ({"feature_fusion": "last"}, 0.75)}
CHANGED = "model.overrides.feature_fusion"
WINDOW = "1920,1080"  # wide enough for every column of the view: the runs table renders the visible ones only


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "no chromium on PATH (Debian: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must run the MLflow UI tests")
        pytest.skip(message)
    return path


def shards() -> list[ShardIndex]:
    """Two shards of the demo's 15 clips, as preprocessing indexes them (no bytes: only the tracking reads them)."""
    return [ShardIndex(f"/data/demo/processed/shards/shard-{i:06d}.tar", 1000 + i, f"{i:064x}", [{}] * clips)
            for i, clips in enumerate((8, 7))]


def log_finetune(root: Path, variant: str, overrides: dict, war: float) -> dict[str, str]:
    """One variant's fine-tuning as ``finetune.stage_finetune`` tracks it: the stage run, its fold run with step and
    epoch metrics (from the workers: ``RunLogger``), then the fold's and the stage's test metrics. The run ids."""
    settings = FinetuneSettings(model={"size": "hicmae_test", "overrides": overrides}, epochs=1, folds=[1],
                                init="none")
    data_hash = hashlib.sha256(b"the demo's shards").hexdigest()
    with tracking.start_stage_run("finetune", settings, EXPERIMENT, run_name=f"finetune-{DATASET}",
                                  data_hash=data_hash,
                                  inputs=[tracking.shards_input(DATASET, root / "processed", shards(), data_hash)],
                                  tags={"dataset": DATASET, "protocol": "clean", "variant": variant},
                                  project_root=root) as parent:
        fold = tracking.start_child_run(parent, f"{DATASET}-fold1", {"fold": "1", "dataset": DATASET,
                                                                       "dvc_stage": "finetune"}, params={"fold": 1})
        for step in range(1, 5):
            fold.log({"train_step/loss": 1.4 - 0.1 * step - war / 10, "train_step/lr": 1e-3}, step)
        fold.log_epoch({"epoch": 0, "train/loss": 1.2, "val/uar": war - 0.1}, 0)
        test = {"uar": war - 0.25, "war": war, "f1_macro": war - 0.3}
        fold.finish({"test": test, "test_last": test})
        tracking.log_metrics({"test": {f"{key}_mean": value for key, value in test.items()}})
    return {"stage": parent.info.run_id, "fold": fold.run_id, "experiment": parent.info.experiment_id}


@pytest.fixture(scope="module")
def ablation_runs(mlflow_server, tmp_path_factory) -> dict[str, dict[str, str]]:
    """The two variants in experiment ``ui-ablations`` of the session's MLflow server: variant -> run ids."""
    root = tmp_path_factory.mktemp("ui-project")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        try:
            return {variant: log_finetune(root, variant, overrides, war)
                    for variant, (overrides, war) in VARIANTS.items()}
        finally:
            mlflow.set_tracking_uri(None)


class Page:
    """A page as Chromium rendered it: its DOM, and ways to read the MLflow UI's tables out of it."""

    def __init__(self, dom: str):
        self.dom = dom

    @property
    def title(self) -> str:
        found = re.search(r"<title>(.*?)</title>", self.dom, re.S)
        return html.unescape(found.group(1)).strip() if found else ""

    def text(self) -> str:
        """The visible text, one ``|`` between elements."""
        body = re.sub(r"<(script|style)\b.*?</\1>", "", self.dom, flags=re.S)
        return re.sub(r"(\s*\|\s*)+", " | ", html.unescape(re.sub(r"<[^>]+>", " | ", body)))

    def grid_rows(self) -> dict[str, dict[str, str]]:
        """The runs table (ag-grid): run id -> column id (``tags.`variant```) -> the cell's text. The grid renders
        a row's pinned and scrolled columns as separate rows of the same id."""
        rows: dict[str, dict[str, str]] = {}
        parts = re.split(r'(<div[^>]*\brole="row"[^>]*>)', self.dom)
        for opening, body in zip(parts[1::2], parts[2::2], strict=True):
            run = re.search(r'\brow-id="([^"]+)"', opening)
            if run is None:
                continue
            cells = re.split(r'(<div[^>]*\brole="gridcell"[^>]*>)', body)
            for cell, content in zip(cells[1::2], cells[2::2], strict=True):
                column = re.search(r'\bcol-id="([^"]+)"', cell)
                if column:
                    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", content)).split())
                    rows.setdefault(run.group(1), {})[html.unescape(column.group(1))] = text
        return rows

    def table_rows(self) -> dict[str, list[str]]:
        """The compare view's tables (run details, params, tags): a row's first cell -> the texts of the others,
        left to right."""
        rows = {}
        for row in re.findall(r"<tr\b[^>]*>(.*?)</tr>", self.dom, re.S):
            cells = [" ".join(html.unescape(re.sub(r"<[^>]+>", " ", cell)).split())
                     for cell in re.findall(r"<t[hd]\b[^>]*>(.*?)</t[hd]>", row, re.S)]
            if cells:
                rows[cells[0]] = cells[1:]
        return rows

    def metric_rows(self) -> dict[str, list[str]]:
        """The compare view's metrics (a virtualised grid: the names in one, the values by position in another):
        metric -> values, left to right."""
        section = self.dom[self.dom.find(">Metrics<", self.dom.find("Run details")):]
        names = {top: html.unescape(name) for top, name in
                 re.findall(r'top: (\d+)px;[^"]*"><a title="Plot chart"[^>]*>([^<]+)<', section)}
        values: dict[str, dict[int, str]] = {}
        for left, top, value in re.findall(r'left: (\d+)px; position: absolute; top: (\d+)px;[^"]*">'
                                           r"<span[^>]*>([^<]*)</span>", section):
            if top in names:
                values.setdefault(names[top], {})[int(left)] = html.unescape(value)
        return {name: [cells[left] for left in sorted(cells)] for name, cells in values.items()}


def render(chromium: str, url: str, ready: Callable[[Page], bool], profiles: Path) -> Page:
    """``url`` in headless Chromium, a new browser profile each time (a first visit: nothing remembered), once its
    scripts ran and the server answered; again with more virtual time while ``ready`` does not hold."""
    budgets = (15_000, 45_000)
    for budget in budgets:
        profile = profiles / f"profile-{len(list(profiles.glob('profile-*')))}"
        result = subprocess.run(
            [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage", "--no-first-run",
             f"--user-data-dir={profile}", f"--window-size={WINDOW}", f"--virtual-time-budget={budget}",
             "--dump-dom", url], capture_output=True, text=True, timeout=180)
        page = Page(result.stdout)
        if ready(page):
            return page
    pytest.fail(f"{url} did not render what the test waits for ({len(budgets)} tries); chromium said:\n"
                f"{result.stderr[-2000:]}\nthe page read:\n{page.text()[:3000]}")


def test_experiment_opens_on_its_training_runs(chromium, ablation_runs, mlflow_server, tmp_path):
    experiment = ablation_runs["baseline"]["experiment"]
    page = render(chromium, f"{mlflow_server.url}/#/experiments/{experiment}?{tracking.TRAINING_UI}",
                  lambda page: "finetune-demo" in page.text(), tmp_path)
    assert page.title == f"Runs - Experiment {experiment} - MLflow", page.title
    text = page.text()
    for genai in ("Token Usage", "Detect Issues", "Evaluation runs"):
        assert genai not in text, text[:3000]
    kind = mlflow_server.get("experiments/get", experiment_id=experiment)["experiment"]["tags"]
    assert {"key": tracking.EXPERIMENT_KIND_TAG, "value": tracking.TRAINING_KIND} in kind


def test_runs_table_shows_dataset_and_variant(chromium, ablation_runs, mlflow_server, tmp_path):
    experiment = ablation_runs["baseline"]["experiment"]
    stage_runs = {ids["stage"]: variant for variant, ids in ablation_runs.items()}
    page = render(chromium, tracking.runs_view_url(mlflow_server.url, experiment),
                  lambda page: stage_runs.keys() <= page.grid_rows().keys(), tmp_path)
    rows = page.grid_rows()
    digest = hashlib.sha256(b"the demo's shards").hexdigest()[:tracking.DIGEST_CHARS]
    for run, variant in stage_runs.items():
        row = rows[run]
        assert row["attributes.`Run Name`"].split()[-1] == "finetune-demo", row  # after its colour's name
        assert row["attributes.`Dataset`"].startswith(f"{DATASET} ({digest}) training"), row
        assert row["tags.`variant`"] == variant, row
        assert float(row["metrics.`test/war_mean`"]) == VARIANTS[variant][1], row
    assert set(rows) == set(stage_runs), rows  # the view lists fine-tuning runs, their folds folded in


def test_compare_view_of_two_fold_runs(chromium, ablation_runs, mlflow_server, tmp_path):
    folds = [ids["fold"] for ids in ablation_runs.values()]
    experiment = ablation_runs["baseline"]["experiment"]
    query = urllib.parse.urlencode({"runs": json.dumps(folds), "experiments": json.dumps([experiment])})
    page = render(chromium, f"{mlflow_server.url}/#/compare-runs?{query}",
                  lambda page: "test/war" in page.metric_rows() and CHANGED in page.table_rows(), tmp_path)
    assert "Comparing 2 Runs from 1 Experiment" in page.text()
    table = page.table_rows()
    columns = {run: index for index, run in enumerate(table["Run ID:"])}
    by_run = {name: {variant: values[columns[ids["fold"]]] for variant, ids in ablation_runs.items()}
              for name, values in table.items() if len(values) == len(folds)}
    assert by_run["Run Name:"] == {"baseline": "demo-fold1", "last_layer": "demo-fold1"}
    assert by_run[CHANGED] == {"baseline": "", "last_layer": "last"}  # the baseline keeps the size's default
    assert by_run["variant"] == {"baseline": "baseline", "last_layer": "last_layer"}
    assert by_run["fold"] == {"baseline": "1", "last_layer": "1"}
    assert by_run["model.size"] == {"baseline": "hicmae_test", "last_layer": "hicmae_test"}
    differing = re.findall(r'<tr class="diff-row"><th[^>]*>([^<]+)</th>', page.dom)
    assert {CHANGED, "variant"} <= set(differing), differing
    metrics = page.metric_rows()
    war = {variant: metrics["test/war"][columns[ids["fold"]]] for variant, ids in ablation_runs.items()}
    assert {variant: float(value) for variant, value in war.items()} == {"baseline": 0.5, "last_layer": 0.75}
