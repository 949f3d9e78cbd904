"""A DICOMweb connection to a PACS (``dicomweb-client``), with the platform's failure rules.

The endpoint and the account come from the environment, which a Kubernetes Secret
(``fracture-ops-pacs``) or the Airflow connection (``fracture_ops_pacs``, see
:mod:`fracture_ops.orchestration.airflow_tasks`) fills; they never come from a config file, a
command line or a log line.

Failures:
- the PACS is down, slow or answers 5xx/429: each call is retried with exponential back-off, and
  after the last try :class:`PacsUnavailable` (exit 1: the task is retried later);
- 401/403: :class:`PacsAuthError` naming the connection (exit 2: retrying cannot fix an account);
- anything else the server refuses (400, 404 ...): :class:`PacsRequestError`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from fracture_ops.errors import ConfigError, FractureOpsError
from fracture_ops import envvars

log = logging.getLogger(__name__)
T = TypeVar("T")

URL_ENV, USER_ENV, PASSWORD_ENV = envvars.PACS_URL, envvars.PACS_USERNAME, envvars.PACS_PASSWORD
CONNECTION_ENV = envvars.PACS_CONNECTION  # the name errors give (Airflow connection id)
DEFAULT_CONNECTION = "fracture_ops_pacs"
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class PacsAuthError(ConfigError):
    """The PACS refused the account (401/403), or its TLS certificate."""


class PacsUnavailable(FractureOpsError):
    """The PACS could not be reached or kept failing after the retries."""


class PacsRequestError(FractureOpsError):
    """The PACS refused a request for another reason (4xx)."""


class PacsUrlError(ConfigError):
    """The DICOMweb root answers a search with 400/404: the URL is not a DICOMweb root (exit 2)."""


def quiet_dicom_libraries() -> None:
    """Keep original identifiers out of task logs: dicomweb-client logs every request with its
    study, series and instance UIDs (INFO, and ERROR for refused stores); highdicom and pydicom
    warn with the values they find (a referring physician's name, a UID), as log records and as
    Python warnings. The PACS steps, which handle identified data, silence all of them."""
    import warnings

    for name in ("dicomweb_client", "urllib3.connectionpool", "highdicom", "pydicom"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    for module in ("highdicom", "pydicom", "dicomweb_client"):
        warnings.filterwarnings("ignore", module=module)


@dataclass(frozen=True)
class PacsConnection:
    """Where the PACS's DICOMweb root is and who we are there (the password is not printed)."""

    url: str
    username: str = ""
    password: str = ""
    name: str = DEFAULT_CONNECTION
    timeout_s: float = 60.0
    retries: int = 5
    backoff_s: float = 2.0

    def __repr__(self) -> str:  # never the password
        return f"PacsConnection({self.name!r}, url={self.url!r}, user={self.username!r})"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **options) -> PacsConnection:
        """The connection from ``$FRACTURE_OPS_PACS_URL``, ``..._USERNAME``, ``..._PASSWORD``.

        Raises:
            ConfigError: no URL, or a URL that is not http(s).
        """
        env = os.environ if env is None else env
        name = env.get(CONNECTION_ENV) or DEFAULT_CONNECTION
        url = (env.get(URL_ENV) or "").strip().rstrip("/")
        if not url:
            raise ConfigError(f"PACS connection {name!r}: {URL_ENV} is not set (the DICOMweb root, "
                              "e.g. https://pacs.example.org/dicom-web)")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"PACS connection {name!r}: {URL_ENV} must be an http(s) URL")
        from urllib.parse import urlsplit

        if urlsplit(url).username is not None or urlsplit(url).password is not None:
            raise ConfigError(f"PACS connection {name!r}: {URL_ENV} must not carry a user or "
                              f"password; use {USER_ENV} and {PASSWORD_ENV}")
        return cls(url=url, username=env.get(USER_ENV, ""), password=env.get(PASSWORD_ENV, ""),
                   name=name, **options)

    def client(self):
        """A ``dicomweb_client.DICOMwebClient`` on a session with the account and timeout."""
        import requests
        from dicomweb_client.api import DICOMwebClient

        quiet_dicom_libraries()
        session = requests.Session()
        if self.username:
            session.auth = requests.auth.HTTPBasicAuth(self.username, self.password)
        client = DICOMwebClient(self.url, session=session, timeout=self.timeout_s)
        client.set_http_retry_params(retry=False)  # our own back-off, with our own error rules
        return client

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` with the retry rules above; ``what`` names the request in errors."""
        import requests

        delay = self.backoff_s
        for attempt in range(1, self.retries + 2):
            try:
                return fn()
            except requests.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else None
                if status in (401, 403):
                    raise PacsAuthError(
                        f"PACS connection {self.name!r} ({self.url}): {status} "
                        f"{'unauthorised' if status == 401 else 'forbidden'} on {what}: check the "
                        "account (login/password) of the connection") from None
                if status in (400, 404) and what.startswith("QIDO-RS first study search"):
                    # the first request of a run: a root that answers it with 400/404 is not a
                    # DICOMweb root (Orthanc's is <server>/dicom-web); retrying will not help
                    raise PacsUrlError(
                        f"PACS connection {self.name!r}: {self.url} answered the study search "
                        f"with HTTP {status}: it does not look like a DICOMweb root. Check "
                        f"{URL_ENV} (the QIDO-RS/WADO-RS root, often ending in /dicom-web, e.g. "
                        "http://pacs:8042/dicom-web)") from None
                if status not in RETRYABLE_STATUS:
                    raise PacsRequestError(f"PACS connection {self.name!r}: {what} refused with "
                                           f"HTTP {status}") from None
                reason = f"HTTP {status}"
            except requests.exceptions.SSLError:
                raise PacsAuthError(f"PACS connection {self.name!r} ({self.url}): TLS failed on "
                                    f"{what}: check the server certificate and the CA bundle "
                                    "(REQUESTS_CA_BUNDLE)") from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as exc:
                reason = type(exc).__name__
            if attempt > self.retries:
                raise PacsUnavailable(f"PACS connection {self.name!r} ({self.url}): {what} failed "
                                      f"{attempt} times ({reason}); retry later") from None
            log.warning("PACS %s: %s failed (%s); try %d of %d in %.0f s", self.name, what, reason,
                        attempt + 1, self.retries + 1, delay)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")


def env_from_connection(name: str, host: str, schema: str = "", port: int | None = None,
                        login: str = "", password: str = "", path: str = "") -> dict[str, str]:
    """The step's environment from an Airflow connection's fields: ``host`` is either the whole
    DICOMweb root (``https://pacs.example.org/dicom-web``) or a host name, completed with
    ``schema`` (default https), ``port`` and the extra ``path`` (default ``/dicom-web``).

    Raises:
        ConfigError: no host.
    """
    host = (host or "").strip()
    if not host:
        raise ConfigError(f"PACS connection {name!r} has no host (the DICOMweb root URL)")
    if host.startswith(("http://", "https://")):
        url = host
    else:
        url = f"{schema or 'https'}://{host}{f':{port}' if port else ''}/{(path or 'dicom-web').lstrip('/')}"
    return {URL_ENV: url.rstrip("/"), USER_ENV: login or "", PASSWORD_ENV: password or "",
            CONNECTION_ENV: name}


def tag_value(item: dict, tag: str, default: str = "") -> str:
    """The first value of a DICOM JSON attribute (QIDO-RS result), as a string."""
    values = (item.get(tag) or {}).get("Value") or []
    if not values:
        return default
    value = values[0]
    if isinstance(value, dict):  # person names
        value = value.get("Alphabetic", "")
    return str(value)


def tag_values(item: dict, tag: str) -> list[str]:
    return [str(v) for v in ((item.get(tag) or {}).get("Value") or [])]
