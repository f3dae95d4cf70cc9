"""The native CUDA library: CUDA C++ sources (built by ``kernels/build.sh`` with CMake into
``build/lib/``), their ctypes bindings (``kernels.native``) and their tests
(``kernels/test_native.py``, in the README's test command).

Not part of the installed package: run from a checkout (``from kernels import native``).
"""
