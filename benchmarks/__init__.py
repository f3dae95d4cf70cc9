"""Benchmarks and the GPU-session scripts (the native CUDA library's bindings are ``kernels.native``).

Not part of the installed package: run from a checkout, e.g. ``python -m benchmarks.profile_step``
or ``pytest benchmarks/ --benchmark-only``. Being a package lets tests and scripts import
each other by name (``from benchmarks import bench_sampling``) instead of loading files by path.
"""
