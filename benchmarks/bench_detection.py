"""How well the detector learns on synthetic data, from scratch on the CPU (a measurement the
suite does not make: tests check the step's contract, not training luck).

120 synthetic patients (240 images, 192 px, femur + forearm), YOLOv8n at imgsz 192, 16 epochs,
batch 16, the same train arguments as the tests. Prints test mAP@0.5, mAP@0.5:0.95 and the
image-level AUROC against chance (0.5) and exits 1 when mAP@0.5 < 0.5.

    python benchmarks/bench_detection.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import os

    from fracture_ops import storage
    from fracture_ops.data.split import SplitConfig, split_by_patient
    from fracture_ops.data.synthetic import SynthConfig, synth_step
    from fracture_ops.detection.steps import detect_train_step
    from fracture_ops.detection.yolo import DetectConfig
    from tests.test_detection import SYNTH_TRAIN_ARGS

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("FRACTURE_OPS_MLFLOW_DIR", str(tmp / "mlflow"))
        os.chdir(tmp)
        syn = SynthConfig(out_dir=str(tmp / "syn"), n_patients=120, image_size=192, seed=0,
                          regions=["femur", "forearm"])
        synth_step(syn)
        manifest = storage.read_parquet(storage.join(syn.out_dir, "manifest.parquet"))
        split = split_by_patient(manifest, SplitConfig(val_fraction=0.15, test_fraction=0.2)).table
        storage.write_parquet(tmp / "split.parquet", split)
        cfg = DetectConfig(artifact_root=str(tmp / "art"), run_id="bench",
                           split_uri=str(tmp / "split.parquet"),
                           boxes_uri=storage.join(syn.out_dir, "boxes.parquet"), imgsz=192,
                           epochs=16, batch=16, device="cpu", workers=2,
                           train_args=SYNTH_TRAIN_ARGS)
        t0 = time.perf_counter()
        detect_train_step(cfg)
        wall = time.perf_counter() - t0
        metrics = json.loads((Path(cfg.output_dir("detect_train")) / "metrics.json").read_text())
    auroc = metrics["image_level"]["auroc"]
    print(f"detector, synthetic, 16 epochs: mAP@0.5 {metrics['map50']:.3f}, mAP@0.5:0.95 "
          f"{metrics['map50_95']:.3f}, image-level AUROC {auroc:.3f} ({auroc / 0.5:.2f}x chance), "
          f"{wall:.0f} s wall")
    return 0 if metrics["map50"] >= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
