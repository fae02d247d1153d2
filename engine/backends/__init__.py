"""Backends of the model runner: where tensors live and which kernels run (see base.py).

    device "cpu",  backend "torch"   the reference torch code (the default on a CPU)
    device "cuda", backend "triton"  Triton kernels on the GPU (the default with a GPU)
    device "cpu",  backend "triton"  the same Triton kernels on CPU tensors under
                                     TRITON_INTERPRET=1 (slow; how CI checks the GPU code)
"""

from __future__ import annotations

import os

from engine.kernels.base import cuda_usable

from .base import Backend

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "torch", "triton")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(device: str = "auto", backend: str = "auto") -> tuple[str, str]:
    """(device, backend) after "auto": CUDA with Triton when a GPU and Triton are there, else
    the CPU with torch. ValueError names what cannot run here."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {list(DEVICES)}, got {device!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if device == "auto":
        device = "cuda" if cuda_usable() and not interpreting() else "cpu"
    if backend == "auto":
        backend = "triton" if device == "cuda" else "torch"
    if device == "cuda":
        if not cuda_usable():
            raise ValueError("device 'cuda' needs a CUDA GPU and Triton; none is usable here")
        if backend != "triton":
            raise ValueError("on device 'cuda' the backend is 'triton'")
    elif backend == "triton" and not interpreting():
        raise ValueError("backend 'triton' on device 'cpu' runs under Triton's interpreter: "
                         "set TRITON_INTERPRET=1")
    return device, backend


def make_backend(device: str = "auto", backend: str = "auto") -> Backend:
    device, backend = resolve(device, backend)
    if backend == "torch":
        from .torch_ref import TorchBackend
        return TorchBackend(device)
    from .triton import TritonBackend
    return TritonBackend(device)


__all__ = ["BACKENDS", "DEVICES", "Backend", "cuda_usable", "make_backend", "resolve"]
