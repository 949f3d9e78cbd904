"""Artifact storage: one API over local paths and ``s3://bucket/key`` URIs.

Writes are atomic (local: write to a temporary file in the same folder, then ``os.replace``;
S3: a single PUT is atomic per object). A step writes its outputs first and its ``_SUCCESS``
marker last, so a reader that sees ``_SUCCESS`` sees complete outputs.

S3 access goes through boto3 with the standard credential chain; ``S3_ENDPOINT_URL`` or
``MLFLOW_S3_ENDPOINT_URL`` points it at MinIO or a local S3-compatible server.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from fracture_ops import envvars

SUCCESS_MARKER = "_SUCCESS"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: files get the usual 0644-style mode, not mkstemp's private 0600


def is_s3(uri: str | os.PathLike) -> bool:
    """Return True for ``s3://`` URIs."""
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``."""
    rest = str(uri)[len("s3://"):]
    bucket, _, key = rest.partition("/")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join URI parts with ``/`` (S3) or the OS separator (local)."""
    base = str(base)
    if is_s3(base):
        out = base.rstrip("/")
        for p in parts:
            out += "/" + str(p).strip("/")
        return out
    return str(Path(base, *parts))


DATA_ROOTS_ENV = envvars.DATA_ROOTS


def data_roots() -> list[str]:
    """Configured data roots (``$FRACTURE_OPS_DATA_ROOTS``: local folders and ``s3://bucket/prefix``
    separated by commas); empty when unset (then any local path or S3 URI is accepted)."""
    return [r.strip() for r in os.environ.get(DATA_ROOTS_ENV, "").split(",") if r.strip()]


def _normal(uri: str) -> str | None:
    """A comparable form of a data URI: S3 keys without ``.``/``..`` segments (None when a
    ``..`` climbs out of the bucket), local paths made absolute with links resolved."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        parts: list[str] = []
        for seg in key.split("/"):
            if seg == "..":
                if not parts:
                    return None
                parts.pop()
            elif seg not in ("", "."):
                parts.append(seg)
        return "s3://" + "/".join([bucket, *parts])
    return os.path.realpath(uri)


def _under(uri: str, root: str) -> bool:
    if is_s3(uri) != is_s3(root):
        return False
    return uri == root or uri.startswith(root.rstrip("/") + "/") or (
        not is_s3(uri) and Path(uri).is_relative_to(root))


def uri_problem(uri: str, roots: list[str] | None = None) -> str | None:
    """Why a data URI may not be read, or None when it may.

    Accepted: local paths and ``s3://`` URIs (no other scheme), not starting with ``-``, and,
    where data roots are given (default: :func:`data_roots`), resolving under one of them (``..``
    and symbolic links are resolved first, so neither climbs out).
    """
    text = str(uri)
    if not text:
        return "empty URI"
    if text.startswith("-"):
        return "starts with '-'"
    scheme = text.split("://", 1)[0] if "://" in text else ""
    if scheme and scheme != "s3":
        return f"scheme {scheme}:// is not allowed (local paths and s3:// only)"
    norm = _normal(text)
    if norm is None:
        return "'..' climbs out of the bucket"
    roots = data_roots() if roots is None else roots
    if roots and not any(_under(norm, _normal(r)) for r in roots):
        return f"outside the configured data roots ({DATA_ROOTS_ENV})"
    return None


def image_uri_problem(uri: str, roots: list[str]) -> str | None:
    """:func:`uri_problem` for a manifest's ``image_uri``, which may not hold ``..`` at all
    (even one that stays inside the roots)."""
    problem = uri_problem(uri, roots)
    if problem is None and not is_s3(uri) and ".." in Path(uri).parts:
        problem = "'..' in the path"
    return problem


def check_data_uri(uri: str, what: str, roots: list[str] | None = None) -> None:
    """Raise ConfigError (exit 2) naming ``what`` when :func:`uri_problem` finds one."""
    from fracture_ops.errors import ConfigError

    problem = uri_problem(uri, roots)
    if problem:
        raise ConfigError(f"{what} {uri!r} refused: {problem}")


def step_dir(artifact_root: str, run_id: str, step: str) -> str:
    """The folder of one step's outputs: ``<artifact_root>/runs/<run_id>/<step>``."""
    return join(artifact_root, "runs", run_id, step)


@lru_cache(maxsize=4)
def _client(endpoint: str | None):
    import boto3  # imported lazily: the DAG parser must not pay for it

    return boto3.client("s3", endpoint_url=endpoint or None)


def s3_client():
    """A boto3 S3 client honouring ``S3_ENDPOINT_URL`` / ``MLFLOW_S3_ENDPOINT_URL``."""
    endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    return _client(endpoint)


