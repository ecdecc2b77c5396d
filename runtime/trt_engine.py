"""TensorRT engines driven on torch CUDA tensors: inputs and outputs are device buffers bound with
set_tensor_address, every call sets its input shapes and enqueues with execute_async_v3 on the
current torch stream, and repeated shapes replay a captured CUDA graph. All engines of a pipeline
share one activation scratch (device_memory_size_v2, user-managed), because they run one after
another on one stream.

tensorrt is imported when an engine is first loaded; nothing here runs without CUDA and TensorRT.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.buffers import ShapeCache, empty_buffers, shape_key
from runtime.errors import ArtifactError, KilnError, ShapeError, format_table
from runtime.manifest import ComponentInfo
from runtime.trt_compat import TrtDevice, check_compatible
from runtime.trt_plumbing import dtype_name, last_errors, parser_errors, trt, trt_logger

log = logging.getLogger(__name__)

ALIGNMENT = 256  # bytes; cudaMalloc's guarantee, and what TensorRT requires of user-managed memory
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4, "int64": 8, "bool": 1}


# ---- arithmetic ---------------------------------------------------------------------------------


def align(nbytes: int, alignment: int = ALIGNMENT) -> int:
    """`nbytes` rounded up to a multiple of `alignment`."""
    if nbytes < 0:
        raise ValueError(f"a size cannot be negative, got {nbytes}")
    return -(-nbytes // alignment) * alignment


def tensor_nbytes(shape, dtype: str) -> int:
    """Bytes of a dense tensor of `shape` and manifest dtype `dtype`."""
    n = 1
    for d in shape:
        if d < 0:
            raise ShapeError(f"tensor shape {list(shape)} still has a dynamic dimension; set the input shapes first")
        n *= d
    return n * _ITEMSIZE[dtype]


def scratch_nbytes(per_engine: Mapping[str, int]) -> int:
    """One activation scratch for engines that run one at a time: the largest need, aligned."""
    return align(max(per_engine.values(), default=0))


def max_io_nbytes(info: ComponentInfo) -> int:
    """Device memory of one set of I/O buffers at the largest shapes the engine accepts."""
    return sum(tensor_nbytes(t.max, t.dtype) for t in info.inputs + info.outputs)


# ---- loading -------------------------------------------------------------------------------------


def device_here(device_index: int | None = None) -> TrtDevice:
    import torch

    if not torch.cuda.is_available():
        raise ArtifactError("TensorRT engines need a CUDA GPU, and torch sees none here "
                            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    index = torch.cuda.current_device() if device_index is None else device_index
    return TrtDevice(str(trt.__version__), torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))


@functools.cache
def _runtime():
    return trt.Runtime(trt_logger())


def deserialize(path: Path):
    """A plan file → ICudaEngine, or ArtifactError with TensorRT's reason."""
    engine = _runtime().deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise ArtifactError(f"TensorRT could not deserialize {path}{last_errors()}. Rebuild the artifact on this machine")
    return engine


def refit_from_onnx(engine, onnx_path: Path) -> None:
    """Replace a refittable engine's weights with those of an ONNX graph of the same network (a
    weight swap, e.g. a LoRA fused into the UNet, or the weights of a stripped plan)."""
    if not engine.refittable:
        raise ArtifactError(f"this engine is not refittable; rebuild with --refit to swap weights from {onnx_path}")
    refitter = trt.Refitter(engine, trt_logger())
    parser = trt.OnnxParserRefitter(refitter, trt_logger())
    if not parser.refit_from_file(str(onnx_path)):
        raise ArtifactError(f"TensorRT could not read weights for refitting from {onnx_path}: "
                            f"{'; '.join(parser_errors(parser))}")
    if not refitter.refit_cuda_engine():
        missing = refitter.get_missing_weights()
        raise ArtifactError(f"refitting from {onnx_path} failed{last_errors()}; weights still missing: "
                            f"{', '.join(missing[:10]) or 'none reported'}")


# ---- engines ------------------------------------------------------------------------------------


