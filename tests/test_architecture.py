"""The house rules: layering contracts, one source for every trigger parameter, DAG edges that
follow the data, and names defined once (ARCHITECTURE.md)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", str(root / "pyproject.toml")],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_layering_contracts_hold():
    res = _lint_imports(REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "3 kept, 0 broken" in res.stdout


@pytest.mark.parametrize("module,wrong", [
    # a stage reaching into another stage
    ("fracture_ops/inference/features.py", "from fracture_ops.training import datasets"),
    # Airflow outside orchestration/
    ("fracture_ops/evaluation/metrics.py", "import airflow.sdk"),
    # the data layer reaching up to the model
    ("fracture_ops/data/manifest.py", "from fracture_ops.model import outputs"),
])
def test_a_wrong_import_breaks_the_contracts(tmp_path, module, wrong):
    """The contracts catch what they claim to: a copy of the package with one wrong import."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "fracture_ops", root / "fracture_ops",
                    ignore=shutil.ignore_patterns("__pycache__", "*.json"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    target = root / module
    target.write_text(target.read_text(encoding="utf-8") + f"\n{wrong}  # noqa\n", encoding="utf-8")
    res = _lint_imports(root)
    assert res.returncode != 0
    assert "BROKEN" in res.stdout, res.stdout[-2000:]


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def test_trigger_params_equal_the_step_configs():
    """Every trigger parameter of every DAG has the default, type, bounds, choices and
    description of the step config field it sets; the stored forms are what the configs
    generate; and each parameter reaches its step as that field's own CLI flag."""
    from fracture_ops.cli import build_parser
    from fracture_ops.config import default_artifact_root, field_schema
    from fracture_ops.orchestration import params as P
    from fracture_ops.orchestration.specs import (DRIFT_STEPS, INFERENCE_STEPS, PACS_STEPS, PROMOTION_STEPS,
                                                  TRAINING_STEPS)

    stored = json.loads(P.FORMS_FILE.read_text(encoding="utf-8"))
    assert stored == P.generate_forms(), "run: python -m fracture_ops.orchestration.params"
    from tests.test_dags import _dagbag

    bag = _dagbag()
    assert bag.import_errors == {}
    specs = {"fracture_training": TRAINING_STEPS, "fracture_inference": INFERENCE_STEPS,
             "fracture_drift": DRIFT_STEPS, "fracture_promotion": PROMOTION_STEPS,
             "fracture_pacs_ingest": PACS_STEPS}
    checked = 0
    for dag_id, fields in P.dag_fields().items():
        dag_params = bag.dags[dag_id].params
        assert set(dag_params) == set(fields) | set(P.DAG_ONLY.get(dag_id, {})), dag_id
        for name, (cls, field) in fields.items():
            param = dag_params.get_param(name)
            want = field_schema(cls, field)
            default = cls.model_fields[field].get_default(call_default_factory=True)
            if name == "artifact_root":
                default = default_artifact_root()
            if name == "raw_root":
                default = os.environ.get("FRACTURE_OPS_RAW_ROOT", "")
            assert param.value == default, (dag_id, name)
            for key in ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                        "enum", "examples"):
                assert param.schema.get(key) == want.get(key), (dag_id, name, key)
            assert param.description.rstrip(".") == want["description"].rstrip("."), (dag_id, name)
            # one channel: the step's argument list passes the parameter as the field's flag
            # (or as the positional after "--", or as a common option)
            users = [s for s in specs[dag_id].values() if any(f"params.{name}" in a for a in s.args)]
            assert users, f"{dag_id}: no step reads params.{name}"
            for spec in users:
                at = next(i for i, a in enumerate(spec.args) if f"params.{name}" in a)
                before = spec.args[at - 1]
                common = {"artifact_root": "--artifact-root", "raw_root": "--raw-root"}
                if name in common:
                    assert common[name] in spec.args, (spec.name, name)
                    continue
                if "--" in spec.args and at > spec.args.index("--"):
                    continue  # the positional (source_uri, incoming_uri)
                if spec.args[at].startswith(f"{{{{ '{_flag(field)}' if"):
                    pass  # a boolean: the argument renders to the field's --flag or --no-flag
                else:
                    assert before == _flag(field), (spec.name, name, before)
                # and that flag is the one generated from the same field (type and choices)
                parser = build_parser(only=spec.args[0])
                sub = parser._subparsers._group_actions[0].choices[spec.args[0]]
                if spec.args[0] == "detect":
                    sub = sub._subparsers._group_actions[0].choices[spec.args[1]]
                action = next(a for a in sub._actions if _flag(field) in a.option_strings)
                assert action.dest == field and action.choices == want.get("enum"), (spec.name, field)
            checked += 1
    assert checked >= 15


