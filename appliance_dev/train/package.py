"""The package's documents: MODEL_CARD.md (what the model is, how it was trained, how it scores) and
manifest.toml (through ``appliance_dev.manifest``, the one manifest writer).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from appliance_dev import manifest
from appliance_dev.train.config import (FINDING_SCORE, HELDOUT_SEED0, MAX_BATCH, MAX_EDGE_CONTACT, MIN_CONFIDENCE,
                                        N_CLASSES, NAME, OPT_BATCH, OPT_SIZE, RIM_MAX_WIDTH_MM, SPEC, VERSION)


def fmt_metric(v: float) -> str:
    """A Dice for humans: three decimals, n/a when not measured."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def write_card(out: Path, info: dict) -> None:
    ho, real, onx = info["heldout"], info["real"], info["onnx"]
    rows = []
    for group in ("all", "full", "targeted", "portal", "arterial"):
        if group in ho:
            g = ho[group]
            rows.append(f"| {group} | {g['cases']} | {fmt_metric(g['liver'])} | {fmt_metric(g['lesion'])} |")
    all_ = ho.get("all", {})
    met = [f"liver {fmt_metric(all_.get('liver', float('nan')))} (target >= 0.95: "
           f"{'met' if all_.get('liver', 0) >= 0.95 else 'NOT met'})",
           f"lesion {fmt_metric(all_.get('lesion', float('nan')))} (target >= 0.75: "
           f"{'met' if all_.get('lesion', 0) >= 0.75 else 'NOT met'})"]
    targets_line = "Targets on held-out phantoms: " + "; ".join(met) + "."
    if real:
        real_rows = "\n".join(
            f"| {r['view']} | {r['fov_mm']:.0f} mm | {r['pixel_mm']:.2f} mm | {r['slice_mm']:g} mm | {r['slices']} | "
            f"**{r['liver_dice']:.3f}** | {r['liver_label1_dice']:.3f} | {r['lesion_ml']:.1f} |" for r in real)
        real_text = ("| view | field of view | pixels | slices | n | liver Dice (labels 1+2) | label 1 only | lesion mL marked |\n"
                     "|---|---|---|---|---|---|---|---|\n" + real_rows)
    else:
        real_text = "Not measured (data not present)."
    init_text = ("" if not info.get("init_sha") else
                 f"\nThese steps continued from the exported model with SHA-256 {info['init_sha']} (BatchNorm folded into"
                 " the convolutions, so it trained on as plain convolutions with bias); that model's own card and"
                 " command say how it was trained.")
    text = f"""# {NAME} {VERSION}: liver and liver-lesion segmentation on CT (demonstration model)

**Demonstration only. This is not a medical device and must not be used for diagnosis, treatment or any
clinical decision.** It was trained on synthetic phantoms only (no patient data) and exists to exercise the
appliance end to end (DICOM in, inference, DICOM SEG out).

## What it does
2.5D segmentation of axial contrast-enhanced abdominal CT: each slice is predicted from itself and its two
neighbours (3 channels). Output scores for 3 classes: 0 background, 1 liver (including the vessels inside it),
2 liver lesion. Serving resamples scores to the source grid, takes the argmax and keeps the largest 3D
connected component of liver and lesion together.

## Input specification
- Slices resampled in-plane to {SPEC.spacing_mm[0]} x {SPEC.spacing_mm[1]} mm (coarser when the field of view
  would exceed {SPEC.max_size[0]} x {SPEC.max_size[1]} pixels), padded (value -1) to multiples of {SPEC.size_multiple};
  minimum {SPEC.min_size[0]} x {SPEC.min_size[1]}, optimum {OPT_SIZE[0]} x {OPT_SIZE[1]}.
- HU window [{SPEC.window[0]:.0f}, {SPEC.window[1]:.0f}] mapped linearly to [-1, 1], values clipped.
- Channels: the slice and its neighbours by index in ascending z (clamped at the ends of the series).
- ONNX opset 17; input `image` float32 (N, 3, H, W), output `logits` float32 (N, 3, H, W); N, H, W dynamic.

## Architecture
U-Net, 5 levels (widths {', '.join(map(str, info['widths']))}), two 3x3 conv + BatchNorm + ReLU per level, 2x2 max-pool
down, 2x2 transposed convolution up, concatenated skips, 1x1 head; BatchNorm folded into the convolutions for
export. {info['params']:,} parameters; model.onnx {onx['size_bytes'] / 1e6:.2f} MB.
onnxruntime CPU (2 intra-op threads, all graph optimisations), 300 slices at 176 x 176 (a ~350 mm field of
view): {onx['ort_300_slices_176_s']:.1f} s on the 2-core build machine. ONNX vs PyTorch max abs diff {onx['max_abs_diff']:.1e}.

## Training data
{info['n_train']} synthetic abdominal phantoms (`appliance_dev/synthetic`, seeds {info['train_seed0']}..{info['train_seed0'] + info['n_train'] - 1}, {info['train_slices']}
slices each): randomly deformed liver (lobes, size, z-extent 130-210 mm, position) hugging the ribcage under the
diaphragm dome, with portal and hepatic vein trees; spleen, kidneys (cortex, medulla, sinus), aorta, IVC, pancreas,
gallbladder, stomach and bowel with air, fluid or oral contrast, lung bases and heart, vertebrae with posterior
elements, ribs and costal cartilage, paraspinal and abdominal wall muscles, subcutaneous fat, table, sometimes arms.
0-25 lesions per liver (3-60 mm; hypodense, cystic, hyperdense, rim-enhancing, near-isodense). Portal venous and
arterial phases with HU drawn per patient; fields of view 350-500 mm (full) and 180-260 mm (targeted liver
reconstructions), 512 matrix (0.35-1.0 mm pixels), slices 0.625-5 mm with partial volume, PSF blur, correlated
noise 10-45 HU. Each phantom was passed through the serving pre-processing; training used random
{info['crop']} x {info['crop']} crops with small intensity jitter, {info['lesion_crops']:.0%} of them centred on a lesion pixel.
Training: {info['steps']} steps of batch {info['batch']}, AdamW, cosine learning rate from {info['lr']}, loss cross-entropy
(lesion class weight {info['lesion_weight']:g}) + soft Dice of the liver + {info['lesion_dice']:g} x soft Dice of the lesions;
PyTorch CPU, deterministic, seed {info['seed']}, {info['train_minutes']:.0f} min.{init_text}

## Results
Held-out phantoms (seeds from {HELDOUT_SEED0}, never trained on; {info['heldout_slices']} slices each; global Dice
on the source grid after the serving post-processing):

| group | cases | liver Dice | lesion Dice |
|---|---|---|---|
{chr(10).join(rows)}

{targets_line}

Real CT (20 slices of a portal venous abdominal CT, 500 mm field of view, 2 mm spacing, reference liver mask from
TotalSegmentator, not manual; never trained on or tuned against). Besides the series as acquired, views derived
from it as a clinic would send them (`appliance_dev/real_ct.py`): targeted reconstructions (an in-plane crop centred on
the liver, resampled to 512 x 512: the liver fills the image, no body outline) and 4 mm slabs (adjacent slices
averaged). The real CT has no lesion reference; "lesion mL marked" is what the model calls lesion there.

{real_text}

## Limitations
- Trained on synthetic anatomy only: real livers, vessels, lesions and neighbouring organs look different in
  many ways the phantoms do not capture (texture, fissures, ligaments, diaphragm, pathology, artefacts from
  metal, beam hardening, motion, streaks). Expect failures on real data, especially near the stomach, heart,
  spleen and bowel, at the liver dome and tip, and for lesions (the lesion class is untested on real CT).
- 2.5D at 2 mm: lesions under ~5 mm are often missed; boundaries are smoothed at the 2 mm grid.
- Axial slices, head-first supine orientation as in standard abdominal CT; not for MR, non-contrast,
  paediatric, or unusual anatomy (situs inversus, post-hepatectomy).
- The held-out Dice measures fit to the generator, not clinical performance.
"""
    (out / "MODEL_CARD.md").write_text(text)



