"""The pure core of DICOM de-identification: the PS3.15 Annex E action table and its application.

Source: DICOM PS3.15 (2024b), Annex E "Attribute Confidentiality Profiles", Table E.1-1
"Application Level Confidentiality Profile Attributes", Basic Profile column, plus the
Retain Longitudinal Temporal Information Modified Dates Option (E.3.6), the Retain Patient
Characteristics Option (E.3.7) and the Retain Safe Private Option (E.3.10). Action codes:
D dummy, Z zero-length, X remove, K keep, C clean, U replace UID consistently; compound codes
(Z/D, X/Z, X/D, X/Z/D, X/Z/U*) depend on the attribute's Type in the IOD.

How this module resolves what the table leaves open (we do not track Types per IOD):
- Z/D -> Z (Patient ID -> the keyed pseudonym); X/Z -> Z; X/D -> D; X/Z/D -> Z: keeping an empty
  or dummy attribute is as private as removing it and never breaks Type 1/2 conformance.
- X/Z/U* sequences (Referenced/Source Image Sequence) are kept and cleaned recursively, so the
  SOP Instance UIDs inside are remapped consistently with the referenced instances.
- Sequences whose action is D or Z are emptied: a generic dummy item cannot be built, and
  recursion would keep code meanings that may name people (Person Identification Code Sequence).
- Sequences not in the table (K) are cleaned recursively, as E.1 requires.
- UIDs: every UI value outside the DICOM root ``1.2.840.10008.`` is remapped, listed or not,
  because instance UIDs often embed device serials and dates. The replacement is
  ``2.25.<HMAC-SHA256 of the UID as a UUIDv8>`` so the same input always maps to the same output.
- Dates (Modified Dates Option, which overrides the Basic column with C for dates and times):
  every DA and DT value, listed or not, is shifted by a whole number of days per patient (HMAC of
  the Patient ID); partial DT values coarser than a day and unparsable dates are
  emptied; the UTC offset suffix of DT is dropped (Timezone Offset From UTC is X). TM values are
  kept: a whole-day shift leaves times of day valid and keeps intra-day intervals. Patient's
  Birth Date/Time are never shifted but emptied/removed as in the Basic Profile.
- Stricter than the table: unlisted PN values are emptied, unlisted DA/DT are emptied when dates
  are not shifted, curve (50xx) and overlay (60xx) groups are removed entirely (the Clean
  Graphics Option is not implemented), and the attributes in ``EXTRA_REMOVE`` are removed.
- Private attributes are removed unless allow-listed as (creator, group, element byte).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta

from pydicom.datadict import dictionary_has_tag, dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

# Table E.1-1 (PS3.15 2024b), Basic Profile column, by action. Keywords as in PS3.6.
_TABLE = {
    "D": """
AcquisitionFieldOfViewLabel AnnotationGroupLabel AnnotationGroupUID AssertionDateTime
AttributeModificationDateTime BeamHoldTransitionDateTime CertificateOfSigner
ClinicalTrialProtocolEthicsCommitteeName ClinicalTrialProtocolID ClinicalTrialSponsorName
ClinicalTrialSubjectID ClinicalTrialSubjectReadingID ContainerIdentifier ContentSequence
ContextGroupLocalVersion ContextGroupVersion Date DateTime DecayCorrectionDateTime DestinationAE
DeviceLabel DigitalSignatureDateTime EffectiveDateTime EncapsulatedDocument EntityLabel
EntityLongLabel ExclusionStartDateTime FlowIdentifier FlowIdentifierSequence
FrameAcquisitionDateTime FrameOriginTimestamp FrameReferenceDateTime FunctionalSyncPulse
GraphicAnnotationSequence HangingProtocolCreationDateTime ImpedanceMeasurementDateTime
InformationIssueDateTime InterlockDateTime InterlockDescription InterlockOriginDescription
ModifyingSystem OverrideDateTime PersonIdentificationCodeSequence PersonName RTPlanLabel
RTPrescriptionLabel RTToleranceSetLabel RadiationDoseIdentificationLabel
RadiationDoseInVivoMeasurementLabel RadiationGenerationModeLabel
ReasonForTheAttributeModification RecordedRTControlPointDateTime ReferencedDateTime
SafePositionExitDate SafePositionExitTime SafePositionReturnDate SafePositionReturnTime
SelectorAEValue SelectorASValue SelectorDAValue SelectorDTValue SelectorLOValue SelectorLTValue
SelectorOBValue SelectorPNValue SelectorSHValue SelectorSTValue SelectorTMValue SelectorUNValue
SelectorURValue SelectorUTValue SourceEndDateTime SourceIdentifier SourceStartDateTime
SourceStrengthReferenceDate SourceStrengthReferenceTime SpecimenIdentifier StructureSetLabel
Time TreatmentControlPointDate TreatmentControlPointTime TreatmentPositionGroupLabel
TreatmentToleranceViolationDateTime TreatmentToleranceViolationDescription UserContentLabel
UserContentLongLabel VerificationDateTime VerifyingObserverName VerifyingObserverSequence
VerifyingOrganization XRayDetectorID XRaySourceID""",
    "Z": """
