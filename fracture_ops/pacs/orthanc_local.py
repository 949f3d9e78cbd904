"""A local Orthanc PACS for development (``make up``) and the tests: Debian's ``orthanc`` and
``orthanc-dicomweb`` packages, started with a generated configuration on loopback (HTTP and
DICOMweb on one port, DICOM on another, basic auth on). Production points at the site's PACS
(or the Orthanc of ``infra/``); nothing here is used there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

BINARY = "Orthanc"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")


def binary() -> str | None:
    """The Orthanc executable (Debian puts it in /usr/sbin, often outside a user's PATH)."""
    return shutil.which(BINARY) or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
                                         if os.access(p, os.X_OK)), None)


def dicomweb_plugin() -> str | None:
    for folder in PLUGIN_DIRS:
        for path in sorted(Path(folder).glob("libOrthancDicomWeb.so*")) if Path(folder).is_dir() else []:
            return str(path)
    return None


def missing() -> str | None:
    """Why no local Orthanc can start (None: it can)."""
    if not binary():
        return "Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)"
    if not dicomweb_plugin():
        return "the Orthanc DICOMweb plugin is not installed (Debian: apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalOrthanc:
    """One Orthanc process with its storage under ``folder``."""

    folder: Path
    username: str = "fracture-ops"
    password: str = ""
    http_port: int = 0
    dicom_port: int = 0
    aet: str = "FOPACS"
    pid: int | None = None

    def __post_init__(self):
        self.folder = Path(self.folder)
        self.http_port = self.http_port or free_port()
        self.dicom_port = self.dicom_port or free_port()
        if not self.password:
            import secrets

            self.password = secrets.token_urlsafe(16)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def env(self) -> dict[str, str]:
        """What ``pacs-ingest`` reads to reach this server."""
        from fracture_ops.pacs.dicomweb import PASSWORD_ENV, URL_ENV, USER_ENV

        return {URL_ENV: self.dicomweb_url, USER_ENV: self.username, PASSWORD_ENV: self.password}

    def config(self) -> dict:
        storage = str(self.folder / "storage")
        return {"Name": "fracture-ops-local-pacs", "StorageDirectory": storage, "IndexDirectory": storage,
                "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet,
                "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
                "RegisteredUsers": {self.username: self.password}, "HttpServerEnabled": True,
                "DicomServerEnabled": True, "Plugins": [dicomweb_plugin()],
                "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
                "StableAge": 1, "ConcurrentJobs": 1}

    def start(self, timeout: float = 60.0) -> LocalOrthanc:
        """Start the server and wait until its REST API answers with the account.

        Raises:
            RuntimeError: Orthanc or its plugin is missing, or the server did not come up.
        """
        why = missing()
        if why:
            raise RuntimeError(why)
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=1))
        os.chmod(cfg, 0o600)  # holds the password
        log = open(self.folder / "orthanc.log", "ab")
        proc = subprocess.Popen([binary(), str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.pid = proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited {proc.returncode}: see {self.folder / 'orthanc.log'}")
            if self.healthy():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s")

    def healthy(self) -> bool:
        try:
            self.rest("GET", "/system")
            return True
        except (OSError, urllib.error.URLError):
            return False

    def rest(self, method: str, path: str, body: bytes | None = None) -> dict | list:
        """One call of Orthanc's REST API with the account."""
        auth = b64encode(f"{self.username}:{self.password}".encode()).decode()
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Authorization": f"Basic {auth}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            data = resp.read()
        return json.loads(data) if data else {}

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL); the storage stays for a restart."""
        if not self.pid:
            return
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            self.pid = None
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                    break
            except ChildProcessError:  # not our child (started by another process)
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    break
            time.sleep(0.2)
        else:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pid = None
