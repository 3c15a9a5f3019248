#!/usr/bin/env python3
"""Train, evaluate, export and package the demonstration liver CT model (``models/liver-ct-demo``).

Why this shape: the appliance needs a model it may ship without patient data, so the model learns only
from synthetic phantoms (``appliance.synthetic``), rendered on the same variety of grids the clinics send
and pushed through the serving pre-processing (``appliance.infer.preprocess``) so training sees exactly
what serving feeds the network. Held-out phantoms (disjoint seeds) are scored like serving scores a
series: scores resampled to the source grid, argmax, largest 3D component. The real CT in
``../shared/data/real-ct-abdomen`` is scored once at the end as the honest measure; it is never trained on.

Reproducible on CPU: fixed seeds, deterministic algorithms, fixed thread count.

    .venv/bin/python scripts/train_demo_model.py                     # full run into models/liver-ct-demo
    .venv/bin/python scripts/train_demo_model.py --init M/model.onnx --lr 1e-3 --seed 1 --steps 4000   # continue M
    .venv/bin/python scripts/train_demo_model.py --quick --out /tmp/x  # end-to-end smoke run (< 2 min)

The shipped model is the defaults followed by three continuations, the last on 480 new phantoms
(``--train-seed0 480``); its MODEL_CARD.md has the four commands.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.infer.postprocess import keep_largest_component  # noqa: E402
from appliance.infer.preprocess import (  # noqa: E402
    InputSpec,
    batch_input,
    context_indices,
    labels_to_model_grid,
    model_grid,
    scores_to_source,
    to_model_grid,
)
from appliance.synthetic import make_phantom, sample_spec  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from real_ct import dice, real_views  # noqa: E402

NAME = "liver-ct-demo"
VERSION = "1.4.0"
N_CLASSES = 3
SPEC = InputSpec(channels=3, spacing_mm=(2.0, 2.0), size_multiple=16, min_size=(64, 64),
                 max_size=(256, 256), window=(-250.0, 350.0))
OPT_SIZE = (192, 192)
OPT_BATCH, MAX_BATCH = 8, 16
WIDTHS = (12, 24, 48, 96, 192)  # --width 12 (the default), doubling per level
HELDOUT_SEED0 = 1_000_000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------


def build_model(widths: tuple[int, ...] = WIDTHS, channels: int = 3):
    """A small 2D U-Net: 3x3 conv + BN + ReLU pairs, max-pool down, transposed-conv up, concat skips."""
    import torch.nn as nn
    import torch

    def block(i: int, o: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                             nn.Conv2d(o, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.ModuleList()
            prev = channels
            for c in widths:
                self.enc.append(block(prev, c))
                prev = c
            self.up = nn.ModuleList()
            self.dec = nn.ModuleList()
            for i in range(len(widths) - 1, 0, -1):
                self.up.append(nn.ConvTranspose2d(widths[i], widths[i - 1], 2, stride=2))
                self.dec.append(block(2 * widths[i - 1], widths[i - 1]))
            self.head = nn.Conv2d(widths[0], N_CLASSES, 1)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            for i, enc in enumerate(self.enc):
                if i:
                    x = self.pool(x)
                x = enc(x)
                skips.append(x)
            for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1])):
                x = dec(torch.cat([up(x), skip], 1))
            return self.head(x)

    return UNet()


def fold_batchnorm(model):
    """Fold every eval-mode BatchNorm into the conv before it (an exported graph of Conv/ReLU only)."""
    import copy

    import torch
    import torch.nn as nn

    model = copy.deepcopy(model).eval()
    for mod in model.modules():
        if isinstance(mod, nn.Sequential):
            layers = list(mod)
            out = []
            i = 0
            while i < len(layers):
                layer = layers[i]
                if isinstance(layer, nn.Conv2d) and i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d):
                    bn = layers[i + 1]
                    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                     layer.padding, bias=True)
                    with torch.no_grad():
                        conv.weight.copy_(layer.weight * scale[:, None, None, None])
                        b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
                        conv.bias.copy_((b - bn.running_mean) * scale + bn.bias)
                    out.append(conv)
                    i += 2
                else:
                    out.append(layer)
                    i += 1
            for j in range(len(mod)):
                del mod[0]
            for layer in out:
                mod.append(layer)
    return model


def model_from_onnx(path: Path, channels: int = 3):
    """The training architecture, BatchNorm folded as exported, with an exported model.onnx's weights loaded.

    Why: the shipped package holds only the folded ONNX; this turns it back into a trainable PyTorch module
    (``--init``: continue training a shipped model) and into the benchmark's PyTorch reference. The export keeps
    PyTorch's parameter names as initializer names; the base width is the first convolution's output channels.
    """
    import onnx
    import torch
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    first = next(iter(build_model(channels=channels).state_dict()))
    base = int(inits[first].shape[0]) if first in inits else WIDTHS[0]
    model = fold_batchnorm(build_model(tuple(base * 2**i for i in range(len(WIDTHS))), channels=channels))
    params = dict(model.named_parameters())
    if set(params) != set(inits) or any(tuple(params[k].shape) != inits[k].shape for k in params):
        raise ValueError(f"{path}: its weights do not fit the training script's architecture")
    with torch.no_grad():
        for k, prm in params.items():
            prm.copy_(torch.from_numpy(np.array(inits[k])))  # a writable copy
    return model


# ------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------


def _render_case(args: tuple[int, int, str | None]) -> dict:
    """One phantom on the model grid (what training sees), plus its source-grid truth when held out."""
    seed, n_slices, fov_kind = args
    spec = sample_spec(seed, n_slices=n_slices, fov_kind=fov_kind)
    hu, lab, meta = make_phantom(spec)
    grid = model_grid(hu.shape[1], hu.shape[2], meta["pixel_spacing"], SPEC)
    prep = to_model_grid(hu, grid, SPEC).astype(np.float16)
    mlab = labels_to_model_grid(lab, grid, N_CLASSES)
    return dict(seed=seed, prep=prep, lab=mlab, fov_kind=spec.fov_kind, phase=spec.phase, grid=grid,
                n_lesions=meta["n_lesions"])


def render_cases(seeds: list[int], n_slices: int, workers: int, fov_kinds: list[str | None] | None = None,
                 keep_source: bool = False) -> list[dict]:
    kinds = fov_kinds or [None] * len(seeds)
    jobs = [(s, n_slices, k) for s, k in zip(seeds, kinds)]
    out: list[dict] = []
    t0 = time.time()
    fn = _render_heldout if keep_source else _render_case
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            for i, case in enumerate(pool.imap(fn, jobs)):
                out.append(case)
                _progress("phantoms", i + 1, len(jobs), t0)
    else:
        for i, job in enumerate(jobs):
            out.append(fn(job))
            _progress("phantoms", i + 1, len(jobs), t0)
    return out


def _render_heldout(args: tuple[int, int, str | None]) -> dict:
    seed, n_slices, fov_kind = args
    spec = sample_spec(seed, n_slices=n_slices, fov_kind=fov_kind)
    hu, lab, meta = make_phantom(spec)
    return dict(seed=seed, hu=hu, lab=lab, spacing=meta["pixel_spacing"], fov_kind=spec.fov_kind, phase=spec.phase)


def _progress(what: str, i: int, n: int, t0: float) -> None:
    if i == n or i % max(1, n // 20) == 0:
        dt = time.time() - t0
        log(f"{what}: {i}/{n}  {dt:.0f}s elapsed, ETA {dt / i * (n - i):.0f}s")


class CropSampler:
    """Random training crops of model-grid slices with their slice context, mostly through the liver."""

    def __init__(self, cases: list[dict], crop: int, rng: np.random.Generator, lesion_frac: float = 0.0,
                 shading_hu: float = 0.0) -> None:
        self.cases = cases
        self.crop = crop
        self.rng = rng
        self.lesion_frac = lesion_frac
        self.shading_hu = shading_hu
        self.index = [(ci, k) for ci, c in enumerate(cases) for k in range(c["prep"].shape[0])]
        self.liver_index = [(ci, k) for ci, c in enumerate(cases) for k in range(c["prep"].shape[0]) if (c["lab"][k] > 0).any()]
        # Lesion pixels are ~1% of liver crops; without crops centred on them the lesion class is starved.
        self.lesion_index = [(ci, k) for ci, c in enumerate(cases) for k in range(c["prep"].shape[0]) if (c["lab"][k] == 2).any()]

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        ch, cs = SPEC.channels, self.crop
        x = np.full((n, ch, cs, cs), -1.0, np.float32)
        y = np.zeros((n, cs, cs), np.int64)
        for b in range(n):
            on_lesion = bool(self.lesion_index) and self.rng.random() < self.lesion_frac
            if on_lesion:
                pool = self.lesion_index
            else:
                pool = self.liver_index if (self.liver_index and self.rng.random() < 0.85) else self.index
            ci, k = pool[int(self.rng.integers(len(pool)))]
            case = self.cases[ci]
            prep, lab = case["prep"], case["lab"]
            idx = context_indices(prep.shape[0], ch)[k]
            H, W = prep.shape[1:]
            # Crop origin: near a lesion pixel for lesion crops; near liver pixels half the time otherwise.
            centre = (lab[k] == 2) if on_lesion else (lab[k] > 0)
            if (on_lesion or self.rng.random() < 0.5) and centre.any():
                rr, cc = np.nonzero(centre)
                j = int(self.rng.integers(len(rr)))
                r0 = int(rr[j]) - cs // 2 + int(self.rng.integers(-cs // 4, cs // 4 + 1))
                c0 = int(cc[j]) - cs // 2 + int(self.rng.integers(-cs // 4, cs // 4 + 1))
            else:
                r0 = int(self.rng.integers(min(0, H - cs), max(0, H - cs) + 1))
                c0 = int(self.rng.integers(min(0, W - cs), max(0, W - cs) + 1))
            sr0, sc0 = max(r0, 0), max(c0, 0)
            sr1, sc1 = min(r0 + cs, H), min(c0 + cs, W)
            if sr1 <= sr0 or sc1 <= sc0:
                continue
            x[b, :, sr0 - r0:sr1 - r0, sc0 - c0:sc1 - c0] = prep[idx, sr0:sr1, sc0:sc1]
            y[b, sr0 - r0:sr1 - r0, sc0 - c0:sc1 - c0] = lab[k, sr0:sr1, sc0:sc1]
        # Mild intensity jitter (a few HU of calibration offset / gain), in window units.
        shift = self.rng.uniform(-0.03, 0.03, size=(n, 1, 1, 1)).astype(np.float32)
        gain = self.rng.uniform(0.95, 1.05, size=(n, 1, 1, 1)).astype(np.float32)
        inside = x > -1.0
        x = np.where(inside, np.clip(x * gain + shift, -1.0, 1.0), x)
        if self.shading_hu > 0:
            x = self._shade(x)
        return x, y

    def _shade(self, x: np.ndarray) -> np.ndarray:
        """Smooth low-frequency HU offsets on half the crops, like beam-hardening and cupping shading.

        Real CT has them (the shared real series has a ~22 HU darker posterior liver); without them the model
        learns that any darker region of liver is a lesion. Features are ~60 mm and larger, edgeless, so
        lesions (which have edges) stay distinguishable.
        """
        from scipy.ndimage import zoom

        n, _, cs, _ = x.shape
        amp = self.shading_hu / ((SPEC.window[1] - SPEC.window[0]) / 2.0)  # HU -> window units
        for b in range(n):
            if self.rng.random() >= 0.5:
                continue
            coarse = self.rng.uniform(-1.0, 1.0, size=(4, 4)).astype(np.float32)
            field = zoom(coarse, cs / 4.0, order=3)[:cs, :cs]
            field *= amp * float(self.rng.uniform(0.3, 1.0)) / max(float(np.abs(field).max()), 1e-6)
            tissue = x[b] > -0.95  # soft tissue and fat, not air or padding
            x[b] = np.where(tissue, np.clip(x[b] + field[None], -1.0, 1.0), x[b])
        return x


# ------------------------------------------------------------------------------------------------------
# Inference exactly as serving does it
# ------------------------------------------------------------------------------------------------------


def predict_volume(run_batch, hu: np.ndarray, spacing: tuple[float, float], batch: int = MAX_BATCH) -> np.ndarray:
    """Source-grid label map for a HU volume (slices in ascending z): model grid, scores back, argmax, clean-up."""
    grid = model_grid(hu.shape[1], hu.shape[2], spacing, SPEC)
    prep = to_model_grid(hu, grid, SPEC)
    labels = np.zeros(hu.shape, np.uint8)
    for s in range(0, prep.shape[0], batch):
        e = min(s + batch, prep.shape[0])
        scores = run_batch(batch_input(prep, s, e, SPEC.channels))
        labels[s:e] = scores_to_source(scores, grid).argmax(axis=1).astype(np.uint8)
    return keep_largest_component(labels, classes=[1, 2])


def torch_runner(model, device: str):
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x).to(device)).float().cpu().numpy()

    return run


def onnx_runner(path: Path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(["logits"], {"image": x})[0]

    return run


def dice_stats(pred: np.ndarray, truth: np.ndarray) -> dict[str, tuple[int, int]]:
    """(intersection, sum of sizes) for liver (labels 1 and 2: the whole organ) and lesion (label 2)."""
    out = {}
    for name, p, t in (("liver", pred > 0, truth > 0), ("lesion", pred == 2, truth == 2)):
        out[name] = (int((p & t).sum()), int(p.sum() + t.sum()))
    return out


def evaluate_phantoms(run_batch, cases: list[dict]) -> dict[str, dict[str, float]]:
    """Global Dice over held-out phantoms, overall and by field-of-view kind, on the source grid."""
    acc: dict[str, dict[str, list[int]]] = {}
    t0 = time.time()
    for i, case in enumerate(cases):
        pred = predict_volume(run_batch, case["hu"], case["spacing"])
        st = dice_stats(pred, case["lab"])
        for group in ("all", case["fov_kind"], case["phase"]):
            g = acc.setdefault(group, {"liver": [0, 0], "lesion": [0, 0]})
            for k, (a, b) in st.items():
                g[k][0] += a
                g[k][1] += b
        _progress("held-out evaluation", i + 1, len(cases), t0)
    res = {}
    for group, g in acc.items():
        res[group] = {k: (2.0 * a / b if b else float("nan")) for k, (a, b) in g.items()}
        res[group]["cases"] = sum(1 for c in cases if group in ("all", c["fov_kind"], c["phase"]))
    return res


def evaluate_real(run_batch) -> list[dict] | None:
    """Liver Dice on the real CT as acquired and on its targeted and thick-slab views; None if absent."""
    out = []
    for view in real_views():
        pred = predict_volume(run_batch, view.hu, view.spacing)
        voxel_ml = view.spacing[0] * view.spacing[1] * view.slice_mm / 1000.0
        out.append({"view": view.name, "fov_mm": view.fov_mm, "pixel_mm": view.spacing[0], "slice_mm": view.slice_mm,
                    "slices": int(view.hu.shape[0]), "liver_dice": dice(pred > 0, view.liver),
                    "liver_label1_dice": dice(pred == 1, view.liver), "lesion_ml": float((pred == 2).sum() * voxel_ml)})
    return out or None


# ------------------------------------------------------------------------------------------------------
# Export and packaging
# ------------------------------------------------------------------------------------------------------


def export_onnx(model, path: Path) -> dict[str, float]:
    """Export (BN folded, opset 17, dynamic N/H/W), check onnxruntime against PyTorch, time 300 slices."""
    import onnx
    import torch

    folded = fold_batchnorm(model.cpu()).eval()
    dummy = torch.zeros(1, SPEC.channels, 96, 96)
    axes = {0: "batch", 2: "height", 3: "width"}
    kwargs = dict(opset_version=17, input_names=["image"], output_names=["logits"],
                  dynamic_axes={"image": axes, "logits": axes}, do_constant_folding=True)
    try:
        torch.onnx.export(folded, dummy, str(path), dynamo=False, **kwargs)
    except TypeError:
        torch.onnx.export(folded, dummy, str(path), **kwargs)
    onnx.checker.check_model(onnx.load(str(path)))
    run = onnx_runner(path)
    rng = np.random.default_rng(0)
    max_diff = 0.0
    for n, h, w in ((1, 64, 64), (5, 96, 160), (MAX_BATCH, 176, 176)):
        x = rng.uniform(-1, 1, size=(n, SPEC.channels, h, w)).astype(np.float32)
        with torch.no_grad():
            ref = model.cpu().eval()(torch.from_numpy(x)).numpy()
        out = run(x)
        assert out.shape == (n, N_CLASSES, h, w), out.shape
        max_diff = max(max_diff, float(np.abs(out - ref).max()))
    if max_diff > 1e-3:
        raise RuntimeError(f"onnxruntime disagrees with PyTorch: max abs diff {max_diff}")
    # Speed: a 300-slice series at a ~350 mm field of view (175 px at 2 mm, padded to 176).
    x = rng.uniform(-1, 1, size=(OPT_BATCH, SPEC.channels, 176, 176)).astype(np.float32)
    run(x)
    t0 = time.time()
    for s in range(0, 300, OPT_BATCH):
        run(x[: min(OPT_BATCH, 300 - s)])
    secs = time.time() - t0
    return {"max_abs_diff": max_diff, "ort_300_slices_176_s": secs, "size_bytes": path.stat().st_size}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def write_card(out: Path, info: dict) -> None:
    ho, real, onx = info["heldout"], info["real"], info["onnx"]
    rows = []
    for group in ("all", "full", "targeted", "portal", "arterial"):
        if group in ho:
            g = ho[group]
            rows.append(f"| {group} | {g['cases']} | {_fmt(g['liver'])} | {_fmt(g['lesion'])} |")
    all_ = ho.get("all", {})
    met = [f"liver {_fmt(all_.get('liver', float('nan')))} (target >= 0.95: "
           f"{'met' if all_.get('liver', 0) >= 0.95 else 'NOT met'})",
           f"lesion {_fmt(all_.get('lesion', float('nan')))} (target >= 0.75: "
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
{info['n_train']} synthetic abdominal phantoms (`appliance/synthetic`, seeds {info['train_seed0']}..{info['train_seed0'] + info['n_train'] - 1}, {info['train_slices']}
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
from it as a clinic would send them (`scripts/real_ct.py`): targeted reconstructions (an in-plane crop centred on
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


def write_manifest(out: Path, info: dict) -> None:
    ho, real = info["heldout"], info["real"]
    real_txt = f"{real[0]['liver_dice']:.4f}" if real else "nan"
    text = f'''schema = 1
name = "{NAME}"
version = "{VERSION}"
task = "segmentation"
modality = "CT"
intended_use = "Demonstration only: exercises the appliance end to end; not a medical device, not for diagnosis or any clinical use"
licence = "Proprietary demonstration model; trained on synthetic phantoms only"
description = "2.5D U-Net segmenting liver (1) and liver lesions (2) on axial contrast-enhanced abdominal CT, trained on synthetic phantoms"

[input]
dims = 2
tensor = "image"
channels = {SPEC.channels}
spacing_mm = [{SPEC.spacing_mm[0]}, {SPEC.spacing_mm[1]}]
size_multiple = {SPEC.size_multiple}
min_size = [{SPEC.min_size[0]}, {SPEC.min_size[1]}]
opt_size = [{OPT_SIZE[0]}, {OPT_SIZE[1]}]
max_size = [{SPEC.max_size[0]}, {SPEC.max_size[1]}]
opt_batch = {OPT_BATCH}
max_batch = {MAX_BATCH}

[normalisation]
kind = "hu_window"
window = [{SPEC.window[0]}, {SPEC.window[1]}]

[output]
tensor = "logits"
kind = "scores"
classes = {N_CLASSES}

[postprocess]
largest_component = [1, 2]

[[labels]]
value = 1
name = "Liver"
category = {{ scheme = "SCT", code = "91723000", meaning = "Anatomical Structure" }}
type = {{ scheme = "SCT", code = "10200004", meaning = "Liver" }}

[[labels]]
value = 2
name = "Liver lesion"
category = {{ scheme = "SCT", code = "49755003", meaning = "Morphologically Altered Structure" }}
type = {{ scheme = "SCT", code = "52988006", meaning = "Lesion" }}
region = {{ scheme = "SCT", code = "10200004", meaning = "Liver" }}

[files]
"model.onnx" = "{sha256(out / 'model.onnx')}"
"MODEL_CARD.md" = "{sha256(out / 'MODEL_CARD.md')}"

[training]
script = "scripts/train_demo_model.py"
seed = {info['seed']}
command = "{info['command']}"
phantoms_train = {info['n_train']}
train_seed_start = {info['train_seed0']}
slices_per_phantom = {info['train_slices']}
phantoms_heldout = {info['n_heldout']}
heldout_seed_start = {HELDOUT_SEED0}
steps = {info['steps']}
batch = {info['batch']}
crop = {info['crop']}
minutes = {info['train_minutes']:.1f}
heldout_liver_dice = {ho['all']['liver']:.4f}
heldout_lesion_dice = {ho['all']['lesion']:.4f}
real_ct_liver_dice = {real_txt}
ort_cpu_300_slices_176px_s = {info['onnx']['ort_300_slices_176_s']:.2f}
''' + (f'init_sha256 = "{info["init_sha"]}"\n' if info.get("init_sha") else "")
    (out / "manifest.toml").write_text(text)


# ------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------


def _weight_args(argv: list[str]) -> list[str]:
    """The command line minus options that cannot change the weights (where to write, the phantom cache)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--out", "--cache", "--workers"):
            skip = True
            continue
        if a.startswith(("--out=", "--cache=", "--workers=")):
            continue
        out.append(a)
    return out


