"""Benchmark: does the demo's model learn, whatever the de-identification key and seed?

``make demo`` de-identifies with a random development key, and the patient-wise split follows the
pseudonyms that key makes; the seed steers the training. A demo whose model passes its gate for
one key and learns nothing for another is a coin toss a new user loses half the time. This runs
the demo's training path (synthetic data generated once, then ingest, validate, de-identify,
split, train, calibrate, tune thresholds and evaluate, each step the command the DAG runs, through
the local runner) with the trigger form's ``cpu-quick`` profile under ``--keys`` different keys,
key ``i`` with seed ``i``, and applies the gate's own rules (:func:`fracture_ops.registry.gate.
compare`, no champion: the floors on test AUROC and sensitivity) to each run's test-set figures.

It prints one row per key (epochs run, the epoch kept, whether the training loss had moved by
then, test AUROC with its patient-bootstrap interval, sensitivity, the verdict, seconds) and
the summary: gates passed, the minimum test AUROC. Exit status 1 unless every gate passes.
``--set FIELD=VALUE`` overrides a training trigger parameter (e.g. ``--set backbone=test_resnet``
``--set pretrained_path=`` to screen another recipe on the same keys).

About 1.5 to 2.5 minutes per key on 2 CPU cores. Run: ``python benchmarks/bench_demo.py``.
Not a test: its result depends on training, which is what it measures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FRACTURE_OPS_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))



def steps() -> list[str]:
    """The demo's steps up to the evaluation, in the DAG's order (from the specs)."""
    from fracture_ops.orchestration.demo import DATA_STEPS, MODEL_STEPS

    chain = DATA_STEPS + MODEL_STEPS
    return chain[:chain.index("evaluate") + 1]


def key_for(i: int) -> str:
    """Development key ``i``: 64 hex characters, different for every ``i``, the same every run."""
    return hashlib.sha256(f"fracture-ops bench_demo key {i}".encode()).hexdigest()


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def run_key(i: int, root: Path, manifest: Path, overrides: dict) -> dict:
    """The demo's training path under key ``i`` and seed ``i``; the gate's verdict on its test
    figures."""
    from fracture_ops import catalog, storage
    from fracture_ops.orchestration.local_runner import StepFailed, run_step
    from fracture_ops.orchestration.params import defaults
    from fracture_ops.orchestration.specs import TRAINING_STEPS, run_folder
    from fracture_ops.registry.gate import GateConfig, compare

    params = defaults(source_uri=str(manifest), layout="csv", artifact_root=str(root / "artifacts"),
                      profile="cpu-quick", seed=i, **overrides)
    run_id = f"key{i}"
    os.environ["FRACTURE_OPS_DEID_SECRET"] = key_for(i)
    log = root / f"key{i}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        for name in steps():
            try:
                run_step(TRAINING_STEPS[name], {"params": params, "run_id": run_id},
                         emit=lambda line: fh.write(line + "\n"))
            except StepFailed as exc:
                return {"key": i, "failed": f"{name}: {exc}", "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    folder = run_folder(params, run_id)
    ev = storage.read_json(storage.join(folder, catalog.EVALUATION.path))
    info = storage.read_json(storage.join(folder, catalog.MODEL_INFO.path))
    history = storage.read_json(storage.join(folder, "train", "history.json"))
    cls = ev["class_names"][0]
    m = ev["metrics"]["per_class"][cls]
    scores = {"auroc": m["auroc"]["value"], "sensitivity": m["sensitivity"]["value"],
              "specificity": m["specificity"]["value"], "ece": m["ece"]["value"],
              "n": ev["n_images"]}
    verdict = compare(scores, None, GateConfig(artifact_root=str(root / "artifacts"), run_id=run_id))
    kept = info["best_epoch"]
    losses = [h["train_loss"] for h in history]
    moved = kept >= 0 and losses[kept] < losses[0] - 0.02
    return {"key": i, "epochs_run": info["epochs_run"], "kept": kept, "loss_moved": moved,
            "auroc": scores["auroc"], "ci": (m["auroc"]["ci_low"], m["auroc"]["ci_high"]),
            "sensitivity": scores["sensitivity"], "n_test": ev["n_images"],
            "passed": verdict.passed, "reasons": verdict.reasons, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=10, help="development keys (and seeds) to run")
    ap.add_argument("--first", type=int, default=0, help="the first key's number")
    ap.add_argument("--patients", type=int, default=160, help="synthetic patients (the demo's)")
    ap.add_argument("--root", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a training trigger parameter")
    args = ap.parse_args(argv)
    overrides = dict(s.split("=", 1) for s in args.set)
    overrides = {k: _value(v) if v else "" for k, v in overrides.items()}
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-demo-")).resolve()
    from fracture_ops.data.synthetic import SynthConfig, synth_step

    # the demo's data set, generated once (the key changes the pseudonyms and so the split)
    synth_step(SynthConfig(out_dir=str(root / "synthetic"), n_patients=args.patients,
                           image_size=128, dicom_fraction=0.25, seed=0))
    manifest = root / "synthetic" / "manifest.csv"
    print(f"bench_demo: cpu-quick profile{' with ' + str(overrides) if overrides else ''}, "
          f"{args.keys} keys, {args.patients} synthetic patients, work folder {root}", flush=True)
    print(f"{'key':>4} {'epochs':>6} {'kept':>4} {'loss moved':>10} {'test AUROC (95% CI)':>22} "
          f"{'sens':>5} {'n':>4} {'gate':>6} {'s':>5}", flush=True)
    rows = []
    for i in range(args.first, args.first + args.keys):
        r = run_key(i, root, manifest, overrides)
        rows.append(r)
        if "failed" in r:
            print(f"{i:>4} failed at {r['failed']} ({r['seconds']:.0f} s)", flush=True)
            continue
        ci = f"{r['auroc']:.3f} ({r['ci'][0]:.2f}-{r['ci'][1]:.2f})"
        print(f"{i:>4} {r['epochs_run']:>6} {r['kept']:>4} {str(r['loss_moved']):>10} {ci:>22} "
              f"{r['sensitivity']:>5.2f} {r['n_test']:>4} {'pass' if r['passed'] else 'FAIL':>6} "
              f"{r['seconds']:>5.0f}" + ("" if r["passed"] else f"  {'; '.join(r['reasons'])}"),
              flush=True)
    done = [r for r in rows if "failed" not in r]
    passed = sum(r["passed"] for r in done)
    print(f"gates passed: {passed} of {len(rows)}; minimum test AUROC "
          f"{min((r['auroc'] for r in done), default=float('nan')):.3f}; mean seconds per key "
          f"{sum(r['seconds'] for r in rows) / max(1, len(rows)):.0f}", flush=True)
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
