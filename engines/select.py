"""`--backend auto`: TensorRT when it imports and a CUDA GPU exists, else ONNX Runtime on CUDA,
else ONNX Runtime on CPU; the choice comes with the reason."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from runtime.errors import BuildError

BACKENDS = ("onnxruntime", "tensorrt")


@dataclass(frozen=True)
class Machine:
    """What the choice depends on, probed once (tests pass their own)."""

    tensorrt: str | None  # version, or None when `import tensorrt` fails
    tensorrt_error: str | None
    cuda_gpu: str | None  # torch's name for GPU 0, or None
    ort_providers: tuple[str, ...]

    @classmethod
    def probe(cls) -> Machine:
        try:
            version, error = str(importlib.import_module("tensorrt").__version__), None
        except Exception as exc:  # ImportError, or a broken install raising OSError on its libraries
            version, error = None, f"{type(exc).__name__}: {exc}"
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        try:
            import onnxruntime

            providers = tuple(onnxruntime.get_available_providers())
        except ImportError:
            providers = ()
        return cls(version, error, gpu, providers)


@dataclass(frozen=True)
class Choice:
    backend: str
    device: str
    reason: str


def choose_backend(requested: str = "auto", device: str | None = None, machine: Machine | None = None) -> Choice:
    """Resolve `requested` ("auto" or a backend name) and `device` (None: the backend's natural one)."""
    if requested not in ("auto", *BACKENDS):
        raise BuildError(f"unknown backend {requested!r}; choose auto, {', '.join(BACKENDS)}")
    if requested == "tensorrt":
        if device not in (None, "cuda"):
            raise BuildError(f"the tensorrt backend builds for CUDA GPUs; --device {device} applies to onnxruntime")
        return Choice("tensorrt", "cuda", "requested")
    if requested == "onnxruntime":
        return Choice("onnxruntime", device or "cpu", "requested")
    machine = machine or Machine.probe()
    if device == "cpu":
        return Choice("onnxruntime", "cpu", "--device cpu: TensorRT builds only for GPUs")
    if machine.tensorrt and machine.cuda_gpu:
        return Choice("tensorrt", "cuda", f"TensorRT {machine.tensorrt} imports and CUDA GPU {machine.cuda_gpu} is present")
    why_not = ("no CUDA GPU visible to torch" if machine.tensorrt else
               f"tensorrt does not import ({machine.tensorrt_error or 'not installed'})")
    if machine.cuda_gpu and "CUDAExecutionProvider" in machine.ort_providers:
        return Choice("onnxruntime", "cuda",
                      f"{why_not}; onnxruntime has CUDAExecutionProvider and {machine.cuda_gpu} is present")
    if device == "cuda":
        raise BuildError(f"--device cuda with --backend auto found neither TensorRT on a GPU ({why_not}) nor onnxruntime's "
                         "CUDAExecutionProvider with a GPU; install tensorrt or onnxruntime-gpu, or build for --device cpu")
    gpu_note = "no CUDA GPU" if not machine.cuda_gpu else "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    return Choice("onnxruntime", "cpu", f"{why_not}; {gpu_note}")
