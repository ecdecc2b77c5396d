"""TensorRT plumbing shared by the builder (engines/trt_backend.py) and the runtime
(runtime/trt_engine.py): one logger into Python logging, error text, dtype names.

`tensorrt` is imported lazily: nothing here touches it until a function is called."""
from __future__ import annotations

import functools
import logging

from runtime.lazy import lazy_import

trt = lazy_import("tensorrt")

# TensorRT DataType member → numpy/torch dtype name (the manifest's spelling).
DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
          "INT32": "int32", "INT64": "int64", "BOOL": "bool"}


@functools.cache
def trt_logger():
    """One process-wide trt.ILogger that forwards TensorRT's messages to Python logging."""
    severity = trt.ILogger.Severity
    levels = {severity.INTERNAL_ERROR: logging.ERROR, severity.ERROR: logging.ERROR,
              severity.WARNING: logging.WARNING, severity.INFO: logging.DEBUG, severity.VERBOSE: logging.DEBUG}
    trt_log = logging.getLogger("runtime.tensorrt")

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, sev, msg):
            level = levels.get(sev, logging.DEBUG)
            if level >= logging.ERROR:
                self.errors.append(msg)
                del self.errors[:-20]
            trt_log.log(level, "TensorRT: %s", msg)

    return Logger()


def last_errors(limit: int = 3) -> str:
    """TensorRT's latest error lines for a failure message; read once, so a later failure does not
    repeat them."""
    errors = trt_logger().errors
    text = ("; TensorRT said: " + " | ".join(errors[-limit:])) if errors else ""
    errors.clear()
    return text


def parser_errors(parser) -> list[str]:
    """The errors of an OnnxParser or OnnxParserRefitter, as text."""
    return [str(parser.get_error(i)) for i in range(parser.num_errors)]


def dtype_name(trt_dtype) -> str:
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    return DTYPES.get(name, name.lower())
