"""The label map as a DICOM Segmentation: what a PACS or viewer overlays on the source series.

One segment per label of the model's manifest, coded in SNOMED CT exactly as the manifest says, so a
receiving system knows what was segmented without reading our documentation; the algorithm is named and
versioned in every segment, so a reader can tell which model drew it.
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from appliance.errors import ResultsError
from appliance.infer.volume import Volume
from appliance.models.manifest import Code
from appliance.models.package import ModelPackage
from appliance.results import identity

log = logging.getLogger("appliance.results")


def coded(code: Code) -> hd.sr.CodedConcept:
    """A manifest code as highdicom's coded concept."""
    return hd.sr.CodedConcept(value=code.code, scheme_designator=code.scheme, meaning=code.meaning)


def algorithm_identification(package: ModelPackage) -> hd.AlgorithmIdentificationSequence:
    """The model as SEG's AlgorithmIdentificationSequence: name and version are what a reader asks for."""
    return hd.AlgorithmIdentificationSequence(name=identity.lo(package.name), version=identity.lo(package.version),
                                              family=codes.DCM.ArtificialIntelligence)


def check_source(volume: Volume, labels: np.ndarray, what: str) -> None:
    """Refuse, with a reason, a volume whose slice headers or shape do not match the label map."""
    if not volume.headers:
        raise ResultsError(f"cannot make the {what}: the decoded series carries no slice headers "
                           "(decoded by an older appliance version?); run the job again")
    if len(volume.headers) != labels.shape[0] or labels.shape != volume.hu.shape:
        raise ResultsError(f"cannot make the {what}: the label map has shape {labels.shape} but the series "
                           f"{volume.series_uid} has {len(volume.headers)} slices of {volume.hu.shape[1:]} pixels")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        empty = sum(1 for h in volume.headers if not h.get(keyword))
        if empty:
            raise ResultsError(f"cannot make the {what}: {empty} of {len(volume.headers)} slices of series "
                               f"{volume.series_uid or '(no UID)'} have no {keyword}, so results cannot reference "
                               "them; the series was damaged or badly anonymised before it was sent")


#: Type 2 attributes of the Patient and General Study modules that highdicom copies from the source and
#: reads unconditionally: a conformant image has them (perhaps empty); some anonymisers drop them.
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")


def conformant(ds: Dataset) -> Dataset:
    """``ds``, or where it lacks a Type 2 patient/study attribute or has an empty SOPClassUID (some
    anonymisers do both) a repaired copy: the attributes present and empty, as the standard says the sender
    should have sent them, the SOP class taken from the file meta. highdicom refuses such headers otherwise;
    the caller's header is never modified."""
    missing = [k for k in _TYPE2_COPIED if k not in ds]
    sop_class = ds.get("SOPClassUID")
    if not missing and sop_class:
        return ds
    fixed = Dataset()
    fixed.update(ds)  # a new element dict sharing the elements: cheap, and the original stays as it was
    for keyword in missing:
        setattr(fixed, keyword, None)
    if not sop_class:
        meta = getattr(ds, "file_meta", None)
        sop_class = meta.get("MediaStorageSOPClassUID") if meta is not None else None
        if not sop_class:
            raise ResultsError(f"instance {ds.get('SOPInstanceUID', '?')} of series {ds.get('SeriesInstanceUID', '?')} "
                               "has no SOPClassUID: result objects cannot reference it; fix the sender")
        del fixed.SOPClassUID  # only from the copy's dict: assigning would change the shared element
        fixed.SOPClassUID = sop_class
    return fixed


def source_headers(volume: Volume) -> list[Dataset]:
    """``volume.headers`` made ``conformant`` where needed."""
    return [conformant(ds) for ds in volume.headers]


def segment_map(labels: np.ndarray, package: ModelPackage) -> np.ndarray:
    """Label values -> segment numbers 1..N (manifest order), as BINARY SEG requires consecutive numbers.

    A 3D integer map (not a per-segment boolean stack) keeps memory at one byte a voxel on a
    300x512x512 series. The label map is used as it is when the manifest's values already are 1..N.
    """
    values = [lab.value for lab in package.labels]
    top = int(labels.max()) if labels.size else 0
    if values == list(range(1, len(values) + 1)) and top <= len(values) and labels.dtype == np.uint8:
        return labels
    lut = np.zeros(max(256, top + 1), dtype=np.uint8)
    for number, value in enumerate(values, start=1):
        lut[value] = number
    unknown = sorted(set(np.flatnonzero(np.bincount(labels.ravel(), minlength=lut.size))) - {0, *values})
    if unknown:
        log.warning("label values %s are not in model %s's manifest: left out of the SEG", unknown, package.name)
    return lut[labels]


def make_seg(volume: Volume, labels: np.ndarray, package: ModelPackage,
             sources: list[Dataset] | None = None) -> hd.seg.Segmentation:
    """A BINARY SEG of ``labels`` (slices in ``volume.headers`` order) with one segment per manifest label.

    ``sources`` is ``source_headers(volume)`` when the caller already made it (the SR needs the same list).
    """
    check_source(volume, labels, "segmentation (SEG)")
    missing = [i for i, h in enumerate(volume.headers) if not h.get("FrameOfReferenceUID")]
    if missing:
        raise ResultsError(f"series {volume.series_uid} has no FrameOfReferenceUID (slice {missing[0] + 1} and "
                           f"{len(missing) - 1} more): a DICOM SEG cannot reference it; the scanner or a "
                           "router removed it, fix the export from the modality")
    algorithm = algorithm_identification(package)
    descriptions = []
    for number, lab in enumerate(package.labels, start=1):
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=identity.lo(lab.name),
            segmented_property_category=coded(lab.category),
            segmented_property_type=coded(lab.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=identity.new_uid(),
            tracking_id=identity.lo(lab.name),
            anatomic_regions=[coded(lab.region)] if lab.region is not None else None,
        ))
    try:
        seg = hd.seg.Segmentation(
            source_images=sources if sources is not None else source_headers(volume),
            pixel_array=segment_map(labels, package),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            **identity.new_object(identity.SEG_SERIES_NUMBER),
            content_label="AI_SEGMENTATION",
            content_description=identity.lo(f"AI {package.name} {package.version}, not for diagnosis"),
            series_description=identity.lo(f"AI SEG {package.name} {package.version}"),
            omit_empty_frames=True,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultsError(f"cannot make the segmentation (SEG) for series {volume.series_uid}: {exc}") from exc
    return seg
