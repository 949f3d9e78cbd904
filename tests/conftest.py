"""Shared test settings and fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# offline and quiet: no update checks, no telemetry, no hub downloads, no progress bars in logs
for _k, _v in {
    "NO_ALBUMENTATIONS_UPDATE": "1", "GX_ANALYTICS_ENABLED": "False", "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1", "FRACTURE_OPS_NO_PROGRESS": "1",
}.items():
    os.environ.setdefault(_k, _v)

# `make test` runs two pytest-xdist workers (one test file each at a time): each gets its share of
# the cores for torch/OpenMP math, and the processes they start inherit it
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    for _k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_k, str(_share))

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The real radiographs in ../shared/realdata; skips (visibly) only where they are absent."""
    if not REALDATA.is_dir():
        pytest.skip(f"real data not found at {REALDATA} (a user's clone without ../shared)")
    return REALDATA


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory):
    """A small synthetic data set (24 patients x 2 views, 128 px), generated once per session."""
    from fracture_ops.data.synthetic import SynthConfig, synth_step

    out = tmp_path_factory.mktemp("synthetic")
    cfg = SynthConfig(out_dir=str(out), n_patients=24, image_size=128, seed=7)
    synth_step(cfg)
    return cfg


@pytest.fixture(scope="module")
def s3():
    """A local S3-compatible server (moto) with test buckets; storage.* talks to it via
    ``S3_ENDPOINT_URL`` for the duration of the module."""
    from tests.services import S3Server

    server = S3Server(buckets=("fo-test", "fo-infer"))
    old = os.environ.get("S3_ENDPOINT_URL")
    os.environ["S3_ENDPOINT_URL"] = server.endpoint
    yield server
    if old is None:
        os.environ.pop("S3_ENDPOINT_URL", None)
    else:
        os.environ["S3_ENDPOINT_URL"] = old
    server.stop()


# `make test` hands whole files to its two workers (--dist loadfile) in collection order
# (--no-loadscope-reorder): the longest files go first, so no long file starts last while the
# other worker idles (longest-processing-time-first). Seconds per file on 2 cores, from
# `--durations=0`; a file not listed runs after these, in the usual order.
LONGEST_FIRST = (
    "test_devstack.py", "test_registry_attacks.py", "test_promotion.py",
    "test_airflow_integration.py", "test_deid_corpus.py", "test_distributed.py", "test_explain.py",
    "test_training_e2e.py", "test_webhooks.py", "test_pacs.py", "test_deid_pixels.py",
    "test_detection.py", "test_realdata_chain.py", "test_inference.py", "test_deid.py",
    "test_security.py", "test_registry_security.py", "test_docker.py", "test_synthetic.py",
)


def _file_rank(item) -> int:
    name = Path(str(item.fspath)).name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    """Longest files first (see ``LONGEST_FIRST``); ``gpu``-marked tests need CUDA: where torch
    sees none they skip, saying so."""
    items.sort(key=_file_rank)  # stable: a file's own tests keep their order
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False); "
                                   "run make gpu-check on a GPU machine")
    for item in gpu:
        item.add_marker(skip)
