"""Synthetic contrast-enhanced abdominal CT phantoms with liver and liver-lesion labels.

Why: the demonstration model (``models/liver-ct-demo``) must be trained without patient data, and tests and
benchmarks need realistic-looking CT series of any size, spacing and field of view on demand. A phantom is
a random patient (body habitus, liver shape and size, organ positions, lesions, contrast phase) drawn from
one seed, rendered on any acquisition grid (field of view, pixel spacing, slice thickness and spacing,
noise level). The same seed gives the same patient on every grid, and the same voxels every time.

Anatomy is built from implicit surfaces (approximate signed distances in mm), so that:

- every organ has a smooth, randomly deformed shape and partial-volume edges for free (soft occupancy
  from the signed distance, with slice-thickness averaging of sub-slices and a Gaussian PSF afterwards);
- organs can be kept apart by combining distances (the liver hugs the ribcage and diaphragm, is indented
  by the kidney, gallbladder and IVC, and ends where the lung begins).

Coordinates follow DICOM patient axes as seen in an axial image: x increases to the patient's left
(image columns), y increases posteriorly (image rows), z increases superiorly. The liver dome is at
z = 0 and the liver extends down to about z = -height. Slices are returned in ascending z order
(inferior first), as serving sorts them.

Labels: 0 background, 1 liver (including the portal and hepatic vein branches inside it), 2 liver lesion.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
from scipy.ndimage import gaussian_filter

#: Contrast phases the generator knows. Portal venous: liver 90-140 HU, bright portal/hepatic veins.
#: Arterial: liver 60-85 HU, very bright aorta, hypodense hepatic veins, corticomedullary kidneys.
#: Delayed (3-5 min): liver 80-110 HU, vessels only a little brighter, arterially enhancing tumours washed
#: out (darker than the liver, with a brighter capsule). Unenhanced: liver 50-70 HU, vessels and blood
#: *darker* than the liver, lesions of low contrast. The last two come with ``variety = 2`` and up.
PHASES = ("portal", "arterial", "delayed", "unenhanced")

Array = np.ndarray
Sdf = Callable[[Array, Array, Array], Array]


# ----------------------------------------------------------------------------------------------------------
# Shape primitives: approximate signed distances in mm (negative inside). They broadcast over any shapes.
# ----------------------------------------------------------------------------------------------------------


def _ellipsoid(x: Array, y: Array, z: Array, c: tuple[float, float, float], a: tuple[float, float, float],
               rot: float = 0.0) -> Array:
    """Ellipsoid centred at ``c`` with semi-axes ``a``, rotated by ``rot`` radians about z."""
    dx, dy, dz = x - c[0], y - c[1], z - c[2]
    if rot:
        cr, sr = math.cos(rot), math.sin(rot)
        dx, dy = dx * cr + dy * sr, -dx * sr + dy * cr
    k = np.sqrt((dx / a[0]) ** 2 + (dy / a[1]) ** 2 + (dz / a[2]) ** 2)
    return (k - 1.0) * min(a)


def _capsule(x: Array, y: Array, z: Array, p: Array, q: Array, r0: float, r1: float) -> Array:
    """Tube from ``p`` (radius ``r0``) to ``q`` (radius ``r1``): a vessel segment."""
    d = q - p
    dd = float(d @ d) + 1e-9
    t = np.clip(((x - p[0]) * d[0] + (y - p[1]) * d[1] + (z - p[2]) * d[2]) / dd, 0.0, 1.0)
    dist = np.sqrt((x - p[0] - t * d[0]) ** 2 + (y - p[1] - t * d[1]) ** 2 + (z - p[2] - t * d[2]) ** 2)
    return dist - (r0 + (r1 - r0) * t)


def _smin(a: Array, b: Array, k: float) -> Array:
    """Smooth union (polynomial smooth minimum): lobes merge without a crease."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


@dataclass
class _Field:
    """A smooth random scalar field (sum of random plane waves): elastic deformation of shapes, texture."""

    k: Array  # (n, 3) wave vectors, rad/mm
    phase: Array  # (n,)
    amp: Array  # (n,)

    @staticmethod
    def random(rng: np.random.Generator, n: int, wavelength: tuple[float, float], amplitude: float) -> "_Field":
        lam = rng.uniform(*wavelength, size=n)
        v = rng.normal(size=(n, 3))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        k = v * (2 * np.pi / lam)[:, None]
        amp = rng.uniform(0.5, 1.0, size=n)
        amp *= amplitude / math.sqrt(float((amp**2).sum()) / 2.0)
        return _Field(k, rng.uniform(0, 2 * np.pi, size=n), amp)

    def __call__(self, x: Array, y: Array, z: Array) -> Array:
        out = 0.0
        for (kx, ky, kz), ph, a in zip(self.k, self.phase, self.amp):
            out = out + np.float32(a) * np.sin(np.float32(kx) * x + np.float32(ky) * y + np.float32(kz) * z + np.float32(ph))
        return out


# ----------------------------------------------------------------------------------------------------------
# Acquisition
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseSpec:
    """How a phantom patient is scanned: grid, slab position, contrast phase and dose."""

    seed: int
    fov_mm: float
    rows: int = 512
    cols: int = 512
    slice_thickness: float = 2.5
    slice_spacing: float = 2.5
    n_slices: int = 40
    phase: str = "portal"
    noise_hu: float = 15.0
    #: "full": the whole body cross-section is in the field of view; "targeted": a liver reconstruction.
    fov_kind: str = "full"
    #: z (mm, liver dome at 0) of the slab's centre; None picks the middle of the liver.
    z_center: float | None = None
    #: Centre of the field of view in patient x, y (mm); None centres on the body (full) or liver (targeted).
    center_xy: tuple[float, float] | None = None
    #: Full width at half maximum-ish of the in-plane point spread function, mm (reconstruction kernel).
    psf_mm: float = 0.8
    #: Correlation length of the noise, mm (smooth kernels give blotchier noise).
    noise_corr_mm: float = 0.7
    #: Pixels outside the reconstruction circle set to -1024 (common on full field of view scanners).
    circle_mask: bool = False
    #: Steatosis: HU taken off the liver parenchyma (vessels and lesions keep theirs against it).
    fatty_hu: float = 0.0
    #: A patient drawn with no liver lesion at all.
    lesion_free: bool = False
    #: Cirrhosis, 0 (none) to 1 (severe): a shrunken right lobe, an enlarged caudate and left lobe, a nodular
    #: surface, regenerative-nodule texture in the parenchyma and a larger spleen (variety 3).
    cirrhosis: float = 0.0
    #: Ascites: a band of fluid up to this thick (mm) around the liver, inside the peritoneal cavity.
    ascites_mm: float = 0.0
    #: Periportal cuff: fat or fluid (oedema) up to this thick (mm) sheathing the portal vein's trunk and
    #: first branches inside the liver, patchy so that on a slice it breaks into dark pockets beside the
    #: vessel; labelled background, as the training clefts' fat is (labelled liver, it taught a model to call
    #: dark tissue beside the liver liver: run F in the model card) (variety 4). 0: none.
    periportal_mm: float = 0.0
    #: The cuff's HU: about -100..-30 for fat (the fissures and the hilum), 0..25 for oedema.
    periportal_hu: float = 0.0
    #: Which generator drew the spec: 1 (portal/arterial, the original sets, unchanged), 2 (adds delayed
    #: and unenhanced phases, fatty livers and more lesion-free patients; issue 21) or 3 (2 and cirrhotic
    #: livers, some with ascites) or 4 (2 and periportal fat or oedema cuffs; no cirrhosis).
    variety: int = 1

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        return (self.fov_mm / self.rows, self.fov_mm / self.cols) if self.rows == self.cols else (
            self.fov_mm / self.rows, self.fov_mm / self.rows)


