"""Test set-up: kernels run under the Triton interpreter on machines without a GPU (set before triton loads)."""
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The kernel modules load now, under the interpreter: a test that unsets TRITON_INTERPRET (to see a backend
    # refuse) must not be the first to load them, or every later kernel test in the process runs without it.
    for module in ("uniter_fast.kernels.attention_triton", "uniter_fast.kernels.ot_triton"):
        try:
            importlib.import_module(module)
        except ImportError:  # no triton: the tests that need it say so
            pass
os.environ.pop("UNITER_FAST_BACKEND", None)  # tests choose backends explicitly


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
