"""Shared fixtures: the built-in tiny models, exported and built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def cpu_build_options():
    """The CPU suite's artifacts are ONNX Runtime CPU builds on every machine (auto would pick
    TensorRT where it is installed; the gpu tests build those)."""
    from engines.build import BuildOptions

    return BuildOptions(backend="onnxruntime", device="cpu")


def _gpu_unavailable() -> str | None:
    """Why the `gpu` tests cannot run here, or None when they can."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or OSError from a libraries wheel that did not install
        return (f"tensorrt does not import ({type(exc).__name__}: {exc}); install it with "
                "pip install 'kiln[tensorrt]' --extra-index-url https://pypi.nvidia.com")
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    reason = _gpu_unavailable() if gpu_items else None
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))


@pytest.fixture(scope="session", autouse=True)
def kiln_cache(tmp_path_factory) -> Path:
    """Built-in models are cached under a session folder unless KILN_CACHE_DIR is set (CI sets it)."""
    if "KILN_CACHE_DIR" not in os.environ:
        os.environ["KILN_CACHE_DIR"] = str(tmp_path_factory.mktemp("kiln-cache"))
    return Path(os.environ["KILN_CACHE_DIR"])


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """`kiln export tiny`: the SD 2.1-shaped model's checked ONNX folder."""
    from exporters.export import export_model
    from exporters.source import resolve_model

    source, profile = resolve_model("tiny")
    return export_model(source, profile, tmp_path_factory.mktemp("export") / "tiny")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_export, tmp_path_factory) -> Path:
    """`kiln build <export folder>`: ONNX Runtime engines for tiny."""
    from engines.build import build_from_export

    return build_from_export(tiny_export, tmp_path_factory.mktemp("artifacts") / "tiny", cpu_build_options()).folder


@pytest.fixture(scope="session")
def sd15_artifact(tmp_path_factory) -> Path:
    """`kiln build tiny-sd15`: the SD 1.5-shaped model, exported and built in one step."""
    from engines.build import build_from_model

    return build_from_model("tiny-sd15", tmp_path_factory.mktemp("artifacts") / "tiny-sd15", cpu_build_options()).folder


@pytest.fixture(scope="session")
def artifacts(tiny_artifact, sd15_artifact) -> dict[str, Path]:
    return {"tiny": tiny_artifact, "tiny-sd15": sd15_artifact}


PIPELINE = ("text_encoder", "unet", "vae_decoder")  # what text-to-image needs; skips the VAE encoder's export


@pytest.fixture(scope="session")
def tiny_fp16_export(tmp_path_factory) -> Path:
    """tiny with every component converted to fp16 (the graphs TensorRT would build)."""
    from exporters.export import ExportOptions, export_model
    from exporters.source import resolve_model

    source, profile = resolve_model("tiny")
    options = ExportOptions(precision="fp16", components=PIPELINE)
    return export_model(source, profile, tmp_path_factory.mktemp("export") / "tiny-fp16", options)


@pytest.fixture(scope="session")
def tiny_fp16_artifact(tiny_fp16_export, tmp_path_factory) -> Path:
    """The fp16 export built for ONNX Runtime CPU."""
    from engines.build import build_from_export

    return build_from_export(tiny_fp16_export, tmp_path_factory.mktemp("artifacts") / "tiny-fp16", cpu_build_options()).folder