def sample_spec(seed: int, *, n_slices: int | None = None, fov_kind: str | None = None,
                phase: str | None = None, variety: int = 1) -> CaseSpec:
    """A random acquisition covering the variety the model meets in clinics.

    Full fields of view (350-500 mm) and targeted liver reconstructions (180-260 mm), 512 matrix
    (0.35-1.0 mm pixels), thin to thick slices (0.625-5 mm), portal or arterial phase, normal and
    low-dose noise, different kernels; the slab lies anywhere from the lung bases to below the liver.
    ``variety = 2`` also draws delayed and unenhanced phases, fatty livers and lesion-free patients, from a
    random stream of their own: everything else about the spec is what variety 1 draws for the seed.
    ``variety = 3`` draws what 2 draws and, from a third stream, cirrhosis (30% of patients) and ascites (half
    of those). ``variety = 4`` draws what 2 draws and, from a fourth stream, a periportal fat (half) or
    oedema cuff in 70% of patients: what the model marked at the shared real CT's hilum, where fat beside
    the left portal vein shows as a round dark pocket on a slice. It draws no cirrhosis.
    """
    rng = np.random.default_rng([int(seed), 7])
    kind = fov_kind or ("targeted" if rng.random() < 0.35 else "full")
    fov = float(rng.uniform(180, 260) if kind == "targeted" else rng.uniform(350, 500))
    thick = float(rng.choice([0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0], p=[0.08, 0.12, 0.1, 0.15, 0.2, 0.15, 0.2]))
    spacing = thick if rng.random() < 0.6 else float(max(0.7, thick * rng.uniform(0.5, 1.0)))
    spacing = round(spacing, 3)
    n = int(n_slices if n_slices is not None else 40)
    ph = phase or ("portal" if rng.random() < 0.7 else "arterial")
    noise = float(rng.uniform(10, 25) if rng.random() < 0.7 else rng.uniform(25, 45))
    # Slab centre: mostly through the liver, sometimes at its top (lung bases) or bottom (kidneys, bowel).
    z_center = float(rng.uniform(-200, 30))
    extra: dict[str, Any] = {}
    if variety >= 2:
        r2 = np.random.default_rng([int(seed), 8])
        drawn = str(r2.choice(PHASES, p=[0.4, 0.3, 0.2, 0.1]))
        extra = dict(fatty_hu=float(r2.uniform(15, 50)) if r2.random() < 0.25 else 0.0,
                     lesion_free=bool(r2.random() < 0.25), variety=int(variety))
        ph = phase or drawn
    if variety == 4:
        r4 = np.random.default_rng([int(seed), 11])
        fat = bool(r4.random() < 0.5)
        extra["periportal_hu"] = float(r4.uniform(-110, -30) if fat else r4.uniform(0, 25))
        extra["periportal_mm"] = float(r4.uniform(1.5, 6.0)) if r4.random() < 0.7 else 0.0
    if variety == 3:
        r3 = np.random.default_rng([int(seed), 9])
        cirrhosis = float(r3.uniform(0.4, 1.0)) if r3.random() < 0.3 else 0.0
        extra["cirrhosis"] = cirrhosis
        extra["ascites_mm"] = float(r3.uniform(3, 20)) if cirrhosis and r3.random() < 0.5 else 0.0
    return CaseSpec(
        seed=int(seed), fov_mm=fov, rows=512, cols=512, slice_thickness=thick, slice_spacing=spacing,
        n_slices=n, phase=ph, noise_hu=noise, fov_kind=kind, z_center=z_center, center_xy=None,
        psf_mm=float(rng.uniform(0.5, 1.1)), noise_corr_mm=float(rng.uniform(0.5, 1.2)),
        circle_mask=bool(kind == "full" and rng.random() < 0.5), **extra,
    )


# ----------------------------------------------------------------------------------------------------------
# Patient
# ----------------------------------------------------------------------------------------------------------