def test_dag_edges_follow_the_data():
    """Each run-folder file a step's arguments name is an output of a step it declares it
    reads; the DAG's edges are exactly those reads."""
    from fracture_ops.orchestration.specs import INFERENCE_STEPS, TRAINING_STEPS

    for steps in (TRAINING_STEPS, INFERENCE_STEPS):
        for spec in steps.values():
            for arg in spec.args:
                for step, rest in re.findall(r"/runs/\{\{[^}]*\}\}/(\w+)((?:/[\w.]+)?)", arg):
                    assert step in spec.reads, (spec.name, step)
                    if rest:
                        assert f"{step}{rest}" in steps[step].outputs, (spec.name, step, rest)
            assert set(spec.reads) <= set(steps), spec.name
            for name, task, _ in spec.inputs:
                assert task in spec.reads, (spec.name, name)


def test_the_inference_pod_gets_the_model_uri_from_the_reference_summary():
    from tests.test_security import _all_step_pods

    pods = _all_step_pods()
    (c,) = [c for c in pods["infer_plan"]["spec"]["containers"] if c["name"] == "base"]
    args = c["args"]
    assert args[args.index("--model-uri") + 1] == "models:/fracture-classifier/3"
    assert not any("xcom_pull" in a for a in args)
    # each shard's pod reads that pinned version from this run's plan, never an alias
    (c,) = [c for c in pods["infer"]["spec"]["containers"] if c["name"] == "base"]
    args = c["args"]
    assert "--model-uri" not in args and args[args.index("--shard") + 1] == "0"
    assert args[args.index("--plan") + 1].endswith("/runs/manual__2026-01-01T00-00-00-00-00/infer_plan/plan.json")


def test_registry_names_are_defined_once():
    hits = [str(p.relative_to(REPO)) for p in (REPO / "fracture_ops").rglob("*.py")
            for line in p.read_text(encoding="utf-8").splitlines() if '"fracture-classifier"' in line]
    assert hits == ["fracture_ops/registry/client.py"]
    for alias in ('"champion"', '"challenger"'):
        defs = [str(p.relative_to(REPO)) for p in (REPO / "fracture_ops").rglob("*.py")
                for line in p.read_text(encoding="utf-8").splitlines()
                if re.match(rf"\s*[A-Z_, ]+ = .*{alias}", line)]
        assert defs == ["fracture_ops/registry/client.py"], (alias, defs)


def test_the_decision_rule_is_written_once():
    """Only model/outputs.py turns probabilities into decisions (a threshold comparison or an
    arg-max over classes); every consumer calls it."""
    import io
    import tokenize

    def code_only(path: Path) -> str:  # the source without strings and comments
        toks = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
        return " ".join(t.string for t in toks if t.type not in (tokenize.STRING, tokenize.COMMENT))

    pattern = re.compile(r"(>=\s*(np\s*\.\s*asarray\s*\(\s*)?(self\s*\.\s*)?thresholds?\b"
                         r"|argmax\s*\(\s*(axis\s*=\s*)?1\s*\)\s*(==|\]|\[))")
    found = sorted({str(p.relative_to(REPO)) for p in (REPO / "fracture_ops").rglob("*.py")
                    if pattern.search(code_only(p))})
    assert found == ["fracture_ops/model/outputs.py"], found


def test_model_files_are_written_and_read_in_one_place():
    """``torch.load`` is called only in model/checkpoint.py (weights only, nothing runs), and
    ``model.pt`` is named only in model/network.py (``MODEL_FILE``, with ``save_model`` and
    ``load_model``, which every writer and reader of a trained model uses)."""
    import ast

    loads, names = set(), set()
    for path in (REPO / "fracture_ops").rglob("*.py"):
        rel = str(path.relative_to(REPO))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef
                                    | ast.AsyncFunctionDef)
                      and n.body and isinstance(n.body[0], ast.Expr)
                      and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == "load"
                    and isinstance(node.value, ast.Name) and node.value.id == "torch"):
                loads.add(rel)
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and "model.pt" in node.value and id(node) not in docstrings
                    and node.value.strip() == "model.pt"):
                names.add(rel)
    assert loads == {"fracture_ops/model/checkpoint.py"}, loads
    assert names == {"fracture_ops/model/network.py"}, names


def test_the_raw_root_form_default_follows_the_environment(monkeypatch):
    from fracture_ops.orchestration.params import dag_params

    monkeypatch.setenv("FRACTURE_OPS_RAW_ROOT", "s3://site-raw-zone")
    assert dag_params("fracture_training")["raw_root"]["default"] == "s3://site-raw-zone"
    monkeypatch.delenv("FRACTURE_OPS_RAW_ROOT")
    assert dag_params("fracture_training")["raw_root"]["default"] == ""
