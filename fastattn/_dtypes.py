"""The element types fastattn computes in, and how each reaches the kernels.

float32 and float64 are computed in themselves.  bfloat16 (``ml_dtypes``'s,
the type JAX and the ONNX tooling use) and float16 are storage types: the
kernels widen them to float32 where they pack an operand and round results
back where they store them, so every sum runs in float32.  bfloat16 arrays
reach the compiled layer as uint16 views (numpy gives the ml_dtypes type no
fixed type number); float16 as itself.

``precision`` (the modules' and scaled_dot_product_attention's keyword) is
the type the products' operands are held in, whatever the inputs' type: a
float32 pipeline with ``precision="bfloat16"`` keeps its float32 inputs and
outputs while the weights and the activations between the kernels are
bfloat16.
"""

from __future__ import annotations

from typing import Any, Optional

import ml_dtypes
import numpy as np

__all__ = ["BFLOAT16", "FLOAT16", "FLOAT_DTYPES", "HALF_DTYPES", "DTYPE_NAMES", "is_half",
           "compute_dtype", "kernel_view", "as_dtype", "widen"]

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT16 = np.dtype(np.float16)
HALF_DTYPES = (BFLOAT16, FLOAT16)
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64)) + HALF_DTYPES
DTYPE_NAMES = "float32, float64, bfloat16 or float16"

_BY_NAME = {"bfloat16": BFLOAT16, "bf16": BFLOAT16, "float16": FLOAT16, "fp16": FLOAT16,
            "half": FLOAT16, "float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}


def is_half(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is a 16-bit storage type (computed in float32)."""
    return dtype in HALF_DTYPES


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The type the kernels compute in for operands of ``dtype``."""
    return np.dtype(np.float32) if dtype in HALF_DTYPES else dtype


def kernel_view(a: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """``a`` as the compiled layer reads it: bfloat16 as a uint16 view (no copy)."""
    if a is not None and a.dtype == BFLOAT16:
        return a.view(np.uint16)
    return a


def as_dtype(value: Any, name: str = "dtype") -> Optional[np.dtype]:
    """A float element type from what a user writes for one: a numpy dtype or
    type, ``ml_dtypes.bfloat16``, a torch dtype, or a name ("bfloat16",
    "float16", "float32", "float64"); None stays None."""
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in _BY_NAME:
        return _BY_NAME[value.lower()]
    text = str(value)
    if text.startswith("torch."):
        key = text[len("torch."):]
        if key in _BY_NAME:
            return _BY_NAME[key]
    try:
        dt = np.dtype(value)
    except TypeError:
        raise TypeError(f"{name} must be one of {DTYPE_NAMES}, got {value!r}") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of {DTYPE_NAMES}, got {dt}")
    return dt


def widen(a: np.ndarray) -> np.ndarray:
    """A 16-bit array as float32 (exact); others as they are."""
    return a.astype(np.float32) if a.dtype in HALF_DTYPES else a
