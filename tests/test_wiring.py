"""The project's wiring, derived from its imports: DVC re-runs every stage whose code changed, the import graph
is a DAG, and the layers import only what DESIGN.md allows.

The import graph is read from the source (every ``import`` and ``from ... import``, function-level ones too,
since they run when the function does), so it needs nothing installed beyond the standard library and PyYAML.
Two registries import by name and are followed explicitly: ``pipeline.cli.COMMANDS`` (a command runs
``pipeline.cli`` plus its command's module) and ``preprocessing.datasets.ADAPTERS`` (calling
``build_manifest`` or ``adapter`` reaches every adapter module).
"""

from __future__ import annotations

import ast
import re
import shlex
import sys
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "preprocessing", "pipeline")
ADAPTER_ENTRY_POINTS = {"build_manifest", "adapter"}


def module_file(module: str) -> Path | None:
    """The source file of a project module (``a/b.py`` or ``a/b/__init__.py``), None if there is none."""
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def project_modules() -> list[str]:
    modules = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` import names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    is_package = module_file(module).name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def imports_of(module: str) -> frozenset[str]:
    """Project modules that ``module`` imports directly, with the packages they live in."""
    tree = ast.parse(module_file(module).read_text(), str(module_file(module)))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from package import module`
            if target == "preprocessing.datasets" and ADAPTER_ENTRY_POINTS & {a.name for a in node.names}:
                found.update(f"preprocessing.datasets.{name}" for name in adapter_modules())
    project = {name for name in found if name.split(".")[0] in PACKAGES and module_file(name)}
    return frozenset(project | {p for name in project for p in parents(name)})


def parents(module: str) -> list[str]:
    """The packages a module lives in (their ``__init__`` runs first)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def adapter_modules() -> list[str]:
    text = (ROOT / "preprocessing/datasets/__init__.py").read_text()
    block = re.search(r"ADAPTERS = \{(.*?)\}", text, re.S).group(1)
    return re.findall(r':\s*"([a-z0-9_]+)"', block)


def closure(*modules: str) -> set[str]:
    """Every project module that running ``modules`` imports, directly or not."""
    seen, todo = set(), [m for module in modules for m in (module, *parents(module))]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imports_of(module) - seen)
    return seen


def command_table() -> dict[str, str]:
    """``pipeline.cli.COMMANDS`` (read from the source): command -> the module it runs."""
    tree = ast.parse(module_file("pipeline.cli").read_text())
    value = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(getattr(target, "id", None) == "COMMANDS" for target in node.targets))
    return {command: module for command, (module, _) in ast.literal_eval(value).items()}


def command_modules(cmd: str) -> list[str]:
    """The modules a ``dvc.yaml`` command runs: ``python -m M [sub-command ...]``."""
    words = shlex.split(cmd)
    assert words[:2] == ["python", "-m"], f"dvc.yaml command {cmd!r} is not `python -m <module> ...`"
    module = words[2]
    if module == "pipeline.cli":
        command = next(word for word in words[3:] if not word.startswith("-"))
        return [module, command_table()[command]]
    return [module]


def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages, each foreach stage by its ``do`` template."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(ROOT).as_posix()
    return any(relative == dep or relative.startswith(dep.rstrip("/") + "/") for dep in deps)


# What a stage prints and how often (pipeline/console.py, pipeline/progress.py): no output depends on it, so no
# stage lists it, and a reworded line re-runs nothing.
CONSOLE_ONLY = {"pipeline/console.py", "pipeline/progress.py"}


def uncovered_code(stage: dict) -> list[str]:
    deps = [dep for dep in stage.get("deps", []) if "${" not in dep]
    files = {module_file(module) for module in closure(*command_modules(stage["cmd"]))}
    return sorted(relative for path in files if not covered(path, deps)
                  and (relative := path.relative_to(ROOT).as_posix()) not in CONSOLE_ONLY)


def test_every_stage_depends_on_all_the_code_it_runs():
    missing = {name: files for name, stage in dvc_stages().items() if (files := uncovered_code(stage))}
    assert not missing, "dvc.yaml: stages run project files their deps do not list (DVC would not re-run them " \
                        f"after a change): {missing}"
    printing = {name: sorted(CONSOLE_ONLY & set(stage.get("deps", []))) for name, stage in dvc_stages().items()}
    assert not any(printing.values()), f"dvc.yaml: stages depend on what they print: {printing}"


def test_every_code_dependency_exists():
    stale = {name: dep for name, stage in dvc_stages().items() for dep in stage.get("deps", [])
             if "${" not in dep and dep.split("/")[0] in PACKAGES and not (ROOT / dep).exists()}
    assert not stale, f"dvc.yaml: deps that do not exist: {stale}"


def test_the_dependency_check_sees_lazy_and_registry_imports():
    assert "pipeline.train.export" in closure("pipeline.train.finetune")     # direct
    assert "pipeline.tracking" in imports_of("pipeline.train.pretrain")      # function-level import
    assert "preprocessing.datasets.crema_d" in closure("pipeline.prepare")  # through build_manifest
    assert "preprocessing.datasets.crema_d" not in closure("preprocessing.datasets.demo")
    assert "pipeline.train.finetune" not in closure("pipeline.cli")          # imported by name, when run
    modules = command_modules("python -m pipeline.cli finetune --dataset x")
    assert {"pipeline.cli", "pipeline.train.finetune"} <= set(modules)
    stage = {"cmd": "python -m pipeline.cli report", "deps": ["pipeline/report.py"]}
    assert "pipeline/plots.py" in uncovered_code(stage)


def find_cycle(graph: dict[str, frozenset[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> imported modules) as a path, or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    # A package imports its modules and every module sits in its package: only module-to-module edges count.
    graph = {module: frozenset(m for m in imports_of(module) if m != module and m not in parents(module))
             for module in project_modules()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert find_cycle({"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"})}) == ["a", "b", "c", "a"]


def test_layers_import_only_what_design_allows():
    for module in project_modules():
        layer = module.split(".")[0]
        reached = {name.split(".")[0] for name in imports_of(module)} - {layer}
        allowed = {"model": set(), "preprocessing": set(), "pipeline": {"model", "preprocessing"}}[layer]
        assert reached <= allowed, f"{module_file(module)} imports {reached - allowed}"
    for path in (ROOT / "model").rglob("*.py"):  # the model library needs torch and nothing else
        tree = ast.parse(path.read_text())
        third_party = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                       for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                                   if isinstance(node, ast.ImportFrom) and not node.level}
        assert third_party <= {"torch", "__future__", *sys.stdlib_module_names, "model"}, f"{path}: {third_party}"


# pipeline/ by concern (README, "What is where"): the shared base, the entry modules, and three sub-packages whose
# arrows run one way, base <- data <- train <- predict. Each part may import these parts of pipeline (itself included).
ENTRY_MODULES = {"cli", "prepare", "report", "face_report", "ablations"}
PART_MAY_IMPORT = {
    "base": {"base"},
    "data": {"base", "data"},
    "train": {"base", "data", "train"},
    "predict": {"base", "data", "train", "predict"},
    "entry": {"base", "data", "train", "predict", "entry"},
}
# What prediction may take from training: the forward over a clip's windows, loading an exported model, and the
# step's device settings; never the loop, Ray Train or the optimiser.
PREDICT_USES_OF_TRAIN = {"pipeline.train", "pipeline.train.evaluation", "pipeline.train.export",
                         "pipeline.train.compiled"}


def part_of(module: str) -> str:
    """``base``, ``entry``, ``config`` counted as base, or the sub-package (``data``, ``train``, ``predict``)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "base"
    if parts[1] in {"data", "train", "predict"}:
        return parts[1]
    return "entry" if parts[1] in ENTRY_MODULES else "base"


