"""A procedural chest-CT phantom: a training set that needs no download.

Every call draws a new anatomy from its random generator: body outline with a fat
layer, two air-filled lungs with branching pulmonary vessels, heart, aorta, trachea
and main bronchi, liver under the right lung, vertebral column (bodies, discs, arches,
spinal canal), ribs and sternum, plus noise. Values are Hounsfield units.

Axis order of a volume ``v[d, h, w]``: prdit_fast's one convention, defined in
``prdit_fast.orientation`` (depth superior -> inferior, height anterior -> posterior,
width patient right -> left).

The network sees values in [-1, 1]: ``hu_to_unit`` clips to the RAD-ChestCT window
[-1000, 1000] HU and maps it linearly, ``unit_to_hu`` maps back.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

HU_WINDOW = (-1000.0, 1000.0)  # the paper's RAD-ChestCT clip range, mapped to [-1, 1]
HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_BLOOD = 45.0
HU_LIVER = 60.0
HU_LUNG = -850.0
HU_BONE = 700.0
HU_CANCELLOUS = 250.0
HU_CSF = 10.0
HU_STERNUM = 400.0


def hu_to_unit(hu):
    """HU -> [-1, 1]: clip to [-1000, 1000], then divide by 1000. numpy or torch in, same out."""
    lo, hi = HU_WINDOW
    return (hu.clip(lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)


def unit_to_hu(x):
    """[-1, 1] -> HU, the inverse of ``hu_to_unit`` (values outside [-1, 1] are clipped first,
    so model outputs map into [-1000, 1000] HU). numpy or torch in, same out."""
    lo, hi = HU_WINDOW
    return x.clip(-1.0, 1.0) * ((hi - lo) / 2) + (lo + hi) / 2


def _as_rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


class _Canvas:
    """A volume being painted back to front. Shapes are described by an approximate
    signed distance in normalized units (the volume spans [-1, 1] on each axis);
    coverage ramps over one voxel at the boundary, which anti-aliases small volumes."""

    def __init__(self, size: int, angle: float, shift: tuple[float, float]):
        self.size = size
        c = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1).astype(np.float32)
        self.coords = c
        self.z = c[:, None, None]  # superior -1 .. inferior +1
        y, x = c[None, :, None], c[None, None, :]  # anterior -1 .. posterior +1, right -1 .. left +1
        # anatomy frame: the patient is rotated in-plane and shifted in the field of view
        self.cos, self.sin, self.shift = math.cos(angle), math.sin(angle), shift
        self.x = self.cos * (x - shift[0]) + self.sin * (y - shift[1])  # (1, S, S)
        self.y = -self.sin * (x - shift[0]) + self.cos * (y - shift[1])
        self.vol = np.full((size,) * 3, HU_AIR, dtype=np.float32)

    def coverage(self, sdf: np.ndarray) -> np.ndarray:
        return np.clip(0.5 - sdf * (self.size / 2), 0.0, 1.0)

    def paint(self, coverage: np.ndarray, hu: float | np.ndarray) -> None:
        self.vol += coverage * (hu - self.vol)

    def ellipsoid(self, center, axes) -> np.ndarray:
        """Approximate SDF of an axis-aligned (anatomy frame) ellipsoid; center/axes as (x, y, z)."""
        r = np.sqrt(
            ((self.x - center[0]) / axes[0]) ** 2 + ((self.y - center[1]) / axes[1]) ** 2 + ((self.z - center[2]) / axes[2]) ** 2
        )
        return (r - 1) * min(axes)

    def to_volume_frame(self, p: np.ndarray) -> np.ndarray:
        """Anatomy-frame points (..., 3) as (x, y, z) -> normalized volume coordinates."""
        x = self.cos * p[..., 0] - self.sin * p[..., 1] + self.shift[0]
        y = self.sin * p[..., 0] + self.cos * p[..., 1] + self.shift[1]
        return np.stack([x, y, p[..., 2]], axis=-1)

    def tubes(self, starts, ends, radii, hu: float, within: np.ndarray | None = None) -> None:
        """Paint capsules (segments with radius, anatomy frame). Each is evaluated in its
        bounding box only, so many thin vessels stay cheap."""
        a_all = self.to_volume_frame(np.asarray(starts, dtype=np.float32))
        b_all = self.to_volume_frame(np.asarray(ends, dtype=np.float32))
        to_index = lambda u: (u + 1) / 2 * self.size - 0.5  # noqa: E731
        for a, b, r in zip(a_all, b_all, radii):
            lo = np.floor(to_index(np.minimum(a, b) - r) - 1).astype(int).clip(0, self.size)
            hi = np.ceil(to_index(np.maximum(a, b) + r) + 2).astype(int).clip(0, self.size)
            if np.any(hi <= lo):
                continue
            sl = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))  # volume is (z, y, x)
            pz = self.coords[sl[0]][:, None, None] - a[2]
            py = self.coords[sl[1]][None, :, None] - a[1]
            px = self.coords[sl[2]][None, None, :] - a[0]
            d = b - a
            t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / max(float(d @ d), 1e-12), 0.0, 1.0)
            dist = np.sqrt((px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2) - r
            cov = self.coverage(dist)
            if within is not None:
                cov = cov * within[sl]
            self.vol[sl] += cov * (hu - self.vol[sl])


def _vessel_tree(rng: np.random.Generator, root, direction, length: float, radius: float, generations: int):
    """Segments of a random binary tree: each branch splits into two children turned by
    25-45 degrees, 70-80% as long and 70% as thick."""
    starts, ends, radii = [], [], []
    stack = [(np.asarray(root, dtype=np.float32), np.asarray(direction, dtype=np.float32), length, radius, 0)]
    while stack:
        p, u, ln, r, g = stack.pop()
        u = u / np.linalg.norm(u)
        q = p + ln * u
        starts.append(p), ends.append(q), radii.append(r)
        if g + 1 >= generations:
            continue
        # a random axis perpendicular to u to turn the two children around
        perp = np.cross(u, rng.normal(size=3).astype(np.float32))
        perp /= np.linalg.norm(perp) + 1e-8
        for sign in (1.0, -1.0):
            angle = sign * rng.uniform(0.45, 0.8)
            child = u * math.cos(angle) + perp * math.sin(angle)
            stack.append((q, child, ln * rng.uniform(0.7, 0.8), r * 0.7, g + 1))
    return starts, ends, radii


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"phantom size must be an integer >= 8, got {size!r}")


def chest_phantom(size: int, seed: int | np.random.Generator | None = None, noise_hu: float = 12.0) -> np.ndarray:
    """A random chest CT volume in HU: (size, size, size) float32, axes (depth, height, width)
    as described in the module docstring. ``seed`` (int or numpy Generator) fixes the anatomy
    and the noise; ``noise_hu`` is the standard deviation of the voxel noise inside the body."""
    _check_size(size)
    rng = _as_rng(seed)
    u = rng.uniform
    cv = _Canvas(int(size), angle=u(-0.12, 0.12), shift=(u(-0.04, 0.04), u(-0.04, 0.04)))
    z = cv.z

    # body: an elliptic cylinder, wider left-right, slightly wider inferiorly; fat, then muscle
    ax, ay, fat = u(0.78, 0.9), u(0.52, 0.62), u(0.03, 0.07)
    taper = 1 + u(0.03, 0.08) * z
    body_r = np.sqrt((cv.x / (ax * taper)) ** 2 + (cv.y / (ay * taper)) ** 2)
    cv.paint(cv.coverage((body_r - 1) * ay * taper), HU_FAT)
    inner_r = np.sqrt((cv.x / (ax * taper - fat)) ** 2 + (cv.y / (ay * taper - fat)) ** 2)
    inside = cv.coverage((inner_r - 1) * (ay * taper - fat))
    cv.paint(inside, HU_SOFT)

    # liver under the right lung (painted first: the lung base overwrites its dome)
    cv.paint(cv.coverage(cv.ellipsoid((-0.3 * ax, u(-0.05, 0.05), u(0.8, 0.95)), (0.55 * ax, 0.8 * ay, u(0.35, 0.45)))), HU_LIVER)

    # lungs: two ellipsoids kept inside the rib cage
    lungs = np.zeros_like(cv.vol)
    hila = []
    for side in (-1.0, 1.0):
        center = (side * u(0.36, 0.44) * ax, u(0.0, 0.06), u(-0.12, 0.02))
        axes = (u(0.27, 0.33) * ax, u(0.72, 0.8) * ay, u(0.75, 0.9))
        lungs = np.maximum(lungs, cv.coverage(cv.ellipsoid(center, axes)))
        hila.append((side * 0.12 * ax, center[1] + 0.05, center[2] + 0.1))
    lungs *= cv.coverage((inner_r - 1) * (ay * taper - fat) + 0.05)
    # parenchyma texture: a few random plane waves of 5-15 HU
    texture = sum(
        u(5, 15) * np.cos(2 * math.pi * (f[0] * cv.x + f[1] * cv.y + f[2] * z) + u(0, 2 * math.pi))
        for f in rng.uniform(-6, 6, size=(6, 3))
    )
    cv.paint(lungs, HU_LUNG + texture)

    # pulmonary vessels, branching out from each hilum inside the lungs only
    for side, hilum in zip((-1.0, 1.0), hila):
        for _ in range(2):
            direction = (side * u(0.6, 1.0), u(-0.6, 0.6), u(-0.8, 0.8))
            s, e, r = _vessel_tree(rng, hilum, direction, u(0.16, 0.22), u(0.025, 0.035), generations=5)
            cv.tubes(s, e, r, HU_BLOOD, within=lungs)

    # mediastinal fat between the lungs, so that heart, aorta and trachea stand out
    spine_y = u(0.38, 0.45) * ay
    cv.paint(cv.coverage(cv.ellipsoid((0.0, 0.0, 0.0), (u(0.16, 0.2) * ax, 0.9 * ay, 0.9))) * (1 - lungs), HU_FAT + 20.0)

    # heart (left-anterior, low) and aorta: ascending, arch, descending beside the spine
    cv.paint(cv.coverage(cv.ellipsoid((u(0.06, 0.16), u(-0.2, -0.1), u(0.25, 0.4)), (u(0.26, 0.32), u(0.22, 0.28), u(0.26, 0.32)))), HU_BLOOD)
    arch_z, aorta_r = u(-0.5, -0.35), u(0.05, 0.07)
    path = np.array(
        [(0.02, -0.08, 0.15), (0.0, -0.1, arch_z), (0.1, 0.1, arch_z - 0.06), (0.14, spine_y - 0.12, arch_z), (0.14, spine_y - 0.12, 1.05)],
        dtype=np.float32,
    )
    cv.tubes(path[:-1], path[1:], [aorta_r] * 4, HU_BLOOD)

    # trachea down the midline, splitting into the two main bronchi at the carina
    carina = (0.0, u(0.0, 0.08), u(-0.2, -0.1))
    cv.tubes([(0.0, carina[1] - 0.05, -1.05), carina, carina], [carina, hila[0], hila[1]], [0.055, 0.035, 0.035], HU_AIR)

    # vertebral column: bodies (cortical shell, cancellous core) with soft-tissue discs between
    # them, arches around the spinal canal
    spine_r, level_h, disc = u(0.07, 0.085), u(0.13, 0.16), u(0.025, 0.035)
    phase = (z - u(0, level_h)) % level_h  # position within a vertebral level
    in_body = np.abs(phase - (level_h + disc) / 2) - (level_h - disc) / 2  # SDF along z of the body part
    radial = np.sqrt(cv.x**2 + (cv.y - spine_y) ** 2)
    cv.paint(cv.coverage(np.maximum(radial - spine_r, in_body)), HU_BONE)
    cv.paint(cv.coverage(np.maximum(radial - (spine_r - 0.02), in_body + 0.015)), HU_CANCELLOUS)
    canal_y = spine_y + spine_r + 0.045
    canal = np.sqrt(cv.x**2 + (cv.y - canal_y) ** 2)
    cv.paint(cv.coverage(np.maximum(canal - 0.075, in_body)), HU_BONE)
    # the spinous process points backwards and ends under the skin
    tip = ay * taper - fat - 0.03
    spinous = np.maximum(np.maximum(np.abs(cv.x) - 0.02, np.abs(cv.y - (canal_y + tip) / 2) - (tip - canal_y) / 2), in_body)
    cv.paint(cv.coverage(spinous), HU_BONE)
    cv.paint(cv.coverage(canal - 0.045), HU_CSF)

    # ribs: arcs just inside the muscle wall, one per level, sloping down towards the front;
    # the nearest rib of every voxel is found by rounding, so no loop over ribs
    rib_scale, rib_r, drop = 1 - u(0.08, 0.12) / ay, u(0.022, 0.03), u(0.1, 0.2)
    wall_x, wall_y = (ax * taper - fat) * rib_scale, (ay * taper - fat) * rib_scale
    phi = np.arctan2(cv.y / wall_y, cv.x / wall_x)  # +pi/2 posterior (spine), -pi/2 anterior
    along = z - drop * (1 - np.sin(phi)) / 2
    first, spacing = u(-0.85, -0.75), level_h
    count = int((0.75 - first) / spacing) + 1
    k = np.clip(np.round((along - first) / spacing), 0, count - 1)
    dz = along - (first + k * spacing)
    dr = (np.sqrt((cv.x / wall_x) ** 2 + (cv.y / wall_y) ** 2) - 1) * (wall_x + wall_y) / 2
    cartilage = np.sin(phi) < -0.9  # the front ends join the sternum through cartilage, not bone
    cv.paint(cv.coverage(np.sqrt(dr**2 + dz**2) - rib_r) * ~cartilage, HU_BONE)
    sternum = np.maximum(np.maximum(np.abs(cv.x) - 0.05, np.abs(cv.y + wall_y + 0.01) - 0.025), np.abs(z + 0.1) - 0.5)
    cv.paint(cv.coverage(sternum), HU_STERNUM)

    body = cv.coverage((body_r - 1) * ay * taper)
    cv.vol += body * rng.normal(0.0, noise_hu, size=cv.vol.shape).astype(np.float32)
    return np.maximum(cv.vol, HU_AIR, out=cv.vol)


class PhantomDataset(Dataset):
    """``length`` phantom volumes of edge ``size`` as (1, S, S, S) float32 in [-1, 1].

    Item ``i`` is generated on access from ``(seed, i)``: the same index always gives
    the same volume, and no memory is held between accesses.
    """

    def __init__(self, size: int, length: int, seed: int = 0):
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        _check_size(size)
        self.size, self.length, self.seed = size, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} phantoms")
        rng = np.random.default_rng([self.seed, index % self.length])
        return torch.from_numpy(hu_to_unit(chest_phantom(self.size, rng)))[None]