AccessionNumber CalibrationDateTime ClinicalTrialCoordinatingCenterName
ClinicalTrialProtocolName ClinicalTrialSiteID ClinicalTrialSiteName ClinicalTrialTimePointID
ConceptualVolumeCombinationDescription ConceptualVolumeDescription ConsultingPhysicianName
DeviceAlternateIdentifier FillerOrderNumberImagingServiceRequest FractionationNotes
IssuerOfTheContainerIdentifierSequence IssuerOfTheSpecimenIdentifierSequence
ManufacturerDeviceIdentifier ParticipationDateTime PatientBirthDate PatientName PatientSex
PlacerOrderNumberImagingServiceRequest PrescriptionNotes PrescriptionNotesSequence
ROIInterpreter ROIName RTAccessoryDeviceSlotID RTAccessoryHolderSlotID
RTPhysicianIntentNarrative RadiationGenerationModeDescription ReasonForSuperseding
ReferringPhysicianName ReviewDate ReviewTime SourceOfPreviousValues SpecimenPreparationSequence
StructureSetDate StructureSetTime StudyDate StudyID StudyTime TreatmentTechniqueNotes
VerifyingObserverIdentificationCodeSequence""",
    "X": """
AcquisitionComments AcquisitionProtocolDescription ActualHumanPerformersSequence
AdditionalPatientHistory AddressTrial AdmissionID AdmittingDate AdmittingDiagnosesCodeSequence
AdmittingDiagnosesDescription AdmittingTime AffectedSOPInstanceUID Allergies
AnnotationGroupDescription ApprovalStatusDateTime Arbitrary AssertionExpirationDateTime
AuthorObserverSequence BeamDescription BolusDescription BranchOfService CalibrationDate
CalibrationTime CameraOwnerName CassetteID CertifiedTimestamp
ClinicalTrialProtocolEthicsCommitteeApprovalNumber ClinicalTrialSeriesDescription
ClinicalTrialSeriesID ClinicalTrialTimePointDescription CommentsOnRadiationDose
CommentsOnThePerformedProcedureStep CompensatorDescription
ConfidentialityConstraintOnPatientDataDescription ConsultingPhysicianIdentificationSequence
ContainerComponentID ContainerDescription ContentCreatorIdentificationCodeSequence
ContrastBolusStartTime ContrastBolusStopTime ContributionDateTime ContributionDescription
CountryOfResidence CreationDate CreationTime CurrentObserverTrial CurrentPatientLocation
CurveDate CurveTime CustodialOrganizationSequence DataSetTrailingPadding
DateOfDocumentOrVerbalTransactionTrial DateOfInstallation DateOfLastCalibration
DateOfManufacture DateOfSecondaryCapture DateTimeOfLastCalibration DecompositionDescription
DerivationDescription DeviceDescription DeviceSettingDescription DigitalSignaturesSequence
DischargeDate DischargeDiagnosisDescription DischargeTime DisplacementReferenceLabel
DistributionAddress DistributionName DoseReferenceDescription EntityDescription EntityName
EquipmentFrameOfReferenceDescription EthicsCommitteeApprovalEffectivenessEndDate
EthicsCommitteeApprovalEffectivenessStartDate EthnicGroup ExpectedCompletionDateTime
FilterLookupTableDescription FindingsGroupRecordingDateTrial FindingsGroupRecordingTimeTrial
FixationDeviceDescription FractionGroupDescription FrameComments GPSAltitude GPSAltitudeRef
GPSAreaInformation GPSDOP GPSDateStamp GPSDestBearing GPSDestBearingRef GPSDestDistance
GPSDestDistanceRef GPSDestLatitude GPSDestLatitudeRef GPSDestLongitude GPSDestLongitudeRef
GPSDifferential GPSImgDirection GPSImgDirectionRef GPSLatitude GPSLatitudeRef GPSLongitude
GPSLongitudeRef GPSMapDatum GPSMeasureMode GPSProcessingMethod GPSSatellites GPSSpeed
GPSSpeedRef GPSStatus GPSTimeStamp GPSTrack GPSTrackRef GPSVersionID GantryID GeneratorID
HL7DocumentEffectiveTime HumanPerformerName HumanPerformerOrganization IconImageSequence
IdentifyingComments ImageComments ImagePresentationComments ImagingServiceRequestComments
Impressions InstanceCoercionDateTime InstanceOriginStatus InstitutionAddress
InstitutionalDepartmentName InstitutionalDepartmentTypeCodeSequence InsurancePlanIdentification
IntendedFractionStartTime IntendedRecipientsOfResultsIdentificationSequence
InterpretationApprovalDate InterpretationApprovalTime InterpretationApproverSequence
InterpretationAuthor InterpretationDiagnosisDescription InterpretationID InterpretationIDIssuer
InterpretationRecordedDate InterpretationRecordedTime InterpretationRecorder InterpretationText
InterpretationTranscriber InterpretationTranscriptionDate InterpretationTranscriptionTime
InterventionDrugStartTime InterventionDrugStopTime IssueDateOfImagingServiceRequest
IssueTimeOfImagingServiceRequest IssuerOfAdmissionID IssuerOfAdmissionIDSequence
IssuerOfClinicalTrialProtocolID IssuerOfClinicalTrialSeriesID IssuerOfClinicalTrialSiteID
IssuerOfClinicalTrialSubjectID IssuerOfClinicalTrialSubjectReadingID
IssuerOfClinicalTrialTimePointID IssuerOfPatientID IssuerOfServiceEpisodeID
IssuerOfServiceEpisodeIDSequence LastMenstrualDate LensMake LensModel LensSerialNumber
LensSpecification LongDeviceDescription MAC MakerNote MedicalAlerts MedicalRecordLocator
MilitaryRank ModifiedAttributesSequence ModifiedImageDate ModifiedImageDescription
ModifiedImageTime ModifyingDeviceID MultienergyAcquisitionDescription
NameOfPhysiciansReadingStudy NamesOfIntendedRecipientsOfResults NetworkID
NonconformingDataElementValue NonconformingModifiedAttributesSequence ObservationDateTrial
ObservationStartDateTime ObservationTimeTrial Occupation OrderCallbackPhoneNumber
OrderCallbackTelecomInformation OrderEnteredBy OrderEntererLocation OriginalAttributesSequence
Originator OtherClinicalTrialProtocolIDsSequence OtherPatientIDs OtherPatientIDsSequence
OtherPatientNames OverlayDate OverlayTime ParticipantSequence PatientAddress PatientAge
PatientBirthName PatientBirthTime PatientComments PatientInstitutionResidence
PatientInsurancePlanCodeSequence PatientMotherBirthName PatientPrimaryLanguageCodeSequence
PatientPrimaryLanguageModifierCodeSequence PatientReligiousPreference
PatientSetupPhotoDescription PatientSize PatientState PatientTelecomInformation
PatientTelephoneNumbers PatientTransportArrangements
PatientTreatmentPreparationMethodDescription
PatientTreatmentPreparationProcedureParameterDescription PatientWeight PerformedLocation
PerformedProcedureStepDescription PerformedProcedureStepEndDate
PerformedProcedureStepEndDateTime PerformedProcedureStepEndTime PerformedProcedureStepID
PerformedProcedureStepStartDate PerformedProcedureStepStartDateTime
PerformedProcedureStepStartTime PerformedStationAETitle
PerformedStationGeographicLocationCodeSequence PerformedStationName
PerformedStationNameCodeSequence PerformingPhysicianIdentificationSequence
PerformingPhysicianName PersonAddress PersonTelecomInformation PersonTelephoneNumbers
PhysicianApprovingInterpretation PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence
PhysiciansReadingStudyIdentificationSequence PlateID PositionAcquisitionTemplateDescription
PositionAcquisitionTemplateName PreMedication PregnancyStatus PrescriptionDescription
PresentationCreationDate PresentationCreationTime PriorTreatmentDoseDescription
ProcedureStepCancellationDateTime ProductExpirationDateTime PyramidDescription PyramidLabel
ROICreatorSequence ROIDateTime ROIDescription ROIGenerationDescription ROIInterpreterSequence
ROIObservationDateTime ROIObservationDescription ROIObservationLabel RTPlanDescription
RTPlanName RadiopharmaceuticalStartDateTime RadiopharmaceuticalStartTime
RadiopharmaceuticalStopDateTime RadiopharmaceuticalStopTime ReasonForOmissionDescription
ReasonForRequestedProcedureCodeSequence ReasonForStudy ReasonForTheImagingServiceRequest
ReasonForTheRequestedProcedure ReasonForVisit ReasonForVisitCodeSequence ReceivingAE
ReferencedDigitalSignatureSequence ReferencedPatientAliasSequence ReferencedPatientPhotoSequence
ReferencedPatientSequence ReferencedSOPInstanceMACSequence ReferringPhysicianAddress
ReferringPhysicianIdentificationSequence ReferringPhysicianTelephoneNumbers RegionOfResidence
RequestAttributesSequence RequestedContrastAgent RequestedProcedureComments RequestedProcedureID
RequestedProcedureLocation RequestedSeriesDescription RequestingAE RequestingPhysician
RequestingService RespiratoryMotionCompensationTechniqueDescription ResponsibleOrganization
ResponsiblePerson ResultsComments ResultsDistributionListSequence ResultsID ResultsIDIssuer
RetrieveAETitle SOPAuthorizationDateTime ScheduledAdmissionDate ScheduledAdmissionTime
ScheduledDischargeDate ScheduledDischargeTime ScheduledHumanPerformersSequence
ScheduledPatientInstitutionResidence ScheduledPerformingPhysicianIdentificationSequence
ScheduledPerformingPhysicianName ScheduledProcedureStepDescription ScheduledProcedureStepEndDate
ScheduledProcedureStepEndTime ScheduledProcedureStepExpirationDateTime ScheduledProcedureStepID
ScheduledProcedureStepLocation ScheduledProcedureStepModificationDateTime
ScheduledProcedureStepStartDate ScheduledProcedureStepStartDateTime
ScheduledProcedureStepStartTime ScheduledStationAETitle
ScheduledStationGeographicLocationCodeSequence ScheduledStationName
ScheduledStationNameCodeSequence ScheduledStudyLocation ScheduledStudyLocationAETitle
ScheduledStudyStartDate ScheduledStudyStartTime ScheduledStudyStopDate ScheduledStudyStopTime
SeriesDescription ServiceEpisodeDescription ServiceEpisodeID SetupTechniqueDescription
ShieldingDeviceDescription SlideIdentifier SmokingStatus SourceManufacturer SpecialNeeds
SpecimenAccessionNumber SpecimenDetailedDescription SpecimenShortDescription StationAETitle
StructureSetDescription StructureSetName StudyArrivalDate StudyArrivalTime StudyComments
StudyCompletionDate StudyCompletionTime StudyDescription StudyIDIssuer StudyReadDate
StudyReadTime StudyVerifiedDate StudyVerifiedTime SubstanceAdministrationDateTime
TelephoneNumberTrial TemplateLocalVersion TemplateVersion TextComments TextString
TimeOfDocumentCreationOrVerbalTransactionTrial TimeOfLastCalibration TimeOfSecondaryCapture
TimezoneOffsetFromUTC TopicAuthor TopicKeywords TopicSubject TopicTitle
TransducerIdentificationSequence TreatmentSites UDISequence UniqueDeviceIdentifier
VerbalSourceIdentifierCodeSequenceTrial VerbalSourceTrial VisitComments
WaveformFilterDescription XRayDetectorLabel""",
    "U": """
