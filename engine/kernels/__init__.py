"""Backends for ternary projections. The runner calls `ternary_linear(...)` and never knows which
backend answered: every backend reproduces DESIGN section 2's integer arithmetic."""

from .base import PackedWeight, TernaryLinear, available_backends, resolve_backend, ternary_linear

__all__ = ["PackedWeight", "TernaryLinear", "available_backends", "resolve_backend", "ternary_linear"]
