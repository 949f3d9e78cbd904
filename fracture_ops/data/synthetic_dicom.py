"""Synthetic CR/DX DICOM files carrying fake PHI, for de-identification tests and demos.

The PHI is placed where real files hide it: standard header attributes, kept sequences
(Contributing Equipment, Source Patient Group Identification), removed sequences (Request
Attributes, Referenced Patient), a private block (with a private sequence) and the file meta.
All values are invented (``fake_patient``); nothing here describes a real person.
"""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SOP_CLASS = {"DX": "1.2.840.10008.5.1.4.1.1.1.1", "CR": "1.2.840.10008.5.1.4.1.1.1"}
PRIVATE_CREATOR = "FRACOPS SYNTH PHI"
PRIVATE_GROUP = 0x0011

# Deliberately unusual names so a byte search for them cannot hit ordinary DICOM text.
_FIRST = ["Aurelio", "Brigitta", "Cosimo", "Delphine", "Evander", "Fiorella", "Gustavo",
          "Hortensia", "Ignatius", "Jolanthe", "Kasimir", "Leocadia"]
_LAST = ["Okonkwo", "Lindqvist", "Marchetti", "Abernathy", "Thistlewood", "Quarshie",
         "Vasquezmoya", "Przybylski", "Oyelaran", "Haverbrook", "Zimmerfeld", "Nakashima"]
_INSTITUTIONS = ["Hollowmere General Infirmary", "Saint Quillon Bone Clinic",
                 "Brackenfield Orthopaedic Centre", "Marrowgate University Hospital"]


def _fake_name(rng: np.random.Generator) -> str:
    return f"{_LAST[rng.integers(len(_LAST))].upper()}^{_FIRST[rng.integers(len(_FIRST))].upper()}"


def _fake_date(rng: np.random.Generator, start: date, span_days: int) -> str:
    return (start + timedelta(days=int(rng.integers(span_days)))).strftime("%Y%m%d")


def fake_patient(rng: np.random.Generator) -> dict:
    """Deterministic fake PHI for one patient (same generator state, same patient).

    Args:
        rng: a NumPy generator, e.g. ``np.random.default_rng(seed)``.

    Returns:
        A dict with ``patient_name`` (``LAST^FIRST``), ``patient_id`` (10 digits),
        ``birth_date`` and ``study_date`` (``YYYYMMDD``), ``accession`` and ``institution``:
        the PHI keyword arguments of :func:`write_phi_dicom`.
    """
    return {
        "patient_name": _fake_name(rng),
        "patient_id": "".join(str(d) for d in rng.integers(0, 10, 10)),
        "birth_date": _fake_date(rng, date(1935, 1, 1), 365 * 70),
        "study_date": _fake_date(rng, date(2008, 1, 1), 365 * 15),
        "accession": "ACC" + "".join(str(d) for d in rng.integers(0, 10, 9)),
        "institution": _INSTITUTIONS[rng.integers(len(_INSTITUTIONS))],
    }


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _add_patient_study(ds: Dataset, rng: np.random.Generator, phi: dict) -> None:
    ds.PatientName = phi["patient_name"]
    ds.PatientID = phi["patient_id"]
    ds.PatientBirthDate = phi["birth_date"]
    ds.PatientSex = "MF"[int(rng.integers(2))]
    ds.OtherPatientNames = _fake_name(rng)
    ds.PatientAddress = f"{int(rng.integers(10, 999))} Quillfeather Lane, Wrenbury"
    ds.PatientTelephoneNumbers = f"555-{int(rng.integers(1000, 9999))}"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = phi["study_date"]
    ds.ContentDate = phi["content_date"]
    ds.StudyTime, ds.SeriesTime, ds.ContentTime = "101500", "101510", "101530.250"
    ds.AcquisitionDateTime = phi["study_date"] + "101520.125+0100"
    ds.AccessionNumber = phi["accession"]
    ds.InstitutionName = phi["institution"]
    ds.InstitutionAddress = "1 Infirmary Row, Wrenbury"
    ds.ReferringPhysicianName = _fake_name(rng)
    ds.PerformingPhysicianName = _fake_name(rng)
    ds.OperatorsName = _fake_name(rng)
    ds.StationName = f"XR-ROOM-{int(rng.integers(1, 9))}"
    ds.DeviceSerialNumber = f"SN{int(rng.integers(10**6, 10**7))}"
    first_last = phi["patient_name"].split("^")
    ds.StudyDescription = f"XR WRIST for {first_last[-1].title()} {first_last[0].title()}"
    ds.StudyID = phi["accession"][-6:]


