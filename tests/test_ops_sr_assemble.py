"""The PRDiT-SR output assembly (prdit_fast.ops.sr_assemble) against its plain-torch composition:
upsample_prediction + unpatchify / volume_to_tokens. fp32 under the Triton interpreter on odd
grids and a 3x factor: 1e-6 absolute (the trilinear weights' products only)."""
from __future__ import annotations

import pytest
import torch

from prdit_fast.layout import volume_to_tokens
from prdit_fast.ops.sr_assemble import sr_assemble, sr_assemble_reference


@pytest.mark.parametrize(
    "batch, channels, lo, size, stride",
    [(3, 1, 8, 16, 4), (1, 2, 5, 10, 5), (2, 1, 4, 12, 4), (2, 1, 3, 6, 2)],  # odd grids, a 3x factor
)
def test_sr_assemble_kernel_matches_composition(batch, channels, lo, size, stride):
    """The fused upsample + head sum (Triton; the interpreter on the CPU) against
    upsample_prediction + unpatchify / volume_to_tokens, fp32: 1e-6 (rounding of the
    trilinear weights' products only)."""
    base = torch.randn(batch, 2 * channels, lo, lo, lo)
    head = torch.randn(batch, (size // stride) ** 3, stride**3 * 2 * channels)
    for to in ("volume", "tokens"):
        for h in (None, head, head.to(torch.bfloat16)):
            got = sr_assemble(base, size, stride, h, to, impl="triton")
            want = sr_assemble_reference(base, size, stride, h, to)
            assert got.dtype == torch.float32 and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    volume = sr_assemble_reference(base, size, stride, head, "volume")
    assert torch.equal(volume_to_tokens(volume, stride), sr_assemble_reference(base, size, stride, head, "tokens"))
    with pytest.raises(ValueError, match="multiple"):
        sr_assemble(base, size + 1, stride, impl="triton")
    with pytest.raises(ValueError, match="head tokens"):
        sr_assemble(base, size, stride, head[:, 1:], impl="triton")
    with pytest.raises(ValueError, match="fp32"):
        sr_assemble(base.double(), size, stride, impl="triton")
