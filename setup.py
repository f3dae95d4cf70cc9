from setuptools import find_packages, setup

setup(
    name="prdit_fast",
    version="0.1.0",
    description="PRDiT (Pixel-Level Residual Diffusion Transformer) reference and fast backend for 3D CT",
    packages=find_packages(include=["prdit_fast", "prdit_fast.*"]),
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
        "xray": ["diffdrr>=0.6"],  # XrayProjection; install with the torch pin: pip install "torch==X" ".[xray]"
        "test": ["pytest", "pytest-benchmark", "triton>=3.0", "pydicom>=2.4", "scipy", "matplotlib", "monai"],
    },
    entry_points={"console_scripts": ["prdit-fast=prdit_fast.cli:main"]},
)