def refit_named(engine, weights: Mapping[str, Any], base, component: str) -> None:
    """trt.Refitter: set_named_weights for each weight, then the base of any weight TensorRT still
    needs (fused with a changed one), then refit_cuda_engine. The arrays stay referenced until
    the refit is done (trt.Weights does not copy them)."""
    if not engine.refittable:
        raise ArtifactError(f"{component}: this engine is not refittable; rebuild with --refit refit to swap LoRA weights")
    refitter = trt.Refitter(engine, trt_logger())
    held = []

    def put(name: str, array) -> None:
        held.append(array)
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise ArtifactError(f"{component}: TensorRT refused new values for weight {name!r} "
                                f"({array.dtype}{list(array.shape)}){last_errors()}; rebuild the artifact")

    for name, array in weights.items():
        put(name, array)
    missing = list(refitter.get_missing_weights())
    unknown = [name for name in missing if base is None or base(name) is None]
    if unknown:
        raise ArtifactError(f"{component}: TensorRT needs weights the artifact's refit record lacks to refit these: "
                            f"{', '.join(unknown[:10])}; rebuild with --refit refit")
    for name in missing:
        put(name, base(name))
    if not refitter.refit_cuda_engine():
        raise ArtifactError(f"{component}: TensorRT could not refit the engine{last_errors()}; weights still missing: "
                            f"{', '.join(list(refitter.get_missing_weights())[:10]) or 'none reported'}")


@dataclass
class _ShapeState:
    """Buffers (and the CUDA graph, once captured) for one set of input shapes."""

    shapes: dict[str, tuple[int, ...]]
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    graph: Any = None
    graph_failed: bool = False


def _current_stream(device):
    import torch

    return torch.cuda.current_stream(device)


def _allocate_scratch(nbytes: int):
    import torch

    return torch.empty(max(nbytes, ALIGNMENT), dtype=torch.uint8, device="cuda")


