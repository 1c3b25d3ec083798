"""Build script for procrustes_kernels.

The package is pure Python plus optional compiled backends; importing it never needs a GPU or a
compiler.
"""

from setuptools import find_packages, setup

setup(
    name="procrustes_kernels",
    version="0.1.0",
    description="Train PyTorch networks on a pruned weight budget (DropBack / Procrustes).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["procrustes_kernels", "procrustes_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "demo": ["tqdm", "matplotlib", "scikit-learn"],
        "test": ["pytest", "hypothesis", "triton>=3.6", "tqdm", "matplotlib", "scikit-learn"],
    },
)