AcquisitionUID ConcatenationUID ConceptualVolumeUID ConstituentConceptualVolumeUID DeviceUID
DigitalSignatureUID DimensionOrganizationUID DoseReferenceUID DosimetricObjectiveUID
FailedSOPInstanceUIDList FiducialUID FrameOfReferenceUID InstanceCreatorUID IrradiationEventUID
LargePaletteColorLookupTableUID ManufacturerDeviceClassUID MediaStorageSOPInstanceUID
MultiplexGroupUID ObservationSubjectUIDTrial ObservationUID PaletteColorLookupTableUID
PatientSetupUID PresentationDisplayCollectionUID PresentationSequenceCollectionUID PyramidUID
RTTreatmentPhaseUID ReferencedConceptualVolumeUID ReferencedDoseReferenceUID
ReferencedDosimetricObjectiveUID ReferencedFiducialsUID ReferencedFrameOfReferenceUID
ReferencedGeneralPurposeScheduledProcedureStepTransactionUID ReferencedObservationUIDTrial
ReferencedSOPInstanceUID ReferencedSOPInstanceUIDInFile ReferencedTreatmentPositionGroupUID
RelatedFrameOfReferenceUID RequestedSOPInstanceUID SOPInstanceUID SeriesInstanceUID
SourceConceptualVolumeUID SourceFrameOfReferenceUID SpecimenUID StorageMediaFileSetUID
StudyInstanceUID SynchronizationFrameOfReferenceUID TargetUID TemplateExtensionCreatorUID
TemplateExtensionOrganizationUID TrackingUID TransactionUID TreatmentPositionGroupUID
TreatmentSessionUID UID""",
    "ZD": """
