"""An ONNX Runtime engine driven through IOBinding: inputs bound in place, outputs preallocated."""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

from runtime.errors import ArtifactError
from runtime.lazy import lazy_import
from runtime.manifest import ComponentInfo

ort = lazy_import("onnxruntime")
log = logging.getLogger(__name__)

_MAX_SHAPE_SETS = 8  # output buffer sets kept per engine (one per distinct request shape)


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


class OrtEngine:
    """One component on one execution provider. Call with torch tensors by input name; returns
    {output name: torch tensor}. Returned tensors are this engine's buffers: they stay valid until
    the next call with the same shapes, so callers that keep them must copy."""

    def __init__(self, path: Path, info: ComponentInfo, provider: str = "CPUExecutionProvider", threads: int = 0):
        import torch

        if provider not in available_providers():
            raise ArtifactError(
                f"this engine was built for {provider}, which this onnxruntime ({ort.__version__}) lacks; "
                f"available: {', '.join(available_providers())}. Install onnxruntime-gpu for CUDA, or rebuild "
                "the artifact for CPUExecutionProvider"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=[provider])
        except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable models
            raise ArtifactError(f"onnxruntime could not load {path}: {exc}. Rebuild the artifact") from exc
        self.info = info
        self.device = torch.device("cuda" if provider == "CUDAExecutionProvider" else "cpu")
        self._ort_device = "cuda" if self.device.type == "cuda" else "cpu"
        self._binding = self.session.io_binding()
        self._buffers: OrderedDict[tuple, dict] = OrderedDict()

    def __call__(self, **inputs) -> dict:
        import numpy as np
        import torch

        shapes = {t.name: tuple(inputs[t.name].shape) for t in self.info.inputs}
        out_shapes = self.info.output_shapes(shapes)  # raises ShapeError outside the built ranges
        keep = []
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for t in self.info.inputs:
            x = inputs[t.name].to(device=self.device, dtype=getattr(torch, t.dtype)).contiguous()
            keep.append(x)
            binding.bind_input(t.name, self._ort_device, 0, np.dtype(t.dtype), tuple(x.shape), x.data_ptr())
        outputs = self._output_buffers(out_shapes)
        for t in self.info.outputs:
            buf = outputs[t.name]
            binding.bind_output(t.name, self._ort_device, 0, np.dtype(t.dtype), tuple(buf.shape), buf.data_ptr())
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        self.session.run_with_iobinding(binding)
        return outputs

    def _output_buffers(self, out_shapes: Mapping[str, tuple[int, ...]]) -> dict:
        import torch

        key = tuple(sorted(out_shapes.items()))
        if key in self._buffers:
            self._buffers.move_to_end(key)
            return self._buffers[key]
        dtypes = {t.name: getattr(torch, t.dtype) for t in self.info.outputs}
        buffers = {n: torch.empty(s, dtype=dtypes[n], device=self.device) for n, s in out_shapes.items()}
        self._buffers[key] = buffers
        if len(self._buffers) > _MAX_SHAPE_SETS:
            self._buffers.popitem(last=False)
        return buffers
