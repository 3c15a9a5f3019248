"""The training loop: AdamW with warm-up and a cosine learning rate, cross-entropy (lesion class weighted)
plus soft Dice of the liver and of the lesions, on random crops (``appliance_dev.train.data.CropSampler``).

Deterministic on CPU for a given seed once the caller has seeded torch and numpy and asked for
deterministic algorithms (the script does, before rendering the phantoms).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance_dev.harness import log
from appliance_dev.train.config import WIDTHS
from appliance_dev.train.data import CropSampler
from appliance_dev.train.export import sha256
from appliance_dev.train.model import build_model, model_from_onnx


@dataclass(frozen=True)
class Trained:
    """The trained network (on the CPU, eval mode) and what the card and manifest say about it."""

    model: Any
    widths: tuple[int, ...]
    n_params: int
    #: SHA-256 of the ``--init`` model.onnx training continued from; None for a fresh network.
    init_sha: str | None
    minutes: float


def train_model(args: argparse.Namespace, train: list[dict], dev: str) -> Trained:
    """Train on the rendered ``train`` cases with the script's options (``--init``, ``--width``, ``--lr``,
    ``--steps``, ``--batch``, ``--crop``, ``--seed``, ``--lesion-*``, ``--shading``, ``--edge-shading``, ``--clefts``) on device ``dev``."""
    import torch
    import torch.nn.functional as F

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

    sampler = CropSampler(train, args.crop, np.random.default_rng([args.seed, 11]), args.lesion_crops, args.shading,
                           getattr(args, "edge_shading", 0.0), getattr(args, "clefts", 0.0))
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
    return Trained(model=model, widths=widths, n_params=n_params, init_sha=init_sha, minutes=train_minutes)