def _add_sequences(ds: Dataset, rng: np.random.Generator, phi: dict,
                   referenced_sop_uid: str | None) -> None:
    request = Dataset()  # removed wholesale by the profile (X)
    request.AccessionNumber = phi["accession"]
    request.RequestedProcedureID = "RP" + phi["accession"][-5:]
    request.ScheduledProcedureStepID = "SPS" + phi["accession"][-4:]
    request.ScheduledProcedureStepStartDate = phi["study_date"]
    ds.RequestAttributesSequence = [request]
    ref_patient = Dataset()  # removed wholesale (X); PHI inside on purpose
    ref_patient.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.1.1"
    ref_patient.ReferencedSOPInstanceUID = generate_uid(entropy_srcs=[phi["patient_id"], "pt"])
    ref_patient.PatientName = phi["patient_name"]
    ref_patient.AccessionNumber = phi["accession"]
    ds.ReferencedPatientSequence = [ref_patient]
    equipment = Dataset()  # kept (not in Table E.1-1): the profile must clean inside it
    equipment.Manufacturer = "ACME Relay"
    equipment.InstitutionName = phi["institution"]
    equipment.InstitutionAddress = "1 Infirmary Row, Wrenbury"
    equipment.OperatorsName = _fake_name(rng)
    equipment.ContributionDateTime = phi["study_date"] + "120000"
    equipment.PurposeOfReferenceCodeSequence = [_code_item("109103", "DCM", "Modifying Equipment")]
    ds.ContributingEquipmentSequence = [equipment]
    group = Dataset()  # kept and cleaned recursively: its Patient ID must become a pseudonym
    group.PatientID = phi["patient_id"]
    group.IssuerOfPatientID = phi["institution"]
    ds.SourcePatientGroupIdentificationSequence = [group]
    if referenced_sop_uid:
        source = Dataset()
        source.ReferencedSOPClassUID = ds.SOPClassUID
        source.ReferencedSOPInstanceUID = referenced_sop_uid
        ds.SourceImageSequence = [source]


def _add_private_block(ds: Dataset, phi: dict) -> None:
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", phi["patient_name"])
    block.add_new(0x11, "LO", phi["patient_id"])
    block.add_new(0x12, "DA", phi["birth_date"])
    block.add_new(0x13, "SH", phi["accession"])
    nested = Dataset()
    nested.PatientName = phi["patient_name"]
    nested.InstitutionName = phi["institution"]
    block.add_new(0x20, "SQ", [nested])


def _add_pixels(ds: Dataset, pixels: np.ndarray, photometric: str, bits_stored: int) -> None:
    if pixels.dtype != np.uint16 or pixels.ndim != 2:
        raise ValueError("pixels must be a 2-D uint16 array")
    if not 1 <= bits_stored <= 16 or int(pixels.max(initial=0)) >= 2 ** bits_stored:
        raise ValueError(f"pixel values do not fit in bits_stored={bits_stored}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError("photometric must be MONOCHROME1 or MONOCHROME2")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()


def write_phi_dicom(path: str | Path, pixels: np.ndarray, *, patient_name: str, patient_id: str,
                    birth_date: str, study_date: str, accession: str, institution: str,
                    photometric: str = "MONOCHROME2", bits_stored: int = 12, seed: int = 0,
                    modality: str = "DX", manufacturer: str = "ACME Imaging",
                    burned_in_annotation: str | None = "NO", content_date: str | None = None,
                    referenced_sop_uid: str | None = None) -> None:
    """Write a valid CR/DX DICOM file (explicit VR little endian) full of fake PHI.

    UIDs are derived from the PHI so files of one accession share Study/Series Instance UIDs
    (one study) while the SOP Instance UID also depends on ``seed``.

    Args:
        path: output file.
        pixels: 2-D uint16 image; values must fit in ``bits_stored``.
        patient_name, patient_id, birth_date, study_date, accession, institution: fake PHI
            (dates ``YYYYMMDD``); see :func:`fake_patient`.
        photometric: ``MONOCHROME2`` or ``MONOCHROME1``.
        bits_stored: 1..16.
        seed: varies the other fake values (physicians, times, serials) and the SOP Instance UID.
        modality: ``DX`` or ``CR`` (selects the SOP class).
        manufacturer: Manufacturer (0008,0070).
        burned_in_annotation: ``"NO"``/``"YES"``, or None to omit the attribute.
        content_date: Content Date (defaults to ``study_date``).
        referenced_sop_uid: when given, a Source Image Sequence references this SOP Instance.

    Raises:
        ValueError: bad pixel array, bits_stored, photometric or modality.
    """
    if modality not in SOP_CLASS:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASS)}")
    rng = np.random.default_rng(seed)
    phi = {"patient_name": patient_name, "patient_id": patient_id, "birth_date": birth_date,
           "study_date": study_date, "accession": accession, "institution": institution,
           "content_date": content_date or study_date}
    sop_uid = generate_uid(entropy_srcs=[patient_id, accession, str(seed), "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "PACS" + patient_id[-4:]
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASS[modality], sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[patient_id, accession, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[patient_id, accession, "series"])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[patient_id, accession, "for"])
    ds.Modality, ds.Manufacturer = modality, manufacturer
    ds.BodyPartExamined, ds.ViewPosition = "HAND", "PA"
    ds.PatientOrientation, ds.Laterality = ["L", "F"], "L"
    if modality == "DX":  # DX Image module Type 1/2 attributes
        ds.PresentationIntentType, ds.ImageLaterality = "FOR PRESENTATION", "L"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME2" else -1
        ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.WindowCenter, ds.WindowWidth = 2 ** (bits_stored - 1), 2 ** bits_stored
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.SeriesNumber, ds.InstanceNumber = 1, int(seed) % 1000 + 1
    if burned_in_annotation is not None:
        ds.BurnedInAnnotation = burned_in_annotation
    _add_patient_study(ds, rng, phi)
    _add_sequences(ds, rng, phi, referenced_sop_uid)
    _add_private_block(ds, phi)
    _add_pixels(ds, pixels, photometric, bits_stored)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
