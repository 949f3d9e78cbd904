"""A data set stored as parts: one table per study under ``parts/`` and the manifest built from
them (``pacs-ingest`` writes it a study at a time; ``deid review`` adds the instances a person
released from ``held/``).

- ``parts/<study key>.parquet``: the study's released rows (its presence means every wanted
  instance of the study was written, quarantined or held);
- ``parts/<study key>.json``: how many instances that was (to notice a study that grew);
- ``manifest.parquet``: every part's rows, canonical columns, sorted by image id.
"""

from __future__ import annotations

from fracture_ops import storage

MANIFEST = "manifest.parquet"


def part_files(root: str) -> dict[str, str]:
    """Study key -> part file, for the studies recorded under ``root``."""
    folder = storage.join(root, "parts")
    return {uri.rsplit("/", 1)[-1][:-len(".parquet")]: uri
            for uri in (storage.list_files(folder, (".parquet",)) if storage.exists(folder) else [])}


def commit_part(root: str, key: str, rows: list[dict], instances: int) -> None:
    """Record one study: its instance count, then its part (the part last: its presence means
    every instance of the study is written, quarantined or held)."""
    import pandas as pd

    storage.write_json(storage.join(root, "parts", f"{key}.json"),
                       {"instances": instances, "counted": "wanted_series"})
    storage.write_parquet(storage.join(root, "parts", f"{key}.parquet"),
                          pd.DataFrame(rows, columns=list(rows[0]) if rows else ["image_id"]))


def add_to_part(root: str, key: str, row: dict) -> None:
    """Add one row to a recorded study's part (a row of the same image id is replaced).

    Raises:
        FileNotFoundError: the study has no part yet (it is not recorded).
    """
    import pandas as pd

    uri = storage.join(root, "parts", f"{key}.parquet")
    if not storage.exists(uri):
        raise FileNotFoundError(uri)
    part = storage.read_parquet(uri)
    if "image_id" in part.columns:
        part = part[part["image_id"] != row["image_id"]]
    frames = [f for f in (part, pd.DataFrame([row])) if len(f)]
    storage.write_parquet(uri, pd.concat(frames, ignore_index=True))


def rebuild_manifest(root: str):
    """The data set's manifest: every part's rows, canonical columns, sorted by image id."""
    import pandas as pd

    from fracture_ops.data.manifest import normalize_manifest

    frames = [storage.read_parquet(uri) for uri in sorted(part_files(root).values())]
    frames = [f for f in frames if len(f)]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["image_id", "image_uri", "patient_id", "study_id", "label"])
    return normalize_manifest(table)
