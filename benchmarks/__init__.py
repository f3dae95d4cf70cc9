"""Benchmarks, GPU-session scripts and the optional native CUDA library's bindings.

Not part of the installed package: run from a checkout, e.g. ``python -m benchmarks.profile_step``
or ``pytest benchmarks/ --benchmark-only``. Being a package lets tests and scripts import
each other by name (``from benchmarks import native``) instead of loading files by path.
"""
