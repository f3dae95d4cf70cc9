"""Fused Triton ops. One file per op: ``@triton.jit`` kernels, the launcher, the
``torch.autograd.Function``, then the functional API. Each has a plain-torch reference
that the tests compare against."""