class TrtEngine:
    """One component's ICudaEngine and its execution context. Call with torch tensors by input
    name; returns {output name: CUDA tensor}. Returned tensors are this engine's buffers: valid
    until the next call with the same shapes, so callers that keep them copy (the shims do)."""

    def __init__(self, engine, info: ComponentInfo, scratch, cuda_graphs: bool = True, device=None):
        import torch

        self.engine = engine
        self.info = info
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        self.cuda_graphs = cuda_graphs
        self._check_io()
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise ArtifactError(f"{info.name}: TensorRT could not create an execution context{last_errors()}")
        self.scratch = scratch
        self.context.set_device_memory(scratch.data_ptr(), engine.device_memory_size_v2)
        self._states: ShapeCache[_ShapeState] = ShapeCache()
        self._bound: tuple | None = None  # the shapes the context was last set up and enqueued for

    def _check_io(self) -> None:
        """The engine's I/O must be the manifest's, name for name and dtype for dtype."""
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        found = {n: dtype_name(self.engine.get_tensor_dtype(n)) for n in names}
        expected = {t.name: t.dtype for t in self.info.inputs + self.info.outputs}
        if found != expected:
            rows = [(n, expected.get(n, "-"), found.get(n, "-")) for n in sorted(set(found) | set(expected))
                    if expected.get(n) != found.get(n)]
            raise ArtifactError(f"{self.info.name}: the engine's tensors differ from the manifest:\n"
                                + format_table(["tensor", "manifest", "engine"], rows) + "\nRebuild the artifact")

    def __call__(self, **inputs) -> dict:
        import torch

        shapes = {t.name: tuple(inputs[t.name].shape) for t in self.info.inputs}
        key = shape_key(shapes)
        state = self._states.get(key, lambda: self._new_state(shapes))
        stream = _current_stream(self.device)
        if self.cuda_graphs and not state.graph_failed:
            for t in self.info.inputs:
                state.inputs[t.name].copy_(inputs[t.name], non_blocking=True)
            if state.graph is None:
                self._capture(state, stream)
            elif self._bound != key:
                # The context was set up for other shapes since this graph was captured, and TensorRT
                # keeps shape-dependent state in the context: one plain enqueue at these shapes first.
                self._bind(state, state.inputs)
                self._execute(stream)
            else:
                state.graph.replay()
        else:
            bound = {t.name: inputs[t.name].to(self.device, getattr(torch, t.dtype)).contiguous() for t in self.info.inputs}
            self._bind(state, bound)
            self._execute(stream)
        self._bound = key
        return state.outputs

    def _new_state(self, shapes: dict[str, tuple[int, ...]]) -> _ShapeState:
        out_shapes = self.info.output_shapes(shapes)  # ShapeError outside the built ranges
        dtypes = {t.name: t.dtype for t in self.info.inputs + self.info.outputs}
        return _ShapeState(
            shapes=shapes,
            inputs=empty_buffers(shapes, dtypes, self.device) if self.cuda_graphs else {},
            outputs=empty_buffers(out_shapes, dtypes, self.device),
        )

    def _bind(self, state: _ShapeState, inputs: Mapping[str, Any]) -> None:
        context = self.context
        for name, x in inputs.items():
            if not context.set_input_shape(name, tuple(x.shape)):
                raise ShapeError(f"{self.info.name}: TensorRT refused shape {list(x.shape)} for '{name}'{last_errors()}")
            context.set_tensor_address(name, x.data_ptr())
        for name, buf in state.outputs.items():
            engine_shape = tuple(context.get_tensor_shape(name))
            if engine_shape != tuple(buf.shape):
                raise ArtifactError(f"{self.info.name}: TensorRT computes '{name}' as {list(engine_shape)}, the manifest "
                                    f"as {list(buf.shape)}; the artifact is inconsistent, rebuild it")
            context.set_tensor_address(name, buf.data_ptr())

    def _execute(self, stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise KilnError(f"{self.info.name}: TensorRT execution failed{last_errors()}")

    def _capture(self, state: _ShapeState, stream) -> None:
        """Bind the static buffers, run once (TensorRT finishes shape-dependent setup on the first
        enqueue), then capture the enqueue into a CUDA graph replayed by later calls."""
        import torch

        self._bind(state, state.inputs)
        self._execute(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._execute(_current_stream(self.device))
        except Exception as exc:  # some engines cannot be captured; run them without a graph
            state.graph_failed = True
            log.warning("%s: CUDA graph capture failed for shapes %s (%s); running without a graph",
                        self.info.name, state.shapes, exc)
            return
        state.graph = graph

    def refit(self, weights: Mapping[str, Any], base=None) -> None:
        """Swap named weights (ONNX initializer name → numpy array of the engine's dtype and
        layout) in place; drops captured graphs. TensorRT may ask for weights fused with these
        (get_missing_weights): `base(name)` gives their base values, else the refit is refused."""
        import torch

        torch.cuda.synchronize(self.device)
        refit_named(self.engine, weights, base, self.info.name)
        self._states.clear()
        self._bound = None

    def refit_from_onnx(self, onnx_path: Path) -> None:
        """Swap in the weights of `onnx_path` (same network, new weights); drops captured graphs."""
        import torch

        torch.cuda.synchronize(self.device)
        refit_from_onnx(self.engine, Path(onnx_path))
        self._states.clear()
        self._bound = None


def set_weight_streaming(engine, name: str, budget) -> None:
    """Keep at most `budget` bytes of the engine's weights on the GPU ("auto": TensorRT's choice);
    the rest streams from host memory during execution."""
    total = engine.streamable_weights_size
    if total <= 0:
        raise ArtifactError(f"{name}: a weight streaming budget was given, but this engine was not built for weight "
                            "streaming; rebuild with --weight-streaming")
    value = engine.get_weight_streaming_automatic_budget() if budget == "auto" else int(budget)
    engine.weight_streaming_budget_v2 = value
    log.info("%s: weight streaming, %.0f of %.0f MiB of weights resident on the GPU", name,
             min(value, total) / 2**20, total / 2**20)


def load_engines(folder: Path, backend: Mapping, components: Mapping[str, ComponentInfo], *,
                 cuda_graphs: bool = True, weight_streaming_budget=None) -> dict[str, TrtEngine]:
    """Check the machine against the manifest, deserialize every plan, size one shared scratch
    for all of them and create their execution contexts on it.

    `weight_streaming_budget`: None (all weights resident), bytes or "auto" for every engine
    built with weight streaming, or {component: bytes | "auto"}. Plans built with STRIP_PLAN are
    refit first from the ONNX their ComponentInfo names."""
    for warning in check_compatible(backend, device_here()):
        log.warning("%s: %s", folder, warning)
    engines = {}
    for name, info in components.items():
        engine = deserialize(Path(folder) / info.file)
        budget = weight_streaming_budget.get(name) if isinstance(weight_streaming_budget, Mapping) else weight_streaming_budget
        if budget is not None:
            set_weight_streaming(engine, name, budget)
        if info.refit_onnx:
            log.info("%s: loading weights into the stripped plan from %s", name, info.refit_onnx)
            refit_from_onnx(engine, Path(folder) / info.refit_onnx)
        engines[name] = engine
    sizes = {name: int(e.device_memory_size_v2) for name, e in engines.items()}
    nbytes = scratch_nbytes(sizes)
    io = sum(max_io_nbytes(info) for info in components.values())
    log.info("TensorRT device memory: one shared activation scratch of %.1f MiB (%s), I/O buffers up to %.1f MiB "
             "per input shape", nbytes / 2**20, ", ".join(f"{n} {s / 2**20:.1f}" for n, s in sizes.items()), io / 2**20)
    scratch = _allocate_scratch(nbytes)
    return {name: TrtEngine(e, components[name], scratch, cuda_graphs=cuda_graphs, device=scratch.device)
            for name, e in engines.items()}
