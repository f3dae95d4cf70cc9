"""``XrayProjection`` on DiffDRR (the optional ``xray`` extra; CI installs it in a step of
its own, ``.ci/run``): the adjoint, a gradient check, the geometry against DiffDRR's own
reading of the same volume as a NIfTI file, the anatomy of the views, and a tiny X-ray
reconstruction end to end. Skipped where DiffDRR is not installed."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffdrr")

from prdit_fast.measurements import XrayProjection, volume_to_density  # noqa: E402

S, DETECTOR = 12, 16


@pytest.fixture(scope="module")
def op():
    return XrayProjection(2, volume_size=S, spacing=2.0, detector_size=DETECTOR, pixel_spacing=2.0)


def test_adjoint(op):
    torch.manual_seed(0)
    x = torch.rand(1, 1, S, S, S) * 2 - 1
    r = torch.randn(1, 2, DETECTOR, DETECTOR)
    linear = op(x) - op(torch.zeros_like(x))  # A is affine: density (x + 1) / 2
    lhs = float((linear * r).sum())
    rhs = float((x * op.adjoint(r, x.shape)).sum())
    assert abs(lhs - rhs) <= 1e-4 * max(abs(lhs), 1.0), (lhs, rhs)


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient")
def test_gradcheck_on_a_tiny_volume():
    small = XrayProjection(1, volume_size=4, spacing=4.0, detector_size=4, pixel_spacing=4.0)
    x = (torch.rand(1, 1, 4, 4, 4) * 2 - 1).requires_grad_(True)
    # DiffDRR renders in float32: finite differences with a float32-sized step and tolerance
    assert torch.autograd.gradcheck(small, (x,), eps=1e-2, atol=2e-2, rtol=2e-2, nondet_tol=1e-5)


def _centroid(image: torch.Tensor) -> tuple[float, float]:
    image = image.double()
    r = torch.arange(image.shape[0], dtype=torch.float64)
    return float((image.sum(1) * r).sum() / image.sum()), float((image.sum(0) * r).sum() / image.sum())


def _block(axis: int, start: int) -> torch.Tensor:
    x = -torch.ones(1, 1, S, S, S)
    where = [slice(5, 7)] * 3
    where[axis] = slice(start, start + 2)
    x[(0, 0, *where)] = 1.0
    return x


def test_views_follow_the_patient(op):
    """0 deg is antero-posterior, 90 deg lateral, both about the superior-inferior axis;
    superior is up (low rows), the patient's right on the image's left at 0 deg."""
    d, h, w = 0, 1, 2
    sup, inf = (_centroid(img) for img in (op(_block(d, 1))[0, 0], op(_block(d, 9))[0, 0]))
    assert sup[0] < inf[0] - 3 and sup[1] == pytest.approx(inf[1], abs=1e-3)
    for view in (0, 1):  # a shift along the rotation axis moves both images alike
        assert _centroid(op(_block(d, 1))[0, view]) == pytest.approx(sup, abs=1e-3)
    ant, post = op(_block(h, 1))[0], op(_block(h, 9))[0]
    assert _centroid(ant[0]) == pytest.approx(_centroid(post[0]), abs=1e-3)  # 0 deg looks along A-P
    assert abs(_centroid(ant[1])[1] - _centroid(post[1])[1]) > 3  # 90 deg sees it
    right, left = op(_block(w, 1))[0], op(_block(w, 9))[0]
    assert _centroid(right[0])[1] < _centroid(left[0])[1] - 3
    assert _centroid(right[1]) == pytest.approx(_centroid(left[1]), abs=1e-3)  # 90 deg looks along L-R


def test_same_images_as_diffdrr_reading_our_nifti(op, tmp_path):
    """DiffDRR's own reader, given the volume as prdit_fast writes it (affine and all),
    renders the same radiographs: the operator uses DiffDRR's conventions, not its own."""
    from diffdrr.data import read
    from diffdrr.drr import DRR
    from diffdrr.pose import convert

    from prdit_fast.measurements import view_poses
    from prdit_fast.volumes import save_nifti

    torch.manual_seed(1)
    x = torch.rand(1, 1, S, S, S) * 2 - 1
    save_nifti(tmp_path / "density.nii.gz", volume_to_density(x)[0, 0], spacing=(2.0,) * 3, dtype="float32")
    subject = read(str(tmp_path / "density.nii.gz"))
    drr = DRR(subject, sdd=1020.0, height=DETECTOR, delx=2.0)
    rotations, translations = view_poses(op.angles, 850.0)
    pose = convert(rotations, translations, parameterization="euler_angles", convention="ZXY", degrees=True)
    source, target = drr.detector(pose, None)
    theirs = drr.render(subject.volume.data[0].float(), source, target).reshape(2, DETECTOR, DETECTOR)
    torch.testing.assert_close(op(x)[0], theirs, rtol=1e-5, atol=1e-5)


def test_tiny_xray_reconstruction_end_to_end(tmp_path, capsys):
    """prdit-fast reconstruct --task xray on a 16^3 phantom with the pass-through prior:
    radiographs simulated, the sampler guided by them, files and residuals written."""
    import nibabel as nib
    from test_cli_reconstruct import prior_with_metadata

    from prdit_fast.cli import main
    from prdit_fast.phantom import chest_phantom
    from prdit_fast.volumes import save_nifti

    ckpt = prior_with_metadata(tmp_path / "prior.pt", {"voxel_size_mm": [16.0] * 3, "intensity": "phantom"})
    save_nifti(tmp_path / "ct.nii.gz", chest_phantom(16, seed=0), spacing=(16.0,) * 3, dtype="float32")
    runs = {}
    for name, rho in (("guided", "0.7"), ("unguided", "0")):
        assert main(["reconstruct", "--ckpt", str(ckpt), "--task", "xray", "--views", "2", "--input",
                     str(tmp_path / "ct.nii.gz"), "--truth", str(tmp_path / "ct.nii.gz"), "--steps", "24",
                     "--guidance-scale", rho, "--out", str(tmp_path / name)]) == 0
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    made = nib.load(str(tmp_path / "guided" / "reconstruction.nii.gz"))
    assert made.shape == (16,) * 3 and np.all(np.isfinite(np.asarray(made.dataobj)))
    assert runs["guided"]["guidance_parametrization"] == "official" and runs["guided"]["units"] == "HU"
    assert runs["guided"]["residual"] < runs["unguided"]["residual"], runs
