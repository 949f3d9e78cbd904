"""Security rules of the pipeline's inputs (issue: identifiers at rest, injected flags, weak
secrets, files outside the data roots): each test plays the attacker and checks that the attempt
fails and changes nothing."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from fracture_ops import storage
from fracture_ops.cli import main as cli_main
from fracture_ops.orchestration.params import defaults
from fracture_ops.orchestration.specs import INFERENCE_STEPS, TRAINING_STEPS, render_args

SECRET = "security-test-secret-0123456789abcdef"


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def tiny_source(tmp_path):
    from fracture_ops.data.synthetic import SynthConfig, synth_step

    cfg = SynthConfig(out_dir=str(tmp_path / "source"), n_patients=4, image_size=64, seed=1)
    synth_step(cfg)
    return Path(cfg.out_dir)


@pytest.fixture
def attacker_config(tmp_path):
    """The config an attacker would like a step to load: it switches a de-identification
    option on and moves the prediction log."""
    path = tmp_path / "x.yaml"
    path.write_text("deidentify:\n  retain_patient_characteristics: true\n"
                    "infer:\n  prediction_log_uri: /tmp/elsewhere\n")
    return path


@pytest.mark.parametrize("step,param", [("ingest", "source_uri"), ("infer_plan", "incoming_uri"),
                                        ("infer", "incoming_uri")])
def test_a_flag_in_a_trigger_param_is_refused_and_changes_nothing(tmp_path, monkeypatch,
                                                                   attacker_config, step, param,
                                                                   capsys):
    monkeypatch.setenv("FRACTURE_OPS_DEID_SECRET", SECRET)
    monkeypatch.chdir(tmp_path)
    art = tmp_path / "artifacts"
    value = f"--config={attacker_config}"
    params = defaults(artifact_root=str(art)) | {"incoming_uri": "/data/in", param: value}
    spec = (TRAINING_STEPS | INFERENCE_STEPS)[step]
    ti = SimpleNamespace(xcom_pull=lambda task_ids=None, **kw: {"model_version": "3", "model_uri": "models:/fracture-classifier/3"})
    args = render_args(spec, {"params": params | {"shards": 2}, "run_id": "manual__x",
                              "ds": "2026-11-20", "ti": ti,
                              "inputs": {"model_uri": "models:/fracture-classifier/3", "shard": 0}})
    # the value travels as a positional after "--", never as a flag
    assert args[args.index("--") + 1] == value and args.count("--") == 1
    before = _files(tmp_path)
    assert cli_main(args) == 2
    assert "starts with '-'" in capsys.readouterr().err
    assert _files(tmp_path) == before  # nothing written, nothing moved


def test_without_the_separator_the_same_value_would_have_been_a_flag():
    """The control: argparse reads the value as --config when it is not after "--"."""
    from fracture_ops.cli import build_parser

    parsed = build_parser(only="ingest").parse_args(["ingest", "--config=/tmp/x.yaml"])
    assert parsed.config == "/tmp/x.yaml" and parsed.source is None


@pytest.mark.parametrize("uri,roots,ok", [
    ("/data/in/a.png", ["/data/in"], True),
    ("/data/in/sub/../a.png", ["/data/in"], True),
    ("/etc/passwd", ["/data/in"], False),
    ("/data/in/../../etc/passwd", ["/data/in"], False),
    ("/data/incoming/a.png", ["/data/in"], False),  # a sibling sharing the prefix
    ("s3://raw/site-a/x.dcm", ["s3://raw/site-a"], True),
    ("s3://other/site-a/x.dcm", ["s3://raw/site-a"], False),
    ("s3://raw/site-a/../site-b/x.dcm", ["s3://raw/site-a"], False),
    ("s3://raw/../x.dcm", [], False),
    ("http://evil.example/x.png", [], False),
    ("file:///etc/passwd", [], False),
    ("-rf", [], False),
    ("/anything/at/all.png", [], True),
])
def test_uri_problem(uri, roots, ok):
    assert (storage.uri_problem(uri, roots) is None) is ok


def test_symlink_out_of_a_root_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    assert storage.uri_problem(str(root / "link.png"), [str(root)]) is not None


def test_ingest_source_outside_the_data_roots_exits_2(tmp_path, tiny_source, monkeypatch):
    monkeypatch.setenv(storage.DATA_ROOTS_ENV, str(tmp_path / "allowed"))
    art = tmp_path / "art"
    rc = cli_main(["ingest", "--layout", "csv", "--artifact-root", str(art), "--run-id", "r1",
                   "--", str(tiny_source / "manifest.csv")])
    assert rc == 2 and not _files(art)


def test_image_uris_outside_the_data_roots_are_quarantined_unread(tmp_path, tiny_source,
                                                                  monkeypatch):
    """A manifest pointing at an absolute path elsewhere, a '..' climb and another bucket:
    each row is quarantined with the reason, and none of those files is opened."""
    from fracture_ops.data import images
    from fracture_ops.data.sources import IngestConfig, ingest_step
    from fracture_ops.data.validation import ValidateConfig, validate_step

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(tiny_source / "images" / "syn00000_AP.png", outside / "private.png")
    manifest = pd.read_csv(tiny_source / "manifest.csv")
    evil = manifest.iloc[:3].copy()
    evil["image_id"] = ["e1", "e2", "e3"]
    evil["patient_id"] = ["EVIL1", "EVIL2", "EVIL3"]
    evil["image_uri"] = [str(outside / "private.png"), "images/../../elsewhere/private.png",
                         "s3://another-bucket/private.png"]
    pd.concat([manifest, evil]).to_csv(tiny_source / "manifest.csv", index=False)

    opened = []
    real_read = images.read_image
    monkeypatch.setattr(images, "read_image",
                        lambda uri, **kw: (opened.append(str(uri)), real_read(uri, **kw))[1])
    art = str(tmp_path / "art")
    ingested = ingest_step(IngestConfig(artifact_root=art, run_id="r", source_uri=str(
        tiny_source / "manifest.csv"), layout="csv", require_images=False))
    cfg = ValidateConfig(artifact_root=art, run_id="r", max_bad_fraction=1.0,
                         manifest_uri=ingested["manifest_uri"])
    validate_step(cfg)
    quarantine = pd.read_parquet(f"{cfg.raw_dir('validate')}/quarantine.parquet")
    assert sorted(quarantine["patient_id"]) == ["EVIL1", "EVIL2", "EVIL3"]
    assert set(quarantine["reason"]) == {"outside_data_roots"}
    assert not [u for u in opened if "private" in u or "another-bucket" in u]
    clean = pd.read_parquet(f"{cfg.raw_dir('validate')}/manifest.clean.parquet")
    assert len(clean) == len(manifest)


def test_deidentify_manifest_mode_refuses_files_outside_the_roots(tmp_path, tiny_source,
                                                                  monkeypatch):
    """A hand-made manifest given straight to de-identification cannot make it copy a file
    from outside the configured roots."""
    from fracture_ops.data.synthetic_dicom import fake_patient, write_phi_dicom
    from fracture_ops.deid.config import DeidConfig
    from fracture_ops.deid.manifest import deidentify_manifest_step

    import numpy as np

    monkeypatch.setenv("FRACTURE_OPS_DEID_SECRET", SECRET)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    rng = np.random.default_rng(0)
    write_phi_dicom(outside / "x.dcm", rng.integers(0, 4096, (64, 64), dtype=np.uint16),
                    **fake_patient(rng), seed=0)
    rows = pd.read_csv(tiny_source / "manifest.csv").iloc[:2].copy()
    rows["image_uri"] = [str(tiny_source / u) for u in rows["image_uri"]]
    rows.loc[rows.index[1], "image_uri"] = str(outside / "x.dcm")
    man = tmp_path / "m.parquet"
    rows.to_parquet(man)
    cfg = DeidConfig(artifact_root=str(tmp_path / "art"), run_id="r", manifest_uri=str(man),
                     max_bad_fraction=1.0, data_roots=[str(tiny_source)])
    summary = deidentify_manifest_step(cfg)
    assert summary["rows"] == 1
    out = Path(cfg.output_dir("deidentify"))
    assert not list(out.rglob("*.dcm"))  # the outside DICOM was not copied
    audit = (out / "audit.jsonl").read_text()
    assert "outside the configured data roots" in audit and str(outside) not in audit


def test_folder_mode_refuses_to_empty_a_folder_it_did_not_create(tmp_path, monkeypatch):
    """Another step's folder that happens to hold a report.json is not emptied."""
    from fracture_ops.deid.config import DeidConfig
    from fracture_ops.deid.folder import OUTPUT_MARKER, deidentify_folder
    from fracture_ops.errors import BadInputError

    monkeypatch.setenv("FRACTURE_OPS_DEID_SECRET", SECRET)
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    other = tmp_path / "evaluate"
    other.mkdir()
    (other / "report.json").write_text("{}")
    (other / "evaluation.json").write_text("{}")
    cfg = DeidConfig(artifact_root=str(tmp_path / "art"), max_bad_fraction=1.0)
    with pytest.raises(BadInputError, match=OUTPUT_MARKER):
        deidentify_folder(str(src), str(other), cfg)
    assert sorted(p.name for p in other.iterdir()) == ["evaluation.json", "report.json"]
    # its own output is recognised and may be rewritten
    out = tmp_path / "out"
    deidentify_folder(str(src), str(out), cfg)
    assert (out / OUTPUT_MARKER).exists()
    deidentify_folder(str(src), str(out), cfg)