class _Patient:
    """One random patient: body, organs, vessels, bones and lesions as implicit surfaces."""

    def __init__(self, seed: int, phase: str, fatty_hu: float = 0.0, lesion_free: bool = False,
                 cirrhosis: float = 0.0, ascites_mm: float = 0.0, periportal_mm: float = 0.0,
                 periportal_hu: float = 0.0):
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, not {phase!r}")
        rng = np.random.default_rng([int(seed), 0])
        self.rng = rng
        self.phase = phase
        u = rng.uniform
        # Body habitus.
        self.A = u(125, 185)  # lateral semi-axis of the body, mm
        self.B = self.A * u(0.62, 0.82)  # antero-posterior semi-axis
        self.post_n = u(2.2, 3.0)  # flatter back (superellipse exponent)
        self.body_harm = [(k, u(0, 0.025), u(0, 2 * np.pi)) for k in (2, 3, 4)]
        self.fat = u(6, 40)  # subcutaneous fat at the flanks, mm
        self.muscle = u(6, 14)
        self.Ai = self.A - self.fat - self.muscle
        self.Bi = self.B - 0.7 * self.fat - self.muscle
        # Liver.
        self.H = u(130, 210)  # cranio-caudal extent of the liver
        self.left_lobe = u(0.45, 1.3)
        self.liver_def = _Field.random(rng, 7, (80, 220), u(4, 10))
        self.liver_fine = _Field.random(rng, 5, (30, 70), u(1, 3))
        self.rl_c = (-self.Ai * u(0.35, 0.5), self.Bi * u(-0.1, 0.1), -self.H * u(0.38, 0.5))
        self.rl_a = (self.Ai * u(0.5, 0.68), self.Bi * u(0.85, 1.05), self.H * u(0.55, 0.65))
        ll = self.left_lobe
        self.ll_c = (self.Ai * u(0.0, 0.25) * ll, -self.Bi * u(0.4, 0.6), -self.H * u(0.18, 0.32))
        self.ll_a = (self.Ai * u(0.35, 0.55) * ll, self.Bi * u(0.28, 0.42), self.H * u(0.18, 0.3))
        self.ll_rot = u(-0.35, 0.15)
        self.cd_a = (20.0, 22.0, 0.25 * self.H)
        self.cirrhosis, self.ascites_mm = float(cirrhosis), float(ascites_mm)
        self.periportal_mm, self.periportal_hu = float(periportal_mm), float(periportal_hu)
        # The cuff's patchiness: its own stream, so the rest of the patient is what the seed draws.
        rp = np.random.default_rng([int(seed), 12])
        self.periportal_wave = tuple(float(v) for v in rp.uniform(0, 2 * np.pi, 3)) + tuple(
            float(v) for v in rp.uniform(0.15, 0.45, 3))
        self.liver_nodules: _Field | None = None
        self.liver_texture: _Field | None = None
        if cirrhosis > 0:
            # A stream of its own, so that everything else about the patient is what the seed draws.
            rc = np.random.default_rng([int(seed), 10])
            c = float(cirrhosis)
            self.rl_a = (self.rl_a[0] * (1 - 0.25 * c), self.rl_a[1] * (1 - 0.15 * c), self.rl_a[2] * (1 - 0.15 * c))
            self.ll_a = (self.ll_a[0] * (1 + 0.15 * c), self.ll_a[1] * (1 + 0.1 * c), self.ll_a[2])
            self.cd_a = (20.0 * (1 + 0.5 * c), 22.0 * (1 + 0.4 * c), 0.25 * self.H * (1 + 0.2 * c))
            self.liver_nodules = _Field.random(rc, 14, (5, 12), 0.5 + 1.5 * c)  # mm: a nodular outline
            self.liver_texture = _Field.random(rc, 14, (5, 12), 3.0 + 7.0 * c)  # HU: regenerative nodules
        # Diaphragm domes (z of the surface = top - r^2 / (2R)); the left dome is lower.
        self.dome_R = u(90, 160)
        self.dome_r = (-self.Ai * u(0.3, 0.5), self.Bi * u(-0.15, 0.15))
        self.dome_l = (self.Ai * u(0.35, 0.55), self.Bi * u(-0.1, 0.2), -u(8, 30))
        # Spine and great vessels.
        self.rv = u(15, 21)
        self.spine = (u(-6, 6), self.B * u(0.3, 0.42))
        xs, yv = self.spine
        self.ra = u(9, 14)
        self.aorta = (xs + u(6, 20), yv - self.rv - self.ra - u(1, 6))
        self.ivc = (xs - u(18, 32), yv - self.rv - u(10, 22))
        self.ivc_a = (u(10, 17), u(7, 12))
        self.vert_h = u(26, 32)
        self.vert_off = u(0, 40)
        self.disc = u(6, 10)
        # Kidneys, spleen, stomach, gallbladder, pancreas, bowel.
        self.kid = []
        for side, zf in ((-1, u(0.75, 0.95)), (1, u(0.62, 0.82))):
            c = (side * (self.rv + u(38, 55)), yv + u(-8, 12), -self.H * zf - u(0, 15))
            a = (u(24, 32), u(20, 27), u(45, 62))
            self.kid.append((c, a, side * u(0.3, 0.7), u(5, 8)))
        self.spleen_c = (self.Ai * u(0.55, 0.72), self.Bi * u(0.2, 0.45), -self.H * u(0.2, 0.4))
        self.spleen_a = (u(28, 45), u(45, 70), u(40, 65))
        if cirrhosis > 0:  # portal hypertension: splenomegaly
            self.spleen_a = tuple(a * (1 + 0.35 * float(cirrhosis)) for a in self.spleen_a)
        self.spleen_rot = u(-0.9, -0.3)
        self.stom_c = (self.Ai * u(0.25, 0.45), -self.Bi * u(0.05, 0.3), -self.H * u(0.15, 0.35))
        self.stom_a = (u(35, 60), u(30, 50), u(45, 75))
        self.stom_level = u(-0.6, 0.3)  # air-fluid level inside the stomach, fraction of its AP axis
        self.stom_content = rng.choice(["fluid", "contrast", "food", "air"], p=[0.4, 0.2, 0.25, 0.15])
        self.has_gb = rng.random() < 0.88
        self.gb_c = (-self.Ai * u(0.05, 0.3), -self.Bi * u(0.15, 0.4), -self.H * u(0.6, 0.8))
        self.gb_a = (u(12, 20), u(12, 20), u(25, 45))
        self.gb_hu = u(-5, 25)
        self.panc_z = -self.H * u(0.55, 0.75)
        self.bowel = []
        for _ in range(int(rng.integers(15, 35))):
            c = (u(-0.8, 0.8) * self.Ai, u(-0.9, 0.3) * self.Bi, -self.H * u(0.4, 1.4))
            a = (u(10, 25), u(10, 25), u(15, 40))
            content = rng.choice(["air", "fluid", "contrast", "mixed"], p=[0.3, 0.35, 0.15, 0.2])
            self.bowel.append((c, a, u(0, np.pi), content, u(-0.5, 0.3)))
        # Hepatic flexure of the colon, next to the liver tip: air next to liver is a classic confounder.
        self.colon = ((-self.Ai * u(0.45, 0.7), -self.Bi * u(0.0, 0.4), -self.H * u(0.85, 1.05)),
                      (u(18, 30), u(18, 28), u(25, 45)), rng.choice(["air", "mixed", "fluid"], p=[0.5, 0.3, 0.2]))
        # Ribs: cross-sections along the wall, oblique so they move with z.
        self.ribs = []
        for side in (-1, 1):
            n = int(rng.integers(6, 9))
            base = np.linspace(-2.55, 2.3, n) + rng.normal(0, 0.06, n)  # angle from anterior to posterior
            for b in base:
                self.ribs.append((side, float(b), u(0.003, 0.008), u(5, 8), u(3, 4.5)))
        self.costal_z = -self.H * u(0.55, 0.8)  # lower costal margin at the flanks
        self.arms = rng.random() < 0.25
        self.arm_y = u(-30, 30)
        self.table_gap = u(0, 25)
        self.table_R = u(350, 900)
        self.table_gap2 = u(20, 70)
        # Lesions are placed after the liver exists (they need its signed distance).
        self.lesions = self._sample_lesions()
        if lesion_free:
            self.lesions = []
        self._hu = self._sample_hu()
        # Steatosis darkens the parenchyma only: vessels keep their HU (in the unenhanced phase they then
        # look brighter than the liver, as in a fatty liver) and lesions are painted against the new value.
        self._hu["liver"] -= float(fatty_hu)
        self._vessels = self._sample_vessels()
        self.lung_vessels = [((u(-0.8, 0.8) * self.Ai, u(-0.7, 0.7) * self.Bi, u(-40, 60)), u(1.5, 4.0))
                             for _ in range(40)]

    # --- body -------------------------------------------------------------------------------------------

    def body_d(self, x: Array, y: Array) -> Array:
        """Radial signed distance (mm) to the skin in the axial plane."""
        theta = np.arctan2(y, x)
        c, s = np.abs(np.cos(theta)), np.abs(np.sin(theta))
        n = np.where(y > 0, self.post_n, 2.0)
        r = ((c / self.A) ** n + (s / self.B) ** n) ** (-1.0 / n)
        pert = 1.0
        for k, a, ph in self.body_harm:
            pert = pert + a * np.cos(k * theta + ph)
        return np.sqrt(x * x + y * y) - r * pert

    def fat_thickness(self, x: Array, y: Array) -> Array:
        theta = np.arctan2(y, x)
        return self.fat * (1.0 - 0.25 * np.sin(theta)) * (0.55 + 0.45 * np.abs(np.cos(theta)) + 0.2)

    def cavity(self, x: Array, y: Array) -> Array:
        """Signed distance to the inner surface of the abdominal wall (ribcage)."""
        return self.body_d(x, y) + self.fat_thickness(x, y) + self.muscle

    def dome_z(self, x: Array, y: Array) -> Array:
        """z of the diaphragm: the upper envelope of the right and left domes."""
        zr = -((x - self.dome_r[0]) ** 2 + (y - self.dome_r[1]) ** 2) / (2 * self.dome_R)
        zl = self.dome_l[2] - ((x - self.dome_l[0]) ** 2 + (y - self.dome_l[1]) ** 2) / (2 * self.dome_R)
        return np.maximum(zr, zl)

    # --- organs ------------------------------------------------------------------------------------------

    def spine_d(self, x: Array, y: Array, z: Array) -> Array:
        xs, yv = self.spine
        return np.sqrt((x - xs) ** 2 + (y - yv) ** 2) - self.rv + 0.0 * z

    def kidney_d(self, x: Array, y: Array, z: Array, i: int) -> Array:
        c, a, rot, _ = self.kid[i]
        return _ellipsoid(x, y, z, c, a, rot)

    def ivc_d(self, x: Array, y: Array, z: Array) -> Array:
        return _ellipsoid(x, y, 0.0 * z, (*self.ivc, 0.0), (*self.ivc_a, 1e6)) + 0.0 * z

    def aorta_d(self, x: Array, y: Array, z: Array) -> Array:
        return np.sqrt((x - self.aorta[0]) ** 2 + (y - self.aorta[1]) ** 2) - self.ra + 0.0 * z

    def gb_d(self, x: Array, y: Array, z: Array) -> Array:
        if not self.has_gb:
            return np.full(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), 1e3, np.float32)
        return _ellipsoid(x, y, z, self.gb_c, self.gb_a, 0.5)

    def colon_d(self, x: Array, y: Array, z: Array) -> Array:
        c, a, _ = self.colon
        return _ellipsoid(x, y, z, c, a, 0.3)

    def liver_base(self, x: Array, y: Array, z: Array) -> Array:
        """Liver shape before other organs indent it: lobes, ribcage and diaphragm bound it."""
        rl = _ellipsoid(x, y, z, self.rl_c, self.rl_a)
        ll = _ellipsoid(x, y, z, self.ll_c, self.ll_a, self.ll_rot)
        cd = _ellipsoid(x, y, z, (self.ivc[0] + 5, self.ivc[1] - 18, -0.3 * self.H), self.cd_a)
        f = _smin(_smin(rl, ll, 15.0), cd, 8.0)
        f = f + self.liver_def(x, y, z) + self.liver_fine(x, y, z)
        if self.liver_nodules is not None:
            # |field|: rounded bumps between sharp notches, a nodular edge; less its mean, so the volume stays.
            amp = float(np.sqrt((self.liver_nodules.amp**2).sum() / 2.0))
            f = f + np.abs(self.liver_nodules(x, y, z)) - np.float32(0.8 * amp)
        # Ascites holds the liver off the body wall (the fluid is painted in the gap).
        f = np.maximum(f, self.cavity(x, y) + 1.0 + np.float32(0.7 * self.ascites_mm))
        f = np.maximum(f, z - self.dome_z(x, y) + 3.0)
        return f

    def liver_d(self, x: Array, y: Array, z: Array) -> Array:
        """Final liver: indented by (and kept clear of) its neighbours."""
        return self.liver_keepout(self.liver_base(x, y, z), x, y, z)

    def liver_keepout(self, f: Array, x: Array, y: Array, z: Array) -> Array:
        """Cut the neighbours (and the space behind the kidney and beside the spine) out of a liver shape."""
        xs_, yv = self.spine
        f = np.maximum(f, -_ellipsoid(x, y, z, (xs_, yv + self.rv + 28, 0.0), (self.rv + 45, 40, 1e6)) + 3.0)
        c, a, rot, _ = self.kid[0]
        f = np.maximum(f, -_ellipsoid(x, y, z, (c[0], c[1] + 30, c[2]), (a[0] + 8, a[1] + 30, a[2]), rot) + 2.0)
        f = np.maximum(f, -self.spine_d(x, y, z) + 6.0)
        f = np.maximum(f, -self.aorta_d(x, y, z) + 4.0)
        f = np.maximum(f, -self.ivc_d(x, y, z) + 0.5)
        f = np.maximum(f, -self.gb_d(x, y, z) + 1.0)
        f = np.maximum(f, -self.colon_d(x, y, z) + 2.0)
        for i in range(2):
            f = np.maximum(f, -self.kidney_d(x, y, z, i) + 3.0)
        return f

    def spleen_d(self, x: Array, y: Array, z: Array) -> Array:
        f = _ellipsoid(x, y, z, self.spleen_c, self.spleen_a, self.spleen_rot)
        f = np.maximum(f, self.cavity(x, y) + 1.0)
        f = np.maximum(f, z - self.dome_z(x, y) + 3.0)
        f = np.maximum(f, -self.kidney_d(x, y, z, 1) + 3.0)
        return np.maximum(f, -self.liver_base(x, y, z) + 2.0)

    def stomach_d(self, x: Array, y: Array, z: Array) -> Array:
        f = _ellipsoid(x, y, z, self.stom_c, self.stom_a, -0.4) + 0.5 * self.liver_def(y, z, x)
        f = np.maximum(f, self.cavity(x, y) + 2.0)
        f = np.maximum(f, z - self.dome_z(x, y) + 4.0)
        f = np.maximum(f, -self.liver_base(x, y, z) + 2.0)
        return f

    # --- contents -----------------------------------------------------------------------------------------

    def _sample_hu(self) -> dict[str, float]:
        u = self.rng.uniform
        if self.phase == "portal":
            liver = u(90, 140)
            hu = dict(liver=liver, spleen=liver + u(-15, 25), pv=liver + u(30, 80), hv=liver + u(0, 50),
                      aorta=u(140, 220), ivc=u(110, 180), cortex=u(150, 210), pancreas=u(80, 120),
                      heart=u(140, 220), spleen_mottle=0.0)
            hu["medulla"] = hu["cortex"] - u(0, 30)
        elif self.phase == "arterial":
            liver = u(60, 85)
            hu = dict(liver=liver, spleen=u(90, 140), pv=u(100, 170), hv=u(35, 70), aorta=u(250, 420),
                      ivc=u(60, 110), cortex=u(180, 280), medulla=u(60, 110), pancreas=u(100, 150),
                      heart=u(200, 350), spleen_mottle=u(0, 35))
        elif self.phase == "delayed":
            liver = u(80, 110)
            hu = dict(liver=liver, spleen=liver + u(-10, 10), pv=liver + u(5, 30), hv=liver + u(0, 25),
                      aorta=u(110, 160), ivc=u(100, 150), cortex=u(130, 180), pancreas=u(70, 100),
                      heart=u(110, 160), spleen_mottle=0.0)
            hu["medulla"] = hu["cortex"] + u(-10, 30)
        else:  # unenhanced: blood (vessels, heart) darker than the liver
            liver = u(50, 70)
            blood = u(35, 50)
            hu = dict(liver=liver, spleen=u(40, 55), pv=blood, hv=blood + u(-3, 3), aorta=blood + u(-3, 5),
                      ivc=blood + u(-3, 3), cortex=u(28, 40), pancreas=u(30, 50), heart=blood + u(-3, 5),
                      spleen_mottle=0.0)
            hu["medulla"] = hu["cortex"] - u(0, 6)
        hu.update(muscle=u(40, 65), fat=u(-120, -85), wall=u(60, 120), bone=u(600, 1100), marrow=u(150, 350),
                  lung=u(-900, -820), myo=u(80, 130), csf=u(5, 20), disc=u(70, 100), cartilage=u(120, 260),
                  fluid=u(0, 25), contrast=u(200, 600), table=u(100, 400))
        return hu

    def _late_lesion_hu(self, kind: str, L: float, cst: float, d: Array, size: float, rim: float) -> Any:
        """Lesion HU in the delayed and unenhanced phases. Delayed: hypovascular lesions darker by 25-45 HU;
        arterially enhancing ones (HCC: ``hyper`` and ``rim``) washed out, 10-30 HU darker than the liver
        with a capsule 10-25 HU brighter than it. Unenhanced: most lesions 8-30 HU darker, with little
        margin; ``iso`` ones within a few HU."""
        if self.phase == "delayed":
            if kind == "hypo":
                return L - cst * 45 + 15 * np.clip(d / max(size, 1.0) + 0.5, -0.5, 0.5)
            if kind in ("hyper", "rim"):
                capsule = min(2.0, rim)
                return np.where(d > -capsule, np.float32(L + 10 + 15 * cst), np.float32(L - 10 - 20 * cst))
            return L + (1 if cst > 0.8 else -1) * (5 + 8 * cst)
        if kind == "iso":
            return L + (1 if cst > 0.8 else -1) * (3 + 5 * cst)
        return L - (8 + 22 * cst)

    def _sample_lesions(self) -> list[dict[str, Any]]:
        """Lesions: hypodense metastases and cysts, hyperdense and rim-enhancing ones, near-isodense ones."""
        rng = self.rng
        n = int(rng.choice([0, rng.integers(1, 4), rng.integers(4, 11), rng.integers(10, 26)],
                           p=[0.2, 0.35, 0.27, 0.18]))
        out: list[dict[str, Any]] = []
        tries = 0
        while len(out) < n and tries < 40 * max(n, 1):
            tries += 1
            r = float(np.exp(rng.uniform(np.log(1.5), np.log(30.0))))
            if n > 8:
                r = float(min(r, rng.uniform(4, 18)))
            p = np.array([rng.uniform(-self.Ai, 0.6 * self.Ai), rng.uniform(-self.Bi, self.Bi), rng.uniform(-self.H, 0)])
            if self.liver_d(p[0:1], p[1:2], p[2:3])[0] > -0.4 * r:
                continue
            kind = str(rng.choice(["hypo", "cyst", "hyper", "rim", "iso"], p=[0.45, 0.2, 0.12, 0.13, 0.1]))
            out.append(dict(c=p, a=r * rng.uniform(0.8, 1.2, 3), rot=float(rng.uniform(0, np.pi)), kind=kind,
                            contrast=float(rng.uniform(0.6, 1.0)), rim=float(rng.uniform(1.5, 4))))
        return out

    def _sample_vessels(self) -> list[tuple[str, Array, Array, float, float]]:
        """Portal and hepatic vein trees (segments; ``kind``, start, end, radii)."""
        rng, u, H, Ai, Bi = self.rng, self.rng.uniform, self.H, self.Ai, self.Bi
        segs: list[tuple[str, Array, Array, float, float]] = []
        conf = np.array([self.ivc[0] + u(15, 30), self.ivc[1] - u(15, 30), -H * u(0.55, 0.7)])
        hilum = np.array([-Ai * u(0.05, 0.2), -Bi * u(-0.05, 0.15), -H * u(0.4, 0.5)])
        r_pv = u(6, 9)
        segs.append(("pv", conf, hilum, r_pv, r_pv * 0.9))
        # Splenic vein towards the spleen, behind the pancreas.
        segs.append(("pv", conf, np.array([self.spleen_c[0] - 20, self.spleen_c[1] - 5, conf[2] + u(0, 25)]), 4.5, 4.0))

        def tree(kind: str, root: Array, tips: list[Array], r: float, depth: int) -> None:
            for tip in tips:
                segs.append((kind, root, tip, r, r * 0.7))
                if depth > 0:
                    d = tip - root
                    for _ in range(2):
                        mid = root + d * u(0.4, 0.9)
                        nt = mid + rng.normal(0, 1, 3) * np.linalg.norm(d) * 0.35
                        tree(kind, mid, [nt], r * 0.55, depth - 1)

        tree("pv", hilum, [np.array([-Ai * u(0.55, 0.8), Bi * u(-0.1, 0.3), -H * u(0.35, 0.55)]),
                           np.array([Ai * u(0.0, 0.2) * self.left_lobe, -Bi * u(0.35, 0.55), -H * u(0.25, 0.35)])],
             r_pv * 0.75, 2)
        top = np.array([self.ivc[0], self.ivc[1], -H * u(0.08, 0.15)])
        tree("hv", top, [np.array([-Ai * u(0.6, 0.85), Bi * u(-0.2, 0.2), -H * u(0.35, 0.6)]),
                         np.array([-Ai * u(0.15, 0.35), -Bi * u(0.5, 0.75), -H * u(0.35, 0.55)]),
                         np.array([Ai * u(0.0, 0.25) * self.left_lobe, -Bi * u(0.4, 0.6), -H * u(0.15, 0.3)])],
             u(4.5, 7), 2)
        return segs

    def _paint_periportal(self, roi: Callable, intersect: Callable, coords: Callable, paint: Callable,
                          sl: tuple, ld: Array) -> Array:
        """The fat or oedema sheath of the portal trunk and its larger branches, inside the liver only, and
        the mask of where it lies (labelled background: fat and fluid, not parenchyma).

        Its thickness follows a smooth wave along the vessel, down to nothing in places, so that a slice
        cuts it into pockets: the dark spots beside the hilum vessels a model must not call lesions.
        """
        mask = np.zeros(ld.shape, dtype=bool)  # in the liver box's coordinates
        vessel = np.zeros(ld.shape, dtype=bool)
        t = np.float32(self.periportal_mm)
        ph, fr = self.periportal_wave[:3], self.periportal_wave[3:]
        r_big = max(r0 for kind, _, _, r0, _ in self._vessels if kind == "pv")
        for kind, p, q, r0, r1 in self._vessels:
            if kind != "pv" or r0 < 0.4 * r_big:
                continue
            m = r0 + float(t) + 2
            vl = roi(tuple(np.minimum(p, q) - m), tuple(np.maximum(p, q) + m))
            both = None if vl is None else intersect(vl, sl)
            if both is None:
                continue
            gsub, sub = both
            vx, vy, vz = coords(gsub)
            wave = (np.sin(fr[0] * vx + ph[0]) * np.sin(fr[1] * vy + ph[1]) * np.sin(fr[2] * vz + ph[2]))
            thick = t * np.clip(0.5 + 1.2 * wave, 0.0, 1.0)
            dv = _capsule(vx, vy, vz, p, q, r0, r1)
            d = np.maximum(dv - thick, ld[sub] + 0.5)
            paint(gsub, d, np.float32(self.periportal_hu))
            mask[sub] |= d < 0
            vessel[sub] |= dv < 0
        return mask & ~vessel

    # --- rendering -----------------------------------------------------------------------------------------

    def render(self, xs: Array, ys: Array, zs: Array, pv_width: float) -> tuple[Array, Array]:
        """Noise-free HU (nz, ny, nx) and labels at the points given (ascending 1D coordinate vectors, mm).

        Structures that do not change along z (body wall, arms, table, great vessels, spine) are drawn
        once on a 2D template and copied to every slice; 3D organs are evaluated only inside their boxes.
        """
        hu_t = self._hu
        nz, ny, nx = len(zs), len(ys), len(xs)
        X = xs.astype(np.float32)[None, None, :]
        Y = ys.astype(np.float32)[None, :, None]
        Z = zs.astype(np.float32)[:, None, None]
        lab = np.zeros((nz, ny, nx), np.uint8)
        w = np.float32(max(pv_width, 0.3))

        def roi(lo, hi):
            """Index box covering the mm box [lo, hi] (None when it misses the grid)."""
            out = []
            for v, a, b in ((zs, lo[2], hi[2]), (ys, lo[1], hi[1]), (xs, lo[0], hi[0])):
                i0 = int(np.searchsorted(v, a - 2 * w))
                i1 = int(np.searchsorted(v, b + 2 * w))
                if i1 <= i0:
                    return None
                out.append(slice(i0, i1))
            return tuple(out)

        def intersect(a, b):
            """Global and b-relative index boxes of the overlap of boxes a and b (None if empty)."""
            g = tuple(slice(max(p.start, q.start), min(p.stop, q.stop)) for p, q in zip(a, b))
            if any(s_.stop <= s_.start for s_ in g):
                return None
            return g, tuple(slice(s_.start - q.start, s_.stop - q.start) for s_, q in zip(g, b))

        def ellipsoid_box(c, a, pad=3):
            """roi() of an ellipsoid with centre c and semi-axes a, grown by pad mm (in-plane by its largest axis)."""
            m = max(a) + pad
            return roi((c[0] - m, c[1] - m, c[2] - a[2] - pad), (c[0] + m, c[1] + m, c[2] + a[2] + pad))

        def coords(sl):
            return X[:, :, sl[2]], Y[:, sl[1], :], Z[sl[0], :, :]

        def paint_on(arr, d, value):
            occ = np.clip(0.5 - d / w, 0.0, 1.0)
            arr += occ * (value - arr)
            return occ

        # ---- 2D template (z-invariant): body wall, arms, table, paraspinal muscles, aorta, IVC. ----
        x2, y2 = X[0], Y[0]  # (1, nx), (ny, 1)
        bd = self.body_d(x2, y2)
        fat_t = self.fat_thickness(x2, y2)
        cav2 = bd + fat_t + self.muscle
        base = np.full((ny, nx), -1000.0, np.float32)
        paint_on(base, bd, hu_t["fat"])
        paint_on(base, bd + fat_t, hu_t["muscle"])
        paint_on(base, cav2, hu_t["fat"] + 5)
        if self.arms:
            for side in (-1, 1):
                c = (side * (self.A + 52), self.arm_y)
                d = np.sqrt(((x2 - c[0]) / 42) ** 2 + ((y2 - c[1]) / 50) ** 2) * 42 - 42
                paint_on(base, d, hu_t["fat"])
                paint_on(base, d + 8, hu_t["muscle"])
                db = np.sqrt((x2 - c[0]) ** 2 + (y2 - c[1] - 5) ** 2) - 11
                paint_on(base, db, hu_t["bone"])
                paint_on(base, db + 3, 60.0)
        y0 = float(self.B * 1.0 + self.table_gap)
        for dy in (0.0, self.table_gap2):
            rr = np.sqrt(x2**2 + (y2 - (y0 + dy - self.table_R)) ** 2) - self.table_R
            paint_on(base, np.maximum(np.abs(rr) - 1.5, np.abs(x2) - 230), hu_t["table"])
        xs_, yv = self.spine
        for side in (-1, 1):
            d = np.sqrt(((x2 - xs_ - side * (self.rv + 12)) / 26) ** 2 + ((y2 - yv - self.rv - 28) / 30) ** 2) * 26 - 26
            paint_on(base, np.maximum(d, bd + 3), hu_t["muscle"])
        paint_on(base, np.sqrt((x2 - self.aorta[0]) ** 2 + (y2 - self.aorta[1]) ** 2) - self.ra, hu_t["aorta"])
        paint_on(base, np.sqrt(((x2 - self.ivc[0]) / self.ivc_a[0]) ** 2 + ((y2 - self.ivc[1]) / self.ivc_a[1]) ** 2) * self.ivc_a[1] - self.ivc_a[1], hu_t["ivc"])
        # Spine variants: vertebral body or disc, with or without posterior arch.
        sd = np.sqrt((x2 - xs_) ** 2 + (y2 - yv) ** 2) - self.rv
        canal_c = (xs_, yv + self.rv + 11)
        rc = np.sqrt((x2 - canal_c[0]) ** 2 + (y2 - canal_c[1]) ** 2)
        canal = rc - 9
        ring = np.maximum(rc - 15, -canal)
        post = np.maximum(np.abs(x2 - xs_) - 4.5, np.abs(y2 - (canal_c[1] + 30)) - 20)
        dxp = np.abs(x2 - xs_)
        trans = np.maximum(np.maximum(dxp - (self.rv + 22), -dxp + 5), np.abs(y2 - canal_c[1] + 2 - 0.25 * dxp) - 5)
        arch = np.maximum(np.minimum(np.minimum(ring, post), trans), bd + 8)
        arch_low = np.maximum(arch, y2 - canal_c[1] - 6)
        variants = {}
        for disc in (False, True):
            for mid in (False, True):
                v = base.copy()
                paint_on(v, sd, hu_t["disc"] if disc else hu_t["bone"])
                if not disc:
                    paint_on(v, sd + 2.0, hu_t["marrow"])
                a_ = arch if mid else arch_low
                paint_on(v, a_, hu_t["bone"])
                paint_on(v, a_ + 2.0, hu_t["marrow"])
                paint_on(v, canal, hu_t["csf"])
                variants[(disc, mid)] = v
        vert_phase = np.mod(zs + self.vert_off, self.vert_h)
        img = np.empty((nz, ny, nx), np.float32)
        for k in range(nz):
            disc = bool(vert_phase[k] < self.disc)
            mid = bool(abs(vert_phase[k] - (self.disc + self.vert_h) / 2) < (self.vert_h - self.disc) * 0.3)
            img[k] = variants[(disc, mid)]
        del variants
        # Psoas grows below the liver.
        for k in range(nz):
            ps_r = float(np.clip((-zs[k] - 0.7 * self.H) / 6.0, 0, 18))
            if ps_r > 1:
                for side in (-1, 1):
                    d = np.sqrt((x2 - xs_ - side * (self.rv + 14)) ** 2 + (y2 - yv + 2) ** 2) - ps_r
                    paint_on(img[k], d, hu_t["muscle"])

        def paint(sl, d, value):
            return paint_on(img[sl], d, value)

        # ---- Lungs (above the diaphragm, inside the ribcage) and heart: only slices above the lowest dome point. ----
        dz2 = self.dome_z(x2, y2)
        cav_in = cav2 < 0
        dz_min = float(dz2[cav_in].min()) if cav_in.any() else float(dz2.min())
        zl = roi((xs[0], ys[0], dz_min - 5), (xs[-1], ys[-1], 1e4))
        if zl is not None:
            x, y, z = coords(zl)
            lung_d = np.maximum(cav2 + 2.0, dz2 + 2.0 - z)
            lung_d = np.maximum(lung_d, -(np.sqrt((x - xs_) ** 2 + (y - yv) ** 2) - self.rv - 20))
            lung_d = np.maximum(lung_d, -(np.sqrt((x - self.aorta[0]) ** 2 + (y - self.aorta[1]) ** 2) - self.ra - 3))
            heart = _ellipsoid(x, y, z, (self.Ai * 0.15, -self.Bi * 0.3, float(dz2.min()) + 55), (70, 55, 60), -0.5)
            heart = np.maximum(heart, dz2 - z + 2.0)
            paint(zl, lung_d, hu_t["lung"])
            paint(zl, heart, hu_t["myo"])
            paint(zl, heart + 8.0, hu_t["heart"])
            for c, r in self.lung_vessels:
                sl = roi((c[0] - r, c[1] - r, c[2] - 4 * r), (c[0] + r, c[1] + r, c[2] + 4 * r))
                both = None if sl is None else intersect(sl, zl)
                if both is not None:
                    g, sub = both
                    xx, yy, zz = coords(g)
                    paint(g, np.maximum(_ellipsoid(xx, yy, zz, c, (r, r, 4 * r)), -lung_d[sub]), 40.0)
        # ---- Liver base shape, computed once on the liver's box and shared by its neighbours. ----
        lbox = roi((-self.A, -self.B, -self.H * 1.4 - 20), (self.Ai * 0.95, self.B, 15.0))
        if lbox is not None:
            lb_arr = self.liver_base(*coords(lbox))
        else:
            lb_arr = None

        def liver_base_at(sl):
            out = np.full(tuple(s.stop - s.start for s in sl), 1e3, np.float32)
            if lb_arr is None:
                return out
            both = intersect(lbox, sl)
            if both is not None:
                g, sub = both
                gl = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(g, lbox))
                out[sub] = lb_arr[gl]
            return out

        # ---- Kidneys: cortex, medulla, sinus fat. ----
        for c, a, rot, ct in self.kid:
            sl = ellipsoid_box(c, a)
            if sl is None:
                continue
            xx, yy, zz = coords(sl)
            d = _ellipsoid(xx, yy, zz, c, a, rot)
            paint(sl, d, hu_t["cortex"])
            paint(sl, d + ct, hu_t["medulla"])
            side = -1 if c[0] < 0 else 1
            sinus = _ellipsoid(xx, yy, zz, (c[0] - side * a[0] * 0.55, c[1] - a[1] * 0.2, c[2]), (a[0] * 0.45, a[1] * 0.4, a[2] * 0.45))
            paint(sl, np.maximum(sinus, d + 2), hu_t["fat"] + 20)
            paint(sl, np.maximum(sinus + 4, d + 2), hu_t["fluid"])
        # ---- Spleen (mottled in the arterial phase). ----
        c, a = self.spleen_c, self.spleen_a
        sl = ellipsoid_box(c, a)
        if sl is not None:
            xx, yy, zz = coords(sl)
            f = _ellipsoid(xx, yy, zz, c, a, self.spleen_rot)
            f = np.maximum(f, self.cavity(xx, yy) + 1.0)
            f = np.maximum(f, zz - self.dome_z(xx, yy) + 3.0)
            f = np.maximum(f, -self.kidney_d(xx, yy, zz, 1) + 3.0)
            f = np.maximum(f, -liver_base_at(sl) + 2.0)
            sval = hu_t["spleen"]
            if hu_t["spleen_mottle"]:
                sval = sval + hu_t["spleen_mottle"] * np.sin(xx * 0.25 + 0.3 * yy) * np.sin(0.2 * yy - 0.15 * zz)
            paint(sl, f, sval)
        # ---- Stomach: wall, then air above the level and fluid, contrast or food below. ----
        c, a = self.stom_c, self.stom_a
        m = max(a) + 8
        sl = roi((c[0] - m, c[1] - m, c[2] - m), (c[0] + m, c[1] + m, c[2] + m))
        if sl is not None:
            xx, yy, zz = coords(sl)
            f = _ellipsoid(xx, yy, zz, c, a, -0.4) + 4.0 * np.sin(0.05 * xx + 0.04 * zz + self.stom_level) * np.cos(0.045 * yy)
            f = np.maximum(f, self.cavity(xx, yy) + 2.0)
            f = np.maximum(f, zz - self.dome_z(xx, yy) + 4.0)
            f = np.maximum(f, -liver_base_at(sl) + 2.0)
            paint(sl, f, hu_t["wall"])
            level = c[1] + self.stom_level * a[1]
            cont = {"fluid": hu_t["fluid"], "contrast": hu_t["contrast"], "food": 40.0, "air": -1000.0}[str(self.stom_content)]
            paint(sl, f + 4.0, np.where(yy < level, np.float32(-1000.0), np.float32(cont)))
        # ---- Bowel loops and the hepatic flexure. ----
        loops = list(self.bowel) + [(self.colon[0], self.colon[1], 0.3, self.colon[2], 0.0)]
        for c, a, rot, content, lvl in loops:
            sl = ellipsoid_box(c, a)
            if sl is None:
                continue
            xx, yy, zz = coords(sl)
            d = _ellipsoid(xx, yy, zz, c, a, rot)
            d = np.maximum(d, self.cavity(xx, yy) + 2)
            d = np.maximum(d, -liver_base_at(sl) + 2)
            paint(sl, d, hu_t["wall"])
            if content == "mixed":
                val = np.where(yy < c[1] + lvl * a[1], np.float32(-1000.0),
                               30.0 + 40 * np.sin(xx * 0.7) * np.sin(yy * 0.6) + 0 * zz).astype(np.float32)
            else:
                val = {"air": -1000.0, "fluid": hu_t["fluid"], "contrast": hu_t["contrast"]}[str(content)]
            paint(sl, d + 3, val)
        # ---- Pancreas. ----
        pz = self.panc_z
        pts = [np.array(p, float) for p in ((self.ivc[0] + 5, self.ivc[1] - 30, pz - 10),
                                            (self.aorta[0], self.aorta[1] - 35, pz + 5),
                                            (self.spleen_c[0] - 25, self.spleen_c[1] - 10, pz + 25))]
        for p, q in zip(pts[:-1], pts[1:]):
            sl = roi(tuple(np.minimum(p, q) - 16), tuple(np.maximum(p, q) + 16))
            if sl is not None:
                xx, yy, zz = coords(sl)
                d = np.maximum(_capsule(xx, yy, zz, p, q, 13.0, 9.0), -liver_base_at(sl) + 2)
                paint(sl, d, hu_t["pancreas"])
        # ---- Liver with its vessels, then lesions, then the gallbladder beside it. ----
        if lbox is not None:
            sl = lbox
            xx, yy, zz = coords(sl)
            ld = self.liver_keepout(lb_arr, xx, yy, zz)
            if self.ascites_mm > 0:
                # Fluid around the liver in the peritoneal cavity, below the diaphragm: background, not liver.
                band = np.maximum(ld - np.float32(self.ascites_mm), -ld)
                band = np.maximum(band, self.cavity(xx, yy) + 1.0)
                band = np.maximum(band, zz - self.dome_z(xx, yy) + 3.0)
                paint(sl, band, hu_t["fluid"])
            liver_hu = hu_t["liver"]
            if self.liver_texture is not None:
                liver_hu = liver_hu + self.liver_texture(xx, yy, zz)
            paint(sl, ld, liver_hu)
            cuff = None
            if self.periportal_mm > 0:
                cuff = self._paint_periportal(roi, intersect, coords, paint, sl, ld)
            for kind, p, q, r0, r1 in self._vessels:
                vl = roi(tuple(np.minimum(p, q) - r0 - 2), tuple(np.maximum(p, q) + r0 + 2))
                both = None if vl is None else intersect(vl, sl)
                if both is None:
                    continue
                gsub, sub = both
                vx, vy, vz = coords(gsub)
                d = _capsule(vx, vy, vz, p, q, r0, r1)
                if kind == "hv":
                    d = np.maximum(d, ld[sub] + 1.0)  # hepatic veins only inside the liver
                paint(gsub, d, hu_t["pv"] if kind == "pv" else hu_t["hv"])
            lab[sl][ld < 0] = 1
            if cuff is not None:
                lab[sl][cuff] = 0  # fat and fluid, not parenchyma (as the clefts' wedges are)
            for les in self.lesions:
                c, a = les["c"], les["a"]
                m = float(max(a)) + 4
                ll = roi((c[0] - m, c[1] - m, c[2] - m), (c[0] + m, c[1] + m, c[2] + m))
                both = None if ll is None else intersect(ll, sl)
                if both is None:
                    continue
                gsub, sub = both
                lx, ly, lz = coords(gsub)
                d = _ellipsoid(lx, ly, lz, tuple(float(v) for v in c), tuple(float(v) for v in a), les["rot"])
                d = d + np.float32(0.12 * float(min(a))) * np.sin(0.4 * lx + 0.3 * ly) * np.cos(0.35 * lz - 0.2 * ly)
                d = np.maximum(d, ld[sub])
                L = hu_t["liver"]
                k, cst = les["kind"], les["contrast"]
                if self.phase in ("delayed", "unenhanced") and k != "cyst":
                    val = self._late_lesion_hu(k, L, cst, d, float(min(a)), float(les["rim"]))
                elif k == "hypo":
                    # Hypovascular lesions stay clearly darker than enhancing parenchyma in the arterial
                    # phase too (about 20-35 HU), and more so in the portal phase.
                    val = L - cst * (35 + 35 * (self.phase == "portal"))
                    val = val + 15 * np.clip(d / max(float(min(a)), 1.0) + 0.5, -0.5, 0.5)  # darker centre
                elif k == "cyst":
                    val = hu_t["fluid"]
                elif k == "hyper":
                    val = L + cst * (30 + 50 * (self.phase == "arterial"))
                elif k == "rim":
                    val = np.where(d > -les["rim"], np.float32(L + 25 + 35 * cst), np.float32(L - 30 - 30 * cst))
                else:
                    val = L + (1 if cst > 0.8 else -1) * (6 + 10 * cst)
                paint(gsub, d, val)
                lsub = lab[gsub]
                lsub[d < 0] = 2
            gd = self.gb_d(xx, yy, zz)
            paint(sl, gd, hu_t["wall"])
            paint(sl, gd + 2.0, self.gb_hu)
        # ---- Ribs and costal cartilage (one cross-section per rib and slice). ----
        for k in range(nz):
            zk = float(zs[k])
            for side, b, slope, ra, rb in self.ribs:
                anter = abs(b) < 0.9
                low = self.costal_z + (0.35 * self.H if anter else 0.0)
                if zk < low or zk > 120:
                    continue
                ang = b + slope * zk * (1 if b > 0 else -1)
                theta = -((np.pi / 2 - ang) if side > 0 else (np.pi / 2 + ang))
                cx, cy = math.cos(theta), math.sin(theta)
                rd = float(self.body_d(np.float32(cx * 100), np.float32(cy * 100)))
                ft = float(self.fat_thickness(np.float32(cx), np.float32(cy)))
                rc_ = (100 - rd) - ft - self.muscle * 0.6
                px, py = rc_ * cx, rc_ * cy
                m = max(ra, rb) + 3
                sl2 = roi((px - m, py - m, zk), (px + m, py + m, zk))
                if sl2 is None:
                    continue
                sl2 = (slice(k, k + 1), sl2[1], sl2[2])
                xx, yy, _ = coords(sl2)
                u_ = (xx - px) * (-cy) + (yy - py) * cx
                v_ = (xx - px) * cx + (yy - py) * cy
                d = (np.sqrt((u_ / ra) ** 2 + (v_ / rb) ** 2) - 1) * rb
                paint(sl2, d, hu_t["cartilage"] if anter else hu_t["bone"])
                if not anter:
                    paint(sl2, d + 1.5, hu_t["marrow"])
        return img, lab