ContentCreatorName ContentDate ContentTime ContrastBolusAgent InstructionPerformedDateTime
PatientID""",
    "XZ": """
AcquisitionContextSequence AcquisitionDate AcquisitionTime BarcodeValue LabelText
PatientSexNeutered ReferencedStudySequence RequestedProcedureDescription ReviewerName
SourceSerialNumber TreatmentMachineName""",
    "XD": """
AcquisitionDeviceProcessingDescription DateOfLastDetectorCalibration DetectorID
EndAcquisitionDateTime FirstTreatmentDate InstanceCreationDate IntendedPhaseEndDate
IntendedPhaseStartDate MostRecentTreatmentDate ObservationDateTime
OperatorIdentificationSequence ProtocolName RTPlanDate RTPlanTime RTTreatmentApproachLabel
SeriesDate SeriesTime StartAcquisitionDateTime TimeOfLastDetectorCalibration TreatmentDate
TreatmentSite TreatmentTime""",
    "XZD": """
AcquisitionDateTime DeviceSerialNumber InstanceCreationTime InstitutionCodeSequence
InstitutionName OperatorsName ReferencedPerformedProcedureStepSequence StationName""",
    "XZU": "ReferencedImageSequence SourceImageSequence",
}

# Not in Table E.1-1 but identifying: the issuer of the accession number / patient id names the
# institution, and alternative-calendar birth/death dates are a birth date in disguise.
EXTRA_REMOVE = ["IssuerOfAccessionNumberSequence", "IssuerOfPatientIDQualifiersSequence",
                "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar",
                "PatientAlternativeCalendar"]

# E.3.7 Retain Patient Characteristics Option: kept when enabled (useful covariates for
# fracture work, e.g. pediatric versus adult).
PATIENT_CHARACTERISTICS = ["PatientSex", "PatientAge", "PatientSize", "PatientWeight",
                           "PatientSexNeutered", "PregnancyStatus", "SmokingStatus"]

# Birth date/time are never shifted: the Basic Profile empties/removes them.
NOT_SHIFTED = {tag_for_keyword(k) for k in ("PatientBirthDate", "PatientBirthTime")}

# CID 7050 "De-identification Method" codes (PS3.16), scheme DCM.
CODE_BASIC = ("113100", "Basic Application Confidentiality Profile")
CODE_CLEAN_PIXELS = ("113101", "Clean Pixel Data Option")
CODE_MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
CODE_PATIENT_CHARS = ("113108", "Retain Patient Characteristics Option")
CODE_SAFE_PRIVATE = ("113111", "Retain Safe Private Option")

DICOM_UID_ROOT = "1.2.840.10008."  # standard (well-known) UIDs: SOP classes, transfer syntaxes
DUMMY_TEXT = "ANONYMIZED"
_DUMMY_BY_VR = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000D",
                "DS": "0", "IS": "0"}
_INSPECT_VRS = {"SQ", "UI", "DA", "DT", "TM", "PN", None}  # kept elements that may still change
_TEXT_VRS = {"AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT", "UR", "PN"}
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


def _build_actions() -> dict[int, str]:
    actions: dict[int, str] = {}
    for action, text in _TABLE.items():
        for keyword in text.split():
            tag = tag_for_keyword(keyword)
            if tag is None:  # a typo here would silently keep an identifying attribute
                raise RuntimeError(f"unknown DICOM keyword in Annex E table: {keyword}")
            actions[tag] = action
    for keyword in EXTRA_REMOVE:
        actions[tag_for_keyword(keyword)] = "X"
    return actions


ACTIONS: dict[int, str] = _build_actions()
_PATIENT_ID = tag_for_keyword("PatientID")


class DeidKeys:
    """Keyed (HMAC-SHA256) pseudonyms, UIDs and date offsets derived from one secret.

    The same secret always gives the same outputs, so studies and patients stay together across
    runs; without the secret the mapping cannot be recomputed (unlike a plain hash, which a
    dictionary of candidate patient ids would invert).

    Args:
        secret: the key bytes (from ``$FRACTURE_OPS_DEID_SECRET``).
        max_shift_days: dates move back by 1..max_shift_days days.
    """

    def __init__(self, secret: bytes, max_shift_days: int = 3650):
        if not secret:
            raise ValueError("the de-identification secret must not be empty")
        self._secret = secret
        self.max_shift_days = max_shift_days
        self._uid_cache: dict[str, str] = {}

    def _digest(self, purpose: str, value: str) -> bytes:
        # the purpose prefix keeps pseudonyms of different kinds unrelated to each other
        return hmac.new(self._secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()

    def patient(self, patient_id: str) -> str:
        """Pseudonymous patient id (``P`` + 16 hex digits) for a Patient ID or manifest id."""
        return "P" + self._digest("patient", str(patient_id).strip()).hex()[:16]

    def image_id(self, image_id: str) -> str:
        """Pseudonymous image id (``I`` + 16 hex digits)."""
        return "I" + self._digest("image", str(image_id).strip()).hex()[:16]

    def path_hash(self, relative_path: str) -> str:
        """Keyed hash of an input path, so the audit log can map inputs without naming them."""
        return self._digest("path", relative_path.replace("\\", "/")).hex()[:24]

    def uid(self, uid: str) -> str:
        """Deterministic replacement UID ``2.25.<int>`` (a UUIDv8, RFC 9562, from the HMAC)."""
        uid = str(uid).strip()
        out = self._uid_cache.get(uid)
        if out is None:
            n = int.from_bytes(self._digest("uid", uid)[:16], "big")
            n = (n & ~(0xF << 76)) | (0x8 << 76)  # version 8: custom
            n = (n & ~(0x3 << 62)) | (0x2 << 62)  # RFC variant
            out = self._uid_cache[uid] = f"2.25.{n}"
        return out

    def date_offset_days(self, patient_key: str) -> int:
        """Per-patient shift in days, in ``[-max_shift_days, -1]``."""
        n = int.from_bytes(self._digest("date-shift", str(patient_key).strip())[:8], "big")
        return -(1 + n % self.max_shift_days)


@dataclass(frozen=True)
class ProfileOptions:
    """Which Annex E options apply (see module docstring)."""

    shift_dates: bool = True
    retain_patient_characteristics: bool = False
    safe_private: frozenset[tuple[str, int, int]] = frozenset()  # (creator, group, element byte)
    pixels_cleaned: bool = False
    keep_unknown: frozenset[int] = frozenset()  # public tags outside the dictionary to keep


@dataclass
class ProfileResult:
    """What :func:`apply_profile` did: new identities and PHI-free counts."""

    patient: str
    study_uid: str
    sop_uid: str
    counts: Counter = field(default_factory=Counter)
    flags: list[str] = field(default_factory=list)
    pixels: dict | None = None  # the burned-in text scrub's audit entry, when it ran


def shift_date(value: str, days: int) -> str | None:
    """Shift a DA value (``YYYYMMDD``, or ACR-NEMA ``YYYY.MM.DD``); None when unparsable."""
    m = re.fullmatch(r"(\d{4})\.?(\d{2})\.?(\d{2})", value.strip())
    if not m:
        return None
    try:
        d = date(int(m[1]), int(m[2]), int(m[3])) + timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return d.strftime("%Y%m%d")


def shift_datetime(value: str, days: int) -> str | None:
    """Shift a DT value by whole days, keeping the time part and dropping any UTC offset.

    Returns None when the value is unparsable or coarser than a day (``YYYY``, ``YYYYMM``):
    such partial dates cannot be shifted without inventing precision.
    """
    m = re.fullmatch(r"(\d{8})(\d{0,6}(?:\.\d{1,6})?)([+-]\d{4})?", value.strip())
    if not m:
        return None
    shifted = shift_date(m[1], days)
    return None if shifted is None else shifted + m[2]


def _known(tag) -> bool:
    """A public attribute of the standard's data dictionary (repeating groups included)."""
    if dictionary_has_tag(tag):
        return True
    try:
        dictionary_VR(tag)  # repeating groups such as (60xx,3000) resolve here
    except KeyError:
        return False
    return True


