"""The key image: one axial slice with the segmentation outlined and the findings written on it.

Many PACS viewers in clinics cannot display a SEG; every one can display a secondary-capture image. So the
slice that shows the most (the largest lesion area, else the largest organ area) is rendered in a soft
tissue window with a coloured outline of every label, and a caption band below the anatomy that says it is
an AI result not for diagnosis, which model made it, and what it found. The same RGB array becomes the
panel's PNG previews.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from appliance.errors import ResultsError
from appliance.infer.labelmap import LabelMap, as_labelmap
from appliance.infer.measure import LESION_CATEGORY, Measurements, lesion_values
from appliance.infer.volume import Volume
from appliance.models.package import ModelPackage
from appliance.results import identity
from appliance.results.seg import check_source, conformant

#: Soft-tissue window (width 400, level 40 HU): the usual abdominal reading window.
WINDOW_WIDTH, WINDOW_LEVEL = 400.0, 40.0
#: Outline thickness in pixels: one pixel disappears when a viewer scales a 512 image down.
OUTLINE_PX = 2
ORGAN_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 220, 0),
    (0, 200, 255),
    (255, 140, 0),
    (80, 120, 255),
    (200, 80, 255),
)
LESION_COLOURS: tuple[tuple[int, int, int], ...] = ((255, 0, 0), (255, 255, 0), (255, 0, 255))
CAPTION_WARNING = "AI RESULT - NOT FOR DIAGNOSTIC USE"


@dataclass(frozen=True)
class KeyImage:
    """The rendered key image: which slice (index into the volume) and its RGB pixels (anatomy + caption)."""

    index: int
    rgb: np.ndarray  # (rows + caption rows, cols, 3) uint8; the first ``rows`` rows are the slice
    rows: int  # rows of anatomy above the caption band


def label_colours(package: ModelPackage) -> dict[int, tuple[int, int, int]]:
    """Outline colour per label value: organs green first, lesions red first (the convention readers know)."""
    out: dict[int, tuple[int, int, int]] = {}
    organ_i = lesion_i = 0
    for lab in package.labels:
        if lab.category.code == LESION_CATEGORY:
            out[lab.value] = LESION_COLOURS[lesion_i % len(LESION_COLOURS)]
            lesion_i += 1
        else:
            out[lab.value] = ORGAN_COLOURS[organ_i % len(ORGAN_COLOURS)]
            organ_i += 1
    return out


def lesions_inside(package: ModelPackage, organ_value: int) -> list[int]:
    """Lesion label values whose anatomic region is the organ ``organ_value`` (as ``measure`` counts them)."""
    organ = next(lab for lab in package.labels if lab.value == organ_value)
    return [
        lab.value
        for lab in package.labels
        if lab.category.code == LESION_CATEGORY and lab.region is not None and lab.region.code == organ.type.code
    ]


def key_slice(labels: np.ndarray | LabelMap, package: ModelPackage) -> int:
    """The slice with the largest lesion area (all lesion labels together); without lesions the largest
    organ area; with an empty label map the middle slice."""
    lm = as_labelmap(labels)
    lesions = lesion_values(package.labels)
    organs = [lab.value for lab in package.labels if lab.category.code != LESION_CATEGORY]
    for values in (lesions, organs):
        area = lm.area_per_slice(values)
        if area.size and area.max() > 0:
            return int(area.argmax())
    return lm.shape[0] // 2


def _window(hu: np.ndarray) -> np.ndarray:
    lo = WINDOW_LEVEL - WINDOW_WIDTH / 2
    return (np.clip((hu - lo) / WINDOW_WIDTH, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """The inner ``OUTLINE_PX`` pixels of ``mask``'s border (inside, so the outline never covers what
    lies outside the structure)."""
    return mask & ~ndimage.binary_erosion(mask, iterations=OUTLINE_PX)


def _caption_lines(
    package: ModelPackage, measured: Measurements, colours: dict[int, tuple[int, int, int]], index: int, slices: int
) -> list[tuple[str, tuple[int, int, int]]]:
    white = (255, 255, 255)
    lines = [(CAPTION_WARNING, (255, 255, 0)), (f"Model {package.name} {package.version}", white)]
    for organ in measured.organs:
        first = organ.labels[0] if organ.labels else 0
        lines.append((f"{organ.name}: {organ.volume_ml:.1f} ml", colours.get(first, white)))
    lesion_labels = [lab for lab in package.labels if lab.category.code == LESION_CATEGORY]
    if lesion_labels:
        colour = colours[lesion_labels[0].value]
        if measured.lesion_count:
            text = (
                f"Lesions: {measured.lesion_count}, largest {measured.largest_diameter_mm:.1f} mm, "
                f"total {measured.total_lesion_volume_ml:.1f} ml"
            )
            lines.append((text, colour))
        else:
            lines.append(("Lesions: none detected", colour))
    lines.append((f"Slice {index + 1} of {slices}", white))
    return lines


def _wrap(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int
) -> list[str]:
    out: list[str] = []
    line = ""
    for word in text.split(" "):
        trial = f"{line} {word}" if line else word
        if line and draw.textlength(trial, font=font) > width:
            out.append(line)
            line = word
        else:
            line = trial
    out.append(line)
    return out


def _caption_band(lines: list[tuple[str, tuple[int, int, int]]], cols: int) -> np.ndarray:
    size = max(10, cols // 32)
    font = ImageFont.load_default(size=size)
    margin, step = max(2, size // 3), size + max(2, size // 4)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [(part, colour) for text, colour in lines for part in _wrap(probe, text, font, cols - 2 * margin)]
    band = Image.new("RGB", (cols, 2 * margin + step * len(wrapped)), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for i, (text, colour) in enumerate(wrapped):
        draw.text((margin, margin + i * step), text, fill=colour, font=font)
    return np.asarray(band, dtype=np.uint8)


def render_key_image(
    volume: Volume,
    labels: np.ndarray | LabelMap,
    package: ModelPackage,
    measured: Measurements,
    index: int | None = None,
) -> KeyImage:
    """The key image's RGB pixels (slice ``index``, by default ``key_slice``): what the SC and PNGs show."""
    if index is None:
        index = key_slice(labels, package)
    sl = labels.slice(index) if isinstance(labels, LabelMap) else np.asarray(labels[index])
    grey = _window(volume.slice_hu(index))
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    colours = label_colours(package)
    present = set(np.unique(sl).tolist()) - {0}
    lesion_labels = lesion_values(package.labels)
    # Organs first, outlined around the lesions they contain; lesions on top.
    order = sorted(package.labels, key=lambda lab: lab.category.code == LESION_CATEGORY)
    for lab in order:
        inside = [] if lab.value in lesion_labels else lesions_inside(package, lab.value)
        if lab.value not in present and not (present & set(inside)):
            continue
        mask = np.isin(sl, [lab.value, *inside])
        rgb[_outline(mask)] = colours[lab.value]
    band = _caption_band(_caption_lines(package, measured, colours, index, labels.shape[0]), rgb.shape[1])
    return KeyImage(index=index, rgb=np.ascontiguousarray(np.concatenate([rgb, band], axis=0)), rows=rgb.shape[0])


