"""Error types shared by every step, and the CLI exit codes they map to.

A step distinguishes *bad input* (a corrupt image, a missing column, a leaking split: the user must
fix the data, retrying will not help) from *internal* failures (a bug, a lost connection: a retry
may help). Orchestration relies on the exit codes to decide whether to retry.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_BAD_INPUT = 3
EXIT_BUDGET_EXCEEDED = 4  # too much bad input: the error budget of a step was exceeded
# the retry policy every runner follows (local subprocess, Kubernetes pod, TrainJob): a step that
# exits with one of these is not retried (the data or the config must change); anything else is
NOT_RETRYABLE = frozenset({EXIT_USAGE, EXIT_BAD_INPUT, EXIT_BUDGET_EXCEEDED})


def retryable(exit_code: int | None) -> bool:
    """Whether a step that exited with ``exit_code`` may be retried (see :data:`NOT_RETRYABLE`)."""
    return exit_code not in NOT_RETRYABLE


class FractureOpsError(Exception):
    """Base class of every error raised on purpose by fracture_ops."""

    exit_code = EXIT_INTERNAL


class BadInputError(FractureOpsError):
    """The input data is wrong; retrying will not help."""

    exit_code = EXIT_BAD_INPUT


class FileRejected(BadInputError):
    """One file cannot be de-identified; the message is PHI-free and goes into the report."""


class ImageDecodeError(BadInputError):
    """An image file could not be read or decoded.

    Args:
        path: the file (URI) that failed.
        cause: a short human-readable reason.
    """

    def __init__(self, path: str, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"cannot decode image {self.path}: {cause}")


class ManifestError(BadInputError):
    """A manifest or data-source layout is malformed (missing column, bad value)."""


class LeakageError(BadInputError):
    """A patient appears in more than one split."""


class ErrorBudgetExceeded(BadInputError):
    """More input was quarantined than the step's configured error budget allows."""

    exit_code = EXIT_BUDGET_EXCEEDED


class RegistryUnavailable(FractureOpsError):
    """The model registry did not answer a lookup (timeout, permission, server error): nothing
    may be decided from it; the task fails and a retry may help."""


class UnsafeModelFile(BadInputError):
    """A model or checkpoint file holds more than tensors and plain values (loading it would
    run code): refused."""


class ConfigError(FractureOpsError):
    """A configuration file or override is invalid."""

    exit_code = EXIT_USAGE
