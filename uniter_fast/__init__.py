"""uniter_fast: pre-train and fine-tune UNITER, faithful to the original and faster.

Importing the package touches no GPU and needs no working triton: kernels are imported lazily.
"""
from uniter_fast.config import UniterConfig

__version__ = "0.1.0"

__all__ = ["UniterConfig", "__version__"]
