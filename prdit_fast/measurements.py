"""Measurement operators and task losses for guided sampling (spec section 15).

A guided sampler (``IaNDiffusion.sample_guided``, ``prdit_fast.engine.GuidedSampler``)
pulls the clean prediction ``x0_hat`` of a frozen prior toward an observation ``y``
with the gradient of a task loss ``L(x0_hat, y)``. The gradient goes through the loss
(and its operator) only, never through the network.

``loss`` is either

* a ``MeasurementOperator`` ``A`` (a differentiable ``nn.Module`` mapping volumes
  (B, C, S, S, S) to measurements (B, ...)); the loss is then ``||A(x0_hat) - y||_2``
  per volume (one norm over all of a volume's elements), summed over the batch, so a
  volume's gradient does not depend on the other volumes of its batch; or
* any differentiable callable ``(x0_hat, y) -> scalar or (B,)`` (summed), which is then
  responsible for keeping the volumes of a batch independent.

Operators here: ``Downsample`` (super-resolution, the official trilinear operator),
``Mask`` (infilling: the known voxels), ``GaussianBlur`` (deblurring) and
``XrayProjection`` (digitally reconstructed radiographs, built on DiffDRR, an optional
extra). A user-defined operator subclasses ``MeasurementOperator`` and plugs in the same way.

``capturable`` says whether the operator and its autograd gradient have static shapes and
no host synchronisation, so the engine may capture them in a CUDA graph with the network
(it still falls back to eager, with the reason logged, when a capture fails).
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

TaskLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class MeasurementOperator(nn.Module):
    """A differentiable forward model ``A``: volumes (B, C, S, S, S) -> measurements (B, ...).

    Subclasses implement ``forward``. ``adjoint(r)`` is ``A^T r`` for a linear operator,
    by default through autograd (a vector-Jacobian product); subclasses may write the
    transpose by hand.
    """

    capturable: bool = True  # static shapes, no host syncs: may run inside a CUDA graph
    linear: bool = True  # A(a x + b z) = a A(x) + b A(z): ``adjoint`` is defined

    def adjoint(self, residual: torch.Tensor, volume_shape: Sequence[int]) -> torch.Tensor:
        """A^T r: measurements (B, ...) -> volumes ``volume_shape`` (B, C, S, S, S)."""
        if not self.linear:
            raise TypeError(f"{type(self).__name__} is not linear: it has no adjoint; use its gradient")
        with torch.enable_grad():
            probe = torch.zeros(volume_shape, device=residual.device, dtype=residual.dtype, requires_grad=True)
            (transposed,) = torch.autograd.grad(self(probe), probe, residual)
        return transposed


Loss = Union[MeasurementOperator, TaskLoss]


def _check_volume(x: torch.Tensor, who: str) -> None:
    if x.dim() != 5:
        raise ValueError(f"{who} takes volumes (B, C, D, H, W), got shape {tuple(x.shape)}")


class Downsample(MeasurementOperator):
    """Trilinear downsampling by an integer ``scale`` per axis (``align_corners=False``): the
    official super-resolution operator. (B, C, S, S, S) -> (B, C, S/scale, S/scale, S/scale)."""

    def __init__(self, scale: int = 4):
        super().__init__()
        if not isinstance(scale, int) or scale < 1:
            raise ValueError(f"the downsampling scale must be an integer >= 1, got {scale!r}")
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_volume(x, "Downsample")
        size = []
        for edge in x.shape[2:]:
            if edge % self.scale:
                raise ValueError(f"volume edge {edge} is not divisible by the downsampling scale {self.scale}")
            size.append(edge // self.scale)
        return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class Mask(MeasurementOperator):
    """The known voxels: ``A(x) = mask * x`` (zero elsewhere), so ``y`` is the observed
    volume with anything at the unknown voxels (``Mask(mask)(observed)`` zeroes it).

    mask: bool or {0, 1} tensor broadcastable to the volumes, e.g. (S, S, S) or (B, 1, S, S, S).
    """

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        mask = torch.as_tensor(mask)
        if mask.dim() < 3:
            raise ValueError(f"the mask must cover the volume (at least (D, H, W)), got shape {tuple(mask.shape)}")
        self.register_buffer("mask", mask.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_volume(x, "Mask")
        return x * self.mask.to(x.dtype)

    def adjoint(self, residual: torch.Tensor, volume_shape: Sequence[int]) -> torch.Tensor:
        return (residual * self.mask.to(residual.dtype)).expand(volume_shape)


def gaussian_kernel1d(kernel_size: int, sigma: float) -> torch.Tensor:
    """Normalised 1D Gaussian taps (kernel_size,) fp32, centred."""
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    offsets = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (taps / taps.sum()).float()


class GaussianBlur(MeasurementOperator):
    """3D Gaussian blur (separable, zero padding, output the volume's shape); the official
    deblurring operator has kernel 5, sigma 2. With a symmetric kernel and zero padding
    the operator is its own transpose."""

    def __init__(self, kernel_size: int = 5, sigma: float = 2.0):
        super().__init__()
        self.kernel_size, self.sigma = kernel_size, float(sigma)
        self.register_buffer("taps", gaussian_kernel1d(kernel_size, sigma), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_volume(x, "GaussianBlur")
        C = x.shape[1]
        taps = self.taps.to(x.dtype)
        pad = self.kernel_size // 2
        for axis in range(3):  # depth, height, width
            shape = [1, 1, 1]
            shape[axis] = self.kernel_size
            weight = taps.view(1, 1, *shape).expand(C, 1, *shape)
            padding = [0, 0, 0]
            padding[axis] = pad
            x = F.conv3d(x, weight, padding=tuple(padding), groups=C)
        return x

    def adjoint(self, residual: torch.Tensor, volume_shape: Sequence[int]) -> torch.Tensor:
        return self(residual)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, sigma={self.sigma}"


# --------------------------------------------------------------------------- #
# X-ray projections (DiffDRR)
# --------------------------------------------------------------------------- #
XRAY_EXTRA = "pip install \"torch==$(your torch version)\" 'prdit_fast[xray]'  (DiffDRR; the pin keeps your torch)"


def view_angles(views: int | Sequence[float]) -> list[float]:
    """Projection angles in degrees about the volume's superior-inferior axis: the official
    geometry takes 1 view at 0 deg, 2 at 0 and 90 deg, N evenly spaced over 180 deg
    (0, 180/N, ...); a sequence is taken as the angles themselves."""
    if isinstance(views, int):
        if views < 1:
            raise ValueError(f"the number of X-ray views must be >= 1, got {views}")
        return [180.0 * n / views for n in range(views)]
    angles = [float(a) for a in views]
    if not angles:
        raise ValueError("give at least one X-ray view angle")
    return angles


def view_poses(angles: Sequence[float], source_distance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera poses of the views, as DiffDRR's Euler angles ("ZXY", degrees) and
    translations: (V, 3) rotations [angle, 0, 0] (a rotation about the volume's
    superior-inferior axis) and (V, 3) translations [0, source_distance, 0] (the source
    ``source_distance`` mm from the isocentre, anterior-posterior at 0 deg)."""
    if not source_distance > 0:
        raise ValueError(f"source_distance must be > 0 mm, got {source_distance!r}")
    rotations = torch.tensor([[a, 0.0, 0.0] for a in angles], dtype=torch.float32)
    translations = torch.tensor([[0.0, float(source_distance), 0.0]] * len(angles), dtype=torch.float32)
    return rotations, translations


def volume_to_density(x: torch.Tensor) -> torch.Tensor:
    """Model intensities in [-1, 1] (air -1) -> non-negative attenuation-like density (x + 1) / 2."""
    return (x + 1.0) * 0.5


class XrayProjection(MeasurementOperator):
    """Digitally reconstructed radiographs of each volume: (B, 1, S, S, S) -> (B, V, H, W).

    views: the number of views (``view_angles``) or their angles in degrees. The volume
    has isotropic voxels of ``spacing`` mm; the source is ``source_distance`` mm from the
    isocentre and ``sdd`` mm from a square detector of ``detector_size`` pixels of
    ``pixel_spacing`` mm. Rendering is DiffDRR's Siddon ray tracer on
    ``volume_to_density(x)``, differentiable in the volume. Needs the optional extra
    DiffDRR; without it construction raises ImportError naming it.
    """

    capturable = False  # DiffDRR's ray tracer has not been checked for CUDA graph capture

    def __init__(
        self,
        views: int | Sequence[float],
        volume_size: int,
        spacing: float = 2.0,
        sdd: float = 1020.0,
        source_distance: float = 850.0,
        detector_size: int = 128,
        pixel_spacing: float = 2.5,
    ):
        super().__init__()
        try:
            import torchio
            from diffdrr.data import read
            from diffdrr.drr import DRR
            from diffdrr.pose import convert

            from .orientation import canonical_affine
        except ImportError as e:
            raise ImportError(f"XrayProjection needs DiffDRR, an optional extra: {XRAY_EXTRA} ({e})") from e
        self.angles = view_angles(views)
        rotations, translations = view_poses(self.angles, source_distance)
        # our array's own affine (voxel (d, h, w) -> RAS+ mm, as our NIfTI files carry it): DiffDRR
        # places the volume in its world by it, so the views rotate about the superior-inferior
        # axis with 0 deg antero-posterior, as DiffDRR renders that file itself
        affine = canonical_affine((spacing,) * 3)
        template = torchio.ScalarImage(tensor=torch.zeros(1, volume_size, volume_size, volume_size), affine=affine)
        self.drr = DRR(read(template), sdd=sdd, height=detector_size, delx=pixel_spacing)
        pose = convert(rotations, translations, parameterization="euler_angles", convention="ZXY", degrees=True)
        source, target = self.drr.detector(pose, None)
        self.register_buffer("source", source, persistent=False)
        self.register_buffer("target", target, persistent=False)
        self.detector_size = detector_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_volume(x, "XrayProjection")
        if x.shape[1] != 1:
            raise ValueError(f"XrayProjection renders one-channel CT volumes, got {x.shape[1]} channels")
        density = volume_to_density(x)
        images = [self.drr.render(density[b, 0], self.source, self.target) for b in range(x.shape[0])]
        V, side = len(self.angles), self.detector_size
        return torch.stack([img.reshape(V, side, side) for img in images])


# --------------------------------------------------------------------------- #
# Task losses and the guidance gradient
# --------------------------------------------------------------------------- #
def data_consistency(loss: Loss, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-volume data-consistency residual (B,): ``||A(x0_b) - y_b||_2`` for an operator;
    a callable's value (a scalar is returned as shape (1,))."""
    if isinstance(loss, MeasurementOperator):
        residual = loss(x0) - y
        return torch.linalg.vector_norm(residual.reshape(residual.shape[0], -1), dim=1)
    if not callable(loss):
        raise TypeError(f"loss must be a MeasurementOperator or a callable (x0_hat, y) -> scalar, got {type(loss).__name__}")
    return loss(x0, y).reshape(-1)


def guidance_gradient(loss: Loss, x0_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """g = dL/dx0_hat with L = sum over the batch of ``data_consistency``; x0_hat is
    detached first, so nothing flows into the network. Returns g shaped as x0_hat."""
    with torch.enable_grad():
        x0 = x0_hat.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(data_consistency(loss, x0, y).sum(), x0)
    return grad


# --------------------------------------------------------------------------- #
# The official task settings (spec section 15)
# --------------------------------------------------------------------------- #
# k, rho (guidance_scale), decay, cutoff, w (noise_weight). X-ray and super-resolution are
# the official settings; the official infilling and deblurring samplers use losses of
# their own, so these two tasks borrow the super-resolution settings.
TASK_SETTINGS: dict[str, dict] = {
    "xray": {"k": 4, "guidance_scale": 0.7, "guidance_decay": "cosine", "guidance_cutoff": 20, "noise_weight": 0.95},
    "super-resolution": {
        "k": 2, "guidance_scale": 20.0, "guidance_decay": "none", "guidance_cutoff": 100, "noise_weight": 0.9,
    },
    "infill": {"k": 2, "guidance_scale": 20.0, "guidance_decay": "none", "guidance_cutoff": 100, "noise_weight": 0.9},
    "deblur": {"k": 2, "guidance_scale": 20.0, "guidance_decay": "none", "guidance_cutoff": 100, "noise_weight": 0.9},
}
GUIDANCE_TASKS = tuple(TASK_SETTINGS)
SR_SCALE = 4  # the official super-resolution factor
BLUR_KERNEL, BLUR_SIGMA = 5, 2.0  # the official deblurring blur
OFFICIAL_SIZE = 128  # the TF-PRDiT prior's volume edge, where TASK_SETTINGS were tuned

# The guidance gradient g = d||A(x0) - y||_2 / dx0 = A^T r / ||r|| has per-voxel entries
# ~ 1 / sqrt(M) for M measured values, so one rho pulls a 32^3 volume's voxels 8x harder
# than a 128^3 one's. 'per-voxel' scales rho by sqrt(M / M_official) (M_official: the
# measured values of the task at the official size), which keeps each voxel's pull of
# the official settings at any size and any mask; at the official size it is the same.
GUIDANCE_PARAMETRIZATIONS = ("auto", "official", "per-voxel")


def official_measured_values(task: str) -> int | None:
    """M of ``task``'s official setting at the official size (None: X-rays, whose
    detector defines its own scale; they keep the official parametrization)."""
    return {"super-resolution": (OFFICIAL_SIZE // SR_SCALE) ** 3, "deblur": OFFICIAL_SIZE**3,
            "infill": OFFICIAL_SIZE**3}.get(task)


def guidance_parametrization(task: str, size: int, scale: int, requested: str = "auto") -> str:
    """'official' or 'per-voxel'. 'auto': official for the official settings at the
    official size (and for X-rays), per-voxel otherwise."""
    if requested not in GUIDANCE_PARAMETRIZATIONS:
        raise ValueError(f"guidance parametrization must be one of {GUIDANCE_PARAMETRIZATIONS}, got {requested!r}")
    if requested != "auto":
        return requested
    official = official_measured_values(task) is None or (
        size == OFFICIAL_SIZE and (task != "super-resolution" or scale == SR_SCALE))
    return "official" if official else "per-voxel"


def effective_guidance_scale(rho: float, task: str, measured_values: int, parametrization: str) -> float:
    """The rho the sampler applies to g: ``rho`` itself ('official') or scaled by
    sqrt(M / M_official) ('per-voxel'; X-rays stay official)."""
    reference = official_measured_values(task)
    if parametrization == "official" or reference is None:
        return float(rho)
    return float(rho) * (measured_values / reference) ** 0.5