# ------------------------------------------------------------------ rendered step pods

def _all_step_pods():
    """Every step pod of every DAG, rendered with the provider's dry run: {task_id: pod}."""
    from kubernetes.client import ApiClient

    from tests.test_dags import _dagbag

    bag = _dagbag({"FRACTURE_OPS_RUNNER": "kubernetes"})
    assert bag.import_errors == {}
    from fracture_ops.orchestration.specs import INFERENCE_STEPS, render_args

    params = defaults(artifact_root="s3://fracture-ops-artifacts") | {
        "incoming_uri": "s3://incoming/today", "window_days": 7, "drift_share_threshold": 0.3,
        "shards": 4, "dataset": "pacs", "max_studies": 500, "pacs_dataset": "pacs",
        "pacs_results": False, "raw_root": ""}
    ti = SimpleNamespace(xcom_pull=lambda task_ids=None, **kw: {"model_version": "3", "model_uri": "models:/fracture-classifier/3"})
    pods = {}
    for dag in bag.dags.values():
        for op in dag.tasks:
            context = {"params": params, "run_id": "manual__2026-01-01T00:00:00+00:00",
                       "ds": "2026-01-01", "dag": dag, "task": op, "ti": ti}
            from airflow.sdk.execution_time import macros
            context["macros"] = macros
            if hasattr(op, "expand_input") and hasattr(op.operator_class, "build_pod_request_obj"):
                # a mapped pod (one per shard): the first shard's, with the arguments the
                # mapping task renders for it
                spec = INFERENCE_STEPS[op.task_id]
                args = render_args(spec, {**context, "inputs": {spec.expand[0]: 0}})
                op = op.unmap({"arguments": args})
            if not hasattr(op, "build_pod_request_obj"):
                continue
            op.render_template_fields(context)
            pods[op.task_id] = ApiClient().sanitize_for_serialization(
                op.build_pod_request_obj(dry_run=True))
    return pods


