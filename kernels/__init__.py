"""uniter_fast.kernels: the performance ops (optimal transport, variable-length attention).

Imports torch (and triton, lazily) only; never the model. Every op has a plain-PyTorch reference in
`reference.py` (the CPU path and the tests' oracle) and a dispatching functional API in its own module.
"""
