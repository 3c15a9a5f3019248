"""Training and held-out data: synthetic phantoms (``appliance_dev.synthetic``) rendered onto the model grid
through the serving pre-processing, so training sees exactly what serving feeds the network, and the
random crops the network trains on.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import numpy as np

from appliance.infer.preprocess import context_indices, labels_to_model_grid, model_grid, to_model_grid
from appliance_dev.harness import log
from appliance_dev.synthetic import make_phantom, sample_spec
from appliance_dev.train.config import HELDOUT_SEED0, N_CLASSES, SPEC


def _render_case(args: tuple[int, int, str | None, int]) -> dict:
    """One phantom on the model grid (what training sees): (seed, slices, fov kind, generator variety)."""
    seed, n_slices, fov_kind, variety = args
    spec = sample_spec(seed, n_slices=n_slices, fov_kind=fov_kind, variety=variety)
    hu, lab, meta = make_phantom(spec)
    grid = model_grid(hu.shape[1], hu.shape[2], meta["pixel_spacing"], SPEC)
    prep = to_model_grid(hu, grid, SPEC).astype(np.float16)
    mlab = labels_to_model_grid(lab, grid, N_CLASSES)
    return dict(seed=seed, prep=prep, lab=mlab, fov_kind=spec.fov_kind, phase=spec.phase, grid=grid,
                n_lesions=meta["n_lesions"])


def render_cases(seeds: list[int], n_slices: int, workers: int, fov_kinds: list[str | None] | None = None,
                 keep_source: bool = False, variety: int = 1) -> list[dict]:
    kinds = fov_kinds or [None] * len(seeds)
    jobs = [(s, n_slices, k, variety) for s, k in zip(seeds, kinds)]
    out: list[dict] = []
    t0 = time.time()
    fn = _render_heldout if keep_source else _render_case
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            for i, case in enumerate(pool.imap(fn, jobs)):
                out.append(case)
                eta_progress("phantoms", i + 1, len(jobs), t0)
    else:
        for i, job in enumerate(jobs):
            out.append(fn(job))
            eta_progress("phantoms", i + 1, len(jobs), t0)
    return out


def _render_heldout(args: tuple[int, int, str | None, int]) -> dict:
    seed, n_slices, fov_kind, variety = args
    spec = sample_spec(seed, n_slices=n_slices, fov_kind=fov_kind, variety=variety)
    hu, lab, meta = make_phantom(spec)
    return dict(seed=seed, hu=hu, lab=lab, spacing=meta["pixel_spacing"], fov_kind=spec.fov_kind, phase=spec.phase)


def eta_progress(what: str, i: int, n: int, t0: float) -> None:
    if i == n or i % max(1, n // 20) == 0:
        dt = time.time() - t0
        log(f"{what}: {i}/{n}  {dt:.0f}s elapsed, ETA {dt / i * (n - i):.0f}s")


class CropSampler:
    """Random training crops of model-grid slices with their slice context, mostly through the liver."""

    def __init__(self, cases: list[dict], crop: int, rng: np.random.Generator, lesion_frac: float = 0.0,
                 shading_hu: float = 0.0, edge_hu: float = 0.0, clefts: float = 0.0) -> None:
        self.cases = cases
        self.crop = crop
        self.rng = rng
        self.lesion_frac = lesion_frac
        self.shading_hu = shading_hu
        self.edge_hu = edge_hu
        self.clefts = clefts
        self.index = [(ci, k) for ci, c in enumerate(cases) for k in range(c["prep"].shape[0])]
        self.liver_index = [(ci, k) for ci, c in enumerate(cases) for k in range(c["prep"].shape[0]) if (c["lab"][k] > 0).any()]
        # Lesion pixels are ~1% of liver crops; without crops centred on them the lesion class is starved.
        self.lesion_index = [(ci, k) for ci, c in enumerate(cases) for k in range(c["prep"].shape[0]) if (c["lab"][k] == 2).any()]

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        ch, cs = SPEC.channels, self.crop
        x = np.full((n, ch, cs, cs), -1.0, np.float32)
        y = np.zeros((n, cs, cs), np.int64)
        # The liver (labels 1+2) of every context slice, for the edge augmentations.
        ctx_liver = np.zeros((n, ch, cs, cs), bool)
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
            ctx_liver[b, :, sr0 - r0:sr1 - r0, sc0 - c0:sc1 - c0] = lab[idx, sr0:sr1, sc0:sc1] > 0
        # Mild intensity jitter (a few HU of calibration offset / gain), in window units.
        shift = self.rng.uniform(-0.03, 0.03, size=(n, 1, 1, 1)).astype(np.float32)
        gain = self.rng.uniform(0.95, 1.05, size=(n, 1, 1, 1)).astype(np.float32)
        inside = x > -1.0
        x = np.where(inside, np.clip(x * gain + shift, -1.0, 1.0), x)
        if self.shading_hu > 0:
            x = self._shade(x)
        if self.edge_hu > 0:
            x = self._edge_shade(x, ctx_liver)
        if self.clefts > 0:
            x, y = self._clefts(x, y, ctx_liver)
        return x, y

    def _edge_shade(self, x: np.ndarray, liver: np.ndarray) -> np.ndarray:
        """A band along the liver's edge made darker (mostly) or brighter, strongest on one side, on half
        the crops: what beam hardening next to ribs and the spine, and partial volume with lung and fat,
        do to the rim of a real liver. Labels stay: the band is liver. The shipped model called such
        crescents on the shared real CT lesions of 10-55 mm; the phantoms had no such rim.

        The band fades with the distance inside the liver (e-folding 2-8 model pixels, 4-16 mm) and with
        the angle from a random direction, so strength, width and side vary as they do between scanners
        and patients. Smooth and edgeless across the liver, unlike a lesion."""
        from scipy.ndimage import distance_transform_edt

        n, ch, cs, _ = x.shape
        unit = (SPEC.window[1] - SPEC.window[0]) / 2.0  # HU per window unit
        yy, xx = np.mgrid[0:cs, 0:cs].astype(np.float32)
        for b in range(n):
            if self.rng.random() >= 0.5 or not liver[b].any():
                continue
            amp = float(self.rng.uniform(0.25, 1.0)) * self.edge_hu / unit
            sign = -1.0 if self.rng.random() < 0.8 else 1.0
            width = float(self.rng.uniform(2.0, 8.0))
            theta = float(self.rng.uniform(0, 2 * np.pi))
            sharp = float(self.rng.uniform(0.5, 3.0))  # how one-sided the band is
            ref = liver[b, ch // 2] if liver[b, ch // 2].any() else liver[b].any(axis=0)
            ly, lx = np.nonzero(ref)
            cy, cx = float(ly.mean()), float(lx.mean())
            ang = np.cos(np.arctan2(yy - cy, xx - cx) - theta)
            side = np.clip(ang, 0.0, 1.0) ** sharp
            for c in range(ch):
                m = liver[b, c]
                if not m.any():
                    continue
                d = distance_transform_edt(m)
                field = sign * amp * np.exp(-(d - 1.0).clip(0) / width) * side
                x[b, c] = np.where(m, np.clip(x[b, c] + field, -1.0, 1.0), x[b, c])
        return x

    def _clefts(self, x: np.ndarray, y: np.ndarray, liver: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fat or fluid clefts cut into the liver from its edge (fissures, the hilum, the gallbladder fossa,
        a fluid rim), on a fraction ``clefts`` of the crops: thin elongated wedges of -100..20 HU reaching
        8-40 mm inwards, labelled background, as a reference mask leaves them out of the liver. Lesions
        are round and surrounded by liver; these are long, thin and open to the outside. The shipped
        model called such structures at the real CT's hilum lesions."""
        from scipy.ndimage import binary_erosion, gaussian_filter

        n, ch, cs, _ = x.shape
        lo, hi = SPEC.window
        yy, xx = np.mgrid[0:cs, 0:cs].astype(np.float32)
        for b in range(n):
            mid = liver[b, ch // 2]
            if self.rng.random() >= self.clefts or mid.sum() < 200:
                continue
            rim = mid & ~binary_erosion(mid)
            ry, rx = np.nonzero(rim)
            j = int(self.rng.integers(len(ry)))
            py, px = float(ry[j]), float(rx[j])
            ly, lx = np.nonzero(mid)
            vy, vx = float(ly.mean()) - py, float(lx.mean()) - px  # inwards, towards the liver's centre
            norm = max(np.hypot(vy, vx), 1e-3)
            vy, vx = vy / norm, vx / norm
            length = float(self.rng.uniform(4.0, 20.0))  # model pixels (2 mm)
            half_w = float(self.rng.uniform(0.6, 2.5))
            hu = float(self.rng.uniform(-100.0, 20.0))
            # Distance along and across the cleft's axis from its mouth on the rim, widest at the mouth.
            along = (yy - py) * vy + (xx - px) * vx
            across = np.abs(-(yy - py) * vx + (xx - px) * vy)
            t = along / length
            shape = (t > -0.3) & (t < 1.0) & (across < half_w * (1.0 - 0.7 * t.clip(0, 1)) + 0.5)
            value = (hu - lo) / (hi - lo) * 2.0 - 1.0
            for c in range(ch):
                cut = shape & liver[b, c]
                if not cut.any():
                    continue
                soft = gaussian_filter(cut.astype(np.float32), 0.6) * liver[b, c]  # blended within the liver only
                x[b, c] = x[b, c] * (1.0 - soft) + value * soft
            cut = shape & mid
            y[b][cut] = 0
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


def load_or_render(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Training phantoms are seeds S..S+N-1 (S = --train-seed0); held-out ones alternate full and targeted views."""
    import pickle

    variety = int(getattr(args, "variety", 1))
    key = (args.train_phantoms, args.train_slices, args.heldout_phantoms, args.heldout_slices, args.train_seed0)
    if variety != 1:  # variety 1 caches keep their key
        key = (*key, variety)
    if args.cache is not None and args.cache.exists():
        with args.cache.open("rb") as f:
            cached = pickle.load(f)
        if cached.get("key") == key:
            log(f"phantoms from cache {args.cache}")
            return cached["train"], cached["heldout"]
        log(f"cache {args.cache} was rendered with other settings: rendering again")
    seeds = list(range(args.train_seed0, args.train_seed0 + args.train_phantoms))
    train = render_cases(seeds, args.train_slices, args.workers, variety=variety)
    ho_seeds = [HELDOUT_SEED0 + i for i in range(args.heldout_phantoms)]
    ho_kinds = ["full" if i % 2 == 0 else "targeted" for i in range(args.heldout_phantoms)]
    heldout = render_cases(ho_seeds, args.heldout_slices, args.workers, ho_kinds, keep_source=True, variety=variety)
    if args.cache is not None:
        with args.cache.open("wb") as f:
            pickle.dump({"key": key, "train": train, "heldout": heldout}, f, protocol=pickle.HIGHEST_PROTOCOL)
    return train, heldout

