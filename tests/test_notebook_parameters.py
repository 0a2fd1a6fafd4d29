"""Each regime notebook's parameters cell: written once, every name collected, every setting read.

The notebooks open their run with ``session.start("<regime>", globals())``; these tests read the real
``parameters`` cells (nbformat), execute them, and follow their names into ``config.resolve``.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path

import nbformat
import pytest

from transferstudy import config, regimes, session
from transferstudy.runner import NOTEBOOK_DIR, NOTEBOOKS

REGIMES = config.NOTEBOOKS  # the regimes and the analyses
SESSION_SOURCE = Path(session.__file__)
REGIMES_SOURCE = Path(regimes.__file__)
CONFIG_SOURCE = Path(config.__file__)
CHECKS_EVERY_SETTING = {"resolve", "check_value", "check_overrides"}  # config's checks look at settings they do not use


def notebook(regime: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / NOTEBOOKS[regime], as_version=4)


def parameters_cell(regime: str) -> str:
    cells = [c for c in notebook(regime).cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{NOTEBOOKS[regime]} needs exactly one cell tagged `parameters`"
    return cells[0].source


def cell_namespace(regime: str) -> dict:
    """What the parameters cell defines, executed as papermill's kernel would."""
    namespace: dict = {}
    exec(parameters_cell(regime), namespace)
    namespace.pop("__builtins__")
    return namespace


