"""The label map as a DICOM Segmentation: what a PACS or viewer overlays on the source series.

One segment per label of the model's manifest, coded in SNOMED CT exactly as the manifest says, so a
receiving system knows what was segmented without reading our documentation; the algorithm is named and
versioned in every segment, so a reader can tell which model drew it.
"""

from __future__ import annotations

import logging
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.spatial import VOLUME_INDEX_CONVENTION, _get_slice_distances, get_normal_vector, get_volume_positions
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import format_number_as_ds

from appliance.errors import ResultsError
from appliance.infer.labelmap import LabelMap, as_labelmap
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
    return hd.AlgorithmIdentificationSequence(
        name=identity.lo(package.name), version=identity.lo(package.version), family=codes.DCM.ArtificialIntelligence
    )


def check_source(volume: Volume, labels: np.ndarray | LabelMap, what: str) -> None:
    """Refuse, with a reason, a volume whose slice headers or shape do not match the label map."""
    if not volume.headers:
        raise ResultsError(
            f"cannot make the {what}: the decoded series carries no slice headers "
            "(decoded by an older appliance version?); run the job again"
        )
    if len(volume.headers) != labels.shape[0] or tuple(labels.shape) != volume.shape:
        raise ResultsError(
            f"cannot make the {what}: the label map has shape {tuple(labels.shape)} but the series "
            f"{volume.series_uid} has {len(volume.headers)} slices of {volume.shape[1:]} pixels"
        )
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        empty = sum(1 for h in volume.headers if not h.get(keyword))
        if empty:
            raise ResultsError(
                f"cannot make the {what}: {empty} of {len(volume.headers)} slices of series "
                f"{volume.series_uid or '(no UID)'} have no {keyword}, so results cannot reference "
                "them; the series was damaged or badly anonymised before it was sent"
            )


#: Type 2 attributes of the Patient and General Study modules that highdicom copies from the source and
#: reads unconditionally: a conformant image has them (perhaps empty); some anonymisers drop them.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


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
            raise ResultsError(
                f"instance {ds.get('SOPInstanceUID', '?')} of series {ds.get('SeriesInstanceUID', '?')} "
                "has no SOPClassUID: result objects cannot reference it; fix the sender"
            )
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


def _as_if_given_all(seg: hd.seg.Segmentation, sources: list[Dataset]) -> None:
    """What highdicom derives from all source slices rather than the frames' (see ``make_seg``: it is given
    only the non-empty ones), set as it sets it when given all: SourceImageSequence and
    ReferencedSeriesSequence listing every slice, and the series' SpacingBetweenSlices (highdicom takes it
    from every source position "to give the receiver more information ... in the case that slices are
    omitted"; the labelled slices alone may have gaps)."""
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    spacing, _ = get_volume_positions(
        image_positions=[[float(v) for v in s.ImagePositionPatient] for s in sources],
        image_orientation=[float(v) for v in orientation],
    )
    if spacing is not None:
        measures.SpacingBetweenSlices = format_number_as_ds(spacing)
    elif "SpacingBetweenSlices" in measures:
        del measures.SpacingBetweenSlices
    items: list[Dataset] = []
    by_series: dict[str, list[Dataset]] = {}
    for src in sources:
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.SOPClassUID
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        items.append(ref)
        by_series.setdefault(src.SeriesInstanceUID, []).append(ref)
    seg.SourceImageSequence = items
    series_items = []
    for series_uid, refs in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedInstanceSequence = refs
        series_items.append(item)
    seg.ReferencedSeriesSequence = series_items
    # highdicom indexes the references when it builds the object (for get_pixels_by_source_instance and
    # the like); index them again, as reading the written file would.
    seg._build_luts()


def make_seg(
    volume: Volume, labels: np.ndarray | LabelMap, package: ModelPackage, sources: list[Dataset] | None = None
) -> hd.seg.Segmentation:
    """A BINARY SEG of ``labels`` (slices in ``volume.headers`` order) with one segment per manifest label.

    ``sources`` is ``source_headers(volume)`` when the caller already made it (the SR needs the same list).
    highdicom needs the mask as one dense array, frames x rows x cols; it omits empty frames anyway, so it
    is given only the slices that have a label (and their headers), then the references to every source
    slice are set as it would have set them: the same SEG as from the whole dense map, with the dense
    part the size of the segmented slices, not of the series.
    """
    check_source(volume, labels, "segmentation (SEG)")
    missing = [i for i, h in enumerate(volume.headers) if not h.get("FrameOfReferenceUID")]
    if missing:
        raise ResultsError(
            f"series {volume.series_uid} has no FrameOfReferenceUID (slice {missing[0] + 1} and "
            f"{len(missing) - 1} more): a DICOM SEG cannot reference it; the scanner or a "
            "router removed it, fix the export from the modality"
        )
    algorithm = algorithm_identification(package)
    descriptions = []
    for number, lab in enumerate(package.labels, start=1):
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=identity.lo(lab.name),
                segmented_property_category=coded(lab.category),
                segmented_property_type=coded(lab.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=identity.new_uid(),
                tracking_id=identity.lo(lab.name),
                anatomic_regions=[coded(lab.region)] if lab.region is not None else None,
            )
        )
    sources = sources if sources is not None else source_headers(volume)
    lm = as_labelmap(labels)
    present = lm.nonempty()
    common: dict[str, Any] = dict(
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        **identity.new_object(identity.SEG_SERIES_NUMBER),
        content_label="AI_SEGMENTATION",
        content_description=identity.lo(f"AI {package.name} {package.version}, not for diagnosis"),
        series_description=identity.lo(f"AI SEG {package.name} {package.version}"),
        omit_empty_frames=True,
    )
    values = [lab.value for lab in package.labels]
    counts = lm.counts(256)
    unknown = sorted(set(np.flatnonzero(counts).tolist()) - {0, *values})
    # Chunks need every labelled slice to give frames (an unknown value alone would not) and whole bytes a frame.
    chunked = present.size > SEG_CHUNK_FRAMES and not unknown and (lm.shape[1] * lm.shape[2]) % 8 == 0
    try:
        if not present.size:
            # An all-empty map: highdicom then encodes every (empty) frame; zeros cost no memory until written.
            seg = hd.seg.Segmentation(source_images=sources, pixel_array=np.zeros(lm.shape, dtype=np.uint8), **common)
        elif not chunked:
            seg = hd.seg.Segmentation(
                source_images=[sources[int(i)] for i in present],
                pixel_array=segment_map(lm.take(present), package),
                **common,
            )
        else:
            seg = _chunked_seg(lm, present, sources, package, common)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultsError(f"cannot make the segmentation (SEG) for series {volume.series_uid}: {exc}") from exc
    if present.size:
        _as_if_given_all(seg, sources)
    return seg