@pytest.fixture(scope="module")
def step_pods():
    return _all_step_pods()


def test_the_deid_secret_reaches_only_the_pods_that_use_it(step_pods):
    assert {"deidentify", "train", "infer", "ingest"} <= set(step_pods)
    with_key = set()
    for task, pod in step_pods.items():
        (c,) = [c for c in pod["spec"]["containers"] if c["name"] == "base"]
        refs = {e["secretRef"]["name"] for e in c.get("envFrom", [])}
        if "fracture-ops-deid" in refs:
            with_key.add(task)
        # the pipeline's other credentials follow the same rule: no step parsing raw input
        # holds the registry's
        if task in ("ingest", "validate", "deidentify", "split", "pacs_ingest"):
            assert "fracture-ops-mlflow" not in refs, task
        # the PACS account: the PACS ingest and report pods alone, which alone carry the label
        # the network policy lets reach the PACS
        pacs_steps = ("pacs_ingest", "pacs_report")
        assert ("fracture-ops-pacs" in refs) == (task in pacs_steps), task
        assert (pod["metadata"]["labels"].get("fracture-ops/pacs") == "true") == (task in pacs_steps), task
        if task == "infer_merge":  # reads shard tables, writes the partition: the store only
            assert refs == {"fracture-ops-s3"}, refs
    # infer_plan keys the image ids of the incoming files with the de-id secret; pacs_ingest
    # de-identifies what it retrieves
    assert with_key == {"deidentify", "infer_plan", "infer", "reference", "pacs_ingest"}


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """The rules of the Kubernetes ``restricted`` Pod Security Standard (baseline included) that
    a pod breaks, checked field by field as the admission controller does."""
    spec, out = pod["spec"], []
    psc = spec.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            out.append(f"spec.{flag}")
    for vol in spec.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {vol['name']}: {sorted(kinds - RESTRICTED_VOLUMES)}")
    if (psc.get("seccompProfile") or {}).get("type") == "Unconfined":
        out.append("pod seccompProfile Unconfined")
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser 0")
    containers = spec.get("containers", []) + spec.get("initContainers", [])
    for c in containers:
        sc, name = c.get("securityContext") or {}, c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities not dropping ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities added")
        if not (sc.get("runAsNonRoot") is True or (psc.get("runAsNonRoot") is True
                                                    and sc.get("runAsNonRoot") is not False)):
            out.append(f"{name}: runAsNonRoot not true")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile {seccomp}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{name}: hostPort")
        if (sc.get("procMount") or "Default") != "Default":
            out.append(f"{name}: procMount")
    return out


