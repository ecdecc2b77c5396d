"""ONNX Runtime backend: a checked ONNX graph → an ONNX graph optimized offline for one execution provider."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from exporters.onnx_io import PROTO_LIMIT
from runtime.errors import BuildError
from runtime.lazy import lazy_import

ort = lazy_import("onnxruntime")
log = logging.getLogger(__name__)

NAME = "onnxruntime"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# What each execution provider builds. int8 Q/DQ graphs on GPUs are TensorRT's job: onnxruntime
# documents quantized inference on NVIDIA GPUs through its TensorRT execution provider, not CUDA.
PRECISIONS = {"cpu": ("fp32", "fp16", "int8"), "cuda": ("fp32", "fp16")}


@dataclass(frozen=True)
class OrtTarget:
    device: str = "cpu"

    @property
    def provider(self) -> str:
        if self.device not in PROVIDERS:
            raise BuildError(f"onnxruntime device must be one of {', '.join(PROVIDERS)}, got {self.device!r}")
        return PROVIDERS[self.device]


def check_precision(target: OrtTarget, component: str, precision: str) -> None:
    """Refuse, before any work, a precision this target cannot build; the error names both."""
    allowed = PRECISIONS.get(target.device, ())
    if precision not in allowed:
        raise BuildError(
            f"{component} is {precision}, which the onnxruntime backend on {target.provider} cannot build "
            f"(it builds {', '.join(allowed)}). Build {precision} with --device cpu, "
            f"or re-export with --precision {allowed[-1]}"
        )


def identity(target: OrtTarget, refit: str = "off") -> dict:
    """What an engine built here depends on (part of the build key and the manifest)."""
    if refit not in ("off", "refit"):
        raise BuildError(f"--refit {refit} is TensorRT's (refit only with the build's own weights); onnxruntime "
                         "engines take --refit refit (swap LoRA weights without a rebuild) or off")
    provider = target.provider
    available = ort.get_available_providers()
    if provider not in available:
        raise BuildError(
            f"onnxruntime {ort.__version__} here has no {provider} (available: {', '.join(available)}); "
            + ("install onnxruntime-gpu on a CUDA machine" if target.device == "cuda" else "reinstall onnxruntime")
        )
    if refit == "refit":  # graphs saved as exported: every optimization runs at load, after a refit's weights are in
        return {"name": NAME, "version": ort.__version__, "execution_provider": provider, "optimization": "at load",
                "refit": refit}
    return {"name": NAME, "version": ort.__version__, "execution_provider": provider, "optimization": "extended"}


def engine_from_onnx(onnx_path: Path, out_path: Path, target: OrtTarget, precision: str, refit: str = "off") -> list[Path]:
    """Optimize `onnx_path` for the target's execution provider and save it as `out_path`.

    Saved at ORT_ENABLE_EXTENDED (fusions, no hardware-specific layouts), the level ONNX Runtime
    documents as safe to save; layout optimizations run at load time. A refittable engine is the
    graph as exported (its refittable weights external data, which a session replaces by name
    before it optimizes: runtime/ort_engine.py), checked to load."""
    check_precision(target, onnx_path.parent.name, precision)
    if refit == "refit":
        return _graph_as_engine(onnx_path, out_path, target)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out_path)
    # A source with external data must get external data of its own name: left alone, onnxruntime
    # writes references to the source's "model.onnx.data", which is not in the artifact.
    if any(onnx_path.parent.glob(f"{onnx_path.name}*.data")) or onnx_path.stat().st_size > PROTO_LIMIT:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{out_path.name}.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(onnx_path), options, providers=[target.provider])
    except Exception as exc:  # onnxruntime's errors are untyped
        raise BuildError(f"onnxruntime could not optimize {onnx_path} for {target.provider}: {exc}") from exc
    return sorted(p for p in out_path.parent.glob(f"{out_path.name}*"))


def _graph_as_engine(onnx_path: Path, out_path: Path, target: OrtTarget) -> list[Path]:
    """Copy the graph to `out_path`, its external data to `<out_path name>.data` (the graph's
    references renamed), and check a session opens it."""
    import shutil

    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    sources = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                sources.add(entry.value)
                entry.value = f"{out_path.name}.data"
    if len(sources) > 1:
        raise BuildError(f"{onnx_path} keeps its weights in {len(sources)} files; a refittable engine needs one "
                         "(re-export it with this kiln)")
    for source in sources:
        shutil.copyfile(onnx_path.parent / source, out_path.parent / f"{out_path.name}.data")
    onnx.save_model(model, str(out_path))
    try:
        ort.InferenceSession(str(out_path), providers=[target.provider])
    except Exception as exc:  # onnxruntime's errors are untyped
        raise BuildError(f"onnxruntime could not load the refittable graph {onnx_path} on {target.provider}: {exc}") from exc
    return sorted(p for p in out_path.parent.glob(f"{out_path.name}*"))
