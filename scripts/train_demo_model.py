#!/usr/bin/env python3
"""Train, evaluate, export and package the demonstration liver CT model (``models/liver-ct-demo``).

Why this shape: the appliance needs a model it may ship without patient data, so the model learns only
from synthetic phantoms (``appliance_dev.synthetic``), rendered on the same variety of grids the clinics send
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

This script is the command line; the parts it runs (data, network, training loop, evaluation, export and
packaging) are the modules of ``appliance_dev.train``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from appliance_dev.harness import log
from appliance_dev.train.config import HELDOUT_SEED0, NAME
from appliance_dev.train.data import load_or_render
from appliance_dev.train.evaluate import evaluate_phantoms, evaluate_real, onnx_runner
from appliance_dev.train.export import export_onnx
from appliance_dev.train.loop import train_model
from appliance_dev.train.package import fmt_metric, write_card, write_manifest

ROOT = Path(__file__).resolve().parents[1]


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
    p.add_argument("--variety", type=int, choices=[1, 2, 3, 4], default=1,
                   help="phantom generator: 1 portal/arterial (default), 2 adds delayed and unenhanced phases, "
                        "fatty livers and lesion-free patients, 3 adds cirrhotic livers and ascites, 4 adds to 2 "
                        "periportal fat or oedema cuffs (training and held-out phantoms alike)")
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
    p.add_argument("--edge-shading", type=float, default=0.0,
                   help="peak HU of a one-sided band along the liver edge on half the crops (default 0: none)")
    p.add_argument("--clefts", type=float, default=0.0,
                   help="fraction of crops with a fat/fluid cleft cut into the liver edge (default 0: none)")
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

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log(f"output: {out}")
    t_start = time.time()

    # Data. Training phantoms are seeds S..S+N-1; held-out ones alternate full and targeted views.
    train, heldout = load_or_render(args)
    log(f"data ready in {time.time() - t_start:.0f}s: {sum(c['prep'].shape[0] for c in train)} training slices")

    trained = train_model(args, train, args.device)

    # Export, then evaluate the exported model exactly as serving runs it.
    onnx_path = out / "model.onnx"
    onx = export_onnx(trained.model, onnx_path)
    log(f"ONNX: {onx['size_bytes'] / 1e6:.2f} MB, max abs diff vs PyTorch {onx['max_abs_diff']:.2e}, "
        f"300 slices at 176x176 in {onx['ort_300_slices_176_s']:.1f}s")
    run = onnx_runner(onnx_path, threads=args.threads)
    ho = evaluate_phantoms(run, heldout)
    for group, g in ho.items():
        log(f"held-out {group:9s} ({g['cases']} cases): liver Dice {fmt_metric(g['liver'])}  "
            f"lesion Dice {fmt_metric(g['lesion'])}")
    real = None if args.no_real else evaluate_real(run)
    if real:
        for r in real:
            log(f"real CT {r['view']}: liver Dice {r['liver_dice']:.4f} (label 1 only {r['liver_label1_dice']:.4f}), "
                f"lesion {r['lesion_ml']:.1f} mL marked")
    cmd = "python scripts/train_demo_model.py " + " ".join(_weight_args(argv if argv is not None else sys.argv[1:]))
    info = dict(heldout=ho, real=real, onnx=onx, params=trained.n_params, widths=trained.widths,
                n_train=args.train_phantoms, train_seed0=args.train_seed0,
                train_slices=args.train_slices, n_heldout=args.heldout_phantoms, heldout_slices=args.heldout_slices,
                crop=args.crop, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                lesion_crops=args.lesion_crops, lesion_weight=args.lesion_weight, lesion_dice=args.lesion_dice,
                shading=args.shading, edge_shading=args.edge_shading, clefts=args.clefts, variety=args.variety,
                init_sha=trained.init_sha,
                train_minutes=trained.minutes, command=cmd.strip().replace('"', "'"))
    write_card(out, info)
    write_manifest(out, info)
    log(f"done in {(time.time() - t_start) / 60:.1f} min: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
