"""Installs `uniter_fast` with `kernels/` as `uniter_fast.kernels`, the C++ region-store reader
`uniter_fast._regionstore` (csrc/, pybind11, no torch ABI) and the `uniter-fast` command."""
from setuptools import setup

try:  # a build requirement (pyproject.toml); absent only in a --no-build-isolation install on a bare machine
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:
    Pybind11Extension = build_ext = None

PACKAGES = {
    "uniter_fast": "uniter_fast",
    "uniter_fast.kernels": "kernels",
    "uniter_fast.model": "uniter_fast/model",
    "uniter_fast.objectives": "uniter_fast/objectives",
    "uniter_fast.data": "uniter_fast/data",
    "uniter_fast.data.convert": "uniter_fast/data/convert",
    "uniter_fast.train": "uniter_fast/train",
    "uniter_fast.eval": "uniter_fast/eval",
    "uniter_fast.viz": "uniter_fast/viz",
}

# Portable flags only: no -march, the SIMD paths (F16C/AVX-512 conversion, PCLMUL CRC) are chosen at run time.
EXTENSIONS = [] if Pybind11Extension is None else [
    Pybind11Extension(
        "uniter_fast._regionstore",
        sources=["csrc/regionstore.cpp", "csrc/crc32.cpp", "csrc/half.cpp", "csrc/copy.cpp"],
        depends=["csrc/copy.h", "csrc/crc32.h", "csrc/format.h", "csrc/half.h"],
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3", "-pthread"],
        extra_link_args=["-pthread"],
    ),
]

if not EXTENSIONS:
    print("warning: pybind11 is not installed: building without the C++ region-store reader "
          "(uniter_fast.data.RegionStore will say so when used)")

setup(
    name="uniter-fast",
    version="0.1.0",
    description="UNITER pre-training and fine-tuning: faithful to the original, with fused kernels and DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    ext_modules=EXTENSIONS,
    cmdclass={"build_ext": build_ext} if build_ext else {},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "deepspeed>=0.16",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "lmdb>=1.4",
        "msgpack>=1.0",
        "lz4>=4",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2", "pytest-benchmark>=4", "transformers>=4.40", "pot>=0.9.4"],
    },
    entry_points={"console_scripts": ["uniter-fast=uniter_fast.cli:main"]},
)
