"""The structured report of one classified (or gate-rejected) radiograph, built with highdicom
into the source image's study: a Comprehensive SR holding a TID 1500 measurement report with one
TID 1501 group that references the source image and carries what the results row says.

Everything in it comes from the row ``classify.row_for`` made (the one place a row is made) and
the model's record: the screening decision, the most likely class, each class's probability,
the flagged findings, the apparent age group and its warning, the input gate's result and score,
the model's name, version, variant and sha256, the site profile applied (if any) with the
thresholds it set, and the intended use. Concepts without a standard
code use the private scheme ``99XEDGE``; a NORMAL result reads "No radiographic finding", never
"no infection". The report is marked research content, unverified and preliminary.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes

from .. import __version__
from ..contract import NEGATIVE_CLASS

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from ..session import LoadedModel

SCHEME = "99XEDGE"
MANUFACTURER = "xray-edge"
INTENDED_USE = "Research screening aid, not for diagnostic use: every result needs a clinician."
SERIES_DESCRIPTION = "xray-edge screening: research aid, not for diagnostic use"
SERIES_NUMBER = 9901
# Type 2 attributes highdicom copies from the evidence (present, possibly empty, in every result).
PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")


def code(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, SCHEME, meaning)


_CLASS_MEANINGS = {NEGATIVE_CLASS: "No radiographic finding", "COVID": "COVID-19 radiographic pattern",
                   "VIRAL_PNEUMONIA": "Viral pneumonia radiographic pattern"}
DECISIONS = {"positive": code("positive", "Finding flagged: look at this image first"),
             "negative": code("negative", "No finding flagged: routine reading"),
             "uncertain": code("uncertain", "Uncertain: refer, do not read the most likely class"),
             "rejected": code("rejected", "Not assessed: not an image the model was built for")}
DECISION = code("decision", "Screening decision")
MOST_LIKELY = code("most-likely", "Most likely class")
NONE_FLAGGED = code("none-flagged", "No finding flagged")
AGE_GROUP = code("age-group", "Apparent age group")
GATE = code("input-gate", "Input gate")
GATE_RESULTS = {"passed": code("gate-passed", "Passed: like the X-rays the model was trained on"),
                "rejected": code("gate-rejected", "Rejected: unlike the X-rays the model was trained on"),
                "none": code("gate-none", "The model has no input gate")}
GATE_SCORE = code("gate-score", "Input gate distance over its limit (above 1: rejected)")
USE, WARNING, REASON = code("intended-use", "Intended use"), code("warning", "Warning"), code("reason", "Reason")


def class_code(name: str) -> hd.sr.CodedConcept:
    """The concept a class name stands for (NORMAL: "No radiographic finding")."""
    return code(name, _CLASS_MEANINGS.get(name, f"{name.replace('_', ' ').capitalize()} radiographic pattern"))


def probability_code(name: str) -> hd.sr.CodedConcept:
    return code(f"p{name}", f"Probability: {class_code(name).meaning}")


def with_type2(source: Dataset) -> Dataset:
    """A copy of ``source`` with every attribute highdicom copies into a result present (empty
    where the source lacks it: anonymised images often do)."""
    copy = source.copy()
    for keyword in PATIENT_STUDY:
        if keyword not in copy:
            setattr(copy, keyword, "")
    return copy


def build(source: Dataset, row: dict[str, Any], model: LoadedModel, device_uid: str, node_ae: str,
          series_uid: str, sop_uid: str) -> hd.sr.ComprehensiveSR:
    """The report on ``source`` (its header is enough) for its results ``row``."""
    record = model.record
    source = with_type2(source)
    algorithm = hd.sr.AlgorithmIdentification(
        name=record.model_name, version=record.model_version, manufacturer=MANUFACTURER,
        parameters=[f"variant {record.variant}", f"sha256 {model.sha256}", f"xray-edge {__version__}",
                    *([f"site profile {model.site.label}"] if model.site is not None else []),
                    *(f"threshold {c} {t:g}" for c, t in sorted(record.thresholds.items())),
                    f"abstain margin {record.abstain_margin:g}"])
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="xray-edge screening"),
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        qualitative_evaluations=_evaluations(row, record.classes),
        measurements=_measurements(row, record.classes))
    texts = [(USE, INTENDED_USE), (WARNING, row.get("warning") or ""), (REASON, row.get("reason") or "")]
    items = group[0].ContentSequence
    for name, value in texts:
        if value:
            items.append(hd.sr.TextContentItem(name=name, value=value[:1024],
                                               relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid, name=node_ae, manufacturer_name=MANUFACTURER, model_name=f"xray-edge {__version__} node"))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=device),
                                     procedure_reported=codes.SCT.ChestImaging, imaging_measurements=[group])
    return hd.sr.ComprehensiveSR(
        evidence=[source], content=report[0], series_instance_uid=series_uid, series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER, is_complete=True, is_final=False,
        is_verified=False, series_description=SERIES_DESCRIPTION, content_qualification="RESEARCH",
        software_versions=__version__, manufacturer_model_name=f"{record.model_name} {record.model_version}",
        coding_schemes=[CodingSchemeIdentificationItem(SCHEME, name="xray-edge concepts",
                                                       responsible_organization=MANUFACTURER)])


def _evaluations(row: dict[str, Any], classes: list[str]) -> list[hd.sr.QualitativeEvaluation]:
    evaluate = hd.sr.QualitativeEvaluation
    rejected = row["decision"] == "rejected"
    out = [evaluate(DECISION, DECISIONS[row["decision"]])]
    gate = "rejected" if rejected else ("none" if row.get("gate_score") is None else "passed")
    out.append(evaluate(GATE, GATE_RESULTS[gate]))
    if rejected:
        return out
    out.append(evaluate(MOST_LIKELY, class_code(row["label"])))
    out += [evaluate(codes.DCM.Finding, class_code(c)) for c in row["flagged"]] or [evaluate(codes.DCM.Finding,
                                                                                              NONE_FLAGGED)]
    if row.get("age_group"):
        out.append(evaluate(AGE_GROUP, code(row["age_group"], row["age_group"].capitalize())))
    return out


def _measurements(row: dict[str, Any], classes: list[str]) -> list[hd.sr.Measurement]:
    out = []
    if row["decision"] != "rejected":
        out = [hd.sr.Measurement(name=probability_code(c), value=float(row[f"p_{c}"]), unit=codes.UCUM.NoUnits)
               for c in classes]
    if row.get("gate_score") is not None:
        out.append(hd.sr.Measurement(name=GATE_SCORE, value=float(row["gate_score"]), unit=codes.UCUM.NoUnits))
    return out