#: Labelled slices given to highdicom at once: its input is one dense frames x rows x cols array, so a
#: thin-slice series' SEG is built in chunks of this many frames and merged (64 x 512 x 512 = 16 MB).
SEG_CHUNK_FRAMES = 64


def _chunked_seg(
    lm: LabelMap, present: np.ndarray, sources: list[Dataset], package: ModelPackage, common: dict[str, Any]
) -> hd.seg.Segmentation:
    """The SEG highdicom makes from all of ``present`` at once, made ``SEG_CHUNK_FRAMES`` slices at a time.

    highdicom orders frames segment by segment, each segment's frames by position along its normal, and
    numbers positions 1..K in that order (DimensionIndexValues). Chunks are runs of consecutive slices,
    so the whole order is the chunks' orders one after the other, in the order of their positions; the
    frames of each segment are concatenated so, their position index offset by the planes of the chunks
    before. Frames of 8k pixels are whole bytes of BINARY pixel data, so frames are cut and joined as bytes.
    """
    frame_bytes = lm.shape[1] * lm.shape[2] // 8
    chunks = []
    for a in range(0, present.size, SEG_CHUNK_FRAMES):
        idx = present[a : a + SEG_CHUNK_FRAMES]
        part = hd.seg.Segmentation(
            source_images=[sources[int(i)] for i in idx], pixel_array=segment_map(lm.take(idx), package), **common
        )
        frames = []
        for k, item in enumerate(part.PerFrameFunctionalGroupsSequence):
            number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            frames.append((number, item, bytes(part.PixelData[k * frame_bytes : (k + 1) * frame_bytes])))
        planes = len({tuple(float(v) for v in it.PlanePositionSequence[0].ImagePositionPatient) for _, it, _ in frames})
        chunks.append((part, frames, planes))
        del part.PixelData
    base = chunks[0][0]
    ori = base.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    normal = get_normal_vector(ori, index_convention=VOLUME_INDEX_CONVENTION)
    first = np.array(
        [[float(v) for v in frames[0][1].PlanePositionSequence[0].ImagePositionPatient] for _, frames, _ in chunks]
    )
    order = np.argsort(_get_slice_distances(first, normal), kind="stable")
    offsets = np.zeros(len(chunks), dtype=np.int64)
    total = 0
    for c in order:
        offsets[c] = total
        total += chunks[c][2]
    items: list[Dataset] = []
    data: list[bytes] = []
    for number in range(1, len(package.labels) + 1):
        for c in order:
            for seg_number, item, pixels in chunks[c][1]:
                if seg_number == number:
                    content = item.FrameContentSequence[0]
                    dims = [int(v) for v in content.DimensionIndexValues]
                    dims[-1] += int(offsets[c])
                    content.DimensionIndexValues = dims
                    items.append(item)
                    data.append(pixels)
    base.PerFrameFunctionalGroupsSequence = items
    base.NumberOfFrames = len(items)
    base.PixelData = b"".join(data)
    del data, chunks
    # Whole-series DimensionOrganizationType as highdicom infers it: only for a single segment (it leaves it
    # out when frames differ by segment too), "3D" when the frames' planes are regularly spaced in input
    # (geometric) order; a chunk alone may be regular where the whole is not, or the other way round.
    if len(common["segment_descriptions"]) == 1 and present.size > 1:
        positions = [[float(v) for v in sources[int(i)].ImagePositionPatient] for i in present]
        spacing, _ = get_volume_positions(
            image_positions=positions, image_orientation=[float(v) for v in ori], sort=False
        )
        if spacing is not None and spacing > 0.0:
            base.DimensionOrganizationType = "3D"
        elif "DimensionOrganizationType" in base:
            del base.DimensionOrganizationType
    return base