def load_or_render(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Training phantoms are seeds S..S+N-1 (S = --train-seed0); held-out ones alternate full and targeted views."""
    import pickle

    key = (args.train_phantoms, args.train_slices, args.heldout_phantoms, args.heldout_slices, args.train_seed0)
    if args.cache is not None and args.cache.exists():
        with args.cache.open("rb") as f:
            cached = pickle.load(f)
        if cached.get("key") == key:
            log(f"phantoms from cache {args.cache}")
            return cached["train"], cached["heldout"]
        log(f"cache {args.cache} was rendered with other settings: rendering again")
    seeds = list(range(args.train_seed0, args.train_seed0 + args.train_phantoms))
    train = render_cases(seeds, args.train_slices, args.workers)
    ho_seeds = [HELDOUT_SEED0 + i for i in range(args.heldout_phantoms)]
    ho_kinds = ["full" if i % 2 == 0 else "targeted" for i in range(args.heldout_phantoms)]
    heldout = render_cases(ho_seeds, args.heldout_slices, args.workers, ho_kinds, keep_source=True)
    if args.cache is not None:
        with args.cache.open("wb") as f:
            pickle.dump({"key": key, "train": train, "heldout": heldout}, f, protocol=pickle.HIGHEST_PROTOCOL)
    return train, heldout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="package folder (default models/liver-ct-demo; with --quick a new temporary folder)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and crop sampling (default 0)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 5000; 30 with --quick)")
    p.add_argument("--batch", type=int, default=16, help="crops per step (default 16)")
    p.add_argument("--crop", type=int, default=128, help="crop size in model-grid pixels (default 128)")
    p.add_argument("--width", type=int, default=12,
                   help="channels of the first U-Net level, doubling per level (default 12)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--init", type=Path, default=None,
                   help="continue training from this exported model.onnx (its width wins over --width; the "
                        "network trains on with BatchNorm folded, so use a lower --lr, e.g. 1e-3)")
    p.add_argument("--train-phantoms", type=int, default=None, help="training phantoms (default 480; 4 with --quick)")
    p.add_argument("--train-seed0", type=int, default=0,
                   help="first training phantom seed (default 0); a continuation run given new seeds sees new patients")
    p.add_argument("--train-slices", type=int, default=None, help="slices per training phantom (default 16)")
    p.add_argument("--heldout-phantoms", type=int, default=None, help="held-out phantoms (default 24; 2 with --quick)")
    p.add_argument("--heldout-slices", type=int, default=None, help="slices per held-out phantom (default 32)")
    # Defaults reproduce the shipped model. Without lesion-centred crops and the heavier lesion loss the
    # lesion class is starved (held-out lesion Dice 0.33 with 0 / 2 / 0.5): see the issue notes.
    p.add_argument("--lesion-crops", type=float, default=0.5,
                   help="fraction of crops centred on a lesion pixel (default 0.5)")
    p.add_argument("--lesion-weight", type=float, default=5.0,
                   help="cross-entropy weight of the lesion class (default 5)")
    p.add_argument("--lesion-dice", type=float, default=1.0,
                   help="weight of the lesion soft-Dice term in the loss (default 1)")
    p.add_argument("--shading", type=float, default=0.0,
                   help="peak HU of smooth shading added to half the crops (default 0: none)")
    p.add_argument("--cache", type=Path, default=None,
                   help="pickle of the rendered phantoms: read if present, else written (re-runs skip rendering)")
    p.add_argument("--workers", type=int, default=2, help="processes rendering phantoms (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="training device (default cpu; reproducibility is defined on CPU)")
    p.add_argument("--quick", action="store_true", help="tiny end-to-end run (< 2 min) for CI")
    p.add_argument("--no-real", action="store_true", help="skip the real-CT evaluation")
    a = p.parse_args(argv)
    q = a.quick
    a.steps = a.steps if a.steps is not None else (30 if q else 5000)
    a.train_phantoms = a.train_phantoms if a.train_phantoms is not None else (4 if q else 480)
    a.train_slices = a.train_slices if a.train_slices is not None else (8 if q else 16)
    a.heldout_phantoms = a.heldout_phantoms if a.heldout_phantoms is not None else (2 if q else 24)
    a.heldout_slices = a.heldout_slices if a.heldout_slices is not None else (8 if q else 32)
    if a.train_seed0 < 0 or a.train_seed0 + a.train_phantoms > HELDOUT_SEED0:
        p.error(f"training seeds must lie in 0..{HELDOUT_SEED0 - 1}: seeds from {HELDOUT_SEED0} are held out")
    if q:
        a.crop = min(a.crop, 96)
        a.batch = min(a.batch, 8)
    if a.out is None:
        a.out = Path(tempfile.mkdtemp(prefix="liver-ct-demo-quick-")) if q else ROOT / "models" / NAME
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    dev = args.device
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log(f"output: {out}")
    t_start = time.time()

    # Data. Training phantoms are seeds S..S+N-1; held-out ones alternate full and targeted views.
    train, heldout = load_or_render(args)
    log(f"data ready in {time.time() - t_start:.0f}s: {sum(c['prep'].shape[0] for c in train)} training slices")

    # Model and optimiser.
    if args.init is not None:
        # Continue from an exported model: the folded network (no BatchNorm) trains on from those weights.
        model = model_from_onnx(args.init)
        init_sha = sha256(args.init)
        widths = tuple(model.enc[0][0].out_channels * 2**i for i in range(len(WIDTHS)))
        log(f"continuing from {args.init} (sha256 {init_sha[:12]}), widths {widths}")
    else:
        init_sha = None
        widths = tuple(args.width * 2**i for i in range(len(WIDTHS)))
        model = build_model(widths)
    model = model.to(dev).to(memory_format=torch.channels_last)  # faster oneDNN convolutions
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    warm = max(1, min(100, args.steps // 10))

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        t = (step - warm) / max(1, args.steps - warm)
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    sampler = CropSampler(train, args.crop, np.random.default_rng([args.seed, 11]), args.lesion_crops, args.shading)
    cls_w = torch.tensor([1.0, 1.0, args.lesion_weight], device=dev)
    model.train()
    t0 = time.time()
    ema = None
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        xb, yb = sampler.batch(args.batch)
        x = torch.from_numpy(xb).to(dev).contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(yb).to(dev)
        logits = model(x)
        ce = F.cross_entropy(logits, y, weight=cls_w)
        prob = logits.softmax(1)
        # Soft Dice for the whole liver (1+2) and the lesion (2), over the batch.
        p_liv = prob[:, 1] + prob[:, 2]
        t_liv = (y > 0).float()
        p_les, t_les = prob[:, 2], (y == 2).float()
        d_liv = 1 - (2 * (p_liv * t_liv).sum() + 1) / (p_liv.sum() + t_liv.sum() + 1)
        d_les = 1 - (2 * (p_les * t_les).sum() + 1) / (p_les.sum() + t_les.sum() + 1)
        loss = ce + d_liv + args.lesion_dice * d_les
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lv = float(loss.detach())
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if (step + 1) % 20 == 0 or step + 1 == args.steps:
            dt = time.time() - t0
            rate = (step + 1) / dt
            log(f"step {step + 1}/{args.steps}  loss {ema:.4f} (ce {ce.item():.3f} dice liver {d_liv.item():.3f} "
                f"lesion {d_les.item():.3f})  lr {lr_at(step):.2e}  {rate:.2f} steps/s  ETA {(args.steps - step - 1) / rate / 60:.1f} min")
    train_minutes = (time.time() - t0) / 60
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()

    # Export, then evaluate the exported model exactly as serving runs it.
    onnx_path = out / "model.onnx"
    onx = export_onnx(model, onnx_path)
    log(f"ONNX: {onx['size_bytes'] / 1e6:.2f} MB, max abs diff vs PyTorch {onx['max_abs_diff']:.2e}, "
        f"300 slices at 176x176 in {onx['ort_300_slices_176_s']:.1f}s")
    run = onnx_runner(onnx_path, threads=args.threads)
    ho = evaluate_phantoms(run, heldout)
    for group, g in ho.items():
        log(f"held-out {group:9s} ({g['cases']} cases): liver Dice {_fmt(g['liver'])}  lesion Dice {_fmt(g['lesion'])}")
    real = None if args.no_real else evaluate_real(run)
    if real:
        for r in real:
            log(f"real CT {r['view']}: liver Dice {r['liver_dice']:.4f} (label 1 only {r['liver_label1_dice']:.4f}), "
                f"lesion {r['lesion_ml']:.1f} mL marked")
    cmd = "python scripts/train_demo_model.py " + " ".join(_weight_args(argv if argv is not None else sys.argv[1:]))
    info = dict(heldout=ho, real=real, onnx=onx, params=n_params, widths=widths, n_train=args.train_phantoms,
                train_seed0=args.train_seed0,
                train_slices=args.train_slices, n_heldout=args.heldout_phantoms, heldout_slices=args.heldout_slices,
                crop=args.crop, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                lesion_crops=args.lesion_crops, lesion_weight=args.lesion_weight, lesion_dice=args.lesion_dice,
                shading=args.shading, init_sha=init_sha,
                train_minutes=train_minutes, command=cmd.strip().replace('"', "'"))
    write_card(out, info)
    write_manifest(out, info)
    log(f"done in {(time.time() - t_start) / 60:.1f} min: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
