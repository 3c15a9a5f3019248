"""The measurements as a Comprehensive 3D SR following TID 1500 (Measurement Report).

PACS, reporting systems and registries read TID 1500 without knowing our JSON: every number in
``summary.json`` that a radiologist would quote (segment volumes in ml, lesion count, each lesion's volume
and longest axial diameter) appears here with its concept code and UCUM unit, tied to the SEG segment it
was measured on and to the source series. Values are copied from the summary, never recomputed, so the
panel, the SR and the JSON can never disagree.
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from appliance.errors import ResultsError
from appliance.infer.measure import LESION_CATEGORY, Measurements
from appliance.infer.volume import Volume
from appliance.models.manifest import Label
from appliance.models.package import ModelPackage
from appliance.results import identity
from appliance.results.seg import coded, conformant, source_headers

#: UCUM units. pydicom's codes.UCUM has no millilitre.
UNIT_ML = hd.sr.CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")
UNIT_MM = hd.sr.CodedConcept(value="mm", scheme_designator="UCUM", meaning="millimeter")
UNIT_LESIONS = hd.sr.CodedConcept(value="{lesions}", scheme_designator="UCUM", meaning="lesions")
UNIT_HU = hd.sr.CodedConcept(value="[hnsf'U]", scheme_designator="UCUM", meaning="Hounsfield unit")
#: SNOMED CT 246205007 "Quantity": the number of lesions.
QUANTITY = hd.sr.CodedConcept(value="246205007", scheme_designator="SCT", meaning="Quantity")


def _procedure(volume: Volume) -> hd.sr.CodedConcept:
    """TID 1500's procedure reported: the LOINC "<modality> unspecified body region" code (CT by default)."""
    modality = str(volume.reference.get("Modality", "CT")).upper()
    name = {
        "CT": "CTUnspecifiedBodyRegion",
        "MR": "MRIUnspecifiedBodyRegion",
        "PT": "PETUnspecifiedBodyRegion",
        "NM": "NMUnspecifiedBodyRegion",
    }.get(modality, "CTUnspecifiedBodyRegion")
    return getattr(codes.LN, name)