def _vr_of(ds: Dataset, tag) -> str | None:
    """The VR without decoding the value (implicit VR files: from the dictionary)."""
    vr = ds.get_item(tag).VR
    if vr:
        return vr
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _dummy(vr: str):
    if vr in _DUMMY_BY_VR:
        return _DUMMY_BY_VR[vr]
    if vr in _TEXT_VRS:
        return DUMMY_TEXT
    if vr in _BINARY_VRS:
        return b"\x00\x00"
    return 0  # US, SS, UL, SL, FL, FD, UV, SV


class _Cleaner:
    """Walks a data set (and its sequences) applying the action table."""

    def __init__(self, keys: DeidKeys, opts: ProfileOptions, offset_days: int):
        self.keys, self.opts, self.offset = keys, opts, offset_days
        self.counts: Counter = Counter()
        keep = PATIENT_CHARACTERISTICS if opts.retain_patient_characteristics else []
        self.kept = {tag_for_keyword(k) for k in keep}

    def clean(self, ds: Dataset) -> None:
        kept_creators: set[int] = set()
        for tag in list(ds.keys()):
            if tag.is_private:
                if not tag.is_private_creator and self._keep_private(ds, tag):
                    kept_creators.add((tag.group << 16) | (tag.element >> 8))
                elif not tag.is_private_creator:
                    del ds[tag]
                    self.counts["private_removed"] += 1
                continue
            if (tag.element == 0 or tag.group in (0x0000, 0x0002)
                    or (tag.group & 0xFF00) in (0x5000, 0x6000)):
                del ds[tag]  # group lengths, stray meta/command, curves and overlays
                self.counts["removed"] += 1
                continue
            if not _known(tag) and tag not in self.opts.keep_unknown:
                del ds[tag]  # Annex E: attributes the profile cannot judge are not kept
                self.counts["unknown_removed"] += 1
                continue
            action = "K" if tag in self.kept else ACTIONS.get(tag)
            if action in (None, "K") and _vr_of(ds, tag) not in _INSPECT_VRS:
                continue  # kept as is: never decoded, so pydicom writes the raw bytes back
            self._apply(ds, tag, action)
        # ds.keys(): iterating a Dataset yields elements, not tags
        for tag in [t for t in ds.keys() if t.is_private_creator]:  # noqa: SIM118
            if tag not in kept_creators:
                del ds[tag]
                self.counts["private_removed"] += 1

    def _keep_private(self, ds: Dataset, tag) -> bool:
        if not self.opts.safe_private:
            return False
        creator_tag = (tag.group << 16) | (tag.element >> 8)
        creator = str(ds[creator_tag].value).strip() if creator_tag in ds else ""
        if (creator, tag.group, tag.element & 0xFF) not in self.opts.safe_private:
            return False
        self.counts["private_kept"] += 1
        if ds[tag].VR == "SQ":
            for item in ds[tag].value:
                self.clean(item)
        return True

    def _apply(self, ds: Dataset, tag, action: str | None) -> None:
        elem = ds[tag]
        vr = elem.VR
        if vr in ("DA", "DT", "TM") and self.opts.shift_dates and tag not in NOT_SHIFTED:
            if vr != "TM":  # Modified Dates Option: C; a whole-day shift leaves TM as it is
                self._shift(elem)
            return
        if action == "X":
            del ds[tag]
            self.counts["removed"] += 1
            return
        if tag == _PATIENT_ID and elem.value:
            # nested ids get their own pseudonym; the top level is overwritten in apply_profile
            elem.value = self.keys.patient(str(elem.value))
            self.counts["replaced"] += 1
            return
        if vr == "SQ":
            if action in (None, "K", "XZU"):
                for item in elem.value:
                    self.clean(item)
            else:
                elem.value = []
                self.counts["emptied"] += 1
        elif vr == "UI":
            self._remap_uids(elem)
        elif action in ("Z", "ZD", "XZ", "XZD") or (action is None and vr in ("PN", "DA", "DT")):
            self._empty(elem)
        elif action in ("D", "XD"):
            elem.value = _dummy(vr)
            self.counts["replaced"] += 1

    def _empty(self, elem) -> None:
        if elem.value not in (None, "", b""):
            self.counts["emptied"] += 1
        elem.value = "" if elem.VR in _TEXT_VRS or elem.VR in _DUMMY_BY_VR else None

    def _remap_uids(self, elem) -> None:
        values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
        if not values:
            return
        out = []
        for v in values:
            v = str(v or "").strip()
            if v and not v.startswith(DICOM_UID_ROOT):
                v = self.keys.uid(v)
                self.counts["uids_remapped"] += 1
            out.append(v)
        elem.value = out if len(out) > 1 else out[0]

    def _shift(self, elem) -> None:
        values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
        if not values:
            return
        fn = shift_date if elem.VR == "DA" else shift_datetime
        out = [fn(str(v), self.offset) if str(v or "").strip() else "" for v in values]
        if any(v is None for v in out):
            self.counts["dates_blanked"] += 1
            elem.value = ""
            return
        if any(out):
            self.counts["dates_shifted"] += 1
        elem.value = out if len(out) > 1 else out[0]


