"""Storage layer: local and s3:// URIs through boto3 (local S3-compatible server), and a training
run whose artifact root is in S3 (checkpoints mirrored, resumable from another machine)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from fracture_ops import storage


def test_local_atomic_write_list_and_reset(tmp_path):
    uri = storage.write_json(str(tmp_path / "a" / "b.json"), {"x": 1})
    assert storage.read_json(uri) == {"x": 1}
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]
    storage.write_text(str(tmp_path / "a" / "c.TXT"), "hi")
    assert storage.list_files(str(tmp_path / "a"), (".txt",)) == [str(tmp_path / "a" / "c.TXT")]
    storage.mark_success(str(tmp_path / "a"), {"ok": True})
    assert storage.is_complete(str(tmp_path / "a"))
    storage.reset_dir(str(tmp_path / "a"))
    assert list((tmp_path / "a").iterdir()) == [] and not storage.is_complete(str(tmp_path / "a"))


@pytest.mark.integration
def test_s3_round_trip(s3):
    base = "s3://fo-test/runs/r1/step"
    storage.write_parquet(storage.join(base, "t.parquet"), pd.DataFrame({"a": [1, 2]}))
    storage.write_json(storage.join(base, "sub", "x.json"), {"k": "v"})
    assert storage.read_parquet(storage.join(base, "t.parquet"))["a"].tolist() == [1, 2]
    assert storage.list_files(base) == [f"{base}/sub/x.json", f"{base}/t.parquet"]
    assert storage.exists(f"{base}/t.parquet") and not storage.exists(f"{base}/nope")
    with storage.local_path(f"{base}/sub/x.json") as p:
        assert p.read_text().strip().startswith("{")
    storage.reset_dir(base)
    assert storage.list_files(base) == []


@pytest.mark.integration
@pytest.mark.slow
def test_training_with_s3_artifact_root_resumes_from_s3(s3, tmp_path, monkeypatch):
    from fracture_ops.data.split import SplitConfig, split_step
    from fracture_ops.data.synthetic import SynthConfig, synth_step
    from fracture_ops.training.train import TrainConfig, train_step

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("FRACTURE_OPS_CACHE_DIR", str(tmp_path / "pod-volume"))
    synth_step(SynthConfig(out_dir=str(tmp_path / "syn"), n_patients=20, image_size=64, seed=5))
    split = split_step(SplitConfig(manifest_uri=str(tmp_path / "syn" / "manifest.parquet"),
                                   artifact_root="s3://fo-test/art", run_id="s3run"))
    assert split["split_uri"].startswith("s3://")
    cfg = TrainConfig(split_uri=split["split_uri"], backbone="test_resnet", image_size=64, epochs=2,
                      batch_size=8, artifact_root="s3://fo-test/art", run_id="s3run")
    first = train_step(cfg)
    out = "s3://fo-test/art/runs/s3run/train"
    names = {u.rsplit("/", 1)[1] for u in storage.list_files(out)}
    assert {"last.pt", "best.pt", "model.pt", "predictions.parquet", "model_info.json",
            "mlflow_run.json", "_SUCCESS"} <= names
    # a new pod: no local work folder, an unfinished run in S3 -> resumes from S3's checkpoint
    shutil.rmtree(tmp_path / "pod-volume" / "work")
    storage.s3_client().delete_object(Bucket="fo-test", Key="art/runs/s3run/train/_SUCCESS")
    again = train_step(cfg)
    assert again["resumed"] and again["epochs_run"] == 2
    assert again["mlflow_run_id"] == first["mlflow_run_id"]
