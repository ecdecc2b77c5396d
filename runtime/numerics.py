"""Shared numerics: the tolerance of a parity check, cosine similarity, PSNR and the quality gates.
Used by export checks, engine builds, quality reports and benchmarks alike (numpy only)."""
from __future__ import annotations

import math

# Minimum cosine similarity of a lowered component against its fp32 graph; below it, it is refused.
COSINE_GATES = {"fp16": 0.999, "int8": 0.98}


def tolerance(atol: float, rtol: float, reference) -> float:
    """Allowed max |err| against a reference output: atol + rtol * max|reference|."""
    import numpy as np

    return atol + rtol * float(np.max(np.abs(reference)))


def max_abs_err(actual, expected) -> float:
    """Largest absolute difference; infinite when `actual` holds a NaN or an infinity."""
    import numpy as np

    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if not np.isfinite(actual).all():
        return float("inf")
    return float(np.max(np.abs(actual - expected))) if expected.size else 0.0


def cosine(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom else (1.0 if not a.any() and not b.any() else 0.0)


def psnr(a, b) -> float | None:
    """PSNR in dB of images in [0, 1]; None when identical."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return None if mse == 0 else 10 * math.log10(1.0 / mse)
