"""The DICOM objects a result goes back to the PACS as (``highdicom``).

- A Comprehensive SR: the fracture probability, the decision at the model's tuned threshold and
  that threshold, the algorithm's name and version (DCM 111001/111003), the source image, and the
  statement that the result is for research use only.
- A Secondary Capture: the Grad-CAM overlay (RGB), with the same statement in Image Comments and
  the series description.

Both carry the source radiograph's patient and study (so the PACS files them under the original
study) and reference its SOP instance. Their UIDs are derived from the source instance and the
model version, so sending a result twice sends the same objects (the PACS keeps one copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RUO = "For research and education only; not for clinical use."
SCHEME = "99FRACOPS"  # private coding scheme of the platform's own concepts
MANUFACTURER = "fracture-ops"
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9201, 9202
MAX_SC_SIDE = 2048


@dataclass(frozen=True)
class ImageResult:
    """One radiograph's result as the champion scored it."""

    probability: float
    decision: bool
    threshold: float
    class_name: str
    model_name: str
    model_version: str


def result_uid(source_sop_uid: str, result: ImageResult, kind: str) -> str:
    """A UID for the SR or SC of one source instance and model version (stable across reruns)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[source_sop_uid, result.model_name, result.model_version, kind]))


def series_uid(study_uid: str, result: ImageResult, kind: str) -> str:
    """One SR series and one SC series per study and model version (not one per radiograph)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[study_uid, result.model_name, result.model_version, kind, "series"]))


def _orientation(source) -> tuple[str, str] | None:
    """The source's Patient Orientation (the overlay keeps its geometry), else None (unknown:
    the attribute is written empty)."""
    value = list(source.get("PatientOrientation", []) or [])
    if len(value) == 2 and all(value):
        return str(value[0]), str(value[1])
    return None


def _code(value: str, meaning: str, scheme: str = SCHEME):
    import highdicom as hd

    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def build_sr(source, result: ImageResult):
    """The Comprehensive SR of one result over the ``source`` instance (a pydicom Dataset)."""
    import highdicom as hd

    contains = hd.sr.RelationshipTypeValues.CONTAINS
    label = result.class_name.replace("_", " ")
    items = [
        hd.sr.TextContentItem(_code("121106", "Comment", "DCM"), RUO, relationship_type=contains),
        hd.sr.TextContentItem(_code("111001", "Algorithm Name", "DCM"), result.model_name,
                              relationship_type=contains),
        hd.sr.TextContentItem(_code("111003", "Algorithm Version", "DCM"), str(result.model_version),
                              relationship_type=contains),
        hd.sr.NumContentItem(_code("FO-0002", f"Probability of {label}"), float(result.probability),
                             unit=_code("1", "no units", "UCUM"), relationship_type=contains),
        hd.sr.NumContentItem(_code("FO-0004", "Decision threshold"), float(result.threshold),
                             unit=_code("1", "no units", "UCUM"), relationship_type=contains),
        hd.sr.CodeContentItem(_code("FO-0003", "Decision at the tuned threshold"),
                              _code("FO-0010", label) if result.decision else _code("FO-0011", f"no {label}"),
                              relationship_type=contains),
        hd.sr.ImageContentItem(_code("121112", "Source of Measurement", "DCM"),
                               referenced_sop_class_uid=source.SOPClassUID,
                               referenced_sop_instance_uid=source.SOPInstanceUID,
                               relationship_type=contains),
    ]
    root = hd.sr.ContainerContentItem(_code("FO-0001", "Fracture detection result (research use only)"))
    root.ContentSequence = hd.sr.ContentSequence(items, is_root=False)
    sr = hd.sr.ComprehensiveSR(
        evidence=[source], content=root,
        series_instance_uid=series_uid(source.StudyInstanceUID, result, "sr"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid(source.SOPInstanceUID, result, "sr"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True)
    sr.SeriesDescription = "fracture-ops result (research use only)"
    return sr


def build_sc(source, overlay_rgb: np.ndarray, result: ImageResult):
    """The Secondary Capture of a Grad-CAM overlay (``H x W x 3`` uint8) of ``source``."""
    import highdicom as hd

    rgb = np.ascontiguousarray(overlay_rgb, dtype=np.uint8)
    if max(rgb.shape[:2]) > MAX_SC_SIDE:
        from PIL import Image

        scale = MAX_SC_SIDE / max(rgb.shape[:2])
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    orientation = _orientation(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid(source.StudyInstanceUID, result, "sc"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=result_uid(source.SOPInstanceUID, result, "sc"), instance_number=1,
        # highdicom needs a value for the patient coordinate system; an unknown one is then
        # written empty (Type 2), never guessed
        manufacturer=MANUFACTURER, patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1")
    if orientation is None:
        sc.PatientOrientation = ""
    sc.SeriesDescription = "fracture-ops Grad-CAM (research use only)"
    sc.ImageComments = (f"{RUO} Grad-CAM of {result.model_name} version {result.model_version}; "
                        f"probability {result.probability:.3f}, threshold {result.threshold:.3f}.")
    sc.BurnedInAnnotation = "NO"
    # General Series Laterality (Type 2C): the source's side when it has one, else empty
    side = str(source.get("Laterality", "") or source.get("ImageLaterality", "") or "").strip().upper()
    sc.Laterality = side if side in ("L", "R") else ""
    return sc
