"""Real services for the integration tests: PostgreSQL databases, a local S3 server, an MLflow
tracking server (PostgreSQL backend store, S3 artifacts) and an Airflow home on PostgreSQL.

PostgreSQL must be running (``.ci/run`` starts it); the S3 server is moto's threaded server (no
MinIO can be installed here; production uses MinIO or AWS S3, see infra/).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import closing
from pathlib import Path

PG_URL = os.environ.get("FRACTURE_OPS_PG_URL", "postgresql://postgres@127.0.0.1:5432")
S3_CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_database(prefix: str) -> str:
    """Create a fresh database; returns its SQLAlchemy URL (``postgresql://``)."""
    import psycopg2

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(f"{PG_URL}/postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return f"{PG_URL}/{name}"


def drop_database(url: str) -> None:
    import psycopg2

    name = url.rsplit("/", 1)[1]
    conn = psycopg2.connect(f"{PG_URL}/postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


class S3Server:
    """moto's S3-compatible server on loopback, with buckets created."""

    def __init__(self, buckets: tuple[str, ...] = ("fracture-ops-mlflow", "fracture-ops-artifacts")):
        from moto.server import ThreadedMotoServer

        os.environ.update(S3_CREDS)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        import boto3

        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        for b in buckets:
            self.client.create_bucket(Bucket=b)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for p in pages for o in p.get("Contents", [])]

    def stop(self) -> None:
        self.server.stop()


def auth_env(workdir: Path, admin_password: str, default_permission: str = "READ") -> dict:
    """Environment for an MLflow server with basic auth (``--app-name basic-auth`` or
    ``fracture-ops``): a private auth config (SQLite user store, admin account) and a Flask key."""
    import secrets

    ini = workdir / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = {default_permission}\n"
                   f"database_uri = sqlite:///{workdir / 'auth.db'}\n"
                   f"admin_username = admin\nadmin_password = {admin_password}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   # as mlflow/basic_auth.ini: a verified password is remembered for 30 s
                   "auth_cache_ttl_seconds = 30\n")
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}


class MlflowServer:
    """``mlflow server`` with a PostgreSQL backend store and S3 artifacts, on a free port."""

    def __init__(self, backend_url: str, s3: S3Server, workdir: Path, app_name: str | None = None,
                 extra_env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **S3_CREDS, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
                    "MLFLOW_DISABLE_TELEMETRY": "true",
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(extra_env or {})}
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server",
               "--backend-store-uri", backend_url, "--artifacts-destination", "s3://fracture-ops-mlflow",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        if app_name:
            cmd += ["--app-name", app_name]
        self.log = open(workdir / f"mlflow-{self.port}.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait()

    def _wait(self, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited early; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server not healthy after {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def airflow_env(home: Path, db_url: str, dags_folder: Path) -> dict:
    """Environment for an Airflow 3 CLI with its metadata DB on PostgreSQL."""
    return {**os.environ, "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url.replace("postgresql://", "postgresql+psycopg2://"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False", "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO"}


def airflow(args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).parent / "airflow")
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=timeout)


def signing_keys(workdir: Path) -> tuple[str, str]:
    """An approval server's key pair (EC P-256, PEM): (private key path, public key path)."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = workdir / "approval-key.pem", workdir / "approval-pub.pem"
    priv.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                       ser.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(ser.Encoding.PEM,
                                                  ser.PublicFormat.SubjectPublicKeyInfo))
    return str(priv), str(pub)


def log_model_folder(client, run_id: str, workdir: Path, weights: bytes = b"weights-v1") -> str:
    """A small model folder (MLmodel, weights, thresholds) logged as the run's ``model``;
    returns its artifact URI (a registered version's source)."""
    folder = workdir / f"model-{run_id}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "MLmodel").write_text("flavors:\n  python_function: {}\n")
    (folder / "model.pt").write_bytes(weights)
    (folder / "thresholds.json").write_text('{"fracture": 0.5}\n')
    client.log_artifacts(run_id, str(folder), "model")
    return client.get_run(run_id).info.artifact_uri.rstrip("/") + "/model"