def test_restricted_check_catches_each_kind_of_violation(step_pods):
    import copy

    pod = step_pods["ingest"]
    assert restricted_violations(pod) == []
    breaks = [
        lambda p: p["spec"].update(hostNetwork=True),
        lambda p: p["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        lambda p: p["spec"]["containers"][0]["securityContext"].update(privileged=True),
        lambda p: p["spec"]["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        lambda p: p["spec"]["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
        lambda p: p["spec"]["containers"][0]["securityContext"].update(runAsNonRoot=False),
        lambda p: p["spec"]["containers"][0]["securityContext"].update(
            seccompProfile={"type": "Unconfined"}),
        lambda p: p["spec"]["containers"][-1].pop("securityContext"),  # the sidecar
    ]
    for i, mutate in enumerate(breaks):
        bad = copy.deepcopy(pod)
        mutate(bad)
        assert restricted_violations(bad), i


def test_every_step_pod_meets_the_restricted_profile_with_limits(step_pods):
    import kubernetes_validate

    assert len(step_pods) >= 16
    for task, pod in step_pods.items():
        assert restricted_violations(pod) == [], task
        assert pod["metadata"]["namespace"] == "fracture-ops-steps", task
        kubernetes_validate.validate(pod, "1.34.0", strict=True)
        for c in pod["spec"]["containers"]:
            res = c.get("resources") or {}
            for kind in ("cpu", "memory", "ephemeral-storage"):
                assert kind in res.get("requests", {}) and kind in res.get("limits", {}), (task, c["name"], kind)
            if c["name"] == "base":
                assert c["securityContext"]["readOnlyRootFilesystem"] is True
                assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env["HOME"].startswith("/tmp") and env["TMPDIR"] == "/tmp"


# ------------------------------------------------------------------ identifiers at rest

@pytest.mark.realdata
def test_files_named_after_patients_leave_no_identifier_in_the_dataset_store(
        realdata, tmp_path, monkeypatch, caplog, capsys):
    """The real DICOMs, whose file names hold (fake) patient names, through ingest (folder
    layout), validate, deidentify and split with the pipeline's own commands: no original file
    name, name part or raw path in any byte written to the dataset store, nor in the logs."""
    import logging
    import re

    monkeypatch.setenv("FRACTURE_OPS_DEID_SECRET", SECRET)
    src = tmp_path / "exports"
    names = []
    for i, path in enumerate(sorted((realdata / "dicom" / "dicom_files").glob("*.dcm"))):
        label = ("fracture", "normal")[i % 2]
        (src / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, src / label / path.name)
        names.append(path.stem)
    # and enough more patients for a split: synthetic PHI DICOMs named "<LAST>_<FIRST>_<id>.dcm"
    import numpy as np

    from fracture_ops.data.synthetic_dicom import fake_patient, write_phi_dicom

    rng = np.random.default_rng(3)
    extra = set()
    for i in range(40):
        phi = fake_patient(rng)
        last, first = phi["patient_name"].split("^")
        stem = f"{last}_{first}_{phi['patient_id']}"
        label = ("fracture", "normal")[i % 2]
        write_phi_dicom(src / label / f"{stem}.dcm",
                        rng.integers(0, 4096, (128, 128), dtype=np.uint16), **phi, seed=i)
        extra |= {phi["patient_id"], stem} | {w for w in (last, first) if len(w) >= 5}
    forbidden = set(names) | extra | {str(src), "exports"}
    for stem in names:  # the name parts the exports put in file names ("..._for_Scott_Kaufman-...")
        m = re.search(r"_for_([A-Za-z]+)_([A-Za-z]+)", stem)
        if m:
            forbidden |= {m.group(1), m.group(2)}
        forbidden.add(stem.split("_", 1)[0])  # the leading patient number
    assert {"Douglas", "Davidson", "Scott", "Kaufman"} <= forbidden

    art = tmp_path / "art"
    params = defaults(artifact_root=str(art), source_uri=str(src), layout="folder",
                      max_bad_fraction=0.5)
    context = {"params": params, "run_id": "manual__2026-12-01T00:00:00+00:00"}
    with caplog.at_level(logging.DEBUG):
        for step in ("ingest", "validate", "deidentify", "split"):
            assert cli_main(render_args(TRAINING_STEPS[step], context)) == 0, step
    out = capsys.readouterr()
    logs = caplog.text + out.out + out.err
    raw = Path(str(art) + "-raw")
    assert list(raw.rglob("manifest.parquet"))  # the identifying tables are in the raw zone

    stored = _files(art)
    assert len([p for p in stored if p.suffix in (".dcm", ".png")]) >= 7
    assert any(p.name == "split.parquet" for p in stored)
    leaks = []
    for path in stored:
        data = path.read_bytes().lower()
        leaks += [(path.relative_to(art).as_posix(), word) for word in forbidden
                  if word.lower().encode() in data]
        leaks += [(path.relative_to(art).as_posix(), "file name") for word in forbidden
                  if word.lower() in path.name.lower()]
    assert leaks == []
    assert [w for w in forbidden if w.lower() in logs.lower()] == []


def test_raw_zone_expires_and_stays_out_of_the_dataset_store(tmp_path, tiny_source):
    """Ingest marks its raw run folder with an expiry; a later ingest purges expired raw run
    folders (and nothing else); a raw root inside the artifact root is refused."""
    from fracture_ops.data.sources import IngestConfig, ingest_step
    from fracture_ops.errors import ConfigError

    art = str(tmp_path / "art")
    cfg = IngestConfig(artifact_root=art, run_id="old", source_uri=str(tiny_source / "manifest.csv"))
    ingest_step(cfg)
    runs = Path(cfg.raw_root) / "runs"
    assert Path(cfg.raw_root) == Path(art + "-raw") and (runs / "old" / "_EXPIRES_AT").exists()
    (runs / "old" / "_EXPIRES_AT").write_text("2000-01-01T00:00:00+00:00\n")  # long past
    (runs / "unmarked").mkdir()  # not ours to judge: left alone
    ingest_step(cfg.model_copy(update={"run_id": "new"}))
    assert sorted(p.name for p in runs.iterdir()) == ["new", "unmarked"]
    assert (Path(art) / "runs" / "old" / "ingest" / "report.json").exists()  # the public part stays
    with pytest.raises(ConfigError, match="outside artifact_root"):
        IngestConfig(artifact_root=art, raw_root=f"{art}/raw")
