"""Config loading and the CLI surface: overrides, errors naming the field, --help, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fracture_ops.cli import COMMANDS, main
from fracture_ops.config import load_config, parse_overrides
from fracture_ops.data.split import SplitConfig
from fracture_ops.errors import ConfigError


def test_overrides_are_typed_but_dates_stay_strings():
    assert parse_overrides(["a=3", "b=true", "c.d=x", "date=2026-11-05", "bad=2026-13-45"]) == {
        "a": 3, "b": True, "c": {"d": "x"}, "date": "2026-11-05", "bad": "2026-13-45"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_config_file_section_and_errors_name_the_field(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run_id: r9\nsplit:\n  val_fraction: 0.2\n")
    cfg = load_config(SplitConfig, str(f), ["seed=4"])
    assert (cfg.run_id, cfg.val_fraction, cfg.seed) == ("r9", 0.2, 4)
    with pytest.raises(ConfigError, match="val_fractoin"):
        load_config(SplitConfig, None, ["val_fractoin=0.1"])
    with pytest.raises(ConfigError, match="test_fraction"):
        load_config(SplitConfig, None, ["test_fraction=2"])


def test_every_subcommand_has_help():
    for name in COMMANDS:
        res = subprocess.run([sys.executable, "-m", "fracture_ops.cli", name, "--help"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, (name, res.stderr[-500:])
        assert "usage: fracture-ops" in res.stdout
        assert f"example: fracture-ops {name}" in res.stdout, name


def test_every_example_in_the_help_is_a_valid_command_line():
    """Each command's worked example parses with that command's own parser (a flag the
    command does not have, or a missing value, fails here)."""
    import shlex

    from fracture_ops.cli import EXAMPLES, build_parser

    assert set(EXAMPLES) == set(COMMANDS)
    for name, example in EXAMPLES.items():
        argv = shlex.split(example.split("   (", 1)[0])[1:]  # without "fracture-ops", notes
        args = build_parser(name).parse_args(argv)
        assert args.command == name, example


def test_exit_codes_distinguish_usage_and_bad_input(tmp_path, caplog):
    assert main(["split", str(tmp_path / "missing.parquet"), "--set", "seed=notanint",
                 "--artifact-root", str(tmp_path)]) == 2
    # a CSV with no rows is bad data (3); one lacking columns is a usage error (2: map them)
    (tmp_path / "e.csv").write_text("image_id,image_uri,patient_id,label\n")
    assert main(["ingest", str(tmp_path / "e.csv"), "--layout", "csv",
                 "--artifact-root", str(tmp_path)]) == 3
    (tmp_path / "m.csv").write_text("image_id,label\na,fracture\n")
    assert main(["ingest", str(tmp_path / "m.csv"), "--layout", "csv",
                 "--artifact-root", str(tmp_path)]) == 2
    assert "patient_id" in caplog.text  # the error names the missing column


def test_validate_prints_no_third_party_info_lines(tmp_path, synthetic_small):
    """Great Expectations logs ~200 INFO lines per run: the CLI keeps third-party loggers at
    WARNING unless -v is given."""
    import re
    from pathlib import Path

    manifest = str(Path(synthetic_small.out_dir) / "manifest.csv")
    base = [sys.executable, "-m", "fracture_ops.cli"]
    art = ["--artifact-root", str(tmp_path / "a"), "--run-id", "r"]
    res = subprocess.run(base + ["ingest", manifest, *art], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-800:]
    raw = str(tmp_path / "a-raw" / "runs" / "r" / "ingest" / "manifest.parquet")
    res = subprocess.run(base + ["validate", "--manifest", raw, *art], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-800:]
    loggers = re.findall(r" (DEBUG|INFO) ([\w.]+): ", res.stderr)
    assert loggers == [(lvl, name) for lvl, name in loggers if name.startswith("fracture_ops")]
    assert "great_expectations" not in res.stderr
    res = subprocess.run(base + ["-v", "validate", "--manifest", raw, *art], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "great_expectations" in res.stderr
