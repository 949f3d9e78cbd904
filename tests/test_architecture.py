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
    ``model.pt`` is named only in the catalog (``catalog.MODEL``), whose name model/network.py's
    ``save_model`` and ``load_model`` use (every writer and reader of a trained model does)."""
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
    assert names == {"fracture_ops/catalog.py"}, names
    from fracture_ops import catalog
    from fracture_ops.model import network

    assert network.MODEL_FILE == catalog.MODEL.file


def test_the_raw_root_form_default_follows_the_environment(monkeypatch):
    from fracture_ops.orchestration.params import dag_params

    monkeypatch.setenv("FRACTURE_OPS_RAW_ROOT", "s3://site-raw-zone")
    assert dag_params("fracture_training")["raw_root"]["default"] == "s3://site-raw-zone"
    monkeypatch.delenv("FRACTURE_OPS_RAW_ROOT")
    assert dag_params("fracture_training")["raw_root"]["default"] == ""


def test_environment_variable_names_are_spelled_once():
    """Every ``FRACTURE_OPS_*`` name the package or the DAGs read or set is a constant of
    fracture_ops/envvars.py: no string constant elsewhere is such a name (prose that mentions
    one is documentation). Each constant there is used."""
    import ast

    from fracture_ops import envvars

    name = re.compile(r"FRACTURE_OPS_[A-Z0-9_]+")
    spelled, used = {}, set()
    for path in [*(REPO / "fracture_ops").rglob("*.py"), *(REPO / "dags").rglob("*.py")]:
        rel = str(path.relative_to(REPO))
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and name.fullmatch(node.value):
                spelled.setdefault(rel, set()).add(node.value)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "envvars":
                used.add(node.attr)
    assert set(spelled) == {"fracture_ops/envvars.py"}, spelled
    constants = {k for k, v in vars(envvars).items() if isinstance(v, str) and name.fullmatch(v)}
    assert spelled["fracture_ops/envvars.py"] == {getattr(envvars, k) for k in constants}
    assert constants - used == set(), constants - used


def test_artifact_names_are_spelled_in_the_catalog_only():
    """A file that one step writes and another reads is a catalog entry: no string constant
    outside fracture_ops/catalog.py is such a file's name (those few whose names other files
    share too, report.json and the like, are matched by their ``<step>/<file>`` path), and the
    specs' outputs are the catalog's."""
    import ast
    from collections import Counter

    from fracture_ops import catalog
    from fracture_ops.orchestration import specs

    entries = catalog.artifacts()
    shared = {"report.json", "summary.json", "report.html", "metrics.json", "manifest.parquet",
              "boxes.parquet"}  # also the names of files outside the catalog's steps
    count = Counter(a.file for a in entries)
    own = {a.file for a in entries if count[a.file] == 1 and a.file not in shared}
    paths = {a.path for a in entries}
    assert len(own) >= 14 and len(paths) == len(entries), (own, paths)
    found = set()
    for path in [*(REPO / "fracture_ops").rglob("*.py"), *(REPO / "dags").rglob("*.py")]:
        rel = str(path.relative_to(REPO))
        if rel == "fracture_ops/catalog.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                v = node.value
                if v in own or v in paths or any(v.endswith("/" + p) for p in paths):
                    found.add((rel, node.lineno, v))
    assert found == set(), sorted(found)
    for table in (specs.TRAINING_STEPS, specs.INFERENCE_STEPS, specs.PACS_STEPS):
        for spec in table.values():
            assert set(spec.outputs) == set(catalog.outputs_of(spec.name)), spec.name


TOY_STEP = '''"""A toy step for the architecture test: copies the de-identified manifest unchanged."""

from __future__ import annotations

import argparse
from typing import ClassVar

from fracture_ops import catalog, storage
from fracture_ops.config import StepConfig, write_resolved


class DenoiseConfig(StepConfig):
    section: ClassVar[str] = "denoise"
    manifest_uri: str = ""


def denoise_step(cfg: DenoiseConfig) -> dict:
    out = cfg.output_dir(catalog.DENOISED.step)
    storage.reset_dir(out)
    uri = storage.write_parquet(storage.join(out, catalog.DENOISED.file),
                                storage.read_parquet(cfg.manifest_uri))
    write_resolved(cfg, out)
    summary = {"manifest_uri": uri}
    storage.mark_success(out, summary)
    return summary


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from fracture_ops.cli_common import add_common_args

    parser.add_argument("manifest", help="de-identified manifest Parquet")
    add_common_args(parser)


def run_cli(args: argparse.Namespace) -> dict:
    from fracture_ops.cli_common import config_from_args

    return denoise_step(config_from_args(DenoiseConfig, args, manifest_uri=args.manifest))
'''

TOY_CATALOG = '''
DENOISED = Artifact("denoise", "manifest.denoised.parquet", "parquet", about="toy step output")
COMMANDS["denoise"] = Command("fracture_ops.data.denoise", "toy: copy the manifest",
                              "fracture-ops denoise MANIFEST --run-id r1")
INPUTS["denoise"] = DEID_MANIFEST
INPUTS["split"] = DENOISED
'''

TOY_TEST = '''from fracture_ops.data.denoise import DenoiseConfig, denoise_step


def test_denoise_copies_the_manifest(tmp_path):
    import pandas as pd

    pd.DataFrame({"image_id": ["a"]}).to_parquet(tmp_path / "m.parquet")
    out = denoise_step(DenoiseConfig(manifest_uri=str(tmp_path / "m.parquet"),
                                     artifact_root=str(tmp_path), run_id="r"))
    assert pd.read_parquet(out["manifest_uri"])["image_id"].tolist() == ["a"]
'''


def test_a_middle_step_touches_four_files(tmp_path):
    """ARCHITECTURE.md's "a step in the middle": a toy ``denoise`` between ``deidentify`` and
    ``split``, added to a copy of the package, touches its module, its catalog entries, its spec
    and its test, nothing else; then its command runs, the demo and the DAG order it between
    the two, and the DAG tests and the data-edge test pass on the copy."""
    copy = tmp_path / "repo"
    for part in ("fracture_ops", "dags", "tests", "pyproject.toml"):
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, copy / part)
    git = ["git", "-C", str(copy), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    # the four edits a developer makes
    (copy / "fracture_ops" / "data" / "denoise.py").write_text(TOY_STEP)
    with open(copy / "fracture_ops" / "catalog.py", "a") as f:
        f.write(TOY_CATALOG)
    specs = copy / "fracture_ops" / "orchestration" / "specs.py"
    text = specs.read_text()
    split = ('    _spec("split", "split", "--seed", "{{ params.seed }}", '
             'pos=(at(C.input_of("split")),),\n'
             '          outputs=C.outputs_of("split"), reads=("deidentify",)),\n')
    assert split in text
    specs.write_text(text.replace(split, (
        '    _spec("denoise", "denoise", pos=(at(C.input_of("denoise")),), reads=("deidentify",),\n'
        '          outputs=C.outputs_of("denoise")),\n' + split.replace('"deidentify"', '"denoise"'))))
    (copy / "tests" / "test_denoise.py").write_text(TOY_TEST)
    status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True,
                            check=True).stdout.split("\n")
    touched = sorted(line[3:] for line in status if line.strip())
    assert touched == ["fracture_ops/catalog.py", "fracture_ops/data/denoise.py",
                       "fracture_ops/orchestration/specs.py", "tests/test_denoise.py"], touched
    env = {**os.environ, "PYTHONPATH": str(copy)}
    run = subprocess.run([sys.executable, "-m", "fracture_ops.cli", "denoise", "--help"], cwd=copy,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "toy: copy the manifest" in run.stdout, run.stderr[-2000:]
    probe = ("from fracture_ops.orchestration import demo, specs; import json; "
             "from fracture_ops.data.split import SplitConfig, split_step\n"
             "s = specs.TRAINING_STEPS\n"
             "try:\n    split_step(SplitConfig(artifact_root='/nonexistent', run_id='r1'))\n"
             "except Exception as e:\n    err = str(e)\n"
             "print(json.dumps([demo.DATA_STEPS, list(s['split'].args), list(s['denoise'].outputs),"
             " err]))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    data_steps, split_args, outputs, by_hand = json.loads(run.stdout)
    assert data_steps == ["ingest", "validate", "deidentify", "denoise", "split"]
    assert "step 'denoise' of run 'r1' has not finished" in by_hand  # a manual chain follows
    assert split_args[-1].endswith("/denoise/manifest.denoised.parquet")
    assert outputs == ["denoise/manifest.denoised.parquet"]
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "tests/test_denoise.py", "tests/test_dags.py",
         "tests/test_architecture.py::test_dag_edges_follow_the_data",
         "tests/test_architecture.py::test_artifact_names_are_spelled_in_the_catalog_only",
         "-k", "not light_and_fast"],
        cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert tests.returncode == 0, tests.stdout[-3000:]


def test_commands_live_in_modules_named_after_them_or_in_the_documented_exceptions():
    """Each catalog command's module is named after it, or the command is in ARCHITECTURE.md's
    table of exceptions (with that module); the functions the catalog names exist there."""
    import importlib

    from fracture_ops import catalog

    text = (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8")
    documented = dict(re.findall(r"^\| `([a-z-]+)` \| `([\w/]+)\.py` \|", text, re.M))
    actual = {}
    for name, cmd in catalog.COMMANDS.items():
        module = importlib.import_module(cmd.module)
        assert callable(getattr(module, cmd.configure)) and callable(getattr(module, cmd.run)), name
        if cmd.module.rsplit(".", 1)[1] != name.replace("-", "_"):
            actual[name] = cmd.module.removeprefix("fracture_ops.").replace(".", "/")
    assert actual == documented


def test_calibration_and_thresholds_are_read_in_one_place():
    """The calibrator and the thresholds a model applies are read only through
    model/documents.py (``read_calibrator``, ``read_thresholds``): the steps and the packaged
    model alike."""
    hits = sorted({str(p.relative_to(REPO)) for p in (REPO / "fracture_ops").rglob("*.py")
                   if "Calibrator.from_dict(" in p.read_text(encoding="utf-8")})
    assert hits == ["fracture_ops/model/documents.py"], hits
    pyfunc = (REPO / "fracture_ops" / "model" / "pyfunc.py").read_text(encoding="utf-8")
    assert "read_calibrator(" in pyfunc and "read_thresholds(" in pyfunc and "json.load" not in pyfunc
