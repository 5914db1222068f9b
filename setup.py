"""Installs `uniter_fast` with `kernels/` as `uniter_fast.kernels` and the `uniter-fast` command."""
from setuptools import setup

PACKAGES = {
    "uniter_fast": "uniter_fast",
    "uniter_fast.kernels": "kernels",
    "uniter_fast.model": "uniter_fast/model",
    "uniter_fast.objectives": "uniter_fast/objectives",
    "uniter_fast.data": "uniter_fast/data",
    "uniter_fast.train": "uniter_fast/train",
    "uniter_fast.eval": "uniter_fast/eval",
    "uniter_fast.viz": "uniter_fast/viz",
}

setup(
    name="uniter-fast",
    version="0.1.0",
    description="UNITER pre-training and fine-tuning: faithful to the original, with fused kernels and DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "deepspeed>=0.16",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "transformers>=4.40", "pot>=0.9.4"],
    },
    entry_points={"console_scripts": ["uniter-fast=uniter_fast.cli:main"]},
)