def later_code(regime: str) -> str:
    return "\n".join(c.source for c in notebook(regime).cells
                     if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", []))


def quiet(_line: str) -> None:
    pass


class Resolved(Exception):
    """Raised by the spy once session.start has handed its overrides to config.resolve."""


def spy_on_resolve(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Record the first config.resolve call that carries overrides, and stop the run there."""
    real, seen = config.resolve, {}

    def resolve(regime, model, dataset, profile="full", overrides=None):
        if not overrides:  # config.settings asks for each model x dataset without overrides
            return real(regime, model, dataset, profile, overrides)
        seen.update(regime=regime, model=model, dataset=dataset, profile=profile, overrides=dict(overrides))
        raise Resolved

    monkeypatch.setattr(config, "resolve", resolve)
    return seen


def small_run(namespace: dict, cifar_dir: Path, tmp_path: Path, **settings) -> dict:
    """``namespace`` set up for a smoke run of AlexNet (random init) on the synthetic CIFAR images."""
    return {**namespace, "profile": "smoke", "data_dir": str(cifar_dir), "output_dir": str(tmp_path / "run"),
            "cache_dir": str(tmp_path / "cache"), "pretrained": False, "n_train": 6, "n_val": 4, "n_test": 4,
            **settings}


# --- the cell defines exactly what the run collects ------------------------------------------------


@pytest.mark.parametrize("regime", REGIMES)
def test_the_cell_defines_the_run_names_and_every_setting_the_regime_reads(regime):
    defined = set(cell_namespace(regime))
    expected = config.notebook_names(regime)
    assert not expected - defined, f"missing from the parameters cell of {NOTEBOOKS[regime]}"
    assert not defined - expected, f"not parameters of the {regime} regime, yet in its cell"


@pytest.mark.parametrize("regime", REGIMES)
def test_every_name_of_the_cell_is_collected(regime):
    namespace = cell_namespace(regime)
    args = config.from_namespace(regime, namespace)
    overrides = args.pop("overrides")
    assert args == {name: namespace[name] for name in config.run_names(regime)}
    assert overrides == {name: value for name, value in namespace.items() if name not in args}
    assert set(overrides) <= config.settings(regime)


@pytest.mark.parametrize("regime", REGIMES)
def test_start_hands_every_setting_of_the_cell_to_resolve(regime, monkeypatch):
    namespace = cell_namespace(regime)
    marked = {name: f"set:{name}" for name in namespace if name not in config.run_names(regime)}
    seen = spy_on_resolve(monkeypatch)
    with pytest.raises(Resolved):
        session.start(regime, {**namespace, **marked, "model": "deit_base", "dataset": "ferplus", "profile": "quick"})
    assert seen == {"regime": regime, "model": "deit_base", "dataset": "ferplus", "profile": "quick",
                    "overrides": marked}


@pytest.mark.parametrize("regime", REGIMES)
def test_the_cell_as_written_keeps_the_profiles_values(regime):
    args = config.from_namespace(regime, cell_namespace(regime))
    assert set(args["overrides"].values()) == {None}
    assert (config.resolve(regime, args["model"], args["dataset"], args["profile"], args["overrides"])
            == config.resolve(regime, args["model"], args["dataset"], args["profile"]))


def test_a_value_set_in_the_namespace_reaches_the_run_settings(cifar_dir, tmp_path):
    namespace = small_run(cell_namespace("linear_probe"), cifar_dir, tmp_path, lr=0.5, eval_batch_size=3)
    run = session.start("linear_probe", namespace, log=quiet)
    assert (run.cfg["lr"], run.cfg["eval_batch_size"]) == (0.5, 3)
    params = json.loads((tmp_path / "run" / "params.json").read_text())
    assert (params["lr"], params["eval_batch_size"], params["n_train"]) == (0.5, 3, 6)
    assert len(run.data.train) == 6


def test_a_new_setting_reaches_the_run_with_no_edit_but_the_yaml_and_the_cell(cifar_dir, tmp_path, monkeypatch):
    data = copy.deepcopy(config._load())
    data["regimes"]["linear_probe"]["all"]["head_dropout"] = 0.0  # a setting that does not exist yet
    monkeypatch.setattr(config, "_load", lambda: data)
    namespace = small_run(cell_namespace("linear_probe"), cifar_dir, tmp_path, head_dropout=0.25)
    run = session.start("linear_probe", namespace, log=quiet)
    assert run.cfg["head_dropout"] == 0.25
    assert json.loads((tmp_path / "run" / "params.json").read_text())["head_dropout"] == 0.25


def test_the_classical_source_dir_is_collected_and_recorded(cifar_dir, tmp_path):
    namespace = small_run(cell_namespace("classical"), cifar_dir, tmp_path, source_dir=str(tmp_path / "full"))
    assert config.from_namespace("classical", namespace)["source_dir"] == str(tmp_path / "full")
    session.start("classical", namespace, log=quiet)
    assert json.loads((tmp_path / "run" / "params.json").read_text())["source_dir"] == str(tmp_path / "full")


# --- nothing is silently ignored -------------------------------------------------------------------


@pytest.mark.parametrize(("regime", "name", "value"), [
    ("linear_probe", "lr_head", 0.1),      # a setting of the fine-tunes, not of the probe
    ("frozen_svm", "epochs", 3),           # the SVM does not train epochs
    ("partial", "source_dir", "runs/x"),   # only the classical regime reads another run
    ("full", "regime", "partial"),         # the notebook decides its regime
])
def test_a_name_of_another_regime_in_the_namespace_is_an_error(regime, name, value):
    namespace = {**cell_namespace(regime), name: value}
    with pytest.raises(config.ConfigError, match=rf"{name}={value!r} is not a parameter of the {regime} regime.*"
                                                 r"remove it"):
        config.from_namespace(regime, namespace)


def test_other_names_of_the_notebook_are_not_parameters():
    # what a kernel holds besides the parameters: IPython's names, modules, the notebook's later variables
    namespace = {**cell_namespace("frozen_svm"), "In": [], "Out": {}, "_i1": "x", "session": session,
                 "cfg": {}, "TITLE": "t", "metrics": {}}
    assert config.from_namespace("frozen_svm", namespace)["overrides"] == {
        name: None for name in config.notebook_names("frozen_svm") - set(config.run_names("frozen_svm"))}


@pytest.mark.parametrize("missing", ["model", "dataset"])
def test_a_namespace_without_model_or_dataset_is_an_error(missing):
    namespace = cell_namespace("partial")
    del namespace[missing]
    with pytest.raises(config.ConfigError, match=f"defines no {missing}; its parameters cell must set {missing} ="):
        config.from_namespace("partial", namespace)


def test_a_namespace_and_keywords_together_are_refused():
    with pytest.raises(TypeError, match=r"start\('full', namespace, model=\.\.\.\): .*either as a namespace"):
        session.start("full", cell_namespace("full"), model="alexnet")


def test_keywords_still_need_model_and_dataset():
    with pytest.raises(TypeError, match=r"start\('full'\) needs dataset="):
        session.start("full", model="alexnet")


def test_an_unread_setting_set_anyway_is_reported(cifar_dir, tmp_path):
    lines: list[str] = []
    session.start("frozen_svm", small_run(cell_namespace("frozen_svm"), cifar_dir, tmp_path, batch_size=16),
                  log=lines.append)
    assert any(line.startswith("note: batch_size=16 has no effect on the frozen_svm regime: the frozen SVM "
                               "trains no network") for line in lines)


# --- every parameter of a cell is read, every left-out setting is not ------------------------------


def _is_cfg(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "cfg") or (isinstance(node, ast.Attribute) and node.attr == "cfg")


def _session_functions() -> dict[str, tuple[set[str], set[str]]]:
    """Each function of session.py -> (the settings it reads from cfg, the ``self.`` names it uses), and each
    function of regimes.py and config.py that session.py hands its settings to, as ``regimes.<name>``."""
    functions = {}
    for source, prefix in ((SESSION_SOURCE, ""), (REGIMES_SOURCE, "regimes."), (CONFIG_SOURCE, "config.")):
        for node in ast.walk(ast.parse(source.read_text())):
            if not isinstance(node, ast.FunctionDef) or (prefix == "config." and node.name in CHECKS_EVERY_SETTING):
                continue
            reads, uses = set(), set()
            for sub in ast.walk(node):
                if isinstance(sub, ast.Subscript) and _is_cfg(sub.value) and isinstance(sub.slice, ast.Constant):
                    reads.add(sub.slice.value)  # cfg["x"], self.cfg["x"]
                elif (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr == "get"
                      and _is_cfg(sub.func.value) and sub.args and isinstance(sub.args[0], ast.Constant)):
                    reads.add(sub.args[0].value)  # cfg.get("x", default)
                elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                    uses.add(sub.attr)
                elif (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name)
                      and sub.value.id in ("regimes", "config")):
                    uses.add(f"{sub.value.id}.{sub.attr}")  # regimes.optimizer(net, ..., self.cfg)
            functions[prefix + node.name] = (reads, uses)
    return functions


def settings_read(regime: str) -> set[str]:
    """The settings a run of ``regime`` reads: in its notebook's code, and in the session code it calls."""
    code = later_code(regime)
    reads = set(re.findall(r'cfg\[\s*"(\w+)"\s*\]', code)) | set(re.findall(r'cfg\.get\(\s*"(\w+)"', code))
    functions, seen = _session_functions(), set()
    todo = ["start", *re.findall(r"\b(?:\w+_)?run\.(\w+)", code)]  # run, and sessions named like svm_run
    while todo:
        name = todo.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        reads |= functions[name][0]
        todo.extend(functions[name][1])
    return reads


@pytest.mark.parametrize("regime", REGIMES)
def test_every_setting_in_the_cell_is_read_by_the_run(regime):
    in_cell = set(cell_namespace(regime)) - set(config.run_names(regime))
    assert in_cell - settings_read(regime) == set()


@pytest.mark.parametrize("regime", REGIMES)
def test_the_settings_left_out_of_a_cell_are_real_unread_and_explained(regime):
    left_out = config.NOT_IN_NOTEBOOK.get(regime, {})
    assert set(left_out) <= config.settings(regime)
    assert set(left_out) & settings_read(regime) == set(), "read by the run: list it in the parameters cell"
    assert all(len(reason) > 20 for reason in left_out.values())


@pytest.mark.parametrize("name", ["val_source", "eval_mode", "image_size", "micro_batch_size", "eval_batch_size"])
def test_settings_once_dropped_by_papermill_are_parameters_where_they_apply(name):
    with_it = {regime for regime in REGIMES if name in cell_namespace(regime)}
    applies = {regime for regime in REGIMES if name in settings_read(regime)}
    assert with_it == applies
    assert with_it >= {"linear_probe", "partial", "full"}