def arrows_against_the_parts(graph: dict[str, frozenset[str]]) -> list[str]:
    wrong = []
    for module, targets in graph.items():
        for target in targets:
            if target.split(".")[0] == "pipeline" and part_of(target) not in PART_MAY_IMPORT[part_of(module)]:
                wrong.append(f"{module} -> {target}")
            elif part_of(module) == "predict" and part_of(target) == "train" and target not in PREDICT_USES_OF_TRAIN:
                wrong.append(f"{module} -> {target}")
    return sorted(wrong)


def test_pipeline_parts_import_one_way():
    graph = {module: imports_of(module) for module in project_modules() if module.startswith("pipeline.")}
    assert not arrows_against_the_parts(graph), f"imports against pipeline/'s parts: {arrows_against_the_parts(graph)}"
    # the check sees an arrow back up and one between sub-packages the wrong way
    assert arrows_against_the_parts({"pipeline.layout": frozenset({"pipeline.data.sampling"}),
                                     "pipeline.data.windows": frozenset({"pipeline.train.loop"}),
                                     "pipeline.predict.video": frozenset({"pipeline.train.loop"}),
                                     "pipeline.train.loop": frozenset({"pipeline.cli"})}) == [
        "pipeline.data.windows -> pipeline.train.loop", "pipeline.layout -> pipeline.data.sampling",
        "pipeline.predict.video -> pipeline.train.loop", "pipeline.train.loop -> pipeline.cli"]
    # one-video prediction runs without the training loop, Ray Train or the optimiser
    reached = closure("pipeline.predict.video")
    assert not reached & {"pipeline.train.loop", "pipeline.train.raytrain", "pipeline.train.optim"}, reached
    assert {"pipeline.train.evaluation", "pipeline.train.export"} <= reached


def test_project_root_is_defined_once():
    definitions = [path.relative_to(ROOT).as_posix() for path in (ROOT / "pipeline").rglob("*.py")
                   if "\nPROJECT_ROOT = " in path.read_text()]
    assert definitions == ["pipeline/layout.py"], definitions


def test_stages_depend_on_the_params_that_change_their_results():
    """A training stage depends on its own section and the scaling fields that change results (the global batch,
    the device), not on how it runs (CPUs, loader processes, retries, folds at once); params.yaml holds each of
    them (DVC needs a listed key to exist)."""
    from pipeline.config.params import RESULT_FIELDS, ScalingSettings

    stages = dvc_stages()
    params_file = yaml.safe_load((ROOT / "params.yaml").read_text())
    result_keys = {f"scaling.{name}" for name in RESULT_FIELDS}
    for name, section in (("pretrain", "pretrain"), ("finetune", "finetune")):
        assert set(stages[name]["params"]) == {section} | result_keys, name
    assert stages["preprocess"]["params"] == ["preprocess"]
    assert "params" not in stages["manifest"] and "params" not in stages["report"]  # roots and names: not results
    assert result_keys <= {f"scaling.{key}" for key in params_file["scaling"]}
    run_only = set(ScalingSettings.model_fields) - set(RESULT_FIELDS)
    assert {"cpus_per_worker", "loader_workers", "max_failures", "concurrent_folds"} <= run_only