def manifest_fields(out: Path, info: dict) -> dict[str, Any]:
    """The package's manifest as fields of ``appliance.models.manifest.Manifest`` (``[training]``: provenance).

    ``out`` must already hold model.onnx and MODEL_CARD.md: their SHA-256 go into ``[files]``.
    """
    ho, real = info["heldout"], info["real"]
    training: dict[str, Any] = {
        "script": "scripts/train_demo_model.py",
        "seed": info["seed"],
        "command": info["command"],
        "phantoms_train": info["n_train"],
        "train_seed_start": info["train_seed0"],
        "slices_per_phantom": info["train_slices"],
        "phantoms_heldout": info["n_heldout"],
        "heldout_seed_start": HELDOUT_SEED0,
        "steps": info["steps"],
        "batch": info["batch"],
        "crop": info["crop"],
        "minutes": round(info["train_minutes"], 1),
        "heldout_liver_dice": round(ho["all"]["liver"], 4),
        "heldout_lesion_dice": round(ho["all"]["lesion"], 4),
        "real_ct_liver_dice": round(real[0]["liver_dice"], 4) if real else math.nan,
        "ort_cpu_300_slices_176px_s": round(info["onnx"]["ort_300_slices_176_s"], 2),
    }
    if info.get("init_sha"):
        training["init_sha256"] = info["init_sha"]
    # What the stage-5 options changed, recorded only where they were used (earlier manifests stay as written).
    if info.get("variety", 1) != 1:
        training["phantom_variety"] = info["variety"]
        training["heldout_variety"] = info["variety"]
    for key, field in (("shading", "shading_hu"), ("edge_shading", "edge_shading_hu"), ("clefts", "clefts")):
        if info.get(key):
            training[field] = float(info[key])
    return {
        "schema": 1,
        "name": NAME,
        "version": VERSION,
        "task": "segmentation",
        "modality": "CT",
        "intended_use": "Demonstration only: exercises the appliance end to end; not a medical device, not for "
                        "diagnosis or any clinical use",
        "licence": "Proprietary demonstration model; trained on synthetic phantoms only",
        "description": "2.5D U-Net segmenting liver (1) and liver lesions (2) on axial contrast-enhanced abdominal "
                       "CT, trained on synthetic phantoms",
        "input": {"dims": 2, "tensor": "image", "channels": SPEC.channels, "spacing_mm": list(SPEC.spacing_mm),
                  "size_multiple": SPEC.size_multiple, "min_size": list(SPEC.min_size), "opt_size": list(OPT_SIZE),
                  "max_size": list(SPEC.max_size), "opt_batch": OPT_BATCH, "max_batch": MAX_BATCH},
        "normalisation": {"kind": "hu_window", "window": list(SPEC.window)},
        "output": {"tensor": "logits", "kind": "scores", "classes": N_CLASSES},
        "postprocess": {"largest_component": [1, 2]},
        # a finding is at least 5 mm across (smaller components are noise at this model's 2 mm grid)
        "reporting": {"min_lesion_diameter_mm": 5.0, "min_confidence": MIN_CONFIDENCE,
                      "max_edge_contact": MAX_EDGE_CONTACT, "rim_max_width_mm": RIM_MAX_WIDTH_MM}
                     | ({"finding_score": dict(FINDING_SCORE)} if FINDING_SCORE else {}),
        "labels": list(manifest.LIVER_LABELS),
        "files": manifest.file_digests(out, ("model.onnx", "MODEL_CARD.md")),
        "training": training,
    }


def write_manifest(out: Path, info: dict) -> None:
    """``out/manifest.toml``, validated by the runtime schema before it is written."""
    manifest.write_manifest(out, manifest_fields(out, info))
