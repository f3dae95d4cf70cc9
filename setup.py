import os
import shutil
import subprocess
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def build_native_library() -> None:
    """Build kernels/ into prdit_fast/_native/ with kernels/build.sh when nvcc is found.

    Optional for an install: without nvcc, with PRDIT_SKIP_NATIVE=1, or when the build
    fails, this prints why and the package works without it (prdit_fast.native.status()
    says so). CI runs kernels/build.sh itself, so there a compile error fails the run.
    """
    script = ROOT / "kernels" / "build.sh"
    if os.environ.get("PRDIT_SKIP_NATIVE") == "1" or not script.is_file():
        return
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").is_file():
        print("prdit_fast: nvcc not found, skipping the native CUDA library (optional)")
        return
    try:
        subprocess.run(["bash", str(script)], check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"prdit_fast: building the native CUDA library failed ({err}); installing without it")


class BuildPyWithNative(build_py):
    """build_py that first builds the native library in place, so both regular installs
    (which copy prdit_fast/_native/*.so as package data) and editable installs (which
    load it from the source tree) find it."""

    def run(self):
        build_native_library()
        super().run()


setup(
    cmdclass={"build_py": BuildPyWithNative},
    name="prdit_fast",
    version="0.1.0",
    description="PRDiT (Pixel-Level Residual Diffusion Transformer) reference and fast backend for 3D CT",
    packages=find_packages(include=["prdit_fast", "prdit_fast.*"]),
    package_data={"prdit_fast": ["_native/*.so"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "nibabel",
        "safetensors",
        "pillow",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "data": ["pydicom>=2.4", "scipy"],
        "bench": ["matplotlib", "pytest-benchmark"],
        "flash": ["flash-attn"],
        "xformers": ["xformers"],
        "eval": ["scipy", "monai"],
        "monitor": ["tensorboard", "matplotlib"],  # training curves: event files, `prdit-fast plot`; wandb optional
        "test": ["pytest", "pytest-benchmark", "triton>=3.0", "pydicom>=2.4", "scipy", "matplotlib", "monai"],
    },
    entry_points={"console_scripts": ["prdit-fast=prdit_fast.cli:main"]},
)