def method_codes(opts: ProfileOptions) -> list[tuple[str, str]]:
    """The CID 7050 (code value, meaning) pairs that describe these options."""
    codes = [CODE_BASIC]
    if opts.pixels_cleaned:
        codes.append(CODE_CLEAN_PIXELS)
    if opts.shift_dates:
        codes.append(CODE_MODIFIED_DATES)
    if opts.retain_patient_characteristics:
        codes.append(CODE_PATIENT_CHARS)
    if opts.safe_private:
        codes.append(CODE_SAFE_PRIVATE)
    return codes


def _mark_deidentified(ds: Dataset, pseudonym: str, opts: ProfileOptions) -> None:
    ds.PatientID = pseudonym
    ds.PatientName = pseudonym  # a dummy that still lets viewers group by patient
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "fracture-ops: DICOM PS3.15 Annex E Basic Profile"
    items = []
    for value, meaning in method_codes(opts):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = items
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if opts.shift_dates else "REMOVED"


def apply_profile(ds: Dataset, keys: DeidKeys, opts: ProfileOptions,
                  patient_key: str | None = None) -> ProfileResult:
    """De-identify a data set in place (every element, sequences included).

    Args:
        ds: the data set (its file meta is not touched here).
        keys: the keyed pseudonym/UID/date functions.
        opts: which Annex E options apply.
        patient_key: the patient id to pseudonymise and key the date shift on; defaults to the
            header's Patient ID (then Study Instance UID when Patient ID is empty).

    Returns:
        New patient pseudonym, Study/SOP Instance UIDs, PHI-free counts and flags.
    """
    flags = []
    key = str(patient_key if patient_key is not None else ds.get("PatientID", "") or "").strip()
    if not key:
        flags.append("no_patient_id")  # each study then counts as its own patient
        key = "study:" + str(ds.get("StudyInstanceUID", "") or ds.get("SOPInstanceUID", ""))
    cleaner = _Cleaner(keys, opts, keys.date_offset_days(key))
    cleaner.clean(ds)
    pseudonym = keys.patient(key)
    _mark_deidentified(ds, pseudonym, opts)
    cleaner.counts["replaced"] += 1  # Patient's Name now holds the pseudonym
    if cleaner.counts["dates_blanked"]:
        flags.append("dates_blanked")
    return ProfileResult(patient=pseudonym, study_uid=str(ds.get("StudyInstanceUID", "")),
                         sop_uid=str(ds.get("SOPInstanceUID", "")), counts=cleaner.counts,
                         flags=flags)