def read_bytes(uri: str | os.PathLike) -> bytes:
    """Read a whole object or file."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(uri).read_bytes()


def write_bytes(uri: str | os.PathLike, data: bytes) -> str:
    """Write bytes atomically; create parent folders. Returns the URI."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return uri
    path = Path(uri)
    tmp = _temp_beside(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return uri


def _temp_beside(path: Path, data: bytes) -> str:
    """``data`` in a hidden temporary file in ``path``'s folder (created), with the
    permissions a plain write would give; the caller moves or links it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def create_bytes(uri: str | os.PathLike, data: bytes) -> bool:
    """Write ``data`` only if nothing exists at ``uri`` (atomic, never overwrites).

    Local files are linked into place (``link`` fails when the name exists); S3 objects are put
    with ``If-None-Match: *`` (a conditional write AWS S3 and MinIO honour). Returns False when
    the name was taken, True when this call created it.
    """
    uri = str(uri)
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412",
                                                             "ConditionalRequestConflict"):
                return False
            raise
        return True
    path = Path(uri)
    tmp = _temp_beside(path, data)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(uri: str | os.PathLike, text: str) -> str:
    """Write UTF-8 text atomically."""
    return write_bytes(uri, text.encode("utf-8"))


def read_text(uri: str | os.PathLike) -> str:
    """Read UTF-8 text."""
    return read_bytes(uri).decode("utf-8")


def write_json(uri: str | os.PathLike, obj: Any) -> str:
    """Write an object as indented, key-sorted JSON (stable across reruns)."""
    return write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(uri: str | os.PathLike) -> Any:
    """Read a JSON document."""
    return json.loads(read_text(uri))


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_parquet(uri: str | os.PathLike, df) -> str:
    """Write a DataFrame as Parquet (no index) atomically."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return write_bytes(uri, buf.getvalue())


def read_parquet(uri: str | os.PathLike):
    """Read a Parquet table into a DataFrame."""
    import pandas as pd

    if is_s3(uri):
        return pd.read_parquet(io.BytesIO(read_bytes(uri)))
    return pd.read_parquet(uri)


def exists(uri: str | os.PathLike) -> bool:
    """True when the file or object exists."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        from botocore.exceptions import ClientError

        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            # only "not there" means False; throttling or bad credentials must not look like absence
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return Path(uri).exists()


def list_files(uri: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """List files under a folder or prefix recursively, sorted, optionally by suffix (case-insensitive)."""
    uri = str(uri)
    out: list[str] = []
    if is_s3(uri):
        bucket, prefix = split_s3(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            out.extend(f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []))
    else:
        root = Path(uri)
        out = [str(p) for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    if suffixes:
        low = tuple(s.lower() for s in suffixes)
        out = [u for u in out if u.lower().endswith(low)]
    return sorted(out)


@contextlib.contextmanager
def local_path(uri: str | os.PathLike) -> Iterator[Path]:
    """Yield a local path for reading ``uri`` (downloads S3 objects to a temporary file)."""
    if not is_s3(uri):
        yield Path(uri)
        return
    suffix = Path(split_s3(str(uri))[1]).suffix
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"object{suffix}"
        path.write_bytes(read_bytes(uri))
        yield path


def upload_dir(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy a local folder tree to ``uri`` (local folder or S3 prefix)."""
    local_dir = Path(local_dir)
    for p in sorted(local_dir.rglob("*")):
        if p.is_file():
            write_bytes(join(uri, *p.relative_to(local_dir).parts), p.read_bytes())


def reset_dir(uri: str) -> None:
    """Empty a step folder before a rerun writes it again (idempotent reruns)."""
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        keys = [split_s3(u)[1] for u in list_files(uri)]
        for i in range(0, len(keys), 1000):
            s3_client().delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]}
            )
        return
    shutil.rmtree(uri, ignore_errors=True)
    Path(uri).mkdir(parents=True, exist_ok=True)


EXPIRY_MARKER = "_EXPIRES_AT"


def set_expiry(folder: str, days: float) -> str:
    """Write ``_EXPIRES_AT`` (UTC, ISO 8601) into a raw-zone run folder."""
    import datetime as dt

    when = dt.datetime.now(dt.UTC) + dt.timedelta(days=days)
    return write_text(join(folder, EXPIRY_MARKER), when.isoformat(timespec="seconds") + "\n")


def purge_expired(runs_folder: str) -> list[str]:
    """Delete every run folder under ``runs_folder`` whose ``_EXPIRES_AT`` has passed (the raw
    zone's retention; an S3 lifecycle rule on the raw bucket does the same server-side).
    Folders without the marker are left alone. Returns the folders deleted."""
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    deleted = []
    for marker in [u for u in list_files(runs_folder) if u.endswith("/" + EXPIRY_MARKER)
                   or u.endswith(os.sep + EXPIRY_MARKER)]:
        folder = marker[: -len(EXPIRY_MARKER) - 1]
        parent = folder.rsplit("/", 1)[0] if is_s3(folder) else str(Path(folder).parent)
        if parent.rstrip("/") != str(runs_folder).rstrip("/").rstrip(os.sep):
            continue  # only run folders directly under runs_folder
        try:
            expires = dt.datetime.fromisoformat(read_text(marker).strip())
        except ValueError:
            continue
        if expires <= now:
            reset_dir(folder)
            if not is_s3(folder):
                shutil.rmtree(folder, ignore_errors=True)
            deleted.append(folder)
    return deleted


def mark_success(folder: str, summary: dict | None = None) -> str:
    """Write the ``_SUCCESS`` marker (last), optionally holding the step's summary JSON."""
    return write_json(join(folder, SUCCESS_MARKER), summary or {})


def delete(uri: str | os.PathLike) -> None:
    """Remove one file or object (absent: nothing to do)."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink(missing_ok=True)


def unmark_success(folder: str) -> None:
    """Remove the ``_SUCCESS`` marker before changing a finished folder (absent: nothing to do)."""
    delete(join(folder, SUCCESS_MARKER))


def is_complete(folder: str) -> bool:
    """True when the folder's step finished (its ``_SUCCESS`` marker exists)."""
    return exists(join(folder, SUCCESS_MARKER))
