"""What a benchmark measures with: stage timers inside real pipeline calls, peak memory, the
machine's matmul peak, and UNet FLOPs."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager


def synchronize(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


class StageTimer:
    """Times the text encoders, UNet and VAE decoder of a pipeline while it runs: hooks on the
    modules' forward, and a wrapper around vae.decode (diffusers calls decode, not forward)."""

    def __init__(self, pipe, device):
        self.device = device
        # every text encoder the pipeline has (SDXL: two), each its own stage
        self.text_encoders = tuple(n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None)
        self.times: dict[str, list[float]] = {**{n: [] for n in self.text_encoders}, "unet": [], "vae_decode": []}
        self._start: dict[str, float] = {}
        for name in (*self.text_encoders, "unet"):
            module = getattr(pipe, name)
            module.register_forward_pre_hook(lambda m, a, n=name: self._begin(n))
            module.register_forward_hook(lambda m, a, o, n=name: self._end(n))
        decode = pipe.vae.decode

        def timed_decode(*args, **kwargs):
            self._begin("vae_decode")
            out = decode(*args, **kwargs)
            self._end("vae_decode")
            return out

        pipe.vae.decode = timed_decode

    def _begin(self, name):
        synchronize(self.device)
        self._start[name] = time.perf_counter()

    def _end(self, name):
        synchronize(self.device)
        self.times[name].append(time.perf_counter() - self._start.pop(name))

    def reset(self):
        for v in self.times.values():
            v.clear()


class PeakMemory:
    """Peak resident memory while a block runs: RSS (psutil) sampled every 10 ms on CPU, the
    allocator's peak on CUDA (torch allocations; TensorRT's own weights are outside it)."""

    def __init__(self, device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        import psutil

        return psutil.Process().memory_info().rss

    @contextmanager
    def measure(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.clear()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.rss())
                self._stop.wait(0.01)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()
            self.peak = max(self.peak, self.rss())


def matmul_peak_gflops(device, n: int = 2048, min_run_time: float = 0.5) -> float:
    """fp32 GFLOP/s of an n x n matmul on `device` (torch.utils.benchmark, fastest block): the
    machine's practical ceiling, measured in the same run as what is compared with it."""
    import torch
    from torch.utils.benchmark import Timer

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    measurement = Timer("torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b},
                        num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=min_run_time)
    return 2 * n**3 / min(measurement.times) / 1e9


def module_flops(module, *args) -> int:
    """FLOPs of one call (torch's FlopCounterMode: matmuls and convolutions)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    return int(counter.get_total_flops())