@pytest.fixture(scope="session")
def tiny_int8_export(tmp_path_factory) -> Path:
    """tiny's UNet calibrated and quantized with the TensorRT recipe (portable `kiln export`)."""
    from exporters.export import ExportOptions, export_model
    from exporters.source import resolve_model

    source, profile = resolve_model("tiny")
    options = ExportOptions(precision="int8", int8_target="tensorrt", components=PIPELINE)
    return export_model(source, profile, tmp_path_factory.mktemp("export") / "tiny-int8", options)


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """A stand-in for the `tensorrt` module that records calls, for call-order tests only: it
    proves what kiln asks of TensorRT and in which order, never that TensorRT accepts it (the API
    check tests names against the real bindings; the gpu tests run the real library)."""
    import types

    from engines import trt_backend
    from runtime import trt_engine

    calls: list[tuple] = []

    def record(*entry):
        calls.append(entry)

    class Member:
        def __init__(self, owner, name):
            self.owner, self.name = owner, name

        def __repr__(self):
            return f"{self.owner}.{self.name}"

    def enum(owner, *names):
        return types.SimpleNamespace(**{n: Member(owner, n) for n in names})

    class ILogger:
        Severity = enum("Severity", "INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")

        def __init__(self):
            pass

    class IProgressMonitor:
        def __init__(self):
            pass

    class Recorder:
        """Attribute assignments are recorded as ("set", class, attr, value)."""

        def __setattr__(self, name, value):
            if not name.startswith("_"):
                record("set", type(self).__name__, name, value)
            object.__setattr__(self, name, value)

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+timings"

    class Config(Recorder):
        def set_memory_pool_limit(self, pool, size):
            record("set_memory_pool_limit", pool.name, size)

        def clear_flag(self, flag):
            record("clear_flag", flag.name)

        def set_flag(self, flag):
            record("set_flag", flag.name)

        def add_optimization_profile(self, profile):
            record("add_optimization_profile", profile)

        def create_timing_cache(self, data):
            record("create_timing_cache", bytes(data))
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            record("set_timing_cache", cache.data, ignore_mismatch)
            self._cache = cache

        def get_timing_cache(self):
            return self._cache

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            record("set_shape", name, tuple(lo), tuple(opt), tuple(hi))

    state = types.SimpleNamespace(parse_ok=True, build_ok=True, engines={})

    class Builder:
        def __init__(self, logger):
            record("Builder")

        def create_network(self, flags):
            record("create_network", flags)
            return "network"

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            record("build_serialized_network")
            return b"PLAN" if state.build_ok else None

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = 0 if state.parse_ok else 1

        def set_flag(self, flag):
            record("parser.set_flag", flag.name)

        def parse_from_file(self, path):
            record("parse_from_file", path)
            return state.parse_ok

        def get_error(self, i):
            return "In node 3 (Foo): UNSUPPORTED_NODE"

    class Engine:
        """Configured per plan file content by the test: {"io": {name: (dtype, is_input)}, ...}."""

        def __init__(self, spec):
            self.spec = spec
            self.names = list(spec["io"])
            self.num_io_tensors = len(self.names)
            self.device_memory_size_v2 = spec.get("scratch", 1000)
            self.streamable_weights_size = spec.get("streamable", 0)
            self.refittable = spec.get("refittable", False)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_dtype(self, name):
            return DataType[self.spec["io"][name]]

        def get_weight_streaming_automatic_budget(self):
            return 12345

        def __setattr__(self, name, value):
            if name == "weight_streaming_budget_v2":
                record("weight_streaming_budget_v2", self.spec["name"], value)
                self.device_memory_size_v2 = self.spec.get("scratch_streaming", self.device_memory_size_v2)
            object.__setattr__(self, name, value)

        def create_execution_context(self, strategy):
            record("create_execution_context", self.spec["name"], strategy.name)
            return Context(self.spec)

    class Context:
        def __init__(self, spec):
            self.spec = spec

        def set_device_memory(self, ptr, size):
            record("set_device_memory", self.spec["name"], ptr, size)

        def set_input_shape(self, name, shape):
            record("set_input_shape", name, tuple(shape))
            return True

        def set_tensor_address(self, name, ptr):
            record("set_tensor_address", name)

        def get_tensor_shape(self, name):
            return self.spec["output_shapes"][name]

        def execute_async_v3(self, stream):
            record("execute_async_v3", stream)
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            record("deserialize_cuda_engine", bytes(data))
            spec = state.engines.get(bytes(data))
            return None if spec is None else Engine(spec)

    dtypes = ("FLOAT", "HALF", "INT32", "INT64", "BOOL", "INT8", "UINT8", "BF16")
    DataType = {n: Member("DataType", n) for n in dtypes}
    module = types.SimpleNamespace(
        __version__="11.4.0.106",
        ILogger=ILogger, IProgressMonitor=IProgressMonitor, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime,
        OnnxParserFlag=enum("OnnxParserFlag", "NATIVE_INSTANCENORM"),
        MemoryPoolType=enum("MemoryPoolType", "WORKSPACE"),
        BuilderFlag=enum("BuilderFlag", "TF32", "REFIT", "REFIT_IDENTICAL", "STRIP_PLAN", "WEIGHT_STREAMING"),
        HardwareCompatibilityLevel=enum("HardwareCompatibilityLevel", "NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"),
        ExecutionContextAllocationStrategy=enum("ExecutionContextAllocationStrategy", "STATIC", "ON_PROFILE_CHANGE",
                                                "USER_MANAGED"),
        DataType=types.SimpleNamespace(**DataType),
        calls=calls, state=state,
    )
    monkeypatch.setattr(trt_backend, "trt", module)
    monkeypatch.setattr(trt_engine, "trt", module)
    trt_engine.trt_logger.cache_clear()
    trt_engine._runtime.cache_clear()
    yield module
    trt_engine.trt_logger.cache_clear()
    trt_engine._runtime.cache_clear()
