"""Is the service alive, and is it ready? Liveness fails when the engine worker hangs or an engine
error cannot be recovered in this process (a sticky CUDA error); readiness is false while the
pipeline loads, while the service drains before it stops, and whenever it is not alive."""
from __future__ import annotations

import time
from dataclasses import dataclass

# CUDA errors after which the context is unusable: every later call fails too (a sticky error).
STICKY_CUDA_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                      "illegal instruction", "misaligned address", "hardware stack error", "uncorrectable ECC",
                      "cudaErrorIllegalAddress", "cudaErrorLaunchFailure", "CUDA_ERROR_ILLEGAL_ADDRESS")


def is_fatal(exc: BaseException) -> bool:
    """True when an engine error leaves this process unable to run engines again."""
    from runtime.errors import FatalEngineError

    if isinstance(exc, FatalEngineError):
        return True
    text = str(exc).lower()
    return "cuda" in text and any(marker.lower() in text for marker in STICKY_CUDA_ERRORS)


@dataclass
class Health:
    """The service's state, read by /healthz and /readyz. `hang_timeout`: seconds one batch may run
    before the worker counts as hung."""

    hang_timeout: float = 300.0
    loaded: bool = False
    load_error: str | None = None
    draining: bool = False
    fatal: str | None = None

    def liveness(self, batcher) -> tuple[bool, str]:
        if self.fatal:
            return False, f"an engine failed and cannot recover in this process: {self.fatal}"
        if self.load_error:
            return False, f"the pipeline could not be loaded: {self.load_error}"
        started = getattr(batcher, "running_since", None)
        if started is not None and time.perf_counter() - started > self.hang_timeout:
            return False, (f"the engine worker has run one batch for {time.perf_counter() - started:.0f} s "
                           f"(hang timeout {self.hang_timeout:.0f} s)")
        return True, "ok"

    def readiness(self, batcher) -> tuple[bool, str]:
        alive, why = self.liveness(batcher)
        if not alive:
            return False, why
        if not self.loaded:
            return False, "loading"
        if self.draining:
            return False, "draining"
        return True, "ready"
