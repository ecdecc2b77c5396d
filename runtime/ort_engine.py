"""An ONNX Runtime engine driven through IOBinding: inputs bound in place, outputs preallocated."""
from __future__ import annotations

import logging
from pathlib import Path

from runtime.buffers import ShapeCache, empty_buffers, shape_key
from runtime.errors import ArtifactError
from runtime.lazy import lazy_import
from runtime.manifest import ComponentInfo

ort = lazy_import("onnxruntime")
log = logging.getLogger(__name__)


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
        self.path, self.provider, self.threads = Path(path), provider, threads
        self.session, self._refit_values = self._open({})
        self.info = info
        self.device = torch.device("cuda" if provider == "CUDAExecutionProvider" else "cpu")
        self._ort_device = "cuda" if self.device.type == "cuda" else "cpu"
        self._binding = self.session.io_binding()
        self._outputs: ShapeCache[dict] = ShapeCache()
        self._dtypes = {t.name: t.dtype for t in info.outputs}
        # Tiled and sliced VAE calls (runtime/vae_tiling.py) run one engine at several shapes in a row:
        # each run then gives the CPU arena back what it used, so the tiles' shapes do not each keep theirs
        self.release_arena = False

    def _open(self, weights: dict) -> tuple:
        """A session on the engine file, the external initializers named in `weights` replaced by
        those arrays before any optimization runs (so folds and prepacking see the new values)."""
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in weights.values()]
        if weights:
            options.add_external_initializers(list(weights), values)
        try:
            session = ort.InferenceSession(str(self.path), options, providers=[self.provider])
        except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable models
            if weights:
                raise ArtifactError(f"onnxruntime could not refit {self.path} with {len(weights)} weights: {exc}. "
                                    "Rebuild the artifact with --refit refit") from exc
            raise ArtifactError(f"onnxruntime could not load {self.path}: {exc}. Rebuild the artifact") from exc
        return session, values  # the session reads the arrays' memory: keep them while it lives

    def refit(self, weights: dict, base=None) -> None:
        """Swap weights: a new session whose external initializers in `weights` (engine name → array
        of the engine's dtype and layout) are those arrays and all others the file's (the base);
        the old session is dropped once the new one is ready."""
        self.session, self._refit_values = self._open(weights)
        self._binding = self.session.io_binding()

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
        outputs = self._outputs.get(shape_key(out_shapes), lambda: empty_buffers(out_shapes, self._dtypes, self.device))
        for t in self.info.outputs:
            buf = outputs[t.name]
            binding.bind_output(t.name, self._ort_device, 0, np.dtype(t.dtype), tuple(buf.shape), buf.data_ptr())
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        run_options = None
        if self.release_arena and self._ort_device == "cpu":
            run_options = ort.RunOptions()
            run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.session.run_with_iobinding(binding, run_options)
        return outputs
