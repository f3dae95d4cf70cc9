"""ops.ms_ssim_cross: the fused per-pair MS-SSIM term (Triton, interpreter on CPU) against its
plain-torch form, fp32, odd shapes, both the intermediate and the last scale."""
import pytest
import torch
import torch.nn.functional as F

from prdit_fast.ops.common import triton_importable
from prdit_fast.ops.ms_ssim_cross import ms_ssim_cross, ms_ssim_cross_reference

needs_triton = pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")


@needs_triton
@pytest.mark.parametrize("shape, last", [((5, 7, 9), False), ((11, 6, 13), True), ((3, 3, 3), True)])
def test_fused_term_equals_the_torch_form(shape, last):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.rand(4, *shape, generator=g) * 2 - 1
    window = torch.rand(27, generator=g)
    window /= window.sum()
    kernel = window.view(1, 1, 3, 3, 3)
    mu = F.conv3d(x[:, None], kernel)[:, 0]
    sigma = F.conv3d((x * x)[:, None], kernel)[:, 0] - mu * mu
    pairs = torch.tensor([[0, 1], [2, 3], [1, 3], [3, 0], [2, 2]])
    c1, c2 = 1e-4, 9e-4
    expected = ms_ssim_cross_reference(x, mu, sigma, pairs, window, c1, c2, last)
    fused = ms_ssim_cross(x, mu, sigma, pairs, window, c1, c2, last, impl="triton")
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
    assert fused[4] == pytest.approx(1.0, rel=1e-5)  # a volume against itself: cs = 1 (and luminance 1)


def test_shapes_are_checked():
    x = torch.zeros(2, 5, 5, 5)
    with pytest.raises(ValueError, match=r"mu, sigma \(N, D-2, H-2, W-2\)"):
        ms_ssim_cross(x, torch.zeros(2, 5, 5, 5), torch.zeros(2, 5, 5, 5), torch.tensor([[0, 1]]),
                      torch.ones(27) / 27, 1e-4, 9e-4, False)