def make_phantom(spec: CaseSpec) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Render one phantom: HU int16 (slices, rows, cols), labels uint8 (same shape), and metadata.

    Slices are in ascending z (inferior first). Thick slices average three sub-slices (partial volume
    along z); a Gaussian PSF blurs in-plane; noise is Gaussian, spatially correlated, and added last.
    """
    pat = _Patient(spec.seed, spec.phase, spec.fatty_hu, spec.lesion_free, spec.cirrhosis, spec.ascites_mm,
                   spec.periportal_mm, spec.periportal_hu)
    ps_r, ps_c = spec.pixel_spacing
    rng = np.random.default_rng([int(spec.seed), 1, int(round(spec.fov_mm * 10)), spec.rows, spec.n_slices])
    if spec.center_xy is not None:
        cx, cy = spec.center_xy
    elif spec.fov_kind == "targeted":
        cx = pat.rl_c[0] * 0.6 + float(rng.uniform(-25, 25))
        cy = float(rng.uniform(-20, 20))
    else:
        cx = float(rng.uniform(-20, 20))
        cy = float(pat.B * 0.15 + rng.uniform(-20, 20))
    xs = cx + (np.arange(spec.cols) + 0.5 - spec.cols / 2) * ps_c
    ys = cy + (np.arange(spec.rows) + 0.5 - spec.rows / 2) * ps_r
    zc = -pat.H / 2 if spec.z_center is None else float(spec.z_center)
    zs = zc + (np.arange(spec.n_slices) - (spec.n_slices - 1) / 2) * spec.slice_spacing
    t = spec.slice_thickness
    offsets = [0.0] if t <= 3.0 else [-t / 3, 0.0, t / 3]
    zall = np.sort(np.concatenate([zs + o for o in offsets]))
    img, lab = pat.render(xs, ys, zall, pv_width=min(ps_r, ps_c))
    n_sub = len(offsets)
    img = img.reshape(spec.n_slices, n_sub, spec.rows, spec.cols).mean(axis=1)
    lab = lab.reshape(spec.n_slices, n_sub, spec.rows, spec.cols)[:, n_sub // 2]
    # PSF, texture and noise.
    sig = spec.psf_mm / 2.355 / ps_r
    if sig > 0.3:
        img = gaussian_filter(img, sigma=(0, sig, sig))
    tex = rng.standard_normal(img.shape, dtype=np.float32)
    s = 2.5 / ps_r
    tex = gaussian_filter(tex, sigma=(0, s, s))
    tex *= 4.0 / (tex[:, ::7, ::7].std() + 1e-6)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    s = spec.noise_corr_mm / 2.0 / ps_r
    if s > 0.3:
        noise = gaussian_filter(noise, sigma=(0, s, s))
    noise *= spec.noise_hu / (noise[:, ::5, ::5].std() + 1e-6)
    img += tex + noise
    if spec.circle_mask:
        rr = ((np.arange(spec.rows) + 0.5 - spec.rows / 2) ** 2)[:, None] + ((np.arange(spec.cols) + 0.5 - spec.cols / 2) ** 2)[None, :]
        img[:, rr > (min(spec.rows, spec.cols) / 2) ** 2] = -1024
    hu = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    meta = dict(asdict(spec), pixel_spacing=(ps_r, ps_c), z_positions=zs.tolist(), fov_center_xy=(cx, cy),
                liver_height_mm=pat.H, n_lesions=len(pat.lesions), lesion_kinds=[l["kind"] for l in pat.lesions])
    return hu, lab.astype(np.uint8), meta


def sample_case(seed: int, *, n_slices: int | None = None, fov_kind: str | None = None,
                phase: str | None = None, variety: int = 1) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A random patient scanned with a random acquisition (``sample_spec``), deterministic for ``seed``."""
    return make_phantom(sample_spec(seed, n_slices=n_slices, fov_kind=fov_kind, phase=phase, variety=variety))