def _observer(package: ModelPackage) -> hd.sr.ObservationContext:
    """The observer is this device (not a person): our manufacturer, model and serial, running the model."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=identity.device_uid(),
        name=identity.lo(f"{package.name} {package.version}"),
        manufacturer_name=identity.MANUFACTURER,
        model_name=identity.MANUFACTURER_MODEL_NAME,
        serial_number=identity.device_serial(),
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _sites(lab: Label) -> list[hd.sr.FindingSite] | None:
    return [hd.sr.FindingSite(anatomic_location=coded(lab.region))] if lab.region is not None else None


def make_sr(
    volume: Volume,
    measured: Measurements,
    seg: hd.seg.Segmentation,
    package: ModelPackage,
    sources: list[Dataset] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report of ``measured`` (from ``measure``) whose ROIs are the segments of ``seg``.

    ``sources`` is ``source_headers(volume)`` when the caller already made it for the SEG.
    """
    labels = package.labels
    segments = {int(item.SegmentNumber): item for item in seg.SegmentSequence}
    if sorted(segments) != list(range(1, len(labels) + 1)):
        raise ResultsError(
            f"cannot make the SR: the SEG has segments {sorted(segments)} but model {package.name} "
            f"has {len(labels)} labels"
        )
    number_of = {lab.value: n for n, lab in enumerate(labels, start=1)}
    by_value = {lab.value: lab for lab in labels}
    label_ml = {lv.value: lv.volume_ml for lv in measured.labels}
    algorithm = hd.sr.AlgorithmIdentification(name=identity.lo(package.name), version=identity.lo(package.version))
    source_series = hd.sr.SourceSeriesForSegmentation(volume.series_uid)

    def segment_ref(value: int) -> hd.sr.ReferencedSegment:
        # Built directly: ReferencedSegment.from_segmentation() fails on single-segment and empty segments.
        return hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=number_of[value],
            source_series=source_series,
        )

    # The algorithm is named once per measurement group (TID 1411/1501), not again on every measurement.
    def volume_ml(value: float) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=codes.SCT.Volume, value=value, unit=UNIT_ML)

    groups: list[Any] = []
    for lab in labels:
        if lab.value not in label_ml:
            raise ResultsError(
                f"cannot make the SR: the measurement summary has no volume for label {lab.value} ({lab.name})"
            )
        measurements = [volume_ml(label_ml[lab.value])]
        if lab.category.code == LESION_CATEGORY:
            count = sum(1 for les in measured.lesions if les.label == lab.value)
            measurements.append(hd.sr.Measurement(name=QUANTITY, value=count, unit=UNIT_LESIONS))
        item = segments[number_of[lab.value]]
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=str(item.TrackingUID), identifier=identity.lo(lab.name)
                ),
                referenced_segment=segment_ref(lab.value),
                finding_type=coded(lab.type),
                finding_category=coded(lab.category),
                finding_sites=_sites(lab),
                algorithm_id=algorithm,
                measurements=measurements,
            )
        )

    # An organ's volume with the lesions inside it (what a clinician calls the liver volume) is no single
    # segment: it is reported as a measurement group of the organ without an image region.
    for organ in measured.organs:
        parts = organ.labels
        if len(parts) < 2 or parts[0] not in by_value:
            continue
        lab = by_value[parts[0]]
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=identity.new_uid(), identifier=identity.lo(f"{organ.name} including lesions")
                ),
                finding_type=coded(lab.type),
                finding_category=coded(lab.category),
                algorithm_id=algorithm,
                measurements=[volume_ml(organ.volume_ml)],
            )
        )

    for les in measured.lesions:
        found = by_value.get(les.label)
        if found is None:
            raise ResultsError(
                f"cannot make the SR: lesion {les.index} has label {les.label}, "
                f"which model {package.name} does not define"
            )
        lab = found
        on_slice = [
            hd.sr.SourceImageForMeasurement(
                referenced_sop_class_uid=str(conformant(volume.reference).SOPClassUID),
                referenced_sop_instance_uid=les.slice_sop_instance_uid,
            )
        ]
        diameter = hd.sr.Measurement(
            name=codes.SCT.LongAxis, value=les.longest_axial_diameter_mm, unit=UNIT_MM, referenced_images=on_slice
        )
        axes = [diameter]
        if les.short_axis_mm > 0:  # measured on the same slice, perpendicular to the long axis (RECIST)
            axes.append(
                hd.sr.Measurement(
                    name=codes.SCT.ShortAxis, value=les.short_axis_mm, unit=UNIT_MM, referenced_images=on_slice
                )
            )
        if les.mean_hu is not None:  # what a reader compares with the liver around it (hypo/hyper-attenuating)
            axes.append(
                hd.sr.Measurement(
                    name=codes.DCM.AttenuationCoefficient, value=les.mean_hu, unit=UNIT_HU, derivation=codes.SCT.Mean
                )
            )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.new_uid(), identifier=f"Lesion {les.index}"),
                referenced_segment=segment_ref(lab.value),
                finding_type=coded(lab.type),
                finding_category=coded(lab.category),
                finding_sites=_sites(lab),
                algorithm_id=algorithm,
                measurements=[volume_ml(les.volume_ml), *axes],
            )
        )

    try:
        report = hd.sr.MeasurementReport(
            observation_context=_observer(package),
            procedure_reported=_procedure(volume),
            imaging_measurements=groups,
            title=codes.DCM.ImagingMeasurementReport,
        )
        return hd.sr.Comprehensive3DSR(
            evidence=[seg, *(sources if sources is not None else source_headers(volume))],
            content=report,
            **identity.new_object(identity.SR_SERIES_NUMBER),
            series_description=identity.lo(f"AI measurements {package.name} {package.version}"),
            is_complete=True,
            is_final=False,  # an AI result awaiting a radiologist's review
            is_verified=False,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultsError(f"cannot make the measurement report (SR) for series {volume.series_uid}: {exc}") from exc
