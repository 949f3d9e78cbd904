"""Approvals bound to a model's bytes: OpenSSF model-signing over the version's artifacts.

When an approver approves a version, the approval server downloads the version's model
artifacts (MLmodel, weights, code, calibration and thresholds documents: the whole model
folder), adds ``approval.json`` naming the model, version, approver and time, and signs the
folder with ``model-signing`` (a signed in-toto manifest of every file's SHA-256) using an
elliptic-curve key only the server holds (``$FRACTURE_OPS_APPROVAL_KEY``, a PEM file). The
signature is stored on the version as the server-only tag ``approval.signature``.

``promote`` and every champion loader verify with the public key
(``$FRACTURE_OPS_APPROVAL_PUBKEY``): they download the version, rebuild ``approval.json`` from
the stamp, and check the signature. An artifact overwritten after approval, another version's
approval, or a stamp edited to name another approver no longer verifies. The manifest and the
signature are model-signing's; nothing here hand-rolls either.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from fracture_ops.errors import BadInputError
from fracture_ops import envvars

log = logging.getLogger(__name__)
KEY_ENV = envvars.APPROVAL_KEY
PUBKEY_ENV = envvars.APPROVAL_PUBKEY
STATEMENT = "approval.json"


class SignatureInvalid(BadInputError):
    """The approved bytes (or the approval) changed since the approver approved."""


def statement(name: str, version: str, approver: str, approved_at: str) -> bytes:
    return (json.dumps({"model": name, "version": str(version), "approver": approver,
                        "approved_at": approved_at}, sort_keys=True) + "\n").encode()


def _with_statement(model_dir: str | Path, stmt: bytes) -> None:
    path = Path(model_dir) / STATEMENT
    if path.exists():
        raise BadInputError(f"{path}: a model folder may not carry its own {STATEMENT}")
    path.write_bytes(stmt)


def _hashing():
    """Every file counts: model-signing skips .git* paths by default, which would let files be
    added to an approved folder unnoticed."""
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=[], ignore_git_paths=False)


def sign_folder(model_dir: str | Path, stmt: bytes, private_key: str | Path) -> str:
    """Sign ``model_dir`` plus the approval statement; returns the signature bundle (JSON)."""
    from model_signing import signing

    _with_statement(model_dir, stmt)
    with tempfile.TemporaryDirectory() as tmp:
        sig = Path(tmp) / "model.sig"
        signing.Config().set_hashing_config(_hashing()).use_elliptic_key_signer(
            private_key=str(private_key)).sign(str(model_dir), str(sig))
        return sig.read_text()


def verify_folder(model_dir: str | Path, stmt: bytes, bundle: str, public_key: str | Path) -> None:
    """Check ``model_dir`` (plus the statement) against ``bundle``.

    Raises:
        SignatureInvalid: any byte, file or statement field differs, or the key is another.
    """
    from model_signing import verifying

    if not bundle:
        raise SignatureInvalid("the approval carries no signature")
    _with_statement(model_dir, stmt)
    with tempfile.TemporaryDirectory() as tmp:
        sig = Path(tmp) / "model.sig"
        sig.write_text(bundle)
        try:
            verifying.Config().set_hashing_config(_hashing()).use_elliptic_key_verifier(
                public_key=str(public_key)).verify(str(model_dir), str(sig))
        except Exception as exc:  # model-signing raises ValueError and others on mismatch
            raise SignatureInvalid(f"approval signature does not verify: {str(exc)[:300]}") from None


def public_key(value: str | None = None) -> str | None:
    """The approval server's public key as a file path: ``$FRACTURE_OPS_APPROVAL_PUBKEY`` (or
    ``value``) names a PEM file or holds the PEM text itself (a public key is no secret, so a
    plain environment variable of the workers and step pods can carry it)."""
    value = value if value is not None else os.environ.get(PUBKEY_ENV, "")
    if not value:
        return None
    if value.lstrip().startswith("-----BEGIN"):
        fd, path = tempfile.mkstemp(prefix="fo-approval-pub-", suffix=".pem")
        with os.fdopen(fd, "w") as fh:
            fh.write(value.strip() + "\n")
        return path
    return value


def verify_registered(name: str, version: str, tags: dict, pubkey: str | None = None,
                      download_to: str | None = None) -> str:
    """Download a registered version and verify its approval signature; returns the folder.

    Raises:
        SignatureInvalid: no signature, or it does not verify.
    """
    import mlflow

    from fracture_ops.registry.client import TAG_VERIFIED_BY
    from fracture_ops.registry.client import TAG_APPROVED_AT, TAG_SIGNATURE

    key = public_key(pubkey) if pubkey else public_key()
    if not key:
        raise SignatureInvalid(f"no public key to verify approvals (${PUBKEY_ENV})")
    dst = download_to or tempfile.mkdtemp(prefix="fo-verify-")
    # the version's own artifacts (a models:/ download adds the client's registry metadata file)
    source = mlflow.MlflowClient().get_model_version_download_uri(name, str(version))
    local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst)
    verify_folder(local, statement(name, version, tags.get(TAG_VERIFIED_BY, ""),
                                   tags.get(TAG_APPROVED_AT, "")),
                  tags.get(TAG_SIGNATURE, ""), key)
    os.unlink(os.path.join(local, STATEMENT))
    return local
