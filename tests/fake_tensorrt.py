"""A stand-in for the `tensorrt` module that records calls, for call-order tests only: it proves
what kiln asks of TensorRT and in which order, never that TensorRT accepts it (the API check tests
names against the real bindings wheel; the gpu tests run the real library)."""
from __future__ import annotations

import types


def make_fake_tensorrt() -> types.SimpleNamespace:
    """A fresh recording module: `.calls` lists what was asked, `.state` configures the answers."""

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

    state = types.SimpleNamespace(parse_ok=True, build_ok=True, engines={}, refit_missing=[])

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

    class Weights:
        def __init__(self, array):
            self.array = array

    class Refitter:
        """Records set_named_weights / get_missing_weights / refit_cuda_engine; the weights TensorRT
        would also need are state.refit_missing (once)."""

        def __init__(self, engine, logger):
            record("Refitter", engine.spec["name"])
            self.missing = list(state.refit_missing)

        def set_named_weights(self, name, weights):
            record("set_named_weights", name, str(weights.array.dtype), tuple(weights.array.shape))
            self.missing = [m for m in self.missing if m != name]
            return True

        def get_missing_weights(self):
            record("get_missing_weights")
            return list(self.missing)

        def refit_cuda_engine(self):
            record("refit_cuda_engine")
            return not self.missing

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
        Refitter=Refitter, Weights=Weights,
        OnnxParserFlag=enum("OnnxParserFlag", "NATIVE_INSTANCENORM"),
        MemoryPoolType=enum("MemoryPoolType", "WORKSPACE"),
        BuilderFlag=enum("BuilderFlag", "TF32", "REFIT", "REFIT_IDENTICAL", "STRIP_PLAN", "WEIGHT_STREAMING"),
        HardwareCompatibilityLevel=enum("HardwareCompatibilityLevel", "NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"),
        ExecutionContextAllocationStrategy=enum("ExecutionContextAllocationStrategy", "STATIC", "ON_PROFILE_CHANGE",
                                                "USER_MANAGED"),
        DataType=types.SimpleNamespace(**DataType),
        calls=calls, state=state,
    )
    return module