#: BodyPartExamined defined terms (PS3.16 Annex L) of unpaired regions, checked one by one with dciodvfy:
#: with one of these an SC must not carry Laterality; with a paired or an unrecognised term (Siemens'
#: "PARTIALBODY", KIDNEY, LUNG) it must.
UNPAIRED_BODY_PARTS = frozenset(
    {
        "ABDOMEN",
        "ABDOMENPELVIS",
        "CHEST",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "PELVIS",
        "HEAD",
        "HEADNECK",
        "NECK",
        "BRAIN",
        "SKULL",
        "SPINE",
        "CSPINE",
        "TSPINE",
        "LSPINE",
        "SSPINE",
        "CTSPINE",
        "TLSPINE",
        "LSSPINE",
        "COCCYX",
        "LIVER",
        "PANCREAS",
        "SPLEEN",
        "STOMACH",
        "HEART",
        "AORTA",
        "BLADDER",
        "PROSTATE",
        "UTERUS",
        "COLON",
        "RECTUM",
        "ESOPHAGUS",
        "GALLBLADDER",
        "DUODENUM",
        "WHOLEBODY",
    }
)


def set_laterality(sc: Dataset, ref: Dataset) -> None:
    """General Series' BodyPartExamined and Laterality (Type 2C: required for paired or unknown body parts).

    The source's values are copied; where the source has no Laterality and its body part is not a known
    unpaired one, Laterality is sent empty ("unknown", which the standard allows and dciodvfy warns about)
    rather than left out (an error) or guessed.
    """
    body_part = str(ref.get("BodyPartExamined", "") or "").strip().upper()
    if body_part:
        sc.BodyPartExamined = ref.BodyPartExamined
    if ref.get("Laterality"):
        sc.Laterality = ref.Laterality
    elif body_part not in UNPAIRED_BODY_PARTS:
        sc.Laterality = ""
    elif "Laterality" in sc:
        del sc.Laterality


def _orientation_letter(vector: tuple[float, ...]) -> str:
    """The patient direction (LPS: +x Left, +y Posterior, +z Head) a direction cosine points to most."""
    axis = int(np.argmax(np.abs(vector)))
    positive = vector[axis] > 0
    return (("L", "R"), ("P", "A"), ("H", "F"))[axis][0 if positive else 1]


def patient_orientation(orientation: tuple[float, ...]) -> tuple[str, str]:
    """PatientOrientation (row direction, column direction) from ImageOrientationPatient: ("L", "P") axial."""
    return _orientation_letter(orientation[:3]), _orientation_letter(orientation[3:6])


def make_sc(volume: Volume, labels: np.ndarray | LabelMap, key: KeyImage, package: ModelPackage) -> hd.sc.SCImage:
    """The key image as a Secondary Capture in the source study, referencing the slice it shows."""
    check_source(volume, labels, "key image (SC)")
    ref = conformant(volume.headers[key.index])
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=key.rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            **identity.new_object(identity.SC_SERIES_NUMBER),
            pixel_spacing=(float(volume.pixel_spacing[0]), float(volume.pixel_spacing[1])),  # type: ignore[arg-type]  # highdicom annotates it tuple[int, int]; DICOM spacing is decimal
            patient_orientation=patient_orientation(volume.orientation),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=identity.lo(f"AI key image {package.name} {package.version}"),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultsError(f"cannot make the key image (SC) for series {volume.series_uid}: {exc}") from exc
    set_laterality(sc, ref)
    sc.ConversionType = "WSD"  # rendered on a workstation, not digitised from a video or film
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"AI result of model {package.name} {package.version}; not for diagnosis"
    sc.DerivationDescription = identity.lo(f"W{WINDOW_WIDTH:.0f}/L{WINDOW_LEVEL:.0f}, AI outlines, caption")
    item = Dataset()
    item.ReferencedSOPClassUID = ref.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    sc.SourceImageSequence = [item]
    return sc
