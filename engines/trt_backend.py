"""TensorRT backend: a checked ONNX graph → a serialized engine (.plan), built through the
TensorRT 11 Python API.

TensorRT 11 is strongly typed only: precision comes from the graph (an fp16 graph builds fp16, Q/DQ
nodes build int8), so no precision flag is set here. One optimization profile covers the manifest's
(min, opt, max) shapes, the same ones every backend builds for (UNet batch doubled for guidance).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import BuildError, format_table
from runtime.files import atomic_write_bytes, kiln_cache_dir
from runtime.trt_plumbing import last_errors, parser_errors, trt, trt_logger

log = logging.getLogger(__name__)

NAME = "tensorrt"
PRECISIONS = ("fp32", "fp16", "int8")
HARDWARE_COMPAT = {"none": "NONE", "same-compute-capability": "SAME_COMPUTE_CAPABILITY", "ampere-plus": "AMPERE_PLUS"}
REFIT_MODES = {"off": None, "refit": "REFIT", "identical": "REFIT_IDENTICAL"}
OPTIMIZATION_LEVELS = range(0, 6)


@dataclass(frozen=True)
class TrtOptions:
    """How TensorRT builds. Every field is part of the build key.

    workspace_gib: cap on the builder's scratch for tactics (None: TensorRT's default, all of the GPU).
    optimization_level: 0-5; higher searches longer for faster kernels (TensorRT's default is 3).
    hardware_compat: "none" (this GPU's architecture), "same-compute-capability", "ampere-plus".
    tf32: allow TF32 math for fp32 layers (faster on Ampere+, ~1e-3 relative error); off by default
        so fp32 engines reproduce PyTorch.
    refit: "off", "refit" (weights can be swapped without a rebuild) or "identical" (refit only with
        the build's own weights; lets the builder optimize as if weights were constant).
    strip_plan: leave refittable weights out of the plan; the artifact carries the ONNX weights and
        the runtime refits them at load (smaller plans, one weight copy to ship). Needs refit.
    weight_streaming: let the runtime keep only part of the weights on the GPU (a budget set at
        load time) and stream the rest from host memory: the engine-world CPU offload.
    """

    workspace_gib: float | None = None
    optimization_level: int = 3
    hardware_compat: str = "none"
    tf32: bool = False
    refit: str = "off"
    strip_plan: bool = False
    weight_streaming: bool = False

    def __post_init__(self):
        problems = []
        if self.workspace_gib is not None and self.workspace_gib <= 0:
            problems.append(("workspace_gib", self.workspace_gib, "a positive number of GiB, or None"))
        if self.optimization_level not in OPTIMIZATION_LEVELS:
            problems.append(("optimization_level", self.optimization_level, "0..5"))
        if self.hardware_compat not in HARDWARE_COMPAT:
            problems.append(("hardware_compat", self.hardware_compat, ", ".join(HARDWARE_COMPAT)))
        if self.refit not in REFIT_MODES:
            problems.append(("refit", self.refit, ", ".join(REFIT_MODES)))
        if self.strip_plan and self.refit == "off":
            problems.append(("strip_plan", True, "needs refit 'refit' or 'identical' (a stripped plan is refit at load)"))
        if problems:
            raise BuildError("invalid TensorRT build options:\n" + format_table(["option", "given", "allowed"], problems))

    @property
    def workspace_bytes(self) -> int | None:
        return None if self.workspace_gib is None else int(self.workspace_gib * 2**30)

    def flags(self) -> list[str]:
        """The BuilderFlag members this build sets (TF32 is cleared unless asked for)."""
        flags = ["TF32"] if self.tf32 else []
        if REFIT_MODES[self.refit]:
            flags.append(REFIT_MODES[self.refit])
        if self.strip_plan:
            flags.append("STRIP_PLAN")
        if self.weight_streaming:
            flags.append("WEIGHT_STREAMING")
        return flags


def check_precision(component: str, precision: str, entry: Mapping) -> None:
    """TensorRT builds what the graph says; int8 must be the symmetric Q/DQ TensorRT accepts."""
    if precision not in PRECISIONS:
        raise BuildError(f"{component} is {precision}; the tensorrt backend builds {', '.join(PRECISIONS)}")
    recipe = entry.get("int8", {}).get("recipe")
    if precision == "int8" and recipe != "tensorrt":
        raise BuildError(
            f"{component} was quantized with the {recipe!r} int8 recipe (asymmetric U8S8 for ONNX Runtime on CPU), "
            "which TensorRT does not accept. Re-export with `kiln export MODEL --precision int8 --int8-recipe tensorrt`"
        )


def profile_shapes(inputs: Sequence[Mapping]) -> list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """The manifest's per-input (min, opt, max) → the rows of one TensorRT optimization profile,
    checked the way TensorRT will check them (min <= opt <= max in every dimension)."""
    rows, problems = [], []
    for t in inputs:
        lo, opt, hi = (tuple(int(d) for d in t[k]) for k in ("min", "opt", "max"))
        if not (len(lo) == len(opt) == len(hi)) or any(not a <= b <= c for a, b, c in zip(lo, opt, hi)):
            problems.append((t["name"], list(lo), list(opt), list(hi)))
        rows.append((t["name"], lo, opt, hi))
    if problems:
        raise BuildError("shape ranges TensorRT cannot use (need min <= opt <= max per dimension):\n"
                         + format_table(["input", "min", "opt", "max"], problems))
    return rows


def gpu_info(device_index: int = 0) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise BuildError("the tensorrt backend builds on a CUDA GPU, and torch sees none here; "
                         "use --backend onnxruntime, or build on the GPU model you will serve on")
    major, minor = torch.cuda.get_device_capability(device_index)
    return {"gpu": torch.cuda.get_device_name(device_index), "compute_capability": [major, minor]}


def identity(options: TrtOptions) -> dict:
    """What an engine built here depends on (part of the build key and the manifest)."""
    return {
        "name": NAME,
        "version": str(trt.__version__),
        **gpu_info(),
        "hardware_compatibility_level": options.hardware_compat,
        "builder_optimization_level": options.optimization_level,
        "workspace_bytes": options.workspace_bytes,
        "tf32": options.tf32,
        "refit": options.refit,
        "strip_plan": options.strip_plan,
        "weight_streaming": options.weight_streaming,
    }


def timing_cache_path(cache_dir: Path | None, trt_version: str, gpu: str, compute_capability: Sequence[int]) -> Path:
    """One timing cache per GPU model and TensorRT version (tactic timings do not transfer), in
    `cache_dir` (default $KILN_CACHE_DIR/tensorrt)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower() or "gpu"
    cc = "".join(str(c) for c in compute_capability)
    folder = Path(cache_dir) if cache_dir is not None else kiln_cache_dir() / "tensorrt"
    return folder / f"timing-trt{trt_version}-{slug}-sm{cc}.cache"


def engine_from_onnx(onnx_path: Path, out_path: Path, inputs: Sequence[Mapping], options: TrtOptions,
                     backend: Mapping, cache_dir: Path | None = None) -> list[Path]:
    """Parse `onnx_path`, build one engine for the `inputs` shape ranges, write it to `out_path`."""
    logger = trt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # strongly typed: the only mode TensorRT 11 has
    parser = trt.OnnxParser(network, logger)
    parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)  # GroupNorm arrives as InstanceNormalization
    if not parser.parse_from_file(str(onnx_path)):  # by path, so external data next to it is found
        errors = parser_errors(parser) or ["(no error reported)"]
        raise BuildError(f"TensorRT could not parse {onnx_path}:\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    config.builder_optimization_level = options.optimization_level
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, HARDWARE_COMPAT[options.hardware_compat])
    if not options.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default in TensorRT
    for flag in options.flags():
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for name, lo, opt, hi in profile_shapes(inputs):
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    config.progress_monitor = _progress_monitor(onnx_path.parent.name)
    cache_path = timing_cache_path(cache_dir, backend["version"], backend["gpu"], backend["compute_capability"])
    cache = _load_timing_cache(config, cache_path)
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT could not build an engine from {onnx_path}{last_errors(5)}. "
                         "Run with -v for TensorRT's log; a smaller --workspace-gib or shape range may help")
    out_path.write_bytes(serialized)
    _save_timing_cache(config.get_timing_cache(), cache_path)
    return [out_path]


def _load_timing_cache(config, path: Path):
    data = b""
    if path.is_file():
        data = path.read_bytes()
        log.info("TensorRT timing cache: %s (%.1f KiB)", path, len(data) / 1024)
    cache = config.create_timing_cache(data)
    if cache is None and data:  # unreadable (another TensorRT build wrote it): start afresh
        log.warning("TensorRT could not read the timing cache %s; starting a new one", path)
        cache = config.create_timing_cache(b"")
    return cache


def _save_timing_cache(cache, path: Path) -> None:
    data = bytes(cache.serialize())
    atomic_write_bytes(path, data)  # a concurrent build reads the old cache or the new, never half of one
    log.debug("TensorRT timing cache saved: %s (%.1f KiB)", path, len(data) / 1024)


def _progress_monitor(component: str):
    """TensorRT's build phases → log lines (top-level phases at INFO, nested ones at DEBUG)."""

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.parents: dict[str, str | None] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.parents[phase_name] = parent_phase
            level = logging.INFO if parent_phase is None else logging.DEBUG
            log.log(level, "%s: TensorRT %s (%d steps)", component, phase_name, num_steps)

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            if self.parents.pop(phase_name, None) is None:
                log.info("%s: TensorRT %s done", component, phase_name)

    return Progress()
