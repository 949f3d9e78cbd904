"""The README is a short front page that links to the rest; every link in it and in docs/
resolves; the licence it names is in the repository."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _pages() -> list[Path]:
    return [REPO / "README.md", REPO / "ARCHITECTURE.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_readme_is_a_front_page():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 160
    for must in ("make demo", "make test", "not for clinical use", "## Documentation"):
        assert must.lower() in text.lower(), must
    linked = set(LINK.findall(text))
    assert {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")} <= linked  # every page listed


def test_every_relative_link_resolves():
    broken = []
    for page in _pages():
        for target in LINK.findall(page.read_text()):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_the_licence_file_is_the_one_the_readme_names():
    licence = (REPO / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "Apache-2.0" in (REPO / "README.md").read_text()
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text()


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_own_data_guide_runs_as_written(tmp_path, monkeypatch, caplog):
    """docs/own-data.md: its key recipe makes a key de-identification accepts; its CSV template
    (with a PNG per row and a DICOM full of fake PHI for the .dcm row) goes through the chain's
    data steps with one run id, the DICOM's name nowhere in the de-identified manifest; every
    other command on the page parses with its subcommand's parser; the trigger's conf keys are
    trigger parameters."""
    import json
    import shlex
    import subprocess

    import numpy as np
    import pandas as pd
    from PIL import Image

    from fracture_ops.cli import build_parser, main
    from fracture_ops.data.synthetic_dicom import write_phi_dicom
    from fracture_ops.orchestration.params import dag_params

    text = (REPO / "docs" / "own-data.md").read_text()
    (csv_text,) = _blocks(text, "csv")
    bash = "\n".join(_blocks(text, "bash"))
    key_line = next(x for x in bash.splitlines() if "secrets.token_hex" in x)
    key = subprocess.run(key_line.split(">")[0], shell=True, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert len(bytes.fromhex(key)) >= 32
    monkeypatch.setenv("FRACTURE_OPS_DEID_SECRET", key)
    src = tmp_path / "exports"
    (src / "images").mkdir(parents=True)
    (src / "manifest.csv").write_text(csv_text)
    rng = np.random.default_rng(0)
    for row in pd.read_csv(src / "manifest.csv").itertuples():
        pixels = (rng.random((96, 96)) * 4000).astype(np.uint16)
        if row.image_uri.endswith(".dcm"):
            write_phi_dicom(src / row.image_uri, pixels, patient_name="QUIMBLEWORTH^ODETTA",
                            patient_id="MRN7734921", birth_date="19700101",
                            study_date="20260101", accession="ACC1", institution="Nowhere")
        else:
            Image.fromarray((pixels // 16).astype(np.uint8)).save(src / row.image_uri)
    commands = [shlex.split(x)[1:] for x in bash.splitlines() if x.startswith("fracture-ops ")]
    assert [c[0] for c in commands][:4] == ["ingest", "validate", "deidentify", "split"]
    for argv in commands:
        assert build_parser(argv[0]).parse_args(argv).command == argv[0], argv
    root = ["--artifact-root", str(tmp_path / "art")]
    ingest = [str(src / "manifest.csv") if x == "exports/manifest.csv" else x for x in commands[0]]
    for argv in (ingest, *commands[1:3]):
        assert main([*argv, *root]) == 0, argv
    run = tmp_path / "art" / "runs" / "r1"
    deid = pd.read_parquet(run / "deidentify" / "manifest.deid.parquet")
    assert len(deid) == 3 and set(deid["label"]) == {"fracture", "normal"}
    dump = deid.to_csv()
    assert "MRN7734921" not in dump and "QUIMBLEWORTH" not in dump and "p001" not in dump
    assert deid["patient_id"].nunique() == 2  # one pseudonym per patient
    # the split and the training find this run's tables too: three images are too few to
    # split (bad input, exit 3, saying so), and a run without a split is refused by name
    assert main([*commands[3], *root]) == 3 and "too few" in caplog.text
    fit = next(c for c in commands if c[0] == "fit")
    assert main([*fit, *root]) == 2 and "step 'split' of run 'r1' has not finished" in caplog.text
    # a step that went over its error budget leaves no _SUCCESS: the next one refuses its files
    bad = src / "bad.csv"
    bad.write_text(csv_text.replace(",fracture,", ",Fracture,"))
    assert main(["ingest", str(bad), "--layout", "csv", "--run-id", "r2", *root]) == 0
    assert main(["validate", "--run-id", "r2", *root]) == 4
    caplog.clear()
    assert main(["deidentify", "--run-id", "r2", *root]) == 2
    assert "step 'validate' of run 'r2' has not finished" in caplog.text
    # a failed rerun of ingest leaves nothing for validate to take
    assert main(["ingest", str(src / "missing.csv"), "--layout", "csv", "--run-id", "r1", *root]) != 0
    caplog.clear()
    assert main(["validate", "--run-id", "r1", *root]) == 2 and "has not finished" in caplog.text
    conf = json.loads(re.search(r"--conf '(\{.*\})'", bash).group(1))
    assert set(conf) <= set(dag_params("fracture_training")), conf
